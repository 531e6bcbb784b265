//! The `hookmesh` binary itself: `up` with no config at all (with the
//! mock ERP the example handler writes to), `send`,
//! `serve` surviving a SIGKILL at any instant without losing or doubling an
//! event, and clear errors for bad input.

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use hookmesh_test_support::NatsServer;

use crate::support::*;

/// Lines a child writes to stderr, collected by a thread.
struct Lines(mpsc::Receiver<String>, Vec<String>);

impl Lines {
    fn of(process: &mut HostProcess) -> Lines {
        let stderr = process.child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx, Vec::new())
    }

    /// Waits for a line containing `needle` and returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.1.iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.0.recv_timeout(left) {
                Ok(line) => self.1.push(line),
                Err(_) => panic!("no line with {needle:?}; got:\n{}", self.1.join("\n")),
            }
        }
    }
}

/// The text after `marker` up to the next whitespace.
fn word_after<'a>(line: &'a str, marker: &str) -> &'a str {
    let rest = &line[line.find(marker).expect("marker") + marker.len()..];
    rest.split_whitespace().next().expect("word")
}

#[tokio::test]
async fn up_with_no_config_starts_nats_and_the_mock_erp_and_a_webhook_becomes_an_erp_sales_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 0: the local nats-server and the mock ERP pick their own ports,
    // and `up` says which.
    let env = vec![
        ("HOOKMESH_NATS_URL", "nats://127.0.0.1:0".to_string()),
        ("HOOKMESH_HTTP_LISTEN", "127.0.0.1:0".to_string()),
        ("HOOKMESH_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("HOOKMESH_MOCK_ERP", "127.0.0.1:0".to_string()),
        (
            "NATS_SERVER_BIN",
            hookmesh_test_support::server_binary().display().to_string(),
        ),
    ];
    let handlers = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers dir");
    let mut up = HostProcess::spawn(dir.path(), &["up"], &env);
    let mut lines = Lines::of(&mut up);
    let warning = lines.wait_for("built-in development config");
    assert!(warning.contains("for local use only"), "{warning}");
    let started = lines.wait_for("started a local nats-server");
    let nats_port: u16 = word_after(&started, "url=nats://127.0.0.1:")
        .parse()
        .expect("the port it picked");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_ok(),
        "the local nats-server listens on the port it named"
    );
    let erp_url = word_after(&lines.wait_for("started the mock ERP"), "url=").to_string();
    let banner = lines.wait_for("hookmesh is up");
    let address = word_after(&banner, "POST http://")
        .trim_end_matches("/webhooks/<provider>")
        .to_string();
    lines.wait_for("stream ready");

    // The shipped order-sync, pointed at this mock ERP: `up` deploys it
    // once its manifest appears.
    let shipped = std::fs::read_to_string(workspace().join("handlers/order-sync/handler.toml"))
        .expect("shipped manifest");
    let component = guest("order_sync").display().to_string();
    let manifest = shipped.replace("http://127.0.0.1:8090", &erp_url).replace(
        "\"../target/wasm32-wasip2/release/order_sync.wasm\"",
        &format!("{component:?}"),
    );
    std::fs::create_dir_all(handlers.join("order-sync")).expect("dir");
    std::fs::write(handlers.join("order-sync/handler.toml"), manifest).expect("manifest");
    lines.wait_for("deployed from");

    let body = workspace().join("examples/webhooks/crm-order-created.json");
    let url = format!("http://{address}/webhooks/crm");
    let send = std::process::Command::new(hookmesh_bin())
        .args(["send", "--provider", "crm", "--file"])
        .arg(&body)
        .args(["--url", &url])
        .current_dir(dir.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("send runs");
    let stdout = String::from_utf8_lossy(&send.stdout);
    assert!(
        send.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&send.stderr)
    );
    assert!(stdout.starts_with("202 "), "{stdout}");
    assert!(stdout.contains("\"subject\":\"hook.crm.order."), "{stdout}");

    // The webhook became a sales order in the ERP.
    let orders = format!("{erp_url}/sales-orders");
    let sales_orders = || async {
        match reqwest::get(&orders).await {
            Ok(answer) => answer.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    };
    wait_for(Duration::from_secs(30), "an ERP sales order", || async {
        sales_orders()
            .await
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    let found = sales_orders().await;
    assert_eq!(found[0]["crm_order_id"], "ORD-1001", "{found}");
    assert_eq!(found[0]["payment_terms"], "NET30", "{found}");

    up.signal(libc::SIGINT);
    let status = wait_exit(&mut up, Duration::from_secs(20));
    assert!(status.success(), "up exits 0 on Ctrl-C: {status:?}");
    lines.wait_for("local nats-server stopped");
    lines.wait_for("mock ERP stopped");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "the local nats-server is gone"
    );
    assert!(reqwest::get(&orders).await.is_err(), "the mock ERP is gone");
    assert!(
        dir.path().join(".hookmesh/nats/jetstream").exists(),
        "store under the working directory"
    );
}

fn wait_exit(process: &mut HostProcess, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = process.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serve(dir: &std::path::Path, nats: &NatsServer) -> (HostProcess, Lines, String) {
    let file = dir.join("hookmesh.toml");
    std::fs::write(&file, config_toml(&nats.url(), &Options::default())).expect("write config");
    let mut host = HostProcess::spawn(dir, &["serve", "--config", "hookmesh.toml"], &[]);
    let mut lines = Lines::of(&mut host);
    let listening = lines.wait_for("listening");
    let address = word_after(&listening, "address=").to_string();
    lines.wait_for("stream ready");
    (host, lines, format!("http://{address}/webhooks/crm"))
}

#[tokio::test]
async fn a_host_killed_mid_load_loses_and_doubles_nothing_when_providers_retry() {
    const EVENTS: usize = 300;
    let nats = NatsServer::start().expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _lines, url) = serve(dir.path(), &nats);

    // Pre-signed deliveries, as providers would resend them.
    let config = hookmesh::config::Config::from_toml(
        &config_toml(&nats.url(), &Options::default()),
        hookmesh::config::Origin::Builtin,
        &hookmesh::config::Env::default(),
    )
    .expect("config");
    let crm = &config.providers["crm"];
    let deliveries: Vec<_> = (0..EVENTS)
        .map(|i| {
            let body = crm_order("order.created", &format!("ORD-{}", i % 40), i as u32);
            hookmesh::send::prepare(
                crm,
                body,
                None,
                Some(&format!("msg_{i}")),
                SystemTime::now(),
            )
            .expect("sign")
        })
        .collect();

    let http = reqwest::Client::new();
    // Sends the deliveries numbered `which`, 16 at a time; each answer
    // with its delivery's number (0 when the request got no answer).
    let send = |url: String, which: Vec<usize>| {
        let http = http.clone();
        let deliveries = deliveries.clone();
        async move {
            futures::stream::iter(which.into_iter().map(|i| {
                let http = http.clone();
                let url = url.clone();
                let d = deliveries[i].clone();
                async move {
                    let status = match http.post(&url).headers(d.headers).body(d.body).send().await
                    {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    (i, status)
                }
            }))
            .buffer_unordered(16)
            .collect::<Vec<(usize, u16)>>()
            .await
        }
    };
    // The stored events, by body (each delivery's body is distinct).
    let stored_bodies = |js: async_nats::jetstream::Context| async move {
        let mut bodies = std::collections::BTreeMap::new();
        for message in stored_messages(&js, "HOOK_EVENTS").await {
            *bodies.entry(message.payload.to_vec()).or_insert(0usize) += 1;
        }
        bodies
    };

    // Kill -9 the host while a third of the load is answered.
    let js = jetstream(&nats).await;
    let load = tokio::spawn(send(url, (0..EVENTS).collect()));
    wait_for(Duration::from_secs(30), "some events stored", || async {
        stored_count(&js).await >= (EVENTS / 3) as u64
    })
    .await;
    first.signal(libc::SIGKILL);
    let statuses = load.await.expect("load");
    let answered: Vec<usize> = statuses
        .iter()
        .filter(|(_, s)| (200..300).contains(s))
        .map(|(i, _)| *i)
        .collect();
    assert!(
        !answered.is_empty() && answered.len() < EVENTS,
        "the kill landed mid-load ({} answered)",
        answered.len()
    );

    // Every 2xx was a promise: its event is stored — checked before any
    // resend could store it.
    let before = stored_bodies(js.clone()).await;
    for i in &answered {
        assert!(
            before.contains_key(&deliveries[*i].body.to_vec()),
            "delivery {i} was answered 2xx but its event is not in HOOK_EVENTS"
        );
    }
    assert!(
        before.values().all(|n| *n == 1),
        "nothing stored twice before the resend"
    );

    // Providers resend what they did not get a 2xx for, to a new host.
    let (_second, _lines2, url) = serve(dir.path(), &nats);
    let others: Vec<usize> = (0..EVENTS).filter(|i| !answered.contains(i)).collect();
    let resent = send(url, others.clone()).await;
    assert!(
        resent.iter().all(|(_, s)| *s == 202 || *s == 200),
        "{resent:?}"
    );
    // Some of those were stored before the kill without an answer: the
    // host recognises them (200, duplicate) rather than storing them again.
    let after = stored_bodies(js.clone()).await;
    assert_eq!(
        stored_count(&js).await,
        EVENTS as u64,
        "every event stored exactly once"
    );
    for (i, d) in deliveries.iter().enumerate() {
        assert_eq!(
            after.get(&d.body.to_vec()),
            Some(&1),
            "delivery {i} stored exactly once"
        );
    }
}

#[tokio::test]
async fn bad_input_fails_with_a_message_naming_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str]| {
        std::process::Command::new(hookmesh_bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("runs")
    };
    let out = run(&["serve"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("serve needs a config file"));

    std::fs::write(
        dir.path().join("bad.toml"),
        "[ingest]\npublish_timeout = \"soon\"\n",
    )
    .expect("write");
    let out = run(&["serve", "--config", "bad.toml"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ingest.publish_timeout"), "{stderr}");

    std::fs::write(dir.path().join("body.json"), "{}").expect("write");
    let out = run(&["send", "--provider", "nope", "--file", "body.json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown provider \"nope\"; configured: crm")
    );
}
