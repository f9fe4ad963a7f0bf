//! The rate-limit policies of the reference server, by route:
//!
//! | Route | Policies (all-or-nothing per layer) |
//! |---|---|
//! | `POST /auth/login` | `ip` (`RATE_LIMIT_IP`), `auth` (`RATE_LIMIT_CLASS_AUTH`, per IP) |
//! | `GET /api/v1/ping`, `GET /openapi.json` | `ip` |
//! | `GET /api/v1/items[/{id}]` | `tenant`, `trust`, `read` (`RATE_LIMIT_CLASS_READ`, per subject) |
//! | `POST /api/v1/items`, `PUT`/`DELETE /api/v1/items/{id}` | `tenant`, `trust`, `write` (`RATE_LIMIT_CLASS_WRITE`, per subject) |
//! | `/health`, `/ready`, `/metrics` | none |
//!
//! Every authenticated route also shares one [`concurrency`] layer
//! (`tenant-concurrency`, `subject-concurrency`: requests in flight per
//! tenant and per user on this replica) and one [`shed`] layer (requests
//! shed by trust level when the pool is overloaded).

use http::request::Parts;
use tollgate::rate_limit::{
    ByClientIp, ConcurrencyLimitLayer, ConcurrencyPolicy, Key, KeyRejection, Policy, Quota,
    RateLimitLayer,
};
use tollgate::shed::LoadShedLayer;

use crate::AppState;
use crate::auth::Claims;
use crate::config::Config;
use crate::store::AppStore;

/// A route class of the authenticated API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// Reads.
    Read,
    /// Writes.
    Write,
}

fn layer(state: &AppState) -> RateLimitLayer<AppStore> {
    RateLimitLayer::new(state.store.clone())
        .with_failure_policy(state.config.failure_mode)
        // One fallback for every layer: a policy on several layers is
        // counted once while the store fails, as the store counts it.
        .with_local_fallback(state.fallback.clone())
}

fn per_ip(config: &Config, name: &str, quota: Quota) -> Policy {
    Policy::new(
        name,
        ByClientIp::new().with_ipv6_prefix(config.ipv6_prefix),
        quota,
    )
    .shadow(config.rate_limit_shadow)
}

/// Public routes: per IP.
pub fn public(state: &AppState) -> RateLimitLayer<AppStore> {
    let config = &state.config;
    layer(state).with_policy(per_ip(config, "ip", config.rate_limit_ip).with_route_class("public"))
}

/// The login route: per IP, and the stricter `auth` class per IP.
pub fn login(state: &AppState) -> RateLimitLayer<AppStore> {
    let config = &state.config;
    layer(state)
        .with_policy(per_ip(config, "ip", config.rate_limit_ip).with_route_class("auth"))
        .with_policy(per_ip(config, "auth", config.limits.class_auth).with_route_class("auth"))
}

/// Authenticated routes of `class`: per tenant, per subject by trust
/// level, and per subject for the class. Goes under the authentication
/// layer, which puts [`Claims`] in the request.
pub fn authenticated(state: &AppState, class: RouteClass) -> RateLimitLayer<AppStore> {
    let config = &state.config;
    let limits = &config.limits;
    let (name, quota) = match class {
        RouteClass::Read => ("read", limits.class_read),
        RouteClass::Write => ("write", limits.class_write),
    };
    let tenant = Policy::new(
        "tenant",
        |parts: &Parts| claims(parts).map(|c| Some(Key::from(c.tenant.as_str()))),
        limits.tenant,
    );
    // The closures share the server's configuration (one `Arc`).
    let (key_config, quota_config) = (config.clone(), config.clone());
    // The first configured level stands in for a level this build does not
    // know (say, one removed from TRUST_LEVELS after the token was issued).
    let lowest = limits
        .trust
        .first()
        .and_then(|(_, q)| *q)
        .unwrap_or(limits.class_read);
    let trust = Policy::new(
        "trust",
        move |parts: &Parts| {
            let claims = claims(parts)?;
            Ok(match key_config.limits.trust_quota(&claims.trust) {
                Some(None) => None, // unlimited, as configured
                // Keyed by level too: a raised level starts a fresh
                // allowance instead of inheriting the lower one's debt.
                _ => Some(Key::from(format!("{}:{}", claims.sub, claims.trust))),
            })
        },
        lowest,
    )
    .with_quota_fn(move |parts: &Parts| {
        parts
            .extensions
            .get::<Claims>()
            .and_then(|c| quota_config.limits.trust_quota(&c.trust).flatten())
            .unwrap_or(lowest)
    });
    let class_policy = Policy::new(
        name,
        |parts: &Parts| claims(parts).map(|c| Some(Key::from(c.sub.to_string()))),
        quota,
    );
    [tenant, trust, class_policy]
        .into_iter()
        .fold(layer(state), |layer, policy| {
            layer.with_policy(
                policy
                    .with_route_class(name)
                    .shadow(config.rate_limit_shadow),
            )
        })
}

fn claims(parts: &Parts) -> Result<&Claims, KeyRejection> {
    parts
        .extensions
        .get::<Claims>()
        .ok_or_else(|| KeyRejection::unauthorized("this route needs a bearer token"))
}

/// Requests in flight per tenant and per user
/// (`RATE_LIMIT_TENANT_CONCURRENCY`, `RATE_LIMIT_SUBJECT_CONCURRENCY`),
/// one layer shared by every authenticated route.
pub fn concurrency(config: &Config) -> ConcurrencyLimitLayer {
    let capacity = &config.capacity;
    let mut layer = ConcurrencyLimitLayer::new();
    if let Some(max) = capacity.tenant_concurrency {
        layer = layer.with_policy(ConcurrencyPolicy::new(
            "tenant-concurrency",
            |parts: &Parts| claims(parts).map(|c| Some(Key::from(c.tenant.as_str()))),
            max,
        ));
    }
    if let Some(max) = capacity.subject_concurrency {
        layer = layer.with_policy(ConcurrencyPolicy::new(
            "subject-concurrency",
            |parts: &Parts| claims(parts).map(|c| Some(Key::from(c.sub.to_string()))),
            max,
        ));
    }
    layer
}

/// Sheds authenticated requests by trust level when the tenant pool is
/// overloaded: the lowest level at `LOAD_SHED_START`, each higher level
/// `LOAD_SHED_STEP` later; the highest level (`staff` by default) is
/// never shed, like Stripe's critical traffic. Goes after the trust
/// lookup, which sets the level the request is shed by.
pub fn shed(state: &AppState) -> LoadShedLayer {
    let capacity = &state.config.capacity;
    let levels = state.config.limits.trust.clone();
    let highest = levels.len().saturating_sub(1);
    let mut layer = LoadShedLayer::new(state.tenant_pool.clone());
    for (i, (level, _)) in levels.iter().enumerate() {
        let threshold = capacity
            .shed_start
            .filter(|_| i < highest)
            .map(|start| capacity.shed_step.mul_add(i as f64, start));
        layer = layer.with_priority(level, threshold);
    }
    layer.with_priority_fn(move |parts: &Parts| {
        let trust = &parts.extensions.get::<Claims>()?.trust;
        // A level this build does not know ranks lowest.
        Some(levels.iter().position(|(l, _)| l == trust).unwrap_or(0))
    })
}
