//! The running server against its own OpenAPI document, with Schemathesis
//! (property-based, driven by the document; `make test` installs it):
//! requests generated from every operation's schemas, signed in, must get a
//! documented status, content type and headers, a body matching the
//! documented schema, no 5xx; schema-valid requests must be accepted and
//! invalid ones rejected with a documented 4xx.

mod common;

use std::process::Command;

use common::{Server, app_pool, client, login, seed_tenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_conforms_to_its_openapi_document() {
    let server = Server::start(&[
        ("RATE_LIMIT_IP", "1000000/min"),
        ("RATE_LIMIT_CLASS_AUTH", "1000000/min"),
        ("RATE_LIMIT_TENANT", "1000000/min"),
        ("RATE_LIMIT_CLASS_READ", "1000000/min"),
        ("RATE_LIMIT_CLASS_WRITE", "1000000/min"),
    ]);
    let pool = app_pool().await;
    let (_, users) = seed_tenant(&pool, &[("schema", "staff")], 3).await;
    let token = login(&client(), &server, &users[0]).await;
    let workdir =
        std::env::temp_dir().join(format!("tollgate-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&workdir).unwrap();
    let out = tokio::task::spawn_blocking({
        let url = server.url("/openapi.json");
        let workdir = workdir.clone();
        move || {
            Command::new("schemathesis")
                .current_dir(&workdir)
                .env("NO_COLOR", "1")
                .args(["run", &url, "--checks", "all", "--max-examples", "30"])
                .args([
                    "--phases",
                    "examples,coverage,fuzzing,stateful",
                    "--workers",
                    "2",
                ])
                // Reproducible runs; a failure prints the case to replay.
                .args(["--seed", "20261204"])
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .output()
                .expect("schemathesis on PATH (make test installs it)")
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&workdir);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every operation of the document was exercised ("Selected: n/n",
    // "Tested: n").
    let number_after = |label: &str| {
        report
            .split(label)
            .nth(1)
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .find(|t| !t.is_empty())
            })
            .and_then(|n| n.parse::<u32>().ok())
    };
    // The stateful phase ran: link-following scenarios (create, then
    // read, change, delete what was created).
    assert!(
        number_after("Scenarios:").is_some_and(|n| n > 0),
        "{report}"
    );
    let (selected, tested) = (number_after("Selected:"), number_after("Tested:"));
    assert!(selected.is_some_and(|n| n >= 11), "{report}");
    assert_eq!(tested, selected, "{report}");
}
