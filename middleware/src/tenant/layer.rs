//! [`TenantLayer`]: resolve the tenant, lend handlers a transaction, commit
//! or roll back from the response status.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use sqlx::{Postgres, Transaction};
use tower_layer::Layer;
use tower_service::Service;

use super::pool::{PoolPermit, TenantPool};
use super::transaction::{Access, Outcome, TenantError, TxMetrics, begin_recorded};
use super::{TenantId, TenantResolver};
use crate::body::ResponseBody;
use crate::problem::Problem;

/// Resolves each request's tenant and gives its handler a transaction
/// scoped to that tenant ([`Tx`](super::Tx)), committed when the response
/// status is below 400 and rolled back otherwise.
///
/// A request without a tenant gets 401 and one with an invalid tenant 400,
/// both as problem details, before the handler runs. The resolved
/// [`TenantId`] is put in the request extensions, so layers inside this
/// one (a per-tenant rate limit: `ByExtension::new(|t: &TenantId| …)`) and
/// handlers (`Extension<TenantId>`) read the tenant it validated. The transaction is
/// begun lazily, when a handler extracts [`Tx`](super::Tx): routes that do
/// not touch the database cost nothing, and a handler that reads its body
/// first holds no connection while the client sends it. Connections come
/// from a [`TenantPool`] (a plain `PgPool` converts into one), which caps
/// each tenant's share and queues tenants fairly. `GET` and `HEAD` run
/// `READ ONLY` unless
/// [`read_only_safe_methods(false)`](Self::read_only_safe_methods).
///
/// If a read-write transaction's commit fails, or the transaction was
/// aborted by a database error the handler caught and answered 2xx anyway
/// (Postgres then turns `COMMIT` into a silent `ROLLBACK`), the client
/// gets a 500 problem, never the handler's 2xx; such a transaction pays
/// one `SELECT 1` before `COMMIT` to tell. A `READ ONLY` transaction
/// wrote nothing, so its `COMMIT` (or rollback) cannot change what its
/// response says: the response goes first and the transaction ends in a
/// task of its own, its connection and the tenant's share held until
/// then, so a read is answered a round trip sooner. If the handler panics
/// or the request is dropped, the transaction is rolled back.
///
/// See the [module docs](super) for an example.
#[derive(Debug, Clone)]
pub struct TenantLayer<R> {
    pool: TenantPool,
    resolver: R,
    read_only_safe_methods: bool,
}

impl<R: TenantResolver> TenantLayer<R> {
    /// Transactions on `pool` (a [`TenantPool`], or a `PgPool` shared
    /// without a per-tenant cap), tenants from `resolver`.
    pub fn new(pool: impl Into<TenantPool>, resolver: R) -> Self {
        Self {
            pool: pool.into(),
            resolver,
            read_only_safe_methods: true,
        }
    }

    /// Whether `GET` and `HEAD` run in `READ ONLY` transactions (default
    /// `true`).
    #[must_use]
    pub fn read_only_safe_methods(mut self, enabled: bool) -> Self {
        self.read_only_safe_methods = enabled;
        self
    }
}

impl<S, R: Clone> Layer<S> for TenantLayer<R> {
    type Service = Tenant<S, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Tenant {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`TenantLayer`].
#[derive(Debug, Clone)]
pub struct Tenant<S, R> {
    inner: S,
    layer: TenantLayer<R>,
}

impl<S, R> Tenant<S, R> {
    define_inner_service_accessors!();
}

/// What the layer puts in request extensions for [`Tx`](super::Tx).
#[derive(Debug, Clone)]
pub(crate) struct TenantContext {
    pub(crate) tenant: TenantId,
    pub(crate) slot: Arc<Slot>,
}

/// The request's transaction, when begun and not lent to a handler.
pub(crate) struct Slot {
    pool: TenantPool,
    tenant: TenantId,
    access: Access,
    state: Mutex<SlotState>,
    after_commit: Mutex<Vec<AfterCommit>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("tenant", &self.tenant)
            .field("access", &self.access)
            .finish_non_exhaustive()
    }
}

/// Work to run once the request's changes are durable.
pub(crate) type AfterCommit = Box<dyn FnOnce() + Send>;

#[derive(Debug)]
enum SlotState {
    NotBegun,
    Lent,
    Here(Held),
}

/// A begun transaction and the pool permit it was begun under: the permit
/// goes back only after the commit or rollback.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) tx: Transaction<'static, Postgres>,
    access: Access,
    _permit: PoolPermit,
    /// Where its outcome is counted.
    pool: TenantPool,
}

impl Slot {
    /// The transaction, begun on first use.
    pub(crate) async fn lend(&self) -> Result<Held, TenantError> {
        let previous = std::mem::replace(&mut *self.lock(), SlotState::Lent);
        match previous {
            SlotState::Here(held) => Ok(held),
            SlotState::Lent => Err(TenantError::AlreadyInUse),
            SlotState::NotBegun => match self.begin().await {
                Ok(held) => Ok(held),
                Err(err) => {
                    *self.lock() = SlotState::NotBegun;
                    Err(err)
                }
            },
        }
    }

    async fn begin(&self) -> Result<Held, TenantError> {
        let permit = self.pool.acquire(self.tenant).await?;
        let pool = &self.pool;
        let tx = begin_recorded(
            pool.pool(),
            self.tenant,
            self.access,
            Some(pool.tx_metrics()),
        )
        .await?;
        Ok(Held {
            tx,
            access: self.access,
            _permit: permit,
            pool: pool.clone(),
        })
    }

    /// Runs `hook` after the transaction commits ([`Tx::after_commit`](super::Tx::after_commit)).
    pub(crate) fn after_commit(&self, hook: AfterCommit) {
        self.after_commit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hook);
    }

    fn take_after_commit(&self) -> Vec<AfterCommit> {
        std::mem::take(&mut *self.after_commit.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes back a lent transaction.
    pub(crate) fn give_back(&self, held: Held) {
        *self.lock() = SlotState::Here(held);
    }

    fn take(&self) -> Option<Held> {
        match std::mem::replace(&mut *self.lock(), SlotState::NotBegun) {
            SlotState::Here(tx) => Some(tx),
            SlotState::NotBegun | SlotState::Lent => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // The state is replaced whole; a panic cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<S, R, ReqBody, ResBody> Service<Request<ReqBody>> for Tenant<S, R>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: TenantResolver,
    ResBody: Send + 'static,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let tenant = match self.layer.resolver.resolve(&parts) {
            Ok(tenant) => tenant,
            Err(rejection) => {
                return ResponseFuture::rejected(rejection.to_problem());
            }
        };
        let access = if self.layer.read_only_safe_methods {
            Access::for_method(&parts.method)
        } else {
            Access::ReadWrite
        };
        let slot = Arc::new(Slot {
            pool: self.layer.pool.clone(),
            tenant,
            access,
            state: Mutex::new(SlotState::NotBegun),
            after_commit: Mutex::new(Vec::new()),
        });
        parts.extensions.insert(tenant);
        parts.extensions.insert(TenantContext {
            tenant,
            slot: slot.clone(),
        });
        ResponseFuture {
            state: State::Inner {
                future: self.inner.call(Request::from_parts(parts, body)),
                slot: Some(slot),
            },
        }
    }
}

type Finishing<B, E> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The response future of [`Tenant`].
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        state: State<F, B, E>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, B, E> {
        Rejected { problem: Option<Problem> },
        Inner { #[pin] future: F, slot: Option<Arc<Slot>> },
        Finishing { future: Finishing<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    fn rejected(problem: Problem) -> Self {
        Self {
            state: State::Rejected {
                problem: Some(problem),
            },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Send + 'static,
    E: Send + 'static,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().state.project() {
                StateProj::Rejected { problem } => {
                    let problem = problem.take().expect("polled after completion");
                    return Poll::Ready(Ok(problem_response(problem)));
                }
                StateProj::Finishing { future } => return future.as_mut().poll(cx),
                StateProj::Inner { future, slot } => {
                    let result = ready!(future.poll(cx));
                    let slot = slot.take().expect("polled after completion");
                    let tx = slot.take();
                    let hooks = slot.take_after_commit();
                    match (result, tx) {
                        (Err(err), tx) => {
                            if let Some(held) = tx {
                                held.pool.tx_metrics().ended(Outcome::Rollback);
                            }
                            return Poll::Ready(Err(err));
                        }
                        (Ok(res), None) => {
                            // Nothing to commit: nothing to wait for.
                            if res.status().as_u16() < 400 {
                                hooks.into_iter().for_each(|hook| hook());
                            }
                            return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                        }
                        // A read-only transaction's COMMIT cannot change
                        // what the response says: it ends in a task of its
                        // own and the response goes now, a round trip
                        // sooner. The connection and the tenant's permit
                        // are held until it has ended, as before.
                        (Ok(res), Some(held))
                            if hooks.is_empty() && held.access == Access::ReadOnly =>
                        {
                            let commit = res.status().as_u16() < 400;
                            tokio::spawn(end_read_only(held, commit));
                            return Poll::Ready(Ok(res.map(ResponseBody::inner)));
                        }
                        (Ok(res), Some(tx)) if hooks.is_empty() => State::Finishing {
                            future: Box::pin(finish(tx, res, hooks)),
                        },
                        // With after-commit hooks, the commit and the hooks
                        // run in a task of their own: a caller dropped while
                        // COMMIT is on the wire (client gone, a timeout)
                        // must not skip the hooks of a change that committed.
                        (Ok(res), Some(tx)) => {
                            let finishing = tokio::spawn(finish::<B, E>(tx, res, hooks));
                            State::Finishing {
                                future: Box::pin(async move {
                                    finishing.await.unwrap_or_else(|join| {
                                        tracing::error!(%join, "tenant transaction commit task failed");
                                        Ok(problem_response(Problem::new(
                                            http::StatusCode::INTERNAL_SERVER_ERROR,
                                            "Commit failed",
                                        )))
                                    })
                                }),
                            }
                        }
                    }
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

/// Ends a read-only transaction after its response has gone: commits
/// when `commit`, else rolls back; the pool permit goes back after.
async fn end_read_only(held: Held, commit: bool) {
    let Held {
        tx, _permit, pool, ..
    } = held;
    let metrics = pool.tx_metrics();
    if !commit {
        return roll_back(tx, metrics).await;
    }
    match tx.commit().await {
        Ok(()) => metrics.ended(Outcome::Commit),
        Err(err) => {
            // Nothing was written, and what was read has been answered.
            metrics.ended(Outcome::CommitError);
            tracing::warn!(%err, "read-only tenant transaction commit failed");
        }
    }
}

/// Rolls `tx` back and counts it.
async fn roll_back(tx: Transaction<'static, Postgres>, metrics: &TxMetrics) {
    if let Err(err) = tx.rollback().await {
        // The connection is closed rather than reused; nothing to undo.
        tracing::warn!(%err, "tenant transaction rollback failed");
    }
    metrics.ended(Outcome::Rollback);
}

/// Commits below 400, rolls back from 400 up; the pool permit goes back
/// after.
async fn finish<B, E>(
    held: Held,
    res: Response<B>,
    after_commit: Vec<AfterCommit>,
) -> Result<Response<ResponseBody<B>>, E> {
    let Held {
        mut tx,
        access,
        _permit,
        pool,
    } = held;
    let metrics = pool.tx_metrics();
    if res.status().as_u16() >= 400 {
        roll_back(tx, metrics).await;
        return Ok(res.map(ResponseBody::inner));
    }
    // An aborted transaction (the handler swallowed a database error)
    // answers COMMIT with the tag ROLLBACK and no error, which sqlx cannot
    // tell from a commit. A statement in it fails with 25P02 instead: probe
    // before committing a transaction that may have written.
    let commit = match access {
        Access::ReadWrite => match probe(&mut tx).await {
            Ok(_) => tx.commit().await,
            Err(err) => {
                let _ = tx.rollback().await;
                Err(err)
            }
        },
        Access::ReadOnly => tx.commit().await,
    };
    match commit {
        Ok(()) => {
            metrics.ended(Outcome::Commit);
            after_commit.into_iter().for_each(|hook| hook());
            Ok(res.map(ResponseBody::inner))
        }
        Err(err) => {
            metrics.ended(Outcome::CommitError);
            tracing::error!(%err, status = %res.status(), "tenant transaction commit failed");
            let problem = Problem::new(http::StatusCode::INTERNAL_SERVER_ERROR, "Commit failed")
                .with_detail("the change was not saved");
            Ok(problem_response(problem))
        }
    }
}

/// One statement in the transaction: fails (25P02) when it is aborted.
async fn probe(tx: &mut Transaction<'static, Postgres>) -> Result<(), sqlx::Error> {
    let conn: &mut sqlx::PgConnection = tx;
    sqlx::Executor::execute(conn, "SELECT 1").await.map(drop)
}

fn problem_response<B>(problem: Problem) -> Response<ResponseBody<B>> {
    problem
        .into_http_response()
        .map(|bytes: Bytes| ResponseBody::full(bytes))
}
