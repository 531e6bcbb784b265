//! One HTTP/1 connection: served by hyper, watched for the edge's time
//! limits, and closed so that clients read the last answer.
//!
//! A connection is always in one stage, and each stage has its own clock:
//! - **idle** — no byte of a request yet: closed after `idle_timeout`;
//! - **header** — a request's first byte arrived, its header is not
//!   complete: closed `header_read_timeout` after that first byte;
//! - **request** — the header is complete, the body is read and the answer
//!   written: answered 408 `request_timeout` after the first byte, and
//!   closed shortly after if even that cannot be written.
//!
//! The stage moves on what the socket reads (idle → header), when hyper
//! calls the service (→ request) and when it drops the answer's body,
//! written (→ idle). A watchdog sleeps until the current stage's deadline,
//! woken whenever the stage changes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tracing::debug;

use super::Limits;
use super::metrics::{CloseReason, EdgeMetrics};

/// How long after `request_timeout` a connection whose 408 could not be
/// written is dropped.
const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// After a 413, how much of the refused body is read and thrown away (with
/// the answer written and the sending side closed) so that a client still
/// writing it reads the answer instead of a reset.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// …and for how long at most.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// What every connection of one listener shares.
pub(super) struct Shared {
    pub(super) router: Router,
    pub(super) limits: Limits,
    pub(super) metrics: EdgeMetrics,
    pub(super) listener: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Idle,
    Header,
    Request,
}

#[derive(Debug)]
struct State {
    stage: Stage,
    /// When the stage's clock started (for `Request`: the request's first
    /// byte, so the header's time counts against the request's).
    since: Instant,
    /// Whether this connection was counted as closed at a limit already.
    counted: bool,
    /// Whether the last answer refused a body the client may still send.
    linger: bool,
}

/// The stage of one connection, shared by its socket, its service and its
/// watchdog.
#[derive(Debug)]
struct Phase {
    state: Mutex<State>,
    changed: Notify,
}

impl Phase {
    fn new() -> Self {
        Phase {
            state: Mutex::new(State {
                stage: Stage::Idle,
                since: Instant::now(),
                counted: false,
                linger: false,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes arrived: an idle connection starts a request header.
    fn read_some(&self) {
        let mut state = self.lock();
        if state.stage == Stage::Idle {
            state.stage = Stage::Header;
            state.since = Instant::now();
            drop(state);
            self.changed.notify_one();
        }
    }

    /// The header is complete; returns when the request began.
    fn request_started(&self) -> Instant {
        let mut state = self.lock();
        if state.stage != Stage::Header {
            // Pipelined: read while the previous request was served.
            state.since = Instant::now();
        }
        state.stage = Stage::Request;
        state.linger = false;
        let since = state.since;
        drop(state);
        self.changed.notify_one();
        since
    }

    /// The answer is written: the connection waits for its next request.
    fn response_done(&self) {
        let mut state = self.lock();
        state.stage = Stage::Idle;
        state.since = Instant::now();
        drop(state);
        self.changed.notify_one();
    }

    /// The current stage's deadline and what passing it means.
    fn deadline(&self, limits: &Limits) -> (Instant, CloseReason) {
        let state = self.lock();
        match state.stage {
            Stage::Idle => (state.since + limits.idle_timeout, CloseReason::IdleTimeout),
            Stage::Header => (
                state.since + limits.header_read_timeout,
                CloseReason::HeaderTimeout,
            ),
            Stage::Request => (
                state.since + limits.request_timeout + REQUEST_GRACE,
                CloseReason::RequestTimeout,
            ),
        }
    }

    /// True the first time only: one connection is counted once.
    fn count_once(&self) -> bool {
        !std::mem::replace(&mut self.lock().counted, true)
    }

    fn set_linger(&self) {
        self.lock().linger = true;
    }

    fn lingers(&self) -> bool {
        self.lock().linger
    }
}

/// The socket, telling the phase when bytes arrive.
struct Tracked {
    stream: TcpStream,
    phase: Arc<Phase>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.phase.read_some();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// An answer's body; dropping it (hyper does once it is written) ends the
/// request stage.
struct Guarded {
    body: Body,
    phase: Arc<Phase>,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.phase.response_done();
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Guarded>, Infallible>> + Send>>;

/// Serves one connection until it ends, a limit closes it, or `closing`
/// turns true (then the request in hand is finished first).
pub(super) async fn serve(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut closing: watch::Receiver<bool>,
) {
    let _open = shared.metrics.open(shared.listener);
    // Answers are small and written at once; waiting to fill segments
    // only delays them.
    let _ = stream.set_nodelay(true);
    let phase = Arc::new(Phase::new());
    let io = TokioIo::new(Tracked {
        stream,
        phase: phase.clone(),
    });
    let service = {
        let shared = shared.clone();
        let phase = phase.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| -> Answer {
            let since = phase.request_started();
            let deadline = tokio::time::Instant::from_std(since + shared.limits.request_timeout);
            let call = tower_service::Service::call(&mut shared.router.clone(), request);
            let shared = shared.clone();
            let phase = phase.clone();
            Box::pin(async move {
                let response = match tokio::time::timeout_at(deadline, call).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        if phase.count_once() {
                            shared
                                .metrics
                                .closed(shared.listener, CloseReason::RequestTimeout);
                        }
                        debug!(listener = shared.listener, "request timed out: 408");
                        timed_out(shared.limits.request_timeout)
                    }
                };
                if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    phase.set_linger();
                }
                Ok(response.map(|body| Guarded { body, phase }))
            })
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        // The watchdog keeps the time; hyper's own header timer would also
        // cut idle keep-alive connections at the header limit.
        .header_read_timeout(None)
        .max_header_size(shared.limits.max_header_bytes);
    let mut connection = builder.serve_connection(io, service);

    let mut closing_seen = false;
    let ended = loop {
        if !closing_seen && *closing.borrow() {
            closing_seen = true;
            Pin::new(&mut connection).graceful_shutdown();
        }
        let (deadline, _) = phase.deadline(&shared.limits);
        let event = tokio::select! {
            done = std::future::poll_fn(|cx| connection.poll_without_shutdown(cx)) => Event::Done(done),
            () = phase.changed.notified() => Event::Changed,
            () = tokio::time::sleep_until(deadline.into()) => Event::Deadline,
            changed = closing.changed(), if !closing_seen => match changed {
                Ok(()) => Event::Changed,
                // The listener is gone: nothing will say "closing" anymore.
                Err(_) => Event::Closing,
            },
        };
        match event {
            Event::Done(done) => break done,
            Event::Changed => {}
            Event::Closing => {
                closing_seen = true;
                Pin::new(&mut connection).graceful_shutdown();
            }
            Event::Deadline => {
                let (deadline, reason) = phase.deadline(&shared.limits);
                if Instant::now() >= deadline {
                    if phase.count_once() {
                        shared.metrics.closed(shared.listener, reason);
                    }
                    debug!(
                        listener = shared.listener,
                        reason = reason.label(),
                        "connection closed at a limit"
                    );
                    // Dropping the connection closes the socket.
                    return;
                }
            }
        }
    };
    match ended {
        Ok(()) if phase.lingers() => {
            let stream = connection.into_parts().io.into_inner().stream;
            linger(stream).await;
        }
        Ok(()) => {
            let mut stream = connection.into_parts().io.into_inner().stream;
            let _ = stream.shutdown().await;
        }
        Err(error) => debug!(listener = shared.listener, %error, "connection ended"),
    }
}

enum Event {
    Done(hyper::Result<()>),
    Changed,
    Deadline,
    Closing,
}

/// Closes the sending side (the client sees the answer complete), then
/// reads and discards what the client still sends — bounded in bytes and
/// time — so its last writes do not meet a reset before it reads the answer.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let discard = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, discard).await;
}

/// The 408 of a request not done in time; the connection closes after it.
fn timed_out(limit: Duration) -> Response<Body> {
    let body = serde_json::json!({
        "status": "rejected",
        "error": format!("request not complete within {}", humantime::format_duration(limit)),
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::REQUEST_TIMEOUT;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
            max_header_bytes: 16 * 1024,
        }
    }

    #[test]
    fn each_stage_has_its_own_clock() {
        let phase = Phase::new();
        let limits = limits();
        let (idle, reason) = phase.deadline(&limits);
        assert_eq!(reason, CloseReason::IdleTimeout);
        phase.read_some();
        let (header, reason) = phase.deadline(&limits);
        assert_eq!(reason, CloseReason::HeaderTimeout);
        assert!(
            header < idle,
            "a started header has less time than an idle wait"
        );
        let since = phase.request_started();
        let (request, reason) = phase.deadline(&limits);
        assert_eq!(reason, CloseReason::RequestTimeout);
        assert_eq!(request, since + limits.request_timeout + REQUEST_GRACE);
        assert!(
            header - limits.header_read_timeout == since,
            "the request's clock starts at its first byte"
        );
        phase.read_some();
        assert_eq!(phase.deadline(&limits).1, CloseReason::RequestTimeout);
        phase.response_done();
        assert_eq!(phase.deadline(&limits).1, CloseReason::IdleTimeout);
    }

    #[test]
    fn a_connection_is_counted_once_and_lingers_only_after_a_413() {
        let phase = Phase::new();
        assert!(phase.count_once());
        assert!(!phase.count_once());
        assert!(!phase.lingers());
        phase.set_linger();
        assert!(phase.lingers());
        phase.request_started();
        assert!(!phase.lingers(), "a new request starts without it");
    }
}
