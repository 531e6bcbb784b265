//! Outgoing HTTP: a small synchronous client over `wasi:http`, and
//! [`classify`], which turns an answer into ok or the right
//! [`HandlerError`].
//!
//! ```ignore
//! use hookmesh_guest::http;
//! use hookmesh_guest::serde_json::json;
//!
//! let erp = hookmesh_guest::config_or("erp_url", "http://127.0.0.1:8090");
//! let answer = http::post_json(&format!("{erp}/sales-orders"), &json!({ "crm_order_id": "ORD-1" }))?;
//! let answer = http::classify(answer)?;          // 2xx, or transient / permanent
//! let id = hookmesh_guest::require_str(&answer.json()?, "/id")?;
//! ```
//!
//! The host lets a request through only to the hosts the manifest's
//! `allowed_hosts` lists (any other fails with [`HttpError::Denied`]), and
//! adds `Idempotency-Key: <event idempotency key>:<handler>:<n>` (n counts
//! the invocation's requests from 0, so a retry or replay of the event
//! sends the same keys), `traceparent` and `X-Correlation-Id`. A key the
//! handler sets itself is kept. Requests are side effects made *at least
//! once*: the system called must honour the key for a retry to be safe.
//!
//! Redirects are followed (at most [`MAX_REDIRECTS`]): 307 and 308 with
//! the same method and body, 301, 302 and 303 as a `GET` without body; a
//! redirect to another origin drops `Authorization` and `Cookie`. Each hop
//! is a request of its own for the host: allowed or denied by the same
//! list, counted in `max_requests`.

use std::time::Duration;

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use wasip2::io::streams::StreamError;

use crate::{HandlerError, permanent, transient, transient_after};

/// Redirects followed at most.
pub const MAX_REDIRECTS: usize = 5;

/// How much of a response body an error message quotes.
const EXCERPT_BYTES: usize = 300;

/// The most bytes one write to a `wasi:http` body stream may carry.
const WRITE_CHUNK: usize = 4096;

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The URL cannot be requested (not `http(s)://host/…`, a forbidden
    /// header): a bug in the handler or its config.
    Invalid(String),
    /// The host refused it: the manifest's `allowed_hosts` does not allow
    /// the destination (the host's log names the entry to add), or it
    /// resolves to a link-local address that is not listed.
    Denied(String),
    /// Connecting, or waiting for the answer, took too long.
    Timeout(String),
    /// The answer's body is larger than the manifest's
    /// `max_response_bytes`.
    TooLarge(String),
    /// The invocation sent the most requests its manifest allows
    /// (`max_requests`).
    Limit(String),
    /// Anything else on the way: a refused connection, a name that does
    /// not resolve, TLS, a broken answer.
    Failed(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Invalid(m)
            | HttpError::Denied(m)
            | HttpError::Timeout(m)
            | HttpError::TooLarge(m)
            | HttpError::Limit(m)
            | HttpError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for HttpError {}

/// A denied or invalid request is `permanent` (a retry meets the same
/// manifest; deploy one that allows the host, then replay the dead
/// letter); everything else — timeouts, connection errors, limits — is
/// `transient`.
impl From<HttpError> for HandlerError {
    fn from(error: HttpError) -> Self {
        match error {
            HttpError::Invalid(m) | HttpError::Denied(m) => permanent(m),
            other => transient(other.to_string()),
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// `METHOD url` of the request that got this answer (after redirects),
    /// for messages.
    pub request: String,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; a body that is not JSON is a `permanent` error.
    pub fn json(&self) -> Result<serde_json::Value, HandlerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            permanent(format!(
                "{} answered {} with a body that is not JSON ({e}): {}",
                self.request,
                self.status,
                excerpt(&self.body)
            ))
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Retry-After` in seconds, as a delay (the host turns a date into
    /// seconds before the handler sees it).
    pub fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after")?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_secs)
    }
}

/// What an answer means for the event:
///
/// - 2xx → `Ok(response)`;
/// - 408, 425, 429 and 5xx → `transient`, with the `Retry-After` as the
///   retry's delay when the answer gives one (the host keeps it within the
///   manifest's backoff `initial` … `max`);
/// - any other status (4xx, an unfollowed 3xx) → `permanent`, with the
///   status and the start of the body.
///
/// A business-rule refusal that a person must look at is the handler's to
/// recognise: match on the response first and return
/// [`needs_human`](crate::needs_human).
pub fn classify(response: Response) -> Result<Response, HandlerError> {
    let status = response.status;
    if (200..300).contains(&status) {
        return Ok(response);
    }
    let message = format!(
        "{} answered {status}: {}",
        response.request,
        excerpt(&response.body)
    );
    if matches!(status, 408 | 425 | 429) || (500..600).contains(&status) {
        Err(match response.retry_after() {
            Some(delay) => transient_after(message, delay),
            None => transient(message),
        })
    } else {
        Err(permanent(message))
    }
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// `POST url` with `value` as a JSON body.
pub fn post_json(url: &str, value: &serde_json::Value) -> Result<Response, HttpError> {
    Request::post(url).json(value).send()
}

/// `PUT url` with `value` as a JSON body.
pub fn put_json(url: &str, value: &serde_json::Value) -> Result<Response, HttpError> {
    Request::new("PUT", url).json(value).send()
}

/// A request being built; [`Request::send`] sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A request with any method (`"PATCH"`, `"DELETE"`, …).
    pub fn new(method: &str, url: &str) -> Request {
        Request {
            method: method.to_ascii_uppercase(),
            url: url.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// A `GET`.
    pub fn get(url: &str) -> Request {
        Request::new("GET", url)
    }

    /// A `POST`.
    pub fn post(url: &str) -> Request {
        Request::new("POST", url)
    }

    /// Adds a header (`Idempotency-Key` replaces the host's).
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The body, and `Content-Type: application/json`.
    pub fn json(mut self, value: &serde_json::Value) -> Request {
        self.body = value.to_string().into_bytes();
        self.header("content-type", "application/json")
    }

    /// The body as given.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    /// Gives up on connecting, and on each wait for the answer, after
    /// `timeout` (the host also keeps every wait within what is left of
    /// the invocation's `timeout`).
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sends it and reads the whole answer, following redirects.
    pub fn send(self) -> Result<Response, HttpError> {
        let mut current = self;
        for _ in 0..=MAX_REDIRECTS {
            let response = current.send_once()?;
            let Some(next) = current.redirected(&response)? else {
                return Ok(response);
            };
            current = next;
        }
        Err(HttpError::Failed(format!(
            "{} {}: more than {MAX_REDIRECTS} redirects",
            current.method, current.url
        )))
    }

    /// The request a redirect answer asks for, if it is one.
    fn redirected(&self, response: &Response) -> Result<Option<Request>, HttpError> {
        if !matches!(response.status, 301 | 302 | 303 | 307 | 308) {
            return Ok(None);
        }
        let Some(location) = response.header("location") else {
            return Ok(None);
        };
        let from = Url::parse(&self.url)?;
        let to = from.join(location)?;
        let mut next = self.clone();
        next.url = to.to_string();
        if matches!(response.status, 301..=303) && self.method != "HEAD" {
            next.method = "GET".into();
            next.body.clear();
            next.headers
                .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        }
        if to.origin() != from.origin() {
            next.headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case("authorization") && !n.eq_ignore_ascii_case("cookie")
            });
        }
        Ok(Some(next))
    }

    fn send_once(&self) -> Result<Response, HttpError> {
        let what = format!("{} {}", self.method, self.url);
        let url = Url::parse(&self.url)?;
        let invalid = |why: &str| HttpError::Invalid(format!("{what}: {why}"));
        let entries: Vec<(String, Vec<u8>)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone().into_bytes()))
            .collect();
        let headers = Fields::from_list(&entries)
            .map_err(|e| invalid(&format!("a header cannot be sent ({e:?})")))?;
        let request = OutgoingRequest::new(headers);
        request
            .set_method(&method(&self.method))
            .map_err(|()| invalid("bad method"))?;
        request
            .set_scheme(Some(&url.scheme))
            .map_err(|()| invalid("bad scheme"))?;
        request
            .set_authority(Some(&url.authority))
            .map_err(|()| invalid("bad host"))?;
        request
            .set_path_with_query(Some(&url.path))
            .map_err(|()| invalid("bad path"))?;
        let body = request.body().map_err(|()| invalid("no body"))?;
        let options = self.timeout.map(|timeout| {
            let nanos = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            let options = RequestOptions::new();
            // The host may refuse an option; its own limits apply then.
            let _ = options.set_connect_timeout(Some(nanos));
            let _ = options.set_first_byte_timeout(Some(nanos));
            let _ = options.set_between_bytes_timeout(Some(nanos));
            options
        });
        let pending =
            outgoing_handler::handle(request, options).map_err(|code| failure(&what, code))?;
        // The body goes out after `handle`: the host streams it as it is
        // written (a refused request's body is read and dropped).
        if let Ok(stream) = body.write() {
            for chunk in self.body.chunks(WRITE_CHUNK) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    break;
                }
            }
        }
        let _ = OutgoingBody::finish(body, None);
        pending.subscribe().block();
        let incoming = match pending.get() {
            Some(Ok(Ok(incoming))) => incoming,
            Some(Ok(Err(code))) => return Err(failure(&what, code)),
            Some(Err(())) | None => {
                return Err(HttpError::Failed(format!("{what}: no answer")));
            }
        };
        let status = incoming.status();
        let headers = incoming
            .headers()
            .entries()
            .into_iter()
            .map(|(n, v)| {
                (
                    n.to_ascii_lowercase(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect();
        let body = read_body(
            &incoming.consume().map_err(|()| invalid("body taken"))?,
            &what,
        )?;
        Ok(Response {
            status,
            headers,
            body,
            request: what,
        })
    }
}

/// Reads a response body to its end.
fn read_body(body: &IncomingBody, what: &str) -> Result<Vec<u8>, HttpError> {
    let stream = body
        .stream()
        .map_err(|()| HttpError::Failed(format!("{what}: the body cannot be read")))?;
    let mut out = Vec::new();
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                return Err(match wasip2::http::types::http_error_code(&error) {
                    Some(code) => failure(what, code),
                    None => HttpError::Failed(format!(
                        "{what}: reading the body failed: {}",
                        error.to_debug_string()
                    )),
                });
            }
        }
    }
    Ok(out)
}

/// What a `wasi:http` error code means here.
fn failure(what: &str, code: ErrorCode) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => HttpError::Denied(format!(
            "{what}: denied by the host — the manifest's allowed_hosts does not allow it \
             (the host's log names the entry to add)"
        )),
        ErrorCode::HttpResponseBodySize(_) => HttpError::TooLarge(format!(
            "{what}: the answer is larger than the manifest's max_response_bytes"
        )),
        ErrorCode::DnsTimeout
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout => {
            HttpError::Timeout(format!("{what}: timed out ({code:?})"))
        }
        ErrorCode::InternalError(Some(message)) if message.starts_with("hookmesh: ") => {
            HttpError::Limit(format!("{what}: {}", &message["hookmesh: ".len()..]))
        }
        ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestMethodInvalid => {
            HttpError::Invalid(format!("{what}: {code:?}"))
        }
        other => HttpError::Failed(format!("{what}: {other:?}")),
    }
}

fn method(name: &str) -> Method {
    match name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_string()),
    }
}

/// The start of a body, on one line, for an error message.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if body.len() > EXCERPT_BYTES {
        line.push('…');
    }
    if line.trim().is_empty() {
        "(empty body)".into()
    } else {
        line.trim().to_string()
    }
}

/// An absolute `http(s)` URL, in the parts `wasi:http` wants.
#[derive(Debug, Clone)]
struct Url {
    scheme: Scheme,
    authority: String,
    /// Path and query (`/` at least), without the fragment.
    path: String,
}

impl Url {
    fn parse(text: &str) -> Result<Url, HttpError> {
        let invalid = |why: &str| HttpError::Invalid(format!("{text:?} is not a URL: {why}"));
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| invalid("it needs http:// or https://"))?;
        let scheme = if scheme.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else if scheme.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else {
            return Err(invalid("only http and https are supported"));
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.is_empty() {
            return Err(invalid("it has no host"));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else if path.is_empty() {
            "/".to_string()
        } else {
            path.to_string()
        };
        Ok(Url {
            scheme,
            authority: authority.to_string(),
            path,
        })
    }

    /// A `Location` resolved against this URL.
    fn join(&self, location: &str) -> Result<Url, HttpError> {
        if location.contains("://") {
            return Url::parse(location);
        }
        let mut joined = self.clone();
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", scheme_name(&self.scheme)));
        }
        joined.path = if location.starts_with('/') {
            location.split('#').next().unwrap_or("/").to_string()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{}", location.split('#').next().unwrap_or_default())
        };
        Ok(joined)
    }

    fn origin(&self) -> (String, String) {
        (
            scheme_name(&self.scheme).to_string(),
            self.authority.to_ascii_lowercase(),
        )
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}",
            scheme_name(&self.scheme),
            self.authority,
            self.path
        )
    }
}

fn scheme_name(scheme: &Scheme) -> &str {
    match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
        Scheme::Other(other) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
            request: "POST http://erp/sales-orders".into(),
        }
    }

    fn class(result: Result<Response, HandlerError>) -> (&'static str, String, Option<u64>) {
        match result {
            Ok(_) => ("ok", String::new(), None),
            Err(HandlerError::Transient(t)) => ("transient", t.reason, t.retry_after_ms),
            Err(HandlerError::Permanent(m)) => ("permanent", m, None),
            Err(HandlerError::NeedsHuman(m)) => ("needs-human", m, None),
        }
    }

    #[test]
    fn statuses_are_classified() {
        for status in [200, 201, 204] {
            assert_eq!(class(classify(answer(status, &[], ""))).0, "ok");
        }
        for status in [408, 425, 429, 500, 502, 503] {
            assert_eq!(
                class(classify(answer(status, &[], ""))).0,
                "transient",
                "{status}"
            );
        }
        for status in [400, 401, 404, 409, 422, 304] {
            assert_eq!(
                class(classify(answer(status, &[], ""))).0,
                "permanent",
                "{status}"
            );
        }
        let (_, message, _) = class(classify(answer(
            400,
            &[],
            "{\"error\":\"no\nsuch customer\"}",
        )));
        assert_eq!(
            message,
            "POST http://erp/sales-orders answered 400: {\"error\":\"no such customer\"}"
        );
        let long = "x".repeat(1000);
        let (_, message, _) = class(classify(answer(422, &[], &long)));
        assert!(message.len() < 400 && message.ends_with('…'), "{message}");
    }

    #[test]
    fn retry_after_becomes_the_retry_delay() {
        let (class_, _, after) = class(classify(answer(429, &[("retry-after", "2")], "slow down")));
        assert_eq!((class_, after), ("transient", Some(2_000)));
        let (_, _, after) = class(classify(answer(503, &[("Retry-After", " 30 ")], "")));
        assert_eq!(after, Some(30_000));
        let (_, _, after) = class(classify(answer(500, &[("retry-after", "soon")], "")));
        assert_eq!(after, None);
    }

    #[test]
    fn urls_split_and_join() {
        let url = Url::parse("https://erp.example.com:8443/api/orders?x=1#frag").expect("url");
        assert_eq!(url.authority, "erp.example.com:8443");
        assert_eq!(url.path, "/api/orders?x=1");
        assert_eq!(Url::parse("http://h").expect("url").path, "/");
        assert_eq!(Url::parse("http://h?q").expect("url").path, "/?q");
        assert!(Url::parse("erp.example.com/x").is_err());
        assert!(Url::parse("ftp://h/x").is_err());
        assert_eq!(
            url.join("/v2/o").expect("join").to_string(),
            "https://erp.example.com:8443/v2/o"
        );
        assert_eq!(
            url.join("other").expect("join").to_string(),
            "https://erp.example.com:8443/api/other"
        );
        assert_eq!(
            url.join("http://x:1/y").expect("join").to_string(),
            "http://x:1/y"
        );
        assert_eq!(
            url.join("//cdn/z").expect("join").to_string(),
            "https://cdn/z"
        );
    }

    #[test]
    fn denied_and_invalid_are_permanent_the_rest_transient() {
        assert_eq!(
            class(Err(HttpError::Denied("d".into()).into())).0,
            "permanent"
        );
        assert_eq!(
            class(Err(HttpError::Invalid("i".into()).into())).0,
            "permanent"
        );
        for error in [
            HttpError::Timeout("t".into()),
            HttpError::TooLarge("l".into()),
            HttpError::Limit("m".into()),
            HttpError::Failed("f".into()),
        ] {
            assert_eq!(class(Err(error.into())).0, "transient");
        }
    }
}
