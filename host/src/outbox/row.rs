//! One outbox row and the event it becomes: subject tokens and partition
//! exactly as ingest computes them, DESIGN.md's headers, the payload bytes
//! as stored — and what a failed publish means for the row.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::extract::EventFields;
use crate::headers;
use crate::publish::{Inbound, PublishError};

/// A pending row, as the relay reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// `id`: the order within an aggregate, and `Hook-Event-Id`.
    pub id: i64,
    /// `aggregate_type`: the subject's domain token, `Hook-Domain`.
    pub aggregate_type: String,
    /// `aggregate_id`: the subject's entity token, `Hook-Entity`.
    pub aggregate_id: String,
    /// `event_type`: the subject's last tokens, `Hook-Event-Type`.
    pub event_type: String,
    /// `payload_json` as text: the message payload.
    pub payload: String,
    /// `correlation_id`, when the application set one.
    pub correlation_id: Option<String>,
    /// `idempotency_key`, when the application set one.
    pub idempotency_key: Option<String>,
    /// Failed publishes so far.
    pub attempts: i32,
    /// `created_at`: `Hook-Received-At`.
    pub created_at: SystemTime,
    /// How old the row was when it was read (the database's clock).
    pub age: Duration,
}

impl OutboxRow {
    /// The aggregate whose rows are published in `id` order.
    pub fn aggregate(&self) -> (&str, &str) {
        (&self.aggregate_type, &self.aggregate_id)
    }

    /// `Nats-Msg-Id`: the application's `idempotency_key`, else
    /// `<source>:outbox:<id>`.
    pub fn idempotency_key(&self, source: &str) -> String {
        match self.idempotency_key.as_deref().map(str::trim) {
            Some(key) if !key.is_empty() => key.to_string(),
            _ => self.default_key(source),
        }
    }

    /// Whether the message id is the row's own (`<source>:outbox:<id>`),
    /// which no other row or webhook can share.
    pub fn has_own_key(&self) -> bool {
        self.idempotency_key
            .as_deref()
            .is_none_or(|key| key.trim().is_empty())
    }

    fn default_key(&self, source: &str) -> String {
        format!("{source}:outbox:{}", self.id)
    }

    /// The event to store for `source`: provider = source, domain =
    /// aggregate type, entity = aggregate id, event id = the row id,
    /// received at = `created_at`, a new correlation id when the row has
    /// none, and a new trace.
    pub fn to_inbound(&self, source: &str) -> Inbound {
        let correlation_id = match self.correlation_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => uuid::Uuid::now_v7().to_string(),
        };
        Inbound {
            provider: source.to_string(),
            fields: EventFields {
                event_id: Some(self.id.to_string()),
                event_type: self.event_type.clone(),
                domain: self.aggregate_type.clone(),
                entity_id: self.aggregate_id.clone(),
                entity_version: None,
            },
            idempotency_key: self.idempotency_key(source),
            correlation_id,
            traceparent: headers::new_traceparent(),
            content_type: Some("application/json".to_string()),
            received_at: self.created_at,
            body: Bytes::from(self.payload.clone().into_bytes()),
        }
    }
}

/// What one publish attempt did to a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// In `HOOK_EVENTS` (stored now, or found stored before): mark it
    /// `published`.
    Published,
    /// Not stored for a reason that may pass (NATS away, slow, erroring):
    /// count the attempt and back off.
    Retry(String),
    /// Never storable as it is (a value that cannot be a header, a message
    /// over NATS's `max_payload`): `failed` at once.
    Fail(String),
}

impl Outcome {
    /// The outcome of a publish that went wrong.
    pub fn of_error(error: &PublishError) -> Outcome {
        let text = error_chain(error);
        match error {
            PublishError::JetStream { source, .. } if too_large(source.as_ref()) => {
                Outcome::Fail(text)
            }
            PublishError::Disconnected
            | PublishError::Timeout(_)
            | PublishError::JetStream { .. } => Outcome::Retry(text),
            // A value no retry changes; an idempotency record that no
            // retry makes readable.
            PublishError::Header(_)
            | PublishError::TooLong(_)
            | PublishError::TooLarge { .. }
            | PublishError::EncodeRecord(_)
            | PublishError::CorruptRecord { .. } => Outcome::Fail(text),
        }
    }
}

/// Whether NATS refused the message as larger than its `max_payload`: no
/// retry makes it smaller.
fn too_large(error: &(dyn std::error::Error + Send + Sync + 'static)) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    error
        .downcast_ref::<PublishError>()
        .is_some_and(|e| e.kind() == PublishErrorKind::MaxPayloadExceeded)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::BadHeader;
    use crate::subject::EventAddress;

    pub(crate) fn row(id: i64) -> OutboxRow {
        OutboxRow {
            id,
            aggregate_type: "invoice".into(),
            aggregate_id: "INV 7/2026".into(),
            event_type: "invoice.created".into(),
            payload: r#"{"total": 10}"#.into(),
            correlation_id: Some("corr-1".into()),
            idempotency_key: None,
            attempts: 0,
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            age: Duration::from_millis(5),
        }
    }

    #[test]
    fn a_row_becomes_the_event_ingest_would_store_for_the_same_fields() {
        let event = row(42).to_inbound("erp");
        assert_eq!(event.provider, "erp");
        assert_eq!(event.idempotency_key, "erp:outbox:42");
        assert_eq!(event.fields.event_id.as_deref(), Some("42"));
        assert_eq!(event.fields.domain, "invoice");
        assert_eq!(event.fields.entity_id, "INV 7/2026");
        assert_eq!(event.correlation_id, "corr-1");
        assert_eq!(event.received_at, row(42).created_at);
        assert_eq!(&event.body[..], br#"{"total": 10}"#);
        // The subject ingest computes for these fields.
        let address = EventAddress::new("erp", "invoice", "INV 7/2026", "invoice.created", 16);
        assert!(address.subject().starts_with("hook.erp.invoice."));
        assert!(
            address
                .subject()
                .ends_with(".INV~207~2F2026.invoice.created")
        );
    }

    #[test]
    fn the_applications_key_and_correlation_win_when_set() {
        let mut given = row(7);
        given.idempotency_key = Some("invoice-7-created".into());
        given.correlation_id = None;
        assert_eq!(given.idempotency_key("erp"), "invoice-7-created");
        assert!(!given.has_own_key());
        let event = given.to_inbound("erp");
        assert_eq!(event.correlation_id.len(), 36, "a new UUID");
        let mut blank = row(8);
        blank.idempotency_key = Some("  ".into());
        assert_eq!(blank.idempotency_key("erp"), "erp:outbox:8");
        assert!(blank.has_own_key());
    }

    #[test]
    fn nats_trouble_is_retried_and_unstorable_values_fail_at_once() {
        assert!(matches!(
            Outcome::of_error(&PublishError::Disconnected),
            Outcome::Retry(_)
        ));
        assert!(matches!(
            Outcome::of_error(&PublishError::Timeout(Duration::from_secs(5))),
            Outcome::Retry(_)
        ));
        let Outcome::Fail(reason) = Outcome::of_error(&PublishError::Header(BadHeader {
            name: headers::ENTITY,
        })) else {
            panic!("a bad header value fails at once");
        };
        assert!(reason.contains("Hook-Entity"), "{reason}");
        let too_large = PublishError::JetStream {
            step: "publish",
            source: Box::new(async_nats::jetstream::context::PublishError::new(
                async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded,
            )),
        };
        assert!(matches!(Outcome::of_error(&too_large), Outcome::Fail(_)));
        let refused = PublishError::JetStream {
            step: "publish ack",
            source: Box::new(async_nats::jetstream::context::PublishError::new(
                async_nats::jetstream::context::PublishErrorKind::StreamNotFound,
            )),
        };
        assert!(matches!(Outcome::of_error(&refused), Outcome::Retry(_)));
    }
}
