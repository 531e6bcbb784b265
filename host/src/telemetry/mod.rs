//! OpenTelemetry traces: one trace per webhook, from its HTTP request
//! through the publish, each handler invocation, the invocation's host
//! calls and outgoing HTTP, and its emits, into the handlers those reach.
//!
//! # Layout
//! - [`exporter`]: starts and stops the OTLP/HTTP (protobuf) exporter that
//!   `[telemetry]` configures, and holds the process's tracer.
//! - [`span`]: [`Trace`], a handle on one span that does nothing at all
//!   when tracing is off.
//! - [`propagation`]: W3C `traceparent` ↔ span context.
//!
//! The `traceparent` message header is how a trace crosses NATS: ingest
//! stores the publish span's, an emit carries its publish span's, and an
//! invocation's span takes its parent from the event's header. When
//! tracing is off nothing here allocates or locks: [`enabled`] is one
//! relaxed atomic load, and every [`Trace`] is empty.

pub mod exporter;
pub mod propagation;
pub mod span;

pub use exporter::{Telemetry, TelemetryError, enabled, start};
pub use opentelemetry::KeyValue;
pub use opentelemetry::trace::SpanKind;
pub use span::Trace;

/// The span names hookmesh writes (DESIGN.md, "Telemetry"; documented in
/// `docs/telemetry.md`).
pub mod names {
    /// Storing an event into `HOOK_EVENTS`: a webhook, an emit, an outbox row.
    pub const PUBLISH: &str = "publish HOOK_EVENTS";
    /// `hookmesh:handler/state.get`.
    pub const STATE_GET: &str = "state.get";
    /// `hookmesh:handler/state.put`.
    pub const STATE_PUT: &str = "state.put";
    /// `hookmesh:handler/state.delete`.
    pub const STATE_DELETE: &str = "state.delete";
    /// `hookmesh:handler/mapping.link`.
    pub const MAPPING_LINK: &str = "mapping.link";
    /// `hookmesh:handler/mapping.lookup`.
    pub const MAPPING_LOOKUP: &str = "mapping.lookup";
    /// `hookmesh:handler/outbox.emit`.
    pub const EMIT: &str = "emit";
}

/// `text` cut to at most `max` bytes on a character boundary: attribute
/// values that come from outside (keys, ids, guest log lines) stay small.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
