//! [`Trace`]: a handle on one span, empty (and free) when tracing is off.

use std::borrow::Cow;
use std::fmt;

use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use super::{exporter, propagation};

/// One span, as a context whose active span it is (children are started
/// from it, events and attributes go to it), or nothing when tracing is
/// off. Cheap to clone; every method of an empty one returns at once,
/// without calling the closures that would build attributes.
#[derive(Clone, Default)]
pub struct Trace(Option<Context>);

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.traceparent() {
            Some(traceparent) => write!(f, "Trace({traceparent})"),
            None => f.write_str("Trace(off)"),
        }
    }
}

impl Trace {
    /// No span: what everything gets when tracing is off.
    pub const fn off() -> Trace {
        Trace(None)
    }

    /// Starts a span whose parent is the remote span `traceparent` names
    /// (a new trace when there is none, or it is malformed).
    pub fn start(
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        traceparent: Option<&str>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Trace {
        let Some(tracer) = exporter::tracer() else {
            return Trace::off();
        };
        let parent = match traceparent.and_then(propagation::parse) {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None => Context::new(),
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracer, &parent);
        Trace(Some(parent.with_span(span)))
    }

    /// Starts a child of this span (nothing when this one is empty).
    pub fn child(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Trace {
        let Some(parent) = &self.0 else {
            return Trace::off();
        };
        let Some(tracer) = exporter::tracer() else {
            return Trace::off();
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes())
            .start_with_context(&tracer, parent);
        Trace(Some(parent.with_span(span)))
    }

    /// Whether there is a span.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Sets attributes on the span.
    pub fn set(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(context) = &self.0 {
            context.span().set_attributes(attributes());
        }
    }

    /// Adds an event (a log line) to the span.
    pub fn event(&self, name: impl FnOnce() -> String, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(context) = &self.0 {
            context.span().add_event(name(), attributes());
        }
    }

    /// Marks the span failed, saying why.
    pub fn fail(&self, description: impl FnOnce() -> String) {
        if let Some(context) = &self.0 {
            context.span().set_status(Status::error(description()));
        }
    }

    /// Ends the span, failed with the error's text when `result` is one.
    pub fn end_with<T, E: fmt::Display>(&self, result: &Result<T, E>) {
        if let Err(error) = result {
            self.fail(|| super::clip(&error.to_string(), 1024));
        }
        self.end();
    }

    /// Ends the span (dropping the last clone ends it too).
    pub fn end(&self) {
        if let Some(context) = &self.0 {
            context.span().end();
        }
    }

    /// The `traceparent` that makes a span elsewhere a child of this one.
    pub fn traceparent(&self) -> Option<String> {
        let context = self.0.as_ref()?;
        Some(propagation::format(context.span().span_context()))
    }

    /// The trace id, in hex (for log lines).
    pub fn trace_id(&self) -> Option<String> {
        let context = self.0.as_ref()?;
        Some(context.span().span_context().trace_id().to_string())
    }
}
