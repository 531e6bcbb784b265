//! Events the server delivered that no host holds: a partition owner
//! starts nothing new until they are back in its hands.
//!
//! A consumer's deliveries can go astray: to a pull request of a previous
//! holder, or of this one, that nobody reads any more; or a consumer
//! leader is lost before the others learned of its last deliveries and
//! returns, and the new leader counts those events as delivered and
//! unacknowledged. Either way the server redelivers such an event only when
//! its `ack_wait` runs out — and meanwhile hands out the entity's *later*
//! events to whoever pulls, which would then run first.
//!
//! So after anything that can lose deliveries — the owner starting (a
//! takeover or handover), a pull request ending in an error (a 409 such as
//! a leadership change), or one the server never ended (its consumer
//! leader went away) — the owner holds back what it pulls and compares the
//! events the server counts as awaiting an ack with those in its hands.
//! While the server counts more, some are out there: it keeps pulling
//! (which is how they come back), and starts the held events, in stream
//! order, once the counts agree. Should they never agree, it starts them
//! after four `ack_wait`s (at least a minute) with a warning: by then a
//! working server has redelivered every lost event.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use tokio::time::Instant;
use tracing::{info, warn};

/// Events a pull asks for at least while the owner holds events back.
pub(super) const PULL: usize = 32;

/// How often the owner asks the server again while it holds events back.
const RECHECK: Duration = Duration::from_millis(200);

/// How long the owner holds events back at most, in `ack_wait`s (and at
/// least [`LIMIT_FLOOR`]): lost deliveries come back one `ack_wait` after
/// they went astray once the server can redeliver — which a cluster that
/// is electing leaders may not do for a while. The limit only guards
/// against a count that never agrees.
const LIMIT_ACK_WAITS: u32 = 4;

/// The least the owner holds events back for before it gives up waiting.
const LIMIT_FLOOR: Duration = Duration::from_secs(60);

/// How long a flush or a consumer info may take before the check counts
/// as not agreeing (and is made again).
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of a partition owner's recount.
#[derive(Debug)]
pub(super) struct Recount {
    /// While active: since when events are held back, and when to ask next.
    active: Option<(Instant, Instant)>,
    /// The events pulled meanwhile, with their stream sequences.
    held: Vec<(u64, jetstream::Message)>,
}

impl Recount {
    /// The recount of an owner that has just started and holds nothing,
    /// from the events awaiting an ack that the server counted after the
    /// owner's lease was taken: none, and nothing can have gone astray
    /// (no pull of a previous holder is open once the lease is this
    /// owner's, and this one has not pulled yet); some, and they must come
    /// back first — a recount due at once.
    pub(super) fn at_start(ack_pending: usize) -> Recount {
        let now = Instant::now();
        Recount {
            active: (ack_pending > 0).then_some((now, now)),
            held: Vec::new(),
        }
    }

    /// Something may have lost deliveries: hold back from now on (a
    /// recount under way goes on as it is).
    pub(super) fn start(&mut self) {
        if self.active.is_none() {
            let now = Instant::now();
            self.active = Some((now, now));
        }
    }

    /// Whether new events are held back.
    pub(super) fn active(&self) -> bool {
        self.active.is_some()
    }

    /// When to ask the server next (far off when not active).
    pub(super) fn next_check(&self) -> Instant {
        self.active
            .map_or_else(|| Instant::now() + Duration::from_secs(3600), |(_, at)| at)
    }

    /// Whether a count is due now.
    pub(super) fn due_now(&self) -> bool {
        self.active.is_some_and(|(_, at)| at <= Instant::now())
    }

    /// Holds a pulled event back.
    pub(super) fn hold(&mut self, seq: u64, message: jetstream::Message) {
        self.held.push((seq, message));
    }

    /// How many events are held back.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// Tells the server the held events are still being worked on.
    pub(super) async fn keep_alive(&self) {
        for (_, message) in &self.held {
            let _ = message.ack_with(AckKind::Progress).await;
        }
    }

    /// Every held event (the owner is handing the partition back).
    pub(super) fn take(&mut self) -> Vec<jetstream::Message> {
        self.active = None;
        self.held.drain(..).map(|(_, message)| message).collect()
    }

    /// Asks the server how many events await an ack, against `in_hand`
    /// (those the owner holds besides the held-back ones). Returns the
    /// held events, in stream order, once nothing is out there or the
    /// wait is over; `None` while it goes on.
    pub(super) async fn check(
        &mut self,
        consumer: &PullConsumer,
        client: &async_nats::Client,
        in_hand: usize,
        ack_wait: Duration,
        handler: &str,
        partition: u32,
    ) -> Option<Vec<jetstream::Message>> {
        let (since, _) = self.active?;
        // Acks already sent must reach the server before it counts.
        let _ = tokio::time::timeout(ASK_TIMEOUT, client.flush()).await;
        let pending = match tokio::time::timeout(ASK_TIMEOUT, consumer.get_info()).await {
            Ok(Ok(info)) => Some(info.num_ack_pending),
            _ => None,
        };
        let ours = in_hand + self.held.len();
        let waited = since.elapsed();
        match pending {
            Some(pending) if pending <= ours => {
                if waited >= RECHECK {
                    info!(
                        handler,
                        partition,
                        ?waited,
                        held = self.held.len(),
                        "events delivered elsewhere are back; starting in stream order"
                    );
                }
            }
            _ if waited >= (ack_wait * LIMIT_ACK_WAITS).max(LIMIT_FLOOR) => {
                warn!(
                    handler,
                    partition,
                    ?pending,
                    ours,
                    ?waited,
                    "the server still counts events this owner does not hold; starting what it holds"
                );
            }
            _ => {
                self.active = Some((since, Instant::now() + RECHECK));
                return None;
            }
        }
        self.active = None;
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|(seq, _)| *seq);
        Some(held.into_iter().map(|(_, message)| message).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recount_starts_once_and_is_far_off_when_idle() {
        let mut recount = Recount {
            active: None,
            held: Vec::new(),
        };
        assert!(!recount.active());
        assert!(recount.next_check() > Instant::now() + Duration::from_secs(60));
        recount.start();
        let first = recount.active;
        recount.start();
        assert_eq!(recount.active, first, "a recount under way goes on");
        assert!(Recount::at_start(1).active());
        assert!(Recount::at_start(1).due_now());
        assert!(
            !Recount::at_start(0).active(),
            "nothing out there: no recount"
        );
    }
}
