//! The host's log: `HOOKMESH_LOG` (or `RUST_LOG`) filters it, `[log]
//! format` shapes it, and it goes to stderr.
//!
//! `human` (the default) is tracing's readable line. `json` is one object
//! per line for log shippers, flat: `timestamp`, `level`, `target`,
//! `message`, then every field of every span the line was written in
//! (outermost first, inner ones winning), then the line's own fields. So
//! each line of a handler invocation carries `handler`, `version`,
//! `correlation_id`, `subject`, `stream_seq` and `attempt` as top-level
//! keys, whichever span set them.
//!
//! A `trace_id` field recorded on any enclosing span is written right
//! after `message`. The webhook and invocation spans record one when
//! traces are exported ([`crate::telemetry`]); with traces off the key is
//! absent rather than made up.

use std::io::{IsTerminal, Write};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Record};
use tracing::{Event, Id, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

pub mod clip;
pub use clip::clip;

/// The field that carries a request's or an invocation's trace id, when
/// traces are on.
pub const TRACE_ID: &str = "trace_id";

/// Installs the process's log in `format`; a second call changes nothing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("HOOKMESH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Already installed (a test, an embedding program): that one stays.
    match format {
        LogFormat::Human => {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init();
        }
        LogFormat::Json => {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(JsonLines::new(std::io::stderr))
                .try_init();
        }
    }
}

/// A [`Layer`] writing each event as one flat JSON object per line.
#[derive(Debug)]
pub struct JsonLines<W> {
    make_writer: W,
}

impl<W> JsonLines<W> {
    /// Lines go to what `make_writer` makes (stderr for the host).
    pub fn new(make_writer: W) -> Self {
        JsonLines { make_writer }
    }
}

/// A span's fields, kept in its extensions.
struct SpanFields(Map<String, Value>);

/// Collects fields into a JSON object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut Fields(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut Fields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(span_fields)) = span.extensions().get::<SpanFields>() {
                    fields.extend(span_fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        event.record(&mut Fields(&mut fields));
        let metadata = event.metadata();
        let mut line = String::with_capacity(256);
        let mut put = |key: &str, value: &Value| {
            line.push(if line.is_empty() { '{' } else { ',' });
            line.push_str(&Value::from(key).to_string());
            line.push(':');
            line.push_str(&value.to_string());
        };
        let timestamp = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        put("timestamp", &Value::from(timestamp));
        put("level", &Value::from(metadata.level().as_str()));
        put("target", &Value::from(metadata.target()));
        for first in ["message", TRACE_ID] {
            if let Some(value) = fields.remove(first) {
                put(first, &value);
            }
        }
        for (key, value) in &fields {
            put(key, value);
        }
        line.push_str("}\n");
        let bytes = line.into_bytes();
        // One write per line, so lines of concurrent events never mix.
        let _ = self.make_writer.make_writer().write_all(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{field, info, info_span};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines(captured: &Captured) -> Vec<Map<String, Value>> {
        let bytes = captured.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(|l| match serde_json::from_str(l) {
                Ok(Value::Object(map)) => map,
                other => panic!("not a JSON object: {l} ({other:?})"),
            })
            .collect()
    }

    #[test]
    fn each_line_of_an_invocation_carries_the_fields_of_its_spans() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::registry().with(JsonLines::new(captured.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let handle = info_span!(
                "handle",
                handler = "order-sync",
                subject = "hook.crm.order.7.ORD-1.order.created",
                stream_seq = 42u64,
            );
            handle.in_scope(|| {
                let invoke = info_span!(
                    "invoke",
                    version = "3-abc",
                    correlation_id = "c-1",
                    attempt = 2u64,
                    trace_id = field::Empty,
                );
                invoke.in_scope(|| info!(error = "ERP said 503", "failed; will retry"));
                invoke.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
                info!(parent: &invoke, "handled");
            });
            info!(unrelated = true, "outside any span");
        });
        let lines = lines(&captured);
        assert_eq!(lines.len(), 3);
        for line in &lines[..2] {
            for (key, value) in [
                ("handler", Value::from("order-sync")),
                ("version", Value::from("3-abc")),
                ("correlation_id", Value::from("c-1")),
                (
                    "subject",
                    Value::from("hook.crm.order.7.ORD-1.order.created"),
                ),
                ("stream_seq", Value::from(42)),
                ("attempt", Value::from(2)),
                ("level", Value::from("INFO")),
            ] {
                assert_eq!(line.get(key), Some(&value), "{key} in {line:?}");
            }
            assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));
        }
        assert_eq!(lines[0]["message"], "failed; will retry");
        assert_eq!(lines[0]["error"], "ERP said 503");
        assert!(
            !lines[0].contains_key(TRACE_ID),
            "no trace id until one is recorded"
        );
        assert_eq!(lines[1][TRACE_ID], "4bf92f3577b34da6a3ce929d0e0e4736");
        let raw = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let second = raw.lines().nth(1).expect("second line");
        let order: Vec<usize> = [
            "\"timestamp\"",
            "\"level\"",
            "\"target\"",
            "\"message\"",
            "\"trace_id\"",
        ]
        .iter()
        .map(|k| second.find(k).expect("key"))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{second}");
        assert!(second.starts_with("{\"timestamp\""), "{second}");
        assert!(!lines[2].contains_key("handler"), "{:?}", lines[2]);
        assert_eq!(lines[2]["unrelated"], true);
    }
}
