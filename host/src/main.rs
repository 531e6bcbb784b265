//! The `hookmesh` binary: logging, then the command line.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Every event allocates and frees many small values (headers, the
/// instance's store, task state) across worker threads; mimalloc's
/// thread-local free lists serve that without the global allocator's
/// consolidation passes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let filter = EnvFilter::try_from_env("HOOKMESH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = hookmesh::cli::Cli::parse();
    match hookmesh::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
