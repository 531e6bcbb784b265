//! Nothing lost, nothing doubled: the real `hookmesh outbox relay` killed
//! with SIGKILL every half second while rows are inserted, and a relay
//! whose database sessions are cut again and again (what a PostgreSQL
//! restart does to it).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hookmesh_test_support::NatsServer;

use super::{
    Bed, RunningRelay, aggregates, apply_streams, assert_once_in_order, insert_rows, pg, relayed,
};
use crate::support::{hookmesh_bin, jetstream};

/// `hookmesh outbox relay` for `source` on `database_url`, logging to
/// `log` (appended).
fn spawn_relay(nats_url: &str, database_url: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(hookmesh_bin())
        .args(["outbox", "relay", "--source", "erp"])
        .current_dir(std::env::temp_dir())
        .env_remove("HOOKMESH_CONFIG")
        .env("HOOKMESH_LOG", "info")
        .env("HOOKMESH_NATS_URL", nats_url)
        .env("HOOKMESH_OUTBOX_ERP_DATABASE_URL", database_url)
        .env("HOOKMESH_OUTBOX_ERP_POLL_INTERVAL", "200ms")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn hookmesh outbox relay")
}

#[tokio::test]
async fn the_relay_process_killed_every_half_second_loses_and_doubles_no_row() {
    let nats = NatsServer::start().expect("nats");
    let js = apply_streams(&nats).await;
    let bed = Bed::new("outbox_events", true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("relay.log");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pg(bed.db.url()).await);
    }

    let ids = aggregates("ORD", 50);
    let inserting = insert_rows(&clients, &bed.table, &ids, 100, 1000);
    tokio::pin!(inserting);
    let mut kills = 0;
    let rows = loop {
        let mut relay = spawn_relay(&nats.url(), bed.db.url(), &log);
        // 0.4–0.6 s of life: the kill lands at any point of a round.
        let life = Duration::from_millis(400 + (kills * 37 % 200));
        let ended = tokio::select! {
            rows = &mut inserting => Some(rows),
            () = tokio::time::sleep(life) => None,
        };
        if let Some(rows) = ended {
            // The last one finishes the work.
            bed.wait_all_published(Duration::from_secs(60)).await;
            let _ = relay.kill();
            let _ = relay.wait();
            break rows;
        }
        relay.kill().expect("SIGKILL");
        relay.wait().expect("reaped");
        kills += 1;
    };
    assert!(kills >= 8, "only {kills} kills while inserting");
    assert_eq!(rows.len(), 5000);
    let events = relayed(&js, "erp").await;
    assert_eq!(events.len(), 5000, "every row exactly once");
    assert_once_in_order(&events, &rows);
    // `E2E_KEEP_LOGS=DIR` keeps the relays' log there.
    if let Some(keep) = std::env::var_os("E2E_KEEP_LOGS") {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(
            &log,
            std::path::Path::new(&keep).join("outbox-relay-kills.log"),
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.matches("relaying: this process holds the table's relay lock")
            .count()
            >= 2,
        "{text}"
    );
}

#[tokio::test]
async fn a_relay_whose_database_sessions_are_cut_again_and_again_loses_and_doubles_no_row() {
    let nats = NatsServer::start().expect("nats");
    let js = apply_streams(&nats).await;
    let bed = Bed::new("outbox_events", true).await;
    let relay = RunningRelay::start(bed.outbox("erp"), &nats.url()).await;
    let clients = vec![pg(bed.db.url()).await, pg(bed.db.url()).await];
    let admin = pg(bed.db.url()).await;

    let ids = aggregates("ORD", 30);
    let inserting = insert_rows(&clients, &bed.table, &ids, 50, 500);
    tokio::pin!(inserting);
    let mut cut = 0;
    let rows = loop {
        tokio::select! {
            rows = &mut inserting => break rows,
            () = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        let ended = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'hookmesh-outbox-erp' AND datname = current_database()",
                &[],
            )
            .await
            .expect("terminate");
        cut += ended.len();
    };
    assert!(cut >= 3, "only {cut} sessions cut");
    bed.wait_all_published(Duration::from_secs(60)).await;
    let events = relayed(&jetstream(&nats).await, "erp").await;
    assert_eq!(events.len(), rows.len(), "every row exactly once");
    assert_once_in_order(&events, &rows);
    drop(js);
    relay.stop().await;
}
