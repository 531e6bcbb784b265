//! The operator console at `/console`: the overview `hookmesh status`
//! prints, the dead-letter queue with filters, one entry's failure record,
//! headers and payload, and replay and purge.
//!
//! Pages are rendered on the server (see [`pages`]) and reload themselves
//! where they show live state (a few lines of `console.js`). Replay and
//! purge are POSTs that carry the admin token and go through the same
//! functions as `hookmesh dlq replay` and `purge`
//! ([`crate::dlq::commands::replay_entry`], [`crate::dlq::commands::purge_entries`]),
//! audited with the actor `console` or `console:<name>`. Every answer
//! carries a strict Content-Security-Policy: no inline script or style, no
//! framing, forms posting only here.

pub mod pages;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use maud::Markup;
use serde::Deserialize;
use tracing::{info, warn};

use super::Admin;
use super::auth::{self, Refusal};
use crate::dlq::commands::{purge_entries, replay_entry};
use crate::dlq::store::{self, Selection};
use crate::dlq::{DlqError, DlqReason};
use crate::status;
use pages::Filters;

/// The policy every console answer carries.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

/// The console's routes.
pub fn router() -> Router<Arc<Admin>> {
    Router::new()
        .route("/console", get(overview))
        .route("/console/dlq", get(dlq_list))
        .route("/console/dlq/{seq}", get(dlq_entry))
        .route("/console/dlq/{seq}/replay", post(replay))
        .route("/console/dlq/{seq}/purge", post(purge))
        .route(
            "/console/assets/console.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/console/assets/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .layer(middleware::map_response(secure))
}

/// The headers that keep the pages to themselves.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = |name, value: &'static str| (name, HeaderValue::from_static(value));
    for (name, value) in [
        set(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        set(header::X_FRAME_OPTIONS, "DENY"),
        set(header::REFERRER_POLICY, "no-referrer"),
        set(header::CACHE_CONTROL, "no-store"),
    ] {
        headers.insert(name, value);
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn page(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

async fn overview(State(admin): State<Arc<Admin>>) -> Response {
    match status::collect(&admin.client, status::RECENT_AUDIT).await {
        Ok(snapshot) => page(StatusCode::OK, pages::overview(&snapshot)),
        Err(error) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::problem("Overview", &format!("NATS does not answer: {error}")),
        ),
    }
}

fn js(admin: &Admin) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(admin.client.clone())
}

/// A filter value: `None` when empty.
fn given(value: &str) -> Option<String> {
    Some(value.trim().to_string()).filter(|v| !v.is_empty())
}

/// The selection a filter form asks for, or what is wrong with it.
fn selection(filters: &Filters) -> Result<Selection, String> {
    let duration = |what: &str, value: &str| -> Result<Option<Duration>, String> {
        given(value)
            .map(|v| {
                humantime::parse_duration(&v)
                    .map_err(|_| format!("{what}: {v:?} is not a duration like 30m, 2h or 7d"))
            })
            .transpose()
    };
    let reason = given(&filters.reason);
    if let Some(reason) = &reason
        && DlqReason::parse(reason).is_none()
    {
        return Err(format!("reason: {reason:?} is not a dead-letter reason"));
    }
    Ok(Selection {
        handler: given(&filters.handler),
        reason,
        since: duration("newer than", &filters.newer)?,
        older_than: duration("older than", &filters.older)?,
        entity: None,
    })
}

async fn dlq_list(State(admin): State<Arc<Admin>>, Query(filters): Query<Filters>) -> Response {
    let js = js(&admin);
    // The handler choice lists every handler with entries, whatever the filter.
    let handlers: Vec<String> = match store::depths(&js).await {
        Ok(depths) => depths.into_keys().collect(),
        Err(error) => {
            return page(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::problem("Dead letters", &error.to_string()),
            );
        }
    };
    let selection = match selection(&filters) {
        Ok(selection) => selection,
        Err(message) => {
            return page(
                StatusCode::BAD_REQUEST,
                pages::dlq_list(&[], &filters, &handlers, Some(&message)),
            );
        }
    };
    match store::list(&js, &selection).await {
        Ok(entries) => page(
            StatusCode::OK,
            pages::dlq_list(&entries, &filters, &handlers, None),
        ),
        Err(error) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::problem("Dead letters", &error.to_string()),
        ),
    }
}

async fn dlq_entry(State(admin): State<Arc<Admin>>, Path(seq): Path<u64>) -> Response {
    match store::get(&js(&admin), seq).await {
        Ok(entry) => page(
            StatusCode::OK,
            pages::dlq_entry(&entry, admin.token.is_some()),
        ),
        Err(error) => dlq_error(&format!("Dead letter {seq}"), &error),
    }
}

fn dlq_error(title: &str, error: &DlqError) -> Response {
    let status = match error {
        DlqError::NotFound(_) => StatusCode::NOT_FOUND,
        DlqError::Busy { .. } => StatusCode::CONFLICT,
        _ => StatusCode::BAD_GATEWAY,
    };
    page(status, pages::problem(title, &error.to_string()))
}

fn refused(title: &str, refusal: Refusal, seq: u64) -> Response {
    let status = match refusal {
        Refusal::NotConfigured => StatusCode::FORBIDDEN,
        Refusal::WrongToken => StatusCode::UNAUTHORIZED,
    };
    page(
        status,
        pages::outcome(title, false, &format!("Refused: {refusal}."), seq),
    )
}

/// The replay form.
#[derive(Debug, Deserialize)]
struct ReplayForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: Option<String>,
    /// `on` when the payload below replaces the stored one.
    #[serde(default)]
    edited: Option<String>,
    #[serde(default)]
    payload: Option<String>,
}

async fn replay(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<u64>,
    Form(form): Form<ReplayForm>,
) -> Response {
    let title = format!("Replay of dead letter {seq}");
    if let Err(refusal) = auth::check(admin.token.as_ref(), &form.token) {
        warn!(dlq_seq = seq, %refusal, "console replay refused");
        return refused(&title, refusal, seq);
    }
    let actor = auth::actor(form.name.as_deref());
    // Browsers send a textarea's line breaks as CRLF.
    let payload = (form.edited.as_deref() == Some("on"))
        .then(|| Bytes::from(form.payload.unwrap_or_default().replace("\r\n", "\n")));
    let entry = match store::get(&js(&admin), seq).await {
        Ok(entry) => entry,
        Err(error) => return dlq_error(&title, &error),
    };
    info!(dlq_seq = seq, handler = %entry.handler, %actor, fixed_payload = payload.is_some(), "console replay");
    match replay_entry(&admin.client, &entry, payload, &actor).await {
        Ok(outcome) if outcome.ok => page(
            StatusCode::OK,
            pages::outcome(
                &title,
                true,
                &format!(
                    "Replayed on {} version {}: ok, the entry is removed{}.",
                    entry.handler,
                    outcome.version,
                    if outcome.released {
                        "; the entity's parked events are released"
                    } else {
                        ""
                    }
                ),
                seq,
            ),
        ),
        Ok(outcome) => page(
            StatusCode::OK,
            pages::outcome(
                &title,
                false,
                &format!(
                    "Replayed on {} version {}: failed again: {}. Kept as dead letter {}.",
                    entry.handler,
                    outcome.version,
                    outcome.error.as_deref().unwrap_or("?"),
                    outcome.new_dlq_seq.unwrap_or(seq)
                ),
                outcome.new_dlq_seq.unwrap_or(seq),
            ),
        ),
        Err(error) => dlq_error(&title, &error),
    }
}

/// The purge form.
#[derive(Debug, Deserialize)]
struct PurgeForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

async fn purge(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<u64>,
    Form(form): Form<PurgeForm>,
) -> Response {
    let title = format!("Purge of dead letter {seq}");
    if let Err(refusal) = auth::check(admin.token.as_ref(), &form.token) {
        warn!(dlq_seq = seq, %refusal, "console purge refused");
        return refused(&title, refusal, seq);
    }
    if form.confirm.as_deref() != Some("yes") {
        return page(
            StatusCode::BAD_REQUEST,
            pages::outcome(&title, false, "Not confirmed: nothing purged.", seq),
        );
    }
    let actor = auth::actor(form.name.as_deref());
    let js = js(&admin);
    let entry = match store::get(&js, seq).await {
        Ok(entry) => entry,
        Err(error) => return dlq_error(&title, &error),
    };
    info!(dlq_seq = seq, handler = %entry.handler, %actor, "console purge");
    match purge_entries(&js, std::slice::from_ref(&entry), &actor).await {
        Ok(report) if report.purged.contains(&seq) => page(
            StatusCode::OK,
            pages::outcome(&title, true, "Purged: the entry is deleted.", seq),
        ),
        Ok(report) => {
            let why = report
                .failed
                .first()
                .map_or("not purged".to_string(), |(_, error)| error.clone());
            page(
                StatusCode::CONFLICT,
                pages::outcome(&title, false, &format!("Not purged: {why}."), seq),
            )
        }
        Err(error) => page(
            StatusCode::BAD_GATEWAY,
            pages::outcome(&title, false, &format!("Not purged: {error:#}."), seq),
        ),
    }
}
