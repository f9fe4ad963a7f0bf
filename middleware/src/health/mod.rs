//! Liveness and readiness, with graceful drain.
//!
//! - **Liveness** (`/health`, `/healthz`): 200 while the process runs. It
//!   touches no dependency, so a replica is not restarted because its
//!   database is slow.
//! - **Readiness** (`/ready`, `/readyz`): 200 only when every critical check
//!   passes and the process is not draining; else 503. Checks run in the
//!   background on an interval with a timeout each; a probe only reads the
//!   last results, so probes never wait on a dependency nor pile load onto a
//!   sick one. A check fails after two misses in a row and recovers after
//!   one success. Until the first round has passed, readiness is 503.
//!
//! Bodies are `application/health+json`, in the shape of the IETF
//! health-check-response draft (draft-inadarei-api-health-check).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tollgate::health::Readiness;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let readiness = Readiness::builder()
//!     .check("database", || async { Ok(()) })
//!     .interval(Duration::from_secs(5))
//!     .start();
//! let app = readiness.router::<()>();
//!
//! let get = |path| http::Request::get(path).body(axum::body::Body::empty()).unwrap();
//! assert_eq!(app.clone().oneshot(get("/health")).await.unwrap().status(), 200);
//! readiness.wait_first_round().await;
//! assert_eq!(app.clone().oneshot(get("/ready")).await.unwrap().status(), 200);
//!
//! readiness.drain();
//! let res = app.oneshot(get("/ready")).await.unwrap();
//! assert_eq!(res.status(), 503);
//! assert_eq!(res.headers()["content-type"], "application/health+json");
//! # }
//! ```

mod readiness;

pub use readiness::{CheckReport, CheckStatus, Readiness, ReadinessBuilder, Report, live};
