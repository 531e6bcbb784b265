//! `hookmesh-mock-erp`: the mock ERP as a process (what `hookmesh up`
//! starts). See the library's documentation for its API.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

/// A small ERP on loopback: sales orders, credit notes, Idempotency-Key,
/// scripted failures.
#[derive(Debug, Parser)]
#[command(name = "hookmesh-mock-erp", version, about)]
struct Cli {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = hookmesh_mock_erp::DEFAULT_LISTEN)]
    listen: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let listener = match tokio::net::TcpListener::bind(&cli.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("hookmesh-mock-erp: cannot listen on {}: {e}", cli.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(address) => tracing::info!("mock ERP listening on http://{address}"),
        Err(e) => {
            eprintln!("hookmesh-mock-erp: {e}");
            return ExitCode::FAILURE;
        }
    }
    let erp = Arc::new(hookmesh_mock_erp::Erp::default());
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match hookmesh_mock_erp::serve(listener, erp, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookmesh-mock-erp: {e}");
            ExitCode::FAILURE
        }
    }
}
