//! Between stored messages and the runtime: a delivery is read as a
//! [`StoredEvent`]; a handler's emits become messages on `HOOK_EVENTS`.

use std::borrow::Cow;
use std::time::SystemTime;

use async_nats::HeaderMap;
use async_nats::jetstream;
use async_nats::jetstream::stream::RawMessageErrorKind;
use futures::future::try_join_all;

use crate::headers::{self as header, BadHeader, EventHeaders};
use crate::runtime::{Emit, EventRef};
use crate::subject::{EventAddress, SubjectParts, TokenError, default_domain};
use crate::telemetry::{KeyValue, SpanKind, Trace, names};

/// What an emit inherits from the event that caused it, borrowed from
/// that event: nothing is copied for the events that emit nothing.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The source event's idempotency key (emit ids derive from it).
    pub idempotency_key: &'a str,
    /// Carried on.
    pub correlation_id: &'a str,
    /// Carried on.
    pub traceparent: Option<&'a str>,
}

impl<'a> Source<'a> {
    /// What the emits of `event` inherit.
    pub fn of(event: &EventRef<'a>) -> Source<'a> {
        Source {
            idempotency_key: event.idempotency_key,
            correlation_id: event.correlation_id,
            traceparent: event.header(header::TRACEPARENT),
        }
    }
}

/// Why a stored message cannot be run as an event (it is dead-lettered as
/// a permanent failure).
#[derive(Debug, thiserror::Error)]
pub enum NotAnEvent {
    /// The subject is not `hook.<provider>.<domain>.<partition>.<entity>.<type…>`.
    #[error("not a hookmesh event subject: {0}")]
    Subject(#[source] TokenError),
}

/// The event of a delivered message stored at `stream_seq` (the caller has
/// read the delivery's metadata), for attempt number `attempt`. Headers
/// hookmesh wrote are preferred; a message someone published by hand falls
/// back to what its subject says.
pub fn input(
    message: &jetstream::Message,
    stream_seq: u64,
    attempt: u64,
) -> Result<StoredEvent<'_>, NotAnEvent> {
    input_from(
        &message.subject,
        message.headers.as_ref(),
        &message.payload,
        stream_seq,
        attempt,
    )
}

/// An event as it is stored, borrowed from the message it was read from;
/// only what the message lacks (a value its subject gives, a generated
/// correlation id) is owned. [`StoredEvent::as_event`] is what a handler is
/// called with.
#[derive(Debug)]
pub struct StoredEvent<'a> {
    id: Option<&'a str>,
    idempotency_key: Cow<'a, str>,
    provider: Cow<'a, str>,
    event_type: Cow<'a, str>,
    domain: Cow<'a, str>,
    entity_id: Cow<'a, str>,
    entity_version: Option<&'a str>,
    correlation_id: Cow<'a, str>,
    subject: &'a str,
    received_at: Cow<'a, str>,
    attempt: u32,
    headers: Vec<(&'a str, &'a str)>,
    payload: &'a [u8],
}

impl StoredEvent<'_> {
    /// The event as the runtime lowers it into the guest.
    pub fn as_event(&self) -> EventRef<'_> {
        EventRef {
            id: self.id,
            idempotency_key: &self.idempotency_key,
            provider: &self.provider,
            event_type: &self.event_type,
            domain: &self.domain,
            entity_id: &self.entity_id,
            entity_version: self.entity_version,
            correlation_id: &self.correlation_id,
            subject: self.subject,
            received_at: &self.received_at,
            attempt: self.attempt,
            headers: &self.headers,
            payload: self.payload,
        }
    }

    /// The correlation id (from its header, else generated).
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// The event stored as `subject` / `headers` / `payload` at `stream_seq`,
/// for attempt number `attempt` (also for events read back by sequence:
/// replays and parked events).
pub fn input_from<'a>(
    subject: &'a str,
    headers: Option<&'a HeaderMap>,
    payload: &'a [u8],
    stream_seq: u64,
    attempt: u64,
) -> Result<StoredEvent<'a>, NotAnEvent> {
    let address = SubjectParts::parse(subject).map_err(NotAnEvent::Subject)?;
    // One pass over the headers, nothing copied; the named ones are picked
    // out on the way (a map lookup per name cost more than this).
    let mut known = KnownHeaders::default();
    let mut all = Vec::with_capacity(headers.map_or(0, |map| map.len()));
    for (name, values) in headers.iter().flat_map(|map| map.iter()) {
        let name: &str = name.as_ref();
        let slot = known_slot(name);
        for value in values {
            let value = value.as_str();
            if let Some((slot, exact)) = slot {
                known.offer(slot, exact, value);
            }
            all.push((name, value));
        }
    }
    let [
        id,
        msg_id,
        provider,
        event_type,
        domain,
        entity,
        entity_version,
        correlation_id,
        received_at,
    ] = known.values;
    let or_subject = |value: Option<&'a str>, from_subject: Cow<'a, str>| match value {
        Some(value) => Cow::Borrowed(value),
        None => from_subject,
    };
    Ok(StoredEvent {
        id,
        idempotency_key: msg_id
            .map_or_else(|| Cow::Owned(format!("seq:{stream_seq}")), Cow::Borrowed),
        provider: or_subject(provider, address.provider),
        event_type: or_subject(event_type, address.event_type),
        domain: or_subject(domain, address.domain),
        entity_id: or_subject(entity, address.entity),
        entity_version,
        correlation_id: correlation_id.map_or_else(
            || Cow::Owned(uuid::Uuid::now_v7().to_string()),
            Cow::Borrowed,
        ),
        received_at: received_at.map_or_else(
            || Cow::Owned(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
            Cow::Borrowed,
        ),
        subject,
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        headers: all,
        payload,
    })
}

/// The headers an [`EventRef`] names, in the order of
/// [`KnownHeaders::values`].
const KNOWN: [&str; 9] = [
    header::EVENT_ID,
    header::MSG_ID,
    header::PROVIDER,
    header::EVENT_TYPE,
    header::DOMAIN,
    header::ENTITY,
    header::ENTITY_VERSION,
    header::CORRELATION_ID,
    header::RECEIVED_AT,
];

/// The first value of each [`KNOWN`] header, as [`header::get`] finds it: a
/// name spelled exactly so wins over one that differs only in case.
#[derive(Default)]
struct KnownHeaders<'a> {
    values: [Option<&'a str>; 9],
    exact: [bool; 9],
}

/// Which [`KNOWN`] header `name` is, and whether it is spelled exactly so.
fn known_slot(name: &str) -> Option<(usize, bool)> {
    KNOWN
        .iter()
        .position(|known| known.eq_ignore_ascii_case(name))
        .map(|i| (i, KNOWN[i] == name))
}

impl<'a> KnownHeaders<'a> {
    /// A value of header `slot`: kept if it is the first, or the first of
    /// the exact spelling.
    fn offer(&mut self, slot: usize, exact: bool, value: &'a str) {
        let replace = match &self.values[slot] {
            None => true,
            Some(_) => exact && !self.exact[slot],
        };
        if replace {
            self.values[slot] = Some(value);
            self.exact[slot] = exact;
        }
    }
}

/// Why a handler's emits could not be published; the event is retried
/// (the emits that did land are deduplicated by their ids).
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// An emit without an event type or entity id.
    #[error("emit {index}: event type and entity id must not be empty")]
    Empty {
        /// The emit's index within the invocation.
        index: usize,
    },
    /// A value longer than NATS can carry in a subject or header.
    #[error("emit {index}: {source}")]
    TooLong {
        /// The emit's index within the invocation.
        index: usize,
        /// Which value, and its limit.
        #[source]
        source: crate::subject::limits::TooLong,
    },
    /// A value that cannot be a message header.
    #[error("emit {index}: {source}")]
    Header {
        /// The emit's index within the invocation.
        index: usize,
        /// Which header.
        #[source]
        source: BadHeader,
    },
    /// The publish could not be sent.
    #[error("emit {index}: publish: {source}")]
    Publish {
        /// The emit's index within the invocation.
        index: usize,
        /// The client's error.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// JetStream did not acknowledge an emit.
    #[error("emit: PubAck: {0}")]
    PubAck(#[source] jetstream::context::PublishError),
}

impl EmitError {
    /// Whether retrying cannot help: the emit itself is unstorable.
    pub fn is_permanent(&self) -> bool {
        matches!(self, EmitError::TooLong { .. })
    }
}

/// Publishes a handler's emits and waits for every PubAck. Each carries
/// `Nats-Msg-Id = <handler>:<source idempotency key>:<n>`, so a handler
/// run twice for one event (a crash before the ack) emits once: within
/// the stream's duplicate window the server drops the second copy, and a
/// run again of the event stored at `rerun_of` (a redelivery or a retry)
/// first looks for each emit in the stream after the source event, so an
/// event run again long after its first run — past the window — does not
/// store its emits twice either.
pub async fn publish_emits(
    js: &jetstream::Context,
    handler: &str,
    source: &Source<'_>,
    emits: &[Emit],
    partitions: u32,
    trace: &Trace,
    rerun_of: Option<u64>,
) -> Result<(), EmitError> {
    if emits.is_empty() {
        return Ok(());
    }
    // One producer span per emit when traced: the emitted event carries
    // its `traceparent`, so the handlers it reaches continue the trace.
    let mut spans = Vec::new();
    let received_at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let mut acks = Vec::with_capacity(emits.len());
    for (index, emit) in emits.iter().enumerate() {
        if emit.event_type.is_empty() || emit.entity_id.is_empty() {
            return Err(EmitError::Empty { index });
        }
        let id = format!("{handler}:{}:{index}", source.idempotency_key);
        let domain = default_domain(&emit.event_type).to_string();
        crate::subject::limits::check(&crate::subject::limits::Values {
            event_id: Some(&id),
            event_type: &emit.event_type,
            domain: &domain,
            entity_id: &emit.entity_id,
            entity_version: None,
            idempotency_key: &id,
            content_type: None,
        })
        .map_err(|source| EmitError::TooLong { index, source })?;
        let address = EventAddress::new(
            handler,
            &domain,
            &emit.entity_id,
            &emit.event_type,
            partitions,
        );
        let subject = address.subject();
        if let Some(source_seq) = rerun_of
            && already_stored(js, &subject, &id, source_seq).await
        {
            tracing::debug!(emit = index, %id, "stored by an earlier run of the event; not published again");
            continue;
        }
        let span = trace.child(names::PUBLISH, SpanKind::Producer, || {
            vec![
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", subject.clone()),
                KeyValue::new("hookmesh.event_type", emit.event_type.clone()),
                KeyValue::new("hookmesh.emit.index", index as i64),
                KeyValue::new("hookmesh.idempotency_key", id.clone()),
            ]
        });
        let traceparent = span.traceparent();
        let headers = EventHeaders {
            msg_id: &id,
            provider: handler,
            event_id: Some(&id),
            event_type: &emit.event_type,
            domain: &domain,
            entity: &emit.entity_id,
            entity_version: None,
            received_at: &received_at,
            correlation_id: source.correlation_id,
            traceparent: traceparent.as_deref().or(source.traceparent),
            content_type: "application/json",
        }
        .to_map()
        .map_err(|source| EmitError::Header { index, source })?;
        let ack = js
            .publish_with_headers(subject, headers, emit.payload.clone().into())
            .await
            .map_err(|source| EmitError::Publish { index, source });
        if span.is_on() {
            if let Err(error) = &ack {
                span.fail(|| error.to_string());
            }
            spans.push(span);
        }
        acks.push(ack?);
    }
    let acked = try_join_all(acks.into_iter().map(|ack| async move { ack.await }))
        .await
        .map_err(EmitError::PubAck);
    for span in &spans {
        span.end_with(&acked);
    }
    acked.map(drop)
}

/// Messages looked at per emit when checking whether an earlier run of the
/// event stored it; past this the publish goes ahead and the duplicate
/// window is the guard.
const RERUN_SCAN: usize = 256;

/// Whether `HOOK_EVENTS` holds a message on `subject` with message id `id`
/// stored after the source event (`source_seq`): an earlier run of the
/// event published it. The reads go to the stream leader, so a stored emit
/// is seen; when the stream cannot be read, `false` (the publish goes
/// ahead, deduplicated within the window as before).
async fn already_stored(js: &jetstream::Context, subject: &str, id: &str, source_seq: u64) -> bool {
    let stream = match js.get_stream_no_info(crate::streams::EVENTS_STREAM).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::debug!(%error, "cannot look for an earlier run's emit");
            return false;
        }
    };
    let mut from = source_seq.saturating_add(1);
    for _ in 0..RERUN_SCAN {
        match stream.get_first_raw_message_by_subject(subject, from).await {
            Ok(stored) => {
                if header::get(&stored.headers, header::MSG_ID) == Some(id) {
                    return true;
                }
                from = stored.sequence.saturating_add(1);
            }
            Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return false,
            Err(error) => {
                tracing::debug!(%error, "cannot look for an earlier run's emit");
                return false;
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hookmesh_test_support::NatsServer;

    use super::*;
    use crate::config::{Config, Env, Origin};
    use crate::streams::{self, EVENTS_STREAM, Mode};

    async fn stored(js: &jetstream::Context) -> u64 {
        let mut stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
        stream.info().await.expect("info").state.messages
    }

    #[test]
    fn an_event_takes_its_named_headers_first_exact_spelling_then_any_case_and_else_its_subject() {
        let subject = EventAddress::new("crm", "orders", "O-1", "order.created", 16).subject();
        let mut headers = HeaderMap::new();
        headers.insert("hook-event-id", "lower");
        headers.insert(header::EVENT_ID, "exact");
        headers.append(header::EVENT_ID, "exact-second");
        headers.insert("HOOK-CORRELATION-ID", "corr-upper");
        headers.insert(header::MSG_ID, "crm:e-1");
        headers.insert("X-Other", "kept");
        let stored = input_from(&subject, Some(&headers), b"{}", 7, 2).expect("an event");
        let input = stored.as_event();
        assert_eq!(input.id, Some("exact"));
        assert_eq!(input.correlation_id, "corr-upper");
        assert_eq!(input.idempotency_key, "crm:e-1");
        // Not in the headers: from the subject.
        assert_eq!(
            (input.provider, input.domain, input.entity_id),
            ("crm", "orders", "O-1")
        );
        assert_eq!(input.event_type, "order.created");
        assert_eq!(input.entity_version, None);
        assert_eq!(input.attempt, 2);
        assert_eq!(input.payload, b"{}");
        // Every header value, once each.
        assert_eq!(input.headers.len(), 6);
        assert!(input.headers.contains(&("X-Other", "kept")));
        assert!(input.headers.contains(&(header::EVENT_ID, "exact-second")));

        let bare = input_from(&subject, None, b"", 9, 1).expect("an event");
        let bare = bare.as_event();
        assert_eq!(bare.idempotency_key, "seq:9");
        assert_eq!(bare.id, None);
        assert!(bare.headers.is_empty());
        assert!(input_from("not.an.event", None, b"", 1, 1).is_err());
    }

    #[tokio::test]
    async fn an_event_run_again_past_the_duplicate_window_stores_its_emits_once() {
        let nats = NatsServer::start().expect("nats-server");
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client);
        let mut ingest = Config::from_toml("", Origin::Builtin, &Env::default())
            .expect("the built-in config")
            .ingest;
        ingest.duplicate_window = Duration::from_secs(1);
        streams::apply(&js, &ingest, Mode::Update)
            .await
            .expect("streams");
        let source_seq = js
            .publish("hook.crm.order.3.ORD-1.order.created", "{}".into())
            .await
            .expect("publish")
            .await
            .expect("stored")
            .sequence;
        let source = Source {
            idempotency_key: "crm:evt-1",
            correlation_id: "c-1",
            traceparent: None,
        };
        let emits = [Emit {
            event_type: "order.synced".into(),
            entity_id: "ORD-1".into(),
            payload: b"{}".to_vec(),
        }];
        let trace = Trace::off();
        let publish = |rerun_of| publish_emits(&js, "sync", &source, &emits, 16, &trace, rerun_of);
        publish(None).await.expect("first run");
        assert_eq!(stored(&js).await, 2);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        publish(Some(source_seq)).await.expect("the run again");
        assert_eq!(
            stored(&js).await,
            2,
            "a run again past the window finds its emit stored"
        );
        // Without the look-up only the window guards, and it has passed.
        publish(None).await.expect("unchecked");
        assert_eq!(stored(&js).await, 3);
        // A run again whose emit no earlier run stored publishes it.
        let other = Source {
            idempotency_key: "crm:evt-2",
            ..source
        };
        publish_emits(&js, "sync", &other, &emits, 16, &trace, Some(source_seq))
            .await
            .expect("a run again of an event never handled");
        assert_eq!(
            stored(&js).await,
            4,
            "an emit not stored before is published"
        );
    }
}
