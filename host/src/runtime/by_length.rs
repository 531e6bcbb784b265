//! The imports that take a guest's bulk data — `log`'s message,
//! `state.put`'s value, `outbox.emit`'s payload — defined over views of
//! the guest's memory ([`WasmStr`], [`WasmList`]) instead of the owned
//! copies the generated bindings lift. Their length is checked first: a
//! 64 MiB value the store cannot take is refused without a byte of it
//! leaving the guest, and a log line past the budget is never read.
//!
//! They shadow the generated definitions in the linker (same names, same
//! types); the generated trait methods stay, behaving the same, for
//! whatever calls them directly.

use wasmtime::StoreContextMut;
use wasmtime::component::{Linker, WasmList, WasmStr};

use super::bindings::{v0_1, v0_2};
use super::guest_log;
use super::invocation::Invocation;

/// Defines, over the generated ones, the length-first `log`, `state.put`
/// and `outbox.emit` of both versions of the world.
pub(super) fn shadow(linker: &mut Linker<Invocation>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let defined = define(linker);
    linker.allow_shadowing(false);
    defined
}

/// The guest's text: no more than [`guest_log::prefix`] of it is copied.
fn log_message(
    store: &mut StoreContextMut<'_, Invocation>,
    level: tracing::Level,
    message: &WasmStr,
) -> wasmtime::Result<()> {
    if store.data().log.spent() {
        store.data_mut().log_dropped();
        return Ok(());
    }
    let (len, prefix) = {
        let text = message.to_str(&*store)?;
        (text.len(), guest_log::prefix(&text).to_string())
    };
    store.data_mut().log_line(level, len, &prefix);
    Ok(())
}

macro_rules! level {
    ($v:ident, $level:expr) => {{
        use $v::hookmesh::handler::log::Level;
        match $level {
            Level::Trace => tracing::Level::TRACE,
            Level::Debug => tracing::Level::DEBUG,
            Level::Info => tracing::Level::INFO,
            Level::Warn => tracing::Level::WARN,
            Level::Error => tracing::Level::ERROR,
        }
    }};
}

/// `log` and `state.put` are the same in both versions.
macro_rules! log_and_put {
    ($linker:expr, $v:ident, $version:literal) => {{
        use $v::hookmesh::handler::log::Level;
        use $v::hookmesh::handler::state::StateError;
        $linker
            .instance(concat!("hookmesh:handler/log@", $version))?
            .func_wrap_async(
                "log",
                |mut store: StoreContextMut<'_, Invocation>, (level, message): (Level, WasmStr)| {
                    Box::new(async move {
                        log_message(&mut store, level!($v, level), &message)?;
                        Ok(())
                    })
                },
            )?;
        $linker
            .instance(concat!("hookmesh:handler/state@", $version))?
            .func_wrap_async(
                "put",
                |mut store: StoreContextMut<'_, Invocation>,
                 (key, value, expected): (String, WasmList<u8>, Option<u64>)| {
                    Box::new(async move {
                        if let Err(refused) = store.data().check_put(&key, value.len()) {
                            return Ok((Err(StateError::from(refused)),));
                        }
                        let bytes = value.as_le_slice(&store).to_vec();
                        let put = store.data_mut().state_put(&key, bytes, expected).await;
                        Ok((put.map_err(StateError::from),))
                    })
                },
            )?;
    }};
}

fn define(linker: &mut Linker<Invocation>) -> wasmtime::Result<()> {
    log_and_put!(linker, v0_2, "0.2.0");
    log_and_put!(linker, v0_1, "0.1.0");
    linker
        .instance("hookmesh:handler/outbox@0.2.0")?
        .func_wrap_async(
            "emit",
            |mut store: StoreContextMut<'_, Invocation>,
             (event_type, entity_id, payload): (String, String, WasmList<u8>)| {
                Box::new(async move {
                    use v0_2::hookmesh::handler::outbox::OutboxError;
                    let emitted =
                        match store
                            .data_mut()
                            .check_emit(&event_type, &entity_id, payload.len())
                        {
                            Err(refused) => Err(OutboxError::from(refused)),
                            Ok(()) => {
                                let bytes = payload.as_le_slice(&store).to_vec();
                                store
                                    .data_mut()
                                    .emit(event_type, entity_id, bytes)
                                    .map_err(OutboxError::from)
                            }
                        };
                    Ok((emitted,))
                })
            },
        )?;
    // 0.1.0's emit returns nothing: a refused emit fails the invocation
    // when it returns (see `Invocation::refused_emit`).
    linker
        .instance("hookmesh:handler/outbox@0.1.0")?
        .func_wrap_async(
            "emit",
            |mut store: StoreContextMut<'_, Invocation>,
             (event_type, entity_id, payload): (String, String, WasmList<u8>)| {
                Box::new(async move {
                    if store
                        .data_mut()
                        .check_emit(&event_type, &entity_id, payload.len())
                        .is_ok()
                    {
                        let bytes = payload.as_le_slice(&store).to_vec();
                        let _refused = store.data_mut().emit(event_type, entity_id, bytes);
                    }
                    Ok(())
                })
            },
        )?;
    Ok(())
}
