//! The dashboard is not decorative: a real Prometheus (Debian's package) on
//! loopback scrapes the real server under some traffic, and every panel's
//! query must parse and return data. The alert rules pass `promtool`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Prometheus, Server, client, repo_file};
use tokio::time::Instant;

/// Grafana's variables, as a query for "All" would expand them.
fn expand(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$instance", ".*")
        .replace("$route", ".*")
}

#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo_file("grafana/alerts.yml"))
        .output()
        .expect("promtool on PATH (make test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn every_panel_query_returns_data_from_a_real_prometheus() {
    let server = Server::process(&[("RATE_LIMIT_IP", "5/min"), ("CLEANUP_INTERVAL", "1000")]);
    let target = server.base.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&[&target]);
    let http = client();

    // Tenant traffic first (login shares the per-IP quota): commits, and a rollback (a 404 inside a transaction).
    let pool = common::app_pool().await;
    let (_, emails) = common::seed_tenant(&pool, &[("dash", "staff")], 1).await;
    let token = common::login(&http, &server, &emails[0]).await;
    for _ in 0..3 {
        let page = http
            .get(server.url("/api/v1/items"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
    }
    let missing = server.url(&format!("/api/v1/items/{}", uuid::Uuid::new_v4()));
    let res = http.get(missing).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 404);
    // Traffic: allowed pings, then 429s, and a 404.
    for _ in 0..12 {
        http.get(server.url("/api/v1/ping")).send().await.unwrap();
    }
    http.get(server.url("/nope")).send().await.unwrap();

    // Wait until Prometheus has scraped the traffic a few times, so rates
    // over the window have two samples.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Connection refused while Prometheus starts: try again.
        let up = prometheus
            .try_query(&http, "count_over_time(tollgate_build_info[1m])")
            .await
            .unwrap_or_default();
        let samples = up["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        if samples >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape the server: {up}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_file("grafana/dashboards/tollgate.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = expand(target["expr"].as_str().unwrap());
            let answer = prometheus.query(&http, &expr).await;
            assert_eq!(
                answer["status"], "success",
                "{}: {expr}: {answer}",
                panel["title"]
            );
            let result = answer["data"]["result"].as_array().unwrap();
            assert!(!result.is_empty(), "{}: no data for {expr}", panel["title"]);
            checked += 1;
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        // label_values(metric, label): the metric must exist with that label.
        let def = variable["definition"].as_str().unwrap();
        let inner = def
            .trim_start_matches("label_values(")
            .trim_end_matches(')');
        let (metric, label) = inner.split_once(',').unwrap();
        let answer = prometheus
            .query(
                &http,
                &format!("count by ({}) ({})", label.trim(), metric.trim()),
            )
            .await;
        assert!(
            !answer["data"]["result"].as_array().unwrap().is_empty(),
            "variable {def}"
        );
    }
    assert!(checked >= 10, "only {checked} queries");
}
