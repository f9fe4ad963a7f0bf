//! Tenant plans: the configured table ([`PlanTable`], from `TENANT_PLANS`
//! and `RATE_LIMIT_PLAN_<PLAN>_<LIMIT>`), each tenant's plan and overrides
//! (columns of `tenants`), and each request's effective limits
//! ([`TenantLimits`], put in the request extensions by [`current_plan`]).
//!
//! A tenant's row is read through a [`SharedCache`], the same mechanism as
//! trust levels: a change ([`set_plan`], [`set_limit`]; the CLI and the
//! operator API) announces itself in its own transaction, every replica
//! drops its entry when it commits, and the cache's TTL (`PLAN_CACHE_TTL`)
//! bounds staleness when a replica's listener is down. When Postgres cannot
//! answer and nothing is cached, the tenant gets the default plan's limits
//! (counted in `tollgate_cache_lookup_failures_total{cache="plan"}`), never
//! unlimited.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tollgate::rate_limit::Quota;
use tollgate::tenant::{Access, TenantId, begin};
use uuid::Uuid;

use crate::auth::Claims;
use crate::error::AppError;
use crate::shared_cache::SharedCache;
use crate::step::Next;

/// The channel plan changes are announced on.
pub const PLAN_CHANNEL: &str = "tollgate_plans";

/// The name of the one plan of a deployment that sets no `TENANT_PLANS`.
pub const IMPLICIT_PLAN: &str = "default";

/// The four limits a plan sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitName {
    /// The tenant-wide quota (`RATE_LIMIT_TENANT`).
    Tenant,
    /// Reads per user (`RATE_LIMIT_CLASS_READ`).
    Read,
    /// Writes per user (`RATE_LIMIT_CLASS_WRITE`).
    Write,
    /// Requests in flight per tenant per replica
    /// (`RATE_LIMIT_TENANT_CONCURRENCY`).
    Concurrency,
}

impl LimitName {
    /// Every limit, in the order they are shown.
    pub const ALL: [Self; 4] = [Self::Tenant, Self::Read, Self::Write, Self::Concurrency];

    /// Its name in the CLI, the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Read => "read",
            Self::Write => "write",
            Self::Concurrency => "concurrency",
        }
    }

    /// The `<LIMIT>` of `RATE_LIMIT_PLAN_<PLAN>_<LIMIT>`.
    pub fn env_suffix(self) -> &'static str {
        match self {
            Self::Tenant => "TENANT",
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Concurrency => "CONCURRENCY",
        }
    }

    /// The variable an unset `RATE_LIMIT_PLAN_<PLAN>_<LIMIT>` falls back to.
    pub fn fallback_var(self) -> &'static str {
        match self {
            Self::Tenant => "RATE_LIMIT_TENANT",
            Self::Read => "RATE_LIMIT_CLASS_READ",
            Self::Write => "RATE_LIMIT_CLASS_WRITE",
            Self::Concurrency => "RATE_LIMIT_TENANT_CONCURRENCY",
        }
    }

    /// What a value of this limit must look like.
    pub fn format(self) -> &'static str {
        match self {
            Self::Concurrency => "a whole number above 0, or unlimited",
            _ => tollgate::rate_limit::QUOTA_FORMAT,
        }
    }

    /// The limit called `name`, or an error naming the four.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|l| l.as_str().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| {
                format!("unknown limit {name:?}: one of tenant, read, write, concurrency")
            })
    }
}

/// One plan's (or one tenant's effective) limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanLimits {
    /// The tenant-wide quota.
    pub tenant: Quota,
    /// Reads per user.
    pub read: Quota,
    /// Writes per user.
    pub write: Quota,
    /// Requests in flight per tenant per replica; `None` is unlimited.
    pub concurrency: Option<u32>,
}

impl PlanLimits {
    /// `value` (already checked by [`parse_value`]) in place of `limit`.
    pub(crate) fn set(&mut self, limit: LimitName, value: LimitValue) {
        match (limit, value) {
            (LimitName::Tenant, LimitValue::Quota(q)) => self.tenant = q,
            (LimitName::Read, LimitValue::Quota(q)) => self.read = q,
            (LimitName::Write, LimitValue::Quota(q)) => self.write = q,
            (LimitName::Concurrency, LimitValue::Concurrency(c)) => self.concurrency = c,
            _ => {}
        }
    }

    /// Each limit as text, for `show`.
    pub fn describe(&self) -> BTreeMap<&'static str, String> {
        LimitName::ALL
            .into_iter()
            .map(|limit| {
                let text = match limit {
                    LimitName::Tenant => self.tenant.to_string(),
                    LimitName::Read => self.read.to_string(),
                    LimitName::Write => self.write.to_string(),
                    LimitName::Concurrency => self
                        .concurrency
                        .map_or_else(|| "unlimited".to_owned(), |c| c.to_string()),
                };
                (limit.as_str(), text)
            })
            .collect()
    }
}

/// A parsed limit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitValue {
    /// A rate quota (tenant, read, write).
    Quota(Quota),
    /// A concurrency maximum; `None` is unlimited.
    Concurrency(Option<u32>),
}

/// Parses `text` as a value of `limit`, or says the format.
pub fn parse_value(limit: LimitName, text: &str) -> Result<LimitValue, String> {
    let text = text.trim();
    let bad = || format!("{}: expected {}", limit.as_str(), limit.format());
    match limit {
        LimitName::Concurrency => match text {
            "unlimited" => Ok(LimitValue::Concurrency(None)),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| LimitValue::Concurrency(Some(n)))
                .ok_or_else(bad),
        },
        _ => text
            .parse::<Quota>()
            .map(LimitValue::Quota)
            .map_err(|_| bad()),
    }
}

/// The configured plans, lowest first, and which one new tenants get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanTable {
    plans: Vec<(Arc<str>, PlanLimits)>,
    default: usize,
}

impl PlanTable {
    /// The table of `plans` (never empty) with `default` the plan of new
    /// tenants and of tenants whose plan cannot be read.
    pub fn new(plans: Vec<(String, PlanLimits)>, default: usize) -> Self {
        assert!(
            default < plans.len(),
            "the default plan is one of the plans"
        );
        Self {
            plans: plans.into_iter().map(|(n, l)| (n.into(), l)).collect(),
            default,
        }
    }

    /// The plan called `name`, or an error naming the configured ones.
    pub fn parse(&self, name: &str) -> Result<usize, String> {
        self.find(name).ok_or_else(|| {
            format!(
                "unknown plan {name:?}: one of {}",
                self.names().collect::<Vec<_>>().join(", ")
            )
        })
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.plans.iter().position(|(n, _)| &**n == name)
    }

    /// The plans' names, lowest first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.plans.iter().map(|(n, _)| &**n)
    }

    /// The default plan.
    pub fn default_plan(&self) -> usize {
        self.default
    }

    /// Plan `i`'s name.
    pub fn name(&self, i: usize) -> &Arc<str> {
        &self.plans[i].0
    }

    /// Plan `i`'s limits.
    pub fn limits(&self, i: usize) -> PlanLimits {
        self.plans[i].1
    }

    /// Whether any plan limits concurrency.
    pub fn limits_concurrency(&self) -> bool {
        self.plans.iter().any(|(_, l)| l.concurrency.is_some())
    }

    /// The default plan's limits, as a tenant's (no overrides).
    pub fn fallback(&self) -> Arc<TenantLimits> {
        Arc::new(TenantLimits {
            plan: self.name(self.default).clone(),
            rank: self.default,
            limits: self.limits(self.default),
            overrides: BTreeMap::new(),
        })
    }

    /// A tenant's effective limits from its stored plan (`None`, or one
    /// this build does not know: the default plan) and overrides (ones
    /// that do not parse are ignored, with a warning).
    pub fn resolve(&self, plan: Option<&str>, overrides: &serde_json::Value) -> TenantLimits {
        let index = plan.and_then(|p| self.find(p)).unwrap_or_else(|| {
            if let Some(plan) = plan {
                tracing::warn!(
                    plan,
                    "stored plan is not in TENANT_PLANS; the default applies"
                );
            }
            self.default
        });
        let mut limits = self.limits(index);
        let mut kept = BTreeMap::new();
        for (name, text) in overrides.as_object().into_iter().flatten() {
            let parsed = LimitName::parse(name)
                .and_then(|limit| Ok((limit, text.as_str().ok_or("not text")?)))
                .and_then(|(limit, text)| Ok((limit, text, parse_value(limit, text)?)));
            match parsed {
                Ok((limit, text, value)) => {
                    limits.set(limit, value);
                    kept.insert(limit.as_str(), text.to_owned());
                }
                Err(err) => tracing::warn!(name, %err, "stored limit override ignored"),
            }
        }
        TenantLimits {
            plan: self.name(index).clone(),
            rank: index,
            limits,
            overrides: kept,
        }
    }
}

/// A tenant's plan, overrides and the limits in force: in the request
/// extensions of authenticated requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    /// The plan's name (metric label, `show`).
    pub plan: Arc<str>,
    /// The plan's place in [`PlanTable`] (0: the lowest).
    pub rank: usize,
    /// The limits in force: the plan's, with the overrides applied.
    pub limits: PlanLimits,
    /// The overrides, by limit name, as stored.
    pub overrides: BTreeMap<&'static str, String>,
}

/// What `show` prints and the operator API answers.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct TenantPlan {
    /// The tenant.
    pub tenant: Uuid,
    /// Its plan.
    #[schema(example = "free")]
    pub plan: String,
    /// Its overrides, by limit (`tenant`, `read`, `write`, `concurrency`).
    pub overrides: BTreeMap<String, String>,
    /// The limits in force, by limit.
    pub effective: BTreeMap<String, String>,
}

impl TenantPlan {
    fn new(tenant: Uuid, limits: &TenantLimits) -> Self {
        Self {
            tenant,
            plan: limits.plan.to_string(),
            overrides: limits
                .overrides
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            effective: limits
                .limits
                .describe()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }
    }
}

/// Tenants' plans and overrides, cached.
#[derive(Debug, Clone)]
pub struct Plans {
    cache: SharedCache<Uuid, Arc<TenantLimits>>,
    pool: PgPool,
    table: Arc<PlanTable>,
}

impl Plans {
    /// Plans of `table`, tenants' rows read from `pool` (the system pool),
    /// each kept `ttl`, looked up with a permit of `lookups` within
    /// `timeout`.
    pub fn new(
        table: Arc<PlanTable>,
        pool: PgPool,
        ttl: Duration,
        lookups: Arc<Semaphore>,
        timeout: Duration,
    ) -> Self {
        Self {
            cache: SharedCache::new("plan", PLAN_CHANNEL, ttl, lookups, timeout),
            pool,
            table,
        }
    }

    /// The cache, for the listener.
    pub fn cache(&self) -> &SharedCache<Uuid, Arc<TenantLimits>> {
        &self.cache
    }

    /// The configured plans.
    pub fn table(&self) -> &Arc<PlanTable> {
        &self.table
    }

    /// The tenant's limits; `None` when the tenant no longer exists.
    pub async fn current(&self, tenant: Uuid) -> Result<Option<Arc<TenantLimits>>, String> {
        self.cache
            .get_with(&tenant, || async {
                let mut tx = begin(&self.pool, TenantId::new(tenant), Access::ReadOnly).await?;
                let limits = read(&mut tx, &self.table, tenant).await?;
                tx.commit().await?;
                Ok(limits.map(Arc::new))
            })
            .await
    }
}

/// The tenant's row, resolved; `None` when it is not visible.
async fn read(
    conn: &mut sqlx::PgConnection,
    table: &PlanTable,
    tenant: Uuid,
) -> sqlx::Result<Option<TenantLimits>> {
    let row: Option<(Option<String>, serde_json::Value)> =
        sqlx::query_as("SELECT plan, limit_overrides FROM tenants WHERE id = $1")
            .bind(tenant)
            .fetch_optional(conn)
            .await?;
    Ok(row.map(|(plan, overrides)| table.resolve(plan.as_deref(), &overrides)))
}

/// The tenant's plan, overrides and effective limits, read in the caller's
/// transaction (of that tenant); `None` when there is no such tenant.
pub async fn show(
    conn: &mut sqlx::PgConnection,
    table: &PlanTable,
    tenant: Uuid,
) -> sqlx::Result<Option<TenantPlan>> {
    Ok(read(conn, table, tenant)
        .await?
        .map(|limits| TenantPlan::new(tenant, &limits)))
}

/// Moves the tenant to `plan` (an index of `table`) in the caller's
/// transaction, announced to every replica on commit. `None` when there is
/// no such tenant; else what [`show`] says afterwards.
pub async fn set_plan(
    conn: &mut sqlx::PgConnection,
    table: &PlanTable,
    origin: Uuid,
    tenant: Uuid,
    plan: usize,
) -> sqlx::Result<Option<TenantPlan>> {
    let updated = sqlx::query("UPDATE tenants SET plan = $2 WHERE id = $1")
        .bind(tenant)
        .bind(&**table.name(plan))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    changed(conn, table, origin, tenant, updated).await
}

/// Sets (`Some`, already checked with [`parse_value`]) or clears (`None`:
/// back to the plan's) the tenant's override of `limit`, like
/// [`set_plan`].
pub async fn set_limit(
    conn: &mut sqlx::PgConnection,
    table: &PlanTable,
    origin: Uuid,
    tenant: Uuid,
    limit: LimitName,
    value: Option<&str>,
) -> sqlx::Result<Option<TenantPlan>> {
    let updated = sqlx::query(
        "UPDATE tenants SET limit_overrides = CASE
             WHEN $3::text IS NULL THEN limit_overrides - $2
             ELSE limit_overrides || jsonb_build_object($2::text, $3::text)
         END
         WHERE id = $1",
    )
    .bind(tenant)
    .bind(limit.as_str())
    .bind(value.map(str::trim))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    changed(conn, table, origin, tenant, updated).await
}

async fn changed(
    conn: &mut sqlx::PgConnection,
    table: &PlanTable,
    origin: Uuid,
    tenant: Uuid,
    updated: u64,
) -> sqlx::Result<Option<TenantPlan>> {
    if updated == 0 {
        return Ok(None);
    }
    crate::shared_cache::announce(conn, PLAN_CHANNEL, origin, &tenant).await?;
    show(conn, table, tenant).await
}

/// Puts the tenant's [`TenantLimits`] in the request; 401 when the tenant
/// is gone. If the database cannot say and nothing is cached, the default
/// plan's limits apply (fail safe: never unlimited, never a 500). A
/// [`StepLayer`](crate::step::StepLayer) step.
pub fn current_plan(
    plans: &Plans,
    mut req: Request,
) -> Next<impl Future<Output = Result<Request, Response>> + Send + use<>> {
    let cached = match req.extensions().get::<Claims>() {
        None => return Next::Now(Ok(req)),
        Some(claims) => plans.cache.hit(&claims.tenant),
    };
    let Some(limits) = cached else {
        return Next::Later(look_up_plan(plans.clone(), req));
    };
    req.extensions_mut().insert(limits);
    Next::Now(Ok(req))
}

/// [`current_plan`] on a cache miss.
async fn look_up_plan(plans: Plans, mut req: Request) -> Result<Request, Response> {
    let Some(claims) = req.extensions().get::<Claims>() else {
        return Ok(req);
    };
    let limits = match plans.current(claims.tenant).await {
        Ok(Some(limits)) => limits,
        Ok(None) => {
            return Err(
                AppError::Unauthorized("the token's tenant no longer exists").into_response(),
            );
        }
        Err(err) => {
            tracing::warn!(%err, "plan lookup failed; the default plan applies");
            plans.table.fallback()
        }
    };
    req.extensions_mut().insert(limits);
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> PlanTable {
        let limits = |tenant: &str, concurrency| PlanLimits {
            tenant: tenant.parse().unwrap(),
            read: "600/min".parse().unwrap(),
            write: "120/min".parse().unwrap(),
            concurrency,
        };
        PlanTable::new(
            vec![
                ("free".into(), limits("5/min", Some(4))),
                ("pro".into(), limits("50/min", None)),
            ],
            0,
        )
    }

    #[test]
    fn overrides_win_over_the_plan_and_bad_ones_are_ignored() {
        let table = table();
        let resolved = table.resolve(
            Some("pro"),
            &serde_json::json!({"tenant": "70/min", "concurrency": "3", "read": "lots", "nope": "1"}),
        );
        assert_eq!(&*resolved.plan, "pro");
        assert_eq!(resolved.limits.tenant, "70/min".parse().unwrap());
        assert_eq!(resolved.limits.concurrency, Some(3));
        assert_eq!(resolved.limits.read, "600/min".parse().unwrap());
        assert_eq!(resolved.overrides.len(), 2);
        // An unknown stored plan is the default one.
        let resolved = table.resolve(Some("gold"), &serde_json::json!({}));
        assert_eq!(&*resolved.plan, "free");
        assert_eq!(
            table.resolve(None, &serde_json::json!({})).plan,
            resolved.plan
        );
    }

    #[test]
    fn names_are_checked_and_errors_list_the_known_ones() {
        let table = table();
        assert_eq!(table.parse("pro"), Ok(1));
        assert_eq!(
            table.parse("gold").unwrap_err(),
            r#"unknown plan "gold": one of free, pro"#
        );
        assert!(
            LimitName::parse("burst")
                .unwrap_err()
                .contains("tenant, read, write, concurrency")
        );
        assert_eq!(
            parse_value(LimitName::Concurrency, "unlimited"),
            Ok(LimitValue::Concurrency(None))
        );
        assert!(parse_value(LimitName::Concurrency, "0").is_err());
        assert!(parse_value(LimitName::Tenant, "unlimited").is_err());
    }
}
