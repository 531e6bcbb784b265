//! `hookmesh outbox init`: the table of DESIGN.md read back from the
//! catalog, its indexes used by the relay's query, idempotence, refusal of
//! a table the relay cannot work with, and `--print`.

use hookmesh::outbox::commands::{self, CommandError};
use hookmesh::outbox::db::Database;
use hookmesh::outbox::queries::due_sql;
use hookmesh::outbox::table::{InitError, ShapeError, TableName};
use hookmesh_test_support::TestDatabase;
use tokio_postgres::Client;

use super::pg;
use crate::support::hookmesh_bin;

/// `(column, data type, nullable, default)` of `table`, in column order.
async fn columns(
    client: &Client,
    schema: &str,
    table: &str,
) -> Vec<(String, String, String, Option<String>)> {
    client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text, column_default::text \
             FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 \
             ORDER BY ordinal_position",
            &[&schema, &table],
        )
        .await
        .expect("information_schema")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

/// `(name, definition)` of the indexes of `table`, by name.
async fn indexes(client: &Client, schema: &str, table: &str) -> Vec<(String, String)> {
    client
        .query(
            "SELECT indexname::text, indexdef FROM pg_indexes \
             WHERE schemaname = $1 AND tablename = $2 ORDER BY indexname",
            &[&schema, &table],
        )
        .await
        .expect("pg_indexes")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

fn col(
    name: &str,
    ty: &str,
    nullable: bool,
    default: Option<&str>,
) -> (String, String, String, Option<String>) {
    (
        name.into(),
        ty.into(),
        if nullable { "YES" } else { "NO" }.into(),
        default.map(str::to_string),
    )
}

#[tokio::test]
async fn init_creates_the_designed_table_its_indexes_and_is_idempotent() {
    let db = TestDatabase::create().expect("database");
    let database = Database::parse(db.url()).expect("url");
    let table: TableName = "outbox_events".parse().expect("name");
    let client = pg(db.url()).await;

    let first = commands::init(&database, &table, false)
        .await
        .expect("init");
    assert!(first.created_table);
    assert_eq!(
        first.created_indexes,
        ["outbox_events_pending_idx", "outbox_events_held_idx"]
    );
    assert!(!first.notify);

    assert_eq!(
        columns(&client, "public", "outbox_events").await,
        [
            col(
                "id",
                "bigint",
                false,
                Some("nextval('outbox_events_id_seq'::regclass)")
            ),
            col("aggregate_type", "text", false, None),
            col("aggregate_id", "text", false, None),
            col("event_type", "text", false, None),
            col("payload_json", "jsonb", false, None),
            col("correlation_id", "text", true, None),
            col("idempotency_key", "text", true, None),
            col("status", "text", false, Some("'pending'::text")),
            col("attempts", "integer", false, Some("0")),
            col(
                "next_attempt_at",
                "timestamp with time zone",
                false,
                Some("now()")
            ),
            col("published_at", "timestamp with time zone", true, None),
            col(
                "created_at",
                "timestamp with time zone",
                false,
                Some("now()")
            ),
        ]
    );
    let constraints: Vec<String> = client
        .query(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = 'outbox_events'::regclass ORDER BY contype",
            &[],
        )
        .await
        .expect("constraints")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let [check, primary] = constraints.as_slice() else {
        panic!("a check and a primary key: {constraints:?}");
    };
    assert_eq!(primary, "PRIMARY KEY (id)");
    for status in ["'pending'", "'published'", "'failed'"] {
        assert!(check.contains(status), "{check}");
    }
    let refused = client
        .execute(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json, status) \
             VALUES ('invoice', 'INV-1', 'invoice.created', '{}', 'done')",
            &[],
        )
        .await
        .expect_err("status is one of three values");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    // An application inserts only its own columns; the rest are defaults.
    let defaults = client
        .query_one(
            "INSERT INTO outbox_events (aggregate_type, aggregate_id, event_type, payload_json) \
             VALUES ('invoice', 'INV-1', 'invoice.created', '{\"total\": 1}') \
             RETURNING status, attempts, next_attempt_at = now(), created_at = now(), published_at IS NULL",
            &[],
        )
        .await
        .expect("insert");
    assert_eq!(defaults.get::<_, String>(0), "pending");
    assert_eq!(defaults.get::<_, i32>(1), 0);
    assert!(defaults.get::<_, bool>(2) && defaults.get::<_, bool>(3) && defaults.get::<_, bool>(4));

    assert_eq!(
        indexes(&client, "public", "outbox_events").await,
        [
            (
                "outbox_events_held_idx".to_string(),
                "CREATE INDEX outbox_events_held_idx ON public.outbox_events USING btree (status, next_attempt_at) WHERE (status <> 'published'::text)".to_string()
            ),
            (
                "outbox_events_pending_idx".to_string(),
                "CREATE INDEX outbox_events_pending_idx ON public.outbox_events USING btree (id) WHERE (status = 'pending'::text)".to_string()
            ),
            (
                "outbox_events_pkey".to_string(),
                "CREATE UNIQUE INDEX outbox_events_pkey ON public.outbox_events USING btree (id)".to_string()
            ),
        ]
    );
    // The relay's query can use both (the planner prefers a scan of a tiny
    // table, so scans are priced out for the check).
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let plan: Vec<String> = client
        .query(
            &format!("EXPLAIN {}", due_sql(&table).replace("$1", "500")),
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("outbox_events_pending_idx"), "{plan}");
    assert!(plan.contains("outbox_events_held_idx"), "{plan}");

    // Again: nothing to do; then the trigger is added, and again nothing.
    let again = commands::init(&database, &table, false)
        .await
        .expect("init again");
    assert!(!again.created_table && again.created_indexes.is_empty() && !again.notify);
    let with_notify = commands::init(&database, &table, true)
        .await
        .expect("init --notify");
    assert!(!with_notify.created_table && with_notify.notify);
    let still = commands::init(&database, &table, false)
        .await
        .expect("init without --notify");
    assert!(
        still.notify,
        "a later init without --notify keeps the trigger"
    );
    let rows: i64 = client
        .query_one("SELECT count(*) FROM outbox_events", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 1, "init never touches the rows");
}

#[tokio::test]
async fn the_notify_trigger_wakes_a_listener_once_per_inserting_statement() {
    let db = TestDatabase::create().expect("database");
    let database = Database::parse(db.url()).expect("url");
    let table: TableName = "erp.outbox".parse().expect("name");
    let admin = pg(db.url()).await;
    admin
        .batch_execute("CREATE SCHEMA erp")
        .await
        .expect("schema");
    commands::init(&database, &table, true).await.expect("init");
    let listener = database
        .connect("test-listener", Some("erp.outbox"))
        .await
        .expect("listen");
    admin
        .batch_execute(
            "INSERT INTO erp.outbox (aggregate_type, aggregate_id, event_type, payload_json) \
             VALUES ('a', '1', 'x', '{}'), ('a', '2', 'x', '{}')",
        )
        .await
        .expect("insert");
    tokio::time::timeout(std::time::Duration::from_secs(5), listener.notified())
        .await
        .expect("the insert's commit notifies the channel");
}

#[tokio::test]
async fn init_refuses_a_table_the_relay_cannot_work_with_naming_the_column() {
    let db = TestDatabase::create().expect("database");
    let database = Database::parse(db.url()).expect("url");
    let client = pg(db.url()).await;
    let complete = "id bigserial primary key, aggregate_type text not null, aggregate_id text not null, \
                    event_type text not null, payload_json jsonb not null, correlation_id text, \
                    idempotency_key text, status text not null default 'pending', \
                    attempts integer not null default 0, next_attempt_at timestamptz not null default now(), \
                    published_at timestamptz, created_at timestamptz not null default now()";
    let cases = [
        (
            "wrong_type",
            complete.replace(
                "aggregate_id text not null",
                "aggregate_id integer not null",
            ),
            "table wrong_type: column aggregate_id is integer, expected text or character varying NOT NULL",
        ),
        (
            "missing",
            complete.replace(", attempts integer not null default 0", ""),
            "table missing has no column attempts (integer or bigint NOT NULL)",
        ),
        (
            "nullable",
            complete.replace("event_type text not null", "event_type text"),
            "table nullable: column event_type allows null; the relay needs NOT NULL",
        ),
        (
            "naive_time",
            complete.replace("created_at timestamptz", "created_at timestamp"),
            "table naive_time: column created_at is timestamp without time zone, expected timestamp with time zone NOT NULL",
        ),
    ];
    for (name, columns, expected) in cases {
        client
            .batch_execute(&format!("CREATE TABLE {name} ({columns})"))
            .await
            .expect("create");
        let table: TableName = name.parse().expect("name");
        let error = commands::init(&database, &table, true)
            .await
            .expect_err("refused");
        assert!(
            matches!(error, CommandError::Init(InitError::Shape(_))),
            "{error:?}"
        );
        assert_eq!(error.to_string(), expected);
        let untouched = indexes(&client, "public", name).await;
        assert_eq!(untouched.len(), 1, "nothing added to {name}: {untouched:?}");
    }
    // A compatible table of the application's own (varchar, json, extra
    // columns) is taken as it is.
    client
        .batch_execute(&format!(
            "CREATE TABLE own ({}, tenant text)",
            complete
                .replace("aggregate_id text", "aggregate_id varchar(64)")
                .replace("payload_json jsonb", "payload_json json")
        ))
        .await
        .expect("create");
    let report = commands::init(&database, &"own".parse().expect("name"), false)
        .await
        .expect("a compatible table");
    assert!(!report.created_table);
    assert_eq!(report.created_indexes.len(), 2);
    // And a table that is not there is named as missing by the relay's check.
    let missing = hookmesh::outbox::table::inspect(&client, &"nowhere".parse().expect("name"))
        .await
        .expect_err("missing");
    assert!(matches!(missing, ShapeError::Missing { .. }), "{missing:?}");
}

#[tokio::test]
async fn print_shows_the_sql_init_runs_and_running_it_gives_the_same_table() {
    let printed = std::process::Command::new(hookmesh_bin())
        .args([
            "outbox",
            "init",
            "--print",
            "--notify",
            "--table",
            "erp.outbox_events",
        ])
        .env_remove("HOOKMESH_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run hookmesh");
    assert!(printed.status.success(), "{printed:?}");
    let sql = String::from_utf8(printed.stdout).expect("utf-8");
    assert!(
        sql.starts_with("BEGIN;") && sql.trim_end().ends_with("COMMIT;"),
        "{sql}"
    );

    // Run by hand (a migration tool) in one database, by `init` in another.
    let by_hand = TestDatabase::create().expect("database");
    let hand = pg(by_hand.url()).await;
    hand.batch_execute("CREATE SCHEMA erp")
        .await
        .expect("schema");
    hand.batch_execute(&sql)
        .await
        .expect("the printed SQL runs");
    hand.batch_execute(&sql).await.expect("and runs again");
    let by_init = TestDatabase::create().expect("database");
    let init = pg(by_init.url()).await;
    init.batch_execute("CREATE SCHEMA erp")
        .await
        .expect("schema");
    let run = std::process::Command::new(hookmesh_bin())
        .args([
            "outbox",
            "init",
            "--notify",
            "--table",
            "erp.outbox_events",
            "--database-url",
        ])
        .arg(by_init.url())
        .env_remove("HOOKMESH_CONFIG")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run hookmesh");
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{run:?}");
    assert!(said.contains("created table erp.outbox_events"), "{said}");
    assert!(
        said.contains("trigger hookmesh_notify notifies channel \"erp.outbox_events\""),
        "{said}"
    );

    assert_eq!(
        columns(&hand, "erp", "outbox_events").await,
        columns(&init, "erp", "outbox_events").await
    );
    assert_eq!(
        indexes(&hand, "erp", "outbox_events").await,
        indexes(&init, "erp", "outbox_events").await
    );
    let table: TableName = "erp.outbox_events".parse().expect("name");
    let shape = hookmesh::outbox::table::inspect(&hand, &table)
        .await
        .expect("the printed table suits the relay");
    assert!(shape.notify);
}

#[tokio::test]
async fn a_relay_session_asks_the_server_to_notice_a_vanished_host_within_a_minute() {
    let db = TestDatabase::create().expect("database");
    let database = Database::parse(db.url()).expect("url");
    let session = database.connect("test-relay", None).await.expect("connect");
    let mut settings = Vec::new();
    for name in [
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
    ] {
        let value: String = session
            .client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .expect("show")
            .get(0);
        settings.push(value);
    }
    assert_eq!(settings, ["30", "10", "3"]);
}
