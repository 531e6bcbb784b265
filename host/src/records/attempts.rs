//! Attempt records: what happened to each failing delivery, kept in the
//! `hook_attempts` bucket (key `<handler>.<stream seq>`) for retries, ops
//! and the dead-letter writer — never only in memory.

use std::time::SystemTime;

use async_nats::jetstream::kv;

use super::{Change, RecordError, modify};
use serde::{Deserialize, Serialize};

/// Why a delivery failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    /// `transient(…)`.
    Transient,
    /// A trap, timeout or out-of-memory.
    Trap,
    /// `permanent(…)`.
    Permanent,
    /// `needs-human(…)`.
    NeedsHuman,
}

/// The record of a failing delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The handler.
    pub handler: String,
    /// The handler version that failed last (digest prefix).
    pub handler_version: String,
    /// The event's sequence in `HOOK_EVENTS`.
    pub stream_seq: u64,
    /// The event's subject.
    pub subject: String,
    /// Failed attempts so far.
    pub attempts: u64,
    /// The last attempt's delivery count as the server numbers it.
    pub last_delivery: u64,
    /// The last error.
    pub last_error: String,
    /// Its class.
    pub reason: Reason,
    /// The first failure (RFC 3339).
    pub first_failure: String,
    /// The last failure (RFC 3339).
    pub last_failure: String,
    /// How its dead letter was resolved (`replayed`, `purged`), once it
    /// was: a give-up advisory processed again later makes no new entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
}

/// The bucket key of a record.
pub fn key(handler: &str, stream_seq: u64) -> String {
    format!("{}.{stream_seq}", crate::extract::kv_key(handler))
}

/// What [`record`] is told about a failure.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// The handler.
    pub handler: &'a str,
    /// Its version.
    pub handler_version: &'a str,
    /// The event's sequence.
    pub stream_seq: u64,
    /// The event's subject.
    pub subject: &'a str,
    /// The server's delivery count.
    pub delivery: u64,
    /// The error.
    pub error: &'a str,
    /// Its class.
    pub reason: Reason,
}

/// Adds a failure to the event's record (creating it on the first), with
/// compare-and-set on the record's revision: a replay, a drainer and a
/// partition owner may write an event's record, and none loses another's
/// count.
pub async fn record(
    bucket: &kv::Store,
    failure: Failure<'_>,
) -> Result<AttemptRecord, RecordError> {
    let key = key(failure.handler, failure.stream_seq);
    modify(bucket, &key, |previous: Option<AttemptRecord>| {
        let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let record = AttemptRecord {
            handler: failure.handler.to_string(),
            handler_version: failure.handler_version.to_string(),
            stream_seq: failure.stream_seq,
            subject: failure.subject.to_string(),
            attempts: previous.as_ref().map_or(0, |p| p.attempts) + 1,
            last_delivery: failure.delivery,
            last_error: failure.error.to_string(),
            reason: failure.reason,
            first_failure: previous.map_or_else(|| now.clone(), |p| p.first_failure),
            last_failure: now,
            resolved: None,
        };
        Change::Put(record.clone(), record)
    })
    .await
}

/// Reads an event's record. An unreadable record is an error, never "no
/// failures yet": that would start the attempt count again.
pub async fn read(
    bucket: &kv::Store,
    handler: &str,
    stream_seq: u64,
) -> Result<Option<AttemptRecord>, RecordError> {
    Ok(super::read(bucket, &key(handler, stream_seq)).await?.0)
}

/// Marks an event's dead letter resolved (`how`: `replayed`, `purged`),
/// keeping what is known of its failures.
pub async fn resolve(
    bucket: &kv::Store,
    handler: &str,
    stream_seq: u64,
    subject: &str,
    how: &str,
) -> Result<(), RecordError> {
    modify(
        bucket,
        &key(handler, stream_seq),
        |record: Option<AttemptRecord>| {
            let now = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
            let record = match record {
                Some(record) => AttemptRecord {
                    resolved: Some(how.to_string()),
                    ..record
                },
                None => AttemptRecord {
                    handler: handler.to_string(),
                    handler_version: String::new(),
                    stream_seq,
                    subject: subject.to_string(),
                    attempts: 0,
                    last_delivery: 0,
                    last_error: String::new(),
                    reason: Reason::Transient,
                    first_failure: now.clone(),
                    last_failure: now,
                    resolved: Some(how.to_string()),
                },
            };
            Change::Put(record, ())
        },
    )
    .await
}
