//! The `hookmesh` binary itself: `up` with no config at all, `send`,
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

/// A port nothing listens on right now (the server that had it stopped).
fn unused_port() -> u16 {
    let probe = NatsServer::start().expect("nats");
    probe.port()
}

#[tokio::test]
async fn up_with_no_config_starts_nats_and_send_works_then_ctrl_c_stops_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats_port = unused_port();
    let env = vec![
        ("HOOKMESH_NATS_URL", format!("nats://127.0.0.1:{nats_port}")),
        ("HOOKMESH_HTTP_LISTEN", "127.0.0.1:0".to_string()),
        (
            "NATS_SERVER_BIN",
            hookmesh_test_support::server_binary().display().to_string(),
        ),
    ];
    let mut up = HostProcess::spawn(dir.path(), &["up"], &env);
    let mut lines = Lines::of(&mut up);
    let warning = lines.wait_for("built-in development config");
    assert!(warning.contains("for local use only"), "{warning}");
    lines.wait_for("started a local nats-server");
    let banner = lines.wait_for("hookmesh is up");
    let address = word_after(&banner, "POST http://")
        .trim_end_matches("/webhooks/<provider>")
        .to_string();
    lines.wait_for("stream ready");

    let body = dir.path().join("order.json");
    std::fs::write(&body, crm_order("order.created", "ORD-UP", 1)).expect("write body");
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

    up.signal(libc::SIGINT);
    let status = wait_exit(&mut up, Duration::from_secs(20));
    assert!(status.success(), "up exits 0 on Ctrl-C: {status:?}");
    lines.wait_for("local nats-server stopped");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err(),
        "the local nats-server is gone"
    );
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
    let send_all = |url: String| {
        let http = http.clone();
        let deliveries = deliveries.clone();
        async move {
            futures::stream::iter(deliveries.into_iter().map(|d| {
                let http = http.clone();
                let url = url.clone();
                async move {
                    match http.post(&url).headers(d.headers).body(d.body).send().await {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    }
                }
            }))
            .buffer_unordered(16)
            .collect::<Vec<u16>>()
            .await
        }
    };

    // Kill -9 the host while a third of the load is answered.
    let js = jetstream(&nats).await;
    let load = tokio::spawn(send_all(url));
    wait_for(Duration::from_secs(30), "some events stored", || async {
        stored_count(&js).await >= (EVENTS / 3) as u64
    })
    .await;
    first.signal(libc::SIGKILL);
    let statuses = load.await.expect("load");
    let answered = statuses.iter().filter(|s| **s == 202).count();
    assert!(
        answered < EVENTS,
        "the kill landed mid-load ({answered} answered)"
    );

    // Providers retry everything they did not get a 2xx for — and, to be
    // strict, everything else too.
    let (_second, _lines2, url) = serve(dir.path(), &nats);
    let statuses = send_all(url).await;
    assert!(
        statuses.iter().all(|s| *s == 202 || *s == 200),
        "{statuses:?}"
    );
    assert_eq!(
        stored_count(&js).await,
        EVENTS as u64,
        "every event stored exactly once"
    );
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
