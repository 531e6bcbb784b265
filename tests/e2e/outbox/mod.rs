//! The PostgreSQL outbox relay against a real PostgreSQL (a database of
//! its own per test) and a real nats-server per test.

mod crash;
mod init;
mod order;
mod outage;
mod relay;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use hookmesh::config::{Config, Env, Origin, OutboxConfig};
use hookmesh::metrics::Metrics;
use hookmesh::outbox::db::Database;
use hookmesh::outbox::table::TableName;
use hookmesh::outbox::{Health, Relay};
use hookmesh::publish::Publisher;
use hookmesh::streams::{self, EVENTS_STREAM, Mode};
use hookmesh_test_support::{NatsServer, TestDatabase};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::support::*;

/// Connects to `url`; the connection is driven by a task of its own.
pub async fn pg(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// A test database with an outbox table made by `outbox init`.
pub struct Bed {
    /// The database (dropped with the bed).
    pub db: TestDatabase,
    /// A session for the test's own queries.
    pub client: Client,
    /// The outbox table.
    pub table: TableName,
}

impl Bed {
    /// A fresh database with `table` created (with the NOTIFY trigger when
    /// `notify`).
    pub async fn new(table: &str, notify: bool) -> Bed {
        let db = TestDatabase::create().expect("a test database");
        let table: TableName = table.parse().expect("a table name");
        let database = Database::parse(db.url()).expect("url");
        hookmesh::outbox::commands::init(&database, &table, notify)
            .await
            .expect("outbox init");
        let client = pg(db.url()).await;
        Bed { db, client, table }
    }

    /// The relay settings for this table as `source` (fast backoff).
    pub fn outbox(&self, source: &str) -> OutboxConfig {
        let mut config = OutboxConfig::new(
            source,
            Database::parse(self.db.url()).expect("url"),
            self.table.clone(),
        );
        config.poll_interval = Duration::from_millis(200);
        config.backoff.initial = Duration::from_millis(100);
        config.backoff.max = Duration::from_millis(500);
        config
    }

    /// Inserts one row in a transaction of its own; its id.
    pub async fn insert(&self, aggregate: (&str, &str), event_type: &str, payload: Value) -> i64 {
        insert(&self.client, &self.table, aggregate, event_type, payload).await
    }

    /// `(id, status, attempts)` of every row, by id.
    pub async fn rows(&self) -> Vec<(i64, String, i32)> {
        let t = self.table.sql();
        self.client
            .query(
                &format!("SELECT id, status, attempts FROM {t} ORDER BY id"),
                &[],
            )
            .await
            .expect("read rows")
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }

    /// Waits until every row is `published`.
    pub async fn wait_all_published(&self, limit: Duration) {
        wait_for(limit, "every outbox row published", || async {
            self.rows()
                .await
                .iter()
                .all(|(_, status, _)| status == "published")
        })
        .await;
    }
}

/// Inserts one outbox row in a transaction of its own; its id.
pub async fn insert(
    client: &Client,
    table: &TableName,
    (aggregate_type, aggregate_id): (&str, &str),
    event_type: &str,
    payload: Value,
) -> i64 {
    let t = table.sql();
    client
        .query_one(
            &format!(
                "INSERT INTO {t} (aggregate_type, aggregate_id, event_type, payload_json) \
                 VALUES ($1, $2, $3, $4::text::jsonb) RETURNING id"
            ),
            &[
                &aggregate_type,
                &aggregate_id,
                &event_type,
                &payload.to_string(),
            ],
        )
        .await
        .expect("insert an outbox row")
        .get(0)
}

/// `<prefix>-0` … `<prefix>-<count - 1>`.
pub fn aggregates(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n}")).collect()
}

/// Inserts `each` rows for every aggregate, each row in a transaction of
/// its own, at about `per_second` rows in all, from `clients`: an
/// aggregate's rows one after the other (as an application changing one
/// entity at a time), the aggregates interleaved. The rows, `(id,
/// aggregate)`.
pub async fn insert_rows(
    clients: &[Client],
    table: &TableName,
    aggregates: &[String],
    each: usize,
    per_second: u64,
) -> Vec<(i64, String)> {
    let started = tokio::time::Instant::now();
    let count = aggregates.len();
    let rows = futures::future::join_all(aggregates.iter().enumerate().map(|(i, id)| async move {
        let client = &clients[i % clients.len()];
        let mut rows = Vec::with_capacity(each);
        for n in 0..each {
            // This aggregate's share of the rate.
            let due = Duration::from_micros((n * count + i) as u64 * 1_000_000 / per_second);
            tokio::time::sleep_until(started + due).await;
            let row = insert(
                client,
                table,
                ("order", id),
                "order.changed",
                serde_json::json!({"n": n}),
            )
            .await;
            rows.push((row, id.clone()));
        }
        rows
    }))
    .await;
    rows.into_iter().flatten().collect()
}

/// The test config's ingest settings (partitions, windows) for relays run
/// without a host.
pub fn ingest() -> hookmesh::config::IngestConfig {
    Config::from_toml(
        &config_toml("nats://127.0.0.1:4222", &Options::default()),
        Origin::Builtin,
        &Env::default(),
    )
    .expect("test config")
    .ingest
}

/// Creates the streams and buckets on `nats`.
pub async fn apply_streams(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream(nats).await;
    streams::apply(&js, &ingest(), Mode::Update)
        .await
        .expect("streams");
    js
}

/// A relay running in this process; stopped (or crashed) by the test.
pub struct RunningRelay {
    /// Its metrics (the leader gauge tells whether it relays).
    pub metrics: Metrics,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningRelay {
    /// Starts a relay of `outbox` publishing to `nats_url`.
    pub async fn start(outbox: OutboxConfig, nats_url: &str) -> RunningRelay {
        // `E2E_LOG=info` (or any filter) shows the relays' logs.
        if let Ok(filter) = std::env::var("E2E_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let ingest = ingest();
        let client = async_nats::connect(nats_url).await.expect("connect");
        let publisher = Publisher::new(client, ingest.partitions, ingest.publish_timeout);
        let metrics = Metrics::default();
        let (stop, stopped) = watch::channel(false);
        let relay = Relay::new(
            outbox,
            publisher,
            ingest.duplicate_window,
            metrics.outbox().clone(),
            Health::default(),
        );
        let task = tokio::spawn(relay.run(stopped));
        RunningRelay {
            metrics,
            stop,
            task,
        }
    }

    /// Whether it holds the table's relay lock.
    pub fn leading(&self) -> bool {
        self.metrics
            .render()
            .lines()
            .any(|l| l.starts_with("hookmesh_outbox_leader{") && l.ends_with(" 1"))
    }

    /// Ends it at once, mid-round if it is in one (like a crash: nothing is
    /// finished or marked).
    pub fn crash(self) {
        self.task.abort();
    }

    /// Stops it cleanly and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// One event the relay stored.
#[derive(Debug, Clone)]
pub struct Relayed {
    /// Its subject.
    pub subject: String,
    /// The row id (`Hook-Event-Id`).
    pub row: i64,
    /// `Hook-Entity`.
    pub aggregate_id: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// Every header (first values).
    pub headers: BTreeMap<String, String>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// What `HOOK_EVENTS` holds from `source`, in stream order.
pub async fn relayed(js: &jetstream::Context, source: &str) -> Vec<Relayed> {
    stored_messages(js, EVENTS_STREAM)
        .await
        .into_iter()
        .filter_map(|message| {
            let headers = message.headers;
            let get = |name: &str| hookmesh::headers::get(&headers, name).map(str::to_string);
            if get(hookmesh::headers::PROVIDER).as_deref() != Some(source) {
                return None;
            }
            let all = headers
                .iter()
                .filter_map(|(name, values)| {
                    Some((name.to_string(), values.first()?.as_str().to_string()))
                })
                .collect();
            Some(Relayed {
                subject: message.subject.to_string(),
                row: get(hookmesh::headers::EVENT_ID)?.parse().ok()?,
                aggregate_id: get(hookmesh::headers::ENTITY)?,
                msg_id: get(hookmesh::headers::MSG_ID)?,
                headers: all,
                payload: message.payload.to_vec(),
            })
        })
        .collect()
}

/// Asserts that `events` hold each of `rows` exactly once, and each
/// aggregate's rows in `id` order.
pub fn assert_once_in_order(events: &[Relayed], rows: &[(i64, String)]) {
    let ids: Vec<i64> = events.iter().map(|e| e.row).collect();
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a row stored twice");
    let msg_ids: BTreeSet<&str> = events.iter().map(|e| e.msg_id.as_str()).collect();
    assert_eq!(msg_ids.len(), ids.len(), "a message id stored twice");
    let expected: BTreeSet<i64> = rows.iter().map(|(id, _)| *id).collect();
    let missing: Vec<_> = expected.difference(&unique).collect();
    assert!(missing.is_empty(), "rows never stored: {missing:?}");
    assert_eq!(unique, expected, "stored rows that were not inserted");
    let mut by_aggregate: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for event in events {
        by_aggregate
            .entry(&event.aggregate_id)
            .or_default()
            .push(event.row);
    }
    for (aggregate, stored) in by_aggregate {
        let mut sorted = stored.clone();
        sorted.sort_unstable();
        assert_eq!(stored, sorted, "aggregate {aggregate} out of id order");
    }
}
