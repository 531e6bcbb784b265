//! Checking, before anything is uploaded, that a file is a component
//! implementing the world `hookmesh:handler/handler` — version 0.2.0
//! (`wit/handler.wit`) or the frozen 0.1.0 (`wit/0.1.0/handler.wit`) —
//! and importing nothing hookmesh does not provide.
//!
//! Two steps over one compilation, so every refusal names its cause:
//! [`validate`] compiles the bytes with the host's own runtime and looks at
//! the component's type (is it a component at all, does it export `handle`
//! with the right shape, what does it import), and [`check_starts`] links
//! and instantiates that compiled component once, as a host would before it
//! takes over any event.

use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};

use super::DeployError;
use crate::manifest::Manifest;
use crate::runtime::{Compiled, Runtime, RuntimeError};

/// The interfaces of `hookmesh:handler` a handler may import (the same in
/// every version).
const HOOKMESH_INTERFACES: &[&str] = &["types", "log", "state", "mapping", "outbox", "config"];
/// The versions of the `hookmesh:handler` package the host implements,
/// newest first.
const HOOKMESH_VERSIONS: &[&str] = &["0.2.0", "0.1.0"];
/// The WASI 0.2 packages the host links (what is visible inside them is
/// decided by the manifest's sandbox).
const WASI_PACKAGES: &[&str] = &["cli", "clocks", "filesystem", "io", "random", "sockets"];
/// The interfaces of `wasi:http` the host links: a handler makes requests
/// (to the hosts its manifest allows), it does not serve them.
const WASI_HTTP_INTERFACES: &[&str] = &["outgoing-handler", "types"];

/// The fields of `record event`, in order, with their WIT types.
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("id", "option<string>"),
    ("idempotency-key", "string"),
    ("provider", "string"),
    ("event-type", "string"),
    ("domain", "string"),
    ("entity-id", "string"),
    ("entity-version", "option<string>"),
    ("correlation-id", "string"),
    ("subject", "string"),
    ("received-at", "string"),
    ("attempt", "u32"),
    ("headers", "list<tuple<string, string>>"),
    ("payload", "list<u8>"),
];
/// The cases of `variant handler-error` in 0.2.0, in order, with their
/// payloads.
const ERROR_CASES: &[(&str, &str)] = &[
    (
        "transient",
        "record { reason: string, retry-after-ms: option<u64> }",
    ),
    ("permanent", "string"),
    ("needs-human", "string"),
];
/// The cases of `variant handler-error` in 0.1.0.
const ERROR_CASES_V0_1: &[(&str, &str)] = &[
    ("transient", "string"),
    ("permanent", "string"),
    ("needs-human", "string"),
];

/// A component that passed [`validate`]: its bytes, sha256 and size, and
/// the compiled component.
#[derive(Clone)]
pub struct Validated {
    bytes: Vec<u8>,
    compiled: Compiled,
    imports: Vec<String>,
    world: &'static str,
}

impl std::fmt::Debug for Validated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validated")
            .field("digest", &self.compiled.digest)
            .field("size", &self.bytes.len())
            .field("imports", &self.imports)
            .field("world", &self.world)
            .finish()
    }
}

impl Validated {
    /// The component's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Its sha256, lowercase hex (the object name in `hook_handlers`).
    pub fn digest(&self) -> &str {
        &self.compiled.digest
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The interfaces it imports, as named in the component.
    pub fn imports(&self) -> &[String] {
        &self.imports
    }

    /// The version of `hookmesh:handler` it targets (`"0.2.0"`, `"0.1.0"`).
    pub fn world(&self) -> &'static str {
        self.world
    }

    /// Whether it imports `wasi:http/outgoing-handler`: it makes HTTP
    /// requests, which only the hosts its manifest's `allowed_hosts` lists
    /// let through.
    pub fn imports_http(&self) -> bool {
        self.imports
            .iter()
            .any(|name| name.starts_with("wasi:http/outgoing-handler@"))
    }
}

/// The sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks that `bytes` are a component implementing
/// `hookmesh:handler/handler`: a component (not a core module, not some
/// other file), exporting `handle: func(event: event) -> result<_,
/// handler-error>` with exactly the WIT shapes, and importing only
/// `hookmesh:handler/*` interfaces and WASI 0.2. The error names every
/// problem found. Compiles with `runtime` (up to seconds of CPU: call it
/// off the async workers); [`check_starts`] reuses that compilation.
pub fn validate(runtime: &Runtime, bytes: &[u8]) -> Result<Validated, DeployError> {
    kind_of(bytes)?;
    let started = Instant::now();
    let compiled = runtime.compile(bytes).map_err(|e| match e {
        RuntimeError::Invalid { source, .. } => {
            DeployError::Malformed(first_line(&format!("{source:#}")))
        }
        other => DeployError::Engine(other.to_string()),
    })?;
    tracing::debug!(elapsed = ?started.elapsed(), "component compiled for validation");
    let engine = runtime.engine();
    let ty = compiled.component.component_type();

    let mut problems = Vec::new();
    let names: Vec<&str> = ty.imports(engine).map(|(name, _)| name).collect();
    let world = world_of(&names, &mut problems);
    let handle = ty.exports(engine).find(|(name, _)| *name == "handle");
    match handle {
        None => {
            let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
            problems.push(format!(
                "it does not export `handle` (exports: {})",
                list_or_none(&exports)
            ));
        }
        Some((_, export)) => match export.ty {
            ComponentItem::ComponentFunc(func) => check_handle(&func, world, &mut problems),
            other => problems.push(format!(
                "its export `handle` is {}, not a function",
                item_kind(&other)
            )),
        },
    }
    let mut imports = Vec::new();
    for (name, import) in ty.imports(engine) {
        let item = import.ty;
        if !matches!(item, ComponentItem::ComponentInstance(_)) {
            problems.push(format!(
                "it imports {} `{name}`; handlers may import only interfaces",
                item_kind(&item)
            ));
        } else if let Err(why) = import_allowed(name) {
            problems.push(format!("it imports `{name}`, {why}"));
        }
        imports.push(name.to_string());
    }
    if !problems.is_empty() {
        return Err(DeployError::NotAHandler(problems));
    }
    Ok(Validated {
        bytes: bytes.to_vec(),
        compiled,
        imports,
        world,
    })
}

/// The version of `hookmesh:handler` a component targets, from the
/// versions of the `hookmesh:handler` interfaces it imports (the newest
/// when it imports none); a component mixing versions is a problem.
fn world_of(imports: &[&str], problems: &mut Vec<String>) -> &'static str {
    let mut seen: Vec<&'static str> = Vec::new();
    for name in imports {
        let Some(rest) = name.strip_prefix("hookmesh:handler/") else {
            continue;
        };
        let version = rest.split_once('@').map_or("", |(_, v)| v);
        if let Some(known) = HOOKMESH_VERSIONS.iter().find(|v| **v == version)
            && !seen.contains(known)
        {
            seen.push(known);
        }
    }
    if seen.len() > 1 {
        problems.push(format!(
            "it imports interfaces of hookmesh:handler@{}: a component targets one version",
            seen.join(" and @")
        ));
    }
    seen.first().copied().unwrap_or(HOOKMESH_VERSIONS[0])
}

/// Links the component [`validate`] compiled with `runtime` and
/// instantiates it once under `manifest`'s limits, as a host does before
/// activating a version: refuses what the runtime cannot link (an import of
/// a version the host lacks) and a component that traps or fails while
/// starting.
pub async fn check_starts(
    runtime: &Runtime,
    validated: &Validated,
    manifest: &Manifest,
) -> Result<(), DeployError> {
    match runtime
        .prepare_compiled(manifest.clone(), validated.compiled.clone(), None)
        .await
    {
        Ok(_) => Ok(()),
        Err(RuntimeError::Instantiation { source, .. }) => Err(DeployError::DoesNotStart(
            trap_summary(&format!("{source:#}")),
        )),
        Err(RuntimeError::Invalid { source, .. }) => {
            Err(DeployError::NotAHandler(vec![first_line(&format!(
                "{source:#}"
            ))]))
        }
        Err(RuntimeError::Grant { source, .. }) => Err(DeployError::NotAHandler(vec![format!(
            "manifest: {source}"
        )])),
        Err(RuntimeError::TooMuchMemory { requested, .. }) => Err(DeployError::Manifest(
            crate::manifest::ManifestError::Invalid {
                origin: "manifest".into(),
                message: format!(
                    "memory: {requested} bytes is above the host limit of {} bytes",
                    crate::runtime::MAX_MEMORY
                ),
            },
        )),
        Err(RuntimeError::Engine(e)) => Err(DeployError::Engine(e)),
    }
}

/// Refuses what is not a binary component, naming what it is instead.
fn kind_of(bytes: &[u8]) -> Result<(), DeployError> {
    const MAGIC: &[u8] = b"\0asm";
    const CORE_VERSION: [u8; 4] = [1, 0, 0, 0];
    const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];
    if bytes.is_empty() {
        return Err(DeployError::NotWasm("the file is empty".into()));
    }
    if !bytes.starts_with(MAGIC) {
        let text = bytes.iter().take(64).all(|b| b.is_ascii() && *b != 0);
        return Err(DeployError::NotWasm(if text {
            "it is text, not a binary WebAssembly file (no \\0asm header)".into()
        } else {
            "it does not start with the WebAssembly header \\0asm".into()
        }));
    }
    match bytes.get(4..8) {
        Some(v) if v == CORE_VERSION => Err(DeployError::CoreModule),
        Some(v) if v == COMPONENT_VERSION => Ok(()),
        Some(v) => Err(DeployError::NotWasm(format!(
            "unknown WebAssembly version/layer {v:02x?} (a component has 0d 00 01 00)"
        ))),
        None => Err(DeployError::NotWasm(
            "it ends inside the WebAssembly header".into(),
        )),
    }
}

/// Whether an imported interface is one the host provides; else why not.
fn import_allowed(name: &str) -> Result<(), String> {
    let (package, rest) = name
        .split_once('/')
        .ok_or_else(|| "which is not an interface of a package".to_string())?;
    let (interface, version) = rest.split_once('@').unwrap_or((rest, ""));
    match package {
        "hookmesh:handler" => {
            if !HOOKMESH_INTERFACES.contains(&interface) {
                Err(format!(
                    "but hookmesh:handler has no interface `{interface}` (it has {})",
                    HOOKMESH_INTERFACES.join(", ")
                ))
            } else if !HOOKMESH_VERSIONS.contains(&version) {
                Err(format!(
                    "but this host implements hookmesh:handler@{}, not @{version}",
                    HOOKMESH_VERSIONS.join(" and @")
                ))
            } else {
                Ok(())
            }
        }
        "wasi:http" => {
            if !WASI_HTTP_INTERFACES.contains(&interface) {
                Err(
                    "but hookmesh provides only wasi:http/outgoing-handler and wasi:http/types \
                     (a handler makes requests; it does not serve them)"
                        .to_string(),
                )
            } else if !version.starts_with("0.2.") {
                Err(format!(
                    "but the host provides wasi:http@0.2.x, not @{version}"
                ))
            } else {
                Ok(())
            }
        }
        _ => match package.strip_prefix("wasi:") {
            Some(p) if WASI_PACKAGES.contains(&p) => {
                if version.starts_with("0.2.") {
                    Ok(())
                } else {
                    Err(format!(
                        "but the host provides WASI 0.2 (wasi:{p}@0.2.x), not @{version}"
                    ))
                }
            }
            _ => Err(format!(
                "which hookmesh does not provide (handlers may import hookmesh:handler/* and WASI 0.2: {}, wasi:http/outgoing-handler)",
                WASI_PACKAGES
                    .iter()
                    .map(|p| format!("wasi:{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    }
}

/// Checks `handle: func(event: event) -> result<_, handler-error>` with
/// the shapes of `world`.
fn check_handle(func: &ComponentFunc, world: &str, problems: &mut Vec<String>) {
    let error_cases = if world == "0.1.0" {
        ERROR_CASES_V0_1
    } else {
        ERROR_CASES
    };
    let params: Vec<(&str, Type)> = func.params().collect();
    match params.as_slice() {
        [(_, Type::Record(record))] => {
            let fields: Vec<(&str, String)> =
                record.fields().map(|f| (f.name, render(&f.ty))).collect();
            compare("`handle`'s event", "field", &fields, EVENT_FIELDS, problems);
        }
        [(name, other)] => problems.push(format!(
            "`handle`'s parameter `{name}` is {}, not record event",
            render(other)
        )),
        _ => problems.push(format!(
            "`handle` takes {} parameters, not one (event: event)",
            params.len()
        )),
    }
    let results: Vec<Type> = func.results().collect();
    match results.as_slice() {
        [Type::Result(result)] => {
            if let Some(ok) = result.ok() {
                problems.push(format!(
                    "`handle` returns result<{}, …>, not result<_, handler-error>",
                    render(&ok)
                ));
            }
            match result.err() {
                Some(Type::Variant(variant)) => {
                    let cases: Vec<(&str, String)> = variant
                        .cases()
                        .map(|c| (c.name, c.ty.as_ref().map(render).unwrap_or_default()))
                        .collect();
                    compare(
                        "`handle`'s handler-error",
                        "case",
                        &cases,
                        error_cases,
                        problems,
                    );
                }
                other => problems.push(format!(
                    "`handle`'s error type is {}, not variant handler-error",
                    other.as_ref().map(render).unwrap_or_else(|| "_".into())
                )),
            }
        }
        [] => problems.push("`handle` returns nothing, not result<_, handler-error>".into()),
        [other] => problems.push(format!(
            "`handle` returns {}, not result<_, handler-error>",
            render(other)
        )),
        _ => problems.push("`handle` returns several values, not result<_, handler-error>".into()),
    }
}

/// Compares named members (record fields, variant cases) with the expected
/// ones, in order, and names each difference.
fn compare(
    what: &str,
    member: &str,
    actual: &[(&str, String)],
    expected: &[(&str, &str)],
    problems: &mut Vec<String>,
) {
    let before = problems.len();
    for (name, ty) in expected {
        match actual.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("{what} lacks the {member} `{name}` ({ty})")),
            Some((_, found)) if found != ty => {
                problems.push(format!("{what} {member} `{name}` is {found}, not {ty}"))
            }
            Some(_) => {}
        }
    }
    for (name, _) in actual {
        if !expected.iter().any(|(n, _)| n == name) {
            problems.push(format!("{what} has an unexpected {member} `{name}`"));
        }
    }
    let order_differs = actual
        .iter()
        .map(|(n, _)| *n)
        .ne(expected.iter().map(|(n, _)| *n));
    if problems.len() == before && order_differs {
        problems.push(format!(
            "{what} {member}s are not in the order of the WIT (wit/handler.wit)"
        ));
    }
}

/// A WIT-like rendering of a type, for comparison and messages.
fn render(ty: &Type) -> String {
    match ty {
        Type::Bool => "bool".into(),
        Type::S8 => "s8".into(),
        Type::U8 => "u8".into(),
        Type::S16 => "s16".into(),
        Type::U16 => "u16".into(),
        Type::S32 => "s32".into(),
        Type::U32 => "u32".into(),
        Type::S64 => "s64".into(),
        Type::U64 => "u64".into(),
        Type::Float32 => "f32".into(),
        Type::Float64 => "f64".into(),
        Type::Char => "char".into(),
        Type::String => "string".into(),
        Type::List(list) => format!("list<{}>", render(&list.ty())),
        Type::Tuple(tuple) => format!(
            "tuple<{}>",
            tuple
                .types()
                .map(|t| render(&t))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Option(option) => format!("option<{}>", render(&option.ty())),
        Type::Result(result) => format!(
            "result<{}, {}>",
            result
                .ok()
                .as_ref()
                .map(render)
                .unwrap_or_else(|| "_".into()),
            result
                .err()
                .as_ref()
                .map(render)
                .unwrap_or_else(|| "_".into())
        ),
        Type::Record(record) => format!(
            "record {{ {} }}",
            record
                .fields()
                .map(|f| format!("{}: {}", f.name, render(&f.ty)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Variant(variant) => format!(
            "variant {{ {} }}",
            variant
                .cases()
                .map(|c| match &c.ty {
                    Some(t) => format!("{}({})", c.name, render(t)),
                    None => c.name.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Type::Enum(e) => format!("enum {{ {} }}", e.names().collect::<Vec<_>>().join(", ")),
        Type::Flags(f) => format!("flags {{ {} }}", f.names().collect::<Vec<_>>().join(", ")),
        other => format!("{other:?}"),
    }
}

fn item_kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) => "a function",
        ComponentItem::CoreFunc(_) => "a core function",
        ComponentItem::Module(_) => "a core module",
        ComponentItem::Component(_) => "a component",
        ComponentItem::ComponentInstance(_) => "an instance",
        ComponentItem::Type(_) => "a type",
        ComponentItem::Resource(_) => "a resource",
    }
}

fn list_or_none(names: &[&str]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The trap of a wasmtime error text ("wasm trap: …"), without the
/// backtrace that precedes it; else its first line.
fn trap_summary(text: &str) -> String {
    match text.find("wasm trap: ") {
        Some(at) => first_line(&text[at..]),
        None => first_line(text),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or(text).to_string()
}

#[cfg(test)]
mod tests;
