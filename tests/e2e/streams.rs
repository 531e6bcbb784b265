//! `streams apply` is idempotent and guards the partition count.

use std::time::Duration;

use hookmesh::config::{Config, Env, Origin};
use hookmesh::streams::{self, Mode, Outcome};
use hookmesh_test_support::NatsServer;

use crate::support::*;

/// The ingest settings of a minimal config for `nats`, plus `extra` keys.
pub(crate) fn ingest(nats: &NatsServer, extra: &str) -> hookmesh::config::IngestConfig {
    let text = format!("[nats]\nurl = \"{}\"\n[ingest]\n{extra}\n", nats.url());
    Config::from_toml(&text, Origin::Builtin, &Env::default())
        .expect("config")
        .ingest
}

#[tokio::test]
async fn apply_creates_then_changes_nothing_then_updates_what_differs() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let created = streams::apply(&js, &ingest(&nats, ""), Mode::Update)
        .await
        .expect("apply");
    assert_eq!(
        created,
        vec![
            ("HOOK_EVENTS".to_string(), Outcome::Created),
            ("KV_hook_idempotency".to_string(), Outcome::Created),
            ("KV_hook_state".to_string(), Outcome::Created),
            ("KV_hook_mappings".to_string(), Outcome::Created),
            ("KV_hook_attempts".to_string(), Outcome::Created),
            ("KV_hook_leases".to_string(), Outcome::Created),
            ("KV_hook_handlers".to_string(), Outcome::Created),
            ("OBJ_hook_handlers".to_string(), Outcome::Created),
            ("HOOK_ADVISORIES".to_string(), Outcome::Created),
            ("HOOK_DLQ".to_string(), Outcome::Created),
            ("HOOK_AUDIT".to_string(), Outcome::Created)
        ]
    );
    let again = streams::apply(&js, &ingest(&nats, ""), Mode::Update)
        .await
        .expect("apply");
    assert!(
        again.iter().all(|(_, o)| *o == Outcome::Unchanged),
        "{again:?}"
    );

    let longer = ingest(&nats, "duplicate_window = \"5m\"");
    let ensured = streams::apply(&js, &longer, Mode::Ensure)
        .await
        .expect("ensure");
    assert!(
        ensured.iter().all(|(_, o)| *o == Outcome::Unchanged),
        "ensure leaves existing streams alone"
    );
    let updated = streams::apply(&js, &longer, Mode::Update)
        .await
        .expect("apply");
    assert_eq!(updated[0], ("HOOK_EVENTS".to_string(), Outcome::Updated));
    let info = events(&js).await.info().await.expect("info").config.clone();
    assert_eq!(info.duplicate_window, Duration::from_secs(300));

    // The buckets open with the client's KV API on every server version.
    js.get_key_value("hook_idempotency")
        .await
        .expect("bucket opens");
}

#[tokio::test]
async fn a_different_partition_count_is_refused() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    streams::apply(&js, &ingest(&nats, "partitions = 16"), Mode::Update)
        .await
        .expect("apply");
    let err = streams::apply(&js, &ingest(&nats, "partitions = 8"), Mode::Update)
        .await
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "ingest.partitions = 8, but HOOK_EVENTS was created with 16 partitions; the count is fixed for the life \
         of the stream (set ingest.partitions = 16)"
    );
}

#[tokio::test]
async fn a_host_configured_with_another_partition_count_refuses_to_run() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    streams::apply(&js, &ingest(&nats, "partitions = 16"), Mode::Update)
        .await
        .expect("apply");
    let options = Options {
        partitions: 4,
        ..Options::default()
    };
    let host = TestHost::spawn(&nats.url(), options).await;
    let err = host.finished().await.expect_err("the host stops");
    assert!(
        err.to_string().contains("created with 16 partitions"),
        "{err}"
    );
}
