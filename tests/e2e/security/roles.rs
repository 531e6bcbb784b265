//! The roles of `nats/roles.conf`, as shipped, on a real server: the ops
//! CLI applies the streams and deploys, a worker host runs the handler, an
//! ingress host stores webhooks — and what a role may not do fails with
//! the server's reason, not a hang.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use hookmesh::config::{Config, Env, Origin};
use hookmesh::nats::{self, Patience};
use hookmesh::server::Role;
use hookmesh_test_support::{NatsServer, ServerOptions};

use super::{cli, config_file, stderr, stdout};
use crate::support::*;

const INGRESS_PASSWORD: &str = "ingress-test-password-4711";
const WORKER_PASSWORD: &str = "worker-test-password-4711";
const OPS_PASSWORD: &str = "ops-test-password-4711";

/// The shipped roles configuration, its passwords from the environment.
pub(crate) fn roles_server() -> NatsServer {
    NatsServer::start_with(ServerOptions {
        config: Some(workspace().join("nats/roles.conf")),
        env: vec![
            ("HOOKMESH_INGRESS_PASSWORD".into(), INGRESS_PASSWORD.into()),
            ("HOOKMESH_WORKER_PASSWORD".into(), WORKER_PASSWORD.into()),
            ("HOOKMESH_OPS_PASSWORD".into(), OPS_PASSWORD.into()),
        ],
        ..ServerOptions::default()
    })
    .expect("nats-server with nats/roles.conf")
}

fn login(user: &str, password: &str) -> String {
    format!("user = \"{user}\"\npassword = \"{password}\"\n")
}

fn recorder_manifest() -> &'static str {
    "name = \"rec\"\nsubject = \"crm.ticket.>\"\nmax_deliver = 5\nack_wait = \"5s\"\n\
     timeout = \"2s\"\n[backoff]\ninitial = \"100ms\"\nmax = \"200ms\"\n"
}

fn ticket(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"type": "ticket.updated", "data": {"id": id}}))
        .expect("json")
}

async fn connect_as(url: &str, nats_toml: &str) -> async_nats::Client {
    let text = format!("[nats]\nurl = \"{url}\"\n{nats_toml}");
    let config = Config::from_toml(&text, Origin::Builtin, &Env::default()).expect("config");
    nats::connect(&config.nats, "hookmesh-test", Patience::FailFast)
        .await
        .expect("connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_does_its_job_and_is_refused_the_rest() {
    let server = roles_server();
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let ops = config_file(dir.path(), "ops", &url, &login("ops", OPS_PASSWORD));
    let ingress_login = login("ingress", INGRESS_PASSWORD);
    let ingress_config = config_file(dir.path(), "ingress", &url, &ingress_login);

    // Ops: the streams, a deployment, the status screen.
    let out = cli(dir.path(), &ops, &["streams", "apply"]);
    assert!(
        out.status.success(),
        "streams apply as ops: {}",
        stderr(&out)
    );
    let manifest = dir.path().join("rec.toml");
    std::fs::write(&manifest, recorder_manifest()).expect("manifest");
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest = manifest.display().to_string();
    let out = cli(
        dir.path(),
        &ops,
        &["deploy", &wasm, "--manifest", &manifest],
    );
    assert!(out.status.success(), "deploy as ops: {}", stderr(&out));

    // A worker follows the deployment and owns every partition.
    let worker = TestHost::spawn(
        &url,
        Options {
            nats_toml: login("worker", WORKER_PASSWORD),
            role: Role::Worker,
            ..Options::default()
        },
    )
    .await;
    wait_for(Duration::from_secs(60), "the worker runs rec", || async {
        worker.owned("rec").await == 16
    })
    .await;
    assert_eq!(
        worker.get("/readyz").await.0,
        0,
        "a worker serves no webhooks"
    );
    assert_eq!(worker.admin_get("/readyz").await.0, 200);

    // The ingress host stores a webhook; the worker handles it.
    let ingress = TestHost::start_with(
        &server,
        Options {
            nats_toml: ingress_login.clone(),
            role: Role::Ingress,
            ..Options::default()
        },
    )
    .await;
    let answer = ingress.send("crm", ticket("T-1"), "evt-T-1").await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
    let again = ingress.send("crm", ticket("T-1"), "evt-T-1").await;
    assert_eq!(again.status, 200, "a duplicate: {:?}", again.json);
    let ops_js = jetstream::new(connect_as(&url, &login("ops", OPS_PASSWORD)).await);
    wait_for(
        Duration::from_secs(30),
        "the worker handled T-1",
        || async {
            crate::handlers::state(&ops_js, "rec", "seen/T-1")
                .await
                .as_deref()
                == Some("evt-T-1")
        },
    )
    .await;
    let stored = stored_messages(&ops_js, "HOOK_EVENTS").await;
    let webhooks: Vec<_> = (stored.iter())
        .filter(|m| m.subject.starts_with("hook.crm."))
        .collect();
    assert_eq!(webhooks.len(), 1, "stored once");

    let out = cli(dir.path(), &ops, &["status"]);
    assert!(out.status.success(), "status as ops: {}", stderr(&out));
    assert!(stdout(&out).contains("rec"), "{}", stdout(&out));
    let out = cli(dir.path(), &ops, &["dlq", "list"]);
    assert!(out.status.success(), "dlq list as ops: {}", stderr(&out));

    // Ingress may not consume: refused with the server's reason.
    let ingress_js = jetstream::new(connect_as(&url, &ingress_login).await);
    let events = ingress_js
        .get_stream("HOOK_EVENTS")
        .await
        .expect("stream info");
    let refused = events
        .create_consumer(pull::Config {
            durable_name: Some("intruder".into()),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err(), "the ingress role created a consumer");
    let denied = nats::last_denial().unwrap_or_default();
    assert!(
        denied.contains("Permissions Violation")
            && denied.contains("$JS.API.CONSUMER.CREATE.HOOK_EVENTS"),
        "{denied}"
    );
    let out = cli(dir.path(), &ingress_config, &["dlq", "list"]);
    assert!(!out.status.success(), "dlq list as ingress succeeded");
    let text = stderr(&out);
    assert!(
        text.contains("NATS refused: Permissions Violation"),
        "the CLI says why: {text}"
    );

    // Ops may read and repair, never store an event.
    let published = async {
        ops_js
            .publish("hook.crm.ticket.0.T-2.ticket.updated", "forged".into())
            .await?
            .await
    }
    .await;
    assert!(published.is_err(), "ops stored an event");
    let denied = nats::last_denial().unwrap_or_default();
    assert!(
        denied.contains("Permissions Violation for Publish to")
            && denied.contains("hook.crm.ticket.0.T-2"),
        "{denied}"
    );

    // Every refusal the server logged is one of those three: the roles
    // let each process do all of its own work.
    let violations: Vec<String> = (server.log().lines())
        .filter(|l| l.contains("Violation"))
        .map(str::to_string)
        .collect();
    let expected = |l: &String| {
        (l.contains("ingress\"") && l.contains("$JS.API.CONSUMER.CREATE.HOOK_EVENTS"))
            || (l.contains("ingress\"") && l.contains("HOOK_DLQ"))
            || (l.contains("ops\"") && l.contains("hook.crm.ticket.0.T-2"))
    };
    let unexpected: Vec<&String> = violations.iter().filter(|l| !expected(l)).collect();
    assert!(
        unexpected.is_empty(),
        "unexpected refusals: {unexpected:#?}"
    );
    assert!(!violations.is_empty(), "the server logged the refusals");
}
