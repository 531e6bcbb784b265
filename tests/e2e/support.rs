//! Shared pieces of the end-to-end tests: a host running in-process against
//! a real nats-server, or the real `hookmesh` binary as a child process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, stream::Stream};
use hookmesh::config::{Config, Env, Origin};
use hookmesh::streams::{EVENTS_STREAM, Mode};
use hookmesh_test_support::NatsServer;
use serde_json::Value;
use tokio::sync::oneshot;

/// The secrets the test config gives each provider (literal, so tests need
/// no environment).
pub const CRM_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Knobs the tests turn; everything else is the example config's.
#[derive(Debug, Clone)]
pub struct Options {
    /// `ingest.duplicate_window`.
    pub duplicate_window: &'static str,
    /// `ingest.publish_timeout`.
    pub publish_timeout: &'static str,
    /// `http.max_body_bytes`.
    pub max_body_bytes: usize,
    /// `http.listen`.
    pub listen: String,
    /// `ingest.partitions`.
    pub partitions: u32,
    /// Handlers the host runs.
    pub handlers: Vec<hookmesh::manifest::Manifest>,
    /// `admin.token` (unset: the admin listener only reads).
    pub admin_token: Option<String>,
    /// More TOML appended to the config (e.g. `[[outbox]]` entries).
    pub extra_toml: String,
    /// More keys of `[http]` (e.g. `header_read_timeout = "1s"`).
    pub http_toml: String,
    /// More keys of `[nats]` (credentials, TLS, `replicas`).
    pub nats_toml: String,
    /// What the host does.
    pub role: hookmesh::server::Role,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duplicate_window: "2m",
            publish_timeout: "1s",
            max_body_bytes: 65_536,
            listen: "127.0.0.1:0".into(),
            partitions: 16,
            handlers: Vec::new(),
            admin_token: None,
            extra_toml: String::new(),
            http_toml: String::new(),
            nats_toml: String::new(),
            role: hookmesh::server::Role::All,
        }
    }
}

/// The test configuration: the four providers of the example config, with
/// literal secrets.
pub fn config_toml(nats_url: &str, options: &Options) -> String {
    let Options {
        duplicate_window,
        publish_timeout,
        max_body_bytes,
        listen,
        partitions,
        handlers: _,
        admin_token,
        extra_toml,
        http_toml,
        nats_toml,
        role: _,
    } = options;
    let token = admin_token
        .as_ref()
        .map(|t| format!("token = \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[nats]
url = "{nats_url}"
{nats_toml}

[http]
listen = "{listen}"
max_body_bytes = {max_body_bytes}
{http_toml}

[admin]
listen = "127.0.0.1:0"
{token}
[ingest]
duplicate_window = "{duplicate_window}"
idempotency_ttl = "7d"
publish_timeout = "{publish_timeout}"
retry_after = "3s"
partitions = {partitions}

[providers.crm]
scheme = "standard-webhooks"
secrets = ["{CRM_SECRET}"]
event_id = "header:webhook-id"
event_type = "json:/type"
entity_id = "json:/data/id"
entity_version = "json:/data/version"

[providers.stripe]
scheme = "stripe"
secrets = ["whsec_stripe_test_secret"]
event_id = "json:/id"
event_type = "json:/type"
domain = "json:/data/object/object"
entity_id = "json:/data/object/id"

[providers.github]
scheme = "github"
secrets = ["It's a Secret to Everybody"]
event_id = "header:X-GitHub-Delivery"
event_type = "header:X-GitHub-Event"
entity_id = "json:/repository/full_name"

[providers.shop]
scheme = "shopify"
secrets = ["shpss_test_secret"]
event_id = "header:X-Shopify-Webhook-Id"
event_type = "header:X-Shopify-Topic"
entity_id = "json:/id"

{extra_toml}
"#
    )
}

/// A CRM order event body.
pub fn crm_order(event_type: &str, order: &str, version: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": event_type,
        "data": { "id": order, "version": version, "customer": { "id": "CUST-1" }, "total": "10.00" }
    }))
    .expect("serializable")
}

/// An answer: status, JSON body (or `Null`), headers.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The JSON body.
    pub json: Value,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
}

/// A host serving in this process.
pub struct TestHost {
    /// Its configuration.
    pub config: Config,
    /// `http://127.0.0.1:<port>`: the webhook listener.
    pub base: String,
    /// `http://127.0.0.1:<port>`: the admin listener (`/metrics`, `/console`).
    pub admin: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), hookmesh::server::ServeError>>>,
}

impl TestHost {
    /// Starts a host with default options and waits until it is ready.
    pub async fn start(nats: &NatsServer) -> TestHost {
        Self::start_with(nats, Options::default()).await
    }

    /// Starts a host with the given options and waits until it is ready.
    pub async fn start_with(nats: &NatsServer, options: Options) -> TestHost {
        let host = Self::spawn(&nats.url(), options).await;
        host.wait_ready().await;
        host
    }

    /// Starts a host without waiting for readiness.
    pub async fn spawn(nats_url: &str, options: Options) -> TestHost {
        // `E2E_LOG=info` (or any filter) shows the hosts' logs.
        if let Ok(filter) = std::env::var("E2E_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
        let config = Config::from_toml(
            &config_toml(nats_url, &options),
            Origin::Builtin,
            &Env::default(),
        )
        .expect("test config is valid");
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind")
        };
        let listeners = hookmesh::server::Listeners {
            webhook: bind().await,
            admin: bind().await,
        };
        let url =
            |l: &tokio::net::TcpListener| format!("http://{}", l.local_addr().expect("address"));
        let (base, admin) = (url(&listeners.webhook), url(&listeners.admin));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(hookmesh::server::run(
            config.clone(),
            listeners,
            hookmesh::server::Options {
                streams: Mode::Update,
                handlers: options.handlers.clone(),
                cache_dir: Some(guest_cache_dir()),
                role: options.role,
            },
            async {
                let _ = stopped.await;
            },
        ));
        TestHost {
            config,
            base,
            admin,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        wait_for(Duration::from_secs(90), "host ready", || async {
            self.get("/readyz").await.0 == 200
        })
        .await;
    }

    /// Stops the host gracefully and returns how `run` ended.
    pub async fn shutdown(mut self) -> Result<(), hookmesh::server::ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("running").await.expect("host task")
    }

    /// Waits for the host task to end by itself (an error at start).
    pub async fn finished(mut self) -> Result<(), hookmesh::server::ServeError> {
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("host ends")
            .expect("host task")
    }

    /// GETs a path: status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// GETs a path of the admin listener: status and body text.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.admin)).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// Its `/metrics` text (on the admin listener).
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// How many partitions of `handler` this host works now (its
    /// `hookmesh_partitions_owned` gauge).
    pub async fn owned(&self, handler: &str) -> u64 {
        owned_in(&self.metrics().await, handler)
    }

    /// Signs `body` as `provider` would (with `id` as the event id when the
    /// provider reads it from a header or the body) and POSTs it.
    pub async fn send(&self, provider: &str, body: Vec<u8>, id: &str) -> Answer {
        let signed = self.sign(provider, body, id, SystemTime::now());
        self.post(provider, signed.headers, signed.body).await
    }

    /// Signs without sending.
    pub fn sign(
        &self,
        provider: &str,
        body: Vec<u8>,
        id: &str,
        now: SystemTime,
    ) -> hookmesh::send::Signed {
        let p = &self.config.providers[provider];
        hookmesh::send::prepare(p, body, None, Some(id), now).expect("signs")
    }

    /// POSTs raw headers and body to `/webhooks/{provider}`.
    pub async fn post(&self, provider: &str, headers: http::HeaderMap, body: Vec<u8>) -> Answer {
        post(
            &self.http,
            &format!("{}/webhooks/{provider}", self.base),
            headers,
            body,
        )
        .await
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// POSTs and decodes the answer.
pub async fn post(
    http: &reqwest::Client,
    url: &str,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> Answer {
    let response = http
        .post(url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        json,
        headers,
    }
}

/// A JetStream context on the server.
pub async fn jetstream(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    jetstream::new(client)
}

/// The `HOOK_EVENTS` stream.
pub async fn events(js: &jetstream::Context) -> Stream {
    js.get_stream(EVENTS_STREAM)
        .await
        .expect("HOOK_EVENTS exists")
}

/// How many messages `HOOK_EVENTS` holds.
pub async fn stored_count(js: &jetstream::Context) -> u64 {
    events(js)
        .await
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// The `hookmesh_partitions_owned` gauge of `handler` in a metrics text.
pub fn owned_in(metrics: &str, handler: &str) -> u64 {
    let prefix = format!("hookmesh_partitions_owned{{handler=\"{handler}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `hosts` share all `partitions` of `handler`, each some.
pub async fn wait_partitions_shared(hosts: &[&TestHost], handler: &str, partitions: u64) {
    wait_for(
        Duration::from_secs(30),
        "the hosts share the partitions",
        || async {
            let mut owned = Vec::new();
            for host in hosts {
                owned.push(host.owned(handler).await);
            }
            owned.iter().all(|n| *n > 0) && owned.iter().sum::<u64>() == partitions
        },
    )
    .await;
}

/// Polls `check` until it holds or `limit` passes (then panics with `what`).
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message still in `stream`, in stream order.
pub async fn stored_messages(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let stream = js.get_stream(stream).await.expect("stream");
    let last = stream
        .clone()
        .info()
        .await
        .expect("info")
        .state
        .last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        out.extend(stored_message(&stream, seq).await);
    }
    out
}

/// The message at `seq`, or `None` when the server says it holds none
/// (deleted or purged). Any other failed read — on a cluster, a stream
/// leader still being elected after a node returned answers every request
/// with an error for a while — is retried for up to 30 s and then fails
/// the test: a read that failed is never taken for a message that is not
/// there.
async fn stored_message(stream: &Stream, seq: u64) -> Option<jetstream::message::StreamMessage> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    const PATIENCE: Duration = Duration::from_secs(30);
    let deadline = Instant::now() + PATIENCE;
    let mut failed = false;
    loop {
        match stream.get_raw_message(seq).await {
            Ok(message) => return Some(message),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return None,
            Err(e) => {
                if !failed {
                    eprintln!("reading message {seq}: {e}; retrying");
                    failed = true;
                }
                assert!(
                    Instant::now() < deadline,
                    "reading message {seq} failed for {PATIENCE:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The `hookmesh` binary cargo built beside this test binary.
pub fn hookmesh_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-<hash> → target/<profile>/hookmesh
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("hookmesh"))
        .expect("target layout");
    assert!(
        bin.exists(),
        "{} not built; run `cargo build --workspace --all-targets` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A `hookmesh` child process; killed on drop.
pub struct HostProcess {
    /// The child.
    pub child: Child,
}

impl HostProcess {
    /// Runs `hookmesh <args>` in `dir` with extra environment.
    pub fn spawn(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> HostProcess {
        let mut command = Command::new(hookmesh_bin());
        command
            .args(args)
            .current_dir(dir)
            .env("HOOKMESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        HostProcess {
            child: command.spawn().expect("spawn hookmesh"),
        }
    }

    /// Sends a signal (e.g. `libc::SIGINT`) to the process.
    pub fn signal(&self, signal: i32) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Compiled components are cached across tests (keyed by digest), so each
/// guest is compiled once per test run, not once per test.
pub fn guest_cache_dir() -> PathBuf {
    workspace().join("target/hookmesh-test-cache")
}

/// A built guest component, `handlers/target/wasm32-wasip2/release/<crate>.wasm`.
pub fn guest(crate_name: &str) -> PathBuf {
    let path = workspace().join(format!(
        "handlers/target/wasm32-wasip2/release/{crate_name}.wasm"
    ));
    assert!(
        path.is_file(),
        "{} is not built; run: cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml",
        path.display()
    );
    path
}

/// A built guest component validated for deploying (compiled once by a
/// runtime shared by the tests, through the artifact cache).
pub fn validated(crate_name: &str) -> hookmesh::deploy::Validated {
    static RUNTIME: std::sync::OnceLock<hookmesh::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME
        .get_or_init(|| hookmesh::runtime::Runtime::new(Some(guest_cache_dir())).expect("runtime"));
    let bytes = std::fs::read(guest(crate_name)).expect("read the guest");
    hookmesh::deploy::validate(runtime, &bytes).expect("a well-formed handler component")
}

/// A manifest for a built guest, with test-friendly limits.
pub fn manifest(name: &str, crate_name: &str, subject: &str) -> hookmesh::manifest::Manifest {
    let text = format!(
        "name = \"{name}\"\nsubject = \"{subject}\"\nmax_deliver = 4\nack_wait = \"10s\"\ntimeout = \"1s\"\nmemory = \"32MiB\"\n[backoff]\ninitial = \"100ms\"\nmax = \"500ms\"\n"
    );
    let mut manifest =
        hookmesh::manifest::Manifest::from_toml(&text, name).expect("valid manifest");
    manifest.component = Some(guest(crate_name));
    manifest
}

/// A working directory for `hookmesh serve` processes: `hookmesh.toml`
/// for `nats_url` (the test defaults) and one handler's manifest in
/// `handlers/<handler>/handler.toml`; removed on drop.
pub struct ServeDir {
    dir: tempfile::TempDir,
    cache: String,
}

impl ServeDir {
    /// Writes the config and `manifest` (TOML) for `handler`.
    pub fn new(nats_url: &str, handler: &str, manifest: &str) -> ServeDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let handlers = dir.path().join("handlers").join(handler);
        std::fs::create_dir_all(&handlers).expect("dir");
        std::fs::write(handlers.join("handler.toml"), manifest).expect("manifest");
        std::fs::write(
            dir.path().join("hookmesh.toml"),
            config_toml(nats_url, &Options::default()),
        )
        .expect("config");
        ServeDir {
            dir,
            cache: guest_cache_dir().display().to_string(),
        }
    }

    /// The directory (the processes' working directory).
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// `serve` with this directory's config and handlers and the shared
    /// guest cache.
    pub fn serve_args(&self) -> [&str; 7] {
        [
            "serve",
            "--config",
            "hookmesh.toml",
            "--handlers",
            "handlers",
            "--cache-dir",
            &self.cache,
        ]
    }
}

/// A `hookmesh serve` or `up` process whose log goes to a file (so a
/// chatty host never blocks on a full pipe); killed on drop.
pub struct LoggedProcess {
    child: Child,
    log: PathBuf,
    /// `host:port` of its HTTP listener.
    pub address: String,
    /// `host:port` of its admin listener.
    pub admin: String,
}

impl LoggedProcess {
    /// Runs `hookmesh <args>` in `dir` with extra environment and its log
    /// in `dir/<name>.log`, without waiting for anything (`address` and
    /// `admin` stay empty).
    pub fn spawn(
        dir: &std::path::Path,
        args: &[&str],
        name: &str,
        env: &[(&str, &str)],
    ) -> LoggedProcess {
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(hookmesh_bin())
            .args(args)
            .current_dir(dir)
            .env(
                "HOOKMESH_LOG",
                std::env::var("E2E_HOST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .env_remove("HOOKMESH_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn hookmesh");
        LoggedProcess {
            child,
            log,
            address: String::new(),
            admin: String::new(),
        }
    }

    /// Runs `hookmesh <args>` in `dir` with its log in `dir/<name>.log`,
    /// and waits until it listens and its dispatch runs.
    pub async fn start(dir: &std::path::Path, args: &[&str], name: &str) -> LoggedProcess {
        let mut process = Self::spawn(dir, args, name, &[]);
        let limit = Duration::from_secs(90);
        if !process.started_within(limit).await {
            panic!(
                "{name} did not start dispatch within {limit:?}; its log ends:\n{}",
                tail(&process.log(), 40)
            );
        }
        process
    }

    /// Waits up to `limit` for a spawned host to listen and run dispatch
    /// (then `address` and `admin` are set); `false` when it has not yet.
    /// Panics, with its log, when it ended instead.
    pub async fn started_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.log().contains("dispatch started") {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} ended ({status}) before dispatch started; its log ends:\n{}",
                    self.log.display(),
                    tail(&self.log(), 40)
                );
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = self.log();
        let after = |marker: &str| {
            log.split(marker)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("{marker} in the log"))
                .to_string()
        };
        self.address = after("address=");
        self.admin = after("admin=");
        true
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its `/metrics` text from its admin listener (empty when it does not
    /// answer).
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.admin)).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// How many partitions of `handler` it works now.
    pub async fn owned(&self, handler: &str) -> u64 {
        owned_in(&self.metrics().await, handler)
    }

    /// Kills it at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LoggedProcess {
    fn drop(&mut self) {
        self.kill();
        // `E2E_KEEP_LOGS=DIR` keeps each process's log there.
        if let Some(dir) = std::env::var_os("E2E_KEEP_LOGS")
            && let Some(name) = self.log.file_name()
        {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::copy(&self.log, std::path::Path::new(&dir).join(name));
        }
    }
}

/// Signs a CRM webhook with the test secret and POSTs it to a host at
/// `address`; the answer's JSON.
pub async fn send_crm(address: &str, body: Vec<u8>, id: &str) -> Value {
    let config = Config::from_toml(
        &config_toml("nats://127.0.0.1:4222", &Options::default()),
        Origin::Builtin,
        &Env::default(),
    )
    .expect("test config");
    let signed = hookmesh::send::prepare(
        &config.providers["crm"],
        body,
        None,
        Some(id),
        SystemTime::now(),
    )
    .expect("signed");
    let answer = hookmesh::send::post(&format!("http://{address}/webhooks/crm"), signed)
        .await
        .expect("post");
    assert!(
        answer.status == 202 || answer.status == 200,
        "{} {}",
        answer.status,
        answer.body
    );
    serde_json::from_str(&answer.body).expect("json answer")
}

/// Whether the server holds nothing more of `handler`'s consumer on
/// `partition` up to `stream_seq`: it has delivered everything up to
/// there, and no delivery awaits an ack or a redelivery. Past this point
/// the server hands none of those events out again, so a test can assert
/// that something did not happen without waiting for it to be merely late.
pub async fn consumer_settled(
    js: &jetstream::Context,
    handler: &str,
    partition: u32,
    stream_seq: u64,
) -> bool {
    let name = hookmesh::manifest::consumer_name(handler, partition);
    match events(js).await.consumer_info(&name).await {
        Ok(info) => info.delivered.stream_sequence >= stream_seq && info.num_ack_pending == 0,
        Err(_) => false,
    }
}

/// The partition of an event's subject (`hook.<provider>.<domain>.<p>.…`).
pub fn partition_of(subject: &str) -> u32 {
    subject
        .split('.')
        .nth(3)
        .and_then(|p| p.parse().ok())
        .expect("a partitioned event subject")
}

/// The host's log lines, captured in memory for tests that check what it
/// logged (installed once per process as the global subscriber, at debug
/// for hookmesh).
pub struct Logs(std::sync::Mutex<Vec<u8>>);

impl Logs {
    /// The capture, installed on first use.
    pub fn capture() -> &'static Logs {
        static LOGS: std::sync::OnceLock<&'static Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs: &'static Logs = Box::leak(Box::new(Logs(std::sync::Mutex::default())));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("hookmesh=debug"))
                .with_ansi(false)
                .with_writer(move || LogWriter(logs))
                .try_init();
            logs
        })
    }

    /// Every captured line containing all of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .map(str::to_string)
            .collect()
    }
}

struct LogWriter(&'static Logs);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
