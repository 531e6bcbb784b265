//! Whether each relay reaches its database, for `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Where one relay stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayState {
    /// Not connected yet.
    Connecting,
    /// Connected (relaying, or standing by behind another relay).
    Connected,
    /// The database cannot be reached, or the relay cannot work there (no
    /// table, say); the reason.
    Unreachable(String),
}

/// The state of every relay of a host; cheap to clone. A std `Mutex`: it
/// is held only to read or replace one entry, never across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct Health {
    relays: Arc<Mutex<BTreeMap<String, (String, RelayState)>>>,
}

impl Health {
    /// Records the state of `source`'s relay on `database` (as described,
    /// without password).
    pub fn set(&self, source: &str, database: &str, state: RelayState) {
        self.relays
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(source.to_string(), (database.to_string(), state));
    }

    /// Why the host is not ready because of a relay, one line per relay
    /// whose database it does not reach; empty when all do.
    pub fn problems(&self) -> Vec<String> {
        let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        relays
            .iter()
            .filter_map(|(source, (database, state))| match state {
                RelayState::Connected => None,
                RelayState::Connecting => Some(format!(
                    "outbox {source}: database {database}: not connected yet"
                )),
                RelayState::Unreachable(reason) => {
                    Some(format!("outbox {source}: database {database}: {reason}"))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_the_source_and_database_until_connected() {
        let health = Health::default();
        assert!(health.problems().is_empty());
        health.set("erp", "erp@db:5432/erp", RelayState::Connecting);
        health.set(
            "wms",
            "db:5432/wms",
            RelayState::Unreachable("connection refused".into()),
        );
        assert_eq!(
            health.problems(),
            [
                "outbox erp: database erp@db:5432/erp: not connected yet",
                "outbox wms: database db:5432/wms: connection refused"
            ]
        );
        health.set("erp", "erp@db:5432/erp", RelayState::Connected);
        health.set("wms", "db:5432/wms", RelayState::Connected);
        assert!(health.problems().is_empty());
    }
}
