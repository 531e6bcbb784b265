//! `hookmesh-bench`: hookmesh measured side by side with the raw thing it is
//! built on, in one run, on one machine, so the ratio between the two means
//! something even where absolute numbers do not.
//!
//! Each scenario is a subcommand with its own module; they share the load
//! driver ([`load`]) and the figures and printing ([`stats`]). Every scenario
//! prints a table for people and, as the last line of stdout, one JSON object
//! for scripts — or, when anything failed, a loud error and a non-zero exit
//! instead of figures that would look valid.

mod deploy;
mod dispatch;
mod host;
mod ingest;
mod load;
mod outbound;
mod outbox;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The allocator the `hookmesh` binary runs with (see `host/src/main.rs`):
/// the host is measured here as it ships, and the baseline shares it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The command line.
#[derive(Debug, Parser)]
#[command(
    name = "hookmesh-bench",
    about = "hookmesh side by side with raw JetStream"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

/// One subcommand per scenario.
#[derive(Debug, Subcommand)]
enum Scenario {
    /// Signed webhooks over HTTP into the host vs. raw JetStream publishes.
    Ingest(ingest::Args),
    /// Stored events run through a no-op Wasm handler by the host vs. a raw
    /// JetStream pull consumer fetching and acking.
    Dispatch(dispatch::Args),
    /// Time from `deploy` returning until every running host runs the new
    /// version, vs. a bare KV watch notification.
    Deploy(deploy::Args),
    /// Events through order-sync writing to the mock ERP vs. the same
    /// requests from a native HTTP client; the latency a request gains.
    Outbound(outbound::Args),
    /// A PostgreSQL outbox table drained by the relay vs. raw JetStream
    /// publishes of the same messages; commit → stored latency.
    Outbox(outbox::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The host logs through `tracing`; stdout belongs to the table and the
    // JSON line, so its warnings (the only ones worth seeing here) go to
    // stderr. `RUST_LOG` can widen that while investigating.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("hookmesh-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.scenario {
            Scenario::Ingest(args) => ingest::run(args).await,
            Scenario::Dispatch(args) => dispatch::run(args).await,
            Scenario::Deploy(args) => deploy::run(args).await,
            Scenario::Outbound(args) => outbound::run(args).await,
            Scenario::Outbox(args) => outbox::run(args).await,
        }
    });
    match outcome {
        Ok(stats::Verdict::Clean) => ExitCode::SUCCESS,
        Ok(stats::Verdict::Failed) => ExitCode::from(2),
        Err(e) => {
            eprintln!("hookmesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
