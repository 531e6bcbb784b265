//! The host configuration every scenario runs with.

use std::path::PathBuf;

use anyhow::Context as _;
use hookmesh::config::{Config, Env, Origin};

/// The host's config: the bench's nats-server, `partitions`, one Standard
/// Webhooks provider. Built from TOML like a deployment's, with an empty
/// environment so the caller's `HOOKMESH_*` variables cannot change what is
/// measured.
pub fn config(
    nats_url: &str,
    provider: &str,
    secret: &str,
    partitions: u32,
    max_body_bytes: usize,
) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[nats]
url = "{nats_url}"

[http]
listen = "127.0.0.1:0"
max_body_bytes = {max_body_bytes}

[ingest]
partitions = {partitions}

[providers.{provider}]
scheme = "standard-webhooks"
secrets = ["{secret}"]
event_id = "header:webhook-id"
event_type = "json:/type"
entity_id = "json:/data/id"
"#
    );
    Config::from_toml(
        &text,
        Origin::File(PathBuf::from("hookmesh-bench (generated)")),
        &Env::default(),
    )
    .context("the bench's host config")
}

/// The host's webhook and admin listeners, each on a port of its own
/// choosing on the loopback interface.
pub async fn listeners() -> anyhow::Result<hookmesh::server::Listeners> {
    let bind = || async {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a listener for the host")
    };
    Ok(hookmesh::server::Listeners {
        webhook: bind().await?,
        admin: bind().await?,
    })
}

/// Starts the bench's own nats-server (`NATS_SERVER_BIN` honoured).
pub async fn start_nats() -> anyhow::Result<hookmesh_test_support::NatsServer> {
    // Starting the server polls its log with blocking sleeps.
    tokio::task::spawn_blocking(hookmesh_test_support::NatsServer::start)
        .await
        .context("starting nats-server")?
        .with_context(|| {
            format!(
                "cannot start {} (set NATS_SERVER_BIN to choose the binary)",
                hookmesh_test_support::server_binary().display()
            )
        })
}

/// Runs the host in this process with `handlers` on `listeners`, until the
/// returned sender is used or dropped.
pub fn spawn(
    config: Config,
    listeners: hookmesh::server::Listeners,
    handlers: Vec<hookmesh::manifest::Manifest>,
) -> (
    tokio::task::JoinHandle<Result<(), hookmesh::server::ServeError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = tokio::spawn(hookmesh::server::run(
        config,
        listeners,
        hookmesh::server::Options {
            streams: hookmesh::streams::Mode::Update,
            handlers,
            cache_dir: Some(crate::dispatch::cache_dir()),
            role: hookmesh::server::Role::All,
        },
        async move {
            // A dropped sender stops the host as well as a sent ().
            let _ = stopped.await;
        },
    ));
    (host, stop)
}
