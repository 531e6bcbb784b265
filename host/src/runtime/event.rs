//! The event a guest is called with: [`EventRef`], borrowed from where the
//! event is stored and lowered straight into the guest's memory, and
//! [`EventInput`], an owned one for callers that build events themselves.

use wasmtime::component::{ComponentType, Lower};

/// One event as the guest's `handle` receives it (the WIT record `event`,
/// the same in `@0.1.0` and `@0.2.0`), borrowed: a delivery's subject,
/// headers and payload are copied once, into the guest, with no owned
/// copy built on the way.
#[derive(Debug, Clone, Copy, ComponentType, Lower)]
#[component(record)]
pub struct EventRef<'a> {
    /// The provider's event id.
    pub id: Option<&'a str>,
    /// The idempotency key.
    #[component(name = "idempotency-key")]
    pub idempotency_key: &'a str,
    /// The provider (or emitting handler).
    pub provider: &'a str,
    /// The event type.
    #[component(name = "event-type")]
    pub event_type: &'a str,
    /// The domain.
    pub domain: &'a str,
    /// The entity id.
    #[component(name = "entity-id")]
    pub entity_id: &'a str,
    /// The entity version.
    #[component(name = "entity-version")]
    pub entity_version: Option<&'a str>,
    /// The correlation id.
    #[component(name = "correlation-id")]
    pub correlation_id: &'a str,
    /// The stored subject.
    pub subject: &'a str,
    /// When it was received (RFC 3339).
    #[component(name = "received-at")]
    pub received_at: &'a str,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Message headers, in their stored order.
    pub headers: &'a [(&'a str, &'a str)],
    /// The payload.
    pub payload: &'a [u8],
}

impl<'a> EventRef<'a> {
    /// The value of header `name` (any case), the first if repeated.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| *value)
    }
}

/// One event, as handed to a guest.
#[derive(Debug, Clone, Default)]
pub struct EventInput {
    /// The provider's event id.
    pub id: Option<String>,
    /// The idempotency key.
    pub idempotency_key: String,
    /// The provider (or emitting handler).
    pub provider: String,
    /// The event type.
    pub event_type: String,
    /// The domain.
    pub domain: String,
    /// The entity id.
    pub entity_id: String,
    /// The entity version.
    pub entity_version: Option<String>,
    /// The correlation id.
    pub correlation_id: String,
    /// The stored subject.
    pub subject: String,
    /// When it was received (RFC 3339).
    pub received_at: String,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Message headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl EventInput {
    /// The headers as [`EventRef::headers`] borrows them (for [`as_event`](Self::as_event)).
    pub fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect()
    }

    /// The event, borrowed, with `headers` from [`header_refs`](Self::header_refs).
    pub fn as_event<'a>(&'a self, headers: &'a [(&'a str, &'a str)]) -> EventRef<'a> {
        EventRef {
            id: self.id.as_deref(),
            idempotency_key: &self.idempotency_key,
            provider: &self.provider,
            event_type: &self.event_type,
            domain: &self.domain,
            entity_id: &self.entity_id,
            entity_version: self.entity_version.as_deref(),
            correlation_id: &self.correlation_id,
            subject: &self.subject,
            received_at: &self.received_at,
            attempt: self.attempt,
            headers,
            payload: &self.payload,
        }
    }
}
