//! Dead letters end to end: give-up advisories become `HOOK_DLQ` entries
//! (also when no host ran at the moment of the advisory), parking, and the
//! `hookmesh dlq` commands through the real binary — list, show, replay
//! after fixing the payload or the handler, purge — with their audit trail.

use std::process::Stdio;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use hookmesh::dlq::{DeadLetter, store};
use hookmesh::manifest::{Manifest, OnDeadLetter};
use hookmesh::records::park;
use hookmesh::subject::{EventAddress, encode_token, partition};
use hookmesh_test_support::NatsServer;
use serde_json::{Value, json};

use crate::handlers::{host_with, messages, state};
use crate::support::*;

/// A ticket event for the recorder fixture; `fail` makes every attempt
/// fail transiently.
fn ticket(id: &str, fail: bool) -> Vec<u8> {
    let mut body = json!({"type": "ticket.updated", "data": {"id": id}});
    if fail {
        body["fail_until_attempt"] = json!(1000);
    }
    serde_json::to_vec(&body).expect("json")
}

/// The recorder fixture on `crm.ticket.>` with 2 deliveries.
fn recorder(name: &str, on_dead_letter: OnDeadLetter) -> Manifest {
    let mut manifest = manifest(name, "fixture_recorder", "crm.ticket.>");
    manifest.max_deliver = 2;
    manifest.on_dead_letter = on_dead_letter;
    manifest
}

/// Another ticket id in the same partition as `id` (so parking `id` must
/// not hold it up even though one consumer serves both).
fn same_partition_as(id: &str) -> String {
    let p = |e: &str| partition("crm", "ticket", &encode_token(e), 16);
    (0..10_000)
        .map(|n| format!("T-{n}"))
        .find(|other| other != id && p(other) == p(id))
        .expect("a neighbour")
}

fn ticket_subject(id: &str) -> String {
    EventAddress::new("crm", "ticket", id, "ticket.updated", 16).subject()
}

/// What the recorder saw for an entity, oldest first.
async fn seen(js: &jetstream::Context, handler: &str, entity: &str) -> Vec<String> {
    state(js, handler, &format!("seen/{entity}"))
        .await
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

async fn attempt(
    js: &jetstream::Context,
    handler: &str,
    seq: u64,
) -> Option<hookmesh::dispatch::AttemptRecord> {
    hookmesh::dispatch::attempt_record(js, handler, seq)
        .await
        .expect("read record")
}

async fn dead_letters(js: &jetstream::Context) -> Vec<DeadLetter> {
    store::list(js, &store::Selection::default())
        .await
        .expect("list")
}

async fn wait_dead_letters(js: &jetstream::Context, count: usize) -> Vec<DeadLetter> {
    wait_for(
        Duration::from_secs(20),
        &format!("{count} dead letter(s)"),
        || async { dead_letters(js).await.len() == count },
    )
    .await;
    dead_letters(js).await
}

async fn audit_records(js: &jetstream::Context) -> Vec<Value> {
    stored_messages(js, "HOOK_AUDIT")
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).expect("audit json"))
        .collect()
}

/// Resets the dead-letter writer's consumer, so it reads every captured
/// advisory again, and waits until it has.
async fn reprocess_advisories(js: &jetstream::Context) {
    let advisories = js.get_stream("HOOK_ADVISORIES").await.expect("advisories");
    let captured = advisories
        .clone()
        .info()
        .await
        .expect("info")
        .state
        .last_sequence;
    advisories
        .delete_consumer("dlq_writer")
        .await
        .expect("reset the writer");
    wait_for(
        Duration::from_secs(20),
        "the writer re-read every advisory",
        || async {
            let Ok(mut writer) = advisories
                .get_consumer::<consumer::pull::Config>("dlq_writer")
                .await
            else {
                return false;
            };
            writer.info().await.is_ok_and(|i| {
                i.delivered.stream_sequence >= captured
                    && i.num_ack_pending == 0
                    && i.num_pending == 0
            })
        },
    )
    .await;
}

/// The `hookmesh` binary with a config file pointing at the test server.
struct Cli {
    dir: tempfile::TempDir,
}

/// How a command ended.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Cli {
    fn new(nats: &NatsServer) -> Cli {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("hookmesh.toml"),
            config_toml(&nats.url(), &Options::default()),
        )
        .expect("config");
        Cli { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `hookmesh --config hookmesh.toml <args>` without blocking the
    /// runtime the in-process host runs on.
    async fn run(&self, args: &[&str]) -> Ran {
        let output = tokio::process::Command::new(hookmesh_bin())
            .arg("--config")
            .arg(self.path("hookmesh.toml"))
            .args(args)
            .current_dir(self.dir.path())
            .env("HOOKMESH_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .await
            .expect("hookmesh runs");
        Ran {
            ok: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

#[tokio::test]
async fn every_give_up_becomes_one_complete_dead_letter() {
    let nats = NatsServer::start().expect("nats");
    let mut panicky = manifest("panicky", "fixture_panic", "crm.alarm.>");
    panicky.max_deliver = 2;
    let mut order_sync = Manifest::load(&workspace().join("handlers/order-sync/handler.toml"))
        .expect("example manifest");
    order_sync.max_deliver = 2;
    let host = host_with(
        &nats,
        vec![order_sync, recorder("rec", OnDeadLetter::Continue), panicky],
    )
    .await;
    let js = jetstream(&nats).await;

    let no_total = serde_json::to_vec(
        &json!({"type":"order.created","data":{"id":"ORD-7","version":1,"customer":{"id":"C"}}}),
    )
    .expect("json");
    let mut needs_terms =
        serde_json::from_slice::<Value>(&crm_order("order.created", "ORD-8", 1)).expect("json");
    needs_terms["data"]["customer"] = json!({"id": "CUST-1"});
    let needs_terms = serde_json::to_vec(&needs_terms).expect("json");
    let sent = [
        (
            "permanent",
            host.send("crm", no_total.clone(), "bad-1").await,
        ),
        ("needs-human", host.send("crm", needs_terms, "bad-2").await),
        (
            "max-deliveries",
            host.send("crm", ticket("T-1", true), "t-1").await,
        ),
        (
            "trap",
            host.send(
                "crm",
                serde_json::to_vec(&json!({"type":"alarm.raised","data":{"id":"A-1"}}))
                    .expect("json"),
                "a-1",
            )
            .await,
        ),
    ];
    let entries = wait_dead_letters(&js, 4).await;

    for (reason, answer) in &sent {
        let seq = answer.json["stream_seq"].as_u64().expect("seq");
        let entry = entries
            .iter()
            .find(|e| e.stream_seq == seq)
            .unwrap_or_else(|| panic!("no dead letter for {reason}"));
        assert_eq!(entry.reason, *reason);
        let original = events(&js)
            .await
            .get_raw_message(seq)
            .await
            .expect("original");
        assert_eq!(entry.payload, original.payload, "payload byte for byte");
        assert_eq!(entry.subject, original.subject.as_str());
        assert_eq!(
            entry.dlq_subject,
            format!(
                "dlq.{}.{}",
                entry.handler,
                entry.subject.trim_start_matches("hook.")
            )
        );
        for header in ["Hook-Correlation-Id", "Hook-Provider", "Hook-Event-Id"] {
            assert_eq!(
                entry.header(header),
                original.headers.get(header).map(|v| v.as_str()),
                "{header} kept"
            );
        }
        assert_eq!(
            entry.header("Nats-Msg-Id"),
            Some(format!("{}:{seq}", entry.handler).as_str())
        );
        assert_eq!(
            entry.header("Hook-Idempotency-Key"),
            original.headers.get("Nats-Msg-Id").map(|v| v.as_str())
        );
        assert_eq!(entry.handler_version.len(), 12, "{reason}");
        assert!(!entry.error.is_empty());
        assert!(!entry.first_failure.is_empty() && !entry.last_failure.is_empty());
        let attempts = if *reason == "permanent" || *reason == "needs-human" {
            1
        } else {
            2
        };
        assert_eq!(entry.attempts, attempts, "{reason}");
    }
    let error_of = |reason: &str| {
        entries
            .iter()
            .find(|e| e.reason == reason)
            .map(|e| e.error.clone())
            .expect("entry")
    };
    assert!(error_of("permanent").contains("total"));
    assert!(error_of("needs-human").contains("payment terms"));
    assert!(error_of("max-deliveries").contains("asked to fail"));

    // An advisory processed again (the writer's consumer reset) makes no
    // second entry.
    reprocess_advisories(&js).await;
    assert_eq!(dead_letters(&js).await.len(), 4, "no second entry");

    // Not handled again by that handler. The same path acts meanwhile: a
    // neighbour in T-1's partition that fails once is retried and handled
    // by the same consumer. T-1's attempt record has not changed since its
    // dead letter (the host ran it no more), and the server holds nothing
    // of that partition it could hand out again.
    let t1 = &sent[2].1.json;
    let t1_seq = t1["stream_seq"].as_u64().expect("seq");
    let t1_partition = partition_of(t1["subject"].as_str().expect("subject"));
    let attempts_kv = js.get_key_value("hook_attempts").await.expect("bucket");
    let t1_key = hookmesh::dispatch::attempts::key("rec", t1_seq);
    let before = attempts_kv
        .entry(&t1_key)
        .await
        .expect("entry")
        .expect("T-1's attempt record");
    let neighbour = same_partition_as("T-1");
    let mut once = json!({"type": "ticket.updated", "data": {"id": neighbour}});
    once["fail_until_attempt"] = json!(1);
    let control = host
        .send("crm", serde_json::to_vec(&once).expect("json"), "t-n")
        .await;
    let control_seq = control.json["stream_seq"].as_u64().expect("seq");
    wait_for(
        Duration::from_secs(20),
        "the neighbour retried and handled",
        || async { seen(&js, "rec", &neighbour).await == ["t-n"] },
    )
    .await;
    assert_eq!(
        attempt(&js, "rec", control_seq).await.map(|r| r.attempts),
        Some(1),
        "the control went through a retry"
    );
    wait_for(Duration::from_secs(20), "the partition settled", || async {
        consumer_settled(&js, "rec", t1_partition, control_seq).await
    })
    .await;
    let after = attempts_kv
        .entry(&t1_key)
        .await
        .expect("entry")
        .expect("T-1's attempt record");
    assert_eq!(
        (after.revision, after.value.clone()),
        (before.revision, before.value.clone()),
        "T-1 ran no more after its dead letter"
    );
    assert_eq!(
        attempt(&js, "rec", t1_seq).await.map(|r| r.attempts),
        Some(2)
    );

    // Metrics, and readiness with a non-empty DLQ.
    wait_for(Duration::from_secs(20), "DLQ gauges", || async {
        host.admin_get("/metrics")
            .await
            .1
            .contains("hookmesh_dlq_depth{handler=\"order-sync\"} 2")
    })
    .await;
    let (_, metrics) = host.admin_get("/metrics").await;
    for line in [
        "hookmesh_dead_letters_total{handler=\"rec\",reason=\"max-deliveries\"} 1",
        "hookmesh_dead_letters_total{handler=\"panicky\",reason=\"trap\"} 1",
        "hookmesh_dead_letters_total{handler=\"order-sync\",reason=\"permanent\"} 1",
        "hookmesh_dead_letters_total{handler=\"order-sync\",reason=\"needs-human\"} 1",
        "hookmesh_dlq_depth{handler=\"rec\"} 1",
        "hookmesh_dlq_oldest_age_seconds{handler=\"rec\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert_eq!(host.get("/readyz").await.0, 200);

    // The CLI's views of the same entries.
    let cli = Cli::new(&nats);
    let all = cli.run(&["dlq", "list"]).await;
    assert!(all.ok, "{}", all.stderr);
    assert!(all.stdout.contains("4 dead letter(s)"), "{}", all.stdout);
    let traps = cli.run(&["dlq", "list", "--reason", "trap"]).await;
    assert!(traps.stdout.contains("panicky") && traps.stdout.contains("1 dead letter(s)"));
    assert!(!traps.stdout.contains("order-sync"));
    let by_handler = cli
        .run(&["dlq", "list", "--handler", "order-sync", "--since", "1h"])
        .await;
    assert!(
        by_handler.stdout.contains("2 dead letter(s)"),
        "{}",
        by_handler.stdout
    );
    let by_entity = cli.run(&["dlq", "list", "--entity", "ORD-8"]).await;
    assert!(
        by_entity.stdout.contains("needs-human") && by_entity.stdout.contains("1 dead letter(s)")
    );
    let bad = cli.run(&["dlq", "list", "--reason", "oops"]).await;
    assert!(
        !bad.ok && bad.stderr.contains("unknown reason \"oops\""),
        "{}",
        bad.stderr
    );

    let permanent = entries
        .iter()
        .find(|e| e.reason == "permanent")
        .expect("entry");
    let shown = cli
        .run(&["dlq", "show", &permanent.dlq_seq.to_string()])
        .await;
    assert!(shown.ok, "{}", shown.stderr);
    for needle in [
        "handler        order-sync",
        "reason         permanent",
        "Hook-Dlq-Error:",
        "Hook-Correlation-Id:",
        "\"type\": \"order.created\"",
    ] {
        assert!(
            shown.stdout.contains(needle),
            "{needle} in\n{}",
            shown.stdout
        );
    }
    let missing = cli.run(&["dlq", "show", "999"]).await;
    assert!(!missing.ok && missing.stderr.contains("no dead letter with sequence 999"));
    drop(host);
}

#[tokio::test]
async fn a_dead_letter_is_written_even_when_no_host_ran_at_the_advisory_and_parks_its_entity() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // A handler that never finishes within its ack wait, allowed one delivery.
    let handler_dir = dir.path().join("stuck");
    std::fs::create_dir(&handler_dir).expect("mkdir");
    std::fs::write(
        handler_dir.join("handler.toml"),
        format!(
            "name = \"stuck\"\ncomponent = {:?}\nsubject = \"crm.order.>\"\nmax_deliver = 1\n\
             ack_wait = \"3s\"\ntimeout = \"2s\"\non_dead_letter = \"park\"\n",
            guest("fixture_loop").display().to_string()
        ),
    )
    .expect("manifest");
    std::fs::write(
        dir.path().join("hookmesh.toml"),
        config_toml(&nats.url(), &Options::default()),
    )
    .expect("config");
    let cache = guest_cache_dir();
    let cache = cache.to_str().expect("utf-8 path");
    let args = [
        "serve",
        "--config",
        "hookmesh.toml",
        "--handlers",
        ".",
        "--cache-dir",
        cache,
    ];
    let mut first = LoggedProcess::start(dir.path(), &args, "first").await;
    let answer = send_crm(
        &first.address,
        crm_order("order.created", "ORD-S", 1),
        "stuck-1",
    )
    .await;

    // The host is inside the one delivery when it dies — it has parked the
    // entity ahead of running it: no attempt is ever settled, and no host is
    // left to hear the advisory.
    let held_key = park::key(
        "stuck",
        answer["subject"].as_str().expect("the event's subject"),
    )
    .expect("key");
    let attempts_bucket = js.get_key_value("hook_attempts").await.expect("bucket");
    wait_for(Duration::from_secs(20), "the delivery in hand", || async {
        if !park::read(&attempts_bucket, &held_key)
            .await
            .is_ok_and(|(record, _)| record.is_some())
        {
            return false;
        }
        {
            let stream = events(&js).await;
            let mut names = stream.consumer_names();
            let mut busy = false;
            while let Some(Ok(name)) = futures::StreamExt::next(&mut names).await {
                if let Ok(mut c) = stream.get_consumer::<consumer::pull::Config>(&name).await {
                    busy |= c.info().await.is_ok_and(|i| i.num_ack_pending == 1);
                }
            }
            busy
        }
    })
    .await;
    first.kill();

    // The ack wait runs out with no host at all. nats-server 2.9 sends the
    // MAX_DELIVERIES advisory only while some pull request waits, so wait
    // on the handler's consumers the way any client could.
    let stream = events(&js).await;
    let mut names = Vec::new();
    let mut listed = stream.consumer_names();
    while let Some(Ok(name)) = futures::StreamExt::next(&mut listed).await {
        names.push(name);
    }
    let advisories = js.get_stream("HOOK_ADVISORIES").await.expect("advisories");
    wait_for(Duration::from_secs(30), "the advisory captured", || async {
        for name in &names {
            if let Ok(c) = stream.get_consumer::<consumer::pull::Config>(name).await
                && let Ok(mut batch) = c
                    .fetch()
                    .max_messages(1)
                    .expires(Duration::from_millis(300))
                    .messages()
                    .await
            {
                while let Some(message) = futures::StreamExt::next(&mut batch).await {
                    // Nothing may be handed out: the event is out of deliveries.
                    assert!(message.is_err(), "the event was redelivered");
                }
            }
        }
        advisories
            .clone()
            .info()
            .await
            .is_ok_and(|i| i.state.messages == 1)
    })
    .await;
    assert!(dead_letters(&js).await.is_empty(), "nobody wrote it yet");

    let second = LoggedProcess::start(dir.path(), &args, "second").await;
    let entries = wait_dead_letters(&js, 1).await;
    // The dying host had parked the entity before its last delivery ran,
    // so the entity's next event waits behind the dead letter.
    let next = send_crm(
        &second.address,
        crm_order("order.updated", "ORD-S", 2),
        "stuck-2",
    )
    .await;
    let attempts = js.get_key_value("hook_attempts").await.expect("bucket");
    let key = park::key(
        "stuck",
        next["subject"].as_str().expect("the event's subject"),
    )
    .expect("key");
    wait_for(Duration::from_secs(20), "the next event queued", || async {
        park::read(&attempts, &key)
            .await
            .expect("read")
            .0
            .is_some_and(|r| {
                r.dead_letters == [entries[0].stream_seq]
                    && r.waiting == [next["stream_seq"].as_u64().expect("seq")]
            })
    })
    .await;
    drop(second);
    let entry = &entries[0];
    assert_eq!(entry.handler, "stuck");
    assert_eq!(entry.reason, "max-deliveries");
    assert_eq!(entry.attempts, 1);
    assert!(
        entry.error.contains("timed out unacknowledged"),
        "{}",
        entry.error
    );
    assert_eq!(Some(entry.stream_seq), answer["stream_seq"].as_u64());
}

#[tokio::test]
async fn replay_after_fixing_the_payload_or_the_handler_and_every_replay_is_audited() {
    let nats = NatsServer::start().expect("nats");
    let mut strict = manifest("strict", "fixture_permanent", "crm.order.>");
    strict.max_deliver = 2;
    let host = host_with(&nats, vec![recorder("rec", OnDeadLetter::Continue), strict]).await;
    let js = jetstream(&nats).await;
    let cli = Cli::new(&nats);
    host.send("crm", ticket("T-9", true), "t-9").await;
    host.send("crm", crm_order("order.created", "ORD-1", 1), "o-1")
        .await;
    let entries = wait_dead_letters(&js, 2).await;
    let ticket_entry = entries.iter().find(|e| e.handler == "rec").expect("rec");
    let order_entry = entries
        .iter()
        .find(|e| e.handler == "strict")
        .expect("strict");

    // Unfixed, the replay fails again: the entry is replaced, with the new
    // error and one more attempt, and the command says so.
    let seq = ticket_entry.dlq_seq.to_string();
    let again = cli
        .run(&["dlq", "replay", &seq, "--actor", "ops-anna"])
        .await;
    assert!(!again.ok);
    assert!(
        again.stdout.contains("failed: asked to fail"),
        "{}",
        again.stdout
    );
    let replaced = dead_letters(&js)
        .await
        .into_iter()
        .find(|e| e.handler == "rec")
        .expect("still a dead letter");
    assert_ne!(replaced.dlq_seq, ticket_entry.dlq_seq);
    assert_eq!(replaced.attempts, ticket_entry.attempts + 1);
    assert_eq!(
        replaced.payload, ticket_entry.payload,
        "original payload kept"
    );
    assert_eq!(replaced.first_failure, ticket_entry.first_failure);

    // One replay or purge at a time per entry: while another holds it,
    // both are refused and nothing changes.
    let attempts = js.get_key_value("hook_attempts").await.expect("bucket");
    store::claim(&attempts, replaced.dlq_seq, "a replay elsewhere")
        .await
        .expect("claimed");
    let seq = replaced.dlq_seq.to_string();
    let busy = cli.run(&["dlq", "replay", &seq]).await;
    assert!(!busy.ok);
    assert!(
        busy.stdout
            .contains("is being worked on by a replay elsewhere"),
        "{}",
        busy.stdout
    );
    let busy = cli.run(&["dlq", "purge", &seq, "--yes"]).await;
    assert!(
        !busy.ok && busy.stdout.contains("not purged"),
        "{}",
        busy.stdout
    );
    assert_eq!(dead_letters(&js).await.len(), 2);
    store::unclaim(&attempts, replaced.dlq_seq).await;

    // One fixed payload is for one event.
    std::fs::write(cli.path("one.json"), ticket("T-9", false)).expect("write");
    let many = cli
        .run(&[
            "dlq",
            "replay",
            &seq,
            &order_entry.dlq_seq.to_string(),
            "--payload",
            "one.json",
        ])
        .await;
    assert!(
        !many.ok && many.stderr.contains("give exactly one dead letter"),
        "{}",
        many.stderr
    );

    // A dry run touches nothing.
    let dry = cli
        .run(&["dlq", "replay", "--handler", "rec", "--dry-run"])
        .await;
    assert!(dry.ok && dry.stdout.contains("1 dead letter(s) would be replayed"));
    assert_eq!(dead_letters(&js).await.len(), 2);

    // With the payload fixed, it succeeds: the handler ran on it, its emit
    // is published, and the entry is gone.
    std::fs::write(cli.path("fixed.json"), ticket("T-9", false)).expect("write");
    let fixed = cli
        .run(&[
            "dlq",
            "replay",
            &replaced.dlq_seq.to_string(),
            "--payload",
            "fixed.json",
            "--actor",
            "ops-anna",
        ])
        .await;
    assert!(fixed.ok, "{}\n{}", fixed.stdout, fixed.stderr);
    assert!(
        fixed.stdout.contains("ok, entry removed"),
        "{}",
        fixed.stdout
    );
    assert_eq!(seen(&js, "rec", "T-9").await, vec!["t-9"]);
    assert_eq!(messages(&js, "hook.rec.").await.len(), 1, "the emit");
    assert!(dead_letters(&js).await.iter().all(|e| e.handler != "rec"));

    // Fix the handler instead: deploy a fixed `strict` (the recorder) and
    // replay on it — but not before a host runs it.
    host.shutdown().await.expect("clean stop");
    let nobody = cli.run(&["dlq", "replay", "--handler", "strict"]).await;
    assert!(!nobody.ok);
    assert!(
        nobody
            .stdout
            .contains("no running host has handler \"strict\" loaded"),
        "{}",
        nobody.stdout
    );
    assert_eq!(dead_letters(&js).await.len(), 1, "kept");
    let host = host_with(&nats, Vec::new()).await;
    std::fs::write(
        cli.path("strict.toml"),
        "name = \"strict\"\nsubject = \"crm.order.>\"\nmax_deliver = 2\n",
    )
    .expect("manifest");
    let recorder = guest("fixture_recorder").display().to_string();
    let deployed = cli
        .run(&["deploy", &recorder, "--manifest", "strict.toml"])
        .await;
    assert!(deployed.ok, "{}\n{}", deployed.stdout, deployed.stderr);
    let version = format!(
        "1-{}",
        &hookmesh::deploy::sha256_hex(&std::fs::read(&recorder).expect("component"))[..12]
    );
    wait_for(
        Duration::from_secs(30),
        "the fixed version running",
        || async {
            host.admin_get("/metrics").await.1.contains(&format!(
                "hookmesh_handler_version{{handler=\"strict\",version=\"{version}\"}} 1"
            ))
        },
    )
    .await;
    let by_handler = cli
        .run(&[
            "dlq",
            "replay",
            "--handler",
            "strict",
            "--reason",
            "permanent",
        ])
        .await;
    assert!(
        by_handler.ok,
        "{}\n{}",
        by_handler.stdout, by_handler.stderr
    );
    assert!(
        by_handler
            .stdout
            .contains(&format!("on strict version {version}: ok")),
        "ran on the deployed version: {}",
        by_handler.stdout
    );
    assert_ne!(order_entry.handler_version, version);
    assert_eq!(seen(&js, "strict", "ORD-1").await, vec!["o-1"]);
    assert!(dead_letters(&js).await.is_empty());
    // Their advisories read again long after the duplicate window (here
    // shrunk to a second) bring nothing back.
    let mut dlq = js.get_stream("HOOK_DLQ").await.expect("HOOK_DLQ");
    let mut config = dlq.info().await.expect("info").config.clone();
    config.duplicate_window = Duration::from_secs(1);
    js.update_stream(config).await.expect("shorter window");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    reprocess_advisories(&js).await;
    assert!(
        dead_letters(&js).await.is_empty(),
        "resolved stays resolved"
    );

    // Every replay is in the audit trail: who, what, payload changed, outcome.
    let audit = audit_records(&js).await;
    let replays: Vec<_> = audit.iter().filter(|r| r["action"] == "replay").collect();
    assert_eq!(replays.len(), 3, "{audit:?}");
    assert_eq!(replays[0]["actor"], "ops-anna");
    assert_eq!(replays[0]["outcome"], "failed");
    assert_eq!(replays[0]["payload_changed"], false);
    assert_eq!(replays[0]["entries"][0]["dlq_seq"], ticket_entry.dlq_seq);
    assert!(
        replays[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("asked to fail"))
    );
    assert_eq!(replays[1]["outcome"], "ok");
    assert_eq!(replays[1]["payload_changed"], true);
    assert_eq!(replays[2]["handler"], "strict");
    assert_eq!(replays[2]["outcome"], "ok");
    assert!(replays.iter().all(|r| r["at"].as_str().is_some()));
    drop(host);
}

#[tokio::test]
async fn a_parking_handler_holds_the_entity_until_its_dead_letter_is_replayed_or_purged() {
    let nats = NatsServer::start().expect("nats");
    let host = host_with(&nats, vec![recorder("rec", OnDeadLetter::Park)]).await;
    let js = jetstream(&nats).await;
    let attempts = js.get_key_value("hook_attempts").await.expect("bucket");
    let cli = Cli::new(&nats);
    let (held, neighbour) = ("T-100".to_string(), same_partition_as("T-100"));

    host.send("crm", ticket(&held, true), "h-1").await;
    host.send("crm", ticket(&held, false), "h-2").await;
    host.send("crm", ticket(&neighbour, false), "n-1").await;
    let last_held = host.send("crm", ticket(&held, false), "h-3").await.json;
    let entries = wait_dead_letters(&js, 1).await;
    // The neighbour in the same partition goes on; the held entity waits.
    wait_for(Duration::from_secs(10), "the neighbour handled", || async {
        seen(&js, "rec", &neighbour).await == ["n-1"]
    })
    .await;
    let key = park::key("rec", &ticket_subject(&held)).expect("key");
    wait_for(
        Duration::from_secs(10),
        "both later events queued",
        || async {
            park::read(&attempts, &key)
                .await
                .expect("read")
                .0
                .is_some_and(|r| r.waiting.len() == 2)
        },
    )
    .await;
    // The server has settled the partition up to h-3 (nothing awaits an
    // ack or a redelivery): h-2 and h-3 are in the park record only, and
    // no delivery of them can run before the entity is released.
    let held_seq = last_held["stream_seq"].as_u64().expect("seq");
    let held_partition = partition_of(last_held["subject"].as_str().expect("subject"));
    wait_for(Duration::from_secs(10), "the partition settled", || async {
        consumer_settled(&js, "rec", held_partition, held_seq).await
    })
    .await;
    assert!(
        seen(&js, "rec", &held).await.is_empty(),
        "nothing ran out of order"
    );

    // Replayed with a fixed payload: the dead letter runs first, then the
    // waiting events in order, then what arrives later.
    std::fs::write(cli.path("fixed.json"), ticket(&held, false)).expect("write");
    let replay = cli
        .run(&[
            "dlq",
            "replay",
            &entries[0].dlq_seq.to_string(),
            "--payload",
            "fixed.json",
        ])
        .await;
    assert!(replay.ok, "{}\n{}", replay.stdout, replay.stderr);
    assert!(
        replay.stdout.contains("parked events are released"),
        "{}",
        replay.stdout
    );
    wait_for(Duration::from_secs(10), "the parked events ran", || async {
        seen(&js, "rec", &held).await == ["h-1", "h-2", "h-3"]
    })
    .await;
    wait_for(Duration::from_secs(10), "the park record gone", || async {
        park::read(&attempts, &key).await.expect("read").0.is_none()
    })
    .await;
    host.send("crm", ticket(&held, false), "h-4").await;
    wait_for(
        Duration::from_secs(10),
        "a later event runs at once",
        || async { seen(&js, "rec", &held).await == ["h-1", "h-2", "h-3", "h-4"] },
    )
    .await;

    // Purged instead: the waiting event runs, the purged one never does.
    let other = "T-200";
    host.send("crm", ticket(other, true), "o-1").await;
    host.send("crm", ticket(other, false), "o-2").await;
    let entries = wait_dead_letters(&js, 1).await;
    let other_key = park::key("rec", &ticket_subject(other)).expect("key");
    wait_for(
        Duration::from_secs(10),
        "the later event queued",
        || async {
            park::read(&attempts, &other_key)
                .await
                .expect("read")
                .0
                .is_some_and(|r| r.waiting.len() == 1)
        },
    )
    .await;
    let seq = entries[0].dlq_seq.to_string();
    let unconfirmed = cli.run(&["dlq", "purge", &seq]).await;
    assert!(!unconfirmed.ok);
    assert!(
        unconfirmed.stderr.contains("--yes"),
        "{}",
        unconfirmed.stderr
    );
    assert_eq!(dead_letters(&js).await.len(), 1, "nothing purged unasked");
    let purged = cli
        .run(&["dlq", "purge", &seq, "--yes", "--actor", "ops-ben"])
        .await;
    assert!(purged.ok, "{}\n{}", purged.stdout, purged.stderr);
    wait_for(Duration::from_secs(10), "the waiting event ran", || async {
        seen(&js, "rec", other).await == ["o-2"]
    })
    .await;
    assert!(dead_letters(&js).await.is_empty());
    let audit = audit_records(&js).await;
    let purge = audit
        .iter()
        .find(|r| r["action"] == "purge")
        .expect("purge audited");
    assert_eq!(purge["actor"], "ops-ben");
    assert_eq!(purge["entries"][0]["dlq_seq"], entries[0].dlq_seq);
    drop(host);
}

#[tokio::test]
async fn by_default_the_entity_goes_on_and_old_entries_are_purged_by_handler() {
    let nats = NatsServer::start().expect("nats");
    let host = host_with(&nats, vec![recorder("rec", OnDeadLetter::Continue)]).await;
    let js = jetstream(&nats).await;
    host.send("crm", ticket("T-5", true), "c-1").await;
    host.send("crm", ticket("T-5", false), "c-2").await;
    wait_dead_letters(&js, 1).await;
    wait_for(Duration::from_secs(10), "the later event ran", || async {
        seen(&js, "rec", "T-5").await == ["c-2"]
    })
    .await;

    let cli = Cli::new(&nats);
    let young = cli
        .run(&[
            "dlq",
            "purge",
            "--handler",
            "rec",
            "--older-than",
            "1h",
            "--yes",
        ])
        .await;
    assert!(
        young.ok && young.stdout.contains("nothing to purge"),
        "{}",
        young.stdout
    );
    assert_eq!(dead_letters(&js).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let old = cli
        .run(&[
            "dlq",
            "purge",
            "--handler",
            "rec",
            "--older-than",
            "1s",
            "--yes",
        ])
        .await;
    assert!(
        old.ok && old.stdout.contains("purged 1 dead letter(s)"),
        "{}",
        old.stdout
    );
    assert!(dead_letters(&js).await.is_empty());
    drop(host);
}

/// A dead letter is written from the failure's attempt record: while the
/// record cannot be stored (its bucket unreachable), the event waits in
/// hand, and the dead letter, once the bucket is back, says what failed —
/// not that nothing was recorded.
#[tokio::test]
async fn a_dead_letter_waits_for_its_attempt_record_and_then_says_what_failed() {
    let nats = NatsServer::start().expect("nats");
    let js = jetstream(&nats).await;
    let mut handler = recorder("rec", OnDeadLetter::Continue);
    handler.max_deliver = 1;
    let host = host_with(&nats, vec![handler]).await;
    // The entity's first event runs, so the host knows it is not held and
    // does not need the bucket to start the next one.
    assert_eq!(
        host.send("crm", ticket("T-REC", false), "ok-1")
            .await
            .status,
        202
    );
    wait_for(
        Duration::from_secs(10),
        "the first event handled",
        || async { seen(&js, "rec", "T-REC").await.len() == 1 },
    )
    .await;

    let bucket = format!("KV_{}", hookmesh::streams::ATTEMPTS_BUCKET);
    js.delete_stream(&bucket).await.expect("bucket gone");
    assert_eq!(
        host.send("crm", ticket("T-REC", true), "fail-2")
            .await
            .status,
        202
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        dead_letters(&js).await.is_empty(),
        "no dead letter while its attempt record cannot be stored"
    );

    let ingest = crate::streams::ingest(&nats, "");
    hookmesh::streams::apply(&js, &ingest, hookmesh::streams::Mode::Update)
        .await
        .expect("bucket back");
    let dead = wait_dead_letters(&js, 1).await;
    assert_eq!(dead[0].reason, "max-deliveries", "{:?}", dead[0].error);
    assert!(
        dead[0].error.contains("asked to fail until attempt"),
        "the handler's own error: {}",
        dead[0].error
    );
    host.shutdown().await.expect("stop");
}
