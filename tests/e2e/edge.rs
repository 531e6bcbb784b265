//! The HTTP edge against raw sockets and real clients: slow headers and
//! bodies are closed at their limits and counted, connections beyond the
//! limit wait without disturbing those in progress, a 413 is read by
//! Python's urllib and curl, and no field value reaches NATS as a protocol
//! error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use hookmesh_test_support::NatsServer;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// How long a test waits for something that must happen (far above the
/// limits under test: a bound on a hang, not a measurement).
const PATIENCE: Duration = Duration::from_secs(60);

fn address(host: &TestHost) -> String {
    host.base.trim_start_matches("http://").to_string()
}

/// The value of a counter in the metrics text (0 when absent).
fn counter(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series))
        .and_then(|rest| rest.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Reads until the peer closes; returns what was read. A reset counts as
/// closed too (the bytes before it are kept).
async fn read_to_close(stream: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection stayed open for {PATIENCE:?}"),
        }
    }
}

/// A signed CRM webhook as raw HTTP/1.1: the head and the body apart.
fn raw_webhook(host: &TestHost, order: &str, id: &str, close: bool) -> (Vec<u8>, Vec<u8>) {
    let body = crm_order("order.created", order, 1);
    let signed = host.sign("crm", body, id, SystemTime::now());
    let mut head = format!(
        "POST /webhooks/crm HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        signed.body.len()
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    for (name, value) in &signed.headers {
        head.push_str(&format!(
            "{name}: {}\r\n",
            value.to_str().expect("ASCII header")
        ));
    }
    head.push_str("\r\n");
    (head.into_bytes(), signed.body)
}

fn status_of(response: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(response);
    text.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

#[tokio::test]
async fn slow_headers_are_closed_at_the_header_timeout_and_counted() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        http_toml: "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"\n".into(),
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let before = counter(
        &host.metrics().await,
        "hookmesh_http_connections_closed_total{listener=\"webhook\",reason=\"header_timeout\"}",
    );

    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(address(&host))
            .await
            .expect("connect");
        stream
            .write_all(b"POST /webhooks/crm HTTP/1.1\r\nHost: test\r\nContent-Ty")
            .await
            .expect("half a header");
        slow.push(stream);
    }
    let closed = futures::future::join_all(slow.iter_mut().map(read_to_close)).await;
    for answer in &closed {
        assert!(
            answer.is_empty(),
            "a half header gets no answer, only a close: {:?}",
            String::from_utf8_lossy(answer)
        );
    }

    let metrics = host.metrics().await;
    let after = counter(
        &metrics,
        "hookmesh_http_connections_closed_total{listener=\"webhook\",reason=\"header_timeout\"}",
    );
    assert_eq!(after - before, 200, "{metrics}");
    // The listener still serves.
    assert_eq!(host.get("/healthz").await.0, 200);
    let answer = host
        .send("crm", crm_order("order.created", "ORD-1", 1), "msg_after")
        .await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
}

#[tokio::test]
async fn a_body_trickled_a_byte_a_second_is_closed_at_the_request_timeout() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        http_toml: "header_read_timeout = \"1s\"\nrequest_timeout = \"3s\"\n".into(),
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let (head, body) = raw_webhook(&host, "ORD-T", "msg_trickle", false);
    let stream = tokio::net::TcpStream::connect(address(&host))
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(&head).await.expect("head");
    // One byte a second, until the host closes (a write then fails) or the
    // body is out (it never is before the limit: it is hundreds of bytes).
    let trickle = tokio::spawn(async move {
        for byte in body {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, reader.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the trickling connection stayed open for {PATIENCE:?}"),
        }
    }
    trickle.abort();
    assert_eq!(
        status_of(&answer),
        408,
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let metrics = host.metrics().await;
    assert_eq!(
        counter(
            &metrics,
            "hookmesh_http_connections_closed_total{listener=\"webhook\",reason=\"request_timeout\"}"
        ),
        1,
        "{metrics}"
    );
    let js = jetstream(&nats).await;
    assert_eq!(stored_count(&js).await, 0, "nothing of it is stored");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_while_those_in_progress_complete() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        http_toml: "max_connections = 2\nidle_timeout = \"1s\"\n".into(),
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    // The readiness probes left a keep-alive connection of the test's
    // client; it idles out before the test takes both places.
    wait_for(PATIENCE, "the probes' connections closed", || async {
        counter(
            &host.metrics().await,
            "hookmesh_http_connections{listener=\"webhook\"}",
        ) == 0
    })
    .await;

    // Two requests in progress: head sent, body held back.
    let mut in_progress = Vec::new();
    for (order, id) in [("ORD-A", "msg_a"), ("ORD-B", "msg_b")] {
        let (head, body) = raw_webhook(&host, order, id, true);
        let mut stream = tokio::net::TcpStream::connect(address(&host))
            .await
            .expect("connect");
        stream.write_all(&head).await.expect("head");
        in_progress.push((stream, body));
    }
    wait_for(PATIENCE, "both in progress", || async {
        counter(&host.metrics().await, "hookmesh_webhooks_in_flight") == 2
    })
    .await;

    // A third connection is taken by the kernel but not served.
    let mut third = tokio::net::TcpStream::connect(address(&host))
        .await
        .expect("the backlog takes it");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut buf = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection is not served while two are in progress"
    );

    // The ones in progress complete unaffected…
    for (stream, body) in &mut in_progress {
        stream.write_all(body).await.expect("rest of the body");
        let answer = read_to_close(stream).await;
        assert_eq!(
            status_of(&answer),
            202,
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    // …and the waiting one is served once they are done.
    let answer = read_to_close(&mut third).await;
    assert_eq!(status_of(&answer), 200);
}

const PYTHON_POST: &str = r#"
import sys, urllib.request, urllib.error
url, size, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = b"x" * size
read = 0
for _ in range(tries):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=60)
        print("accepted?")
    except urllib.error.HTTPError as e:
        if e.code == 413:
            read += 1
        else:
            print("status", e.code)
    except Exception as e:
        print("transport error:", repr(e))
print("read413", read)
"#;

fn python_reads_413(url: &str, size: usize, tries: usize) -> (usize, String) {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            PYTHON_POST,
            url,
            &size.to_string(),
            &tries.to_string(),
        ])
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let read = text
        .lines()
        .find_map(|line| line.strip_prefix("read413 "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (read, text + &String::from_utf8_lossy(&output.stderr))
}

fn curl_status(url: &str, file: &std::path::Path) -> String {
    let output = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg("Content-Type: application/json")
        .arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(url)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[tokio::test]
async fn an_oversized_body_gets_a_413_that_python_and_curl_read() {
    let nats = NatsServer::start().expect("nats");
    let options = Options {
        max_body_bytes: 1024 * 1024,
        ..Options::default()
    };
    let host = TestHost::start_with(&nats, options).await;
    let url = format!("{}/webhooks/crm", host.base);
    let dir = tempfile::tempdir().expect("temp dir");
    for size in [1024 * 1024 + 10, 8 * 1024 * 1024] {
        let (python_url, tries) = (url.clone(), 30);
        let (read, log) =
            tokio::task::spawn_blocking(move || python_reads_413(&python_url, size, tries))
                .await
                .expect("python");
        assert_eq!(
            read, 30,
            "urllib with {size} bytes read 413 {read}/30:\n{log}"
        );

        let file = dir.path().join(format!("body-{size}"));
        std::fs::write(&file, vec![b'x'; size]).expect("body file");
        let url = url.clone();
        let statuses = tokio::task::spawn_blocking(move || {
            (0..30)
                .map(|_| curl_status(&url, &file))
                .collect::<Vec<_>>()
        })
        .await
        .expect("curl");
        assert!(
            statuses.iter().all(|s| s == "413"),
            "curl with {size} bytes: {statuses:?}"
        );
    }
    // A plain (std) client that writes the whole body before reading, the
    // way simple HTTP libraries do.
    let address = address(&host);
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(address).expect("connect");
        let body = vec![b'x'; 2 * 1024 * 1024];
        write!(
            stream,
            "POST /webhooks/crm HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .expect("head");
        stream.write_all(&body).expect("the whole body is taken");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        answer
    })
    .await
    .expect("client");
    assert_eq!(status_of(&answer), 413);
}

/// Values with what breaks subjects and headers: dots, wildcards, spaces,
/// the escape character, non-ASCII, at lengths around every limit.
fn nasty(max: usize) -> impl Strategy<Value = String> {
    let chars = prop::sample::select(vec![
        'a', 'Z', '0', '-', '_', '.', '*', '>', '~', ' ', '/', ':', '=', '"', '\\', 'é', '日',
        '\u{3000}', '\u{200b}', '🦀',
    ]);
    let lengths = prop_oneof![
        1usize..40,
        120usize..140,
        250usize..270,
        500usize..530,
        (max * 2 / 3)..max
    ];
    lengths
        .prop_flat_map(move |n| prop::collection::vec(chars.clone(), n))
        .prop_map(|chars| chars.into_iter().collect())
}

/// Header-safe ids (visible ASCII), at lengths around the event id limit.
fn nasty_id() -> impl Strategy<Value = String> {
    let lengths = prop_oneof![1usize..40, 500usize..530, 1000usize..6000];
    lengths
        .prop_flat_map(|n| prop::collection::vec(0x21u8..0x7f, n))
        .prop_map(|bytes| String::from_utf8(bytes).expect("ASCII"))
}

#[test]
fn no_field_value_reaches_nats_as_a_protocol_error() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let nats = NatsServer::start().expect("nats");
    let host = runtime.block_on(TestHost::start(&nats));
    let config = ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let strategy = (nasty(10_000), nasty(3_000), nasty_id(), nasty(600));
    let result = runner.run(&strategy, |(entity, event_type, id, version)| {
        let body = serde_json::to_vec(&serde_json::json!({
            "type": event_type,
            "data": { "id": entity, "version": version },
        }))
        .expect("JSON");
        let answer = runtime.block_on(host.send("crm", body, &id));
        prop_assert!(
            answer.status == 202 || answer.status == 200 || (400..500).contains(&answer.status),
            "status {} for entity {} bytes, type {} bytes, id {} bytes: {:?}",
            answer.status,
            entity.len(),
            event_type.len(),
            id.len(),
            answer.json
        );
        let domain = hookmesh::subject::default_domain(&event_type);
        let key = format!("crm:{id}");
        let over = hookmesh::subject::limits::check(&hookmesh::subject::limits::Values {
            event_id: Some(&id),
            event_type: &event_type,
            domain,
            entity_id: &entity,
            entity_version: Some(&version),
            idempotency_key: &key,
            content_type: None,
        });
        match over {
            // Headers over `http.max_header_bytes` are refused before.
            Err(_) if answer.status == 431 => {}
            Err(too_long) => {
                prop_assert_eq!(answer.status, 422, "{:?}", answer.json);
                prop_assert_eq!(&answer.json["field"], too_long.field);
                let error = answer.json["error"].as_str().unwrap_or_default();
                prop_assert!(error.contains(&too_long.limit.to_string()), "{}", error);
            }
            Ok(()) => prop_assert!(
                answer.status == 202 || answer.status == 200,
                "within every limit: {} {:?}",
                answer.status,
                answer.json
            ),
        }
        Ok(())
    });
    result.unwrap_or_else(|failure| panic!("{failure}"));

    // The host's connection never dropped: nats-server logged no protocol
    // error, and the host still stores.
    let log = nats_log(&nats);
    assert!(
        !log.contains("maximum control line exceeded") && !log.contains("Maximum Payload"),
        "{log}"
    );
    let answer = runtime.block_on(host.send(
        "crm",
        crm_order("order.created", "ORD-after", 1),
        "msg_after",
    ));
    assert_eq!(answer.status, 202, "{:?}", answer.json);
}

fn nats_log(nats: &NatsServer) -> String {
    nats.log()
}
