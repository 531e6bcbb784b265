//! The development NATS server that `hookmesh up` starts when nothing
//! answers on the configured URL: `nats-server -js` as a child process, its
//! store under `.hookmesh/` in the working directory, stopped on exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tracing::info;

/// Why the local server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The URL is not `nats://host:port`.
    #[error("nats.url {0:?}: expected nats://HOST:PORT")]
    BadUrl(String),
    /// Nothing answers and the URL is not on this machine.
    #[error(
        "nothing answers on {0}, and it is not a local address hookmesh could start a server on"
    )]
    NotLocal(String),
    /// No `nats-server` binary was found.
    #[error(
        "nothing answers on {0} and nats-server is not installed; install it (apt-get install -y nats-server) or set NATS_SERVER_BIN"
    )]
    NoBinary(String),
    /// Files under `.hookmesh/` could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// The server did not start listening.
    #[error("nats-server did not start within 15s; see {0}")]
    NotReady(PathBuf),
}

/// A `nats-server` child process.
#[derive(Debug)]
pub struct LocalNats {
    child: Child,
    log: PathBuf,
    url: String,
}

/// Starts a local server unless something already answers on `url`.
/// `workdir/.hookmesh/` holds its config, store and log. Port 0 lets the
/// server pick a free port itself (no bind-then-release race); the
/// started server's [`LocalNats::url`] names the one it took.
pub async fn ensure(url: &str, workdir: &Path) -> Result<Option<LocalNats>, LocalError> {
    let (host, port) = host_port(url)?;
    if port != 0 && answers(&host, port).await {
        return Ok(None);
    }
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        return Err(LocalError::NotLocal(url.to_string()));
    }
    let bin = server_binary().ok_or_else(|| LocalError::NoBinary(url.to_string()))?;
    let dir = workdir.join(".hookmesh");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LocalError::Io { path, source }
    };
    tokio::fs::create_dir_all(&dir).await.map_err(io(&dir))?;
    let conf = dir.join("nats.conf");
    let log = dir.join("nats.log");
    let store = dir.join("nats");
    // The server's default max_payload (1 MiB) holds hookmesh's default
    // body limit plus its header budget; a larger one would only earn a
    // warning from nats-server. Port -1 is nats-server's "pick one".
    let listen_port = if port == 0 { -1 } else { i32::from(port) };
    let text = format!(
        "host: \"{}\"\nport: {listen_port}\nserver_name: hookmesh-dev\njetstream {{\n  store_dir: \"{}\"\n}}\n",
        host.trim_start_matches('[').trim_end_matches(']'),
        store.display()
    );
    // The log is appended to across runs: only what this run writes counts.
    let log_start = tokio::fs::metadata(&log).await.map_or(0, |m| m.len());
    tokio::fs::write(&conf, text).await.map_err(io(&conf))?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .arg("-l")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own process group: Ctrl-C reaches hookmesh only, which stops
        // HTTP first and then this server, in that order.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(io(&bin))?;
    let mut server = LocalNats {
        child,
        log,
        url: url.to_string(),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let port = loop {
        let listening = if port == 0 {
            listening_port(&log_since(&server.log, log_start).await)
        } else {
            Some(port)
        };
        if let Some(port) = listening
            && answers(&host, port).await
        {
            break port;
        }
        if Instant::now() > deadline {
            return Err(LocalError::NotReady(server.log.clone()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    server.url = format!("nats://{host}:{port}");
    info!(url = %server.url, bin = %bin.display(), store = %store.display(), log = %server.log.display(), "started a local nats-server");
    Ok(Some(server))
}

impl LocalNats {
    /// The URL it listens on (with the port it picked, when asked to).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops the server gracefully (SIGTERM), killing it after 10 s.
    pub async fn stop(mut self) {
        terminate(&mut self.child, Duration::from_secs(10)).await;
        info!("local nats-server stopped");
    }
}

/// Stops a child process `up` started: SIGTERM, then SIGKILL when it has
/// not exited after `grace`.
pub(crate) async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own; no memory
        // is shared with the call.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn host_port(url: &str) -> Result<(String, u16), LocalError> {
    let bad = || LocalError::BadUrl(url.to_string());
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let (host, port) = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .ok_or_else(bad)?;
    Ok((host.to_string(), port.parse().map_err(|_| bad())?))
}

/// What the log holds past `start` (empty while it does not exist).
async fn log_since(log: &Path, start: u64) -> String {
    let bytes = tokio::fs::read(log).await.unwrap_or_default();
    let start = usize::try_from(start)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The client port in a line like
/// `Listening for client connections on 127.0.0.1:41234`.
fn listening_port(log: &str) -> Option<u16> {
    log.lines()
        .find_map(|line| line.split("Listening for client connections on ").nth(1))
        .and_then(|address| address.trim().rsplit(':').next())
        .and_then(|port| port.parse().ok())
}

async fn answers(host: &str, port: u16) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

/// `$NATS_SERVER_BIN`, else `nats-server` on `PATH`, else Debian's
/// `/usr/sbin/nats-server` (not on a normal user's `PATH`).
fn server_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN").filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .chain([PathBuf::from("/usr/sbin/nats-server")])
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222").ok(),
            Some(("127.0.0.1".into(), 4222))
        );
        assert_eq!(
            host_port("nats://u:p@localhost:4333").ok(),
            Some(("localhost".into(), 4333))
        );
        assert!(host_port("nats://nohost").is_err());
    }

    #[test]
    fn reads_the_port_the_server_picked_from_its_log() {
        let log = "[1] [INF] Starting nats-server\n[1] 2026/12/01 [INF] Listening for client connections on 127.0.0.1:41234\n";
        assert_eq!(listening_port(log), Some(41234));
        assert_eq!(listening_port("[1] [INF] Starting nats-server\n"), None);
    }
}
