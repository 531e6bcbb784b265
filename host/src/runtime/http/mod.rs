//! Outgoing HTTP for handlers: `wasi:http/outgoing-handler`, granted by
//! the manifest's `allowed_hosts` and nothing else.
//!
//! Every request a guest sends passes [`Outbound`], the one gate:
//!
//! - a destination no entry allows, or past the manifest's `max_requests`,
//!   fails in the guest (`http-request-denied`, or an error naming the
//!   limit) — never a trap — and the host logs handler, version, URL and
//!   the `allowed_hosts` entry that would allow it;
//! - the host adds `Idempotency-Key: <event idempotency key>:<handler>:<n>`
//!   (n = the request's index within the invocation, so the same on every
//!   retry and replay; a key the guest set is kept), `traceparent` (a
//!   child of the event's trace) and `X-Correlation-Id`;
//! - the host adds the operator's credentials for the destination
//!   (`[[outgoing.credentials]]`), which guests never see;
//! - the host resolves and connects itself ([`connect`]): a name that
//!   resolves to a link-local address is refused unless the manifest lists
//!   that address;
//! - the connect, first-byte and between-bytes timeouts are kept within
//!   what is left of the invocation's `timeout` (with a little room for the
//!   guest to return its verdict), and a response body past
//!   `max_response_bytes` fails;
//! - a `Retry-After` given as an HTTP date reaches the guest as seconds
//!   (a guest's clock reads zero unless its manifest grants one).

mod allow;
mod connect;
mod credentials;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Request, Response};
use tracing::{debug, warn};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

pub use allow::{AllowedHosts, BadEntry, Destination, Scheme, is_link_local};
pub use connect::{Connector, Resolve, SystemResolver};
pub use credentials::{Credential, Credentials};

use crate::manifest::Manifest;
use crate::telemetry::{KeyValue, SpanKind, Trace};
use connect::{ConnectError, Timeouts};

/// The header carrying the idempotency key of a request.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// The header carrying the event's correlation id.
pub const CORRELATION_ID: &str = "x-correlation-id";
/// The W3C trace context header.
pub const TRACEPARENT: &str = crate::headers::TRACEPARENT;

/// The most of a refused request's body that is read (and dropped).
const DRAIN_LIMIT: u64 = 64 << 20;

/// Longest stretch of an invocation's time that HTTP timeouts leave to the
/// guest, so that it can still classify a timeout and return.
const ROOM_TO_RETURN: Duration = Duration::from_millis(250);

/// What a handler version's manifest grants: parsed once per version.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// Where requests may go.
    pub hosts: AllowedHosts,
    /// The largest response body.
    pub max_response_bytes: u64,
    /// Requests per invocation.
    pub max_requests: u32,
}

impl Grant {
    /// The grant of `manifest`.
    pub fn of(manifest: &Manifest) -> Result<Grant, BadEntry> {
        Ok(Grant {
            hosts: AllowedHosts::parse(&manifest.allowed_hosts)?,
            max_response_bytes: manifest.max_response_bytes,
            max_requests: manifest.max_requests,
        })
    }
}

/// What every request of one invocation carries, and what its log lines
/// name.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The handler.
    pub handler: String,
    /// Its version label.
    pub version: String,
    /// The event's idempotency key.
    pub idempotency_key: String,
    /// The event's correlation id.
    pub correlation_id: String,
    /// The event's `traceparent`, when it has one.
    pub traceparent: Option<String>,
    /// The invocation's span, when tracing is on: each request gets a
    /// client span under it, whose id its `traceparent` carries.
    pub trace: crate::telemetry::Trace,
}

/// The `wasi:http` hooks of one invocation: the gate every outgoing
/// request passes.
pub struct Outbound {
    grant: Arc<Grant>,
    connector: Arc<Connector>,
    credentials: Arc<Credentials>,
    origin: Arc<Origin>,
    /// When HTTP has to be done, leaving the guest time to return.
    deadline: Instant,
    /// Requests made so far (the next one's index).
    sent: u32,
}

impl Outbound {
    /// The hooks of an invocation that must end at `ends`.
    pub fn new(
        grant: Arc<Grant>,
        connector: Arc<Connector>,
        credentials: Arc<Credentials>,
        origin: Arc<Origin>,
        started: Instant,
        timeout: Duration,
    ) -> Outbound {
        let room = (timeout / 10).min(ROOM_TO_RETURN);
        Outbound {
            grant,
            connector,
            credentials,
            origin,
            deadline: started + timeout.saturating_sub(room),
            sent: 0,
        }
    }

    /// The request's timeouts: what the guest asked for, each within what
    /// is left of the invocation.
    fn timeouts(&self, options: Option<RequestOptions>) -> Timeouts {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let within = |asked: Option<Duration>| asked.map_or(left, |a| a.min(left));
        let options = options.unwrap_or_default();
        Timeouts {
            connect: within(options.connect_timeout),
            first_byte: within(options.first_byte_timeout),
            between_bytes: within(options.between_bytes_timeout),
        }
    }
}

/// The outcome handed back to `wasi:http`.
type Sent = Result<
    (
        Response<WasiBody>,
        Box<dyn std::future::Future<Output = Result<(), Error>> + Send>,
    ),
    Error,
>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        mut request: Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_errors: Box<dyn std::future::Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn std::future::Future<Output = Sent> + Send> {
        let index = self.sent;
        self.sent = self.sent.saturating_add(1);
        let origin = self.origin.clone();
        let url = loggable_url(request.uri());
        let refuse = |request: Request<WasiBody>,
                      error: Error|
         -> Box<dyn std::future::Future<Output = Sent> + Send> {
            Box::new(async move {
                connect::drain(request.into_body(), DRAIN_LIMIT).await;
                Err(error)
            })
        };
        let Some(to) = destination(request.uri()) else {
            return refuse(request, Error::HttpRequestUriInvalid);
        };
        if index >= self.grant.max_requests {
            let max = self.grant.max_requests;
            warn!(
                handler = %origin.handler, version = %origin.version,
                correlation_id = %origin.correlation_id, %url, max_requests = max,
                "outgoing HTTP request refused: the invocation made max_requests requests already"
            );
            return refuse(
                request,
                Error::InternalError(Some(format!(
                    "hookmesh: max_requests: this invocation made {max} requests already \
                     (the manifest's max_requests)"
                ))),
            );
        }
        let Some(entry) = self.grant.hosts.allowing(&to) else {
            let add = to.entry();
            warn!(
                handler = %origin.handler, version = %origin.version,
                correlation_id = %origin.correlation_id, %url, add = %add,
                "outgoing HTTP request denied: the manifest's allowed_hosts does not list it; \
                 add {add:?} to allowed_hosts to allow it"
            );
            return refuse(request, Error::HttpRequestDenied);
        };
        let span = client_span(&origin.trace, &request, &to, &url, index);
        add_headers(&mut request, &origin, index, span.traceparent());
        let credentials = self
            .credentials
            .apply(&origin.handler, &to, request.headers_mut());
        debug!(
            handler = %origin.handler, %url, allowed_by = %entry, index,
            credentials = ?credentials, "outgoing HTTP request"
        );
        let timeouts = self.timeouts(options);
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let (grant, connector) = (self.grant.clone(), self.connector.clone());
        Box::new(async move {
            let started = Instant::now();
            let exchange = connector.exchange(
                &to,
                &grant.hosts,
                request,
                timeouts,
                grant.max_response_bytes,
            );
            let outcome = tokio::time::timeout_at(deadline, exchange)
                .await
                .unwrap_or(Err(ConnectError::Failed(Error::ConnectionReadTimeout)));
            match &outcome {
                Ok((response, _)) => {
                    let status = response.status().as_u16();
                    span.set(|| {
                        vec![KeyValue::new(
                            "http.response.status_code",
                            i64::from(status),
                        )]
                    });
                    if status >= 400 {
                        span.fail(|| format!("HTTP {status}"));
                    }
                }
                Err(ConnectError::LinkLocal(_)) => {
                    span.fail(|| "denied: link-local address".into())
                }
                Err(ConnectError::Failed(error)) => span.fail(|| error.to_string()),
            }
            span.end();
            match outcome {
                Ok((mut response, driver)) => {
                    debug!(
                        handler = %origin.handler, %url, status = response.status().as_u16(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "outgoing HTTP response"
                    );
                    retry_after_in_seconds(response.headers_mut(), SystemTime::now());
                    Ok((response, driver))
                }
                Err(ConnectError::LinkLocal(ip)) => {
                    let listed = Destination {
                        host: ip.to_string(),
                        ..to.clone()
                    };
                    warn!(
                        handler = %origin.handler, version = %origin.version,
                        correlation_id = %origin.correlation_id, %url, address = %ip,
                        add = %listed.entry(),
                        "outgoing HTTP request denied: {} resolves to the link-local address {ip} \
                         (cloud metadata lives there); add {:?} to allowed_hosts only if the \
                         handler must reach it",
                        to.host, listed.entry()
                    );
                    Err(Error::HttpRequestDenied)
                }
                Err(ConnectError::Failed(error)) => {
                    debug!(handler = %origin.handler, %url, %error, "outgoing HTTP request failed");
                    Err(error)
                }
            }
        })
    }
}

/// Scheme, host and port of a request URI (`None` for a scheme other than
/// http/https, or no host).
fn destination(uri: &http::Uri) -> Option<Destination> {
    let scheme = Scheme::parse(uri.scheme_str()?)?;
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    Some(Destination {
        scheme,
        host,
        port: uri.port_u16().unwrap_or(scheme.default_port()),
    })
}

/// The URL as logs show it: without its query (which may carry a key),
/// at most 256 bytes.
fn loggable_url(uri: &http::Uri) -> String {
    let mut url = format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.authority().map_or("", |a| a.as_str()),
        uri.path()
    );
    if url.len() > 256 {
        let mut end = 256;
        while !url.is_char_boundary(end) {
            end -= 1;
        }
        url.truncate(end);
        url.push('…');
    }
    url
}

/// The client span of request number `index` (empty when tracing is off).
fn client_span(
    trace: &Trace,
    request: &Request<WasiBody>,
    to: &Destination,
    url: &str,
    index: u32,
) -> Trace {
    let method = request.method().as_str();
    trace.child(method.to_string(), SpanKind::Client, || {
        vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("url.full", url.to_string()),
            KeyValue::new("server.address", to.host.clone()),
            KeyValue::new("server.port", i64::from(to.port)),
            KeyValue::new("hookmesh.http.index", i64::from(index)),
        ]
    })
}

/// The headers the host adds: the idempotency key (unless the guest set
/// one), the `traceparent` — the request's own span's when traced, else a
/// child of the event's — and the correlation id.
fn add_headers(
    request: &mut Request<WasiBody>,
    origin: &Origin,
    index: u32,
    traceparent: Option<String>,
) {
    let headers = request.headers_mut();
    let key = format!("{}:{}:{index}", origin.idempotency_key, origin.handler);
    let traceparent = traceparent
        .unwrap_or_else(|| crate::headers::child_traceparent(origin.traceparent.as_deref()));
    if !headers.contains_key(IDEMPOTENCY_KEY)
        && let Ok(value) = HeaderValue::from_str(&key)
    {
        headers.insert(IDEMPOTENCY_KEY, value);
    }
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        headers.insert(TRACEPARENT, value);
    }
    if let Ok(value) = HeaderValue::from_str(&origin.correlation_id) {
        headers.insert(CORRELATION_ID, value);
    }
}

/// Rewrites a `Retry-After` given as an HTTP date into the seconds from
/// `now` until then (0 for a date past).
fn retry_after_in_seconds(headers: &mut http::HeaderMap, now: SystemTime) {
    let Some(value) = headers.get(http::header::RETRY_AFTER) else {
        return;
    };
    let Ok(text) = value.to_str() else { return };
    if text.trim().parse::<u64>().is_ok() {
        return;
    }
    if let Ok(when) = httpdate::parse_http_date(text.trim()) {
        let seconds = when
            .duration_since(now)
            .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_come_from_the_uri_with_default_ports() {
        let uri = |s: &str| s.parse::<http::Uri>().expect("uri");
        assert_eq!(
            destination(&uri("https://ERP.example.com/sales-orders")),
            Some(Destination {
                scheme: Scheme::Https,
                host: "erp.example.com".into(),
                port: 443
            })
        );
        assert_eq!(
            destination(&uri("http://[::1]:8090/x")).map(|d| (d.host, d.port)),
            Some(("::1".to_string(), 8090))
        );
        assert_eq!(destination(&uri("ftp://erp.example.com/")), None);
        assert_eq!(
            loggable_url(&uri("https://erp.example.com/orders?api_key=secret")),
            "https://erp.example.com/orders"
        );
    }

    #[test]
    fn the_host_adds_its_headers_and_keeps_the_guests_idempotency_key() {
        let origin = Origin {
            handler: "order-sync".into(),
            version: "1-abc".into(),
            idempotency_key: "crm:msg_1".into(),
            correlation_id: "corr-1".into(),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            trace: crate::telemetry::Trace::off(),
        };
        let body = || {
            use http_body_util::BodyExt;
            http_body_util::Empty::new()
                .map_err(|never: std::convert::Infallible| match never {})
                .boxed_unsync()
        };
        let mut request = Request::new(body());
        add_headers(&mut request, &origin, 2, None);
        let headers = request.headers();
        assert_eq!(headers[IDEMPOTENCY_KEY], "crm:msg_1:order-sync:2");
        assert_eq!(headers[CORRELATION_ID], "corr-1");
        let traceparent = headers[TRACEPARENT].to_str().expect("ascii");
        assert!(traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(!traceparent.contains("b7ad6b7169203331"));

        let mut own = Request::new(body());
        own.headers_mut()
            .insert(IDEMPOTENCY_KEY, HeaderValue::from_static("mine"));
        add_headers(&mut own, &origin, 0, None);
        assert_eq!(own.headers()[IDEMPOTENCY_KEY], "mine");
    }

    #[test]
    fn timeouts_stay_within_the_invocation() {
        let outbound = Outbound::new(
            Arc::default(),
            Arc::new(Connector::new(Arc::new(SystemResolver)).expect("tls")),
            Arc::default(),
            Arc::default(),
            Instant::now(),
            Duration::from_secs(2),
        );
        let timeouts = outbound.timeouts(Some(RequestOptions {
            connect_timeout: Some(Duration::from_millis(300)),
            first_byte_timeout: Some(Duration::from_secs(600)),
            between_bytes_timeout: None,
        }));
        assert_eq!(timeouts.connect, Duration::from_millis(300));
        assert!(timeouts.first_byte <= Duration::from_millis(1_800));
        assert!(timeouts.first_byte > Duration::from_millis(1_000));
        assert_eq!(timeouts.between_bytes, timeouts.first_byte);
    }

    #[test]
    fn an_http_date_retry_after_becomes_seconds() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = http::HeaderMap::new();
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(&later).expect("ascii"),
        );
        retry_after_in_seconds(&mut headers, now);
        assert_eq!(headers[http::header::RETRY_AFTER], "120");
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from_static("7"));
        retry_after_in_seconds(&mut headers, now);
        assert_eq!(headers[http::header::RETRY_AFTER], "7");
        let past = httpdate::fmt_http_date(now - Duration::from_secs(5));
        headers.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(&past).expect("ascii"),
        );
        retry_after_in_seconds(&mut headers, now);
        assert_eq!(headers[http::header::RETRY_AFTER], "0");
    }
}
