//! Every authentication method `[nats]` offers, against a real server
//! configured for it: token, NKey seed, a `.creds` file (a server in
//! operator mode, with operator, account and user JWTs made here) and
//! user/password — each connects, and the wrong secret is refused at once
//! with a message that says so.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use hookmesh::config::{Config, Env, Origin};
use hookmesh::nats::{self, Patience};
use hookmesh_test_support::{NatsServer, ServerOptions};
use nkeys::KeyPair;
use serde_json::{Value, json};

fn server_with(dir: &Path, conf: &str) -> NatsServer {
    let path = dir.join("server.conf");
    std::fs::write(&path, conf).expect("server config");
    NatsServer::start_with(ServerOptions {
        config: Some(path),
        ..ServerOptions::default()
    })
    .expect("nats-server")
}

fn config(url: &str, nats_toml: &str, env: &[(&str, &str)]) -> Config {
    let text = format!("[nats]\nurl = \"{url}\"\n{nats_toml}");
    Config::from_toml(
        &text,
        Origin::Builtin,
        &Env::from_pairs(env.iter().copied()),
    )
    .expect("config")
}

/// Connects and makes a round trip through the server (a request its own
/// subscription answers), so authentication and authorization both passed.
async fn round_trip(config: &Config) -> Result<(), String> {
    let client = nats::connect(&config.nats, "hookmesh-test", Patience::FailFast)
        .await
        .map_err(|e| e.to_string())?;
    let mut echo = client.subscribe("echo").await.map_err(|e| e.to_string())?;
    let responder = client.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        if let Some(message) = echo.next().await
            && let Some(reply) = message.reply
        {
            let _ = responder.publish(reply, message.payload).await;
        }
    });
    let answer = client
        .request("echo", "ping".into())
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(&answer.payload[..], b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_connects_and_a_wrong_one_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_with(
        dir.path(),
        "authorization { token: \"s3cret-token-4711\" }\n",
    );
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token-4711\n").expect("token file");
    let good = config(
        &server.url(),
        &format!("token = \"file:{}\"", token_file.display()),
        &[],
    );
    round_trip(&good).await.expect("the token connects");
    let bad = config(&server.url(), "token = \"env:T\"", &[("T", "wrong-token")]);
    let error = round_trip(&bad).await.expect_err("a wrong token");
    assert!(error.contains("authorization violation"), "{error}");
    assert!(error.contains("refused the credentials"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_connect_and_a_wrong_password_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = server_with(
        dir.path(),
        "authorization { users = [ { user: hookmesh, password: \"pw-4711\" } ] }\n",
    );
    let good = config(
        &server.url(),
        "user = \"hookmesh\"\npassword = \"env:PW\"",
        &[("PW", "pw-4711")],
    );
    round_trip(&good).await.expect("user and password connect");
    let bad = config(
        &server.url(),
        "user = \"hookmesh\"\npassword = \"nope\"",
        &[],
    );
    let error = round_trip(&bad).await.expect_err("a wrong password");
    assert!(error.contains("authorization violation"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nkey_seed_connects_and_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = KeyPair::new_user();
    let server = server_with(
        dir.path(),
        &format!(
            "authorization {{ users = [ {{ nkey: \"{}\" }} ] }}\n",
            user.public_key()
        ),
    );
    let seed = user.seed().expect("seed");
    let good = config(
        &server.url(),
        "nkey_seed = \"env:SEED\"",
        &[("SEED", seed.as_str())],
    );
    round_trip(&good).await.expect("the seed connects");
    let stranger = KeyPair::new_user().seed().expect("seed");
    let bad = config(
        &server.url(),
        "nkey_seed = \"env:SEED\"",
        &[("SEED", stranger.as_str())],
    );
    let error = round_trip(&bad).await.expect_err("an unknown key");
    assert!(error.contains("authorization violation"), "{error}");
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A NATS JWT (`ed25519-nkey`) with `claims`, issued and signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = json!({
        "jti": format!("{subject}-{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let signature = issuer.sign(signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64(&signature))
}

/// An account's JWT; `jetstream` enables JetStream for it (never for the
/// system account: the server refuses to start then).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let storage = if jetstream { -1 } else { 0 };
    jwt(
        operator,
        &account.public_key(),
        name,
        json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": storage, "disk_storage": storage,
                "streams": if jetstream { -1 } else { 0 },
                "consumer": if jetstream { -1 } else { 0 }
            },
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account",
            "version": 2
        }),
    )
}

/// A `.creds` file: the user's JWT and seed in the decorated format
/// `nsc generate creds` writes.
fn creds(account: &KeyPair, user: &KeyPair) -> String {
    let user_jwt = jwt(
        account,
        &user.public_key(),
        "hookmesh",
        json!({
            "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
            "type": "user",
            "version": 2
        }),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n",
        user.seed().expect("seed")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creds_file_connects_to_a_server_in_operator_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let operator = KeyPair::new_operator();
    let system = KeyPair::new_account();
    let account = KeyPair::new_account();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "hookmesh-test",
        json!({ "system_account": system.public_key(), "type": "operator", "version": 2 }),
    );
    let server = server_with(
        dir.path(),
        &format!(
            "operator: \"{operator_jwt}\"\n\
             system_account: \"{sys}\"\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: \"{sys_jwt}\"\n  {acc}: \"{acc_jwt}\"\n}}\n",
            sys = system.public_key(),
            sys_jwt = account_jwt(&operator, &system, "SYS", false),
            acc = account.public_key(),
            acc_jwt = account_jwt(&operator, &account, "HOOKMESH", true),
        ),
    );

    let user = KeyPair::new_user();
    let path = dir.path().join("hookmesh.creds");
    std::fs::write(&path, creds(&account, &user)).expect("creds file");
    let good = config(
        &server.url(),
        &format!("creds = {:?}", path.display().to_string()),
        &[],
    );
    round_trip(&good).await.expect("the creds file connects");
    // The same text from the environment.
    let text = creds(&account, &KeyPair::new_user());
    let from_env = config(
        &server.url(),
        "creds = \"env:CREDS\"",
        &[("CREDS", text.as_str())],
    );
    round_trip(&from_env)
        .await
        .expect("creds from the environment connect");
    // JetStream answers in the account the JWTs enable it for.
    let client = nats::connect(&good.nats, "hookmesh-test", Patience::FailFast)
        .await
        .expect("connects");
    // (The client's own account-info type does not parse 2.9's answer.)
    let info = client
        .request("$JS.API.INFO", "".into())
        .await
        .expect("JetStream account info");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("json");
    assert!(
        info.get("error").is_none() && info.get("limits").is_some(),
        "{info}"
    );

    // A user signed by an account the operator never issued is refused.
    let stranger = KeyPair::new_account();
    let forged = dir.path().join("forged.creds");
    std::fs::write(&forged, creds(&stranger, &KeyPair::new_user())).expect("creds file");
    let bad = config(
        &server.url(),
        &format!("creds = {:?}", forged.display().to_string()),
        &[],
    );
    let error = round_trip(&bad).await.expect_err("a forged user");
    assert!(error.contains("authorization violation"), "{error}");
}
