//! Outgoing HTTP from real components (built from `handlers/`) to a real
//! HTTP server on loopback (the mock ERP), through the runtime alone.
//!
//! No NATS is involved, so `scripts/test.sh` runs these once, not again
//! against the second nats-server (`- test(/^outbound::/)` there).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use futures::future::BoxFuture;
use hookmesh::manifest::Manifest;
use hookmesh::runtime::http::Resolve;
use hookmesh::runtime::{EventInput, Invoked, MemoryServices, Prepared, Runtime, Verdict};
use hookmesh_mock_erp::{Fault, MockErp};
use serde_json::{Value, json};

use crate::support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn event(key: &str, payload: &Value) -> EventInput {
    EventInput {
        idempotency_key: key.into(),
        provider: "crm".into(),
        event_type: "order.created".into(),
        domain: "order".into(),
        entity_id: "ORD-1".into(),
        correlation_id: format!("corr-{key}"),
        subject: "hook.crm.order.6.ORD-1.order.created".into(),
        attempt: 1,
        headers: vec![("traceparent".into(), TRACEPARENT.into())],
        payload: serde_json::to_vec(payload).expect("json"),
        ..EventInput::default()
    }
}

fn order(id: &str) -> Value {
    json!({"crm_order_id": id, "customer_id": "C-1", "payment_terms": "NET30", "total": "10.00", "version": 1})
}

async fn prepare(runtime: &Runtime, manifest: Manifest) -> Arc<Prepared> {
    let bytes = std::fs::read(manifest.component.as_ref().expect("path")).expect("component");
    runtime.prepare(manifest, &bytes).await.expect("prepared")
}

fn probe(name: &str, allowed: &[String]) -> Manifest {
    let mut manifest = manifest(name, "fixture_http", "crm.order.>");
    manifest.allowed_hosts = allowed.to_vec();
    manifest
}

/// What the fixture reported (its one emit), after an ok.
fn report(invoked: &Invoked) -> Value {
    assert_eq!(invoked.verdict, Verdict::Ok, "{invoked:?}");
    serde_json::from_slice(&invoked.emits[0].payload).expect("json report")
}

async fn run(runtime: &Runtime, prepared: &Prepared, key: &str, payload: Value) -> Invoked {
    let services = Arc::new(MemoryServices::default());
    runtime
        .invoke(prepared, event(key, &payload), services)
        .await
}

#[tokio::test]
async fn only_allowed_hosts_are_reached_with_the_hosts_headers_and_a_denial_says_what_to_add() {
    let logs = Logs::capture();
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let (url, port) = (erp.url(), erp.address().port());
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let prepared = prepare(&runtime, probe("http-probe", std::slice::from_ref(&url))).await;
    // The ERP moves credit notes to a host the manifest does not list.
    erp.erp().script(
        Fault::status("/credit-notes", 307, 1)
            .location(&format!("http://localhost:{port}/sales-orders")),
    );
    let invoked = run(
        &runtime,
        &prepared,
        "crm:msg_1",
        json!({"requests": [
            {"method": "POST", "url": format!("{url}/sales-orders"), "json": order("ORD-1")},
            {"method": "GET", "url": format!("http://127.0.0.2:{port}/sales-orders")},
            {"method": "POST", "url": format!("{url}/credit-notes"), "json": {"sales_order_id": "SO-000001"}},
            {"method": "POST", "url": format!("{url}/sales-orders"), "json": order("ORD-2"),
             "headers": [["Idempotency-Key", "the-guests-own"]]},
        ]}),
    )
    .await;
    let results = report(&invoked)["results"].clone();
    assert_eq!(results[0]["status"], 201, "{results}");
    assert_eq!(results[1]["error"], "denied", "{results}");
    assert!(
        results[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("allowed_hosts")),
        "{results}"
    );
    assert_eq!(
        results[2]["error"], "denied",
        "the redirect target: {results}"
    );
    assert_eq!(results[3]["status"], 201, "{results}");

    // The ERP saw the allowed requests only, each with the host's headers.
    let seen = erp.erp().requests();
    let keys: Vec<_> = seen
        .iter()
        .map(|s| {
            (
                s.request.path.as_str(),
                s.status,
                s.request.idempotency_key.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("/sales-orders", 201, Some("crm:msg_1:http-probe:0")),
            ("/credit-notes", 307, Some("crm:msg_1:http-probe:2")),
            ("/sales-orders", 201, Some("the-guests-own")),
        ],
        "request 1 was denied, 3 (the redirect) too; the guest's own key is kept"
    );
    for request in &seen {
        assert_eq!(
            request.request.correlation_id.as_deref(),
            Some("corr-crm:msg_1")
        );
        let traceparent = request.request.traceparent.as_deref().expect("traceparent");
        assert!(
            traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !traceparent.contains("00f067aa0ba902b7"),
            "a child of the event's trace: {traceparent}"
        );
    }

    let denied = |host: &str| {
        logs.lines_with(&[
            "outgoing HTTP request denied",
            "handler=http-probe",
            &format!("version={}", prepared.version),
            &format!("url=http://{host}:{port}/sales-orders"),
            &format!("add=http://{host}:{port}"),
        ])
    };
    assert_eq!(
        denied("127.0.0.2").len(),
        1,
        "{:?}",
        logs.lines_with(&["denied"])
    );
    assert_eq!(
        denied("localhost").len(),
        1,
        "{:?}",
        logs.lines_with(&["denied"])
    );
}

/// Answers fixed addresses for a few names, as a DNS server would; no DNS
/// server runs here, and `/etc/hosts` is the machine's, not the test's.
/// The filtering under test applies to whatever a resolver answers.
struct Names(Vec<(&'static str, IpAddr)>);

impl Resolve for Names {
    fn resolve(
        &self,
        host: String,
        port: u16,
    ) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let found: Vec<SocketAddr> = self
            .0
            .iter()
            .filter(|(name, _)| *name == host)
            .map(|(_, ip)| SocketAddr::new(*ip, port))
            .collect();
        Box::pin(async move {
            if found.is_empty() {
                Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{host}: no such name"),
                ))
            } else {
                Ok(found)
            }
        })
    }
}

#[tokio::test]
async fn a_name_resolving_to_a_link_local_address_is_refused_unless_that_address_is_listed() {
    let logs = Logs::capture();
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let port = erp.address().port();
    let metadata: IpAddr = "169.254.169.254".parse().expect("ip");
    let names = Names(vec![
        ("erp.test", "127.0.0.1".parse().expect("ip")),
        ("metadata.test", metadata),
    ]);
    let runtime =
        Runtime::with_resolver(Some(guest_cache_dir()), Arc::new(names)).expect("runtime");
    let by_name = vec![
        format!("http://erp.test:{port}"),
        format!("http://metadata.test:{port}"),
    ];
    let strict = prepare(&runtime, probe("link-local-probe", &by_name)).await;
    let invoked = run(
        &runtime,
        &strict,
        "crm:msg_2",
        json!({"requests": [
            {"method": "POST", "url": format!("http://erp.test:{port}/sales-orders"), "json": order("ORD-3")},
            {"method": "GET", "url": format!("http://metadata.test:{port}/latest/meta-data")},
            {"method": "GET", "url": "http://169.254.169.254/latest/meta-data"},
        ]}),
    )
    .await;
    let results = report(&invoked)["results"].clone();
    assert_eq!(
        results[0]["status"], 201,
        "a listed name is resolved and reached: {results}"
    );
    assert_eq!(
        results[1]["error"], "denied",
        "listed by name, resolves to 169.254.169.254: {results}"
    );
    assert_eq!(
        results[2]["error"], "denied",
        "the address itself, unlisted: {results}"
    );
    assert_eq!(
        logs.lines_with(&[
            "outgoing HTTP request denied",
            "handler=link-local-probe",
            "metadata.test resolves to the link-local address 169.254.169.254",
            &format!("add=http://169.254.169.254:{port}"),
        ])
        .len(),
        1,
        "{:?}",
        logs.lines_with(&["link-local"])
    );

    // Listing the address itself lifts the refusal: the host tries to
    // connect (nothing answers there; the short timeout ends the wait).
    let mut listed = by_name.clone();
    listed.push(format!("http://{metadata}:{port}"));
    let lenient = prepare(&runtime, probe("link-local-listed", &listed)).await;
    let invoked = run(
        &runtime,
        &lenient,
        "crm:msg_3",
        json!({"requests": [
            {"method": "GET", "url": format!("http://metadata.test:{port}/latest/meta-data"), "timeout_ms": 300},
        ]}),
    )
    .await;
    let results = report(&invoked)["results"].clone();
    assert!(
        results[0]["error"] != "denied" && results[0]["status"].is_null(),
        "not denied, and nothing answers: {results}"
    );
}

#[tokio::test]
async fn response_size_request_count_and_time_are_limited_with_clear_errors() {
    let logs = Logs::capture();
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let url = erp.url();
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let port = erp.address().port();
    let tls = format!("https://127.0.0.1:{port}");
    let mut limited = probe("limited-probe", &[url.clone(), tls.clone()]);
    limited.max_requests = 4;
    limited.max_response_bytes = 16 << 10;
    let prepared = prepare(&runtime, limited).await;
    erp.erp()
        .script(Fault::status("/credit-notes", 200, 1).body(json!({"blob": "x".repeat(64 << 10)})));
    let invoked = run(
        &runtime,
        &prepared,
        "crm:msg_4",
        json!({"requests": [
            {"method": "POST", "url": format!("{url}/credit-notes"), "json": {}},
            {"method": "GET", "url": format!("{tls}/sales-orders")},
            {"method": "GET", "url": format!("{url}/sales-orders"), "repeat": 4},
        ]}),
    )
    .await;
    let results = report(&invoked)["results"].clone();
    let kinds: Vec<String> = results
        .as_array()
        .expect("results")
        .iter()
        .map(|r| match r["status"].as_u64() {
            Some(status) => status.to_string(),
            None => r["error"].as_str().unwrap_or("?").to_string(),
        })
        .collect();
    assert_eq!(
        kinds,
        ["too-large", "failed", "200", "200", "limit", "limit"],
        "{results}"
    );
    assert!(
        results[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("TlsProtocolError")),
        "https speaks TLS, here to a plain HTTP port: {results}"
    );
    assert!(
        results[4]["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_requests")),
        "{results}"
    );
    assert_eq!(
        logs.lines_with(&["handler=limited-probe", "max_requests=4"])
            .len(),
        2
    );
    assert_eq!(
        erp.erp().requests().len(),
        1,
        "GET /sales-orders is not logged; the oversized answer was sent once"
    );

    // An ERP that takes a minute: the host's first-byte timeout, kept
    // within the invocation's 1 s, ends the wait; the guest sees a
    // timeout (not a trap) and returns.
    erp.erp().script(Fault::slow(
        "/sales-orders",
        std::time::Duration::from_secs(60),
        1,
    ));
    let invoked = run(
        &runtime,
        &prepared,
        "crm:msg_5",
        json!({"requests": [
            {"method": "POST", "url": format!("{url}/sales-orders"), "json": order("ORD-5")},
        ]}),
    )
    .await;
    let results = report(&invoked)["results"].clone();
    assert_eq!(results[0]["error"], "timeout", "{results}");
}

#[tokio::test]
async fn a_state_value_larger_than_the_store_takes_is_refused_as_too_large() {
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let prepared = prepare(&runtime, probe("big-state", &[])).await;
    let services = Arc::new(MemoryServices::default());
    let invoked = runtime
        .invoke(
            &prepared,
            event("crm:msg_6", &json!({"state_bytes": 2_000_000})),
            services.clone(),
        )
        .await;
    let state = report(&invoked)["state"].as_str().unwrap_or("").to_string();
    assert!(
        state.starts_with("StateError::TooLarge(\"a value of 2000000 bytes is larger than the"),
        "{state}"
    );
    assert_eq!(services.state_value("big-state", "big"), None);
    let invoked = runtime
        .invoke(
            &prepared,
            event("crm:msg_7", &json!({"state_bytes": 1000})),
            services.clone(),
        )
        .await;
    assert_eq!(report(&invoked)["state"], "ok", "a small value is stored");
}

#[tokio::test]
async fn a_component_built_against_0_1_0_still_runs_unchanged() {
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let old = manifest("old-handler", "fixture_v0_1", "crm.order.>");
    let validated = validated("fixture_v0_1");
    assert_eq!(validated.world(), "0.1.0");
    assert!(!validated.imports_http());
    let prepared = prepare(&runtime, old).await;
    assert_eq!(prepared.world(), "0.1.0");
    let services = Arc::new(MemoryServices::default());
    let mut first = event("crm:msg_8", &json!({"fail_until_attempt": 1}));
    let failed = runtime
        .invoke(&prepared, first.clone(), services.clone())
        .await;
    assert_eq!(
        failed.verdict,
        Verdict::Transient {
            reason: "attempt 1".into(),
            retry_after: None
        }
    );
    first.attempt = 2;
    let ok = runtime.invoke(&prepared, first, services.clone()).await;
    assert_eq!(ok.verdict, Verdict::Ok);
    assert_eq!(ok.emits[0].event_type, "test.v01.ok");
    assert_eq!(ok.emits[0].payload, b"2");
    assert_eq!(
        services.state_value("old-handler", "runs/ORD-1").as_deref(),
        Some(&b"1"[..])
    );
    // Built from today's WIT, beside it in the same runtime.
    let new = prepare(&runtime, probe("new-handler", &[])).await;
    assert_eq!(new.world(), "0.2.0");
    assert_eq!(validated_world("fixture_http"), "0.2.0");
}

fn validated_world(crate_name: &str) -> &'static str {
    validated(crate_name).world()
}
