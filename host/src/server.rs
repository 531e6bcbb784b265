//! Running the host: NATS connection, streams, HTTP, handler dispatch — and
//! a clean stop.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use futures::FutureExt;

use crate::admin::{self, Admin};
use crate::config::{Config, HEADER_BUDGET};
use crate::deploy::follow::Follower;
use crate::dispatch::services::NatsServices;
use crate::dispatch::{Dispatch, version_of};
use crate::dlq;
use crate::edge;
use crate::ingress::{self, Ingress};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::nats::{self, Patience};
use crate::outbox;
use crate::publish::Publisher;
use crate::retry::Retry;
use crate::runtime::{Prepared, Runtime, RuntimeError};
use crate::streams::{self, Mode, StreamsError};

/// How long running handlers get to finish the event in hand at shutdown.
const DRAIN: Duration = Duration::from_secs(30);

/// Why the host stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// NATS options are unusable.
    #[error(transparent)]
    Connect(#[from] nats::ConnectError),
    /// The streams disagree with the config in a way that cannot be fixed
    /// by applying them.
    #[error(transparent)]
    Streams(StreamsError),
    /// A handler cannot run.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A handler's component file cannot be read.
    #[error("handler {handler}: cannot read {path}: {source}")]
    Component {
        /// The handler.
        handler: String,
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    /// The trace exporter cannot start as configured.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

/// What to run besides the HTTP ingress.
#[derive(Debug, Clone)]
pub struct Options {
    /// Whether existing streams are updated (`up`) or only missing ones
    /// created (`serve`).
    pub streams: Mode,
    /// Handlers to run (manifests with their component paths resolved).
    pub handlers: Vec<Manifest>,
    /// Where compiled components are cached.
    pub cache_dir: Option<PathBuf>,
    /// What this process does (each role needs its own NATS permissions).
    pub role: Role,
}

impl Options {
    /// Ingress only, creating missing streams.
    pub fn ingress_only() -> Self {
        Options {
            streams: Mode::Ensure,
            handlers: Vec::new(),
            cache_dir: None,
            role: Role::Ingress,
        }
    }
}

/// What a host process does. Split roles let the internet-facing ingress
/// run with NATS permissions that can store events and nothing else
/// (`nats/roles.conf` has the least each role needs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Both: webhooks in, handlers run (the default).
    #[default]
    All,
    /// Webhooks (and outbox relays) into `HOOK_EVENTS`; no handlers, no
    /// dead-letter writer.
    Ingress,
    /// Handlers, the dead-letter writer and replays; the webhook listener
    /// is not served.
    Worker,
}

impl Role {
    fn ingests(self) -> bool {
        self != Role::Worker
    }

    fn works(self) -> bool {
        self != Role::Ingress
    }
}

/// The host's two listeners: the providers' webhooks, and the operators'
/// admin listener (`/metrics`, health, the console).
#[derive(Debug)]
pub struct Listeners {
    /// `POST /webhooks/{provider}`, `/healthz`, `/readyz` (`[http] listen`).
    pub webhook: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`, `/console` (`[admin] listen`).
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `[http] listen` and `[admin] listen`; the error names the key.
    pub async fn bind(config: &Config) -> Result<Listeners, BindError> {
        let bind = |key: &'static str, address: std::net::SocketAddr| async move {
            TcpListener::bind(address)
                .await
                .map_err(|source| BindError {
                    key,
                    address,
                    source,
                })
        };
        Ok(Listeners {
            webhook: bind("http.listen", config.http.listen).await?,
            admin: bind("admin.listen", config.admin.listen).await?,
        })
    }
}

/// A listener that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {key} = {address}: {source}")]
pub struct BindError {
    /// The config key.
    pub key: &'static str,
    /// The address.
    pub address: std::net::SocketAddr,
    /// The operating system's answer.
    #[source]
    pub source: std::io::Error,
}

/// Serves until `shutdown` resolves, then drains in-flight requests and
/// lets running handlers finish the event in hand.
///
/// The listeners come from outside so tests bind `127.0.0.1:0`. NATS need
/// not be up: the host starts, answers 503 and `/readyz` says why until it
/// is, and creates missing streams (and starts handlers) as soon as it can.
pub async fn run(
    config: Config,
    listeners: Listeners,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let runtime = Arc::new(
        Runtime::new(options.cache_dir.clone())?
            .with_credentials(config.outgoing_credentials.clone()),
    );
    let mut loaded = Vec::new();
    for manifest in options.handlers.clone() {
        let path = manifest.component.clone().unwrap_or_default();
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|source| ServeError::Component {
                handler: manifest.name.clone(),
                path: path.clone(),
                source,
            })?;
        let prepared = runtime.prepare(manifest, &bytes).await?;
        info!(handler = %prepared.manifest.name, version = %version_of(&prepared), subject = %prepared.manifest.subject, "handler loaded");
        loaded.push(prepared);
    }

    let client = nats::connect(&config.nats, "hookmesh", Patience::Background).await?;
    let metrics = Metrics::default();
    let publisher = Publisher::new(
        client.clone(),
        config.ingest.partitions,
        config.ingest.publish_timeout,
    );
    let outbox = outbox::Health::default();
    let ingress = Arc::new(Ingress {
        publisher: publisher.clone(),
        client: client.clone(),
        metrics: metrics.clone(),
        max_body_bytes: config.http.max_body_bytes,
        retry_after: config.ingest.retry_after,
        providers: config.providers.clone(),
        outbox: outbox.clone(),
    });
    let app = ingress::router(ingress);
    let address = listeners.webhook.local_addr()?;
    info!(%address, providers = ?config.providers.keys().collect::<Vec<_>>(), "listening");
    let admin = admin::router(Arc::new(Admin {
        client: client.clone(),
        metrics: metrics.clone(),
        token: config.admin.token.clone(),
        outbox: outbox.clone(),
    }));
    let admin_address = listeners.admin.local_addr()?;
    info!(
        admin = %admin_address,
        token = if config.admin.token.is_some() { "set" } else { "unset: read-only" },
        "admin listener: /metrics /healthz /readyz /console"
    );
    // Last before serving: nothing returns early past here, so the tracer
    // installed is always uninstalled below.
    let telemetry = crate::telemetry::start(&config.telemetry)?;
    let shutdown = shutdown.shared();
    let limits = edge::Limits::from(&config.http);
    let role = options.role;
    let webhook_listener = listeners.webhook;
    let webhook_shutdown = shutdown.clone();
    let webhook_limits = limits.clone();
    let webhook_metrics = metrics.edge().clone();
    let webhook = async move {
        if role.ingests() {
            edge::serve(
                webhook_listener,
                app,
                webhook_limits,
                webhook_metrics,
                "webhook",
                webhook_shutdown,
            )
            .await
        } else {
            info!("role worker: the webhook listener is not served");
            drop(webhook_listener);
            webhook_shutdown.await;
            Ok(())
        }
    };
    let admin = edge::serve(
        listeners.admin,
        admin,
        limits,
        metrics.edge().clone(),
        "admin",
        shutdown,
    );
    let http = async { tokio::try_join!(webhook, admin).map(drop) };

    let relays = (config.outbox.iter())
        .map(|entry| {
            outbox::Relay::new(
                entry.clone(),
                publisher.clone(),
                config.ingest.duplicate_window,
                metrics.outbox().clone(),
                outbox.clone(),
            )
        })
        .collect();
    let (stop, stopped) = watch::channel(false);
    let workers = Arc::new(Mutex::new(JoinSet::new()));
    let background = start_background(Background {
        client: client.clone(),
        config: config.clone(),
        mode: options.streams,
        runtime,
        loaded,
        metrics,
        stopped,
        workers: workers.clone(),
        relays,
        role,
    });
    let result = tokio::select! {
        served = http => served.map_err(ServeError::Http),
        fatal = background => Err(fatal),
    };
    let _ = stop.send(true);
    // The set is taken out of its lock before it is drained: nothing waits
    // on a lock across `join_next` (the background task that spawns into
    // it ended with the `select!`).
    let mut workers = std::mem::take(&mut *lock(&workers));
    if tokio::time::timeout(DRAIN, async {
        while workers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        warn!("handlers did not finish within {DRAIN:?}; their events will be redelivered");
    }
    // Whatever was published is acknowledged already; flushing only hurries
    // out protocol messages still buffered.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown().await;
    }
    info!("stopped");
    result
}

struct Background {
    client: async_nats::Client,
    config: Config,
    mode: Mode,
    runtime: Arc<Runtime>,
    loaded: Vec<Arc<Prepared>>,
    metrics: Metrics,
    stopped: watch::Receiver<bool>,
    workers: Workers,
    /// The outbox relays, started once the streams they store into exist.
    relays: Vec<outbox::Relay>,
    role: Role,
}

/// The background tasks `run` waits for on shutdown. A std `Mutex`: it is
/// only ever held to spawn into the set or to take it, never across an
/// `.await`.
type Workers = Arc<Mutex<JoinSet<()>>>;

fn lock(workers: &Workers) -> std::sync::MutexGuard<'_, JoinSet<()>> {
    // A panic while spawning leaves the set itself intact.
    workers.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Applies the streams once NATS answers (retrying while it does not), then
/// starts dispatch. Returns only on an error that retrying cannot fix.
async fn start_background(bg: Background) -> ServeError {
    let js = async_nats::jetstream::new(bg.client.clone());
    let mut retry = Retry::default();
    loop {
        match streams::apply_replicated(&js, &bg.config.ingest, bg.config.nats.replicas, bg.mode)
            .await
        {
            Ok(outcomes) => {
                for (stream, outcome) in outcomes {
                    info!(%stream, ?outcome, "stream ready");
                }
                warn_on_small_payload(&bg.client, &bg.config);
                break;
            }
            Err(fatal @ StreamsError::Conflict(_)) => {
                error!(error = %fatal, "streams conflict with the config");
                return ServeError::Streams(fatal);
            }
            Err(e) => retry_start(&mut retry, &e, "streams not applied yet").await,
        }
    }
    if !bg.role.works() {
        {
            let mut workers = lock(&bg.workers);
            for relay in bg.relays {
                workers.spawn(relay.run(bg.stopped.clone()));
            }
        }
        info!("role ingress: no handlers run here");
        return std::future::pending().await;
    }
    {
        let mut workers = lock(&bg.workers);
        workers.spawn(dlq::writer::run(
            js.clone(),
            bg.metrics.clone(),
            bg.stopped.clone(),
        ));
        workers.spawn(crate::status::gauges::run(
            js.clone(),
            bg.metrics.clone(),
            bg.stopped.clone(),
        ));
        if bg.role.ingests() {
            for relay in bg.relays {
                workers.spawn(relay.run(bg.stopped.clone()));
            }
        }
    }
    // The buckets exist once the streams are applied, so failing to open
    // one is the cluster electing a leader (a node was lost): wait it out
    // as for the streams, rather than end the host.
    let services = Arc::new(loop {
        match NatsServices::open(&js).await {
            Ok(services) => break services,
            Err(e) => retry_start(&mut retry, &e, "handler services not reachable yet").await,
        }
    });
    let dispatch = loop {
        let opened = Dispatch::new(
            js.clone(),
            bg.runtime.clone(),
            services.clone(),
            bg.config.ingest.partitions,
            bg.metrics.clone(),
        )
        .await;
        match opened {
            Ok(dispatch) => break dispatch,
            Err(e) => retry_start(&mut retry, &e, "dispatch buckets not reachable yet").await,
        }
    };
    // Handlers loaded from files run at once; deployed ones (and new
    // versions of either) arrive through the follower.
    let mut follower = Follower::new(dispatch, js.clone(), bg.metrics);
    for prepared in bg.loaded {
        follower.start(prepared);
    }
    lock(&bg.workers).spawn(follower.run(bg.stopped));
    info!(partitions = bg.config.ingest.partitions, "dispatch started");
    std::future::pending().await
}

/// Logs why a start-up step NATS cannot answer yet is tried again, and
/// waits `retry`'s pause before the next try.
async fn retry_start(retry: &mut Retry, error: &(dyn std::fmt::Display + Sync), what: &str) {
    warn!(error = %error, retry_in = ?retry.delay(), "{what}");
    tokio::time::sleep(retry.delay()).await;
    retry.grow();
}

fn warn_on_small_payload(client: &async_nats::Client, config: &Config) {
    let max_payload = client.server_info().max_payload;
    if payload_too_small(max_payload, config.http.max_body_bytes) {
        warn!(
            max_payload,
            max_body_bytes = config.http.max_body_bytes,
            header_budget = HEADER_BUDGET,
            "nats-server's max_payload is below http.max_body_bytes plus the header budget: \
             the largest webhooks the listener accepts are answered 413 when they cannot be stored; \
             raise max_payload or lower max_body_bytes"
        );
    }
}

/// Whether a server's `max_payload` (0: not known yet) cannot hold the
/// largest body the listener accepts plus the header budget.
fn payload_too_small(max_payload: usize, max_body_bytes: usize) -> bool {
    max_payload > 0 && max_payload < max_body_bytes.saturating_add(HEADER_BUDGET)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_MAX_BODY_BYTES, HttpConfig};

    #[test]
    fn the_defaults_fit_a_default_nats_server_without_a_warning() {
        let nats_default = 1024 * 1024;
        assert!(!payload_too_small(
            nats_default,
            HttpConfig::default().max_body_bytes
        ));
        assert!(!payload_too_small(nats_default, DEFAULT_MAX_BODY_BYTES));
        assert!(payload_too_small(nats_default, 1024 * 1024));
        assert!(!payload_too_small(0, usize::MAX), "unknown yet: no warning");
    }
}
