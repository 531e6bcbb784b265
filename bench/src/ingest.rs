//! The `ingest` scenario: how fast the host turns signed webhooks into stored
//! events, next to how fast raw JetStream stores messages on the same server.
//!
//! One `nats-server -js` (started here, `NATS_SERVER_BIN` honoured) serves
//! both sides in turn:
//!
//! - **baseline**: async-nats publishes of `--payload-bytes` into a stream of
//!   its own (`BENCH`), each awaiting its PubAck, `--concurrency` in flight.
//! - **hookmesh**: the real host, in process, on a loopback port; distinct
//!   signed Standard Webhooks POSTed over HTTP keep-alive connections, the
//!   same concurrency, every answer required to be 202.
//!
//! `--breakdown` adds rows that take the host apart (HTTP + verification
//! alone, the host's NATS calls alone, a JetStream publish with the host's
//! headers) to show where the difference between the two sides goes. They
//! are printed in the table only; the JSON line is about the two sides.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use hookmesh::config::{Config, Provider};
use hookmesh::publish::{Inbound, Publisher, Stored};
use hookmesh::send::{Signed, prepare};
use hookmesh::server::Options;
use hookmesh::streams::{EVENTS_STREAM, Mode};
use reqwest::StatusCode;
use serde::Serialize;

use crate::load::{Run, closed_loop, timed};
use crate::stats::progress;
use crate::stats::{self, Measured, Verdict};

/// The provider the bench posts as (the development config's name).
const PROVIDER: &str = "crm";
/// Its secret: the public Standard Webhooks test vector, as in `dev.toml`.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// A different well-formed secret: requests signed with it fail verification
/// only after the full HMAC, which is what the breakdown's HTTP row wants.
const WRONG_SECRET: &str = "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// The event type of every webhook (its first segment is the domain).
const EVENT_TYPE: &str = "order.updated";
/// The host's default partition count; the baseline spreads over as many
/// subjects so both sides write a comparable subject fan-out.
const PARTITIONS: usize = 16;
/// The baseline's own stream.
const BENCH_STREAM: &str = "BENCH";
/// How long the host may take to answer `/readyz` with 200.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Bounds every HTTP request, so a stuck host fails the run instead of
/// hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds the host's graceful stop at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The host's publish timeout and the breakdown publisher's.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of the `ingest` scenario.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages measured on each side (after the warm-up).
    #[arg(long, default_value_t = 50_000)]
    pub messages: usize,
    /// Operations in flight at all times, on each side.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Size of each message: the published payload, the webhook's JSON body.
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Untimed messages sent first on each side (connections, lazy opens,
    /// allocator and page cache warm).
    #[arg(long, default_value_t = 2_000)]
    pub warmup: usize,
    /// Distinct entity ids the webhooks are spread over.
    #[arg(long, default_value_t = 1_000)]
    pub entities: usize,
    /// Also measure the host's parts apart (HTTP alone, NATS calls alone).
    #[arg(long)]
    pub breakdown: bool,
}

/// The JSON line: the figures scripts compare across runs.
#[derive(Debug, Serialize)]
struct Summary {
    scenario: &'static str,
    baseline_rate: f64,
    hookmesh_rate: f64,
    ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs the scenario and prints its table and JSON line.
pub async fn run(args: Args) -> anyhow::Result<Verdict> {
    ensure!(args.messages > 0, "--messages must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.entities > 0, "--entities must be at least 1");

    let server = crate::host::start_nats().await?;
    let url = server.url();

    progress("baseline: JetStream publish awaiting PubAck");
    let (baseline, version) = baseline(&url, &args).await?;
    progress("hookmesh: signed webhooks over HTTP into the host");
    let mut rows = vec![baseline];
    rows.extend(hookmesh_side(&url, &args).await?);
    drop(server);

    stats::print_table(
        &format!(
            "ingest: {} messages per side after {} warm-up, concurrency {}, {} B payloads, nats-server {version}",
            args.messages, args.warmup, args.concurrency, args.payload_bytes
        ),
        &rows,
    );
    if stats::report_failures(&rows) == Verdict::Failed {
        return Ok(Verdict::Failed);
    }
    let (baseline, hookmesh) = (&rows[0], &rows[1]);
    let ratio = hookmesh.rate() / baseline.rate();
    println!("ratio hookmesh/baseline: {ratio:.3}");
    stats::print_json_line(&Summary {
        scenario: "ingest",
        baseline_rate: stats::round(baseline.rate(), 1),
        hookmesh_rate: stats::round(hookmesh.rate(), 1),
        ratio: stats::round(ratio, 4),
        p50_ms: stats::round(hookmesh.percentile_ms(50.0), 3),
        p99_ms: stats::round(hookmesh.percentile_ms(99.0), 3),
    })?;
    Ok(Verdict::Clean)
}

/// The baseline side; also returns the server's version for the title.
async fn baseline(url: &str, args: &Args) -> anyhow::Result<(Measured, String)> {
    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let version = client.server_info().version;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: BENCH_STREAM.into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    })
    .await
    .context("creating the BENCH stream")?;

    let payload = Bytes::from(vec![b'x'; args.payload_bytes]);
    let subjects = |count: usize| -> Vec<String> {
        (0..count)
            .map(|i| format!("bench.{}", i % PARTITIONS))
            .collect()
    };
    let publish = move |subject: String| {
        let js = js.clone();
        let payload = payload.clone();
        async move {
            let ack = js
                .publish(subject, payload)
                .await
                .map_err(|e| format!("publish: {e}"))?;
            ack.await.map(drop).map_err(|e| format!("PubAck: {e}"))
        }
    };
    warm_up(
        "baseline",
        closed_loop(subjects(args.warmup), args.concurrency, publish.clone()).await?,
    )?;
    let measured = timed(
        "baseline (JetStream)",
        subjects(args.messages),
        args.concurrency,
        publish,
    )
    .await?;
    // Idle from here on: the host's side should have the server to itself.
    drop(client);
    Ok((measured, version))
}

/// Fails the scenario when a warm-up operation failed: the setup is broken
/// and measuring would only repeat the failure.
fn warm_up(side: &str, run: Run) -> anyhow::Result<()> {
    let warmed = Measured::from_run(side, run);
    if warmed.errors > 0 {
        bail!(
            "{side} warm-up: {} of {} failed, e.g. {}",
            warmed.errors,
            warmed.messages,
            warmed.samples.join(" | ")
        );
    }
    Ok(())
}

/// The hookmesh side, and the breakdown rows when asked for.
async fn hookmesh_side(url: &str, args: &Args) -> anyhow::Result<Vec<Measured>> {
    let config = host_config(url, SECRET, args.payload_bytes)?;
    let provider = config
        .providers
        .get(PROVIDER)
        .cloned()
        .context("the bench config lost its provider")?;
    let listeners = crate::host::listeners().await?;
    let base = format!("http://{}", listeners.webhook.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut host = tokio::spawn(hookmesh::server::run(
        config,
        listeners,
        // Ingress only: this scenario measures storing, not handlers.
        Options {
            streams: Mode::Update,
            handlers: Vec::new(),
            cache_dir: None,
            role: hookmesh::server::Role::All,
        },
        async move {
            // A dropped sender stops the host as well as a sent ().
            let _ = stopped.await;
        },
    ));

    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    tokio::select! {
        ready = wait_ready(&http, &base) => ready?,
        ended = &mut host => bail!("the host stopped before it was ready: {}", ended_why(ended)),
    }

    let url_for = format!("{base}/webhooks/{PROVIDER}");
    let requests = |prefix: &str, count: usize, provider: &Provider| {
        build_requests(&http, &url_for, provider, prefix, count, args)
    };
    let post_202 = {
        let http = http.clone();
        move |request| post(http.clone(), request, StatusCode::ACCEPTED)
    };
    warm_up(
        "hookmesh",
        closed_loop(
            requests("warm", args.warmup, &provider)?,
            args.concurrency,
            post_202.clone(),
        )
        .await?,
    )?;
    let jobs = requests("evt", args.messages, &provider)?;
    let mut rows = vec![
        timed(
            "hookmesh (HTTP → host → JetStream)",
            jobs,
            args.concurrency,
            post_202,
        )
        .await?,
    ];

    let client = async_nats::connect(url)
        .await
        .context("connecting to nats-server")?;
    let js = jetstream::new(client.clone());
    // With failed requests the count is off anyway, and the table (printed
    // by the caller) says more about why than a count would.
    if rows[0].errors == 0 {
        check_stored(&js, (args.warmup + args.messages) as u64).await?;
    }

    if args.breakdown {
        let wrong = host_config(url, WRONG_SECRET, args.payload_bytes)?;
        let wrong = wrong.providers.get(PROVIDER).context("provider")?;
        let post_401 = {
            let http = http.clone();
            move |request| post(http.clone(), request, StatusCode::UNAUTHORIZED)
        };
        let jobs = requests("unauth", args.messages, wrong)?;
        rows.push(
            timed(
                "  HTTP + verify only (401)",
                jobs,
                args.concurrency,
                post_401,
            )
            .await?,
        );
        rows.push(store_only(&client, &provider, args).await?);
        rows.push(publish_with_headers(&js, &provider, args).await?);
    }

    drop(http);
    let _ = stop.send(());
    match tokio::time::timeout(STOP_TIMEOUT, host).await {
        Ok(Ok(Ok(()))) => {}
        Ok(ended) => bail!("the host failed while stopping: {}", ended_why(ended)),
        Err(_) => bail!("the host did not stop within {STOP_TIMEOUT:?}"),
    }
    Ok(rows)
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

/// The host's config: the bench server, one Standard Webhooks provider.
/// Built from TOML like a deployment's, with an empty environment so the
/// caller's `HOOKMESH_*` variables cannot change what is measured.
fn host_config(nats_url: &str, secret: &str, payload_bytes: usize) -> anyhow::Result<Config> {
    // At least 64 KiB but under nats-server's default max_payload (1 MiB),
    // which would otherwise earn a warning at start.
    crate::host::config(
        nats_url,
        PROVIDER,
        secret,
        PARTITIONS as u32,
        payload_bytes.max(64 * 1024),
    )
}

/// Polls `/readyz` until it answers 200 (NATS connected, streams present).
async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(answer) if answer.status() == StatusCode::OK => return Ok(()),
            Ok(answer) => {
                let status = answer.status();
                last = format!("{status}: {}", answer.text().await.unwrap_or_default());
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "the host was not ready within {READY_TIMEOUT:?}; /readyz said {}",
        last.trim()
    )
}

/// A JSON body of exactly `size` bytes (when `size` leaves room for the
/// fields): the event type, the entity, padding.
fn body(index: usize, entity: usize, size: usize) -> Vec<u8> {
    let head =
        format!(r#"{{"type":"{EVENT_TYPE}","data":{{"id":"ORD-{entity:06}","seq":{index},"pad":""#);
    let tail = r#""}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + pad + tail.len());
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(tail.as_bytes());
    body
}

/// `count` distinct webhooks (ids `<prefix>_<n>`), entities round-robin,
/// signed now for `provider` the way the provider itself would.
fn signed_webhooks(
    provider: &Provider,
    prefix: &str,
    count: usize,
    args: &Args,
) -> anyhow::Result<Vec<Signed>> {
    let now = SystemTime::now();
    (0..count)
        .map(|i| {
            let id = format!("{prefix}_{i:08}");
            let body = body(i, i % args.entities, args.payload_bytes);
            prepare(provider, body, None, Some(&id), now).context("signing a webhook")
        })
        .collect()
}

/// The webhooks as ready-to-send HTTP requests, so the timed part only
/// sends them. Signed timestamps stay well inside the host's 5-minute
/// tolerance because a run lasts about a minute.
fn build_requests(
    http: &reqwest::Client,
    url: &str,
    provider: &Provider,
    prefix: &str,
    count: usize,
    args: &Args,
) -> anyhow::Result<Vec<reqwest::Request>> {
    signed_webhooks(provider, prefix, count, args)?
        .into_iter()
        .map(|signed| {
            http.post(url)
                .headers(signed.headers)
                .body(signed.body)
                .build()
                .context("building a request")
        })
        .collect()
}

/// Sends one request; anything but `expected` is a failure, described with
/// the start of the answer's body.
async fn post(
    http: reqwest::Client,
    request: reqwest::Request,
    expected: StatusCode,
) -> Result<(), String> {
    let answer = http
        .execute(request)
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = answer.status();
    // Read the whole answer: it is part of the exchange, and a connection is
    // only reused once its answer has been read.
    let body = answer
        .bytes()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    if status == expected {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
        Err(format!(
            "HTTP {status} (expected {expected}): {}",
            text.trim()
        ))
    }
}

/// Fails unless `HOOK_EVENTS` holds exactly `expected` events: a 202 is a
/// promise that the event is stored, and the bench checks it was kept.
async fn check_stored(js: &jetstream::Context, expected: u64) -> anyhow::Result<()> {
    let mut events = js
        .get_stream(EVENTS_STREAM)
        .await
        .with_context(|| format!("opening {EVENTS_STREAM}"))?;
    let stored = events
        .info()
        .await
        .with_context(|| format!("reading {EVENTS_STREAM}'s state"))?
        .state
        .messages;
    ensure!(
        stored == expected,
        "{EVENTS_STREAM} holds {stored} events after {expected} webhooks were answered 202"
    );
    Ok(())
}

/// Breakdown: the host's own store path (idempotency lookup, publish, record)
/// driven directly, on a connection of its own, without HTTP or verification.
async fn store_only(
    client: &async_nats::Client,
    provider: &Provider,
    args: &Args,
) -> anyhow::Result<Measured> {
    let publisher = Publisher::new(client.clone(), PARTITIONS as u32, PUBLISH_TIMEOUT);
    let events = inbound_events(provider, "direct", args)?;
    let store = move |event: Inbound| {
        let publisher = publisher.clone();
        async move {
            match publisher.store(&event).await {
                Ok(Stored::Accepted(_)) => Ok(()),
                Ok(Stored::Duplicate(_)) => Err("stored as a duplicate".to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    timed(
        "  Publisher::store only (no HTTP)",
        events,
        args.concurrency,
        store,
    )
    .await
}

/// Breakdown: one JetStream publish per event into `HOOK_EVENTS` with the
/// host's subject and headers (`Nats-Msg-Id` included, so the server's
/// duplicate tracking is paid), but no idempotency-bucket round trips.
async fn publish_with_headers(
    js: &jetstream::Context,
    provider: &Provider,
    args: &Args,
) -> anyhow::Result<Measured> {
    let events = inbound_events(provider, "headers", args)?;
    let jobs: Vec<(String, async_nats::HeaderMap, Bytes)> = events
        .into_iter()
        .map(|event| {
            let address = hookmesh::subject::EventAddress::new(
                &event.provider,
                &event.fields.domain,
                &event.fields.entity_id,
                &event.fields.event_type,
                PARTITIONS as u32,
            );
            let mut headers = async_nats::HeaderMap::new();
            for (name, value) in [
                ("Nats-Msg-Id", event.idempotency_key.as_str()),
                ("Hook-Provider", event.provider.as_str()),
                (
                    "Hook-Event-Id",
                    event.fields.event_id.as_deref().unwrap_or(""),
                ),
                ("Hook-Event-Type", event.fields.event_type.as_str()),
                ("Hook-Domain", event.fields.domain.as_str()),
                ("Hook-Entity", event.fields.entity_id.as_str()),
                // Same length as the host's RFC 3339 millisecond stamp.
                ("Hook-Received-At", "2026-01-01T00:00:00.000Z"),
                ("Hook-Correlation-Id", event.correlation_id.as_str()),
                ("traceparent", event.traceparent.as_str()),
                ("Content-Type", "application/json"),
            ] {
                headers.insert(name, value);
            }
            (address.subject(), headers, event.body)
        })
        .collect();
    let js = js.clone();
    let publish = move |(subject, headers, body): (String, async_nats::HeaderMap, Bytes)| {
        let js = js.clone();
        async move {
            let ack = js
                .publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| format!("publish: {e}"))?;
            ack.await.map(drop).map_err(|e| format!("PubAck: {e}"))
        }
    };
    timed(
        "  JetStream publish + host headers",
        jobs,
        args.concurrency,
        publish,
    )
    .await
}

/// Verified-and-extracted events as the host would hand them to its
/// publisher, built from freshly signed webhooks.
fn inbound_events(provider: &Provider, prefix: &str, args: &Args) -> anyhow::Result<Vec<Inbound>> {
    signed_webhooks(provider, prefix, args.messages, args)?
        .into_iter()
        .enumerate()
        .map(|(i, signed)| {
            let fields =
                hookmesh::extract::extract(&provider.fields, &signed.headers, &signed.body)
                    .context("extracting the fields of a bench webhook")?;
            Ok(Inbound {
                provider: provider.name.clone(),
                idempotency_key: hookmesh::extract::idempotency_key(
                    &provider.name,
                    &fields,
                    &signed.body,
                ),
                fields,
                correlation_id: format!("bench-{prefix}-{i}"),
                traceparent: format!("00-{:032x}-{:016x}-01", i + 1, i + 1),
                content_type: Some("application/json".into()),
                received_at: SystemTime::now(),
                body: Bytes::from(signed.body),
            })
        })
        .collect()
}
