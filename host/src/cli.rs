//! The `hookmesh` command line: a thin face over the library. Every
//! subcommand is one call into a module that tests call too.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use crate::config::{Config, Env, Origin};
use crate::dlq::commands::{self, Target};
use crate::dlq::store::Selection;
use crate::nats::{self, Patience};
use crate::runtime::Runtime;
use crate::streams::{self, Mode};
use crate::{audit, deploy, local, manifest, send, server};

/// Signed webhooks into NATS JetStream, handled by sandboxed Wasm components.
#[derive(Debug, Parser)]
#[command(name = "hookmesh", version, about)]
pub struct Cli {
    /// The config file [default: ./hookmesh.toml when present, else the
    /// built-in development config].
    #[arg(long, global = true, env = "HOOKMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Development: start nats-server if none answers, apply streams,
    /// deploy the handlers of DIR (again whenever one changes), serve HTTP.
    Up {
        /// Deploy and watch every DIR/<name>/handler.toml.
        #[arg(long, value_name = "DIR", default_value = "handlers")]
        handlers: PathBuf,
        /// Where compiled components are cached.
        #[arg(long, value_name = "DIR", default_value = ".hookmesh/cache")]
        cache_dir: PathBuf,
        /// Where the mock ERP (`hookmesh-mock-erp`) is started unless
        /// something answers there already — the example handlers'
        /// `erp_url`; `off` starts none.
        #[arg(
            long,
            env = "HOOKMESH_MOCK_ERP",
            value_name = "ADDR|off",
            default_value = "127.0.0.1:8090"
        )]
        mock_erp: String,
    },
    /// Production host: serve HTTP and run handlers, with the given config file.
    Serve {
        /// Load every DIR/<name>/handler.toml.
        #[arg(long, value_name = "DIR")]
        handlers: Option<PathBuf>,
        /// Where compiled components are cached.
        #[arg(long, value_name = "DIR", default_value = ".hookmesh/cache")]
        cache_dir: PathBuf,
        /// What this host does: `ingress` (webhooks into NATS only),
        /// `worker` (handlers only) or `all`.
        #[arg(long, value_enum, default_value = "all")]
        role: server::Role,
    },
    /// Streams, buckets and stores.
    Streams {
        /// What to do with them.
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// Dead letters: list, show, replay, purge.
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Validate a handler component, upload it and make it the active version.
    Deploy(Box<crate::deploy::cli::DeployArgs>),
    /// Deployed handlers: list, show, rollback, remove.
    Handlers {
        /// What to do.
        #[command(subcommand)]
        command: crate::deploy::cli::HandlersCommand,
    },
    /// One screen: NATS, streams, handlers, versions, partition owners,
    /// backlog, dead letters, the latest audit entries.
    Status {
        /// The snapshot as JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// How many audit entries to show.
        #[arg(long, value_name = "N", default_value_t = crate::status::RECENT_AUDIT)]
        audit: usize,
    },
    /// The PostgreSQL outbox relay: init, relay, retry.
    Outbox {
        /// What to do.
        #[command(subcommand)]
        command: crate::outbox::cli::OutboxCommand,
    },
    /// Sign a body with a provider's secret and POST it (a testing aid).
    Send {
        /// The provider, as named in the config.
        #[arg(long)]
        provider: String,
        /// The body to send.
        #[arg(long, value_name = "BODY")]
        file: PathBuf,
        /// Where to POST [default: the configured listener's /webhooks/PROVIDER].
        #[arg(long)]
        url: Option<String>,
        /// Set the event type where the provider's config reads it.
        #[arg(long, value_name = "T")]
        event_type: Option<String>,
        /// Set the event id (header-borne ids are otherwise generated fresh).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
}

/// `hookmesh dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// A table of dead letters, oldest first.
    List {
        /// Only this handler's.
        #[arg(long, value_name = "N")]
        handler: Option<String>,
        /// Only this reason: max-deliveries, permanent, needs-human, trap.
        #[arg(long, value_name = "R")]
        reason: Option<String>,
        /// Only those stored within this long, e.g. `30m`, `2h`, `7d`.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Only this entity's (its id as the provider sent it).
        #[arg(long, value_name = "E")]
        entity: Option<String>,
    },
    /// One dead letter: failure record, headers, payload.
    Show {
        /// Its sequence in HOOK_DLQ.
        seq: u64,
    },
    /// Run dead letters through their handler's current version again (on
    /// a running host); success removes the entry.
    Replay {
        /// The entries, by HOOK_DLQ sequence.
        #[arg(required_unless_present = "handler", conflicts_with = "handler")]
        seqs: Vec<u64>,
        /// Every entry of this handler (narrowed by --reason / --since).
        #[arg(long, value_name = "N")]
        handler: Option<String>,
        /// With --handler: only this reason.
        #[arg(long, value_name = "R", requires = "handler")]
        reason: Option<String>,
        /// With --handler: only those stored within this long.
        #[arg(long, value_name = "D", requires = "handler", value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Say what would be replayed, and replay nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replay with this payload instead of the stored one (for this
        /// replay only; a failure keeps the original). One entry only.
        #[arg(long, value_name = "FILE", conflicts_with = "handler")]
        payload: Option<PathBuf>,
        /// Who is recorded in HOOK_AUDIT [default: [operator] actor, else $USER@host].
        #[arg(long)]
        actor: Option<String>,
    },
    /// Delete dead letters (asks unless --yes).
    Purge {
        /// The entries, by HOOK_DLQ sequence.
        #[arg(required_unless_present = "handler", conflicts_with = "handler")]
        seqs: Vec<u64>,
        /// Every entry of this handler (narrowed by --older-than / --reason).
        #[arg(long, value_name = "N")]
        handler: Option<String>,
        /// With --handler: only entries stored longer ago than this.
        #[arg(long, value_name = "D", requires = "handler", value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// With --handler: only this reason.
        #[arg(long, value_name = "R", requires = "handler")]
        reason: Option<String>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Who is recorded in HOOK_AUDIT [default: [operator] actor, else $USER@host].
        #[arg(long)]
        actor: Option<String>,
    },
}

/// `hookmesh streams …`
#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Create or update every stream, bucket and store (idempotent).
    Apply,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config =
        Config::load(cli.config.as_deref(), &Env::from_process()).context("configuration")?;
    crate::logging::init(config.log.format);
    for warning in &config.warnings {
        warn!("{warning}");
    }
    match cli.command {
        Command::Up {
            handlers,
            cache_dir,
            mock_erp,
        } => up(config, &handlers, cache_dir, &mock_erp).await,
        Command::Serve {
            handlers,
            cache_dir,
            role,
        } => serve(config, handlers.as_deref(), cache_dir, role).await,
        Command::Streams {
            command: StreamsCommand::Apply,
        } => apply_streams(&config).await,
        Command::Dlq { command } => dlq_command(&config, command).await,
        Command::Deploy(args) => crate::deploy::cli::deploy(&config, *args).await,
        Command::Handlers { command } => crate::deploy::cli::handlers(&config, command).await,
        Command::Status { json, audit } => status(&config, json, audit).await,
        Command::Outbox { command } => crate::outbox::cli::run(&config, command).await,
        Command::Send {
            provider,
            file,
            url,
            event_type,
            id,
        } => {
            send_file(
                &config,
                &provider,
                &file,
                url,
                event_type.as_deref(),
                id.as_deref(),
            )
            .await
        }
    }
}

async fn up(
    mut config: Config,
    handlers_dir: &Path,
    cache_dir: PathBuf,
    mock_erp: &str,
) -> anyhow::Result<()> {
    if config.origin == Origin::Builtin {
        warn!(
            "using the built-in development config: provider `crm` (standard-webhooks) signs with the PUBLIC secret \
             whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw — for local use only, never expose this host"
        );
    }
    let url = config.nats.urls.first().context("nats.url is empty")?;
    let workdir = std::env::current_dir().context("working directory")?;
    let local_nats = local::ensure(url, &workdir).await?;
    if let Some(nats) = &local_nats {
        // Its port may be one it picked itself.
        config.nats.urls = vec![nats.url().to_string()];
    }
    let erp = match mock_erp {
        "off" => None,
        listen => match crate::mock_erp::ensure(listen, &workdir).await {
            Ok(erp) => erp,
            Err(error) => {
                warn!(%error, "no mock ERP: handlers calling an ERP there fail (transient) until one answers");
                None
            }
        },
    };
    let listeners = server::Listeners::bind(&config).await?;
    let address = listeners.webhook.local_addr()?;
    let admin = listeners.admin.local_addr()?;
    info!(
        "hookmesh is up: POST http://{address}/webhooks/<provider> — try: hookmesh send --provider crm --file examples/webhooks/crm-order-created.json — console: http://{admin}/console"
    );
    if let Some(erp) = &erp {
        info!(
            "the mock ERP answers on {url}: curl {url}/sales-orders shows the sales orders the handlers made",
            url = erp.url()
        );
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    if handlers_dir.is_dir() {
        // The handlers of DIR reach the host the way every deploy does:
        // through the store it follows.
        let client = nats::connect(&config.nats, "hookmesh-up", Patience::Background).await?;
        // Its compilations land in the artifact cache the host loads from.
        let runtime = Runtime::new(Some(cache_dir.clone())).context("building the wasm runtime")?;
        tokio::spawn(deploy::dev::watch_dir(
            async_nats::jetstream::new(client),
            handlers_dir.to_path_buf(),
            audit::actor(None, &config),
            Arc::new(runtime),
            stopped,
        ));
    } else {
        info!(dir = %handlers_dir.display(), "no handlers directory; serving ingest only");
    }
    let options = server::Options {
        streams: Mode::Update,
        handlers: Vec::new(),
        cache_dir: Some(cache_dir),
        role: server::Role::All,
    };
    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    };
    let result = server::run(config, listeners, options, shutdown).await;
    if let Some(erp) = erp {
        erp.stop().await;
    }
    if let Some(nats) = local_nats {
        nats.stop().await;
    }
    Ok(result?)
}

async fn serve(
    config: Config,
    handlers_dir: Option<&Path>,
    cache_dir: PathBuf,
    role: server::Role,
) -> anyhow::Result<()> {
    if config.origin == Origin::Builtin {
        bail!(
            "serve needs a config file (--config FILE or ./hookmesh.toml); \
             the built-in development config and its public secret are for `hookmesh up` only"
        );
    }
    let handlers = match handlers_dir {
        Some(dir) => manifest::load_dir(dir)?,
        None => Vec::new(),
    };
    let listeners = server::Listeners::bind(&config).await?;
    let options = server::Options {
        streams: Mode::Ensure,
        handlers,
        cache_dir: Some(cache_dir),
        role,
    };
    Ok(server::run(config, listeners, options, shutdown_signal()).await?)
}

async fn status(config: &Config, json: bool, audit: usize) -> anyhow::Result<()> {
    let client = nats::connect(&config.nats, "hookmesh-cli", Patience::FailFast).await?;
    let snapshot = crate::status::collect(&client, audit).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        print!("{}", crate::status::render::text(&snapshot, colour));
    }
    Ok(())
}

async fn apply_streams(config: &Config) -> anyhow::Result<()> {
    let client = nats::connect(&config.nats, "hookmesh-cli", Patience::FailFast).await?;
    let js = async_nats::jetstream::new(client);
    for (stream, outcome) in
        streams::apply_replicated(&js, &config.ingest, config.nats.replicas, Mode::Update).await?
    {
        println!("{stream:<24} {outcome:?}");
    }
    Ok(())
}

async fn dlq_command(config: &Config, command: DlqCommand) -> anyhow::Result<()> {
    let client = nats::connect(&config.nats, "hookmesh-cli", Patience::FailFast).await?;
    let js = async_nats::jetstream::new(client.clone());
    let check = |reason: &Option<String>| reason.as_deref().map_or(Ok(()), commands::check_reason);
    match command {
        DlqCommand::List {
            handler,
            reason,
            since,
            entity,
        } => {
            check(&reason)?;
            let selection = Selection {
                handler,
                reason,
                since,
                entity,
                older_than: None,
            };
            commands::list(&js, &selection).await
        }
        DlqCommand::Show { seq } => commands::show(&js, seq).await,
        DlqCommand::Replay {
            seqs,
            handler,
            reason,
            since,
            dry_run,
            payload,
            actor,
        } => {
            check(&reason)?;
            let selection = Selection {
                reason,
                since,
                ..Selection::default()
            };
            let target = Target::new(seqs, handler, selection);
            let actor = audit::actor(actor.as_deref(), config);
            commands::replay(&client, &target, payload.as_deref(), dry_run, &actor).await
        }
        DlqCommand::Purge {
            seqs,
            handler,
            older_than,
            reason,
            yes,
            actor,
        } => {
            check(&reason)?;
            let selection = Selection {
                reason,
                older_than,
                ..Selection::default()
            };
            let target = Target::new(seqs, handler, selection);
            let actor = audit::actor(actor.as_deref(), config);
            commands::purge(&js, &target, yes, &actor).await
        }
    }
}

async fn send_file(
    config: &Config,
    provider: &str,
    file: &std::path::Path,
    url: Option<String>,
    event_type: Option<&str>,
    id: Option<&str>,
) -> anyhow::Result<()> {
    let p = config.providers.get(provider).with_context(|| {
        let known: Vec<_> = config.providers.keys().map(String::as_str).collect();
        format!(
            "unknown provider {provider:?}; configured: {}",
            known.join(", ")
        )
    })?;
    let body = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let signed = send::prepare(p, body, event_type, id, SystemTime::now())?;
    let url = url.unwrap_or_else(|| send::default_url(&config.http, provider));
    let answer = send::post(&url, signed).await?;
    println!("{} {}", answer.status, answer.body.trim_end());
    if !(200..300).contains(&answer.status) {
        bail!("the host answered {}", answer.status);
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}
