//! Per-aggregate order with several relays on one table: 20 aggregates ×
//! 50 rows inserted concurrently, each in a transaction of its own, while
//! three relays run and the leader crashes halfway.

use std::time::Duration;

use futures::future::join_all;
use hookmesh_test_support::NatsServer;
use serde_json::json;

use super::{Bed, RunningRelay, apply_streams, assert_once_in_order, insert, pg, relayed};
use crate::support::wait_for;

const AGGREGATES: usize = 20;
const ROWS_EACH: usize = 50;

#[tokio::test]
async fn three_relays_publish_each_aggregate_in_id_order_exactly_once_across_a_leader_crash() {
    let nats = NatsServer::start().expect("nats");
    let js = apply_streams(&nats).await;
    let bed = Bed::new("outbox_events", true).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        relays.push(RunningRelay::start(bed.outbox("erp"), &nats.url()).await);
    }
    wait_for(Duration::from_secs(10), "one relay leads", || async {
        relays.iter().filter(|r| r.leading()).count() == 1
    })
    .await;

    // Four sessions insert; each aggregate's rows go one transaction after
    // the other (as an application writing one invoice at a time), the
    // aggregates interleaved at random.
    let writers = 4;
    let mut clients = Vec::new();
    for _ in 0..writers {
        clients.push(pg(bed.db.url()).await);
    }
    let table = &bed.table;
    let insert_all = |half: usize| {
        let clients = &clients;
        join_all((0..AGGREGATES).map(move |aggregate| async move {
            let client = &clients[aggregate % writers];
            let id = format!("INV-{aggregate}");
            let mut ids = Vec::new();
            for n in half * ROWS_EACH / 2..(half + 1) * ROWS_EACH / 2 {
                let row = insert(
                    client,
                    table,
                    ("invoice", &id),
                    "invoice.changed",
                    json!({"n": n}),
                )
                .await;
                ids.push((row, id.clone()));
                if n % 7 == aggregate % 7 {
                    tokio::task::yield_now().await;
                }
            }
            ids
        }))
    };
    let mut rows: Vec<(i64, String)> = insert_all(0).await.into_iter().flatten().collect();

    // The leader dies mid-stream (a round in flight, unmarked); a standby
    // takes the lock over.
    let leader = relays
        .iter()
        .position(RunningRelay::leading)
        .expect("a leader");
    let leader = relays.remove(leader);
    let (second, ()) = tokio::join!(insert_all(1), async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        leader.crash();
    });
    rows.extend(second.into_iter().flatten());
    assert_eq!(rows.len(), AGGREGATES * ROWS_EACH);

    bed.wait_all_published(Duration::from_secs(60)).await;
    assert_eq!(
        relays.iter().filter(|r| r.leading()).count(),
        1,
        "a standby leads now"
    );
    let events = relayed(&js, "erp").await;
    assert_once_in_order(&events, &rows);
    for relay in relays {
        relay.stop().await;
    }
}
