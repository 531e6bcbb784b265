//! The audit trail: every deploy, rollback, removal, replay, purge and
//! outbox retry is one JSON message on `HOOK_AUDIT`, subject
//! `audit.<action>.<handler or outbox source>`, so
//! `nats stream view HOOK_AUDIT` answers "who did what, when, to which
//! entries, and how did it end".

use std::time::SystemTime;

use async_nats::jetstream;
use serde::{Deserialize, Serialize};

use crate::config::Config;

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// A handler version was uploaded and activated.
    Deploy,
    /// A handler was set back to an earlier version.
    Rollback,
    /// A handler was removed.
    Remove,
    /// A host refused to activate a version (it did not compile or
    /// instantiate there).
    ActivationFailed,
    /// Dead letters were run through their handler again.
    Replay,
    /// Dead letters were deleted.
    Purge,
    /// Failed outbox rows were put back to pending.
    OutboxRetry,
}

impl Action {
    /// The subject token.
    pub fn token(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Rollback => "rollback",
            Action::Remove => "remove",
            Action::ActivationFailed => "activation-failed",
            Action::Replay => "replay",
            Action::Purge => "purge",
            Action::OutboxRetry => "outbox-retry",
        }
    }
}

/// One dead letter an action touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRef {
    /// Its sequence in `HOOK_DLQ`.
    pub dlq_seq: u64,
    /// The original event's sequence in `HOOK_EVENTS`.
    pub stream_seq: u64,
    /// The original event's subject.
    pub subject: String,
}

/// The outbox rows an action touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRowsRef {
    /// The table.
    pub table: String,
    /// The database (user, host, name; never a password).
    pub database: String,
    /// How many rows.
    pub count: u64,
    /// Their ids, in order (the first 1 000 when there are more).
    pub ids: Vec<i64>,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// What was done.
    pub action: Action,
    /// Who did it (`[operator] actor`, `--actor`, or `$USER@<hostname>`);
    /// for what a host does on its own, `host:<hostname>`.
    pub actor: String,
    /// When (RFC 3339).
    pub at: String,
    /// The handler concerned (for an outbox retry, the outbox source).
    pub handler: String,
    /// How it ended: `ok`, `failed`, `dry-run`, …
    pub outcome: String,
    /// The error, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The handler version concerned (deploy, rollback, replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version it replaced (deploy, rollback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    /// The dead letters concerned (replay, purge).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<DeadLetterRef>,
    /// Whether a replay ran with a fixed payload instead of the original.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_changed: Option<bool>,
    /// The outbox rows concerned (outbox retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxRowsRef>,
}

impl AuditRecord {
    /// A record of `action` on `handler` by `actor`, stamped now, with the
    /// optional fields empty.
    pub fn new(action: Action, actor: &str, handler: &str, outcome: &str) -> Self {
        AuditRecord {
            action,
            actor: actor.to_string(),
            at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            handler: handler.to_string(),
            outcome: outcome.to_string(),
            error: None,
            version: None,
            previous_version: None,
            entries: Vec::new(),
            payload_changed: None,
            outbox: None,
        }
    }

    /// The subject it is stored under.
    pub fn subject(&self) -> String {
        format!(
            "audit.{}.{}",
            self.action.token(),
            crate::subject::encode_token(&self.handler)
        )
    }
}

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit record not written: {0}")]
pub struct AuditError(String);

/// Stores `record` and waits for the server to confirm it.
pub async fn write(js: &jetstream::Context, record: &AuditRecord) -> Result<u64, AuditError> {
    let body = serde_json::to_vec(record).map_err(|e| AuditError(e.to_string()))?;
    let ack = js
        .publish(record.subject(), body.into())
        .await
        .map_err(|e| AuditError(e.to_string()))?
        .await
        .map_err(|e| AuditError(e.to_string()))?;
    Ok(ack.sequence)
}

/// The actor the CLI records: `--actor`, else `[operator] actor`, else
/// `$USER@<hostname>`.
pub fn actor(flag: Option<&str>, config: &Config) -> String {
    flag.map(str::to_string)
        .or_else(|| config.operator.actor.clone())
        .unwrap_or_else(|| {
            let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
            format!("{user}@{}", hostname())
        })
}

/// The actor a host records for what it does on its own.
pub fn host_actor() -> String {
    format!("host:{}", hostname())
}

/// This machine's name (`unknown` when the kernel does not say).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}
