//! Between stored messages and the runtime: a delivery becomes an
//! [`EventInput`]; a handler's emits become messages on `HOOK_EVENTS`.

use std::time::SystemTime;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderValue};
use futures::future::try_join_all;

use crate::runtime::{Emit, EventInput};
use crate::subject::{EventAddress, default_domain};

/// What an emit inherits from the event that caused it.
#[derive(Debug, Clone)]
pub struct Source {
    /// The source event's idempotency key (emit ids derive from it).
    pub idempotency_key: String,
    /// Carried on.
    pub correlation_id: String,
    /// Carried on.
    pub traceparent: Option<String>,
}

impl Source {
    /// What the emits of `input` inherit.
    pub fn of(input: &EventInput) -> Source {
        Source {
            idempotency_key: input.idempotency_key.clone(),
            correlation_id: input.correlation_id.clone(),
            traceparent: input
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
                .map(|(_, v)| v.clone()),
        }
    }
}

/// The event of delivery number `delivery` of a message. Headers hookmesh
/// wrote are preferred; a message someone published by hand falls back to
/// what its subject says.
pub fn input(message: &jetstream::Message, delivery: u64) -> Result<EventInput, String> {
    let info = message.info().map_err(|e| e.to_string())?;
    input_from(
        &message.subject,
        message.headers.as_ref(),
        &message.payload,
        info.stream_sequence,
        delivery,
    )
}

/// The event stored as `subject` / `headers` / `payload` at `stream_seq`,
/// for attempt number `attempt` (also for events read back by sequence:
/// replays and parked events).
pub fn input_from(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
    stream_seq: u64,
    attempt: u64,
) -> Result<EventInput, String> {
    let address =
        EventAddress::parse(subject).map_err(|e| format!("not a hookmesh event subject: {e}"))?;
    let headers: Vec<(String, String)> = headers
        .iter()
        .flat_map(|map| map.iter())
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.as_str().to_string()))
        })
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    Ok(EventInput {
        id: get("Hook-Event-Id"),
        idempotency_key: get("Nats-Msg-Id").unwrap_or_else(|| format!("seq:{stream_seq}")),
        provider: get("Hook-Provider").unwrap_or(address.provider),
        event_type: get("Hook-Event-Type").unwrap_or(address.event_type),
        domain: get("Hook-Domain").unwrap_or(address.domain),
        entity_id: get("Hook-Entity").unwrap_or(address.entity),
        entity_version: get("Hook-Entity-Version"),
        correlation_id: get("Hook-Correlation-Id")
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        received_at: get("Hook-Received-At")
            .unwrap_or_else(|| humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
        subject: subject.to_string(),
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        headers,
        payload: payload.to_vec(),
    })
}

/// Publishes a handler's emits and waits for every PubAck. Each carries
/// `Nats-Msg-Id = <handler>:<source idempotency key>:<n>`, so a handler
/// run twice for one event (a crash before the ack) emits once.
pub async fn publish_emits(
    js: &jetstream::Context,
    handler: &str,
    source: &Source,
    emits: &[Emit],
    partitions: u32,
) -> Result<(), String> {
    let received_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let mut acks = Vec::with_capacity(emits.len());
    for (n, emit) in emits.iter().enumerate() {
        let id = format!("{handler}:{}:{n}", source.idempotency_key);
        let domain = default_domain(&emit.event_type).to_string();
        let address = EventAddress::new(
            handler,
            &domain,
            &emit.entity_id,
            &emit.event_type,
            partitions,
        );
        let mut headers = HeaderMap::new();
        let mut put = |name: &'static str, value: &str| -> Result<(), String> {
            let value: HeaderValue = value
                .parse()
                .map_err(|_| format!("emit {n}: {name} {value:?} cannot be a header value"))?;
            headers.insert(name, value);
            Ok(())
        };
        if emit.event_type.is_empty() || emit.entity_id.is_empty() {
            return Err(format!(
                "emit {n}: event type and entity id must not be empty"
            ));
        }
        put("Nats-Msg-Id", &id)?;
        put("Hook-Provider", handler)?;
        put("Hook-Event-Id", &id)?;
        put("Hook-Event-Type", &emit.event_type)?;
        put("Hook-Domain", &domain)?;
        put("Hook-Entity", &emit.entity_id)?;
        put("Hook-Received-At", &received_at)?;
        put("Hook-Correlation-Id", &source.correlation_id)?;
        if let Some(traceparent) = &source.traceparent {
            put("traceparent", traceparent)?;
        }
        put("Content-Type", "application/json")?;
        let ack = js
            .publish_with_headers(address.subject(), headers, emit.payload.clone().into())
            .await
            .map_err(|e| format!("emit {n}: publish: {e}"))?;
        acks.push(ack);
    }
    try_join_all(acks.into_iter().map(|ack| async move { ack.await }))
        .await
        .map_err(|e| format!("emit: PubAck: {e}"))?;
    Ok(())
}
