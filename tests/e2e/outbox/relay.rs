//! Rows into `HOOK_EVENTS` through a host (what `serve` and `up` run):
//! every header, the subject ingest would compute, a real handler
//! subscribed to the source's subject, metrics, and `/readyz` while a
//! relay's database is unreachable.

use std::time::{Duration, SystemTime};

use hookmesh::headers;
use hookmesh::subject::EventAddress;
use hookmesh_test_support::{NatsServer, TestDatabase};
use serde_json::json;

use super::{Bed, relayed};
use crate::handlers::state;
use crate::support::*;

fn outbox_toml(source: &str, url: &str) -> String {
    format!(
        "[[outbox]]\nsource = \"{source}\"\ndatabase_url = \"{url}\"\npoll_interval = \"500ms\"\n"
    )
}

#[tokio::test]
async fn rows_become_events_with_every_header_that_a_handler_of_the_source_handles() {
    let nats = NatsServer::start().expect("nats");
    let bed = Bed::new("outbox_events", true).await;
    let handler = manifest("outbox-recorder", "fixture_recorder", "erp.invoice.>");
    let host = TestHost::start_with(
        &nats,
        Options {
            handlers: vec![handler],
            extra_toml: outbox_toml("erp", bed.db.url()),
            ..Options::default()
        },
    )
    .await;

    let created = bed
        .insert(
            ("invoice", "INV-1"),
            "invoice.created",
            json!({"total": "10.00"}),
        )
        .await;
    let paid = bed
        .insert(("invoice", "INV-1"), "invoice.paid", json!({"paid": true}))
        .await;
    // The application's own correlation id and idempotency key.
    let keyed: i64 = bed
        .client
        .query_one(
            "INSERT INTO outbox_events \
             (aggregate_type, aggregate_id, event_type, payload_json, correlation_id, idempotency_key) \
             VALUES ('invoice', 'INV 2/2026', 'invoice.created', '{\"lines\": [1, 2]}', 'req-4711', 'erp-inv-2-created') \
             RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    // Stored, but outside the handler's subject.
    let credit = bed
        .insert(("credit_note", "CN-1"), "credit_note.issued", json!({}))
        .await;
    bed.wait_all_published(Duration::from_secs(30)).await;

    let js = jetstream(&nats).await;
    let events = relayed(&js, "erp").await;
    let stored: Vec<i64> = events.iter().map(|e| e.row).collect();
    // Every row once; in `id` order within its aggregate (rows of other
    // aggregates are published concurrently).
    let mut rows = stored.clone();
    rows.sort_unstable();
    assert_eq!(rows, [created, paid, keyed, credit]);
    let position = |row: i64| stored.iter().position(|r| *r == row);
    assert!(
        position(created) < position(paid),
        "INV-1's rows in id order: {stored:?}"
    );
    for event in &events {
        let row = bed
            .client
            .query_one(
                "SELECT aggregate_type, aggregate_id, event_type, payload_json::text, correlation_id, \
                        idempotency_key, created_at, published_at IS NOT NULL \
                 FROM outbox_events WHERE id = $1",
                &[&event.row],
            )
            .await
            .expect("row");
        let (domain, entity, event_type): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let created_at: SystemTime = row.get(6);
        assert!(row.get::<_, bool>(7), "published_at set");
        assert_eq!(
            event.subject,
            EventAddress::new("erp", &domain, &entity, &event_type, 16).subject(),
            "the subject ingest computes"
        );
        assert_eq!(event.payload, row.get::<_, String>(3).into_bytes());
        let header = |name: &str| event.headers.get(name).map(String::as_str);
        let msg_id = row
            .get::<_, Option<String>>(5)
            .unwrap_or_else(|| format!("erp:outbox:{}", event.row));
        assert_eq!(header(headers::MSG_ID), Some(msg_id.as_str()));
        assert_eq!(header(headers::PROVIDER), Some("erp"));
        assert_eq!(
            header(headers::EVENT_ID),
            Some(event.row.to_string().as_str())
        );
        assert_eq!(header(headers::EVENT_TYPE), Some(event_type.as_str()));
        assert_eq!(header(headers::DOMAIN), Some(domain.as_str()));
        assert_eq!(header(headers::ENTITY), Some(entity.as_str()));
        let received_at = humantime::format_rfc3339_millis(created_at).to_string();
        assert_eq!(header(headers::RECEIVED_AT), Some(received_at.as_str()));
        let correlation = header(headers::CORRELATION_ID).expect("a correlation id");
        match row.get::<_, Option<String>>(4) {
            Some(given) => assert_eq!(correlation, given),
            None => assert_eq!(correlation.len(), 36, "a new UUID: {correlation}"),
        }
        let traceparent = header(headers::TRACEPARENT).expect("traceparent");
        assert!(
            traceparent.starts_with("00-") && traceparent.len() == 55,
            "{traceparent}"
        );
        assert_eq!(header(headers::CONTENT_TYPE), Some("application/json"));
        assert_eq!(header(headers::ENTITY_VERSION), None);
    }

    // The handler of `erp.invoice.>` ran each invoice event, in order; the
    // credit note is not its business.
    wait_for(
        Duration::from_secs(30),
        "the handler saw both invoices",
        || async {
            state(&js, "outbox-recorder", "seen/INV-1").await == Some(format!("{created}\n{paid}"))
                && state(&js, "outbox-recorder", "seen/INV 2/2026").await == Some(keyed.to_string())
        },
    )
    .await;
    assert_eq!(state(&js, "outbox-recorder", "seen/CN-1").await, None);

    wait_for(Duration::from_secs(10), "outbox metrics", || async {
        let metrics = host.metrics().await;
        metrics.contains("hookmesh_outbox_published_total{source=\"erp\"} 4")
            && metrics.contains("hookmesh_outbox_pending{source=\"erp\"} 0")
            && metrics.contains("hookmesh_outbox_failed_rows{source=\"erp\"} 0")
            && metrics.contains("hookmesh_outbox_oldest_pending_age_seconds{source=\"erp\"} 0")
            && metrics.contains("hookmesh_outbox_leader{source=\"erp\"} 1")
    })
    .await;
    // The application writes an event with its key twice: stored once, and
    // the second row is marked published all the same.
    let twice: i64 = bed
        .client
        .query_one(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json, idempotency_key) \
             VALUES ('invoice', 'INV 2/2026', 'invoice.created', '{}', 'erp-inv-2-created') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    bed.wait_all_published(Duration::from_secs(30)).await;
    let mut again: Vec<i64> = relayed(&js, "erp").await.iter().map(|e| e.row).collect();
    again.sort_unstable();
    assert_eq!(
        again,
        [created, paid, keyed, credit],
        "row {twice} is a duplicate"
    );

    // A pending row shows in the gauges: one held back by a failed row.
    bed.client
        .batch_execute(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json, status, created_at) \
             VALUES ('invoice', 'INV-9', 'invoice.created', '{}', 'failed', now() - interval '1 hour'), \
                    ('invoice', 'INV-9', 'invoice.paid', '{}', 'pending', now() - interval '1 hour')",
        )
        .await
        .expect("insert");
    wait_for(Duration::from_secs(10), "pending gauges", || async {
        let metrics = host.metrics().await;
        metrics.contains("hookmesh_outbox_pending{source=\"erp\"} 1")
            && metrics.contains("hookmesh_outbox_failed_rows{source=\"erp\"} 1")
            && metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix("hookmesh_outbox_oldest_pending_age_seconds{source=\"erp\"} ")
                })
                .and_then(|age| age.parse::<u64>().ok())
                .is_some_and(|age| (3600..3700).contains(&age))
    })
    .await;
    assert_eq!(
        relayed(&js, "erp").await.len(),
        4,
        "the held row stays back"
    );
    host.shutdown().await.expect("clean stop");
}

#[tokio::test]
async fn readyz_names_a_relay_whose_database_is_unreachable_until_it_can_work() {
    let nats = NatsServer::start().expect("nats");
    // Nothing listens on port 1.
    let refused = TestHost::spawn(
        &nats.url(),
        Options {
            extra_toml: outbox_toml("wms", "postgres://hookmesh@127.0.0.1:1/wms"),
            ..Options::default()
        },
    )
    .await;
    // A database without the table yet.
    let db = TestDatabase::create().expect("database");
    let tableless = TestHost::spawn(
        &nats.url(),
        Options {
            extra_toml: outbox_toml("erp", db.url()),
            ..Options::default()
        },
    )
    .await;

    wait_for(
        Duration::from_secs(20),
        "readyz names the refused database",
        || async {
            let (status, body) = refused.get("/readyz").await;
            status == 503
                && body.starts_with(
                    "not ready: outbox wms: database hookmesh@127.0.0.1:1/wms: connect: ",
                )
                && body.contains("Connection refused")
        },
    )
    .await;
    let missing_table = format!(
        "not ready: outbox erp: database postgres@127.0.0.1:5432/{}: table outbox_events does not exist (create it with `hookmesh outbox init`)\n",
        db.name()
    );
    wait_for(
        Duration::from_secs(20),
        "readyz names the missing table",
        || async { tableless.get("/readyz").await == (503, missing_table.clone()) },
    )
    .await;

    let database = hookmesh::outbox::db::Database::parse(db.url()).expect("url");
    hookmesh::outbox::commands::init(&database, &"outbox_events".parse().expect("name"), false)
        .await
        .expect("init");
    tableless.wait_ready().await;
    assert_eq!(refused.get("/readyz").await.0, 503, "still unreachable");
}

#[tokio::test]
async fn a_row_too_large_for_nats_fails_at_once_and_holds_back_only_its_aggregate() {
    let nats = NatsServer::start().expect("nats");
    let js = super::apply_streams(&nats).await;
    let bed = Bed::new("outbox_events", true).await;
    let relay = super::RunningRelay::start(bed.outbox("erp"), &nats.url()).await;
    // Over nats-server's max_payload (1 MiB by default).
    let big: i64 = bed
        .client
        .query_one(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json) \
             VALUES ('invoice', 'INV-BIG', 'invoice.created', jsonb_build_object('blob', repeat('x', 2 * 1024 * 1024))) \
             RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    let behind = bed
        .insert(("invoice", "INV-BIG"), "invoice.paid", json!({}))
        .await;
    let other = bed
        .insert(("invoice", "INV-OK"), "invoice.created", json!({}))
        .await;
    wait_for(
        Duration::from_secs(20),
        "the big row failed, the other published",
        || async {
            let rows = bed.rows().await;
            let state = |id: i64| rows.iter().find(|(r, _, _)| *r == id).cloned();
            state(big) == Some((big, "failed".into(), 1))
                && state(other).is_some_and(|(_, status, _)| status == "published")
        },
    )
    .await;
    let rows = bed.rows().await;
    assert!(rows.contains(&(behind, "pending".into(), 0)), "{rows:?}");
    let stored: Vec<i64> = relayed(&js, "erp").await.iter().map(|e| e.row).collect();
    assert_eq!(stored, [other]);
    relay.stop().await;
}
