//! The host side of `hookmesh dlq replay`: each handler a host runs answers
//! replay requests for its dead letters (see [`crate::dlq::replay`]).
//!
//! A replay runs the entry once on the handler's current version, with the
//! original event (or a fixed payload for this replay only):
//! - ok → emits published, entry deleted, attempt record cleared, the
//!   entity's parked events released;
//! - failure → the entry is replaced by one carrying the new error (the
//!   original payload kept), and the entity stays parked.
//!
//! Either way the replay is written to `HOOK_AUDIT`.

use std::sync::Arc;
use std::time::SystemTime;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::{Dispatch, HandlerSlot, Reason, event, version_of};
use crate::audit::{self, Action, AuditRecord, DeadLetterRef};
use crate::dlq::entry::{self, Failure};
use crate::dlq::replay::{self, ReplayAnswer, ReplayOutcome, ReplayRequest};
use crate::dlq::{DlqReason, store};
use crate::records::attempts;
use crate::records::park;
use crate::retry::Retry;

impl Dispatch {
    /// Answers replay requests for `slot`'s handler until `shutdown`.
    pub(super) async fn serve_replays(
        self: Arc<Self>,
        slot: Arc<HandlerSlot>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let handler = slot.current().manifest.name.clone();
        let client = self.js.client();
        let subject = replay::subject(&handler);
        let mut retry = Retry::default();
        while !*shutdown.borrow() {
            let mut requests = match client
                .queue_subscribe(subject.clone(), replay::QUEUE_GROUP.to_string())
                .await
            {
                Ok(requests) => requests,
                Err(error) => {
                    warn!(%handler, %error, retry_in = ?retry.delay(), "cannot listen for replays");
                    retry.pause(&mut shutdown).await;
                    continue;
                }
            };
            loop {
                tokio::select! {
                    _ = shutdown.changed() => {
                        let _ = requests.unsubscribe().await;
                        return;
                    }
                    next = requests.next() => {
                        let Some(message) = next else { break };
                        let answer = match ReplayRequest::from_message(&message) {
                            Ok(request) => self.replay(&slot, request).await,
                            Err(error) => ReplayAnswer::Refused(format!("malformed replay request: {error}")),
                        };
                        if let Some(reply) = message.reply {
                            let body = serde_json::to_vec(&answer).unwrap_or_default();
                            if let Err(error) = client.publish(reply, body.into()).await {
                                warn!(%handler, %error, "replay answer not sent");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Replays one entry and settles it, holding the entry's claim
    /// meanwhile so no other replay or purge works on it at once.
    async fn replay(&self, slot: &HandlerSlot, request: ReplayRequest) -> ReplayAnswer {
        let who = format!("a replay by {} on {}", request.actor, self.host_id);
        if let Err(error) = store::claim(&self.attempts, request.dlq_seq, &who).await {
            return ReplayAnswer::Refused(error.to_string());
        }
        let answer = self.replay_claimed(slot, &request).await;
        store::unclaim(&self.attempts, request.dlq_seq).await;
        answer
    }

    async fn replay_claimed(&self, slot: &HandlerSlot, request: &ReplayRequest) -> ReplayAnswer {
        let prepared = slot.ready(|current| current.timeout * 4).await;
        let manifest = prepared.manifest.clone();
        let version = version_of(&prepared);
        let dead = match store::get(&self.js, request.dlq_seq).await {
            Ok(dead) => dead,
            Err(error) => return ReplayAnswer::Refused(error.to_string()),
        };
        if dead.handler != manifest.name {
            return ReplayAnswer::Refused(format!(
                "dead letter {} belongs to handler {:?}, not {:?}",
                dead.dlq_seq, dead.handler, manifest.name
            ));
        }
        let payload_changed = request.payload.is_some();
        let original = dead.original(request.payload.clone());
        let attempt = dead.attempts + 1;
        let input = match event::input_from(
            &original.subject,
            Some(&original.headers),
            &original.payload,
            original.stream_seq,
            attempt,
        ) {
            Ok(input) => input,
            Err(error) => return ReplayAnswer::Refused(error.to_string()),
        };
        let span = info_span!(
            "replay",
            handler = %manifest.name,
            version = %version,
            correlation_id = %input.correlation_id(),
            subject = %original.subject,
            stream_seq = dead.stream_seq,
            dlq_seq = dead.dlq_seq,
            actor = %request.actor,
            trace_id = tracing::field::Empty,
        );
        async {
            let outcome = self.execute(&prepared, input.as_event(), dead.stream_seq, true).await;
            let mut record = AuditRecord::new(
                Action::Replay,
                &request.actor,
                &manifest.name,
                if outcome.is_ok() { "ok" } else { "failed" },
            );
            record.version = Some(version.clone());
            record.payload_changed = Some(payload_changed);
            record.entries = vec![DeadLetterRef {
                dlq_seq: dead.dlq_seq,
                stream_seq: dead.stream_seq,
                subject: dead.subject.clone(),
            }];
            let mut answer = ReplayOutcome {
                dlq_seq: dead.dlq_seq,
                ok: outcome.is_ok(),
                version: version.clone(),
                error: None,
                new_dlq_seq: None,
                released: false,
            };
            match outcome {
                Ok(emits) => {
                    info!(emits, "replayed");
                    // Resolved before deleted: an advisory read again in
                    // between must find it resolved.
                    if let Err(error) = attempts::resolve(&self.attempts, &manifest.name, dead.stream_seq, &dead.subject, "replayed").await {
                        warn!(%error, "not marked replayed: a re-processed advisory could make the entry again");
                    }
                    if let Err(error) = store::delete(&self.js, dead.dlq_seq).await {
                        warn!(%error, "replayed, but the entry could not be deleted");
                    }
                    // Also when the handler no longer parks: events parked
                    // before a deploy turned parking off still wait.
                    match park::release(&self.attempts, &manifest.name, &dead.subject, dead.stream_seq).await {
                        Ok(released) => answer.released = released,
                        Err(error) => warn!(%error, "the entity's parked events were not released"),
                    }
                }
                Err(super::Failed { reason, error, .. }) => {
                    warn!(%error, ?reason, "replay failed; the dead letter stays");
                    let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
                    let failure = Failure {
                        handler: manifest.name.clone(),
                        handler_version: version.clone(),
                        reason: dlq_reason(reason),
                        error: error.clone(),
                        attempts: attempt,
                        first_failure: dead.first_failure.clone(),
                        last_failure: now,
                    };
                    let msg_id = format!("{}:{}:replay:{}", manifest.name, dead.stream_seq, dead.dlq_seq);
                    match entry::publish(&self.js, &dead.original(None), &failure, &msg_id).await {
                        Ok(stored) => {
                            answer.new_dlq_seq = Some(stored.seq);
                            if let Err(e) = store::delete(&self.js, dead.dlq_seq).await {
                                warn!(error = %e, "the replaced entry could not be deleted");
                            }
                        }
                        Err(e) => warn!(error = %e, "the new error could not be stored; the entry keeps the old one"),
                    }
                    record.error = Some(error.clone());
                    answer.error = Some(error);
                }
            }
            if let Err(error) = audit::write(&self.js, &record).await {
                warn!(%error, "replay not audited");
            }
            ReplayAnswer::Done(answer)
        }
        .instrument(span)
        .await
    }
}

/// The dead-letter reason of a failure that ends a replay or a drain: the
/// event had its one (or last) attempt.
pub(super) fn dlq_reason(reason: Reason) -> DlqReason {
    match reason {
        Reason::Transient => DlqReason::MaxDeliveries,
        Reason::Trap => DlqReason::Trap,
        Reason::Permanent => DlqReason::Permanent,
        Reason::NeedsHuman => DlqReason::NeedsHuman,
    }
}
