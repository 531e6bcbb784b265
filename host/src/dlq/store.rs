//! Reading, selecting and deleting dead letters in `HOOK_DLQ`.
//!
//! Listing walks the stream with "next message for subject" reads rather
//! than a consumer, so inspecting the DLQ leaves no consumer behind and
//! works with read-only permissions.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{
    self, ErrorCode,
    stream::{DeleteMessageErrorKind, LastRawMessageErrorKind},
};
use futures::TryStreamExt;

use super::{DLQ_STREAM, DeadLetter, DlqError};

/// Which dead letters a command is about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Only this handler's.
    pub handler: Option<String>,
    /// Only this reason (`max-deliveries`, `permanent`, …).
    pub reason: Option<String>,
    /// Only those stored within this long.
    pub since: Option<Duration>,
    /// Only those stored longer ago than this.
    pub older_than: Option<Duration>,
    /// Only this entity's.
    pub entity: Option<String>,
}

impl Selection {
    /// The subject filter narrowing the walk.
    fn subject_filter(&self) -> String {
        match &self.handler {
            Some(handler) => format!("dlq.{}.>", crate::subject::encode_token(handler)),
            None => "dlq.>".to_string(),
        }
    }

    /// Whether `entry` is selected at time `now`.
    pub fn matches(&self, entry: &DeadLetter, now: SystemTime) -> bool {
        let age = now.duration_since(entry.stored_at).unwrap_or_default();
        self.handler.as_ref().is_none_or(|h| *h == entry.handler)
            && self.reason.as_ref().is_none_or(|r| *r == entry.reason)
            && self.since.is_none_or(|since| age <= since)
            && self.older_than.is_none_or(|older| age > older)
            && self.entity.as_ref().is_none_or(|e| *e == entry.entity())
    }
}

async fn stream(js: &jetstream::Context) -> Result<jetstream::stream::Stream<()>, DlqError> {
    js.get_stream_no_info(DLQ_STREAM)
        .await
        .map_err(|e| DlqError::nats(DLQ_STREAM, e))
}

/// Every dead letter `selection` picks, oldest first.
pub async fn list(
    js: &jetstream::Context,
    selection: &Selection,
) -> Result<Vec<DeadLetter>, DlqError> {
    let stream = stream(js).await?;
    let filter = selection.subject_filter();
    let now = SystemTime::now();
    let mut selected = Vec::new();
    let mut next = 1;
    loop {
        let message = match stream.get_first_raw_message_by_subject(&filter, next).await {
            Ok(message) => message,
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => break,
            Err(e) => return Err(DlqError::nats(format!("{DLQ_STREAM} read"), e)),
        };
        next = message.sequence + 1;
        let entry = DeadLetter::from_message(message)?;
        if selection.matches(&entry, now) {
            selected.push(entry);
        }
    }
    Ok(selected)
}

/// The dead letter with sequence `seq`.
pub async fn get(js: &jetstream::Context, seq: u64) -> Result<DeadLetter, DlqError> {
    let stream = stream(js).await?;
    match stream.get_raw_message(seq).await {
        Ok(message) => DeadLetter::from_message(message),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
            Err(DlqError::NotFound(seq))
        }
        Err(e) => Err(DlqError::nats(format!("{DLQ_STREAM} get {seq}"), e)),
    }
}

/// Deletes the dead letter `seq`; `Ok(false)` when it was gone already.
pub async fn delete(js: &jetstream::Context, seq: u64) -> Result<bool, DlqError> {
    let stream = stream(js).await?;
    match stream.delete_message(seq).await {
        Ok(deleted) => Ok(deleted),
        // The server answers a missing message with the same error code as
        // any other failed delete; whether the message is still there
        // tells the two apart without reading the error's text.
        Err(e)
            if matches!(e.kind(), DeleteMessageErrorKind::JetStream(ref js_error)
            if js_error.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED) =>
        {
            match stream.get_raw_message(seq).await {
                Err(gone) if gone.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
                _ => Err(DlqError::nats(format!("{DLQ_STREAM} delete {seq}"), e)),
            }
        }
        Err(e) => Err(DlqError::nats(format!("{DLQ_STREAM} delete {seq}"), e)),
    }
}

/// Per handler: how many dead letters, and when the oldest was stored.
pub async fn depths(
    js: &jetstream::Context,
) -> Result<BTreeMap<String, (u64, SystemTime)>, DlqError> {
    let stream = stream(js).await?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut subjects = stream
        .info_with_subjects("dlq.>")
        .await
        .map_err(|e| DlqError::nats(format!("{DLQ_STREAM} info"), e))?;
    while let Some((subject, count)) = subjects
        .try_next()
        .await
        .map_err(|e| DlqError::nats(format!("{DLQ_STREAM} info"), e))?
    {
        if let Some(handler) = subject.split('.').nth(1) {
            *counts.entry(handler.to_string()).or_default() += count as u64;
        }
    }
    let mut depths = BTreeMap::new();
    for (token, count) in counts {
        let oldest = match stream
            .get_first_raw_message_by_subject(format!("dlq.{token}.>"), 1)
            .await
        {
            Ok(message) => message.time.into(),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(DlqError::nats(format!("{DLQ_STREAM} read"), e)),
        };
        let handler = crate::subject::decode_token(&token).unwrap_or(token);
        depths.insert(handler, (count, oldest));
    }
    Ok(depths)
}

/// How long a claim on a dead letter holds before another replay or purge
/// may take it over (its holder died mid-way).
pub const CLAIM_TTL: Duration = Duration::from_secs(600);

/// A claim: who works on a dead letter, since when (Unix ms).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Claim {
    who: String,
    since_ms: u64,
}

fn claim_key(seq: u64) -> String {
    // Three tokens: never an attempt record (`<handler>.<seq>`) nor a park
    // record (`park.<handler>.<provider>.<domain>.<entity>`).
    format!("claim.dlq.{seq}")
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Claims dead letter `seq` for `who`, so one replay or purge works on it
/// at a time (in the `hook_attempts` bucket, key `claim.dlq.<seq>`).
pub async fn claim(
    bucket: &async_nats::jetstream::kv::Store,
    seq: u64,
    who: &str,
) -> Result<(), DlqError> {
    let key = claim_key(seq);
    let now = SystemTime::now();
    let value = serde_json::to_vec(&Claim {
        who: who.to_string(),
        since_ms: unix_ms(now),
    })
    .map_err(|e| DlqError::nats(&key, e))?;
    let entry = bucket
        .entry(&key)
        .await
        .map_err(|e| DlqError::nats(&key, e))?;
    let written = match entry {
        None => bucket
            .create(&key, value.into())
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        Some(entry) => {
            let held = (entry.operation == async_nats::jetstream::kv::Operation::Put)
                .then(|| serde_json::from_slice::<Claim>(&entry.value).ok())
                .flatten()
                .filter(|c| unix_ms(now).saturating_sub(c.since_ms) < CLAIM_TTL.as_millis() as u64);
            if let Some(held) = held {
                return Err(DlqError::Busy { seq, who: held.who });
            }
            bucket
                .update(&key, value.into(), entry.revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
    };
    written.map_err(|_| DlqError::Busy {
        seq,
        who: "another replay or purge".into(),
    })
}

/// Ends a claim.
pub async fn unclaim(bucket: &async_nats::jetstream::kv::Store, seq: u64) {
    let _ = bucket.purge(claim_key(seq)).await;
}
