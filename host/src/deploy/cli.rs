//! `hookmesh deploy …` and `hookmesh handlers list|show|rollback|remove`:
//! argument parsing and printing around [`HandlerStore`].

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{Backlog, Deployed, Deployment, HandlerStore, HistoryEntry};
use crate::audit;
use crate::config::Config;
use crate::manifest::Manifest;
use crate::nats::{self, Patience};
use crate::runtime::Runtime;

/// `hookmesh deploy FILE.wasm --manifest FILE | --name N --subject S …`
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The component to deploy (a `.wasm` component built for wasm32-wasip2).
    #[arg(value_name = "FILE.wasm")]
    pub file: PathBuf,
    /// The handler manifest (TOML); the flags below override its keys.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// The handler's name ([a-z0-9_-], at most 64).
    #[arg(long)]
    pub name: Option<String>,
    /// Subject filter without `hook.` and partition, e.g. `crm.order.>`.
    #[arg(long)]
    pub subject: Option<String>,
    /// Deliveries before an event is dead-lettered.
    #[arg(long, value_name = "N")]
    pub max_deliver: Option<i64>,
    /// How long a delivery may stay unacknowledged, e.g. `30s`.
    #[arg(long, value_name = "DURATION")]
    pub ack_wait: Option<String>,
    /// Per-invocation deadline, e.g. `5s`.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Per-invocation memory cap, e.g. `64MiB`.
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// The first retry's delay, e.g. `1s`.
    #[arg(long, value_name = "DURATION")]
    pub backoff_initial: Option<String>,
    /// The longest retry delay, e.g. `5m`.
    #[arg(long, value_name = "DURATION")]
    pub backoff_max: Option<String>,
    /// Grant the real clocks.
    #[arg(long)]
    pub clock: bool,
    /// What an entity's later events do once one of its events is a dead
    /// letter: `continue` or `park` (wait until it is replayed or purged).
    #[arg(long, value_name = "continue|park")]
    pub on_dead_letter: Option<String>,
    /// A handler setting (its `[config]` table), repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub settings: Vec<String>,
    /// A host the handler may send HTTP requests to, e.g.
    /// `https://erp.example.com` (repeatable; replaces the manifest's
    /// `allowed_hosts`).
    #[arg(long = "allow-host", value_name = "URL")]
    pub allowed_hosts: Vec<String>,
    /// HTTP requests per invocation, at most.
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u32>,
    /// The largest HTTP response body, e.g. `4MiB`.
    #[arg(long, value_name = "SIZE")]
    pub max_response_bytes: Option<String>,
    /// Who deploys, for the audit trail [default: `[operator] actor`, else
    /// $USER@<hostname>].
    #[arg(long)]
    pub actor: Option<String>,
}

/// `hookmesh handlers …`
#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// Every deployed handler: version, digest, subject, backlog, dead letters.
    List,
    /// A handler's manifest and version history (newest first).
    Show {
        /// The handler.
        name: String,
    },
    /// Activate an earlier version again (as a new version).
    Rollback {
        /// The handler.
        name: String,
        /// The version label (or its counter) to go back to [default: the
        /// previous distinct version].
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Who rolls back, for the audit trail.
        #[arg(long)]
        actor: Option<String>,
    },
    /// Stop dispatching a handler (its history stays, for a rollback).
    Remove {
        /// The handler.
        name: String,
        /// Also delete its consumers on HOOK_EVENTS (their position is lost).
        #[arg(long)]
        delete_consumer: bool,
        /// Who removes, for the audit trail.
        #[arg(long)]
        actor: Option<String>,
    },
}

/// Runs `hookmesh deploy`.
pub async fn deploy(config: &Config, args: DeployArgs) -> anyhow::Result<()> {
    let manifest = manifest_from(&args)?;
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    // One compilation serves both checks.
    let runtime = Runtime::new(None).context("building the wasm runtime")?;
    let validated = super::validate(&runtime, &bytes)
        .with_context(|| format!("{} refused", args.file.display()))?;
    super::check_starts(&runtime, &validated, &manifest)
        .await
        .with_context(|| format!("{} refused", args.file.display()))?;
    if validated.imports_http() && manifest.allowed_hosts.is_empty() {
        println!(
            "note: {} imports wasi:http/outgoing-handler, but the manifest lists no allowed_hosts: \
             every HTTP request it makes will be denied (add allowed_hosts = [\"https://…\"], or --allow-host)",
            args.file.display()
        );
    }
    let actor = audit::actor(args.actor.as_deref(), config);
    let store = open(config).await?;
    match store.deploy(manifest, &validated, &actor).await? {
        Deployed::Activated {
            deployment,
            previous,
            uploaded,
        } => {
            println!(
                "deployed {} version {} (sha256 {}, {} bytes, hookmesh:handler@{}, {}){}",
                deployment.name(),
                deployment.version,
                deployment.digest,
                deployment.size,
                validated.world(),
                if uploaded {
                    "uploaded"
                } else {
                    "component already stored"
                },
                previous
                    .map(|p| format!(", replacing {p}"))
                    .unwrap_or_default()
            );
        }
        Deployed::Unchanged(current) => println!(
            "nothing changed: {} version {} already runs this component (sha256 {}) with this manifest",
            current.name(),
            current.version,
            current.digest
        ),
    }
    Ok(())
}

/// Runs `hookmesh handlers …`.
pub async fn handlers(config: &Config, command: HandlersCommand) -> anyhow::Result<()> {
    let store = open(config).await?;
    match command {
        HandlersCommand::List => list(&store).await,
        HandlersCommand::Show { name } => {
            show(&store, &name).await?;
            show_owners(&store, &name, config.ingest.partitions).await
        }
        HandlersCommand::Rollback { name, to, actor } => {
            let actor = audit::actor(actor.as_deref(), config);
            match store.rollback(&name, to.as_deref(), &actor).await? {
                Deployed::Activated {
                    deployment,
                    previous,
                    ..
                } => println!(
                    "rolled back {name} to version {} (sha256 {}, the component of {}){}",
                    deployment.version,
                    deployment.digest,
                    to.as_deref().unwrap_or("the previous version"),
                    previous
                        .map(|p| format!(", replacing {p}"))
                        .unwrap_or_default()
                ),
                Deployed::Unchanged(current) => println!(
                    "nothing changed: {name} version {} is the active version",
                    current.version
                ),
            }
            Ok(())
        }
        HandlersCommand::Remove {
            name,
            delete_consumer,
            actor,
        } => {
            let actor = audit::actor(actor.as_deref(), config);
            let (removed, consumers) = store.remove(&name, delete_consumer, &actor).await?;
            println!("removed {name} (was version {})", removed.version);
            if delete_consumer {
                if consumers.is_empty() {
                    println!("it had no consumers on {}", crate::streams::EVENTS_STREAM);
                } else {
                    println!("deleted consumers: {}", consumers.join(", "));
                }
            } else {
                println!(
                    "its consumers handler_{name}_<partition> are kept (delete them with --delete-consumer)"
                );
            }
            Ok(())
        }
    }
}

async fn open(config: &Config) -> anyhow::Result<HandlerStore> {
    let client = nats::connect(&config.nats, "hookmesh-cli", Patience::FailFast).await?;
    let js = async_nats::jetstream::new(client);
    Ok(HandlerStore::open(&js).await?)
}

async fn list(store: &HandlerStore) -> anyhow::Result<()> {
    let deployments = store.list().await?;
    if deployments.is_empty() {
        println!("no handlers deployed");
        return Ok(());
    }
    let backlogs = store.backlogs().await?;
    let mut rows = vec![[
        "NAME".to_string(),
        "VERSION".into(),
        "DIGEST".into(),
        "DEPLOYED AT".into(),
        "SUBJECT".into(),
        "PENDING".into(),
        "ACK PENDING".into(),
        "DEAD LETTERS".into(),
    ]];
    for d in &deployments {
        let b: Backlog = backlogs.get(d.name()).copied().unwrap_or_default();
        rows.push([
            d.name().to_string(),
            d.version.clone(),
            d.digest.get(..12).unwrap_or(&d.digest).to_string(),
            d.deployed_at.clone(),
            d.manifest.subject.clone(),
            b.pending.to_string(),
            b.ack_pending.to_string(),
            b.dead_letters.to_string(),
        ]);
    }
    print_table(&rows);
    Ok(())
}

async fn show(store: &HandlerStore, name: &str) -> anyhow::Result<()> {
    let history = store.history(name).await?;
    if history.is_empty() {
        return Err(store.unknown(name).await.into());
    }
    let current = store.current(name).await?;
    match &current {
        Some(d) => {
            println!("handler:     {name}");
            println!("version:     {}", d.version);
            println!("digest:      {}", d.digest);
            println!("size:        {} bytes", d.size);
            println!("deployed at: {} by {}", d.deployed_at, d.deployed_by);
            if let Some(from) = &d.rolled_back_from {
                println!("rolled back from {from}");
            }
            println!("\nmanifest:\n{}", manifest_toml(&d.manifest)?);
        }
        None => println!("handler:     {name} (removed)\n"),
    }
    println!("versions (newest first):");
    let mut rows = vec![[
        "REVISION".to_string(),
        "VERSION".into(),
        "DIGEST".into(),
        "DEPLOYED AT".into(),
        "BY".into(),
        "NOTE".into(),
    ]];
    for entry in history.iter().rev() {
        rows.push(match entry {
            HistoryEntry::Deployed {
                revision,
                deployment,
            } => [
                revision.to_string(),
                deployment.version.clone(),
                deployment.digest.clone(),
                deployment.deployed_at.clone(),
                deployment.deployed_by.clone(),
                note(deployment, current.as_ref()),
            ],
            HistoryEntry::Removed { revision, at } => [
                revision.to_string(),
                "-".into(),
                "-".into(),
                at.clone(),
                "-".into(),
                "removed".into(),
            ],
        });
    }
    print_table(&rows);
    Ok(())
}

/// Prints which host works each partition of `name` (`hook_leases`).
async fn show_owners(store: &HandlerStore, name: &str, configured: u32) -> anyhow::Result<()> {
    let js = store.jetstream();
    let partitions = crate::streams::events_partitions(js)
        .await
        .unwrap_or(configured);
    let leases = js
        .get_key_value(crate::streams::LEASES_BUCKET)
        .await
        .map_err(|e| anyhow::anyhow!("KV bucket {}: {e}", crate::streams::LEASES_BUCKET))?;
    let owners = crate::dispatch::ownership::owners(&leases, name, partitions)
        .await
        .map_err(|e| anyhow::anyhow!("partition leases of {name}: {e}"))?;
    let now = crate::dispatch::ownership::now_ms();
    println!(
        "\npartitions (owner from hook_leases {}.partition.<n>):",
        crate::extract::kv_key(name)
    );
    let mut rows = vec![[
        "PARTITION".to_string(),
        "CONSUMER".into(),
        "HOST".into(),
        "LEASE".into(),
    ]];
    for (p, lease) in owners {
        let (host, state) = match lease {
            Some(lease) if lease.until > now => (
                lease.host,
                format!(
                    "renewed, holds {:.1}s more",
                    (lease.until - now) as f64 / 1000.0
                ),
            ),
            Some(lease) => (
                lease.host,
                format!(
                    "expired {:.1}s ago (host gone?)",
                    (now - lease.until) as f64 / 1000.0
                ),
            ),
            None => ("-".into(), "no owner".into()),
        };
        rows.push([
            p.to_string(),
            crate::manifest::consumer_name(name, p),
            host,
            state,
        ]);
    }
    print_table(&rows);
    Ok(())
}

fn note(deployment: &Deployment, current: Option<&Deployment>) -> String {
    let mut notes = Vec::new();
    if current.is_some_and(|c| c.version == deployment.version) {
        notes.push("active".to_string());
    }
    if let Some(from) = &deployment.rolled_back_from {
        notes.push(format!("rollback from {from}"));
    }
    notes.join(", ")
}

fn manifest_toml(manifest: &Manifest) -> anyhow::Result<String> {
    toml::to_string(manifest).context("manifest as TOML")
}

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// The manifest: the `--manifest` file's keys (its `component` path is
/// ignored: the component is FILE.wasm), overridden by the flags, then
/// parsed and validated like any manifest.
fn manifest_from(args: &DeployArgs) -> anyhow::Result<Manifest> {
    let (mut table, origin) = match &args.manifest {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let table: toml::Table = toml::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
            (table, path.display().to_string())
        }
        None => (toml::Table::new(), "command line".to_string()),
    };
    table.remove("component");
    table.remove("digest");
    let mut set = |key: &str, value: toml::Value| {
        table.insert(key.to_string(), value);
    };
    if let Some(v) = &args.name {
        set("name", v.clone().into());
    }
    if let Some(v) = &args.subject {
        set("subject", v.clone().into());
    }
    if let Some(v) = args.max_deliver {
        set("max_deliver", v.into());
    }
    if let Some(v) = args.max_requests {
        set("max_requests", i64::from(v).into());
    }
    if !args.allowed_hosts.is_empty() {
        set("allowed_hosts", args.allowed_hosts.clone().into());
    }
    for (key, value) in [
        ("ack_wait", &args.ack_wait),
        ("timeout", &args.timeout),
        ("memory", &args.memory),
        ("on_dead_letter", &args.on_dead_letter),
        ("max_response_bytes", &args.max_response_bytes),
    ] {
        if let Some(v) = value {
            set(key, v.clone().into());
        }
    }
    nested(
        &mut table,
        "backoff",
        "initial",
        args.backoff_initial.clone(),
    );
    nested(&mut table, "backoff", "max", args.backoff_max.clone());
    if args.clock {
        nested(&mut table, "sandbox", "clock", Some(true));
    }
    for setting in &args.settings {
        let (key, value) = setting
            .split_once('=')
            .with_context(|| format!("--set {setting:?}: use KEY=VALUE"))?;
        nested(&mut table, "config", key, Some(value.to_string()));
    }
    if args.manifest.is_none() && (args.name.is_none() || args.subject.is_none()) {
        anyhow::bail!("give --manifest FILE, or at least --name and --subject");
    }
    let text = toml::to_string(&table).context("manifest as TOML")?;
    Ok(Manifest::from_toml(&text, &origin)?)
}

fn nested<V: Into<toml::Value>>(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    value: Option<V>,
) {
    let Some(value) = value else { return };
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(inner) = entry {
        inner.insert(key.to_string(), value.into());
    }
}
