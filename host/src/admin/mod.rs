//! The admin listener (`[admin] listen`, default `127.0.0.1:9464`): what
//! operators and their tools reach, apart from the providers' webhook
//! listener — `/metrics`, `/healthz`, `/readyz` and the console.
//!
//! Reading needs nothing; changing state (the console's replay and purge)
//! needs `[admin] token`, sent with the form, and is audited with the
//! console as the actor. Nothing changes state on a GET.
//!
//! - [`auth`]: the token check and the actor a console action is recorded as.
//! - [`console`]: the operator pages.

pub mod auth;
pub mod console;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::config::Redacted;
use crate::metrics::Metrics;

/// What the admin routes share.
#[derive(Debug)]
pub struct Admin {
    /// The host's NATS connection (readiness, the console's reads, replays).
    pub client: async_nats::Client,
    /// The host's metrics.
    pub metrics: Metrics,
    /// `[admin] token`; without one nothing can change state here.
    pub token: Option<Redacted>,
    /// Whether the outbox relays reach their databases (readiness).
    pub outbox: crate::outbox::Health,
}

/// The admin listener's routes.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(console::router())
        .with_state(admin)
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    crate::ingress::readiness(&admin.client, &admin.outbox).await
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        admin.metrics.render(),
    )
        .into_response()
}
