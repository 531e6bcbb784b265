//! Held entities: an entity whose events wait outside the partition
//! owner's window, as sequences in a record, the stream keeping the events.
//!
//! An entity is held
//! - while its failing event waits out a long backoff ([`hold_for_retry`]:
//!   the record's `retry_at`), so the wait never fills the window of events
//!   in flight and never delays another entity;
//! - with `on_dead_letter = "park"`, once one of its events is a dead
//!   letter: its later events wait until it is replayed successfully or
//!   purged — and then run in order ([`hold`]).
//!
//! A parked entity has one record in the `hook_attempts` bucket, key
//! `park.<handler>.<provider>.<domain>.<entity>`: the dead letters holding
//! it (by `HOOK_EVENTS` sequence) and the later events waiting, in stream
//! order. The partition worker appends to `waiting` and acks, so the
//! partition's other entities go on; every change is a compare-and-set on
//! the record's revision, so workers, replays, purges and drainers on any
//! host never lose an update. When no dead letter holds the entity any
//! more, one host takes a lease on the record and runs the waiting events
//! in order; the record is deleted when nothing waits.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use super::RecordError;
use crate::extract::kv_key;

/// The key prefix of parking records in `hook_attempts`.
pub const PREFIX: &str = "park";

/// A parked entity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkRecord {
    /// The handler.
    pub handler: String,
    /// The dead letters (their `HOOK_EVENTS` sequences) holding the entity.
    pub dead_letters: Vec<u64>,
    /// Later events (`HOOK_EVENTS` sequences), in stream order.
    pub waiting: Vec<u64>,
    /// The host draining the waiting events, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// Until when (Unix milliseconds) its lease holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<u64>,
    /// Not before (Unix milliseconds): the first waiting event failed and
    /// waits out its backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
}

impl ParkRecord {
    /// Whether the waiting events may run: no dead letter holds the entity.
    pub fn releasable(&self) -> bool {
        self.dead_letters.is_empty() && !self.waiting.is_empty()
    }

    /// Whether someone else holds a live lease at `now_ms`.
    fn leased_to_other(&self, holder: &str, now_ms: u64) -> bool {
        self.lease_holder.as_deref().is_some_and(|h| h != holder)
            && self.lease_until.is_some_and(|until| until > now_ms)
    }

    /// Whether a drainer could take it now: releasable, its backoff over,
    /// and not leased to a live holder.
    pub fn drainable(&self, now: SystemTime) -> bool {
        self.due(millis(now)) && !self.leased_to_other("", millis(now))
    }

    /// Releasable and past its `retry_at`.
    fn due(&self, now_ms: u64) -> bool {
        self.releasable() && self.retry_at.is_none_or(|at| at <= now_ms)
    }
}

/// The record key of the entity an event subject names, or `None` for a
/// subject that is not an event's.
pub fn key(handler: &str, event_subject: &str) -> Option<String> {
    let tokens: Vec<&str> = event_subject.split('.').collect();
    if tokens.len() < 6 || tokens[0] != crate::subject::EVENT_PREFIX {
        return None;
    }
    Some(format!(
        "{PREFIX}.{}.{}.{}.{}",
        kv_key(handler),
        kv_key(tokens[1]),
        kv_key(tokens[2]),
        kv_key(tokens[4])
    ))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads the record at `key` (`None` when there is none) and its revision.
pub async fn read(
    bucket: &kv::Store,
    key: &str,
) -> Result<(Option<ParkRecord>, Option<u64>), RecordError> {
    super::read(bucket, key).await
}

/// Applies `change` to the park record at `key` (see [`super::modify`]).
async fn modify<T>(
    bucket: &kv::Store,
    key: &str,
    change: impl FnMut(Option<ParkRecord>) -> Change<T>,
) -> Result<T, RecordError> {
    super::modify(bucket, key, change).await
}

/// What a change does to a park record.
type Change<T> = super::Change<ParkRecord, T>;

/// Parks the entity of `subject` behind its dead letter `stream_seq`.
pub async fn hold(
    bucket: &kv::Store,
    handler: &str,
    subject: &str,
    stream_seq: u64,
) -> Result<(), RecordError> {
    let Some(key) = key(handler, subject) else {
        return Ok(());
    };
    modify(bucket, &key, |record| {
        let mut record = record.unwrap_or_else(|| ParkRecord {
            handler: handler.to_string(),
            ..ParkRecord::default()
        });
        if record.dead_letters.contains(&stream_seq) {
            return Change::Keep(());
        }
        record.waiting.retain(|&s| s != stream_seq);
        record.dead_letters.push(stream_seq);
        Change::Put(record, ())
    })
    .await
}

/// What a delivered event of a parking handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// The entity is not parked: run it now.
    Run,
    /// It waits behind the entity's dead letter (queued now or before).
    Waiting,
    /// It is itself the dead letter holding the entity (delivered again
    /// because its settling was lost).
    DeadLetter,
}

/// If the entity of `subject` is parked, queues `stream_seq` behind it.
pub async fn enqueue_if_parked(
    bucket: &kv::Store,
    handler: &str,
    subject: &str,
    stream_seq: u64,
) -> Result<Queued, RecordError> {
    let Some(key) = key(handler, subject) else {
        return Ok(Queued::Run);
    };
    modify(bucket, &key, |record| match record {
        None => Change::Keep(Queued::Run),
        Some(record) if record.dead_letters.contains(&stream_seq) => {
            Change::Keep(Queued::DeadLetter)
        }
        Some(record) if record.waiting.contains(&stream_seq) => Change::Keep(Queued::Waiting),
        Some(mut record) => {
            insert_sorted(&mut record.waiting, stream_seq);
            Change::Put(record, Queued::Waiting)
        }
    })
    .await
}

/// Inserts `seq` in stream order (once).
fn insert_sorted(waiting: &mut Vec<u64>, seq: u64) {
    if let Err(at) = waiting.binary_search(&seq) {
        waiting.insert(at, seq);
    }
}

/// Holds the entity of `subject` while its event `stream_seq` waits out a
/// backoff until `retry_at` (Unix milliseconds): the event heads the
/// waiting events, and a drainer runs it again once the time has come.
pub async fn hold_for_retry(
    bucket: &kv::Store,
    handler: &str,
    subject: &str,
    stream_seq: u64,
    retry_at: u64,
) -> Result<(), RecordError> {
    let Some(key) = key(handler, subject) else {
        return Ok(());
    };
    modify(bucket, &key, |record| {
        let mut record = record.unwrap_or_else(|| ParkRecord {
            handler: handler.to_string(),
            ..ParkRecord::default()
        });
        insert_sorted(&mut record.waiting, stream_seq);
        // It is retried, so it holds the entity by its backoff, not as a
        // dead letter (the last delivery of a parking handler parks the
        // entity ahead of running it).
        record.dead_letters.retain(|&s| s != stream_seq);
        record.retry_at = Some(retry_at);
        Change::Put(record, ())
    })
    .await
}

/// The drainer holding `key`'s lease leaves the first waiting event to its
/// backoff: the record waits until `retry_at`, and the lease ends.
pub async fn defer(
    bucket: &kv::Store,
    key: &str,
    holder: &str,
    retry_at: u64,
) -> Result<(), RecordError> {
    modify(bucket, key, |record| match record {
        Some(mut record) if record.lease_holder.as_deref() == Some(holder) => {
            record.retry_at = Some(retry_at);
            record.lease_holder = None;
            record.lease_until = None;
            Change::Put(record, ())
        }
        _ => Change::Keep(()),
    })
    .await
}

/// The dead letter `stream_seq` no longer holds its entity (replayed or
/// purged). Returns whether events now wait to be released; the record is
/// deleted when nothing holds or waits.
pub async fn release(
    bucket: &kv::Store,
    handler: &str,
    subject: &str,
    stream_seq: u64,
) -> Result<bool, RecordError> {
    let Some(key) = key(handler, subject) else {
        return Ok(false);
    };
    modify(bucket, &key, |record| match record {
        None => Change::Keep(false),
        Some(mut record) => {
            record.dead_letters.retain(|&s| s != stream_seq);
            if record.dead_letters.is_empty() && record.waiting.is_empty() {
                Change::Delete(false)
            } else {
                let releasable = record.releasable();
                Change::Put(record, releasable)
            }
        }
    })
    .await
}

/// Takes the drain lease of `key` for `holder` for `lease`: the record as
/// leased, or `None` when it is not drainable or leased to another.
pub async fn take_lease(
    bucket: &kv::Store,
    key: &str,
    holder: &str,
    lease: Duration,
) -> Result<Option<ParkRecord>, RecordError> {
    let now = SystemTime::now();
    modify(bucket, key, |record| match record {
        Some(mut record)
            if record.due(millis(now)) && !record.leased_to_other(holder, millis(now)) =>
        {
            record.lease_holder = Some(holder.to_string());
            record.lease_until = Some(millis(now + lease));
            Change::Put(record.clone(), Some(record))
        }
        _ => Change::Keep(None),
    })
    .await
}

/// Extends `holder`'s lease of `key` by `lease` from now; `false` when the
/// lease is not (or no longer) `holder`'s.
pub async fn renew(
    bucket: &kv::Store,
    key: &str,
    holder: &str,
    lease: Duration,
) -> Result<bool, RecordError> {
    let now = SystemTime::now();
    modify(bucket, key, |record| match record {
        Some(mut record) if record.lease_holder.as_deref() == Some(holder) => {
            record.lease_until = Some(millis(now + lease));
            Change::Put(record, true)
        }
        _ => Change::Keep(false),
    })
    .await
}

/// The waiting event `stream_seq` ran: it leaves the queue and the lease is
/// renewed. Returns the record left (`None` once deleted, nothing waiting,
/// or when the lease is not `holder`'s any more: then nothing changes).
pub async fn finished(
    bucket: &kv::Store,
    key: &str,
    holder: &str,
    stream_seq: u64,
    lease: Duration,
) -> Result<Option<ParkRecord>, RecordError> {
    let now = SystemTime::now();
    modify(bucket, key, |record| match record {
        None => Change::Keep(None),
        Some(record) if record.lease_holder.as_deref() != Some(holder) => Change::Keep(None),
        Some(mut record) => {
            record.waiting.retain(|&s| s != stream_seq);
            record.retry_at = None;
            if record.waiting.is_empty() && record.dead_letters.is_empty() {
                return Change::Delete(None);
            }
            record.lease_until = Some(millis(now + lease));
            Change::Put(record.clone(), Some(record))
        }
    })
    .await
}

/// The waiting event `stream_seq` became a dead letter itself: it holds
/// the entity now, and the lease ends (nothing changes when the lease is
/// not `holder`'s any more).
pub async fn failed(
    bucket: &kv::Store,
    key: &str,
    holder: &str,
    stream_seq: u64,
) -> Result<(), RecordError> {
    modify(bucket, key, |record| match record {
        None => Change::Keep(()),
        Some(record) if record.lease_holder.as_deref() != Some(holder) => Change::Keep(()),
        Some(mut record) => {
            record.waiting.retain(|&s| s != stream_seq);
            if !record.dead_letters.contains(&stream_seq) {
                record.dead_letters.push(stream_seq);
            }
            record.lease_holder = None;
            record.lease_until = None;
            record.retry_at = None;
            Change::Put(record, ())
        }
    })
    .await
}

/// Gives the lease of `key` up (the drainer stops early).
pub async fn give_up_lease(bucket: &kv::Store, key: &str, holder: &str) -> Result<(), RecordError> {
    modify(bucket, key, |record| match record {
        Some(mut record) if record.lease_holder.as_deref() == Some(holder) => {
            record.lease_holder = None;
            record.lease_until = None;
            Change::Put(record, ())
        }
        _ => Change::Keep(()),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_handler_provider_domain_and_entity() {
        assert_eq!(
            key("order-sync", "hook.crm.order.7.ORD~2F1.order.updated").as_deref(),
            Some("park.order-sync.crm.order.ORD=7E2F1")
        );
        assert_eq!(key("h", "hook.crm.order.7"), None);
        assert_eq!(key("h", "other.crm.order.7.E.t"), None);
    }

    #[test]
    fn a_record_is_releasable_once_no_dead_letter_holds_it() {
        let mut record = ParkRecord {
            handler: "h".into(),
            dead_letters: vec![3],
            waiting: vec![5, 9],
            ..ParkRecord::default()
        };
        assert!(!record.releasable());
        record.dead_letters.clear();
        assert!(record.releasable());
        assert!(record.drainable(SystemTime::now()));
        record.lease_holder = Some("other".into());
        record.lease_until = Some(millis(SystemTime::now() + Duration::from_secs(60)));
        assert!(!record.drainable(SystemTime::now()));
        assert!(record.drainable(SystemTime::now() + Duration::from_secs(61)));
    }

    #[test]
    fn a_held_entity_waits_out_its_backoff() {
        let now = SystemTime::now();
        let mut record = ParkRecord {
            handler: "h".into(),
            waiting: vec![4, 8],
            retry_at: Some(millis(now + Duration::from_secs(30))),
            ..ParkRecord::default()
        };
        assert!(!record.drainable(now));
        assert!(record.drainable(now + Duration::from_secs(31)));
        record.retry_at = None;
        assert!(record.drainable(now));
        let mut waiting = vec![3, 9];
        insert_sorted(&mut waiting, 5);
        insert_sorted(&mut waiting, 5);
        insert_sorted(&mut waiting, 1);
        assert_eq!(waiting, vec![1, 3, 5, 9]);
    }
}
