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

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::extract::{EventFields, kv_key};
use crate::headers::{BadHeader, EventHeaders};
use crate::streams::IDEMPOTENCY_BUCKET;
use crate::subject::EventAddress;
use crate::subject::limits::{self, TooLong};

/// The longest `hook_idempotency` key kept readable; a longer one is
/// stored under its hash (see [`record_key`]).
pub const RECORD_KEY_MAX: usize = 2048;

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
    #[error("{step}: {source}")]
    JetStream {
        /// What was being done.
        step: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// A value is longer than NATS can carry (answered 422 naming it).
    #[error(transparent)]
    TooLong(#[from] TooLong),
    /// Body and headers together exceed the server's `max_payload`
    /// (answered 413).
    #[error("the event is {size} bytes with its headers; the server takes at most {max_payload}")]
    TooLarge {
        /// Body plus headers, as sent.
        size: usize,
        /// The server's `max_payload`.
        max_payload: usize,
    },
    /// A header value could not be encoded (fields are checked before, so
    /// this is a bug guard rather than an expected outcome).
    #[error(transparent)]
    Header(#[from] BadHeader),
    /// The idempotency record of a stored event could not be encoded; the
    /// event is stored but not recorded, so the provider's retry (inside
    /// the duplicate window) is deduplicated and records it.
    #[error("encoding the idempotency record: {0}")]
    EncodeRecord(#[source] serde_json::Error),
    /// The idempotency record under a key cannot be read: the key was seen
    /// before, but what it stored is unknown. Answered 503 rather than
    /// treated as new, which could store the event a second time.
    #[error("idempotency record {key} is unreadable: {source}")]
    CorruptRecord {
        /// The bucket key.
        key: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
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
        self.store_bounded(event, Lookup::First).await
    }

    /// Stores an event that no earlier copy can have reached outside the
    /// stream's duplicate window — its key is its own, and any earlier
    /// publish of it is younger than the window — so the server's dedup is
    /// exact and the look-up is skipped (one round trip fewer). The record
    /// is written as by [`store`](Self::store).
    pub async fn store_recent(&self, event: &Inbound) -> Result<Stored, PublishError> {
        self.store_bounded(event, Lookup::Skip).await
    }

    async fn store_bounded(&self, event: &Inbound, lookup: Lookup) -> Result<Stored, PublishError> {
        check(event)?;
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::Disconnected);
        }
        tokio::time::timeout(self.timeout, self.store_unbounded(event, lookup))
            .await
            .map_err(|_| PublishError::Timeout(self.timeout))?
    }

    async fn store_unbounded(
        &self,
        event: &Inbound,
        lookup: Lookup,
    ) -> Result<Stored, PublishError> {
        let kv = self
            .kv
            .get_or_try_init(|| self.js.get_key_value(IDEMPOTENCY_BUCKET))
            .await
            .map_err(|e| js_error("open idempotency bucket", e))?;
        let key = record_key(&event.idempotency_key);

        if lookup == Lookup::First
            && let Some(record) = self.lookup(kv, &key).await?
        {
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
        let headers = headers(event)?;
        let max_payload = self.client.server_info().max_payload;
        let size = wire_len(&headers) + event.body.len();
        if max_payload > 0 && size > max_payload {
            return Err(PublishError::TooLarge { size, max_payload });
        }
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, event.body.clone())
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
        let value = serde_json::to_vec(&record).map_err(PublishError::EncodeRecord)?;
        let write = match kv.create(&key, Bytes::from(value)).await {
            Ok(_) => RecordWrite::Created,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => RecordWrite::AlreadyExists,
            // The event is stored but its long-horizon record is not: answer
            // 503 so the provider retries inside the window, which dedups the
            // event and writes the record.
            Err(e) => return Err(js_error("record idempotency key", e)),
        };
        Ok(match answer(ack.duplicate, write) {
            Answer::Accepted => Stored::Accepted(self.receipt(event, record)),
            Answer::Duplicate => Stored::Duplicate(self.receipt(event, record)),
            Answer::DuplicateOfRecorded => {
                let original = self.lookup(kv, &key).await?.unwrap_or(record);
                Stored::Duplicate(self.receipt(event, original))
            }
        })
    }

    async fn lookup(&self, kv: &kv::Store, key: &str) -> Result<Option<Record>, PublishError> {
        let found = kv
            .get(key)
            .await
            .map_err(|e| js_error("look up idempotency key", e))?;
        found
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|source| PublishError::CorruptRecord {
                    key: key.to_string(),
                    source,
                })
            })
            .transpose()
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

/// Checks the event's values against the limits NATS sets (see
/// [`limits`]) before anything is sent.
fn check(event: &Inbound) -> Result<(), TooLong> {
    let fields = &event.fields;
    limits::check(&limits::Values {
        event_id: fields.event_id.as_deref(),
        event_type: &fields.event_type,
        domain: &fields.domain,
        entity_id: &fields.entity_id,
        entity_version: fields.entity_version.as_deref(),
        idempotency_key: &event.idempotency_key,
        content_type: event.content_type.as_deref(),
    })
}

/// The `hook_idempotency` key of an idempotency key: its readable escaped
/// form ([`kv_key`]) when that is at most [`RECORD_KEY_MAX`] bytes, else
/// `sha256.` and the hex digest of the key. A `.` never appears in an
/// escaped key, so the two forms cannot collide; every key a provider's
/// event id can give (its length is limited) keeps the readable form.
pub fn record_key(idempotency_key: &str) -> String {
    let escaped = kv_key(idempotency_key);
    if escaped.len() <= RECORD_KEY_MAX {
        return escaped;
    }
    use sha2::Digest;
    format!(
        "sha256.{}",
        hex::encode(sha2::Sha256::digest(idempotency_key.as_bytes()))
    )
}

/// The size headers take on the wire (`NATS/1.0`, a line per value, a
/// blank line), as the server counts it against `max_payload`.
pub fn wire_len(headers: &HeaderMap) -> usize {
    let lines: usize = headers
        .iter()
        .map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(|value| name.len() + 2 + value.as_str().len() + 2)
                .sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n".len() + lines + 2
}

fn js_error(
    step: &'static str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> PublishError {
    PublishError::JetStream {
        step,
        source: Box::new(source),
    }
}

/// Whether the idempotency record is looked up before publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// Look it up: a copy may come after the duplicate window.
    First,
    /// Skip it: the duplicate window covers every earlier copy.
    Skip,
}

/// What the create-only write of the idempotency record found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordWrite {
    /// The record is ours.
    Created,
    /// A record was there already (written after the lookup).
    AlreadyExists,
}

/// How to answer once the event is in the stream and its record written
/// (or found written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Newly stored, with our receipt.
    Accepted,
    /// A duplicate, answered with our receipt (it carries the original's
    /// sequence, from the duplicate PubAck).
    Duplicate,
    /// A duplicate whose original wrote the record: answer with it.
    DuplicateOfRecorded,
}

/// The decision after publish → record: whether the server stored the
/// event now (`publish_was_duplicate` is the PubAck's flag) and what the
/// create-only record write found.
fn answer(publish_was_duplicate: bool, write: RecordWrite) -> Answer {
    match (publish_was_duplicate, write) {
        // The first copy: stored and recorded by us.
        (false, RecordWrite::Created) => Answer::Accepted,
        // We stored it; a concurrent duplicate (deduplicated against our
        // publish) wrote the record first, carrying our sequence.
        (false, RecordWrite::AlreadyExists) => Answer::Accepted,
        // A copy inside the window whose first request died between its
        // publish and its record: the record is ours now.
        (true, RecordWrite::Created) => Answer::Duplicate,
        // A concurrent copy stored and recorded it.
        (true, RecordWrite::AlreadyExists) => Answer::DuplicateOfRecorded,
    }
}

/// The headers of DESIGN.md, "Message headers on `HOOK_EVENTS`".
fn headers(event: &Inbound) -> Result<HeaderMap, PublishError> {
    let fields = &event.fields;
    let received_at = humantime::format_rfc3339_millis(event.received_at).to_string();
    EventHeaders {
        msg_id: &event.idempotency_key,
        provider: &event.provider,
        event_id: fields.event_id.as_deref(),
        event_type: &fields.event_type,
        domain: &fields.domain,
        entity: &fields.entity_id,
        entity_version: fields.entity_version.as_deref(),
        received_at: &received_at,
        correlation_id: &event.correlation_id,
        traceparent: Some(&event.traceparent),
        content_type: event.content_type.as_deref().unwrap_or("application/json"),
    }
    .to_map()
    .map_err(PublishError::Header)
}

#[cfg(test)]
mod tests {
    //! The decision table, then each step of look up → publish → record
    //! (and each state a crash between them leaves) against a real
    //! nats-server.

    use super::*;
    use crate::config::IngestConfig;
    use crate::streams::{self, EVENTS_STREAM, Mode};
    use hookmesh_test_support::NatsServer;

    #[test]
    fn the_answer_follows_the_pub_ack_and_the_record_write() {
        use Answer::*;
        use RecordWrite::*;
        for (duplicate, write, expected) in [
            (false, Created, Accepted),
            (false, AlreadyExists, Accepted),
            (true, Created, Duplicate),
            (true, AlreadyExists, DuplicateOfRecorded),
        ] {
            assert_eq!(answer(duplicate, write), expected, "{duplicate} {write:?}");
        }
    }

    struct Bed {
        _nats: NatsServer,
        js: jetstream::Context,
        kv: kv::Store,
        publisher: Publisher,
    }

    async fn bed() -> Bed {
        let nats = NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client.clone());
        let ingest = IngestConfig {
            duplicate_window: Duration::from_secs(120),
            idempotency_ttl: Duration::from_secs(86_400),
            publish_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(1),
            max_age: Duration::from_secs(3600),
            partitions: 16,
        };
        streams::apply(&js, &ingest, Mode::Update)
            .await
            .expect("streams");
        let kv = js.get_key_value(IDEMPOTENCY_BUCKET).await.expect("bucket");
        let publisher = Publisher::new(client, 16, Duration::from_secs(5));
        Bed {
            _nats: nats,
            js,
            kv,
            publisher,
        }
    }

    fn inbound(key: &str) -> Inbound {
        Inbound {
            provider: "crm".into(),
            fields: EventFields {
                event_id: Some(format!("evt-{key}")),
                event_type: "order.created".into(),
                domain: "order".into(),
                entity_id: "ORD-1".into(),
                entity_version: Some("1".into()),
            },
            idempotency_key: key.into(),
            correlation_id: format!("corr-{key}"),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            content_type: None,
            received_at: SystemTime::now(),
            body: Bytes::from_static(b"{\"type\":\"order.created\"}"),
        }
    }

    impl Bed {
        async fn stored(&self) -> u64 {
            self.js
                .get_stream(EVENTS_STREAM)
                .await
                .expect("stream")
                .info()
                .await
                .expect("info")
                .state
                .messages
        }

        async fn record(&self, key: &str) -> Option<Record> {
            self.kv
                .get(kv_key(key))
                .await
                .expect("get")
                .map(|bytes| serde_json::from_slice(&bytes).expect("record json"))
        }
    }

    #[tokio::test]
    async fn a_new_event_is_published_then_recorded_with_its_sequence() {
        let bed = bed().await;
        let event = inbound("k-new");
        let Stored::Accepted(receipt) = bed.publisher.store(&event).await.expect("store") else {
            panic!("a new event is accepted");
        };
        assert_eq!(bed.stored().await, 1);
        let record = bed.record("k-new").await.expect("recorded");
        assert_eq!(record.stream_seq, receipt.stream_seq);
        assert_eq!(record.subject, receipt.subject);
        assert_eq!(record.correlation_id, "corr-k-new");
        let stored = bed
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .expect("stream")
            .get_raw_message(receipt.stream_seq)
            .await
            .expect("the recorded sequence holds the event");
        assert_eq!(stored.payload, event.body);
        assert_eq!(
            stored.headers.get("Nats-Msg-Id").map(|v| v.as_str()),
            Some("k-new")
        );

        // The provider's retry: the original's receipt, nothing stored.
        let mut again = inbound("k-new");
        again.correlation_id = "corr-retry".into();
        let Stored::Duplicate(duplicate) = bed.publisher.store(&again).await.expect("store") else {
            panic!("a retry is a duplicate");
        };
        assert_eq!(duplicate.stream_seq, receipt.stream_seq);
        assert_eq!(duplicate.correlation_id, "corr-k-new", "the original's");
        assert_eq!(bed.stored().await, 1);
    }

    #[tokio::test]
    async fn a_recorded_key_is_answered_from_its_record_without_publishing() {
        // The record alone decides: the key is new to the stream's window,
        // so a publish would store it.
        let bed = bed().await;
        let record = Record {
            event_id: Some("evt-old".into()),
            subject: "hook.crm.order.3.ORD-1.order.created".into(),
            stream_seq: 4711,
            correlation_id: "corr-old".into(),
        };
        bed.kv
            .create(
                kv_key("k-old"),
                serde_json::to_vec(&record).expect("json").into(),
            )
            .await
            .expect("record");
        let Stored::Duplicate(receipt) =
            bed.publisher.store(&inbound("k-old")).await.expect("store")
        else {
            panic!("a recorded key is a duplicate");
        };
        assert_eq!(
            (receipt.stream_seq, receipt.correlation_id.as_str()),
            (4711, "corr-old")
        );
        assert_eq!(bed.stored().await, 0, "looked up before publishing");
    }

    #[tokio::test]
    async fn a_host_that_died_between_publish_and_record_leaves_a_retry_that_records_it() {
        let bed = bed().await;
        let event = inbound("k-crash");
        // What the first host did before it died: the publish, no record.
        let first = bed
            .js
            .publish_with_headers(
                EventAddress::new("crm", "order", "ORD-1", "order.created", 16).subject(),
                headers(&event).expect("headers"),
                event.body.clone(),
            )
            .await
            .expect("publish")
            .await
            .expect("ack");
        assert!(bed.record("k-crash").await.is_none());

        let Stored::Duplicate(receipt) = bed.publisher.store(&event).await.expect("store") else {
            panic!("the retry finds the stored event");
        };
        assert_eq!(receipt.stream_seq, first.sequence, "the first copy's");
        assert_eq!(bed.stored().await, 1, "stored once");
        assert_eq!(
            bed.record("k-crash")
                .await
                .expect("recorded now")
                .stream_seq,
            first.sequence
        );
        // And from then on the record answers.
        let Stored::Duplicate(later) = bed.publisher.store(&event).await.expect("store") else {
            panic!("duplicate");
        };
        assert_eq!(later.stream_seq, first.sequence);
    }

    #[tokio::test]
    async fn an_unreadable_record_fails_loudly_and_publishes_nothing() {
        let bed = bed().await;
        bed.kv
            .create(kv_key("k-bad"), Bytes::from_static(b"not json"))
            .await
            .expect("record");
        let error = bed
            .publisher
            .store(&inbound("k-bad"))
            .await
            .expect_err("an unreadable record is not a new key");
        assert!(
            matches!(&error, PublishError::CorruptRecord { key, .. } if key == &kv_key("k-bad")),
            "{error:?}"
        );
        assert_eq!(bed.stored().await, 0);
    }

    #[tokio::test]
    async fn concurrent_copies_store_one_event_and_agree_on_its_receipt() {
        let bed = bed().await;
        let event = inbound("k-race");
        let copies = futures::future::join_all((0..8).map(|_| bed.publisher.store(&event))).await;
        let receipts: Vec<_> = copies
            .into_iter()
            .map(|stored| stored.expect("store"))
            .collect();
        let accepted = receipts
            .iter()
            .filter(|s| matches!(s, Stored::Accepted(_)))
            .count();
        assert_eq!(accepted, 1, "{receipts:?}");
        let seqs: std::collections::BTreeSet<u64> = receipts
            .iter()
            .map(|s| match s {
                Stored::Accepted(r) | Stored::Duplicate(r) => r.stream_seq,
            })
            .collect();
        assert_eq!(seqs.len(), 1, "{receipts:?}");
        assert_eq!(bed.stored().await, 1);
        assert_eq!(
            bed.record("k-race").await.expect("recorded").stream_seq,
            *seqs.first().expect("one")
        );
    }

    #[tokio::test]
    async fn a_jetstream_error_keeps_its_source() {
        let bed = bed().await;
        bed.js
            .delete_stream(EVENTS_STREAM)
            .await
            .expect("delete the stream");
        let error = bed
            .publisher
            .store(&inbound("k-nostream"))
            .await
            .expect_err("no stream, no 2xx");
        let PublishError::JetStream { step, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(*step, "publish ack");
        assert!(std::error::Error::source(&error).is_some(), "typed source");
        assert!(
            bed.record("k-nostream").await.is_none(),
            "no record without the event"
        );
    }
}
