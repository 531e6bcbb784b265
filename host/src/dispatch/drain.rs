//! Running held entities again: once nothing holds an entity any more — its
//! backoff is over, or the dead letter it was parked behind was replayed
//! or purged — one host takes a lease on its record and runs the waiting
//! events in stream order, each with the handler's usual retries (a long
//! backoff holds the entity again, its lease given up); an event that fails
//! for good becomes a dead letter and, for a parking handler, parks the
//! entity again. See [`crate::records::park`].
//!
//! Every host running a handler watches that handler's records, so a
//! release made anywhere — a replay on another host, a purge from the CLI,
//! a backoff that ran out — is picked up; the lease (renewed while an event
//! runs) keeps two hosts from running the same entity, and an abandoned
//! lease expires. Entities drain concurrently, within the handler's
//! `concurrency`.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::ownership::now_ms;
use super::replay::dlq_reason;
use super::settle::{Outcome, Policy, Settle};
use super::{Dispatch, Failed, HandlerSlot, Reason, event, version_of};
use crate::dlq::entry::{self, Original};
use crate::dlq::writer;
use crate::extract::kv_key;
use crate::records::attempts;
use crate::records::park::{self, ParkRecord};
use crate::retry::Retry;
use crate::runtime::Prepared;
use crate::streams::EVENTS_STREAM;

/// How often records are looked at again (a backoff ran out, an abandoned
/// lease expired).
const RECHECK: Duration = Duration::from_millis(500);

/// How running one waiting event ended.
enum Ran {
    /// It succeeded.
    Handled,
    /// It failed for good and is a dead letter now; the entity stays
    /// parked behind it.
    DeadLetter,
    /// It failed for good and is a dead letter now; the entity goes on
    /// (`on_dead_letter = "continue"`).
    DeadLetterGoOn,
    /// It waits out a long backoff until then (Unix milliseconds).
    Deferred(u64),
    /// It is gone from `HOOK_EVENTS` (aged out).
    Gone,
    /// The host is stopping, or NATS failed; try again later.
    Interrupted,
}

impl Dispatch {
    /// Watches `slot`'s park records and drains the released ones until
    /// `shutdown`.
    pub(super) async fn drain_parked(
        self: Arc<Self>,
        slot: Arc<HandlerSlot>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let handler = slot.current().manifest.name.clone();
        let filter = format!("{}.{}.>", park::PREFIX, kv_key(&handler));
        // Each drainer its own lease holder: a handler removed and deployed
        // again quickly may have two on this host for a moment.
        let holder = format!("{}:{}", self.host_id, uuid::Uuid::now_v7().simple());
        let mut retry = Retry::default();
        // Entities being drained here (each by its own task).
        let draining: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut drains = tokio::task::JoinSet::new();
        while !*shutdown.borrow() {
            let mut records = match self.attempts.watch_with_history(&filter).await {
                Ok(records) => records,
                Err(error) => {
                    warn!(%handler, %error, retry_in = ?retry.delay(), "cannot watch park records");
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            retry.reset();
            let mut known: BTreeMap<String, ParkRecord> = BTreeMap::new();
            let mut recheck = tokio::time::interval(RECHECK);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    next = records.next() => {
                        let Some(Ok(entry)) = next else {
                            // Interrupted: watch again, after a pause.
                            retry.wait(&mut shutdown).await;
                            break;
                        };
                        match entry.operation {
                            Operation::Put => match serde_json::from_slice::<ParkRecord>(&entry.value) {
                                Ok(record) => { known.insert(entry.key, record); }
                                Err(error) => warn!(key = %entry.key, %error, "unreadable park record"),
                            },
                            Operation::Delete | Operation::Purge => { known.remove(&entry.key); }
                        }
                    }
                    _ = recheck.tick() => {}
                }
                let now = SystemTime::now();
                let ready: Vec<String> = {
                    let draining = draining.lock().unwrap_or_else(|e| e.into_inner());
                    known
                        .iter()
                        .filter(|(key, record)| record.drainable(now) && !draining.contains(*key))
                        .map(|(key, _)| key.clone())
                        .collect()
                };
                for key in ready {
                    if *shutdown.borrow() {
                        return;
                    }
                    draining
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key.clone());
                    let dispatch = self.clone();
                    let slot = slot.clone();
                    let holder = holder.clone();
                    let stop = shutdown.clone();
                    let draining = draining.clone();
                    drains.spawn(async move {
                        dispatch.drain(&slot, &key, &holder, &stop).await;
                        draining
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                    });
                }
                while drains.try_join_next().is_some() {}
            }
        }
        while drains.join_next().await.is_some() {}
    }

    /// Runs the waiting events of one released entity, holding its lease.
    async fn drain(
        &self,
        slot: &HandlerSlot,
        key: &str,
        holder: &str,
        shutdown: &watch::Receiver<bool>,
    ) {
        let manifest = slot.current().manifest.clone();
        let lease = (manifest.timeout * 4).max(Duration::from_secs(30));
        let mut record = match park::take_lease(&self.attempts, key, holder, lease).await {
            Ok(Some(record)) => record,
            Ok(None) => return,
            Err(error) => {
                warn!(%key, %error, "cannot take the park lease");
                return;
            }
        };
        info!(handler = %manifest.name, %key, waiting = record.waiting.len(), "dead letter resolved; running the entity's parked events");
        while let Some(&stream_seq) = record.waiting.first() {
            if *shutdown.borrow() {
                let _ = park::give_up_lease(&self.attempts, key, holder).await;
                return;
            }
            let prepared = slot.ready(|_| lease / 3).await;
            // The lease is renewed while the event runs (its retries may
            // take far longer than one lease); losing it stops this run.
            let run = self.run_parked(slot, &prepared, stream_seq, shutdown);
            tokio::pin!(run);
            let mut renew = tokio::time::interval(lease / 3);
            renew.tick().await;
            let ran = loop {
                tokio::select! {
                    ran = &mut run => break ran,
                    _ = renew.tick() => {
                        if let Ok(false) = park::renew(&self.attempts, key, holder, lease).await {
                            warn!(%key, "the park lease went to another host; leaving the entity to it");
                            return;
                        }
                    }
                }
            };
            match ran {
                Ran::Handled | Ran::Gone | Ran::DeadLetterGoOn => {
                    match park::finished(&self.attempts, key, holder, stream_seq, lease).await {
                        Ok(Some(next)) => record = next,
                        Ok(None) => return,
                        Err(error) => {
                            warn!(%key, %error, "park record not updated; the lease expires and the event runs again");
                            return;
                        }
                    }
                }
                Ran::DeadLetter => {
                    if let Err(error) = park::failed(&self.attempts, key, holder, stream_seq).await
                    {
                        warn!(%key, %error, "park record not updated after a dead letter");
                    }
                    return;
                }
                Ran::Deferred(retry_at) => {
                    if let Err(error) = park::defer(&self.attempts, key, holder, retry_at).await {
                        warn!(%key, %error, "backoff not recorded; the lease expires and the event runs again");
                    }
                    return;
                }
                Ran::Interrupted => {
                    let _ = park::give_up_lease(&self.attempts, key, holder).await;
                    return;
                }
            }
        }
    }

    /// Runs the stored event `stream_seq` with the manifest's retries.
    async fn run_parked(
        &self,
        slot: &HandlerSlot,
        prepared: &Arc<Prepared>,
        stream_seq: u64,
        shutdown: &watch::Receiver<bool>,
    ) -> Ran {
        let manifest = &prepared.manifest;
        let version = version_of(prepared);
        let original = match self.js.get_stream_no_info(EVENTS_STREAM).await {
            Ok(events) => match events.get_raw_message(stream_seq).await {
                Ok(message) => Original::from(message),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                    warn!(handler = %manifest.name, stream_seq, "a parked event is gone from HOOK_EVENTS (max age); skipped");
                    return Ran::Gone;
                }
                Err(error) => {
                    warn!(%error, "cannot read a parked event");
                    return Ran::Interrupted;
                }
            },
            Err(error) => {
                warn!(%error, "cannot read a parked event");
                return Ran::Interrupted;
            }
        };
        let policy = Policy {
            max_attempts: u64::try_from(manifest.max_deliver).unwrap_or(1).max(1),
            backoff: &manifest.backoff,
            on_dead_letter: manifest.on_dead_letter,
        };
        // Attempts made before the entity was held count (a long backoff
        // held it); a dead letter that was replayed starts afresh.
        let mut attempt = match attempts::read(&self.attempts, &manifest.name, stream_seq).await {
            Ok(Some(record)) if record.resolved.is_none() => record.attempts + 1,
            _ => 1,
        };
        loop {
            let input = match event::input_from(
                &original.subject,
                Some(&original.headers),
                &original.payload,
                stream_seq,
                attempt,
            ) {
                Ok(input) => input,
                Err(error) => {
                    return self
                        .dead_letter(
                            prepared,
                            &original,
                            attempt,
                            Reason::Permanent,
                            &error.to_string(),
                        )
                        .await;
                }
            };
            let span = info_span!(
                "handle_held",
                handler = %manifest.name,
                version = %version,
                correlation_id = %input.correlation_id(),
                subject = %original.subject,
                stream_seq,
                attempt,
                trace_id = tracing::field::Empty,
            );
            let permit = slot.permit().await;
            let outcome = self
                // A held event may have run before (its entity was held
                // after a failure, or its run's ack was lost).
                .execute(prepared, input.as_event(), stream_seq, true)
                .instrument(span.clone())
                .await;
            drop(permit);
            let Failed {
                reason,
                error,
                retry_after,
            } = match outcome {
                Ok(emits) => {
                    info!(parent: &span, emits, "handled after what held its entity was over");
                    // Its delivery was acked when it was queued; should that
                    // ack have been lost, the redelivery must not run it again.
                    if let Err(error) = attempts::resolve(
                        &self.attempts,
                        &manifest.name,
                        stream_seq,
                        &original.subject,
                        "ran-after-park",
                    )
                    .await
                    {
                        warn!(parent: &span, %error, "not marked as run");
                    }
                    return Ran::Handled;
                }
                Err(failure) => failure,
            };
            let outcome = Outcome::Failed {
                reason,
                retry_after,
            };
            let (delay, held) = match policy.decide(attempt, &outcome) {
                Settle::DeadLetter { park } => {
                    let ran = self
                        .dead_letter(prepared, &original, attempt, reason, &error)
                        .await;
                    return match ran {
                        Ran::DeadLetter if !park => Ran::DeadLetterGoOn,
                        other => other,
                    };
                }
                Settle::Ack => return Ran::Handled,
                Settle::RetryHere { delay } => (delay, false),
                Settle::Hold { delay } => (delay, true),
            };
            let failure = attempts::Failure {
                handler: &manifest.name,
                handler_version: &version,
                stream_seq,
                subject: &original.subject,
                delivery: attempt,
                error: &error,
                reason,
            };
            if let Err(e) = attempts::record(&self.attempts, failure).await {
                warn!(parent: &span, error = %e, "attempt not recorded");
            }
            if held {
                info!(parent: &span, %error, ?reason, retry_in = ?delay, "failed; the entity waits out the backoff");
                return Ran::Deferred(
                    now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                );
            }
            info!(parent: &span, %error, ?reason, retry_in = ?delay, "failed; will retry");
            let mut stop = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return Ran::Interrupted,
            }
            attempt += 1;
        }
    }

    /// Records the last failure of a parked event and stores its dead letter.
    async fn dead_letter(
        &self,
        prepared: &Prepared,
        original: &Original,
        attempt: u64,
        reason: Reason,
        error: &str,
    ) -> Ran {
        let manifest = &prepared.manifest;
        let version = version_of(prepared);
        let failure = attempts::Failure {
            handler: &manifest.name,
            handler_version: &version,
            stream_seq: original.stream_seq,
            subject: &original.subject,
            delivery: attempt,
            error,
            reason,
        };
        let record = match attempts::record(&self.attempts, failure).await {
            Ok(record) => Some(record),
            Err(e) => {
                warn!(error = %e, "attempt not recorded");
                None
            }
        };
        let reason = dlq_reason(reason);
        let failure = writer::failure(&manifest.name, reason, record, attempt);
        let msg_id = format!("{}:{}", manifest.name, original.stream_seq);
        match entry::publish(&self.js, original, &failure, &msg_id).await {
            Ok(stored) => {
                warn!(handler = %manifest.name, stream_seq = original.stream_seq, dlq_seq = stored.seq, %reason, %error, "parked event failed; dead letter");
                if !stored.duplicate {
                    self.metrics.dead_lettered(&manifest.name, reason.as_str());
                }
                Ran::DeadLetter
            }
            Err(e) => {
                warn!(error = %e, "dead letter not stored; the event waits and runs again");
                Ran::Interrupted
            }
        }
    }
}
