//! Per-entity order, proven with a handler that records the order it saw:
//! while an earlier event waits for its retry, across a host restart in the
//! middle of retries, and with two hosts consuming at once.

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use hookmesh::manifest::Manifest;
use hookmesh::subject::partition;
use hookmesh_test_support::NatsServer;
use serde_json::json;

use crate::support::*;

fn recorder(backoff_ms: u64) -> Manifest {
    let mut manifest = manifest("recorder", "fixture_recorder", "crm.order.>");
    manifest.max_deliver = 10;
    manifest.backoff.initial = Duration::from_millis(backoff_ms);
    manifest.backoff.max = Duration::from_millis(backoff_ms * 2);
    manifest
}

fn event(entity: &str, fail_until_attempt: u32) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "order.updated",
        "data": {"id": entity},
        "fail_until_attempt": fail_until_attempt,
    }))
    .expect("json")
}

/// What the recorder saw for an entity, in order.
async fn seen(js: &jetstream::Context, entity: &str) -> Vec<String> {
    let kv = js.get_key_value("hook_state").await.expect("bucket");
    let key = format!(
        "recorder.{}",
        hookmesh::extract::kv_key(&format!("seen/{entity}"))
    );
    kv.get(key)
        .await
        .expect("get")
        .map(|v| {
            String::from_utf8_lossy(&v)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Two entity ids on different partitions.
fn two_partitions() -> (String, String) {
    let first = "ORD-A".to_string();
    let p = partition("crm", "order", &first, 16);
    let second = (0..)
        .map(|i| format!("ORD-B{i}"))
        .find(|e| partition("crm", "order", e, 16) != p)
        .expect("some entity elsewhere");
    (first, second)
}

#[tokio::test]
async fn an_entitys_later_events_wait_for_its_retried_event_while_other_entities_go_on() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![recorder(500)],
            ..Options::default()
        },
    )
    .await;
    let js = jetstream(&nats).await;
    let (slow, fast) = two_partitions();
    // The slow entity's first event fails twice (≈ 0.5 s + 1 s of backoff).
    host.send("crm", event(&slow, 2), "s-1").await;
    host.send("crm", event(&slow, 0), "s-2").await;
    host.send("crm", event(&slow, 0), "s-3").await;
    host.send("crm", event(&fast, 0), "f-1").await;
    host.send("crm", event(&fast, 0), "f-2").await;

    wait_for(Duration::from_secs(10), "the other entity done", || async {
        seen(&js, &fast).await.len() == 2
    })
    .await;
    assert!(
        seen(&js, &slow).await.is_empty(),
        "s-2 and s-3 wait behind the retried s-1"
    );
    wait_for(Duration::from_secs(20), "the slow entity done", || async {
        seen(&js, &slow).await.len() == 3
    })
    .await;
    assert_eq!(seen(&js, &slow).await, ["s-1", "s-2", "s-3"]);
    assert_eq!(seen(&js, &fast).await, ["f-1", "f-2"]);
}

#[tokio::test]
async fn order_holds_across_a_host_restart_in_the_middle_of_retries() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let first = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![recorder(700)],
            ..Options::default()
        },
    )
    .await;
    host_send_all(&first, "ORD-R", &[("r-1", 3), ("r-2", 0), ("r-3", 1)]).await;
    // Stop the host while r-1 is between retries.
    wait_for(Duration::from_secs(10), "r-1 failed once", || async {
        hookmesh::dispatch::attempt_record(&js, "recorder", 1)
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    first.shutdown().await.expect("first host stops");
    assert!(seen(&js, "ORD-R").await.is_empty());

    let second = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![recorder(700)],
            ..Options::default()
        },
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "all handled by the new host",
        || async { seen(&js, "ORD-R").await.len() == 3 },
    )
    .await;
    assert_eq!(seen(&js, "ORD-R").await, ["r-1", "r-2", "r-3"]);
    second.shutdown().await.expect("stop");
}

/// A delivery nobody reads any more — to a lost pull request, or one a
/// consumer leader made before it was lost — leaves the event awaiting an
/// ack on the server and in no host's hands until `ack_wait` runs out.
/// The next owner of the partition must not run the entity's later events
/// before it: it holds them back until the server's count agrees.
#[tokio::test]
async fn an_event_delivered_to_a_lost_pull_runs_before_its_entitys_later_events() {
    let logs = Logs::capture();
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let mut handler = recorder(100);
    handler.ack_wait = Duration::from_secs(3);
    handler.timeout = Duration::from_secs(1);
    let worker = |handler: &Manifest| Options {
        handlers: vec![handler.clone()],
        ..Options::default()
    };
    // A first worker creates the partition consumers, then stops cleanly
    // (its leases go at once: the next owner need not wait).
    let first = TestHost::start_with(&nats, worker(&handler)).await;
    wait_partitions_shared(&[&first], "recorder", 16).await;
    first.shutdown().await.expect("first worker stops");

    let ingress = TestHost::start_with(
        &nats,
        Options {
            role: hookmesh::server::Role::Ingress,
            ..Options::default()
        },
    )
    .await;
    let entity = "ORD-LOST";
    host_send_all(&ingress, entity, &[("lost-1", 0)]).await;
    // The delivery that goes astray: pulled, never acked, never read.
    let consumer_name = handler.consumer_name(partition("crm", "order", entity, 16));
    let mut consumer: jetstream::consumer::PullConsumer = events(&js)
        .await
        .get_consumer(&consumer_name)
        .await
        .expect("consumer");
    let mut lost = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("pull");
    let astray = lost.next().await.expect("delivered").expect("message");
    assert!(astray.payload.windows(6).any(|w| w == b"ORD-LO"));
    let pending = consumer.info().await.expect("info").num_ack_pending;
    assert_eq!(pending, 1, "awaiting an ack, in nobody's hands");
    host_send_all(&ingress, entity, &[("lost-2", 0), ("lost-3", 0)]).await;

    let second = TestHost::start_with(&nats, worker(&handler)).await;
    wait_for(Duration::from_secs(15), "all three handled", || async {
        seen(&js, entity).await.len() >= 3
    })
    .await;
    assert_eq!(seen(&js, entity).await, ["lost-1", "lost-2", "lost-3"]);
    assert_eq!(
        logs.lines_with(&["events delivered elsewhere are back", "held=3"])
            .len(),
        1,
        "the owner held lost-2 and lost-3 back until lost-1 was back"
    );
    second.shutdown().await.expect("stop");
    ingress.shutdown().await.expect("stop");
}

async fn host_send_all(host: &TestHost, entity: &str, events: &[(&str, u32)]) {
    for (id, fail) in events {
        assert_eq!(host.send("crm", event(entity, *fail), id).await.status, 202);
    }
}

#[tokio::test]
async fn two_hosts_at_once_keep_every_entitys_order() {
    const ENTITIES: usize = 12;
    const PER_ENTITY: usize = 5;
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let a = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![recorder(150)],
            ..Options::default()
        },
    )
    .await;
    let b = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![recorder(150)],
            ..Options::default()
        },
    )
    .await;
    // Both take part once the partitions are spread over them.
    wait_partitions_shared(&[&a, &b], "recorder", 16).await;
    for n in 0..PER_ENTITY {
        for e in 0..ENTITIES {
            // Every third event fails once first; ingest alternates hosts.
            let fail = u32::from((n + e) % 3 == 0);
            let host = if (n + e) % 2 == 0 { &a } else { &b };
            let answer = host
                .send("crm", event(&format!("E{e}"), fail), &format!("E{e}-{n}"))
                .await;
            assert_eq!(answer.status, 202);
        }
    }
    for e in 0..ENTITIES {
        let entity = format!("E{e}");
        wait_for(
            Duration::from_secs(60),
            "every event of the entity",
            || async { seen(&js, &entity).await.len() >= PER_ENTITY },
        )
        .await;
        let expected: Vec<String> = (0..PER_ENTITY).map(|n| format!("E{e}-{n}")).collect();
        assert_eq!(seen(&js, &entity).await, expected, "entity {entity}");
    }
    let handled = |metrics: String| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(r#"hookmesh_events_handled_total{handler="recorder",outcome="ok"}"#)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (on_a, on_b) = (
        handled(a.admin_get("/metrics").await.1),
        handled(b.admin_get("/metrics").await.1),
    );
    assert_eq!(
        on_a + on_b,
        (ENTITIES * PER_ENTITY) as u64,
        "each event handled once: {on_a} + {on_b}"
    );
    assert!(
        on_a > 0 && on_b > 0,
        "both hosts took part: {on_a} + {on_b}"
    );
}

/// `n` entity ids on the partition of `entity`.
fn neighbours(entity: &str, n: usize) -> Vec<String> {
    let p = partition("crm", "order", entity, 16);
    (0..)
        .map(|i| format!("N{i}"))
        .filter(|e| partition("crm", "order", e, 16) == p)
        .take(n)
        .collect()
}

/// Waits (at most `limit`) until every one of `entities` recorded one event.
async fn all_recorded(js: &jetstream::Context, entities: &[String], limit: Duration, what: &str) {
    wait_for(limit, what, || async {
        for e in entities {
            if seen(js, e).await.is_empty() {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_entity_in_a_long_backoff_holds_back_no_other_entity_of_its_partition() {
    let nats = NatsServer::start().expect("nats");
    let mut manifest = recorder(1000);
    manifest.backoff.max = Duration::from_secs(300);
    let host = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![manifest],
            ..Options::default()
        },
    )
    .await;
    let js = jetstream(&nats).await;
    let failing = "ORD-FAILING";
    let others = neighbours(failing, 200);
    // Fails attempts 1–4: waits of ≈1 s, 2 s and 4 s in hand, then ≈8 s
    // with the entity held; attempt 5 succeeds.
    host.send("crm", event(failing, 4), "f-1").await;
    host.send("crm", event(failing, 0), "f-2").await;
    for (n, e) in others[..100].iter().enumerate() {
        assert_eq!(
            host.send("crm", event(e, 0), &format!("o-{n}"))
                .await
                .status,
            202
        );
    }
    all_recorded(
        &js,
        &others[..100],
        Duration::from_secs(2),
        "100 entities of the failing entity's partition, within 2 s",
    )
    .await;
    assert!(seen(&js, failing).await.is_empty(), "f-1 is still failing");

    // Once its backoff is long, the entity is held: its events wait as
    // sequences in its record, acked, and new ones join them.
    let attempts = js.get_key_value("hook_attempts").await.expect("bucket");
    let key = format!("park.recorder.crm.order.{failing}");
    wait_for(
        Duration::from_secs(20),
        "the failing entity is held",
        || async {
            attempts
                .get(&key)
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
                .is_some_and(|r| r["retry_at"].is_u64())
        },
    )
    .await;
    host.send("crm", event(failing, 0), "f-3").await;
    for (n, e) in others[100..].iter().enumerate() {
        host.send("crm", event(e, 0), &format!("o-{}", n + 100))
            .await;
    }
    all_recorded(
        &js,
        &others[100..],
        Duration::from_secs(2),
        "100 more entities while the failing one is held, within 2 s",
    )
    .await;
    let record: serde_json::Value =
        serde_json::from_slice(&attempts.get(&key).await.expect("get").expect("record"))
            .expect("json");
    assert_eq!(
        record["waiting"].as_array().map(Vec::len),
        Some(3),
        "f-1, f-2 and f-3 wait in the record: {record}"
    );

    wait_for(
        Duration::from_secs(30),
        "the failing entity done",
        || async { seen(&js, failing).await.len() == 3 },
    )
    .await;
    assert_eq!(seen(&js, failing).await, ["f-1", "f-2", "f-3"]);
    let failed = hookmesh::dispatch::attempt_record(&js, "recorder", 1)
        .await
        .expect("read")
        .expect("f-1's attempts");
    assert_eq!(
        failed.attempts, 4,
        "four failed attempts, the fifth succeeded"
    );
    wait_for(Duration::from_secs(5), "the hold record gone", || async {
        attempts.get(&key).await.ok().flatten().is_none()
    })
    .await;
    host.shutdown().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_entities_in_backoff_leave_the_window_to_five_hundred_healthy_ones() {
    const EACH: usize = 500;
    let nats = NatsServer::start().expect("nats");
    let mut manifest = recorder(10_000);
    manifest.backoff.max = Duration::from_secs(300);
    // Four partitions of the smallest window (64): were waiting events kept
    // in it, the ≈125 failing entities of each partition would fill it and
    // the healthy ones could not start.
    manifest.concurrency = 8;
    let host = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![manifest],
            partitions: 4,
            ..Options::default()
        },
    )
    .await;
    let js = jetstream(&nats).await;
    let failing: Vec<String> = (0..EACH).map(|e| format!("BAD-{e}")).collect();
    let healthy: Vec<String> = (0..EACH).map(|e| format!("OK-{e}")).collect();
    for (n, e) in failing.iter().enumerate() {
        // Each fails for good within the test: a 10 s backoff holds it.
        host.send("crm", event(e, 1000), &format!("bad-{n}")).await;
    }
    for (n, e) in healthy.iter().enumerate() {
        host.send("crm", event(e, 0), &format!("ok-{n}")).await;
    }
    all_recorded(
        &js,
        &healthy,
        Duration::from_secs(30),
        "every healthy entity",
    )
    .await;
    for e in failing.iter().take(20) {
        assert!(seen(&js, e).await.is_empty(), "{e} is failing");
    }
    // Every failing entity waits in its record, not in the window: nothing
    // of them is held unacked by the host.
    let attempts = js.get_key_value("hook_attempts").await.expect("bucket");
    wait_for(
        Duration::from_secs(10),
        "all failing entities held",
        || async {
            let mut held = 0;
            for e in &failing {
                if attempts
                    .get(format!(
                        "park.recorder.crm.order.{}",
                        hookmesh::extract::kv_key(e)
                    ))
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    held += 1;
                }
            }
            held == EACH
        },
    )
    .await;
    let events = js.get_stream("HOOK_EVENTS").await.expect("stream");
    let mut unacked = 0;
    for p in 0..4 {
        let mut consumer = events
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!(
                "handler_recorder_{p}"
            ))
            .await
            .expect("consumer");
        unacked += consumer.info().await.expect("info").num_ack_pending;
    }
    assert_eq!(unacked, 0, "no failing event occupies the window");
    host.shutdown().await.expect("stop");
}
