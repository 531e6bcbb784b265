//! The typed configuration (`hookmesh.toml`).
//!
//! Loading goes in three layers: the file (or, without one, the built-in
//! development defaults of `config/dev.toml`), then `HOOKMESH_<SECTION>_<KEY>`
//! environment overrides, then validation into [`Config`]. Everything that can
//! be wrong — an unknown key, a bad duration, a secret that cannot be
//! resolved, a value source that is not `header:`/`json:` — fails here, at
//! start, with a message naming the key; nothing is checked lazily later.
//!
//! Secrets are `env:VAR`, `file:PATH` or a literal. A provider may list
//! several (rotation): an `env:` secret whose variable is unset is skipped
//! with a warning as long as another secret of that provider resolves; a
//! provider left with no secret at all is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::http::HeaderName;
use serde::Deserialize;

use crate::verify::{Encoding, GenericHmac, Scheme, SecretKey, Verifier};

mod http;
mod nats;
mod outbox;
mod outgoing;
pub use http::{DEFAULT_MAX_BODY_BYTES, HEADER_BUDGET, HttpConfig};
pub use nats::{Creds, MAX_REPLICAS, NatsAuth, NatsConfig};
pub use outbox::OutboxConfig;
mod telemetry;
pub use telemetry::TelemetryConfig;

/// The built-in development configuration used when no file is given.
pub const DEV_CONFIG: &str = include_str!("../config/dev.toml");

/// The file looked for in the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "hookmesh.toml";

/// Environment variables with the `HOOKMESH_` prefix that are not overrides.
const RESERVED_ENV: &[&str] = &[
    "HOOKMESH_CONFIG",
    "HOOKMESH_LOG",
    "HOOKMESH_ACTOR",
    "HOOKMESH_MOCK_ERP",
    "HOOKMESH_MOCK_ERP_BIN",
];

/// The keys a provider table accepts; also used to split provider overrides
/// (`HOOKMESH_PROVIDERS_<NAME>_<KEY>`) where names and keys contain `_`.
const PROVIDER_KEYS: &[&str] = &[
    "scheme",
    "secrets",
    "event_id",
    "event_type",
    "domain",
    "entity_id",
    "entity_version",
    "tolerance",
    "signature_header",
    "encoding",
    "prefix",
    "timestamp_header",
];

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{origin} is not valid TOML: {message}")]
    Syntax {
        /// Where the text came from.
        origin: String,
        /// The parser's message.
        message: String,
    },
    /// A key has a value of the wrong shape, or is unknown.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// The dotted key (`providers.crm.tolerance`).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An environment override cannot be applied.
    #[error("{var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong.
        message: String,
    },
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file given with `--config` or found in the working directory.
    File(PathBuf),
    /// The built-in development defaults.
    Builtin,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Builtin => f.write_str("built-in development config"),
        }
    }
}

/// A snapshot of environment variables, so loading is a pure function of its
/// inputs (tests pass their own; the binary passes the process's).
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    /// The current process environment (non-UTF-8 variables are skipped).
    pub fn from_process() -> Self {
        Env(std::env::vars().collect())
    }

    /// An environment made of the given pairs.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Env(pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect())
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// `[operator]`: who is at the keyboard, for the audit trail.
#[derive(Debug, Clone, Default)]
pub struct OperatorConfig {
    /// The actor recorded for deploys, rollbacks, replays and purges
    /// (`--actor` overrides it; unset means `$USER@<hostname>`).
    pub actor: Option<String>,
}

/// `[admin]`: the operators' listener — `/metrics`, the health routes and
/// the console — apart from the providers' webhook listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to listen on (default `127.0.0.1:9464`).
    pub listen: SocketAddr,
    /// The token that anything changing state (the console's replay and
    /// purge) must present; unset, the admin listener only reads.
    pub token: Option<Redacted>,
}

/// The shortest admin token accepted: a guessable token guards nothing.
pub const ADMIN_TOKEN_MIN_CHARS: usize = 16;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event (the default).
    #[default]
    Human,
    /// One JSON object per line, span fields merged in, for log shippers.
    Json,
}

/// `[log]`: how the host writes its log (the filter stays `HOOKMESH_LOG`).
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from.
    pub origin: Origin,
    /// The NATS connection.
    pub nats: NatsConfig,
    /// The HTTP listener.
    pub http: HttpConfig,
    /// Ingest behaviour.
    pub ingest: IngestConfig,
    /// Providers by name (the `{provider}` of `/webhooks/{provider}`).
    pub providers: BTreeMap<String, Provider>,
    /// Who the CLI records as the actor in `HOOK_AUDIT`.
    pub operator: OperatorConfig,
    /// The admin listener.
    pub admin: AdminConfig,
    /// The log format.
    pub log: LogConfig,
    /// The PostgreSQL outbox tables relayed into `HOOK_EVENTS` (`[[outbox]]`).
    pub outbox: Vec<OutboxConfig>,
    /// Headers the host adds to handlers' outgoing requests
    /// (`[[outgoing.credentials]]`).
    pub outgoing_credentials: crate::runtime::http::Credentials,
    /// Traces over OTLP (`[telemetry]`).
    pub telemetry: TelemetryConfig,
    /// Things worth a warning at start (e.g. a skipped rotation secret).
    pub warnings: Vec<String>,
}

/// A secret value that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Ingest behaviour.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// `HOOK_EVENTS`' duplicate window (`Nats-Msg-Id` dedup horizon).
    pub duplicate_window: Duration,
    /// How long idempotency keys are kept (1–30 days).
    pub idempotency_ttl: Duration,
    /// How long to wait for JetStream before answering 503.
    pub publish_timeout: Duration,
    /// The `Retry-After` given with a 503.
    pub retry_after: Duration,
    /// How long `HOOK_EVENTS` keeps events.
    pub max_age: Duration,
    /// Partition count (fixed for the life of the stream).
    pub partitions: u32,
}

/// Where one field of an event comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A request header.
    Header(HeaderName),
    /// A JSON pointer (RFC 6901) into the body.
    Json(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Header(name) => write!(f, "header:{name}"),
            Source::Json(pointer) => write!(f, "json:{pointer}"),
        }
    }
}

/// Where each field of a provider's events comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSources {
    /// The provider's own event id (optional: without it the idempotency key
    /// is derived from the content).
    pub event_id: Option<Source>,
    /// The event type, e.g. `order.created` (required).
    pub event_type: Source,
    /// The domain; defaults to the event type's first segment.
    pub domain: Option<Source>,
    /// The entity the event is about (required).
    pub entity_id: Source,
    /// The entity's version or update time, when the provider sends one.
    pub entity_version: Option<Source>,
}

/// One provider: how to verify and how to read its webhooks.
#[derive(Debug, Clone)]
pub struct Provider {
    /// The provider's name (the URL path segment and the subject token).
    pub name: String,
    /// Signature verification.
    pub verifier: Verifier,
    /// Field extraction.
    pub fields: FieldSources,
}

impl Config {
    /// Loads `path`, or `hookmesh.toml` in the working directory when present,
    /// or the built-in development defaults; then applies `env` overrides.
    pub fn load(path: Option<&Path>, env: &Env) -> Result<Config, ConfigError> {
        let local = Path::new(DEFAULT_FILE);
        match path {
            Some(path) => Self::load_file(path, env),
            None if local.exists() => Self::load_file(local, env),
            None => Self::from_toml(DEV_CONFIG, Origin::Builtin, env),
        }
    }

    /// Loads a file, then applies `env` overrides.
    pub fn load_file(path: &Path, env: &Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, Origin::File(path.to_path_buf()), env)
    }

    /// Parses TOML text, applies `env` overrides and validates.
    pub fn from_toml(text: &str, origin: Origin, env: &Env) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    origin: origin.to_string(),
                    message: located(text, &e),
                })?;
        let overrides = apply_env_overrides(&mut table, env)?;
        // An error in a value that came from the environment names the
        // variable, not the file.
        let origin_of = |key: &str| {
            overrides
                .iter()
                .find(|(k, _)| {
                    key == k
                        || key.starts_with(&format!("{k}."))
                        || key.starts_with(&format!("{k}["))
                })
                .map_or_else(|| origin.to_string(), |(_, var)| var.clone())
        };
        let raw: RawConfig =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Invalid {
                    origin: origin_of(&key),
                    message: e.inner().message().to_string(),
                    key,
                }
            })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            origin: origin_of(&key),
            key,
            message,
        };
        let mut warnings = Vec::new();
        let nats = raw.nats.resolve(env).map_err(|(k, m)| invalid(k, m))?;
        let ingest = raw.ingest.resolve().map_err(|(k, m)| invalid(k, m))?;
        let admin = raw.admin.resolve(env).map_err(|(k, m)| invalid(k, m))?;
        let mut providers = BTreeMap::new();
        for (name, provider) in raw.providers {
            let provider = provider
                .resolve(&name, env, &mut warnings)
                .map_err(|(k, m)| invalid(k, m))?;
            providers.insert(name, provider);
        }
        let outbox = outbox::resolve_all(raw.outbox, env).map_err(|(k, m)| invalid(k, m))?;
        let outgoing_credentials = raw.outgoing.resolve(env).map_err(|(k, m)| invalid(k, m))?;
        let telemetry = raw.telemetry.resolve(env).map_err(|(k, m)| invalid(k, m))?;
        let http = raw.http.resolve().map_err(|(k, m)| invalid(k, m))?;
        Ok(Config {
            origin,
            nats,
            http,
            ingest,
            providers,
            operator: OperatorConfig {
                actor: raw.operator.actor.filter(|a| !a.trim().is_empty()),
            },
            admin,
            log: LogConfig {
                format: raw.log.format,
            },
            outbox,
            outgoing_credentials,
            telemetry,
            warnings,
        })
    }
}

/// A TOML error with its line and column.
fn located(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {}", e.message())
        }
        None => e.message().to_string(),
    }
}

/// How a provider name appears in a dotted key: quoted unless it is a bare
/// TOML key.
fn provider_key(name: &str) -> String {
    if plain_name(name) {
        format!("providers.{name}")
    } else {
        format!("providers.{name:?}")
    }
}

/// Whether a name (a provider, an outbox source) is one plain subject
/// token: letters, digits, `_` and `-`.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A failure inside validation: the dotted key and the message.
type KeyError = (String, String);

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    nats: nats::RawNats,
    http: http::RawHttp,
    ingest: RawIngest,
    providers: BTreeMap<String, RawProvider>,
    operator: RawOperator,
    admin: RawAdmin,
    log: RawLog,
    outbox: Vec<outbox::RawOutbox>,
    outgoing: outgoing::RawOutgoing,
    telemetry: telemetry::RawTelemetry,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: Address,
    token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: Address(SocketAddr::from(([127, 0, 0, 1], 9464))),
            token: None,
        }
    }
}

impl RawAdmin {
    fn resolve(self, env: &Env) -> Result<AdminConfig, KeyError> {
        let key = "admin.token";
        let token = match self.token {
            None => None,
            Some(reference) => match resolve_secret(&reference, env) {
                Ok(Some(token)) if token.chars().count() < ADMIN_TOKEN_MIN_CHARS => {
                    return Err((
                        key.into(),
                        format!("must be at least {ADMIN_TOKEN_MIN_CHARS} characters"),
                    ));
                }
                Ok(Some(token)) => Some(Redacted(token)),
                Ok(None) => {
                    return Err((key.into(), format!("{} is not set", env_name(&reference))));
                }
                Err(message) => return Err((key.into(), message)),
            },
        };
        Ok(AdminConfig {
            listen: self.listen.0,
            token,
        })
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: LogFormat,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawOperator {
    actor: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIngest {
    duplicate_window: Humane,
    idempotency_ttl: Humane,
    publish_timeout: Humane,
    retry_after: Humane,
    max_age: Humane,
    partitions: Lenient<u32>,
}

impl Default for RawIngest {
    fn default() -> Self {
        RawIngest {
            duplicate_window: Humane(Duration::from_secs(120)),
            idempotency_ttl: Humane(Duration::from_secs(7 * 86_400)),
            publish_timeout: Humane(Duration::from_secs(5)),
            retry_after: Humane(Duration::from_secs(5)),
            max_age: Humane(Duration::from_secs(7 * 86_400)),
            partitions: Lenient(16),
        }
    }
}

impl RawIngest {
    fn resolve(self) -> Result<IngestConfig, KeyError> {
        const DAY: u64 = 86_400;
        let ttl = self.idempotency_ttl.0;
        if ttl < Duration::from_secs(DAY) || ttl > Duration::from_secs(30 * DAY) {
            return Err((
                "ingest.idempotency_ttl".into(),
                "must be between 1d and 30d".into(),
            ));
        }
        if self.duplicate_window.0 < Duration::from_secs(1) {
            return Err((
                "ingest.duplicate_window".into(),
                "must be at least 1s".into(),
            ));
        }
        if self.duplicate_window.0 > self.max_age.0 {
            return Err((
                "ingest.duplicate_window".into(),
                "must not exceed ingest.max_age".into(),
            ));
        }
        if self.publish_timeout.0 < Duration::from_millis(10) {
            return Err((
                "ingest.publish_timeout".into(),
                "must be at least 10ms".into(),
            ));
        }
        if !(1..=4096).contains(&self.partitions.0) {
            return Err((
                "ingest.partitions".into(),
                "must be between 1 and 4096".into(),
            ));
        }
        Ok(IngestConfig {
            duplicate_window: self.duplicate_window.0,
            idempotency_ttl: ttl,
            publish_timeout: self.publish_timeout.0,
            retry_after: self.retry_after.0.max(Duration::from_secs(1)),
            max_age: self.max_age.0,
            partitions: self.partitions.0,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    scheme: RawScheme,
    #[serde(default)]
    secrets: OneOrMany,
    event_id: Option<String>,
    event_type: Option<String>,
    domain: Option<String>,
    entity_id: Option<String>,
    entity_version: Option<String>,
    tolerance: Option<Humane>,
    signature_header: Option<String>,
    encoding: Option<RawEncoding>,
    prefix: Option<String>,
    timestamp_header: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum RawScheme {
    StandardWebhooks,
    Stripe,
    Github,
    Shopify,
    HmacSha256,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawEncoding {
    Hex,
    Base64,
}

impl RawProvider {
    fn resolve(
        self,
        name: &str,
        env: &Env,
        warnings: &mut Vec<String>,
    ) -> Result<Provider, KeyError> {
        let key = |k: &str| format!("{}.{k}", provider_key(name));
        if !plain_name(name) {
            return Err((
                provider_key(name),
                "a provider name may only contain letters, digits, '_' and '-'".into(),
            ));
        }
        if name.len() > crate::subject::limits::NAME_MAX {
            return Err((
                provider_key(name),
                format!(
                    "a provider name may be at most {} bytes long",
                    crate::subject::limits::NAME_MAX
                ),
            ));
        }
        let scheme = self.scheme(name)?;
        let defaults = scheme_defaults(self.scheme);
        let source = |k: &str,
                      given: Option<String>,
                      default: Option<&str>|
         -> Result<Option<Source>, KeyError> {
            given
                .as_deref()
                .or(default)
                .map(|s| parse_source(s).map_err(|m| (key(k), m)))
                .transpose()
        };
        let required =
            |k: &str, given: Option<String>, default: Option<&str>| -> Result<Source, KeyError> {
                source(k, given, default)?
                    .ok_or_else(|| (key(k), "required for this scheme".to_string()))
            };
        let fields = FieldSources {
            event_id: source("event_id", self.event_id, defaults.event_id)?,
            event_type: required("event_type", self.event_type, defaults.event_type)?,
            domain: source("domain", self.domain, defaults.domain)?,
            entity_id: required("entity_id", self.entity_id, defaults.entity_id)?,
            entity_version: source("entity_version", self.entity_version, None)?,
        };
        let mut secrets = Vec::new();
        let mut unset = Vec::new();
        for (i, reference) in self.secrets.0.iter().enumerate() {
            let k = format!("{}.secrets[{i}]", provider_key(name));
            match resolve_secret(reference, env).map_err(|m| (k.clone(), m))? {
                Some(value) => {
                    secrets.push(SecretKey::parse(&scheme, &value).map_err(|e| (k, e.to_string()))?)
                }
                None => unset.push((k, env_name(reference))),
            }
        }
        if secrets.is_empty() {
            let why = if unset.is_empty() {
                "no secret configured".to_string()
            } else {
                let vars: Vec<_> = unset.iter().map(|(_, var)| var.as_str()).collect();
                format!("no secret available: {} not set", vars.join(", "))
            };
            return Err((key("secrets"), why));
        }
        for (k, var) in unset {
            warnings.push(format!(
                "{k}: {var} is not set; using the provider's other secrets"
            ));
        }
        let tolerance = self.tolerance.map_or(Duration::from_secs(300), |t| t.0);
        if tolerance < Duration::from_secs(1) {
            return Err((key("tolerance"), "must be at least 1s".into()));
        }
        Ok(Provider {
            name: name.to_string(),
            verifier: Verifier {
                scheme,
                secrets,
                tolerance,
            },
            fields,
        })
    }

    fn scheme(&self, name: &str) -> Result<Scheme, KeyError> {
        let key = |k: &str| format!("{}.{k}", provider_key(name));
        let generic_only = [
            ("signature_header", self.signature_header.is_some()),
            ("encoding", self.encoding.is_some()),
            ("prefix", self.prefix.is_some()),
            ("timestamp_header", self.timestamp_header.is_some()),
        ];
        let misplaced = generic_only.iter().find(|(_, set)| *set);
        if let (true, Some((k, _))) = (self.scheme != RawScheme::HmacSha256, misplaced) {
            return Err((key(k), "only applies to scheme = \"hmac-sha256\"".into()));
        }
        Ok(match self.scheme {
            RawScheme::StandardWebhooks => Scheme::StandardWebhooks,
            RawScheme::Stripe => Scheme::Stripe,
            RawScheme::Github => Scheme::Github,
            RawScheme::Shopify => Scheme::Shopify,
            RawScheme::HmacSha256 => {
                let header = self.signature_header.clone().ok_or_else(|| {
                    (
                        key("signature_header"),
                        "required for scheme = \"hmac-sha256\"".to_string(),
                    )
                })?;
                let check = |k: &str, v: &str| {
                    HeaderName::try_from(v)
                        .map(|_| v.to_string())
                        .map_err(|_| (key(k), format!("{v:?} is not a valid header name")))
                };
                Scheme::Hmac(GenericHmac {
                    signature_header: check("signature_header", &header)?,
                    encoding: match self.encoding {
                        Some(RawEncoding::Base64) => Encoding::Base64,
                        Some(RawEncoding::Hex) | None => Encoding::Hex,
                    },
                    prefix: self.prefix.clone().filter(|p| !p.is_empty()),
                    timestamp_header: self
                        .timestamp_header
                        .as_deref()
                        .map(|h| check("timestamp_header", h))
                        .transpose()?,
                })
            }
        })
    }
}

/// Per-scheme defaults for the value sources.
struct SchemeDefaults {
    event_id: Option<&'static str>,
    event_type: Option<&'static str>,
    domain: Option<&'static str>,
    entity_id: Option<&'static str>,
}

fn scheme_defaults(scheme: RawScheme) -> SchemeDefaults {
    match scheme {
        RawScheme::StandardWebhooks => SchemeDefaults {
            event_id: Some("header:webhook-id"),
            event_type: Some("json:/type"),
            domain: None,
            entity_id: Some("json:/data/id"),
        },
        RawScheme::Stripe => SchemeDefaults {
            event_id: Some("json:/id"),
            event_type: Some("json:/type"),
            domain: Some("json:/data/object/object"),
            entity_id: Some("json:/data/object/id"),
        },
        RawScheme::Github => SchemeDefaults {
            event_id: Some("header:X-GitHub-Delivery"),
            event_type: Some("header:X-GitHub-Event"),
            domain: None,
            entity_id: Some("json:/repository/full_name"),
        },
        RawScheme::Shopify => SchemeDefaults {
            event_id: Some("header:X-Shopify-Webhook-Id"),
            event_type: Some("header:X-Shopify-Topic"),
            domain: None,
            entity_id: Some("json:/id"),
        },
        RawScheme::HmacSha256 => SchemeDefaults {
            event_id: None,
            event_type: None,
            domain: None,
            entity_id: None,
        },
    }
}

/// Parses `header:NAME` or `json:POINTER`.
pub fn parse_source(text: &str) -> Result<Source, String> {
    if let Some(name) = text.strip_prefix("header:") {
        HeaderName::try_from(name)
            .map(Source::Header)
            .map_err(|_| format!("{name:?} is not a valid header name"))
    } else if let Some(pointer) = text.strip_prefix("json:") {
        if pointer.is_empty() || pointer.starts_with('/') {
            Ok(Source::Json(pointer.to_string()))
        } else {
            Err(format!(
                "{pointer:?} is not a JSON pointer (RFC 6901): it must start with '/'"
            ))
        }
    } else {
        Err(format!(
            "{text:?} must be \"header:NAME\" or \"json:/pointer\""
        ))
    }
}

/// Resolves `env:VAR`, `file:PATH` or a literal. `Ok(None)`: the variable is
/// unset or empty.
fn resolve_secret(reference: &str, env: &Env) -> Result<Option<String>, String> {
    if let Some(var) = reference.strip_prefix("env:") {
        Ok(env.get(var).filter(|v| !v.is_empty()).map(str::to_string))
    } else if let Some(path) = reference.strip_prefix("file:") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.is_empty() {
            return Err(format!("secret file {path} is empty"));
        }
        Ok(Some(text.to_string()))
    } else if reference.is_empty() {
        Err("empty secret".into())
    } else {
        Ok(Some(reference.to_string()))
    }
}

/// Resolves a secret reference given on the command line (`env:VAR`,
/// `file:PATH` or a literal) with the process's environment.
pub fn resolve_secret_reference(reference: &str) -> Result<String, String> {
    resolve_secret(reference, &Env::from_process())?
        .ok_or_else(|| format!("{} is not set", env_name(reference)))
}

fn env_name(reference: &str) -> String {
    let var = reference.strip_prefix("env:").unwrap_or(reference);
    format!("environment variable {var}")
}

/// Applies `HOOKMESH_<SECTION>_<KEY>` variables onto the parsed file.
/// Returns the dotted keys it set, with the variable that set each.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: &Env,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut applied = Vec::new();
    for (var, value) in &env.0 {
        let Some(rest) = var.strip_prefix("HOOKMESH_") else {
            continue;
        };
        if RESERVED_ENV.contains(&var.as_str()) {
            continue;
        }
        let fail = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let rest = rest.to_ascii_lowercase();
        let (section, key) = rest
            .split_once('_')
            .ok_or_else(|| fail("expected HOOKMESH_<SECTION>_<KEY>".into()))?;
        let value = env_value(value).map_err(fail)?;
        match section {
            "nats" | "http" | "ingest" | "operator" | "admin" | "log" | "telemetry" => {
                section_table(table, section)
                    .map_err(&fail)?
                    .insert(key.to_string(), value);
                applied.push((format!("{section}.{key}"), var.clone()));
            }
            "outbox" => {
                let (name, key) = split_name_key(key, outbox::OUTBOX_KEYS).ok_or_else(|| {
                    fail(format!(
                        "expected HOOKMESH_OUTBOX_<SOURCE>_<KEY>, KEY one of {:?}",
                        outbox::OUTBOX_KEYS
                    ))
                })?;
                let set = outbox::set_override(table, name, key, value).map_err(&fail)?;
                applied.push((set, var.clone()));
            }
            "providers" => {
                let (name, key) = split_name_key(key, PROVIDER_KEYS).ok_or_else(|| {
                    fail(format!(
                        "expected HOOKMESH_PROVIDERS_<NAME>_<KEY>, KEY one of {PROVIDER_KEYS:?}"
                    ))
                })?;
                let providers = section_table(table, "providers").map_err(&fail)?;
                // Provider names are matched case-insensitively, `_` standing for `-`.
                let existing = providers
                    .keys()
                    .find(|p| p.to_ascii_lowercase().replace('-', "_") == name)
                    .cloned()
                    .unwrap_or_else(|| name.to_string());
                let entry = providers
                    .entry(existing.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(provider) = entry else {
                    return Err(fail(format!("providers.{existing} is not a table")));
                };
                provider.insert(key.to_string(), value);
                applied.push((format!("{}.{key}", provider_key(&existing)), var.clone()));
            }
            other => return Err(fail(format!("unknown section {other:?}"))),
        }
    }
    Ok(applied)
}

/// Splits `<name>_<key>` where the name and the key may both contain `_`:
/// the key is the first of `keys` the text ends with.
fn split_name_key<'t>(text: &'t str, keys: &[&'static str]) -> Option<(&'t str, &'static str)> {
    keys.iter().find_map(|k| {
        text.strip_suffix(k)
            .and_then(|n| n.strip_suffix('_'))
            .filter(|n| !n.is_empty())
            .map(|n| (n, *k))
    })
}

fn section_table<'t>(
    table: &'t mut toml::Table,
    section: &str,
) -> Result<&'t mut toml::Table, String> {
    match table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
    {
        toml::Value::Table(t) => Ok(t),
        _ => Err(format!("{section} is not a table")),
    }
}

/// An override is a string, or a TOML array when it starts with `[`
/// (`HOOKMESH_PROVIDERS_CRM_SECRETS='["env:A", "env:B"]'`). Numbers and
/// booleans stay strings: the fields that take them also accept strings.
fn env_value(text: &str) -> Result<toml::Value, String> {
    if text.trim_start().starts_with('[') {
        let doc: toml::Table = format!("v = {text}")
            .parse()
            .map_err(|e: toml::de::Error| format!("not a TOML array: {}", e.message()))?;
        doc.get("v")
            .cloned()
            .ok_or_else(|| "not a TOML array".to_string())
    } else {
        Ok(toml::Value::String(text.to_string()))
    }
}

/// A duration written for humans: `90s`, `5m`, `7d`, `1h 30m`.
#[derive(Debug, Clone, Copy)]
struct Humane(Duration);

impl<'de> Deserialize<'de> for Humane {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Humane).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration like \"90s\", \"5m\" or \"7d\": {e}"
            ))
        })
    }
}

/// A number or boolean that may also be written as a string (so environment
/// overrides, which are strings, work for every key).
#[derive(Debug, Clone, Copy)]
struct Lenient<T>(T);

impl<'de, T> Deserialize<'de> for Lenient<T>
where
    T: std::str::FromStr,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        let text = match &value {
            toml::Value::String(s) => s.trim().to_string(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => other.to_string(),
        };
        let expected = match std::any::type_name::<T>() {
            "bool" => "true or false",
            _ => "a whole number, 0 or more",
        };
        text.parse()
            .map(Lenient)
            .map_err(|_| serde::de::Error::custom(format!("expected {expected}, found {value}")))
    }
}

/// A socket address, with the offending value in the error.
#[derive(Debug, Clone, Copy)]
struct Address(SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Address).map_err(|_| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address like \"127.0.0.1:8080\""
            ))
        })
    }
}

/// A string or a list of strings.
#[derive(Debug, Clone, Default)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bad = |value: &toml::Value| {
            serde::de::Error::custom(format!(
                "expected a string or a list of strings, found {value}"
            ))
        };
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(OneOrMany(vec![s])),
            toml::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    toml::Value::String(s) => Ok(s),
                    other => Err(bad(&other)),
                })
                .collect::<Result<_, _>>()
                .map(OneOrMany),
            other => Err(bad(&other)),
        }
    }
}

#[cfg(test)]
mod tests;
