//! Releasing parked entities: once no dead letter holds a parked entity
//! (replayed or purged), one host takes a lease on its park record and
//! runs the waiting events in stream order, each with the handler's usual
//! retries; an event that fails for good becomes a dead letter and parks
//! the entity again. See [`crate::dlq::park`].
//!
//! Every host running a parking handler watches that handler's park
//! records, so a release made anywhere — a replay on another host, a purge
//! from the CLI — is picked up; the lease (renewed after each event) keeps
//! two hosts from running the same entity, and an abandoned lease expires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::replay::dlq_reason;
use super::{Dispatch, HandlerSlot, Reason, attempts, event, version_of};
use crate::dlq::entry::{self, Original};
use crate::dlq::park::{self, ParkRecord};
use crate::dlq::writer;
use crate::extract::kv_key;
use crate::retry::Retry;
use crate::runtime::Prepared;
use crate::streams::EVENTS_STREAM;

/// How often leases are looked at again (an abandoned one expires).
const RECHECK: Duration = Duration::from_secs(2);

/// How running one waiting event ended.
enum Ran {
    /// It succeeded.
    Handled,
    /// It failed for good and is a dead letter now.
    DeadLetter,
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
                    _ = shutdown.changed() => return,
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
                let ready: Vec<String> = known
                    .iter()
                    .filter(|(_, record)| record.drainable(now))
                    .map(|(key, _)| key.clone())
                    .collect();
                for key in ready {
                    if *shutdown.borrow() {
                        return;
                    }
                    self.drain(&slot, &key, &holder, &shutdown).await;
                }
            }
        }
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
            let prepared = slot.ready(lease / 3).await;
            // The lease is renewed while the event runs (its retries may
            // take far longer than one lease); losing it stops this run.
            let run = self.run_parked(&prepared, stream_seq, shutdown);
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
                Ran::Handled | Ran::Gone => {
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
        let max = u64::try_from(manifest.max_deliver).unwrap_or(1).max(1);
        for attempt in 1..=max {
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
                        .dead_letter(prepared, &original, attempt, Reason::Permanent, &error)
                        .await;
                }
            };
            let span = info_span!(
                "handle_parked",
                handler = %manifest.name,
                version = %version,
                correlation_id = %input.correlation_id,
                subject = %original.subject,
                stream_seq,
                attempt,
            );
            let outcome = self.execute(prepared, input).instrument(span.clone()).await;
            let _entered = span.enter();
            let (reason, error) = match outcome {
                Ok(emits) => {
                    info!(
                        emits,
                        "handled after the dead letter ahead of it was resolved"
                    );
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
                        warn!(%error, "not marked as run");
                    }
                    return Ran::Handled;
                }
                Err(failure) => failure,
            };
            let last = attempt == max || matches!(reason, Reason::Permanent | Reason::NeedsHuman);
            if last {
                drop(_entered);
                return self
                    .dead_letter(prepared, &original, attempt, reason, &error)
                    .await;
            }
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
                warn!(error = %e, "attempt not recorded");
            }
            let delay = manifest.backoff.delay(attempt);
            info!(%error, ?reason, retry_in = ?delay, "failed; will retry");
            let mut stop = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return Ran::Interrupted,
            }
        }
        Ran::Interrupted
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
