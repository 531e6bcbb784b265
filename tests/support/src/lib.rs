//! Real `nats-server` processes for hookmesh's tests and benchmarks (and,
//! in [`postgres`], real PostgreSQL databases).
//!
//! Every [`NatsServer`] is its own `nats-server -js` child process with a
//! port chosen by the server itself (`-p -1`, so there is no bind-then-release
//! race) and a temporary store directory. Dropping it kills the process and
//! removes the store. Tests can [`NatsServer::stop`] and
//! [`NatsServer::restart`] it on the same port and store to exercise outages.
//!
//! The binary is `$NATS_SERVER_BIN` when set, else `/usr/sbin/nats-server`,
//! else `nats-server` on `PATH`; the test scripts point `NATS_SERVER_BIN` at a
//! pinned upstream release to run the suite against a second server version.

pub mod cluster;
pub mod postgres;

pub use cluster::NatsCluster;
pub use postgres::TestDatabase;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to say it is ready before start fails.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a test server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The binary could not be spawned.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        /// The binary that was tried.
        bin: PathBuf,
        /// The operating system's answer.
        source: io::Error,
    },
    /// The temporary store could not be created or read.
    #[error("test server store: {0}")]
    Store(#[from] io::Error),
    /// The server did not report readiness in time.
    #[error("nats-server did not become ready within {READY_TIMEOUT:?}; its log:\n{log}")]
    NotReady {
        /// The server's log so far.
        log: String,
    },
}

/// How to start a server beyond the defaults (JetStream, loopback, a port
/// the server picks, a temporary store).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// A configuration file (`-c`): accounts, permissions, TLS. The
    /// command line's address, port and store directory win over its own.
    pub config: Option<PathBuf>,
    /// Environment variables of the process (e.g. passwords the
    /// configuration refers to as `$NAME`).
    pub env: Vec<(String, String)>,
    /// More command-line arguments (cluster options).
    pub args: Vec<String>,
}

/// One running `nats-server -js` owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    starts: u32,
    options: ServerOptions,
}

impl NatsServer {
    /// Starts a fresh server with JetStream on a port it picks itself.
    pub fn start() -> Result<Self, ServerError> {
        Self::start_with(ServerOptions::default())
    }

    /// Starts a fresh server with a configuration file, environment or
    /// more arguments.
    pub fn start_with(options: ServerOptions) -> Result<Self, ServerError> {
        let dir = tempfile::Builder::new()
            .prefix("hookmesh-nats-")
            .tempdir()?;
        let mut server = NatsServer {
            bin: server_binary(),
            child: None,
            port: 0,
            dir,
            starts: 0,
            options,
        };
        server.spawn("-1")?;
        Ok(server)
    }

    /// The directory holding the store and the logs (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the current run logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("server-{}.log", self.starts))
    }

    /// Replaces the extra command-line arguments used by the next
    /// [`NatsServer::restart`].
    pub fn set_args(&mut self, args: Vec<String>) {
        self.options.args = args;
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.bin
    }

    /// Kills the server (like a crash: no graceful shutdown); the store stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.stop();
        let port = self.port.to_string();
        self.spawn(&port)
    }

    /// The server's process id while it runs (tests pause it with SIGSTOP to
    /// make JetStream slow rather than gone).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is currently running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn spawn(&mut self, port: &str) -> Result<(), ServerError> {
        self.starts += 1;
        let log = self.log_path();
        let store = self.dir.path().join("store");
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.options.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", port, "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(&log)
            .args(&self.options.args)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| ServerError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            if let (Some(port), true) = (listening_port(&text), text.contains("Server is ready")) {
                self.port = port;
                return Ok(());
            }
            if Instant::now() > deadline || !self.is_running() {
                self.stop();
                return Err(ServerError::NotReady { log: text });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        // `E2E_KEEP_LOGS=DIR` keeps every run's log there, named by port.
        if let Some(keep) = std::env::var_os("E2E_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = fs::create_dir_all(&keep);
            for start in 1..=self.starts {
                let from = self.dir.path().join(format!("server-{start}.log"));
                let to = keep.join(format!("nats-{}-run-{start}.log", self.port));
                let _ = fs::copy(from, to);
            }
        }
    }
}

/// The `nats-server` binary the tests use (see the crate docs).
pub fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let debian = Path::new("/usr/sbin/nats-server");
    if debian.exists() {
        return debian.to_path_buf();
    }
    PathBuf::from("nats-server")
}

/// Reads the client port from a line like
/// `Listening for client connections on 127.0.0.1:41234`.
fn listening_port(log: &str) -> Option<u16> {
    port_after(log, "Listening for client connections on ")
}

/// The port at the end of the first log line containing `marker`.
pub(crate) fn port_after(log: &str, marker: &str) -> Option<u16> {
    log.lines()
        .find_map(|line| line.split(marker).nth(1))
        .and_then(|addr| addr.trim().rsplit(':').next())
        .and_then(|port| port.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_port_from_log_line() {
        let log = "[1] [INF] Starting nats-server\n[1] 2026/11/29 [INF] Listening for client connections on 127.0.0.1:41234\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(listening_port("nothing yet"), None);
    }

    #[test]
    fn starts_restarts_and_cleans_up() {
        let mut server = NatsServer::start().expect("server starts");
        let port = server.port();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        server.stop();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        server.restart().expect("server restarts");
        assert_eq!(server.port(), port);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        let store = server.dir.path().to_path_buf();
        drop(server);
        assert!(!store.exists(), "store dir removed on drop");
    }
}
