//! Every answer of the ingress table, over real HTTP against a real server.

use std::time::{Duration, SystemTime};

use futures::future::join_all;
use hookmesh_test_support::NatsServer;

use crate::support::*;

#[tokio::test]
async fn accepted_webhook_is_stored_with_design_headers_and_exact_body() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let body = crm_order("order.created", "ORD-1", 3);
    let signed = host.sign("crm", body.clone(), "msg_1", SystemTime::now());
    let mut headers = signed.headers;
    headers.insert("x-correlation-id", "corr-42".parse().expect("header"));
    headers.insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .expect("header"),
    );
    let answer = host.post("crm", headers, signed.body.clone()).await;

    assert_eq!(answer.status, 202, "{:?}", answer.json);
    let json = &answer.json;
    assert_eq!(json["status"], "accepted");
    assert_eq!(json["idempotency_key"], "crm:msg_1");
    assert_eq!(json["event_id"], "msg_1");
    assert_eq!(json["subject"], "hook.crm.order.6.ORD-1.order.created");
    assert_eq!(json["correlation_id"], "corr-42");
    assert_eq!(answer.headers["x-correlation-id"], "corr-42");
    let seq = json["stream_seq"].as_u64().expect("stream_seq");

    let js = jetstream(&nats).await;
    let message = events(&js)
        .await
        .get_raw_message(seq)
        .await
        .expect("stored");
    assert_eq!(
        message.subject.as_str(),
        "hook.crm.order.6.ORD-1.order.created"
    );
    assert_eq!(
        message.payload.as_ref(),
        body.as_slice(),
        "payload is the body byte for byte"
    );
    let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_string());
    assert_eq!(header("Nats-Msg-Id").as_deref(), Some("crm:msg_1"));
    assert_eq!(header("Hook-Provider").as_deref(), Some("crm"));
    assert_eq!(header("Hook-Event-Id").as_deref(), Some("msg_1"));
    assert_eq!(header("Hook-Event-Type").as_deref(), Some("order.created"));
    assert_eq!(header("Hook-Domain").as_deref(), Some("order"));
    assert_eq!(header("Hook-Entity").as_deref(), Some("ORD-1"));
    assert_eq!(header("Hook-Entity-Version").as_deref(), Some("3"));
    assert_eq!(header("Hook-Correlation-Id").as_deref(), Some("corr-42"));
    assert_eq!(
        header("traceparent").as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(header("Content-Type").as_deref(), Some("application/json"));
    let received = header("Hook-Received-At").expect("received-at");
    let received = humantime::parse_rfc3339(&received).expect("RFC 3339");
    assert!(
        SystemTime::now()
            .duration_since(received)
            .expect("in the past")
            < Duration::from_secs(60)
    );
}

#[tokio::test]
async fn each_scheme_is_accepted_and_routed_by_its_fields() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let stripe = br#"{"id":"evt_1","type":"charge.succeeded","data":{"object":{"id":"ch_1","object":"charge"}}}"#;
    let github = br#"{"repository":{"full_name":"acme/api"}}"#;
    let shop = br#"{"id":820982911946154508}"#;
    let cases = [
        (
            "stripe",
            stripe.to_vec(),
            "evt_1",
            "stripe:evt_1",
            "hook.stripe.charge.",
        ),
        ("github", github.to_vec(), "d1", "github:d1", "hook.github."),
        ("shop", shop.to_vec(), "s1", "shop:s1", "hook.shop."),
    ];
    for (provider, body, id, key, prefix) in cases {
        let signed = host.sign(provider, body, id, SystemTime::now());
        let mut headers = signed.headers;
        // GitHub and Shopify carry the event type in a header.
        headers.insert("x-github-event", "push".parse().expect("header"));
        headers.insert("x-shopify-topic", "orders/create".parse().expect("header"));
        let answer = host.post(provider, headers, signed.body).await;
        assert_eq!(answer.status, 202, "{provider}: {:?}", answer.json);
        assert_eq!(answer.json["idempotency_key"], key);
        let subject = answer.json["subject"].as_str().expect("subject");
        assert!(subject.starts_with(prefix), "{subject}");
    }
    let js = jetstream(&nats).await;
    assert_eq!(stored_count(&js).await, 3);
}

#[tokio::test]
async fn redelivery_is_a_duplicate_with_the_original_receipt() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let body = crm_order("order.created", "ORD-1", 1);
    let first = host.send("crm", body.clone(), "msg_dup").await;
    assert_eq!(first.status, 202);
    let again = host.send("crm", body, "msg_dup").await;
    assert_eq!(again.status, 200, "{:?}", again.json);
    assert_eq!(again.json["status"], "duplicate");
    for field in [
        "idempotency_key",
        "event_id",
        "subject",
        "stream_seq",
        "correlation_id",
    ] {
        assert_eq!(again.json[field], first.json[field], "{field}");
    }
    assert_eq!(stored_count(&jetstream(&nats).await).await, 1);
}

#[tokio::test]
async fn duplicates_are_caught_after_the_stream_window_by_the_idempotency_bucket() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        duplicate_window: "1s",
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let body = crm_order("order.created", "ORD-9", 1);
    let first = host.send("crm", body.clone(), "msg_late").await;
    assert_eq!(first.status, 202);
    // Past the stream's duplicate window only the KV record remembers it.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let late = host.send("crm", body, "msg_late").await;
    assert_eq!(late.status, 200, "{:?}", late.json);
    assert_eq!(late.json["stream_seq"], first.json["stream_seq"]);
    let js = jetstream(&nats).await;
    assert_eq!(stored_count(&js).await, 1);
    let kv = js.get_key_value("hook_idempotency").await.expect("bucket");
    let record = kv
        .get("crm=3Amsg_late")
        .await
        .expect("get")
        .expect("record kept");
    let record: serde_json::Value = serde_json::from_slice(&record).expect("json");
    assert_eq!(record["stream_seq"], first.json["stream_seq"]);
}

#[tokio::test]
async fn fifty_concurrent_identical_requests_store_one_message_and_all_succeed() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let signed = host.sign(
        "crm",
        crm_order("order.created", "ORD-R", 1),
        "msg_race",
        SystemTime::now(),
    );
    let answers =
        join_all((0..50).map(|_| host.post("crm", signed.headers.clone(), signed.body.clone())))
            .await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 200),
        "{statuses:?}"
    );
    assert!(statuses.contains(&202), "{statuses:?}");
    let seqs: std::collections::BTreeSet<_> = answers
        .iter()
        .map(|a| a.json["stream_seq"].as_u64())
        .collect();
    assert_eq!(
        seqs.len(),
        1,
        "every answer names the one stored message: {seqs:?}"
    );
    assert_eq!(stored_count(&jetstream(&nats).await).await, 1);
}

#[tokio::test]
async fn a_retry_after_a_crash_between_publish_and_record_is_stored_once_and_recorded() {
    // The state a host killed after the PubAck and before the KV write
    // leaves behind: the event is in the stream, its record is not.
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let js = jetstream(&nats).await;
    let body = crm_order("order.created", "ORD-C", 1);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "crm:msg_crash");
    let ack = js
        .publish_with_headers(
            "hook.crm.order.1.ORD-C.order.created",
            headers,
            body.clone().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("ack");

    let retry = host.send("crm", body, "msg_crash").await;
    assert!(
        retry.status == 200 || retry.status == 202,
        "{:?}",
        retry.json
    );
    assert_eq!(retry.json["stream_seq"], ack.sequence);
    assert_eq!(stored_count(&js).await, 1);
    let kv = js.get_key_value("hook_idempotency").await.expect("bucket");
    assert!(
        kv.get("crm=3Amsg_crash").await.expect("get").is_some(),
        "the retry wrote the record"
    );
}

#[tokio::test]
async fn bad_signatures_and_stale_timestamps_are_401_and_store_nothing() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let body = crm_order("order.created", "ORD-1", 1);

    let mut tampered = host.sign("crm", body.clone(), "msg_a", SystemTime::now());
    tampered.body[10] ^= 1;
    let answer = host.post("crm", tampered.headers, tampered.body).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json["error"], "no valid signature");

    let stale = host.sign(
        "crm",
        body.clone(),
        "msg_b",
        SystemTime::now() - Duration::from_secs(301),
    );
    let answer = host.post("crm", stale.headers, stale.body).await;
    assert_eq!(answer.status, 401);
    assert!(
        answer.json["error"]
            .as_str()
            .expect("error")
            .contains("timestamp"),
        "{:?}",
        answer.json
    );

    let future = host.sign(
        "crm",
        body.clone(),
        "msg_c",
        SystemTime::now() + Duration::from_secs(301),
    );
    assert_eq!(
        host.post("crm", future.headers, future.body).await.status,
        401
    );

    let unsigned = host.post("crm", http::HeaderMap::new(), body).await;
    assert_eq!(unsigned.status, 401);
    assert!(
        unsigned.json["error"]
            .as_str()
            .expect("error")
            .contains("missing header")
    );

    let stripe = host.sign(
        "stripe",
        br#"{"id":"evt_x"}"#.to_vec(),
        "evt_x",
        SystemTime::now(),
    );
    // A valid Stripe signature is no CRM signature.
    assert_eq!(
        host.post("crm", stripe.headers, stripe.body).await.status,
        401
    );

    assert_eq!(stored_count(&jetstream(&nats).await).await, 0);
    let metrics = host.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(
            r#"hookmesh_webhooks_rejected_total{provider="crm",reason="bad_signature"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"hookmesh_webhooks_rejected_total{provider="crm",reason="stale_timestamp"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"hookmesh_webhooks_rejected_total{provider="crm",reason="missing_header"} 2"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn unknown_provider_is_404() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let signed = host.sign(
        "crm",
        crm_order("order.created", "ORD-1", 1),
        "m",
        SystemTime::now(),
    );
    let answer = host.post("nobody", signed.headers, signed.body).await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.json["error"], "unknown provider");
    let metrics = host.admin_get("/metrics").await.1;
    assert!(
        metrics.contains(
            r#"hookmesh_webhooks_rejected_total{provider="unknown",reason="unknown_provider"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        max_body_bytes: 4_096,
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let padding = "x".repeat(5_000);
    let body = serde_json::to_vec(
        &serde_json::json!({"type":"order.created","data":{"id":"ORD-1","pad":padding}}),
    )
    .expect("json");
    let answer = host.send("crm", body, "msg_big").await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json["error"], "body larger than 4096 bytes");

    // Without Content-Length (chunked), the limit holds while streaming.
    let signed = host.sign("crm", vec![b' '; 5_000], "msg_chunked", SystemTime::now());
    let stream = futures::stream::iter(
        signed
            .body
            .chunks(1_000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/crm", host.base))
        .headers(signed.headers)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 413);
    assert_eq!(stored_count(&jetstream(&nats).await).await, 0);
}

#[tokio::test]
async fn unextractable_required_fields_are_422_naming_the_field() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let no_entity = br#"{"type":"order.created","data":{"total":"1"}}"#.to_vec();
    let answer = host.send("crm", no_entity, "msg_1").await;
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json["field"], "entity_id");
    assert_eq!(answer.json["error"], "entity_id not found at json:/data/id");

    let no_type = br#"{"data":{"id":"ORD-1"}}"#.to_vec();
    let answer = host.send("crm", no_type, "msg_2").await;
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json["field"], "event_type");

    let not_json = b"type=order.created".to_vec();
    let answer = host.send("crm", not_json, "msg_3").await;
    assert_eq!(answer.status, 422);
    assert_eq!(answer.json["field"], "event_type");
    assert_eq!(stored_count(&jetstream(&nats).await).await, 0);
}

#[tokio::test]
async fn health_readiness_and_metrics_report_the_host() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    // Both listeners answer health and readiness; only the admin listener
    // has the metrics (and the console), never the providers' one.
    let ready = (200, "ready\n".to_string());
    assert_eq!(host.get("/healthz").await.0, 200);
    assert_eq!(host.get("/readyz").await, ready);
    assert_eq!(host.admin_get("/healthz").await.0, 200);
    assert_eq!(host.admin_get("/readyz").await, ready);
    assert_eq!(host.get("/metrics").await.0, 404);
    assert_eq!(host.get("/console").await.0, 404);
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-1", 1), "m1")
            .await
            .status,
        202
    );
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-1", 1), "m1")
            .await
            .status,
        200
    );
    let (status, metrics) = host.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"hookmesh_webhooks_accepted_total{provider="crm"} 1"#,
        r#"hookmesh_webhooks_duplicates_total{provider="crm"} 1"#,
        "hookmesh_publish_duration_seconds_count 2",
        "hookmesh_webhooks_in_flight 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    host.shutdown().await.expect("clean shutdown");
}
