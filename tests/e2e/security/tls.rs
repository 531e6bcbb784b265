//! TLS to NATS with certificates made here: a CA, a server certificate for
//! 127.0.0.1/localhost and a client certificate (the server verifies it:
//! mutual TLS). A host stores webhooks over it; a client trusting another
//! CA, or without its certificate, fails at once and says TLS; and, where
//! the server supports `handshake_first` (2.10.4 and later), `tls_first`.

use std::path::{Path, PathBuf};

use hookmesh::config::{Config, Env, Origin};
use hookmesh::nats::{self, Patience};
use hookmesh_test_support::{NatsServer, ServerOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::server_version;
use crate::support::*;

/// A CA and the PEM files of certificates it signed.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a PEM file");
    path
}

/// A CA named `name` with a server and a client certificate, under `dir`.
fn pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key"))
        .expect("CA certificate");
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca).expect("signed certificate");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec!["hookmesh".into()],
        "hookmesh",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        ca: write(dir, &format!("{name}-ca.pem"), &ca.pem()),
        server_cert: write(dir, &format!("{name}-server.pem"), &server_cert),
        server_key: write(dir, &format!("{name}-server-key.pem"), &server_key),
        client_cert: write(dir, &format!("{name}-client.pem"), &client_cert),
        client_key: write(dir, &format!("{name}-client-key.pem"), &client_key),
    }
}

/// A server with mutual TLS (and `handshake_first` when asked).
fn tls_server(dir: &Path, pki: &Pki, handshake_first: bool) -> NatsServer {
    let conf = format!(
        "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 2\n{}}}\nmax_payload: 2MB\n",
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca.display().to_string(),
        if handshake_first {
            "  handshake_first: true\n"
        } else {
            ""
        },
    );
    let path = dir.join(if handshake_first {
        "tls-first.conf"
    } else {
        "tls.conf"
    });
    std::fs::write(&path, conf).expect("server config");
    NatsServer::start_with(ServerOptions {
        config: Some(path),
        ..ServerOptions::default()
    })
    .expect("nats-server with TLS")
}

fn tls_toml(ca: &Path, client: Option<(&Path, &Path)>, extra: &str) -> String {
    let mut text = format!(
        "tls_ca = {:?}\ntls_required = true\n",
        ca.display().to_string()
    );
    if let Some((cert, key)) = client {
        text.push_str(&format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    text.push_str(extra);
    text
}

async fn connect(url: &str, nats_toml: &str) -> Result<async_nats::Client, String> {
    let text = format!("[nats]\nurl = \"{url}\"\n{nats_toml}");
    let config = Config::from_toml(&text, Origin::Builtin, &Env::default()).expect("config");
    nats::connect(&config.nats, "hookmesh-test", Patience::FailFast)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_generated_certificates_and_a_wrong_ca_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(dir.path(), "good");
    let other = pki(dir.path(), "other");
    let server = tls_server(dir.path(), &good, false);
    let client = Some((good.client_cert.as_path(), good.client_key.as_path()));

    // A host stores a webhook over mutual TLS.
    let host = TestHost::start_with(
        &server,
        Options {
            nats_toml: tls_toml(&good.ca, client, ""),
            ..Options::default()
        },
    )
    .await;
    let answer = host
        .send("crm", crm_order("order.created", "ORD-TLS", 1), "evt-tls-1")
        .await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
    let js = async_nats::jetstream::new(
        connect(&server.url(), &tls_toml(&good.ca, client, ""))
            .await
            .expect("connects over TLS"),
    );
    assert_eq!(stored_count(&js).await, 1);

    // Trusting another CA: the server's certificate is refused.
    let error = connect(&server.url(), &tls_toml(&other.ca, client, ""))
        .await
        .expect_err("another CA");
    assert!(error.contains("TLS failed"), "{error}");
    assert!(
        error.to_lowercase().contains("unknownissuer") || error.contains("certificate"),
        "names the certificate problem: {error}"
    );
    // No client certificate, or one of another CA: the server refuses.
    connect(&server.url(), &tls_toml(&good.ca, None, ""))
        .await
        .expect_err("no client certificate");
    let stranger = Some((other.client_cert.as_path(), other.client_key.as_path()));
    connect(&server.url(), &tls_toml(&good.ca, stranger, ""))
        .await
        .expect_err("a client certificate of another CA");
    // Without TLS at all: refused, not a hang.
    let error = connect(&server.url(), "")
        .await
        .expect_err("a plain client");
    assert!(!error.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_first_against_a_server_with_handshake_first() {
    let version = server_version(&hookmesh_test_support::server_binary());
    if version < (2, 10, 4) {
        // `handshake_first` does not exist before 2.10.4: the server would
        // not start. scripts/test.sh runs this against the pinned current
        // release, where it does.
        eprintln!(
            "nats-server {version:?} has no handshake_first; tls_first is tested with the pinned release"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(dir.path(), "good");
    let server = tls_server(dir.path(), &good, true);
    let client = Some((good.client_cert.as_path(), good.client_key.as_path()));
    let client = connect(
        &server.url(),
        &tls_toml(&good.ca, client, "tls_first = true\n"),
    )
    .await
    .expect("tls_first connects");
    client.flush().await.expect("round trip");
    let error = connect(
        &server.url(),
        &tls_toml(
            &good.ca,
            Some((good.client_cert.as_path(), good.client_key.as_path())),
            "",
        ),
    )
    .await
    .expect_err("a client that waits for INFO first");
    assert!(!error.is_empty());
}
