//! The mock ERP that `hookmesh up` starts when nothing answers on its
//! address (`hookmesh-mock-erp`, from `examples/mock-erp`), so the example
//! handlers have an ERP to write to: a webhook becomes a sales order on
//! the developer's machine. A child process like the local nats-server,
//! its log under `.hookmesh/`, stopped on exit.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tracing::info;

/// The binary's name.
const BINARY: &str = "hookmesh-mock-erp";

/// What its log says once it listens: `mock ERP listening on http://…`.
const LISTENING: &str = "mock ERP listening on ";

/// Why the mock ERP was not started.
#[derive(Debug, thiserror::Error)]
pub enum MockErpError {
    /// The binary is nowhere to be found.
    #[error(
        "{BINARY} is not built (cargo build --release -p hookmesh-mock-erp, or set HOOKMESH_MOCK_ERP_BIN)"
    )]
    NoBinary,
    /// It could not be started, or its log written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's answer.
        source: std::io::Error,
    },
    /// It did not start listening.
    #[error("{BINARY} did not listen within 10s; see {0}")]
    NotReady(PathBuf),
}

/// A `hookmesh-mock-erp` child process.
#[derive(Debug)]
pub struct MockErp {
    child: Child,
    url: String,
}

impl MockErp {
    /// `http://host:port`, where it answers.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops it (SIGTERM), killing it after 5 s.
    pub async fn stop(mut self) {
        crate::local::terminate(&mut self.child, Duration::from_secs(5)).await;
        info!("mock ERP stopped");
    }
}

/// Starts the mock ERP on `listen` (`127.0.0.1:0` lets it pick a port)
/// unless something answers there already (`Ok(None)`: a real ERP, or a
/// mock started by hand). Its log is `workdir/.hookmesh/mock-erp.log`.
pub async fn ensure(listen: &str, workdir: &Path) -> Result<Option<MockErp>, MockErpError> {
    if !listen.ends_with(":0") && answers(listen).await {
        info!(erp = %listen, "an ERP answers already; not starting the mock ERP");
        return Ok(None);
    }
    let bin = binary().ok_or(MockErpError::NoBinary)?;
    let dir = workdir.join(".hookmesh");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MockErpError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let log = dir.join("mock-erp.log");
    let file = std::fs::File::create(&log).map_err(io(&log))?;
    let mut command = Command::new(&bin);
    command
        .arg("--listen")
        .arg(listen)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        // Its own process group: Ctrl-C reaches hookmesh, which stops it.
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: prctl(2) is async-signal-safe and touches no memory of the
    // parent; it runs in the child between fork and exec. It ends the mock
    // ERP with hookmesh even when hookmesh is killed (SIGKILL), instead of
    // leaving it holding the port.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(io(&bin))?;
    let mut erp = MockErp {
        child,
        url: String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = tokio::fs::read_to_string(&log).await.unwrap_or_default();
        if let Some(url) = text
            .lines()
            .find_map(|line| line.split(LISTENING).nth(1))
            .map(|url| url.trim().to_string())
            && answers(url.trim_start_matches("http://")).await
        {
            erp.url = url;
            break;
        }
        if Instant::now() > deadline || matches!(erp.child.try_wait(), Ok(Some(_))) {
            return Err(MockErpError::NotReady(log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(url = %erp.url, bin = %bin.display(), log = %log.display(), "started the mock ERP");
    Ok(Some(erp))
}

async fn answers(address: &str) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(address)).await,
        Ok(Ok(_))
    )
}

/// `$HOOKMESH_MOCK_ERP_BIN`, else the binary beside this one (cargo builds
/// both into one directory), else on `PATH`.
fn binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("HOOKMESH_MOCK_ERP_BIN").filter(|b| !b.is_empty()) {
        return Some(PathBuf::from(bin));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(BINARY)));
    let path = std::env::var_os("PATH").unwrap_or_default();
    beside
        .into_iter()
        .chain(std::env::split_paths(&path).map(|dir| dir.join(BINARY)))
        .find(|candidate| candidate.is_file())
}
