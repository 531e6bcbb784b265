//! The HTTP edge: accepting connections and bounding what a client can hold.
//!
//! Both listeners (webhooks and admin) are served here rather than by
//! `axum::serve`, which has no time limits: a client that sends half a
//! header, trickles a body or idles on a keep-alive connection is closed at
//! `[http]`'s limits and counted in `hookmesh_http_connections_closed_total`.
//! At most `http.max_connections` connections are served at once; further
//! ones wait in the listen backlog, untouched until one ends, so the ones
//! in progress never notice.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::{debug, warn};

use crate::config::HttpConfig;

mod connection;
pub mod metrics;

use metrics::EdgeMetrics;

/// The limits of one listener (see [`HttpConfig`]).
#[derive(Debug, Clone)]
pub struct Limits {
    /// From a request's first byte to its complete header.
    pub header_read_timeout: Duration,
    /// From a request's first byte to its answer.
    pub request_timeout: Duration,
    /// A keep-alive connection's wait for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Request line plus headers.
    pub max_header_bytes: usize,
}

impl From<&HttpConfig> for Limits {
    fn from(http: &HttpConfig) -> Self {
        Limits {
            header_read_timeout: http.header_read_timeout,
            request_timeout: http.request_timeout,
            idle_timeout: http.idle_timeout,
            max_connections: http.max_connections,
            max_header_bytes: http.max_header_bytes,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, lets every connection finish the request in hand (bounded
/// by `request_timeout`) and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: EdgeMetrics,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // The semaphore counts in u32 when waiting for all permits at the end.
    let max = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max as usize));
    let (closing, closing_rx) = watch::channel(false);
    let shared = Arc::new(connection::Shared {
        router,
        limits,
        metrics,
        listener: name,
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Never closed; stop serving rather than spin.
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let shared = shared.clone();
                let closing = closing_rx.clone();
                tokio::spawn(async move {
                    connection::serve(stream, shared, closing).await;
                    drop(permit);
                });
            }
            Err(error) if is_per_connection(&error) => {
                debug!(listener = name, %error, "accept");
            }
            Err(error) => {
                // Out of file descriptors and the like: give the ones in
                // use a moment to close rather than spinning.
                warn!(listener = name, %error, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a permit until it is closed.
    let _ = permits.acquire_many(max).await;
    Ok(())
}

/// Errors of one incoming connection (it went away before being accepted),
/// not of the listener.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted
    )
}
