//! The gauges a host refreshes from the server: each handler's backlog
//! (pending, ack pending, redelivered over its partition consumers) and
//! the DLQ's depth and oldest age per handler.
//!
//! They are the cluster's figures, not this host's: every host reports the
//! same values, so alert rules aggregate them with `max`, not `sum`.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use tokio::sync::watch;
use tracing::debug;

use super::consumer_backlogs;
use crate::dlq;
use crate::metrics::{Backlog, Metrics};

/// How often the gauges are refreshed.
pub const EVERY: Duration = Duration::from_secs(10);

/// Handlers the gauges were last set for, so a handler whose consumers or
/// dead letters are all gone reads 0 instead of its last value.
#[derive(Debug, Default)]
pub struct Seen {
    backlog: BTreeSet<String>,
    dlq: BTreeSet<String>,
}

/// Refreshes the gauges every [`EVERY`] until `stopped` changes.
pub async fn run(js: jetstream::Context, metrics: Metrics, mut stopped: watch::Receiver<bool>) {
    let mut seen = Seen::default();
    let mut every = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return,
        }
        refresh(&js, &metrics, &mut seen).await;
    }
}

/// Reads the figures once and sets the gauges; a part the server does not
/// answer keeps its last values.
pub async fn refresh(js: &jetstream::Context, metrics: &Metrics, seen: &mut Seen) {
    match consumer_backlogs(js).await {
        Ok(backlogs) => {
            for gone in seen.backlog.iter().filter(|h| !backlogs.contains_key(*h)) {
                metrics.backlog_gauges(gone, &Backlog::default());
            }
            for (handler, backlog) in &backlogs {
                metrics.backlog_gauges(handler, &backlog.figures);
            }
            seen.backlog = backlogs.into_keys().collect();
        }
        Err(error) => debug!(%error, "backlog gauges not refreshed"),
    }
    match dlq::store::depths(js).await {
        Ok(depths) => {
            let now = SystemTime::now();
            for gone in seen.dlq.iter().filter(|h| !depths.contains_key(*h)) {
                metrics.dlq_gauges(gone, 0, Duration::ZERO);
            }
            for (handler, (depth, oldest)) in &depths {
                let age = now.duration_since(*oldest).unwrap_or_default();
                metrics.dlq_gauges(handler, *depth, age);
            }
            seen.dlq = depths.into_keys().collect();
        }
        Err(error) => debug!(%error, "DLQ gauges not refreshed"),
    }
}
