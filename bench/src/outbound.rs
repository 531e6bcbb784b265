//! The `outbound` scenario: what outgoing HTTP through a handler costs,
//! next to the same HTTP requests from a native client, in one run against
//! one mock ERP (in this process, real HTTP on loopback).
//!
//! - **throughput**: `--events` CRM order events (distinct orders, so no
//!   entity waits for another) preloaded into `HOOK_EVENTS`, then the real
//!   host runs the shipped `order-sync` component on them, `concurrency` =
//!   `--concurrency`: each event is one `POST /sales-orders` to the mock
//!   ERP plus the handler's state, mapping and emit. Timed from the ERP's
//!   first request from the host until the server confirms the last ack
//!   (the host's start is reported beside, not counted). Against it: the
//!   same number of `POST /sales-orders` (same bodies, an
//!   `Idempotency-Key` each) from `reqwest` with `--concurrency` in flight,
//!   timed from the first request until the last answer.
//! - **added latency**: `--samples` pairs, one at a time: a native request,
//!   then one event through `Runtime::invoke` of order-sync with in-memory
//!   services (no NATS). Each pair's difference is what the sandbox and the
//!   host's HTTP path add to one request — a fresh instance, the host's
//!   gate and headers, a new connection (the host does not pool
//!   connections across invocations), the guest's JSON work; the p50 and
//!   p99 of those differences are reported. Pairs taken side by side keep
//!   a shared machine's drift out of the difference.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream;
use bytes::Bytes;
use hookmesh::headers::EventHeaders;
use hookmesh::manifest::Manifest;
use hookmesh::runtime::{EventInput, MemoryServices, Runtime, Services, Verdict as Outcome};
use hookmesh::streams::{EVENTS_STREAM, Mode};
use hookmesh::subject::EventAddress;
use hookmesh_mock_erp::MockErp;
use serde::Serialize;
use serde_json::json;

use crate::dispatch::{cache_dir, publish_all, wait_all_acked, workspace};
use crate::stats::{self, Verdict, progress};

/// The handler (its consumers are `handler_order-sync_<partition>`).
const HANDLER: &str = "order-sync";
/// The key prefix of the host side's events (`Nats-Msg-Id`), so its ERP
/// requests are told apart from the native ones.
const HOST_KEY: &str = "crm:bench-host-";

/// Options of the `outbound` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events through the host, and native requests beside them.
    #[arg(long, default_value_t = 2_000)]
    pub events: usize,
    /// Requests in flight on each side (the handler's `concurrency`).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// `[ingest] partitions` of the host.
    #[arg(long, default_value_t = 16)]
    pub partitions: u32,
    /// Sequential requests for the added latency, on each side.
    #[arg(long, default_value_t = 500)]
    pub samples: usize,
    /// The longest the host may take for every event, in seconds.
    #[arg(long, default_value_t = 300)]
    pub limit_secs: u64,
}

/// The JSON line.
#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    baseline_rate: f64,
    hookmesh_rate: f64,
    ratio: f64,
    added_p50_ms: f64,
    added_p99_ms: f64,
}

/// Runs the scenario and prints its table and JSON line.
pub async fn run(args: Args) -> anyhow::Result<Verdict> {
    ensure!(args.events > 0, "--events must be at least 1");
    ensure!(args.samples > 0, "--samples must be at least 1");
    let component = workspace().join("handlers/target/wasm32-wasip2/release/order_sync.wasm");
    if !component.is_file() {
        bail!(
            "{} is not built; run: cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml",
            component.display()
        );
    }
    let erp = MockErp::start("127.0.0.1:0")
        .await
        .context("starting the mock ERP")?;
    let manifest = order_sync(&component, &erp, args.concurrency)?;
    let http = reqwest::Client::new();

    progress("added latency: a native request and an order-sync invocation, pair by pair");
    let pairs = paired(&http, &erp, &manifest, args.samples).await?;

    let server = crate::host::start_nats().await?;
    progress("throughput: native requests");
    let native = crate::load::timed(
        "native (reqwest)",
        (0..args.events)
            .map(|i| format!("bench-native-{i}"))
            .collect(),
        args.concurrency as usize,
        {
            let (http, url) = (http.clone(), erp.url());
            move |order: String| {
                let (http, url) = (http.clone(), url.clone());
                async move { post_order(&http, &url, &order).await }
            }
        },
    )
    .await?;
    if stats::report_failures(std::slice::from_ref(&native)) == Verdict::Failed {
        return Ok(Verdict::Failed);
    }
    progress("throughput: the host running order-sync");
    let host = host_side(&server.url(), &erp, manifest, &args).await?;
    drop(server);

    let added = |p: f64| pairs.added_ms(p);
    let ratio = host.rate() / native.rate();
    println!(
        "outbound: {} events / requests per side, concurrency {}, {} partitions; {} sequential samples",
        args.events, args.concurrency, args.partitions, args.samples
    );
    println!(
        "  native (reqwest)            {:>9.1} requests/s  p50 {:.3} ms  p99 {:.3} ms (under load)",
        native.rate(),
        native.percentile_ms(50.0),
        native.percentile_ms(99.0)
    );
    println!(
        "  hookmesh (host + order-sync) {:>8.1} events/s    ({:.3} s; host start {:.2} s before, not counted)",
        host.rate(),
        host.elapsed.as_secs_f64(),
        host.start.as_secs_f64()
    );
    println!("  ratio hookmesh/native: {ratio:.3}");
    for (label, sorted) in [
        ("native request", &pairs.native),
        ("order-sync invocation", &pairs.invoked),
    ] {
        println!(
            "  one at a time, {label:<22} p50 {:.3} ms  p99 {:.3} ms",
            stats::percentile(sorted, 50.0).as_secs_f64() * 1e3,
            stats::percentile(sorted, 99.0).as_secs_f64() * 1e3
        );
    }
    println!(
        "  added per request: p50 {:.3} ms, p99 {:.3} ms",
        added(50.0),
        added(99.0)
    );
    stats::print_json_line(&Summary {
        scenario: "outbound",
        baseline_rate: stats::round(native.rate(), 1),
        hookmesh_rate: stats::round(host.rate(), 1),
        ratio: stats::round(ratio, 4),
        added_p50_ms: stats::round(added(50.0), 3),
        added_p99_ms: stats::round(added(99.0), 3),
    })?;
    Ok(Verdict::Clean)
}

/// The shipped order-sync manifest, pointed at the mock ERP.
fn order_sync(
    component: &std::path::Path,
    erp: &MockErp,
    concurrency: u32,
) -> anyhow::Result<Manifest> {
    let mut manifest = Manifest::load(&workspace().join("handlers/order-sync/handler.toml"))
        .context("the shipped order-sync manifest")?;
    manifest.component = Some(component.to_path_buf());
    manifest.allowed_hosts = vec![erp.url()];
    manifest.config.insert("erp_url".into(), erp.url());
    manifest.concurrency = concurrency;
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("the bench's manifest: {e}"))?;
    Ok(manifest)
}

/// The body order-sync sends for `order`.
fn erp_body(order: &str) -> serde_json::Value {
    json!({"crm_order_id": order, "customer_id": "CUST-7", "payment_terms": "NET30",
           "total": "129.90", "currency": "EUR", "version": 1})
}

/// The CRM webhook body order-sync reads.
fn crm_body(order: &str) -> Bytes {
    Bytes::from(
        json!({"type": "order.created", "data": {"id": order, "version": 1, "total": "129.90",
               "currency": "EUR", "customer": {"id": "CUST-7", "payment_terms": "NET30"}}})
        .to_string(),
    )
}

async fn post_order(http: &reqwest::Client, url: &str, order: &str) -> Result<(), String> {
    let answer = http
        .post(format!("{url}/sales-orders"))
        .header("idempotency-key", format!("{order}:native:0"))
        .json(&erp_body(order))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if answer.status().is_success() {
        answer.bytes().await.map(drop).map_err(|e| e.to_string())
    } else {
        Err(format!("the ERP answered {}", answer.status()))
    }
}

/// The latency pairs: native request and invocation, one at a time.
struct Pairs {
    /// Native latencies, sorted.
    native: Vec<Duration>,
    /// Invocation latencies (`Invoked::elapsed`), sorted.
    invoked: Vec<Duration>,
    /// Each pair's invocation minus its native request, in ms, sorted.
    added: Vec<f64>,
}

impl Pairs {
    /// The nearest-rank `p`th percentile of the differences.
    fn added_ms(&self, p: f64) -> f64 {
        if self.added.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.added.len() as f64).ceil() as usize;
        self.added[rank.clamp(1, self.added.len()) - 1]
    }
}

/// `samples` pairs (after a tenth as many untimed): a native request, then
/// an invocation of order-sync (in-memory services), each for its own
/// order.
async fn paired(
    http: &reqwest::Client,
    erp: &MockErp,
    manifest: &Manifest,
    samples: usize,
) -> anyhow::Result<Pairs> {
    let runtime = Runtime::new(Some(cache_dir())).context("building the wasm runtime")?;
    let component = manifest.component.as_ref().context("a component path")?;
    let bytes = std::fs::read(component).context("reading order-sync")?;
    let prepared = runtime
        .prepare(manifest.clone(), &bytes)
        .await
        .context("preparing order-sync")?;
    let services: Arc<dyn Services> = Arc::new(MemoryServices::default());
    let mut pairs = Pairs {
        native: Vec::with_capacity(samples),
        invoked: Vec::with_capacity(samples),
        added: Vec::with_capacity(samples),
    };
    let warmup = samples / 10;
    for i in 0..warmup + samples {
        let started = Instant::now();
        post_order(http, &erp.url(), &format!("bench-native-seq-{i}"))
            .await
            .map_err(|e| anyhow::anyhow!("a native request: {e}"))?;
        let native = started.elapsed();
        let order = format!("bench-invoke-{i}");
        let event = EventInput {
            idempotency_key: format!("crm:{order}"),
            provider: "crm".into(),
            event_type: "order.created".into(),
            domain: "order".into(),
            entity_id: order.clone(),
            correlation_id: format!("bench-{i}"),
            subject: EventAddress::new("crm", "order", &order, "order.created", 16).subject(),
            attempt: 1,
            payload: crm_body(&order).to_vec(),
            ..EventInput::default()
        };
        let invoked = runtime.invoke(&prepared, event, services.clone()).await;
        if invoked.verdict != Outcome::Ok {
            bail!("order-sync did not return ok: {:?}", invoked.verdict);
        }
        if i >= warmup {
            pairs.native.push(native);
            pairs.invoked.push(invoked.elapsed);
            pairs
                .added
                .push((invoked.elapsed.as_secs_f64() - native.as_secs_f64()) * 1e3);
        }
    }
    pairs.native.sort_unstable();
    pairs.invoked.sort_unstable();
    pairs.added.sort_by(f64::total_cmp);
    Ok(pairs)
}

/// The host side's figures.
struct HostRun {
    events: usize,
    /// From the ERP's first request from the host to the last ack.
    elapsed: Duration,
    /// From `server::run` to the ERP's first request from the host.
    start: Duration,
}

impl HostRun {
    fn rate(&self) -> f64 {
        stats::rate(self.events, self.elapsed)
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Preloads the events, runs the host until every one is acked.
async fn host_side(
    url: &str,
    erp: &MockErp,
    manifest: Manifest,
    args: &Args,
) -> anyhow::Result<HostRun> {
    let config = crate::host::config(
        url,
        "crm",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        args.partitions,
        64 * 1024,
    )?;
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let js = jetstream::new(client.clone());
    hookmesh::streams::apply(&js, &config.ingest, Mode::Update)
        .await
        .context("creating hookmesh's streams")?;
    progress(&format!("preloading {} events", args.events));
    let mut messages = Vec::with_capacity(args.events);
    for i in 0..args.events {
        let order = format!("bench-host-{i}");
        let key = format!("crm:{order}");
        let correlation = format!("bench-{i}");
        let headers = EventHeaders {
            msg_id: &key,
            provider: "crm",
            event_id: Some(&order),
            event_type: "order.created",
            domain: "order",
            entity: &order,
            entity_version: Some("1"),
            received_at: "2026-01-01T00:00:00.000Z",
            correlation_id: &correlation,
            traceparent: None,
            content_type: "application/json",
        }
        .to_map()
        .context("event headers")?;
        let subject =
            EventAddress::new("crm", "order", &order, "order.created", args.partitions).subject();
        messages.push((subject, headers, crm_body(&order)));
    }
    publish_all(&js, messages.into_iter()).await?;

    let listeners = crate::host::listeners().await?;
    let launched = SystemTime::now();
    let (mut host, stop) = crate::host::spawn(config, listeners, vec![manifest]);
    let from_host = |erp: &MockErp| {
        erp.erp()
            .requests()
            .into_iter()
            .filter(|s| {
                s.request
                    .idempotency_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with(HOST_KEY))
            })
            .collect::<Vec<_>>()
    };
    let limit = Duration::from_secs(args.limit_secs.max(1));
    let deadline = Instant::now() + limit;
    loop {
        tokio::select! {
            ended = &mut host => bail!("the host stopped while dispatching: {ended:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let done = erp
            .erp()
            .sales_orders()
            .iter()
            .filter(|o| o.crm_order_id.starts_with("bench-host-"))
            .count();
        if done >= args.events {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the host made {done} of {} sales orders within {limit:?}",
                args.events
            );
        }
    }
    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .context("opening HOOK_EVENTS")?;
    let consumers: Vec<String> = (0..args.partitions)
        .map(|p| hookmesh::manifest::consumer_name(HANDLER, p))
        .collect();
    wait_all_acked(&events, &consumers).await?;
    let finished = SystemTime::now();
    let seen = from_host(erp);
    let first = seen
        .iter()
        .map(|s| s.at_ms)
        .min()
        .context("no ERP request from the host")?;
    ensure!(
        seen.len() == args.events && seen.iter().all(|s| s.status == 201),
        "the host sent {} requests for {} events (retries or failures: {:?})",
        seen.len(),
        args.events,
        seen.iter().find(|s| s.status != 201)
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(40), host).await;
    Ok(HostRun {
        events: args.events,
        elapsed: Duration::from_millis(unix_ms(finished).saturating_sub(first)),
        start: Duration::from_millis(first.saturating_sub(unix_ms(launched))),
    })
}
