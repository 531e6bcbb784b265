//! `[http]`: the webhook listener and the limits of its edge.
//!
//! ```toml
//! [http]
//! listen = "127.0.0.1:8080"
//! max_body_bytes = 1040384        # larger bodies: 413
//! header_read_timeout = "10s"     # a request's headers must arrive within this
//! request_timeout = "30s"         # headers, body and answer of one request
//! idle_timeout = "60s"            # a keep-alive connection without a request
//! max_connections = 4096          # more wait in the listen backlog
//! max_header_bytes = 16384        # request line and headers; larger: 431
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{Address, Humane, KeyError, Lenient};

/// Room kept in a NATS message for the headers hookmesh writes beside the
/// body: every field is bounded (see `ingress::limits`) so that all of
/// them fit in it.
pub const HEADER_BUDGET: usize = 8 * 1024;

/// nats-server's default `max_payload` (1 MiB).
pub const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// The default body limit: what fits in a default nats-server's message
/// beside the headers.
pub const DEFAULT_MAX_BODY_BYTES: usize = NATS_DEFAULT_MAX_PAYLOAD - HEADER_BUDGET;

/// The smallest header limit the HTTP parser can work with (its read
/// buffer is at least this big).
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

/// The HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers, counted
    /// from its first byte; slower ones are disconnected.
    pub header_read_timeout: Duration,
    /// How long one request may take from its first byte to its answer,
    /// the body included; a slower one is answered 408 and disconnected.
    pub request_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Largest request line plus headers; larger ones get 431.
    pub max_header_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        // The raw defaults are valid by construction.
        let raw = RawHttp::default();
        HttpConfig {
            listen: raw.listen.0,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            header_read_timeout: raw.header_read_timeout.0,
            request_timeout: raw.request_timeout.0,
            idle_timeout: raw.idle_timeout.0,
            max_connections: raw.max_connections.0,
            max_header_bytes: raw.max_header_bytes.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawHttp {
    listen: Address,
    max_body_bytes: Lenient<u64>,
    header_read_timeout: Humane,
    request_timeout: Humane,
    idle_timeout: Humane,
    max_connections: Lenient<usize>,
    max_header_bytes: Lenient<usize>,
}

impl Default for RawHttp {
    fn default() -> Self {
        RawHttp {
            listen: Address(SocketAddr::from(([127, 0, 0, 1], 8080))),
            max_body_bytes: Lenient(DEFAULT_MAX_BODY_BYTES as u64),
            header_read_timeout: Humane(Duration::from_secs(10)),
            request_timeout: Humane(Duration::from_secs(30)),
            idle_timeout: Humane(Duration::from_secs(60)),
            max_connections: Lenient(4096),
            max_header_bytes: Lenient(16 * 1024),
        }
    }
}

impl RawHttp {
    /// Checks the values; the error names the key.
    pub(super) fn resolve(self) -> Result<HttpConfig, KeyError> {
        let invalid = |key: &str, message: &str| (format!("http.{key}"), message.to_string());
        if self.max_body_bytes.0 == 0 {
            return Err(invalid("max_body_bytes", "must be at least 1"));
        }
        let max_body_bytes = usize::try_from(self.max_body_bytes.0)
            .map_err(|_| invalid("max_body_bytes", "is larger than this machine can hold"))?;
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout.0),
            ("request_timeout", self.request_timeout.0),
            ("idle_timeout", self.idle_timeout.0),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        if self.max_connections.0 == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_header_bytes.0 < MIN_HEADER_BYTES {
            return Err(invalid(
                "max_header_bytes",
                &format!("must be at least {MIN_HEADER_BYTES}"),
            ));
        }
        Ok(HttpConfig {
            listen: self.listen.0,
            max_body_bytes,
            header_read_timeout: self.header_read_timeout.0,
            request_timeout: self.request_timeout.0,
            idle_timeout: self.idle_timeout.0,
            max_connections: self.max_connections.0,
            max_header_bytes: self.max_header_bytes.0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<HttpConfig, KeyError> {
        let raw: RawHttp = toml::from_str(toml).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.resolve()
    }

    #[test]
    fn defaults_fit_a_default_nats_server() {
        let config = parse("").expect("defaults are valid");
        assert_eq!(
            config.max_body_bytes + HEADER_BUDGET,
            NATS_DEFAULT_MAX_PAYLOAD
        );
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.request_timeout, Duration::from_secs(30));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, 4096);
        assert_eq!(config.max_header_bytes, 16 * 1024);
        assert_eq!(HttpConfig::default().max_body_bytes, config.max_body_bytes);
    }

    #[test]
    fn limits_are_read_and_checked() {
        let config = parse(
            "header_read_timeout = \"1s\"\nrequest_timeout = \"2s\"\nidle_timeout = \"3s\"\n\
             max_connections = \"8\"\nmax_header_bytes = 9000\n",
        )
        .expect("valid");
        assert_eq!(config.header_read_timeout, Duration::from_secs(1));
        assert_eq!(config.request_timeout, Duration::from_secs(2));
        assert_eq!(config.idle_timeout, Duration::from_secs(3));
        assert_eq!(config.max_connections, 8);
        assert_eq!(config.max_header_bytes, 9000);

        let key = |toml: &str| parse(toml).expect_err("invalid").0;
        assert_eq!(key("max_connections = 0"), "http.max_connections");
        assert_eq!(key("max_header_bytes = 100"), "http.max_header_bytes");
        assert_eq!(key("request_timeout = \"0s\""), "http.request_timeout");
        assert_eq!(key("max_body_bytes = 0"), "http.max_body_bytes");
    }
}
