//! What an operator sees: the backlog gauges following the server,
//! `hookmesh status` against a live host, JSON logs of a real process, and
//! the console driven in a real browser.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use futures::StreamExt;
use hookmesh::dispatch::Dispatch;
use hookmesh::dlq::store;
use hookmesh::metrics::Metrics;
use hookmesh::status::gauges;
use hookmesh::subject::{encode_token, partition};
use hookmesh_test_support::NatsServer;
use serde_json::{Value, json};

use crate::deploy::Bed;
use crate::handlers::state;
use crate::support::*;

const TOKEN: &str = "console-test-token-0123456789";

/// A ticket for the recorder fixture; `fail` makes every attempt fail.
fn ticket(id: &str, fail: bool, note: &str) -> Vec<u8> {
    let mut body = json!({"type": "ticket.updated", "data": {"id": id}, "note": note});
    if fail {
        body["fail_until_attempt"] = json!(1000);
    }
    serde_json::to_vec(&body).expect("json")
}

/// The recorder on `crm.ticket.>`, dead-lettering after 2 deliveries.
fn recorder() -> hookmesh::manifest::Manifest {
    let mut manifest = manifest("rec", "fixture_recorder", "crm.ticket.>");
    manifest.max_deliver = 2;
    manifest
}

/// One gauge's value in a metrics text.
fn gauge(metrics: &str, series: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn backlog_gauges_follow_pending_acks_and_redeliveries_on_the_server() {
    let nats = NatsServer::start().expect("nats");
    let host = TestHost::start(&nats).await;
    let js = jetstream(&nats).await;
    // A handler nobody runs: its consumer only collects events.
    let manifest = manifest("lagging", "fixture_noop", "crm.order.>");
    let p = partition("crm", "order", &encode_token("ORD-1"), 16);
    let consumer = events(&js)
        .await
        .create_consumer(Dispatch::consumer_config(&manifest, p).expect("config"))
        .await
        .expect("consumer");
    for version in 1..=3 {
        let body = crm_order("order.created", "ORD-1", version);
        assert_eq!(
            host.send("crm", body, &format!("o-{version}")).await.status,
            202
        );
    }
    let metrics = Metrics::default();
    let mut seen = gauges::Seen::default();
    let read = |metrics: &Metrics| {
        let text = metrics.render();
        [
            "hookmesh_handler_pending",
            "hookmesh_handler_ack_pending",
            "hookmesh_handler_redelivered",
        ]
        .map(|name| gauge(&text, &format!("{name}{{handler=\"lagging\"}}")))
    };
    gauges::refresh(&js, &metrics, &mut seen).await;
    assert_eq!(read(&metrics), [Some(3), Some(0), Some(0)]);

    // Delivered once, handed back, delivered again: pending, in hand, and
    // redelivered while unacked.
    let mut first = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = first.next().await.expect("one").expect("message");
    // Confirmed by the server, so the next fetch gets it again.
    message
        .double_ack_with(AckKind::Nak(None))
        .await
        .expect("nak");
    let mut again = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let message = again.next().await.expect("one").expect("message");
    assert_eq!(message.info().expect("info").delivered, 2);
    gauges::refresh(&js, &metrics, &mut seen).await;
    assert_eq!(read(&metrics), [Some(2), Some(1), Some(1)]);

    message.double_ack().await.expect("ack");
    gauges::refresh(&js, &metrics, &mut seen).await;
    assert_eq!(read(&metrics), [Some(2), Some(0), Some(0)]);

    // The host refreshes its own gauges (every 10 s) to the same figures.
    wait_for(Duration::from_secs(30), "the host's gauges", || async {
        let text = host.metrics().await;
        gauge(&text, r#"hookmesh_handler_pending{handler="lagging"}"#) == Some(2)
    })
    .await;

    // Gone from the server: back to 0, not stuck at the last reading.
    events(&js)
        .await
        .delete_consumer(&manifest.consumer_name(p))
        .await
        .expect("delete");
    gauges::refresh(&js, &metrics, &mut seen).await;
    assert_eq!(read(&metrics), [Some(0), Some(0), Some(0)]);
}

/// The cells of a table line: what two or more spaces separate.
fn cells(line: &str) -> Vec<&str> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect()
}

/// The cell of `row` under `name` in `header` (cells are never empty in
/// these tables).
fn column<'a>(row: &'a str, header: &str, name: &str) -> &'a str {
    let index = cells(header)
        .iter()
        .position(|h| *h == name)
        .unwrap_or_else(|| panic!("no column {name} in {header}"));
    cells(row)
        .get(index)
        .copied()
        .unwrap_or_else(|| panic!("no cell {name} in {row}"))
}

#[tokio::test]
async fn status_shows_a_live_installation_on_one_screen_and_as_json() {
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest = bed.file(
        "rec.toml",
        b"name = \"rec\"\nsubject = \"crm.ticket.>\"\nmax_deliver = 2\nack_wait = \"10s\"\ntimeout = \"2s\"\n[backoff]\ninitial = \"100ms\"\nmax = \"200ms\"\n",
    );
    bed.ok(&["deploy", &wasm, "--manifest", &manifest, "--actor", "anna"]);
    let version = bed
        .store()
        .await
        .current("rec")
        .await
        .expect("read")
        .expect("deployed")
        .version;
    let host = TestHost::start(&bed.nats).await;
    wait_for(Duration::from_secs(30), "the host owns rec", || async {
        host.owned("rec").await == 16
    })
    .await;
    host.send("crm", ticket("T-1", false, "ok"), "t-1").await;
    host.send("crm", ticket("T-2", true, "fails"), "t-2").await;
    wait_for(Duration::from_secs(20), "one dead letter", || async {
        store::list(&bed.js, &Default::default())
            .await
            .is_ok_and(|l| l.len() == 1)
    })
    .await;

    let screen = bed.ok(&["status"]);
    assert!(
        !screen.contains('\x1b'),
        "no colour off a terminal:\n{screen}"
    );
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines[0].starts_with("hookmesh status  "), "{screen}");
    assert!(!screen.contains("PROBLEM"), "{screen}");
    let find = |prefix: &str| {
        *lines
            .iter()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("a line starting {prefix:?} in\n{screen}"))
    };
    assert!(find("NATS ").contains(" at 127.0.0.1:"), "{screen}");
    assert!(find("JETSTREAM ").contains(" streams, "), "{screen}");
    let streams = find("STREAM ");
    for stream in hookmesh::streams::names() {
        let row = find(&format!("{stream} "));
        assert!(!row.contains("missing"), "{row}");
        assert!(!column(row, streams, "MESSAGES").is_empty(), "{row}");
    }
    let events_row = find("HOOK_EVENTS ");
    assert!(
        column(events_row, streams, "MESSAGES")
            .parse::<u64>()
            .expect("a count")
            >= 2,
        "{events_row}"
    );
    let header = find("HANDLER ");
    for column_name in [
        "VERSION",
        "OWNED",
        "OWNERS",
        "PENDING",
        "ACK PENDING",
        "REDELIVERED",
        "DEAD LETTERS",
        "OLDEST",
    ] {
        assert!(header.contains(column_name), "{header}");
    }
    let rec = find("rec ");
    assert_eq!(column(rec, header, "VERSION"), version);
    assert_eq!(column(rec, header, "OWNED"), "16/16");
    assert!(column(rec, header, "OWNERS").ends_with("×16"), "{rec}");
    assert_eq!(column(rec, header, "DEAD LETTERS"), "1");
    assert!(
        find("DEAD LETTERS ").starts_with("DEAD LETTERS  1, oldest "),
        "{screen}"
    );
    assert!(find("AUDIT ").contains("newest first"), "{screen}");
    let audit = find("SEQ ");
    let deploy = lines
        .iter()
        .find(|l| l.contains(" deploy ") && l.contains(" anna "))
        .unwrap_or_else(|| panic!("the deploy in the audit trail:\n{screen}"));
    assert_eq!(column(deploy, audit, "HANDLER"), "rec");
    assert_eq!(column(deploy, audit, "OUTCOME"), "ok");

    let json: Value = serde_json::from_str(&bed.ok(&["status", "--json"])).expect("json");
    assert_eq!(json["problems"], json!([]));
    assert_eq!(json["dlq"]["depth"], 1);
    let rec = &json["handlers"][0];
    assert_eq!(rec["name"], "rec");
    assert_eq!(rec["deployment"]["version"], version.as_str());
    assert_eq!(rec["consumers"], 16);
    assert_eq!(rec["dead_letters"], 1);
    let partitions = rec["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), 16);
    assert!(
        partitions
            .iter()
            .all(|p| p["host"].is_string() && p["lease_ms"].as_i64().is_some_and(|ms| ms > 0)),
        "{partitions:?}"
    );
    let streams = json["streams"].as_array().expect("streams");
    assert!(streams.iter().all(|s| s["present"] == true), "{streams:?}");
    assert_eq!(json["audit"][0]["action"], "deploy");
    assert_eq!(json["audit"][0]["actor"], "anna");
    assert!(json["nats"]["version"].is_string());
    assert!(
        json["jetstream"]["streams"]
            .as_u64()
            .is_some_and(|n| n >= 11)
    );
}

#[tokio::test]
async fn a_host_logging_json_writes_every_line_of_an_invocation_with_its_fields() {
    let bed = Bed::new().await;
    let wasm = guest("fixture_recorder").display().to_string();
    let manifest = bed.file(
        "rec.toml",
        b"name = \"rec\"\nsubject = \"crm.ticket.>\"\nmax_deliver = 2\nack_wait = \"10s\"\ntimeout = \"2s\"\n[backoff]\ninitial = \"100ms\"\nmax = \"200ms\"\n",
    );
    bed.ok(&["deploy", &wasm, "--manifest", &manifest]);
    let config = bed.config.display().to_string();
    let cache = guest_cache_dir().display().to_string();
    let mut host = LoggedProcess::spawn(
        bed.dir.path(),
        &["serve", "--config", &config, "--cache-dir", &cache],
        "host",
        &[("HOOKMESH_LOG", "info"), ("HOOKMESH_LOG_FORMAT", "json")],
    );
    wait_for(Duration::from_secs(60), "the host listens", || async {
        json_lines(&host.log())
            .iter()
            .any(|l| l["message"] == "dispatch started")
    })
    .await;
    let address = json_lines(&host.log())
        .iter()
        .find_map(|l| l["address"].as_str().map(str::to_string))
        .expect("the listening address");
    let answer = send_crm(&address, ticket("T-9", true, "fails"), "t-9").await;
    let stream_seq = answer["stream_seq"].as_u64().expect("seq");
    wait_for(
        Duration::from_secs(20),
        "the dead letter logged",
        || async {
            json_lines(&host.log())
                .iter()
                .any(|l| l["message"] == "failed; dead letter")
        },
    )
    .await;
    host.kill();

    // The lines written while the handler ran the event (the dead-letter
    // writer's own line about it is not one of them).
    let invocation: Vec<Value> = json_lines(&host.log())
        .into_iter()
        .filter(|l| {
            l["stream_seq"] == stream_seq
                && l["handler"] == "rec"
                && l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("hookmesh::dispatch"))
        })
        .collect();
    let messages: Vec<&str> = invocation
        .iter()
        .filter_map(|l| l["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"failed; will retry") && messages.contains(&"failed; dead letter"),
        "{messages:?}"
    );
    for line in &invocation {
        for key in [
            "timestamp",
            "level",
            "version",
            "correlation_id",
            "subject",
            "attempt",
        ] {
            assert!(
                line.get(key).is_some_and(|v| !v.is_null()),
                "{key} missing in {line}"
            );
        }
        assert_eq!(line["subject"], answer["subject"], "{line}");
        assert_eq!(line["correlation_id"], answer["correlation_id"], "{line}");
        assert!(
            line.get("trace_id").is_none(),
            "no trace id is made up: {line}"
        );
    }
}

/// A JSON log, one object per line (a line that is not one fails the test).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Whether the browser test's tools are here: Chromium, node, and the
/// project's playwright-core (`scripts/prereqs.sh` installs all three).
fn browser_tools(dir: &Path) -> Result<(), String> {
    if !Path::new("/usr/bin/chromium").exists() {
        return Err("/usr/bin/chromium is missing (apt-get install chromium)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("node is missing".into());
    }
    if !dir.join("node_modules/playwright-core").is_dir() {
        return Err(format!(
            "{} has no node_modules (npm ci there)",
            dir.display()
        ));
    }
    Ok(())
}

#[tokio::test]
async fn the_console_in_a_browser_replays_a_dead_letter_with_the_token_and_shows_payloads_as_text()
{
    let browser = workspace().join("tests/browser");
    if let Err(missing) = browser_tools(&browser) {
        let required =
            std::env::var_os("CI").is_some() || std::env::var_os("REQUIRE_TEST_TOOLS").is_some();
        assert!(!required, "the browser test cannot run: {missing}");
        eprintln!("SKIPPED: the console browser test: {missing} (scripts/prereqs.sh installs it)");
        return;
    }
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        handlers: vec![recorder()],
        admin_token: Some(TOKEN.into()),
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let js = jetstream(&nats).await;
    let hostile = "<script>window.__pwned=1</script>";
    let sent = host.send("crm", ticket("T-1", true, hostile), "t-1").await;
    assert_eq!(sent.status, 202);
    wait_for(Duration::from_secs(20), "the dead letter", || async {
        store::list(&js, &Default::default())
            .await
            .is_ok_and(|l| l.len() == 1)
    })
    .await;

    let shots: PathBuf = workspace().join("target/test-artifacts");
    let run = tokio::process::Command::new("node")
        .arg(browser.join("console.mjs"))
        .arg(&host.admin)
        .arg(TOKEN)
        .arg(&shots)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the browser script ends")
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON");
    assert_eq!(seen["ok"], true);
    assert!(shots.join("console-dead-letter.png").is_file());

    // What the browser did, seen from NATS: the entry is gone, the handler
    // ran the fixed payload, and the replay is audited as the console's.
    assert!(
        store::list(&js, &Default::default())
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(state(&js, "rec", "seen/T-1").await.as_deref(), Some("t-1"));
    let audit = stored_messages(&js, "HOOK_AUDIT").await;
    let replays: Vec<Value> = audit
        .iter()
        .map(|m| serde_json::from_slice::<Value>(&m.payload).expect("json"))
        .filter(|r| r["action"] == "replay")
        .collect();
    assert_eq!(
        replays.len(),
        1,
        "only the replay with the token ran: {replays:?}"
    );
    assert_eq!(replays[0]["actor"], "console:browser-test");
    assert_eq!(replays[0]["outcome"], "ok");
    assert_eq!(replays[0]["payload_changed"], true);
    assert_eq!(replays[0]["entries"][0]["dlq_seq"], seen["seq"]);
}
