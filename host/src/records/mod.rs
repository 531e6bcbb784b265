//! The records dispatch and dead letters share, kept in the `hook_attempts`
//! bucket: what each failing delivery did ([`attempts`]) and the entities
//! whose events wait outside the window — held for a backoff or parked
//! behind a dead letter ([`park`]). Both dispatch and the dead-letter code
//! use them; neither owns them.

pub mod attempts;
pub mod park;

/// A record could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {message}")]
pub struct RecordError {
    /// The record.
    pub what: String,
    /// What NATS (or the record's encoding) said.
    pub message: String,
}

impl RecordError {
    pub(crate) fn new(what: impl Into<String>, error: impl std::fmt::Display) -> Self {
        RecordError {
            what: what.into(),
            message: error.to_string(),
        }
    }
}

impl From<RecordError> for crate::dlq::DlqError {
    fn from(e: RecordError) -> Self {
        crate::dlq::DlqError::Nats {
            what: e.what,
            message: e.message,
        }
    }
}
