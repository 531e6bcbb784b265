//! `hookmesh outbox init | relay | retry`: the command line's face on the
//! relay (the binary's edge, so errors are `anyhow`).

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::commands;
use super::db::Database;
use super::table::{self, TableName};
use crate::config::{Config, OutboxConfig, resolve_secret_reference};
use crate::nats::{self, Patience};
use crate::{audit, cli};

/// `hookmesh outbox …`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Create the outbox table, its indexes and (--notify) the trigger that
    /// wakes relays on insert; idempotent. An existing table is checked and
    /// refused, naming the column, when the relay cannot work with it.
    Init {
        /// Which database and table.
        #[command(flatten)]
        target: Target,
        /// Add a trigger that NOTIFYs relays on insert (latency in
        /// milliseconds instead of one poll interval).
        #[arg(long)]
        notify: bool,
        /// Print the SQL instead of running it (for your own migrations).
        #[arg(long)]
        print: bool,
    },
    /// Relay in the foreground until Ctrl-C: every [[outbox]] entry, or
    /// the one named.
    Relay {
        /// Which database, table and source.
        #[command(flatten)]
        target: Target,
    },
    /// Put failed rows back to pending, attempts reset (recorded in
    /// HOOK_AUDIT).
    Retry {
        /// Retry the rows in status failed (the only kind there is to retry).
        #[arg(long, required = true)]
        failed: bool,
        /// Only these rows (by id; repeat the flag).
        #[arg(long = "id", value_name = "ID")]
        ids: Vec<i64>,
        /// Which database, table and source.
        #[command(flatten)]
        target: Target,
        /// Who is recorded in HOOK_AUDIT [default: [operator] actor, else $USER@host].
        #[arg(long)]
        actor: Option<String>,
    },
}

/// Which outbox a command works on: an `[[outbox]]` entry, or a database
/// named on the command line.
#[derive(Debug, Args)]
pub struct Target {
    /// The [[outbox]] entry of this source (with --database-url: the
    /// source the rows are published as).
    #[arg(long, value_name = "S")]
    pub source: Option<String>,
    /// The database, instead of the entry's: a URL, env:VAR or file:PATH.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// The table [default: the entry's, else outbox_events].
    #[arg(long, value_name = "T")]
    pub table: Option<String>,
}

/// Runs `hookmesh outbox …`.
pub async fn run(config: &Config, command: OutboxCommand) -> anyhow::Result<()> {
    match command {
        OutboxCommand::Init {
            target,
            notify,
            print,
        } => {
            // Which source does not matter here: only where the table is.
            let entry = if target.database_url.is_some() || (print && config.outbox.is_empty()) {
                None
            } else {
                Some(one(config, &target)?)
            };
            let table = match (&target.table, &entry) {
                (Some(table), _) => table.parse()?,
                (None, Some(entry)) => entry.table.clone(),
                (None, None) => TableName::default(),
            };
            if print {
                print!("{}", table::init_sql(&table, notify));
                return Ok(());
            }
            let database = match (&target.database_url, entry) {
                (Some(url), _) => database(url)?,
                (None, Some(entry)) => entry.database,
                (None, None) => bail!("give --database-url URL or an [[outbox]] entry"),
            };
            let report = commands::init(&database, &table, notify).await?;
            if report.created_table {
                println!("created table {table} in {database}");
            } else {
                println!("table {table} is in place in {database} and the relay can work with it");
            }
            for index in &report.created_indexes {
                println!("created index {index}");
            }
            if report.notify {
                println!(
                    "trigger {} notifies channel {:?} on insert",
                    table::NOTIFY_TRIGGER,
                    table.channel()
                );
            } else {
                println!("no NOTIFY trigger: relays poll the table (--notify adds one)");
            }
            Ok(())
        }
        OutboxCommand::Relay { target } => {
            let relays = if target.source.is_none() && target.database_url.is_none() {
                if config.outbox.is_empty() {
                    bail!(
                        "no [[outbox]] entry in {}; name a database with --source S --database-url URL",
                        config.origin
                    );
                }
                config.outbox.clone()
            } else {
                vec![one(config, &target)?]
            };
            Ok(commands::run(config, relays, cli::shutdown_signal()).await?)
        }
        OutboxCommand::Retry {
            failed: _,
            ids,
            target,
            actor,
        } => {
            let outbox = one(config, &target)?;
            let client = nats::connect(&config.nats, "hookmesh-cli", Patience::FailFast).await?;
            let js = async_nats::jetstream::new(client);
            let actor = audit::actor(actor.as_deref(), config);
            let only = (!ids.is_empty()).then_some(ids.as_slice());
            let retried = commands::retry_failed(&js, &outbox, only, &actor).await?;
            if retried.is_empty() {
                println!(
                    "no failed rows{} in {}",
                    if only.is_some() { " of those ids" } else { "" },
                    outbox.table
                );
            } else {
                let shown: Vec<String> = retried.iter().take(20).map(i64::to_string).collect();
                let more = if retried.len() > shown.len() {
                    ", …"
                } else {
                    ""
                };
                println!(
                    "{} failed row(s) of {} back to pending: {}{more}",
                    retried.len(),
                    outbox.table,
                    shown.join(", ")
                );
            }
            Ok(())
        }
    }
}

/// The one outbox `target` names: the entry of `--source` (or the only
/// entry), with `--database-url` and `--table` replacing its values — or,
/// with `--database-url` and no such entry, a relay with the defaults.
fn one(config: &Config, target: &Target) -> anyhow::Result<OutboxConfig> {
    let entry = match &target.source {
        Some(source) => config.outbox.iter().find(|o| &o.source == source),
        None if config.outbox.len() == 1 => config.outbox.first(),
        None => None,
    };
    let mut outbox = match (entry, &target.database_url) {
        (Some(entry), _) => entry.clone(),
        (None, Some(url)) => {
            let source = target
                .source
                .clone()
                .context("--database-url needs --source S: the source its rows are published as")?;
            OutboxConfig::new(&source, database(url)?, TableName::default())
        }
        (None, None) => {
            let known: Vec<&str> = config.outbox.iter().map(|o| o.source.as_str()).collect();
            match &target.source {
                Some(source) => bail!(
                    "no [[outbox]] entry with source {source:?} in {} (configured: {}); or give --database-url",
                    config.origin,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
                None if known.is_empty() => bail!(
                    "no [[outbox]] entry in {}; give --database-url URL",
                    config.origin
                ),
                None => bail!(
                    "several [[outbox]] entries ({}); name one with --source",
                    known.join(", ")
                ),
            }
        }
    };
    if let Some(url) = &target.database_url {
        outbox.database = database(url)?;
    }
    if let Some(table) = &target.table {
        outbox.table = table.parse()?;
    }
    Ok(outbox)
}

fn database(reference: &str) -> anyhow::Result<Database> {
    let url = resolve_secret_reference(reference)
        .map_err(anyhow::Error::msg)
        .context("--database-url")?;
    Database::parse(&url).context("--database-url")
}
