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
                err.exit_code()
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
    // Flush buffered log lines when main returns.
    let _log_writer = init_tracing(config.log_format);
    // Access lines skip `tracing`'s formatter and its per-line queue.
    let _access_log = tollgate_server::access_log::install(config.log_format == LogFormat::Json);
    let metrics = match tollgate::metrics::prometheus_builder().install_recorder() {
        Ok(handle) => Some(handle),
        Err(err) => {
            tracing::error!(%err, "cannot install the metrics recorder");
            return ExitCode::FAILURE;
        }
    };
    // Before the address is logged: from then on a signal drains.
    let mut signals = match tollgate_server::ShutdownSignals::new() {
        Ok(signals) => signals,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM and SIGINT");
            return ExitCode::FAILURE;
        }
    };
    let server = match tollgate_server::Server::bind(config, metrics).await {
        Ok(server) => server,
        Err(err) => {
            tracing::error!(%err, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // The first signal drains; a second one exits at once.
    let shutdown = server.shutdown_handle();
    tokio::spawn(async move {
        signals.recv().await;
        shutdown.shutdown();
        signals.recv().await;
        tracing::warn!("second signal: exiting now");
        #[allow(clippy::exit)] // deliberate: the operator asked twice
        std::process::exit(130);
    });
    match server.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stdout through a non-blocking writer: lines go to a queue a
/// dedicated thread writes out, so a slow or blocked stdout never stalls a
/// request (when the queue is full, lines are dropped, not waited for).
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Buffered: the writer thread writes every line queued since its last
    // pass, then flushes, so a busy server makes one write per batch of
    // lines rather than one per line (stdout alone flushes every line).
    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(stdout);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    guard
}
