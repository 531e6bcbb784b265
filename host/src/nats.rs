//! Connecting to NATS as the config says: every process that connects
//! (`serve`, `up`, the CLI verbs, the outbox relay) goes through
//! [`connect`], so URLs, credentials and TLS mean the same everywhere.
//!
//! A request the account's permissions forbid gets no reply from the
//! server, only a `-ERR 'Permissions Violation …'` on the connection, and
//! the request itself runs into its timeout. So that such a failure says
//! what happened instead of "timed out", every violation is logged at once
//! (naming the subject) and remembered; [`last_denial`] gives it to the
//! command line, which prints it beside the failed command's error.

use std::sync::Mutex;
use std::time::Duration;

use tracing::{error, warn};

use crate::config::{Creds, NatsAuth, NatsConfig};

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file could not be read or parsed.
    #[error("nats.creds {path}: {source}")]
    Credentials {
        /// The file (or the variable it came from).
        path: String,
        /// The operating system's or parser's answer.
        source: std::io::Error,
    },
    /// The client refused the options or could not connect.
    #[error("cannot connect to NATS at {urls}: {source}{hint}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// The client's error.
        source: async_nats::ConnectError,
        /// What the error usually means, when the kind says.
        hint: &'static str,
    },
}

/// How patiently a host connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Return at once and keep trying in the background: a host starts and
    /// answers 503 until NATS is there.
    Background,
    /// Fail when the first attempt fails (CLI commands).
    FailFast,
}

/// The latest permission violation the server reported to this process.
/// Process-wide because the client reports server errors only through its
/// event callback, which cannot reach the request that failed; the CLI
/// (one command per process) reads it when a command fails.
static LAST_DENIAL: Mutex<Option<String>> = Mutex::new(None);

/// The latest `Permissions Violation …` the server reported, if any.
pub fn last_denial() -> Option<String> {
    LAST_DENIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn record_denial(message: &str) {
    *LAST_DENIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(message.to_string());
}

/// The pause before connection attempt `attempts` (counted from 1 since the
/// last successful connection): none before the first — the client calls
/// this before every attempt, and a pause there delays every start and
/// every CLI command — then 100 ms more per attempt, at most 2 s.
fn reconnect_delay(attempts: usize) -> Duration {
    let step = attempts.saturating_sub(1) as u64;
    Duration::from_millis(step.saturating_mul(100).min(2_000))
}

/// Connects with the configured URLs, credentials and TLS. The client
/// reconnects by itself forever, quickly (at most 2 s between attempts),
/// so a host recovers from a NATS outage — or a cluster node's loss —
/// without a restart.
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
    patience: Patience,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::ServerError(async_nats::ServerError::Other(message))
                    if message.contains("Permissions Violation") =>
                {
                    record_denial(&message);
                    error!(
                        denied = %message,
                        "NATS refused an operation: this process's NATS user lacks the permission \
                         (see the roles in nats/roles.conf)"
                    );
                }
                async_nats::Event::ServerError(e) => warn!(error = %e, "NATS server error"),
                async_nats::Event::Disconnected => warn!("disconnected from NATS; reconnecting"),
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                _ => {}
            }
        });
    options = match &config.auth {
        NatsAuth::None => options,
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.0.clone())
        }
        NatsAuth::Token(token) => options.token(token.0.clone()),
        NatsAuth::NkeySeed(seed) => options.nkey(seed.0.trim().to_string()),
        NatsAuth::Creds(Creds::File(path)) => {
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?
        }
        NatsAuth::Creds(Creds::Text(text)) => {
            options
                .credentials(&text.0)
                .map_err(|source| ConnectError::Credentials {
                    path: "(from the environment)".into(),
                    source,
                })?
        }
    };
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if config.tls_first {
        options = options.tls_first();
    }
    if patience == Patience::Background {
        options = options.retry_on_initial_connect();
    }
    options
        .connect(config.urls.as_slice())
        .await
        .map_err(|source| ConnectError::Connect {
            urls: config.urls.join(","),
            hint: hint(source.kind(), &source.to_string()),
            source,
        })
}

/// A sentence on what a connect error usually means. A refused
/// certificate reaches us as an I/O error, so the text decides too.
fn hint(kind: async_nats::ConnectErrorKind, text: &str) -> &'static str {
    use async_nats::ConnectErrorKind as Kind;
    let tls = ["certificate", "tls", "handshake"]
        .iter()
        .any(|word| text.to_ascii_lowercase().contains(word));
    match kind {
        Kind::Io if tls => {
            " (TLS failed: check nats.tls_ca is the CA that signed the server's certificate, the client \
             certificate if the server verifies one, and nats.tls_first against the server's handshake_first)"
        }
        Kind::AuthorizationViolation => {
            " (the server refused the credentials: check nats.user/password, token, nkey_seed or creds)"
        }
        Kind::Tls => {
            " (TLS failed: check nats.tls_ca is the CA that signed the server's certificate, the client \
             certificate if the server verifies one, and nats.tls_first against the server's handshake_first)"
        }
        Kind::TimedOut => {
            " (no answer in time; a TLS-first server also looks like this to a plain client)"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_connection_attempt_does_not_wait_and_later_ones_back_off_to_two_seconds() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(5), Duration::from_millis(400));
        assert_eq!(reconnect_delay(21), Duration::from_secs(2));
        assert_eq!(reconnect_delay(usize::MAX), Duration::from_secs(2));
    }
}
