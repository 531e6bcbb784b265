//! 503 while JetStream is away or slow, and recovery without a restart.

use std::time::Duration;

use hookmesh_test_support::NatsServer;

use crate::support::*;

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn nats_down_gives_503_with_retry_after_then_the_host_recovers_by_itself() {
    let mut nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-1", 1), "before")
            .await
            .status,
        202
    );

    nats.stop();
    let answer = host
        .send("crm", crm_order("order.created", "ORD-1", 2), "during")
        .await;
    assert_eq!(answer.status, 503, "{:?}", answer.json);
    assert_eq!(answer.headers["retry-after"], "3");
    assert_eq!(answer.json["status"], "unavailable");
    wait_for(Duration::from_secs(10), "readyz 503", || async {
        host.get("/readyz").await.0 == 503
    })
    .await;

    nats.restart().expect("nats restarts");
    host.wait_ready().await;
    // The provider's retry of the refused event now lands, once.
    let retry = host
        .send("crm", crm_order("order.created", "ORD-1", 2), "during")
        .await;
    assert!(
        retry.status == 202 || retry.status == 200,
        "{:?}",
        retry.json
    );
    assert_eq!(stored_count(&jetstream(&nats).await).await, 2);
    let metrics = host.admin_get("/metrics").await.1;
    assert!(metrics.contains(r#"reason="unavailable"} 1"#), "{metrics}");
}

#[tokio::test]
async fn jetstream_slower_than_the_publish_timeout_gives_503() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        publish_timeout: "300ms",
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let pid = nats.pid().expect("running");

    // A paused server keeps its TCP connection but answers nothing.
    signal(pid, "-STOP");
    let started = std::time::Instant::now();
    let answer = host
        .send("crm", crm_order("order.created", "ORD-2", 1), "slow")
        .await;
    let waited = started.elapsed();
    signal(pid, "-CONT");
    assert_eq!(answer.status, 503, "{:?}", answer.json);
    assert!(answer.headers.contains_key("retry-after"));
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");

    host.wait_ready().await;
    let retry = host
        .send("crm", crm_order("order.created", "ORD-2", 1), "slow")
        .await;
    assert!(
        retry.status == 202 || retry.status == 200,
        "{:?}",
        retry.json
    );
    assert_eq!(
        stored_count(&jetstream(&nats).await).await,
        1,
        "stored once, whether or not the paused publish landed"
    );
}

#[tokio::test]
async fn a_host_started_before_nats_serves_503_then_becomes_ready() {
    let mut nats = NatsServer::start().expect("nats");
    nats.stop();
    let host = TestHost::spawn(&nats.url(), Options::default()).await;
    wait_for(Duration::from_secs(10), "host answers", || async {
        host.get("/healthz").await.0 == 200
    })
    .await;
    assert_eq!(host.get("/readyz").await.0, 503);
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-3", 1), "early")
            .await
            .status,
        503
    );

    nats.restart().expect("nats starts");
    host.wait_ready().await;
    assert_eq!(
        host.send("crm", crm_order("order.created", "ORD-3", 1), "early")
            .await
            .status,
        202
    );
}
