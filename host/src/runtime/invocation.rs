//! The store data of one invocation and the host interfaces a guest calls.
//!
//! What a host call does is written once, on [`Invocation`]; each version
//! of the world (`hookmesh:handler@0.1.0`, `@0.2.0`) gets a thin adapter
//! that converts its generated types. The interfaces whose calls did not
//! change between the versions (`types`, `log`, `state`, `mapping`,
//! `config`) share one adapter, stamped out per version by
//! `same_in_every_version!`; what differs — how a failure converts, the
//! emit's result, `handler-error` — is written per version.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::StoreLimits;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::{v0_1, v0_2};
use super::guest_log::{self, Admit, LogBudget};
use super::http::Outbound;
use super::services::{MappingFailure, Revisioned, Services, StateFailure};
use super::{Emit, MAX_EMITS, Verdict};
use crate::manifest::Manifest;
use crate::telemetry::{KeyValue, SpanKind, Trace, clip, names};

/// The longest attribute value taken from a guest (keys, ids, log lines).
const MAX_ATTRIBUTE_BYTES: usize = 256;
/// The longest guest log line kept as a span event.
const MAX_EVENT_BYTES: usize = 2048;

/// The longest state key.
const MAX_KEY_BYTES: usize = 512;
/// The longest system name or id in a mapping.
const MAX_ID_BYTES: usize = 256;

/// The per-invocation store data.
pub(super) struct Invocation {
    /// Built on the guest's first WASI call: most invocations make none,
    /// and building one (environment, clocks, a seeded random source) is
    /// a measurable part of a short invocation.
    pub(super) wasi: Option<WasiCtx>,
    pub(super) table: ResourceTable,
    pub(super) limits: StoreLimits,
    pub(super) http: WasiHttpCtx,
    pub(super) outbound: Outbound,
    pub(super) services: Arc<dyn Services>,
    pub(super) manifest: Arc<Manifest>,
    pub(super) emits: Vec<Emit>,
    /// Why an emit was refused: the invocation cannot succeed then, even
    /// if the guest returns ok.
    pub(super) refused_emit: Option<String>,
    pub(super) correlation_id: String,
    /// The invocation's span (empty when tracing is off).
    pub(super) trace: Trace,
    /// What is left of the invocation's log budget.
    pub(super) log: LogBudget,
}

impl WasiView for Invocation {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let sandbox = &self.manifest.sandbox;
        WasiCtxView {
            ctx: self
                .wasi
                .get_or_insert_with(|| super::sandbox::wasi_ctx(sandbox)),
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Invocation {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Why an emit was refused.
pub(super) enum Refused {
    TooLarge(String),
    TooMany(String),
    Invalid(String),
}

impl Refused {
    fn message(&self) -> &str {
        match self {
            Refused::TooLarge(m) | Refused::TooMany(m) | Refused::Invalid(m) => m,
        }
    }
}

/// What every version's host calls do.
impl Invocation {
    /// Writes a guest's log line within the invocation's budget: `len`
    /// is the message's length, `prefix` its first bytes (see
    /// [`guest_log::prefix`]).
    pub(super) fn log_line(&mut self, level: tracing::Level, len: usize, prefix: &str) {
        match self.log.admit(len, prefix) {
            Admit::Write { keep, cut: 0 } => self.write_log(level, &prefix[..keep]),
            Admit::Write { keep, cut } => self.write_log(
                level,
                &format!("{} … [{cut} more bytes cut]", &prefix[..keep]),
            ),
            Admit::Notice => self.log_notice(),
            Admit::Drop => {}
        }
    }

    /// Counts a line dropped unread, once the budget is spent.
    pub(super) fn log_dropped(&mut self) {
        if self.log.drop_line() == Admit::Notice {
            self.log_notice();
        }
    }

    fn log_notice(&self) {
        let (lines, bytes) = self.log.limits();
        tracing::warn!(
            target: "hookmesh::guest",
            handler = %self.manifest.name,
            correlation_id = %self.correlation_id,
            max_log_lines = lines,
            max_log_bytes = bytes,
            "the handler's log output is truncated: it went past max_log_lines or max_log_bytes \
             for one invocation; the rest of this invocation's log lines are dropped"
        );
    }

    fn write_log(&self, level: tracing::Level, message: &str) {
        let handler = &self.manifest.name;
        let correlation_id = &self.correlation_id;
        self.trace.event(
            || clip(message, MAX_EVENT_BYTES),
            || vec![KeyValue::new("level", level.as_str())],
        );
        match level {
            tracing::Level::TRACE => {
                tracing::trace!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            tracing::Level::DEBUG => {
                tracing::debug!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            tracing::Level::INFO => {
                tracing::info!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            tracing::Level::WARN => {
                tracing::warn!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
            tracing::Level::ERROR => {
                tracing::error!(target: "hookmesh::guest", %handler, %correlation_id, "{message}")
            }
        }
    }

    /// Refuses a value of `len` bytes for `key` before it is read out of
    /// the guest.
    pub(super) fn check_put(&self, key: &str, len: usize) -> Result<(), StateFailure> {
        check_key(key)?;
        let max = self.services.max_value_bytes();
        if len > max {
            return Err(StateFailure::TooLarge(format!(
                "a value of {len} bytes is larger than the {max} bytes the store takes \
                 (NATS max_payload less room for headers); refused before it was sent"
            )));
        }
        Ok(())
    }

    async fn state_get(&mut self, key: &str) -> Result<Option<Revisioned>, StateFailure> {
        check_key(key)?;
        let span = self.host_call(names::STATE_GET, || vec![state_key(key)]);
        let got = self.services.state_get(&self.manifest.name, key).await;
        span.set(|| {
            vec![KeyValue::new(
                "hookmesh.state.found",
                matches!(got, Ok(Some(_))),
            )]
        });
        span.end_with(&got);
        got
    }

    /// A child span of the invocation for a host call.
    fn host_call(&self, name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) -> Trace {
        self.trace.child(name, SpanKind::Internal, attributes)
    }

    pub(super) async fn state_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> Result<u64, StateFailure> {
        self.check_put(key, value.len())?;
        let span = self.host_call(names::STATE_PUT, || {
            vec![
                state_key(key),
                KeyValue::new("hookmesh.state.bytes", value.len() as i64),
            ]
        });
        let put = self
            .services
            .state_put(&self.manifest.name, key, value, expected)
            .await;
        span.end_with(&put);
        put
    }

    async fn state_delete(&mut self, key: &str, expected: Option<u64>) -> Result<(), StateFailure> {
        check_key(key)?;
        let span = self.host_call(names::STATE_DELETE, || vec![state_key(key)]);
        let deleted = self
            .services
            .state_delete(&self.manifest.name, key, expected)
            .await;
        span.end_with(&deleted);
        deleted
    }

    async fn link(
        &mut self,
        system: &str,
        id: &str,
        other_system: &str,
        other_id: &str,
    ) -> Result<(), MappingFailure> {
        for part in [system, id, other_system, other_id] {
            check_id(part)?;
        }
        let span = self.host_call(names::MAPPING_LINK, || {
            vec![
                KeyValue::new("hookmesh.mapping.system", clip(system, MAX_ATTRIBUTE_BYTES)),
                KeyValue::new("hookmesh.mapping.id", clip(id, MAX_ATTRIBUTE_BYTES)),
                KeyValue::new(
                    "hookmesh.mapping.other_system",
                    clip(other_system, MAX_ATTRIBUTE_BYTES),
                ),
            ]
        });
        let linked = self
            .services
            .mapping_link(system, id, other_system, other_id)
            .await;
        span.end_with(&linked);
        linked
    }

    async fn lookup(
        &mut self,
        system: &str,
        id: &str,
        other_system: &str,
    ) -> Result<Option<String>, MappingFailure> {
        for part in [system, id, other_system] {
            check_id(part)?;
        }
        let span = self.host_call(names::MAPPING_LOOKUP, || {
            vec![
                KeyValue::new("hookmesh.mapping.system", clip(system, MAX_ATTRIBUTE_BYTES)),
                KeyValue::new("hookmesh.mapping.id", clip(id, MAX_ATTRIBUTE_BYTES)),
                KeyValue::new(
                    "hookmesh.mapping.other_system",
                    clip(other_system, MAX_ATTRIBUTE_BYTES),
                ),
            ]
        });
        let found = self.services.mapping_lookup(system, id, other_system).await;
        span.set(|| {
            vec![KeyValue::new(
                "hookmesh.mapping.found",
                matches!(found, Ok(Some(_))),
            )]
        });
        span.end_with(&found);
        found
    }

    /// Refuses an emit whose payload has `len` bytes, before the payload
    /// is read out of the guest (and remembers why).
    pub(super) fn check_emit(
        &mut self,
        event_type: &str,
        entity_id: &str,
        len: usize,
    ) -> Result<(), Refused> {
        let max = self.services.max_value_bytes();
        let refused = if self.emits.len() >= MAX_EMITS {
            Refused::TooMany(format!(
                "emitted more than {MAX_EMITS} events in one invocation"
            ))
        } else if len > max {
            Refused::TooLarge(format!(
                "an emit of {len} bytes is larger than the {max} bytes the stream takes \
                 (NATS max_payload less room for headers); refused before it was sent"
            ))
        } else if event_type.is_empty() || entity_id.is_empty() {
            Refused::Invalid("an emit needs a non-empty event type and entity id".into())
        } else {
            return Ok(());
        };
        self.refused_emit
            .get_or_insert_with(|| refused.message().to_string());
        Err(refused)
    }

    /// Buffers an emit, or refuses it (and remembers why).
    pub(super) fn emit(
        &mut self,
        event_type: String,
        entity_id: String,
        payload: Vec<u8>,
    ) -> Result<(), Refused> {
        let checked = self.check_emit(&event_type, &entity_id, payload.len());
        let span = self.host_call(names::EMIT, || {
            vec![
                KeyValue::new(
                    "hookmesh.event_type",
                    clip(&event_type, MAX_ATTRIBUTE_BYTES),
                ),
                KeyValue::new("hookmesh.entity", clip(&entity_id, MAX_ATTRIBUTE_BYTES)),
                KeyValue::new("hookmesh.emit.index", self.emits.len() as i64),
            ]
        });
        if let Err(refused) = &checked {
            span.fail(|| refused.message().to_string());
        }
        span.end();
        checked?;
        self.emits.push(Emit {
            event_type,
            entity_id,
            payload,
        });
        Ok(())
    }

    fn config_get(&self, key: &str) -> Option<String> {
        self.manifest.config.get(key).cloned()
    }

    fn config_all(&self) -> Vec<(String, String)> {
        self.manifest.config.clone().into_iter().collect()
    }
}

/// The attribute naming a state key.
fn state_key(key: &str) -> KeyValue {
    KeyValue::new("hookmesh.state.key", clip(key, MAX_ATTRIBUTE_BYTES))
}

fn check_key(key: &str) -> Result<(), StateFailure> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StateFailure::InvalidKey(format!(
            "a key must have 1 to {MAX_KEY_BYTES} bytes, this one has {}",
            key.len()
        )));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), MappingFailure> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(MappingFailure::InvalidId(format!(
            "system names and ids must have 1 to {MAX_ID_BYTES} bytes, got {}",
            id.len()
        )));
    }
    Ok(())
}

/// The adapters of the interfaces whose calls are the same in every
/// version, and the event record, for version module `$v` (each version
/// converts [`StateFailure`] its own way).
macro_rules! same_in_every_version {
    ($v:ident) => {
        impl $v::hookmesh::handler::types::Host for Invocation {}

        impl $v::hookmesh::handler::log::Host for Invocation {
            async fn log(&mut self, level: $v::hookmesh::handler::log::Level, message: String) {
                use $v::hookmesh::handler::log::Level;
                let level = match level {
                    Level::Trace => tracing::Level::TRACE,
                    Level::Debug => tracing::Level::DEBUG,
                    Level::Info => tracing::Level::INFO,
                    Level::Warn => tracing::Level::WARN,
                    Level::Error => tracing::Level::ERROR,
                };
                self.log_line(level, message.len(), guest_log::prefix(&message));
            }
        }

        impl $v::hookmesh::handler::mapping::Host for Invocation {
            async fn link(
                &mut self,
                system: String,
                id: String,
                other_system: String,
                other_id: String,
            ) -> Result<(), $v::hookmesh::handler::mapping::MappingError> {
                Invocation::link(self, &system, &id, &other_system, &other_id)
                    .await
                    .map_err(Into::into)
            }

            async fn lookup(
                &mut self,
                system: String,
                id: String,
                other_system: String,
            ) -> Result<Option<String>, $v::hookmesh::handler::mapping::MappingError> {
                Invocation::lookup(self, &system, &id, &other_system)
                    .await
                    .map_err(Into::into)
            }
        }

        impl From<MappingFailure> for $v::hookmesh::handler::mapping::MappingError {
            fn from(failure: MappingFailure) -> Self {
                use $v::hookmesh::handler::mapping::MappingError;
                match failure {
                    MappingFailure::Conflict(m) => MappingError::Conflict(m),
                    MappingFailure::InvalidId(m) => MappingError::InvalidId(m),
                    MappingFailure::Unavailable(m) => MappingError::Unavailable(m),
                }
            }
        }

        impl $v::hookmesh::handler::state::Host for Invocation {
            async fn get(
                &mut self,
                key: String,
            ) -> Result<
                Option<$v::hookmesh::handler::state::Entry>,
                $v::hookmesh::handler::state::StateError,
            > {
                let found = self
                    .state_get(&key)
                    .await
                    .map_err($v::hookmesh::handler::state::StateError::from)?;
                Ok(found.map(|r| $v::hookmesh::handler::state::Entry {
                    value: r.value,
                    revision: r.revision,
                }))
            }

            async fn put(
                &mut self,
                key: String,
                value: Vec<u8>,
                expected: Option<u64>,
            ) -> Result<u64, $v::hookmesh::handler::state::StateError> {
                self.state_put(&key, value, expected)
                    .await
                    .map_err(Into::into)
            }

            async fn delete(
                &mut self,
                key: String,
                expected: Option<u64>,
            ) -> Result<(), $v::hookmesh::handler::state::StateError> {
                self.state_delete(&key, expected).await.map_err(Into::into)
            }
        }

        impl $v::hookmesh::handler::config::Host for Invocation {
            async fn get(&mut self, key: String) -> Option<String> {
                self.config_get(&key)
            }

            async fn get_all(&mut self) -> Vec<(String, String)> {
                self.config_all()
            }
        }
    };
}

same_in_every_version!(v0_1);
same_in_every_version!(v0_2);

// 0.2.0: `too-large`, an emit result, a retry-after on `transient`.

impl From<StateFailure> for v0_2::hookmesh::handler::state::StateError {
    fn from(failure: StateFailure) -> Self {
        use v0_2::hookmesh::handler::state::StateError;
        match failure {
            StateFailure::StaleRevision => StateError::StaleRevision,
            StateFailure::InvalidKey(m) => StateError::InvalidKey(m),
            StateFailure::Unavailable(m) => StateError::Unavailable(m),
            StateFailure::TooLarge(m) => StateError::TooLarge(m),
        }
    }
}

impl v0_2::hookmesh::handler::outbox::Host for Invocation {
    async fn emit(
        &mut self,
        event_type: String,
        entity_id: String,
        payload: Vec<u8>,
    ) -> Result<(), v0_2::hookmesh::handler::outbox::OutboxError> {
        Invocation::emit(self, event_type, entity_id, payload).map_err(Into::into)
    }
}

impl From<Refused> for v0_2::hookmesh::handler::outbox::OutboxError {
    fn from(refused: Refused) -> Self {
        use v0_2::hookmesh::handler::outbox::OutboxError;
        match refused {
            Refused::TooLarge(m) => OutboxError::TooLarge(m),
            Refused::TooMany(m) => OutboxError::TooMany(m),
            Refused::Invalid(m) => OutboxError::Invalid(m),
        }
    }
}

impl From<v0_2::hookmesh::handler::types::HandlerError> for Verdict {
    fn from(error: v0_2::hookmesh::handler::types::HandlerError) -> Verdict {
        use v0_2::hookmesh::handler::types::HandlerError;
        match error {
            HandlerError::Transient(t) => Verdict::Transient {
                reason: t.reason,
                retry_after: t.retry_after_ms.map(Duration::from_millis),
            },
            HandlerError::Permanent(reason) => Verdict::Permanent(reason),
            HandlerError::NeedsHuman(reason) => Verdict::NeedsHuman(reason),
        }
    }
}

// 0.1.0, frozen: a value too large is an `invalid-key` there (the class a
// 0.1.0 guest treats as permanent); an emit cannot be refused to the guest,
// so a refused one fails the invocation.

impl From<StateFailure> for v0_1::hookmesh::handler::state::StateError {
    fn from(failure: StateFailure) -> Self {
        use v0_1::hookmesh::handler::state::StateError;
        match failure {
            StateFailure::StaleRevision => StateError::StaleRevision,
            StateFailure::InvalidKey(m) | StateFailure::TooLarge(m) => StateError::InvalidKey(m),
            StateFailure::Unavailable(m) => StateError::Unavailable(m),
        }
    }
}

impl v0_1::hookmesh::handler::outbox::Host for Invocation {
    async fn emit(&mut self, event_type: String, entity_id: String, payload: Vec<u8>) {
        let _refused = Invocation::emit(self, event_type, entity_id, payload);
    }
}

impl From<v0_1::hookmesh::handler::types::HandlerError> for Verdict {
    fn from(error: v0_1::hookmesh::handler::types::HandlerError) -> Verdict {
        use v0_1::hookmesh::handler::types::HandlerError;
        match error {
            HandlerError::Transient(reason) => Verdict::Transient {
                reason,
                retry_after: None,
            },
            HandlerError::Permanent(reason) => Verdict::Permanent(reason),
            HandlerError::NeedsHuman(reason) => Verdict::NeedsHuman(reason),
        }
    }
}
