//! Running handlers from durable consumers, one per handler and partition
//! (`handler_<name>_<partition>` on `HOOK_EVENTS`), with per-entity order
//! and entity isolation:
//!
//! - [`ownership`]: at most one host works a handler partition at a time;
//!   partitions spread over the live hosts and move without reordering;
//! - [`partition`]: the owner keeps a window of events in flight, runs
//!   them concurrently across entities (at most the manifest's
//!   `concurrency` per host) and one at a time per entity
//!   ([`scheduler`]);
//! - [`settle`]: what a finished attempt does — ack, retry in hand, hold
//!   the entity for a long backoff, or dead letter (term);
//! - `drain`: held entities (long backoffs, parked behind a dead letter)
//!   run again from their records, the stream keeping the events.
//!
//! Dispatch knows nothing of HTTP.

mod drain;
mod event;
pub mod ownership;
mod partition;
mod pull;
mod recount;
mod replay;
pub mod scheduler;
pub mod services;
pub mod settle;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, warn};

pub use crate::records::attempts::{self, AttemptRecord, Reason};
pub use event::{input as event_input, input_from as event_input_from};
pub use partition::{entity_of, window};

use crate::manifest::{Manifest, partition_filter};
use crate::metrics::Metrics;
use crate::records::park;
use crate::retry::Retry;
use crate::runtime::{EventRef, Prepared, Runtime, Services, Verdict};
use crate::streams::{ATTEMPTS_BUCKET, EVENTS_STREAM, LEASES_BUCKET};
use crate::telemetry::{self, KeyValue, SpanKind, Trace};

/// Why dispatch could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A stream, bucket or consumer could not be reached or made.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// The manifest's subject filter makes no consumer filter.
    #[error("handler {handler}: {source}")]
    Filter {
        /// The handler.
        handler: String,
        /// What is wrong with its filter.
        #[source]
        source: crate::manifest::FilterError,
    },
    /// An attempt or park record could not be read or written.
    #[error(transparent)]
    Record(#[from] crate::records::RecordError),
}

impl DispatchError {
    pub(crate) fn nats(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        DispatchError::Nats {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// One handler's current version; replaced as a whole on deploy, so an
/// event runs start to finish on the version it started with.
///
/// While a host prepares a new version it has just learned of, the slot is
/// *switching*: no new event of the handler starts (events in flight go
/// on), so once any host knows of a version, events do not start on the
/// old one there — which keeps the hosts of a cluster from running one
/// entity's events on versions that go back and forth.
///
/// The slot also holds the handler's `concurrency` on this host: one
/// permit per event running, across its partitions and its drainer.
#[derive(Debug)]
pub struct HandlerSlot {
    current: RwLock<Arc<Prepared>>,
    switching: watch::Sender<bool>,
    permits: Arc<Semaphore>,
    concurrency: std::sync::Mutex<u32>,
}

impl HandlerSlot {
    /// A slot holding `prepared`.
    pub fn new(prepared: Arc<Prepared>) -> Arc<Self> {
        let concurrency = prepared.manifest.concurrency;
        Arc::new(HandlerSlot {
            current: RwLock::new(prepared),
            switching: watch::Sender::new(false),
            permits: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency: std::sync::Mutex::new(concurrency),
        })
    }

    /// A permit to run one event (waits while `concurrency` events run).
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Brings the permits to `concurrency` (a deploy changed it).
    fn resize(&self, concurrency: u32) {
        let mut current = self.concurrency.lock().unwrap_or_else(|e| e.into_inner());
        if concurrency > *current {
            self.permits.add_permits((concurrency - *current) as usize);
        } else if concurrency < *current {
            // Fewer from now on: permits in use are taken back as they
            // are returned.
            let excess = *current - concurrency;
            let permits = self.permits.clone();
            tokio::spawn(async move {
                if let Ok(taken) = permits.acquire_many_owned(excess).await {
                    taken.forget();
                }
            });
        }
        *current = concurrency;
    }

    /// The version new events run on.
    pub fn current(&self) -> Arc<Prepared> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version a new event runs on: waits while a switch is under way
    /// (at most `patience` of the current version's manifest, then the
    /// current version).
    pub async fn ready(&self, patience: impl FnOnce(&Manifest) -> Duration) -> Arc<Prepared> {
        if !*self.switching.borrow() {
            return self.current();
        }
        let mut switching = self.switching.subscribe();
        if *switching.borrow_and_update() {
            let patience = patience(&self.current().manifest);
            let waited = tokio::time::timeout(patience, switching.wait_for(|s| !*s)).await;
            if waited.is_err() {
                warn!(handler = %self.current().manifest.name, "the new version is not ready yet; going on with the current one");
            }
        }
        self.current()
    }

    /// Holds new events back until [`HandlerSlot::swap`] or
    /// [`HandlerSlot::cancel_switch`].
    pub fn begin_switch(&self) {
        self.switching.send_replace(true);
    }

    /// Lets new events start on the current version again.
    pub fn cancel_switch(&self) {
        self.switching.send_replace(false);
    }

    /// Makes `prepared` the version for every later event (and ends a
    /// switch).
    pub fn swap(&self, prepared: Arc<Prepared>) -> Arc<Prepared> {
        self.resize(prepared.manifest.concurrency);
        let previous = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|e| e.into_inner()),
            prepared,
        );
        self.switching.send_replace(false);
        previous
    }
}

/// What every partition worker shares.
pub struct Dispatch {
    js: jetstream::Context,
    runtime: Arc<Runtime>,
    services: Arc<dyn Services>,
    attempts: kv::Store,
    leases: kv::Store,
    partitions: u32,
    metrics: Metrics,
    /// Names this process in partition and park leases.
    host_id: String,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch")
            .field("partitions", &self.partitions)
            .finish()
    }
}

impl Dispatch {
    /// Opens the buckets dispatch needs.
    pub async fn new(
        js: jetstream::Context,
        runtime: Arc<Runtime>,
        services: Arc<dyn Services>,
        partitions: u32,
        metrics: Metrics,
    ) -> Result<Arc<Self>, DispatchError> {
        let attempts = js
            .get_key_value(ATTEMPTS_BUCKET)
            .await
            .map_err(|e| DispatchError::nats(format!("KV bucket {ATTEMPTS_BUCKET}"), e))?;
        let leases = js
            .get_key_value(LEASES_BUCKET)
            .await
            .map_err(|e| DispatchError::nats(format!("KV bucket {LEASES_BUCKET}"), e))?;
        Ok(Arc::new(Dispatch {
            js,
            runtime,
            services,
            attempts,
            leases,
            partitions,
            metrics,
            host_id: format!(
                "{}:{}:{}",
                crate::audit::hostname(),
                std::process::id(),
                uuid::Uuid::now_v7().simple()
            ),
        }))
    }

    /// The partition count: one consumer per handler and partition.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The runtime handlers run in.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Names this host in partition and park leases.
    pub fn host_id(&self) -> &str {
        &self.host_id
    }

    /// Starts `slot`'s handler here: its consumers, its share of the
    /// partitions (see [`ownership`]), its replay service and its drainer
    /// of held entities — until `shutdown` turns true; running events
    /// finish and the partitions are handed over before it stops.
    pub fn spawn(
        self: &Arc<Self>,
        slot: Arc<HandlerSlot>,
        shutdown: watch::Receiver<bool>,
        workers: &mut JoinSet<()>,
    ) {
        workers.spawn(self.clone().serve_replays(slot.clone(), shutdown.clone()));
        workers.spawn(self.clone().drain_parked(slot.clone(), shutdown.clone()));
        workers.spawn(self.clone().own_partitions(slot, shutdown));
    }

    /// Makes the handler's consumers (or brings them up to its manifest),
    /// then takes part in the ownership of its partitions.
    async fn own_partitions(
        self: Arc<Self>,
        slot: Arc<HandlerSlot>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let manifest = slot.current().manifest.clone();
        let mut retry = Retry::default();
        // Made once, when the handler starts here; later a deploy's
        // activation updates them. Workers only bind: a consumer deleted
        // on purpose (`handlers remove --delete-consumer`) must not come
        // back replaying the stream from the start. All at once first (a
        // start does not wait for one round trip per partition in a row);
        // those that failed are tried again one by one, with the back-off.
        let first = futures::future::join_all(
            (0..self.partitions).map(|partition| self.ensure_consumer(&manifest, partition)),
        )
        .await;
        let failed = (0..self.partitions)
            .zip(first)
            .filter(|(_, made)| made.is_err());
        for (partition, _) in failed {
            while let Err(error) = self.ensure_consumer(&manifest, partition).await {
                warn!(handler = %manifest.name, partition, %error, retry_in = ?retry.delay(), "consumer not ready");
                retry.pause(&mut shutdown).await;
                if *shutdown.borrow() {
                    return;
                }
            }
        }
        let name = manifest.name.clone();
        let gauge_name = name.clone();
        let ack_slot = slot.clone();
        let metrics = self.metrics.clone();
        let partitions = self.partitions;
        let ownership = ownership::Ownership::new(
            self.leases.clone(),
            &name,
            &self.host_id,
            self.partitions,
            move || ack_slot.current().manifest.ack_wait,
            PartitionWorkers {
                dispatch: self.clone(),
                slot,
            },
            // Set on every round, beside the owned count, so a handler
            // removed and started again at once shows its partitions.
            move |owned| {
                metrics.partitions_owned(&gauge_name, owned);
                metrics.partitions(&gauge_name, Some(partitions));
            },
        );
        ownership.run(shutdown).await;
        self.metrics.partitions(&name, None);
    }

    /// The consumer config of a handler's partition.
    pub fn consumer_config(
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::pull::Config, DispatchError> {
        let filter_subject = partition_filter(&manifest.subject, partition).map_err(|source| {
            DispatchError::Filter {
                handler: manifest.name.clone(),
                source,
            }
        })?;
        Ok(consumer::pull::Config {
            durable_name: Some(manifest.consumer_name(partition)),
            description: Some(format!(
                "hookmesh handler {} partition {partition}",
                manifest.name
            )),
            filter_subject,
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            max_deliver: manifest.max_deliver,
            ack_wait: manifest.ack_wait,
            // The window of events the owning host keeps in flight; order
            // per entity is the owner's (see `partition`).
            max_ack_pending: window(manifest),
            ..Default::default()
        })
    }

    /// Creates (or updates) a handler's partition consumer.
    pub async fn ensure_consumer(
        &self,
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::PullConsumer, DispatchError> {
        let config = Self::consumer_config(manifest, partition)?;
        let name = manifest.consumer_name(partition);
        // Only the stream's name is needed, not its info: no request.
        let stream = self
            .js
            .get_stream_no_info(EVENTS_STREAM)
            .await
            .map_err(|e| DispatchError::nats(EVENTS_STREAM, e))?;
        // A consumer already as the manifest wants it is left alone: an
        // update is a write to the server's consumer state for nothing.
        // Getting it read its info; that is not asked for a second time.
        if let Ok(existing) = stream.get_consumer::<consumer::pull::Config>(&name).await
            && same_settings(&existing.cached_info().config, &config)
        {
            return Ok(existing);
        }
        stream
            .create_consumer(config)
            .await
            .map_err(|e| DispatchError::nats(format!("consumer {name}"), e))
    }

    /// A handler's partition consumer as it is on the server.
    async fn ensure_bound(
        &self,
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::PullConsumer, DispatchError> {
        let name = manifest.consumer_name(partition);
        self.js
            .get_stream_no_info(EVENTS_STREAM)
            .await
            .map_err(|e| DispatchError::nats(EVENTS_STREAM, e))?
            .get_consumer(&name)
            .await
            .map_err(|e| DispatchError::nats(format!("consumer {name}"), e))
    }

    /// The partition's consumer and a puller on an inbox of its own.
    async fn bind_puller(
        &self,
        manifest: &Manifest,
        partition: u32,
    ) -> Result<(consumer::PullConsumer, pull::Puller), DispatchError> {
        let consumer = self.ensure_bound(manifest, partition).await?;
        let name = manifest.consumer_name(partition);
        let puller = pull::Puller::new(&self.js, EVENTS_STREAM, &name)
            .await
            .map_err(|e| DispatchError::nats(format!("an inbox for consumer {name}"), e))?;
        Ok((consumer, puller))
    }

    /// Lifts the hold a last delivery placed before it ran, now that it
    /// succeeded, retrying for a while: a hold left behind would park the
    /// entity behind a dead letter that does not exist.
    async fn lift_hold(&self, handler: &str, subject: &str, stream_seq: u64) {
        let mut pause = Duration::from_millis(100);
        for _ in 0..8 {
            match park::release(&self.attempts, handler, subject, stream_seq).await {
                Ok(_) => return,
                Err(error) => {
                    debug!(%error, retry_in = ?pause, "hold not lifted yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        error!(
            park_key = park::key(handler, subject).unwrap_or_default(),
            "the entity stays parked behind an event that succeeded; delete that park record to release it"
        );
    }

    /// Runs one event (stored at `stream_seq`) on `prepared` and, when it
    /// succeeds, publishes its emits: `Ok(emits)` or how it failed. Each
    /// run is one span when tracing is on — a retry is a span of its own
    /// under the same parent, the event's `traceparent`.
    ///
    /// `rerun` says the event may have run before (a redelivery, a retry, a
    /// held or replayed event): its emits are then looked for in the stream
    /// before they are published (see [`event::publish_emits`]).
    async fn execute(
        &self,
        prepared: &Arc<Prepared>,
        input: EventRef<'_>,
        stream_seq: u64,
        rerun: bool,
    ) -> Result<usize, Failed> {
        let manifest = &prepared.manifest;
        let source = event::Source::of(&input);
        let trace = if telemetry::enabled() {
            invocation_span(prepared, &input, &source, stream_seq)
        } else {
            Trace::off()
        };
        let invoked = self
            .runtime
            .invoke_traced(prepared, &input, self.services.clone(), &trace)
            .await;
        let label = verdict_label(&invoked.verdict);
        self.metrics.invoked(&manifest.name, label, invoked.elapsed);
        if invoked.log_dropped > 0 {
            self.metrics.guest_log_truncated(&manifest.name);
        }
        let rerun_of = rerun.then_some(stream_seq);
        let result = self
            .settle_verdict(manifest, &source, invoked, &trace, rerun_of)
            .await;
        trace.set(|| {
            vec![KeyValue::new(
                "hookmesh.outcome",
                outcome_label(label, &result),
            )]
        });
        if let Err(failed) = &result {
            trace.fail(|| telemetry::clip(&failed.error, 1024));
        }
        trace.end();
        result
    }

    /// What an invocation's verdict makes of it: its emits published, or
    /// the failure.
    async fn settle_verdict(
        &self,
        manifest: &Manifest,
        source: &event::Source<'_>,
        invoked: crate::runtime::Invoked,
        trace: &Trace,
        rerun_of: Option<u64>,
    ) -> Result<usize, Failed> {
        match invoked.verdict {
            Verdict::Ok => event::publish_emits(
                &self.js,
                &manifest.name,
                source,
                &invoked.emits,
                self.partitions,
                trace,
                rerun_of,
            )
            .await
            .map(|()| invoked.emits.len())
            .map_err(|error| {
                let reason = if error.is_permanent() {
                    Reason::Permanent
                } else {
                    Reason::Transient
                };
                Failed::new(reason, error.to_string())
            }),
            Verdict::Transient {
                reason,
                retry_after,
            } => Err(Failed {
                retry_after,
                ..Failed::new(Reason::Transient, reason)
            }),
            Verdict::Trap(error) => Err(Failed::new(Reason::Trap, error)),
            Verdict::Permanent(error) => Err(Failed::new(Reason::Permanent, error)),
            Verdict::NeedsHuman(error) => Err(Failed::new(Reason::NeedsHuman, error)),
        }
    }

    /// Records a failed attempt; `false` when the record could not be
    /// stored.
    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        handler: &str,
        version: &str,
        message: &jetstream::Message,
        stream_seq: u64,
        delivery: u64,
        error: &str,
        reason: Reason,
    ) -> bool {
        let failure = attempts::Failure {
            handler,
            handler_version: version,
            stream_seq,
            subject: message.subject.as_str(),
            delivery,
            error,
            reason,
        };
        match attempts::record(&self.attempts, failure).await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "attempt not recorded");
                false
            }
        }
    }
}

/// How an attempt failed.
#[derive(Debug, Clone)]
struct Failed {
    /// Its class.
    reason: Reason,
    /// What went wrong.
    error: String,
    /// The delay the handler asked for (an HTTP `Retry-After`).
    retry_after: Option<Duration>,
}

impl Failed {
    fn new(reason: Reason, error: String) -> Failed {
        Failed {
            reason,
            error,
            retry_after: None,
        }
    }
}

/// Whether a consumer on the server has the settings hookmesh gives it.
fn same_settings(server: &consumer::Config, wanted: &consumer::pull::Config) -> bool {
    server.filter_subject == wanted.filter_subject
        && server.max_deliver == wanted.max_deliver
        && server.ack_wait == wanted.ack_wait
        && server.max_ack_pending == wanted.max_ack_pending
        && server.description == wanted.description
}

/// Starts partition workers for [`ownership::Ownership`].
struct PartitionWorkers {
    dispatch: Arc<Dispatch>,
    slot: Arc<HandlerSlot>,
}

impl ownership::StartWorker for PartitionWorkers {
    fn start(
        &self,
        partition: u32,
        fence: Arc<ownership::Fence>,
        start_at: tokio::time::Instant,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.dispatch.clone().work_partition(
            self.slot.clone(),
            partition,
            fence,
            start_at,
        ))
    }
}

/// The version label stamped on logs, attempt records and dead letters
/// (see [`Prepared::version`]).
pub fn version_of(prepared: &Prepared) -> String {
    prepared.version.clone()
}

/// The span of one run of an event, under the event's `traceparent`; its
/// trace id goes on the log span the run is in (a field `trace_id`).
fn invocation_span(
    prepared: &Prepared,
    input: &EventRef<'_>,
    source: &event::Source<'_>,
    stream_seq: u64,
) -> Trace {
    let manifest = &prepared.manifest;
    let trace = Trace::start(
        format!("invoke {}", manifest.name),
        SpanKind::Consumer,
        source.traceparent,
        || {
            vec![
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", input.subject.to_string()),
                KeyValue::new("hookmesh.handler", manifest.name.clone()),
                KeyValue::new("hookmesh.handler.version", prepared.version.clone()),
                KeyValue::new("hookmesh.subject", input.subject.to_string()),
                KeyValue::new(
                    "hookmesh.stream_seq",
                    i64::try_from(stream_seq).unwrap_or(i64::MAX),
                ),
                KeyValue::new("hookmesh.attempt", i64::from(input.attempt)),
                KeyValue::new("hookmesh.correlation_id", input.correlation_id.to_string()),
                KeyValue::new(
                    "hookmesh.idempotency_key",
                    input.idempotency_key.to_string(),
                ),
            ]
        },
    );
    if let Some(trace_id) = trace.trace_id() {
        tracing::Span::current().record(crate::logging::TRACE_ID, trace_id.as_str());
    }
    trace
}

/// The `hookmesh.outcome` of a run: the verdict's label, `transient` when
/// the emits of an `ok` could not be published.
fn outcome_label(verdict: &'static str, result: &Result<usize, Failed>) -> &'static str {
    match result {
        Err(_) if verdict == "ok" => "transient",
        _ => verdict,
    }
}

fn verdict_label(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Ok => "ok",
        Verdict::Transient { .. } => "transient",
        Verdict::Permanent(_) => "permanent",
        Verdict::NeedsHuman(_) => "needs-human",
        Verdict::Trap(_) => "trap",
    }
}

/// Reads an event's attempt record (for ops and the dead-letter writer).
pub async fn attempt_record(
    js: &jetstream::Context,
    handler: &str,
    stream_seq: u64,
) -> Result<Option<AttemptRecord>, DispatchError> {
    let bucket = js
        .get_key_value(ATTEMPTS_BUCKET)
        .await
        .map_err(|e| DispatchError::nats(format!("KV bucket {ATTEMPTS_BUCKET}"), e))?;
    Ok(attempts::read(&bucket, handler, stream_seq).await?)
}
