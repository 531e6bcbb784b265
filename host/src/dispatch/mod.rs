//! Running handlers from durable consumers: per handler and partition a
//! pull consumer `handler_<name>_<partition>` on `HOOK_EVENTS` with
//! `max_ack_pending = 1`, so the server itself hands out one event of a
//! partition at a time, in stream order — retries included, across
//! restarts and across hosts. That is the whole of per-entity ordering:
//! nothing is reordered or locked in memory.
//!
//! The handler's result decides what happens to the event:
//! - ok → publish its emits (deduplicated) → ack;
//! - transient or trap → record the attempt → nak with backoff;
//! - permanent or needs-human → record the attempt → term.
//!
//! Dispatch knows nothing of HTTP.

pub mod attempts;
mod drain;
mod event;
mod replay;
pub mod services;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer, kv};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, error, info, info_span, warn};

pub use attempts::{AttemptRecord, Reason};
pub use event::{input as event_input, input_from as event_input_from};

use crate::dlq::park;
use crate::manifest::{Manifest, OnDeadLetter, partition_filter};
use crate::metrics::Metrics;
use crate::retry::Retry;
use crate::runtime::{EventInput, Prepared, Runtime, Services, Verdict};
use crate::streams::{ATTEMPTS_BUCKET, EVENTS_STREAM};

/// Messages asked for per pull request (see `run_partition`).
const PULL_BATCH: usize = 100;

/// Why dispatch could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A stream, bucket or consumer could not be reached or made.
    #[error("{what}: {message}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's message.
        message: String,
    },
}

/// One handler's current version; replaced as a whole on deploy, so an
/// event runs start to finish on the version it started with.
///
/// While a host prepares a new version it has just learned of, the slot is
/// *switching*: no new event of the handler starts (events in flight go
/// on), so once any host knows of a version, events do not start on the
/// old one there — which keeps the hosts of a cluster from running one
/// entity's events on versions that go back and forth.
#[derive(Debug)]
pub struct HandlerSlot {
    current: RwLock<Arc<Prepared>>,
    switching: watch::Sender<bool>,
}

impl HandlerSlot {
    /// A slot holding `prepared`.
    pub fn new(prepared: Arc<Prepared>) -> Arc<Self> {
        Arc::new(HandlerSlot {
            current: RwLock::new(prepared),
            switching: watch::Sender::new(false),
        })
    }

    /// The version new events run on.
    pub fn current(&self) -> Arc<Prepared> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The version a new event runs on: waits while a switch is under way
    /// (at most `patience`, then the current version).
    pub async fn ready(&self, patience: Duration) -> Arc<Prepared> {
        let mut switching = self.switching.subscribe();
        if *switching.borrow_and_update() {
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
    partitions: u32,
    metrics: Metrics,
    /// Names this process in park leases.
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
        let attempts =
            js.get_key_value(ATTEMPTS_BUCKET)
                .await
                .map_err(|e| DispatchError::Nats {
                    what: format!("KV bucket {ATTEMPTS_BUCKET}"),
                    message: e.to_string(),
                })?;
        Ok(Arc::new(Dispatch {
            js,
            runtime,
            services,
            attempts,
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

    /// Starts one worker per partition for `slot`, its replay service and
    /// its park drainer (idle unless the handler parks; a deploy may turn
    /// parking on) — until `shutdown` turns true; each finishes the event
    /// in hand before it stops.
    pub fn spawn(
        self: &Arc<Self>,
        slot: Arc<HandlerSlot>,
        shutdown: watch::Receiver<bool>,
        workers: &mut JoinSet<()>,
    ) {
        workers.spawn(self.clone().serve_replays(slot.clone(), shutdown.clone()));
        workers.spawn(self.clone().drain_parked(slot.clone(), shutdown.clone()));
        for partition in 0..self.partitions {
            let dispatch = self.clone();
            let slot = slot.clone();
            let shutdown = shutdown.clone();
            workers.spawn(async move { dispatch.run_partition(slot, partition, shutdown).await });
        }
    }

    /// The consumer config of a handler's partition.
    pub fn consumer_config(
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::pull::Config, String> {
        Ok(consumer::pull::Config {
            durable_name: Some(manifest.consumer_name(partition)),
            description: Some(format!(
                "hookmesh handler {} partition {partition}",
                manifest.name
            )),
            filter_subject: partition_filter(&manifest.subject, partition)?,
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            max_deliver: manifest.max_deliver,
            ack_wait: manifest.ack_wait,
            // The ordering guarantee: one event of a partition in flight.
            max_ack_pending: 1,
            ..Default::default()
        })
    }

    /// Creates (or updates) a handler's partition consumer.
    pub async fn ensure_consumer(
        &self,
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::PullConsumer, DispatchError> {
        let nats = |what: String, e: &dyn std::fmt::Display| DispatchError::Nats {
            what,
            message: e.to_string(),
        };
        let config = Self::consumer_config(manifest, partition)
            .map_err(|e| nats(manifest.name.clone(), &e))?;
        let name = manifest.consumer_name(partition);
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| nats(EVENTS_STREAM.to_string(), &e))?;
        stream
            .create_consumer(config)
            .await
            .map_err(|e| nats(format!("consumer {name}"), &e))
    }

    /// A handler's partition consumer as it is on the server.
    async fn existing_consumer(
        &self,
        manifest: &Manifest,
        partition: u32,
    ) -> Result<consumer::PullConsumer, DispatchError> {
        let name = manifest.consumer_name(partition);
        let nats = |what: String, e: &dyn std::fmt::Display| DispatchError::Nats {
            what,
            message: e.to_string(),
        };
        self.js
            .get_stream_no_info(EVENTS_STREAM)
            .await
            .map_err(|e| nats(EVENTS_STREAM.to_string(), &e))?
            .get_consumer(&name)
            .await
            .map_err(|e| nats(format!("consumer {name}"), &e))
    }

    async fn run_partition(
        self: Arc<Self>,
        slot: Arc<HandlerSlot>,
        partition: u32,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut retry = Retry::default();
        let mut bound = false;
        while !*shutdown.borrow() {
            let manifest = slot.current().manifest.clone();
            // The consumer is made (or brought up to the manifest) once, when
            // the handler starts here; later a deploy's activation updates
            // it. Re-pulling only binds to it: a host still on an older
            // version must not write its config back, and a consumer deleted
            // on purpose (`handlers remove --delete-consumer`) must not come
            // back replaying the stream from the start.
            let consumer = if bound {
                self.existing_consumer(&manifest, partition).await
            } else {
                self.ensure_consumer(&manifest, partition).await
            };
            let consumer = match consumer {
                Ok(consumer) => {
                    bound = true;
                    consumer
                }
                Err(error) => {
                    warn!(handler = %manifest.name, partition, %error, retry_in = ?retry.delay(), "consumer not ready");
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            // A pull request stays outstanding at all times: nats-server
            // 2.9 only sends the MAX_DELIVERIES advisory of an ack timeout
            // while one is waiting. It asks for many messages although
            // `max_ack_pending = 1` lets only one through at a time: the
            // server then pushes the next event the moment the previous one
            // is acked, without a new pull request per event.
            let messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .expires(Duration::from_secs(30))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(error) => {
                    warn!(handler = %manifest.name, partition, %error, retry_in = ?retry.delay(), "cannot pull");
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            retry.reset();
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    next = messages.next() => match next {
                        Some(Ok(message)) => self.handle(&slot, message).await,
                        Some(Err(error)) => {
                            debug!(handler = %manifest.name, partition, %error, "pull interrupted");
                            break;
                        }
                        None => break,
                    },
                }
            }
            // A pull that keeps failing while NATS answers (a consumer
            // deleted by hand, say) must not spin: pause before re-pulling.
            retry.wait(&mut shutdown).await;
        }
    }

    /// Handles one delivery and settles it (ack, nak or term).
    async fn handle(&self, slot: &HandlerSlot, message: jetstream::Message) {
        // Waiting for a version being switched to must leave time to finish
        // well within ack_wait, or the server would hand the event out again.
        let prepared = slot.ready(slot.current().manifest.ack_wait / 3).await;
        let manifest = prepared.manifest.clone();
        let version = version_of(&prepared);
        let Ok(info) = message
            .info()
            .map(|i| (i.stream_sequence, i.delivered as u64))
        else {
            warn!(handler = %manifest.name, "delivery without JetStream metadata; terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        };
        let (stream_seq, delivery) = info;
        let input = match event::input(&message, delivery) {
            Ok(input) => input,
            Err(error) => {
                self.fail(
                    &manifest.name,
                    &version,
                    &message,
                    stream_seq,
                    delivery,
                    &error,
                    Reason::Permanent,
                )
                .await;
                if manifest.on_dead_letter == OnDeadLetter::Park
                    && let Err(error) =
                        park::hold(&self.attempts, &manifest.name, &message.subject, stream_seq)
                            .await
                {
                    warn!(%error, "could not park the entity; its later events go on");
                }
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let span = info_span!(
            "handle",
            handler = %manifest.name,
            version = %version,
            correlation_id = %input.correlation_id,
            subject = %input.subject,
            stream_seq,
            attempt = delivery,
        );
        async {
            if manifest.on_dead_letter == OnDeadLetter::Park {
                // A redelivery of an event queued behind a parked entity (its
                // ack was lost) that a drainer has run since: done already.
                if delivery > 1
                    && let Ok(Some(record)) = attempts::read(&self.attempts, &manifest.name, stream_seq).await
                    && record.resolved.as_deref() == Some("ran-after-park")
                {
                    debug!("ran while its entity was released; acked");
                    let _ = message.double_ack().await;
                    return;
                }
                match self.parked(&message, &manifest, &input.subject, stream_seq).await {
                    Some(park::Queued::Run) => {}
                    Some(park::Queued::Waiting) => {
                        info!("the entity is parked behind a dead letter; the event waits its turn");
                        if let Err(error) = message.double_ack().await {
                            warn!(%error, "ack not confirmed; the event is queued once all the same");
                        }
                        return;
                    }
                    Some(park::Queued::DeadLetter) => {
                        // Its settling was lost after the entity was parked
                        // behind it: terminate it now, so its dead letter is
                        // written.
                        let _ = message.ack_with(AckKind::Term).await;
                        return;
                    }
                    None => {
                        let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                        return;
                    }
                }
            }
            // The last delivery parks the entity before it runs: should the
            // host die in it, the delivery times out into a dead letter
            // with the entity already held behind it. Success lifts it.
            let last_delivery = delivery >= u64::try_from(manifest.max_deliver).unwrap_or(u64::MAX);
            let parks_first = last_delivery && manifest.on_dead_letter == OnDeadLetter::Park;
            if parks_first
                && let Err(error) = park::hold(&self.attempts, &manifest.name, &input.subject, stream_seq).await
            {
                warn!(%error, "could not park the entity ahead of the last delivery");
            }
            let subject = input.subject.clone();
            let execution = self.execute(&prepared, input);
            tokio::pin!(execution);
            // Tell the server the event is still being worked on, so a long
            // handler is not redelivered elsewhere meanwhile.
            let mut progress = tokio::time::interval(manifest.ack_wait / 3);
            progress.tick().await;
            let outcome = loop {
                tokio::select! {
                    outcome = &mut execution => break outcome,
                    _ = progress.tick() => { let _ = message.ack_with(AckKind::Progress).await; }
                }
            };
            let (reason, error) = match outcome {
                Ok(emits) => {
                    if parks_first {
                        self.lift_hold(&manifest.name, &subject, stream_seq).await;
                    }
                    if let Err(error) = message.double_ack().await {
                        // The handler ran; the server will redeliver and
                        // the handler must tolerate running twice.
                        warn!(%error, "ack not confirmed");
                    }
                    debug!(emits, "handled");
                    return;
                }
                Err(failure) => failure,
            };
            self.fail(&manifest.name, &version, &message, stream_seq, delivery, &error, reason)
                .await;
            let retries_left = delivery < u64::try_from(manifest.max_deliver).unwrap_or(u64::MAX);
            let last = matches!(reason, Reason::Permanent | Reason::NeedsHuman) || !retries_left;
            if last
                && manifest.on_dead_letter == OnDeadLetter::Park
                && let Err(error) = park::hold(&self.attempts, &manifest.name, &message.subject, stream_seq).await
            {
                warn!(%error, "could not park the entity; its later events go on");
            }
            let settle = match reason {
                Reason::Transient | Reason::Trap => {
                    let delay = manifest.backoff.delay(delivery);
                    if retries_left {
                        info!(%error, ?reason, retry_in = ?delay, "failed; will retry");
                    } else {
                        warn!(%error, ?reason, "failed on the last delivery; dead letter");
                    }
                    AckKind::Nak(Some(delay))
                }
                Reason::Permanent | Reason::NeedsHuman => {
                    warn!(%error, ?reason, "failed; dead letter");
                    AckKind::Term
                }
            };
            if let Err(error) = message.ack_with(settle).await {
                warn!(%error, "could not settle the delivery; the server redelivers after ack_wait");
            }
        }
        .instrument(span)
        .await;
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

    /// Whether the event waits behind a parked entity. A NATS failure is
    /// retried in place (with progress acks, so the delivery is neither
    /// redelivered nor counted) for up to half the ack wait; `None` when it
    /// still fails.
    async fn parked(
        &self,
        message: &jetstream::Message,
        manifest: &Manifest,
        subject: &str,
        stream_seq: u64,
    ) -> Option<park::Queued> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match park::enqueue_if_parked(&self.attempts, &manifest.name, subject, stream_seq).await
            {
                Ok(queued) => return Some(queued),
                Err(error) if started.elapsed() < manifest.ack_wait / 2 => {
                    debug!(%error, retry_in = ?pause, "cannot tell whether the entity is parked yet");
                    let _ = message.ack_with(AckKind::Progress).await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    warn!(%error, "cannot tell whether the entity is parked; the event comes back later");
                    return None;
                }
            }
        }
    }

    /// Runs one event on `prepared` and, when it succeeds, publishes its
    /// emits: `Ok(emits)` or the failure's class and message.
    async fn execute(
        &self,
        prepared: &Arc<Prepared>,
        input: EventInput,
    ) -> Result<usize, (Reason, String)> {
        let manifest = &prepared.manifest;
        let source = event::Source::of(&input);
        let invoked = self
            .runtime
            .invoke(prepared, input, self.services.clone())
            .await;
        self.metrics.invoked(
            &manifest.name,
            verdict_label(&invoked.verdict),
            invoked.elapsed,
        );
        match invoked.verdict {
            Verdict::Ok => event::publish_emits(
                &self.js,
                &manifest.name,
                &source,
                &invoked.emits,
                self.partitions,
            )
            .await
            .map(|()| invoked.emits.len())
            .map_err(|error| (Reason::Transient, error)),
            Verdict::Transient(error) => Err((Reason::Transient, error)),
            Verdict::Trap(error) => Err((Reason::Trap, error)),
            Verdict::Permanent(error) => Err((Reason::Permanent, error)),
            Verdict::NeedsHuman(error) => Err((Reason::NeedsHuman, error)),
        }
    }

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
    ) {
        let failure = attempts::Failure {
            handler,
            handler_version: version,
            stream_seq,
            subject: message.subject.as_str(),
            delivery,
            error,
            reason,
        };
        if let Err(e) = attempts::record(&self.attempts, failure).await {
            warn!(error = %e, "attempt not recorded");
        }
    }
}

/// The version label stamped on logs, attempt records and dead letters
/// (see [`Prepared::version`]).
pub fn version_of(prepared: &Prepared) -> String {
    prepared.version.clone()
}

fn verdict_label(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Ok => "ok",
        Verdict::Transient(_) => "transient",
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
) -> Result<Option<AttemptRecord>, String> {
    let bucket = js
        .get_key_value(ATTEMPTS_BUCKET)
        .await
        .map_err(|e| e.to_string())?;
    attempts::read(&bucket, handler, stream_seq).await
}
