//! The records dispatch and dead letters share, kept in the `hook_attempts`
//! bucket: what each failing delivery did ([`attempts`]) and the entities
//! whose events wait outside the window — held for a backoff or parked
//! behind a dead letter ([`park`]). Both dispatch and the dead-letter code
//! use them; neither owns them.
//!
//! Every record is JSON, and every change is a compare-and-set on the
//! record's revision ([`modify`]): partition owners, drainers, replays and
//! purges on any host may write the same record, and none loses another's
//! change.

pub mod attempts;
pub mod park;

use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How often a change is re-read and re-applied when other writers keep
/// getting there first.
const MAX_CONFLICTS: usize = 64;

/// A record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// NATS refused or did not answer.
    #[error("record {key}: {source}")]
    Nats {
        /// The record's key.
        key: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// The stored record does not decode: what it held is unknown, so it is
    /// never taken for "no record".
    #[error("record {key} is unreadable: {source}")]
    Unreadable {
        /// The record's key.
        key: String,
        /// Why it does not decode.
        #[source]
        source: serde_json::Error,
    },
    /// The record could not be encoded.
    #[error("record {key} cannot be encoded: {source}")]
    Encode {
        /// The record's key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Other writers changed the record every time it was read.
    #[error("record {key}: too many concurrent changes")]
    Contended {
        /// The record's key.
        key: String,
    },
}

impl RecordError {
    fn nats(key: &str, source: impl Into<async_nats::Error>) -> Self {
        RecordError::Nats {
            key: key.to_string(),
            source: source.into(),
        }
    }
}

/// Reads the record at `key` (`None` when there is none or it was deleted)
/// and the revision to compare against when writing it.
pub(crate) async fn read<R: DeserializeOwned>(
    bucket: &kv::Store,
    key: &str,
) -> Result<(Option<R>, Option<u64>), RecordError> {
    let entry = bucket
        .entry(key)
        .await
        .map_err(|e| RecordError::nats(key, e))?;
    Ok(match entry {
        Some(entry) if entry.operation == Operation::Put => {
            let record =
                serde_json::from_slice(&entry.value).map_err(|source| RecordError::Unreadable {
                    key: key.to_string(),
                    source,
                })?;
            (Some(record), Some(entry.revision))
        }
        Some(entry) => (None, Some(entry.revision)),
        None => (None, None),
    })
}

/// What a change does to a record.
pub(crate) enum Change<R, T> {
    /// Write this record.
    Put(R, T),
    /// Delete the record.
    Delete(T),
    /// Leave it.
    Keep(T),
}

/// Applies `change` to the record at `key` with compare-and-set, re-reading
/// and re-applying it when another writer got there first.
pub(crate) async fn modify<R, T>(
    bucket: &kv::Store,
    key: &str,
    mut change: impl FnMut(Option<R>) -> Change<R, T>,
) -> Result<T, RecordError>
where
    R: Serialize + DeserializeOwned,
{
    for _ in 0..MAX_CONFLICTS {
        let (record, revision) = read::<R>(bucket, key).await?;
        let existed = record.is_some();
        let written = match change(record) {
            Change::Keep(result) => return Ok(result),
            Change::Delete(result) if !existed => return Ok(result),
            Change::Put(record, result) => {
                let value = serde_json::to_vec(&record).map_err(|source| RecordError::Encode {
                    key: key.to_string(),
                    source,
                })?;
                let value = Bytes::from(value);
                let written = match revision {
                    Some(revision) => bucket
                        .update(key, value, revision)
                        .await
                        .map(drop)
                        .map_err(Written::of_update),
                    None => bucket
                        .create(key, value)
                        .await
                        .map(drop)
                        .map_err(Written::of_create),
                };
                written.map(|()| result)
            }
            Change::Delete(result) => bucket
                .delete_expect_revision(key, revision)
                .await
                .map(|()| result)
                .map_err(Written::of_update),
        };
        match written {
            Ok(result) => return Ok(result),
            // Another writer changed the record since it was read: again.
            Err(Written::Conflict) => continue,
            Err(Written::Failed(source)) => {
                return Err(RecordError::Nats {
                    key: key.to_string(),
                    source,
                });
            }
        }
    }
    Err(RecordError::Contended {
        key: key.to_string(),
    })
}

/// Why a compare-and-set write did not land.
enum Written {
    /// The record changed since it was read.
    Conflict,
    /// NATS failed.
    Failed(async_nats::Error),
}

impl Written {
    /// An update or delete (a delete is an update in KV).
    fn of_update(e: kv::UpdateError) -> Written {
        match e.kind() {
            kv::UpdateErrorKind::WrongLastRevision => Written::Conflict,
            _ => Written::Failed(e.into()),
        }
    }

    fn of_create(e: kv::CreateError) -> Written {
        match e.kind() {
            kv::CreateErrorKind::AlreadyExists => Written::Conflict,
            _ => Written::Failed(e.into()),
        }
    }
}
