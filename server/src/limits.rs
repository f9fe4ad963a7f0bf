//! [`Limits`]: everything that limits a request, built once at start-up
//! and asked for by route class.
//!
//! | Class | Routes | Rate-limit policies (all-or-nothing) |
//! |---|---|---|
//! | [`Probe`](Class::Probe), [`Admin`](Class::Admin) | `/health`, `/ready`, `/metrics` | none, never shed |
//! | [`Public`](Class::Public) | `GET /api/v1/ping`, `GET /openapi.json` | `ip` (`RATE_LIMIT_IP`) |
//! | [`Login`](Class::Login) | `POST /auth/login` | `ip`, `auth` (`RATE_LIMIT_CLASS_AUTH`, per IP) |
//! | [`Read`](Class::Read) | `GET /api/v1/items[/{id}]` | `tenant`, `trust`, `read` (per user) |
//! | [`Write`](Class::Write) | item writes, `PUT /api/v1/users/{id}/trust` | `tenant`, `trust`, `write` (per user) |
//!
//! Authenticated classes also share one [`concurrency`](Limits::concurrency)
//! layer (requests in flight per tenant and per user on this replica) and
//! one [`shed`](Limits::shed) layer (by trust level when the tenant pool is
//! overloaded). Which class a route has is written where the route is
//! declared (`routes`).
//!
//! `Limits` owns the store (memory or Redis, chosen by `RATE_LIMIT_STORE`),
//! the one local fallback every layer shares while the store fails, and the
//! trust table. The store's health has one source: the store itself
//! ([`Store::is_available`]; Redis's circuit breaker), which logs its
//! transitions once each; the readiness check asks it too
//! ([`check_store`](Limits::check_store)).

use std::sync::Arc;

use http::request::Parts;
use tollgate::rate_limit::{
    ByClientIp, ConcurrencyPolicy, EitherStore, Key, KeyRejection, KeyedConcurrencyLimitLayer,
    LocalFallback, MemoryStore, Policy, Quota, RateLimitLayer, RedisStore, Store, StoreError,
};
use tollgate::shed::LoadShedLayer;
use tollgate::tenant::TenantPool;

use crate::auth::Claims;
use crate::config::{Config, StoreConfig};
use crate::plans::{PlanLimits, PlanTable, TenantLimits};
use crate::trust::{Trust, TrustTable};
use uuid::Uuid;

/// What a route is, for its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Liveness and readiness: never limited, never shed.
    Probe,
    /// `/metrics`: never limited; moved to `METRICS_ADDR` when set.
    Admin,
    /// The operator API: documented in `/openapi.json`, served only on
    /// `ADMIN_ADDR` to `ADMIN_TOKEN`, never limited.
    Operator,
    /// Anonymous routes, per client IP.
    Public,
    /// The login route: per IP, and the stricter `auth` class per IP.
    Login,
    /// Authenticated reads.
    Read,
    /// Authenticated writes.
    Write,
}

impl Class {
    /// Whether requests of this class carry a bearer token (and run in a
    /// tenant transaction).
    pub fn is_authenticated(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }
}

/// The store limits are counted in, chosen at start-up.
pub type LimitStore = EitherStore<MemoryStore, RedisStore>;

/// Every limit of the server. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Limits {
    store: LimitStore,
    fallback: LocalFallback,
    config: Arc<Config>,
    trust: Arc<TrustTable>,
    plans: Arc<PlanTable>,
}

impl Limits {
    /// The limits `config` asks for. Connects to Redis lazily: a Redis
    /// that is down at start-up is the failure policy's to handle.
    pub fn new(config: Arc<Config>) -> Result<Self, StoreError> {
        let store = match &config.store {
            StoreConfig::Memory => {
                EitherStore::Left(MemoryStore::new().with_max_keys(config.memory_max_keys))
            }
            StoreConfig::Redis {
                target,
                config: redis,
            } => EitherStore::Right(
                RedisStore::builder(target.clone())
                    .config(redis.clone())
                    .build()?,
            ),
        };
        Ok(Self {
            store,
            fallback: LocalFallback::new(config.fallback_replicas)
                .with_max_keys(config.memory_max_keys),
            trust: Arc::new(config.limits.trust.clone()),
            plans: Arc::new(config.plans.clone()),
            config,
        })
    }

    /// The trust levels and their quotas.
    pub fn trust(&self) -> &Arc<TrustTable> {
        &self.trust
    }

    /// The rate-limit layer of `class`; `None` for classes never limited.
    pub fn layer(&self, class: Class) -> Option<RateLimitLayer<LimitStore>> {
        let config = &self.config;
        let limits = &config.limits;
        let policies = match class {
            Class::Probe | Class::Admin | Class::Operator => return None,
            Class::Public => vec![self.per_ip("ip", config.rate_limit_ip, "public")],
            Class::Login => vec![
                self.per_ip("ip", config.rate_limit_ip, "auth"),
                self.per_ip("auth", limits.class_auth, "auth"),
            ],
            Class::Read => self.authenticated("read", |l| l.read),
            Class::Write => self.authenticated("write", |l| l.write),
        };
        let mut layer = RateLimitLayer::new(self.store.clone())
            .with_failure_policy(config.failure_mode)
            // One fallback for every layer: a policy on several layers is
            // counted once while the store fails, as the store counts it.
            .with_local_fallback(self.fallback.clone());
        if class.is_authenticated() {
            // Decisions by plan (plan names only, never a tenant).
            let names: Vec<String> = self.plans.names().map(str::to_owned).collect();
            layer = layer.with_metric_label("plan", names, |parts: &Parts| {
                parts.extensions.get::<Arc<TenantLimits>>().map(|t| t.rank)
            });
        }
        Some(policies.into_iter().fold(layer, |layer, policy| {
            layer.with_policy(policy.shadow(config.rate_limit_shadow))
        }))
    }

    fn per_ip(&self, name: &str, quota: Quota, class: &str) -> Policy {
        Policy::new(
            name,
            ByClientIp::new().with_ipv6_prefix(self.config.ipv6_prefix),
            quota,
        )
        .with_route_class(class)
    }

    /// Per tenant and per user for the class, by the tenant's plan, and per
    /// user by current trust level. Goes under authentication and the plan
    /// and trust lookups, which put [`Claims`], [`TenantLimits`] and
    /// [`Trust`] in the request. A request without [`TenantLimits`] (none
    /// in this server) gets the default plan's.
    fn authenticated(&self, class: &str, class_quota: fn(&PlanLimits) -> Quota) -> Vec<Policy> {
        let default = self.plans.limits(self.plans.default_plan());
        let plan_quota = move |of: fn(&PlanLimits) -> Quota| {
            move |parts: &Parts| {
                parts
                    .extensions
                    .get::<Arc<TenantLimits>>()
                    .map_or_else(|| of(&default), |t| of(&t.limits))
            }
        };
        let tenant = Policy::new(
            "tenant",
            |parts: &Parts| claims(parts).map(|c| Some(id_key(&c.tenant))),
            default.tenant,
        )
        .with_quota_fn(plan_quota(|l| l.tenant));
        let quota = class_quota(&default);
        let lowest = self.trust.quota(&self.trust.lowest()).unwrap_or(quota);
        let (key_table, quota_table) = (self.trust.clone(), self.trust.clone());
        let trust = Policy::new(
            "trust",
            move |parts: &Parts| {
                let claims = claims(parts)?;
                let trust = current(parts)?;
                // Keyed by level too: a raised level starts a fresh
                // allowance instead of inheriting the lower one's debt.
                Ok(key_table
                    .quota(trust)
                    .map(|_| level_key(&claims.sub, &trust.name)))
            },
            lowest,
        )
        .with_quota_fn(move |parts: &Parts| {
            parts
                .extensions
                .get::<Trust>()
                .and_then(|t| quota_table.quota(t))
                .unwrap_or(lowest)
        });
        let per_user = Policy::new(
            class,
            |parts: &Parts| claims(parts).map(|c| Some(id_key(&c.sub))),
            quota,
        )
        .with_quota_fn(plan_quota(class_quota));
        [tenant, trust, per_user]
            .into_iter()
            .map(|policy| policy.with_route_class(class))
            .collect()
    }

    /// Requests in flight per tenant and per user
    /// (`RATE_LIMIT_TENANT_CONCURRENCY`, `RATE_LIMIT_SUBJECT_CONCURRENCY`),
    /// one layer shared by every authenticated route.
    pub fn concurrency(&self) -> KeyedConcurrencyLimitLayer {
        let capacity = &self.config.capacity;
        let mut layer = KeyedConcurrencyLimitLayer::new();
        // Per tenant, by its plan (an unlimited plan: no bound).
        if self.plans.limits_concurrency() {
            let default = self.plans.limits(self.plans.default_plan()).concurrency;
            layer = layer.with_policy(
                ConcurrencyPolicy::new(
                    "tenant-concurrency",
                    |parts: &Parts| claims(parts).map(|c| Some(id_key(&c.tenant))),
                    default.unwrap_or(u32::MAX),
                )
                .with_max_fn(move |parts: &Parts| {
                    parts
                        .extensions
                        .get::<Arc<TenantLimits>>()
                        .map_or(default, |t| t.limits.concurrency)
                        .unwrap_or(u32::MAX)
                }),
            );
        }
        if let Some(max) = capacity.subject_concurrency {
            layer = layer.with_policy(ConcurrencyPolicy::new(
                "subject-concurrency",
                |parts: &Parts| claims(parts).map(|c| Some(id_key(&c.sub))),
                max,
            ));
        }
        layer
    }

    /// Sheds authenticated requests by trust level when `pool` is
    /// overloaded: the lowest level at `LOAD_SHED_START`, each higher level
    /// `LOAD_SHED_STEP` later; the highest level (`staff` by default) is
    /// never shed, like Stripe's critical traffic. Goes after the trust
    /// lookup, which sets the level a request is shed by.
    pub fn shed(&self, pool: TenantPool) -> LoadShedLayer {
        let capacity = &self.config.capacity;
        let highest = self.trust.len() - 1;
        let mut layer = LoadShedLayer::new(pool);
        for (rank, level) in self.trust.names().enumerate() {
            let threshold = capacity
                .shed_start
                .filter(|_| rank < highest)
                .map(|start| capacity.shed_step.mul_add(rank as f64, start));
            layer = layer.with_priority(level, threshold);
        }
        layer.with_priority_fn(|parts: &Parts| parts.extensions.get::<Trust>().map(|t| t.rank))
    }

    /// Whether the store is in use (not failing over).
    pub fn store_available(&self) -> bool {
        self.store.is_available()
    }

    /// For the readiness check: pings Redis (which feeds its circuit
    /// breaker, the one record of its health); always fine in memory.
    pub async fn check_store(&self) -> Result<(), String> {
        match &self.store {
            EitherStore::Left(_) => Ok(()),
            EitherStore::Right(redis) => redis.ping().await.map_err(|e| e.to_string()),
        }
    }

    /// Whether the store is Redis (then it gets a readiness check).
    pub fn is_remote(&self) -> bool {
        matches!(self.store, EitherStore::Right(_))
    }
}

/// A tenant's or user's key: the key of its id's text, without making
/// the text (four such keys on every tenant request).
fn id_key(id: &Uuid) -> Key {
    Key::uuid(*id)
}

/// `<user id>:<level>`, written on the stack so that the key's own text
/// is the one allocation (a `String` would be copied into it).
fn level_key(user: &Uuid, level: &str) -> Key {
    const ID: usize = uuid::fmt::Hyphenated::LENGTH;
    let mut text = [0u8; 128];
    let Some(out) = text.get_mut(..ID + 1 + level.len()) else {
        return Key::from(format!("{user}:{level}"));
    };
    user.hyphenated().encode_lower(&mut out[..ID]);
    out[ID] = b':';
    out[ID + 1..].copy_from_slice(level.as_bytes());
    Key::from(std::str::from_utf8(out).expect("an id and a level name"))
}

fn claims(parts: &Parts) -> Result<&Claims, KeyRejection> {
    parts
        .extensions
        .get::<Claims>()
        .ok_or_else(|| KeyRejection::unauthorized("this route needs a bearer token"))
}

fn current(parts: &Parts) -> Result<&Trust, KeyRejection> {
    parts
        .extensions
        .get::<Trust>()
        .ok_or_else(|| KeyRejection::unauthorized("this route needs a bearer token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_level_key_is_the_id_and_the_level() {
        let id = Uuid::new_v4();
        assert_eq!(level_key(&id, "basic"), Key::from(format!("{id}:basic")));
        let long = "l".repeat(200);
        assert_eq!(level_key(&id, &long), Key::from(format!("{id}:{long}")));
    }

    #[test]
    fn an_id_key_is_the_ids_display() {
        let id = Uuid::new_v4();
        assert_eq!(id_key(&id), Key::from(id.to_string()));
        assert_eq!(id_key(&id).to_string(), format!("k:{id}"));
    }
}
