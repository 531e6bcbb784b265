//! order-sync writing to an ERP (the mock ERP, real HTTP on loopback)
//! through the real host on a real nats-server: the ERP's failures are
//! classified and retried with one `Idempotency-Key`, so every event makes
//! one sales order — through 5xx, `Retry-After`, a 400 that is replayed
//! once the ERP is fixed, a slow ERP, and a host killed after the ERP did
//! the work.

use std::time::Duration;

use hookmesh::dispatch::{Reason, attempt_record};
use hookmesh::dlq::replay::{ReplayRequest, request as replay};
use hookmesh::dlq::store::{self, Selection};
use hookmesh_mock_erp::{Fault, MockErp, Seen};
use hookmesh_test_support::NatsServer;
use serde_json::json;

use crate::handlers::{example, host_with, messages};
use crate::support::*;

fn order(id: &str, version: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "order.created",
        "data": {"id": id, "version": version, "total": "129.90", "currency": "EUR",
                 "customer": {"id": "CUST-1", "payment_terms": "NET30"}}
    }))
    .expect("json")
}

/// The requests the ERP saw with `key`, oldest first.
fn with_key(seen: &[Seen], key: &str) -> Vec<Seen> {
    seen.iter()
        .filter(|s| s.request.idempotency_key.as_deref() == Some(key))
        .cloned()
        .collect()
}

fn statuses(seen: &[Seen]) -> Vec<(u16, bool)> {
    seen.iter().map(|s| (s.status, s.replayed)).collect()
}

/// order-sync's manifest for `hookmesh serve` processes against the ERP at
/// `erp_url`, with retries and redeliveries quick enough for a test.
pub(crate) fn order_sync_manifest(erp_url: &str) -> String {
    format!(
        "name = \"order-sync\"\ncomponent = {component:?}\nsubject = \"crm.order.>\"\n\
         ack_wait = \"3s\"\ntimeout = \"2s\"\nallowed_hosts = [{erp_url:?}]\n\
         [backoff]\ninitial = \"200ms\"\nmax = \"1s\"\n[config]\nerp_url = {erp_url:?}\n",
        component = guest("order_sync").display().to_string(),
    )
}

/// order-sync against `erp` with retries quick enough for a test, and a
/// `max` that leaves room for a 2 s `Retry-After`.
fn order_sync(erp: &MockErp) -> hookmesh::manifest::Manifest {
    let mut manifest = example("order-sync", &erp.url());
    manifest.backoff.max = Duration::from_secs(5);
    manifest.timeout = Duration::from_secs(1);
    manifest.ack_wait = Duration::from_secs(10);
    manifest
}

#[tokio::test]
async fn an_erp_5xx_is_retried_with_one_idempotency_key_and_retry_after_sets_the_delay() {
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let host = host_with(&nats, vec![order_sync(&erp)]).await;
    let js = jetstream(&nats).await;

    // 500 twice, then the ERP works: attempt 3 creates the order.
    erp.erp().script(Fault::status("/sales-orders", 500, 2));
    let seq = host.send("crm", order("ORD-500", 1), "o-500").await.json["stream_seq"]
        .as_u64()
        .expect("seq");
    wait_for(Duration::from_secs(20), "the order synced", || async {
        messages(&js, "hook.order-sync.").await.len() == 1
    })
    .await;
    let seen = with_key(&erp.erp().requests(), "crm:o-500:order-sync:0");
    assert_eq!(
        statuses(&seen),
        [(500, false), (500, false), (201, false)],
        "one key, three attempts"
    );
    let record = attempt_record(&js, "order-sync", seq)
        .await
        .expect("read")
        .expect("two failed attempts recorded");
    assert_eq!((record.attempts, record.reason), (2, Reason::Transient));
    assert!(
        record.last_error.contains("answered 500"),
        "{}",
        record.last_error
    );
    let orders = erp.erp().sales_orders();
    assert_eq!(orders.len(), 1, "one order: {orders:?}");
    let mappings = js.get_key_value("hook_mappings").await.expect("bucket");
    assert_eq!(
        mappings
            .get("crm.ORD-500.erp")
            .await
            .expect("get")
            .as_deref(),
        Some(orders[0].id.as_bytes())
    );

    // 429 with Retry-After: 2 — the next attempt waits 2 s, not the
    // backoff's 200 ms.
    erp.erp()
        .script(Fault::status("/sales-orders", 429, 1).retry_after("2"));
    host.send("crm", order("ORD-429", 1), "o-429").await;
    wait_for(
        Duration::from_secs(20),
        "the second order synced",
        || async { messages(&js, "hook.order-sync.").await.len() == 2 },
    )
    .await;
    let seen = with_key(&erp.erp().requests(), "crm:o-429:order-sync:0");
    assert_eq!(statuses(&seen), [(429, false), (201, false)]);
    let waited = seen[1].at_ms - seen[0].at_ms;
    assert!(
        waited >= 2_000,
        "the retry came {waited} ms after the 429 (the 500s above were retried after the backoff)"
    );
    assert_eq!(erp.erp().sales_orders().len(), 2);
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn an_erp_400_is_a_permanent_dead_letter_a_replay_after_the_fix_makes_one_order_and_a_slow_erp_times_out()
 {
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let host = host_with(&nats, vec![order_sync(&erp)]).await;
    let js = jetstream(&nats).await;

    erp.erp().script(
        Fault::status("/sales-orders", 400, 1).body(json!({"error": "customer CUST-1 is blocked"})),
    );
    host.send("crm", order("ORD-400", 1), "o-400").await;
    let selection = Selection {
        handler: Some("order-sync".into()),
        ..Selection::default()
    };
    wait_for(Duration::from_secs(20), "the dead letter", || async {
        store::list(&js, &selection)
            .await
            .is_ok_and(|l| l.len() == 1)
    })
    .await;
    let dead = store::list(&js, &selection).await.expect("list").remove(0);
    assert_eq!(dead.reason, "permanent");
    assert_eq!(dead.attempts, 1, "not retried");
    let error = dead.header("Hook-Dlq-Error").unwrap_or_default();
    assert!(
        error.contains("answered 400") && error.contains("customer CUST-1 is blocked"),
        "{error}"
    );
    assert!(erp.erp().sales_orders().is_empty());

    // The ERP is fixed (the customer unblocked): a replay creates the
    // order, under the same key family.
    let replayed = replay(
        &js.client(),
        "order-sync",
        &ReplayRequest {
            dlq_seq: dead.dlq_seq,
            actor: "ops".into(),
            payload: None,
        },
        Duration::from_secs(10),
    )
    .await
    .expect("replayed");
    assert!(replayed.ok, "{replayed:?}");
    let seen = with_key(&erp.erp().requests(), "crm:o-400:order-sync:0");
    assert_eq!(statuses(&seen), [(400, false), (201, false)]);
    assert_eq!(erp.erp().sales_orders().len(), 1);
    assert!(store::list(&js, &selection).await.expect("list").is_empty());

    // An ERP that does the work but takes a minute to answer: the request
    // times out within the 1 s invocation (a transient failure, never a
    // hang); the retry sends the same key and gets the ERP's first answer.
    erp.erp()
        .script(Fault::slow("/sales-orders", Duration::from_secs(60), 1));
    let seq = host.send("crm", order("ORD-SLOW", 1), "o-slow").await.json["stream_seq"]
        .as_u64()
        .expect("seq");
    wait_for(Duration::from_secs(20), "the slow order synced", || async {
        messages(&js, "hook.order-sync.").await.len() == 2
    })
    .await;
    let record = attempt_record(&js, "order-sync", seq)
        .await
        .expect("read")
        .expect("the timed-out attempt");
    assert_eq!(record.attempts, 1);
    assert!(
        matches!(record.reason, Reason::Transient | Reason::Trap)
            && record.last_error.contains("timed out"),
        "{record:?}"
    );
    let orders: Vec<_> = erp
        .erp()
        .sales_orders()
        .into_iter()
        .filter(|o| o.crm_order_id == "ORD-SLOW")
        .collect();
    assert_eq!(orders.len(), 1);
    let seen = with_key(&erp.erp().requests(), "crm:o-slow:order-sync:0");
    assert!(
        seen.iter().any(|s| s.replayed),
        "the retry got the stored answer: {seen:?}"
    );
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn a_host_killed_after_the_erp_did_the_work_runs_the_event_again_with_the_same_key() {
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    let dir = ServeDir::new(&nats.url(), "order-sync", &order_sync_manifest(&erp.url()));
    let args = dir.serve_args();
    let mut first = LoggedProcess::start(dir.path(), &args, "first").await;
    // The ERP stores the order, then holds its answer back: the host dies
    // with the side effect done and the event not acked.
    erp.erp()
        .script(Fault::slow("/sales-orders", Duration::from_secs(60), 1));
    send_crm(&first.address, order("ORD-KILL", 1), "o-kill").await;
    wait_for(Duration::from_secs(20), "the ERP has the order", || async {
        !erp.erp().sales_orders().is_empty()
    })
    .await;
    first.kill();

    let second = LoggedProcess::start(dir.path(), &args, "second").await;
    let js = jetstream(&nats).await;
    wait_for(Duration::from_secs(30), "the event ran again", || async {
        messages(&js, "hook.order-sync.").await.len() == 1
    })
    .await;
    let seen = with_key(&erp.erp().requests(), "crm:o-kill:order-sync:0");
    assert_eq!(
        seen.iter().map(|s| s.replayed).collect::<Vec<_>>(),
        [false, true],
        "the same key twice; the second got the first answer: {seen:?}"
    );
    assert_eq!(erp.erp().sales_orders().len(), 1, "one order");
    drop(second);
}

#[tokio::test]
async fn the_operators_erp_credential_reaches_the_erp_on_the_requests_of_the_handlers_it_names_only()
 {
    let nats = NatsServer::start().expect("nats");
    let erp = MockErp::start("127.0.0.1:0").await.expect("mock ERP");
    // order-sync gets the ERP's key; return-credit-note is only named by a
    // credential for another destination, so its requests go without one.
    let extra_toml = format!(
        r#"
[[outgoing.credentials]]
destination = "{erp}"
header = "authorization"
value = "Bearer sync-key"
handlers = ["order-sync"]

[[outgoing.credentials]]
destination = "https://erp.example.com"
header = "authorization"
value = "Bearer elsewhere"
handlers = ["return-credit-note"]
"#,
        erp = erp.url()
    );
    let options = Options {
        handlers: vec![order_sync(&erp), example("return-credit-note", &erp.url())],
        extra_toml,
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let js = jetstream(&nats).await;

    host.send("crm", order("ORD-KEY", 1), "o-key").await;
    wait_for(Duration::from_secs(20), "the order synced", || async {
        messages(&js, "hook.order-sync.").await.len() == 1
    })
    .await;
    host.send(
        "crm",
        crate::handlers::approved_return("RET-KEY", "ORD-KEY"),
        "r-key",
    )
    .await;
    wait_for(Duration::from_secs(20), "the credit note", || async {
        messages(&js, "hook.return-credit-note.").await.len() == 1
    })
    .await;

    let seen = erp.erp().requests();
    let auth_on = |path: &str| -> Vec<Option<String>> {
        seen.iter()
            .filter(|s| s.request.path == path)
            .map(|s| s.request.authorization.clone())
            .collect()
    };
    assert_eq!(
        auth_on("/sales-orders"),
        [Some("Bearer sync-key".to_string())]
    );
    assert_eq!(auth_on("/credit-notes"), [None]);
    host.shutdown().await.expect("clean stop");
}
