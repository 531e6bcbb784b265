//! Running the host: NATS connection, streams, HTTP — and a clean stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::ingress::{self, Ingress};
use crate::metrics::Metrics;
use crate::nats::{self, Patience};
use crate::publish::Publisher;
use crate::streams::{self, Mode, StreamsError};

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
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
///
/// The listener comes from outside so tests bind `127.0.0.1:0`. NATS need not
/// be up: the host starts, answers 503 and `/readyz` says why until it is, and
/// creates missing streams as soon as it can (`mode` says whether existing
/// ones are updated too).
pub async fn run(
    config: Config,
    listener: TcpListener,
    mode: Mode,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let client = nats::connect(&config.nats, "hookmesh", Patience::Background).await?;
    let ingress = Arc::new(Ingress {
        publisher: Publisher::new(
            client.clone(),
            config.ingest.partitions,
            config.ingest.publish_timeout,
        ),
        client: client.clone(),
        metrics: Metrics::default(),
        max_body_bytes: config.http.max_body_bytes,
        retry_after: config.ingest.retry_after,
        providers: config.providers.clone(),
    });
    let app = ingress::router(ingress);
    let address = listener.local_addr()?;
    info!(%address, providers = ?config.providers.keys().collect::<Vec<_>>(), "listening");
    let http = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let result = tokio::select! {
        served = http => served.map_err(ServeError::Http),
        fatal = bootstrap(client.clone(), config.clone(), mode) => Err(ServeError::Streams(fatal)),
    };
    // Whatever was published is acknowledged already; flushing only hurries
    // out protocol messages still buffered.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    info!("stopped");
    result
}

/// Applies the streams once NATS answers, retrying while it does not.
/// Returns only on an error that retrying cannot fix; on success it parks.
async fn bootstrap(client: async_nats::Client, config: Config, mode: Mode) -> StreamsError {
    let js = async_nats::jetstream::new(client.clone());
    let mut delay = Duration::from_millis(200);
    loop {
        match streams::apply(&js, &config.ingest, mode).await {
            Ok(outcomes) => {
                for (stream, outcome) in outcomes {
                    info!(%stream, ?outcome, "stream ready");
                }
                let max_payload = client.server_info().max_payload;
                if max_payload > 0 && max_payload < config.http.max_body_bytes + 4096 {
                    warn!(
                        max_payload,
                        max_body_bytes = config.http.max_body_bytes,
                        "nats-server's max_payload is below http.max_body_bytes plus headers: \
                         the largest accepted webhooks cannot be stored; raise max_payload or lower max_body_bytes"
                    );
                }
                return std::future::pending().await;
            }
            Err(fatal @ StreamsError::Conflict(_)) => {
                error!(error = %fatal, "streams conflict with the config");
                return fatal;
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "streams not applied yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
