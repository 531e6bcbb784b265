//! The outbox table: its name, the SQL that creates it (`hookmesh outbox
//! init`, `--print`), and the check that an existing table has a shape the
//! relay can work with.
//!
//! The columns are DESIGN.md's, field for field. Two partial indexes cover
//! the relay's queries and hold only rows that are not published yet, so
//! they stay small however long published rows are kept:
//! - `<table>_pending_idx (id) WHERE status = 'pending'`: the due rows in
//!   `id` order;
//! - `<table>_held_idx (status, next_attempt_at) WHERE status <> 'published'`:
//!   the rows that hold their aggregate back (failed, or waiting out a
//!   backoff), and the pending/failed counts of the metrics.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;

/// The trigger `--notify` adds; it wakes relays on insert.
pub const NOTIFY_TRIGGER: &str = "hookmesh_notify";

/// The longest table name: its index names (`<name>_pending_idx`) must fit
/// PostgreSQL's 63-byte identifiers.
const MAX_NAME: usize = 48;

/// A table name, `name` or `schema.name`: lower-case letters, digits and
/// `_`, starting with a letter or `_` (so quoting never changes its
/// meaning, and it is also the `NOTIFY` channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

/// Why a string is not a usable table name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a table name like \"outbox_events\" or \"erp.outbox_events\" \
     (lower-case letters, digits and '_', at most {MAX_NAME} characters)"
)]
pub struct BadTableName(pub String);

impl FromStr for TableName {
    type Err = BadTableName;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadTableName(text.to_string());
        let identifier = |part: &str| {
            let mut bytes = part.bytes();
            bytes
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
                && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && part.len() <= MAX_NAME
        };
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        if !identifier(name) || !schema.is_none_or(identifier) {
            return Err(bad());
        }
        Ok(TableName {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName {
            schema: None,
            name: DEFAULT_TABLE.to_string(),
        }
    }
}

/// The table's name when none is given.
pub const DEFAULT_TABLE: &str = "outbox_events";

impl TableName {
    /// The table in SQL (`"erp"."outbox_events"`).
    pub fn sql(&self) -> String {
        self.qualified(&self.name)
    }

    /// The `NOTIFY` channel the trigger signals and relays listen on: the
    /// table's name as written.
    pub fn channel(&self) -> String {
        self.to_string()
    }

    /// An index of this table, in SQL (`"outbox_events_pending_idx"`); an
    /// index lives in its table's schema, so it is named unqualified when
    /// created.
    fn index(&self, suffix: &str) -> String {
        format!("\"{}_{suffix}\"", self.name)
    }

    /// A function in the table's schema, in SQL.
    fn function(&self, name: &str) -> String {
        self.qualified(name)
    }

    fn qualified(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        }
    }
}

/// One column the relay relies on.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    /// Its name.
    pub name: &'static str,
    /// Its type as `init` creates it (`format_type` spelling).
    pub created_as: &'static str,
    /// The types an existing table may have instead (the relay reads
    /// every one of them).
    pub accepted: &'static [&'static str],
    /// Whether it may be null.
    pub nullable: bool,
}

const TEXT: &[&str] = &["text", "character varying"];
const TIMESTAMPTZ: &[&str] = &["timestamp with time zone"];

/// DESIGN.md's columns, in the order `init` creates them.
pub const COLUMNS: &[Column] = &[
    Column {
        name: "id",
        created_as: "bigint",
        accepted: &["bigint", "integer"],
        nullable: false,
    },
    Column {
        name: "aggregate_type",
        created_as: "text",
        accepted: TEXT,
        nullable: false,
    },
    Column {
        name: "aggregate_id",
        created_as: "text",
        accepted: TEXT,
        nullable: false,
    },
    Column {
        name: "event_type",
        created_as: "text",
        accepted: TEXT,
        nullable: false,
    },
    Column {
        name: "payload_json",
        created_as: "jsonb",
        accepted: &["jsonb", "json"],
        nullable: false,
    },
    Column {
        name: "correlation_id",
        created_as: "text",
        accepted: TEXT,
        nullable: true,
    },
    Column {
        name: "idempotency_key",
        created_as: "text",
        accepted: TEXT,
        nullable: true,
    },
    Column {
        name: "status",
        created_as: "text",
        accepted: TEXT,
        nullable: false,
    },
    Column {
        name: "attempts",
        created_as: "integer",
        accepted: &["integer", "bigint"],
        nullable: false,
    },
    Column {
        name: "next_attempt_at",
        created_as: "timestamp with time zone",
        accepted: TIMESTAMPTZ,
        nullable: false,
    },
    Column {
        name: "published_at",
        created_as: "timestamp with time zone",
        accepted: TIMESTAMPTZ,
        nullable: true,
    },
    Column {
        name: "created_at",
        created_as: "timestamp with time zone",
        accepted: TIMESTAMPTZ,
        nullable: false,
    },
];

/// The SQL `init` runs, as one transaction: the table, its indexes and,
/// with `notify`, the trigger that wakes relays on insert. Every statement
/// is idempotent, so the script can run again (and be handed to a
/// migration tool as is).
pub fn init_sql(table: &TableName, notify: bool) -> String {
    let t = table.sql();
    let mut sql = format!(
        "BEGIN;\n\
         \n\
         CREATE TABLE IF NOT EXISTS {t} (\n    \
             id              bigserial PRIMARY KEY,\n    \
             aggregate_type  text        NOT NULL,\n    \
             aggregate_id    text        NOT NULL,\n    \
             event_type      text        NOT NULL,\n    \
             payload_json    jsonb       NOT NULL,\n    \
             correlation_id  text,\n    \
             idempotency_key text,\n    \
             status          text        NOT NULL DEFAULT 'pending'\n                                \
                             CHECK (status IN ('pending', 'published', 'failed')),\n    \
             attempts        integer     NOT NULL DEFAULT 0,\n    \
             next_attempt_at timestamptz NOT NULL DEFAULT now(),\n    \
             published_at    timestamptz,\n    \
             created_at      timestamptz NOT NULL DEFAULT now()\n\
         );\n\
         \n\
         -- The relay's due rows, in id order (pending rows only).\n\
         CREATE INDEX IF NOT EXISTS {pending} ON {t} (id) WHERE status = 'pending';\n\
         -- Rows that hold their aggregate back (failed or backing off), and the counts.\n\
         CREATE INDEX IF NOT EXISTS {held} ON {t} (status, next_attempt_at) WHERE status <> 'published';\n",
        pending = table.index("pending_idx"),
        held = table.index("held_idx"),
    );
    if notify {
        let function = table.function("hookmesh_outbox_notify");
        let channel = table.channel();
        sql.push_str(&format!(
            "\n\
             -- Wakes relays (LISTEN \"{channel}\") once per inserting statement; a wake-up\n\
             -- only: relays also poll, so a missed notification costs one poll interval.\n\
             CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$\n\
             BEGIN\n    \
                 PERFORM pg_notify(TG_ARGV[0], '');\n    \
                 RETURN NULL;\n\
             END\n\
             $$;\n\
             DROP TRIGGER IF EXISTS {NOTIFY_TRIGGER} ON {t};\n\
             CREATE TRIGGER {NOTIFY_TRIGGER} AFTER INSERT ON {t}\n    \
                 FOR EACH STATEMENT EXECUTE FUNCTION {function}('{channel}');\n"
        ));
    }
    sql.push_str("\nCOMMIT;\n");
    sql
}

/// What `init` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The table was created now (else it was there, with a usable shape).
    pub created_table: bool,
    /// Indexes created now.
    pub created_indexes: Vec<String>,
    /// The `NOTIFY` trigger is in place after `init`.
    pub notify: bool,
}

/// Why `init` did not complete (nothing is changed then).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The database refused a statement or could not be reached.
    #[error("{step}: {source}")]
    Database {
        /// What was being done.
        step: &'static str,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The table exists with a shape the relay cannot work with.
    #[error(transparent)]
    Shape(#[from] ShapeError),
}

/// Creates the table, its indexes and (with `notify`) the wake-up trigger,
/// in one transaction; an existing table is first checked and refused,
/// naming the column, when the relay could not work with it.
pub async fn init(
    client: &mut Client,
    table: &TableName,
    notify: bool,
) -> Result<InitReport, InitError> {
    let db = |step| move |source| InitError::Database { step, source };
    let indexes = ["pending_idx", "held_idx"].map(|suffix| {
        let name = format!("{}_{suffix}", table.name);
        let qualified = match &table.schema {
            Some(schema) => format!("{schema}.{name}"),
            None => name.clone(),
        };
        (name, qualified)
    });
    let transaction = client.transaction().await.map_err(db("begin"))?;
    // Two `init`s at once would race on `CREATE … IF NOT EXISTS`.
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&lock_key("init", table)],
        )
        .await
        .map_err(db("lock"))?;
    let existed = match inspect(&transaction, table).await {
        Ok(_) => true,
        Err(ShapeError::Missing { .. }) => false,
        Err(ShapeError::Database { step, source }) => {
            return Err(InitError::Database { step, source });
        }
        Err(incompatible) => return Err(incompatible.into()),
    };
    let mut missing_indexes = Vec::new();
    for (name, qualified) in &indexes {
        let found: Option<String> = transaction
            .query_one("SELECT to_regclass($1)::text", &[qualified])
            .await
            .map_err(db("look up indexes"))?
            .get(0);
        if found.is_none() {
            missing_indexes.push(name.clone());
        }
    }
    // `batch_execute` runs the script's own BEGIN/COMMIT as no-ops inside
    // this transaction (with a warning notice), so strip them.
    let script = init_sql(table, notify);
    let body = script
        .trim_start_matches("BEGIN;\n")
        .trim_end()
        .trim_end_matches("COMMIT;");
    transaction
        .batch_execute(body)
        .await
        .map_err(db("create the table"))?;
    let notify = has_notify_trigger(&transaction, table)
        .await
        .map_err(db("look up triggers"))?;
    transaction.commit().await.map_err(db("commit"))?;
    Ok(InitReport {
        created_table: !existed,
        created_indexes: missing_indexes,
        notify,
    })
}

/// A 64-bit advisory lock key for `purpose` on `table`.
pub(crate) fn lock_key(purpose: &str, table: &TableName) -> i64 {
    let hash = crate::subject::fnv1a64(format!("hookmesh-outbox-{purpose}:{table}").as_bytes());
    i64::from_ne_bytes(hash.to_ne_bytes())
}

/// Why an existing table cannot be relayed.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    /// There is no such table.
    #[error("table {table} does not exist (create it with `hookmesh outbox init`)")]
    Missing {
        /// The table.
        table: String,
    },
    /// A column the relay needs is not there.
    #[error("table {table} has no column {column} ({expected})")]
    MissingColumn {
        /// The table.
        table: String,
        /// The column.
        column: &'static str,
        /// What it should be.
        expected: String,
    },
    /// A column has a type the relay cannot read.
    #[error("table {table}: column {column} is {found}, expected {expected}")]
    WrongType {
        /// The table.
        table: String,
        /// The column.
        column: &'static str,
        /// Its type.
        found: String,
        /// What it should be.
        expected: String,
    },
    /// A column the relay needs a value in may be null.
    #[error("table {table}: column {column} allows null; the relay needs NOT NULL")]
    Nullable {
        /// The table.
        table: String,
        /// The column.
        column: &'static str,
    },
    /// The catalog could not be read.
    #[error("{step}: {source}")]
    Database {
        /// What was being done.
        step: &'static str,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// What an existing, usable table has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The `NOTIFY` trigger of `--notify` is in place.
    pub notify: bool,
}

/// Checks that `table` exists with every column the relay needs, of a type
/// it reads and, where it needs a value, `NOT NULL`. Other columns are the
/// application's business.
pub async fn inspect(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
) -> Result<Shape, ShapeError> {
    let db = |step| move |source| ShapeError::Database { step, source };
    let name = table.to_string();
    let columns = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attnotnull \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&name],
        )
        .await
        .map_err(db("read the table's columns"))?;
    if columns.is_empty() {
        return Err(ShapeError::Missing { table: name });
    }
    for column in COLUMNS {
        let Some(found) = columns
            .iter()
            .find(|row| row.get::<_, String>(0) == column.name)
        else {
            return Err(ShapeError::MissingColumn {
                table: name,
                column: column.name,
                expected: expected(column),
            });
        };
        let found_type: String = found.get(1);
        if !column.accepted.contains(&found_type.as_str()) {
            return Err(ShapeError::WrongType {
                table: name,
                column: column.name,
                found: found_type,
                expected: expected(column),
            });
        }
        let not_null: bool = found.get(2);
        if !column.nullable && !not_null {
            return Err(ShapeError::Nullable {
                table: name,
                column: column.name,
            });
        }
    }
    let notify = has_notify_trigger(client, table)
        .await
        .map_err(db("read the table's triggers"))?;
    Ok(Shape { notify })
}

fn expected(column: &Column) -> String {
    let null = if column.nullable { "" } else { " NOT NULL" };
    format!("{}{null}", column.accepted.join(" or "))
}

async fn has_notify_trigger(
    client: &impl tokio_postgres::GenericClient,
    table: &TableName,
) -> Result<bool, tokio_postgres::Error> {
    let found = client
        .query_opt(
            "SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2",
            &[&table.to_string(), &NOTIFY_TRIGGER],
        )
        .await?;
    Ok(found.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_lower_case_identifiers_with_an_optional_schema() {
        let plain: TableName = "outbox_events".parse().expect("valid");
        assert_eq!(plain.sql(), "\"outbox_events\"");
        assert_eq!(plain.channel(), "outbox_events");
        let qualified: TableName = "erp.outbox_2".parse().expect("valid");
        assert_eq!(qualified.sql(), "\"erp\".\"outbox_2\"");
        assert_eq!(qualified.to_string(), "erp.outbox_2");
        for bad in [
            "",
            "Outbox",
            "2outbox",
            "outbox-events",
            "a.b.c",
            ".outbox",
            "erp.",
            "outbox events",
            "x\"; DROP TABLE y; --",
            &"a".repeat(MAX_NAME + 1),
        ] {
            assert_eq!(
                bad.parse::<TableName>(),
                Err(BadTableName(bad.to_string())),
                "{bad:?}"
            );
        }
        assert_eq!(TableName::default().to_string(), DEFAULT_TABLE);
    }

    #[test]
    fn the_script_creates_every_column_both_indexes_and_the_trigger_only_when_asked() {
        let table: TableName = "erp.outbox_events".parse().expect("valid");
        let sql = init_sql(&table, false);
        assert!(
            sql.starts_with("BEGIN;\n") && sql.ends_with("COMMIT;\n"),
            "{sql}"
        );
        for column in COLUMNS {
            assert!(
                sql.contains(&format!("    {} ", column.name)),
                "{}",
                column.name
            );
        }
        assert!(sql.contains("CHECK (status IN ('pending', 'published', 'failed'))"));
        assert!(sql.contains(
            "CREATE INDEX IF NOT EXISTS \"outbox_events_pending_idx\" ON \"erp\".\"outbox_events\" (id) WHERE status = 'pending';"
        ));
        assert!(sql.contains("\"outbox_events_held_idx\""));
        assert!(!sql.contains("TRIGGER"));
        let with_notify = init_sql(&table, true);
        assert!(with_notify.contains(
            "FOR EACH STATEMENT EXECUTE FUNCTION \"erp\".\"hookmesh_outbox_notify\"('erp.outbox_events');"
        ));
    }

    #[test]
    fn lock_keys_differ_by_purpose_and_table() {
        let a: TableName = "a".parse().expect("valid");
        let b: TableName = "b".parse().expect("valid");
        assert_ne!(lock_key("relay", &a), lock_key("relay", &b));
        assert_ne!(lock_key("relay", &a), lock_key("init", &a));
        assert_eq!(lock_key("relay", &a), lock_key("relay", &a));
    }
}
