//! [`Server`]: bind, start, serve until shut down, in-process.
//!
//! ```no_run
//! # async fn demo(config: tollgate_server::config::Config) -> Result<(), tollgate_server::StartError> {
//! let server = tollgate_server::Server::bind(config, None).await?;
//! let addr = server.local_addr(); // 127.0.0.1:0 picks a free port
//! let shutdown = server.shutdown_handle();
//! let running = tokio::spawn(server.run());
//! // … send requests to `addr` …
//! shutdown.shutdown();
//! running.await.unwrap()?;
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{Config, DatabaseConfig};
use crate::db::{self, DbError};
use crate::routes::metrics::MetricsTasks;
use crate::state::{AppState, StartError};
use crate::{app, cleanup, routes, serve, shared_cache};

/// A bound, started server: its database is migrated and audited, its
/// background tasks run; [`run`](Self::run) serves.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    state: AppState,
    shutdown: ShutdownHandle,
    _tasks: Tasks,
}

/// Starts a graceful shutdown of a [`Server`]: readiness fails and
/// responses carry `Connection: close` for `SHUTDOWN_DRAIN_DELAY`, then
/// the server stops accepting and in-flight requests get at most
/// `SHUTDOWN_TIMEOUT`.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle(Arc<Notify>);

impl ShutdownHandle {
    /// Begins the shutdown (idempotent).
    pub fn shutdown(&self) {
        self.0.notify_one();
    }

    async fn requested(&self) {
        self.0.notified().await;
    }
}

/// Background tasks, stopped when the server is dropped.
#[derive(Debug)]
struct Tasks {
    _metrics: MetricsTasks,
    _others: Vec<AbortOnDrop>,
}

impl Server {
    /// Binds `config.listen_addr`, builds the state, prepares the database
    /// (migrations unless `DB_MIGRATE_ON_START=false`, then the row-level
    /// security audit, which refuses a role that could read across
    /// tenants) and starts the background tasks.
    ///
    /// `metrics` renders `/metrics`; the recorder is installed by the
    /// caller, once per process.
    pub async fn bind(
        config: Config,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, StartError> {
        let listener = TcpListener::bind(config.listen_addr).await?;
        let addr = listener.local_addr()?;
        if config.auth.secret_generated {
            tracing::warn!(
                "AUTH_SECRET unset (development): tokens are signed with a random per-process key"
            );
        }
        let database = config.database.clone();
        // Said before the first query: migrations through a pooler can hang.
        for fallback in db::pooler_fallbacks(&database, config.trust_broadcast) {
            tracing::warn!(
                "DB_STATEMENT_CACHE=0 (DATABASE_URL through a transaction-mode pooler) and no \
                 DATABASE_DIRECT_URL: {fallback}"
            );
        }
        let state = AppState::new(config, metrics)?;
        prepare_database(&database, &state.pool).await?;
        // The first round ran while migrations were still under way (its
        // `migrations` check failed on a fresh database): check again now
        // rather than one READY_CHECK_INTERVAL later.
        state.readiness.check_now();
        let metrics_tasks = routes::metrics::spawn(&state, state.config.metrics_addr).await?;
        let mut others = Vec::new();
        if let Some(admin) = state.config.admin_addr {
            others.push(AbortOnDrop(routes::operator::spawn(&state, admin).await?));
        }
        others.push(AbortOnDrop(cleanup::spawn(
            state.system_pool.clone(),
            state.config.cleanup_interval,
            state.config.item_retention,
            addr.to_string(),
        )));
        if state.config.trust_broadcast {
            let options = db::direct_options(&state.config.database)?;
            // One connection LISTENs for both caches.
            others.push(AbortOnDrop(shared_cache::spawn_listener(
                vec![
                    Arc::new(state.trust.cache().clone()),
                    Arc::new(state.plans.cache().clone()),
                ],
                state.system_pool.clone(),
                options,
                format!("tollgate-listener {addr}"),
            )));
        }
        tracing::info!(%addr, "listening");
        Ok(Self {
            listener,
            state,
            shutdown: ShutdownHandle::default(),
            _tasks: Tasks {
                _metrics: metrics_tasks,
                _others: others,
            },
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Its state (tests read pools and caches through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// A handle that starts its graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until the [`ShutdownHandle`] fires, then drains (see there).
    pub async fn run(self) -> Result<(), StartError> {
        let Self {
            listener,
            state,
            shutdown,
            _tasks,
        } = self;
        let config = state.config.clone();
        let (timeout, drain_delay) = (config.shutdown_timeout, config.shutdown_drain_delay);
        let readiness = state.readiness.clone();
        let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.requested().await;
            readiness.drain();
            tracing::info!(?drain_delay, "shutdown signal received; draining");
            tokio::time::sleep(drain_delay).await;
            tracing::info!("no longer accepting; finishing in-flight requests");
            let _ = signalled_tx.send(());
        };
        let server = serve::serve(
            listener,
            app(state),
            config.http.header_read_timeout,
            signal,
        );
        // Graceful shutdown waits forever for open connections; enforce a
        // deadline so one idle keep-alive connection cannot stall a deploy.
        let deadline = async move {
            if signalled_rx.await.is_ok() {
                tokio::time::sleep(timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = server => {},
            () = deadline => tracing::warn!(?timeout, "shutdown deadline passed; closing remaining connections"),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Start-up database work: migrations (unless `DB_MIGRATE_ON_START=false`)
/// and the row-level security audit of the server's own role, which stops
/// the server when the role could read across tenants.
pub async fn prepare_database(config: &DatabaseConfig, pool: &PgPool) -> Result<(), DbError> {
    if config.migrate_on_start {
        db::migrate(config).await?;
        tracing::info!("migrations applied");
    }
    tollgate::tenant::audit_allowing(pool, db::SECURITY_DEFINERS).await?;
    tracing::info!("database role audited: row-level security applies to it");
    Ok(())
}

/// Aborts a background task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment this is
/// made: make it before the server says it is listening, so a signal sent
/// as soon as the address is known drains instead of killing the process
/// (the default action while no handler is installed).
#[derive(Debug)]
pub struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers. Needs a Tokio runtime.
    pub fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.terminate.recv() => {},
            _ = self.interrupt.recv() => {},
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
