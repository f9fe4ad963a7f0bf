//! [`Readiness`]: background checks, drain flag, and the probe routes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use tokio::sync::watch;

type CheckFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Misses in a row before a check counts as failing: one slow answer
/// should not pull a replica out of the load balancer.
const MISSES_TO_FAIL: u32 = 2;

/// The readiness of this process: named checks run in the background, and
/// a drain flag set on shutdown.
///
/// Cloning is cheap; every clone sees the same state. The background task
/// ends when the last clone is dropped.
///
/// See the [module docs](crate::health) for an example.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
    /// Wakes the background task for a round now (outside `Inner`, so the
    /// task can wait on it without keeping the readiness alive).
    wake: Arc<tokio::sync::Notify>,
}

struct Inner {
    checks: Vec<Entry>,
    draining: AtomicBool,
    /// Results, replaced after each round; `None` before the first.
    report: watch::Sender<Option<Vec<CheckReport>>>,
    timeout: Duration,
}

struct Entry {
    name: String,
    critical: bool,
    /// Whether this module logs the check's transitions (not when the
    /// checked thing logs its own).
    logged: bool,
    run: CheckFn,
}

/// Builds a [`Readiness`].
pub struct ReadinessBuilder {
    checks: Vec<Entry>,
    interval: Duration,
    timeout: Duration,
}

/// One check's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Answering.
    Pass,
    /// Missed once: still counted as passing.
    Warn,
    /// Missed twice or more in a row.
    Fail,
}

/// One check's last result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The check's name.
    #[serde(skip)]
    pub name: String,
    /// Its state.
    pub status: CheckStatus,
    /// How long the last run took, in milliseconds.
    #[serde(rename = "observedValue")]
    pub latency_ms: f64,
    /// Always `"ms"`.
    #[serde(rename = "observedUnit")]
    pub unit: &'static str,
    /// The last error, if the last run failed. Logged when the check
    /// starts failing, never served: `/ready` is public, and driver errors
    /// name hosts, users and databases.
    #[serde(skip)]
    pub last_error: Option<String>,
    /// Whether the check gates readiness.
    #[serde(rename = "affectsReadiness")]
    pub critical: bool,
    /// Misses in a row.
    #[serde(skip)]
    pub misses: u32,
}

/// The readiness of the process at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `pass` when ready, else `fail`.
    pub status: &'static str,
    /// Why not ready, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<&'static str>,
    /// Per check.
    pub checks: std::collections::BTreeMap<String, [CheckReport; 1]>,
}

// === impl ReadinessBuilder ===

impl ReadinessBuilder {
    /// Adds a critical check: readiness fails while it fails. `check`
    /// returns an error message on failure; it is cut off at the timeout.
    #[must_use]
    pub fn check<F, Fut>(self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.add(name.into(), true, check)
    }

    /// Adds a check that is reported but does not gate readiness.
    #[must_use]
    pub fn non_critical_check<F, Fut>(self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.add(name.into(), false, check)
    }

    fn add<F, Fut>(mut self, name: String, critical: bool, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push(Entry {
            name,
            critical,
            logged: true,
            run: Arc::new(move || Box::pin(check())),
        });
        self
    }

    /// The check added last is not logged here when it starts failing or
    /// passes again: for a dependency that logs its own transitions (a
    /// store's circuit breaker), so each is logged once. Its status is
    /// still reported and measured.
    #[must_use]
    pub fn logged_by_source(mut self) -> Self {
        if let Some(entry) = self.checks.last_mut() {
            entry.logged = false;
        }
        self
    }

    /// How often checks run (default 5 s).
    #[must_use]
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// How long one check may take (default 2 s): a check that does not
    /// answer in time has missed.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Starts the background checks (the first round at once).
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start(self) -> Readiness {
        let (report, _) = watch::channel(None);
        let inner = Arc::new(Inner {
            checks: self.checks,
            draining: AtomicBool::new(false),
            report,
            timeout: self.timeout,
        });
        // Every gauge exists from the start, not from its first change.
        #[cfg(feature = "metrics")]
        {
            metrics::gauge!(crate::metrics::READY).set(0.0);
            metrics::gauge!(crate::metrics::DRAINING).set(0.0);
        }
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(run_checks(
            Arc::downgrade(&inner),
            wake.clone(),
            self.interval,
        ));
        Readiness { inner, wake }
    }
}

impl fmt::Debug for ReadinessBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadinessBuilder")
            .field(
                "checks",
                &self.checks.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Runs every check each `interval`, and at once when woken
/// ([`Readiness::check_now`]), until the readiness is dropped.
async fn run_checks(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = wake.notified() => tick.reset(),
        }
        let Some(inner) = inner.upgrade() else { return };
        let previous = inner.report.borrow().clone();
        let mut round = tokio::task::JoinSet::new();
        for (i, entry) in inner.checks.iter().enumerate() {
            let run = entry.run.clone();
            let timeout = inner.timeout;
            round.spawn(async move {
                let started = tokio::time::Instant::now();
                let result = match tokio::time::timeout(timeout, run()).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (i, result, started.elapsed())
            });
        }
        let mut reports: Vec<CheckReport> = inner
            .checks
            .iter()
            .map(|entry| CheckReport {
                name: entry.name.clone(),
                status: CheckStatus::Fail,
                latency_ms: 0.0,
                unit: "ms",
                last_error: None,
                critical: entry.critical,
                misses: 0,
            })
            .collect();
        while let Some(joined) = round.join_next().await {
            let Ok((i, result, took)) = joined else {
                continue;
            };
            let misses_before = previous.as_ref().map_or(0, |p| p[i].misses);
            let report = &mut reports[i];
            report.latency_ms = took.as_secs_f64() * 1000.0;
            match result {
                Ok(()) => report.status = CheckStatus::Pass,
                Err(error) => {
                    // Before the first pass, one miss is a failure.
                    report.misses = misses_before + 1;
                    report.status = if report.misses >= MISSES_TO_FAIL || previous.is_none() {
                        CheckStatus::Fail
                    } else {
                        CheckStatus::Warn
                    };
                    report.last_error = Some(error);
                }
            }
            let was = previous.as_ref().map(|p| p[i].status);
            if !inner.checks[i].logged {
                continue;
            }
            // Failing since the first round counts as starting to fail:
            // its error is logged once, like any other.
            if was != Some(CheckStatus::Fail) && report.status == CheckStatus::Fail {
                tracing::warn!(check = %report.name, error = ?report.last_error, "readiness check failing");
            } else if was == Some(CheckStatus::Fail) && report.status == CheckStatus::Pass {
                tracing::info!(check = %report.name, "readiness check passing again");
            }
        }
        #[cfg(feature = "metrics")]
        for report in &reports {
            let up = if report.status == CheckStatus::Fail {
                0.0
            } else {
                1.0
            };
            metrics::gauge!(crate::metrics::READINESS_CHECK, "check" => report.name.clone())
                .set(up);
        }
        inner.report.send_replace(Some(reports));
        #[cfg(feature = "metrics")]
        metrics::gauge!(crate::metrics::READY).set(if inner.is_ready() { 1.0 } else { 0.0 });
    }
}

impl Inner {
    fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.report.borrow().as_ref().is_some_and(|checks| {
                checks
                    .iter()
                    .all(|c| !c.critical || c.status != CheckStatus::Fail)
            })
    }
}

// === impl Readiness ===

impl Readiness {
    /// A builder with no checks, a 5 s interval and a 2 s timeout.
    pub fn builder() -> ReadinessBuilder {
        ReadinessBuilder {
            checks: Vec::new(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
        }
    }

    /// Whether the process should receive traffic: the first round has
    /// run, every critical check passes, and it is not draining.
    pub fn is_ready(&self) -> bool {
        self.inner.is_ready()
    }

    /// Marks the process as draining: readiness fails from now on, so the
    /// load balancer stops sending traffic. Irreversible.
    pub fn drain(&self) {
        if !self.inner.draining.swap(true, Ordering::AcqRel) {
            tracing::info!("draining: readiness now fails");
            #[cfg(feature = "metrics")]
            {
                metrics::gauge!(crate::metrics::DRAINING).set(1.0);
                metrics::gauge!(crate::metrics::READY).set(0.0);
            }
        }
    }

    /// The shutdown future for `axum::serve(..).with_graceful_shutdown(..)`
    /// that drains first: waits for `signal`, marks the process draining
    /// (`/ready` answers 503), keeps serving — the listener still accepts —
    /// for `delay`, so the load balancer sees the 503 and stops sending new
    /// connections, then resolves; axum then stops accepting and lets
    /// requests in flight finish. `with_graceful_shutdown(signal)` alone
    /// would close the listener the moment the signal arrives, while the
    /// load balancer still sends traffic.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tollgate::health::Readiness;
    ///
    /// # #[tokio::main]
    /// # async fn main() {
    /// let readiness = Readiness::builder().check("db", || async { Ok(()) }).start();
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    /// let addr = listener.local_addr().unwrap();
    /// let app = readiness.router::<()>();
    /// // In a real server: `tokio::signal::ctrl_c()` or SIGTERM.
    /// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    /// let signal = async { stopped.await.ok(); };
    /// let server = tokio::spawn(
    ///     axum::serve(listener, app)
    ///         .with_graceful_shutdown(readiness.drain_after(signal, Duration::from_millis(300)))
    ///         .into_future(),
    /// );
    /// readiness.wait_first_round().await;
    /// stop.send(()).unwrap();
    /// tokio::time::sleep(Duration::from_millis(50)).await;
    /// // Draining: still accepting, and /ready says 503.
    /// let ready = tokio::net::TcpStream::connect(addr).await;
    /// assert!(ready.is_ok(), "closed before the drain delay");
    /// assert!(readiness.is_draining());
    /// server.await.unwrap().unwrap();
    /// // After the delay the listener is closed.
    /// assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    /// # }
    /// ```
    pub fn drain_after(
        &self,
        signal: impl Future<Output = ()> + Send + 'static,
        delay: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let readiness = self.clone();
        async move {
            signal.await;
            readiness.drain();
            tokio::time::sleep(delay).await;
        }
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Runs a round of checks now instead of at the next interval (or
    /// right after the round under way), e.g. once start-up work a check
    /// waits for (migrations) is done, so the process is ready as soon as
    /// it can be rather than one interval later.
    pub fn check_now(&self) {
        self.wake.notify_one();
    }

    /// Waits until the first round of checks has finished.
    pub async fn wait_first_round(&self) {
        let mut rx = self.inner.report.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// The current state, as the readiness probe reports it.
    pub fn report(&self) -> Report {
        let ready = self.is_ready();
        let checks = self.inner.report.borrow().clone();
        let output = if self.is_draining() {
            Some("draining")
        } else if checks.is_none() {
            Some("starting: first round of checks not finished")
        } else if !ready {
            Some("a critical check is failing")
        } else {
            None
        };
        Report {
            status: if ready { "pass" } else { "fail" },
            output,
            checks: checks
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c.name.clone(), [c]))
                .collect(),
        }
    }

    /// `/health`, `/healthz`, `/ready` and `/readyz`.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        let readiness = self.clone();
        let ready = move || {
            let readiness = readiness.clone();
            async move { readiness.report().into_response() }
        };
        Router::new()
            .route("/health", get(|| async { live() }))
            .route("/healthz", get(|| async { live() }))
            .route("/ready", get(ready.clone()))
            .route("/readyz", get(ready))
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readiness")
            .field("ready", &self.is_ready())
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

/// The media type of the health-check-response draft.
const HEALTH_JSON: &str = "application/health+json";

fn health_json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(HEALTH_JSON));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The liveness answer: 200 `{"status":"pass"}` as
/// `application/health+json`, for a `/health` route of your own.
pub fn live() -> Response {
    health_json(StatusCode::OK, br#"{"status":"pass"}"#.to_vec())
}

impl IntoResponse for Report {
    fn into_response(self) -> Response {
        let status = if self.status == "pass" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        health_json(status, serde_json::to_vec(&self).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// A check whose answer the test sets.
    fn switch() -> (
        Arc<AtomicBool>,
        impl Fn() -> std::future::Ready<Result<(), String>> + Send + Sync + 'static,
    ) {
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        (up, move || {
            std::future::ready(if flag.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("down".to_owned())
            })
        })
    }

    async fn next_round(r: &Readiness) {
        let mut rx = r.inner.report.subscribe();
        rx.borrow_and_update();
        let _ = rx.changed().await;
    }

    #[tokio::test(start_paused = true)]
    async fn not_ready_before_the_first_round_then_ready() {
        let (_, check) = switch();
        let r = Readiness::builder().check("db", check).start();
        assert!(!r.is_ready());
        assert_eq!(
            r.report().output,
            Some("starting: first round of checks not finished")
        );
        r.wait_first_round().await;
        assert!(r.is_ready());
    }

    #[tokio::test(start_paused = true)]
    async fn check_now_runs_a_round_without_waiting_for_the_interval() {
        let (up, check) = switch();
        up.store(false, Ordering::SeqCst);
        let r = Readiness::builder()
            .check("migrations", check)
            .interval(Duration::from_secs(3600))
            .start();
        r.wait_first_round().await;
        assert!(!r.is_ready(), "the first round failed");
        up.store(true, Ordering::SeqCst);
        let asked = tokio::time::Instant::now();
        r.check_now();
        next_round(&r).await;
        assert!(r.is_ready());
        // Paused time advances only to a timer: the round came at once,
        // not at the next tick an hour on.
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fails_after_two_misses_and_recovers_after_one_success() {
        let (up, check) = switch();
        let r = Readiness::builder()
            .check("db", check)
            .interval(Duration::from_secs(1))
            .start();
        r.wait_first_round().await;
        up.store(false, Ordering::SeqCst);
        next_round(&r).await;
        assert!(r.is_ready(), "one miss is a warning");
        assert_eq!(r.report().checks["db"][0].status, CheckStatus::Warn);
        next_round(&r).await;
        assert!(!r.is_ready());
        let report = r.report();
        assert_eq!(report.checks["db"][0].status, CheckStatus::Fail);
        assert_eq!(report.checks["db"][0].last_error.as_deref(), Some("down"));
        // The public body names the check and its status, not the error.
        let body = serde_json::to_string(&report).unwrap();
        assert!(body.contains(r#""status":"fail""#), "{body}");
        assert!(!body.contains("down"), "error detail served: {body}");
        up.store(true, Ordering::SeqCst);
        next_round(&r).await;
        assert!(r.is_ready());
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_check_logged_by_its_source_is_not_logged_again() {
        let logs = tollgate_test_support::LogCapture::start();
        let (db_up, db) = switch();
        let (store_up, store) = switch();
        let r = Readiness::builder()
            .check("db", db)
            .non_critical_check("store", store)
            .logged_by_source()
            .interval(Duration::from_secs(1))
            .start();
        r.wait_first_round().await;
        db_up.store(false, Ordering::SeqCst);
        store_up.store(false, Ordering::SeqCst);
        next_round(&r).await;
        next_round(&r).await;
        assert_eq!(r.report().checks["store"][0].status, CheckStatus::Fail);
        let text = logs.text();
        assert!(text.contains("readiness check failing check=db"), "{text}");
        assert!(!text.contains("check=store"), "{text}");
    }

    /// A check that fails from its very first round is logged, once.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_check_failing_from_the_first_round_is_logged_once() {
        let logs = tollgate_test_support::LogCapture::start();
        let r = Readiness::builder()
            .check("db", || async {
                Err::<(), _>("connection refused".to_owned())
            })
            .interval(Duration::from_secs(1))
            .start();
        r.wait_first_round().await;
        next_round(&r).await;
        next_round(&r).await;
        let text = logs.text();
        assert_eq!(
            text.matches("readiness check failing check=db").count(),
            1,
            "{text}"
        );
        assert!(text.contains("connection refused"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_times_out_and_probes_never_wait() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let r = Readiness::builder()
            .check("stuck", move || {
                counted.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<Result<(), String>>()
            })
            .timeout(Duration::from_millis(100))
            .interval(Duration::from_secs(1))
            .start();
        r.wait_first_round().await;
        let report = r.report();
        assert_eq!(report.status, "fail");
        assert!(
            report.checks["stuck"][0]
                .last_error
                .as_deref()
                .unwrap()
                .contains("no answer")
        );
        // Reading readiness runs nothing.
        let before = runs.load(Ordering::SeqCst);
        for _ in 0..100 {
            let _ = r.report();
        }
        assert_eq!(runs.load(Ordering::SeqCst), before);
    }

    #[tokio::test(start_paused = true)]
    async fn non_critical_checks_are_reported_but_do_not_gate() {
        let (up, check) = switch();
        up.store(false, Ordering::SeqCst);
        let r = Readiness::builder()
            .non_critical_check("cache", check)
            .start();
        r.wait_first_round().await;
        assert!(r.is_ready());
        let json = serde_json::to_value(r.report()).unwrap();
        assert_eq!(json["checks"]["cache"][0]["status"], "fail");
        assert_eq!(json["checks"]["cache"][0]["affectsReadiness"], false);
        assert_eq!(json["checks"]["cache"][0]["observedUnit"], "ms");
    }

    #[tokio::test(start_paused = true)]
    async fn draining_fails_readiness() {
        let r = Readiness::builder().start();
        r.wait_first_round().await;
        assert!(r.is_ready());
        r.drain();
        assert!(!r.is_ready());
        assert_eq!(r.report().output, Some("draining"));
    }
}
