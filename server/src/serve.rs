//! Serving the app over HTTP/1.1 with hyper directly, for the one deadline
//! `axum::serve` does not expose: how long a client may take to send a
//! request head. A slowloris client (a header byte every few seconds), or
//! a keep-alive connection left idle, is disconnected after
//! `HTTP_HEADER_READ_TIMEOUT`. Body and whole-request deadlines are layers
//! ([`tollgate::timeout`]).
//!
//! The head deadline is kept per connection, not per request: hyper's own
//! header read timeout boxes a timer for every request head and registers
//! it in tokio's timer wheel while the connection waits (about 1 300
//! instructions a request, measured under callgrind). Here each connection
//! has one timer, moved only when it fires. A request marks the connection
//! busy until its response body is dropped (hyper drops it once it has
//! taken the last of it) and the connection's writes are then flushed to
//! the socket: only from then does the wait for the next head count. So a
//! client slow to read a large response is not taken for a late head.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::{Body, HttpBody};
use axum::extract::ConnectInfo;
use axum::response::Response;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tokio::time::Instant;
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
    let mut shutdown = pin!(shutdown);
    let mut http = http1::Builder::new();
    // The head deadline is `HeadClock`'s; without this hyper would arm
    // its default one (30 s) per request head.
    http.timer(TokioTimer::new()).header_read_timeout(None);
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
        match header_read_timeout {
            // No clock, no wrappers: nothing to mark.
            None => {
                let service = hyper::service::service_fn(move |req| {
                    app.clone().oneshot(with_peer(req, peer))
                });
                spawn_connection(&http, &graceful, TokioIo::new(stream), service, None, peer);
            }
            Some(limit) => {
                let clock = Arc::new(HeadClock::new());
                let service = hyper::service::service_fn({
                    let clock = clock.clone();
                    move |req| {
                        let answered = Answered::start(clock.clone());
                        let (app, req) = (app.clone(), with_peer(req, peer));
                        async move {
                            let res = app.oneshot(req).await?;
                            Ok::<_, Infallible>(res.map(|body| AnsweredBody { body, answered }))
                        }
                    }
                });
                let io = FlushMarked {
                    io: TokioIo::new(stream),
                    clock: clock.clone(),
                };
                let deadline = Some((clock, limit));
                spawn_connection(&http, &graceful, io, service, deadline, peer);
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// axum's body, and the peer's address where `axum::serve` puts it.
fn with_peer(req: Request<Incoming>, peer: SocketAddr) -> Request<Body> {
    let mut req = req.map(Body::new);
    req.extensions_mut().insert(ConnectInfo(peer));
    req
}

/// Serves one connection on a task of its own; with a `deadline`, closes
/// it when a request head is late.
fn spawn_connection<I, S>(
    http: &http1::Builder,
    graceful: &GracefulShutdown,
    io: I,
    service: S,
    deadline: Option<(Arc<HeadClock>, Duration)>,
    peer: SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    S::ResBody: Send + 'static,
    <S::ResBody as HttpBody>::Data: Send,
    <S::ResBody as HttpBody>::Error: Into<BoxError>,
{
    let connection = graceful.watch(http.serve_connection(io, service));
    tokio::spawn(async move {
        let ended = match deadline {
            Some((clock, limit)) => clock.guard(connection, limit).await,
            None => Some(connection.await),
        };
        match ended {
            None => {
                metrics::counter!(HEADER_TIMEOUTS).increment(1);
                tracing::debug!(%peer, "request head not sent in time; connection closed");
            }
            Some(Err(err)) => tracing::debug!(%peer, %err, "connection ended with an error"),
            Some(Ok(())) => {}
        }
    });
}

/// When a connection began waiting for its next request head.
#[derive(Debug)]
struct HeadClock {
    origin: Instant,
    /// Nanoseconds from `origin` to when the last response was flushed
    /// (0: the connection's start).
    waiting_since: AtomicU64,
    /// Requests whose response body hyper has not let go of yet.
    busy: AtomicU32,
    /// Responses hyper has let go of whose bytes may not be flushed yet.
    unflushed: AtomicU32,
}

impl HeadClock {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            waiting_since: AtomicU64::new(0),
            busy: AtomicU32::new(0),
            unflushed: AtomicU32::new(0),
        }
    }

    /// A request head arrived.
    fn request_started(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    /// hyper let go of the response's body (or the request was given up).
    fn response_taken(&self) {
        self.unflushed.fetch_add(1, Ordering::AcqRel);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// The connection's writes were flushed to the socket: a response let
    /// go of before is out, and the wait for the next head starts now.
    fn flushed(&self) {
        if self.unflushed.load(Ordering::Acquire) == 0 {
            return;
        }
        let since = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.waiting_since.store(since, Ordering::Release);
        self.unflushed.store(0, Ordering::Release);
    }

    /// When the head being waited for is overdue; `None` while a request
    /// is being answered or its response is not flushed yet.
    fn deadline(&self, limit: Duration) -> Option<Instant> {
        if self.busy.load(Ordering::Acquire) > 0 || self.unflushed.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.waiting_since.load(Ordering::Acquire));
        Some(self.origin + since + limit)
    }

    /// Runs `connection` until it ends, or until a head is `limit` late
    /// (`None`: the connection is dropped, which closes it). The one timer
    /// is checked only when it fires, and then set to the current deadline.
    async fn guard<F: Future>(&self, connection: F, limit: Duration) -> Option<F::Output> {
        let mut connection = pin!(connection);
        let mut timer = pin!(tokio::time::sleep(limit));
        loop {
            tokio::select! {
                biased;
                ended = &mut connection => return Some(ended),
                () = &mut timer => {
                    let now = Instant::now();
                    match self.deadline(limit) {
                        Some(deadline) if deadline <= now => return None,
                        Some(deadline) => timer.as_mut().reset(deadline),
                        None => timer.as_mut().reset(now + limit),
                    }
                }
            }
        }
    }
}

/// A request being answered: marks its connection busy, and the response
/// taken when dropped (hyper drops a response's body once it has taken
/// the last of it, or given up on it; a request abandoned before its
/// response drops it with the service's future).
#[derive(Debug)]
struct Answered(Arc<HeadClock>);

impl Answered {
    fn start(clock: Arc<HeadClock>) -> Self {
        clock.request_started();
        Self(clock)
    }
}

impl Drop for Answered {
    fn drop(&mut self) {
        self.0.response_taken();
    }
}

pin_project! {
    /// A response body that marks its response taken when dropped.
    #[derive(Debug)]
    struct AnsweredBody {
        #[pin]
        body: Body,
        answered: Answered,
    }
}

impl HttpBody for AnsweredBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, marking its [`HeadClock`] when hyper's writes
/// are flushed (hyper flushes the socket only once its write buffer is
/// empty: everything it was given is in the kernel).
#[derive(Debug)]
struct FlushMarked<T> {
    io: T,
    clock: Arc<HeadClock>,
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for FlushMarked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for FlushMarked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            self.clock.flushed();
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, sleep};

    use super::*;

    const LIMIT: Duration = Duration::from_millis(300);
    /// More than loopback's socket buffers hold.
    const BIG: usize = 32 << 20;

    /// The server on a loopback port with a `LIMIT` head deadline.
    async fn start() -> SocketAddr {
        start_with(Some(LIMIT)).await
    }

    /// The server on a loopback port: `/` answers at once, `/slow` after
    /// twice the limit, `/trickle` sends its body in three parts over
    /// twice the limit, `/big` answers `BIG` bytes.
    async fn start_with(head_deadline: Option<Duration>) -> SocketAddr {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    sleep(LIMIT * 2).await;
                    "slow"
                }),
            )
            .route("/trickle", get(|| async { Body::new(Trickle::default()) }))
            .route("/big", get(|| async { vec![b'x'; BIG] }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, head_deadline, std::future::pending()));
        addr
    }

    /// Sends a GET for `path` and reads its response (`None`: the
    /// connection was closed first).
    async fn get_on(stream: &mut TcpStream, path: &str) -> Option<String> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        read_response(stream).await
    }

    /// Reads one response with a `content-length` or chunked body.
    async fn read_response(stream: &mut TcpStream) -> Option<String> {
        let mut text = Vec::new();
        let mut buf = [0; 1024];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("no answer within 5 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            text.extend_from_slice(&buf[..n]);
            let s = String::from_utf8_lossy(&text).into_owned();
            if let Some((head, body)) = s.split_once("\r\n\r\n") {
                let lower = head.to_ascii_lowercase();
                let complete = match lower.split("content-length: ").nth(1) {
                    Some(rest) => {
                        let len: usize = rest.lines().next()?.trim().parse().ok()?;
                        body.len() >= len
                    }
                    None => body.ends_with("0\r\n\r\n"),
                };
                if complete {
                    return Some(s);
                }
            }
        }
    }

    /// How long until the peer closes the connection, while a head is
    /// sent a byte every 50 ms.
    async fn closed_while_trickling_a_head(stream: &mut TcpStream) -> Duration {
        let started = Instant::now();
        for byte in
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if stream.write_all(&[*byte]).await.is_err() {
                return started.elapsed();
            }
            let mut buf = [0; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
            {
                return started.elapsed();
            }
        }
        panic!("the connection was not closed while its head trickled in");
    }

    #[tokio::test]
    async fn a_late_head_closes_the_connection_counted_from_the_last_response() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The first request comes when two thirds of the limit are gone:
        // the next head's deadline runs from its response, not from the
        // connection's start.
        sleep(LIMIT * 2 / 3).await;
        assert!(
            get_on(&mut stream, "/")
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
        let closed = closed_while_trickling_a_head(&mut stream).await;
        assert!(
            closed >= LIMIT - Duration::from_millis(50) && closed < LIMIT * 3,
            "closed {closed:?} after the response, limit {LIMIT:?}"
        );

        // A first head that never completes.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let closed = closed_while_trickling_a_head(&mut stream).await;
        assert!(closed >= LIMIT - Duration::from_millis(50) && closed < LIMIT * 3);
    }

    #[tokio::test]
    async fn heads_in_time_keep_the_connection_past_the_limit() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        for _ in 0..10 {
            let res = get_on(&mut stream, "/").await;
            assert!(res.expect("connection closed").starts_with("HTTP/1.1 200"));
            sleep(LIMIT / 3).await;
        }
        assert!(started.elapsed() > LIMIT * 3);
    }

    #[tokio::test]
    async fn a_slow_answer_or_body_is_not_a_late_head() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let slow = get_on(&mut stream, "/slow")
            .await
            .expect("closed while answering");
        assert!(
            slow.starts_with("HTTP/1.1 200") && slow.ends_with("slow"),
            "{slow}"
        );
        let trickled = get_on(&mut stream, "/trickle")
            .await
            .expect("closed mid-body");
        // Chunked: three one-byte chunks, then the last chunk.
        assert!(trickled.ends_with("1\r\nc\r\n0\r\n\r\n"), "{trickled}");
        // Still open, and its next head is again held to the limit.
        assert!(get_on(&mut stream, "/").await.is_some());
        let closed = closed_while_trickling_a_head(&mut stream).await;
        assert!(closed < LIMIT * 3);
    }

    #[tokio::test]
    async fn without_a_deadline_an_idle_connection_stays_open() {
        let addr = start_with(None).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(
            get_on(&mut stream, "/")
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
        sleep(LIMIT * 3).await;
        assert!(
            get_on(&mut stream, "/")
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
    }

    #[tokio::test]
    async fn a_client_slow_to_read_a_large_response_is_not_cut_off() {
        let addr = start().await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Nothing read for twice the limit: the socket's buffers fill and
        // the rest of the body waits in hyper's.
        sleep(LIMIT * 2).await;
        let mut buf = vec![0; 1 << 16];
        let (mut read, mut expected) = (0, usize::MAX);
        while read < expected {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("no bytes within 5 s")
                .unwrap();
            assert!(n > 0, "closed after {read} bytes of a {BIG}-byte response");
            if read == 0 {
                let head = buf[..n].windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                expected = head + 4 + BIG;
            }
            read += n;
        }
        assert_eq!(read, expected);
        // The connection serves its next request.
        assert!(
            get_on(&mut stream, "/")
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
    }

    /// A body of three one-byte parts, one every two thirds of the limit.
    #[derive(Default)]
    struct Trickle {
        sent: u8,
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl HttpBody for Trickle {
        type Data = axum::body::Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            if self.sent == 3 {
                return Poll::Ready(None);
            }
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(sleep(LIMIT * 2 / 3)));
            std::task::ready!(wait.as_mut().poll(cx));
            self.wait = None;
            let part = [b"a", b"b", b"c"][usize::from(self.sent)];
            self.sent += 1;
            Poll::Ready(Some(Ok(hyper::body::Frame::data(
                axum::body::Bytes::from_static(part),
            ))))
        }
    }
}
