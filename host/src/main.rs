//! The `hookmesh` binary: the command line (which sets up the log once the
//! config says how).

use clap::Parser;

/// Every event allocates and frees many small values (headers, the
/// instance's store, task state) across worker threads; mimalloc's
/// thread-local free lists serve that without the global allocator's
/// consolidation passes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = hookmesh::cli::Cli::parse();
    match hookmesh::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // A forbidden request fails as a timeout; the server said why.
            if let Some(denied) = hookmesh::nats::last_denial() {
                eprintln!(
                    "NATS refused: {denied} — this NATS user lacks the permission (see nats/roles.conf)"
                );
            }
            std::process::ExitCode::FAILURE
        }
    }
}
