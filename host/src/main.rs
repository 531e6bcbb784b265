//! The `hookmesh` binary: the command line (which sets up the log once the
//! config says how).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = hookmesh::cli::Cli::parse();
    match hookmesh::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
