//! The `outbox` scenario: how fast the relay drains a PostgreSQL outbox
//! table into `HOOK_EVENTS`, next to raw JetStream publishes of the same
//! messages, and how long a committed row takes to be stored.
//!
//! One `nats-server -js` (started here, `NATS_SERVER_BIN` honoured) and a
//! fresh database on the machine's PostgreSQL (`HOOKMESH_TEST_PG`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`), its table made by
//! `outbox init --notify`:
//!
//! - **baseline**: the preloaded rows, read once and turned into the very
//!   messages the relay publishes (subject, headers, payload), published
//!   by async-nats into a stream of its own (`BENCH`, same settings as
//!   `HOOK_EVENTS`), each awaiting its PubAck, `--concurrency` in flight.
//! - **relay**: the real relay, in process, from its start until its last
//!   row is marked `published` (PubAck included, of course): reading, the
//!   idempotency record, publishing per aggregate in `id` order, marking.
//! - **latency**: with the relay idle, rows inserted one per transaction at
//!   a steady `--rate` for `--seconds`; each row's time from its `INSERT`
//!   returning (the commit) until an ordered consumer on `HOOK_EVENTS`
//!   receives it — delivered from the stream, so after its PubAck: an upper
//!   bound of commit → PubAck.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use hookmesh::config::OutboxConfig;
use hookmesh::headers::{self, EventHeaders};
use hookmesh::metrics::Metrics;
use hookmesh::outbox::db::Database;
use hookmesh::outbox::queries::Queries;
use hookmesh::outbox::relay::AGGREGATES_IN_FLIGHT;
use hookmesh::outbox::table::TableName;
use hookmesh::outbox::{Health, Relay};
use hookmesh::publish::Publisher;
use hookmesh::streams::{self, EVENTS_STREAM, Mode};
use hookmesh::subject::EventAddress;
use hookmesh_test_support::TestDatabase;
use serde::Serialize;
use tokio::sync::watch;

use crate::host;
use crate::load::timed;
use crate::stats::{self, Verdict, percentile, progress};

/// The source the rows are published as.
const SOURCE: &str = "bench";
/// The baseline's own stream.
const BENCH_STREAM: &str = "BENCH";
/// How long the relay may take for the preloaded rows, and a row for its
/// way from commit to consumer, before the run fails.
const LIMIT: Duration = Duration::from_secs(120);

/// Options of the `outbox` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rows preloaded for the throughput sides.
    #[arg(long, default_value_t = 20_000)]
    pub rows: usize,
    /// Aggregates the rows are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub aggregates: usize,
    /// Size of each row's JSON payload.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// The baseline's publishes in flight [default: the relay's aggregates
    /// in flight].
    #[arg(long, default_value_t = AGGREGATES_IN_FLIGHT)]
    pub concurrency: usize,
    /// The relay's `batch`.
    #[arg(long, default_value_t = 500)]
    pub batch: u32,
    /// Rows inserted per second in the latency phase.
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Length of the latency phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

/// The JSON line.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    rows: usize,
    baseline_rate: f64,
    relay_rate: f64,
    ratio: f64,
    insert_rate: f64,
    commit_to_stored_p50_ms: f64,
    commit_to_stored_p99_ms: f64,
}

/// Runs the scenario and prints its table and JSON line.
pub async fn run(args: Args) -> anyhow::Result<Verdict> {
    ensure!(
        args.rows > 0 && args.aggregates > 0,
        "--rows and --aggregates must be at least 1"
    );
    ensure!(
        args.rate > 0 && args.seconds > 0,
        "--rate and --seconds must be at least 1"
    );
    let server = host::start_nats().await?;
    let config = host::config(
        &server.url(),
        "crm",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        16,
        1 << 20,
    )?;
    let client = async_nats::connect(server.url())
        .await
        .context("connecting to nats-server")?;
    let version = client.server_info().version;
    let js = jetstream::new(client.clone());
    streams::apply(&js, &config.ingest, Mode::Update)
        .await
        .context("creating the streams")?;

    progress("a fresh database and its outbox table");
    let db = tokio::task::spawn_blocking(TestDatabase::create)
        .await
        .context("creating the database")??;
    let database = Database::parse(db.url())?;
    let table = TableName::default();
    hookmesh::outbox::commands::init(&database, &table, true).await?;
    let conn = database.connect("hookmesh-bench", None).await?;
    progress(&format!("preloading {} rows", args.rows));
    preload(&conn.client, &args).await?;

    progress("baseline: the same messages, raw JetStream publishes");
    let baseline = baseline(&js, &conn.client, &table, &args).await?;

    progress("relay: the preloaded table into HOOK_EVENTS");
    let metrics = Metrics::default();
    let mut outbox = OutboxConfig::new(SOURCE, database, table.clone());
    outbox.batch = args.batch;
    let relay = Relay::new(
        outbox,
        Publisher::new(
            client.clone(),
            config.ingest.partitions,
            config.ingest.publish_timeout,
        ),
        config.ingest.duplicate_window,
        metrics.outbox().clone(),
        Health::default(),
    );
    let (stop, stopped) = watch::channel(false);
    eprintln!("hookmesh-bench: timing relay");
    let started = Instant::now();
    let relaying = tokio::spawn(relay.run(stopped));
    wait_published(&metrics, args.rows).await?;
    let relay_elapsed = started.elapsed();
    eprintln!("hookmesh-bench: timed relay");
    let relay_rate = stats::rate(args.rows, relay_elapsed);

    progress(&format!(
        "latency: {} rows/s for {} s, commit → stored",
        args.rate, args.seconds
    ));
    let latency = latency(&client, &js, db.url(), &table, &args).await?;
    let _ = stop.send(true);
    let _ = relaying.await;
    drop(conn);
    drop(db);

    println!(
        "outbox: {} rows preloaded over {} aggregates, {} B payloads, batch {}, nats-server {version}",
        args.rows, args.aggregates, args.payload_bytes, args.batch
    );
    stats::print_table("throughput", std::slice::from_ref(&baseline));
    println!(
        "relay (table → HOOK_EVENTS → marked)  {:>9}  {:>8.3}  {:>11.1}",
        args.rows,
        relay_elapsed.as_secs_f64(),
        relay_rate
    );
    let ratio = relay_rate / baseline.rate();
    println!("ratio relay/baseline: {ratio:.3}");
    let (p50, p99) = (
        percentile(&latency.sorted, 50.0).as_secs_f64() * 1e3,
        percentile(&latency.sorted, 99.0).as_secs_f64() * 1e3,
    );
    println!(
        "latency: {} rows at {:.1} rows/s, commit → delivered from HOOK_EVENTS: p50 {p50:.2} ms, p99 {p99:.2} ms, max {:.2} ms",
        latency.sorted.len(),
        latency.insert_rate,
        latency
            .sorted
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64()
            * 1e3
    );
    if stats::report_failures(std::slice::from_ref(&baseline)) == Verdict::Failed {
        return Ok(Verdict::Failed);
    }
    stats::print_json_line(&Report {
        scenario: "outbox",
        rows: args.rows,
        baseline_rate: stats::round(baseline.rate(), 1),
        relay_rate: stats::round(relay_rate, 1),
        ratio: stats::round(ratio, 4),
        insert_rate: stats::round(latency.insert_rate, 1),
        commit_to_stored_p50_ms: stats::round(p50, 3),
        commit_to_stored_p99_ms: stats::round(p99, 3),
    })?;
    Ok(Verdict::Clean)
}

/// Fills the table: `--rows` rows round-robin over `--aggregates`, each
/// payload `--payload-bytes` of JSON.
async fn preload(client: &tokio_postgres::Client, args: &Args) -> anyhow::Result<()> {
    let pad = args.payload_bytes.saturating_sub(24) as i32;
    client
        .execute(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json) \
             SELECT 'order', 'ORD-' || (g % $2::bigint), 'order.updated', \
                    jsonb_build_object('n', g, 'pad', repeat('x', $3::int4)) \
             FROM generate_series(1, $1::bigint) g",
            &[&(args.rows as i64), &(args.aggregates as i64), &pad],
        )
        .await
        .context("preloading rows")?;
    client
        .batch_execute("VACUUM ANALYZE outbox_events")
        .await
        .context("analysing the table")?;
    Ok(())
}

/// The baseline: the relay's messages for the preloaded rows, published raw.
async fn baseline(
    js: &jetstream::Context,
    client: &tokio_postgres::Client,
    table: &TableName,
    args: &Args,
) -> anyhow::Result<stats::Measured> {
    js.create_stream(stream::Config {
        name: BENCH_STREAM.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("creating the BENCH stream")?;
    // Built before the clock starts, the way the relay builds each (subject,
    // headers, payload) from a row.
    let queries = Queries::prepare(client, table).await?;
    let rows = queries
        .due(client, u32::try_from(args.rows).unwrap_or(u32::MAX))
        .await?;
    ensure!(
        rows.len() == args.rows,
        "read {} of {} rows",
        rows.len(),
        args.rows
    );
    let mut jobs = Vec::with_capacity(rows.len());
    for row in &rows {
        let event = row.to_inbound(SOURCE);
        let fields = &event.fields;
        let subject = EventAddress::new(
            SOURCE,
            &fields.domain,
            &fields.entity_id,
            &fields.event_type,
            16,
        )
        .subject();
        let received_at = humantime::format_rfc3339_millis(event.received_at).to_string();
        let headers = EventHeaders {
            msg_id: &event.idempotency_key,
            provider: SOURCE,
            event_id: fields.event_id.as_deref(),
            event_type: &fields.event_type,
            domain: &fields.domain,
            entity: &fields.entity_id,
            entity_version: None,
            received_at: &received_at,
            correlation_id: &event.correlation_id,
            traceparent: Some(&event.traceparent),
            content_type: "application/json",
        }
        .to_map()?;
        let subject = format!("bench.{}", subject.trim_start_matches("hook."));
        jobs.push((subject, headers, event.body));
    }
    let js = js.clone();
    timed(
        "baseline (JetStream publish, same messages)",
        jobs,
        args.concurrency,
        move |(subject, headers, payload)| {
            let js = js.clone();
            async move {
                let ack = js
                    .publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
                ack.await.map(drop).map_err(|e| format!("PubAck: {e}"))
            }
        },
    )
    .await
}

/// Waits until the relay has marked `rows` rows published.
async fn wait_published(metrics: &Metrics, rows: usize) -> anyhow::Result<()> {
    let line = format!("hookmesh_outbox_published_total{{source=\"{SOURCE}\"}} ");
    let deadline = Instant::now() + LIMIT;
    loop {
        let published = metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse::<usize>().ok())
            .unwrap_or(0);
        if published >= rows {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the relay published {published} of {rows} rows within {LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What the latency phase measured.
struct Latency {
    /// Commit → delivered, per row, ascending.
    sorted: Vec<Duration>,
    /// The insert rate reached.
    insert_rate: f64,
}

/// Inserts rows at a steady rate and times each from its commit until an
/// ordered consumer on `HOOK_EVENTS` receives it.
async fn latency(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    database_url: &str,
    table: &TableName,
    args: &Args,
) -> anyhow::Result<Latency> {
    let events = js.get_stream(EVENTS_STREAM).await.context("HOOK_EVENTS")?;
    let mut delivered = events
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: nats.new_inbox(),
            filter_subject: format!("hook.{SOURCE}.>"),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("the ordered consumer")?
        .messages()
        .await
        .context("its messages")?;
    let total = (args.rate * args.seconds) as usize;
    let received = tokio::spawn(async move {
        let mut at: HashMap<i64, Instant> = HashMap::with_capacity(total);
        while at.len() < total {
            let Ok(Some(message)) = tokio::time::timeout(LIMIT, delivered.next()).await else {
                break;
            };
            let Ok(message) = message else { continue };
            let id = message
                .headers
                .as_ref()
                .and_then(|h| headers::get(h, headers::EVENT_ID))
                .and_then(|id| id.parse().ok());
            if let Some(id) = id {
                at.entry(id).or_insert_with(Instant::now);
            }
        }
        at
    });

    // A session of its own, shared by one task per insert: each commit is
    // timed the moment its answer arrives, whatever the loop is doing.
    let (inserter, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .context("the inserting session")?;
    let driver = tokio::spawn(connection);
    let inserter = std::sync::Arc::new(inserter);
    let insert = format!(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload_json) \
         VALUES ('order', $1, 'order.updated', jsonb_build_object('pad', repeat('x', $2))) RETURNING id",
        table.sql()
    );
    let statement = inserter.prepare(&insert).await?;
    let pad = args.payload_bytes.saturating_sub(16) as i32;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let started = Instant::now();
    let mut inserts = tokio::task::JoinSet::new();
    for n in 0..total {
        tokio::time::sleep_until((started + interval * n as u32).into()).await;
        let aggregate = format!("LAT-{}", n % args.aggregates);
        let (inserter, statement) = (inserter.clone(), statement.clone());
        inserts.spawn(async move {
            let row = inserter.query_one(&statement, &[&aggregate, &pad]).await;
            (row, Instant::now())
        });
    }
    let mut committed: HashMap<i64, Instant> = HashMap::with_capacity(total);
    while let Some(joined) = inserts.join_next().await {
        let (row, at) = joined.context("an insert task")?;
        committed.insert(row?.get(0), at);
    }
    driver.abort();
    let insert_rate = stats::rate(total, started.elapsed());
    let arrived = received.await.context("the consumer task")?;
    let mut sorted = Vec::with_capacity(total);
    for (id, commit) in &committed {
        match arrived.get(id) {
            Some(at) => sorted.push(at.saturating_duration_since(*commit)),
            None => bail!("row {id} was not delivered within {LIMIT:?}"),
        }
    }
    sorted.sort_unstable();
    Ok(Latency {
        sorted,
        insert_rate,
    })
}
