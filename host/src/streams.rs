//! The streams and buckets hookmesh needs, and applying them to a server.
//!
//! The definitions are the JSON files under `nats/streams/` — the very files
//! `nats stream add --config nats/streams/HOOK_EVENTS.json` accepts — compiled
//! into the binary; the values the config controls (max age, duplicate
//! window, idempotency TTL, partition count) are set on top at apply time.
//!
//! Buckets are created as their backing `KV_<bucket>` streams rather than
//! through the client's `create_key_value`, which fails against
//! nats-server 2.9.x; the bucket is then opened with `get_key_value`. The
//! object store of handler components is likewise its `OBJ_<bucket>` stream,
//! defined exactly as `create_object_store` would create it, so `streams
//! apply` compares and updates it like every other stream.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::config::IngestConfig;

pub mod replicas;

/// The stream every event lives in.
pub const EVENTS_STREAM: &str = "HOOK_EVENTS";
/// The KV bucket of idempotency keys.
pub const IDEMPOTENCY_BUCKET: &str = "hook_idempotency";
/// The KV bucket of handler state.
pub const STATE_BUCKET: &str = "hook_state";
/// The KV bucket of id mappings.
pub const MAPPINGS_BUCKET: &str = "hook_mappings";
/// The KV bucket of delivery attempt records.
pub const ATTEMPTS_BUCKET: &str = "hook_attempts";
/// The KV bucket of partition ownership: which host works which handler
/// partition.
pub const LEASES_BUCKET: &str = "hook_leases";
/// The KV bucket of handler deployments (key = handler name, history =
/// versions).
pub const HANDLERS_BUCKET: &str = "hook_handlers";
/// The object store of handler components (object name = sha256 hex).
pub const HANDLERS_STORE: &str = "hook_handlers";

const EVENTS_JSON: &str = include_str!("../../nats/streams/HOOK_EVENTS.json");
/// Every definition file, in apply order.
const DEFINITIONS: &[(&str, &str)] = &[
    ("HOOK_EVENTS.json", EVENTS_JSON),
    (
        "KV_hook_idempotency.json",
        include_str!("../../nats/streams/KV_hook_idempotency.json"),
    ),
    (
        "KV_hook_state.json",
        include_str!("../../nats/streams/KV_hook_state.json"),
    ),
    (
        "KV_hook_mappings.json",
        include_str!("../../nats/streams/KV_hook_mappings.json"),
    ),
    (
        "KV_hook_attempts.json",
        include_str!("../../nats/streams/KV_hook_attempts.json"),
    ),
    (
        "KV_hook_leases.json",
        include_str!("../../nats/streams/KV_hook_leases.json"),
    ),
    (
        "KV_hook_handlers.json",
        include_str!("../../nats/streams/KV_hook_handlers.json"),
    ),
    // The object store's backing stream, as `create_object_store` would
    // make it (`$O.<bucket>.C.>` chunks, `$O.<bucket>.M.>` metadata).
    (
        "OBJ_hook_handlers.json",
        include_str!("../../nats/streams/OBJ_hook_handlers.json"),
    ),
    // Captured from the first start, so no advisory is lost while no
    // dead-letter writer runs.
    (
        "HOOK_ADVISORIES.json",
        include_str!("../../nats/streams/HOOK_ADVISORIES.json"),
    ),
    (
        "HOOK_DLQ.json",
        include_str!("../../nats/streams/HOOK_DLQ.json"),
    ),
    (
        "HOOK_AUDIT.json",
        include_str!("../../nats/streams/HOOK_AUDIT.json"),
    ),
];

/// Why streams could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    /// A compiled-in definition does not parse (a bug caught by the tests).
    #[error("definition {name}: {source}")]
    Definition {
        /// The file.
        name: &'static str,
        /// The parser's message.
        source: serde_json::Error,
    },
    /// The server refused or did not answer.
    #[error("{stream}: {message}")]
    Server {
        /// The stream.
        stream: String,
        /// The server's or client's message.
        message: String,
    },
    /// The existing stream disagrees with the config in a way that cannot
    /// change (the partition count).
    #[error("{0}")]
    Conflict(String),
    /// A change that is not safe now; the message says what to do.
    #[error("{0}")]
    Refused(String),
}

/// What [`apply`] does to a stream that exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Create what is missing, leave existing streams as they are
    /// (what `serve` and `up` do at start).
    Ensure,
    /// Create what is missing and update what differs (`streams apply`).
    Update,
}

/// What happened to one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did not exist and was created.
    Created,
    /// It differed and was updated.
    Updated,
    /// Its replica count was changed (and the new replicas caught up).
    Rescaled {
        /// Replicas before.
        from: usize,
        /// Replicas now.
        to: usize,
    },
    /// It was already as defined (or left alone in [`Mode::Ensure`]).
    Unchanged,
    /// Left alone in [`Mode::Ensure`] although its replica count is not
    /// `[nats] replicas`: `hookmesh streams apply` changes it.
    ReplicaMismatch {
        /// Replicas the stream has.
        actual: usize,
        /// Replicas the config asks for.
        wanted: usize,
    },
}

/// The full definitions, with the config's values applied, each stream
/// with one replica.
pub fn definitions(ingest: &IngestConfig) -> Result<Vec<stream::Config>, StreamsError> {
    definitions_replicated(ingest, 1)
}

/// The full definitions with `replicas` replicas each (`[nats] replicas`).
pub fn definitions_replicated(
    ingest: &IngestConfig,
    replicas: usize,
) -> Result<Vec<stream::Config>, StreamsError> {
    DEFINITIONS
        .iter()
        .map(|(name, json)| {
            let mut config = serde_json::from_str::<stream::Config>(json)
                .map_err(|source| StreamsError::Definition { name, source })?;
            config.num_replicas = replicas;
            if config.name == EVENTS_STREAM {
                config.max_age = ingest.max_age;
                config.duplicate_window = ingest.duplicate_window;
                config.description = Some(events_description(ingest.partitions));
            } else if config.name == format!("KV_{ATTEMPTS_BUCKET}") {
                // Attempt and parking records live as long as the events
                // they are about.
                config.max_age = ingest.max_age;
            } else if config.name == format!("KV_{IDEMPOTENCY_BUCKET}") {
                config.max_age = ingest.idempotency_ttl;
                config.duplicate_window = ingest.idempotency_ttl.min(Duration::from_secs(120));
            }
            Ok(config)
        })
        .collect()
}

/// The partition count is written into `HOOK_EVENTS`' description, where
/// every nats-server version keeps it, so a host configured with another
/// count refuses to start instead of silently breaking per-entity order.
fn events_description(partitions: u32) -> String {
    format!(
        "hookmesh events: hook.<provider>.<domain>.<partition>.<entity>.<event type...>; partitions={partitions}"
    )
}

/// The partition count `HOOK_EVENTS` was made with (`None` when it does not
/// say or cannot be read).
pub async fn events_partitions(js: &jetstream::Context) -> Option<u32> {
    let mut events = js.get_stream(EVENTS_STREAM).await.ok()?;
    let info = events.info().await.ok()?;
    described_partitions(info.config.description.as_deref())
}

/// Reads the partition count back from a description.
fn described_partitions(description: Option<&str>) -> Option<u32> {
    description?
        .rsplit("partitions=")
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Creates (and in [`Mode::Update`] updates) every stream and bucket, each
/// with one replica (a single server).
pub async fn apply(
    js: &jetstream::Context,
    ingest: &IngestConfig,
    mode: Mode,
) -> Result<Vec<(String, Outcome)>, StreamsError> {
    apply_replicated(js, ingest, 1, mode).await
}

/// The first nats-server release whose cluster kept every acknowledged
/// event in hookmesh's node-loss test (`tests/e2e/cluster.rs`).
pub const CLUSTER_KEEPS_ACKED_WRITES_FROM: (u64, u64) = (2, 10);

/// Creates (and in [`Mode::Update`] updates) every stream and bucket with
/// `replicas` replicas. A stream whose replica count changes is reported
/// done only once every replica is current (see [`replicas`]).
pub async fn apply_replicated(
    js: &jetstream::Context,
    ingest: &IngestConfig,
    replicas: usize,
    mode: Mode,
) -> Result<Vec<(String, Outcome)>, StreamsError> {
    let mut outcomes = Vec::new();
    let mut growth_checked = false;
    let version = js.client().server_info().version;
    if replicas > 1 && !replicas::at_least(&version, CLUSTER_KEEPS_ACKED_WRITES_FROM) {
        tracing::warn!(
            %version,
            replicas,
            "in hookmesh's node-loss test a cluster on this nats-server version lost events it \
             had acknowledged (PubAck) when nodes were killed in turn; run clusters on \
             nats-server 2.10 or later (docs/scale-out.md)"
        );
    }
    for wanted in definitions_replicated(ingest, replicas)? {
        let name = wanted.name.clone();
        let server = |e: &dyn std::fmt::Display| StreamsError::Server {
            stream: name.clone(),
            message: e.to_string(),
        };
        let outcome = match js.get_stream(&name).await {
            Ok(mut existing) => {
                let current = existing
                    .info()
                    .await
                    .map_err(|e| server(&e))?
                    .config
                    .clone();
                if name == EVENTS_STREAM {
                    check_partitions(&current, ingest.partitions)?;
                }
                let (from, to) = (current.num_replicas.max(1), wanted.num_replicas);
                match mode {
                    Mode::Update if from != to => {
                        // Once per apply: the hosts running do not change
                        // from one stream to the next.
                        if to > from && !growth_checked {
                            replicas::check_growth_is_safe(js).await?;
                            growth_checked = true;
                        }
                        replicas::rescale(js, wanted, from).await?;
                        Outcome::Rescaled { from, to }
                    }
                    Mode::Update if differs(&current, &wanted) => {
                        js.update_stream(wanted).await.map_err(|e| server(&e))?;
                        Outcome::Updated
                    }
                    Mode::Ensure if from != to => {
                        tracing::warn!(
                            stream = %name,
                            replicas = from,
                            wanted = to,
                            "the stream's replica count differs from nats.replicas; \
                             `hookmesh streams apply` changes it"
                        );
                        Outcome::ReplicaMismatch {
                            actual: from,
                            wanted: to,
                        }
                    }
                    _ => Outcome::Unchanged,
                }
            }
            Err(e) if is_not_found(&e) => {
                js.create_stream(wanted).await.map_err(|e| server(&e))?;
                Outcome::Created
            }
            Err(e) => return Err(server(&e)),
        };
        outcomes.push((name, outcome));
    }
    Ok(outcomes)
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The name of every stream hookmesh keeps (buckets and the object store
/// as their backing `KV_`/`OBJ_` streams), in apply order.
pub fn names() -> impl Iterator<Item = &'static str> {
    DEFINITIONS
        .iter()
        .map(|(file, _)| file.trim_end_matches(".json"))
}

/// Checks that every stream and bucket exists (for `/readyz`).
pub async fn present(js: &jetstream::Context) -> Result<(), StreamsError> {
    for name in names() {
        js.get_stream(name)
            .await
            .map_err(|e| StreamsError::Server {
                stream: name.to_string(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

fn check_partitions(current: &stream::Config, partitions: u32) -> Result<(), StreamsError> {
    match described_partitions(current.description.as_deref()) {
        Some(existing) if existing != partitions => Err(StreamsError::Conflict(format!(
            "ingest.partitions = {partitions}, but {EVENTS_STREAM} was created with {existing} partitions; \
             the count is fixed for the life of the stream (set ingest.partitions = {existing})"
        ))),
        _ => Ok(()),
    }
}

/// Whether the fields hookmesh manages differ.
fn differs(current: &stream::Config, wanted: &stream::Config) -> bool {
    current.subjects != wanted.subjects
        || current.description != wanted.description
        || current.max_age != wanted.max_age
        || current.duplicate_window != wanted.duplicate_window
        || current.max_messages_per_subject != wanted.max_messages_per_subject
        || current.discard != wanted.discard
        || current.allow_direct != wanted.allow_direct
        || current.allow_rollup != wanted.allow_rollup
        || current.deny_delete != wanted.deny_delete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest() -> IngestConfig {
        IngestConfig {
            duplicate_window: Duration::from_secs(60),
            idempotency_ttl: Duration::from_secs(3 * 86_400),
            publish_timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(5),
            max_age: Duration::from_secs(86_400),
            partitions: 8,
        }
    }

    #[test]
    fn definitions_parse_and_take_config_values() {
        let defs = definitions(&ingest()).expect("definitions parse");
        let events = &defs[0];
        assert_eq!(events.name, EVENTS_STREAM);
        assert_eq!(events.subjects, vec!["hook.>".to_string()]);
        assert_eq!(events.retention, stream::RetentionPolicy::Limits);
        assert_eq!(events.storage, stream::StorageType::File);
        assert_eq!(events.duplicate_window, Duration::from_secs(60));
        assert_eq!(events.max_age, Duration::from_secs(86_400));
        assert_eq!(described_partitions(events.description.as_deref()), Some(8));
        let kv = &defs[1];
        assert_eq!(kv.name, format!("KV_{IDEMPOTENCY_BUCKET}"));
        assert_eq!(kv.max_age, Duration::from_secs(3 * 86_400));
        assert_eq!(kv.max_messages_per_subject, 1);
        assert!(kv.allow_direct && kv.allow_rollup && kv.deny_delete);
        let attempts = defs
            .iter()
            .find(|d| d.name == format!("KV_{ATTEMPTS_BUCKET}"))
            .expect("attempts bucket");
        assert_eq!(attempts.max_age, events.max_age, "records outlive no event");
    }

    #[test]
    fn the_shipped_file_describes_sixteen_partitions() {
        let parsed: stream::Config = serde_json::from_str(EVENTS_JSON).expect("parses");
        assert_eq!(
            described_partitions(parsed.description.as_deref()),
            Some(16)
        );
    }
}
