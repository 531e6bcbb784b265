//! Per-aggregate order with several relays on one table: 20 aggregates ×
//! 50 rows inserted concurrently, each in a transaction of its own, while
//! three relays run and the leader crashes halfway.

use std::time::Duration;

use hookmesh_test_support::NatsServer;

use super::{
    Bed, RunningRelay, aggregates, apply_streams, assert_once_in_order, insert_rows, pg, relayed,
};
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

    // Four sessions insert, each row in a transaction of its own.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(pg(bed.db.url()).await);
    }
    let ids = aggregates("INV", AGGREGATES);
    let half = ROWS_EACH / 2;
    let mut rows = insert_rows(&clients, &bed.table, &ids, half, 5000).await;

    // The leader dies mid-stream (a round in flight, unmarked); a standby
    // takes the lock over.
    let leader = relays
        .iter()
        .position(RunningRelay::leading)
        .expect("a leader");
    let leader = relays.remove(leader);
    let (second, ()) = tokio::join!(
        insert_rows(&clients, &bed.table, &ids, half, 5000),
        async move {
            tokio::time::sleep(Duration::from_millis(40)).await;
            leader.crash();
        }
    );
    rows.extend(second);
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
