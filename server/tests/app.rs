//! The server's service (`tollgate_server::app`) driven in-process with
//! `oneshot`: no socket, the peer address from `MockConnectInfo`.

mod common;

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

/// The app with `env` over the test defaults, seen as if every request
/// came from `peer`.
fn app(
    env: &[(&str, &str)],
    peer: [u8; 4],
) -> impl Service<Request<Body>, Response = Response<Body>, Error = std::convert::Infallible> + Clone
{
    let state = tollgate_server::AppState::new(common::config(env), None).unwrap();
    MockConnectInfo(SocketAddr::from((peer, 40_000))).layer(tollgate_server::app(state))
}

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn get_from(path: &str, forwarded_for: &str) -> Request<Body> {
    Request::get(path)
        .header("x-forwarded-for", forwarded_for)
        .header("forwarded", format!("for={forwarded_for}"))
        .body(Body::empty())
        .unwrap()
}

async fn json(res: Response<Body>) -> serde_json::Value {
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn liveness_is_never_limited() {
    let app = app(&[("RATE_LIMIT_IP", "1/min")], LOOPBACK);
    let mut request_ids = std::collections::HashSet::new();
    for path in ["/health", "/healthz"].iter().cycle().take(10) {
        let res = app.clone().oneshot(get(path)).await.unwrap();
        assert_eq!(res.status(), 200);
        // A new random UUID each, in its usual lower-case hyphenated form.
        let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!((uuid.get_version_num(), uuid.to_string()), (4, id.clone()));
        assert!(request_ids.insert(id), "request id repeated");
        assert!(!res.headers().contains_key("ratelimit"));
        assert_eq!(json(res).await["status"], "pass");
    }
}

#[tokio::test]
async fn a_method_a_path_does_not_take_gets_a_problem_and_allow() {
    let app = app(&[], LOOPBACK);
    let req = Request::delete("/api/v1/ping").body(Body::empty()).unwrap();
    let res = app.oneshot(req).await.unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(
        res.headers()["allow"].to_str().unwrap().contains("GET"),
        "{:?}",
        res.headers()
    );
    assert!(res.headers().contains_key("x-request-id"));
    assert_eq!(json(res).await["status"], 405);
}

#[tokio::test]
async fn ping_answers_until_the_quota_is_spent_then_429() {
    let app = app(&[("RATE_LIMIT_IP", "3/min")], LOOPBACK);
    for remaining in [2, 1, 0] {
        let res = app.clone().oneshot(get("/api/v1/ping")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["ratelimit-policy"], r#""ip";q=3;w=60"#);
        let limit = res.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            limit.starts_with(&format!(r#""ip";r={remaining};t="#)),
            "{limit}"
        );
        let body = json(res).await;
        assert_eq!(body["pong"], true);
        assert_eq!(body["client_ip"], "127.0.0.1");
    }
    let res = app.clone().oneshot(get("/api/v1/ping")).await.unwrap();
    assert_eq!(res.status(), 429);
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(
        res.headers()["ratelimit"],
        format!(r#""ip";r=0;t={retry_after}"#).as_str()
    );
    assert_eq!(res.headers()["ratelimit-policy"], r#""ip";q=3;w=60"#);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    assert!(res.headers().contains_key("x-request-id"));
    let body = json(res).await;
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["ip"]));
}

#[tokio::test]
async fn a_changing_forwarded_for_from_an_untrusted_peer_does_not_reset_the_limit() {
    // The peer is not a trusted proxy (TRUSTED_PROXIES is empty).
    let app = app(&[("RATE_LIMIT_IP", "2/min")], [192, 0, 2, 7]);
    let mut statuses = Vec::new();
    for i in 0..6 {
        let res = app
            .clone()
            .oneshot(get_from("/api/v1/ping", &format!("198.51.100.{i}")))
            .await
            .unwrap();
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429, 429]);
}

#[tokio::test]
async fn a_trusted_proxy_forwards_the_client_address() {
    let app = app(
        &[
            ("RATE_LIMIT_IP", "1/min"),
            ("TRUSTED_PROXIES", "10.0.0.0/8"),
        ],
        [10, 1, 2, 3],
    );
    let ping = |ip: &str| app.clone().oneshot(get_from("/api/v1/ping", ip));
    let res = ping("198.51.100.1").await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json(res).await["client_ip"], "198.51.100.1");
    assert_eq!(ping("198.51.100.1").await.unwrap().status(), 429);
    assert_eq!(ping("198.51.100.2").await.unwrap().status(), 200);
}

#[tokio::test]
async fn shadow_mode_never_rejects() {
    let app = app(
        &[("RATE_LIMIT_IP", "1/min"), ("RATE_LIMIT_SHADOW", "true")],
        LOOPBACK,
    );
    for _ in 0..4 {
        let res = app.clone().oneshot(get("/api/v1/ping")).await.unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn unknown_paths_get_a_problem_body() {
    let res = app(&[], LOOPBACK).oneshot(get("/nope")).await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}

#[tokio::test]
async fn a_route_without_a_token_is_401_before_any_limit_or_transaction() {
    let res = app(&[], LOOPBACK)
        .oneshot(get("/api/v1/items"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(!res.headers().contains_key("ratelimit"));
}
