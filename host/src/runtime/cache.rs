//! Compiled artifacts on disk, keyed by the component's digest, the
//! wasmtime version and the engine's compatibility hash: compiling a
//! component takes 0.2–20 s, loading its artifact under 1 ms.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use wasmtime::Engine;
use wasmtime::component::Component;

/// The wasmtime major version this host embeds (the engine hash covers the
/// exact version too; this keeps directories readable).
const WASMTIME_MAJOR: &str = "48";

/// A directory of precompiled components.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    engine: Engine,
}

impl ArtifactCache {
    /// A cache under `root/<wasmtime version>-<engine hash>/`, so artifacts
    /// of another wasmtime or another engine configuration never load.
    pub fn new(root: PathBuf, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("wasmtime{WASMTIME_MAJOR}-{:016x}", hasher.finish()));
        ArtifactCache {
            dir,
            engine: engine.clone(),
        }
    }

    /// Loads the artifact for `digest`, or compiles `bytes` and stores it.
    /// A cache that cannot be written is not an error: the component is
    /// compiled in memory.
    pub fn load_or_compile(&self, digest: &str, bytes: &[u8]) -> wasmtime::Result<Component> {
        let path = self.dir.join(format!("{digest}.cwasm"));
        if path.is_file() {
            // SAFETY: the file was written by `serialize` of this same
            // wasmtime version and engine configuration (the directory is
            // keyed by both) and is named by the sha256 of its source.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "unusable cached artifact; recompiling")
                }
            }
        }
        let component = Component::new(&self.engine, bytes)?;
        if let Err(error) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), %error, "cannot cache the compiled component");
        }
        Ok(component)
    }

    fn store(&self, path: &std::path::Path, component: &Component) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize().map_err(StoreError::Serialize)?;
        // Write then rename, so a concurrent reader never maps half a file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// Why an artifact could not be cached (the component still runs).
#[derive(Debug, thiserror::Error)]
enum StoreError {
    /// The cache directory cannot be written.
    #[error("writing the artifact: {0}")]
    Io(#[from] std::io::Error),
    /// wasmtime could not serialise the compiled component.
    #[error("serialising the artifact: {0:#}")]
    Serialize(#[source] wasmtime::Error),
}
