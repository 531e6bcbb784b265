//! The settle policy: what a finished attempt does to its event — a pure
//! decision, apart from the NATS calls that carry it out.
//!
//! - ok → ack;
//! - transient or trap with attempts left → retry after the backoff (or the
//!   failure's own retry-after, kept within the manifest's bounds): here,
//!   keeping the delivery, when the wait is short; by holding the entity
//!   (its events acked and kept as sequences in its hold record, the stream
//!   keeping the events) when the wait is long, so a long backoff never
//!   fills the window of events in flight;
//! - permanent, needs-human, or the last attempt → dead letter; with
//!   `on_dead_letter = "park"` the entity's later events wait behind it.

use std::time::Duration;

use super::Reason;
use crate::manifest::{Backoff, OnDeadLetter};

/// Waits up to this long are spent with the delivery in hand; longer ones
/// hold the entity and free the window.
pub const HOLD_AFTER: Duration = Duration::from_secs(5);

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded and its emits are stored.
    Ok,
    /// It failed.
    Failed {
        /// The failure's class.
        reason: Reason,
        /// A delay the failure asked for (an HTTP `Retry-After`).
        retry_after: Option<Duration>,
    },
}

/// What to do with the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Ack it; the entity's next event may start.
    Ack,
    /// Run it again after `delay`, keeping the delivery.
    RetryHere {
        /// The wait.
        delay: Duration,
    },
    /// Hold the entity for `delay`: this event and the entity's later ones
    /// wait in its hold record, their deliveries acked.
    Hold {
        /// The wait.
        delay: Duration,
    },
    /// A dead letter.
    DeadLetter {
        /// The entity's later events wait behind it (`park`).
        park: bool,
    },
}

/// A handler's retry rules, as the settle decision needs them.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// Attempts before an event is a dead letter.
    pub max_attempts: u64,
    /// Retry delays.
    pub backoff: &'a Backoff,
    /// What a dead letter does to the entity's later events.
    pub on_dead_letter: OnDeadLetter,
}

impl Policy<'_> {
    /// What attempt number `attempt` (1-based), ended by `outcome`, does.
    pub fn decide(&self, attempt: u64, outcome: &Outcome) -> Settle {
        let Outcome::Failed {
            reason,
            retry_after,
        } = outcome
        else {
            return Settle::Ack;
        };
        let retryable = matches!(reason, Reason::Transient | Reason::Trap);
        if !retryable || attempt >= self.max_attempts {
            return Settle::DeadLetter {
                park: self.on_dead_letter == OnDeadLetter::Park,
            };
        }
        let delay = self.delay(attempt, *retry_after);
        if delay > HOLD_AFTER {
            Settle::Hold { delay }
        } else {
            Settle::RetryHere { delay }
        }
    }

    /// The wait after attempt `attempt` failed: the failure's retry-after
    /// when it gave one (never shorter than `initial`, never past `max`),
    /// else the backoff.
    pub fn delay(&self, attempt: u64, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(asked) => asked.clamp(self.backoff.initial, self.backoff.max),
            None => self.backoff.delay(attempt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff(initial_ms: u64, max_s: u64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_secs(max_s),
        }
    }

    fn failed(reason: Reason) -> Outcome {
        Outcome::Failed {
            reason,
            retry_after: None,
        }
    }

    #[test]
    fn the_table() {
        let quick = backoff(100, 300);
        let slow = backoff(10_000, 300);
        let policy = |backoff, park| Policy {
            max_attempts: 3,
            backoff,
            on_dead_letter: if park {
                OnDeadLetter::Park
            } else {
                OnDeadLetter::Continue
            },
        };
        let in_hand = |s: Settle| matches!(s, Settle::RetryHere { delay } if delay < HOLD_AFTER);
        let held = |s: Settle| matches!(s, Settle::Hold { delay } if delay > HOLD_AFTER);
        type Case<'a> = (
            Policy<'a>,
            u64,
            Outcome,
            &'a dyn Fn(Settle) -> bool,
            &'a str,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                policy(&quick, false),
                1,
                Outcome::Ok,
                &|s| s == Settle::Ack,
                "ok acks",
            ),
            (
                policy(&quick, true),
                3,
                Outcome::Ok,
                &|s| s == Settle::Ack,
                "ok on the last attempt acks",
            ),
            (
                policy(&quick, false),
                1,
                failed(Reason::Transient),
                &in_hand,
                "a short backoff retries in hand",
            ),
            (
                policy(&quick, false),
                2,
                failed(Reason::Trap),
                &in_hand,
                "a trap retries like transient",
            ),
            (
                policy(&slow, false),
                1,
                failed(Reason::Transient),
                &held,
                "a long backoff holds the entity",
            ),
            (
                policy(&quick, false),
                3,
                failed(Reason::Transient),
                &|s| s == Settle::DeadLetter { park: false },
                "the last attempt is a dead letter",
            ),
            (
                policy(&quick, true),
                3,
                failed(Reason::Trap),
                &|s| s == Settle::DeadLetter { park: true },
                "parking handlers park on the last attempt",
            ),
            (
                policy(&quick, false),
                1,
                failed(Reason::Permanent),
                &|s| s == Settle::DeadLetter { park: false },
                "permanent is a dead letter at once",
            ),
            (
                policy(&quick, true),
                1,
                failed(Reason::NeedsHuman),
                &|s| s == Settle::DeadLetter { park: true },
                "needs-human parks at once",
            ),
        ];
        for (policy, attempt, outcome, expected, what) in cases {
            let settle = policy.decide(attempt, &outcome);
            assert!(expected(settle), "{what}: got {settle:?}");
        }
    }

    #[test]
    fn retry_after_is_kept_within_the_manifest_bounds() {
        let b = backoff(1_000, 60);
        let policy = Policy {
            max_attempts: 10,
            backoff: &b,
            on_dead_letter: OnDeadLetter::Continue,
        };
        let asked = |s| Outcome::Failed {
            reason: Reason::Transient,
            retry_after: Some(Duration::from_secs(s)),
        };
        assert_eq!(
            policy.decide(1, &asked(2)),
            Settle::RetryHere {
                delay: Duration::from_secs(2)
            }
        );
        assert_eq!(
            policy.decide(1, &asked(0)),
            Settle::RetryHere {
                delay: Duration::from_secs(1)
            },
            "never shorter than initial"
        );
        assert_eq!(
            policy.decide(1, &asked(3600)),
            Settle::Hold {
                delay: Duration::from_secs(60)
            },
            "never past max"
        );
    }

    #[test]
    fn one_attempt_allowed_means_no_retry() {
        let b = backoff(100, 1);
        let policy = Policy {
            max_attempts: 1,
            backoff: &b,
            on_dead_letter: OnDeadLetter::Continue,
        };
        assert_eq!(
            policy.decide(1, &failed(Reason::Transient)),
            Settle::DeadLetter { park: false }
        );
    }
}
