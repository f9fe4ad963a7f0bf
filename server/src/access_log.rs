//! [`AccessLogLayer`]: one line per request at INFO, after the response
//! head: method, URI, status, latency and request id.
//!
//! Made cheap because every request pays it (measured in the load
//! harness: the `tracing` formatter took a fifth of the server's
//! throughput). Nothing is captured unless the line is enabled
//! (`RUST_LOG`, `LOG_ACCESS`); the fields are the cheap clones they are
//! (`Method`, `Uri`, `HeaderValue`); there is no span per request. When the
//! binary [`install`]s the sink, the line is formatted here, in the
//! logger's text or JSON shape, with a timestamp whose date part is
//! formatted once per second, and appended to a buffer a writer thread
//! empties (see [`install`]); without it (tests, other embedders) it is an
//! ordinary `tracing` event.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, Uri};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

/// The request id the request-id layer set (a constant, not parsed per
/// request).
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The target access lines are logged under (`RUST_LOG=access=warn`
/// silences them alone).
pub const TARGET: &str = "access";

/// Where access lines go when the binary sets one up: a shared buffer a
/// writer thread empties to stdout every [`FLUSH_INTERVAL`] (sooner when
/// it passes [`FLUSH_BYTES`]). Appending is a short memcpy under a mutex;
/// there is no channel message and no thread wake-up per line, which on a
/// busy replica (measured) cost more than formatting the line.
#[derive(Debug)]
struct Sink {
    json: bool,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    buffer: Mutex<Vec<u8>>,
    wake: Condvar,
    closed: AtomicBool,
    dropped: AtomicU64,
}

/// How long a line may wait in the buffer.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// A buffer this full is written out at once.
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Past this, lines are dropped (and counted) rather than let memory grow
/// behind a stalled stdout.
pub const MAX_BUFFERED_BYTES: usize = 8 * 1024 * 1024;

static SINK: OnceLock<Sink> = OnceLock::new();

/// Writes the buffered lines out when dropped (keep it until exit).
#[derive(Debug)]
pub struct SinkGuard {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SinkGuard {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Sends access lines, formatted like the logger's text lines (or JSON
/// objects when `json`), to stdout through a buffer of their own, written
/// by a thread of its own. Once per process: `None` when already done.
pub fn install(json: bool) -> Option<SinkGuard> {
    let shared = Arc::new(Shared::default());
    SINK.set(Sink {
        json,
        shared: shared.clone(),
    })
    .ok()?;
    let writer_shared = shared.clone();
    let writer = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || write_out(&writer_shared))
        .ok()?;
    Some(SinkGuard {
        shared,
        writer: Some(writer),
    })
}

/// The writer thread: swaps the buffer out and writes it, until closed.
fn write_out(shared: &Shared) {
    let mut out = Vec::with_capacity(FLUSH_BYTES);
    loop {
        {
            let mut buffer = shared.buffer.lock().unwrap_or_else(|e| e.into_inner());
            if buffer.len() < FLUSH_BYTES && !shared.closed.load(Ordering::Acquire) {
                buffer = shared
                    .wake
                    .wait_timeout(buffer, FLUSH_INTERVAL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut *buffer, &mut out);
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if !out.is_empty() || dropped > 0 {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&out);
            if dropped > 0 {
                let _ = writeln!(
                    stdout,
                    "access log: {dropped} lines dropped (stdout too slow)"
                );
            }
            let _ = stdout.flush();
            out.clear();
        }
        if shared.closed.load(Ordering::Acquire)
            && shared.buffer.lock().map_or(true, |b| b.is_empty())
        {
            return;
        }
    }
}

impl Shared {
    fn append(&self, line: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        if buffer.len() + line.len() > MAX_BUFFERED_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        buffer.extend_from_slice(line);
        if buffer.len() >= FLUSH_BYTES {
            self.wake.notify_one();
        }
    }
}

/// Logs a line per request; does nothing when built with `false`.
#[derive(Debug, Clone, Copy)]
pub struct AccessLogLayer {
    enabled: bool,
}

impl AccessLogLayer {
    /// A layer that logs when `enabled` (`LOG_ACCESS`).
    pub fn new(enabled: bool) -> Self {
        Self { enabled }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            enabled: self.enabled,
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Debug, Clone)]
pub struct AccessLog<S> {
    inner: S,
    enabled: bool,
}

/// What a line needs from the request.
#[derive(Debug)]
struct Line {
    method: Method,
    uri: Uri,
    request_id: Option<HeaderValue>,
    start: Instant,
}

impl<S, B, ResBody> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = AccessLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let line =
            (self.enabled && tracing::enabled!(target: TARGET, tracing::Level::INFO)).then(|| {
                Line {
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    request_id: req.headers().get(&X_REQUEST_ID).cloned(),
                    start: Instant::now(),
                }
            });
        AccessLogFuture {
            inner: self.inner.call(req),
            line,
        }
    }
}

pin_project! {
    /// The future of [`AccessLog`].
    #[derive(Debug)]
    pub struct AccessLogFuture<F> {
        #[pin]
        inner: F,
        line: Option<Line>,
    }
}

impl<F, ResBody, E> Future for AccessLogFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Some(line) = this.line.take() {
            let status = result.as_ref().map_or(500, |res| res.status().as_u16());
            line.log(status);
        }
        Poll::Ready(result)
    }
}

impl Line {
    fn log(self, status: u16) {
        let latency_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let Some(sink) = SINK.get() else {
            tracing::info!(
                target: TARGET,
                method = %self.method,
                uri = %self.uri,
                status,
                latency_us,
                request_id,
                "request"
            );
            return;
        };
        BUFFER.with_borrow_mut(|buf| {
            buf.clear();
            let uri = uri_text(&self.uri);
            if sink.json {
                buf.push_str(r#"{"timestamp":""#);
                timestamp(buf);
                buf.push_str(
                    r#"","level":"INFO","target":"access","message":"request","method":""#,
                );
                buf.push_str(&json_escaped(self.method.as_str()));
                buf.push_str(r#"","uri":""#);
                buf.push_str(&json_escaped(&uri));
                buf.push_str(r#"","status":"#);
                push_int(buf, status);
                buf.push_str(r#","latency_us":"#);
                push_int(buf, latency_us);
                buf.push_str(r#","request_id":""#);
                buf.push_str(&json_escaped(request_id));
                buf.push_str("\"}\n");
            } else {
                timestamp(buf);
                buf.push_str("  INFO access: request method=");
                buf.push_str(self.method.as_str());
                buf.push_str(" uri=");
                buf.push_str(&uri);
                buf.push_str(" status=");
                push_int(buf, status);
                buf.push_str(" latency_us=");
                push_int(buf, latency_us);
                buf.push_str(" request_id=");
                buf.push_str(request_id);
                buf.push('\n');
            }
            sink.shared.append(buf.as_bytes());
        });
    }
}

/// The request target as the client sent it: path and query for the usual
/// origin form, without formatting.
fn uri_text(uri: &Uri) -> std::borrow::Cow<'_, str> {
    match (uri.scheme(), uri.path_and_query()) {
        (None, Some(path)) => path.as_str().into(),
        _ => uri.to_string().into(),
    }
}

fn push_int(buf: &mut String, n: impl itoa::Integer) {
    buf.push_str(itoa::Buffer::new().format(n));
}

thread_local! {
    /// The line being formatted, reused.
    static BUFFER: RefCell<String> = RefCell::new(String::with_capacity(256));
    /// The current second's `YYYY-MM-DDTHH:MM:SS`, formatted once per second.
    static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
}

/// `2026-12-04T19:20:31.123456Z` (UTC, as the logger writes it), the date
/// and time formatted once per second per thread.
fn timestamp(buf: &mut String) {
    let now = chrono::Utc::now();
    let secs = now.timestamp();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs {
            *second = secs;
            text.clear();
            let _ = write!(text, "{}", now.format("%Y-%m-%dT%H:%M:%S"));
        }
        buf.push_str(text);
    });
    // Six digits of microseconds, zero-padded.
    let micros = now.timestamp_subsec_micros() % 1_000_000 + 1_000_000;
    buf.push('.');
    buf.push_str(&itoa::Buffer::new().format(micros)[1..]);
    buf.push('Z');
}

/// `text` with `"`, `\\` and control characters escaped for a JSON string.
fn json_escaped(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn passes_responses_through_whether_on_or_off() {
        for enabled in [true, false] {
            let svc =
                AccessLogLayer::new(enabled).layer(tower::service_fn(|_req: Request<()>| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder().status(204).body(()).unwrap(),
                    )
                }));
            let res = svc.oneshot(Request::new(())).await.unwrap();
            assert_eq!(res.status(), 204);
        }
    }

    #[test]
    fn a_stalled_writer_bounds_the_buffer_and_counts_what_it_drops() {
        // No writer thread empties this one, as when stdout blocks.
        let shared = Shared::default();
        let line = [b'x'; 1000];
        for _ in 0..(MAX_BUFFERED_BYTES / line.len() + 100) {
            shared.append(&line);
        }
        let held = shared.buffer.lock().unwrap().len();
        assert!(held <= MAX_BUFFERED_BYTES, "{held} bytes buffered");
        assert!(held > MAX_BUFFERED_BYTES - line.len());
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn timestamps_and_escapes_look_like_the_loggers() {
        let mut buf = String::new();
        timestamp(&mut buf);
        // 2026-12-04T19:20:31.123456Z
        assert_eq!(buf.len(), 27, "{buf}");
        assert!(buf.ends_with('Z') && buf.as_bytes()[10] == b'T', "{buf}");
        assert_eq!(json_escaped("/a?b=c"), "/a?b=c");
        assert_eq!(json_escaped("a\"b\\c\u{1}"), "a\\\"b\\\\c\\u0001");
    }
}
