//! What a handler can reach outside its sandbox, as traits the dispatcher
//! implements over NATS — the runtime itself knows nothing of NATS, so it is
//! tested with the in-memory implementation below.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::future::BoxFuture;

/// A failed state operation, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFailure {
    /// The expected revision is not the current one.
    #[error("stale revision")]
    StaleRevision,
    /// The key is unusable.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The store could not be reached.
    #[error("state unavailable: {0}")]
    Unavailable(String),
    /// The value is larger than the store takes.
    #[error("too large: {0}")]
    TooLarge(String),
}

/// The room kept free in a message for its headers when a value is
/// checked against what NATS takes.
pub const HEADER_ROOM: usize = 8 << 10;

/// The largest value (a state value, an emit's payload) a message can
/// carry on a server whose `max_payload` is `max_payload`: what the
/// server takes, less room for the headers. The one rule for every value
/// a guest hands the host to store.
pub fn storable_bytes(max_payload: usize) -> usize {
    max_payload.saturating_sub(HEADER_ROOM)
}

/// nats-server's default `max_payload` (1 MiB), which [`MemoryServices`]
/// stands in for.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;

/// A failed mapping operation, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingFailure {
    /// The id is linked to another id already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A system name or id is unusable.
    #[error("invalid id: {0}")]
    InvalidId(String),
    /// The store could not be reached.
    #[error("mapping unavailable: {0}")]
    Unavailable(String),
}

/// A state value and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revisioned {
    /// The value.
    pub value: Vec<u8>,
    /// Its revision (pass it back to replace exactly this value).
    pub revision: u64,
}

/// State and mapping for handlers. `handler` namespaces state: a handler
/// sees only its own keys.
pub trait Services: Send + Sync + 'static {
    /// The largest state value or emit payload the store takes (see
    /// [`storable_bytes`]); the runtime refuses larger ones before they
    /// are sent anywhere.
    fn max_value_bytes(&self) -> usize;

    /// Reads a state key: value and revision.
    fn state_get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Revisioned>, StateFailure>>;

    /// Writes a state key if its revision is `expected` (`None`: create).
    fn state_put<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StateFailure>>;

    /// Deletes a state key if its revision is `expected` (`None`: any).
    fn state_delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StateFailure>>;

    /// Links two ids, create-only, both directions.
    fn mapping_link<'a>(
        &'a self,
        system: &'a str,
        id: &'a str,
        other_system: &'a str,
        other_id: &'a str,
    ) -> BoxFuture<'a, Result<(), MappingFailure>>;

    /// Looks up the id linked to `id` in `other_system`.
    fn mapping_lookup<'a>(
        &'a self,
        system: &'a str,
        id: &'a str,
        other_system: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, MappingFailure>>;
}

/// Services kept in memory, with the same semantics as the NATS-backed
/// ones (revisions, create-only links) — for tests and benchmarks of the
/// runtime alone.
#[derive(Debug, Default)]
pub struct MemoryServices {
    state: Mutex<BTreeMap<(String, String), Revisioned>>,
    links: Mutex<BTreeMap<(String, String, String), String>>,
    revision: Mutex<u64>,
}

impl MemoryServices {
    fn next_revision(&self) -> u64 {
        let mut revision = self.revision.lock().unwrap_or_else(|e| e.into_inner());
        *revision += 1;
        *revision
    }

    /// A state value, for assertions.
    pub fn state_value(&self, handler: &str, key: &str) -> Option<Vec<u8>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state
            .get(&(handler.to_string(), key.to_string()))
            .map(|r| r.value.clone())
    }
}

impl Services for MemoryServices {
    fn max_value_bytes(&self) -> usize {
        storable_bytes(DEFAULT_MAX_PAYLOAD)
    }

    fn state_get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Revisioned>, StateFailure>> {
        Box::pin(async move {
            let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            Ok(state.get(&(handler.to_string(), key.to_string())).cloned())
        })
    }

    fn state_put<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        value: Vec<u8>,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<u64, StateFailure>> {
        Box::pin(async move {
            let revision = self.next_revision();
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (handler.to_string(), key.to_string());
            if state.get(&slot).map(|r| r.revision) != expected {
                return Err(StateFailure::StaleRevision);
            }
            state.insert(slot, Revisioned { value, revision });
            Ok(revision)
        })
    }

    fn state_delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StateFailure>> {
        Box::pin(async move {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let slot = (handler.to_string(), key.to_string());
            match (state.get(&slot).map(|r| r.revision), expected) {
                (Some(current), Some(expected)) if current != expected => {
                    Err(StateFailure::StaleRevision)
                }
                _ => {
                    state.remove(&slot);
                    Ok(())
                }
            }
        })
    }

    fn mapping_link<'a>(
        &'a self,
        system: &'a str,
        id: &'a str,
        other_system: &'a str,
        other_id: &'a str,
    ) -> BoxFuture<'a, Result<(), MappingFailure>> {
        Box::pin(async move {
            let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            let forward = (system.to_string(), id.to_string(), other_system.to_string());
            let backward = (
                other_system.to_string(),
                other_id.to_string(),
                system.to_string(),
            );
            for (key, value) in [(&forward, other_id), (&backward, id)] {
                if let Some(existing) = links.get(key).filter(|v| v.as_str() != value) {
                    return Err(MappingFailure::Conflict(format!(
                        "{}:{} is linked to {}:{existing}",
                        key.0, key.1, key.2
                    )));
                }
            }
            links.insert(forward, other_id.to_string());
            links.insert(backward, id.to_string());
            Ok(())
        })
    }

    fn mapping_lookup<'a>(
        &'a self,
        system: &'a str,
        id: &'a str,
        other_system: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, MappingFailure>> {
        Box::pin(async move {
            let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
            Ok(links
                .get(&(system.to_string(), id.to_string(), other_system.to_string()))
                .cloned())
        })
    }
}
