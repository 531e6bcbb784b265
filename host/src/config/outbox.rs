//! `[[outbox]]`: the PostgreSQL outbox tables relayed into `HOOK_EVENTS`,
//! one entry per source.
//!
//! ```toml
//! [[outbox]]
//! source = "erp"                          # hook.erp.<aggregate type>.…
//! database_url = "env:ERP_DATABASE_URL"   # env:VAR, file:PATH or literal
//! table = "outbox_events"
//! batch = 500
//! poll_interval = "1s"
//! max_attempts = 20
//! backoff = { initial = "1s", max = "5m" }
//! ```
//!
//! Environment overrides name the entry by its source:
//! `HOOKMESH_OUTBOX_<SOURCE>_<KEY>` (`_` in the source stands for `-`), and
//! create the entry when there is none: `HOOKMESH_OUTBOX_ERP_DATABASE_URL=…`
//! alone is a whole relay with the defaults.

use std::time::Duration;

use serde::Deserialize;

use super::{Env, Humane, KeyError, Lenient, env_name, plain_name, resolve_secret};
use crate::manifest::Backoff;
use crate::outbox::db::Database;
use crate::outbox::table::TableName;

/// Rows read per round when not configured.
pub const DEFAULT_BATCH: u32 = 500;
/// The most rows a round may read.
pub const MAX_BATCH: u32 = 10_000;
/// How often the table is polled when not configured (notifications wake
/// relays sooner).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Failed attempts before a row is `failed`, when not configured: with the
/// default backoff, about an hour of NATS outage.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;

/// The keys of an `[[outbox]]` entry an environment variable can set (the
/// `backoff_*` ones set `backoff.initial` and `backoff.max`).
pub(super) const OUTBOX_KEYS: &[&str] = &[
    "database_url",
    "table",
    "batch",
    "poll_interval",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
];

/// One outbox relay: which table, in which database, published as which
/// source, at what pace.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The subject's first token after `hook.` and `Hook-Provider`.
    pub source: String,
    /// The database (its URL resolved from `env:`/`file:`, checked).
    pub database: Database,
    /// The outbox table.
    pub table: TableName,
    /// Rows read per round.
    pub batch: u32,
    /// How often the table is polled without notifications.
    pub poll_interval: Duration,
    /// Failed attempts after which a row is `failed`.
    pub max_attempts: u32,
    /// The pause before the next attempt after a failed one.
    pub backoff: Backoff,
}

impl OutboxConfig {
    /// A relay of `table` in `database` as `source`, with every other
    /// setting at its default.
    pub fn new(source: &str, database: Database, table: TableName) -> OutboxConfig {
        OutboxConfig {
            source: source.to_string(),
            database,
            table,
            batch: DEFAULT_BATCH,
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: default_backoff(),
        }
    }
}

fn default_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(300),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    source: Option<String>,
    database_url: Option<String>,
    table: Option<String>,
    batch: Option<Lenient<u32>>,
    poll_interval: Option<Humane>,
    max_attempts: Option<Lenient<u32>>,
    #[serde(default)]
    backoff: RawBackoff,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawBackoff {
    initial: Option<Humane>,
    max: Option<Humane>,
}

/// Validates every entry; sources must be unique.
pub(super) fn resolve_all(raw: Vec<RawOutbox>, env: &Env) -> Result<Vec<OutboxConfig>, KeyError> {
    let mut resolved: Vec<OutboxConfig> = Vec::new();
    for (i, entry) in raw.into_iter().enumerate() {
        let config = entry.resolve(i, env)?;
        if let Some(first) = resolved.iter().position(|o| o.source == config.source) {
            return Err((
                format!("outbox[{i}].source"),
                format!(
                    "{:?} is already the source of outbox[{first}]",
                    config.source
                ),
            ));
        }
        resolved.push(config);
    }
    Ok(resolved)
}

impl RawOutbox {
    fn resolve(self, i: usize, env: &Env) -> Result<OutboxConfig, KeyError> {
        let key = |k: &str| format!("outbox[{i}].{k}");
        let source = self
            .source
            .ok_or_else(|| (key("source"), "required".to_string()))?;
        if !plain_name(&source) {
            return Err((
                key("source"),
                format!("{source:?}: a source may only contain letters, digits, '_' and '-'"),
            ));
        }
        let reference = self
            .database_url
            .ok_or_else(|| (key("database_url"), "required".to_string()))?;
        let url = resolve_secret(&reference, env)
            .map_err(|m| (key("database_url"), m))?
            .ok_or_else(|| {
                (
                    key("database_url"),
                    format!("{} is not set", env_name(&reference)),
                )
            })?;
        let database = Database::parse(&url).map_err(|e| (key("database_url"), e.to_string()))?;
        let table = match self.table {
            Some(table) => table.parse().map_err(|e| (key("table"), format!("{e}")))?,
            None => TableName::default(),
        };
        let batch = self.batch.map_or(DEFAULT_BATCH, |b| b.0);
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err((key("batch"), format!("must be between 1 and {MAX_BATCH}")));
        }
        let poll_interval = self.poll_interval.map_or(DEFAULT_POLL_INTERVAL, |p| p.0);
        if poll_interval < Duration::from_millis(10) {
            return Err((key("poll_interval"), "must be at least 10ms".into()));
        }
        let max_attempts = self.max_attempts.map_or(DEFAULT_MAX_ATTEMPTS, |m| m.0);
        if max_attempts == 0 {
            return Err((key("max_attempts"), "must be at least 1".into()));
        }
        let defaults = default_backoff();
        let backoff = Backoff {
            initial: self.backoff.initial.map_or(defaults.initial, |d| d.0),
            max: self.backoff.max.map_or(defaults.max, |d| d.0),
        };
        if backoff.initial < Duration::from_millis(1) {
            return Err((key("backoff.initial"), "must be at least 1ms".into()));
        }
        if backoff.max < backoff.initial {
            return Err((
                key("backoff.max"),
                "must not be shorter than backoff.initial".into(),
            ));
        }
        Ok(OutboxConfig {
            source,
            database,
            table,
            batch,
            poll_interval,
            max_attempts,
            backoff,
        })
    }
}

/// Applies `HOOKMESH_OUTBOX_<name>_<key>` to the parsed file: sets `key`
/// on the entry whose source is `name` (compared case-insensitively, `_`
/// standing for `-`), creating the entry when there is none. Returns the
/// dotted key it set.
pub(super) fn set_override(
    table: &mut toml::Table,
    name: &str,
    key: &str,
    value: toml::Value,
) -> Result<String, String> {
    let entries = match table
        .entry("outbox")
        .or_insert_with(|| toml::Value::Array(Vec::new()))
    {
        toml::Value::Array(entries) => entries,
        _ => return Err("outbox is not a list of tables ([[outbox]])".into()),
    };
    let matches = |entry: &toml::Value| {
        entry
            .get("source")
            .and_then(toml::Value::as_str)
            .is_some_and(|s| s.to_ascii_lowercase().replace('-', "_") == name)
    };
    let index = match entries.iter().position(matches) {
        Some(index) => index,
        None => {
            let mut entry = toml::Table::new();
            entry.insert("source".into(), toml::Value::String(name.to_string()));
            entries.push(toml::Value::Table(entry));
            entries.len() - 1
        }
    };
    let toml::Value::Table(entry) = &mut entries[index] else {
        return Err(format!("outbox[{index}] is not a table"));
    };
    let (target, field) = match key.strip_prefix("backoff_") {
        Some(field) => {
            let backoff = entry
                .entry("backoff")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(backoff) = backoff else {
                return Err(format!("outbox[{index}].backoff is not a table"));
            };
            (backoff, format!("backoff.{field}"))
        }
        None => (entry, key.to_string()),
    };
    let leaf = field.rsplit('.').next().unwrap_or(&field).to_string();
    target.insert(leaf, value);
    Ok(format!("outbox[{index}].{field}"))
}

#[cfg(test)]
mod tests;
