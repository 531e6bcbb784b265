//! NATS down for 10 s: rows back off (their aggregate's later rows waiting
//! behind them) and are published once it is back; rows that reach
//! `max_attempts` are `failed`, logged with their id, hold their aggregate
//! back, and `outbox retry --failed` brings them back (audited).

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hookmesh::audit::{Action, AuditRecord};
use hookmesh_test_support::NatsServer;
use serde_json::json;

use super::{Bed, RunningRelay, apply_streams, assert_once_in_order, relayed};
use crate::support::{stored_messages, wait_for};

/// Log lines written by the relays of this test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

/// Four aggregates × three rows; the rows and the first row of each.
async fn insert_rows(bed: &Bed, prefix: &str) -> (Vec<(i64, String)>, Vec<i64>) {
    let mut rows = Vec::new();
    let mut heads = Vec::new();
    for n in 0..3 {
        for aggregate in 0..4 {
            let id = format!("{prefix}-{aggregate}");
            let row = bed
                .insert(("shipment", &id), "shipment.moved", json!({"n": n}))
                .await;
            if n == 0 {
                heads.push(row);
            }
            rows.push((row, id));
        }
    }
    (rows, heads)
}

#[tokio::test]
async fn rows_back_off_while_nats_is_down_then_publish_and_failed_rows_wait_for_a_retry() {
    // The relays run on this test's thread, so a thread-local subscriber
    // hears them.
    let log = Captured::default();
    let writer = log.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let mut nats = NatsServer::start().expect("nats");
    let js = apply_streams(&nats).await;
    // `erp` rides out the outage; `wms` gives up after three attempts.
    let patient = Bed::new("outbox_events", true).await;
    let fragile = Bed::new("outbox_events", true).await;
    let mut erp = patient.outbox("erp");
    erp.max_attempts = 1000;
    erp.backoff.initial = Duration::from_millis(200);
    erp.backoff.max = Duration::from_secs(1);
    let mut wms = fragile.outbox("wms");
    wms.max_attempts = 3;
    let erp_relay = RunningRelay::start(erp, &nats.url()).await;
    let wms_relay = RunningRelay::start(wms.clone(), &nats.url()).await;

    let first_erp = patient
        .insert(("shipment", "before"), "shipment.moved", json!({}))
        .await;
    let first_wms = fragile
        .insert(("shipment", "before"), "shipment.moved", json!({}))
        .await;
    patient.wait_all_published(Duration::from_secs(20)).await;
    fragile.wait_all_published(Duration::from_secs(20)).await;

    nats.stop();
    let down = Instant::now();
    let (mut erp_rows, erp_heads) = insert_rows(&patient, "E").await;
    let (mut wms_rows, wms_heads) = insert_rows(&fragile, "W").await;

    // Only the first row of each aggregate is tried; it backs off, or fails.
    wait_for(
        Duration::from_secs(10),
        "erp's first rows back off",
        || async {
            patient.rows().await.iter().all(|(id, status, attempts)| {
                if *id == first_erp {
                    status == "published"
                } else if erp_heads.contains(id) {
                    status == "pending" && *attempts >= 3
                } else {
                    status == "pending" && *attempts == 0
                }
            })
        },
    )
    .await;
    wait_for(Duration::from_secs(10), "wms's first rows fail", || async {
        fragile.rows().await.iter().all(|(id, status, attempts)| {
            if *id == first_wms {
                status == "published"
            } else if wms_heads.contains(id) {
                status == "failed" && *attempts == 3
            } else {
                status == "pending" && *attempts == 0
            }
        })
    })
    .await;
    let backing_off: bool = patient
        .client
        .query_one(
            "SELECT bool_and(next_attempt_at > created_at) FROM outbox_events WHERE attempts > 0",
            &[],
        )
        .await
        .expect("read")
        .get(0);
    assert!(backing_off);
    let text = log.text();
    for head in &wms_heads {
        assert!(
            text.lines()
                .any(|l| l.contains("outbox row failed") && l.contains(&format!("row={head} "))),
            "no log of failed row {head}:\n{text}"
        );
    }

    // Ten seconds of outage, then NATS is back: erp's rows go out.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    nats.restart().expect("nats restarts");
    patient.wait_all_published(Duration::from_secs(30)).await;
    erp_rows.insert(0, (first_erp, "before".to_string()));
    assert_once_in_order(&relayed(&js, "erp").await, &erp_rows);

    // wms works again (a new aggregate goes out), but the failed rows and
    // the rows behind them stay where they are.
    let fresh = fragile
        .insert(("shipment", "after"), "shipment.moved", json!({}))
        .await;
    wait_for(
        Duration::from_secs(20),
        "a new wms row goes out",
        || async {
            fragile
                .rows()
                .await
                .iter()
                .any(|(id, status, _)| *id == fresh && status == "published")
        },
    )
    .await;
    let held = fragile.rows().await;
    for (id, status, _) in &held {
        if wms_heads.contains(id) {
            assert_eq!(status, "failed", "row {id}");
        } else if *id != first_wms && *id != fresh {
            assert_eq!(
                status, "pending",
                "row {id} waits behind its aggregate's failed row"
            );
        }
    }
    assert_eq!(relayed(&js, "wms").await.len(), 2);
    assert!(
        wms_relay
            .metrics
            .render()
            .contains("hookmesh_outbox_failed_total{source=\"wms\"} 4")
    );

    let retried = hookmesh::outbox::commands::retry_failed(&js, &wms, None, "outage-test")
        .await
        .expect("retry");
    assert_eq!(retried, wms_heads);
    fragile.wait_all_published(Duration::from_secs(30)).await;
    wms_rows.insert(0, (first_wms, "before".to_string()));
    wms_rows.push((fresh, "after".to_string()));
    assert_once_in_order(&relayed(&js, "wms").await, &wms_rows);

    let audit = stored_messages(&js, "HOOK_AUDIT").await;
    let last = audit.last().expect("an audit record");
    assert_eq!(last.subject.as_str(), "audit.outbox-retry.wms");
    let record: AuditRecord = serde_json::from_slice(&last.payload).expect("record");
    assert_eq!(record.action, Action::OutboxRetry);
    assert_eq!(record.actor, "outage-test");
    let rows = record.outbox.expect("the rows");
    assert_eq!((rows.count, rows.ids), (4, wms_heads.clone()));
    assert_eq!(rows.table, "outbox_events");

    // Nothing failed is left: a second retry changes nothing, audits nothing.
    let again = hookmesh::outbox::commands::retry_failed(&js, &wms, None, "outage-test")
        .await
        .expect("retry");
    assert!(again.is_empty());
    assert_eq!(stored_messages(&js, "HOOK_AUDIT").await.len(), audit.len());
    erp_relay.stop().await;
    wms_relay.stop().await;
}
