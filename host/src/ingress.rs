//! The HTTP face providers reach: `POST /webhooks/{provider}`, `/healthz`,
//! `/readyz` (metrics are on the admin listener, see [`crate::admin`]).
//!
//! A webhook goes through verify → extract → publish; each step is a plain
//! function of the modules beside this one, and every way it can end maps to
//! exactly one answer of DESIGN.md's table through [`ApiError`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use tracing::{Instrument, field, info, info_span, warn};

use crate::config::Provider;
use crate::extract::{ExtractError, extract, idempotency_key};
use crate::headers::TRACEPARENT;
use crate::logging::clip;
use crate::metrics::Metrics;
use crate::publish::{Inbound, PublishError, Publisher, Receipt, Stored};
use crate::streams;
use crate::subject::limits::TooLong;
use crate::telemetry::{self, KeyValue, SpanKind, Trace, names};

/// The header a caller may set to choose the correlation id.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// Everything a request needs; shared by all requests.
#[derive(Debug)]
pub struct Ingress {
    /// Providers by name.
    pub providers: BTreeMap<String, Provider>,
    /// Stores events.
    pub publisher: Publisher,
    /// The NATS client, for readiness.
    pub client: async_nats::Client,
    /// Metrics.
    pub metrics: Metrics,
    /// Largest accepted body.
    pub max_body_bytes: usize,
    /// `Retry-After` with a 503.
    pub retry_after: Duration,
    /// Whether the outbox relays reach their databases.
    pub outbox: crate::outbox::Health,
}

/// The router of the host's HTTP API.
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new()
        .route("/webhooks/{provider}", post(webhook))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ingress)
}

/// Why a webhook was not stored, as the provider sees it. Internal details
/// (NATS errors) are logged, never answered.
#[derive(Debug)]
pub enum ApiError {
    /// 404: no such provider.
    UnknownProvider,
    /// 413: body over the limit.
    TooLarge(usize),
    /// 413: body and headers over what the event store takes in one
    /// message (its `max_payload`).
    TooLargeToStore {
        /// Body plus headers.
        size: usize,
        /// The server's `max_payload`.
        max_payload: usize,
    },
    /// 400: the body could not be read.
    BadBody,
    /// 401: signature or timestamp refused.
    Unauthorized(crate::verify::VerifyError),
    /// 422: a required field cannot be read.
    Unprocessable(ExtractError),
    /// 422: a field is longer than NATS can carry.
    FieldTooLong(TooLong),
    /// 503: JetStream unavailable or too slow.
    Unavailable(Duration),
}

impl ApiError {
    /// The metrics label.
    fn reason(&self) -> &'static str {
        match self {
            ApiError::UnknownProvider => "unknown_provider",
            ApiError::TooLarge(_) | ApiError::TooLargeToStore { .. } => "too_large",
            ApiError::BadBody => "bad_body",
            ApiError::Unauthorized(e) => e.label(),
            ApiError::Unprocessable(_) | ApiError::FieldTooLong(_) => "unprocessable",
            ApiError::Unavailable(_) => "unavailable",
        }
    }
}

#[derive(Serialize)]
struct Refusal<'a> {
    status: &'a str,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, field) = match &self {
            ApiError::UnknownProvider => {
                (StatusCode::NOT_FOUND, "unknown provider".to_string(), None)
            }
            ApiError::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body larger than {limit} bytes"),
                None,
            ),
            ApiError::TooLargeToStore { size, max_payload } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "event is {size} bytes with its headers; the event store takes at most {max_payload}"
                ),
                None,
            ),
            ApiError::BadBody => (
                StatusCode::BAD_REQUEST,
                "body could not be read".into(),
                None,
            ),
            ApiError::Unauthorized(e) => (StatusCode::UNAUTHORIZED, e.to_string(), None),
            ApiError::Unprocessable(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                e.to_string(),
                Some(e.field()),
            ),
            ApiError::FieldTooLong(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                e.to_string(),
                Some(e.field),
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "event store unavailable; retry later".into(),
                None,
            ),
        };
        let body = Refusal {
            status: if status == StatusCode::SERVICE_UNAVAILABLE {
                "unavailable"
            } else {
                "rejected"
            },
            error,
            field,
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection ends after
            // the answer (the edge reads what the client still sends, so
            // it reads the 413 rather than a reset).
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ApiError::Unavailable(retry_after) = self {
            let secs = retry_after.as_secs().max(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[derive(Serialize)]
struct Answer<'a> {
    status: &'a str,
    #[serde(flatten)]
    receipt: &'a Receipt,
}

async fn webhook(
    State(ingress): State<Arc<Ingress>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let correlation_id = correlation_id(&headers);
    let span = info_span!("webhook", provider = %clip(&provider), %correlation_id, trace_id = field::Empty);
    let trace = request_span(&headers, &provider, &correlation_id);
    if let Some(trace_id) = trace.trace_id() {
        span.record(crate::logging::TRACE_ID, trace_id.as_str());
    }
    let _in_flight = ingress.metrics.in_flight();
    let mut response = async {
        match receive(&ingress, &provider, &headers, body, &correlation_id, &trace).await {
            Ok(response) => response,
            Err(error) => {
                let label = if ingress.providers.contains_key(&provider) {
                    provider.as_str()
                } else {
                    "unknown"
                };
                ingress.metrics.rejected(label, error.reason());
                info!(reason = error.reason(), "webhook refused");
                error.into_response()
            }
        }
    }
    .instrument(span)
    .await;
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_HEADER, value);
    }
    let status = response.status();
    trace.set(|| {
        vec![KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        )]
    });
    if status.is_server_error() {
        trace.fail(|| format!("HTTP {}", status.as_u16()));
    }
    trace.end();
    response
}

/// The server span of a webhook request, continuing the provider's trace
/// when it sent a `traceparent` (empty when tracing is off).
fn request_span(headers: &HeaderMap, provider: &str, correlation_id: &str) -> Trace {
    if !telemetry::enabled() {
        return Trace::off();
    }
    let given = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    Trace::start("POST /webhooks/{provider}", SpanKind::Server, given, || {
        let provider = telemetry::clip(provider, 64);
        vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("http.route", "/webhooks/{provider}"),
            KeyValue::new("url.path", format!("/webhooks/{provider}")),
            KeyValue::new("hookmesh.provider", provider),
            KeyValue::new("hookmesh.correlation_id", correlation_id.to_string()),
        ]
    })
}

/// The producer span of storing an event: its `traceparent` is what the
/// stored event carries, so the handlers' spans hang under it.
fn publish_span(trace: &Trace, provider: &str, idempotency_key: &str) -> Trace {
    trace.child(names::PUBLISH, SpanKind::Producer, || {
        vec![
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("hookmesh.provider", provider.to_string()),
            KeyValue::new("hookmesh.idempotency_key", idempotency_key.to_string()),
        ]
    })
}

async fn receive(
    ingress: &Ingress,
    name: &str,
    headers: &HeaderMap,
    body: Body,
    correlation_id: &str,
    trace: &Trace,
) -> Result<Response, ApiError> {
    let provider = ingress
        .providers
        .get(name)
        .ok_or(ApiError::UnknownProvider)?;
    let body = read_body(body, headers, ingress.max_body_bytes).await?;
    let received_at = SystemTime::now();
    let verified = provider
        .verifier
        .verify(headers, &body, received_at)
        .map_err(ApiError::Unauthorized)?;
    let fields = extract(&provider.fields, headers, &body).map_err(ApiError::Unprocessable)?;
    let idempotency_key = idempotency_key(&provider.name, &fields, &body);
    let publish = publish_span(trace, &provider.name, &idempotency_key);
    let event = Inbound {
        provider: provider.name.clone(),
        idempotency_key,
        fields,
        correlation_id: correlation_id.to_string(),
        traceparent: publish
            .traceparent()
            .unwrap_or_else(|| traceparent(headers)),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        received_at,
        body,
    };
    let started = Instant::now();
    let stored = ingress.publisher.store(&event).await;
    ingress.metrics.publish_took(started.elapsed());
    if let Ok(Stored::Accepted(receipt) | Stored::Duplicate(receipt)) = &stored {
        let duplicate = matches!(stored, Ok(Stored::Duplicate(_)));
        publish.set(|| {
            vec![
                KeyValue::new("messaging.destination.name", receipt.subject.clone()),
                KeyValue::new("hookmesh.subject", receipt.subject.clone()),
                KeyValue::new(
                    "hookmesh.stream_seq",
                    i64::try_from(receipt.stream_seq).unwrap_or(i64::MAX),
                ),
                KeyValue::new("hookmesh.duplicate", duplicate),
            ]
        });
    }
    publish.end_with(&stored);
    let (status, label, receipt) = match stored {
        Ok(Stored::Accepted(receipt)) => {
            ingress.metrics.accepted(name);
            (StatusCode::ACCEPTED, "accepted", receipt)
        }
        Ok(Stored::Duplicate(receipt)) => {
            ingress.metrics.duplicate(name);
            (StatusCode::OK, "duplicate", receipt)
        }
        Err(PublishError::TooLong(error)) => return Err(ApiError::FieldTooLong(error)),
        Err(PublishError::TooLarge { size, max_payload }) => {
            return Err(ApiError::TooLargeToStore { size, max_payload });
        }
        Err(error) => {
            warn!(%error, idempotency_key = %clip(&event.idempotency_key), "event not stored");
            return Err(ApiError::Unavailable(ingress.retry_after));
        }
    };
    info!(
        status = label,
        subject = %clip(&receipt.subject),
        stream_seq = receipt.stream_seq,
        idempotency_key = %clip(&receipt.idempotency_key),
        signing_key = verified.key_index,
        "webhook {label}"
    );
    Ok((
        status,
        axum::Json(Answer {
            status: label,
            receipt: &receipt,
        }),
    )
        .into_response())
}

/// Reads the body, refusing more than `limit` bytes — early from
/// `Content-Length` when the client sends one.
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ApiError::TooLarge(limit)),
        Err(_) => Err(ApiError::BadBody),
    }
}

/// The caller's correlation id when it is a sane token (visible ASCII, at
/// most 128 bytes), else a new UUIDv7 (time-ordered, so ids sort by arrival).
fn correlation_id(headers: &HeaderMap) -> String {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// The caller's W3C `traceparent` when well-formed, else a new trace.
fn traceparent(headers: &HeaderMap) -> String {
    let given = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok());
    match given {
        Some(tp) if crate::headers::is_traceparent(tp) => tp.to_string(),
        _ => crate::headers::new_traceparent(),
    }
}

async fn readyz(State(ingress): State<Arc<Ingress>>) -> Response {
    readiness(&ingress.client, &ingress.outbox).await
}

/// `/readyz` of both listeners: 200 when NATS is connected, every outbox
/// relay works with its database and every stream is present, else 503
/// saying why.
pub async fn readiness(client: &async_nats::Client, outbox: &crate::outbox::Health) -> Response {
    if client.connection_state() != async_nats::connection::State::Connected {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: NATS is not connected\n",
        )
            .into_response();
    }
    let problems = outbox.problems();
    if !problems.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", problems.join("; ")),
        )
            .into_response();
    }
    let js = async_nats::jetstream::new(client.clone());
    match tokio::time::timeout(Duration::from_secs(2), streams::present(&js)).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: JetStream did not answer\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_taken_only_when_sane() {
        let mut headers = HeaderMap::new();
        headers.insert(CORRELATION_HEADER, HeaderValue::from_static("req-42"));
        assert_eq!(correlation_id(&headers), "req-42");
        headers.insert(CORRELATION_HEADER, HeaderValue::from_static("has space"));
        assert_ne!(correlation_id(&headers), "has space");
        assert_eq!(correlation_id(&HeaderMap::new()).len(), 36);
    }

    #[test]
    fn traceparent_is_kept_when_valid() {
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_static(valid));
        assert_eq!(traceparent(&headers), valid);
        headers.insert("traceparent", HeaderValue::from_static("00-xyz-01"));
        assert!(crate::headers::is_traceparent(&traceparent(&headers)));
        assert_ne!(traceparent(&headers), "00-xyz-01");
    }
}
