//! Trust levels: the configured table ([`TrustTable`]), each request's
//! current level ([`Trust`]), and how a level changes ([`change_level`]).
//!
//! [`current_trust`] reads the subject's level as stored (through a
//! [`SharedCache`], the mechanism plans use too: TTL, single flight, the
//! generation rule, one listener per replica) and puts a [`Trust`] in the
//! request extensions; the token's claims are never rewritten, and limits,
//! shedding and handlers read the [`Trust`]. A change — from the API or the
//! CLI — goes through [`change_level`], which announces it in the same
//! transaction as the `UPDATE`. Lookups fail closed: when Postgres cannot
//! say, the request gets the lowest level, never the one in its token.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tollgate::rate_limit::Quota;
use tollgate::tenant::{Access, TenantId, begin};
use uuid::Uuid;

use crate::auth::Claims;
use crate::error::AppError;
use crate::shared_cache::{SharedCache, announce};
use crate::step::Next;

/// The configured levels (`TRUST_LEVELS`), lowest first, each with its
/// quota (`RATE_LIMIT_TRUST_<LEVEL>`; `None` is unlimited). Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustTable(Vec<(Arc<str>, Option<Quota>)>);

impl TrustTable {
    /// The table of `levels`, lowest first; `None` when there are none.
    pub fn new(levels: Vec<(String, Option<Quota>)>) -> Option<Self> {
        (!levels.is_empty()).then(|| {
            Self(
                levels
                    .into_iter()
                    .map(|(name, quota)| (name.into(), quota))
                    .collect(),
            )
        })
    }

    /// The level called `name`, if configured.
    pub fn find(&self, name: &str) -> Option<Trust> {
        self.0
            .iter()
            .position(|(level, _)| &**level == name)
            .map(|rank| self.at(rank))
    }

    /// The level called `name`, or an error listing the configured ones.
    pub fn parse(&self, name: &str) -> Result<Trust, String> {
        self.find(name).ok_or_else(|| {
            let known: Vec<&str> = self.names().collect();
            format!("one of {}", known.join(", "))
        })
    }

    /// The lowest level: what applies when the current one cannot be read.
    pub fn lowest(&self) -> Trust {
        self.at(0)
    }

    /// The highest level, the only one that may change levels.
    pub fn highest(&self) -> Trust {
        self.at(self.0.len() - 1)
    }

    /// The quota of `level` (`None`: unlimited).
    pub fn quota(&self, level: &Trust) -> Option<Quota> {
        self.0.get(level.rank).and_then(|(_, quota)| *quota)
    }

    /// The levels' names, lowest first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| &**name)
    }

    /// How many levels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never: a table has at least one level.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn at(&self, rank: usize) -> Trust {
        Trust {
            rank,
            name: self.0[rank].0.clone(),
        }
    }
}

/// A request's current trust level, put in the request extensions by
/// [`current_trust`] (the token's level may be stale; this one is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trust {
    /// 0 for the lowest level, counting up.
    pub rank: usize,
    /// The level's name.
    pub name: Arc<str>,
}

/// The channel trust changes are announced on.
pub const TRUST_CHANNEL: &str = "tollgate_trust";

/// Subjects' current trust levels: a [`SharedCache`] of users' stored
/// levels, filled from the system pool.
#[derive(Debug, Clone)]
pub struct TrustLevels {
    /// Shared text: a hit copies no string.
    cache: SharedCache<Uuid, Arc<str>>,
    pool: PgPool,
}

impl TrustLevels {
    /// Levels read from `pool` (the system pool), each kept `ttl`, looked
    /// up with a permit of `lookups` within `timeout`.
    pub fn new(pool: PgPool, ttl: Duration, lookups: Arc<Semaphore>, timeout: Duration) -> Self {
        Self {
            cache: SharedCache::new("trust", TRUST_CHANNEL, ttl, lookups, timeout),
            pool,
        }
    }

    /// The cache, for the listener.
    pub fn cache(&self) -> &SharedCache<Uuid, Arc<str>> {
        &self.cache
    }

    /// This process's origin id, in every message it sends.
    pub fn origin(&self) -> Uuid {
        self.cache.origin()
    }

    /// The subject's current level; `None` when the user no longer exists.
    pub async fn current(&self, claims: &Claims) -> Result<Option<Arc<str>>, String> {
        let tenant = TenantId::new(claims.tenant);
        self.cache
            .get_with(&claims.sub, || async {
                let mut tx = begin(&self.pool, tenant, Access::ReadOnly).await?;
                let level: Option<String> =
                    sqlx::query_scalar("SELECT trust_level FROM users WHERE id = $1")
                        .bind(claims.sub)
                        .fetch_optional(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(level.map(Arc::from))
            })
            .await
    }

    /// Lookups that reached Postgres (misses coalesced into one count once).
    pub fn queries(&self) -> u64 {
        self.cache.queries()
    }

    /// Drops the subject's entry; lookups already under way will not write
    /// their answer back.
    pub fn invalidate(&self, user: Uuid) {
        self.cache.invalidate(&user);
    }
}

/// Changes `user`'s level to `level` inside the caller's transaction,
/// and announces it to every replica when that transaction commits
/// (`pg_notify` is delivered on commit, dropped on rollback). The one way a
/// level changes, for the API and the CLI alike. `origin` is the sender's
/// id ([`TrustLevels::origin`]; the CLI, which caches nothing, uses a fresh
/// one). `false` when the user is not visible in the transaction's tenant.
pub async fn change_level(
    conn: &mut sqlx::PgConnection,
    origin: Uuid,
    user: Uuid,
    level: &Trust,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query("UPDATE users SET trust_level = $2 WHERE id = $1")
        .bind(user)
        .bind(&*level.name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if updated == 0 {
        return Ok(false);
    }
    announce(conn, TRUST_CHANNEL, origin, &user).await?;
    Ok(true)
}

/// What [`current_trust`] needs: the cache and the table.
#[derive(Debug, Clone)]
pub struct CurrentTrust {
    /// The cache.
    pub levels: TrustLevels,
    /// The configured levels.
    pub table: Arc<TrustTable>,
}

/// Puts the subject's current [`Trust`] in the request (so a downgrade
/// applies before the token expires); 401 when the user is gone. If the
/// database cannot say, the lowest level applies (fail closed): a level
/// read from the token could be one the user no longer has. A stored level
/// this build does not know (say, one removed from `TRUST_LEVELS`) also
/// counts as the lowest. A [`StepLayer`](crate::step::StepLayer) step.
pub fn current_trust(
    current: &CurrentTrust,
    mut req: Request,
) -> Next<impl Future<Output = Result<Request, Response>> + Send + use<>> {
    let cached = match req.extensions().get::<Claims>() {
        None => return Next::Now(Ok(req)),
        Some(claims) => current.levels.cache.hit(&claims.sub),
    };
    let Some(level) = cached else {
        return Next::Later(look_up_trust(current.clone(), req));
    };
    let table = &current.table;
    let trust = table.find(&level).unwrap_or_else(|| table.lowest());
    req.extensions_mut().insert(trust);
    Next::Now(Ok(req))
}

/// [`current_trust`] on a cache miss.
async fn look_up_trust(
    CurrentTrust { levels, table }: CurrentTrust,
    mut req: Request,
) -> Result<Request, Response> {
    let Some(claims) = req.extensions().get::<Claims>() else {
        return Ok(req);
    };
    let trust = match levels.current(claims).await {
        Ok(Some(level)) => table.find(&level).unwrap_or_else(|| table.lowest()),
        Ok(None) => {
            return Err(AppError::Unauthorized("the token's user no longer exists").into_response());
        }
        Err(err) => {
            tracing::warn!(%err, "trust level lookup failed; the lowest level applies");
            table.lowest()
        }
    };
    req.extensions_mut().insert(trust);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable() -> TrustLevels {
        // Port 1 on loopback: nothing listens, connecting fails at once.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        TrustLevels::new(
            pool,
            Duration::from_secs(60),
            Arc::new(Semaphore::new(2)),
            Duration::from_secs(1),
        )
    }

    #[tokio::test]
    async fn a_failed_lookup_gives_the_lowest_level_not_the_tokens() {
        use axum::{Extension, Router, routing::get};
        use tower::ServiceExt;
        let state = CurrentTrust {
            levels: unreachable(),
            table: Arc::new(
                TrustTable::new(vec![("new".into(), None), ("staff".into(), None)]).unwrap(),
            ),
        };
        let app = Router::new()
            .route(
                "/",
                get(|Extension(trust): Extension<Trust>| async move { trust.name.to_string() }),
            )
            .route_layer(crate::step::StepLayer::new(move |req| {
                current_trust(&state, req)
            }));
        let mut req = http::Request::get("/")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut().insert(Claims {
            sub: Uuid::new_v4(),
            tenant: Uuid::new_v4(),
            trust: "staff".into(),
            iat: 0,
            exp: u64::MAX,
            iss: "tollgate".into(),
            aud: "tollgate-api".into(),
        });
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        let body = axum::body::to_bytes(res.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"new");
    }
}
