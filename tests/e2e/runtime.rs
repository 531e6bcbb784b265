//! The wasm runtime on its own (no NATS): in-memory services, real
//! components built from `handlers/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookmesh::runtime::{EventInput, MemoryServices, Runtime, RuntimeError, Services, Verdict};

use crate::support::*;

fn event() -> EventInput {
    EventInput {
        idempotency_key: "crm:msg_1".into(),
        provider: "crm".into(),
        event_type: "order.created".into(),
        domain: "order".into(),
        entity_id: "ORD-1".into(),
        correlation_id: "corr-1".into(),
        subject: "hook.crm.order.6.ORD-1.order.created".into(),
        attempt: 1,
        payload: br#"{"type":"order.created","data":{"id":"ORD-1","version":1,"customer":{"id":"C","payment_terms":"NET30"},"total":"1"}}"#.to_vec(),
        ..EventInput::default()
    }
}

async fn prepare(
    runtime: &Runtime,
    name: &str,
    crate_name: &str,
) -> Result<Arc<hookmesh::runtime::Prepared>, RuntimeError> {
    let manifest = manifest(name, crate_name, "crm.order.>");
    let bytes = std::fs::read(manifest.component.as_ref().expect("path")).expect("component");
    runtime.prepare(manifest, &bytes).await
}

fn services() -> Arc<dyn Services> {
    Arc::new(MemoryServices::default())
}

#[tokio::test]
async fn verdicts_follow_the_guest_and_traps_stay_contained() {
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let noop = prepare(&runtime, "noop", "fixture_noop")
        .await
        .expect("noop");
    let panicker = prepare(&runtime, "panicker", "fixture_panic")
        .await
        .expect("panic");
    let permanent = prepare(&runtime, "permanent", "fixture_permanent")
        .await
        .expect("permanent");
    let looper = prepare(&runtime, "looper", "fixture_loop")
        .await
        .expect("loop");
    let erp = hookmesh_mock_erp::MockErp::start("127.0.0.1:0")
        .await
        .expect("mock ERP");
    let mut order_sync = manifest("order-sync", "order_sync", "crm.order.>");
    order_sync.allowed_hosts = vec![erp.url()];
    order_sync.config.insert("erp_url".into(), erp.url());
    let bytes = std::fs::read(guest("order_sync")).expect("component");
    let order_sync = runtime
        .prepare(order_sync, &bytes)
        .await
        .expect("order-sync");

    assert_eq!(
        runtime.invoke(&noop, event(), services()).await.verdict,
        Verdict::Ok
    );
    let trapped = runtime.invoke(&panicker, event(), services()).await;
    assert!(
        matches!(&trapped.verdict, Verdict::Trap(m) if m.contains("unreachable")),
        "{:?}",
        trapped.verdict
    );
    assert_eq!(
        runtime
            .invoke(&permanent, event(), services())
            .await
            .verdict,
        Verdict::Permanent("fixture always fails".into())
    );
    let started = Instant::now();
    let looped = runtime.invoke(&looper, event(), services()).await;
    assert!(
        matches!(&looped.verdict, Verdict::Trap(m) if m.contains("timed out")),
        "{:?}",
        looped.verdict
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 1 s deadline stops it: {:?}",
        started.elapsed()
    );

    // After traps and timeouts the same runtime goes on serving.
    let memory = Arc::new(MemoryServices::default());
    let synced = runtime.invoke(&order_sync, event(), memory.clone()).await;
    assert_eq!(synced.verdict, Verdict::Ok);
    assert_eq!(synced.emits.len(), 1);
    assert_eq!(synced.emits[0].event_type, "erp.sales_order.upserted");
    assert!(memory.state_value("order-sync", "order/ORD-1").is_some());
    assert_eq!(
        erp.erp()
            .sales_orders()
            .iter()
            .map(|o| (o.id.as_str(), o.crm_order_id.as_str()))
            .collect::<Vec<_>>(),
        [("SO-000001", "ORD-1")],
        "the ERP got the order"
    );
}

#[tokio::test]
async fn invalid_components_are_refused_with_a_reason() {
    let runtime = Runtime::new(None).expect("runtime");
    let manifest = manifest("junk", "fixture_noop", "crm.order.>");
    let err = runtime
        .prepare(manifest.clone(), b"not wasm")
        .await
        .expect_err("refused");
    assert!(matches!(err, RuntimeError::Invalid { .. }), "{err}");
    // A core module is not a component.
    let core = [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00];
    let err = runtime
        .prepare(manifest.clone(), &core)
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("not a hookmesh handler component"),
        "{err}"
    );

    let err = prepare(&runtime, "boom", "fixture_trap_at_start")
        .await
        .expect_err("refused");
    assert!(matches!(err, RuntimeError::Instantiation { .. }), "{err}");

    let mut greedy = manifest;
    greedy.memory = 4 << 30;
    let bytes = std::fs::read(guest("fixture_noop")).expect("component");
    let err = runtime.prepare(greedy, &bytes).await.expect_err("refused");
    assert!(matches!(err, RuntimeError::TooMuchMemory { .. }), "{err}");
}

#[tokio::test]
async fn compiled_artifacts_are_cached_by_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Runtime::new(Some(dir.path().to_path_buf())).expect("runtime");
    let prepared = prepare(&first, "noop", "fixture_noop").await.expect("noop");
    let artifacts: Vec<_> = walk(dir.path());
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(
        artifacts[0].ends_with(&format!("{}.cwasm", prepared.digest)),
        "{artifacts:?}"
    );
    let modified = std::fs::metadata(&artifacts[0])
        .and_then(|m| m.modified())
        .expect("mtime");
    let second = Runtime::new(Some(dir.path().to_path_buf())).expect("runtime");
    let again = prepare(&second, "noop", "fixture_noop")
        .await
        .expect("noop");
    assert_eq!(again.digest, prepared.digest);
    assert_eq!(walk(dir.path()), artifacts, "no second artifact");
    let reused = std::fs::metadata(&artifacts[0])
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(reused, modified, "the artifact was loaded, not rewritten");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("dir").flatten() {
        if entry.path().is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.path().display().to_string());
        }
    }
    out
}

#[tokio::test]
async fn an_owned_event_reaches_the_guest_field_for_field() {
    let runtime = Runtime::new(Some(guest_cache_dir())).expect("runtime");
    let probe = prepare(&runtime, "probe", "fixture_sandbox")
        .await
        .expect("sandbox probe");
    let sent = EventInput {
        id: Some("evt_1".into()),
        entity_version: Some("7".into()),
        received_at: "2026-01-02T03:04:05.678Z".into(),
        headers: vec![
            ("Nats-Msg-Id".into(), "crm:msg_1".into()),
            ("X-Twice".into(), "first".into()),
            ("X-Twice".into(), "second".into()),
        ],
        attempt: 3,
        ..event()
    };
    let invoked = runtime.invoke(&probe, sent.clone(), services()).await;
    assert_eq!(invoked.verdict, Verdict::Ok);
    let report: serde_json::Value =
        serde_json::from_slice(&invoked.emits[0].payload).expect("report");
    let seen = &report["event"];
    // Every field distinct from every other, so one put in another's
    // place shows.
    assert_eq!(seen["id"], "evt_1");
    assert_eq!(seen["idempotency_key"], sent.idempotency_key.as_str());
    assert_eq!(seen["provider"], sent.provider.as_str());
    assert_eq!(seen["event_type"], sent.event_type.as_str());
    assert_eq!(seen["domain"], sent.domain.as_str());
    assert_eq!(seen["entity_id"], sent.entity_id.as_str());
    assert_eq!(seen["entity_version"], "7");
    assert_eq!(seen["correlation_id"], sent.correlation_id.as_str());
    assert_eq!(seen["subject"], sent.subject.as_str());
    assert_eq!(seen["received_at"], sent.received_at.as_str());
    assert_eq!(seen["attempt"], 3);
    assert_eq!(
        seen["headers"],
        serde_json::json!([
            ["Nats-Msg-Id", "crm:msg_1"],
            ["X-Twice", "first"],
            ["X-Twice", "second"]
        ]),
        "every header, in order, repeats kept"
    );
    assert_eq!(
        seen["payload"],
        String::from_utf8_lossy(&sent.payload).as_ref()
    );
}
