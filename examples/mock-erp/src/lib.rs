//! A small ERP for developing and testing hookmesh handlers: a real HTTP
//! server (on loopback by default) that keeps sales orders and credit
//! notes in memory, honours `Idempotency-Key` — a repeated key gets the
//! first answer again, with no second effect — and can be told to fail.
//!
//! # The API
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /sales-orders` `{crm_order_id, customer_id, payment_terms, total, currency?, version}` | 201 the new sales order (`{"id": "SO-000001", …}`), or 200 the existing one for that `crm_order_id` (updated when `version` is not older); 422 naming missing fields |
//! | `GET /sales-orders`, `GET /sales-orders/{id}` | the orders; one (404 if unknown) |
//! | `POST /credit-notes` `{sales_order_id, return_id?, amount?, reason?}` | 201 `{"id": "CN-000001", …}`; 422 for an unknown sales order |
//! | `GET /credit-notes` | the credit notes |
//!
//! A `POST` carrying an `Idempotency-Key` it has answered before gets that
//! first answer again (with `Idempotent-Replayed: true`), and changes
//! nothing; the same key on a different request is a 422.
//!
//! # Telling it to fail
//!
//! | request | does |
//! | --- | --- |
//! | `POST /_mock/faults` [`Fault`] (or a list) | queues faults: e.g. `{"path": "/sales-orders", "status": 500, "times": 2}`, `{"status": 429, "retry_after": "2"}`, `{"status": 400, "body": {"error": "credit limit"}}`, `{"delay_ms": 5000}` (handled, then answered 5 s late), `{"status": 307, "location": "http://…"}` |
//! | `DELETE /_mock/faults` | drops the queued faults |
//! | `POST /_mock/reset` | forgets everything |
//! | `GET /_mock/requests` | every request seen ([`Seen`]: method, path, `Idempotency-Key`, `traceparent`, `X-Correlation-Id`, status answered, whether it was a replay) |
//!
//! A faulted request is answered before the idempotency check — as an ERP
//! whose front door fails — so its key stays unused and a retry with the
//! same key is handled.
//!
//! Tests start it in-process with [`MockErp::start`] on `127.0.0.1:0` and
//! reach its data through [`MockErp::erp`]; `hookmesh up` starts the
//! binary (`hookmesh-mock-erp --listen 127.0.0.1:8090`).

#![deny(missing_docs)]

mod erp;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use erp::{Answer, Books, CreditNote, Erp, Fault, Incoming, Plan, SalesOrder, Seen};

/// The address the binary listens on unless told otherwise, and the one
/// the shipped handler manifests call (`erp_url`).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

/// A running mock ERP; stopped when dropped.
#[derive(Debug)]
pub struct MockErp {
    address: SocketAddr,
    erp: Arc<Erp>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl MockErp {
    /// Listens on `listen` (`127.0.0.1:0` picks a free port) and serves
    /// until stopped.
    pub async fn start(listen: &str) -> std::io::Result<MockErp> {
        let listener = TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let erp = Arc::new(Erp::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, erp.clone(), async {
            let _ = stopped.await;
        }));
        Ok(MockErp {
            address,
            erp,
            stop: Some(stop),
            task,
        })
    }

    /// `http://<address>`, what a manifest's `erp_url` names.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its data: orders, credit notes, faults, the requests seen.
    pub fn erp(&self) -> &Arc<Erp> {
        &self.erp
    }

    /// Stops serving and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockErp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `erp` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    erp: Arc<Erp>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Answers go out at once (no Nagle delay behind a client's delayed
    // ack), as from any ERP worth measuring against.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(erp))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The routes.
pub fn router(erp: Arc<Erp>) -> Router {
    Router::new()
        .route("/sales-orders", post(write).get(list_orders))
        .route("/sales-orders/{id}", get(one_order))
        .route("/credit-notes", post(write).get(list_credit_notes))
        .route("/_mock/faults", post(add_faults).delete(clear_faults))
        .route("/_mock/reset", post(reset))
        .route("/_mock/requests", get(requests))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(erp)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `POST /sales-orders` and `POST /credit-notes`: the scripted fault
/// first, then the write, once per idempotency key.
async fn write(
    State(erp): State<Arc<Erp>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let incoming = Incoming {
        method: method.to_string(),
        path: path.clone(),
        idempotency_key: header(&headers, "idempotency-key"),
        traceparent: header(&headers, "traceparent"),
        correlation_id: header(&headers, "x-correlation-id"),
        authorization: header(&headers, "authorization"),
    };
    // Recorded when handled, before any delay: a request whose answer is
    // held back (and maybe never sent) is in the log all the same.
    let (answer, delay) = match erp.plan(&path) {
        Plan::Fail(answer, delay) => (answer, delay),
        Plan::Handle(delay) => {
            let answer = match serde_json::from_slice::<Value>(&body) {
                Err(e) => Answer::error(400, format!("the body is not JSON: {e}")),
                Ok(json) => {
                    let request = (method.to_string(), path.clone(), json.clone());
                    erp.once_per_key(incoming.idempotency_key.as_deref(), request, |books| {
                        if path == "/credit-notes" {
                            books.credit(&json)
                        } else {
                            books.upsert_order(&json)
                        }
                    })
                }
            };
            (answer, delay)
        }
    };
    erp.saw(&incoming, &answer);
    // Only a scripted delay waits: even a zero sleep waits for the timer's
    // next millisecond tick.
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    respond(answer)
}

fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(answer.body)).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("retry-after", answer.retry_after),
        ("location", answer.location),
        (
            "idempotent-replayed",
            answer.replayed.then(|| "true".into()),
        ),
    ] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    }
    response
}

async fn list_orders(State(erp): State<Arc<Erp>>) -> axum::Json<Vec<SalesOrder>> {
    axum::Json(erp.sales_orders())
}

async fn one_order(State(erp): State<Arc<Erp>>, Path(id): Path<String>) -> Response {
    match erp.order(&id) {
        Some(order) => axum::Json(order).into_response(),
        None => respond(Answer::error(404, format!("no sales order {id}"))),
    }
}

async fn list_credit_notes(State(erp): State<Arc<Erp>>) -> axum::Json<Vec<CreditNote>> {
    axum::Json(erp.credit_notes())
}

async fn add_faults(State(erp): State<Arc<Erp>>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Fault),
        Many(Vec<Fault>),
    }
    match serde_json::from_slice::<OneOrMany>(&body) {
        Ok(OneOrMany::One(fault)) => erp.script(fault),
        Ok(OneOrMany::Many(faults)) => faults.into_iter().for_each(|f| erp.script(f)),
        Err(e) => return respond(Answer::error(400, format!("not a fault: {e}"))),
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(erp): State<Arc<Erp>>) -> StatusCode {
    erp.clear_faults();
    StatusCode::NO_CONTENT
}

async fn reset(State(erp): State<Arc<Erp>>) -> StatusCode {
    erp.reset();
    StatusCode::NO_CONTENT
}

async fn requests(State(erp): State<Arc<Erp>>) -> axum::Json<Vec<Seen>> {
    axum::Json(erp.requests())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn over_http_a_key_is_answered_once_and_faults_come_first() {
        let mock = MockErp::start("127.0.0.1:0").await.expect("listens");
        let http = reqwest::Client::new();
        let order = json!({"crm_order_id": "ORD-1", "customer_id": "C", "payment_terms": "NET30", "total": "1", "version": 1});
        let fault = json!({"path": "/sales-orders", "status": 503, "retry_after": "2"});
        let scripted = http
            .post(format!("{}/_mock/faults", mock.url()))
            .json(&fault)
            .send()
            .await
            .expect("script");
        assert_eq!(scripted.status(), 204);
        let post = || {
            http.post(format!("{}/sales-orders", mock.url()))
                .header("idempotency-key", "k-1")
                .json(&order)
                .send()
        };
        let failed = post().await.expect("answer");
        assert_eq!(failed.status(), 503);
        assert_eq!(failed.headers()["retry-after"], "2");
        let created = post().await.expect("answer");
        assert_eq!(created.status(), 201);
        let again = post().await.expect("answer");
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(
            again.json::<Value>().await.expect("json")["id"],
            "SO-000001"
        );
        assert_eq!(mock.erp().sales_orders().len(), 1);
        let seen = mock.erp().requests();
        assert_eq!(
            seen.iter()
                .map(|s| (s.status, s.replayed))
                .collect::<Vec<_>>(),
            [(503, false), (201, false), (201, true)]
        );
        assert!(
            seen.iter()
                .all(|s| s.request.idempotency_key.as_deref() == Some("k-1"))
        );
        mock.stop().await;
    }
}
