//! One dead letter: the original event (payload byte for byte, its
//! headers) plus the failure record in `Hook-Dlq-*` headers, on subject
//! `dlq.<handler>.<provider>.<domain>.<partition>.<entity>.<event type…>`.

use std::time::SystemTime;

use async_nats::jetstream::{self, message::StreamMessage};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;

use super::DlqError;
use crate::subject::EVENT_PREFIX;

pub use crate::headers::{
    DLQ_ATTEMPTS as ATTEMPTS, DLQ_ERROR as ERROR, DLQ_FIRST_FAILURE as FIRST_FAILURE,
    DLQ_HANDLER as HANDLER, DLQ_HANDLER_VERSION as HANDLER_VERSION,
    DLQ_LAST_FAILURE as LAST_FAILURE, DLQ_REASON as REASON, DLQ_STREAM_SEQ as STREAM_SEQ,
    DLQ_SUBJECT as SUBJECT, IDEMPOTENCY_KEY,
};
use crate::headers::{DLQ_PREFIX, MSG_ID};

/// Longest error kept in a header; longer ones are cut at a char boundary.
const MAX_ERROR_BYTES: usize = 2048;

/// Why an event became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqReason {
    /// Retries exhausted on transient failures.
    MaxDeliveries,
    /// The handler said `permanent(…)`.
    Permanent,
    /// The handler said `needs-human(…)`.
    NeedsHuman,
    /// Retries exhausted and the last failure was a trap, timeout or
    /// out-of-memory.
    Trap,
}

impl DlqReason {
    /// Every reason, for help texts and metrics.
    pub const ALL: [DlqReason; 4] = [
        DlqReason::MaxDeliveries,
        DlqReason::Permanent,
        DlqReason::NeedsHuman,
        DlqReason::Trap,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::MaxDeliveries => "max-deliveries",
            DlqReason::Permanent => "permanent",
            DlqReason::NeedsHuman => "needs-human",
            DlqReason::Trap => "trap",
        }
    }

    /// Parses a header value.
    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == value)
    }
}

impl std::fmt::Display for DlqReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure record written into a dead letter's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The handler.
    pub handler: String,
    /// Its version at the last failure.
    pub handler_version: String,
    /// Why it is a dead letter.
    pub reason: DlqReason,
    /// The last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: u64,
    /// First failure (RFC 3339).
    pub first_failure: String,
    /// Last failure (RFC 3339).
    pub last_failure: String,
}

/// The original event as stored in `HOOK_EVENTS`.
#[derive(Debug, Clone)]
pub struct Original {
    /// Its subject.
    pub subject: String,
    /// Its sequence.
    pub stream_seq: u64,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its payload.
    pub payload: Bytes,
}

impl From<StreamMessage> for Original {
    fn from(message: StreamMessage) -> Self {
        Original {
            subject: message.subject.to_string(),
            stream_seq: message.sequence,
            headers: message.headers,
            payload: message.payload,
        }
    }
}

/// The dead-letter subject of an event: `dlq.<handler>.` + the event
/// subject without `hook.`.
pub fn subject(handler: &str, event_subject: &str) -> String {
    let rest = event_subject
        .strip_prefix(EVENT_PREFIX)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(event_subject);
    format!("dlq.{}.{rest}", crate::subject::encode_token(handler))
}

/// Where a dead letter was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its `HOOK_DLQ` sequence.
    pub seq: u64,
    /// Whether it was there already (same `Nats-Msg-Id` within the
    /// duplicate window): nothing new was stored.
    pub duplicate: bool,
}

/// Stores `original` as a dead letter of `failure` with `Nats-Msg-Id =
/// msg_id`.
pub async fn publish(
    js: &jetstream::Context,
    original: &Original,
    failure: &Failure,
    msg_id: &str,
) -> Result<Stored, DlqError> {
    let headers = headers(original, failure, msg_id);
    let ack = js
        .publish_with_headers(
            subject(&failure.handler, &original.subject),
            headers,
            original.payload.clone(),
        )
        .await
        .map_err(|e| DlqError::nats("dead letter publish", e))?
        .await
        .map_err(|e| DlqError::nats("dead letter PubAck", e))?;
    Ok(Stored {
        seq: ack.sequence,
        duplicate: ack.duplicate,
    })
}

/// The headers of a dead letter: the original's, its own `Nats-Msg-Id`,
/// and the failure record.
fn headers(original: &Original, failure: &Failure, msg_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut idempotency_key = None;
    for (name, values) in original.headers.iter() {
        let name_str: &str = name.as_ref();
        if name_str.eq_ignore_ascii_case(MSG_ID) {
            idempotency_key = values.first().map(|v| v.as_str().to_string());
            continue;
        }
        if name_str.starts_with(DLQ_PREFIX) || name_str.starts_with("Nats-Expected") {
            continue;
        }
        for value in values {
            headers.append(name.clone(), value.clone());
        }
    }
    let mut put = |name: &'static str, value: &str| {
        headers.insert(name, header_value(value));
    };
    put(MSG_ID, msg_id);
    if let Some(key) = original
        .headers
        .get(IDEMPOTENCY_KEY)
        .map(|v| v.as_str().to_string())
        .or(idempotency_key)
    {
        put(IDEMPOTENCY_KEY, &key);
    }
    put(HANDLER, &failure.handler);
    put(HANDLER_VERSION, &failure.handler_version);
    put(REASON, failure.reason.as_str());
    put(ERROR, &failure.error);
    put(ATTEMPTS, &failure.attempts.to_string());
    put(STREAM_SEQ, &original.stream_seq.to_string());
    put(SUBJECT, &original.subject);
    put(FIRST_FAILURE, &failure.first_failure);
    put(LAST_FAILURE, &failure.last_failure);
    headers
}

/// A header value from free text: control characters (which would end the
/// header line) become spaces, and long text is cut.
fn header_value(text: &str) -> HeaderValue {
    let mut end = text.len().min(MAX_ERROR_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let clean: String = text[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    HeaderValue::from(clean.trim())
}

/// A dead letter as read back from `HOOK_DLQ`.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in `HOOK_DLQ`.
    pub dlq_seq: u64,
    /// When it was stored.
    pub stored_at: SystemTime,
    /// Its `HOOK_DLQ` subject.
    pub dlq_subject: String,
    /// The handler that gave up.
    pub handler: String,
    /// Its version at the last failure.
    pub handler_version: String,
    /// Why (the header as written; see [`DlqReason`]).
    pub reason: String,
    /// The last error.
    pub error: String,
    /// Failed attempts.
    pub attempts: u64,
    /// The event's sequence in `HOOK_EVENTS`.
    pub stream_seq: u64,
    /// The event's subject in `HOOK_EVENTS`.
    pub subject: String,
    /// First failure (RFC 3339).
    pub first_failure: String,
    /// Last failure (RFC 3339).
    pub last_failure: String,
    /// Every header, in order.
    pub headers: HeaderMap,
    /// The original payload.
    pub payload: Bytes,
}

impl DeadLetter {
    /// Reads a `HOOK_DLQ` message.
    pub fn from_message(message: StreamMessage) -> Result<Self, DlqError> {
        let seq = message.sequence;
        let get = |name: &str| -> Result<String, DlqError> {
            message
                .headers
                .get(name)
                .map(|v| v.as_str().to_string())
                .ok_or_else(|| DlqError::Malformed {
                    seq,
                    message: format!("header {name} missing"),
                })
        };
        let number = |name: &str| -> Result<u64, DlqError> {
            get(name)?.parse().map_err(|_| DlqError::Malformed {
                seq,
                message: format!("header {name} is not a number"),
            })
        };
        Ok(DeadLetter {
            dlq_seq: seq,
            stored_at: message.time.into(),
            dlq_subject: message.subject.to_string(),
            handler: get(HANDLER)?,
            handler_version: get(HANDLER_VERSION).unwrap_or_default(),
            reason: get(REASON)?,
            error: get(ERROR).unwrap_or_default(),
            attempts: number(ATTEMPTS)?,
            stream_seq: number(STREAM_SEQ)?,
            subject: get(SUBJECT)?,
            first_failure: get(FIRST_FAILURE).unwrap_or_default(),
            last_failure: get(LAST_FAILURE).unwrap_or_default(),
            payload: message.payload,
            headers: message.headers,
        })
    }

    /// A header of the original event.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }

    /// The original event as it would be read from `HOOK_EVENTS`, with
    /// `payload` in place of the stored one: the headers hookmesh added for
    /// the dead letter are dropped and the event's `Nats-Msg-Id` restored.
    pub fn original(&self, payload: Option<Bytes>) -> Original {
        let mut headers = HeaderMap::new();
        for (name, values) in self.headers.iter() {
            let n: &str = name.as_ref();
            if n.starts_with(DLQ_PREFIX)
                || n.eq_ignore_ascii_case(MSG_ID)
                || n.eq_ignore_ascii_case(IDEMPOTENCY_KEY)
            {
                continue;
            }
            for value in values {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(key) = self.header(IDEMPOTENCY_KEY) {
            headers.insert(MSG_ID, key);
        }
        Original {
            subject: self.subject.clone(),
            stream_seq: self.stream_seq,
            headers,
            payload: payload.unwrap_or_else(|| self.payload.clone()),
        }
    }

    /// The entity the event is about, from its subject.
    pub fn entity(&self) -> String {
        crate::subject::EventAddress::parse(&self.subject)
            .map(|a| a.entity)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_subjects_put_the_handler_before_the_event_subject() {
        assert_eq!(
            subject("order-sync", "hook.crm.order.7.ORD-1.order.created"),
            "dlq.order-sync.crm.order.7.ORD-1.order.created"
        );
    }

    #[test]
    fn reasons_round_trip() {
        for reason in DlqReason::ALL {
            assert_eq!(DlqReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(DlqReason::parse("transient"), None);
    }

    #[test]
    fn header_values_lose_line_breaks_and_excess() {
        let value = header_value("line one\r\nline two");
        assert_eq!(value.as_str(), "line one  line two");
        let long = "é".repeat(MAX_ERROR_BYTES);
        assert!(header_value(&long).as_str().len() <= MAX_ERROR_BYTES);
    }

    #[test]
    fn a_dead_letter_keeps_the_original_headers_and_adds_the_failure() {
        let mut original_headers = HeaderMap::new();
        original_headers.insert("Nats-Msg-Id", "crm:msg_1");
        original_headers.insert("Hook-Correlation-Id", "c-1");
        let original = Original {
            subject: "hook.crm.order.7.ORD-1.order.created".into(),
            stream_seq: 42,
            headers: original_headers,
            payload: Bytes::from_static(b"{}"),
        };
        let failure = Failure {
            handler: "order-sync".into(),
            handler_version: "abc".into(),
            reason: DlqReason::Permanent,
            error: "bad".into(),
            attempts: 1,
            first_failure: "t1".into(),
            last_failure: "t2".into(),
        };
        let headers = headers(&original, &failure, "order-sync:42");
        let get = |n: &str| headers.get(n).map(|v| v.as_str().to_string());
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some("order-sync:42"));
        assert_eq!(get(IDEMPOTENCY_KEY).as_deref(), Some("crm:msg_1"));
        assert_eq!(get("Hook-Correlation-Id").as_deref(), Some("c-1"));
        assert_eq!(get(REASON).as_deref(), Some("permanent"));
        assert_eq!(get(STREAM_SEQ).as_deref(), Some("42"));
        assert_eq!(
            get(SUBJECT).as_deref(),
            Some("hook.crm.order.7.ORD-1.order.created")
        );
    }
}
