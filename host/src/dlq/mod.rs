//! Dead letters: events a handler gave up on, kept whole in `HOOK_DLQ` so
//! they can be inspected, fixed, replayed and purged.
//!
//! The way in is JetStream's own advisories. When a handler consumer
//! terminates an event (permanent, needs-human) or exhausts `max_deliver`,
//! the server publishes an advisory, which `HOOK_ADVISORIES` captures even
//! while no host runs. The [`writer`] turns each into one `HOOK_DLQ`
//! message: the original payload and headers plus the `Hook-Dlq-*` failure
//! record from the event's attempt record. Its `Nats-Msg-Id` is
//! `<handler>:<stream_seq>`, so an advisory processed twice makes one entry.
//!
//! - [`entry`]: building and reading a dead-letter message.
//! - [`writer`]: the advisory consumer.
//! - [`store`]: listing, reading and deleting entries.
//! - [`park`]: the per-entity parking records of `on_dead_letter = "park"`.
//! - [`replay`]: the request a CLI sends a host to replay an entry.
//! - [`commands`]: `hookmesh dlq …`.

/// `hookmesh dlq …`.
pub mod commands;
pub mod entry;
pub mod replay;
pub mod store;
pub mod writer;

pub use entry::{DeadLetter, DlqReason};

/// The dead-letter stream.
pub const DLQ_STREAM: &str = "HOOK_DLQ";
/// The advisory capture stream.
pub const ADVISORIES_STREAM: &str = "HOOK_ADVISORIES";
/// The durable consumer the dead-letter writers share on `HOOK_ADVISORIES`.
pub const WRITER_CONSUMER: &str = "dlq_writer";

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// NATS refused or did not answer.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
    /// An attempt or park record could not be read or written.
    #[error(transparent)]
    Record(#[from] crate::records::RecordError),
    /// No dead letter has that sequence.
    #[error("no dead letter with sequence {0} in HOOK_DLQ")]
    NotFound(u64),
    /// Another replay or purge is working on the entry.
    #[error("dead letter {seq} is being worked on by {who}; try again once it is done")]
    Busy {
        /// The entry.
        seq: u64,
        /// Who holds it.
        who: String,
    },
    /// A message on `HOOK_DLQ` is not a dead letter hookmesh wrote.
    #[error("HOOK_DLQ sequence {seq}: {message}")]
    Malformed {
        /// Its sequence.
        seq: u64,
        /// What is wrong.
        message: String,
    },
}

impl DlqError {
    pub(crate) fn nats(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        DlqError::Nats {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Consumer names are made and read in one place.
pub use crate::manifest::handler_of_consumer;
