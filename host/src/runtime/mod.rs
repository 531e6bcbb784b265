//! Running handler components: one wasmtime [`Engine`] (component model,
//! epoch interruption, pooling allocator), an [`InstancePre`] per handler
//! version, and a fresh [`Store`] per event with a deadline and a memory cap.
//!
//! The runtime knows nothing of NATS or HTTP: what a guest can reach goes
//! through [`Services`], and what it emits comes back in [`Invoked`].
//! A trap, a timeout or running out of memory fails that one invocation
//! ([`Verdict::Trap`]); the host and every other handler go on.
//!
//! [`InstancePre`]: wasmtime::component::InstancePre

mod bindings;
mod cache;
mod sandbox;
pub mod services;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use bindings::hookmesh::handler::{config, log, mapping, outbox, state, types};
use bindings::{Handler, HandlerPre};
pub use services::{MappingFailure, MemoryServices, Revisioned, Services, StateFailure};

use crate::manifest::Manifest;

/// How often the epoch advances; a running guest yields at each tick, so a
/// deadline is kept to within one tick.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The most events one invocation may emit, and the largest emit: a guest
/// cannot make the host buffer without bound.
pub const MAX_EMITS: usize = 1_000;
/// See [`MAX_EMITS`].
pub const MAX_EMIT_BYTES: usize = 1 << 20;

/// The most memory any one invocation may have (a manifest asking for more
/// is refused): the pooling allocator reserves this per slot.
pub const MAX_MEMORY: u64 = 512 << 20;

/// Handler instances a host runs at once, across all handlers: the pooling
/// allocator's slots. Invocations past it wait for a slot.
pub const MAX_INSTANCES: u32 = 1024;

/// Why a component cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be configured (a host problem).
    #[error("wasm engine: {0}")]
    Engine(String),
    /// The bytes are not a valid component, or it does not implement
    /// `hookmesh:handler/handler`.
    #[error("{handler}: not a hookmesh handler component: {reason}")]
    Invalid {
        /// The handler.
        handler: String,
        /// What is wrong.
        reason: String,
    },
    /// Instantiating it traps or fails.
    #[error("{handler}: the component fails at instantiation: {reason}")]
    Instantiation {
        /// The handler.
        handler: String,
        /// What happened.
        reason: String,
    },
    /// The manifest asks for more than the runtime allows.
    #[error("{handler}: memory = {requested} bytes is above the host limit of {MAX_MEMORY}")]
    TooMuchMemory {
        /// The handler.
        handler: String,
        /// What it asked for.
        requested: u64,
    },
}

/// One event, as handed to a guest.
#[derive(Debug, Clone, Default)]
pub struct EventInput {
    /// The provider's event id.
    pub id: Option<String>,
    /// The idempotency key.
    pub idempotency_key: String,
    /// The provider (or emitting handler).
    pub provider: String,
    /// The event type.
    pub event_type: String,
    /// The domain.
    pub domain: String,
    /// The entity id.
    pub entity_id: String,
    /// The entity version.
    pub entity_version: Option<String>,
    /// The correlation id.
    pub correlation_id: String,
    /// The stored subject.
    pub subject: String,
    /// When it was received (RFC 3339).
    pub received_at: String,
    /// Delivery attempt, from 1.
    pub attempt: u32,
    /// Message headers.
    pub headers: Vec<(String, String)>,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A follow-up event a handler emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emit {
    /// Its type.
    pub event_type: String,
    /// Its entity.
    pub entity_id: String,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `handle` returned ok.
    Ok,
    /// `transient(reason)`: retry.
    Transient(String),
    /// `permanent(reason)`: dead letter now.
    Permanent(String),
    /// `needs-human(reason)`: dead letter, flagged.
    NeedsHuman(String),
    /// A trap, timeout or out-of-memory: counted as transient, reason `trap`.
    Trap(String),
}

/// The result of one invocation.
#[derive(Debug, Clone)]
pub struct Invoked {
    /// How it ended.
    pub verdict: Verdict,
    /// What it emitted (only meaningful with [`Verdict::Ok`]).
    pub emits: Vec<Emit>,
    /// Instantiation plus call.
    pub elapsed: Duration,
}

/// A compiled handler version, ready to instantiate.
pub struct Prepared {
    /// The component's sha256 (hex).
    pub digest: String,
    /// The version label stamped on logs, attempt records and dead
    /// letters: the deployment's `<counter>-<digest prefix>`, or the first
    /// 12 hex digits of the digest for a component loaded from a file.
    pub version: String,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    pre: HandlerPre<Invocation>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("handler", &self.manifest.name)
            .field("digest", &self.digest)
            .finish()
    }
}

/// A compiled component and the sha256 of its bytes: compiled once, then
/// inspected ([`Runtime::engine`]) and prepared ([`Runtime::prepare_compiled`]).
#[derive(Clone)]
pub struct Compiled {
    /// The compiled component (cheap to clone).
    pub component: Component,
    /// The sha256 of its bytes, lowercase hex.
    pub digest: String,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("digest", &self.digest)
            .finish()
    }
}

/// Compiles `bytes` for `engine`, through the artifact cache when there is
/// one.
fn compile(
    engine: &Engine,
    cache: Option<&cache::ArtifactCache>,
    bytes: &[u8],
) -> Result<Compiled, String> {
    let digest = hex::encode(Sha256::digest(bytes));
    let component = match cache {
        Some(cache) => cache.load_or_compile(&digest, bytes)?,
        None => Component::new(engine, bytes).map_err(|e| format!("{e:#}"))?,
    };
    Ok(Compiled { component, digest })
}

/// Refuses a manifest asking for more memory than the pool's slots hold.
fn check_memory(manifest: &Manifest) -> Result<(), RuntimeError> {
    if manifest.memory > MAX_MEMORY {
        return Err(RuntimeError::TooMuchMemory {
            handler: manifest.name.clone(),
            requested: manifest.memory,
        });
    }
    Ok(())
}

/// The per-invocation store data.
struct Invocation {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    services: Arc<dyn Services>,
    manifest: Arc<Manifest>,
    emits: Vec<Emit>,
    /// Set when the guest emitted past the limits; fails the invocation.
    emit_overflow: bool,
    correlation_id: String,
}

impl WasiView for Invocation {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The engine, linker and artifact cache, shared by every handler.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Invocation>,
    cache: Option<cache::ArtifactCache>,
    ticker: Arc<AtomicBool>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.store(true, Ordering::Relaxed);
    }
}

impl Runtime {
    /// Builds the engine; compiled artifacts are cached under `cache_dir`
    /// when given.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Runtime, RuntimeError> {
        let engine_err = |e: wasmtime::Error| RuntimeError::Engine(format!("{e:#}"));
        let mut pool = PoolingAllocationConfig::default();
        // Sized for the largest `concurrency` sum a host runs (the slots
        // reserve address space, not memory; pages are touched on use).
        pool.total_component_instances(MAX_INSTANCES)
            .total_core_instances(MAX_INSTANCES * 8)
            .total_memories(MAX_INSTANCES)
            .total_tables(MAX_INSTANCES * 4)
            .total_stacks(MAX_INSTANCES)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .max_core_instances_per_component(64)
            .max_memory_size(MAX_MEMORY as usize)
            // Keep a slot's first pages mapped between instances: re-zeroing
            // is cheaper than faulting them in again (measured ≈ 45 µs
            // instead of 70 µs per fresh instance).
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(engine_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(engine_err)?;
        Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state).map_err(engine_err)?;
        let ticker = Arc::new(AtomicBool::new(false));
        let stop = ticker.clone();
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("hookmesh-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let cache = cache_dir.map(|dir| cache::ArtifactCache::new(dir, &engine));
        Ok(Runtime {
            engine,
            linker,
            cache,
            ticker,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_INSTANCES as usize)),
        })
    }

    /// The engine components are compiled for (to look at a compiled
    /// component's types).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (or loads the artifact from the cache). Takes up to
    /// seconds of CPU: call it off the async workers.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, RuntimeError> {
        compile(&self.engine, self.cache.as_ref(), bytes).map_err(|reason| RuntimeError::Invalid {
            handler: String::new(),
            reason,
        })
    }

    /// Compiles (or loads from the cache) a component, checks that it is a
    /// hookmesh handler, and instantiates it once to prove it starts.
    pub async fn prepare(
        &self,
        manifest: Manifest,
        bytes: &[u8],
    ) -> Result<Arc<Prepared>, RuntimeError> {
        self.prepare_as(manifest, bytes, None).await
    }

    /// [`Runtime::prepare`], labelling the version `version` (a
    /// deployment's label) instead of the digest prefix.
    pub async fn prepare_as(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        version: Option<String>,
    ) -> Result<Arc<Prepared>, RuntimeError> {
        check_memory(&manifest)?;
        let handler = manifest.name.clone();
        // Compiling takes up to seconds of CPU: off the async workers, so a
        // live deploy does not stall the acks and requests sharing them.
        let (engine, cache, owned) = (self.engine.clone(), self.cache.clone(), bytes.to_vec());
        let compiled =
            tokio::task::spawn_blocking(move || compile(&engine, cache.as_ref(), &owned))
                .await
                .map_err(|e| format!("compiling: {e}"))
                .and_then(|compiled| compiled)
                .map_err(|reason| RuntimeError::Invalid {
                    handler: handler.clone(),
                    reason,
                })?;
        self.prepare_compiled(manifest, compiled, version).await
    }

    /// Links a compiled component for `manifest` and instantiates it once
    /// to prove it starts (a component that cannot even start is refused
    /// before it takes over any event).
    pub async fn prepare_compiled(
        &self,
        manifest: Manifest,
        compiled: Compiled,
        version: Option<String>,
    ) -> Result<Arc<Prepared>, RuntimeError> {
        check_memory(&manifest)?;
        let handler = manifest.name.clone();
        let invalid = |reason: String| RuntimeError::Invalid {
            handler: handler.clone(),
            reason,
        };
        let Compiled { component, digest } = compiled;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let pre = HandlerPre::new(pre).map_err(|e| invalid(format!("{e:#}")))?;
        let prepared = Prepared {
            version: version.unwrap_or_else(|| digest.chars().take(12).collect()),
            digest,
            manifest: Arc::new(manifest),
            pre,
        };
        let services: Arc<dyn Services> = Arc::new(MemoryServices::default());
        let mut store = self.store(&prepared, services, String::new());
        prepared
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| RuntimeError::Instantiation {
                handler: handler.clone(),
                reason: format!("{e:#}"),
            })?;
        Ok(Arc::new(prepared))
    }

    fn store(
        &self,
        prepared: &Prepared,
        services: Arc<dyn Services>,
        correlation_id: String,
    ) -> Store<Invocation> {
        let manifest = prepared.manifest.clone();
        let data = Invocation {
            wasi: sandbox::wasi_ctx(&manifest.sandbox),
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(manifest.memory as usize)
                .instances(64)
                .tables(16)
                .memories(8)
                .build(),
            services,
            manifest,
            emits: Vec::new(),
            emit_overflow: false,
            correlation_id,
        };
        let mut store = Store::new(&self.engine, data);
        store.limiter(|invocation| &mut invocation.limits);
        // Yield to the executor at every epoch tick: a looping guest cannot
        // hold a thread, and the deadline below can cancel it.
        store.set_epoch_deadline(1);
        store.epoch_deadline_async_yield_and_update(1);
        store
    }

    /// Runs `handle` for one event in a fresh instance.
    pub async fn invoke(
        &self,
        prepared: &Prepared,
        event: EventInput,
        services: Arc<dyn Services>,
    ) -> Invoked {
        let started = Instant::now();
        let timeout = prepared.manifest.timeout;
        // A pool slot; the semaphore is never closed.
        let _slot = self.slots.acquire().await.ok();
        let mut store = self.store(prepared, services, event.correlation_id.clone());
        let input = to_wit(event);
        let run = async {
            let handler = prepared.pre.instantiate_async(&mut store).await?;
            handler.call_handle(&mut store, &input).await
        };
        let verdict = match tokio::time::timeout(timeout, run).await {
            Err(_) => Verdict::Trap(format!("timed out after {timeout:?}")),
            Ok(Err(trap)) => Verdict::Trap(describe_trap(&trap)),
            Ok(Ok(Ok(()))) => Verdict::Ok,
            Ok(Ok(Err(types::HandlerError::Transient(reason)))) => Verdict::Transient(reason),
            Ok(Ok(Err(types::HandlerError::Permanent(reason)))) => Verdict::Permanent(reason),
            Ok(Ok(Err(types::HandlerError::NeedsHuman(reason)))) => Verdict::NeedsHuman(reason),
        };
        let verdict = match verdict {
            Verdict::Ok if store.data().emit_overflow => Verdict::Permanent(format!(
                "emitted more than {MAX_EMITS} events or one larger than {MAX_EMIT_BYTES} bytes"
            )),
            other => other,
        };
        let emits = match verdict {
            Verdict::Ok => std::mem::take(&mut store.data_mut().emits),
            _ => Vec::new(),
        };
        Invoked {
            verdict,
            emits,
            elapsed: started.elapsed(),
        }
    }
}

/// A short, ops-readable description of a trap.
fn describe_trap(error: &wasmtime::Error) -> String {
    match error.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::UnreachableCodeReached) => {
            "trap: unreachable (a panic, an abort or a failed allocation)".to_string()
        }
        Some(trap) => format!("trap: {trap}"),
        None => format!("{error:#}")
            .lines()
            .next()
            .unwrap_or("trap")
            .to_string(),
    }
}

fn to_wit(event: EventInput) -> types::Event {
    types::Event {
        id: event.id,
        idempotency_key: event.idempotency_key,
        provider: event.provider,
        event_type: event.event_type,
        domain: event.domain,
        entity_id: event.entity_id,
        entity_version: event.entity_version,
        correlation_id: event.correlation_id,
        subject: event.subject,
        received_at: event.received_at,
        attempt: event.attempt,
        headers: event.headers,
        payload: event.payload,
    }
}

impl types::Host for Invocation {}

impl log::Host for Invocation {
    async fn log(&mut self, level: log::Level, message: String) {
        let handler = &self.manifest.name;
        let correlation_id = &self.correlation_id;
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
        }
    }
}

impl state::Host for Invocation {
    async fn get(&mut self, key: String) -> Result<Option<state::Entry>, state::StateError> {
        check_key(&key)?;
        let found = self
            .services
            .state_get(&self.manifest.name, &key)
            .await
            .map_err(state_error)?;
        Ok(found.map(|r| state::Entry {
            value: r.value,
            revision: r.revision,
        }))
    }

    async fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, state::StateError> {
        check_key(&key)?;
        self.services
            .state_put(&self.manifest.name, &key, value, expected)
            .await
            .map_err(state_error)
    }

    async fn delete(
        &mut self,
        key: String,
        expected: Option<u64>,
    ) -> Result<(), state::StateError> {
        check_key(&key)?;
        self.services
            .state_delete(&self.manifest.name, &key, expected)
            .await
            .map_err(state_error)
    }
}

fn check_key(key: &str) -> Result<(), state::StateError> {
    if key.is_empty() || key.len() > 512 {
        return Err(state::StateError::InvalidKey(format!(
            "a key must have 1 to 512 bytes, this one has {}",
            key.len()
        )));
    }
    Ok(())
}

fn state_error(failure: StateFailure) -> state::StateError {
    match failure {
        StateFailure::StaleRevision => state::StateError::StaleRevision,
        StateFailure::InvalidKey(reason) => state::StateError::InvalidKey(reason),
        StateFailure::Unavailable(reason) => state::StateError::Unavailable(reason),
    }
}

impl mapping::Host for Invocation {
    async fn link(
        &mut self,
        system: String,
        id: String,
        other_system: String,
        other_id: String,
    ) -> Result<(), mapping::MappingError> {
        for part in [&system, &id, &other_system, &other_id] {
            check_id(part)?;
        }
        self.services
            .mapping_link(&system, &id, &other_system, &other_id)
            .await
            .map_err(mapping_error)
    }

    async fn lookup(
        &mut self,
        system: String,
        id: String,
        other_system: String,
    ) -> Result<Option<String>, mapping::MappingError> {
        for part in [&system, &id, &other_system] {
            check_id(part)?;
        }
        self.services
            .mapping_lookup(&system, &id, &other_system)
            .await
            .map_err(mapping_error)
    }
}

fn check_id(id: &str) -> Result<(), mapping::MappingError> {
    if id.is_empty() || id.len() > 256 {
        return Err(mapping::MappingError::InvalidId(format!(
            "system names and ids must have 1 to 256 bytes, got {}",
            id.len()
        )));
    }
    Ok(())
}

fn mapping_error(failure: MappingFailure) -> mapping::MappingError {
    match failure {
        MappingFailure::Conflict(reason) => mapping::MappingError::Conflict(reason),
        MappingFailure::InvalidId(reason) => mapping::MappingError::InvalidId(reason),
        MappingFailure::Unavailable(reason) => mapping::MappingError::Unavailable(reason),
    }
}

impl outbox::Host for Invocation {
    async fn emit(&mut self, event_type: String, entity_id: String, payload: Vec<u8>) {
        if self.emits.len() >= MAX_EMITS || payload.len() > MAX_EMIT_BYTES {
            self.emit_overflow = true;
            return;
        }
        self.emits.push(Emit {
            event_type,
            entity_id,
            payload,
        });
    }
}

impl config::Host for Invocation {
    async fn get(&mut self, key: String) -> Option<String> {
        self.manifest.config.get(&key).cloned()
    }

    async fn get_all(&mut self) -> Vec<(String, String)> {
        self.manifest.config.clone().into_iter().collect()
    }
}
