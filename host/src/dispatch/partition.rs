//! The owner of one handler partition: pulls a window of events, runs
//! them concurrently across entities and one at a time per entity
//! ([`EntityQueues`]), and settles each by the [`settle`](super::settle)
//! policy.
//!
//! An event's task runs the handler, retries short waits in hand (its
//! delivery kept alive with progress acks), and holds the entity for long
//! ones: the entity's events are then acked and wait as sequences in its
//! hold record (see [`crate::records::park`]) for the drainer. Later events of
//! a held entity join that record, so the window only ever holds events
//! that can run soon.
//!
//! When the partition is handed over (or the lease lapses), the owner
//! stops starting events, lets the running ones finish, and returns every
//! other event to the server oldest first, with a nak the server confirms.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tracing::{Instrument, debug, info, info_span, warn};

use super::ownership::{Fence, now_ms};
use super::pull::{Pulled, Puller};
use super::recount::{self, Recount};
use super::scheduler::EntityQueues;
use super::settle::{Outcome, Policy, Settle};
use super::{Dispatch, Failed, HandlerSlot, Reason, event, version_of};
use crate::manifest::{Manifest, OnDeadLetter};
use crate::records::attempts;
use crate::records::park;
use crate::retry::Retry;

/// Events asked for per pull request at most.
const PULL_MAX: usize = 256;

/// How long a pull request waits for events.
const PULL_EXPIRES: Duration = Duration::from_secs(2);

/// While less than half the window is free, the owner waits this long after
/// its last pull ended before it asks for what is free: pulls of a handful
/// of events would cost the server a request each, and a few milliseconds
/// is what an event spends waiting for its turn under load anyway.
const TOP_UP_AFTER: Duration = Duration::from_millis(20);

/// How long an owner with nothing to wait for but its fence sleeps before
/// it looks again.
const IDLE_GUARD: Duration = Duration::from_millis(50);

/// Entities remembered as not held, per partition; past it the memory is
/// dropped (and rebuilt, one KV read per entity).
const CLEAR_MEMORY: usize = 100_000;

/// The events of a partition a host keeps unacked at most: the consumer's
/// `max_ack_pending`.
pub fn window(manifest: &Manifest) -> i64 {
    i64::from(manifest.concurrency.saturating_mul(2)).clamp(64, 4096)
}

/// Whether the owner asks the server for more events now: when half the
/// window is free (one request brings many events), or when some of it has
/// been free for [`TOP_UP_AFTER`] since the last pull ended (events waiting
/// behind slow entities must not keep other entities from arriving).
fn should_pull(room: usize, window: usize, since_last_pull: Duration) -> bool {
    room > 0 && (room * 2 >= window || since_last_pull >= TOP_UP_AFTER)
}

/// How an event's task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Acked or terminated; the entity goes on.
    Settled,
    /// The entity is held (backoff or parked); its later events join its
    /// record.
    Held,
    /// To be returned to the server (handover).
    Returned,
}

/// A finished task.
struct Done {
    entity: String,
    end: End,
    /// The event itself, when it goes back to the server (handover): the
    /// owner returns it with the others, in order.
    returned: Option<jetstream::Message>,
}

/// What the events of one partition share.
struct Shared {
    dispatch: Arc<Dispatch>,
    slot: Arc<HandlerSlot>,
    fence: Arc<Fence>,
}

impl Dispatch {
    /// Works `partition` of `slot`'s handler from `start_at` until the
    /// fence is lost, then hands its events back.
    pub(super) async fn work_partition(
        self: Arc<Self>,
        slot: Arc<HandlerSlot>,
        partition: u32,
        fence: Arc<Fence>,
        start_at: tokio::time::Instant,
    ) {
        tokio::select! {
            _ = tokio::time::sleep_until(start_at) => {}
            _ = fence.lost() => return fence.mark_returned_all(),
        }
        let shared = Arc::new(Shared {
            dispatch: self.clone(),
            slot: slot.clone(),
            fence: fence.clone(),
        });
        let mut retry = Retry::default();
        let (consumer, mut puller) = loop {
            let manifest = slot.current().manifest.clone();
            match self.bind_puller(&manifest, partition).await {
                Ok(bound) => break bound,
                Err(error) => {
                    warn!(handler = %manifest.name, partition, %error, retry_in = ?retry.delay(), "consumer not ready");
                    tokio::select! {
                        _ = tokio::time::sleep(retry.delay()) => retry.grow(),
                        _ = fence.lost() => return fence.mark_returned_all(),
                    }
                }
            }
        };
        retry.reset();
        let handler = slot.current().manifest.name.clone();
        let mut queues: EntityQueues<jetstream::Message> = EntityQueues::default();
        // The partition's running events are futures this loop polls, not
        // tasks: no spawn and no cross-thread wake per event, and the
        // partitions of all handlers keep the cores busy.
        let mut tasks = FuturesUnordered::new();
        let mut clear: HashSet<String> = HashSet::new();
        let mut returned: Vec<jetstream::Message> = Vec::new();
        let mut progress = tokio::time::interval(slot.current().manifest.ack_wait / 3);
        progress.tick().await;
        // One future for the life of the loop, not a new watch and timer
        // per event.
        let lost = fence.lost();
        tokio::pin!(lost);
        debug!(%handler, partition, "working the partition");
        let mut last_pull_ended = tokio::time::Instant::now();
        // Deliveries may be out there (a previous holder's, a lost pull's):
        // nothing starts until the server's count agrees with ours. Binding
        // read the consumer's info after the lease was taken: that count
        // decides whether to ask again.
        let mut recount = Recount::at_start(consumer.cached_info().num_ack_pending);
        // An event pulled (or released by the recount) starts when its
        // entity is idle, else waits behind the entity's running one.
        macro_rules! admit {
            ($message:expr) => {{
                let message: jetstream::Message = $message;
                let entity = entity_of(&message.subject);
                let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                if let Some(message) = queues.offer(&entity, seq, message) {
                    let check = !clear.contains(&entity);
                    tasks.push(run_event(shared.clone(), message, entity, check));
                }
            }};
        }
        // One timer for the loop's own deadlines (a recount, a top-up, the
        // idle guard), moved only when the earliest one changes: a timer
        // made per turn of the loop would cost every event.
        let mut wake_at = tokio::time::Instant::now() + IDLE_GUARD;
        let wake = tokio::time::sleep_until(wake_at);
        tokio::pin!(wake);
        loop {
            let manifest = slot.current().manifest.clone();
            let window = usize::try_from(window(&manifest)).unwrap_or(64);
            let mut room = window.saturating_sub(tasks.len() + queues.waiting() + recount.held());
            if recount.active() && recount.held() < window * 4 {
                // Lost deliveries come back only to a pull (ahead of newer
                // events): keep pulling while holding back.
                room = room.max(recount::PULL);
            }
            // A recount that is due counts before the next pull.
            let pull = !puller.is_open()
                && fence.holds()
                && !recount.due_now()
                && should_pull(room, window, last_pull_ended.elapsed());
            if pull {
                match puller.request(room.min(PULL_MAX), PULL_EXPIRES).await {
                    Ok(()) => retry.reset(),
                    Err(error) => {
                        warn!(%handler, partition, %error, retry_in = ?retry.delay(), "cannot pull");
                        tokio::select! {
                            _ = tokio::time::sleep(retry.delay()) => retry.grow(),
                            _ = &mut lost => break,
                        }
                    }
                }
            }
            // A recount counts between pulls: every delivery of the last
            // one is in hand by then.
            let recount_between_pulls = recount.active() && !puller.is_open();
            // With room free but no pull yet, look again when a top-up is
            // due; with none free, a finishing task wakes the loop.
            let wait_for_top_up = !puller.is_open() && room > 0;
            // Nothing to wait for but the fence (a partition with no events
            // in flight and none free is impossible; kept as a guard
            // against a busy loop).
            let idle = !puller.is_open() && !wait_for_top_up && tasks.is_empty();
            let deadline = [
                recount_between_pulls.then(|| recount.next_check()),
                wait_for_top_up.then_some(last_pull_ended + TOP_UP_AFTER),
                idle.then(|| tokio::time::Instant::now() + IDLE_GUARD),
            ]
            .into_iter()
            .flatten()
            .min();
            if let Some(at) = deadline
                && at != wake_at
            {
                wake_at = at;
                wake.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                _ = &mut lost => break,
                Some(done) = tasks.next(), if !tasks.is_empty() => {
                    let mut done: Done = done;
                    if let Some(message) = done.returned.take() {
                        returned.push(message);
                        continue;
                    }
                    if let Some((entity, next)) = finished(done, &mut queues, &mut clear) {
                        // A held entity's next events join its record one
                        // by one.
                        let check = !clear.contains(&entity);
                        tasks.push(run_event(shared.clone(), next, entity, check));
                    }
                }
                // Polled with no request open too: a delivery to a request
                // the owner gave up on still arrives.
                next = puller.next() => match next {
                    Pulled::Message(message) => {
                        if recount.active() {
                            let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                            recount.hold(seq, message);
                        } else {
                            admit!(message);
                        }
                    }
                    Pulled::Ended => last_pull_ended = tokio::time::Instant::now(),
                    Pulled::Failed(error) => {
                        debug!(%handler, partition, %error, "pull interrupted");
                        last_pull_ended = tokio::time::Instant::now();
                        recount.start();
                    }
                    Pulled::Forgotten => {
                        debug!(%handler, partition, "pull request forgotten by the server");
                        last_pull_ended = tokio::time::Instant::now();
                        recount.start();
                    }
                },
                _ = &mut wake, if deadline.is_some() => {
                    if recount_between_pulls && recount.due_now() {
                        let in_hand = tasks.len() + queues.waiting();
                        let released = recount
                            .check(&consumer, &self.js.client(), in_hand, manifest.ack_wait, &handler, partition)
                            .await;
                        for message in released.into_iter().flatten() {
                            admit!(message);
                        }
                    }
                }
                _ = progress.tick() => {
                    // Waiting events stay ours while their entity is busy.
                    if fence.holds() {
                        for message in queues.iter_waiting() {
                            let _ = message.ack_with(AckKind::Progress).await;
                        }
                        recount.keep_alive().await;
                    }
                }
            }
        }
        returned.extend(recount.take());
        let max_deliver = slot.current().manifest.max_deliver;
        let returned_all = self
            .hand_back(
                &handler,
                partition,
                tasks,
                queues,
                puller,
                returned,
                max_deliver,
            )
            .await;
        if returned_all {
            fence.mark_returned_all();
        }
    }

    /// The partition is no longer this host's: running events finish,
    /// every other one goes back to the server in stream order — after the
    /// open pull request has ended, so none comes straight back to it.
    /// `true` when the server confirmed every return and read every ack.
    #[allow(clippy::too_many_arguments)]
    async fn hand_back(
        &self,
        handler: &str,
        partition: u32,
        mut tasks: FuturesUnordered<impl Future<Output = Done>>,
        mut queues: EntityQueues<jetstream::Message>,
        mut puller: Puller,
        mut back: Vec<jetstream::Message>,
        max_deliver: i64,
    ) -> bool {
        // A pull request still open may deliver more: kept, not started.
        let mut late = 0;
        while puller.is_open() {
            match tokio::time::timeout(PULL_EXPIRES * 2, puller.next()).await {
                Ok(Pulled::Message(message)) => {
                    back.push(message);
                    late += 1;
                }
                Ok(_) | Err(_) => break,
            }
        }
        // Deliveries to requests given up on that have already arrived go
        // back with the rest, not astray with the inbox.
        while let Some(Pulled::Message(message)) = puller.next().now_or_never() {
            back.push(message);
            late += 1;
        }
        while let Some(done) = tasks.next().await {
            if let Some(message) = done.returned {
                back.push(message);
            }
        }
        back.extend(queues.take_all().into_iter().map(|(_, m)| m));
        back.sort_by_key(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0));
        // A nak counts as a delivery: an event the server would give up on
        // after one more is not returned but held, with its entity's other
        // events, for the drainer (in order, on whichever host).
        let at_risk: HashSet<String> = back
            .iter()
            .filter(|m| m.info().is_ok_and(|i| i.delivered >= max_deliver))
            .map(|m| entity_of(&m.subject))
            .collect();
        let (mut returned, mut held, mut unconfirmed) = (0, 0, 0);
        for message in &back {
            if at_risk.contains(&entity_of(&message.subject)) && self.rehome(handler, message).await
            {
                held += 1;
            } else {
                if !self.give_back(message).await {
                    unconfirmed += 1;
                }
                returned += 1;
            }
        }
        // The plain acks of the events that ran are written out and read by
        // the server before the lease goes (a flush waits for the server's
        // PONG, sent after everything before it on the connection).
        let flushed = match self.js.client().flush().await {
            Ok(()) => true,
            Err(error) => {
                warn!(%handler, partition, %error, "acks not flushed; unacked events come back after ack_wait");
                false
            }
        };
        info!(%handler, partition, returned, unconfirmed, held, late, "partition released");
        flushed && unconfirmed == 0
    }

    /// Moves a delivery into its entity's hold record (due at once) and
    /// acks it; `false` when the record could not be written.
    async fn rehome(&self, handler: &str, message: &jetstream::Message) -> bool {
        let Ok(seq) = message.info().map(|i| i.stream_sequence) else {
            return false;
        };
        match park::hold_for_retry(&self.attempts, handler, &message.subject, seq, now_ms()).await {
            Ok(()) => {
                let _ = message.double_ack().await;
                true
            }
            Err(error) => {
                warn!(%handler, stream_seq = seq, %error, "could not hold the event; it goes back to the server");
                false
            }
        }
    }

    /// Returns a delivery to the server for immediate redelivery, waiting
    /// for the server to confirm it; `false` when it did not (a plain nak
    /// is sent all the same, and the event comes back after `ack_wait` at
    /// the latest).
    pub(super) async fn give_back(&self, message: &jetstream::Message) -> bool {
        if let Some(reply) = &message.reply {
            let confirmed = tokio::time::timeout(
                Duration::from_secs(2),
                self.js.client().request(reply.clone(), "-NAK".into()),
            )
            .await;
            if matches!(confirmed, Ok(Ok(_))) {
                return true;
            }
        }
        let _ = message.ack_with(AckKind::Nak(None)).await;
        false
    }
}

/// Settles the bookkeeping of a finished event: the entity's next event,
/// which runs from now on, or `None` when the entity is idle.
fn finished(
    done: Done,
    queues: &mut EntityQueues<jetstream::Message>,
    clear: &mut HashSet<String>,
) -> Option<(String, jetstream::Message)> {
    let Done { entity, end, .. } = done;
    match end {
        End::Held => {
            clear.remove(&entity);
        }
        End::Settled => {
            if clear.len() >= CLEAR_MEMORY {
                clear.clear();
            }
            clear.insert(entity.clone());
        }
        End::Returned => {}
    }
    queues.finish(&entity).map(|(_, next)| (entity, next))
}

/// The entity an event subject names: `<provider>.<domain>.<entity>` (the
/// whole subject for one that is not an event's: it runs alone).
pub fn entity_of(subject: &str) -> String {
    let mut tokens = subject.split('.');
    let mut next = || tokens.next().unwrap_or_default();
    let (prefix, provider, domain, _partition, entity, event_type) =
        (next(), next(), next(), next(), next(), next());
    if prefix == crate::subject::EVENT_PREFIX && !event_type.is_empty() {
        [provider, domain, entity].join(".")
    } else {
        subject.to_string()
    }
}

/// Runs one event to its end: joins its entity's hold record if the
/// entity is held (`check`), else runs the handler with its retries.
async fn run_event(
    shared: Arc<Shared>,
    message: jetstream::Message,
    entity: String,
    check: bool,
) -> Done {
    let end = run(&shared, &message, check).await;
    let returned = (end == End::Returned).then_some(message);
    Done {
        entity,
        end,
        returned,
    }
}

async fn run(shared: &Shared, message: &jetstream::Message, check: bool) -> End {
    let dispatch = &shared.dispatch;
    let manifest = shared.slot.current().manifest.clone();
    let Ok((stream_seq, delivery)) = message
        .info()
        .map(|i| (i.stream_sequence, i.delivered as u64))
    else {
        warn!(handler = %manifest.name, "delivery without JetStream metadata; terminated");
        let _ = message.ack_with(AckKind::Term).await;
        return End::Settled;
    };
    let span = info_span!(
        "handle",
        handler = %manifest.name,
        subject = %message.subject,
        stream_seq,
        delivery,
    );
    async move {
        // Cold paths (once per entity and owner, a redelivery) are boxed:
        // their state would otherwise weigh on every event's future.
        if check
            && let Some(end) = Box::pin(joins_hold(shared, message, &manifest, stream_seq)).await
        {
            return end;
        }
        // What earlier deliveries did (a host that died, a lost ack).
        let mut attempt = 1;
        if delivery > 1 {
            match Box::pin(attempts::read(
                &dispatch.attempts,
                &manifest.name,
                stream_seq,
            ))
            .await
            {
                Ok(Some(record)) if record.resolved.as_deref() == Some("ran-after-park") => {
                    debug!("ran already while its entity was held; acked");
                    let _ = message.double_ack().await;
                    return End::Settled;
                }
                Ok(Some(record)) if record.resolved.is_none() => attempt = record.attempts + 1,
                Ok(_) => {}
                Err(error) => debug!(%error, "attempt record not read; counting from 1"),
            }
        }
        attempts_loop(shared, message, stream_seq, delivery, attempt).await
    }
    .instrument(span)
    .await
}

/// Whether the event's entity is held: then the event joins its record and
/// is acked (`Some`). A NATS failure is retried while the partition is
/// ours: the entity's later events wait behind this one meanwhile.
async fn joins_hold(
    shared: &Shared,
    message: &jetstream::Message,
    manifest: &Manifest,
    stream_seq: u64,
) -> Option<End> {
    let dispatch = &shared.dispatch;
    let mut pause = Duration::from_millis(100);
    loop {
        match park::enqueue_if_parked(
            &dispatch.attempts,
            &manifest.name,
            &message.subject,
            stream_seq,
        )
        .await
        {
            Ok(park::Queued::Run) => return None,
            Ok(park::Queued::Waiting) => {
                debug!("its entity is held; the event waits in the entity's record");
                if let Err(error) = message.double_ack().await {
                    warn!(%error, "ack not confirmed; the event is recorded as waiting all the same");
                }
                return Some(End::Held);
            }
            Ok(park::Queued::DeadLetter) => {
                // Its settling was lost after the entity was parked behind
                // it: terminate it now, so its dead letter is written.
                let _ = message.ack_with(AckKind::Term).await;
                return Some(End::Held);
            }
            Err(error) => {
                if !shared.fence.holds() {
                    return Some(End::Returned);
                }
                debug!(%error, retry_in = ?pause, "cannot tell whether the entity is held yet");
                let _ = message.ack_with(AckKind::Progress).await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Runs attempts of the event from `attempt` on until it is settled.
async fn attempts_loop(
    shared: &Shared,
    message: &jetstream::Message,
    stream_seq: u64,
    delivery: u64,
    mut attempt: u64,
) -> End {
    let dispatch = &shared.dispatch;
    loop {
        if !shared.fence.holds() {
            return End::Returned;
        }
        let permit = shared.slot.permit().await;
        // Waiting for a version being switched to must leave time to
        // finish well within ack_wait.
        let prepared = shared.slot.ready(|current| current.ack_wait / 3).await;
        let manifest = &prepared.manifest;
        let version = version_of(&prepared);
        // A delivery that is not a hookmesh event fails like a permanent
        // error: the settle policy makes it a dead letter.
        let input = event::input(message, stream_seq, attempt);
        let correlation_id = input
            .as_ref()
            .map(|i| i.correlation_id())
            .unwrap_or_default();
        let span = info_span!(
            "invoke",
            version = %version,
            %correlation_id,
            attempt,
            trace_id = tracing::field::Empty,
        );
        // The server gives up after this delivery (hosts died in it
        // before): a parking handler holds the entity before it runs, so
        // a host dying in it still parks the entity.
        let server_last = delivery >= u64::try_from(manifest.max_deliver).unwrap_or(u64::MAX);
        let parks_first = server_last && manifest.on_dead_letter == OnDeadLetter::Park;
        if parks_first
            && let Err(error) = Box::pin(park::hold(
                &dispatch.attempts,
                &manifest.name,
                &message.subject,
                stream_seq,
            ))
            .await
        {
            warn!(%error, "could not park the entity ahead of the last delivery");
        }
        let outcome = match input {
            Ok(input) => {
                // Boxed: an invocation's state (wasmtime's futures, the
                // emits' publishes) is large, and would otherwise sit
                // inline in every event's future from the moment it is
                // queued.
                let rerun = delivery > 1 || attempt > 1;
                let execute =
                    Box::pin(dispatch.execute(&prepared, input.as_event(), stream_seq, rerun));
                with_progress(message, manifest, &shared.fence, execute)
                    .instrument(span.clone())
                    .await
            }
            Err(error) => Err(Failed::new(Reason::Permanent, error.to_string())),
        };
        drop(permit);
        let failure = match outcome {
            Ok(emits) => {
                if parks_first {
                    Box::pin(dispatch.lift_hold(&manifest.name, &message.subject, stream_seq))
                        .await;
                }
                // A plain ack: acks reach the consumer in the order they are
                // sent, a handover confirms them all (`hand_back`), and an
                // ack lost with the connection costs a redelivery after
                // ack_wait — which a confirmed ack could only have
                // reported, not prevented.
                if let Err(error) = message.ack().await {
                    warn!(parent: &span, %error, "ack not sent; the server redelivers after ack_wait");
                }
                debug!(parent: &span, emits, "handled");
                return End::Settled;
            }
            Err(failure) => failure,
        };
        // Failures are the cold path: boxed, so their state does not
        // weigh on every event's future.
        let failed = FailedAttempt {
            stream_seq,
            attempt,
            failure,
        };
        match Box::pin(after_failure(
            shared, message, manifest, &version, failed, &span,
        ))
        .await
        {
            AfterFailure::Retry => attempt += 1,
            AfterFailure::End(end) => return end,
        }
    }
}

/// A failed attempt of an event.
struct FailedAttempt {
    stream_seq: u64,
    attempt: u64,
    failure: Failed,
}

/// What a failed attempt leads to.
enum AfterFailure {
    /// Run the event again (the wait is over).
    Retry,
    /// The event's task ends so.
    End(End),
}

/// Records a failed attempt and settles it by the policy: a retry in hand
/// (after waiting), the entity held for a long backoff, or a dead letter.
async fn after_failure(
    shared: &Shared,
    message: &jetstream::Message,
    manifest: &Manifest,
    version: &str,
    failed: FailedAttempt,
    span: &tracing::Span,
) -> AfterFailure {
    let dispatch = &shared.dispatch;
    let FailedAttempt {
        stream_seq,
        attempt,
        failure: Failed {
            reason,
            error,
            retry_after,
        },
    } = failed;
    let subject = message.subject.as_str();
    let record = || {
        dispatch.fail(
            &manifest.name,
            version,
            message,
            stream_seq,
            attempt,
            &error,
            reason,
        )
    };
    // In hand meanwhile: a slow bucket must not let the delivery's
    // ack_wait run out (the server would count a delivery more, or give up).
    let recorded = with_progress(message, manifest, &shared.fence, record()).await;
    let outcome = Outcome::Failed {
        reason,
        retry_after,
    };
    match policy(manifest).decide(attempt, &outcome) {
        // Not for a failure; acked like a success should it ever be
        // (its failure is in the attempt record).
        Settle::Ack => {
            let _ = message.double_ack().await;
            AfterFailure::End(End::Settled)
        }
        Settle::RetryHere { delay } => {
            info!(parent: span, %error, ?reason, retry_in = ?delay, "failed; will retry");
            if wait_in_hand(shared, message, manifest, delay).await {
                AfterFailure::Retry
            } else {
                AfterFailure::End(End::Returned)
            }
        }
        Settle::Hold { delay } => {
            let retry_at = now_ms() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            match park::hold_for_retry(
                &dispatch.attempts,
                &manifest.name,
                subject,
                stream_seq,
                retry_at,
            )
            .await
            {
                Ok(()) => {
                    info!(parent: span, %error, ?reason, retry_in = ?delay, "failed; the entity waits out the backoff, other entities go on");
                    if let Err(error) = message.double_ack().await {
                        warn!(%error, "ack not confirmed; the event waits in its entity's record all the same");
                    }
                    AfterFailure::End(End::Held)
                }
                Err(hold_error) => {
                    // Cannot hold: wait in hand instead (the window keeps
                    // the event, nothing is lost).
                    warn!(parent: span, error = %hold_error, "could not hold the entity; the event waits in hand");
                    if wait_in_hand(shared, message, manifest, delay).await {
                        AfterFailure::Retry
                    } else {
                        AfterFailure::End(End::Returned)
                    }
                }
            }
        }
        Settle::DeadLetter { park } => {
            warn!(parent: span, %error, ?reason, attempt, "failed; dead letter");
            // The dead letter is written from the attempt record: without
            // it (its bucket unreachable) it could not say what failed. The
            // event stays in hand until the record is stored.
            let stored = recorded
                || in_hand_until(shared, message, manifest, "attempt record", || async {
                    record().await.then_some(()).ok_or("not stored")
                })
                .await;
            if !stored {
                return AfterFailure::End(End::Returned);
            }
            AfterFailure::End(dead_letter(shared, message, manifest, stream_seq, park).await)
        }
    }
}

/// The settle policy of `manifest`.
fn policy(manifest: &Manifest) -> Policy<'_> {
    Policy {
        max_attempts: u64::try_from(manifest.max_deliver).unwrap_or(1).max(1),
        backoff: &manifest.backoff,
        on_dead_letter: manifest.on_dead_letter,
    }
}

/// Terminates the delivery, so the server's advisory makes its dead letter;
/// with `park` the entity is held behind it first.
async fn dead_letter(
    shared: &Shared,
    message: &jetstream::Message,
    manifest: &Manifest,
    stream_seq: u64,
    park: bool,
) -> End {
    // A parking handler's entity is held before the dead letter is made,
    // or its later events would go on: the event stays in hand until the
    // hold is stored.
    let hold = || {
        park::hold(
            &shared.dispatch.attempts,
            &manifest.name,
            &message.subject,
            stream_seq,
        )
    };
    if park && !in_hand_until(shared, message, manifest, "entity hold", hold).await {
        return End::Returned;
    }
    if let Err(error) = message.ack_with(AckKind::Term).await {
        warn!(%error, "could not terminate the delivery; the server redelivers after ack_wait");
    }
    if park { End::Held } else { End::Settled }
}

/// Tries `write` (a record the event's settling needs) with the delivery in
/// hand until it is stored: `false` when the partition was lost first.
async fn in_hand_until<F, Fut, E>(
    shared: &Shared,
    message: &jetstream::Message,
    manifest: &Manifest,
    what: &str,
    mut write: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut retry = Retry::default();
    loop {
        match with_progress(message, manifest, &shared.fence, write()).await {
            Ok(()) => return true,
            Err(error) => {
                warn!(%error, retry_in = ?retry.delay(), "{what} not stored yet");
                if !wait_in_hand(shared, message, manifest, retry.delay()).await {
                    return false;
                }
                retry.grow();
            }
        }
    }
}

/// Runs `work`, telling the server meanwhile that the event is still being
/// worked on, so a long handler is not redelivered elsewhere — while the
/// lease holds. Once it may have run out, the next holder pulls `ack_wait`
/// after it: by then the event must be redelivered (to that holder, ahead
/// of its entity's later events), so progress stops; the work runs on and
/// a late end here is a run again, never a run out of order.
async fn with_progress<T>(
    message: &jetstream::Message,
    manifest: &Manifest,
    fence: &Fence,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    // Work done at its first poll (most of it) needs no timer at all.
    if let std::task::Poll::Ready(done) = futures::poll!(work.as_mut()) {
        return done;
    }
    let period = manifest.ack_wait / 3;
    loop {
        tokio::select! {
            biased;
            done = &mut work => return done,
            _ = tokio::time::sleep(period) => {
                if !fence.lapsed() {
                    let _ = message.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

/// Waits `delay` with the delivery in hand; `false` when the partition was
/// lost meanwhile.
async fn wait_in_hand(
    shared: &Shared,
    message: &jetstream::Message,
    manifest: &Manifest,
    delay: Duration,
) -> bool {
    let wait = async {
        tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shared.fence.lost() => false,
        }
    };
    with_progress(message, manifest, &shared.fence, wait).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_are_provider_domain_and_entity_token() {
        assert_eq!(
            entity_of("hook.crm.order.7.ORD-1.order.created"),
            "crm.order.ORD-1"
        );
        assert_eq!(
            entity_of("hook.crm.order.3.ORD-1.order.updated"),
            "crm.order.ORD-1"
        );
        assert_eq!(entity_of("other.subject"), "other.subject");
    }

    /// One event delivered by a consumer with a one-second `ack_wait`, and
    /// whether the server delivers it again while `fence` guards a
    /// three-second invocation of it.
    async fn redelivered_during_a_long_invocation(fence: Arc<Fence>) -> bool {
        use super::super::pull::tests::{publish, stream_with_consumer};
        let (_nats, js, consumer) = stream_with_consumer(jetstream::consumer::pull::Config {
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await;
        publish(&js, 1).await;
        let fetch = |expires: Duration| {
            let consumer = consumer.clone();
            async move {
                let mut batch = consumer
                    .fetch()
                    .max_messages(1)
                    .expires(expires)
                    .messages()
                    .await
                    .expect("pull");
                batch.next().await.map(|m| m.expect("message"))
            }
        };
        let message = fetch(Duration::from_secs(2)).await.expect("delivered");
        let manifest = Manifest::from_toml(
            "name = \"h\"\nsubject = \"t.>\"\nack_wait = \"1s\"\ntimeout = \"500ms\"\n",
            "test",
        )
        .expect("manifest");
        let invocation = with_progress(
            &message,
            &manifest,
            &fence,
            tokio::time::sleep(Duration::from_secs(3)),
        );
        let (again, ()) = tokio::join!(fetch(Duration::from_millis(2_500)), invocation);
        again.is_some_and(|m| m.info().is_ok_and(|i| i.delivered == 2))
    }

    #[tokio::test]
    async fn a_long_invocation_keeps_its_event_while_the_lease_holds() {
        assert!(!redelivered_during_a_long_invocation(Fence::unfenced()).await);
    }

    #[tokio::test]
    async fn a_long_invocation_lets_its_event_go_once_the_lease_has_lapsed() {
        // The next holder pulls ack_wait after the lease ran out: the event
        // must be there for it, ahead of its entity's later events.
        assert!(redelivered_during_a_long_invocation(Fence::new(0)).await);
    }
}
