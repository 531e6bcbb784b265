//! Storing a verified event in `HOOK_EVENTS`, exactly once.
//!
//! Two dedup horizons work together:
//! - **short**: the stream's duplicate window dedups on `Nats-Msg-Id` (the
//!   idempotency key) inside the server, which makes concurrent copies of one
//!   webhook race-free: exactly one is stored, the others get a PubAck marked
//!   duplicate carrying the original's sequence;
//! - **long**: the `hook_idempotency` KV bucket keeps one record per key for
//!   `idempotency_ttl` (days), written create-only *after* the PubAck.
//!
//! The order — look up, publish, then record — is what makes a crash safe:
//! the record is only ever written for an event already stored, so a host
//! killed between the two never turns the provider's retry into a false
//! "duplicate"; the retry republishes (deduplicated by the window if the
//! first publish did land) and writes the missing record. New events cost
//! three round trips: a direct get (a read), the publish and the create.

use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::extract::{EventFields, kv_key};
use crate::streams::IDEMPOTENCY_BUCKET;
use crate::subject::EventAddress;

/// A verified event, ready to be stored.
#[derive(Debug, Clone)]
pub struct Inbound {
    /// The provider's configured name.
    pub provider: String,
    /// The fields read from the request.
    pub fields: EventFields,
    /// The idempotency key (also the `Nats-Msg-Id`).
    pub idempotency_key: String,
    /// The correlation id carried from HTTP to handlers.
    pub correlation_id: String,
    /// The W3C trace context.
    pub traceparent: String,
    /// The request's content type, when given.
    pub content_type: Option<String>,
    /// When the request arrived.
    pub received_at: SystemTime,
    /// The request body, byte for byte.
    pub body: Bytes,
}

/// Where an event is stored: the answer's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The idempotency key.
    pub idempotency_key: String,
    /// The provider's event id, when it sent one.
    pub event_id: Option<String>,
    /// The subject the event is stored under.
    pub subject: String,
    /// Its sequence in `HOOK_EVENTS`.
    pub stream_seq: u64,
    /// The correlation id of the request that stored it.
    pub correlation_id: String,
}

/// The outcome of [`Publisher::store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Newly stored.
    Accepted(Receipt),
    /// Seen before; the receipt is the original's.
    Duplicate(Receipt),
}

/// Why an event could not be stored; the provider should retry (503).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The client is not connected to NATS.
    #[error("NATS is not connected")]
    Disconnected,
    /// JetStream did not answer within the publish timeout.
    #[error("JetStream did not answer within {0:?}")]
    Timeout(Duration),
    /// JetStream answered with an error, or the request failed.
    #[error("{step}: {message}")]
    JetStream {
        /// What was being done.
        step: &'static str,
        /// The client's message.
        message: String,
    },
    /// A header value could not be encoded (fields are checked before, so
    /// this is a bug guard rather than an expected outcome).
    #[error("header {0} cannot be encoded")]
    Header(&'static str),
}

/// The long-horizon record kept in `hook_idempotency`.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    event_id: Option<String>,
    subject: String,
    stream_seq: u64,
    correlation_id: String,
}

/// Stores events; cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    kv: std::sync::Arc<OnceCell<kv::Store>>,
    partitions: u32,
    timeout: Duration,
}

impl Publisher {
    /// A publisher over a connected (or connecting) client.
    pub fn new(client: async_nats::Client, partitions: u32, timeout: Duration) -> Self {
        let mut js = jetstream::new(client.clone());
        js.set_timeout(timeout);
        Publisher {
            client,
            js,
            kv: Default::default(),
            partitions,
            timeout,
        }
    }

    /// Stores an event, or finds it stored before. Bounded by the publish
    /// timeout as a whole.
    pub async fn store(&self, event: &Inbound) -> Result<Stored, PublishError> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::Disconnected);
        }
        tokio::time::timeout(self.timeout, self.store_unbounded(event))
            .await
            .map_err(|_| PublishError::Timeout(self.timeout))?
    }

    async fn store_unbounded(&self, event: &Inbound) -> Result<Stored, PublishError> {
        let kv = self
            .kv
            .get_or_try_init(|| self.js.get_key_value(IDEMPOTENCY_BUCKET))
            .await
            .map_err(|e| js_error("open idempotency bucket", e))?;
        let key = kv_key(&event.idempotency_key);

        if let Some(record) = self.lookup(kv, &key).await? {
            return Ok(Stored::Duplicate(self.receipt(event, record)));
        }

        let address = EventAddress::new(
            &event.provider,
            &event.fields.domain,
            &event.fields.entity_id,
            &event.fields.event_type,
            self.partitions,
        );
        let subject = address.subject();
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers(event)?, event.body.clone())
            .await
            .map_err(|e| js_error("publish", e))?
            .await
            .map_err(|e| js_error("publish ack", e))?;

        let record = Record {
            event_id: event.fields.event_id.clone(),
            subject,
            stream_seq: ack.sequence,
            correlation_id: event.correlation_id.clone(),
        };
        let value = serde_json::to_vec(&record)
            .map(Bytes::from)
            .unwrap_or_default();
        match kv.create(&key, value).await {
            Ok(_) if ack.duplicate => {
                // A copy inside the window whose first request died before
                // writing the record: the record is ours now.
                Ok(Stored::Duplicate(self.receipt(event, record)))
            }
            Ok(_) => Ok(Stored::Accepted(self.receipt(event, record))),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                if ack.duplicate {
                    // A concurrent copy stored and recorded it: answer with
                    // the original's record.
                    let original = self.lookup(kv, &key).await?.unwrap_or(record);
                    Ok(Stored::Duplicate(self.receipt(event, original)))
                } else {
                    // We stored it; a concurrent duplicate wrote the record
                    // first (it carries our sequence).
                    Ok(Stored::Accepted(self.receipt(event, record)))
                }
            }
            // The event is stored but its long-horizon record is not: answer
            // 503 so the provider retries inside the window, which dedups the
            // event and writes the record.
            Err(e) => Err(js_error("record idempotency key", e)),
        }
    }

    async fn lookup(&self, kv: &kv::Store, key: &str) -> Result<Option<Record>, PublishError> {
        let found = kv
            .get(key)
            .await
            .map_err(|e| js_error("look up idempotency key", e))?;
        Ok(found.and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    fn receipt(&self, event: &Inbound, record: Record) -> Receipt {
        Receipt {
            idempotency_key: event.idempotency_key.clone(),
            event_id: record.event_id,
            subject: record.subject,
            stream_seq: record.stream_seq,
            correlation_id: record.correlation_id,
        }
    }
}

fn js_error(step: &'static str, e: impl std::fmt::Display) -> PublishError {
    PublishError::JetStream {
        step,
        message: e.to_string(),
    }
}

/// The headers of DESIGN.md, "Message headers on `HOOK_EVENTS`".
fn headers(event: &Inbound) -> Result<HeaderMap, PublishError> {
    let mut map = HeaderMap::new();
    let mut put = |name: &'static str, value: &str| -> Result<(), PublishError> {
        let value: HeaderValue = value.parse().map_err(|_| PublishError::Header(name))?;
        map.insert(name, value);
        Ok(())
    };
    let fields = &event.fields;
    put("Nats-Msg-Id", &event.idempotency_key)?;
    put("Hook-Provider", &event.provider)?;
    if let Some(id) = &fields.event_id {
        put("Hook-Event-Id", id)?;
    }
    put("Hook-Event-Type", &fields.event_type)?;
    put("Hook-Domain", &fields.domain)?;
    put("Hook-Entity", &fields.entity_id)?;
    if let Some(version) = &fields.entity_version {
        put("Hook-Entity-Version", version)?;
    }
    put(
        "Hook-Received-At",
        &humantime::format_rfc3339_millis(event.received_at).to_string(),
    )?;
    put("Hook-Correlation-Id", &event.correlation_id)?;
    put("traceparent", &event.traceparent)?;
    put(
        "Content-Type",
        event.content_type.as_deref().unwrap_or("application/json"),
    )?;
    Ok(map)
}
