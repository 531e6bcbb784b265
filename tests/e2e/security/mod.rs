//! NATS security: the three roles of `nats/roles.conf` doing their jobs
//! and nothing more, every authentication method, and TLS with
//! certificates the tests make.

mod auth;
mod roles;
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::*;

/// A config file for the CLI or a host with `[nats]` keys added.
pub(crate) fn config_file(dir: &Path, name: &str, url: &str, nats_toml: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let options = Options {
        nats_toml: nats_toml.to_string(),
        ..Options::default()
    };
    std::fs::write(&path, config_toml(url, &options)).expect("config");
    path
}

/// Runs `hookmesh --config <config> <args>` in `dir`.
pub(crate) fn cli(dir: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(hookmesh_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .current_dir(dir)
        .env("HOOKMESH_LOG", "warn")
        .env_remove("HOOKMESH_CONFIG")
        .output()
        .expect("run hookmesh")
}

/// Its standard error as text.
pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Its standard output as text.
pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The version `nats-server --version` reports, as (major, minor, patch).
pub(crate) fn server_version(bin: &Path) -> (u32, u32, u32) {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .unwrap_or("0.0.0");
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}
