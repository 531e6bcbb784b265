//! `hookmesh up --handlers DIR`: the edit–build–run loop. Every built
//! handler of DIR is deployed at start and deployed again whenever its
//! manifest or its `.wasm` changes — through the same store every host
//! follows, so the running host swaps it live like any deploy.
//!
//! Files are polled (size and modification time), which needs no
//! platform watcher and sees a rebuilt component however the build tool
//! replaces it. A fingerprint is taken before the files are read, so a
//! component still being written is deployed again once it settles.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{Deployed, HandlerStore};
use crate::manifest::{Manifest, manifest_paths};
use crate::runtime::Runtime;

/// How often DIR is looked at.
pub const POLL: Duration = Duration::from_millis(500);

/// What identifies one state of a handler's files.
type Fingerprint = Vec<Option<(u64, SystemTime)>>;

fn stat(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

/// The fingerprint of a manifest and the component it names.
fn fingerprint(manifest_path: &Path) -> Fingerprint {
    let component = Manifest::load(manifest_path)
        .ok()
        .and_then(|m| m.component)
        .and_then(|c| stat(&c));
    vec![stat(manifest_path), component]
}

/// Keeps DIR's handlers deployed until `shutdown` turns true.
pub async fn watch_dir(
    js: jetstream::Context,
    dir: PathBuf,
    actor: String,
    runtime: Arc<Runtime>,
    mut shutdown: watch::Receiver<bool>,
) {
    let store = loop {
        match HandlerStore::open(&js).await {
            Ok(store) => break store,
            Err(error) => {
                debug!(%error, "handler store not ready yet");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    };
    info!(dir = %dir.display(), "watching handlers: a changed manifest or component is deployed again");
    let mut seen: BTreeMap<PathBuf, Fingerprint> = BTreeMap::new();
    let mut every = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.changed() => return,
        }
        let paths = match manifest_paths(&dir) {
            Ok(paths) => paths,
            Err(error) => {
                debug!(%error, "handlers directory unreadable");
                continue;
            }
        };
        for path in paths {
            let print = fingerprint(&path);
            if seen.get(&path) == Some(&print) {
                continue;
            }
            // Remembered once settled; a deploy NATS failed at is tried
            // again on the next look.
            if deploy_one(&store, &runtime, &path, &actor).await {
                seen.insert(path.clone(), print);
            }
        }
    }
}

/// Deploys the handler of one manifest file, saying why not when it
/// cannot. `false` when NATS failed (worth another try), `true` when it is
/// settled: deployed, unchanged, or refused for what the files hold.
async fn deploy_one(
    store: &HandlerStore,
    runtime: &Arc<Runtime>,
    path: &Path,
    actor: &str,
) -> bool {
    let manifest = match Manifest::load(path) {
        Ok(manifest) => manifest,
        Err(error) => {
            warn!(%error, "manifest not deployed");
            return true;
        }
    };
    let name = manifest.name.clone();
    let Some(component) = manifest.component.clone().filter(|c| c.is_file()) else {
        warn!(
            handler = %name,
            "component not built; skipping it. Build the example handlers with: \
             cargo build --release --target wasm32-wasip2 --manifest-path handlers/Cargo.toml"
        );
        return true;
    };
    // Reading the file and compiling it to check its shape take up to
    // seconds: off the async workers, which carry the host's acks too.
    let (file, runtime) = (component.clone(), runtime.clone());
    let validated = match tokio::task::spawn_blocking(move || {
        std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| super::validate(&runtime, &bytes).map_err(|e| e.to_string()))
    })
    .await
    .map_err(|e| format!("validating: {e}"))
    .and_then(|validated| validated)
    {
        Ok(validated) => validated,
        Err(error) => {
            warn!(handler = %name, component = %component.display(), %error, "component not deployed");
            return true;
        }
    };
    match store.deploy(manifest, &validated, actor).await {
        Ok(Deployed::Activated { deployment, .. }) => {
            info!(handler = %name, version = %deployment.version, "deployed from {}", path.display());
            true
        }
        Ok(Deployed::Unchanged(current)) => {
            debug!(handler = %name, version = %current.version, "unchanged");
            true
        }
        Err(error) => {
            warn!(handler = %name, %error, "not deployed yet; trying again");
            false
        }
    }
}
