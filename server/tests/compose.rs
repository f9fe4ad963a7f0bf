//! Docker cannot run here, so `docker-compose.yml` is checked as far as it
//! can be without it: it parses, every service it depends on exists, every
//! file it mounts or builds from exists, every variable it gives the server
//! is one the server reads, and Caddy and Prometheus point at the server
//! services on the port they listen on.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use tollgate_server::config::VARIABLES;
use yaml_rust2::{Yaml, YamlLoader};

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash()
        .map(|h| {
            h.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_service_file_and_variable_it_references_exists() {
    let doc = compose();
    let services = &doc["services"];
    let names: BTreeSet<String> = keys(services).into_iter().collect();
    for expected in [
        "postgres",
        "pgbouncer",
        "redis",
        "migrate",
        "server-1",
        "server-2",
        "server-3",
        "caddy",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(expected), "no service {expected}");
    }
    let known: BTreeSet<&str> = VARIABLES.iter().map(|v| v.name).collect();
    for name in &names {
        let service = &services[name.as_str()];
        // depends_on: a list or a map of services.
        let deps = match &service["depends_on"] {
            Yaml::Array(list) => list
                .iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect(),
            other => keys(other),
        };
        for dep in deps {
            assert!(names.contains(&dep), "{name} depends on unknown {dep}");
        }
        // Bind mounts: ./path:/target[:ro]
        if let Some(volumes) = service["volumes"].as_vec() {
            for v in volumes.iter().filter_map(Yaml::as_str) {
                if let Some(local) = v.strip_prefix("./") {
                    let local = local.split(':').next().unwrap();
                    assert!(repo(local).exists(), "{name} mounts missing {local}");
                }
            }
        }
        if let Some(build) = service["build"].as_str() {
            assert!(
                repo(build).join("Dockerfile").exists(),
                "{name}: no Dockerfile"
            );
        }
        // The server's variables: each one the server reads.
        let is_server = name.starts_with("server-") || name == "migrate";
        if is_server {
            for var in keys(&service["environment"]) {
                assert!(known.contains(var.as_str()), "{name} sets unknown {var}");
            }
        }
    }
    // The server replicas: port 8080, migrations off (the migrate service
    // runs them once), the Redis store so limits hold fleet-wide.
    for n in 1..=3 {
        let env = &services[format!("server-{n}").as_str()]["environment"];
        assert_eq!(env["LISTEN_ADDR"].as_str(), Some("0.0.0.0:8080"));
        assert_eq!(env["DB_MIGRATE_ON_START"].as_str(), Some("false"));
        assert_eq!(env["RATE_LIMIT_STORE"].as_str(), Some("redis"));
        assert!(env["AUTH_SECRET"].as_str().unwrap().contains("AUTH_SECRET"));
        // Metrics on an address of their own, which Caddy does not proxy.
        assert_eq!(env["METRICS_ADDR"].as_str(), Some("0.0.0.0:9100"));
        // Requests through the pooler without a statement cache; LISTEN on
        // a direct connection.
        assert!(
            env["DATABASE_URL"]
                .as_str()
                .unwrap()
                .contains("@pgbouncer:6432/")
        );
        assert_eq!(env["DB_STATEMENT_CACHE"].as_str(), Some("0"));
        assert!(
            env["DATABASE_DIRECT_URL"]
                .as_str()
                .unwrap()
                .contains("@postgres:5432/")
        );
        // The owner's credentials go to the one-shot migrate service only.
        for (name, value) in env.as_hash().unwrap() {
            let value = value.as_str().unwrap_or_default();
            assert!(
                !value.contains("tollgate_owner") && !value.contains("OWNER_PASSWORD"),
                "server-{n} gets the owner's credentials in {name:?}"
            );
        }
    }
    let migrate_env = &services["migrate"]["environment"];
    assert!(
        migrate_env["MIGRATION_DATABASE_URL"]
            .as_str()
            .unwrap()
            .contains("tollgate_owner")
    );
    assert_eq!(services["migrate"]["command"][0].as_str(), Some("migrate"));
    // Migrations hold a session lock: straight to Postgres, never the pooler.
    assert!(
        migrate_env["MIGRATION_DATABASE_URL"]
            .as_str()
            .unwrap()
            .contains("@postgres:5432/")
    );
    // The pooler is the Dockerfile's `pgbouncer` stage, run by the script
    // the tests use, in transaction mode.
    let pgbouncer = &services["pgbouncer"];
    assert_eq!(pgbouncer["build"]["target"].as_str(), Some("pgbouncer"));
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(dockerfile.contains("AS pgbouncer"));
    assert!(dockerfile.contains("COPY scripts/pgbouncer.sh"));
    let script = std::fs::read_to_string(repo("scripts/pgbouncer.sh")).unwrap();
    assert!(script.contains("pool_mode = transaction"));
}

#[test]
fn caddy_and_prometheus_point_at_the_replicas() {
    let caddyfile = std::fs::read_to_string(repo("deploy/Caddyfile")).unwrap();
    let prometheus = std::fs::read_to_string(repo("grafana/prometheus.yml")).unwrap();
    for n in 1..=3 {
        let target = format!("server-{n}:8080");
        assert!(caddyfile.contains(&target), "Caddyfile lacks {target}");
        let metrics = format!("server-{n}:9100");
        assert!(
            prometheus.contains(&metrics),
            "prometheus.yml lacks {metrics}"
        );
        assert!(
            !caddyfile.contains(&metrics),
            "Caddy must not proxy the metrics address"
        );
    }
    assert!(caddyfile.contains("health_uri /ready"));
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("USER nonroot"),
        "the image must not run as root"
    );
    assert!(dockerfile.contains("-p tollgate-server"));
}

#[test]
fn the_caddyfile_is_valid_for_caddy() {
    // Debian's caddy (`make test` installs it) parses and adapts it.
    let out = std::process::Command::new("caddy")
        .args(["adapt", "--adapter", "caddyfile", "--config"])
        .arg(repo("deploy/Caddyfile"))
        .output()
        .expect("caddy on PATH (make test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn k6_scripts_parse_and_set_thresholds() {
    // k6 is not installed here; node checks the ES module syntax.
    let dir = repo("load-tests/k6");
    let tmp = std::env::temp_dir().join(format!("tollgate-k6-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("js") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if name != "lib" {
            assert!(text.contains("thresholds"), "{name}.js sets no thresholds");
        }
        let copy = tmp.join(format!("{name}.mjs"));
        std::fs::write(&copy, text).unwrap();
        let out = std::process::Command::new("node")
            .arg("--check")
            .arg(&copy)
            .output()
            .expect("node on PATH");
        assert!(
            out.status.success(),
            "{name}.js: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(checked >= 5, "only {checked} scripts");
}

/// Compose's own parser (Debian's `docker-compose`; `make test` installs
/// it; no Docker daemon needed) accepts the file, and refuses to start the
/// cluster without `AUTH_SECRET`.
#[test]
fn docker_compose_itself_accepts_the_file() {
    let run = |secret: Option<&str>| {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-f")
            .arg(repo("docker-compose.yml"))
            .args(["config", "-q"])
            .env_remove("AUTH_SECRET");
        if let Some(secret) = secret {
            cmd.env("AUTH_SECRET", secret);
        }
        cmd.output()
            .expect("docker-compose on PATH (make test installs it)")
    };
    let out = run(Some("compose-check-0123456789abcdef0123456789"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("AUTH_SECRET"));
}
