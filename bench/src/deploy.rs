//! The `deploy` scenario: how long after `deploy` returns every running
//! host runs the new version, next to how long the bare KV watch that
//! carries it takes to notify.
//!
//! One `nats-server -js` (started here, `NATS_SERVER_BIN` honoured) and
//! `--hosts` hosts in this process (`server::run`, each its own NATS
//! connection and HTTP listener, all sharing one artifact cache), running
//! nothing until the first deploy. Then `--rounds` deploys of the example
//! handlers (`order-sync` and `return-credit-note` in turn), each a new
//! version of the same component (a `[config]` value changes), so the
//! cache is warm as the goal states; one untimed deploy of each first.
//!
//! - **hookmesh**: from `HandlerStore::deploy` returning (the library call
//!   behind `hookmesh deploy`, after its local validation) until every
//!   host's `/metrics` shows `hookmesh_handler_version{handler,version} 1`
//!   for the new version, polled every [`POLL`]. Per round the slowest
//!   host counts.
//! - **baseline**: from a bare `kv.put` to `hook_handlers` (the bucket a
//!   deploy writes and every host follows) returning until a `kv.watch` on
//!   that bucket yields it: the floor any follower built on the bucket
//!   pays.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt;
use hookmesh::deploy::{self, Deployed, HandlerStore, Validated};
use hookmesh::manifest::Manifest;
use hookmesh::server::Options;
use hookmesh::streams::Mode;
use serde::Serialize;

use crate::dispatch::{cache_dir, workspace};
use crate::host;
use crate::stats::{self, Verdict, percentile, progress};

/// How often the hosts' `/metrics` are polled while a deploy lands.
const POLL: Duration = Duration::from_millis(2);
/// The longest one deploy may take to land everywhere.
const LAND_LIMIT: Duration = Duration::from_secs(30);
/// The example handlers deployed in turn.
const HANDLERS: [&str; 2] = ["order-sync", "return-credit-note"];

/// Options of the `deploy` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed deploys.
    #[arg(long, default_value_t = 40)]
    pub rounds: usize,
    /// Hosts running at once.
    #[arg(long, default_value_t = 2)]
    pub hosts: usize,
}

/// The JSON line.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    rounds: usize,
    hosts: usize,
    nats_server: String,
    all_hosts_p50_ms: f64,
    all_hosts_p90_ms: f64,
    all_hosts_max_ms: f64,
    first_host_p50_ms: f64,
    baseline_watch_p50_ms: f64,
    baseline_watch_p90_ms: f64,
    goal_ms: f64,
    goal_met: bool,
}

/// One example handler ready to deploy.
struct Example {
    manifest: Manifest,
    component: Validated,
}

fn example(name: &str) -> anyhow::Result<Example> {
    let path = workspace().join(format!("handlers/{name}/handler.toml"));
    let manifest = Manifest::load(&path).with_context(|| format!("{}", path.display()))?;
    let component = manifest
        .component
        .clone()
        .context("the example manifest names its component")?;
    let bytes = std::fs::read(&component).with_context(|| {
        format!(
            "{} is not built; run: cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml",
            component.display()
        )
    })?;
    let runtime = hookmesh::runtime::Runtime::new(Some(crate::dispatch::cache_dir()))
        .context("building the wasm runtime")?;
    let component =
        deploy::validate(&runtime, &bytes).with_context(|| format!("{name}: not deployable"))?;
    Ok(Example {
        manifest,
        component,
    })
}

/// Runs the scenario.
pub async fn run(args: Args) -> anyhow::Result<Verdict> {
    if args.hosts == 0 || args.rounds == 0 {
        bail!("--hosts and --rounds must be at least 1");
    }
    let examples = HANDLERS
        .iter()
        .map(|name| example(name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let server = crate::host::start_nats().await?;
    let url = server.url();
    let config = host::config(&url, "bench", "whsec_YmVuY2g=", 16, 65_536)?;
    let client = async_nats::connect(&url).await.context("connecting")?;
    let js = async_nats::jetstream::new(client);
    hookmesh::streams::apply(&js, &config.ingest, Mode::Update)
        .await
        .context("applying streams")?;
    let nats_server = js.client().server_info().version.clone();

    progress(&format!("starting {} hosts", args.hosts));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut hosts = Vec::new();
    let mut metrics_urls = Vec::new();
    for _ in 0..args.hosts {
        let listeners = host::listeners().await?;
        metrics_urls.push(format!("http://{}/metrics", listeners.admin.local_addr()?));
        let mut stopped = stopped.clone();
        hosts.push(tokio::spawn(hookmesh::server::run(
            config.clone(),
            listeners,
            Options {
                streams: Mode::Ensure,
                handlers: Vec::new(),
                cache_dir: Some(cache_dir()),
                role: hookmesh::server::Role::All,
            },
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
    }
    let store = HandlerStore::open(&js).await.context("handler store")?;

    // Untimed: one version of each example, which also warms the cache.
    let mut round = 0usize;
    for example in &examples {
        land(&store, &http, &metrics_urls, example, round).await?;
        round += 1;
    }
    progress(&format!("timing {} deploys", args.rounds));
    let mut all_hosts = Vec::with_capacity(args.rounds);
    let mut first_host = Vec::with_capacity(args.rounds);
    for i in 0..args.rounds {
        let (first, all) = land(
            &store,
            &http,
            &metrics_urls,
            &examples[i % examples.len()],
            round,
        )
        .await?;
        round += 1;
        first_host.push(first);
        all_hosts.push(all);
    }
    progress("baseline: bare KV put → watch");
    let baseline = kv_watch_baseline(&js, &examples[0].manifest.name, args.rounds).await?;

    let _ = stop.send(true);
    for host in hosts {
        match tokio::time::timeout(Duration::from_secs(40), host).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("a host failed: {e}"),
            Ok(Err(e)) => bail!("a host panicked: {e}"),
            Err(_) => bail!("a host did not stop"),
        }
    }

    all_hosts.sort();
    first_host.sort();
    let mut baseline = baseline;
    baseline.sort();
    let ms = |d: Duration| stats::round(d.as_secs_f64() * 1000.0, 2);
    let report = Report {
        scenario: "deploy",
        rounds: args.rounds,
        hosts: args.hosts,
        nats_server,
        all_hosts_p50_ms: ms(percentile(&all_hosts, 50.0)),
        all_hosts_p90_ms: ms(percentile(&all_hosts, 90.0)),
        all_hosts_max_ms: ms(*all_hosts.last().unwrap_or(&Duration::ZERO)),
        first_host_p50_ms: ms(percentile(&first_host, 50.0)),
        baseline_watch_p50_ms: ms(percentile(&baseline, 50.0)),
        baseline_watch_p90_ms: ms(percentile(&baseline, 90.0)),
        goal_ms: 1000.0,
        goal_met: percentile(&all_hosts, 50.0) < Duration::from_secs(1),
    };
    println!(
        "deploy → every one of {} hosts running the new version ({} deploys of the example handlers, warm cache, nats-server {})",
        report.hosts, report.rounds, report.nats_server
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "", "p50 ms", "p90 ms", "max ms"
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "hookmesh: all hosts",
        report.all_hosts_p50_ms,
        report.all_hosts_p90_ms,
        report.all_hosts_max_ms
    );
    println!(
        "{:<34} {:>10}",
        "hookmesh: first host", report.first_host_p50_ms
    );
    println!(
        "{:<34} {:>10} {:>10}",
        "baseline: bare KV put → watch", report.baseline_watch_p50_ms, report.baseline_watch_p90_ms
    );
    println!(
        "goal: p50 under {} ms — {}",
        report.goal_ms,
        if report.goal_met { "met" } else { "missed" }
    );
    stats::print_json_line(&report)?;
    Ok(Verdict::Clean)
}

/// Deploys a new version of `example` and waits until every host runs it:
/// how long the first host took and how long the last one did.
async fn land(
    store: &HandlerStore,
    http: &reqwest::Client,
    metrics_urls: &[String],
    example: &Example,
    round: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let mut manifest = example.manifest.clone();
    manifest
        .config
        .insert("bench_round".into(), round.to_string());
    let name = manifest.name.clone();
    let version = match store
        .deploy(manifest, &example.component, "hookmesh-bench")
        .await?
    {
        Deployed::Activated { deployment, .. } => deployment.version,
        Deployed::Unchanged(_) => bail!("round {round} changed nothing"),
    };
    let deployed = Instant::now();
    let line = format!("hookmesh_handler_version{{handler=\"{name}\",version=\"{version}\"}} 1");
    let mut landed: Vec<Option<Duration>> = vec![None; metrics_urls.len()];
    while landed.iter().any(Option::is_none) {
        if deployed.elapsed() > LAND_LIMIT {
            bail!("{name} {version} not running on every host after {LAND_LIMIT:?}");
        }
        for (host, url) in metrics_urls.iter().enumerate() {
            if landed[host].is_some() {
                continue;
            }
            let text = match http.get(url).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => continue,
            };
            if text.contains(&line) {
                landed[host] = Some(deployed.elapsed());
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let times: Vec<Duration> = landed.into_iter().flatten().collect();
    let first = times.iter().min().copied().unwrap_or_default();
    let all = times.iter().max().copied().unwrap_or_default();
    Ok((first, all))
}

/// `rounds` bare KV puts to the bucket deploys write (`hook_handlers`),
/// each timed until a watch on that bucket yields it. Each put writes the
/// current deployment entry of `handler` back unchanged: the same bucket,
/// key and value size a deploy writes, and a no-op for the running hosts
/// (they already run that version), so the baseline neither disturbs them
/// nor leaves anything behind.
async fn kv_watch_baseline(
    js: &async_nats::jetstream::Context,
    handler: &str,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let kv = js
        .get_key_value(hookmesh::streams::HANDLERS_BUCKET)
        .await
        .context("the handlers bucket")?;
    let entry = kv
        .get(handler)
        .await
        .context("reading the deployment entry")?
        .with_context(|| format!("{handler} is not deployed"))?;
    let mut watch = kv.watch(handler).await.context("watch")?;
    let mut times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        kv.put(handler, entry.clone()).await.context("put")?;
        let put = Instant::now();
        match tokio::time::timeout(LAND_LIMIT, watch.next()).await {
            Ok(Some(Ok(_))) => times.push(put.elapsed()),
            _ => bail!("the watch did not yield put {i}"),
        }
    }
    Ok(times)
}
