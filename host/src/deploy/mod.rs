//! Deploying handler versions: components in the object store
//! `hook_handlers` (object name = sha256 hex), the active version of each
//! handler in the KV bucket `hook_handlers` (key = handler name, history =
//! versions), and an audit record on `HOOK_AUDIT` for every deploy,
//! rollback and removal.
//!
//! A deployment is a [`Deployment`] stored as JSON. Its version label is
//! `<counter>-<first 12 hex of the digest>`, where the counter goes up by
//! one with every deploy or rollback of that handler, so a label names one
//! activation and is never reused. Hosts follow the bucket with
//! [`HandlerStore::watch`] and fetch binaries with
//! [`HandlerStore::fetch_component`].

pub mod cli;
pub mod dev;
pub mod follow;
mod validate;

use std::collections::BTreeMap;
use std::time::SystemTime;

use async_nats::jetstream::{self, kv, object_store};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::audit::{self, Action, AuditRecord};
use crate::manifest::{Manifest, ManifestError};
use crate::streams::{EVENTS_STREAM, HANDLERS_BUCKET, HANDLERS_STORE};

pub use validate::{Validated, check_starts, sha256_hex, validate};

/// The stream dead letters are kept in.
const DLQ_STREAM: &str = "HOOK_DLQ";
/// How many hex digits of the digest a version label carries.
const LABEL_DIGITS: usize = 12;
/// How often a deploy retries when another deploy of the same handler
/// wrote in between.
const CAS_ATTEMPTS: usize = 5;

/// Why a deploy, rollback, removal or lookup failed; the message names what
/// is wrong.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The file is not WebAssembly at all.
    #[error("not a WebAssembly component: {0}")]
    NotWasm(String),
    /// The file is a core module, not a component.
    #[error(
        "a core WebAssembly module, not a component: build the handler for wasm32-wasip2 \
         (cargo build --release --target wasm32-wasip2), which emits a component"
    )]
    CoreModule,
    /// The component's bytes do not validate.
    #[error("not a valid WebAssembly component: {0}")]
    Malformed(String),
    /// The component does not implement `hookmesh:handler/handler`; every
    /// problem found is listed.
    #[error("the component does not implement hookmesh:handler/handler:{}", problem_list(.0))]
    NotAHandler(Vec<String>),
    /// The component traps or fails while it is instantiated.
    #[error("the component fails while starting (it would be refused by every host): {0}")]
    DoesNotStart(String),
    /// The wasm engine could not be set up (a host problem).
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The manifest is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No handler of that name was ever deployed (or it is removed, for
    /// operations that need an active one).
    #[error("unknown handler {name:?}{}", known_suffix(.known))]
    UnknownHandler {
        /// The name asked for.
        name: String,
        /// The handlers that are deployed.
        known: Vec<String>,
    },
    /// The handler has no such version in its history.
    #[error("handler {handler:?} has no version {version:?}{}", known_suffix(.known))]
    UnknownVersion {
        /// The handler.
        handler: String,
        /// The version asked for.
        version: String,
        /// The versions its history holds, newest first.
        known: Vec<String>,
    },
    /// A rollback without `--to` found no earlier distinct version.
    #[error("handler {0:?} has no earlier version to roll back to")]
    NoEarlierVersion(String),
    /// The deployment names a component the object store does not hold.
    #[error("component {digest} is not in the object store {HANDLERS_STORE}")]
    MissingComponent {
        /// The digest.
        digest: String,
    },
    /// The stored component's bytes do not hash to its name.
    #[error("component {expected} in {HANDLERS_STORE} is corrupt: its bytes hash to {actual}")]
    DigestMismatch {
        /// The digest it is stored under.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// A stored deployment does not decode.
    #[error("{HANDLERS_BUCKET} {key} revision {revision}: not a deployment record: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// The revision.
        revision: u64,
        /// The decoder's message.
        message: String,
    },
    /// NATS refused or did not answer.
    #[error("NATS: {what}: {message}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's or server's message.
        message: String,
    },
    /// The audit record could not be written (the change itself was made).
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
}

/// One problem inline; several as an indented list, one per line.
fn problem_list(problems: &[String]) -> String {
    match problems {
        [one] => format!(" {one}"),
        many => many
            .iter()
            .map(|p| format!("\n  - {p}"))
            .collect::<String>(),
    }
}

fn known_suffix(known: &[String]) -> String {
    if known.is_empty() {
        String::new()
    } else {
        format!(" (known: {})", known.join(", "))
    }
}

fn nats(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> DeployError {
    let what = what.into();
    move |e| DeployError::Nats {
        what,
        message: e.to_string(),
    }
}

/// One activation of a handler version, as stored in KV `hook_handlers`
/// under the handler's name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// `<counter>-<first 12 hex of digest>`.
    pub version: String,
    /// The handler's deploy counter: 1 for its first deploy, one more for
    /// each deploy or rollback since.
    pub counter: u64,
    /// The component's sha256 (hex): its object name in `hook_handlers`.
    pub digest: String,
    /// The component's size in bytes.
    pub size: u64,
    /// When it was activated (RFC 3339).
    pub deployed_at: String,
    /// Who activated it.
    pub deployed_by: String,
    /// For a rollback, the version that was active before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
    /// The manifest, with `digest` set and no `component` path.
    pub manifest: Manifest,
}

impl Deployment {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }
}

/// The version label for a counter and digest.
pub fn version_label(counter: u64, digest: &str) -> String {
    let prefix = digest.get(..LABEL_DIGITS).unwrap_or(digest);
    format!("{counter}-{prefix}")
}

/// One entry of a handler's history.
#[derive(Debug, Clone, PartialEq)]
pub enum HistoryEntry {
    /// A version was activated.
    Deployed {
        /// The KV revision.
        revision: u64,
        /// The deployment.
        deployment: Box<Deployment>,
    },
    /// The handler was removed.
    Removed {
        /// The KV revision.
        revision: u64,
        /// When (RFC 3339).
        at: String,
    },
}

/// A change seen by [`HandlerStore::watch`].
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A version was activated (a deploy or a rollback), or, at the start
    /// of the watch, is the active one.
    Deployed(Box<Deployment>),
    /// The handler was removed: stop dispatching it.
    Removed {
        /// The handler.
        name: String,
    },
}

/// What [`HandlerStore::deploy`] and [`HandlerStore::rollback`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Deployed {
    /// A new version is active.
    Activated {
        /// The new deployment.
        deployment: Deployment,
        /// The version it replaced, if one was active.
        previous: Option<String>,
        /// Whether the component was uploaded (false: the store had it).
        uploaded: bool,
    },
    /// The same component with the same manifest is already active;
    /// nothing changed.
    Unchanged(Deployment),
}

/// A handler's delivery backlog: summed over its partition consumers on
/// `HOOK_EVENTS`, plus its dead letters on `HOOK_DLQ`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// How many partition consumers exist.
    pub consumers: usize,
    /// Events not yet delivered.
    pub pending: u64,
    /// Events delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Dead letters (`dlq.<name>.>`).
    pub dead_letters: u64,
}

/// The handler bucket and component store of one NATS account.
#[derive(Clone)]
pub struct HandlerStore {
    js: jetstream::Context,
    kv: kv::Store,
    objects: object_store::ObjectStore,
}

impl HandlerStore {
    /// The JetStream context the store works in.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
}

impl std::fmt::Debug for HandlerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerStore").finish_non_exhaustive()
    }
}

impl HandlerStore {
    /// Opens KV `hook_handlers` and object store `hook_handlers` (created
    /// by `hookmesh streams apply`).
    pub async fn open(js: &jetstream::Context) -> Result<HandlerStore, DeployError> {
        let hint = "(run `hookmesh streams apply`)";
        let kv = js
            .get_key_value(HANDLERS_BUCKET)
            .await
            .map_err(|e| nats(format!("KV bucket {HANDLERS_BUCKET} {hint}"))(&e))?;
        let objects = js
            .get_object_store(HANDLERS_STORE)
            .await
            .map_err(|e| nats(format!("object store {HANDLERS_STORE} {hint}"))(&e))?;
        Ok(HandlerStore {
            js: js.clone(),
            kv,
            objects,
        })
    }

    /// The active deployment of `name`; `None` when it was never deployed
    /// or is removed.
    pub async fn current(&self, name: &str) -> Result<Option<Deployment>, DeployError> {
        Ok(match self.entry(name).await? {
            Some(entry) if entry.operation == kv::Operation::Put => Some(decode(&entry)?),
            _ => None,
        })
    }

    /// Every entry the bucket keeps for `name` (the last 64), oldest first.
    pub async fn history(&self, name: &str) -> Result<Vec<HistoryEntry>, DeployError> {
        if !valid_key(name) {
            return Ok(Vec::new());
        }
        let entries: Vec<kv::Entry> = self
            .kv
            .history(name)
            .await
            .map_err(|e| nats(format!("history of {name}"))(&e))?
            .try_collect()
            .await
            .map_err(|e| nats(format!("history of {name}"))(&e))?;
        entries
            .iter()
            .map(|entry| {
                Ok(match entry.operation {
                    kv::Operation::Put => HistoryEntry::Deployed {
                        revision: entry.revision,
                        deployment: Box::new(decode(entry)?),
                    },
                    kv::Operation::Delete | kv::Operation::Purge => HistoryEntry::Removed {
                        revision: entry.revision,
                        at: rfc3339(SystemTime::from(entry.created)),
                    },
                })
            })
            .collect()
    }

    /// Every active deployment, by name.
    pub async fn list(&self) -> Result<Vec<Deployment>, DeployError> {
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| nats("listing handlers")(&e))?,
            Err(e) => return Err(nats("listing handlers")(&e)),
        };
        let mut out = Vec::new();
        for key in keys {
            if let Some(deployment) = self.current(&key).await? {
                out.push(deployment);
            }
        }
        out.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        Ok(out)
    }

    /// The bytes of the component stored under `digest`, checked against it.
    pub async fn fetch_component(&self, digest: &str) -> Result<Vec<u8>, DeployError> {
        let mut object = self.objects.get(digest).await.map_err(|e| {
            if e.kind() == object_store::GetErrorKind::NotFound {
                DeployError::MissingComponent {
                    digest: digest.to_string(),
                }
            } else {
                nats(format!("fetching component {digest}"))(&e)
            }
        })?;
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| nats(format!("reading component {digest}"))(&e))?;
        let actual = sha256_hex(&bytes);
        if actual != digest {
            return Err(DeployError::DigestMismatch {
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Every change to the bucket, starting with the current state of every
    /// key (a removed handler appears as [`Change::Removed`]), then each
    /// deploy, rollback and removal as it happens.
    pub async fn watch(
        &self,
    ) -> Result<futures::stream::BoxStream<'static, Result<Change, DeployError>>, DeployError> {
        let watch = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| nats(format!("watching {HANDLERS_BUCKET}"))(&e))?;
        Ok(watch
            .map(|item| {
                let entry = item.map_err(|e| nats(format!("watching {HANDLERS_BUCKET}"))(&e))?;
                Ok(match entry.operation {
                    kv::Operation::Put => Change::Deployed(Box::new(decode(&entry)?)),
                    kv::Operation::Delete | kv::Operation::Purge => {
                        Change::Removed { name: entry.key }
                    }
                })
            })
            .boxed())
    }

    /// Uploads a validated component (unless the store has it) and makes
    /// it, under `manifest`, the active version of `manifest.name`. The
    /// same component with the same manifest as the active version changes
    /// nothing ([`Deployed::Unchanged`]). Writes an audit record either way.
    pub async fn deploy(
        &self,
        manifest: Manifest,
        component: &Validated,
        actor: &str,
    ) -> Result<Deployed, DeployError> {
        let mut manifest = manifest;
        manifest.component = None;
        manifest.digest = Some(component.digest().to_string());
        let name = manifest.name.clone();
        if let Some(current) = self.current(&name).await?
            && current.digest == component.digest()
            && current.manifest == manifest
        {
            let mut record = AuditRecord::new(Action::Deploy, actor, &name, "unchanged");
            record.version = Some(current.version.clone());
            record.previous_version = Some(current.version.clone());
            audit::write(&self.js, &record).await?;
            return Ok(Deployed::Unchanged(current));
        }
        let uploaded = self.upload(component, &name).await?;
        let (deployment, previous) = self
            .activate(&name, |counter, _| Deployment {
                version: version_label(counter, component.digest()),
                counter,
                digest: component.digest().to_string(),
                size: component.size(),
                deployed_at: rfc3339(SystemTime::now()),
                deployed_by: actor.to_string(),
                rolled_back_from: None,
                manifest: manifest.clone(),
            })
            .await?;
        let mut record = AuditRecord::new(Action::Deploy, actor, &name, "ok");
        record.version = Some(deployment.version.clone());
        record.previous_version = previous.clone();
        audit::write(&self.js, &record).await?;
        Ok(Deployed::Activated {
            deployment,
            previous,
            uploaded,
        })
    }

    /// Activates an earlier version of `name` again, as a new version (the
    /// counter goes up). `to` names a version label (or just its counter);
    /// without it, the most recent version whose component or manifest
    /// differs from the active one. A removed handler is brought back with
    /// its last version (or `to`).
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<&str>,
        actor: &str,
    ) -> Result<Deployed, DeployError> {
        let history = self.history(name).await?;
        let deployments: Vec<&Deployment> = history
            .iter()
            .rev()
            .filter_map(|h| match h {
                HistoryEntry::Deployed { deployment, .. } => Some(deployment.as_ref()),
                HistoryEntry::Removed { .. } => None,
            })
            .collect();
        if deployments.is_empty() {
            return Err(self.unknown(name).await);
        }
        let current = self.current(name).await?;
        let target = match to {
            Some(wanted) => deployments
                .iter()
                .find(|d| d.version == wanted || d.counter.to_string() == wanted)
                .copied()
                .ok_or_else(|| DeployError::UnknownVersion {
                    handler: name.to_string(),
                    version: wanted.to_string(),
                    known: deployments.iter().map(|d| d.version.clone()).collect(),
                })?,
            None => match &current {
                Some(active) => deployments
                    .iter()
                    .find(|d| d.digest != active.digest || d.manifest != active.manifest)
                    .copied()
                    .ok_or_else(|| DeployError::NoEarlierVersion(name.to_string()))?,
                None => deployments[0],
            },
        };
        if let Some(active) = &current
            && active.version == target.version
        {
            let mut record = AuditRecord::new(Action::Rollback, actor, name, "unchanged");
            record.version = Some(active.version.clone());
            record.previous_version = Some(active.version.clone());
            audit::write(&self.js, &record).await?;
            return Ok(Deployed::Unchanged(active.clone()));
        }
        match self.objects.info(&target.digest).await {
            Ok(info) if !info.deleted => {}
            Ok(_) => {
                return Err(DeployError::MissingComponent {
                    digest: target.digest.clone(),
                });
            }
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                return Err(DeployError::MissingComponent {
                    digest: target.digest.clone(),
                });
            }
            Err(e) => return Err(nats(format!("component {}", target.digest))(&e)),
        }
        let (deployment, previous) = self
            .activate(name, |counter, previous| Deployment {
                version: version_label(counter, &target.digest),
                counter,
                digest: target.digest.clone(),
                size: target.size,
                deployed_at: rfc3339(SystemTime::now()),
                deployed_by: actor.to_string(),
                rolled_back_from: previous.map(str::to_string),
                manifest: target.manifest.clone(),
            })
            .await?;
        let mut record = AuditRecord::new(Action::Rollback, actor, name, "ok");
        record.version = Some(deployment.version.clone());
        record.previous_version = previous.clone();
        audit::write(&self.js, &record).await?;
        Ok(Deployed::Activated {
            deployment,
            previous,
            uploaded: false,
        })
    }

    /// Removes `name` (a KV delete: hosts stop dispatching it; the history
    /// stays for a later rollback) and returns the deployment that was
    /// active. With `delete_consumers`, its partition consumers on
    /// `HOOK_EVENTS` are deleted too (their names are returned); without,
    /// they keep their position, so a redeploy resumes where it stopped.
    pub async fn remove(
        &self,
        name: &str,
        delete_consumers: bool,
        actor: &str,
    ) -> Result<(Deployment, Vec<String>), DeployError> {
        let current = match self.current(name).await? {
            Some(current) => current,
            None => return Err(self.unknown(name).await),
        };
        self.kv
            .delete(name)
            .await
            .map_err(|e| nats(format!("removing {name}"))(&e))?;
        let deleted = if delete_consumers {
            self.delete_consumers(name).await?
        } else {
            Vec::new()
        };
        let outcome = if delete_consumers {
            "ok, consumers deleted"
        } else {
            "ok"
        };
        let mut record = AuditRecord::new(Action::Remove, actor, name, outcome);
        record.version = Some(current.version.clone());
        audit::write(&self.js, &record).await?;
        Ok((current, deleted))
    }

    /// Deletes every consumer `handler_<name>_<partition>` on `HOOK_EVENTS`
    /// and returns their names.
    pub async fn delete_consumers(&self, name: &str) -> Result<Vec<String>, DeployError> {
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| nats(EVENTS_STREAM)(&e))?;
        let names: Vec<String> = stream
            .consumer_names()
            .try_collect()
            .await
            .map_err(|e| nats(format!("consumers of {EVENTS_STREAM}"))(&e))?;
        let mut deleted = Vec::new();
        for consumer in names {
            if consumer_handler(&consumer) == Some(name) {
                stream
                    .delete_consumer(&consumer)
                    .await
                    .map_err(|e| nats(format!("deleting consumer {consumer}"))(&e))?;
                deleted.push(consumer);
            }
        }
        deleted.sort_by_key(|c| partition_of(c));
        Ok(deleted)
    }

    /// The backlog of every handler that has consumers or dead letters.
    pub async fn backlogs(&self) -> Result<BTreeMap<String, Backlog>, DeployError> {
        let mut out: BTreeMap<String, Backlog> = BTreeMap::new();
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| nats(EVENTS_STREAM)(&e))?;
        let consumers: Vec<jetstream::consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(|e| nats(format!("consumers of {EVENTS_STREAM}"))(&e))?;
        for info in consumers {
            if let Some(handler) = consumer_handler(&info.name) {
                let backlog = out.entry(handler.to_string()).or_default();
                backlog.consumers += 1;
                backlog.pending += info.num_pending;
                backlog.ack_pending += info.num_ack_pending as u64;
            }
        }
        let dlq = self
            .js
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| nats(DLQ_STREAM)(&e))?;
        let subjects: Vec<(String, usize)> = dlq
            .info_with_subjects("dlq.>")
            .await
            .map_err(|e| nats(format!("subjects of {DLQ_STREAM}"))(&e))?
            .try_collect()
            .await
            .map_err(|e| nats(format!("subjects of {DLQ_STREAM}"))(&e))?;
        for (subject, count) in subjects {
            if let Some(token) = subject.split('.').nth(1) {
                let handler =
                    crate::subject::decode_token(token).unwrap_or_else(|_| token.to_string());
                out.entry(handler).or_default().dead_letters += count as u64;
            }
        }
        Ok(out)
    }

    /// Uploads the component unless the store holds it; whether it did.
    async fn upload(&self, component: &Validated, name: &str) -> Result<bool, DeployError> {
        let digest = component.digest();
        match self.objects.info(digest).await {
            Ok(info) if !info.deleted => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {}
            Err(e) => return Err(nats(format!("component {digest}"))(&e)),
        }
        let meta = object_store::ObjectMetadata {
            name: digest.to_string(),
            description: Some(format!(
                "hookmesh handler component (first deployed as {name})"
            )),
            ..Default::default()
        };
        let mut reader = component.bytes();
        self.objects
            .put(meta, &mut reader)
            .await
            .map_err(|e| nats(format!("uploading component {digest}"))(&e))?;
        Ok(true)
    }

    /// Writes the next deployment of `name` (compare-and-set on the key's
    /// last revision, retried when another writer came in between) and
    /// returns it with the version it replaced.
    async fn activate(
        &self,
        name: &str,
        make: impl Fn(u64, Option<&str>) -> Deployment,
    ) -> Result<(Deployment, Option<String>), DeployError> {
        for _ in 0..CAS_ATTEMPTS {
            let last = self.entry(name).await?;
            let previous = match &last {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    Some(decode(entry)?.version)
                }
                _ => None,
            };
            let counter = self.last_counter(name).await? + 1;
            let deployment = make(counter, previous.as_deref());
            let body = serde_json::to_vec(&deployment).map_err(|e| DeployError::Corrupt {
                key: name.to_string(),
                revision: 0,
                message: e.to_string(),
            })?;
            let expected = last.as_ref().map_or(0, |e| e.revision);
            match self.kv.update(name, body.into(), expected).await {
                Ok(_) => return Ok((deployment, previous)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(nats(format!("writing {name}"))(&e)),
            }
        }
        Err(DeployError::Nats {
            what: format!("writing {name}"),
            message: format!("another deploy of {name} kept writing in between; try again"),
        })
    }

    /// The highest counter in `name`'s history (0 when none).
    async fn last_counter(&self, name: &str) -> Result<u64, DeployError> {
        Ok(self
            .history(name)
            .await?
            .iter()
            .filter_map(|h| match h {
                HistoryEntry::Deployed { deployment, .. } => Some(deployment.counter),
                HistoryEntry::Removed { .. } => None,
            })
            .max()
            .unwrap_or(0))
    }

    async fn entry(&self, name: &str) -> Result<Option<kv::Entry>, DeployError> {
        if !valid_key(name) {
            return Ok(None);
        }
        self.kv
            .entry(name)
            .await
            .map_err(|e| nats(format!("reading {name}"))(&e))
    }

    /// The error for an unknown handler, naming the deployed ones.
    async fn unknown(&self, name: &str) -> DeployError {
        let known = self
            .list()
            .await
            .map(|l| l.into_iter().map(|d| d.manifest.name).collect())
            .unwrap_or_default();
        DeployError::UnknownHandler {
            name: name.to_string(),
            known,
        }
    }
}

/// Handler names are valid KV keys; anything else cannot be stored.
fn valid_key(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The handler a consumer named `handler_<name>_<partition>` belongs to.
fn consumer_handler(consumer: &str) -> Option<&str> {
    let rest = consumer.strip_prefix("handler_")?;
    let (name, partition) = rest.rsplit_once('_')?;
    (!partition.is_empty() && partition.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty())
        .then_some(name)
}

fn partition_of(consumer: &str) -> u64 {
    consumer
        .rsplit_once('_')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(u64::MAX)
}

fn decode(entry: &kv::Entry) -> Result<Deployment, DeployError> {
    serde_json::from_slice(&entry.value).map_err(|e| DeployError::Corrupt {
        key: entry.key.clone(),
        revision: entry.revision,
        message: e.to_string(),
    })
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_labels_carry_counter_and_digest_prefix() {
        let digest = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(version_label(7, digest), "7-0123456789ab");
        assert_eq!(version_label(1, "abc"), "1-abc");
    }

    #[test]
    fn consumer_names_map_back_to_handlers() {
        assert_eq!(consumer_handler("handler_order-sync_7"), Some("order-sync"));
        assert_eq!(consumer_handler("handler_a_b_12"), Some("a_b"));
        assert_eq!(consumer_handler("handler_a_b"), None);
        assert_eq!(consumer_handler("handler__3"), None);
        assert_eq!(consumer_handler("other_x_1"), None);
        assert_eq!(partition_of("handler_x_12"), 12);
    }
}
