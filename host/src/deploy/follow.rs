//! The host side of deploys: every host follows the `hook_handlers` bucket
//! and keeps the handlers it runs at their active versions.
//!
//! For each deployment it fetches the component (checking its sha256),
//! compiles it or loads the cached artifact, brings the handler's
//! consumers up to the manifest and swaps the handler's slot: an event
//! already running finishes on the version it started on, every later one
//! runs on the new version. Per-entity order is untouched, since the
//! server still hands out one event per partition at a time. A version
//! that does not compile or start on this host is not activated here; the
//! old one keeps running, and the failure is logged and audited.
//!
//! A removal stops the handler's dispatch on this host (the events in hand
//! finish first); its consumers stay unless `handlers remove
//! --delete-consumer` deleted them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, error, info, info_span, warn};

use super::{Change, Deployment, HandlerStore};
use crate::audit::{self, Action, AuditRecord};
use crate::dispatch::{Dispatch, HandlerSlot};
use crate::metrics::Metrics;
use crate::retry::Retry;
use crate::runtime::Prepared;

/// How long a stopping host lets running handlers finish the event in hand.
const DRAIN: Duration = Duration::from_secs(30);

/// How often preparing a version is tried when NATS fails.
const PREPARE_TRIES: usize = 5;

/// Why a version could not be prepared.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Fetching the component failed: worth another try.
    #[error(transparent)]
    Fetch(super::DeployError),
    /// Creating or updating a consumer failed: worth another try.
    #[error(transparent)]
    Consumer(crate::dispatch::DispatchError),
    /// The stored manifest is invalid.
    #[error("manifest: {0}")]
    Manifest(#[source] crate::manifest::InvalidValue),
    /// The component's bytes do not match the digest.
    #[error(transparent)]
    Corrupt(super::DeployError),
    /// The component does not compile or start here.
    #[error(transparent)]
    Runtime(crate::runtime::RuntimeError),
}

impl Failure {
    /// Whether NATS, not the component, failed (another try may succeed).
    fn is_transient(&self) -> bool {
        matches!(self, Failure::Fetch(_) | Failure::Consumer(_))
    }
}

/// A handler running on this host.
struct Running {
    slot: Arc<HandlerSlot>,
    stop: watch::Sender<bool>,
}

/// The handlers this host runs, kept at their deployed versions.
pub struct Follower {
    dispatch: Arc<Dispatch>,
    js: jetstream::Context,
    metrics: Metrics,
    running: BTreeMap<String, Running>,
    workers: JoinSet<()>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Follower {
    /// A follower running nothing yet.
    pub fn new(dispatch: Arc<Dispatch>, js: jetstream::Context, metrics: Metrics) -> Self {
        Follower {
            dispatch,
            js,
            metrics,
            running: BTreeMap::new(),
            workers: JoinSet::new(),
        }
    }

    /// Runs `prepared` (a handler loaded from a file) until a deployment of
    /// the same name replaces it.
    pub fn start(&mut self, prepared: Arc<Prepared>) {
        let name = prepared.manifest.name.clone();
        self.metrics
            .handler_version(&name, Some(&prepared.version), None);
        let slot = HandlerSlot::new(prepared);
        let (stop, stopped) = watch::channel(false);
        self.dispatch
            .spawn(slot.clone(), stopped, &mut self.workers);
        self.running.insert(name, Running { slot, stop });
    }

    /// Follows the deployments until `shutdown` turns true, then stops
    /// every handler and waits for the events in hand.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut retry = Retry::default();
        while !*shutdown.borrow() {
            let watched = async {
                let store = HandlerStore::open(&self.js).await?;
                let changes = store.watch().await?;
                Ok::<_, super::DeployError>((store, changes))
            }
            .await;
            let (store, mut changes) = match watched {
                Ok(watched) => watched,
                Err(error) => {
                    warn!(%error, retry_in = ?retry.delay(), "cannot follow deployments yet");
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            retry.reset();
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    next = changes.next() => match next {
                        Some(Ok(change)) => self.apply(&store, change).await,
                        // One unreadable entry must not stop the others.
                        Some(Err(error @ super::DeployError::Corrupt { .. })) => {
                            warn!(%error, "deployment entry skipped");
                        }
                        Some(Err(error)) => {
                            warn!(%error, "deployment watch interrupted");
                            break;
                        }
                        None => break,
                    },
                }
            }
            // Watch again after a pause: a watch that fails at once must not spin.
            retry.wait(&mut shutdown).await;
        }
        self.stop_all().await;
    }

    async fn apply(&mut self, store: &HandlerStore, change: Change) {
        match change {
            Change::Deployed(deployment) => {
                let span = info_span!(
                    "activate",
                    handler = %deployment.name(),
                    version = %deployment.version
                );
                self.activate(store, *deployment).instrument(span).await;
            }
            Change::Removed { name } => self.remove(&name),
        }
    }

    /// Makes `deployment` the version this host runs for its handler.
    async fn activate(&mut self, store: &HandlerStore, deployment: Deployment) {
        let name = deployment.name().to_string();
        if let Some(running) = self.running.get(&name)
            && running.slot.current().version == deployment.version
        {
            return;
        }
        let running = self.running.get(&name).map(|r| r.slot.clone());
        if let Some(slot) = &running {
            slot.begin_switch();
        }
        let prepared = match self.prepare_patiently(store, &deployment).await {
            Ok(prepared) => prepared,
            Err(error) => {
                if let Some(slot) = &running {
                    slot.cancel_switch();
                }
                error!(%error, "version not activated on this host; the previous one keeps running");
                self.metrics.activation_failed(&name);
                let mut record = AuditRecord::new(
                    Action::ActivationFailed,
                    &audit::host_actor(),
                    &name,
                    "failed",
                );
                record.version = Some(deployment.version.clone());
                record.previous_version = self
                    .running
                    .get(&name)
                    .map(|r| r.slot.current().version.clone());
                record.error = Some(error.to_string());
                if let Err(error) = audit::write(&self.js, &record).await {
                    warn!(%error, "activation failure not audited");
                }
                return;
            }
        };
        match self.running.get(&name) {
            Some(running) => {
                let previous = running.slot.swap(prepared);
                self.metrics.handler_version(
                    &name,
                    Some(&deployment.version),
                    Some(&previous.version),
                );
                info!(previous = %previous.version, digest = %deployment.digest, "activated; later events run on this version");
            }
            None => {
                self.start(prepared);
                info!(digest = %deployment.digest, subject = %deployment.manifest.subject, "activated");
            }
        }
    }

    /// [`Follower::prepare`], retrying what NATS failed at (a fetch, a
    /// consumer update) a few times; a component that does not compile or
    /// start is refused at once.
    async fn prepare_patiently(
        &self,
        store: &HandlerStore,
        deployment: &Deployment,
    ) -> Result<Arc<Prepared>, Failure> {
        let mut pause = Duration::from_millis(200);
        for _ in 1..PREPARE_TRIES {
            match self.prepare(store, deployment).await {
                Err(error) if error.is_transient() => {
                    warn!(%error, retry_in = ?pause, "version not ready on this host yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
        self.prepare(store, deployment).await
    }

    /// Fetches, compiles (or loads from the cache) and starts a deployment
    /// once, and brings its consumers up to its manifest.
    async fn prepare(
        &self,
        store: &HandlerStore,
        deployment: &Deployment,
    ) -> Result<Arc<Prepared>, Failure> {
        // Written by hookmesh deploy, but read from a bucket anyone with
        // the permissions can write to.
        deployment.manifest.validate().map_err(Failure::Manifest)?;
        let bytes = store
            .fetch_component(&deployment.digest)
            .await
            .map_err(|e| match e {
                super::DeployError::DigestMismatch { .. } => Failure::Corrupt(e),
                other => Failure::Fetch(other),
            })?;
        let prepared = self
            .dispatch
            .runtime()
            .prepare_as(
                deployment.manifest.clone(),
                &bytes,
                Some(deployment.version.clone()),
            )
            .await
            .map_err(Failure::Runtime)?;
        // A changed filter, max_deliver or ack_wait applies from the next
        // delivery on; the partition workers keep their pulls.
        for partition in 0..self.dispatch.partitions() {
            self.dispatch
                .ensure_consumer(&prepared.manifest, partition)
                .await
                .map_err(Failure::Consumer)?;
        }
        Ok(prepared)
    }

    fn remove(&mut self, name: &str) {
        if let Some(running) = self.running.remove(name) {
            let _ = running.stop.send(true);
            let version = running.slot.current().version.clone();
            self.metrics.handler_version(name, None, Some(&version));
            info!(handler = %name, %version, "removed: dispatch stops once the events in hand are done");
        }
    }

    async fn stop_all(&mut self) {
        for running in self.running.values() {
            let _ = running.stop.send(true);
        }
        let workers = &mut self.workers;
        if tokio::time::timeout(DRAIN, async {
            while workers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("handlers did not finish within {DRAIN:?}; their events will be redelivered");
        }
    }
}
