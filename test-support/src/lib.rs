//! Helpers for Tollgate's integration tests: real services on loopback,
//! never mocks.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

/// A `redis-server` of the test's own on a loopback port, for tests that
/// kill, pause or restart Redis; stopped when dropped.
#[derive(Debug)]
pub struct OwnRedis {
    child: Child,
    /// The port it listens on.
    pub port: u16,
}

impl OwnRedis {
    /// Starts one on `port`, or on a free port, and waits (at most 5 s)
    /// until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH` (`make test` installs it) or does
    /// not start.
    pub fn start(port: Option<u16>) -> Self {
        Self::spawn(port.unwrap_or_else(free_port), &[])
    }

    /// Starts a cluster-enabled node on a free port, its cluster state in a
    /// fresh temporary directory; join nodes with `redis-cli --cluster create`.
    pub fn start_cluster_node() -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let dir = dir.to_string_lossy().into_owned();
        Self::spawn(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--dir",
                &dir,
                // Masters keep serving their slots when another one is down
                // (the deployment documented in the README).
                "--cluster-require-full-coverage",
                "no",
            ],
        )
    }

    fn spawn(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (make test installs it)");
        wait_for_port(port, "redis-server");
        Self { child, port }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends `signal` (`-STOP`, `-CONT`, …) to the process.
    ///
    /// # Panics
    ///
    /// If `kill` fails.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} failed");
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of the test's own: `n` masters on loopback, no
/// replicas, every node agreeing the cluster is up. Stopped when dropped.
#[derive(Debug)]
pub struct OwnCluster {
    /// The masters, in the order they were created.
    pub nodes: Vec<OwnRedis>,
}

impl OwnCluster {
    /// Starts `n` cluster nodes, joins them (`redis-cli --cluster create`),
    /// and waits (at most 10 s) until every node reports `cluster_state:ok`.
    ///
    /// # Panics
    ///
    /// If the nodes do not start or the cluster does not come up.
    pub fn start(n: usize) -> Self {
        let nodes: Vec<OwnRedis> = (0..n).map(|_| OwnRedis::start_cluster_node()).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli on PATH");
        assert!(created.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &nodes {
            while !node.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster not ok after 10 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(OwnRedis::url).collect()
    }

    /// The index of the master that holds `key`.
    ///
    /// # Panics
    ///
    /// If no node holds the key's slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0]
            .cli(&["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("a slot");
        self.nodes
            .iter()
            .position(|n| n.owns(slot))
            .expect("a node holding the slot")
    }
}

impl OwnRedis {
    /// Runs `redis-cli -p <port> args…` and returns what it printed.
    ///
    /// # Panics
    ///
    /// If `redis-cli` cannot run.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli on PATH");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many times this server ran `command` (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["info", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Whether this cluster node serves `slot` itself.
    fn owns(&self, slot: u16) -> bool {
        // `CLUSTER COUNTKEYSINSLOT` answers on any node; ownership is in
        // `CLUSTER NODES`: the line marked `myself` lists its slot ranges.
        let nodes = self.cli(&["cluster", "nodes"]);
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        me.split_whitespace().skip(8).any(|range| {
            let mut bounds = range.split('-').map(|b| b.parse::<u16>().ok());
            match (bounds.next().flatten(), bounds.next().flatten()) {
                (Some(start), Some(end)) => (start..=end).contains(&slot),
                (Some(one), None) => one == slot,
                _ => false,
            }
        })
    }
}

/// Waits (at most 5 s) until something accepts connections on loopback
/// `port`; panics naming `what` after that.
fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port nothing listens on right now.
///
/// # Panics
///
/// If no loopback port can be bound.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A Redis key prefix that no other test, process or earlier run uses.
pub fn unique_prefix(test: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "t-{test}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The owner role's URL of database `db` on the loopback Postgres that
/// `scripts/services.sh` sets up (roles `tollgate_owner`, `tollgate_app`).
pub fn owner_url(db: &str) -> String {
    format!("postgres://tollgate_owner:tollgate_owner@127.0.0.1:5432/{db}")
}

/// The app role's URL of database `db`.
pub fn app_url(db: &str) -> String {
    format!("postgres://tollgate_app:tollgate_app@127.0.0.1:5432/{db}")
}

/// PgBouncer of the test's own, in transaction mode in front of the local
/// Postgres, started by `scripts/pgbouncer.sh` as `make test` starts the
/// shared one; stopped when dropped.
#[derive(Debug)]
pub struct OwnPgBouncer {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    dir: std::path::PathBuf,
}

impl OwnPgBouncer {
    /// Starts one on a free port whose pool holds at most `pool_size`
    /// server connections per database and role, and waits (at most 5 s)
    /// until it accepts connections.
    ///
    /// # Panics
    ///
    /// If `pgbouncer` is not installed (`make test` installs it) or does
    /// not start.
    pub fn start(pool_size: u32) -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("tollgate-pgbouncer-{}-{port}", std::process::id()));
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pgbouncer.sh");
        let path = std::env::var("PATH").unwrap_or_default();
        let child = Command::new("bash")
            .arg(script)
            .args(["--foreground", &port.to_string(), &pool_size.to_string()])
            .arg(&dir)
            // Debian installs it in /usr/sbin, not on every user's PATH.
            .env("PATH", format!("{path}:/usr/sbin"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bash scripts/pgbouncer.sh");
        wait_for_port(port, "pgbouncer");
        Self { child, port, dir }
    }

    /// The app role's URL of database `db` through it.
    pub fn app_url(&self, db: &str) -> String {
        format!(
            "postgres://tollgate_app:tollgate_app@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// The owner role's URL of database `db` through it.
    pub fn owner_url(&self, db: &str) -> String {
        format!(
            "postgres://tollgate_owner:tollgate_owner@127.0.0.1:{}/{db}",
            self.port
        )
    }
}

impl Drop for OwnPgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh database of the test's own, created by the owner role (which
/// has `CREATEDB`), dropped when [`drop_now`](Self::drop_now) is called.
#[derive(Debug)]
pub struct TestDb {
    /// Its name.
    pub name: String,
}

impl TestDb {
    /// Creates `tg_<test>_<pid>_<n>` and runs `setup` in it as
    /// the owner (a script of several statements).
    ///
    /// # Panics
    ///
    /// If Postgres or the roles are not there (`make test` sets them up).
    pub async fn create(test: &str, setup: &str) -> Self {
        use sqlx::Connection;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tg_{test}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = sqlx::PgConnection::connect(&owner_url("postgres"))
            .await
            .expect("connect as tollgate_owner (run scripts/services.sh)");
        for sql in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            // The name is generated here, never user input.
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut admin)
                .await
                .expect("create the test database");
        }
        let mut owner = sqlx::PgConnection::connect(&owner_url(&name))
            .await
            .expect("connect to the test database");
        sqlx::raw_sql(sqlx::AssertSqlSafe(setup.to_owned()))
            .execute(&mut owner)
            .await
            .expect("the test schema");
        Self { name }
    }

    /// The owner's URL.
    pub fn owner_url(&self) -> String {
        owner_url(&self.name)
    }

    /// The app role's URL.
    pub fn app_url(&self) -> String {
        app_url(&self.name)
    }

    /// Drops the database (closing its remaining connections).
    pub async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&owner_url("postgres")).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// The log lines written on this thread while it lives (a
/// current-thread runtime's spawned tasks included).
pub struct LogCapture {
    lines: Lines,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone, Default)]
struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for LogCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogCapture").finish_non_exhaustive()
    }
}

impl LogCapture {
    /// Starts capturing, at the subscriber's default level (INFO).
    pub fn start() -> Self {
        let lines = Lines::default();
        let writer = lines.clone();
        let guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        Self {
            lines,
            _guard: guard,
        }
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        let bytes = self
            .lines
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
