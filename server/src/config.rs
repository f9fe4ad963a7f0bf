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
];

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
    /// let config = Config::from_lookup(|var| (var == "RATE_LIMIT_IP").then(|| "5/s".to_owned())).unwrap();
    /// assert_eq!(config.rate_limit_ip.count(), 5);
    ///
    /// let err = Config::from_lookup(|var| (var == "RATE_LIMIT_IP").then(|| "fast".to_owned())).unwrap_err();
    /// assert!(err.to_string().starts_with(r#"invalid RATE_LIMIT_IP="fast": expected N/PERIOD"#));
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &'static str| Var {
            name,
            value: lookup(name).filter(|v| !v.trim().is_empty()),
        };
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
        })
    }
}

fn millis_above_zero(var: Var, default: u64) -> Result<Duration, ConfigError> {
    match var.parse_or(default)? {
        0 => Err(var.error()),
        ms => Ok(Duration::from_millis(ms)),
    }
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
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
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
