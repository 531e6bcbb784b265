//! The dead-letter writer: a durable consumer `dlq_writer` on
//! `HOOK_ADVISORIES`, shared by every host (each advisory goes to one of
//! them), turning each give-up advisory into one `HOOK_DLQ` entry.
//!
//! An advisory is acked only after its entry is stored, so a host that
//! dies in between leaves it to be redelivered — to itself or another
//! host — and the entry's `Nats-Msg-Id` (`<handler>:<stream_seq>`) makes
//! the second write a no-op.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream::LastRawMessageErrorKind};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::{Instrument, debug, info, info_span, warn};

use super::entry::{self, Failure, Original};
use super::{ADVISORIES_STREAM, DlqError, DlqReason, WRITER_CONSUMER, handler_of_consumer};
use crate::metrics::Metrics;
use crate::records::attempts::{self, AttemptRecord, Reason};
use crate::retry::Retry;
use crate::streams::{ATTEMPTS_BUCKET, EVENTS_STREAM};

/// A JetStream consumer advisory, the fields hookmesh reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Advisory {
    /// `io.nats.jetstream.advisory.v1.max_deliver` or `….terminated`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The stream.
    pub stream: String,
    /// The consumer.
    pub consumer: String,
    /// The event's sequence.
    pub stream_seq: u64,
    /// Deliveries so far.
    #[serde(default)]
    pub deliveries: u64,
}

impl Advisory {
    /// Whether the consumer terminated the event (rather than giving up
    /// after `max_deliver`).
    pub fn terminated(&self) -> bool {
        self.kind.ends_with(".terminated")
    }
}

/// The reason of a dead letter from how it ended and its attempt record.
/// The host terminates an event whose last attempt failed, so a
/// terminated event whose last failure was transient ran out of attempts;
/// one the server gave up on (every delivery timed out: hosts died in it)
/// ran out of deliveries.
pub fn reason(terminated: bool, record: Option<&AttemptRecord>) -> DlqReason {
    match (terminated, record.map(|r| r.reason)) {
        (true, Some(Reason::NeedsHuman)) => DlqReason::NeedsHuman,
        (true, Some(Reason::Permanent) | None) => DlqReason::Permanent,
        (_, Some(Reason::Trap)) => DlqReason::Trap,
        (true, Some(Reason::Transient)) | (false, _) => DlqReason::MaxDeliveries,
    }
}

/// The failure record of a dead letter: from the attempt record when there
/// is one; otherwise (every delivery timed out, e.g. the host died
/// mid-attempt) from the advisory alone.
pub fn failure(
    handler: &str,
    reason: DlqReason,
    record: Option<AttemptRecord>,
    deliveries: u64,
) -> Failure {
    match record {
        Some(record) => Failure {
            handler: handler.to_string(),
            handler_version: record.handler_version,
            reason,
            error: record.last_error,
            attempts: record.attempts.max(deliveries),
            first_failure: record.first_failure,
            last_failure: record.last_failure,
        },
        None => {
            let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            Failure {
                handler: handler.to_string(),
                handler_version: String::new(),
                reason,
                error: "no failure was recorded: every delivery timed out unacknowledged \
                        (the handling host stopped or stalled mid-attempt)"
                    .to_string(),
                attempts: deliveries,
                first_failure: now.clone(),
                last_failure: now,
            }
        }
    }
}

/// Runs the writer until `shutdown` turns true.
pub async fn run(js: jetstream::Context, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    let mut retry = Retry::default();
    while !*shutdown.borrow() {
        let started = async {
            let attempts = js
                .get_key_value(ATTEMPTS_BUCKET)
                .await
                .map_err(|e| DlqError::nats(ATTEMPTS_BUCKET, e))?;
            let consumer = ensure_consumer(&js).await?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(64)
                .expires(Duration::from_secs(30))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| DlqError::nats(WRITER_CONSUMER, e))?;
            Ok::<_, DlqError>((attempts, messages))
        }
        .await;
        let (attempts, mut messages) = match started {
            Ok(started) => started,
            Err(error) => {
                warn!(%error, retry_in = ?retry.delay(), "dead-letter writer not ready");
                retry.pause(&mut shutdown).await;
                continue;
            }
        };
        retry.reset();
        info!("dead-letter writer started");
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                next = messages.next() => match next {
                    Some(Ok(message)) => settle(&js, &attempts, &metrics, message).await,
                    Some(Err(error)) => {
                        debug!(%error, "advisory pull interrupted");
                        break;
                    }
                    None => break,
                },
            }
        }
        retry.wait(&mut shutdown).await;
    }
}

async fn ensure_consumer(js: &jetstream::Context) -> Result<consumer::PullConsumer, DlqError> {
    let stream = js
        .get_stream_no_info(ADVISORIES_STREAM)
        .await
        .map_err(|e| DlqError::nats(ADVISORIES_STREAM, e))?;
    stream
        .get_or_create_consumer(
            WRITER_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(WRITER_CONSUMER.to_string()),
                description: Some(
                    "hookmesh: turns give-up advisories into HOOK_DLQ entries".to_string(),
                ),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: 64,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| DlqError::nats(format!("consumer {WRITER_CONSUMER}"), e))
}

/// Writes the entry of one advisory and acks it; a NATS failure leaves the
/// advisory to be redelivered.
async fn settle(
    js: &jetstream::Context,
    attempts: &kv::Store,
    metrics: &Metrics,
    message: jetstream::Message,
) {
    let advisory: Advisory = match serde_json::from_slice(&message.payload) {
        Ok(advisory) => advisory,
        Err(error) => {
            warn!(subject = %message.subject, %error, "not an advisory; skipped");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let handler = match handler_of_consumer(&advisory.consumer) {
        Some(handler) if advisory.stream == EVENTS_STREAM => handler.to_string(),
        _ => {
            debug!(consumer = %advisory.consumer, "advisory of a consumer that is no handler's; skipped");
            let _ = message.ack().await;
            return;
        }
    };
    let span = info_span!("dead_letter", %handler, stream_seq = advisory.stream_seq);
    async {
        match write(js, attempts, &handler, &advisory).await {
            Ok(Some((stored, reason))) => {
                if !stored.duplicate {
                    metrics.dead_lettered(&handler, reason.as_str());
                }
                let seq = stored.seq;
                if let Err(error) = message.ack().await {
                    warn!(%error, dlq_seq = seq, "advisory ack failed; it comes back and is deduplicated");
                }
            }
            Ok(None) => {
                let _ = message.ack().await;
            }
            Err(error) => {
                warn!(%error, "dead letter not written yet; will retry");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Stores the entry of `advisory`: `Some((where, reason))`, or `None` when
/// there is nothing left to store.
async fn write(
    js: &jetstream::Context,
    attempts: &kv::Store,
    handler: &str,
    advisory: &Advisory,
) -> Result<Option<(entry::Stored, DlqReason)>, DlqError> {
    let record = attempts::read(attempts, handler, advisory.stream_seq)
        .await
        .map_err(|e| DlqError::nats(ATTEMPTS_BUCKET, e))?;
    if let Some(how) = record.as_ref().and_then(|r| r.resolved.as_deref()) {
        debug!(
            how,
            "its dead letter was resolved already; nothing to store"
        );
        return Ok(None);
    }
    let events = js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(|e| DlqError::nats(EVENTS_STREAM, e))?;
    let reason = reason(advisory.terminated(), record.as_ref());
    let original = match events.get_raw_message(advisory.stream_seq).await {
        Ok(message) => Original::from(message),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
            // Aged out of HOOK_EVENTS before any writer ran: keep what the
            // attempt record knows rather than nothing.
            let Some(subject) = record.as_ref().map(|r| r.subject.clone()) else {
                warn!(
                    "the event is gone from HOOK_EVENTS and was never recorded as failing; no dead letter"
                );
                return Ok(None);
            };
            warn!("the event is gone from HOOK_EVENTS; the dead letter has no payload");
            Original {
                subject,
                stream_seq: advisory.stream_seq,
                headers: Default::default(),
                payload: Default::default(),
            }
        }
        Err(e) => return Err(DlqError::nats(format!("{EVENTS_STREAM} get"), e)),
    };
    if let Some(seq) = stored_before(js, handler, &original).await? {
        debug!(dlq_seq = seq, "dead letter stored before");
        return Ok(None);
    }
    let failure = failure(handler, reason, record, advisory.deliveries);
    let msg_id = format!("{handler}:{}", advisory.stream_seq);
    let stored = entry::publish(js, &original, &failure, &msg_id).await?;
    if stored.duplicate {
        debug!(dlq_seq = stored.seq, "dead letter stored before");
    } else {
        info!(dlq_seq = stored.seq, %reason, error = %failure.error, attempts = failure.attempts, "dead letter stored");
    }
    Ok(Some((stored, reason)))
}

/// The `HOOK_DLQ` sequence of the entry of `original`, when it is the last
/// one on its subject: an advisory processed again after the duplicate
/// window (its consumer reset, say) must not make a second entry.
async fn stored_before(
    js: &jetstream::Context,
    handler: &str,
    original: &Original,
) -> Result<Option<u64>, DlqError> {
    let dlq = js
        .get_stream_no_info(super::DLQ_STREAM)
        .await
        .map_err(|e| DlqError::nats(super::DLQ_STREAM, e))?;
    match dlq
        .get_last_raw_message_by_subject(&entry::subject(handler, &original.subject))
        .await
    {
        Ok(last) => {
            let same = last
                .headers
                .get(entry::STREAM_SEQ)
                .is_some_and(|v| v.as_str() == original.stream_seq.to_string());
            Ok(same.then_some(last.sequence))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(DlqError::nats(format!("{} read", super::DLQ_STREAM), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_follow_the_advisory_and_the_last_failure() {
        let record = |reason| AttemptRecord {
            handler: "h".into(),
            handler_version: "v".into(),
            stream_seq: 1,
            subject: "hook.a.b.0.c.d".into(),
            attempts: 1,
            last_delivery: 1,
            last_error: "e".into(),
            reason,
            first_failure: "t".into(),
            last_failure: "t".into(),
            resolved: None,
        };
        assert_eq!(
            reason(true, Some(&record(Reason::NeedsHuman))),
            DlqReason::NeedsHuman
        );
        assert_eq!(
            reason(true, Some(&record(Reason::Permanent))),
            DlqReason::Permanent
        );
        assert_eq!(reason(true, None), DlqReason::Permanent);
        assert_eq!(reason(false, Some(&record(Reason::Trap))), DlqReason::Trap);
        assert_eq!(
            reason(true, Some(&record(Reason::Trap))),
            DlqReason::Trap,
            "the last attempt trapped"
        );
        assert_eq!(
            reason(true, Some(&record(Reason::Transient))),
            DlqReason::MaxDeliveries,
            "the last attempt failed transiently"
        );
        assert_eq!(
            reason(false, Some(&record(Reason::Transient))),
            DlqReason::MaxDeliveries
        );
        assert_eq!(reason(false, None), DlqReason::MaxDeliveries);
    }

    #[test]
    fn advisories_parse_as_the_server_sends_them() {
        let max: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.max_deliver","id":"x","timestamp":"2026-01-01T00:00:00Z",
                "stream":"HOOK_EVENTS","consumer":"handler_order-sync_3","stream_seq":17,"deliveries":4}"#,
        )
        .expect("advisory");
        assert!(!max.terminated());
        assert_eq!((max.stream_seq, max.deliveries), (17, 4));
        let term: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.jetstream.advisory.v1.terminated","stream":"HOOK_EVENTS",
                "consumer":"handler_x_0","consumer_seq":2,"stream_seq":9,"deliveries":1}"#,
        )
        .expect("advisory");
        assert!(term.terminated());
    }
}
