//! The handler services over NATS KV: `hook_state` (per handler, with
//! revisions) and `hook_mappings` (shared, create-only).

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::future::BoxFuture;

use super::DispatchError;
use crate::extract::kv_key;
use crate::runtime::services::storable_bytes;
use crate::runtime::{MappingFailure, Revisioned, Services, StateFailure};
use crate::streams::{MAPPINGS_BUCKET, STATE_BUCKET};

/// State and mappings in NATS.
#[derive(Debug, Clone)]
pub struct NatsServices {
    state: kv::Store,
    mappings: kv::Store,
    client: async_nats::Client,
}

impl NatsServices {
    /// Opens the buckets (they must exist: `streams::apply` makes them).
    pub async fn open(js: &jetstream::Context) -> Result<Self, DispatchError> {
        let open = |bucket: &'static str| async move {
            js.get_key_value(bucket)
                .await
                .map_err(|e| DispatchError::nats(format!("KV bucket {bucket}"), e))
        };
        Ok(NatsServices {
            state: open(STATE_BUCKET).await?,
            mappings: open(MAPPINGS_BUCKET).await?,
            client: js.client(),
        })
    }
}

/// `<handler>.<key>`, each part KV-key encoded, so handlers never see each
/// other's keys and any key text is valid.
fn state_key(handler: &str, key: &str) -> String {
    format!("{}.{}", kv_key(handler), kv_key(key))
}

/// `<system>.<id>.<other system>`.
fn mapping_key(system: &str, id: &str, other_system: &str) -> String {
    format!("{}.{}.{}", kv_key(system), kv_key(id), kv_key(other_system))
}

fn unavailable(e: impl std::fmt::Display) -> StateFailure {
    StateFailure::Unavailable(e.to_string())
}

impl Services for NatsServices {
    /// From the `max_payload` of the server the host is connected to now.
    fn max_value_bytes(&self) -> usize {
        storable_bytes(self.client.max_payload())
    }

    fn state_get<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Revisioned>, StateFailure>> {
        Box::pin(async move {
            let entry = self
                .state
                .entry(state_key(handler, key))
                .await
                .map_err(unavailable)?;
            Ok(entry
                .filter(|e| e.operation == kv::Operation::Put)
                .map(|e| Revisioned {
                    value: e.value.to_vec(),
                    revision: e.revision,
                }))
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
            let key = state_key(handler, key);
            match expected {
                None => self
                    .state
                    .create(&key, Bytes::from(value))
                    .await
                    .map_err(|e| match e.kind() {
                        kv::CreateErrorKind::AlreadyExists => StateFailure::StaleRevision,
                        _ => unavailable(e),
                    }),
                Some(revision) => self
                    .state
                    .update(&key, Bytes::from(value), revision)
                    .await
                    .map_err(|e| match e.kind() {
                        kv::UpdateErrorKind::WrongLastRevision => StateFailure::StaleRevision,
                        _ => unavailable(e),
                    }),
            }
        })
    }

    fn state_delete<'a>(
        &'a self,
        handler: &'a str,
        key: &'a str,
        expected: Option<u64>,
    ) -> BoxFuture<'a, Result<(), StateFailure>> {
        Box::pin(async move {
            self.state
                .delete_expect_revision(state_key(handler, key), expected)
                .await
                .map_err(|e| match e.kind() {
                    // A delete is an update: the server's wrong last
                    // sequence comes back as a wrong revision.
                    kv::UpdateErrorKind::WrongLastRevision => StateFailure::StaleRevision,
                    _ => unavailable(e),
                })
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
            // Forward first, then backward; both are create-only and a
            // repeat of the same link is a no-op, so a handler retried
            // after a crash between the two completes the pair.
            self.link_one(system, id, other_system, other_id).await?;
            self.link_one(other_system, other_id, system, id).await
        })
    }

    fn mapping_lookup<'a>(
        &'a self,
        system: &'a str,
        id: &'a str,
        other_system: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, MappingFailure>> {
        Box::pin(async move { self.linked(&mapping_key(system, id, other_system)).await })
    }
}

impl NatsServices {
    /// The id stored under a mapping key.
    async fn linked(&self, key: &str) -> Result<Option<String>, MappingFailure> {
        let value = self
            .mappings
            .get(key)
            .await
            .map_err(|e| MappingFailure::Unavailable(e.to_string()))?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    async fn link_one(
        &self,
        system: &str,
        id: &str,
        other_system: &str,
        other_id: &str,
    ) -> Result<(), MappingFailure> {
        let key = mapping_key(system, id, other_system);
        match self
            .mappings
            .create(&key, Bytes::copy_from_slice(other_id.as_bytes()))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let existing = self.linked(&key).await?;
                match existing {
                    Some(existing) if existing == other_id => Ok(()),
                    Some(existing) => Err(MappingFailure::Conflict(format!(
                        "{system}:{id} is already linked to {other_system}:{existing}"
                    ))),
                    None => Err(MappingFailure::Unavailable(format!(
                        "{key} vanished while linking"
                    ))),
                }
            }
            Err(e) => Err(MappingFailure::Unavailable(e.to_string())),
        }
    }
}
