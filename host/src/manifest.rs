//! Handler manifests (`handler.toml`): what a handler is called, which
//! events it takes, how it is retried, and what its sandbox grants.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `concurrency` of a manifest that does not set it.
pub const DEFAULT_CONCURRENCY: u32 = 64;

/// The largest `concurrency` a manifest may ask for.
pub const MAX_CONCURRENCY: u32 = 1024;

/// The most HTTP requests a manifest may allow one invocation.
pub const MAX_REQUESTS: u32 = 1024;

/// The largest `max_response_bytes` a manifest may ask for.
pub const MAX_RESPONSE_BYTES: u64 = 256 << 20;

/// The largest `max_log_lines` a manifest may ask for.
pub const MAX_LOG_LINES: u32 = 100_000;

/// The largest `max_log_bytes` a manifest may ask for: what one invocation
/// may put into the host's log, whatever its manifest says.
pub const MAX_LOG_BYTES: u64 = 16 << 20;

/// The file name the loader looks for.
pub const MANIFEST_FILE: &str = "handler.toml";

/// Why a manifest is unusable; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The file does not parse or a key has a bad value.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file (or `manifest`).
        origin: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// A handler manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The handler's name: `[a-z0-9_-]`, at most 64 bytes. Its consumers are
    /// `handler_<name>_<partition>`; its emits are published as provider
    /// `<name>`.
    pub name: String,
    /// The component file, relative to the manifest (resolved on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<PathBuf>,
    /// The component's sha256 (hex), set when deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Subject filter without `hook.` and without the partition:
    /// `<provider>.<domain>.<entity>.<event type…>` with NATS wildcards.
    pub subject: String,
    /// Deliveries before the event is dead-lettered.
    #[serde(default = "defaults::max_deliver")]
    pub max_deliver: i64,
    /// How long a delivery may stay unacknowledged before the server
    /// redelivers it (long handlers extend it with progress acks).
    #[serde(default = "defaults::ack_wait", with = "humane")]
    pub ack_wait: Duration,
    /// Per-invocation deadline.
    #[serde(default = "defaults::timeout", with = "humane")]
    pub timeout: Duration,
    /// Per-invocation memory cap, e.g. `64MiB`.
    #[serde(default = "defaults::memory", with = "bytesize")]
    pub memory: u64,
    /// Retry delays.
    #[serde(default)]
    pub backoff: Backoff,
    /// Events of this handler in flight per host, across distinct entities
    /// (one entity's events always run one at a time): 1 to
    /// [`MAX_CONCURRENCY`].
    #[serde(default = "defaults::concurrency")]
    pub concurrency: u32,
    /// What the entity's later events do once one of its events is a dead
    /// letter: go on (`continue`) or wait until it is replayed or purged
    /// (`park`).
    #[serde(default)]
    pub on_dead_letter: OnDeadLetter,
    /// What the sandbox grants.
    #[serde(default)]
    pub sandbox: Sandbox,
    /// Where the handler may send HTTP requests (`wasi:http`):
    /// `scheme://host[:port]` entries, e.g. `"https://erp.example.com"`,
    /// `"http://127.0.0.1:8090"`, `"https://*.crm.example.com"`. Empty: no
    /// outgoing HTTP at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// The largest HTTP response body a request may receive, e.g. `4MiB`.
    #[serde(default = "defaults::max_response_bytes", with = "bytesize")]
    pub max_response_bytes: u64,
    /// HTTP requests per invocation, at most.
    #[serde(default = "defaults::max_requests")]
    pub max_requests: u32,
    /// `log` lines per invocation that reach the host's log; past them (or
    /// past `max_log_bytes`) one truncation notice, then nothing.
    #[serde(default = "defaults::max_log_lines")]
    pub max_log_lines: u32,
    /// Bytes of `log` messages per invocation that reach the host's log,
    /// e.g. `256KiB` (each line is also cut at 8 KiB).
    #[serde(default = "defaults::max_log_bytes", with = "bytesize")]
    pub max_log_bytes: u64,
    /// Free-form settings, read by the guest through `config`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

/// What an entity's later events do after one of its events became a dead
/// letter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDeadLetter {
    /// They are handled as usual.
    #[default]
    Continue,
    /// They wait, in order, until the dead letter is replayed successfully
    /// or purged; other entities go on.
    Park,
}

/// Exponential backoff with jitter: `initial`, doubling per attempt, capped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// The first retry's delay.
    #[serde(default = "defaults::backoff_initial", with = "humane")]
    pub initial: Duration,
    /// The longest delay.
    #[serde(default = "defaults::backoff_max", with = "humane")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: defaults::backoff_initial(),
            max: defaults::backoff_max(),
        }
    }
}

impl Backoff {
    /// The delay before delivery `attempt + 1` after `attempt` failed:
    /// `initial · 2^(attempt-1)`, capped at `max`, with ±20 % jitter so
    /// retries of many events do not arrive in lockstep.
    pub fn delay(&self, attempt: u64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32) as u32;
        let base = self
            .initial
            .saturating_mul(2u32.saturating_pow(exponent))
            .min(self.max);
        let jitter = 0.8 + rand::random::<f64>() * 0.4;
        base.mul_f64(jitter).min(self.max)
    }
}

/// Grants. Nothing is visible to a handler unless granted here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// Real wall and monotonic clocks (otherwise both read zero).
    #[serde(default)]
    pub clock: bool,
    /// Environment variables the guest sees (explicit values).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

mod defaults {
    use std::time::Duration;

    pub fn max_deliver() -> i64 {
        10
    }
    pub fn concurrency() -> u32 {
        super::DEFAULT_CONCURRENCY
    }
    pub fn ack_wait() -> Duration {
        Duration::from_secs(30)
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn memory() -> u64 {
        64 << 20
    }
    pub fn backoff_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn backoff_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_response_bytes() -> u64 {
        4 << 20
    }
    pub fn max_requests() -> u32 {
        32
    }
    pub fn max_log_lines() -> u32 {
        1_000
    }
    pub fn max_log_bytes() -> u64 {
        256 << 10
    }
}

impl Manifest {
    /// Parses TOML and validates. `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Manifest, ManifestError> {
        let invalid = |message: String| ManifestError::Invalid {
            origin: origin.to_string(),
            message,
        };
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        manifest.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(manifest)
    }

    /// Reads a manifest file; its `component` is resolved relative to it.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut manifest = Self::from_toml(&text, &path.display().to_string())?;
        if let Some(component) = &manifest.component {
            let base = path.parent().unwrap_or(Path::new("."));
            manifest.component = Some(base.join(component));
        }
        Ok(manifest)
    }

    /// Checks every value (what [`Manifest::from_toml`] does after
    /// parsing); the error names the key.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        let invalid = |key: &'static str, message: String| Err(InvalidValue { key, message });
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return invalid(
                "name",
                format!("use 1–64 characters of [a-z0-9_-], not {:?}", self.name),
            );
        }
        if let Err(e) = partition_filter(&self.subject, 0) {
            return invalid("subject", e.to_string());
        }
        if self.max_deliver < 1 {
            return invalid("max_deliver", "must be at least 1".into());
        }
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return invalid(
                "concurrency",
                format!(
                    "must be 1 to {MAX_CONCURRENCY} (events in flight per host), not {}",
                    self.concurrency
                ),
            );
        }
        if self.timeout < Duration::from_millis(1) {
            return invalid("timeout", "must be at least 1ms".into());
        }
        if self.ack_wait <= self.timeout {
            return invalid("ack_wait", "must be longer than timeout".into());
        }
        if self.memory < (1 << 20) {
            return invalid("memory", "must be at least 1MiB".into());
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return invalid(
                "backoff",
                "initial must be above zero and max at least initial".into(),
            );
        }
        if let Err(bad) = crate::runtime::http::AllowedHosts::parse(&self.allowed_hosts) {
            return invalid(
                "allowed_hosts",
                format!("entry {} {:?}: {}", bad.index + 1, bad.entry, bad.reason),
            );
        }
        if !(1..=MAX_REQUESTS).contains(&self.max_requests) {
            return invalid(
                "max_requests",
                format!(
                    "must be 1 to {MAX_REQUESTS} (HTTP requests per invocation), not {}",
                    self.max_requests
                ),
            );
        }
        if !(1..=MAX_RESPONSE_BYTES).contains(&self.max_response_bytes) {
            return invalid(
                "max_response_bytes",
                format!(
                    "must be 1 byte to {}MiB, not {}",
                    MAX_RESPONSE_BYTES >> 20,
                    self.max_response_bytes
                ),
            );
        }
        if !(1..=MAX_LOG_LINES).contains(&self.max_log_lines) {
            return invalid(
                "max_log_lines",
                format!(
                    "must be 1 to {MAX_LOG_LINES} (log lines per invocation), not {}",
                    self.max_log_lines
                ),
            );
        }
        if !(1..=MAX_LOG_BYTES).contains(&self.max_log_bytes) {
            return invalid(
                "max_log_bytes",
                format!(
                    "must be 1 byte to {}MiB, not {}",
                    MAX_LOG_BYTES >> 20,
                    self.max_log_bytes
                ),
            );
        }
        Ok(())
    }

    /// The durable consumer name for a partition.
    pub fn consumer_name(&self, partition: u32) -> String {
        consumer_name(&self.name, partition)
    }
}

/// A manifest value out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidValue {
    /// The manifest key.
    pub key: &'static str,
    /// What is wrong with its value.
    pub message: String,
}

/// A subject filter that makes no consumer filter; says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

/// `handler_<name>_<partition>`.
pub fn consumer_name(handler: &str, partition: u32) -> String {
    format!("handler_{handler}_{partition}")
}

/// The handler a consumer belongs to: `handler_<name>_<partition>` → `name`.
pub fn handler_of_consumer(consumer: &str) -> Option<&str> {
    let rest = consumer.strip_prefix("handler_")?;
    let (name, partition) = rest.rsplit_once('_')?;
    (!name.is_empty() && !partition.is_empty() && partition.bytes().all(|b| b.is_ascii_digit()))
        .then_some(name)
}

/// The per-partition `HOOK_EVENTS` filter for a manifest subject:
/// `crm.order.>` → `hook.crm.order.<partition>.>`. A `>` in the provider or
/// domain position stands for those tokens too (`crm.>` →
/// `hook.crm.*.<partition>.>`).
pub fn partition_filter(subject: &str, partition: u32) -> Result<String, FilterError> {
    let tokens: Vec<&str> = subject.split('.').collect();
    if tokens
        .iter()
        .any(|t| t.is_empty() || t.contains(char::is_whitespace))
    {
        return Err(FilterError(format!(
            "{subject:?} has an empty or blank token"
        )));
    }
    if tokens
        .iter()
        .position(|t| *t == ">")
        .is_some_and(|i| i != tokens.len() - 1)
    {
        return Err(FilterError(format!(
            "{subject:?}: '>' may only be the last token"
        )));
    }
    if tokens
        .iter()
        .any(|t| *t != "*" && *t != ">" && (t.contains('*') || t.contains('>')))
    {
        return Err(FilterError(format!(
            "{subject:?}: wildcards must be whole tokens"
        )));
    }
    let mut padded: Vec<&str> = tokens.clone();
    while padded.len() < 3 && padded.last() == Some(&">") {
        padded.insert(padded.len() - 1, "*");
    }
    if padded.len() < 4 && padded.last() != Some(&">") {
        return Err(FilterError(format!(
            "{subject:?} needs <provider>.<domain>.<entity>.<event type…> (or end in '>')"
        )));
    }
    let partition = partition.to_string();
    let mut out = vec!["hook", padded[0], padded[1], partition.as_str()];
    out.extend_from_slice(&padded[2..]);
    Ok(out.join("."))
}

/// Loads `DIR/handler.toml` and every `DIR/<name>/handler.toml` (one level:
/// test fixtures kept deeper, like `handlers/fixtures/…`, are not loaded).
pub fn load_dir(dir: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let manifests = manifest_paths(dir)?
        .iter()
        .map(|p| Manifest::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    for m in &manifests {
        if !seen.insert(&m.name) {
            return Err(ManifestError::Invalid {
                origin: dir.display().to_string(),
                message: format!("two manifests name the handler {:?}", m.name),
            });
        }
    }
    Ok(manifests)
}

/// The manifest files [`load_dir`] reads: `DIR/handler.toml` and every
/// `DIR/<name>/handler.toml`, in name order.
pub fn manifest_paths(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read = |source| ManifestError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    if dir.join(MANIFEST_FILE).is_file() {
        paths.push(dir.join(MANIFEST_FILE));
    }
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let candidate = entry.path().join(MANIFEST_FILE);
        if candidate.is_file() {
            paths.push(candidate);
        }
    }
    Ok(paths)
}

/// Humane durations (`90s`, `5m`) in TOML.
mod humane {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"500ms\" or \"30s\": {e}"
            ))
        })
    }
}

/// Sizes like `64MiB`, `512KiB`, `1GiB` or a plain byte count.
mod bytesize {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &u64, s: S) -> Result<S::Ok, S::Error> {
        if bytes.is_multiple_of(1 << 20) {
            s.serialize_str(&format!("{}MiB", bytes >> 20))
        } else {
            s.serialize_str(&bytes.to_string())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(n),
            Raw::Text(text) => parse(&text).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a size like \"64MiB\", \"512KiB\" or \"1GiB\""
                ))
            }),
        }
    }

    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number.parse().ok()?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            _ => return None,
        };
        number.checked_mul(1 << shift)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER_SYNC: &str = r#"
name = "order-sync"
component = "../target/wasm32-wasip2/release/order_sync.wasm"
subject = "crm.order.>"
max_deliver = 10
ack_wait = "30s"
timeout = "2s"
memory = "64MiB"
[backoff]
initial = "1s"
max = "5m"
[sandbox]
clock = false
env = {}
[config]
erp_prefix = "SO-"
"#;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::from_toml(ORDER_SYNC, "handler.toml").expect("valid");
        assert_eq!(m.name, "order-sync");
        assert_eq!(m.timeout, Duration::from_secs(2));
        assert_eq!(m.memory, 64 << 20);
        assert_eq!(m.backoff.max, Duration::from_secs(300));
        assert_eq!(m.config["erp_prefix"], "SO-");
        assert_eq!(m.consumer_name(7), "handler_order-sync_7");
        let round = toml::to_string(&m).expect("serializes");
        assert_eq!(Manifest::from_toml(&round, "again").expect("valid"), m);
    }

    #[test]
    fn defaults_fill_the_rest() {
        let m = Manifest::from_toml("name = \"x\"\nsubject = \"crm.>\"\n", "m").expect("valid");
        assert_eq!(
            (m.max_deliver, m.ack_wait, m.timeout, m.memory),
            (
                10,
                Duration::from_secs(30),
                Duration::from_secs(5),
                64 << 20
            )
        );
        assert!(!m.sandbox.clock && m.sandbox.env.is_empty());
        assert_eq!(m.concurrency, 64);
        assert!(
            m.allowed_hosts.is_empty(),
            "no outgoing HTTP unless granted"
        );
        assert_eq!((m.max_response_bytes, m.max_requests), (4 << 20, 32));
    }

    #[test]
    fn consumer_names_give_their_handler() {
        assert_eq!(
            handler_of_consumer("handler_order-sync_7"),
            Some("order-sync")
        );
        assert_eq!(handler_of_consumer("handler_a_b_12"), Some("a_b"));
        assert_eq!(handler_of_consumer("handler__3"), None);
        assert_eq!(handler_of_consumer("handler_x_"), None);
        assert_eq!(handler_of_consumer("handler_x_y"), None);
        assert_eq!(handler_of_consumer("dlq_writer"), None);
        assert_eq!(
            handler_of_consumer(&consumer_name("a_b-c", 15)),
            Some("a_b-c"),
            "what consumer_name makes, handler_of_consumer reads"
        );
    }

    #[test]
    fn partition_filters() {
        assert_eq!(
            partition_filter("crm.order.>", 7).as_deref(),
            Ok("hook.crm.order.7.>")
        );
        assert_eq!(
            partition_filter("crm.return.*.return.approved", 0).as_deref(),
            Ok("hook.crm.return.0.*.return.approved")
        );
        assert_eq!(
            partition_filter("crm.>", 3).as_deref(),
            Ok("hook.crm.*.3.>")
        );
        assert_eq!(partition_filter(">", 3).as_deref(), Ok("hook.*.*.3.>"));
        assert!(partition_filter("crm.order", 0).is_err());
        assert!(partition_filter("crm.>.x", 0).is_err());
        assert!(partition_filter("crm..x.y", 0).is_err());
        assert!(partition_filter("crm.ord*.x.y", 0).is_err());
    }

    #[test]
    fn bad_manifests_name_the_key() {
        let cases = [
            (
                "name = \"Order Sync\"\nsubject = \"crm.>\"",
                "name: use 1–64 characters of [a-z0-9_-], not \"Order Sync\"",
            ),
            (
                "name = \"x\"\nsubject = \"crm.order\"",
                "subject: \"crm.order\" needs <provider>.<domain>.<entity>.<event type…> (or end in '>')",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nmax_deliver = 0",
                "max_deliver: must be at least 1",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\ntimeout = \"1m\"\nack_wait = \"30s\"",
                "ack_wait: must be longer than timeout",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nmemory = \"lots\"",
                "\"lots\" is not a size like \"64MiB\", \"512KiB\" or \"1GiB\"",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nconcurrency = 0",
                "concurrency: must be 1 to 1024 (events in flight per host), not 0",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nconcurrency = 2000",
                "concurrency: must be 1 to 1024 (events in flight per host), not 2000",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nbogus = 1",
                "unknown field `bogus`",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nallowed_hosts = [\"https://erp.example.com\", \"erp.example.com\"]",
                "allowed_hosts: entry 2 \"erp.example.com\": needs a scheme: write \"https://erp.example.com\"",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nallowed_hosts = [\"https://*\"]",
                "allowed_hosts: entry 1 \"https://*\": a bare * would allow every host",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nmax_requests = 0",
                "max_requests: must be 1 to 1024 (HTTP requests per invocation), not 0",
            ),
            (
                "name = \"x\"\nsubject = \"crm.>\"\nmax_response_bytes = \"1GiB\"",
                "max_response_bytes: must be 1 byte to 256MiB, not 1073741824",
            ),
        ];
        for (text, expected) in cases {
            let err = Manifest::from_toml(text, "m.toml")
                .expect_err(text)
                .to_string();
            assert!(
                err.starts_with("m.toml: ") && err.contains(expected),
                "{err} ∌ {expected}"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let first = b.delay(1);
            assert!(
                first >= Duration::from_millis(80) && first <= Duration::from_millis(120),
                "{first:?}"
            );
            let third = b.delay(3);
            assert!(
                third >= Duration::from_millis(320) && third <= Duration::from_millis(480),
                "{third:?}"
            );
            assert!(b.delay(40) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(bytesize::parse("16MiB"), Some(16 << 20));
        assert_eq!(bytesize::parse("512KiB"), Some(512 << 10));
        assert_eq!(bytesize::parse("1GiB"), Some(1 << 30));
        assert_eq!(bytesize::parse("4096"), Some(4096));
        assert_eq!(bytesize::parse("4MB"), None);
    }
}
