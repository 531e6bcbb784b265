//! The relay loop of one `[[outbox]]` entry: one session with the
//! database at a time (reconnecting with a growing pause), leadership by
//! the table's advisory lock, rounds of due rows published per aggregate in
//! `id` order, and the rows marked after their PubAck.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::db::{Connection, error_text};
use super::health::{Health, RelayState};
use super::metrics::OutboxMetrics;
use super::queries::{Failure, Queries};
use super::row::{OutboxRow, Outcome};
use super::table::{self, ShapeError};
use crate::config::OutboxConfig;
use crate::publish::{Publisher, Stored};
use crate::retry::Retry;
use crate::telemetry::{KeyValue, SpanKind, Trace, names};

/// Aggregates published at once within a round (each one row at a time).
pub const AGGREGATES_IN_FLIGHT: usize = 256;
/// How long one database call may take before the session is given up.
const DB_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the pending/failed gauges are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(2);

/// Why a session with the database ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A call failed (the connection broke, the server refused).
    #[error("{step}: {}", error_text(.source))]
    Database {
        /// What was being done.
        step: &'static str,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A call did not answer in time.
    #[error("{step}: no answer within {DB_TIMEOUT:?}")]
    Timeout {
        /// What was being done.
        step: &'static str,
    },
    /// The table is missing or has a shape the relay cannot work with.
    #[error(transparent)]
    Shape(ShapeError),
    /// The server closed the session.
    #[error("the database closed the connection")]
    Closed,
}

/// One relay: publishes the due rows of one outbox table while it holds the
/// table's relay lock, stands by while another process does.
#[derive(Debug, Clone)]
pub struct Relay {
    config: OutboxConfig,
    publisher: Publisher,
    duplicate_window: Duration,
    metrics: OutboxMetrics,
    health: Health,
}

/// What a round of publishing did.
#[derive(Debug, Default)]
struct Round {
    /// Rows now in `HOOK_EVENTS`.
    published: Vec<i64>,
    /// Their time from `created_at` to the PubAck.
    delays: Vec<Duration>,
    /// Rows that failed to publish, with why.
    failures: Vec<(Failure, String)>,
}

impl Relay {
    /// A relay of `config`'s table, storing through `publisher` (whose
    /// stream dedups within `duplicate_window`).
    pub fn new(
        config: OutboxConfig,
        publisher: Publisher,
        duplicate_window: Duration,
        metrics: OutboxMetrics,
        health: Health,
    ) -> Relay {
        health.set(
            &config.source,
            config.database.describe(),
            RelayState::Connecting,
        );
        Relay {
            config,
            publisher,
            duplicate_window,
            metrics,
            health,
        }
    }

    /// Relays until `stopped` turns true (a round in hand is finished and
    /// marked first), reconnecting whenever the database goes away.
    pub async fn run(self, mut stopped: watch::Receiver<bool>) {
        let span = info_span!(
            "outbox",
            source = %self.config.source,
            table = %self.config.table,
            database = %self.config.database
        );
        async move {
            let mut retry = Retry::default();
            loop {
                let ended = self.session(&mut stopped, &mut retry).await;
                self.metrics.leader(&self.config.source, false);
                match ended {
                    Ok(()) => break,
                    Err(error) => {
                        let reason = error.to_string();
                        self.set_state(RelayState::Unreachable(reason.clone()));
                        warn!(error = %reason, retry_in = ?retry.delay(), "outbox relay cannot work; trying again");
                        retry.pause(&mut stopped).await;
                        if stopping(&stopped) {
                            break;
                        }
                    }
                }
            }
            info!("outbox relay stopped");
        }
        .instrument(span)
        .await
    }

    fn set_state(&self, state: RelayState) {
        self.health
            .set(&self.config.source, self.config.database.describe(), state);
    }

    /// One session: connect, check the table, then lead or stand by until
    /// stopped (`Ok`) or the database fails (`Err`).
    async fn session(
        &self,
        stopped: &mut watch::Receiver<bool>,
        retry: &mut Retry,
    ) -> Result<(), SessionError> {
        let config = &self.config;
        let application = format!("hookmesh-outbox-{}", config.source);
        let channel = config.table.channel();
        let conn = db(
            "connect",
            config.database.connect(&application, Some(&channel)),
        )
        .await?;
        let shape = tokio::time::timeout(DB_TIMEOUT, table::inspect(&conn.client, &config.table))
            .await
            .map_err(|_| SessionError::Timeout {
                step: "inspect the table",
            })?
            .map_err(SessionError::Shape)?;
        if !shape.notify {
            info!(poll_interval = ?config.poll_interval,
                "the table has no NOTIFY trigger (`hookmesh outbox init --notify` adds it): polling only");
        }
        let queries = db("prepare", Queries::prepare(&conn.client, &config.table)).await?;
        self.set_state(RelayState::Connected);
        retry.reset();

        let mut leading = false;
        let mut announced_standby = false;
        let mut next_stats = Instant::now();
        let mut next_retry: Option<Instant> = None;
        loop {
            if stopping(stopped) {
                return Ok(());
            }
            if Instant::now() >= next_stats {
                let stats = db("count rows", queries.stats(&conn.client)).await?;
                self.metrics.stats(&config.source, &stats);
                next_stats = Instant::now() + STATS_EVERY;
            }
            if !leading {
                leading = db("take the relay lock", queries.try_lead(&conn.client)).await?;
                self.metrics.leader(&config.source, leading);
                if !leading {
                    if !announced_standby {
                        info!("another relay holds this table; standing by");
                        announced_standby = true;
                    }
                    wait(&conn, stopped, config.poll_interval, false).await?;
                    continue;
                }
                info!("relaying: this process holds the table's relay lock");
            }
            let began = Instant::now();
            let rows = db("read due rows", queries.due(&conn.client, config.batch)).await?;
            if rows.is_empty() {
                let pause = next_retry.take().map_or(config.poll_interval, |at| {
                    at.saturating_duration_since(Instant::now())
                        .min(config.poll_interval)
                });
                wait(&conn, stopped, pause, true).await?;
                continue;
            }
            let (count, read) = (rows.len(), began.elapsed());
            let round = self.publish(rows).await;
            let published = began.elapsed();
            db(
                "mark rows published",
                queries.mark_published(&conn.client, &round.published),
            )
            .await?;
            self.metrics.published(&config.source, &round.delays);
            if let Some(at) = self.record_failures(&conn, &queries, &round).await? {
                next_retry = Some(next_retry.map_or(at, |earlier| earlier.min(at)));
            }
            debug!(
                rows = count,
                read_ms = read.as_secs_f64() * 1e3,
                publish_ms = (published - read).as_secs_f64() * 1e3,
                mark_ms = (began.elapsed() - published).as_secs_f64() * 1e3,
                "round"
            );
        }
    }

    /// Publishes a round: the rows of each aggregate one at a time in `id`
    /// order (the next only after the PubAck of the one before), many
    /// aggregates at once. An aggregate's first failure ends its part of
    /// the round: its later rows wait for it.
    async fn publish(&self, rows: Vec<OutboxRow>) -> Round {
        let fetched = Instant::now();
        let mut chains: Vec<Vec<OutboxRow>> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        for row in rows {
            let (kind, id) = row.aggregate();
            let i = *index
                .entry((kind.to_string(), id.to_string()))
                .or_insert_with(|| {
                    chains.push(Vec::new());
                    chains.len() - 1
                });
            chains[i].push(row);
        }
        let results: Vec<Vec<(OutboxRow, Outcome)>> = futures::stream::iter(chains)
            .map(|chain| self.publish_chain(chain))
            .buffer_unordered(AGGREGATES_IN_FLIGHT)
            .collect()
            .await;
        let mut round = Round::default();
        for (row, outcome) in results.into_iter().flatten() {
            match outcome {
                Outcome::Published => {
                    round.published.push(row.id);
                    round.delays.push(row.age + fetched.elapsed());
                }
                Outcome::Retry(reason) => round.failures.push((
                    Failure {
                        id: row.id,
                        delay: self.config.backoff.delay(attempt(&row)),
                        fatal: false,
                    },
                    reason,
                )),
                Outcome::Fail(reason) => round.failures.push((
                    Failure {
                        id: row.id,
                        delay: Duration::ZERO,
                        fatal: true,
                    },
                    reason,
                )),
            }
        }
        round
    }

    async fn publish_chain(&self, chain: Vec<OutboxRow>) -> Vec<(OutboxRow, Outcome)> {
        let mut done = Vec::with_capacity(chain.len());
        for row in chain {
            let outcome = self.publish_row(&row).await;
            let published = outcome == Outcome::Published;
            done.push((row, outcome));
            if !published {
                break;
            }
        }
        done
    }

    async fn publish_row(&self, row: &OutboxRow) -> Outcome {
        let mut event = row.to_inbound(&self.config.source);
        // Traced, a relayed row starts its trace with a producer span the
        // stored event names as its parent.
        let trace = Trace::start(names::PUBLISH, SpanKind::Producer, None, || {
            vec![
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("hookmesh.provider", self.config.source.clone()),
                KeyValue::new("hookmesh.outbox.row", row.id),
                KeyValue::new("hookmesh.idempotency_key", event.idempotency_key.clone()),
            ]
        });
        if let Some(traceparent) = trace.traceparent() {
            event.traceparent = traceparent;
        }
        let span = info_span!("outbox_row", row = row.id, correlation_id = %event.correlation_id);
        let outcome = async {
            // Any earlier publish of a row happened after its created_at;
            // while that is well inside the stream's duplicate window and
            // the message id is the row's own, the server's dedup is exact
            // and the idempotency look-up can be skipped.
            let recent = row.has_own_key() && row.age < self.duplicate_window / 2;
            let stored = if recent {
                self.publisher.store_recent(&event).await
            } else {
                self.publisher.store(&event).await
            };
            match stored {
                Ok(Stored::Accepted(receipt)) => {
                    debug!(subject = %receipt.subject, stream_seq = receipt.stream_seq, "outbox row published");
                    Outcome::Published
                }
                Ok(Stored::Duplicate(receipt)) => {
                    debug!(subject = %receipt.subject, stream_seq = receipt.stream_seq, "outbox row was stored before");
                    Outcome::Published
                }
                Err(error) => {
                    trace.fail(|| error.to_string());
                    Outcome::of_error(&error)
                }
            }
        }
        .instrument(span)
        .await;
        trace.end();
        outcome
    }

    /// Counts the round's failed attempts in the table; logs every row that
    /// became `failed`. Returns when the earliest backed-off row is due.
    async fn record_failures(
        &self,
        conn: &Connection,
        queries: &Queries,
        round: &Round,
    ) -> Result<Option<Instant>, SessionError> {
        if round.failures.is_empty() {
            return Ok(None);
        }
        let failures: Vec<Failure> = round.failures.iter().map(|(f, _)| f.clone()).collect();
        let recorded = db(
            "record failed attempts",
            queries.record_failures(&conn.client, &failures, self.config.max_attempts),
        )
        .await?;
        let reason_of = |id: i64| {
            round
                .failures
                .iter()
                .find(|(f, _)| f.id == id)
                .map_or("", |(_, reason)| reason.as_str())
        };
        let mut failed = 0;
        for row in recorded.iter().filter(|r| r.failed) {
            failed += 1;
            error!(
                row = row.id,
                attempts = row.attempts,
                error = %reason_of(row.id),
                "outbox row failed; it holds back its aggregate's later rows until `hookmesh outbox retry --failed`"
            );
        }
        if let Some((first, reason)) = round.failures.iter().find(|(f, _)| !f.fatal) {
            warn!(
                rows = round.failures.len() - failed,
                first_row = first.id,
                error = %reason,
                "outbox rows not published; backing off"
            );
        }
        self.metrics
            .failed(&self.config.source, round.failures.len(), failed);
        let soonest = failures.iter().filter(|f| !f.fatal).map(|f| f.delay).min();
        Ok(soonest.map(|delay| Instant::now() + delay))
    }
}

/// The number of the attempt that just failed (1 for a row's first).
fn attempt(row: &OutboxRow) -> u64 {
    u64::try_from(row.attempts).unwrap_or(0) + 1
}

/// Whether the relay should stop: asked to, or nobody can ask any more.
fn stopping(stopped: &watch::Receiver<bool>) -> bool {
    *stopped.borrow() || stopped.has_changed().is_err()
}

/// Waits `pause`, or less: a stop, a notification (when `on_notify`), or
/// the session ending (an error, so the relay reconnects at once).
async fn wait(
    conn: &Connection,
    stopped: &mut watch::Receiver<bool>,
    pause: Duration,
    on_notify: bool,
) -> Result<(), SessionError> {
    tokio::select! {
        _ = tokio::time::sleep(pause) => Ok(()),
        _ = conn.notified(), if on_notify => Ok(()),
        _ = stopped.changed() => Ok(()),
        _ = conn.closed() => Err(SessionError::Closed),
    }
}

/// A database call, bounded by [`DB_TIMEOUT`], its error naming the step.
async fn db<T>(
    step: &'static str,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(DB_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(SessionError::Database { step, source }),
        Err(_) => Err(SessionError::Timeout { step }),
    }
}
