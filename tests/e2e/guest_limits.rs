//! What one guest can make the host do, bounded: a handler flooding its
//! log gets its budget and one truncation notice (counted), and its event
//! still succeeds; a state value or emit larger than NATS stores is refused
//! before anything is sent, as a permanent error — a dead letter at once,
//! never a retry.

use std::time::Duration;

use hookmesh::dlq::store::{self, Selection};
use hookmesh::manifest::Manifest;
use hookmesh_test_support::NatsServer;
use serde_json::json;

use crate::handlers::host_with;
use crate::support::*;

fn order(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"type": "order.created", "data": {"id": id, "version": 1}}))
        .expect("json")
}

/// The value of the sample of `metric` whose labels include `labels`.
fn sample(metrics: &str, metric: &str, labels: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(metric) && line.contains(labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn a_guest_flooding_its_log_is_cut_at_its_budget_and_its_event_still_succeeds() {
    let nats = NatsServer::start().expect("nats");
    // 200 lines of 1 MiB through `log`, and 20 MiB each to stdout and
    // stderr, in one invocation.
    let manifest = format!(
        "name = \"hog\"\ncomponent = {component:?}\nsubject = \"crm.order.>\"\n\
         timeout = \"20s\"\nack_wait = \"40s\"\nmemory = \"32MiB\"\n\
         [config]\nlog_lines = \"200\"\nstdout_lines = \"20\"\n",
        component = guest("fixture_memory_hog").display().to_string(),
    );
    let dir = ServeDir::new(&nats.url(), "hog", &manifest);
    let args = dir.serve_args();
    let host = LoggedProcess::start(dir.path(), &args, "host").await;
    let before = host.log().len();

    send_crm(&host.address, order("ORD-LOG"), "o-log").await;
    wait_for(
        Duration::from_secs(60),
        "the flooding event handled",
        || async {
            sample(
                &host.metrics().await,
                "hookmesh_events_handled_total",
                "handler=\"hog\",outcome=\"ok\"",
            ) == Some(1.0)
        },
    )
    .await;
    let metrics = host.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "hookmesh_guest_log_truncated_total",
            "handler=\"hog\""
        ),
        Some(1.0),
        "one truncated invocation counted"
    );

    let log = host.log();
    let written = log.len() - before;
    // 256 KiB of messages (the default max_log_bytes) plus each line's
    // prefix; nothing of stdout or stderr.
    assert!(
        written < 512 << 10,
        "{written} bytes of host log for 400 MiB the guest wrote"
    );
    let guest_lines = log.lines().filter(|l| l.contains("LLLLLLLL")).count();
    assert!(
        (1..=32).contains(&guest_lines),
        "8 KiB per line, 256 KiB in all: {guest_lines} lines"
    );
    assert!(!log.contains("SSSSSSSS"), "guest stdio reaches nothing");
    assert_eq!(
        log.matches("the handler's log output is truncated").count(),
        1,
        "one notice"
    );
    assert!(
        log.contains("more bytes cut]"),
        "a cut line says how much was cut"
    );
}

fn hog(name: &str, config: &[(&str, &str)]) -> Manifest {
    let mut manifest = manifest(name, "fixture_memory_hog", "crm.order.>");
    manifest.memory = 160 << 20;
    manifest.timeout = Duration::from_secs(5);
    manifest.ack_wait = Duration::from_secs(15);
    manifest.max_deliver = 5;
    for (key, value) in config {
        manifest.config.insert(key.to_string(), value.to_string());
    }
    manifest
}

#[tokio::test]
async fn a_state_value_or_emit_larger_than_nats_takes_is_a_permanent_dead_letter_at_once() {
    let nats = NatsServer::start().expect("nats");
    let state_bytes = (64 << 20).to_string();
    let emit_bytes = (2 << 20).to_string();
    let host = host_with(
        &nats,
        vec![
            hog("big-state", &[("state_bytes", &state_bytes)]),
            hog("big-emit", &[("emit_bytes", &emit_bytes)]),
        ],
    )
    .await;
    host.wait_ready().await;
    let js = jetstream(&nats).await;
    host.send("crm", order("ORD-BIG"), "o-big").await;

    wait_for(Duration::from_secs(30), "two dead letters", || async {
        store::list(&js, &Selection::default())
            .await
            .is_ok_and(|l| l.len() == 2)
    })
    .await;
    let mut letters = store::list(&js, &Selection::default()).await.expect("list");
    letters.sort_by(|a, b| a.handler.cmp(&b.handler));
    let summary: Vec<(&str, &str, u64)> = letters
        .iter()
        .map(|l| (l.handler.as_str(), l.reason.as_str(), l.attempts))
        .collect();
    assert_eq!(
        summary,
        [("big-emit", "permanent", 1), ("big-state", "permanent", 1)],
        "refused at the first attempt, not retried"
    );
    assert!(
        letters[0]
            .error
            .contains("an emit of 2097152 bytes is larger than the"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1]
            .error
            .contains("a value of 67108864 bytes is larger than the"),
        "{}",
        letters[1].error
    );
    for letter in &letters {
        assert!(
            !letter.error.contains("unavailable"),
            "never the transient class: {}",
            letter.error
        );
    }
    // Nothing was written: the state key does not exist.
    assert_eq!(crate::handlers::state(&js, "big-state", "hog").await, None);
}
