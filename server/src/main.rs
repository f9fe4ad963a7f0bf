//! `tollgate-server`: reads its configuration, sets up logging, serves.

use std::process::ExitCode;

use tollgate_server::config::{Config, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = <tollgate_server::cli::Cli as clap::Parser>::parse();
    if let Some(command) = cli.command {
        return match tollgate_server::cli::run(command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("tollgate-server: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("tollgate-server: {err}");
            return ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    let listener = match tokio::net::TcpListener::bind(config.listen_addr).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::error!(addr = %config.listen_addr, %err, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    // The first signal drains; a second one exits at once.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tollgate_server::shutdown_signal().await;
        let _ = first_tx.send(());
        tollgate_server::shutdown_signal().await;
        tracing::warn!("second signal: exiting now");
        #[allow(clippy::exit)] // deliberate: the operator asked twice
        std::process::exit(130);
    });
    let shutdown = async move {
        let _ = first_rx.await;
    };
    let metrics = match tollgate::metrics::prometheus_builder().install_recorder() {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::error!(%err, "cannot install the metrics recorder");
            return ExitCode::FAILURE;
        }
    };
    match tollgate_server::run(listener, config, metrics, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "server failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}
