//! The message headers hookmesh writes and reads: their names (DESIGN.md,
//! "Message headers on `HOOK_EVENTS`" and the dead-letter headers) and the
//! one way an event's headers are built, whoever publishes it — ingest,
//! a handler's emits, a replay.

use async_nats::{HeaderMap, HeaderValue};

/// `Nats-Msg-Id`: the event's idempotency key (JetStream deduplicates on it).
pub const MSG_ID: &str = "Nats-Msg-Id";
/// `Hook-Provider`: who sent the event (a provider, or the emitting handler).
pub const PROVIDER: &str = "Hook-Provider";
/// `Hook-Event-Id`: the provider's event id, when it gives one.
pub const EVENT_ID: &str = "Hook-Event-Id";
/// `Hook-Event-Type`: e.g. `order.created`.
pub const EVENT_TYPE: &str = "Hook-Event-Type";
/// `Hook-Domain`: e.g. `order`.
pub const DOMAIN: &str = "Hook-Domain";
/// `Hook-Entity`: the entity id, as given (the subject carries it encoded).
pub const ENTITY: &str = "Hook-Entity";
/// `Hook-Entity-Version`: the entity's version or `updated_at`, when known.
pub const ENTITY_VERSION: &str = "Hook-Entity-Version";
/// `Hook-Received-At`: when hookmesh took the event in (RFC 3339).
pub const RECEIVED_AT: &str = "Hook-Received-At";
/// `Hook-Correlation-Id`: travels from the HTTP request to every emit.
pub const CORRELATION_ID: &str = "Hook-Correlation-Id";
/// `traceparent` (W3C trace context). Lowercase: header names are matched
/// case-sensitively by the NATS client.
pub const TRACEPARENT: &str = "traceparent";
/// `Content-Type` of the payload.
pub const CONTENT_TYPE: &str = "Content-Type";

/// `Hook-Dlq-Handler`: the handler that gave up.
pub const DLQ_HANDLER: &str = "Hook-Dlq-Handler";
/// `Hook-Dlq-Handler-Version`: its version at the last failure.
pub const DLQ_HANDLER_VERSION: &str = "Hook-Dlq-Handler-Version";
/// `Hook-Dlq-Reason`: `max-deliveries`, `permanent`, `needs-human` or `trap`.
pub const DLQ_REASON: &str = "Hook-Dlq-Reason";
/// `Hook-Dlq-Error`: the last error.
pub const DLQ_ERROR: &str = "Hook-Dlq-Error";
/// `Hook-Dlq-Attempts`: failed attempts.
pub const DLQ_ATTEMPTS: &str = "Hook-Dlq-Attempts";
/// `Hook-Dlq-Stream-Seq`: the event's sequence in `HOOK_EVENTS`.
pub const DLQ_STREAM_SEQ: &str = "Hook-Dlq-Stream-Seq";
/// `Hook-Dlq-Subject`: the event's subject in `HOOK_EVENTS`.
pub const DLQ_SUBJECT: &str = "Hook-Dlq-Subject";
/// `Hook-Dlq-First-Failure` (RFC 3339).
pub const DLQ_FIRST_FAILURE: &str = "Hook-Dlq-First-Failure";
/// `Hook-Dlq-Last-Failure` (RFC 3339).
pub const DLQ_LAST_FAILURE: &str = "Hook-Dlq-Last-Failure";
/// The prefix every dead-letter header shares.
pub const DLQ_PREFIX: &str = "Hook-Dlq-";
/// On a dead letter, the event's own `Nats-Msg-Id` (its idempotency key):
/// the dead letter's `Nats-Msg-Id` is its own, and a replay's emits derive
/// from this one.
pub const IDEMPOTENCY_KEY: &str = "Hook-Idempotency-Key";

/// On a replay request (`hookmesh.dlq.replay.<handler>`): the `HOOK_DLQ`
/// sequence to replay.
pub const REPLAY_SEQ: &str = "Hook-Replay-Seq";
/// On a replay request: who asked.
pub const REPLAY_ACTOR: &str = "Hook-Replay-Actor";
/// On a replay request: `replaced` when the body is a fixed payload.
pub const REPLAY_PAYLOAD: &str = "Hook-Replay-Payload";

/// A value that cannot be a NATS header value (a control character, a
/// line break).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: the value cannot be a message header value")]
pub struct BadHeader {
    /// The header it was meant for.
    pub name: &'static str,
}

/// The headers of one event on `HOOK_EVENTS`, in DESIGN.md's order.
#[derive(Debug, Clone, Copy)]
pub struct EventHeaders<'a> {
    /// `Nats-Msg-Id`.
    pub msg_id: &'a str,
    /// `Hook-Provider`.
    pub provider: &'a str,
    /// `Hook-Event-Id`, when known.
    pub event_id: Option<&'a str>,
    /// `Hook-Event-Type`.
    pub event_type: &'a str,
    /// `Hook-Domain`.
    pub domain: &'a str,
    /// `Hook-Entity`.
    pub entity: &'a str,
    /// `Hook-Entity-Version`, when known.
    pub entity_version: Option<&'a str>,
    /// `Hook-Received-At` (RFC 3339).
    pub received_at: &'a str,
    /// `Hook-Correlation-Id`.
    pub correlation_id: &'a str,
    /// `traceparent`, when there is a trace to continue.
    pub traceparent: Option<&'a str>,
    /// `Content-Type`.
    pub content_type: &'a str,
}

impl EventHeaders<'_> {
    /// The header map to publish with.
    pub fn to_map(&self) -> Result<HeaderMap, BadHeader> {
        let mut map = HeaderMap::new();
        let mut put = |name: &'static str, value: Option<&str>| -> Result<(), BadHeader> {
            if let Some(value) = value {
                let value: HeaderValue = value.parse().map_err(|_| BadHeader { name })?;
                map.insert(name, value);
            }
            Ok(())
        };
        put(MSG_ID, Some(self.msg_id))?;
        put(PROVIDER, Some(self.provider))?;
        put(EVENT_ID, self.event_id)?;
        put(EVENT_TYPE, Some(self.event_type))?;
        put(DOMAIN, Some(self.domain))?;
        put(ENTITY, Some(self.entity))?;
        put(ENTITY_VERSION, self.entity_version)?;
        put(RECEIVED_AT, Some(self.received_at))?;
        put(CORRELATION_ID, Some(self.correlation_id))?;
        put(TRACEPARENT, self.traceparent)?;
        put(CONTENT_TYPE, Some(self.content_type))?;
        Ok(map)
    }
}

/// The first value of header `name` in `map` (names compared without
/// regard to case: a message published by hand may spell them otherwise).
pub fn get<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = map.get(name) {
        return Some(value.as_str());
    }
    map.iter()
        .find(|(key, _)| {
            let key: &str = key.as_ref();
            key.eq_ignore_ascii_case(name)
        })
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str())
}

/// Whether `value` is a well-formed W3C `traceparent`:
/// `<version>-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && hex(parts[0], 2)
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// A `traceparent` starting a new trace (random trace and span ids,
/// sampled), for an event that arrives without one.
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random();
    let span: u64 = rand::random();
    format!("00-{trace:032x}-{span:016x}-01")
}

/// A `traceparent` for a child span of `parent`: its trace id and flags
/// with a new span id; a new trace when there is no well-formed parent.
pub fn child_traceparent(parent: Option<&str>) -> String {
    match parent.filter(|p| is_traceparent(p)) {
        Some(parent) => {
            let span: u64 = rand::random::<u64>().max(1);
            format!("00-{}-{span:016x}-{}", &parent[3..35], &parent[53..55])
        }
        None => new_traceparent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_span_keeps_the_trace_and_flags_with_a_new_span_id() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let child = child_traceparent(Some(parent));
        assert!(is_traceparent(&child), "{child}");
        assert_eq!(&child[..36], &parent[..36]);
        assert_ne!(&child[36..52], &parent[36..52]);
        assert_eq!(&child[52..], "-01");
        let orphan = child_traceparent(Some("00-xyz-01"));
        assert!(
            is_traceparent(&orphan) && !orphan.contains("xyz"),
            "{orphan}"
        );
        assert!(is_traceparent(&child_traceparent(None)));
    }

    fn event<'a>() -> EventHeaders<'a> {
        EventHeaders {
            msg_id: "crm:msg_1",
            provider: "crm",
            event_id: Some("msg_1"),
            event_type: "order.created",
            domain: "order",
            entity: "ORD-1",
            entity_version: None,
            received_at: "2026-01-01T00:00:00.000Z",
            correlation_id: "c-1",
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            content_type: "application/json",
        }
    }

    #[test]
    fn an_event_carries_every_known_header_and_no_empty_optional_one() {
        let map = event().to_map().expect("valid headers");
        assert_eq!(get(&map, MSG_ID), Some("crm:msg_1"));
        assert_eq!(get(&map, EVENT_ID), Some("msg_1"));
        assert_eq!(get(&map, ENTITY), Some("ORD-1"));
        assert_eq!(get(&map, TRACEPARENT).map(str::len), Some(55));
        assert_eq!(get(&map, ENTITY_VERSION), None);
        assert_eq!(map.iter().count(), 10);
    }

    #[test]
    fn a_line_break_in_a_value_names_the_header() {
        let headers = EventHeaders {
            entity: "ORD\r\n1",
            ..event()
        };
        assert_eq!(headers.to_map().err(), Some(BadHeader { name: ENTITY }));
    }

    #[test]
    fn lookups_ignore_case() {
        let mut map = HeaderMap::new();
        map.insert("hook-entity", "E-1");
        assert_eq!(get(&map, ENTITY), Some("E-1"));
    }
}
