//! Real PostgreSQL databases for tests and benchmarks.
//!
//! Every [`TestDatabase`] is a fresh database on the machine's cluster
//! (`$HOOKMESH_TEST_PG`, default `postgres://postgres@127.0.0.1:5432/postgres`,
//! the maintenance database of a trust-auth cluster), so tests run in
//! parallel without sharing tables. Dropping it drops the database and ends
//! its sessions. Databases left by a test process that was killed are
//! dropped by the next one that creates a database.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Every test database's name starts with this.
const PREFIX: &str = "hookmesh_test_";

/// Why a test database could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// The cluster did not answer or refused.
    #[error(
        "PostgreSQL at {url}: {source} (scripts/test.sh starts the cluster; \
         HOOKMESH_TEST_PG names another)"
    )]
    Postgres {
        /// The maintenance URL used.
        url: String,
        /// The client's error.
        source: tokio_postgres::Error,
    },
    /// No thread or runtime to talk to the cluster from.
    #[error("cannot run the PostgreSQL client: {0}")]
    Runtime(#[from] std::io::Error),
}

/// A database of its own for one test; dropped with it.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    admin_url: String,
    url: String,
}

impl TestDatabase {
    /// Creates a fresh, empty database.
    pub fn create() -> Result<TestDatabase, DatabaseError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let admin_url = admin_url();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "{PREFIX}{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let statement = format!("CREATE DATABASE \"{name}\"");
        blocking(&admin_url, move |client| async move {
            drop_orphans(&client).await?;
            client.batch_execute(&statement).await
        })?;
        let url = with_database(&admin_url, &name);
        Ok(TestDatabase {
            name,
            admin_url,
            url,
        })
    }

    /// Its connection URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let _ = blocking(&self.admin_url, move |client| async move {
            client.batch_execute(&statement).await
        });
    }
}

/// The maintenance URL: `$HOOKMESH_TEST_PG` or the local trust-auth cluster.
pub fn admin_url() -> String {
    std::env::var("HOOKMESH_TEST_PG")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|j| start + j))
        .unwrap_or(base.len());
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// Drops the test databases of processes that are gone (killed tests).
async fn drop_orphans(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT datname::text FROM pg_database WHERE starts_with(datname, $1)",
            &[&PREFIX],
        )
        .await?;
    for row in rows {
        let name: String = row.get(0);
        let pid = name[PREFIX.len()..].split('_').next().unwrap_or_default();
        let alive = std::path::Path::new("/proc").join(pid).exists();
        if !alive {
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await;
        }
    }
    Ok(())
}

/// Runs `work` with a client of `url` on a thread of its own, so it can be
/// called from sync code, `Drop` and async tests alike.
fn blocking<F, Fut>(url: &str, work: F) -> Result<(), DatabaseError>
where
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    let url = url.to_string();
    let thread = std::thread::spawn(move || -> Result<(), DatabaseError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let failed = |source| DatabaseError::Postgres {
                url: url.clone(),
                source,
            };
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .map_err(failed)?;
            let driver = tokio::spawn(connection);
            let result = work(client).await.map_err(failed);
            driver.abort();
            result
        })
    });
    thread
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the client thread panicked").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gets_the_test_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "t1"),
            "postgres://postgres@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h/postgres?sslmode=disable", "t2"),
            "postgres://u:p@h/t2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t3"), "postgres://h:1/t3");
    }

    #[test]
    fn a_database_exists_while_its_handle_lives() {
        let db = TestDatabase::create().expect("PostgreSQL reachable");
        let name = db.name().to_string();
        let exists = |name: String| {
            let found = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = found.clone();
            blocking(&admin_url(), move |client| async move {
                let row = client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                    .await?;
                seen.store(row.is_some(), Ordering::SeqCst);
                Ok(())
            })
            .expect("query");
            found.load(Ordering::SeqCst)
        };
        assert!(exists(name.clone()));
        drop(db);
        assert!(!exists(name), "dropped with its handle");
    }
}
