//! Prometheus metrics, served at `GET /metrics` on the admin listener.
//!
//! The alert rules built on them are `nats/alerts.yml`; its tests here run
//! the real `promtool` and check that every metric and label the rules
//! use is one the host exports.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A provider label. Unknown providers are counted as `unknown`, so a
/// client cannot blow up the label cardinality with random paths.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    /// The provider.
    pub provider: String,
}

/// A rejection label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabel {
    /// The provider (or `unknown`).
    pub provider: String,
    /// Why: `unknown_provider`, `too_large`, `missing_header`,
    /// `malformed_header`, `stale_timestamp`, `bad_signature`,
    /// `unprocessable`, `unavailable`.
    pub reason: &'static str,
}

/// A handler outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerLabel {
    /// The handler.
    pub handler: String,
    /// `ok`, `transient`, `trap`, `permanent`, `needs-human`.
    pub outcome: &'static str,
}

/// A dead-letter label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabel {
    /// The handler.
    pub handler: String,
    /// `max-deliveries`, `permanent`, `needs-human`, `trap`.
    pub reason: &'static str,
}

/// A per-handler label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandlerOnly {
    /// The handler.
    pub handler: String,
}

/// A handler version label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The handler.
    pub handler: String,
    /// The version this host runs new events on.
    pub version: String,
}

/// The host's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    accepted: Family<ProviderLabel, Counter>,
    duplicates: Family<ProviderLabel, Counter>,
    rejected: Family<RejectionLabel, Counter>,
    publish_seconds: Histogram,
    in_flight: Gauge,
    handled: Family<HandlerLabel, Counter>,
    invocation_seconds: Histogram,
    dead_letters: Family<DeadLetterLabel, Counter>,
    dlq_depth: Family<HandlerOnly, Gauge>,
    dlq_oldest_seconds: Family<HandlerOnly, Gauge>,
    handler_version: Family<VersionLabel, Gauge>,
    partitions_owned: Family<HandlerOnly, Gauge>,
    partitions: Family<HandlerOnly, Gauge>,
    handler_pending: Family<HandlerOnly, Gauge>,
    handler_ack_pending: Family<HandlerOnly, Gauge>,
    handler_redelivered: Family<HandlerOnly, Gauge>,
    activation_failures: Family<HandlerOnly, Counter>,
    guest_log_truncated: Family<HandlerOnly, Counter>,
    outbox: crate::outbox::metrics::OutboxMetrics,
    edge: crate::edge::metrics::EdgeMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("hookmesh");
        let accepted = Family::<ProviderLabel, Counter>::default();
        let duplicates = Family::<ProviderLabel, Counter>::default();
        let rejected = Family::<RejectionLabel, Counter>::default();
        // 0.25 ms … ~8 s.
        let publish_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let in_flight = Gauge::default();
        let handled = Family::<HandlerLabel, Counter>::default();
        // 20 µs … ~20 s.
        let invocation_seconds = Histogram::new(exponential_buckets(0.000_02, 2.0, 20));
        let dead_letters = Family::<DeadLetterLabel, Counter>::default();
        let dlq_depth = Family::<HandlerOnly, Gauge>::default();
        let dlq_oldest_seconds = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "dead_letters",
            "Dead letters written by this host, by handler and reason",
            dead_letters.clone(),
        );
        registry.register(
            "dlq_depth",
            "Entries in HOOK_DLQ, by handler",
            dlq_depth.clone(),
        );
        registry.register(
            "dlq_oldest_age_seconds",
            "Age of the oldest entry in HOOK_DLQ, by handler (0 when empty)",
            dlq_oldest_seconds.clone(),
        );
        let handler_version = Family::<VersionLabel, Gauge>::default();
        registry.register(
            "handler_version",
            "1 for the version of each handler this host runs new events on",
            handler_version.clone(),
        );
        let partitions_owned = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "partitions_owned",
            "Partitions of each handler this host works now",
            partitions_owned.clone(),
        );
        // Unowned partitions are computed across hosts: the largest
        // `partitions` minus the sum of `partitions_owned`.
        let partitions = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "partitions",
            "Partitions of each handler this host runs (its partition consumers); \
             minus the sum of partitions_owned over the hosts, the ones nobody works",
            partitions.clone(),
        );
        // From the server's consumer info: every host reports the same
        // cluster-wide figures (aggregate with max, not sum).
        let handler_pending = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "handler_pending",
            "Events of each handler not yet delivered, over its partition consumers (cluster-wide)",
            handler_pending.clone(),
        );
        let handler_ack_pending = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "handler_ack_pending",
            "Events of each handler delivered and not yet acknowledged (cluster-wide)",
            handler_ack_pending.clone(),
        );
        let handler_redelivered = Family::<HandlerOnly, Gauge>::default();
        registry.register(
            "handler_redelivered",
            "Events of each handler delivered more than once and not yet acknowledged (cluster-wide)",
            handler_redelivered.clone(),
        );
        let activation_failures = Family::<HandlerOnly, Counter>::default();
        registry.register(
            "activation_failures",
            "Handler versions this host refused to activate (did not compile or start here)",
            activation_failures.clone(),
        );
        let guest_log_truncated = Family::<HandlerOnly, Counter>::default();
        registry.register(
            "guest_log_truncated",
            "Invocations whose log output went past the manifest's max_log_lines or \
             max_log_bytes (the rest of their log lines were dropped)",
            guest_log_truncated.clone(),
        );
        registry.register(
            "events_handled",
            "Handler invocations, by handler and outcome",
            handled.clone(),
        );
        registry.register(
            "invocation_duration_seconds",
            "Time of one handler invocation, instantiation included",
            invocation_seconds.clone(),
        );
        registry.register(
            "webhooks_accepted",
            "Webhooks stored (answered 202)",
            accepted.clone(),
        );
        registry.register(
            "webhooks_duplicates",
            "Webhooks already stored before (answered 200 duplicate)",
            duplicates.clone(),
        );
        registry.register(
            "webhooks_rejected",
            "Webhooks refused, by reason",
            rejected.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time to store one webhook in JetStream, dedup included",
            publish_seconds.clone(),
        );
        registry.register(
            "webhooks_in_flight",
            "Webhook requests being handled now",
            in_flight.clone(),
        );
        let outbox = crate::outbox::metrics::OutboxMetrics::register(&mut registry);
        let edge = crate::edge::metrics::EdgeMetrics::register(&mut registry);
        Metrics {
            inner: Arc::new(Inner {
                registry,
                accepted,
                duplicates,
                rejected,
                publish_seconds,
                in_flight,
                handled,
                invocation_seconds,
                dead_letters,
                dlq_depth,
                dlq_oldest_seconds,
                handler_version,
                partitions_owned,
                partitions,
                handler_pending,
                handler_ack_pending,
                handler_redelivered,
                activation_failures,
                guest_log_truncated,
                outbox,
                edge,
            }),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Counts a stored webhook.
    pub fn accepted(&self, provider: &str) {
        self.inner.accepted.get_or_create(&label(provider)).inc();
    }

    /// Counts a duplicate.
    pub fn duplicate(&self, provider: &str) {
        self.inner.duplicates.get_or_create(&label(provider)).inc();
    }

    /// Counts a rejection.
    pub fn rejected(&self, provider: &str, reason: &'static str) {
        let provider = provider.to_string();
        self.inner
            .rejected
            .get_or_create(&RejectionLabel { provider, reason })
            .inc();
    }

    /// Records how long storing took.
    pub fn publish_took(&self, elapsed: Duration) {
        self.inner.publish_seconds.observe(elapsed.as_secs_f64());
    }

    /// Marks a request in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.inner.in_flight.inc();
        InFlight(self.inner.in_flight.clone())
    }

    /// Counts a handler invocation and records its duration.
    pub fn invoked(&self, handler: &str, outcome: &'static str, elapsed: Duration) {
        let label = HandlerLabel {
            handler: handler.to_string(),
            outcome,
        };
        self.inner.handled.get_or_create(&label).inc();
        self.inner.invocation_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts an invocation whose log output was truncated.
    pub fn guest_log_truncated(&self, handler: &str) {
        let label = HandlerOnly {
            handler: handler.to_string(),
        };
        self.inner.guest_log_truncated.get_or_create(&label).inc();
    }

    /// Counts a dead letter written.
    pub fn dead_lettered(&self, handler: &str, reason: &'static str) {
        let label = DeadLetterLabel {
            handler: handler.to_string(),
            reason,
        };
        self.inner.dead_letters.get_or_create(&label).inc();
    }

    /// Sets how many partitions of `handler` this host works.
    pub fn partitions_owned(&self, handler: &str, owned: usize) {
        self.inner
            .partitions_owned
            .get_or_create(&HandlerOnly {
                handler: handler.to_string(),
            })
            .set(i64::try_from(owned).unwrap_or(i64::MAX));
    }

    /// Sets how many partitions `handler` has while this host runs it
    /// (`None`: it stopped running here).
    pub fn partitions(&self, handler: &str, partitions: Option<u32>) {
        let label = handler_only(handler);
        match partitions {
            Some(count) => {
                self.inner
                    .partitions
                    .get_or_create(&label)
                    .set(i64::from(count));
            }
            None => {
                self.inner.partitions.remove(&label);
            }
        }
    }

    /// Sets a handler's backlog as the server counts it over its partition
    /// consumers.
    pub fn backlog_gauges(&self, handler: &str, backlog: &Backlog) {
        let label = handler_only(handler);
        let set = |family: &Family<HandlerOnly, Gauge>, value: u64| {
            family
                .get_or_create(&label)
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        set(&self.inner.handler_pending, backlog.pending);
        set(&self.inner.handler_ack_pending, backlog.ack_pending);
        set(&self.inner.handler_redelivered, backlog.redelivered);
    }

    /// Counts a version this host refused to activate.
    pub fn activation_failed(&self, handler: &str) {
        self.inner
            .activation_failures
            .get_or_create(&handler_only(handler))
            .inc();
    }

    /// Sets a handler's DLQ depth and oldest age.
    pub fn dlq_gauges(&self, handler: &str, depth: u64, oldest: Duration) {
        let label = HandlerOnly {
            handler: handler.to_string(),
        };
        self.inner
            .dlq_depth
            .get_or_create(&label)
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.inner
            .dlq_oldest_seconds
            .get_or_create(&label)
            .set(i64::try_from(oldest.as_secs()).unwrap_or(i64::MAX));
    }

    /// Marks `version` as the one `handler` runs (`None`: the handler was
    /// removed from this host), forgetting `previous`.
    pub fn handler_version(&self, handler: &str, version: Option<&str>, previous: Option<&str>) {
        let label = |version: &str| VersionLabel {
            handler: handler.to_string(),
            version: version.to_string(),
        };
        if let Some(previous) = previous {
            self.inner.handler_version.remove(&label(previous));
        }
        if let Some(version) = version {
            self.inner
                .handler_version
                .get_or_create(&label(version))
                .set(1);
        }
    }

    /// The HTTP edge's metrics.
    pub fn edge(&self) -> &crate::edge::metrics::EdgeMetrics {
        &self.inner.edge
    }

    /// The outbox relays' metrics.
    pub fn outbox(&self) -> &crate::outbox::metrics::OutboxMetrics {
        &self.inner.outbox
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// A handler's backlog on the server, as the gauges show it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Events not yet delivered.
    pub pending: u64,
    /// Events delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Events delivered more than once and not yet acknowledged.
    pub redelivered: u64,
}

fn handler_only(handler: &str) -> HandlerOnly {
    HandlerOnly {
        handler: handler.to_string(),
    }
}

fn label(provider: &str) -> ProviderLabel {
    ProviderLabel {
        provider: provider.to_string(),
    }
}

/// Decrements the in-flight gauge on drop.
#[derive(Debug)]
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod alerts;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(metrics: &Metrics, series: &str) -> Option<f64> {
        let prefix = format!("{series} ");
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
    }

    #[test]
    fn the_partition_count_is_shown_while_a_handler_runs_and_gone_after() {
        let metrics = Metrics::default();
        let series = r#"hookmesh_partitions{handler="rec"}"#;
        assert_eq!(sample(&metrics, series), None);
        metrics.partitions("rec", Some(16));
        assert_eq!(sample(&metrics, series), Some(16.0));
        metrics.partitions("rec", None);
        assert_eq!(sample(&metrics, series), None);
    }

    #[test]
    fn backlog_gauges_follow_the_last_reading() {
        let metrics = Metrics::default();
        let backlog = Backlog {
            pending: 7,
            ack_pending: 3,
            redelivered: 1,
        };
        metrics.backlog_gauges("rec", &backlog);
        assert_eq!(
            sample(&metrics, r#"hookmesh_handler_pending{handler="rec"}"#),
            Some(7.0)
        );
        assert_eq!(
            sample(&metrics, r#"hookmesh_handler_ack_pending{handler="rec"}"#),
            Some(3.0)
        );
        assert_eq!(
            sample(&metrics, r#"hookmesh_handler_redelivered{handler="rec"}"#),
            Some(1.0)
        );
        metrics.backlog_gauges("rec", &Backlog::default());
        assert_eq!(
            sample(&metrics, r#"hookmesh_handler_pending{handler="rec"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn activation_failures_count_up() {
        let metrics = Metrics::default();
        let series = r#"hookmesh_activation_failures_total{handler="rec"}"#;
        metrics.activation_failed("rec");
        metrics.activation_failed("rec");
        assert_eq!(sample(&metrics, series), Some(2.0));
    }
}
