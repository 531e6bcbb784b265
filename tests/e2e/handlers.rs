//! Handlers end to end: real components built from `handlers/`, run by the
//! real host from durable consumers on a real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use hookmesh::headers as header;
use hookmesh::manifest::Manifest;
use hookmesh::streams::EVENTS_STREAM;
use hookmesh_test_support::NatsServer;
use serde_json::{Value, json};

use crate::support::*;

/// Every stored message whose subject starts with `prefix`, in stream order.
pub(crate) async fn messages(js: &jetstream::Context, prefix: &str) -> Vec<(String, Value)> {
    stored_messages(js, EVENTS_STREAM)
        .await
        .into_iter()
        .filter(|m| m.subject.starts_with(prefix))
        .map(|message| {
            let payload = serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&message.payload).into_owned())
            });
            (message.subject.to_string(), payload)
        })
        .collect()
}

pub(crate) async fn state(js: &jetstream::Context, handler: &str, key: &str) -> Option<String> {
    let kv = js.get_key_value("hook_state").await.expect("bucket");
    let key = format!(
        "{}.{}",
        hookmesh::extract::kv_key(handler),
        hookmesh::extract::kv_key(key)
    );
    kv.get(key)
        .await
        .expect("get")
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

async fn attempt(
    js: &jetstream::Context,
    handler: &str,
    seq: u64,
) -> Option<hookmesh::dispatch::AttemptRecord> {
    hookmesh::dispatch::attempt_record(js, handler, seq)
        .await
        .expect("read record")
}

fn order(event_type: &str, id: &str, version: u32, terms: Option<&str>) -> Vec<u8> {
    let mut customer = json!({"id": "CUST-1"});
    if let Some(terms) = terms {
        customer["payment_terms"] = json!(terms);
    }
    serde_json::to_vec(&json!({
        "type": event_type,
        "data": {"id": id, "version": version, "customer": customer, "total": "129.90", "currency": "EUR"}
    }))
    .expect("json")
}

pub(crate) fn approved_return(id: &str, order: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "return.approved",
        "data": {"id": id, "order_id": order, "amount": "10.00", "reason": "damaged"}
    }))
    .expect("json")
}

/// A shipped example manifest, calling the ERP at `erp_url` (the test's
/// mock ERP) instead of the development address, with quick retries;
/// everything else as shipped.
pub(crate) fn example(name: &str, erp_url: &str) -> Manifest {
    let mut manifest = Manifest::load(&workspace().join(format!("handlers/{name}/handler.toml")))
        .expect("example manifest");
    manifest.backoff.initial = Duration::from_millis(200);
    manifest.backoff.max = Duration::from_millis(400);
    manifest.allowed_hosts = vec![erp_url.to_string()];
    manifest
        .config
        .insert("erp_url".into(), erp_url.to_string());
    manifest
}

pub(crate) async fn host_with(nats: &NatsServer, handlers: Vec<Manifest>) -> TestHost {
    let options = Options {
        handlers,
        ..Options::default()
    };
    TestHost::start_with(nats, options).await
}

#[tokio::test]
async fn crm_order_flow_syncs_orders_ignores_stale_updates_and_credits_returns_once_synced() {
    let nats = NatsServer::start().expect("nats");
    let erp = hookmesh_mock_erp::MockErp::start("127.0.0.1:0")
        .await
        .expect("mock ERP");
    let host = host_with(
        &nats,
        vec![
            example("order-sync", &erp.url()),
            example("return-credit-note", &erp.url()),
        ],
    )
    .await;
    let js = jetstream(&nats).await;

    // The return arrives before its order is synced: transient until it is.
    assert_eq!(
        host.send("crm", approved_return("RET-1", "ORD-1"), "ret-1")
            .await
            .status,
        202
    );
    let early_seq = 1;
    wait_for(
        Duration::from_secs(10),
        "the early return is retried",
        || async {
            attempt(&js, "return-credit-note", early_seq)
                .await
                .is_some_and(|r| r.attempts >= 1)
        },
    )
    .await;
    let record = attempt(&js, "return-credit-note", early_seq)
        .await
        .expect("record");
    assert_eq!(record.reason, hookmesh::dispatch::Reason::Transient);
    assert!(record.last_error.contains("ORD-1"), "{}", record.last_error);

    for (id, event_type, version) in [("o-1", "order.created", 1), ("o-2", "order.updated", 2)] {
        let answer = host
            .send(
                "crm",
                order(event_type, "ORD-1", version, Some("NET30")),
                id,
            )
            .await;
        assert_eq!(answer.status, 202);
    }
    wait_for(
        Duration::from_secs(10),
        "two sales-order upserts",
        || async { messages(&js, "hook.order-sync.").await.len() == 2 },
    )
    .await;
    // A stale update (version 1 after 2) is acked without effect.
    assert_eq!(
        host.send(
            "crm",
            order("order.updated", "ORD-1", 1, Some("NET30")),
            "o-stale"
        )
        .await
        .status,
        202
    );

    wait_for(
        Duration::from_secs(15),
        "the early return succeeds on a retry",
        || async { messages(&js, "hook.return-credit-note.").await.len() == 1 },
    )
    .await;
    assert_eq!(
        host.send("crm", approved_return("RET-2", "ORD-1"), "ret-2")
            .await
            .status,
        202
    );
    wait_for(
        Duration::from_secs(10),
        "the second return is credited",
        || async { messages(&js, "hook.return-credit-note.").await.len() == 2 },
    )
    .await;
    // Give the stale update time to be handled, then check it changed nothing.
    wait_for(
        Duration::from_secs(10),
        "all CRM events handled",
        || async {
            let info = js
                .get_stream("HOOK_EVENTS")
                .await
                .expect("stream")
                .consumer_info("handler_order-sync_6")
                .await;
            info.is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
        },
    )
    .await;

    let upserts = messages(&js, "hook.order-sync.").await;
    assert_eq!(
        upserts.len(),
        2,
        "the stale update emitted nothing: {upserts:?}"
    );
    let (subject, payload) = &upserts[1];
    assert!(
        subject.starts_with("hook.order-sync.erp.")
            && subject.ends_with(".SO-000001.erp.sales_order.upserted"),
        "{subject}"
    );
    assert_eq!(payload["erp_order_id"], "SO-000001");
    assert_eq!(payload["version"], 2);
    let stored: Value = serde_json::from_str(
        &state(&js, "order-sync", "order/ORD-1")
            .await
            .expect("state"),
    )
    .expect("json");
    assert_eq!(stored["version"], 2, "newer state kept: {stored}");

    let credits = messages(&js, "hook.return-credit-note.").await;
    assert!(
        credits
            .iter()
            .all(|(_, p)| p["erp_order_id"] == "SO-000001"),
        "{credits:?}"
    );
    // The ERP holds one sales order at version 2 (the stale update never
    // reached it) and the two credit notes.
    let orders = erp.erp().sales_orders();
    assert_eq!(
        orders
            .iter()
            .map(|o| (o.id.as_str(), o.crm_order_id.as_str(), o.version))
            .collect::<Vec<_>>(),
        [("SO-000001", "ORD-1", 2)]
    );
    assert_eq!(
        erp.erp()
            .credit_notes()
            .iter()
            .map(|n| (n.sales_order_id.as_str(), n.return_id.as_deref()))
            .collect::<Vec<_>>(),
        [("SO-000001", Some("RET-1")), ("SO-000001", Some("RET-2"))]
    );
    let mappings = js.get_key_value("hook_mappings").await.expect("bucket");
    assert_eq!(
        mappings.get("crm.ORD-1.erp").await.expect("get").as_deref(),
        Some(&b"SO-000001"[..])
    );
    assert_eq!(
        mappings
            .get("erp.SO-000001.crm")
            .await
            .expect("get")
            .as_deref(),
        Some(&b"ORD-1"[..])
    );
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn bad_orders_are_permanent_or_need_a_human_and_are_not_retried() {
    let nats = NatsServer::start().expect("nats");
    let erp = hookmesh_mock_erp::MockErp::start("127.0.0.1:0")
        .await
        .expect("mock ERP");
    let host = host_with(&nats, vec![example("order-sync", &erp.url())]).await;
    let js = jetstream(&nats).await;
    let no_total = serde_json::to_vec(
        &json!({"type":"order.created","data":{"id":"ORD-7","version":1,"customer":{"id":"C"}}}),
    )
    .expect("json");
    let permanent_answer = host.send("crm", no_total, "bad-1").await.json;
    let human_answer = host
        .send("crm", order("order.created", "ORD-8", 1, None), "bad-2")
        .await
        .json;
    let seq_permanent = permanent_answer["stream_seq"].as_u64().expect("seq");
    let seq_human = human_answer["stream_seq"].as_u64().expect("seq");

    wait_for(
        Duration::from_secs(10),
        "both failures recorded",
        || async {
            attempt(&js, "order-sync", seq_permanent).await.is_some()
                && attempt(&js, "order-sync", seq_human).await.is_some()
        },
    )
    .await;
    let permanent = attempt(&js, "order-sync", seq_permanent)
        .await
        .expect("record");
    assert_eq!(permanent.reason, hookmesh::dispatch::Reason::Permanent);
    assert!(
        permanent.last_error.contains("total"),
        "{}",
        permanent.last_error
    );
    let human = attempt(&js, "order-sync", seq_human).await.expect("record");
    assert_eq!(human.reason, hookmesh::dispatch::Reason::NeedsHuman);
    assert!(
        human.last_error.contains("payment terms"),
        "{}",
        human.last_error
    );
    assert_eq!(human.handler_version.len(), 12);

    // Terminated: never handled again. The server has settled both
    // partitions (nothing awaits an ack or a redelivery), so no other
    // attempt can come.
    for answer in [&permanent_answer, &human_answer] {
        let seq = answer["stream_seq"].as_u64().expect("seq");
        let partition = partition_of(answer["subject"].as_str().expect("subject"));
        wait_for(Duration::from_secs(10), "the partition settled", || async {
            consumer_settled(&js, "order-sync", partition, seq).await
        })
        .await;
    }
    assert_eq!(
        attempt(&js, "order-sync", seq_permanent)
            .await
            .expect("record")
            .attempts,
        1
    );
    assert_eq!(
        attempt(&js, "order-sync", seq_human)
            .await
            .expect("record")
            .attempts,
        1
    );
    assert!(messages(&js, "hook.order-sync.").await.is_empty());
}

#[tokio::test]
async fn hostile_handlers_are_retried_then_given_up_while_the_host_and_others_go_on() {
    let nats = NatsServer::start().expect("nats");
    let handlers = vec![
        manifest("looper", "fixture_loop", "crm.loop.>"),
        manifest("hog", "fixture_memory_hog", "crm.hog.>"),
        manifest("panicker", "fixture_panic", "crm.panic.>"),
        manifest("refuser", "fixture_permanent", "crm.refuse.>"),
        manifest("healthy", "fixture_recorder", "crm.order.>"),
    ];
    let host = host_with(&nats, handlers).await;
    let js = jetstream(&nats).await;
    let mut seqs = Vec::new();
    let mut answers = Vec::new();
    for domain in ["loop", "hog", "panic", "refuse"] {
        let body =
            serde_json::to_vec(&json!({"type": format!("{domain}.go"), "data": {"id": "X-1"}}))
                .expect("json");
        let answer = host.send("crm", body, &format!("h-{domain}")).await;
        seqs.push(answer.json["stream_seq"].as_u64().expect("seq"));
        answers.push(answer.json);
    }
    for i in 0..5 {
        let answer = host
            .send(
                "crm",
                crm_order("order.created", &format!("ORD-{i}"), 1),
                &format!("ok-{i}"),
            )
            .await;
        assert_eq!(answer.status, 202);
    }
    wait_for(
        Duration::from_secs(20),
        "the healthy handler handled everything",
        || async { messages(&js, "hook.healthy.").await.len() == 5 },
    )
    .await;
    for (handler, seq, expect) in [
        ("looper", seqs[0], "timed out"),
        ("hog", seqs[1], "trap"),
        ("panicker", seqs[2], "trap"),
    ] {
        wait_for(Duration::from_secs(30), "4 failed attempts", || async {
            attempt(&js, handler, seq)
                .await
                .is_some_and(|r| r.attempts == 4)
        })
        .await;
        let record = attempt(&js, handler, seq).await.expect("record");
        assert_eq!(
            record.reason,
            hookmesh::dispatch::Reason::Trap,
            "{handler}: {record:?}"
        );
        assert!(
            record.last_error.contains(expect),
            "{handler}: {}",
            record.last_error
        );
    }
    wait_for(
        Duration::from_secs(10),
        "the permanent failure recorded",
        || async { attempt(&js, "refuser", seqs[3]).await.is_some() },
    )
    .await;
    // max_deliver reached: no fifth attempt; a permanent failure: no
    // second. Once the server has settled their partitions (nothing awaits
    // an ack or a redelivery) no other attempt can come.
    for (handler, answer) in [
        ("looper", &answers[0]),
        ("hog", &answers[1]),
        ("panicker", &answers[2]),
        ("refuser", &answers[3]),
    ] {
        let seq = answer["stream_seq"].as_u64().expect("seq");
        let partition = partition_of(answer["subject"].as_str().expect("subject"));
        wait_for(Duration::from_secs(20), "the partition settled", || async {
            consumer_settled(&js, handler, partition, seq).await
        })
        .await;
    }
    for (handler, seq, attempts) in [
        ("looper", seqs[0], 4),
        ("hog", seqs[1], 4),
        ("panicker", seqs[2], 4),
        ("refuser", seqs[3], 1),
    ] {
        assert_eq!(
            attempt(&js, handler, seq).await.expect("record").attempts,
            attempts,
            "{handler}"
        );
    }
    assert_eq!(host.get("/healthz").await.0, 200);
    let metrics = host.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(r#"hookmesh_events_handled_total{handler="looper",outcome="trap"} 4"#),
        "{metrics}"
    );
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn the_manifests_memory_cap_is_the_one_that_stops_a_guest() {
    // The same guest asks for 48 MiB (far below the host's pool limit):
    // under a 32 MiB manifest cap it traps, under 64 MiB it succeeds.
    let nats = NatsServer::start().expect("nats");
    let hog = |name: &str, memory_mib: u64| {
        let mut m = manifest(name, "fixture_memory_hog", "crm.hog.>");
        m.memory = memory_mib << 20;
        m.max_deliver = 1;
        m.config.insert("mib".into(), "48".into());
        m
    };
    let host = host_with(&nats, vec![hog("capped", 32), hog("roomy", 64)]).await;
    let js = jetstream(&nats).await;
    let body = serde_json::to_vec(&json!({"type": "hog.go", "data": {"id": "M-1"}})).expect("json");
    let seq = host.send("crm", body, "m-1").await.json["stream_seq"]
        .as_u64()
        .expect("seq");
    wait_for(
        Duration::from_secs(20),
        "48 MiB held under 64 MiB",
        || async { messages(&js, "hook.roomy.").await.len() == 1 },
    )
    .await;
    assert_eq!(messages(&js, "hook.roomy.").await[0].1, json!(48));
    assert!(
        attempt(&js, "roomy", seq).await.is_none(),
        "no failed attempt"
    );
    wait_for(
        Duration::from_secs(20),
        "the capped attempt failed",
        || async { attempt(&js, "capped", seq).await.is_some() },
    )
    .await;
    let record = attempt(&js, "capped", seq).await.expect("record");
    assert_eq!(
        record.reason,
        hookmesh::dispatch::Reason::Trap,
        "{record:?}"
    );
    assert!(messages(&js, "hook.capped.").await.is_empty());
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn a_flaky_handler_succeeds_on_retry_and_emits_once_even_when_run_again() {
    let nats = NatsServer::start().expect("nats");
    let flaky = manifest("flaky", "fixture_flaky", "crm.order.>");
    let host = host_with(&nats, vec![flaky.clone()]).await;
    let js = jetstream(&nats).await;
    let seq = host
        .send("crm", crm_order("order.created", "ORD-F", 1), "f-1")
        .await
        .json["stream_seq"]
        .as_u64()
        .expect("seq");
    wait_for(
        Duration::from_secs(10),
        "success after two transient failures",
        || async { messages(&js, "hook.flaky.").await.len() == 1 },
    )
    .await;
    let record = attempt(&js, "flaky", seq).await.expect("record");
    assert_eq!(
        (record.attempts, record.reason),
        (2, hookmesh::dispatch::Reason::Transient)
    );
    assert_eq!(
        messages(&js, "hook.flaky.").await[0].1,
        json!(3),
        "succeeded on attempt 3"
    );
    host.shutdown().await.expect("stop");

    // Ops reset the handler: its consumers are deleted and recreated, so it
    // runs again for the same event — and its emit is deduplicated.
    let stream = events(&js).await;
    for partition in 0..16 {
        let _ = stream
            .delete_consumer(&flaky.consumer_name(partition))
            .await;
    }
    let host = host_with(&nats, vec![flaky]).await;
    wait_for(
        Duration::from_secs(10),
        "the event handled again",
        || async {
            stream
                .clone()
                .consumer_info(format!(
                    "handler_flaky_{}",
                    hookmesh::subject::partition("crm", "order", "ORD-F", 16)
                ))
                .await
                .is_ok_and(|i| i.ack_floor.stream_sequence >= seq)
        },
    )
    .await;
    assert_eq!(
        messages(&js, "hook.flaky.").await.len(),
        1,
        "the re-emit was deduplicated"
    );
    host.shutdown().await.expect("stop");
}

#[tokio::test]
async fn the_sandbox_denies_files_environment_clock_and_network_unless_granted() {
    let nats = NatsServer::start().expect("nats");
    let denied = manifest("probe", "fixture_sandbox", "crm.probe.>");
    let mut granted = manifest("granted", "fixture_sandbox", "crm.probe.>");
    granted.sandbox.clock = true;
    granted.sandbox.env.insert("REGION".into(), "eu".into());
    let host = host_with(&nats, vec![denied, granted]).await;
    let js = jetstream(&nats).await;
    let body = serde_json::to_vec(&json!({"type":"probe.run","data":{"id":"P-1"}})).expect("json");
    assert_eq!(host.send("crm", body, "p-1").await.status, 202);
    wait_for(Duration::from_secs(10), "both reports", || async {
        messages(&js, "hook.probe.").await.len() == 1
            && messages(&js, "hook.granted.").await.len() == 1
    })
    .await;
    let report = &messages(&js, "hook.probe.").await[0].1;
    assert!(
        report["read_dir_root"]
            .as_str()
            .expect("str")
            .starts_with("Err"),
        "{report}"
    );
    assert!(
        report["read_passwd"]
            .as_str()
            .expect("str")
            .starts_with("Err"),
        "{report}"
    );
    assert_eq!(report["env_count"], 0, "{report}");
    assert_eq!(report["home"], "None", "{report}");
    assert_eq!(report["now_unix_secs"], 0, "the clock is frozen: {report}");
    assert!(
        report["tcp"].as_str().expect("str").starts_with("Err"),
        "{report}"
    );

    let report = &messages(&js, "hook.granted.").await[0].1;
    assert_eq!(report["env_count"], 1, "{report}");
    assert!(
        report["now_unix_secs"].as_i64().expect("secs") > 1_700_000_000,
        "{report}"
    );
    assert!(
        report["read_passwd"]
            .as_str()
            .expect("str")
            .starts_with("Err"),
        "still no files: {report}"
    );
}

#[tokio::test]
async fn a_guest_receives_the_event_exactly_as_it_is_stored() {
    let nats = NatsServer::start().expect("nats");
    let host = host_with(
        &nats,
        vec![manifest("probe", "fixture_sandbox", "crm.probe.>")],
    )
    .await;
    let js = jetstream(&nats).await;
    let body = serde_json::to_vec(&json!({"type":"probe.run","data":{"id":"P-2"}})).expect("json");
    assert_eq!(host.send("crm", body, "p-2").await.status, 202);
    wait_for(Duration::from_secs(10), "the report", || async {
        messages(&js, "hook.probe.").await.len() == 1
    })
    .await;
    let report = &messages(&js, "hook.probe.").await[0].1;
    // Every field and every header, compared with the stored message (not
    // with what this test sent): the host lowers the event borrowed from
    // the delivery, and a value put in the wrong field would show here.
    let stored = stored_messages(&js, EVENTS_STREAM)
        .await
        .into_iter()
        .find(|m| m.subject.starts_with("hook.crm.probe."))
        .expect("the webhook's stored event");
    let stored_header = |name: &str| {
        stored
            .headers
            .get(name)
            .map(|value| Value::from(value.as_str()))
            .unwrap_or(Value::Null)
    };
    let mut stored_headers: Vec<(String, String)> = stored
        .headers
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |value| (name.to_string(), value.as_str().to_string()))
        })
        .collect();
    stored_headers.sort();
    assert!(stored_headers.len() >= 8, "{stored_headers:?}");
    let seen = &report["event"];
    let mut seen_headers: Vec<(String, String)> =
        serde_json::from_value(seen["headers"].clone()).expect("headers");
    seen_headers.sort();
    assert_eq!(seen_headers, stored_headers);
    assert_eq!(seen["subject"], stored.subject.as_str());
    assert_eq!(
        seen["payload"],
        String::from_utf8_lossy(&stored.payload).as_ref()
    );
    assert_eq!(seen["idempotency_key"], stored_header(header::MSG_ID));
    assert_eq!(seen["id"], stored_header(header::EVENT_ID));
    assert_eq!(seen["provider"], stored_header(header::PROVIDER));
    assert_eq!(seen["event_type"], stored_header(header::EVENT_TYPE));
    assert_eq!(seen["domain"], stored_header(header::DOMAIN));
    assert_eq!(seen["entity_id"], stored_header(header::ENTITY));
    assert_eq!(
        seen["entity_version"],
        stored_header(header::ENTITY_VERSION)
    );
    assert_eq!(
        seen["correlation_id"],
        stored_header(header::CORRELATION_ID)
    );
    assert_eq!(seen["received_at"], stored_header(header::RECEIVED_AT));
    assert_eq!(seen["attempt"], 1);
    for field in [
        "id",
        "idempotency_key",
        "provider",
        "event_type",
        "domain",
        "entity_id",
        "correlation_id",
        "received_at",
    ] {
        assert!(seen[field].is_string(), "{field} missing: {seen}");
    }
}

#[tokio::test]
async fn a_changed_manifest_updates_the_existing_consumers() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let mut recorder = manifest("recorder", "fixture_recorder", "crm.order.>");
    let host = host_with(&nats, vec![recorder.clone()]).await;
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-U", 1), "u-1")
            .await
            .status,
        202
    );
    wait_for(Duration::from_secs(10), "handled", || async {
        messages(&js, "hook.recorder.").await.len() == 1
    })
    .await;
    host.shutdown().await.expect("stop");

    recorder.max_deliver = 7;
    recorder.ack_wait = Duration::from_secs(20);
    let host = host_with(&nats, vec![recorder]).await;
    let stream = events(&js).await;
    wait_for(Duration::from_secs(10), "consumers updated", || async {
        let info = stream.clone().consumer_info("handler_recorder_3").await;
        info.is_ok_and(|i| {
            i.config.max_deliver == 7 && i.config.ack_wait == Duration::from_secs(20)
        })
    })
    .await;
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-U", 2), "u-2")
            .await
            .status,
        202
    );
    wait_for(Duration::from_secs(10), "still handling", || async {
        messages(&js, "hook.recorder.").await.len() == 2
    })
    .await;
}

#[tokio::test]
async fn give_up_advisories_are_captured_for_the_dead_letter_queue() {
    let nats = NatsServer::start().expect("nats");
    let host = host_with(
        &nats,
        vec![manifest("refuser", "fixture_permanent", "crm.order.>")],
    )
    .await;
    let js = jetstream(&nats).await;
    let seq = host
        .send("crm", crm_order("order.created", "ORD-D", 1), "d-1")
        .await
        .json["stream_seq"]
        .as_u64()
        .expect("seq");
    let advisories = js
        .get_stream("HOOK_ADVISORIES")
        .await
        .expect("capture stream");
    wait_for(
        Duration::from_secs(10),
        "the MSG_TERMINATED advisory captured",
        || async {
            advisories
                .clone()
                .info()
                .await
                .is_ok_and(|i| i.state.messages == 1)
        },
    )
    .await;
    let captured = advisories.get_raw_message(1).await.expect("advisory");
    assert!(
        captured
            .subject
            .starts_with("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.HOOK_EVENTS.handler_refuser_"),
        "{}",
        captured.subject
    );
    let advisory: Value = serde_json::from_slice(&captured.payload).expect("json");
    assert_eq!(advisory["stream_seq"], seq);
}
