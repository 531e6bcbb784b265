//! Running handler components: one wasmtime [`Engine`] (component model,
//! epoch interruption, pooling allocator), an [`InstancePre`] per handler
//! version, and a fresh [`Store`] per event with a deadline and a memory cap.
//!
//! The runtime knows nothing of NATS: what a guest can reach goes through
//! [`Services`], and what it emits comes back in [`Invoked`]. Outgoing
//! HTTP is a capability of the runtime itself, granted by the manifest
//! ([`http`]). A trap, a timeout or running out of memory fails that one
//! invocation ([`Verdict::Trap`]); the host and every other handler go on.
//!
//! Two versions of the world are linked side by side: components built
//! against `hookmesh:handler@0.2.0` (`wit/handler.wit`) and against the
//! frozen `@0.1.0` (`wit/0.1.0/`) both run; [`Prepared::world`] says which
//! one a component targets.
//!
//! [`InstancePre`]: wasmtime::component::InstancePre

mod bindings;
mod by_length;
mod cache;
mod event;
pub mod guest_log;
pub mod http;
mod invocation;
mod sandbox;
pub mod services;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::warn;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimitsBuilder,
};
use wasmtime_wasi_http::WasiHttpCtx;

use bindings::{v0_1, v0_2};
pub use event::{EventInput, EventRef};
use invocation::Invocation;
pub use services::{MappingFailure, MemoryServices, Revisioned, Services, StateFailure};

use crate::manifest::Manifest;
use crate::telemetry::Trace;

/// How often the epoch advances; a running guest yields at each tick, so a
/// deadline is kept to within one tick.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The most events one invocation may emit (each at most
/// [`Services::max_value_bytes`]): a guest cannot make the host buffer
/// without bound.
pub const MAX_EMITS: usize = 1_000;

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
    /// `hookmesh:handler/handler` (wasmtime says why).
    #[error("{handler}: not a hookmesh handler component: {source:#}")]
    Invalid {
        /// The handler.
        handler: String,
        /// What wasmtime found wrong.
        #[source]
        source: wasmtime::Error,
    },
    /// The manifest grants what the host cannot honour.
    #[error("{handler}: manifest: {source}")]
    Grant {
        /// The handler.
        handler: String,
        /// The refused grant.
        #[source]
        source: http::BadEntry,
    },
    /// Instantiating it traps or fails.
    #[error("{handler}: the component fails at instantiation: {source:#}")]
    Instantiation {
        /// The handler.
        handler: String,
        /// The trap or link error.
        #[source]
        source: wasmtime::Error,
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
    /// `transient`: retry.
    Transient {
        /// What went wrong.
        reason: String,
        /// The delay the guest asked for (an HTTP `Retry-After`), if any.
        retry_after: Option<Duration>,
    },
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
    /// `log` lines dropped past the manifest's `max_log_lines` /
    /// `max_log_bytes` (0: the log was not truncated).
    pub log_dropped: u64,
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
    /// What its manifest grants for outgoing HTTP.
    grant: Arc<http::Grant>,
    /// Whether it imports `wasi:http/outgoing-handler`.
    imports_http: bool,
    pre: Pre,
}

/// A component linked against one version of the world.
enum Pre {
    V0_1(v0_1::HandlerPre<Invocation>),
    V0_2(v0_2::HandlerPre<Invocation>),
}

impl Prepared {
    /// The version of `hookmesh:handler` the component was built against:
    /// `"0.2.0"` or `"0.1.0"`.
    pub fn world(&self) -> &'static str {
        match self.pre {
            Pre::V0_1(_) => "0.1.0",
            Pre::V0_2(_) => "0.2.0",
        }
    }

    /// Whether the component imports `wasi:http/outgoing-handler`.
    pub fn imports_http(&self) -> bool {
        self.imports_http
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("handler", &self.manifest.name)
            .field("digest", &self.digest)
            .field("world", &self.world())
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
) -> wasmtime::Result<Compiled> {
    let digest = hex::encode(Sha256::digest(bytes));
    let component = match cache {
        Some(cache) => cache.load_or_compile(&digest, bytes)?,
        None => Component::new(engine, bytes)?,
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

/// The engine, linker and artifact cache, shared by every handler.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Invocation>,
    connector: Arc<http::Connector>,
    credentials: Arc<http::Credentials>,
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
    /// when given. Outgoing HTTP resolves names with the system resolver.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Runtime, RuntimeError> {
        Self::with_resolver(cache_dir, Arc::new(http::SystemResolver))
    }

    /// [`Runtime::new`], resolving the names of outgoing HTTP requests
    /// with `resolver` (what a name resolves to is still filtered).
    pub fn with_resolver(
        cache_dir: Option<PathBuf>,
        resolver: Arc<dyn http::Resolve>,
    ) -> Result<Runtime, RuntimeError> {
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
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(engine_err)?;
        v0_2::Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(engine_err)?;
        v0_1::Handler::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(engine_err)?;
        by_length::shadow(&mut linker).map_err(engine_err)?;
        let connector = http::Connector::new(resolver)
            .map_err(|e| RuntimeError::Engine(format!("TLS for outgoing HTTP: {e}")))?;
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
            connector: Arc::new(connector),
            credentials: Arc::default(),
            cache,
            ticker,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_INSTANCES as usize)),
        })
    }

    /// This runtime, adding `credentials` to handlers' outgoing requests
    /// (`[[outgoing.credentials]]`).
    pub fn with_credentials(mut self, credentials: http::Credentials) -> Runtime {
        self.credentials = Arc::new(credentials);
        self
    }

    /// The engine components are compiled for (to look at a compiled
    /// component's types).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (or loads the artifact from the cache). Takes up to
    /// seconds of CPU: call it off the async workers.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, RuntimeError> {
        compile(&self.engine, self.cache.as_ref(), bytes).map_err(|source| RuntimeError::Invalid {
            handler: String::new(),
            source,
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
                .map_err(wasmtime::Error::new)
                .and_then(|compiled| compiled)
                .map_err(|source| RuntimeError::Invalid {
                    handler: handler.clone(),
                    source,
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
        let invalid = |source: wasmtime::Error| RuntimeError::Invalid {
            handler: handler.clone(),
            source,
        };
        let grant = http::Grant::of(&manifest).map_err(|source| RuntimeError::Grant {
            handler: handler.clone(),
            source,
        })?;
        let Compiled { component, digest } = compiled;
        let imports_http = component
            .component_type()
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("wasi:http/outgoing-handler@"));
        let pre = self.linker.instantiate_pre(&component).map_err(invalid)?;
        // The export's shape tells the versions apart (0.2.0's `transient`
        // carries a record, 0.1.0's a string).
        let pre = match v0_2::HandlerPre::new(pre.clone()) {
            Ok(pre) => Pre::V0_2(pre),
            Err(newest) => match v0_1::HandlerPre::new(pre) {
                Ok(pre) => Pre::V0_1(pre),
                Err(_) => return Err(invalid(newest)),
            },
        };
        if imports_http && grant.hosts.is_empty() {
            warn!(
                handler = %handler,
                "the component imports wasi:http/outgoing-handler but the manifest lists no \
                 allowed_hosts: every request it makes is denied"
            );
        }
        let prepared = Prepared {
            version: version.unwrap_or_else(|| digest.chars().take(12).collect()),
            digest,
            manifest: Arc::new(manifest),
            grant: Arc::new(grant),
            imports_http,
            pre,
        };
        let services: Arc<dyn Services> = Arc::new(MemoryServices::default());
        let mut store = self.store(&prepared, services, http::Origin::default(), Instant::now());
        let started = match &prepared.pre {
            Pre::V0_2(pre) => pre.instantiate_async(&mut store).await.map(drop),
            Pre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(drop),
        };
        started.map_err(|source| RuntimeError::Instantiation {
            handler: handler.clone(),
            source,
        })?;
        Ok(Arc::new(prepared))
    }

    fn store(
        &self,
        prepared: &Prepared,
        services: Arc<dyn Services>,
        origin: http::Origin,
        started: Instant,
    ) -> Store<Invocation> {
        let manifest = prepared.manifest.clone();
        let correlation_id = origin.correlation_id.clone();
        let trace = origin.trace.clone();
        let outbound = http::Outbound::new(
            prepared.grant.clone(),
            self.connector.clone(),
            self.credentials.clone(),
            Arc::new(origin),
            started,
            manifest.timeout,
        );
        let log = guest_log::LogBudget::new(manifest.max_log_lines, manifest.max_log_bytes);
        let data = Invocation {
            wasi: None,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(manifest.memory as usize)
                .instances(64)
                .tables(16)
                .memories(8)
                .build(),
            http: WasiHttpCtx::new(),
            outbound,
            services,
            manifest,
            emits: Vec::new(),
            refused_emit: None,
            correlation_id,
            trace,
            log,
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
        let headers = event.header_refs();
        self.invoke_traced(prepared, &event.as_event(&headers), services, &Trace::off())
            .await
    }

    /// [`invoke`](Self::invoke) under the invocation's span `trace`: host
    /// calls and outgoing requests become its children, guest log lines
    /// its events.
    pub async fn invoke_traced(
        &self,
        prepared: &Prepared,
        event: &EventRef<'_>,
        services: Arc<dyn Services>,
        trace: &Trace,
    ) -> Invoked {
        let started = Instant::now();
        let timeout = prepared.manifest.timeout;
        // A pool slot; the semaphore is never closed.
        let _slot = self.slots.acquire().await.ok();
        let origin = http::Origin {
            handler: prepared.manifest.name.clone(),
            version: prepared.version.clone(),
            idempotency_key: event.idempotency_key.to_string(),
            correlation_id: event.correlation_id.to_string(),
            traceparent: event
                .header(crate::headers::TRACEPARENT)
                .map(str::to_string),
            trace: trace.clone(),
        };
        let mut store = self.store(prepared, services, origin, started);
        let run = async {
            let returned: Result<(), Verdict> = match &prepared.pre {
                Pre::V0_2(pre) => {
                    let handler = pre.instantiate_async(&mut store).await?;
                    let handle = handler.func_handle();
                    call_handle::<v0_2::hookmesh::handler::types::HandlerError>(
                        handle.func(),
                        &mut store,
                        event,
                    )
                    .await?
                    .map_err(Verdict::from)
                }
                Pre::V0_1(pre) => {
                    let handler = pre.instantiate_async(&mut store).await?;
                    let handle = handler.func_handle();
                    call_handle::<v0_1::hookmesh::handler::types::HandlerError>(
                        handle.func(),
                        &mut store,
                        event,
                    )
                    .await?
                    .map_err(Verdict::from)
                }
            };
            Ok::<_, wasmtime::Error>(returned)
        };
        // Most invocations finish at their first poll; only one that
        // yields (an epoch tick, a host call that waits) needs the timer.
        let ran = {
            let deadline = tokio::time::Instant::now() + timeout;
            tokio::pin!(run);
            match futures::poll!(run.as_mut()) {
                std::task::Poll::Ready(ran) => Ok(ran),
                std::task::Poll::Pending => tokio::time::timeout_at(deadline, run).await,
            }
        };
        let verdict = match ran {
            Err(_) => Verdict::Trap(format!("timed out after {timeout:?}")),
            Ok(Err(trap)) => Verdict::Trap(describe_trap(&trap)),
            Ok(Ok(Ok(()))) => match store.data_mut().refused_emit.take() {
                Some(refused) => Verdict::Permanent(format!("an emit was refused: {refused}")),
                None => Verdict::Ok,
            },
            Ok(Ok(Err(failure))) => failure,
        };
        let emits = match verdict {
            Verdict::Ok => std::mem::take(&mut store.data_mut().emits),
            _ => Vec::new(),
        };
        Invoked {
            verdict,
            emits,
            elapsed: started.elapsed(),
            log_dropped: store.data().log.dropped(),
        }
    }
}

/// Calls a component's `handle` with the event lowered from where it is
/// borrowed (the generated binding's `Event` owns its strings, so every
/// one would be copied once more first). `E` is the version's
/// `handler-error`.
async fn call_handle<E>(
    handle: &wasmtime::component::Func,
    store: &mut Store<Invocation>,
    event: &EventRef<'_>,
) -> wasmtime::Result<Result<(), E>>
where
    E: wasmtime::component::Lift + Send + Sync + 'static,
{
    let typed = handle.typed::<(&EventRef<'_>,), (Result<(), E>,)>(&*store)?;
    let (returned,) = typed.call_async(&mut *store, (event,)).await?;
    Ok(returned)
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
