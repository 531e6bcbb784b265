//! The state of a hookmesh installation, read from NATS in one pass: what
//! `hookmesh status` prints, what the console shows and what the backlog
//! gauges report.
//!
//! [`collect`] returns a typed [`Snapshot`]; [`render`] turns it into one
//! terminal screen, `serde_json` into `--json`, and the console into HTML.
//! Everything comes from the server — streams, consumers, `hook_handlers`,
//! `hook_leases`, `HOOK_DLQ`, `HOOK_AUDIT` — so any machine with the ops
//! credentials sees the same, whether a host runs there or not. A part that
//! cannot be read is named in [`Snapshot::problems`] instead of failing the
//! whole picture: at 3 a.m. half a screen beats an error.
//!
//! - [`render`]: the terminal screen.
//! - [`gauges`]: the host's periodic refresh of the backlog and DLQ gauges.

pub mod gauges;
pub mod render;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, kv};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::audit::AuditRecord;
use crate::deploy::HandlerStore;
use crate::dispatch::ownership::{self, Lease};
use crate::dlq;
use crate::manifest::handler_of_consumer;
use crate::streams::{self, EVENTS_STREAM, LEASES_BUCKET};

/// The audit stream (`audit.<action>.<handler>`).
pub const AUDIT_STREAM: &str = "HOOK_AUDIT";

/// How many audit entries a snapshot keeps unless told otherwise.
pub const RECENT_AUDIT: usize = 10;

/// Why a snapshot could not be taken at all (NATS unreachable); a part
/// that fails on its own is a [`Snapshot::problems`] line instead.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A request to the server failed.
    #[error("{what}: {source}")]
    Nats {
        /// What was being read.
        what: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
}

fn nats_error(what: impl Into<String>, source: impl Into<async_nats::Error>) -> StatusError {
    StatusError::Nats {
        what: what.into(),
        source: source.into(),
    }
}

/// Everything `hookmesh status` shows, at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was taken (RFC 3339).
    pub taken_at: String,
    /// When it was taken (Unix milliseconds); every age is relative to it.
    pub taken_at_ms: u64,
    /// The server this client talks to, and the others it knows of.
    pub nats: NatsState,
    /// The account's JetStream usage (`None`: not readable, see problems).
    pub jetstream: Option<JetStreamState>,
    /// hookmesh's streams (buckets as their `KV_`/`OBJ_` streams).
    pub streams: Vec<StreamState>,
    /// Every handler that is deployed or has partition consumers.
    pub handlers: Vec<HandlerState>,
    /// The dead-letter queue.
    pub dlq: DlqState,
    /// The latest audit entries, newest first.
    pub audit: Vec<AuditEntry>,
    /// Parts that could not be read, in plain words.
    pub problems: Vec<String>,
}

/// The NATS server the snapshot was read through.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NatsState {
    /// Its name.
    pub server_name: String,
    /// Its id.
    pub server_id: String,
    /// Its version.
    pub version: String,
    /// Where the client reached it.
    pub address: String,
    /// Its cluster, when it is in one.
    pub cluster: Option<String>,
    /// Other servers it advertises to clients.
    pub connect_urls: Vec<String>,
    /// Whether it has JetStream enabled.
    pub jetstream: bool,
    /// The largest message it accepts.
    pub max_payload: usize,
}

/// The account's JetStream usage (`$JS.API.INFO`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JetStreamState {
    /// Bytes held in memory storage.
    pub memory: u64,
    /// Bytes held in file storage.
    pub storage: u64,
    /// Streams in the account.
    pub streams: u64,
    /// Consumers in the account.
    pub consumers: u64,
    /// The account's file storage limit (`None`: unlimited).
    pub max_storage: Option<u64>,
    /// The account's memory limit (`None`: unlimited).
    pub max_memory: Option<u64>,
    /// JetStream API calls so far.
    pub api_total: u64,
    /// Of which failed.
    pub api_errors: u64,
}

/// One stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamState {
    /// Its name.
    pub name: String,
    /// Whether it exists (a missing one needs `hookmesh streams apply`).
    pub present: bool,
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Its first sequence.
    pub first_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Consumers on it.
    pub consumers: usize,
    /// Its replica count.
    pub replicas: usize,
    /// The server leading it (clustered streams).
    pub leader: Option<String>,
}

/// One handler.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandlerState {
    /// Its name.
    pub name: String,
    /// The active deployment (`None`: not deployed — run from files, or
    /// removed with its consumers kept).
    pub deployment: Option<DeploymentState>,
    /// Its partition consumers on `HOOK_EVENTS`.
    pub consumers: u32,
    /// Events not yet delivered, over its consumers.
    pub pending: u64,
    /// Events delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Events delivered more than once and not yet acknowledged.
    pub redelivered: u64,
    /// Who works each partition (`hook_leases`), by partition.
    pub partitions: Vec<PartitionOwner>,
    /// Its dead letters.
    pub dead_letters: u64,
    /// The age of its oldest dead letter, in seconds.
    pub oldest_dead_letter_secs: Option<u64>,
}

impl HandlerState {
    /// Hosts working partitions now, each with how many, most first.
    pub fn owners(&self) -> Vec<(String, usize)> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for owner in &self.partitions {
            if let Some(host) = owner.live_host() {
                *counts.entry(host).or_default() += 1;
            }
        }
        let mut owners: Vec<(String, usize)> = counts
            .into_iter()
            .map(|(h, n)| (h.to_string(), n))
            .collect();
        owners.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        owners
    }

    /// Partitions no host holds a live lease on.
    pub fn unowned(&self) -> Vec<u32> {
        self.partitions
            .iter()
            .filter(|p| p.live_host().is_none())
            .map(|p| p.partition)
            .collect()
    }
}

/// The active version of a handler.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeploymentState {
    /// `<counter>-<digest prefix>`.
    pub version: String,
    /// The component's sha256.
    pub digest: String,
    /// When it was activated (RFC 3339).
    pub deployed_at: String,
    /// Who activated it.
    pub deployed_by: String,
    /// Its subject filter.
    pub subject: String,
}

/// Who works one partition of a handler.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartitionOwner {
    /// The partition.
    pub partition: u32,
    /// The lease holder, if any lease is recorded.
    pub host: Option<String>,
    /// Milliseconds the lease still holds (negative: ran out that long ago).
    pub lease_ms: Option<i64>,
}

impl PartitionOwner {
    /// The holder while its lease holds.
    pub fn live_host(&self) -> Option<&str> {
        match (&self.host, self.lease_ms) {
            (Some(host), Some(ms)) if ms > 0 => Some(host),
            _ => None,
        }
    }
}

/// The dead-letter queue.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DlqState {
    /// Entries in `HOOK_DLQ`.
    pub depth: u64,
    /// The oldest entry's age, in seconds.
    pub oldest_secs: Option<u64>,
}

/// One audit record and where it is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its sequence in `HOOK_AUDIT`.
    pub seq: u64,
    /// The record.
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// Reads the whole picture through `client`, with the latest
/// `audit_entries` audit records.
pub async fn collect(
    client: &async_nats::Client,
    audit_entries: usize,
) -> Result<Snapshot, StatusError> {
    let js = jetstream::new(client.clone());
    let taken = SystemTime::now();
    let taken_at_ms = unix_ms(taken);
    let mut problems = Vec::new();

    let jetstream = match account(client).await {
        Ok(account) => Some(account),
        Err(error) => {
            problems.push(format!("JetStream account info: {error}"));
            None
        }
    };
    let streams = stream_states(&js).await?;
    for stream in streams.iter().filter(|s| !s.present) {
        problems.push(format!(
            "stream {} is missing (run `hookmesh streams apply`)",
            stream.name
        ));
    }

    let consumers = match consumer_backlogs(&js).await {
        Ok(consumers) => consumers,
        Err(error) => {
            problems.push(error.to_string());
            BTreeMap::new()
        }
    };
    let deployments = match HandlerStore::open(&js).await {
        Ok(store) => store.list().await.unwrap_or_else(|error| {
            problems.push(format!("deployments: {error}"));
            Vec::new()
        }),
        Err(error) => {
            problems.push(format!("deployments: {error}"));
            Vec::new()
        }
    };
    let depths = dlq::store::depths(&js).await.unwrap_or_else(|error| {
        problems.push(format!("dead letters: {error}"));
        BTreeMap::new()
    });

    let mut handlers: BTreeMap<String, HandlerState> = BTreeMap::new();
    for deployment in deployments {
        let name = deployment.name().to_string();
        handler(&mut handlers, &name).deployment = Some(DeploymentState {
            version: deployment.version,
            digest: deployment.digest,
            deployed_at: deployment.deployed_at,
            deployed_by: deployment.deployed_by,
            subject: deployment.manifest.subject,
        });
    }
    for (name, backlog) in &consumers {
        let handler = handler(&mut handlers, name);
        handler.consumers = backlog.consumers;
        handler.pending = backlog.figures.pending;
        handler.ack_pending = backlog.figures.ack_pending;
        handler.redelivered = backlog.figures.redelivered;
    }
    let mut dlq = DlqState::default();
    for (name, (depth, oldest)) in &depths {
        let age = taken.duration_since(*oldest).unwrap_or_default().as_secs();
        dlq.depth += depth;
        dlq.oldest_secs = Some(dlq.oldest_secs.map_or(age, |o| o.max(age)));
        let handler = handler(&mut handlers, name);
        handler.dead_letters = *depth;
        handler.oldest_dead_letter_secs = Some(age);
    }

    let partitions = streams::events_partitions(&js).await;
    match js.get_key_value(LEASES_BUCKET).await {
        Ok(leases) => {
            for handler in handlers.values_mut() {
                // Only handlers that run have partitions to own.
                let count = match (partitions, handler.consumers) {
                    (_, 0) => continue,
                    (Some(count), _) => count,
                    (None, consumers) => consumers,
                };
                match partition_owners(&leases, &handler.name, count, taken_at_ms).await {
                    Ok(owners) => handler.partitions = owners,
                    Err(error) => {
                        problems.push(format!("partition owners of {}: {error}", handler.name))
                    }
                }
            }
        }
        Err(error) => problems.push(format!("KV bucket {LEASES_BUCKET}: {error}")),
    }

    let audit = recent_audit(&js, audit_entries)
        .await
        .unwrap_or_else(|error| {
            problems.push(format!("audit trail: {error}"));
            Vec::new()
        });

    Ok(Snapshot {
        taken_at: humantime::format_rfc3339_seconds(taken).to_string(),
        taken_at_ms,
        nats: nats_state(client),
        jetstream,
        streams,
        handlers: handlers.into_values().collect(),
        dlq,
        audit,
        problems,
    })
}

/// The entry of handler `name`, made empty when it is new.
fn handler<'h>(
    handlers: &'h mut BTreeMap<String, HandlerState>,
    name: &str,
) -> &'h mut HandlerState {
    handlers
        .entry(name.to_string())
        .or_insert_with(|| HandlerState {
            name: name.to_string(),
            ..HandlerState::default()
        })
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn nats_state(client: &async_nats::Client) -> NatsState {
    let info = client.server_info();
    NatsState {
        server_name: info.server_name,
        server_id: info.server_id,
        version: info.version,
        address: format!("{}:{}", info.host, info.port),
        cluster: info.cluster.filter(|c| !c.is_empty()),
        connect_urls: info.connect_urls,
        jetstream: info.jetstream,
        max_payload: info.max_payload,
    }
}

/// `$JS.API.INFO` read leniently: the client's own account type wants
/// fields nats-server 2.9 does not send.
async fn account(client: &async_nats::Client) -> Result<JetStreamState, StatusError> {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Limits {
        max_memory: i64,
        max_storage: i64,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Api {
        total: u64,
        errors: u64,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct ApiError {
        description: String,
    }
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Account {
        memory: u64,
        storage: u64,
        streams: u64,
        consumers: u64,
        limits: Limits,
        api: Api,
        error: Option<ApiError>,
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.request("$JS.API.INFO", bytes::Bytes::new()),
    )
    .await
    .map_err(|_| nats_error("$JS.API.INFO", "no answer within 5s"))?
    .map_err(|e| nats_error("$JS.API.INFO", e))?;
    let account: Account =
        serde_json::from_slice(&reply.payload).map_err(|e| nats_error("$JS.API.INFO", e))?;
    if let Some(error) = account.error {
        return Err(nats_error("$JS.API.INFO", error.description));
    }
    let limit = |v: i64| u64::try_from(v).ok().filter(|v| *v > 0);
    Ok(JetStreamState {
        memory: account.memory,
        storage: account.storage,
        streams: account.streams,
        consumers: account.consumers,
        max_storage: limit(account.limits.max_storage),
        max_memory: limit(account.limits.max_memory),
        api_total: account.api.total,
        api_errors: account.api.errors,
    })
}

async fn stream_states(js: &jetstream::Context) -> Result<Vec<StreamState>, StatusError> {
    let mut out = Vec::new();
    for name in streams::names() {
        let mut state = StreamState {
            name: name.to_string(),
            ..StreamState::default()
        };
        match js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| nats_error(format!("stream {name}"), e))?;
                state.present = true;
                state.messages = info.state.messages;
                state.bytes = info.state.bytes;
                state.first_seq = info.state.first_sequence;
                state.last_seq = info.state.last_sequence;
                state.consumers = info.state.consumer_count;
                state.replicas = info.config.num_replicas;
                state.leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
            }
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(nats_error(format!("stream {name}"), e)),
        }
        out.push(state);
    }
    Ok(out)
}

/// What the server counts for a handler's consumers together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerBacklog {
    /// Its partition consumers.
    pub consumers: u32,
    /// Pending, ack pending and redelivered, summed.
    pub figures: crate::metrics::Backlog,
}

/// Per handler, its partition consumers' backlog as the server counts it.
pub async fn consumer_backlogs(
    js: &jetstream::Context,
) -> Result<BTreeMap<String, ConsumerBacklog>, StatusError> {
    let what = || format!("consumers of {EVENTS_STREAM}");
    let stream = js
        .get_stream_no_info(EVENTS_STREAM)
        .await
        .map_err(|e| nats_error(what(), e))?;
    let infos: Vec<jetstream::consumer::Info> = stream
        .consumers()
        .try_collect()
        .await
        .map_err(|e| nats_error(what(), e))?;
    let mut out: BTreeMap<String, ConsumerBacklog> = BTreeMap::new();
    for info in infos {
        let Some(handler) = handler_of_consumer(&info.name) else {
            continue;
        };
        let backlog = out.entry(handler.to_string()).or_default();
        backlog.consumers += 1;
        backlog.figures.pending += info.num_pending;
        backlog.figures.ack_pending += info.num_ack_pending as u64;
        backlog.figures.redelivered += info.num_redelivered as u64;
    }
    Ok(out)
}

async fn partition_owners(
    leases: &kv::Store,
    handler: &str,
    partitions: u32,
    now_ms: u64,
) -> Result<Vec<PartitionOwner>, kv::EntryError> {
    let owners = ownership::owners(leases, handler, partitions).await?;
    Ok(owners
        .into_iter()
        .map(|(partition, lease)| match lease {
            Some(Lease { host, until }) => PartitionOwner {
                partition,
                host: Some(host),
                lease_ms: Some(
                    i64::try_from(until).unwrap_or(i64::MAX)
                        - i64::try_from(now_ms).unwrap_or(i64::MAX),
                ),
            },
            None => PartitionOwner {
                partition,
                host: None,
                lease_ms: None,
            },
        })
        .collect())
}

/// The latest `count` audit records, newest first.
async fn recent_audit(
    js: &jetstream::Context,
    count: usize,
) -> Result<Vec<AuditEntry>, StatusError> {
    let mut stream = js
        .get_stream(AUDIT_STREAM)
        .await
        .map_err(|e| nats_error(AUDIT_STREAM, e))?;
    let state = stream
        .info()
        .await
        .map_err(|e| nats_error(AUDIT_STREAM, e))?
        .state
        .clone();
    let mut out = Vec::new();
    let mut seq = state.last_sequence;
    while out.len() < count && seq >= state.first_sequence.max(1) {
        // A sequence may be gone (deleted); the ones around it still count.
        if let Ok(message) = stream.get_raw_message(seq).await
            && let Ok(record) = serde_json::from_slice::<AuditRecord>(&message.payload)
        {
            out.push(AuditEntry { seq, record });
        }
        seq -= 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(partition: u32, host: Option<&str>, lease_ms: Option<i64>) -> PartitionOwner {
        PartitionOwner {
            partition,
            host: host.map(str::to_string),
            lease_ms,
        }
    }

    #[test]
    fn only_live_leases_count_as_owners() {
        let handler = HandlerState {
            name: "rec".into(),
            partitions: vec![
                owner(0, Some("b"), Some(3000)),
                owner(1, Some("a"), Some(2000)),
                owner(2, Some("b"), Some(100)),
                owner(3, Some("c"), Some(-500)),
                owner(4, None, None),
            ],
            ..HandlerState::default()
        };
        assert_eq!(
            handler.owners(),
            vec![("b".to_string(), 2), ("a".to_string(), 1)]
        );
        assert_eq!(handler.unowned(), vec![3, 4]);
    }
}
