//! The `dispatch` scenario: how fast the host runs stored events through a
//! handler, next to how fast a raw JetStream pull consumer drains the same
//! number of messages from the same server.
//!
//! One `nats-server -js` (started here, `NATS_SERVER_BIN` honoured) serves
//! both sides in turn; both are preloaded, untimed, with `--messages`
//! messages of `--payload-bytes`:
//!
//! - **baseline**: one durable pull consumer on a stream of its own
//!   (`BENCH_DISPATCH`, file storage) with a large `max_ack_pending`;
//!   batches of [`BASELINE_BATCH`] pulled continuously, every message acked
//!   (a plain ack, no confirmation), the messages carrying the headers
//!   hookmesh's events carry. Timed from the first pull until the server
//!   confirms the last ack (the consumer has nothing pending or awaiting
//!   an ack), polled every [`ACKED_POLL`].
//! - **hookmesh**: the events on real `HOOK_EVENTS` subjects (provider
//!   `bench`, domain `load`, `--entities` entities over `--partitions`
//!   partitions) with the headers the host writes; then the real host, in
//!   process, with one handler: the `fixture_noop` component on
//!   `bench.load.>`. Timed from just before `server::run` (so the host's own
//!   start — component load, NATS connect, streams, 16 consumers — is
//!   included, nothing subtracted) until the server confirms the last ack,
//!   as on the baseline: once `/metrics` counts
//!   `hookmesh_events_handled_total{handler="noop",outcome="ok"}` at
//!   `--messages` (counted before the emits and the ack), every partition
//!   consumer is polled every [`ACKED_POLL`] until none has anything
//!   pending or awaiting an ack. The time to the first handled event and
//!   the steady rate after it are reported beside.
//!
//! Then, without NATS, the per-event runtime overhead: `Runtime::invoke` of
//! the same component with [`MemoryServices`], sequentially, reporting the
//! percentiles of `Invoked::elapsed` (fresh store + instance + call).
//!
//! Each timed side also reports the CPU time this process and nats-server
//! spent in it, and how long their threads sat runnable waiting for a CPU
//! (both from `/proc`): per message, that says where the time goes, and the
//! wait says how much a shared machine held the run back.
//!
//! `--runs N` measures N pairs (each on a nats-server of its own) and gives
//! the medians: the ratio of each pair is taken within the pair, so a
//! machine whose load drifts between pairs moves both sides of it.
//!
//! `--breakdown` adds rows that take the host side apart (its consumer
//! pattern without a handler, with different acks, with a large
//! `max_ack_pending`, with `Runtime::invoke` but without the host's glue).
//! They are printed in the table only; the JSON line is about the two sides.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hookmesh::config::Config;
use hookmesh::manifest::Manifest;
use hookmesh::runtime::{EventInput, MemoryServices, Runtime, Services, Verdict as Outcome};
use hookmesh::streams::{EVENTS_STREAM, Mode};
use hookmesh::subject::EventAddress;
use serde::Serialize;

use crate::stats::progress;
use crate::stats::{self, Verdict};

/// The guest every side runs.
const GUEST: &str = "fixture_noop";
/// The handler's name (its consumers are `handler_noop_<partition>`).
const HANDLER: &str = "noop";
/// The provider, domain and event type of the events.
const PROVIDER: &str = "bench";
const DOMAIN: &str = "load";
const EVENT_TYPE: &str = "load.tick";
/// The baseline's own stream, consumer and subjects.
const BASELINE_STREAM: &str = "BENCH_DISPATCH";
const BASELINE_CONSUMER: &str = "bench_dispatch";
const BASELINE_SUBJECT: &str = "bench_dispatch";
/// Messages per pull request of the baseline consumer.
const BASELINE_BATCH: usize = 500;
/// The baseline consumer's `max_ack_pending`: large, so the server never
/// waits for acks.
const BASELINE_MAX_ACK_PENDING: i64 = 20_000;
/// PubAcks awaited at once while preloading.
const PUBLISH_WINDOW: usize = 1_024;
/// The longest the baseline may wait for one message.
const BASELINE_NEXT_TIMEOUT: Duration = Duration::from_secs(30);
/// The host side fails when its handled count does not move for this long.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Bounds every request to the host's `/metrics`.
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds the host's graceful stop at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the consumers may take to show every event acknowledged once
/// the handler has run for all of them (the last double acks in flight).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Linux reports process CPU times in USER_HZ ticks, fixed at 100 per second
/// for user space on every architecture.
const USER_HZ: f64 = 100.0;

/// Options of the `dispatch` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages preloaded and then consumed on each side.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Size of each message's payload (a JSON object on the hookmesh side).
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// `[ingest] partitions` of the host: its consumers per handler.
    #[arg(long, default_value_t = 16)]
    pub partitions: u32,
    /// Distinct entity ids the events are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub entities: usize,
    /// Sequential `Runtime::invoke` calls measured for the overhead.
    #[arg(long, default_value_t = 20_000)]
    pub invocations: usize,
    /// Untimed invocations before those.
    #[arg(long, default_value_t = 1_000)]
    pub invocation_warmup: usize,
    /// Also take the host side apart: its consumer pattern driven directly
    /// (no handler; plain, confirmed and request-confirmed acks; a large
    /// `max_ack_pending`) and with `Runtime::invoke` but none of the host's
    /// glue. Printed in the table only.
    #[arg(long)]
    pub breakdown: bool,
    /// The longest each side may take to consume every message, in seconds.
    #[arg(long, default_value_t = 600)]
    pub limit_secs: u64,
    /// A handler that takes this long per event (the `fixture_sleep`
    /// component, like a handler waiting on an ERP) instead of the no-op;
    /// the rate is then compared with the ideal `concurrency / latency`.
    #[arg(long, default_value_t = 0)]
    pub handler_ms: u64,
    /// The handler's `concurrency` (events in flight per host).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Pairs of runs (baseline, then hookmesh, each pair on a nats-server
    /// of its own); the JSON line gives their medians. On a shared machine
    /// one pair says little: its load changes within seconds.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
}

/// The JSON line: the figures scripts compare across runs. With `--runs`,
/// the rates and the ratio are medians of the pairs (each ratio from its
/// own pair), and `ratios` lists every pair's.
#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    runs: usize,
    baseline_rate: f64,
    hookmesh_rate: f64,
    ratio: f64,
    ratios: Vec<f64>,
    overhead_p50_us: f64,
    overhead_p99_us: f64,
}

/// One consuming side: a row of the table.
#[derive(Debug)]
struct Side {
    label: String,
    messages: usize,
    elapsed: Duration,
    cpu: CpuSpent,
}

impl Side {
    fn rate(&self) -> f64 {
        stats::rate(self.messages, self.elapsed)
    }
}

/// What the host side measured besides its total.
#[derive(Debug)]
struct HostDetail {
    /// From just before `server::run` to the first handled event seen.
    first_handled: Duration,
    /// Handled when the first was seen (a poll may see several at once).
    handled_at_first: u64,
    /// The host's own invocation time (its histogram's sum / count).
    invoke_mean: Option<Duration>,
    /// Redeliveries over all partition consumers.
    redelivered: usize,
}

/// The per-event runtime overhead.
#[derive(Debug)]
struct Overhead {
    invocations: usize,
    warmup: usize,
    /// Sorted ascending.
    elapsed: Vec<Duration>,
    /// Wall time of the measured loop (includes building each input).
    wall: Duration,
}

impl Overhead {
    fn us(&self, p: f64) -> f64 {
        stats::percentile(&self.elapsed, p).as_secs_f64() * 1e6
    }

    fn mean_us(&self) -> f64 {
        let total: Duration = self.elapsed.iter().sum();
        total.as_secs_f64() * 1e6 / self.elapsed.len().max(1) as f64
    }
}

/// Runs the scenario and prints its table and JSON line.
pub async fn run(args: Args) -> anyhow::Result<Verdict> {
    ensure!(args.messages > 0, "--messages must be at least 1");
    ensure!(args.entities > 0, "--entities must be at least 1");
    ensure!(args.partitions > 0, "--partitions must be at least 1");
    ensure!(args.invocations > 0, "--invocations must be at least 1");
    let limit = Duration::from_secs(args.limit_secs.max(1));
    if args.handler_ms > 0 {
        return run_slow(args, limit).await;
    }

    // Before anything starts: without the guest there is nothing to measure.
    let component = guest_path();
    if !component.is_file() {
        bail!(
            "{} is not built; run: cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml",
            component.display()
        );
    }
    let manifest = noop_manifest(&component)?;
    let bytes =
        std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;

    // First, and with nothing else running: it also fills the artifact
    // cache, so the host side loads the compiled component instead of
    // compiling it inside its timed start.
    progress("overhead: Runtime::invoke of the no-op, sequentially");
    let overhead = overhead(&manifest, &bytes, &args).await?;

    let runs = args.runs.max(1);
    let mut pairs = Vec::with_capacity(runs);
    for run in 1..=runs {
        if runs > 1 {
            progress(&format!("pair {run} of {runs}"));
        }
        pairs.push(measure_pair(&manifest, &bytes, &args, limit, &overhead).await?);
    }
    let ratios: Vec<f64> = pairs.iter().map(|(b, h)| h / b).collect();
    let baseline_rate = median(pairs.iter().map(|(b, _)| *b).collect());
    let hookmesh_rate = median(pairs.iter().map(|(_, h)| *h).collect());
    let ratio = median(ratios.clone());
    if runs > 1 {
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "median of {runs} pairs: ratio {ratio:.3} (each: {}), baseline {baseline_rate:.0} msg/s, hookmesh {hookmesh_rate:.0} events/s",
            each.join(", ")
        );
    }
    stats::print_json_line(&Summary {
        scenario: "dispatch",
        runs,
        baseline_rate: stats::round(baseline_rate, 1),
        hookmesh_rate: stats::round(hookmesh_rate, 1),
        ratio: stats::round(ratio, 4),
        ratios: ratios.iter().map(|r| stats::round(*r, 4)).collect(),
        overhead_p50_us: stats::round(overhead.us(50.0), 1),
        overhead_p99_us: stats::round(overhead.us(99.0), 1),
    })?;
    Ok(Verdict::Clean)
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One pair: the baseline, then hookmesh, on a nats-server of their own;
/// prints the pair's table and returns both rates.
async fn measure_pair(
    manifest: &Manifest,
    bytes: &[u8],
    args: &Args,
    limit: Duration,
    overhead: &Overhead,
) -> anyhow::Result<(f64, f64)> {
    let server = crate::host::start_nats().await?;
    let url = server.url();
    let nats_pid = server.pid();

    progress("baseline: raw pull consumer, fetch + ack");
    let (baseline, version) = baseline(&url, nats_pid, args, limit).await?;
    progress("hookmesh: the host dispatching to the no-op handler");
    let (hookmesh, detail) = hookmesh_side(&url, nats_pid, manifest.clone(), args, limit).await?;
    let breakdown = if args.breakdown {
        breakdown(&url, nats_pid, manifest, bytes, args, limit).await?
    } else {
        Vec::new()
    };
    drop(server);

    print_table(
        &format!(
            "dispatch: {} messages of {} B per side, {} partitions, {} entities, nats-server {version}",
            args.messages, args.payload_bytes, args.partitions, args.entities
        ),
        &baseline,
        &hookmesh,
        &detail,
        &breakdown,
        overhead,
    );
    let ratio = hookmesh.rate() / baseline.rate();
    println!("ratio hookmesh/baseline: {ratio:.3}");
    Ok((baseline.rate(), hookmesh.rate()))
}

/// The JSON line of the slow-handler variant.
#[derive(Debug, Serialize)]
struct SlowSummary {
    scenario: &'static str,
    runs: usize,
    handler_ms: u64,
    concurrency: u32,
    hookmesh_rate: f64,
    ideal_rate: f64,
    ratio_to_ideal: f64,
    nats_cpu_us_per_event: Option<f64>,
}

/// `--handler-ms`: the host against a handler that takes a fixed time per
/// event; the rate next to the ideal `concurrency / latency`.
async fn run_slow(args: Args, limit: Duration) -> anyhow::Result<Verdict> {
    let component = workspace().join("handlers/target/wasm32-wasip2/release/fixture_sleep.wasm");
    if !component.is_file() {
        bail!(
            "{} is not built; run: cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml",
            component.display()
        );
    }
    let mut manifest = noop_manifest(&component)?;
    manifest.sandbox.clock = true;
    manifest.timeout = Duration::from_millis(args.handler_ms * 4 + 1000);
    manifest.concurrency = args.concurrency;
    manifest
        .config
        .insert("sleep_ms".into(), args.handler_ms.to_string());
    manifest
        .validate()
        .map_err(|e| anyhow::anyhow!("the bench's manifest: {e}"))?;
    let ideal = f64::from(args.concurrency) / (args.handler_ms as f64 / 1000.0);
    println!(
        "dispatch --handler-ms {} --concurrency {}: {} events, {} partitions, {} entities",
        args.handler_ms, args.concurrency, args.messages, args.partitions, args.entities
    );
    let runs = args.runs.max(1);
    let mut rates = Vec::with_capacity(runs);
    let mut nats = Vec::with_capacity(runs);
    for run in 1..=runs {
        if runs > 1 {
            progress(&format!("run {run} of {runs}"));
        }
        let server = crate::host::start_nats().await?;
        let (hookmesh, detail) =
            hookmesh_side(&server.url(), server.pid(), manifest.clone(), &args, limit).await?;
        drop(server);
        let rate = hookmesh.rate();
        let nats_us = hookmesh
            .cpu
            .nats
            .map(|s| s * 1e6 / hookmesh.messages.max(1) as f64);
        println!(
            "  hookmesh {rate:.0} events/s (host start included; first handled after {:.2} s), ideal {ideal:.0}/s, ratio {:.3}",
            detail.first_handled.as_secs_f64(),
            rate / ideal
        );
        if let Some(us) = nats_us {
            println!("  nats-server CPU {us:.1} µs per event");
            nats.push(us);
        }
        rates.push(rate);
    }
    let rate = median(rates);
    let nats_us = (!nats.is_empty()).then(|| median(nats));
    if runs > 1 {
        println!(
            "  median of {runs} runs: {rate:.0} events/s, ratio {:.3}{}",
            rate / ideal,
            nats_us
                .map(|us| format!(", nats-server CPU {us:.1} µs per event"))
                .unwrap_or_default()
        );
    }
    stats::print_json_line(&SlowSummary {
        scenario: "dispatch-slow-handler",
        runs,
        handler_ms: args.handler_ms,
        concurrency: args.concurrency,
        hookmesh_rate: stats::round(rate, 1),
        ideal_rate: stats::round(ideal, 1),
        ratio_to_ideal: stats::round(rate / ideal, 4),
        nats_cpu_us_per_event: nats_us.map(|u| stats::round(u, 1)),
    })?;
    Ok(Verdict::Clean)
}

/// The workspace root (the bench lives one level below it).
pub(crate) fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built no-op guest.
fn guest_path() -> PathBuf {
    workspace().join(format!(
        "handlers/target/wasm32-wasip2/release/{GUEST}.wasm"
    ))
}

/// Where compiled components are cached across runs.
pub(crate) fn cache_dir() -> PathBuf {
    workspace().join("target/hookmesh-bench-cache")
}

/// The handler: the no-op on every `bench.load` event.
fn noop_manifest(component: &std::path::Path) -> anyhow::Result<Manifest> {
    let text = format!(
        "name = \"{HANDLER}\"\nsubject = \"{PROVIDER}.{DOMAIN}.>\"\ntimeout = \"1s\"\nack_wait = \"30s\"\nmax_deliver = 3\n"
    );
    let mut manifest =
        Manifest::from_toml(&text, "hookmesh-bench (generated)").context("the bench's manifest")?;
    manifest.component = Some(component.to_path_buf());
    Ok(manifest)
}

/// A JSON payload of exactly `size` bytes (when `size` leaves room for the
/// fields).
fn payload(index: usize, entity: usize, size: usize) -> Bytes {
    let head = format!(r#"{{"entity":"E{entity}","seq":{index},"pad":""#);
    let tail = r#""}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + pad + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(tail.as_bytes());
    Bytes::from(body)
}

/// The headers the host writes on a stored event, in its order.
fn event_headers(index: usize, entity: &str) -> Vec<(&'static str, String)> {
    vec![
        ("Nats-Msg-Id", format!("{PROVIDER}:dispatch:{index:08}")),
        ("Hook-Provider", PROVIDER.to_string()),
        ("Hook-Event-Id", format!("evt_{index:08}")),
        ("Hook-Event-Type", EVENT_TYPE.to_string()),
        ("Hook-Domain", DOMAIN.to_string()),
        ("Hook-Entity", entity.to_string()),
        // Same length as the host's RFC 3339 millisecond stamp.
        ("Hook-Received-At", "2026-01-01T00:00:00.000Z".to_string()),
        ("Hook-Correlation-Id", format!("bench-dispatch-{index}")),
        (
            "traceparent",
            format!("00-{:032x}-{:016x}-01", index + 1, index + 1),
        ),
        ("Content-Type", "application/json".to_string()),
    ]
}

// ---------------------------------------------------------------------------
// Overhead

/// `Runtime::invoke` of the no-op with a 1 KiB event, sequentially.
async fn overhead(manifest: &Manifest, bytes: &[u8], args: &Args) -> anyhow::Result<Overhead> {
    let runtime = Runtime::new(Some(cache_dir())).context("building the wasm runtime")?;
    let prepared = runtime
        .prepare(manifest.clone(), bytes)
        .await
        .context("preparing the no-op component")?;
    let services: Arc<dyn Services> = Arc::new(MemoryServices::default());
    let entity = "E0";
    let address = EventAddress::new(PROVIDER, DOMAIN, entity, EVENT_TYPE, args.partitions);
    let template = EventInput {
        id: Some("evt_00000000".into()),
        idempotency_key: format!("{PROVIDER}:dispatch:00000000"),
        provider: PROVIDER.into(),
        event_type: EVENT_TYPE.into(),
        domain: DOMAIN.into(),
        entity_id: entity.into(),
        entity_version: None,
        correlation_id: "bench-dispatch-0".into(),
        subject: address.subject(),
        received_at: "2026-01-01T00:00:00.000Z".into(),
        attempt: 1,
        headers: event_headers(0, entity)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        payload: payload(0, 0, args.payload_bytes).to_vec(),
    };
    let mut elapsed = Vec::with_capacity(args.invocations);
    let mut wall = Duration::ZERO;
    for round in 0..args.invocation_warmup + args.invocations {
        if round == args.invocation_warmup {
            eprintln!("hookmesh-bench: timing overhead (Runtime::invoke)");
            wall = Duration::ZERO;
        }
        let started = Instant::now();
        let invoked = runtime
            .invoke(&prepared, template.clone(), services.clone())
            .await;
        wall += started.elapsed();
        if invoked.verdict != Outcome::Ok {
            bail!(
                "invocation {round} of the no-op did not return ok: {:?}",
                invoked.verdict
            );
        }
        if round >= args.invocation_warmup {
            elapsed.push(invoked.elapsed);
        }
    }
    eprintln!("hookmesh-bench: timed overhead (Runtime::invoke)");
    elapsed.sort_unstable();
    Ok(Overhead {
        invocations: args.invocations,
        warmup: args.invocation_warmup,
        elapsed,
        wall,
    })
}

// ---------------------------------------------------------------------------
// CPU accounting

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat`; `None` where that cannot be read.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may hold spaces;
    // fields after it are plain. utime and stime are fields 14 and 15.
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Seconds a process's threads spent runnable but waiting for a CPU, from
/// `/proc/<pid>/task/*/schedstat` (its second field, in ns): how much the
/// machine's other load held it back. `None` where that cannot be read.
fn wait_seconds(pid: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            // A thread that ended meanwhile.
            continue;
        };
        total += text.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(total as f64 / 1e9)
}

/// A snapshot of both processes' CPU and run-queue wait time.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    bench: Option<f64>,
    nats: Option<f64>,
    bench_wait: Option<f64>,
    nats_wait: Option<f64>,
}

impl CpuMark {
    fn now(nats_pid: Option<u32>) -> Self {
        let nats = nats_pid.map(|pid| pid.to_string());
        CpuMark {
            bench: cpu_seconds("self"),
            nats: nats.as_deref().and_then(cpu_seconds),
            bench_wait: wait_seconds("self"),
            nats_wait: nats.as_deref().and_then(wait_seconds),
        }
    }

    fn since(self, start: CpuMark) -> CpuSpent {
        // Threads that ended in between can make a wait sum shrink.
        let diff = |a: Option<f64>, b: Option<f64>| Some((a? - b?).max(0.0));
        CpuSpent {
            bench: diff(self.bench, start.bench),
            nats: diff(self.nats, start.nats),
            bench_wait: diff(self.bench_wait, start.bench_wait),
            nats_wait: diff(self.nats_wait, start.nats_wait),
        }
    }
}

/// CPU seconds spent by this process and nats-server during a timed side,
/// and seconds their threads waited for a CPU.
#[derive(Debug, Clone, Copy, Default)]
struct CpuSpent {
    bench: Option<f64>,
    nats: Option<f64>,
    bench_wait: Option<f64>,
    nats_wait: Option<f64>,
}

// ---------------------------------------------------------------------------
// Preloading

/// Publishes every message, [`PUBLISH_WINDOW`] PubAcks in flight, and fails
/// on the first refused one.
pub(crate) async fn publish_all(
    js: &jetstream::Context,
    messages: impl Iterator<Item = (String, HeaderMap, Bytes)>,
) -> anyhow::Result<()> {
    let mut acks = FuturesUnordered::new();
    for (subject, headers, payload) in messages {
        if acks.len() >= PUBLISH_WINDOW
            && let Some(ack) = acks.next().await
        {
            ack?;
        }
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .context("publishing a preloaded message")?;
        acks.push(async move { ack.await.map(drop).context("PubAck of a preloaded message") });
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    Ok(())
}

/// How many messages a stream holds.
async fn stored(js: &jetstream::Context, name: &str) -> anyhow::Result<u64> {
    let mut stream = js
        .get_stream(name)
        .await
        .with_context(|| format!("opening {name}"))?;
    Ok(stream
        .info()
        .await
        .with_context(|| format!("reading {name}'s state"))?
        .state
        .messages)
}

// ---------------------------------------------------------------------------
// Baseline

/// The baseline side; also returns the server's version for the title.
async fn baseline(
    url: &str,
    nats_pid: Option<u32>,
    args: &Args,
    limit: Duration,
) -> anyhow::Result<(Side, String)> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let version = client.server_info().version;
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: BASELINE_STREAM.into(),
            subjects: vec![format!("{BASELINE_SUBJECT}.>")],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the {BASELINE_STREAM} stream"))?;

    progress(&format!("baseline: preloading {} messages", args.messages));
    let partitions = args.partitions as usize;
    let size = args.payload_bytes;
    publish_all(
        &js,
        (0..args.messages).map(|i| {
            // The headers hookmesh's events carry, so both sides move the
            // same bytes.
            let mut headers = HeaderMap::new();
            for (name, value) in event_headers(i, &format!("E{}", i % args.entities)) {
                headers.insert(name, value.as_str());
            }
            (
                format!("{BASELINE_SUBJECT}.{}", i % partitions),
                headers,
                payload(i, i % args.entities, size),
            )
        }),
    )
    .await?;
    let held = stored(&js, BASELINE_STREAM).await?;
    ensure!(
        held == args.messages as u64,
        "{BASELINE_STREAM} holds {held} messages after {} were published",
        args.messages
    );

    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(BASELINE_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            deliver_policy: consumer::DeliverPolicy::All,
            max_ack_pending: BASELINE_MAX_ACK_PENDING,
            ack_wait: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .context("creating the baseline consumer")?;

    eprintln!("hookmesh-bench: timing baseline (fetch + ack)");
    let cpu = CpuMark::now(nats_pid);
    let started = Instant::now();
    let drained = tokio::time::timeout(limit, async {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BASELINE_BATCH)
            .messages()
            .await
            .context("starting to pull")?;
        let mut acked = 0;
        while acked < args.messages {
            let message = tokio::time::timeout(BASELINE_NEXT_TIMEOUT, messages.next())
                .await
                .with_context(|| {
                    format!("no message within {BASELINE_NEXT_TIMEOUT:?} after {acked} acked")
                })?
                .with_context(|| format!("the pull ended after {acked} acked"))?
                .map_err(|e| anyhow::anyhow!("pulling after {acked} acked: {e}"))?;
            message
                .ack()
                .await
                .map_err(|e| anyhow::anyhow!("acking: {e}"))?;
            acked += 1;
        }
        client.flush().await.context("flushing the acks")?;
        // The clock stops where hookmesh's does: the server confirms
        // every ack.
        wait_all_acked(&stream, &[BASELINE_CONSUMER.to_string()]).await?;
        anyhow::Ok(())
    })
    .await;
    let elapsed = started.elapsed();
    let cpu = CpuMark::now(nats_pid).since(cpu);
    match drained {
        Ok(result) => result?,
        Err(_) => bail!(
            "the baseline did not consume {} messages within {limit:?}",
            args.messages
        ),
    }
    eprintln!("hookmesh-bench: timed baseline (fetch + ack)");

    // Untimed: the ack floor is at the last message.
    let info = stream
        .consumer_info(BASELINE_CONSUMER)
        .await
        .context("reading the baseline consumer")?;
    ensure!(
        info.ack_floor.stream_sequence == args.messages as u64,
        "the baseline consumer's ack floor is {} after {} acks",
        info.ack_floor.stream_sequence,
        args.messages
    );
    // Idle from here on, and its stream gone from the server's disk work.
    drop(consumer);
    js.delete_stream(BASELINE_STREAM)
        .await
        .with_context(|| format!("deleting {BASELINE_STREAM}"))?;
    drop(client);
    Ok((
        Side {
            label: "baseline (1 pull consumer, fetch + ack)".into(),
            messages: args.messages,
            elapsed,
            cpu,
        },
        version,
    ))
}

/// How often both sides poll the server, once their last event is done
/// locally, for the confirmation that every ack arrived.
const ACKED_POLL: Duration = Duration::from_millis(5);

/// Polls `consumers` of `stream` until every one has nothing pending and
/// nothing awaiting an ack: the point where both sides stop their clock
/// (the last ack confirmed by the server). Returns the summed
/// redeliveries the consumers report.
pub(crate) async fn wait_all_acked(
    stream: &jetstream::stream::Stream,
    consumers: &[String],
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let mut open = 0u64;
        let mut redelivered = 0;
        for name in consumers {
            let info = stream
                .consumer_info(name)
                .await
                .with_context(|| format!("reading consumer {name}"))?;
            open += info.num_pending + info.num_ack_pending as u64;
            redelivered += info.num_redelivered;
        }
        if open == 0 {
            return Ok(redelivered);
        }
        if Instant::now() > deadline {
            bail!("{open} messages are still pending or unacknowledged after {SETTLE_TIMEOUT:?}");
        }
        tokio::time::sleep(ACKED_POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Hookmesh

/// The host's config: the bench server, the partitions asked for, one
/// provider (the events are preloaded, not posted). Built from TOML like a
/// deployment's, with an empty environment.
fn host_config(nats_url: &str, partitions: u32) -> anyhow::Result<Config> {
    crate::host::config(
        nats_url,
        PROVIDER,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        partitions,
        64 * 1024,
    )
}

/// What the host's `/metrics` says about the handler.
#[derive(Debug, Default)]
struct HandlerFigures {
    ok: u64,
    failed: u64,
    invoke_sum_seconds: f64,
    invoke_count: u64,
}

/// Reads the handler's figures from the Prometheus text.
fn parse_metrics(text: &str) -> HandlerFigures {
    let mut figures = HandlerFigures::default();
    let handler = format!("handler=\"{HANDLER}\"");
    for line in text.lines() {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        if name.starts_with("hookmesh_events_handled_total{") && name.contains(&handler) {
            if name.contains("outcome=\"ok\"") {
                figures.ok += value as u64;
            } else {
                figures.failed += value as u64;
            }
        } else if name.starts_with("hookmesh_invocation_duration_seconds_sum") {
            figures.invoke_sum_seconds = value;
        } else if name.starts_with("hookmesh_invocation_duration_seconds_count") {
            figures.invoke_count = value as u64;
        }
    }
    figures
}

/// Reads `/metrics`; `None` while the host does not answer yet.
async fn handler_figures(http: &reqwest::Client, url: &str) -> Option<HandlerFigures> {
    let answer = http.get(url).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    Some(parse_metrics(&answer.text().await.ok()?))
}

/// The hookmesh side.
async fn hookmesh_side(
    url: &str,
    nats_pid: Option<u32>,
    manifest: Manifest,
    args: &Args,
    limit: Duration,
) -> anyhow::Result<(Side, HostDetail)> {
    let config = host_config(url, args.partitions)?;
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let js = jetstream::new(client.clone());
    hookmesh::streams::apply(&js, &config.ingest, Mode::Update)
        .await
        .context("creating hookmesh's streams")?;

    progress(&format!(
        "hookmesh: preloading {} events into {EVENTS_STREAM}",
        args.messages
    ));
    let addresses: Vec<String> = (0..args.entities)
        .map(|e| {
            EventAddress::new(
                PROVIDER,
                DOMAIN,
                &format!("E{e}"),
                EVENT_TYPE,
                args.partitions,
            )
            .subject()
        })
        .collect();
    let size = args.payload_bytes;
    publish_all(
        &js,
        (0..args.messages).map(|i| {
            let entity = i % args.entities;
            let mut headers = HeaderMap::new();
            for (name, value) in event_headers(i, &format!("E{entity}")) {
                headers.insert(name, value.as_str());
            }
            (addresses[entity].clone(), headers, payload(i, entity, size))
        }),
    )
    .await?;
    let held = stored(&js, EVENTS_STREAM).await?;
    ensure!(
        held == args.messages as u64,
        "{EVENTS_STREAM} holds {held} events after {} were published",
        args.messages
    );

    let listeners = crate::host::listeners().await?;
    let metrics_url = format!("http://{}/metrics", listeners.admin.local_addr()?);
    let http = reqwest::Client::builder()
        .timeout(METRICS_TIMEOUT)
        .build()
        .context("building the HTTP client")?;

    eprintln!("hookmesh-bench: timing hookmesh (host start → last ack confirmed)");
    let cpu = CpuMark::now(nats_pid);
    let started = Instant::now();
    let (mut host, stop) = crate::host::spawn(config, listeners, vec![manifest]);

    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .with_context(|| format!("opening {EVENTS_STREAM}"))?;
    let consumers: Vec<String> = (0..args.partitions)
        .map(|partition| hookmesh::manifest::consumer_name(HANDLER, partition))
        .collect();
    let target = args.messages as u64;
    let mut first: Option<(Duration, u64)> = None;
    let mut last = HandlerFigures::default();
    let mut progressed = Instant::now();
    let (end, redelivered) = loop {
        // Fine polls while the start and the end are being timed, coarse
        // ones in between, so the poller costs the host next to nothing.
        let interval = if first.is_none() || last.ok * 20 >= target * 19 {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        tokio::select! {
            ended = &mut host => bail!(
                "the host stopped while dispatching ({} of {target} handled): {}",
                last.ok,
                ended_why(ended)
            ),
            _ = tokio::time::sleep(interval) => {}
        }
        if let Some(figures) = handler_figures(&http, &metrics_url).await {
            if figures.failed > 0 {
                bail!(
                    "the no-op handler failed {} times (and succeeded {}); see the host's warnings",
                    figures.failed,
                    figures.ok
                );
            }
            if figures.ok > last.ok {
                progressed = Instant::now();
            }
            if first.is_none() && figures.ok > 0 {
                first = Some((started.elapsed(), figures.ok));
            }
            last = figures;
        }
        if last.ok >= target {
            // Handled is counted before the emits and the ack: the clock
            // stops, as the baseline's does, once the server confirms
            // every ack.
            let redelivered = wait_all_acked(&events, &consumers).await?;
            break (started.elapsed(), redelivered);
        }
        if started.elapsed() > limit {
            bail!(
                "the host handled only {} of {target} events within {limit:?}",
                last.ok
            );
        }
        if progressed.elapsed() > STALL_LIMIT {
            bail!(
                "the host's handled count stayed at {} of {target} for {STALL_LIMIT:?}",
                last.ok
            );
        }
    };
    let cpu = CpuMark::now(nats_pid).since(cpu);
    eprintln!("hookmesh-bench: timed hookmesh (host start → last ack confirmed)");
    ensure!(
        last.ok == target,
        "the host handled {} events, {target} were stored (some twice?)",
        last.ok
    );

    let _ = stop.send(());
    match tokio::time::timeout(STOP_TIMEOUT, host).await {
        Ok(Ok(Ok(()))) => {}
        Ok(ended) => bail!("the host failed while stopping: {}", ended_why(ended)),
        Err(_) => bail!("the host did not stop within {STOP_TIMEOUT:?}"),
    }
    drop(client);

    let (first_handled, handled_at_first) = first.context("no event was seen handled")?;
    let invoke_mean = (last.invoke_count > 0)
        .then(|| Duration::from_secs_f64(last.invoke_sum_seconds / last.invoke_count as f64));
    Ok((
        Side {
            label: format!("hookmesh (host + noop, {} partitions)", args.partitions),
            messages: args.messages,
            elapsed: end,
            cpu,
        },
        HostDetail {
            first_handled,
            handled_at_first,
            invoke_mean,
            redelivered,
        },
    ))
}

/// Why the host task ended, in words.
fn ended_why(
    ended: Result<Result<(), hookmesh::server::ServeError>, tokio::task::JoinError>,
) -> String {
    match ended {
        Ok(Ok(())) => "it returned without error".into(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("it panicked or was cancelled: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Breakdown

/// How a breakdown variant settles each delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// `Message::ack`: published, not confirmed.
    Ack,
    /// `Message::double_ack`, as the host does: a fresh inbox subscription
    /// (SUB, UNSUB) per ack, and the server's answer awaited.
    DoubleAck,
}

/// One breakdown variant: a consumer per partition on `HOOK_EVENTS`.
struct Variant {
    label: &'static str,
    /// Durable names are `<prefix>_<partition>`.
    prefix: &'static str,
    max_ack_pending: i64,
    settle: Settle,
    /// Run the handler (through `Runtime::invoke`) before settling.
    invoke: bool,
}

/// What a breakdown worker needs to invoke the handler.
#[derive(Clone)]
struct Invoker {
    runtime: Arc<Runtime>,
    prepared: Arc<hookmesh::runtime::Prepared>,
    services: Arc<dyn Services>,
}

/// How many of the preloaded events land on each partition.
fn partition_counts(args: &Args) -> Vec<u64> {
    let partition_of: Vec<usize> = (0..args.entities)
        .map(|e| {
            EventAddress::new(
                PROVIDER,
                DOMAIN,
                &format!("E{e}"),
                EVENT_TYPE,
                args.partitions,
            )
            .partition as usize
        })
        .collect();
    let mut counts = vec![0u64; args.partitions as usize];
    for i in 0..args.messages {
        counts[partition_of[i % args.entities]] += 1;
    }
    counts
}

/// The host side taken apart, on the events the host has just handled
/// (still in `HOOK_EVENTS`: its retention is by age).
async fn breakdown(
    url: &str,
    nats_pid: Option<u32>,
    manifest: &Manifest,
    bytes: &[u8],
    args: &Args,
    limit: Duration,
) -> anyhow::Result<Vec<Side>> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let js = jetstream::new(client.clone());
    let runtime = Arc::new(Runtime::new(Some(cache_dir())).context("building the wasm runtime")?);
    let prepared = runtime
        .prepare(manifest.clone(), bytes)
        .await
        .context("preparing the no-op component")?;
    let invoker = Invoker {
        runtime,
        prepared,
        services: Arc::new(MemoryServices::default()),
    };
    // The host's consumer pattern: 16 filtered consumers, a window of
    // twice the default concurrency, pulls of half a window.
    let window = i64::from(hookmesh::manifest::DEFAULT_CONCURRENCY) * 2;
    let variants = [
        Variant {
            label: "  host's consumers (window, half-window pulls), no handler, plain ack",
            prefix: "bench_ack",
            max_ack_pending: window,
            settle: Settle::Ack,
            invoke: false,
        },
        Variant {
            label: "  same, double_ack",
            prefix: "bench_double",
            max_ack_pending: window,
            settle: Settle::DoubleAck,
            invoke: false,
        },
        Variant {
            label: "  same consumers, max_ack_pending 20000, plain ack",
            prefix: "bench_wide",
            max_ack_pending: BASELINE_MAX_ACK_PENDING,
            settle: Settle::Ack,
            invoke: false,
        },
        Variant {
            label: "  host's consumers + Runtime::invoke, plain ack",
            prefix: "bench_invoke",
            max_ack_pending: window,
            settle: Settle::Ack,
            invoke: true,
        },
    ];
    let counts = partition_counts(args);
    let mut rows = Vec::new();
    for variant in variants {
        progress(&format!("breakdown: {}", variant.label.trim()));
        let invoker = variant.invoke.then(|| invoker.clone());
        rows.push(run_variant(&client, &js, nats_pid, &variant, invoker, &counts, limit).await?);
    }
    drop(client);
    Ok(rows)
}

/// Runs one variant: consumers created first (untimed), then one task per
/// partition pulling the way the host does until its events are settled.
async fn run_variant(
    client: &async_nats::Client,
    js: &jetstream::Context,
    nats_pid: Option<u32>,
    variant: &Variant,
    invoker: Option<Invoker>,
    counts: &[u64],
    limit: Duration,
) -> anyhow::Result<Side> {
    let events = js
        .get_stream(EVENTS_STREAM)
        .await
        .with_context(|| format!("opening {EVENTS_STREAM}"))?;
    let mut consumers = Vec::new();
    for partition in 0..counts.len() as u32 {
        let consumer: consumer::PullConsumer = events
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("{}_{partition}", variant.prefix)),
                filter_subject: hookmesh::manifest::partition_filter(
                    &format!("{PROVIDER}.{DOMAIN}.>"),
                    partition,
                )
                .map_err(|e| anyhow::anyhow!(e))?,
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::All,
                max_deliver: 3,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: variant.max_ack_pending,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating a {} consumer", variant.prefix))?;
        consumers.push(consumer);
    }

    let label = variant.label.trim();
    eprintln!("hookmesh-bench: timing {label}");
    let cpu = CpuMark::now(nats_pid);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (consumer, &count) in consumers.into_iter().zip(counts) {
        let invoker = invoker.clone();
        let settle = variant.settle;
        let max_ack_pending = variant.max_ack_pending;
        workers.spawn(async move {
            let mut messages = consumer
                .stream()
                .max_messages_per_batch(
                    usize::try_from(max_ack_pending / 2)
                        .unwrap_or(64)
                        .clamp(1, 100),
                )
                // The host's pull expiry: when the client's count of what
                // a pull still owes goes wrong (seen here at 100 000 events
                // with the handler: the last deliveries waited for a 30 s
                // pull to expire), the next pull comes this soon.
                .expires(Duration::from_secs(2))
                .heartbeat(Duration::from_secs(1))
                .messages()
                .await
                .context("starting to pull")?;
            let (mut settled, mut redelivered) = (0, 0u64);
            while settled < count {
                let message = match tokio::time::timeout(BASELINE_NEXT_TIMEOUT, messages.next())
                    .await
                    .with_context(|| {
                        format!("no message within {BASELINE_NEXT_TIMEOUT:?} after {settled}")
                    })?
                    .with_context(|| format!("the pull ended after {settled}"))?
                {
                    Ok(message) => message,
                    // A worker starved of CPU by the others misses a
                    // heartbeat; the stream goes on pulling.
                    Err(e) if e.kind() == consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                        continue;
                    }
                    Err(e) => bail!("pulling after {settled}: {e}"),
                };
                let (stream_seq, delivered) = message
                    .info()
                    .map(|info| (info.stream_sequence, info.delivered))
                    .map_err(|e| anyhow::anyhow!("a delivery without metadata: {e}"))?;
                if delivered > 1 {
                    redelivered += 1;
                }
                if let Some(invoker) = &invoker {
                    let event = hookmesh::dispatch::event_input(&message, stream_seq, 1)
                        .map_err(|e| anyhow::anyhow!("not an event: {e}"))?;
                    let invoked = invoker
                        .runtime
                        .invoke_traced(
                            &invoker.prepared,
                            &event.as_event(),
                            invoker.services.clone(),
                            &hookmesh::telemetry::Trace::off(),
                        )
                        .await;
                    ensure!(
                        invoked.verdict == Outcome::Ok,
                        "the no-op did not return ok: {:?}",
                        invoked.verdict
                    );
                }
                let acked = match settle {
                    Settle::Ack => message.ack().await,
                    Settle::DoubleAck => message.double_ack().await,
                };
                acked.map_err(|e| anyhow::anyhow!("settling: {e}"))?;
                settled += 1;
            }
            anyhow::Ok(redelivered)
        });
    }
    let all = tokio::time::timeout(limit, async {
        let mut redelivered = 0;
        while let Some(joined) = workers.join_next().await {
            redelivered += joined.context("a breakdown worker panicked")??;
        }
        client.flush().await.context("flushing the acks")?;
        anyhow::Ok(redelivered)
    })
    .await;
    let elapsed = started.elapsed();
    let cpu = CpuMark::now(nats_pid).since(cpu);
    let redelivered = match all {
        Ok(result) => result?,
        Err(_) => bail!("{label} did not finish within {limit:?}"),
    };
    eprintln!("hookmesh-bench: timed {label}");
    // A redelivery waited out the consumer's ack_wait: the row's rate is
    // then about the pull loop, not the work.
    let label = match redelivered {
        0 => variant.label.to_string(),
        n => format!("{} ({n} redelivered)", variant.label),
    };
    Ok(Side {
        label,
        messages: counts.iter().sum::<u64>() as usize,
        elapsed,
        cpu,
    })
}

// ---------------------------------------------------------------------------
// Output

/// Prints the table: both sides with their CPU, the host's start and steady
/// rate, the runtime overhead.
fn print_table(
    title: &str,
    baseline: &Side,
    hookmesh: &Side,
    detail: &HostDetail,
    breakdown: &[Side],
    overhead: &Overhead,
) {
    let steady_messages = (hookmesh.messages as u64).saturating_sub(detail.handled_at_first);
    let steady_elapsed = hookmesh.elapsed.saturating_sub(detail.first_handled);
    let steady = Side {
        label: "  of which after the first handled event".into(),
        messages: steady_messages as usize,
        elapsed: steady_elapsed,
        cpu: CpuSpent::default(),
    };
    let rows: Vec<&Side> = [baseline, hookmesh, &steady]
        .into_iter()
        .chain(breakdown)
        .collect();
    let width = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let cpu = |value: Option<f64>| value.map_or("-".to_string(), |v| format!("{v:.2}"));
    let per_message = |value: Option<f64>, messages: usize| {
        value.map_or("-".to_string(), |v| {
            format!("{:.1}", v * 1e6 / messages.max(1) as f64)
        })
    };
    println!("{title}");
    println!(
        "{:<width$}  {:>9}  {:>8}  {:>11}  {:>10}  {:>9}  {:>12}  {:>11}  {:>12}  {:>11}",
        "side",
        "messages",
        "seconds",
        "rate msg/s",
        "bench CPU s",
        "nats CPU s",
        "bench µs/msg",
        "nats µs/msg",
        "bench wait s",
        "nats wait s"
    );
    for row in rows {
        println!(
            "{:<width$}  {:>9}  {:>8.3}  {:>11.1}  {:>10}  {:>9}  {:>12}  {:>11}  {:>12}  {:>11}",
            row.label,
            row.messages,
            row.elapsed.as_secs_f64(),
            row.rate(),
            cpu(row.cpu.bench),
            cpu(row.cpu.nats),
            per_message(row.cpu.bench, row.messages),
            per_message(row.cpu.nats, row.messages),
            cpu(row.cpu.bench_wait),
            cpu(row.cpu.nats_wait),
        );
    }
    println!(
        "hookmesh timing: from just before server::run (component load, NATS connect, streams, consumers included) until the server confirmed the last ack (as on the baseline); first handled event after {:.3} s; in-host invoke mean {}; redeliveries {}",
        detail.first_handled.as_secs_f64(),
        detail.invoke_mean.map_or("-".to_string(), |d| format!(
            "{:.1} µs",
            d.as_secs_f64() * 1e6
        )),
        detail.redelivered,
    );
    println!(
        "overhead (Runtime::invoke of {GUEST}, MemoryServices, sequential): {} invocations after {} warm-up: p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs, {:.0} invocations/s on one task",
        overhead.invocations,
        overhead.warmup,
        overhead.us(50.0),
        overhead.us(99.0),
        overhead.mean_us(),
        stats::rate(overhead.invocations, overhead.wall),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_take_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![0.5, 0.3, 0.4]), 0.4);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn payloads_have_the_size_asked_for() {
        assert_eq!(payload(12, 3, 1024).len(), 1024);
        assert!(serde_json::from_slice::<serde_json::Value>(&payload(1, 2, 1024)).is_ok());
    }

    #[test]
    fn metrics_are_read() {
        let text = "# HELP x\nhookmesh_events_handled_total{handler=\"noop\",outcome=\"ok\"} 42\n\
                    hookmesh_events_handled_total{handler=\"noop\",outcome=\"trap\"} 1\n\
                    hookmesh_events_handled_total{handler=\"other\",outcome=\"ok\"} 7\n\
                    hookmesh_invocation_duration_seconds_sum 0.5\n\
                    hookmesh_invocation_duration_seconds_count 10\n";
        let f = parse_metrics(text);
        assert_eq!((f.ok, f.failed, f.invoke_count), (42, 1, 10));
        assert_eq!(f.invoke_sum_seconds, 0.5);
    }
}
