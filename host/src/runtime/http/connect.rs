//! Resolving, filtering and connecting — done by the host, never the
//! guest, so that what a name resolves to is checked before any byte is
//! sent: a link-local address (where cloud metadata services answer) is
//! refused unless the manifest lists that address itself.
//!
//! Then one HTTP/1.1 exchange over the connection (rustls with the webpki
//! roots for `https`), with the three timeouts of `wasi:http` and a cap on
//! the response body.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, WasiBody};

use super::allow::{AllowedHosts, Destination, Scheme, is_link_local};

/// Turns a host name into addresses. The host's own is the system
/// resolver ([`SystemResolver`]); tests hand in one that answers what they
/// need without a DNS server.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host` (a name, never an IP literal) at `port`.
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The operating system's resolver (`getaddrinfo`: `/etc/hosts`, DNS).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: String, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    }
}

/// Why no connection was made.
#[derive(Debug)]
pub(super) enum ConnectError {
    /// Every address the name resolved to is link-local and unlisted.
    LinkLocal(IpAddr),
    /// Resolving, connecting or the TLS handshake failed.
    Failed(Error),
}

/// The three timeouts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timeouts {
    /// Until the connection (and TLS) is up.
    pub connect: Duration,
    /// From sending the request until the response head.
    pub first_byte: Duration,
    /// Between two frames of the response body.
    pub between_bytes: Duration,
}

/// A connected byte stream, TLS or not.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The future that drives a connection after its response head arrived;
/// `wasi:http` keeps it beside the response body.
pub(super) type Driver = Box<dyn Future<Output = Result<(), Error>> + Send>;

/// Resolver and TLS configuration, shared by every invocation.
pub struct Connector {
    resolver: Arc<dyn Resolve>,
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

impl Connector {
    /// A connector resolving with `resolver` and trusting the webpki
    /// (Mozilla) roots.
    pub fn new(resolver: Arc<dyn Resolve>) -> Result<Connector, rustls::Error> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Connector {
            resolver,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// The addresses of `to` a guest may reach: an IP literal as it is (the
    /// manifest listed it to get this far); a name's addresses without the
    /// link-local ones the manifest does not list.
    async fn addresses(
        &self,
        to: &Destination,
        allowed: &AllowedHosts,
    ) -> Result<Vec<SocketAddr>, ConnectError> {
        if let Some(ip) = to.ip() {
            return Ok(vec![SocketAddr::new(ip, to.port)]);
        }
        let resolved = self
            .resolver
            .resolve(to.host.clone(), to.port)
            .await
            .map_err(|e| {
                ConnectError::Failed(Error::DnsError {
                    rcode: Some(e.to_string()),
                    info_code: None,
                })
            })?;
        let (refused, usable): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
            .into_iter()
            .partition(|a| is_link_local(a.ip()) && !allowed.lists_ip(a.ip()));
        match (usable.is_empty(), refused.first()) {
            (true, Some(first)) => Err(ConnectError::LinkLocal(first.ip())),
            (true, None) => Err(ConnectError::Failed(Error::DestinationNotFound)),
            (false, _) => Ok(usable),
        }
    }

    /// Connects to `to` (trying its addresses in turn), with TLS for
    /// `https`, within `timeout`.
    async fn connect(
        &self,
        to: &Destination,
        allowed: &AllowedHosts,
        timeout: Duration,
    ) -> Result<Box<dyn Stream>, ConnectError> {
        let work = async {
            let addresses = self.addresses(to, allowed).await?;
            let mut last = None;
            let mut tcp = None;
            for address in addresses {
                match TcpStream::connect(address).await {
                    Ok(stream) => {
                        tcp = Some(stream);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = match (tcp, last) {
                (Some(tcp), _) => tcp,
                (None, Some(e)) => return Err(ConnectError::Failed(connect_error(e))),
                (None, None) => return Err(ConnectError::Failed(Error::DestinationNotFound)),
            };
            let _ = tcp.set_nodelay(true);
            match to.scheme {
                Scheme::Http => Ok(Box::new(tcp) as Box<dyn Stream>),
                Scheme::Https => {
                    let name = server_name(to).map_err(ConnectError::Failed)?;
                    let tls = self
                        .tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ConnectError::Failed(tls_error(e)))?;
                    Ok(Box::new(tls) as Box<dyn Stream>)
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(ConnectError::Failed(Error::ConnectionTimeout)))
    }

    /// Sends `request` to `to` and returns the response once its head has
    /// arrived; its body fails past `max_body` bytes or when a frame takes
    /// longer than `timeouts.between_bytes`.
    pub(super) async fn exchange(
        &self,
        to: &Destination,
        allowed: &AllowedHosts,
        mut request: Request<WasiBody>,
        timeouts: Timeouts,
        max_body: u64,
    ) -> Result<(Response<WasiBody>, Driver), ConnectError> {
        let stream = self.connect(to, allowed, timeouts.connect).await?;
        let handshake = hyper::client::conn::http1::handshake(TokioIo::new(stream));
        let (mut sender, connection) = tokio::time::timeout(timeouts.connect, handshake)
            .await
            .map_err(|_| ConnectError::Failed(Error::ConnectionTimeout))?
            .map_err(|e| ConnectError::Failed(Error::Hyper(e)))?;
        // Origin form on the wire: scheme and authority only go to a proxy.
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        *request.uri_mut() = http::Uri::try_from(path)
            .map_err(|_| ConnectError::Failed(Error::HttpRequestUriInvalid))?;
        let send = async {
            tokio::time::timeout(timeouts.first_byte, sender.send_request(request))
                .await
                .map_err(|_| Error::ConnectionReadTimeout)?
                .map_err(hyper_error)
        };
        // The connection has to be driven while the response head is
        // awaited; it is handed back unfinished when the head comes first.
        let mut connection = Box::pin(connection);
        let mut send = std::pin::pin!(send);
        let mut driving = true;
        let response = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = send.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            if driving && let Poll::Ready(ended) = connection.as_mut().poll(cx) {
                driving = false;
                if let Err(e) = ended {
                    return Poll::Ready(Err(hyper_error(e)));
                }
                return send.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
        .map_err(ConnectError::Failed)?;
        if let Some(declared) = response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            && declared > max_body
        {
            return Err(ConnectError::Failed(Error::HttpResponseBodySize(Some(
                declared,
            ))));
        }
        let driver: Driver = Box::new(async move {
            if driving {
                connection.await.map_err(hyper_error)
            } else {
                Ok(())
            }
        });
        let response = response.map(|body| {
            CappedBody::new(body, hyper_error, max_body, timeouts.between_bytes).boxed_unsync()
        });
        Ok((response, driver))
    }
}

/// The TLS name of the destination: its host name, or its IP address.
fn server_name(to: &Destination) -> Result<rustls::pki_types::ServerName<'static>, Error> {
    match to.ip() {
        Some(ip) => Ok(rustls::pki_types::ServerName::IpAddress(ip.into())),
        None => {
            rustls::pki_types::ServerName::try_from(to.host.clone()).map_err(|_| Error::DnsError {
                rcode: Some(format!("{:?} is not a valid TLS server name", to.host)),
                info_code: None,
            })
        }
    }
}

fn connect_error(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Error::ConnectionRefused,
        io::ErrorKind::TimedOut => Error::ConnectionTimeout,
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            Error::DestinationUnavailable
        }
        _ => Error::Connect(e),
    }
}

/// A certificate the roots do not vouch for is `TlsCertificateError`;
/// anything else in the handshake, `TlsProtocolError`.
fn tls_error(e: io::Error) -> Error {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        });
    if certificate {
        Error::TlsCertificateError
    } else {
        Error::TlsProtocolError
    }
}

fn hyper_error(e: hyper::Error) -> Error {
    if e.is_timeout() {
        Error::ConnectionReadTimeout
    } else if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
        Error::ConnectionTerminated
    } else if e.is_parse() || e.is_parse_status() {
        Error::HttpProtocolError
    } else {
        Error::Hyper(e)
    }
}

/// A response body that fails once it grows past `max` bytes, or when a
/// frame is more than `between_bytes` in coming.
struct CappedBody<B: Body> {
    inner: B,
    error: fn(B::Error) -> Error,
    seen: u64,
    max: u64,
    between_bytes: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B: Body> CappedBody<B> {
    fn new(inner: B, error: fn(B::Error) -> Error, max: u64, between_bytes: Duration) -> Self {
        CappedBody {
            inner,
            error,
            seen: 0,
            max,
            between_bytes,
            stall: None,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CappedBody<B> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err((this.error)(e)))),
            Poll::Ready(Some(Ok(frame))) => {
                this.stall = None;
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.max {
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(
                            this.seen,
                        )))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let wait = this.between_bytes;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                ready!(stall.as_mut().poll(cx));
                Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads and drops a refused request's body, so a guest still writing it
/// sees the refusal, not a closed stream (at most `limit` bytes).
pub(super) async fn drain(body: WasiBody, limit: u64) {
    let mut body = std::pin::pin!(body);
    let mut seen = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len() as u64);
        if seen > limit {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::StreamExt;
    use http_body_util::StreamBody;

    use super::*;

    fn chunks(
        sizes: &[usize],
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Unpin> {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = sizes
            .iter()
            .map(|n| Ok(Frame::data(Bytes::from(vec![b'x'; *n]))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    fn never(e: Infallible) -> Error {
        match e {}
    }

    #[tokio::test]
    async fn a_body_past_the_cap_fails_where_it_crosses_it() {
        let capped = CappedBody::new(
            chunks(&[400, 400, 400]),
            never,
            1000,
            Duration::from_secs(5),
        );
        let mut body = std::pin::pin!(capped);
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        match body.frame().await {
            Some(Err(Error::HttpResponseBodySize(Some(1200)))) => {}
            other => panic!("the third frame crosses 1000 bytes: {other:?}"),
        }
        let within = CappedBody::new(chunks(&[500, 500]), never, 1000, Duration::from_secs(5));
        let collected = within.collect().await.map(|c| c.to_bytes().len());
        assert!(matches!(collected, Ok(1000)), "exactly the cap is fine");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_times_out_between_bytes() {
        let stalled = chunks(&[10])
            .into_data_stream()
            .chain(futures::stream::pending())
            .map(|r| r.map(Frame::data));
        let capped = CappedBody::new(
            StreamBody::new(stalled),
            never,
            1000,
            Duration::from_millis(300),
        );
        let mut body = std::pin::pin!(capped);
        assert!(body.frame().await.is_some_and(|f| f.is_ok()));
        let started = tokio::time::Instant::now();
        assert!(matches!(
            body.frame().await,
            Some(Err(Error::ConnectionReadTimeout))
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
