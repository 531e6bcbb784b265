//! The relay's Prometheus metrics, per source, registered into the host's
//! [`Metrics`](crate::metrics::Metrics).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::queries::Stats;

/// The `source` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The `[[outbox]]` source.
    pub source: String,
}

/// The outbox metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct OutboxMetrics {
    published: Family<SourceLabel, Counter>,
    failed: Family<SourceLabel, Counter>,
    attempts_failed: Family<SourceLabel, Counter>,
    pending: Family<SourceLabel, Gauge>,
    failed_rows: Family<SourceLabel, Gauge>,
    oldest_pending: Family<SourceLabel, Gauge>,
    leader: Family<SourceLabel, Gauge>,
    delay: Family<SourceLabel, Histogram, fn() -> Histogram>,
}

impl OutboxMetrics {
    /// Registers every outbox metric in `registry` (prefixed `outbox_`).
    pub fn register(registry: &mut Registry) -> OutboxMetrics {
        let metrics = OutboxMetrics {
            published: Family::default(),
            failed: Family::default(),
            attempts_failed: Family::default(),
            pending: Family::default(),
            failed_rows: Family::default(),
            oldest_pending: Family::default(),
            leader: Family::default(),
            // 1 ms … ~65 s.
            delay: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
        };
        let outbox = registry.sub_registry_with_prefix("outbox");
        let counters = [
            (
                "published",
                "Outbox rows stored in HOOK_EVENTS and marked published, by source",
                &metrics.published,
            ),
            (
                "failed",
                "Outbox rows marked failed by this relay (max_attempts reached, or never storable), by source",
                &metrics.failed,
            ),
            (
                "attempts_failed",
                "Publish attempts of outbox rows that failed (the row backs off), by source",
                &metrics.attempts_failed,
            ),
        ];
        for (name, help, family) in counters {
            outbox.register(name, help, family.clone());
        }
        let gauges = [
            (
                "pending",
                "Outbox rows pending, by source",
                &metrics.pending,
            ),
            (
                "failed_rows",
                "Outbox rows in status failed (they hold their aggregate back), by source",
                &metrics.failed_rows,
            ),
            (
                "oldest_pending_age_seconds",
                "Age of the oldest pending outbox row, by source (0 when none)",
                &metrics.oldest_pending,
            ),
            (
                "leader",
                "1 while this process relays the source's table, 0 while it stands by",
                &metrics.leader,
            ),
        ];
        for (name, help, family) in gauges {
            outbox.register(name, help, family.clone());
        }
        outbox.register(
            "delay_seconds",
            "Time from an outbox row's created_at to its PubAck, by source",
            metrics.delay.clone(),
        );
        metrics
    }

    fn label(source: &str) -> SourceLabel {
        SourceLabel {
            source: source.to_string(),
        }
    }

    /// Counts rows published, with the time each took since `created_at`.
    pub fn published(&self, source: &str, delays: &[Duration]) {
        let label = Self::label(source);
        self.published
            .get_or_create(&label)
            .inc_by(delays.len() as u64);
        let histogram = self.delay.get_or_create(&label);
        for delay in delays {
            histogram.observe(delay.as_secs_f64());
        }
    }

    /// Counts failed attempts, and rows that became `failed`.
    pub fn failed(&self, source: &str, attempts: usize, rows_failed: usize) {
        let label = Self::label(source);
        self.attempts_failed
            .get_or_create(&label)
            .inc_by(attempts as u64);
        self.failed.get_or_create(&label).inc_by(rows_failed as u64);
    }

    /// Sets the gauges from the table's counts.
    pub fn stats(&self, source: &str, stats: &Stats) {
        let label = Self::label(source);
        self.pending.get_or_create(&label).set(stats.pending);
        self.failed_rows.get_or_create(&label).set(stats.failed);
        self.oldest_pending
            .get_or_create(&label)
            .set(i64::try_from(stats.oldest_pending.as_secs()).unwrap_or(i64::MAX));
    }

    /// Sets whether this process relays the source now.
    pub fn leader(&self, source: &str, leading: bool) {
        self.leader
            .get_or_create(&Self::label(source))
            .set(i64::from(leading));
    }
}
