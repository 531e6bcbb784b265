//! Traces over OTLP/HTTP: the real host, on a real nats-server, exports to
//! an OTLP receiver in this process (an axum route decoding
//! `ExportTraceServiceRequest` protobufs). One webhook → a handler that
//! writes state, logs and emits → a second handler that calls the mock ERP
//! (failing once, so it runs twice) is one trace, continuing the
//! provider's `traceparent`, with every parent link and attribute checked.
//!
//! Both handlers are `fixture-http`: the first makes no request and carries
//! its payload's `then` into its report, which the second runs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::State;

use bytes::Bytes;
use hookmesh_mock_erp::{Fault, MockErp};
use hookmesh_test_support::NatsServer;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message;
use serde_json::{Value, json};

use crate::support::*;

/// The provider's trace: its trace id and the span id of its own span.
const GIVEN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const GIVEN_SPAN: &str = "00f067aa0ba902b7";

/// A span as received, with its resource's attributes.
#[derive(Debug, Clone)]
struct Received {
    span: Span,
    resource: BTreeMap<String, String>,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    fn parent(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    fn attribute(&self, key: &str) -> Option<Value> {
        attribute(&self.span.attributes, key)
    }
    fn text(&self, key: &str) -> String {
        match self.attribute(key) {
            Some(Value::String(s)) => s,
            other => panic!("{key} of {}: {other:?}", self.span.name),
        }
    }
    fn int(&self, key: &str) -> i64 {
        match self.attribute(key) {
            Some(Value::Number(n)) => n.as_i64().expect("an integer"),
            other => panic!("{key} of {}: {other:?}", self.span.name),
        }
    }
    fn failed(&self) -> bool {
        self.span
            .status
            .as_ref()
            .is_some_and(|s| s.code == StatusCode::Error as i32)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value(value: &AnyValue) -> Value {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => Value::from(s.clone()),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        other => Value::from(format!("{other:?}")),
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .map(value)
}

/// An OTLP/HTTP trace receiver on loopback.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(collect))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, spans }
    }

    /// The spans received so far in trace `trace_id`.
    fn trace(&self, trace_id: &str) -> Vec<Received> {
        let spans = self.spans.lock().unwrap_or_else(|e| e.into_inner());
        spans
            .iter()
            .filter(|s| s.trace_id() == trace_id)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Received> {
        self.spans.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn collect(
    State(spans): State<Arc<Mutex<Vec<Received>>>>,
    body: Bytes,
) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let mut received = spans.lock().unwrap_or_else(|e| e.into_inner());
    for resource_spans in request.resource_spans {
        let resource: BTreeMap<String, String> = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .filter_map(|kv| match kv.value.as_ref().map(value) {
                Some(Value::String(s)) => Some((kv.key.clone(), s)),
                _ => None,
            })
            .collect();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    span,
                    resource: resource.clone(),
                });
            }
        }
    }
    axum::http::StatusCode::OK
}

/// The one span named `name` whose parent is `parent`.
fn only<'a>(spans: &'a [Received], name: &str, parent: &str) -> &'a Received {
    let found: Vec<&Received> = spans
        .iter()
        .filter(|s| s.span.name == name && s.parent() == parent)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {name:?} under {parent}: {:#?}",
        names(spans)
    );
    found[0]
}

fn names(spans: &[Received]) -> Vec<(String, String, String)> {
    spans
        .iter()
        .map(|s| (s.span.name.clone(), s.span_id(), s.parent()))
        .collect()
}

fn order_payload(id: &str, then: Option<Value>) -> Vec<u8> {
    let mut payload = json!({
        "type": "order.created",
        "data": {"id": id, "version": 1},
        "state_bytes": 8,
    });
    if let Some(then) = then {
        payload["then"] = then;
    }
    serde_json::to_vec(&payload).expect("json")
}

#[tokio::test]
async fn one_webhook_is_one_trace_through_handlers_emits_and_outgoing_http() {
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    // The second handler's first request fails: its retry is a second
    // invocation span in the same trace.
    erp.erp().script(Fault::status("/sales-orders", 500, 1));
    let receiver = Receiver::start().await;

    let first = manifest("trace-first", "fixture_http", "crm.order.>");
    let mut second = manifest("trace-second", "fixture_http", "trace-first.>");
    second.allowed_hosts = vec![erp.url()];
    let options = Options {
        handlers: vec![first, second],
        extra_toml: format!(
            "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"hookmesh-e2e\"\n\
             export_interval = \"100ms\"\nresource = {{ \"deployment.environment\" = \"e2e\" }}\n",
            receiver.url
        ),
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;

    let then = json!({
        "classify": true,
        "requests": [{"method": "POST", "url": format!("{}/sales-orders", erp.url()),
                      "json": {"crm_order_id": "ORD-T1", "customer_id": "C-1",
                               "payment_terms": "NET30", "total": "10.00", "version": 1}}],
    });
    let mut signed = host.sign(
        "crm",
        order_payload("ORD-T1", Some(then)),
        "msg_t1",
        SystemTime::now(),
    );
    signed.headers.insert(
        "traceparent",
        format!("00-{GIVEN_TRACE}-{GIVEN_SPAN}-01")
            .parse()
            .expect("header"),
    );
    let answer = host.post("crm", signed.headers, signed.body).await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
    let stream_seq = answer.json["stream_seq"].as_u64().expect("stream_seq");

    // Everything has arrived once the second handler's second client span
    // (the ERP's 201) and its invocation have.
    wait_for(
        Duration::from_secs(60),
        "the whole trace exported",
        || async {
            let spans = receiver.trace(GIVEN_TRACE);
            let count = |name: &str| spans.iter().filter(|s| s.span.name == name).count();
            count("invoke trace-second") == 2 && count("POST") == 2
        },
    )
    .await;
    let spans = receiver.trace(GIVEN_TRACE);

    // The request's server span continues the provider's span.
    let request = only(&spans, "POST /webhooks/{provider}", GIVEN_SPAN);
    assert_eq!(request.span.kind, SpanKind::Server as i32);
    assert_eq!(request.text("hookmesh.provider"), "crm");
    assert_eq!(request.text("http.route"), "/webhooks/{provider}");
    assert_eq!(request.int("http.response.status_code"), 202);
    assert_eq!(request.resource["service.name"], "hookmesh-e2e");
    assert_eq!(request.resource["deployment.environment"], "e2e");

    // → the publish, whose context the stored event carries.
    let publish = only(&spans, "publish HOOK_EVENTS", &request.span_id());
    assert_eq!(publish.span.kind, SpanKind::Producer as i32);
    assert_eq!(publish.int("hookmesh.stream_seq"), stream_seq as i64);
    let js = jetstream(&nats).await;
    let stored = js
        .get_stream("HOOK_EVENTS")
        .await
        .expect("stream")
        .get_raw_message(stream_seq)
        .await
        .expect("the stored event");
    let stored_traceparent = stored
        .headers
        .get("traceparent")
        .map(|v| v.as_str().to_string());
    assert_eq!(
        stored_traceparent.as_deref(),
        Some(format!("00-{GIVEN_TRACE}-{}-01", publish.span_id()).as_str())
    );

    // → the first handler's invocation with its attributes, host calls and log.
    let first = only(&spans, "invoke trace-first", &publish.span_id());
    assert_eq!(first.span.kind, SpanKind::Consumer as i32);
    assert_eq!(first.text("hookmesh.handler"), "trace-first");
    assert!(!first.text("hookmesh.handler.version").is_empty());
    assert!(
        first
            .text("hookmesh.subject")
            .starts_with("hook.crm.order."),
        "{first:?}"
    );
    assert_eq!(first.int("hookmesh.stream_seq"), stream_seq as i64);
    assert_eq!(first.int("hookmesh.attempt"), 1);
    assert_eq!(first.text("hookmesh.outcome"), "ok");
    assert!(
        first.span.events.iter().any(|e| e.name == "made 0 requests"
            && attribute(&e.attributes, "level") == Some(json!("INFO"))),
        "the guest's log line is a span event: {:?}",
        first.span.events
    );
    let state = only(&spans, "state.put", &first.span_id());
    assert_eq!(state.text("hookmesh.state.key"), "big");
    let emit = only(&spans, "emit", &first.span_id());
    assert_eq!(emit.text("hookmesh.event_type"), "test.http.report");

    // → the emitted event's publish, under the invocation.
    let emitted = only(&spans, "publish HOOK_EVENTS", &first.span_id());
    assert!(
        emitted
            .text("messaging.destination.name")
            .starts_with("hook.trace-first."),
        "{emitted:?}"
    );

    // → the second handler, twice: attempt 1 failed on the ERP's 500,
    // attempt 2 succeeded; both under the emitted event's publish.
    let mut second: Vec<&Received> = spans
        .iter()
        .filter(|s| s.span.name == "invoke trace-second")
        .collect();
    second.sort_by_key(|s| s.int("hookmesh.attempt"));
    assert_eq!(second.len(), 2, "{:#?}", names(&spans));
    for (attempt, run) in second.iter().enumerate() {
        assert_eq!(run.parent(), emitted.span_id(), "attempt {}", attempt + 1);
        assert_eq!(run.int("hookmesh.attempt"), attempt as i64 + 1);
        assert!(
            run.text("hookmesh.subject")
                .starts_with("hook.trace-first.")
        );
    }
    assert_eq!(second[0].text("hookmesh.outcome"), "transient");
    assert!(second[0].failed());
    assert_eq!(second[1].text("hookmesh.outcome"), "ok");
    assert!(!second[1].failed());

    // → each run's outgoing request, whose traceparent the ERP received.
    let seen = erp.erp().requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (run, (status, request)) in second.iter().zip([(500, &seen[0]), (201, &seen[1])]) {
        let client = only(&spans, "POST", &run.span_id());
        assert_eq!(client.span.kind, SpanKind::Client as i32);
        assert_eq!(client.int("http.response.status_code"), status);
        assert_eq!(client.text("http.request.method"), "POST");
        assert_eq!(
            request.request.traceparent.as_deref(),
            Some(format!("00-{GIVEN_TRACE}-{}-01", client.span_id()).as_str()),
            "the ERP sees the client span's id"
        );
    }
    assert!(
        spans.iter().all(|s| s.trace_id() == GIVEN_TRACE),
        "one trace"
    );

    // A webhook without a traceparent starts a trace of its own: its
    // request span is a root, and its handler's span is in the new trace.
    let answer = host
        .send("crm", order_payload("ORD-T2", None), "msg_t2")
        .await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
    wait_for(
        Duration::from_secs(60),
        "the second trace exported",
        || async {
            receiver
                .all()
                .iter()
                .any(|s| s.span.name == "invoke trace-first" && s.trace_id() != GIVEN_TRACE)
        },
    )
    .await;
    let all = receiver.all();
    let root = all
        .iter()
        .find(|s| s.span.name == "POST /webhooks/{provider}" && s.trace_id() != GIVEN_TRACE)
        .expect("the second request's span");
    assert!(root.span.parent_span_id.is_empty(), "{root:?}");
    let new_trace = receiver.trace(&root.trace_id());
    let publish = only(&new_trace, "publish HOOK_EVENTS", &root.span_id());
    only(&new_trace, "invoke trace-first", &publish.span_id());

    host.shutdown().await.expect("clean stop");
}
