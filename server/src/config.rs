//! Configuration from environment variables, parsed once at start-up.
//!
//! A bad value stops the server with a message naming the variable, the
//! value and the expected format: a typo in a limit must not silently run
//! the fleet with a default.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tollgate::client_ip::{ForwardedHeader, TrustedProxies};
use tollgate::rate_limit::{FailurePolicy, QUOTA_FORMAT, Quota};

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
    /// `METRICS_ADDR`: when set, `/metrics` is served only there (an admin
    /// address that need not face the internet), not on `LISTEN_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `LOG_FORMAT`: `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// `READY_CHECK_INTERVAL` (ms): how often readiness checks run in the
    /// background.
    pub ready_check_interval: Duration,
    /// `READY_CHECK_TIMEOUT` (ms): how long one readiness check may take.
    pub ready_check_timeout: Duration,
    /// `SHUTDOWN_DRAIN_DELAY` (ms): after SIGTERM, how long the server
    /// keeps serving with readiness failing, so the load balancer notices
    /// before connections are refused.
    pub shutdown_drain_delay: Duration,
    /// `SHUTDOWN_TIMEOUT` (ms): how long in-flight requests may take to
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
    /// `TRUST_CACHE_TTL` (ms): how long a replica trusts its cached copy of
    /// a subject's trust level; the bound on staleness without broadcasts.
    pub trust_cache_ttl: Duration,
    /// `TRUST_BROADCAST_ENABLED`: listen for trust changes made elsewhere.
    pub trust_broadcast: bool,
    /// `CLEANUP_INTERVAL` (ms): how often the fleet's cleanup job runs (on
    /// one replica per cycle).
    pub cleanup_interval: Duration,
    /// `ITEM_RETENTION` (ms): how long deleted items are kept before the
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
    /// this; a slowloris client is disconnected after it. `None` (`off`):
    /// no deadline, for a proxy in front that enforces one.
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
    /// `DATABASE_URL`.
    pub migration_url: Option<String>,
    /// `DB_MIGRATE_ON_START`: apply pending migrations at start-up. Turn it
    /// off when a deploy step runs `tollgate-server migrate` once for the
    /// fleet.
    pub migrate_on_start: bool,
    /// `DB_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// `DB_MIN_CONNECTIONS`.
    pub min_connections: u32,
    /// `DB_IDLE_TIMEOUT` (ms).
    pub idle_timeout: Duration,
    /// `DB_CONNECTION_TIMEOUT` (ms): how long a request waits for a pooled
    /// connection before it gets 503.
    pub connection_timeout: Duration,
    /// `DB_MAX_LIFETIME` (ms).
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
    /// `AUTH_TOKEN_TTL` (seconds): how long a token is valid.
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
    /// level, lowest first; `None` is unlimited (only when configured as
    /// `unlimited`).
    pub trust: Vec<(String, Option<Quota>)>,
    /// `RATE_LIMIT_CLASS_AUTH`: login attempts per client IP.
    pub class_auth: Quota,
    /// `RATE_LIMIT_CLASS_READ`: reads per subject.
    pub class_read: Quota,
    /// `RATE_LIMIT_CLASS_WRITE`: writes per subject.
    pub class_write: Quota,
}

impl LimitsConfig {
    /// The quota of trust level `level`: `Some(None)` unlimited, `None`
    /// for an unknown level.
    pub fn trust_quota(&self, level: &str) -> Option<Option<Quota>> {
        self.trust
            .iter()
            .find(|(name, _)| name == level)
            .map(|(_, quota)| *quota)
    }
}

/// Where rate limits are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// In this process: each replica counts alone.
    Memory,
    /// In Redis: one count for the whole fleet.
    Redis {
        /// `REDIS_URL`.
        url: String,
        /// `RATE_LIMIT_REDIS_CLUSTER`: cluster nodes, empty for a single
        /// server.
        cluster_nodes: Vec<String>,
        /// `RATE_LIMIT_REDIS_PREFIX`: key prefix and hash tag, so several
        /// deployments can share one Redis.
        prefix: String,
        /// `RATE_LIMIT_REDIS_TIMEOUT_MS`: per-check timeout.
        timeout: Duration,
        /// `RATE_LIMIT_REDIS_MAX_BATCH`: requests per script call at most.
        max_batch: usize,
        /// `RATE_LIMIT_REDIS_MAX_IN_FLIGHT`: script calls in flight at once.
        max_in_flight: usize,
        /// `RATE_LIMIT_REDIS_LOCAL_CACHE`: answer denied keys locally until
        /// their wait has passed.
        local_cache: bool,
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

/// Each variable: name, default, expected format. The README's table is
/// generated from the same facts by hand; keep them in step.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "LISTEN_ADDR",
        "127.0.0.1:8080",
        "a socket address, e.g. 0.0.0.0:8080",
    ),
    (
        "TRUSTED_PROXIES",
        "",
        "comma-separated CIDRs or addresses, e.g. 10.0.0.0/8,192.168.1.10",
    ),
    (
        "CLIENT_IP_HEADER",
        "x-forwarded-for",
        "x-forwarded-for or forwarded",
    ),
    (
        "RATE_LIMIT_IPV6_PREFIX",
        "64",
        "a prefix length from 0 to 128",
    ),
    ("RATE_LIMIT_IP", "100/min", QUOTA_FORMAT),
    ("RATE_LIMIT_SHADOW", "false", "true or false"),
    ("RATE_LIMIT_STORE", "memory", "memory or redis"),
    (
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        "a redis://, rediss:// or unix:// URL",
    ),
    (
        "RATE_LIMIT_REDIS_PREFIX",
        "tollgate",
        "letters, digits, '-', '_' or '.'",
    ),
    (
        "RATE_LIMIT_REDIS_CLUSTER",
        "false",
        "true, false, or comma-separated node URLs (redis://host:port,…)",
    ),
    (
        "RATE_LIMIT_REDIS_TIMEOUT_MS",
        "50",
        "milliseconds, a whole number above 0",
    ),
    (
        "RATE_LIMIT_REDIS_MAX_BATCH",
        "256",
        "a whole number above 0",
    ),
    (
        "RATE_LIMIT_REDIS_MAX_IN_FLIGHT",
        "2",
        "a whole number above 0",
    ),
    ("RATE_LIMIT_REDIS_LOCAL_CACHE", "true", "true or false"),
    ("RATE_LIMIT_FAILURE_MODE", "local", "open, closed or local"),
    (
        "RATE_LIMIT_FALLBACK_REPLICAS",
        "1",
        "a whole number above 0",
    ),
    (
        "METRICS_ADDR",
        "",
        "a socket address, e.g. 127.0.0.1:9090; unset: /metrics on LISTEN_ADDR",
    ),
    ("LOG_FORMAT", "text", "text or json"),
    (
        "READY_CHECK_INTERVAL",
        "5000",
        "milliseconds, a whole number above 0",
    ),
    (
        "READY_CHECK_TIMEOUT",
        "2000",
        "milliseconds, a whole number above 0",
    ),
    (
        "SHUTDOWN_DRAIN_DELAY",
        "5000",
        "milliseconds, a whole number",
    ),
    ("SHUTDOWN_TIMEOUT", "30000", "milliseconds, a whole number"),
    (
        "DATABASE_URL",
        "postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate",
        "a postgres:// or postgresql:// URL",
    ),
    (
        "MIGRATION_DATABASE_URL",
        "",
        "a postgres:// or postgresql:// URL (the owner role); unset: DATABASE_URL",
    ),
    ("DB_MIGRATE_ON_START", "true", "true or false"),
    ("DB_MAX_CONNECTIONS", "20", "a whole number above 0"),
    (
        "DB_MIN_CONNECTIONS",
        "0",
        "a whole number, at most DB_MAX_CONNECTIONS",
    ),
    ("DB_IDLE_TIMEOUT", "30000", "milliseconds, a whole number"),
    (
        "DB_CONNECTION_TIMEOUT",
        "5000",
        "milliseconds, a whole number above 0",
    ),
    ("DB_MAX_LIFETIME", "1800000", "milliseconds, a whole number"),
    (
        "DB_TENANT_MAX_CONNECTIONS",
        "DB_MAX_CONNECTIONS / 4",
        "a whole number from 1 to DB_MAX_CONNECTIONS",
    ),
    ("DB_SYSTEM_CONNECTIONS", "5", "a whole number, at least 3"),
    ("HTTP_HEADER_READ_TIMEOUT", "10s", DURATION_FORMAT),
    ("HTTP_BODY_READ_TIMEOUT", "10s", DURATION_FORMAT),
    ("HTTP_REQUEST_TIMEOUT", "30s", DURATION_FORMAT),
    (
        "RATE_LIMIT_TENANT_CONCURRENCY",
        "32",
        "a whole number above 0, or unlimited",
    ),
    (
        "RATE_LIMIT_SUBJECT_CONCURRENCY",
        "8",
        "a whole number above 0, or unlimited",
    ),
    (
        "LOAD_SHED_START",
        "1.5",
        "a number above 0 (pool load: held + queued over size), or off",
    ),
    ("LOAD_SHED_STEP", "0.5", "a number, at least 0"),
    (
        "AUTH_HASH_WORKERS",
        "the number of cores",
        "a whole number above 0",
    ),
    ("AUTH_HASH_QUEUE", "8", "a whole number"),
    ("TOLLGATE_ENV", "production", "production or development"),
    (
        "AUTH_SECRET",
        "",
        "at least 32 bytes of at least 8 distinct values (e.g. openssl rand -hex 32); required unless TOLLGATE_ENV=development",
    ),
    (
        "AUTH_ISSUER",
        "tollgate",
        "text of at most 256 characters, no control characters",
    ),
    (
        "AUTH_AUDIENCE",
        "tollgate-api",
        "text of at most 256 characters, no control characters",
    ),
    (
        "AUTH_TOKEN_TTL",
        "900",
        "seconds, a whole number from 1 to 31536000 (a year)",
    ),
    ("RATE_LIMIT_TENANT", "3000/min", QUOTA_FORMAT),
    (
        "TRUST_LEVELS",
        "new,basic,trusted,staff",
        "comma-separated names, lowest first (a-z, 0-9, '_', '-')",
    ),
    ("RATE_LIMIT_TRUST_NEW", "60/min", TRUST_QUOTA_FORMAT),
    ("RATE_LIMIT_TRUST_BASIC", "300/min", TRUST_QUOTA_FORMAT),
    ("RATE_LIMIT_TRUST_TRUSTED", "1200/min", TRUST_QUOTA_FORMAT),
    ("RATE_LIMIT_TRUST_STAFF", "unlimited", TRUST_QUOTA_FORMAT),
    ("RATE_LIMIT_CLASS_AUTH", "10/min,burst=5", QUOTA_FORMAT),
    ("RATE_LIMIT_CLASS_READ", "600/min", QUOTA_FORMAT),
    ("RATE_LIMIT_CLASS_WRITE", "120/min", QUOTA_FORMAT),
    (
        "TRUST_CACHE_TTL",
        "60000",
        "milliseconds, a whole number above 0",
    ),
    ("TRUST_BROADCAST_ENABLED", "true", "true or false"),
    (
        "CLEANUP_INTERVAL",
        "60000",
        "milliseconds, a whole number above 0",
    ),
    (
        "ITEM_RETENTION",
        "604800000",
        "milliseconds, a whole number (7 days by default)",
    ),
];

/// The longest `AUTH_TOKEN_TTL`: a year.
pub const MAX_TOKEN_TTL_SECS: u64 = 365 * 24 * 3600;

/// The format of duration variables.
pub const DURATION_FORMAT: &str = "a duration with a unit (500ms, 30s, 5min, 1h) or a whole number of milliseconds, above 0; or off";

/// `500ms`, `30s`, `5min`, `1h`, or a bare number of milliseconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => 1,
        "s" | "sec" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(ms).map(Duration::from_millis)
}

/// The format of `RATE_LIMIT_TRUST_<LEVEL>`.
pub const TRUST_QUOTA_FORMAT: &str =
    "N/PERIOD[,burst=B] (e.g. 100/min), or unlimited; required for every level in TRUST_LEVELS";

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (tests pass a map instead of
    /// mutating the process environment).
    ///
    /// ```
    /// use tollgate_server::config::Config;
    ///
    /// let env = |ip: &'static str| move |var: &str| match var {
    ///     "RATE_LIMIT_IP" => Some(ip.to_owned()),
    ///     "AUTH_SECRET" => Some("0123456789abcdef0123456789abcdef".to_owned()),
    ///     _ => None,
    /// };
    /// let config = Config::from_lookup(env("5/s")).unwrap();
    /// assert_eq!(config.rate_limit_ip.count(), 5);
    ///
    /// let err = Config::from_lookup(env("fast")).unwrap_err();
    /// assert!(err.to_string().starts_with(r#"invalid RATE_LIMIT_IP="fast": expected N/PERIOD"#));
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &'static str| Var::read(&lookup, name);
        let header: ForwardedHeader =
            var("CLIENT_IP_HEADER").parse_or(ForwardedHeader::default())?;
        let proxies = var("TRUSTED_PROXIES");
        let trusted_proxies = match &proxies.value {
            None => TrustedProxies::none(),
            // The library's error says *why* (a /0 trusts everyone).
            Some(v) => v.parse::<TrustedProxies>().map_err(|e| {
                let mut err = proxies.error();
                err.expected = format!("{} ({e})", err.expected);
                err
            })?,
        }
        .with_header(header);
        let ipv6_prefix = var("RATE_LIMIT_IPV6_PREFIX").parse_or(64u8)?;
        if ipv6_prefix > 128 {
            return Err(var("RATE_LIMIT_IPV6_PREFIX").error());
        }
        Ok(Self {
            listen_addr: var("LISTEN_ADDR").parse_or(SocketAddr::from(([127, 0, 0, 1], 8080)))?,
            trusted_proxies,
            ipv6_prefix,
            rate_limit_ip: var("RATE_LIMIT_IP").parse_or(Quota::per_minute(100))?,
            rate_limit_shadow: var("RATE_LIMIT_SHADOW").parse_bool_or(false)?,
            store: store_config(&var)?,
            metrics_addr: match var("METRICS_ADDR").value {
                None => None,
                Some(_) => {
                    Some(var("METRICS_ADDR").parse_or(SocketAddr::from(([127, 0, 0, 1], 0)))?)
                }
            },
            failure_mode: var("RATE_LIMIT_FAILURE_MODE").parse_or(FailurePolicy::Local)?,
            fallback_replicas: match var("RATE_LIMIT_FALLBACK_REPLICAS").parse_or(1u32)? {
                0 => return Err(var("RATE_LIMIT_FALLBACK_REPLICAS").error()),
                n => n,
            },
            log_format: match var("LOG_FORMAT").value.as_deref().map(str::trim) {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(_) => return Err(var("LOG_FORMAT").error()),
            },
            ready_check_interval: millis_above_zero(var("READY_CHECK_INTERVAL"), 5_000)?,
            ready_check_timeout: millis_above_zero(var("READY_CHECK_TIMEOUT"), 2_000)?,
            shutdown_drain_delay: Duration::from_millis(
                var("SHUTDOWN_DRAIN_DELAY").parse_or(5_000u64)?,
            ),
            shutdown_timeout: Duration::from_millis(var("SHUTDOWN_TIMEOUT").parse_or(30_000u64)?),
            database: database_config(&var)?,
            auth: auth_config(&var)?,
            limits: limits_config(&var, &lookup)?,
            trust_cache_ttl: millis_above_zero(var("TRUST_CACHE_TTL"), 60_000)?,
            trust_broadcast: var("TRUST_BROADCAST_ENABLED").parse_bool_or(true)?,
            cleanup_interval: millis_above_zero(var("CLEANUP_INTERVAL"), 60_000)?,
            item_retention: Duration::from_millis(var("ITEM_RETENTION").parse_or(604_800_000u64)?),
            http: HttpConfig {
                header_read_timeout: duration_or_off(var("HTTP_HEADER_READ_TIMEOUT"), 10_000)?,
                body_read_timeout: duration_or_off(var("HTTP_BODY_READ_TIMEOUT"), 10_000)?,
                request_timeout: duration_or_off(var("HTTP_REQUEST_TIMEOUT"), 30_000)?,
            },
            capacity: capacity_config(&var)?,
        })
    }
}

/// A duration above zero, with units, or `off`; `default_ms` when unset.
fn duration_or_off(var: Var, default_ms: u64) -> Result<Option<Duration>, ConfigError> {
    match var.value.as_deref().map(str::trim) {
        None => Ok(Some(Duration::from_millis(default_ms))),
        Some("off") => Ok(None),
        Some(v) => parse_duration(v)
            .filter(|d| !d.is_zero())
            .map(Some)
            .ok_or_else(|| var.error()),
    }
}

fn capacity_config(var: &impl Fn(&'static str) -> Var) -> Result<CapacityConfig, ConfigError> {
    let concurrency = |name: &'static str, default: u32| {
        let v = var(name);
        match v.value.as_deref().map(str::trim) {
            Some("unlimited") => Ok(None),
            _ => match v.parse_or(default)? {
                0 => Err(v.error()),
                n => Ok(Some(n)),
            },
        }
    };
    let start = var("LOAD_SHED_START");
    let shed_start = match start.value.as_deref().map(str::trim) {
        Some("off") => None,
        _ => match start.parse_or(1.5f64)? {
            s if s.is_finite() && s > 0.0 => Some(s),
            _ => return Err(start.error()),
        },
    };
    let step = var("LOAD_SHED_STEP");
    let shed_step = match step.parse_or(0.5f64)? {
        s if s.is_finite() && s >= 0.0 => s,
        _ => return Err(step.error()),
    };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let workers = var("AUTH_HASH_WORKERS");
    let hash_workers = match workers.parse_or(cores)? {
        0 => return Err(workers.error()),
        n => n,
    };
    Ok(CapacityConfig {
        tenant_concurrency: concurrency("RATE_LIMIT_TENANT_CONCURRENCY", 32)?,
        subject_concurrency: concurrency("RATE_LIMIT_SUBJECT_CONCURRENCY", 8)?,
        shed_start,
        shed_step,
        hash_workers,
        hash_queue: var("AUTH_HASH_QUEUE").parse_or(8usize)?,
    })
}

fn millis_above_zero(var: Var, default: u64) -> Result<Duration, ConfigError> {
    match var.parse_or(default)? {
        0 => Err(var.error()),
        ms => Ok(Duration::from_millis(ms)),
    }
}

impl DatabaseConfig {
    /// The `DATABASE_URL`, `MIGRATION_DATABASE_URL` and `DB_*` variables
    /// alone (the CLI needs no more).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        database_config(&|name| Var::read(&lookup, name))
    }
}

impl LimitsConfig {
    /// The limit variables alone.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        limits_config(&|name| Var::read(&lookup, name), &lookup)
    }
}

fn database_config(var: &impl Fn(&'static str) -> Var) -> Result<DatabaseConfig, ConfigError> {
    let url = |name: &'static str| -> Result<Option<String>, ConfigError> {
        let v = var(name);
        match v.value.as_deref().map(str::trim) {
            None => Ok(None),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Some(u.to_owned()))
            }
            Some(_) => Err(v.error()),
        }
    };
    let max_connections = match var("DB_MAX_CONNECTIONS").parse_or(20u32)? {
        0 => return Err(var("DB_MAX_CONNECTIONS").error()),
        n => n,
    };
    let min_connections = var("DB_MIN_CONNECTIONS").parse_or(0u32)?;
    if min_connections > max_connections {
        return Err(var("DB_MIN_CONNECTIONS").error());
    }
    let tenant_max = var("DB_TENANT_MAX_CONNECTIONS");
    let tenant_max_connections = match tenant_max.parse_or((max_connections / 4).max(1))? {
        n if (1..=max_connections).contains(&n) => n,
        _ => return Err(tenant_max.error()),
    };
    let system = var("DB_SYSTEM_CONNECTIONS");
    // A readiness check, a singleton job and trust lookups each need one.
    let system_connections = match system.parse_or(5u32)? {
        n if n >= 3 => n,
        _ => return Err(system.error()),
    };
    Ok(DatabaseConfig {
        tenant_max_connections,
        system_connections,
        url: url("DATABASE_URL")?.unwrap_or_else(|| {
            "postgres://tollgate_app:tollgate_app@127.0.0.1:5432/tollgate".to_owned()
        }),
        migration_url: url("MIGRATION_DATABASE_URL")?,
        migrate_on_start: var("DB_MIGRATE_ON_START").parse_bool_or(true)?,
        max_connections,
        min_connections,
        idle_timeout: Duration::from_millis(var("DB_IDLE_TIMEOUT").parse_or(30_000u64)?),
        connection_timeout: millis_above_zero(var("DB_CONNECTION_TIMEOUT"), 5_000)?,
        max_lifetime: Duration::from_millis(var("DB_MAX_LIFETIME").parse_or(1_800_000u64)?),
    })
}

fn auth_config(var: &impl Fn(&'static str) -> Var) -> Result<AuthConfig, ConfigError> {
    let env = var("TOLLGATE_ENV");
    let development = match env.value.as_deref().map(str::trim) {
        None | Some("production") => false,
        Some("development" | "dev") => true,
        Some(_) => return Err(env.error()),
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
    // Bounded so that "now + ttl" cannot overflow, and a token cannot be
    // valid for a lifetime by accident.
    let token_ttl = match ttl_var.parse_or(900u64)? {
        s @ 1..=MAX_TOKEN_TTL_SECS => Duration::from_secs(s),
        _ => return Err(ttl_var.error()),
    };
    let text = |name: &'static str, default: &str| {
        let v = var(name);
        match v.value.as_deref().map(str::trim) {
            None => Ok(default.to_owned()),
            Some(t) if t.len() <= 256 && !t.chars().any(char::is_control) => Ok(t.to_owned()),
            Some(_) => Err(v.error()),
        }
    };
    Ok(AuthConfig {
        secret,
        secret_generated,
        token_ttl,
        issuer: text("AUTH_ISSUER", "tollgate")?,
        audience: text("AUTH_AUDIENCE", "tollgate-api")?,
    })
}

/// A secret anyone could guess for all its length: fewer than 8 distinct
/// bytes (`aaaa…`, `abab…`, `00000…`).
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
    let levels: Vec<String> = match &levels_var.value {
        None => ["new", "basic", "trusted", "staff"]
            .map(str::to_owned)
            .to_vec(),
        Some(v) => v.split(',').map(|l| l.trim().to_owned()).collect(),
    };
    let valid_level = |l: &String| {
        !l.is_empty()
            && l.len() <= 32
            && l.starts_with(|c: char| c.is_ascii_lowercase())
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
    };
    if !levels.iter().all(valid_level) {
        return Err(levels_var.error());
    }
    let mut trust = Vec::with_capacity(levels.len());
    for level in levels {
        // The variable's name is built from the level, so it is not in
        // VARIABLES for custom levels; the error says the format anyway.
        let name = format!(
            "RATE_LIMIT_TRUST_{}",
            level.to_ascii_uppercase().replace('-', "_")
        );
        let default = match level.as_str() {
            "new" => Some("60/min"),
            "basic" => Some("300/min"),
            "trusted" => Some("1200/min"),
            "staff" => Some("unlimited"),
            _ => None,
        };
        let raw = lookup(&name).filter(|v| !v.trim().is_empty());
        let error = |value: Option<String>| ConfigError {
            var: Box::leak(name.clone().into_boxed_str()),
            value: value.unwrap_or_default(),
            expected: TRUST_QUOTA_FORMAT.to_owned(),
        };
        let value = match raw.as_deref().or(default) {
            Some(v) => v.trim().to_owned(),
            None => return Err(error(None)),
        };
        let quota = if value == "unlimited" {
            None
        } else {
            Some(value.parse::<Quota>().map_err(|_| error(raw.clone()))?)
        };
        trust.push((level, quota));
    }
    Ok(LimitsConfig {
        tenant: var("RATE_LIMIT_TENANT").parse_or(Quota::per_minute(3000))?,
        trust,
        class_auth: var("RATE_LIMIT_CLASS_AUTH").parse_or(Quota::per_minute(10).with_burst(5))?,
        class_read: var("RATE_LIMIT_CLASS_READ").parse_or(Quota::per_minute(600))?,
        class_write: var("RATE_LIMIT_CLASS_WRITE").parse_or(Quota::per_minute(120))?,
    })
}

fn store_config(var: &impl Fn(&'static str) -> Var) -> Result<StoreConfig, ConfigError> {
    let kind = var("RATE_LIMIT_STORE");
    match kind.value.as_deref().map(str::trim) {
        None | Some("memory") => return Ok(StoreConfig::Memory),
        Some("redis") => {}
        Some(_) => return Err(kind.error()),
    }
    let is_url = |v: &str| {
        ["redis://", "rediss://", "unix://"]
            .iter()
            .any(|p| v.starts_with(p))
    };
    let url_var = var("REDIS_URL");
    let url = url_var
        .value
        .clone()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    if !is_url(url.trim()) {
        return Err(url_var.error());
    }
    let cluster = var("RATE_LIMIT_REDIS_CLUSTER");
    let cluster_nodes = match cluster.value.as_deref().map(str::trim) {
        None => Vec::new(),
        Some(v) => match cluster.parse_bool_or(false) {
            Ok(true) => vec![url.clone()],
            Ok(false) => Vec::new(),
            Err(_) => {
                let nodes: Vec<String> = v.split(',').map(|n| n.trim().to_owned()).collect();
                if nodes.iter().any(|n| !is_url(n)) {
                    return Err(cluster.error());
                }
                nodes
            }
        },
    };
    let prefix_var = var("RATE_LIMIT_REDIS_PREFIX");
    let prefix = prefix_var
        .value
        .clone()
        .unwrap_or_else(|| "tollgate".to_owned());
    // Braces would break the hash tag; spaces and colons the key layout.
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(prefix_var.error());
    }
    let timeout_var = var("RATE_LIMIT_REDIS_TIMEOUT_MS");
    let timeout = match timeout_var.parse_or(50u64)? {
        0 => return Err(timeout_var.error()),
        ms => Duration::from_millis(ms),
    };
    let above_zero = |name: &'static str, default: usize| {
        let v = var(name);
        match v.parse_or(default)? {
            0 => Err(v.error()),
            n => Ok(n),
        }
    };
    Ok(StoreConfig::Redis {
        url: url.trim().to_owned(),
        cluster_nodes,
        prefix,
        timeout,
        max_batch: above_zero("RATE_LIMIT_REDIS_MAX_BATCH", 256)?,
        max_in_flight: above_zero("RATE_LIMIT_REDIS_MAX_IN_FLIGHT", 2)?,
        local_cache: var("RATE_LIMIT_REDIS_LOCAL_CACHE").parse_bool_or(true)?,
    })
}

/// One variable as read.
struct Var {
    name: &'static str,
    value: Option<String>,
}

impl Var {
    fn read(lookup: &impl Fn(&str) -> Option<String>, name: &'static str) -> Self {
        Self {
            name,
            value: lookup(name).filter(|v| !v.trim().is_empty()),
        }
    }

    fn error(&self) -> ConfigError {
        let expected = VARIABLES
            .iter()
            .find(|(name, ..)| *name == self.name)
            .map_or("", |(.., format)| format);
        ConfigError {
            var: self.name,
            value: self.value.clone().unwrap_or_default(),
            expected: expected.to_owned(),
        }
    }

    fn parse_or<T: FromStr>(&self, default: T) -> Result<T, ConfigError> {
        match &self.value {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|_| self.error()),
        }
    }

    fn parse_bool_or(&self, default: bool) -> Result<bool, ConfigError> {
        match self.value.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
            Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(self.error()),
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
        let levels: Vec<_> = c
            .limits
            .trust
            .iter()
            .map(|(l, q)| (l.as_str(), *q))
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
        assert_eq!(
            c.limits.trust_quota("free"),
            Some(Some(Quota::per_minute(10)))
        );
        assert_eq!(c.limits.trust_quota("pro"), Some(None));
        assert_eq!(c.limits.trust_quota("new"), None);
        let err = parse(&[("RATE_LIMIT_TRUST_NEW", "lots")]).unwrap_err();
        assert_eq!(
            (err.var, err.value.as_str()),
            ("RATE_LIMIT_TRUST_NEW", "lots")
        );
    }

    #[test]
    fn redis_store() {
        let c = parse(&[("RATE_LIMIT_STORE", "redis")]).unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Redis {
                url: "redis://127.0.0.1:6379".into(),
                cluster_nodes: vec![],
                prefix: "tollgate".into(),
                timeout: Duration::from_millis(50),
                max_batch: 256,
                max_in_flight: 2,
                local_cache: true,
            }
        );
        let c = parse(&[
            ("RATE_LIMIT_STORE", "redis"),
            ("REDIS_URL", "redis://10.0.0.5:7000"),
            ("RATE_LIMIT_REDIS_CLUSTER", "true"),
            ("RATE_LIMIT_REDIS_PREFIX", "api-prod"),
            ("RATE_LIMIT_REDIS_TIMEOUT_MS", "20"),
            ("RATE_LIMIT_FAILURE_MODE", "closed"),
            ("RATE_LIMIT_FALLBACK_REPLICAS", "3"),
        ])
        .unwrap();
        let StoreConfig::Redis {
            cluster_nodes,
            prefix,
            timeout,
            ..
        } = c.store
        else {
            panic!("not redis")
        };
        assert_eq!(cluster_nodes, ["redis://10.0.0.5:7000"]);
        assert_eq!(prefix, "api-prod");
        assert_eq!(timeout, Duration::from_millis(20));
        assert_eq!(c.failure_mode, FailurePolicy::Closed);
        assert_eq!(c.fallback_replicas, 3);
        let c = parse(&[
            ("RATE_LIMIT_STORE", "redis"),
            ("RATE_LIMIT_REDIS_CLUSTER", "redis://a:1, redis://b:2"),
        ])
        .unwrap();
        let StoreConfig::Redis { cluster_nodes, .. } = c.store else {
            panic!("not redis")
        };
        assert_eq!(cluster_nodes, ["redis://a:1", "redis://b:2"]);
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
        for text in ["", "s", "5d", "1.5s", "-1s", "99999999999999999999h"] {
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
            ("SHUTDOWN_TIMEOUT", "5s"),
            ("SHUTDOWN_DRAIN_DELAY", "-1"),
            ("READY_CHECK_INTERVAL", "0"),
            ("READY_CHECK_TIMEOUT", "soon"),
            ("DATABASE_URL", "mysql://x"),
            ("MIGRATION_DATABASE_URL", "localhost"),
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
            ("ITEM_RETENTION", "7d"),
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
            ("RATE_LIMIT_REDIS_TIMEOUT_MS", "0"),
            ("RATE_LIMIT_REDIS_MAX_BATCH", "0"),
            ("RATE_LIMIT_REDIS_MAX_IN_FLIGHT", "many"),
            ("RATE_LIMIT_REDIS_LOCAL_CACHE", "sometimes"),
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
}
