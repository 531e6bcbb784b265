//! Reaching the application's PostgreSQL: the connection URL (validated at
//! start, never logged with its password), and a connection whose
//! `LISTEN` notifications wake the relay.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::debug;

/// How long connecting may take when the URL does not say.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive idle time when the URL does not say: a database that
/// vanished without closing the connection is noticed within about a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// The same asked of the server for its end of the session: a relay whose
/// host vanished loses its session — and so the table's relay lock — within
/// about a minute, not after the operating system's two hours.
const SERVER_KEEPALIVES: &str =
    "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3";

/// A PostgreSQL connection URL, checked. `Debug` and `Display` show the
/// user, hosts and database, never the password.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    described: String,
}

/// Why a URL is not a usable PostgreSQL connection URL. The message never
/// repeats the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    /// The URL does not parse.
    #[error(
        "not a PostgreSQL connection URL like postgres://user@host:5432/db: {}",
        error_text(.0)
    )]
    Parse(#[source] tokio_postgres::Error),
    /// TLS was asked for; the relay connects without it.
    #[error(
        "sslmode={0} is not supported: the outbox relay connects without TLS \
         (use a local socket, a private network or a TLS-terminating proxy)"
    )]
    Tls(&'static str),
}

impl Database {
    /// Parses and checks a connection URL (or `key=value` string).
    pub fn parse(url: &str) -> Result<Database, DatabaseUrlError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(DatabaseUrlError::Parse)?;
        // The default, `prefer`, falls back to plain text: that is what
        // this connector does; only an explicit `require` would be broken.
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err(DatabaseUrlError::Tls("require"));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if !sets(url, "keepalives_idle") {
            config.keepalives_idle(KEEPALIVE_IDLE);
        }
        if !url.contains("tcp_keepalives") {
            let options = match config.get_options() {
                Some(given) => format!("{given} {SERVER_KEEPALIVES}"),
                None => SERVER_KEEPALIVES.to_string(),
            };
            config.options(options);
        }
        let described = describe(&config);
        Ok(Database { config, described })
    }

    /// `user@host:port/database`, for logs and `/readyz`.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// Connects, names the session `application_name` (so it shows in
    /// `pg_stat_activity`) and, with `listen`, `LISTEN`s on that channel.
    pub async fn connect(
        &self,
        application_name: &str,
        listen: Option<&str>,
    ) -> Result<Connection, tokio_postgres::Error> {
        let mut config = self.config.clone();
        config.application_name(application_name);
        let (client, mut connection) = config.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let (closed_tx, closed) = watch::channel(false);
        let notified = wake.clone();
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => notified.notify_one(),
                    Ok(AsyncMessage::Notice(notice)) => {
                        debug!(notice = %notice.message(), "PostgreSQL notice");
                    }
                    Ok(_) => {}
                    Err(error) => {
                        debug!(error = %error_text(&error), "PostgreSQL connection ended");
                        break;
                    }
                }
            }
            let _ = closed_tx.send(true);
        });
        let connection = Connection {
            client,
            wake,
            closed,
            driver,
        };
        if let Some(channel) = listen {
            connection
                .client
                .batch_execute(&format!("LISTEN \"{channel}\""))
                .await?;
        }
        Ok(connection)
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Database({})", self.described)
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.described)
    }
}

/// Whether a connection string sets parameter `key` (URL query or
/// `key=value` form).
fn sets(url: &str, key: &str) -> bool {
    [format!("?{key}="), format!("&{key}="), format!(" {key}=")]
        .iter()
        .any(|form| url.contains(form.as_str()))
        || url.starts_with(&format!("{key}="))
}

fn describe(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(path) => format!("{}:{port}", path.display()),
            }
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_string()
    } else {
        hosts.join(",")
    };
    let user = config.get_user().unwrap_or("");
    let database = config.get_dbname().unwrap_or(user);
    let at = if user.is_empty() { "" } else { "@" };
    format!("{user}{at}{hosts}/{database}")
}

/// One session: the client, the wake-ups its `LISTEN` delivers, and
/// whether it has ended. Dropping it closes the session (and so releases
/// its advisory locks).
pub struct Connection {
    /// The client to query with.
    pub client: Client,
    wake: Arc<Notify>,
    closed: watch::Receiver<bool>,
    driver: JoinHandle<()>,
}

impl Connection {
    /// Resolves at the next notification (at once when one came since the
    /// last call).
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// Resolves when the session has ended (the server closed it, or it
    /// failed).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A PostgreSQL error as one line: the server's own message when it sent
/// one (`database "x" does not exist`), else the client's error and its
/// causes.
pub fn error_text(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_described_without_its_password() {
        let db = Database::parse("postgres://erp:s3cret@db.internal:6543/ledger").expect("valid");
        assert_eq!(db.describe(), "erp@db.internal:6543/ledger");
        assert!(!format!("{db:?} {db}").contains("s3cret"));
        let local = Database::parse("postgres://127.0.0.1/erp").expect("valid");
        assert_eq!(local.describe(), "127.0.0.1:5432/erp");
    }

    #[test]
    fn the_server_is_asked_for_keepalives_unless_the_url_says_otherwise() {
        let plain = Database::parse("postgres://127.0.0.1/erp").expect("valid");
        assert_eq!(plain.config.get_options(), Some(SERVER_KEEPALIVES));
        let given = Database::parse("postgres://127.0.0.1/erp?options=-c%20search_path%3Derp")
            .expect("valid");
        assert_eq!(
            given.config.get_options(),
            Some(format!("-c search_path=erp {SERVER_KEEPALIVES}").as_str())
        );
        assert!(sets("postgres://h/db?keepalives_idle=5", "keepalives_idle"));
        assert!(sets("host=h keepalives_idle=5", "keepalives_idle"));
        assert!(!sets(
            "postgres://h/db?tcp_keepalives_idle=5",
            "keepalives_idle"
        ));
        let own = Database::parse("postgres://127.0.0.1/erp?options=-c%20tcp_keepalives_idle%3D5")
            .expect("valid");
        assert_eq!(own.config.get_options(), Some("-c tcp_keepalives_idle=5"));
    }

    #[test]
    fn bad_urls_are_refused_without_repeating_them() {
        let error = Database::parse("postgres://erp:s3cret@db/x?sslmode=require")
            .expect_err("TLS is refused");
        assert!(error.to_string().contains("sslmode=require"), "{error}");
        let error = Database::parse("postgres://erp:s3cret@db/x?bogus=1").expect_err("unknown");
        let text = format!("{error}: {:?}", std::error::Error::source(&error));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(Database::parse("mysql://db/x").is_err());
    }
}
