//! `[[outgoing.credentials]]`: headers the host adds to handlers' outgoing
//! requests to one destination — the ERP's API key, a CRM's bearer token.
//! The secret stays with the operator: handler components never see it,
//! the manifest only says where a handler may go (`allowed_hosts`).
//!
//! ```toml
//! [[outgoing.credentials]]
//! destination = "https://erp.example.com"   # as an allowed_hosts entry (`*.` wildcards too)
//! header = "authorization"
//! value = "env:ERP_AUTHORIZATION"           # env:VAR, file:PATH or literal
//! handlers = ["order-sync"]                 # optional: only these handlers' requests
//! ```

use serde::Deserialize;

use super::{Env, env_name, resolve_secret};
use crate::runtime::http::{AllowedHosts, Credential, Credentials};

/// Headers the host owns on every outgoing request: a credential cannot
/// replace them (nor the ones the HTTP client computes).
const HOST_OWNED: &[&str] = &[
    crate::runtime::http::IDEMPOTENCY_KEY,
    crate::runtime::http::CORRELATION_ID,
    crate::runtime::http::TRACEPARENT,
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
];

/// `[outgoing]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutgoing {
    #[serde(default)]
    credentials: Vec<RawCredential>,
}

/// One `[[outgoing.credentials]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    destination: String,
    header: String,
    value: String,
    #[serde(default)]
    handlers: Option<Vec<String>>,
}

impl RawOutgoing {
    /// The credentials, secrets resolved; else the dotted key and why.
    pub(super) fn resolve(self, env: &Env) -> Result<Credentials, (String, String)> {
        let mut resolved = Vec::with_capacity(self.credentials.len());
        for (index, raw) in self.credentials.into_iter().enumerate() {
            let key = |field: &str| format!("outgoing.credentials[{index}].{field}");
            let destination = AllowedHosts::parse(std::slice::from_ref(&raw.destination))
                .map_err(|e| (key("destination"), e.reason))?;
            let header =
                http::HeaderName::from_bytes(raw.header.trim().as_bytes()).map_err(|_| {
                    (
                        key("header"),
                        format!("{:?} is not a header name", raw.header),
                    )
                })?;
            if HOST_OWNED.contains(&header.as_str()) {
                return Err((
                    key("header"),
                    format!("{header} is set by the host on every request"),
                ));
            }
            let secret = resolve_secret(&raw.value, env)
                .map_err(|why| (key("value"), why))?
                .ok_or_else(|| (key("value"), format!("{} is not set", env_name(&raw.value))))?;
            let value = http::HeaderValue::from_str(&secret).map_err(|_| {
                (
                    key("value"),
                    "is not a valid header value (control characters or non-ASCII)".to_string(),
                )
            })?;
            if let Some(handlers) = &raw.handlers
                && handlers.iter().any(|h| h.trim().is_empty())
            {
                return Err((key("handlers"), "lists an empty handler name".into()));
            }
            resolved.push(Credential {
                destination,
                header,
                value,
                handlers: raw.handlers,
            });
        }
        Ok(Credentials::new(resolved))
    }
}
