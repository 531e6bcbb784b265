//! The relay's SQL, prepared once per session: which rows are due, marking
//! them published, counting failed attempts, leadership, the gauges — and
//! putting failed rows back (`hookmesh outbox retry --failed`).

use std::time::Duration;

use tokio_postgres::{Client, GenericClient, Statement};

use super::row::OutboxRow;
use super::table::{TableName, lock_key};

/// The relay's statements on one table, prepared on one session.
#[derive(Debug)]
pub struct Queries {
    due: Statement,
    published: Statement,
    failed: Statement,
    lead: Statement,
    stats: Statement,
}

/// One failed attempt to record.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The row.
    pub id: i64,
    /// How long it waits before the next attempt.
    pub delay: Duration,
    /// `failed` now, whatever the attempt count.
    pub fatal: bool,
}

/// A row's state after a failed attempt was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The row.
    pub id: i64,
    /// Attempts so far.
    pub attempts: i32,
    /// It is `failed` now (else `pending`, backing off).
    pub failed: bool,
}

/// What the gauges show.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Rows `pending`.
    pub pending: i64,
    /// Rows `failed`.
    pub failed: i64,
    /// Age of the oldest pending row (zero when none).
    pub oldest_pending: Duration,
}

impl Queries {
    /// Prepares the statements for `table`.
    pub async fn prepare(
        client: &Client,
        table: &TableName,
    ) -> Result<Queries, tokio_postgres::Error> {
        let t = table.sql();
        let due = due_sql(table);
        let published = format!(
            "UPDATE {t} SET status = 'published', published_at = now() \
             WHERE id = ANY($1::bigint[]) AND status = 'pending'"
        );
        let failed = format!(
            "UPDATE {t} AS o SET \
                 attempts = o.attempts + 1, \
                 status = CASE WHEN f.fatal OR o.attempts + 1 >= $4::int4 THEN 'failed' ELSE 'pending' END, \
                 next_attempt_at = now() + f.delay_ms * interval '1 millisecond' \
             FROM unnest($1::bigint[], $2::float8[], $3::bool[]) AS f(id, delay_ms, fatal) \
             WHERE o.id = f.id AND o.status = 'pending' \
             RETURNING o.id::bigint, o.attempts::int4, o.status = 'failed'"
        );
        let stats = format!(
            "SELECT count(*) FILTER (WHERE status = 'pending'), \
                    count(*) FILTER (WHERE status = 'failed'), \
                    coalesce(greatest(extract(epoch FROM now() - min(created_at) \
                        FILTER (WHERE status = 'pending')), 0), 0)::float8 \
             FROM {t} WHERE status <> 'published'"
        );
        Ok(Queries {
            due: client.prepare(&due).await?,
            published: client.prepare(&published).await?,
            failed: client.prepare(&failed).await?,
            lead: client
                .prepare(&format!(
                    "SELECT pg_try_advisory_lock({})",
                    lock_key("relay", table)
                ))
                .await?,
            stats: client.prepare(&stats).await?,
        })
    }

    /// Up to `limit` due rows, in `id` order.
    pub async fn due(
        &self,
        client: &Client,
        limit: u32,
    ) -> Result<Vec<OutboxRow>, tokio_postgres::Error> {
        let rows = client.query(&self.due, &[&i64::from(limit)]).await?;
        Ok(rows
            .iter()
            .map(|row| OutboxRow {
                id: row.get(0),
                aggregate_type: row.get(1),
                aggregate_id: row.get(2),
                event_type: row.get(3),
                payload: row.get(4),
                correlation_id: row.get(5),
                idempotency_key: row.get(6),
                attempts: row.get(7),
                created_at: row.get(8),
                age: Duration::try_from_secs_f64(row.get(9)).unwrap_or_default(),
            })
            .collect())
    }

    /// Marks rows `published` (now); returns how many were pending.
    pub async fn mark_published(
        &self,
        client: &Client,
        ids: &[i64],
    ) -> Result<u64, tokio_postgres::Error> {
        if ids.is_empty() {
            return Ok(0);
        }
        client.execute(&self.published, &[&ids]).await
    }

    /// Counts a failed attempt for each row: backs it off by its delay, or
    /// makes it `failed` when it is fatal or at `max_attempts`.
    pub async fn record_failures(
        &self,
        client: &Client,
        failures: &[Failure],
        max_attempts: u32,
    ) -> Result<Vec<Recorded>, tokio_postgres::Error> {
        if failures.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = failures.iter().map(|f| f.id).collect();
        let delays: Vec<f64> = failures
            .iter()
            .map(|f| f.delay.as_secs_f64() * 1000.0)
            .collect();
        let fatal: Vec<bool> = failures.iter().map(|f| f.fatal).collect();
        let max = i32::try_from(max_attempts).unwrap_or(i32::MAX);
        let rows = client
            .query(&self.failed, &[&ids, &delays, &fatal, &max])
            .await?;
        Ok(rows
            .iter()
            .map(|row| Recorded {
                id: row.get(0),
                attempts: row.get(1),
                failed: row.get(2),
            })
            .collect())
    }

    /// Takes the table's relay lock for this session, if no other session
    /// holds it. It is held until the session ends.
    pub async fn try_lead(&self, client: &Client) -> Result<bool, tokio_postgres::Error> {
        Ok(client.query_one(&self.lead, &[]).await?.get(0))
    }

    /// The counts and age the gauges show.
    pub async fn stats(&self, client: &Client) -> Result<Stats, tokio_postgres::Error> {
        let row = client.query_one(&self.stats, &[]).await?;
        Ok(Stats {
            pending: row.get(0),
            failed: row.get(1),
            oldest_pending: Duration::try_from_secs_f64(row.get(2)).unwrap_or_default(),
        })
    }
}

/// The query of the due rows of `table` (`$1`: how many at most): what the
/// relay runs each round, and what its indexes are made for.
pub fn due_sql(table: &TableName) -> String {
    let t = table.sql();
    // A row is due when it is pending, its time has come, and no
    // earlier row of its aggregate holds it back: one that failed, or
    // that waits out a backoff. Earlier rows that are merely pending
    // come first in `id` order, in this batch or before it.
    format!(
        "WITH held AS ( \
             SELECT aggregate_type, aggregate_id, min(id) AS first_id FROM {t} \
             WHERE status = 'failed' OR (status = 'pending' AND next_attempt_at > now()) \
             GROUP BY aggregate_type, aggregate_id \
         ) \
         SELECT o.id::bigint, o.aggregate_type::text, o.aggregate_id::text, o.event_type::text, \
                o.payload_json::text, o.correlation_id::text, o.idempotency_key::text, \
                o.attempts::int4, o.created_at, \
                greatest(extract(epoch FROM now() - o.created_at), 0)::float8 \
         FROM {t} o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() \
           AND NOT EXISTS ( \
               SELECT 1 FROM held h \
               WHERE h.aggregate_type = o.aggregate_type AND h.aggregate_id = o.aggregate_id \
                 AND h.first_id < o.id) \
         ORDER BY o.id \
         LIMIT $1"
    )
}

/// Puts `failed` rows back to `pending` with their attempts reset — all of
/// them, or those of `ids` — and wakes the relays. Returns the rows, in
/// `id` order.
pub async fn retry_failed(
    client: &impl GenericClient,
    table: &TableName,
    ids: Option<&[i64]>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let t = table.sql();
    let rows = client
        .query(
            &format!(
                "UPDATE {t} SET status = 'pending', attempts = 0, next_attempt_at = now() \
                 WHERE status = 'failed' AND ($1::bigint[] IS NULL OR id = ANY($1::bigint[])) \
                 RETURNING id::bigint"
            ),
            &[&ids],
        )
        .await?;
    client
        .execute("SELECT pg_notify($1, '')", &[&table.channel()])
        .await?;
    let mut ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}
