//! Everything a hookmesh guest handler needs, in one place: the bindings for
//! the `hookmesh:handler` world (generated once, here, from `../../wit`) and
//! a few helpers that keep handlers short.
//!
//! # Layout
//!
//! - [`bindings`]: the generated code (hidden; use the re-exports).
//! - Re-exports: [`Guest`] (implement it), [`export!`] (register the
//!   implementation), [`Event`], [`HandlerError`] and the host interfaces
//!   [`log`], [`state`], [`mapping`], [`outbox`], [`config`].
//! - [`http`]: outgoing HTTP to the hosts the manifest allows, and
//!   [`http::classify`] (2xx ok, 408/425/429/5xx transient with the
//!   `Retry-After`, other statuses permanent).
//! - Helpers: error constructors ([`transient`], [`transient_after`],
//!   [`permanent`], [`needs_human`]), logging ([`log_info`] …),
//!   configuration ([`config_or`], [`require_config`]), JSON payloads ([`payload_json`],
//!   [`str_at`], [`require_str`], [`emit_json`]) and `?`-friendly
//!   conversions from [`StateError`], [`MappingError`], [`OutboxError`] and
//!   [`http::HttpError`] into [`HandlerError`].
//!
//! # A handler
//!
//! ```ignore
//! use hookmesh_guest::{Event, Guest, HandlerError, export};
//!
//! struct Handler;
//!
//! impl Guest for Handler {
//!     fn handle(event: Event) -> Result<(), HandlerError> {
//!         hookmesh_guest::log_info(&format!("got {}", event.event_type));
//!         Ok(())
//!     }
//! }
//!
//! export!(Handler);
//! ```
//!
//! The handler crate is a `cdylib`; `export!` emits the `handle` export and
//! the component-type section, and `cargo build --target wasm32-wasip2`
//! turns the result into a component.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "../../wit",
        // Handler crates call `hookmesh_guest::export!(Type)`: the macro is
        // exported from this crate and finds the generated glue here.
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "hookmesh_guest::bindings",
    });
}

pub mod http;

use std::time::Duration;

pub use bindings::export;
pub use bindings::hookmesh::handler::types::TransientError;
pub use bindings::hookmesh::handler::{config, log, mapping, outbox, state};
pub use bindings::{Event, Guest, HandlerError};
pub use log::Level;
pub use mapping::MappingError;
pub use outbox::OutboxError;
pub use state::{Entry, StateError};

/// Re-exported so handlers need not depend on `serde_json` themselves.
pub use serde_json;

/// A failure worth retrying, after the manifest's backoff.
pub fn transient(reason: impl Into<String>) -> HandlerError {
    HandlerError::Transient(TransientError {
        reason: reason.into(),
        retry_after_ms: None,
    })
}

/// A failure worth retrying after `delay` (an HTTP `Retry-After`); the host
/// keeps the delay within the manifest's backoff `initial` … `max`.
pub fn transient_after(reason: impl Into<String>, delay: Duration) -> HandlerError {
    HandlerError::Transient(TransientError {
        reason: reason.into(),
        retry_after_ms: Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)),
    })
}

/// A failure that retrying cannot fix: dead-lettered at once.
pub fn permanent(reason: impl Into<String>) -> HandlerError {
    HandlerError::Permanent(reason.into())
}

/// A failure a person must fix first: dead-lettered at once, flagged.
pub fn needs_human(reason: impl Into<String>) -> HandlerError {
    HandlerError::NeedsHuman(reason.into())
}

/// Logs at `trace`.
pub fn log_trace(message: &str) {
    log::log(Level::Trace, message);
}

/// Logs at `debug`.
pub fn log_debug(message: &str) {
    log::log(Level::Debug, message);
}

/// Logs at `info`.
pub fn log_info(message: &str) {
    log::log(Level::Info, message);
}

/// Logs at `warn`.
pub fn log_warn(message: &str) {
    log::log(Level::Warn, message);
}

/// Logs at `error`.
pub fn log_error(message: &str) {
    log::log(Level::Error, message);
}

/// The manifest's `[config]` value for `key`, or `default` when unset.
pub fn config_or(key: &str, default: &str) -> String {
    config::get(key).unwrap_or_else(|| default.to_owned())
}

/// The manifest's `[config]` value for `key`; unset is a `permanent`
/// error naming it (deploy a manifest that sets it, then replay).
pub fn require_config(key: &str) -> Result<String, HandlerError> {
    config::get(key).ok_or_else(|| permanent(format!("the manifest's [config] has no {key}")))
}

/// The payload parsed as JSON; not JSON is a `permanent` error.
pub fn payload_json(event: &Event) -> Result<serde_json::Value, HandlerError> {
    serde_json::from_slice(&event.payload)
        .map_err(|err| permanent(format!("payload is not JSON: {err}")))
}

/// The non-empty string at a JSON pointer (`/data/customer/id`). A number is
/// accepted too and returned as its text (`129.9` → `"129.9"`), so amounts
/// and ids survive either encoding.
pub fn str_at(value: &serde_json::Value, pointer: &str) -> Option<String> {
    match value.pointer(pointer)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Like [`str_at`], but a missing or empty field is a `permanent` error that
/// names it in dotted form (`missing data.customer.id`).
pub fn require_str(value: &serde_json::Value, pointer: &str) -> Result<String, HandlerError> {
    str_at(value, pointer).ok_or_else(|| permanent(format!("missing {}", dotted(pointer))))
}

/// `/data/customer/id` → `data.customer.id`.
pub fn dotted(pointer: &str) -> String {
    pointer.trim_start_matches('/').replace('/', ".")
}

/// Emits a follow-up event whose payload is `payload` serialised as JSON.
/// A refused emit (too large, too many, no type or entity) is `permanent`.
pub fn emit_json(
    event_type: &str,
    entity_id: &str,
    payload: &serde_json::Value,
) -> Result<(), HandlerError> {
    outbox::emit(event_type, entity_id, payload.to_string().as_bytes())?;
    Ok(())
}

/// `stale-revision` and `unavailable` are worth a retry; an invalid key or a
/// value too large is a bug in the handler or its input, which a retry
/// cannot fix.
impl From<StateError> for HandlerError {
    fn from(err: StateError) -> Self {
        match err {
            StateError::StaleRevision => transient("concurrent update"),
            StateError::Unavailable(reason) => transient(format!("state unavailable: {reason}")),
            StateError::InvalidKey(reason) => permanent(format!("invalid state key: {reason}")),
            StateError::TooLarge(reason) => permanent(format!("state value too large: {reason}")),
        }
    }
}

/// Every refused emit is a bug a retry cannot fix.
impl From<OutboxError> for HandlerError {
    fn from(err: OutboxError) -> Self {
        match err {
            OutboxError::TooLarge(reason)
            | OutboxError::TooMany(reason)
            | OutboxError::Invalid(reason) => permanent(format!("emit refused: {reason}")),
        }
    }
}

/// `unavailable` is worth a retry; a conflicting link or an invalid id is not.
impl From<MappingError> for HandlerError {
    fn from(err: MappingError) -> Self {
        match err {
            MappingError::Conflict(reason) => permanent(format!("mapping conflict: {reason}")),
            MappingError::InvalidId(reason) => permanent(format!("invalid mapping id: {reason}")),
            MappingError::Unavailable(reason) => {
                transient(format!("mappings unavailable: {reason}"))
            }
        }
    }
}
