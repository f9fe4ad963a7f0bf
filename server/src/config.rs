//! Configuration from environment variables, parsed once at start-up.
//!
//! A bad value stops the server with a message naming the variable, the
//! value and the expected format: a typo in a limit must not silently run
//! the fleet with a default.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tollgate::client_ip::{ForwardedHeader, TrustedProxies};
use tollgate::rate_limit::{
    FailurePolicy, QUOTA_FORMAT, Quota, RedisConfig, RedisTarget, Sharding,
};

use crate::plans::{IMPLICIT_PLAN, LimitName, PlanLimits, PlanTable, parse_value};
use crate::trust::TrustTable;

/// Everything the server reads from its environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `LISTEN_ADDR`: where the API listens. Loopback by default so a
    /// development server is not exposed by accident.
    pub listen_addr: SocketAddr,
    /// `TRUSTED_PROXIES` and `CLIENT_IP_HEADER`: whose forwarding header is
    /// believed. Nobody by default, so a client cannot choose its own IP.
    pub trusted_proxies: TrustedProxies,
    /// `RATE_LIMIT_IPV6_PREFIX`: IPv6 clients share a quota per prefix of
    /// this length, since one host usually holds a whole /64.
    pub ipv6_prefix: u8,
    /// `RATE_LIMIT_IP`: the per-IP quota of public routes.
    pub rate_limit_ip: Quota,
    /// `RATE_LIMIT_SHADOW`: count would-be rejections without rejecting,
    /// to tune limits on live traffic.
    pub rate_limit_shadow: bool,
    /// `RATE_LIMIT_STORE` and the `REDIS_*` / `RATE_LIMIT_REDIS_*`
    /// variables: where limits are counted.
    pub store: StoreConfig,
    /// `RATE_LIMIT_FAILURE_MODE`: what the limiter does when its store
    /// fails. `local` by default: limits keep holding per replica.
    pub failure_mode: FailurePolicy,
    /// `RATE_LIMIT_FALLBACK_REPLICAS`: quotas are divided by this while a
    /// replica decides alone, so the fleet as a whole stays near its quota.
    pub fallback_replicas: u32,
    /// `RATE_LIMIT_MEMORY_MAX_KEYS`: the in-process store's budget of
    /// exact entries (the local fallback's too).
    pub memory_max_keys: usize,
    /// `METRICS_ADDR`: when set, `/metrics` is served only there (an admin
    /// address that need not face the internet), not on `LISTEN_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `LOG_FORMAT`: `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// `LOG_ACCESS`: one line per request at INFO.
    pub access_log: bool,
    /// `READY_CHECK_INTERVAL`: how often readiness checks run in the
    /// background.
    pub ready_check_interval: Duration,
    /// `READY_CHECK_TIMEOUT`: how long one readiness check may take.
    pub ready_check_timeout: Duration,
    /// `SHUTDOWN_DRAIN_DELAY`: after SIGTERM, how long the server
    /// keeps serving with readiness failing, so the load balancer notices
    /// before connections are refused.
    pub shutdown_drain_delay: Duration,
    /// `SHUTDOWN_TIMEOUT`: how long in-flight requests may take to
    /// finish after SIGTERM before the server exits anyway; an idle
    /// keep-alive connection must not hold a deploy hostage.
    pub shutdown_timeout: Duration,
    /// `DATABASE_URL`, `MIGRATION_DATABASE_URL`, `DB_*`: Postgres.
    pub database: DatabaseConfig,
    /// `TOLLGATE_ENV`, `AUTH_SECRET`, `AUTH_TOKEN_TTL`: tokens.
    pub auth: AuthConfig,
    /// `RATE_LIMIT_TENANT`, `TRUST_LEVELS`, `RATE_LIMIT_TRUST_*`,
    /// `RATE_LIMIT_CLASS_*`: limits of the authenticated API.
    pub limits: LimitsConfig,
    /// `TRUST_CACHE_TTL`: how long a replica trusts its cached copy of
    /// a subject's trust level; the bound on staleness without broadcasts.
    pub trust_cache_ttl: Duration,
    /// `TRUST_BROADCAST_ENABLED`: listen for trust (and plan) changes made
    /// elsewhere.
    pub trust_broadcast: bool,
    /// `TENANT_PLANS`, `TENANT_DEFAULT_PLAN`, `RATE_LIMIT_PLAN_*`: the
    /// plans tenants are on.
    pub plans: PlanTable,
    /// `PLAN_CACHE_TTL`: how long a replica keeps a tenant's plan and
    /// overrides; the bound on staleness without broadcasts.
    pub plan_cache_ttl: Duration,
    /// `ADMIN_ADDR`: where the operator API listens; `None`: it is off.
    pub admin_addr: Option<SocketAddr>,
    /// `ADMIN_TOKEN`: the operator API's bearer credential.
    pub admin_token: Option<String>,
    /// `CLEANUP_INTERVAL`: how often the fleet's cleanup job runs (on
    /// one replica per cycle).
    pub cleanup_interval: Duration,
    /// `ITEM_RETENTION`: how long deleted items are kept before the
    /// cleanup job purges them.
    pub item_retention: Duration,
    /// `HTTP_*_TIMEOUT`: how long a client may take.
    pub http: HttpConfig,
    /// Concurrency limits, load shedding and password hashing: bounds on
    /// the resources one client may hold.
    pub capacity: CapacityConfig,
}

/// Deadlines on what clients send, so nobody holds a connection forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpConfig {
    /// `HTTP_HEADER_READ_TIMEOUT`: the request head must arrive within
    /// this, counted from the connection's start or the end of its last
    /// response; a slowloris client, or a keep-alive connection left idle,
    /// is disconnected after it. `None` (`off`): no deadline, for a proxy
    /// in front that enforces one.
    pub header_read_timeout: Option<Duration>,
    /// `HTTP_BODY_READ_TIMEOUT`: the whole request body must arrive within
    /// this (408 after).
    pub body_read_timeout: Option<Duration>,
    /// `HTTP_REQUEST_TIMEOUT`: the whole request, until the response head
    /// (503 after).
    pub request_timeout: Option<Duration>,
}

/// Bounds on shared capacity per client.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityConfig {
    /// `RATE_LIMIT_TENANT_CONCURRENCY`: one tenant's requests in flight on
    /// a replica at once; `None` is unlimited.
    pub tenant_concurrency: Option<u32>,
    /// `RATE_LIMIT_SUBJECT_CONCURRENCY`: one user's requests in flight.
    pub subject_concurrency: Option<u32>,
    /// `LOAD_SHED_START`: the pool load (held + queued connections over
    /// the pool's size) at which the lowest trust level is shed; `None`
    /// turns shedding off.
    pub shed_start: Option<f64>,
    /// `LOAD_SHED_STEP`: each higher trust level is shed at this much more
    /// load than the one below it.
    pub shed_step: f64,
    /// `AUTH_HASH_WORKERS`: password hashes computed at once.
    pub hash_workers: usize,
    /// `AUTH_HASH_QUEUE`: logins that may wait for a hashing worker; more
    /// get 503.
    pub hash_queue: usize,
}

/// Postgres connection and pool.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`: the role the server runs as (not the owner).
    pub url: String,
    /// `MIGRATION_DATABASE_URL`: the owner role, for migrations; else
    /// [`direct_url`](Self::direct_url), else `DATABASE_URL`. Must be a
    /// direct connection: migrations hold a session advisory lock.
    pub migration_url: Option<String>,
    /// `DATABASE_DIRECT_URL`: a session connection to Postgres itself (not
    /// through a transaction-mode pooler), for what needs a session: the
    /// LISTEN connection. `None`: `DATABASE_URL`.
    pub direct_url: Option<String>,
    /// `DB_STATEMENT_CACHE`: statements each `DATABASE_URL` connection
    /// keeps prepared. 0 sends every statement unnamed, which a
    /// transaction-mode pooler needs (a named statement lives on one
    /// server connection; the next transaction may run on another).
    pub statement_cache: usize,
    /// `DB_MIGRATE_ON_START`: apply pending migrations at start-up. Turn it
    /// off when a deploy step runs `tollgate-server migrate` once for the
    /// fleet.
    pub migrate_on_start: bool,
    /// `DB_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// `DB_MIN_CONNECTIONS`.
    pub min_connections: u32,
    /// `DB_IDLE_TIMEOUT`.
    pub idle_timeout: Duration,
    /// `DB_CONNECTION_TIMEOUT`: how long a request waits for a pooled
    /// connection before it gets 503.
    pub connection_timeout: Duration,
    /// `DB_MAX_LIFETIME`.
    pub max_lifetime: Duration,
    /// `DB_TENANT_MAX_CONNECTIONS`: connections one tenant may hold at
    /// once (a quarter of the pool by default).
    pub tenant_max_connections: u32,
    /// `DB_SYSTEM_CONNECTIONS`: the separate pool for readiness checks,
    /// trust lookups and singleton jobs (the LISTEN connection has one of
    /// its own besides).
    pub system_connections: u32,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs may hold passwords.
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(&self.url))
            .field(
                "migration_url",
                &self.migration_url.as_deref().map(redact_url),
            )
            .field("direct_url", &self.direct_url.as_deref().map(redact_url))
            .field("statement_cache", &self.statement_cache)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("max_connections", &self.max_connections)
            .field("min_connections", &self.min_connections)
            .field("idle_timeout", &self.idle_timeout)
            .field("connection_timeout", &self.connection_timeout)
            .field("max_lifetime", &self.max_lifetime)
            .field("tenant_max_connections", &self.tenant_max_connections)
            .field("system_connections", &self.system_connections)
            .finish()
    }
}

/// `scheme://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Signed tokens.
#[derive(Clone)]
pub struct AuthConfig {
    /// `AUTH_SECRET`: the HMAC key of tokens, shared by every replica. In
    /// `TOLLGATE_ENV=development` a missing secret is replaced by a random
    /// one per process (tokens then work on this replica only).
    pub secret: Vec<u8>,
    /// Whether `secret` was generated because `AUTH_SECRET` was unset.
    pub secret_generated: bool,
    /// `AUTH_TOKEN_TTL`: how long a token is valid.
    pub token_ttl: Duration,
    /// `AUTH_ISSUER`: the `iss` of tokens, required on every token.
    pub issuer: String,
    /// `AUTH_AUDIENCE`: the `aud` of tokens, required on every token.
    pub audience: String,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &"***")
            .field("secret_generated", &self.secret_generated)
            .field("token_ttl", &self.token_ttl)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// Quotas of the authenticated API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `RATE_LIMIT_TENANT`: per tenant, all its users together.
    pub tenant: Quota,
    /// `TRUST_LEVELS` and `RATE_LIMIT_TRUST_<LEVEL>`: per subject, by trust
    /// level.
    pub trust: TrustTable,
    /// `RATE_LIMIT_CLASS_AUTH`: login attempts per client IP.
    pub class_auth: Quota,
    /// `RATE_LIMIT_CLASS_READ`: reads per subject.
    pub class_read: Quota,
    /// `RATE_LIMIT_CLASS_WRITE`: writes per subject.
    pub class_write: Quota,
}

/// Where rate limits are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process: each replica counts alone.
    Memory,
    /// In Redis: one count for the whole fleet. `REDIS_URL` and
    /// `RATE_LIMIT_REDIS_CLUSTER` give the target, the other
    /// `RATE_LIMIT_REDIS_*` variables the store's settings.
    Redis {
        /// Where Redis is.
        target: RedisTarget,
        /// The store's settings.
        config: RedisConfig,
    },
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A variable held a value the server cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The variable's name.
    pub var: &'static str,
    /// What it held.
    pub value: String,
    /// The format it must follow.
    pub expected: String,
}

/// One environment variable: the only place its name, default, format and
/// meaning are written. Parsing reads the default from here (an unset
/// variable parses its default text, through the same parser as a set
/// one), errors quote the format from here, and the README's table is
/// generated from here ([`markdown_table`]; a test keeps them equal).
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    /// Its name.
    pub name: &'static str,
    /// What applies when it is unset.
    pub default: DefaultValue,
    /// What a value must look like.
    pub format: &'static str,
    /// What it does.
    pub meaning: &'static str,
}

/// What applies when a [`Variable`] is unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This text, parsed like a set value.
    Text(&'static str),
    /// Nothing: the behaviour described.
    Unset(&'static str),
    /// A value computed at start-up, described.
    Derived(&'static str),
}

const fn var(
    name: &'static str,
    default: DefaultValue,
    format: &'static str,
    meaning: &'static str,
) -> Variable {
    Variable {
        name,
        default,
        format,
        meaning,
    }
}

use DefaultValue::{Derived, Text, Unset};

/// The format of every duration variable.
pub const DURATION_FORMAT: &str =
    "a duration: a whole number with a unit (500ms, 30s, 5min, 1h, 7d), or bare milliseconds";
/// The format of duration variables that may be turned off.
pub const DURATION_OR_OFF_FORMAT: &str = "a duration above 0: a whole number with a unit (500ms, 30s, 5min, 1h, 7d) or bare milliseconds; or off";
const POSITIVE_DURATION_FORMAT: &str = "a duration above 0: a whole number with a unit (500ms, 30s, 5min, 1h, 7d), or bare milliseconds";
const WHOLE_ABOVE_ZERO: &str = "a whole number above 0";
const BOOLEAN: &str = "true or false";
const DB_URL_FORMAT: &str = "a postgres:// or postgresql:// URL";
const TEXT_FORMAT: &str = "text of at most 256 characters, no control characters";
/// The format of `RATE_LIMIT_TRUST_<LEVEL>`.
pub const TRUST_QUOTA_FORMAT: &str =
    "N/PERIOD[,burst=B] (e.g. 100/min), or unlimited; required for every level in TRUST_LEVELS";
/// The longest `AUTH_TOKEN_TTL`: a year.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Every variable the server reads, in the README's order.
pub const VARIABLES: &[Variable] = &[
    var(
        "LISTEN_ADDR",
        Text("127.0.0.1:8080"),
        "a socket address, e.g. 0.0.0.0:8080",
        "where the API listens; loopback by default so a development server is not exposed by accident",
    ),
    var(
        "TRUSTED_PROXIES",
        Unset("nobody"),
        "comma-separated CIDRs or addresses, e.g. 10.0.0.0/8,192.168.1.10; a /0 is refused",
        "peers whose forwarding header is believed; nobody by default, so a client cannot choose its own IP",
    ),
    var(
        "CLIENT_IP_HEADER",
        Text("x-forwarded-for"),
        "x-forwarded-for or forwarded",
        "the one header your proxies write",
    ),
    var(
        "RATE_LIMIT_IPV6_PREFIX",
        Text("64"),
        "a prefix length from 0 to 128",
        "IPv6 clients share a quota per prefix of this length (one host usually holds a /64)",
    ),
    var(
        "RATE_LIMIT_IP",
        Text("100/min"),
        QUOTA_FORMAT,
        "the per-IP quota of public routes and logins",
    ),
    var(
        "RATE_LIMIT_SHADOW",
        Text("false"),
        BOOLEAN,
        "count would-be rejections, never reject (to tune limits on live traffic)",
    ),
    var(
        "RATE_LIMIT_STORE",
        Text("memory"),
        "memory or redis",
        "where limits are counted: memory (each replica alone) or redis (one count for the fleet)",
    ),
    var(
        "RATE_LIMIT_MEMORY_MAX_KEYS",
        Text("1000000"),
        WHOLE_ABOVE_ZERO,
        "exact keys the in-process store (and the local fallback) holds, about 66 MiB at 69 B each; keys beyond them are decided in a fixed 2 MiB overflow sketch that never admits more than an exact bucket",
    ),
    var(
        "RATE_LIMIT_FAILURE_MODE",
        Text("local"),
        "open, closed or local",
        "when the store fails: open (allow), closed (503 problem+json) or local (decide with an in-process store)",
    ),
    var(
        "RATE_LIMIT_FALLBACK_REPLICAS",
        Text("1"),
        WHOLE_ABOVE_ZERO,
        "replicas in the fleet: quotas are divided by this while a replica decides alone (local), so the fleet stays near its quota; a Redis lease holds at most burst / (2 × this) units",
    ),
    var(
        "REDIS_URL",
        Text("redis://127.0.0.1:6379"),
        "a redis://, rediss:// or unix:// URL",
        "the Redis of RATE_LIMIT_STORE=redis",
    ),
    var(
        "RATE_LIMIT_REDIS_PREFIX",
        Text("tollgate"),
        "letters, digits, '-', '_' or '.'",
        "key prefix (tollgate:{2:ip:ip:192.0.2.1}), so deployments can share a Redis",
    ),
    var(
        "RATE_LIMIT_REDIS_SHARDING",
        Text("slot"),
        "slot or single",
        "on Redis Cluster, slot: each (policy, key) in its own hash slot, spread over every master; single: every key in one slot (the prefix is the hash tag), each request decided atomically by one master",
    ),
    var(
        "RATE_LIMIT_REDIS_CLUSTER",
        Text("false"),
        "true, false, or comma-separated node URLs (redis://host:port,…)",
        "true: REDIS_URL is a cluster node; or the nodes themselves",
    ),
    var(
        "RATE_LIMIT_REDIS_LEASES",
        Text("none"),
        "none, or comma-separated policies of ip, auth, tenant, trust, read, write",
        "policies whose hot keys a replica leases: it reserves part of the allowance in Redis and decides the next requests itself (never over the quota; may deny early by the units it holds)",
    ),
    var(
        "RATE_LIMIT_REDIS_LEASE_DURATION",
        Text("100ms"),
        POSITIVE_DURATION_FORMAT,
        "how long a lease lasts before its unused units go back to Redis",
    ),
    var(
        "RATE_LIMIT_REDIS_TIMEOUT",
        Text("50ms"),
        POSITIVE_DURATION_FORMAT,
        "how long a check may wait for Redis, queueing included (then the failure mode decides)",
    ),
    var(
        "RATE_LIMIT_REDIS_MAX_BATCH",
        Text("256"),
        WHOLE_ABOVE_ZERO,
        "most requests decided by one script call",
    ),
    var(
        "RATE_LIMIT_REDIS_MAX_IN_FLIGHT",
        Text("2"),
        WHOLE_ABOVE_ZERO,
        "script calls in flight at once",
    ),
    var(
        "RATE_LIMIT_REDIS_LOCAL_CACHE",
        Text("true"),
        BOOLEAN,
        "answer keys Redis denied locally until their wait has passed",
    ),
    var(
        "METRICS_ADDR",
        Unset("/metrics on LISTEN_ADDR"),
        "a socket address, e.g. 127.0.0.1:9090",
        "serve /metrics only here, an admin address that need not face the internet",
    ),
    var(
        "LOG_FORMAT",
        Text("text"),
        "text or json",
        "text for people, json for log pipelines",
    ),
    var(
        "LOG_ACCESS",
        Text("true"),
        BOOLEAN,
        "one line per request at INFO (written off the request path)",
    ),
    var(
        "READY_CHECK_INTERVAL",
        Text("5s"),
        POSITIVE_DURATION_FORMAT,
        "how often readiness checks run in the background",
    ),
    var(
        "READY_CHECK_TIMEOUT",
        Text("2s"),
        POSITIVE_DURATION_FORMAT,
        "how long one readiness check may take",
    ),
    var(
        "SHUTDOWN_DRAIN_DELAY",
        Text("5s"),
        DURATION_FORMAT,
        "after SIGTERM, how long the server keeps serving with readiness failing, so the load balancer notices",
    ),
    var(
        "SHUTDOWN_TIMEOUT",
        Text("30s"),
        DURATION_FORMAT,
        "how long in-flight requests get after the drain delay",
    ),
    var(
        "DATABASE_URL",
        Text("postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate"),
        DB_URL_FORMAT,
        "the role the server runs as (not the owner)",
    ),
    var(
        "MIGRATION_DATABASE_URL",
        Unset("DATABASE_DIRECT_URL, else DATABASE_URL"),
        DB_URL_FORMAT,
        "the owner role, for migrations; a direct connection, never a transaction-mode pooler (migrations hold a session lock)",
    ),
    var(
        "DATABASE_DIRECT_URL",
        Unset("DATABASE_URL"),
        DB_URL_FORMAT,
        "a direct (session) connection for LISTEN, when DATABASE_URL goes through a transaction-mode pooler such as PgBouncer",
    ),
    var(
        "DB_STATEMENT_CACHE",
        Text("100"),
        "a whole number; 0 behind a transaction-mode pooler",
        "statements each DATABASE_URL connection keeps prepared; 0 sends every statement unnamed, as PgBouncer in transaction mode needs",
    ),
    var(
        "DB_MIGRATE_ON_START",
        Text("true"),
        BOOLEAN,
        "apply pending migrations at start-up; off when a deploy step runs tollgate-server migrate once",
    ),
    var(
        "DB_MAX_CONNECTIONS",
        Text("20"),
        WHOLE_ABOVE_ZERO,
        "the tenant pool's size",
    ),
    var(
        "DB_MIN_CONNECTIONS",
        Text("0"),
        "a whole number, at most DB_MAX_CONNECTIONS",
        "connections kept open",
    ),
    var(
        "DB_IDLE_TIMEOUT",
        Text("30s"),
        DURATION_FORMAT,
        "an idle connection is closed after this (0: never)",
    ),
    var(
        "DB_CONNECTION_TIMEOUT",
        Text("5s"),
        POSITIVE_DURATION_FORMAT,
        "how long a request waits for a pooled connection (then 503)",
    ),
    var(
        "DB_MAX_LIFETIME",
        Text("30min"),
        DURATION_FORMAT,
        "a connection is replaced after this (0: never)",
    ),
    var(
        "DB_TENANT_MAX_CONNECTIONS",
        Derived("DB_MAX_CONNECTIONS / 4, at least 1"),
        "a whole number from 1 to DB_MAX_CONNECTIONS",
        "connections one tenant holds at once; its further work waits in its own queue (503 after DB_CONNECTION_TIMEOUT)",
    ),
    var(
        "DB_SYSTEM_CONNECTIONS",
        Text("5"),
        "a whole number, at least 3",
        "the separate pool for readiness checks, trust lookups and singleton jobs",
    ),
    var(
        "HTTP_HEADER_READ_TIMEOUT",
        Text("10s"),
        DURATION_OR_OFF_FORMAT,
        "the request head must arrive within this, from the connection's start or the end of its last response, else the connection is closed (slowloris, idle keep-alive); off for a proxy that enforces one",
    ),
    var(
        "HTTP_BODY_READ_TIMEOUT",
        Text("10s"),
        DURATION_OR_OFF_FORMAT,
        "the whole request body must arrive within this, else 408 and the connection is closed",
    ),
    var(
        "HTTP_REQUEST_TIMEOUT",
        Text("30s"),
        DURATION_OR_OFF_FORMAT,
        "the whole request, until the response head, else 503 with Retry-After",
    ),
    var(
        "RATE_LIMIT_TENANT_CONCURRENCY",
        Text("32"),
        "a whole number above 0, or unlimited",
        "one tenant's requests in flight on a replica (429 qu=\"concurrent-requests\" above)",
    ),
    var(
        "RATE_LIMIT_SUBJECT_CONCURRENCY",
        Text("8"),
        "a whole number above 0, or unlimited",
        "one user's requests in flight on a replica",
    ),
    var(
        "LOAD_SHED_START",
        Text("1.5"),
        "a number above 0, or off",
        "the pool load (connections held + queued, over DB_MAX_CONNECTIONS) at which the lowest trust level is shed (503 + Retry-After)",
    ),
    var(
        "LOAD_SHED_STEP",
        Text("0.5"),
        "a number, at least 0",
        "each higher trust level is shed at this much more load; the highest never",
    ),
    var(
        "AUTH_HASH_WORKERS",
        Derived("the number of cores"),
        WHOLE_ABOVE_ZERO,
        "password hashes computed at once",
    ),
    var(
        "AUTH_HASH_QUEUE",
        Text("8"),
        "a whole number",
        "logins that may wait for a hashing worker; beyond it, 503 + Retry-After",
    ),
    var(
        "TOLLGATE_ENV",
        Text("production"),
        "production or development",
        "development allows a missing AUTH_SECRET (make run sets it)",
    ),
    var(
        "AUTH_SECRET",
        Unset("required, except in development (then random per process)"),
        "at least 32 bytes of at least 8 distinct values (e.g. openssl rand -hex 32); required unless TOLLGATE_ENV=development",
        "the HMAC key of tokens, the same on every replica",
    ),
    var(
        "AUTH_ISSUER",
        Text("tollgate"),
        TEXT_FORMAT,
        "the iss of tokens; a token without it, or with another, is 401",
    ),
    var(
        "AUTH_AUDIENCE",
        Text("tollgate-api"),
        TEXT_FORMAT,
        "the aud of tokens, checked like iss",
    ),
    var(
        "AUTH_TOKEN_TTL",
        Text("15min"),
        "a duration from 1s to a year, with a unit (900s, 15min, 1h) or bare seconds",
        "how long a token is valid",
    ),
    var(
        "RATE_LIMIT_TENANT",
        Text("3000/min"),
        QUOTA_FORMAT,
        "per tenant, all its users together",
    ),
    var(
        "TRUST_LEVELS",
        Text("new,basic,trusted,staff"),
        "comma-separated names, lowest first (a-z, 0-9, '_', '-')",
        "trust levels; the highest may change levels and is never shed",
    ),
    var(
        "RATE_LIMIT_TRUST_NEW",
        Text("60/min"),
        TRUST_QUOTA_FORMAT,
        "per user at level new (RATE_LIMIT_TRUST_<LEVEL> for each level)",
    ),
    var(
        "RATE_LIMIT_TRUST_BASIC",
        Text("300/min"),
        TRUST_QUOTA_FORMAT,
        "per user at level basic",
    ),
    var(
        "RATE_LIMIT_TRUST_TRUSTED",
        Text("1200/min"),
        TRUST_QUOTA_FORMAT,
        "per user at level trusted",
    ),
    var(
        "RATE_LIMIT_TRUST_STAFF",
        Text("unlimited"),
        TRUST_QUOTA_FORMAT,
        "per user at level staff",
    ),
    var(
        "RATE_LIMIT_CLASS_AUTH",
        Text("10/min,burst=5"),
        QUOTA_FORMAT,
        "login attempts per client address",
    ),
    var(
        "RATE_LIMIT_CLASS_READ",
        Text("600/min"),
        QUOTA_FORMAT,
        "reads per user",
    ),
    var(
        "RATE_LIMIT_CLASS_WRITE",
        Text("120/min"),
        QUOTA_FORMAT,
        "writes per user",
    ),
    var(
        "TRUST_CACHE_TTL",
        Text("1min"),
        POSITIVE_DURATION_FORMAT,
        "how long a replica keeps a user's trust level; the bound on staleness without broadcasts",
    ),
    var(
        "TRUST_BROADCAST_ENABLED",
        Text("true"),
        BOOLEAN,
        "listen for trust changes made elsewhere (LISTEN tollgate_trust)",
    ),
    var(
        "TENANT_PLANS",
        Unset("one plan, default, with the limits of the variables below"),
        "comma-separated names, lowest first (a-z, 0-9, '_', '-')",
        "the plans a tenant can be on (tenant set-plan, the operator API)",
    ),
    var(
        "TENANT_DEFAULT_PLAN",
        Derived("the first of TENANT_PLANS"),
        "one of TENANT_PLANS",
        "the plan of a new tenant, and of one whose plan cannot be read",
    ),
    var(
        "RATE_LIMIT_PLAN_<PLAN>_<LIMIT>",
        Unset(
            "the variable of the same limit: RATE_LIMIT_TENANT, RATE_LIMIT_CLASS_READ, RATE_LIMIT_CLASS_WRITE, RATE_LIMIT_TENANT_CONCURRENCY",
        ),
        "as that variable; LIMIT is TENANT, READ, WRITE or CONCURRENCY",
        "a plan's limit (e.g. RATE_LIMIT_PLAN_PRO_TENANT=50/min)",
    ),
    var(
        "PLAN_CACHE_TTL",
        Text("1min"),
        POSITIVE_DURATION_FORMAT,
        "how long a replica keeps a tenant's plan; the bound on staleness without broadcasts",
    ),
    var(
        "ADMIN_ADDR",
        Unset("no operator API (the CLI still changes plans)"),
        "host:port",
        "where the operator API (/admin/...) listens, never on LISTEN_ADDR; needs ADMIN_TOKEN",
    ),
    var(
        "ADMIN_TOKEN",
        Unset("required with ADMIN_ADDR"),
        "at least 32 bytes of at least 8 distinct values (e.g. openssl rand -hex 32)",
        "the operator API's bearer token; no tenant user holds it",
    ),
    var(
        "CLEANUP_INTERVAL",
        Text("1min"),
        POSITIVE_DURATION_FORMAT,
        "how often the fleet's cleanup job runs (on one replica per cycle)",
    ),
    var(
        "ITEM_RETENTION",
        Text("7d"),
        DURATION_FORMAT,
        "how long deleted items are kept before the cleanup job purges them",
    ),
];

/// The README's configuration table, from [`VARIABLES`].
pub fn markdown_table() -> String {
    let mut out =
        String::from("| variable | default | format | what it does |\n|---|---|---|---|\n");
    for v in VARIABLES {
        let default = match v.default {
            Text(text) => format!("`{text}`"),
            Unset(what) | Derived(what) => format!("*{what}*"),
        };
        let cell = |text: &str| text.replace('|', "\\|");
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            v.name,
            cell(&default),
            cell(v.format),
            cell(v.meaning)
        ));
    }
    out
}

/// A duration: a whole number with a unit (`ms`, `s`, `min`, `h`, `d`), or
/// a bare number of `bare` units.
pub fn parse_duration_as(text: &str, bare: Duration) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let unit = match unit.trim() {
        "" => bare,
        "ms" => Duration::from_millis(1),
        "s" | "sec" => Duration::from_secs(1),
        "m" | "min" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(24 * 3600),
        _ => return None,
    };
    unit.checked_mul(u32::try_from(n).ok()?)
}

/// A duration with a unit, or bare milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    parse_duration_as(text, Duration::from_millis(1))
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &'static str| Var::read(&lookup, name);
        let header: ForwardedHeader = var("CLIENT_IP_HEADER").parse()?;
        let proxies = var("TRUSTED_PROXIES");
        let trusted_proxies = match &proxies.value {
            None => TrustedProxies::none(),
            Some(v) => v.parse::<TrustedProxies>().map_err(|e| {
                let mut err = proxies.error();
                err.expected = format!("{} ({e})", err.expected);
                err
            })?,
        }
        .with_header(header);
        let ipv6 = var("RATE_LIMIT_IPV6_PREFIX");
        let ipv6_prefix = ipv6.parse::<u8>().and_then(|p| ipv6.check(p, p <= 128))?;
        let metrics = var("METRICS_ADDR");
        let admin = var("ADMIN_ADDR");
        Ok(Self {
            listen_addr: var("LISTEN_ADDR").parse()?,
            trusted_proxies,
            ipv6_prefix,
            rate_limit_ip: var("RATE_LIMIT_IP").parse()?,
            rate_limit_shadow: var("RATE_LIMIT_SHADOW").boolean()?,
            store: store_config(&var)?,
            metrics_addr: metrics
                .value
                .as_ref()
                .map(|_| metrics.parse())
                .transpose()?,
            failure_mode: var("RATE_LIMIT_FAILURE_MODE").parse()?,
            fallback_replicas: var("RATE_LIMIT_FALLBACK_REPLICAS").above_zero()?,
            memory_max_keys: var("RATE_LIMIT_MEMORY_MAX_KEYS").above_zero()?,
            log_format: match var("LOG_FORMAT").text() {
                Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                _ => return Err(var("LOG_FORMAT").error()),
            },
            access_log: var("LOG_ACCESS").boolean()?,
            ready_check_interval: var("READY_CHECK_INTERVAL").positive_duration()?,
            ready_check_timeout: var("READY_CHECK_TIMEOUT").positive_duration()?,
            shutdown_drain_delay: var("SHUTDOWN_DRAIN_DELAY").duration()?,
            shutdown_timeout: var("SHUTDOWN_TIMEOUT").duration()?,
            database: database_config(&var)?,
            auth: auth_config(&var)?,
            limits: limits_config(&var, &lookup)?,
            trust_cache_ttl: var("TRUST_CACHE_TTL").positive_duration()?,
            trust_broadcast: var("TRUST_BROADCAST_ENABLED").boolean()?,
            plans: plans_config(&var, &lookup)?,
            plan_cache_ttl: var("PLAN_CACHE_TTL").positive_duration()?,
            admin_addr: admin.value.as_ref().map(|_| admin.parse()).transpose()?,
            admin_token: admin_token(&var, admin.value.is_some())?,
            cleanup_interval: var("CLEANUP_INTERVAL").positive_duration()?,
            item_retention: var("ITEM_RETENTION").duration()?,
            http: HttpConfig {
                header_read_timeout: var("HTTP_HEADER_READ_TIMEOUT").duration_or_off()?,
                body_read_timeout: var("HTTP_BODY_READ_TIMEOUT").duration_or_off()?,
                request_timeout: var("HTTP_REQUEST_TIMEOUT").duration_or_off()?,
            },
            capacity: capacity_config(&var)?,
        })
    }
}

fn capacity_config(var: &impl Fn(&'static str) -> Var) -> Result<CapacityConfig, ConfigError> {
    let concurrency = |name: &'static str| {
        let v = var(name);
        match v.text() {
            Some("unlimited") => Ok(None),
            _ => v.above_zero().map(Some),
        }
    };
    let start = var("LOAD_SHED_START");
    let shed_start = match start.text() {
        Some("off") => None,
        _ => {
            let s: f64 = start.parse()?;
            Some(start.check(s, s.is_finite() && s > 0.0)?)
        }
    };
    let step = var("LOAD_SHED_STEP");
    let shed_step: f64 = step.parse()?;
    let workers = var("AUTH_HASH_WORKERS");
    let hash_workers = match workers.value {
        None => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        Some(_) => workers.above_zero()?,
    };
    Ok(CapacityConfig {
        tenant_concurrency: concurrency("RATE_LIMIT_TENANT_CONCURRENCY")?,
        subject_concurrency: concurrency("RATE_LIMIT_SUBJECT_CONCURRENCY")?,
        shed_start,
        shed_step: step.check(shed_step, shed_step.is_finite() && shed_step >= 0.0)?,
        hash_workers,
        hash_queue: var("AUTH_HASH_QUEUE").parse()?,
    })
}

impl DatabaseConfig {
    /// Reads only the database variables (for the CLI).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        database_config(&|name| Var::read(&lookup, name))
    }
}

impl LimitsConfig {
    /// Reads only the limits (for the CLI, which checks trust levels).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        limits_config(&|name| Var::read(&lookup, name), &lookup)
    }
}

fn database_config(var: &impl Fn(&'static str) -> Var) -> Result<DatabaseConfig, ConfigError> {
    let url = |name: &'static str| -> Result<Option<String>, ConfigError> {
        let v = var(name);
        match v.text() {
            None => Ok(None),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Some(u.to_owned()))
            }
            Some(_) => Err(v.error()),
        }
    };
    let max_connections: u32 = var("DB_MAX_CONNECTIONS").above_zero()?;
    let min = var("DB_MIN_CONNECTIONS");
    let min_connections: u32 = min.parse()?;
    let tenant_max = var("DB_TENANT_MAX_CONNECTIONS");
    let tenant_max_connections = match tenant_max.value {
        None => (max_connections / 4).max(1),
        Some(_) => {
            let n: u32 = tenant_max.parse()?;
            tenant_max.check(n, (1..=max_connections).contains(&n))?
        }
    };
    let system = var("DB_SYSTEM_CONNECTIONS");
    let system_connections: u32 = system.parse()?;
    Ok(DatabaseConfig {
        tenant_max_connections,
        system_connections: system.check(system_connections, system_connections >= 3)?,
        url: url("DATABASE_URL")?.unwrap_or_default(),
        migration_url: url("MIGRATION_DATABASE_URL")?,
        direct_url: url("DATABASE_DIRECT_URL")?,
        statement_cache: var("DB_STATEMENT_CACHE").parse()?,
        migrate_on_start: var("DB_MIGRATE_ON_START").boolean()?,
        max_connections,
        min_connections: min.check(min_connections, min_connections <= max_connections)?,
        idle_timeout: var("DB_IDLE_TIMEOUT").duration()?,
        connection_timeout: var("DB_CONNECTION_TIMEOUT").positive_duration()?,
        max_lifetime: var("DB_MAX_LIFETIME").duration()?,
    })
}

fn auth_config(var: &impl Fn(&'static str) -> Var) -> Result<AuthConfig, ConfigError> {
    let env = var("TOLLGATE_ENV");
    let development = match env.text() {
        Some("production") => false,
        Some("development" | "dev") => true,
        _ => return Err(env.error()),
    };
    let secret_var = var("AUTH_SECRET");
    let (secret, secret_generated) = match &secret_var.value {
        Some(s) if s.len() >= 32 && !weak_secret(s.as_bytes()) => (s.as_bytes().to_vec(), false),
        Some(_) => return Err(secret_var.error()),
        None if development => (
            uuid::Uuid::new_v4()
                .as_bytes()
                .iter()
                .chain(uuid::Uuid::new_v4().as_bytes())
                .copied()
                .collect(),
            true,
        ),
        None => return Err(secret_var.error()),
    };
    let ttl_var = var("AUTH_TOKEN_TTL");
    // Bare numbers stay seconds here, as they always were for this one.
    let token_ttl = ttl_var
        .text()
        .and_then(|t| parse_duration_as(t, Duration::from_secs(1)))
        .filter(|d| *d >= Duration::from_secs(1) && *d <= MAX_TOKEN_TTL)
        .ok_or_else(|| ttl_var.error())?;
    let text = |name: &'static str| {
        let v = var(name);
        match v.text() {
            Some(t) if t.len() <= 256 && !t.chars().any(char::is_control) => Ok(t.to_owned()),
            _ => Err(v.error()),
        }
    };
    Ok(AuthConfig {
        secret,
        secret_generated,
        token_ttl,
        issuer: text("AUTH_ISSUER")?,
        audience: text("AUTH_AUDIENCE")?,
    })
}

fn weak_secret(secret: &[u8]) -> bool {
    let mut seen = [false; 256];
    for &b in secret {
        seen[usize::from(b)] = true;
    }
    seen.iter().filter(|s| **s).count() < 8
}

fn limits_config(
    var: &impl Fn(&'static str) -> Var,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<LimitsConfig, ConfigError> {
    let levels_var = var("TRUST_LEVELS");
    let levels: Vec<String> = levels_var
        .text()
        .unwrap_or_default()
        .split(',')
        .map(|l| l.trim().to_owned())
        .collect();
    if !levels.iter().all(|l| valid_name(l)) {
        return Err(levels_var.error());
    }
    let mut trust = Vec::with_capacity(levels.len());
    for level in levels {
        let name = format!(
            "RATE_LIMIT_TRUST_{}",
            level.to_ascii_uppercase().replace('-', "_")
        );
        // A level of the table has its default there; others have none.
        let v = match VARIABLES.iter().find(|v| v.name == name) {
            Some(known) => var(known.name),
            None => dynamic_var(lookup, name, TRUST_QUOTA_FORMAT),
        };
        let quota = match v.text() {
            Some("unlimited") => None,
            Some(_) => Some(v.parse::<Quota>()?),
            None => return Err(v.error()),
        };
        trust.push((level, quota));
    }
    Ok(LimitsConfig {
        tenant: var("RATE_LIMIT_TENANT").parse()?,
        trust: TrustTable::new(trust).ok_or_else(|| levels_var.error())?,
        class_auth: var("RATE_LIMIT_CLASS_AUTH").parse()?,
        class_read: var("RATE_LIMIT_CLASS_READ").parse()?,
        class_write: var("RATE_LIMIT_CLASS_WRITE").parse()?,
    })
}

/// A name of a trust level or a plan.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A variable whose name is made at start-up (`RATE_LIMIT_TRUST_<LEVEL>`,
/// `RATE_LIMIT_PLAN_<PLAN>_<LIMIT>`): read like the others, its name
/// leaked once (a handful per process).
fn dynamic_var(
    lookup: &impl Fn(&str) -> Option<String>,
    name: String,
    format: &'static str,
) -> Var {
    Var {
        value: lookup_value(lookup, &name),
        name: Box::leak(name.into_boxed_str()),
        defaulted: false,
        format,
    }
}

impl PlanTable {
    /// Reads only the plans (for the CLI).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        plans_config(&|name| Var::read(&lookup, name), &lookup)
    }
}

fn plans_config(
    var: &impl Fn(&'static str) -> Var,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<PlanTable, ConfigError> {
    // The limits of a plan that sets none: today's variables.
    let concurrency = var("RATE_LIMIT_TENANT_CONCURRENCY");
    let base = PlanLimits {
        tenant: var("RATE_LIMIT_TENANT").parse()?,
        read: var("RATE_LIMIT_CLASS_READ").parse()?,
        write: var("RATE_LIMIT_CLASS_WRITE").parse()?,
        concurrency: match concurrency.text() {
            Some("unlimited") => None,
            _ => Some(concurrency.above_zero()?),
        },
    };
    let plans_var = var("TENANT_PLANS");
    let Some(names) = plans_var.text() else {
        return Ok(PlanTable::new(vec![(IMPLICIT_PLAN.to_owned(), base)], 0));
    };
    let names: Vec<String> = names.split(',').map(|n| n.trim().to_owned()).collect();
    let mut seen = std::collections::HashSet::new();
    if !names
        .iter()
        .all(|n| valid_name(n) && seen.insert(n.clone()))
    {
        return Err(plans_var.error());
    }
    let mut plans = Vec::with_capacity(names.len());
    for name in names {
        let mut limits = base;
        for limit in LimitName::ALL {
            let env = format!(
                "RATE_LIMIT_PLAN_{}_{}",
                name.to_ascii_uppercase().replace('-', "_"),
                limit.env_suffix()
            );
            let v = dynamic_var(lookup, env, limit.format());
            if let Some(text) = v.text() {
                let value = parse_value(limit, text).map_err(|_| v.error())?;
                limits.set(limit, value);
            }
        }
        plans.push((name, limits));
    }
    let default_var = var("TENANT_DEFAULT_PLAN");
    let default = match default_var.text() {
        None => 0,
        Some(name) => plans.iter().position(|(n, _)| n == name).ok_or_else(|| {
            let mut err = default_var.error();
            err.expected = format!(
                "one of {}",
                plans
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            err
        })?,
    };
    Ok(PlanTable::new(plans, default))
}

fn admin_token(
    var: &impl Fn(&'static str) -> Var,
    required: bool,
) -> Result<Option<String>, ConfigError> {
    let token = var("ADMIN_TOKEN");
    match &token.value {
        Some(t) if t.len() >= 32 && !weak_secret(t.as_bytes()) => Ok(Some(t.clone())),
        None if !required => Ok(None),
        _ => Err(token.error()),
    }
}

fn store_config(var: &impl Fn(&'static str) -> Var) -> Result<StoreConfig, ConfigError> {
    let kind = var("RATE_LIMIT_STORE");
    match kind.text() {
        Some("memory") => return Ok(StoreConfig::Memory),
        Some("redis") => {}
        _ => return Err(kind.error()),
    }
    let is_url = |v: &str| {
        ["redis://", "rediss://", "unix://"]
            .iter()
            .any(|p| v.starts_with(p))
    };
    let url_var = var("REDIS_URL");
    let url = url_var.text().unwrap_or_default().to_owned();
    if !is_url(&url) {
        return Err(url_var.error());
    }
    let cluster = var("RATE_LIMIT_REDIS_CLUSTER");
    let target = match cluster.boolean() {
        Ok(false) => RedisTarget::Single(url),
        Ok(true) => RedisTarget::Cluster(vec![url]),
        Err(_) => {
            let nodes: Vec<String> = cluster
                .text()
                .unwrap_or_default()
                .split(',')
                .map(|n| n.trim().to_owned())
                .collect();
            if nodes.iter().any(|n| !is_url(n)) {
                return Err(cluster.error());
            }
            RedisTarget::Cluster(nodes)
        }
    };
    let prefix_var = var("RATE_LIMIT_REDIS_PREFIX");
    let prefix = prefix_var.text().unwrap_or_default().to_owned();
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(prefix_var.error());
    }
    // The library's other settings (breaker, probe) keep its defaults.
    let mut config = RedisConfig::default();
    config.prefix = prefix;
    let sharding = var("RATE_LIMIT_REDIS_SHARDING");
    config.sharding = match sharding.text() {
        Some("slot") => Sharding::Slot,
        Some("single") => Sharding::Single,
        _ => return Err(sharding.error()),
    };
    config.timeout = var("RATE_LIMIT_REDIS_TIMEOUT").positive_duration()?;
    config.max_batch = var("RATE_LIMIT_REDIS_MAX_BATCH").above_zero()?;
    config.max_in_flight = var("RATE_LIMIT_REDIS_MAX_IN_FLIGHT").above_zero()?;
    config.local_cache = var("RATE_LIMIT_REDIS_LOCAL_CACHE").boolean()?;
    let leases = var("RATE_LIMIT_REDIS_LEASES");
    let policies: Vec<String> = match leases.text() {
        Some("none") => Vec::new(),
        text => text
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_owned())
            .collect(),
    };
    if policies.iter().any(|p| !LEASABLE.contains(&p.as_str())) {
        return Err(leases.error());
    }
    config.leases.policies = policies;
    config.leases.duration = var("RATE_LIMIT_REDIS_LEASE_DURATION").positive_duration()?;
    config.leases.replicas = var("RATE_LIMIT_FALLBACK_REPLICAS").above_zero()?;
    Ok(StoreConfig::Redis { target, config })
}

/// The server's rate-limit policies, which `RATE_LIMIT_REDIS_LEASES` may
/// name.
const LEASABLE: [&str; 6] = ["ip", "auth", "tenant", "trust", "read", "write"];

fn lookup_value(lookup: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    lookup(name).filter(|v| !v.trim().is_empty())
}

/// One variable as read: its value, or its default text when unset.
struct Var {
    name: &'static str,
    /// What was set (trimmed later), or the default text.
    value: Option<String>,
    /// Whether `value` is the default.
    defaulted: bool,
    format: &'static str,
}

impl Var {
    fn read(lookup: &impl Fn(&str) -> Option<String>, name: &'static str) -> Self {
        let spec = VARIABLES
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("{name} is not in VARIABLES"));
        let set = lookup_value(lookup, name);
        let defaulted = set.is_none();
        let value = set.or_else(|| match spec.default {
            Text(text) => Some(text.to_owned()),
            Unset(_) | Derived(_) => None,
        });
        Self {
            name,
            value,
            defaulted,
            format: spec.format,
        }
    }

    /// The value (or default text), trimmed; `None` when unset without one.
    fn text(&self) -> Option<&str> {
        self.value.as_deref().map(str::trim)
    }

    fn error(&self) -> ConfigError {
        ConfigError {
            var: self.name,
            value: if self.defaulted {
                String::new()
            } else {
                self.value.clone().unwrap_or_default()
            },
            expected: self.format.to_owned(),
        }
    }

    /// `value` when `ok`, else this variable's error.
    fn check<T>(&self, value: T, ok: bool) -> Result<T, ConfigError> {
        if ok { Ok(value) } else { Err(self.error()) }
    }

    fn parse<T: FromStr>(&self) -> Result<T, ConfigError> {
        self.text()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.error())
    }

    fn above_zero<T: FromStr + PartialOrd + Default>(&self) -> Result<T, ConfigError> {
        let n: T = self.parse()?;
        let ok = n > T::default();
        self.check(n, ok)
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        match self.text().map(str::to_ascii_lowercase).as_deref() {
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            _ => Err(self.error()),
        }
    }

    fn duration(&self) -> Result<Duration, ConfigError> {
        self.text()
            .and_then(parse_duration)
            .ok_or_else(|| self.error())
    }

    fn positive_duration(&self) -> Result<Duration, ConfigError> {
        let d = self.duration()?;
        self.check(d, !d.is_zero())
    }

    fn duration_or_off(&self) -> Result<Option<Duration>, ConfigError> {
        match self.text() {
            Some("off") => Ok(None),
            _ => self.positive_duration().map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        map.entry("AUTH_SECRET".to_owned())
            .or_insert_with(|| "0123456789abcdef0123456789abcdef".to_owned());
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen_addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.rate_limit_ip, Quota::per_minute(100));
        assert!(!c.rate_limit_shadow);
        assert_eq!(c.trusted_proxies, TrustedProxies::none());
        assert_eq!(c.ipv6_prefix, 64);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.store, StoreConfig::Memory);
        assert_eq!(c.failure_mode, FailurePolicy::Local);
        assert_eq!(c.fallback_replicas, 1);
        assert_eq!(c.database.max_connections, 20);
        assert_eq!(c.database.min_connections, 0);
        assert_eq!(c.database.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.database.connection_timeout, Duration::from_secs(5));
        assert_eq!(c.database.max_lifetime, Duration::from_secs(1800));
        assert!(c.database.migrate_on_start);
        assert_eq!(c.auth.token_ttl, Duration::from_secs(900));
        assert_eq!(c.trust_cache_ttl, Duration::from_secs(60));
        assert!(c.trust_broadcast);
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.item_retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.database.tenant_max_connections, 5);
        assert_eq!(c.database.system_connections, 5);
        assert_eq!(
            c.http,
            HttpConfig {
                header_read_timeout: Some(Duration::from_secs(10)),
                body_read_timeout: Some(Duration::from_secs(10)),
                request_timeout: Some(Duration::from_secs(30)),
            }
        );
        assert_eq!(c.capacity.tenant_concurrency, Some(32));
        assert_eq!(c.capacity.subject_concurrency, Some(8));
        assert_eq!(c.capacity.shed_start, Some(1.5));
        assert_eq!(c.capacity.hash_queue, 8);
        assert!(c.capacity.hash_workers >= 1);
        let trust = &c.limits.trust;
        let levels: Vec<_> = trust
            .names()
            .map(|name| (name, trust.quota(&trust.find(name).unwrap())))
            .collect();
        assert_eq!(
            levels,
            [
                ("new", Some(Quota::per_minute(60))),
                ("basic", Some(Quota::per_minute(300))),
                ("trusted", Some(Quota::per_minute(1200))),
                ("staff", None),
            ]
        );
    }

    #[test]
    fn auth_secret_is_required_outside_development() {
        let err = Config::from_lookup(|_| None).unwrap_err();
        assert_eq!(err.var, "AUTH_SECRET");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
        let short = parse(&[("AUTH_SECRET", "short")]).unwrap_err();
        assert_eq!((short.var, short.value.as_str()), ("AUTH_SECRET", "short"));
        // Long enough, but guessable.
        for weak in [
            "a".repeat(64),
            "ab".repeat(32),
            "0".repeat(40),
            "1234567".repeat(6),
        ] {
            let err = parse(&[("AUTH_SECRET", &weak)]).unwrap_err();
            assert_eq!(err.var, "AUTH_SECRET", "{weak}");
            assert!(err.to_string().contains("distinct"), "{err}");
        }
        assert!(parse(&[("AUTH_SECRET", &"0123456789abcdef".repeat(2))]).is_ok());
        let dev = Config::from_lookup(|v| (v == "TOLLGATE_ENV").then(|| "development".to_owned()))
            .unwrap();
        assert!(dev.auth.secret_generated && dev.auth.secret.len() == 32);
    }

    #[test]
    fn custom_trust_levels_need_a_quota_each() {
        let err = parse(&[("TRUST_LEVELS", "free,pro")]).unwrap_err();
        assert_eq!(err.var, "RATE_LIMIT_TRUST_FREE");
        assert!(err.expected.contains("unlimited"));
        let c = parse(&[
            ("TRUST_LEVELS", "free,pro"),
            ("RATE_LIMIT_TRUST_FREE", "10/min"),
            ("RATE_LIMIT_TRUST_PRO", "unlimited"),
        ])
        .unwrap();
        let trust = &c.limits.trust;
        assert_eq!(
            trust.quota(&trust.find("free").unwrap()),
            Some(Quota::per_minute(10))
        );
        assert_eq!(trust.quota(&trust.find("pro").unwrap()), None);
        assert_eq!(trust.find("new"), None);
        let err = parse(&[("RATE_LIMIT_TRUST_NEW", "lots")]).unwrap_err();
        assert_eq!(
            (err.var, err.value.as_str()),
            ("RATE_LIMIT_TRUST_NEW", "lots")
        );
    }

    #[test]
    fn redis_store() {
        let c = parse(&[("RATE_LIMIT_STORE", "redis")]).unwrap();
        // The variables' defaults are the library's.
        assert_eq!(
            c.store,
            StoreConfig::Redis {
                target: RedisTarget::Single("redis://127.0.0.1:6379".into()),
                config: RedisConfig::default(),
            }
        );
        let c = parse(&[
            ("RATE_LIMIT_STORE", "redis"),
            ("REDIS_URL", "redis://10.0.0.5:7000"),
            ("RATE_LIMIT_REDIS_CLUSTER", "true"),
            ("RATE_LIMIT_REDIS_PREFIX", "api-prod"),
            ("RATE_LIMIT_REDIS_SHARDING", "single"),
            ("RATE_LIMIT_REDIS_LEASES", "tenant, ip"),
            ("RATE_LIMIT_REDIS_TIMEOUT", "20ms"),
            ("RATE_LIMIT_FAILURE_MODE", "closed"),
            ("RATE_LIMIT_FALLBACK_REPLICAS", "3"),
        ])
        .unwrap();
        let StoreConfig::Redis { target, config } = c.store else {
            panic!("not redis")
        };
        assert_eq!(
            target,
            RedisTarget::Cluster(vec!["redis://10.0.0.5:7000".into()])
        );
        assert_eq!(config.prefix, "api-prod");
        assert_eq!(config.sharding, Sharding::Single);
        assert_eq!(config.leases.policies, ["tenant", "ip"]);
        assert_eq!(config.leases.replicas, 3);
        assert_eq!(config.timeout, Duration::from_millis(20));
        assert_eq!(c.failure_mode, FailurePolicy::Closed);
        assert_eq!(c.fallback_replicas, 3);
        let c = parse(&[
            ("RATE_LIMIT_STORE", "redis"),
            ("RATE_LIMIT_REDIS_CLUSTER", "redis://a:1, redis://b:2"),
        ])
        .unwrap();
        let StoreConfig::Redis { target, .. } = c.store else {
            panic!("not redis")
        };
        assert_eq!(
            target,
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
    }

    #[test]
    fn durations_take_units_and_bare_milliseconds() {
        for (text, ms) in [
            ("500", 500),
            ("500ms", 500),
            ("30s", 30_000),
            ("5min", 300_000),
            ("1h", 3_600_000),
        ] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(ms)),
                "{text}"
            );
        }
        assert_eq!(
            parse_duration("7d"),
            Some(Duration::from_secs(7 * 24 * 3600))
        );
        for text in [
            "",
            "s",
            "5w",
            "1.5s",
            "-1s",
            "99999999999999999999h",
            "9999999999d",
        ] {
            assert_eq!(parse_duration(text), None, "{text}");
        }
        let c = parse(&[
            ("HTTP_HEADER_READ_TIMEOUT", "2s"),
            ("HTTP_BODY_READ_TIMEOUT", "1500"),
            ("HTTP_REQUEST_TIMEOUT", "off"),
            ("RATE_LIMIT_TENANT_CONCURRENCY", "unlimited"),
            ("LOAD_SHED_START", "off"),
            ("DB_MAX_CONNECTIONS", "2"),
        ])
        .unwrap();
        assert_eq!(c.http.header_read_timeout, Some(Duration::from_secs(2)));
        assert_eq!(c.http.body_read_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(c.http.request_timeout, None);
        assert_eq!(c.capacity.tenant_concurrency, None);
        assert_eq!(c.capacity.shed_start, None);
        // A quarter of a small pool is still one connection.
        assert_eq!(c.database.tenant_max_connections, 1);
    }

    #[test]
    fn reads_every_variable() {
        let c = parse(&[
            ("LISTEN_ADDR", "0.0.0.0:9000"),
            ("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
            ("CLIENT_IP_HEADER", "Forwarded"),
            ("RATE_LIMIT_IPV6_PREFIX", "56"),
            ("RATE_LIMIT_IP", "5/s,burst=10"),
            ("RATE_LIMIT_SHADOW", "true"),
            ("LOG_FORMAT", "json"),
            ("SHUTDOWN_TIMEOUT", "500"),
        ])
        .unwrap();
        assert_eq!(c.listen_addr.port(), 9000);
        assert!(c.trusted_proxies.is_trusted("10.1.1.1".parse().unwrap()));
        assert_eq!(c.ipv6_prefix, 56);
        assert_eq!(c.rate_limit_ip, Quota::per_second(5).with_burst(10));
        assert!(c.rate_limit_shadow);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.shutdown_timeout, Duration::from_millis(500));
    }

    #[test]
    fn errors_name_variable_value_and_format() {
        for (var, value) in [
            ("LISTEN_ADDR", "localhost"),
            ("TRUSTED_PROXIES", "0.0.0.0/0"),
            ("TRUSTED_PROXIES", "10.0.0.0/99"),
            ("CLIENT_IP_HEADER", "x-real-ip"),
            ("RATE_LIMIT_IPV6_PREFIX", "129"),
            ("RATE_LIMIT_IP", "lots"),
            ("RATE_LIMIT_SHADOW", "maybe"),
            ("LOG_FORMAT", "xml"),
            ("METRICS_ADDR", "admin"),
            ("RATE_LIMIT_STORE", "etcd"),
            ("RATE_LIMIT_FAILURE_MODE", "maybe"),
            ("RATE_LIMIT_FALLBACK_REPLICAS", "0"),
            ("SHUTDOWN_TIMEOUT", "5 parsecs"),
            ("SHUTDOWN_DRAIN_DELAY", "-1"),
            ("READY_CHECK_INTERVAL", "0"),
            ("READY_CHECK_TIMEOUT", "soon"),
            ("DATABASE_URL", "mysql://x"),
            ("MIGRATION_DATABASE_URL", "localhost"),
            ("DATABASE_DIRECT_URL", "127.0.0.1:5432"),
            ("DB_STATEMENT_CACHE", "off"),
            ("DB_STATEMENT_CACHE", "-1"),
            ("DB_MAX_CONNECTIONS", "0"),
            ("DB_MIN_CONNECTIONS", "21"),
            ("DB_CONNECTION_TIMEOUT", "0"),
            ("DB_MIGRATE_ON_START", "later"),
            ("TOLLGATE_ENV", "staging"),
            ("AUTH_TOKEN_TTL", "0"),
            ("AUTH_TOKEN_TTL", "18446744073709551615"),
            ("RATE_LIMIT_IP", "1/5000000000000000h,burst=2"),
            ("RATE_LIMIT_TENANT", "many"),
            ("TRUST_LEVELS", "New Users"),
            ("RATE_LIMIT_CLASS_WRITE", "1/fortnight"),
            ("TRUST_CACHE_TTL", "0"),
            ("TRUST_BROADCAST_ENABLED", "sometimes"),
            ("CLEANUP_INTERVAL", "hourly"),
            ("ITEM_RETENTION", "a week"),
            ("AUTH_TOKEN_TTL", "2y"),
            ("AUTH_TOKEN_TTL", "500ms"),
            ("DB_IDLE_TIMEOUT", "soon"),
            ("DB_TENANT_MAX_CONNECTIONS", "21"),
            ("DB_TENANT_MAX_CONNECTIONS", "0"),
            ("DB_SYSTEM_CONNECTIONS", "2"),
            ("HTTP_HEADER_READ_TIMEOUT", "0"),
            ("HTTP_BODY_READ_TIMEOUT", "10 days"),
            ("HTTP_REQUEST_TIMEOUT", "-5s"),
            ("RATE_LIMIT_TENANT_CONCURRENCY", "0"),
            ("RATE_LIMIT_SUBJECT_CONCURRENCY", "lots"),
            ("LOAD_SHED_START", "0"),
            ("LOAD_SHED_STEP", "-1"),
            ("AUTH_HASH_WORKERS", "0"),
            ("AUTH_HASH_QUEUE", "-1"),
        ] {
            let err = parse(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
        }
        for (var, value) in [
            ("REDIS_URL", "http://localhost"),
            ("RATE_LIMIT_REDIS_PREFIX", "a{b}"),
            ("RATE_LIMIT_REDIS_CLUSTER", "maybe"),
            ("RATE_LIMIT_REDIS_TIMEOUT", "0"),
            ("RATE_LIMIT_REDIS_TIMEOUT", "50 ms please"),
            ("RATE_LIMIT_REDIS_MAX_BATCH", "0"),
            ("RATE_LIMIT_REDIS_MAX_IN_FLIGHT", "many"),
            ("RATE_LIMIT_REDIS_LOCAL_CACHE", "sometimes"),
            ("RATE_LIMIT_REDIS_SHARDING", "hash"),
            ("RATE_LIMIT_REDIS_LEASES", "tenant,everything"),
            ("RATE_LIMIT_REDIS_LEASE_DURATION", "0"),
        ] {
            let err = parse(&[("RATE_LIMIT_STORE", "redis"), (var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert_eq!(err.value, value);
            let msg = err.to_string();
            assert!(
                msg.contains(var) && msg.contains(value) && msg.contains("expected"),
                "{msg}"
            );
        }
    }

    #[test]
    fn without_tenant_plans_one_implicit_plan_has_todays_limits() {
        let c = parse(&[
            ("RATE_LIMIT_TENANT", "70/min"),
            ("RATE_LIMIT_TENANT_CONCURRENCY", "unlimited"),
        ])
        .unwrap();
        assert_eq!(c.plans.names().collect::<Vec<_>>(), ["default"]);
        let limits = c.plans.limits(c.plans.default_plan());
        assert_eq!(limits.tenant, "70/min".parse().unwrap());
        assert_eq!(limits.read, c.limits.class_read);
        assert_eq!(limits.write, c.limits.class_write);
        assert_eq!(limits.concurrency, None);
    }

    #[test]
    fn plans_take_their_limits_or_fall_back_to_the_shared_ones() {
        let c = parse(&[
            ("TENANT_PLANS", "free, pro,big-co"),
            ("TENANT_DEFAULT_PLAN", "pro"),
            ("RATE_LIMIT_PLAN_FREE_TENANT", "5/min"),
            ("RATE_LIMIT_PLAN_PRO_TENANT", "50/min"),
            ("RATE_LIMIT_PLAN_PRO_CONCURRENCY", "unlimited"),
            ("RATE_LIMIT_PLAN_BIG_CO_READ", "6000/min"),
        ])
        .unwrap();
        let plans = &c.plans;
        assert_eq!(plans.names().collect::<Vec<_>>(), ["free", "pro", "big-co"]);
        assert_eq!(plans.default_plan(), 1);
        assert_eq!(plans.limits(0).tenant, "5/min".parse().unwrap());
        assert_eq!(plans.limits(0).concurrency, Some(32));
        assert_eq!(plans.limits(1).concurrency, None);
        assert_eq!(plans.limits(2).tenant, c.limits.tenant);
        assert_eq!(plans.limits(2).read, "6000/min".parse().unwrap());
    }

    #[test]
    fn bad_plans_stop_the_server_naming_the_variable_and_value() {
        let err = parse(&[("TENANT_PLANS", "free,Pro")]).unwrap_err();
        assert_eq!((err.var, err.value.as_str()), ("TENANT_PLANS", "free,Pro"));
        assert!(parse(&[("TENANT_PLANS", "free,free")]).is_err());
        // Empty is unset, as for every variable: one implicit plan.
        let err = parse(&[
            ("TENANT_PLANS", "free,pro"),
            ("RATE_LIMIT_PLAN_PRO_TENANT", "lots"),
        ])
        .unwrap_err();
        assert_eq!(
            (err.var, err.value.as_str()),
            ("RATE_LIMIT_PLAN_PRO_TENANT", "lots")
        );
        assert!(err.expected.contains("N/PERIOD"));
        let err = parse(&[
            ("TENANT_PLANS", "free"),
            ("RATE_LIMIT_PLAN_FREE_CONCURRENCY", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "RATE_LIMIT_PLAN_FREE_CONCURRENCY");
        let err = parse(&[
            ("TENANT_PLANS", "free,pro"),
            ("TENANT_DEFAULT_PLAN", "gold"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "TENANT_DEFAULT_PLAN");
        assert_eq!(err.expected, "one of free, pro");
    }

    #[test]
    fn the_operator_api_needs_a_strong_admin_token() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.admin_addr, c.admin_token), (None, None));
        let err = parse(&[("ADMIN_ADDR", "127.0.0.1:9901")]).unwrap_err();
        assert_eq!(err.var, "ADMIN_TOKEN");
        let err = parse(&[("ADMIN_ADDR", "127.0.0.1:9901"), ("ADMIN_TOKEN", "short")]).unwrap_err();
        assert_eq!((err.var, err.value.as_str()), ("ADMIN_TOKEN", "short"));
        let c = parse(&[
            ("ADMIN_ADDR", "127.0.0.1:9901"),
            ("ADMIN_TOKEN", "0123456789abcdef0123456789abcdef"),
        ])
        .unwrap();
        assert_eq!(c.admin_addr, Some("127.0.0.1:9901".parse().unwrap()));
        let err = parse(&[("ADMIN_ADDR", "nowhere")]).unwrap_err();
        assert_eq!(err.var, "ADMIN_ADDR");
    }

    #[test]
    fn every_default_parses_and_every_duration_takes_units() {
        // Defaults are text parsed like a set value: each must parse.
        let c = parse(&[("RATE_LIMIT_STORE", "redis")]).unwrap();
        assert_eq!(c.auth.token_ttl, Duration::from_secs(900));
        assert_eq!(c.item_retention, Duration::from_secs(7 * 24 * 3600));
        // Every duration variable takes a unit, and bare milliseconds
        // (AUTH_TOKEN_TTL: bare seconds, as it always was).
        let durations = VARIABLES.iter().filter(|v| {
            [
                DURATION_FORMAT,
                DURATION_OR_OFF_FORMAT,
                POSITIVE_DURATION_FORMAT,
            ]
            .contains(&v.format)
        });
        let mut seen = 0;
        for v in durations {
            seen += 1;
            parse(&[(v.name, "3s"), ("RATE_LIMIT_STORE", "redis")])
                .unwrap_or_else(|e| panic!("{}: {e}", v.name));
            parse(&[(v.name, "1500"), ("RATE_LIMIT_STORE", "redis")])
                .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        }
        assert_eq!(seen, 16, "duration variables besides AUTH_TOKEN_TTL");
        let c = parse(&[("AUTH_TOKEN_TTL", "1h"), ("TRUST_CACHE_TTL", "1500")]).unwrap();
        assert_eq!(c.auth.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.trust_cache_ttl, Duration::from_millis(1500));
        assert_eq!(
            parse(&[("AUTH_TOKEN_TTL", "600")]).unwrap().auth.token_ttl,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn every_variable_is_read_and_documented_once() {
        let mut names: Vec<&str> = VARIABLES.iter().map(|v| v.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a variable is listed twice");
        // Every listed variable is read: a bad value for it is refused
        // naming it (or, for free text, accepted).
        for v in VARIABLES {
            let result = parse(&[(v.name, "\u{1}bad value"), ("RATE_LIMIT_STORE", "redis")]);
            if let Err(err) = result {
                assert_eq!(err.var, v.name);
                assert!(err.expected.starts_with(v.format), "{err}");
            }
        }
    }

    #[test]
    fn the_readme_table_is_generated_from_the_variables() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's configuration table is out of date: run `make readme-config`\n{table}"
        );
    }
}
