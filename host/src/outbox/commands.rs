//! What `hookmesh outbox init | relay | retry` do, as library calls the
//! command line and the tests share.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::db::{Database, error_text};
use super::health::Health;
use super::queries;
use super::relay::Relay;
use super::table::{self, InitError, InitReport, TableName};
use crate::audit::{self, Action, AuditRecord, OutboxRowsRef};
use crate::config::{Config, OutboxConfig};
use crate::metrics::Metrics;
use crate::nats::{self, Patience};
use crate::publish::Publisher;
use crate::retry::Retry;
use crate::streams::{self, Mode, StreamsError};

/// How long relays get to finish the round in hand at shutdown.
const DRAIN: Duration = Duration::from_secs(30);
/// The most row ids an audit record lists.
const AUDITED_IDS: usize = 1000;

/// A one-off command could not reach or change the database.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Connecting failed.
    #[error("cannot connect to database {database}: {}", error_text(.source))]
    Connect {
        /// The database, without password.
        database: String,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// `init` did not complete.
    #[error(transparent)]
    Init(#[from] InitError),
    /// A statement failed.
    #[error("{step}: {}", error_text(.source))]
    Database {
        /// What was being done.
        step: &'static str,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The audit record could not be written, so nothing was changed.
    #[error("no row changed: {0}")]
    Audit(#[from] audit::AuditError),
}

/// `outbox init`: creates `table` (or checks the one there), its indexes
/// and, with `notify`, the wake-up trigger.
pub async fn init(
    database: &Database,
    table: &TableName,
    notify: bool,
) -> Result<InitReport, CommandError> {
    let mut conn = connect(database).await?;
    Ok(table::init(&mut conn.client, table, notify).await?)
}

async fn connect(database: &Database) -> Result<super::db::Connection, CommandError> {
    database
        .connect("hookmesh-cli", None)
        .await
        .map_err(|source| CommandError::Connect {
            database: database.describe().to_string(),
            source,
        })
}

/// `outbox retry --failed`: puts the `failed` rows of `outbox`'s table (all,
/// or those of `ids`) back to pending with their attempts reset, and
/// records who did it in `HOOK_AUDIT` — in that order inside one
/// transaction, so no row changes without its audit record. Returns the
/// rows put back.
pub async fn retry_failed(
    js: &jetstream::Context,
    outbox: &OutboxConfig,
    ids: Option<&[i64]>,
    actor: &str,
) -> Result<Vec<i64>, CommandError> {
    let db = |step| move |source| CommandError::Database { step, source };
    let mut conn = connect(&outbox.database).await?;
    let transaction = conn.client.transaction().await.map_err(db("begin"))?;
    let retried = queries::retry_failed(&transaction, &outbox.table, ids)
        .await
        .map_err(db("put failed rows back"))?;
    if retried.is_empty() {
        return Ok(retried);
    }
    let mut record = AuditRecord::new(Action::OutboxRetry, actor, &outbox.source, "ok");
    record.outbox = Some(OutboxRowsRef {
        table: outbox.table.to_string(),
        database: outbox.database.describe().to_string(),
        count: retried.len() as u64,
        ids: retried.iter().take(AUDITED_IDS).copied().collect(),
    });
    // Dropping the transaction on error rolls it back.
    audit::write(js, &record).await?;
    transaction.commit().await.map_err(db("commit"))?;
    info!(source = %outbox.source, rows = retried.len(), %actor, "failed outbox rows put back to pending");
    Ok(retried)
}

/// Why the foreground relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// NATS options are unusable.
    #[error(transparent)]
    Connect(#[from] nats::ConnectError),
    /// The streams disagree with the config.
    #[error(transparent)]
    Streams(StreamsError),
}

/// `outbox relay`: runs `relays` in this process until `shutdown`
/// resolves, after making sure the streams they store into exist.
pub async fn run(
    config: &Config,
    relays: Vec<OutboxConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let client = nats::connect(&config.nats, "hookmesh-outbox", Patience::Background).await?;
    let js = jetstream::new(client.clone());
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(shutdown);
    // The relays store into HOOK_EVENTS and hook_idempotency: make sure
    // they exist, waiting for NATS as long as it takes.
    let mut retry = Retry::default();
    loop {
        let applied = tokio::select! {
            applied = streams::apply_replicated(&js, &config.ingest, config.nats.replicas, Mode::Ensure) => applied,
            _ = &mut shutdown => return Ok(()),
        };
        match applied {
            Ok(_) => break,
            Err(fatal @ StreamsError::Conflict(_)) => return Err(RunError::Streams(fatal)),
            Err(error) => {
                warn!(%error, retry_in = ?retry.delay(), "streams not ready yet");
                tokio::select! {
                    _ = tokio::time::sleep(retry.delay()) => retry.grow(),
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    }
    let publisher = Publisher::new(
        client.clone(),
        config.ingest.partitions,
        config.ingest.publish_timeout,
    );
    let metrics = Metrics::default();
    let health = Health::default();
    let mut tasks = JoinSet::new();
    for outbox in relays {
        info!(source = %outbox.source, table = %outbox.table, database = %outbox.database, "starting outbox relay");
        let relay = Relay::new(
            outbox,
            publisher.clone(),
            config.ingest.duplicate_window,
            metrics.outbox().clone(),
            health.clone(),
        );
        tasks.spawn(relay.run(stopped.clone()));
    }
    shutdown.await;
    let _ = stop.send(true);
    if tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!(
            "relays did not stop within {DRAIN:?}; unmarked rows are published again (and deduplicated) next time"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}
