//! Connecting to NATS as the config says.

use std::time::Duration;

use crate::config::NatsConfig;

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The credentials file could not be read.
    #[error("nats.creds_file {path}: {source}")]
    Credentials {
        /// The file.
        path: String,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The client refused the options or could not connect.
    #[error("cannot connect to NATS at {urls}: {source}")]
    Connect {
        /// The URLs tried.
        urls: String,
        /// The client's error.
        source: async_nats::ConnectError,
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

/// Connects with the configured URLs, credentials and TLS. The client
/// reconnects by itself forever, quickly (at most 2 s between attempts),
/// so a host recovers from a NATS outage without a restart.
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
    patience: Patience,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(3))
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(2_000))
        });
    if let Some(path) = &config.creds_file {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.0.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.0.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if patience == Patience::Background {
        options = options.retry_on_initial_connect();
    }
    options
        .connect(config.urls.as_slice())
        .await
        .map_err(|source| ConnectError::Connect {
            urls: config.urls.join(","),
            source,
        })
}
