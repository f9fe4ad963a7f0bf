//! Serving the app over HTTP/1.1 with hyper directly, for the one deadline
//! `axum::serve` does not expose: how long a client may take to send a
//! request head. A slowloris client (a header byte every few seconds) is
//! disconnected after `HTTP_HEADER_READ_TIMEOUT`. Body and whole-request
//! deadlines are layers ([`tollgate::timeout`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

/// `tollgate_http_header_timeouts_total`: connections closed because the
/// request head did not arrive in time.
pub const HEADER_TIMEOUTS: &str = "tollgate_http_header_timeouts_total";

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// waits for open connections to finish their current request (each is
/// closed after it). The caller bounds that wait.
pub async fn serve<S>(
    listener: TcpListener,
    app: S,
    header_read_timeout: Option<Duration>,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off a
                    // little rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            app.clone().oneshot(req)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                if err.is_timeout() {
                    metrics::counter!(HEADER_TIMEOUTS).increment(1);
                    tracing::debug!(%peer, "request head not sent in time; connection closed");
                } else {
                    tracing::debug!(%peer, %err, "connection ended with an error");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
