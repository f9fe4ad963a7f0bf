//! Helpers shared by the integration tests: the real binary on a free
//! loopback port.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The secret test servers sign tokens with.
pub const AUTH_SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A running server, killed when dropped (also when a test fails).
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    /// Starts the binary with `env` on 127.0.0.1:0 and waits (bounded) for
    /// the address it logs.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate-server"));
        cmd.env("LISTEN_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            // Tests that care about draining set their own delay.
            .env("SHUTDOWN_DRAIN_DELAY", "0")
            .env("AUTH_SECRET", AUTH_SECRET)
            .env("DATABASE_URL", tollgate_test_support::app_url("tollgate"))
            .env(
                "MIGRATION_DATABASE_URL",
                tollgate_test_support::owner_url("tollgate"),
            )
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start tollgate-server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("addr=").nth(1) {
                    let _ = tx.send(addr.split_whitespace().next().unwrap_or("").to_owned());
                }
                // Keep draining so the server never blocks on a full pipe.
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server did not log its address within 20 s");
        Self {
            child,
            base: format!("http://{addr}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The status of `GET url`.
pub async fn status(http: &reqwest::Client, url: String) -> u16 {
    http.get(url).send().await.unwrap().status().as_u16()
}
