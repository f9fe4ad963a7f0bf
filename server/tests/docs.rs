//! The README documents every metric the code records, and only those.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

/// Metric names in `const NAME: &str = "…";` declarations under `dir`
/// (every metric is recorded through such a constant).
fn declared_metrics(dir: &Path, names: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            declared_metrics(&path, names);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let Some((decl, value)) = line.split_once(": &str = \"") else {
                continue;
            };
            // The LISTEN channel is a name, not a metric.
            if !decl.contains("const ") || decl.contains("CHANNEL") {
                continue;
            }
            let value = value.trim_end_matches("\";");
            if value.starts_with("tollgate_") || value.starts_with("http_server_") {
                names.insert(value.to_owned());
            }
        }
    }
}

/// Metric names in the first column of the README's metrics table.
fn documented_metrics() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(common::repo_file("README.md")).unwrap();
    let table = readme
        .split("\n## Metrics")
        .nth(1)
        .expect("a Metrics section")
        // Up to the next heading (a `#` line inside a code block is not one).
        .split("\n## ")
        .next()
        .unwrap()
        .split("\n### ")
        .next()
        .unwrap();
    table
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|line| line.split(" |").next())
        .flat_map(|cell| cell.split(", "))
        .map(|name| name.trim_matches('`').to_owned())
        .filter(|name| name.starts_with("tollgate_") || name.starts_with("http_server_"))
        .collect()
}

#[test]
fn every_metric_is_documented_and_every_documented_metric_exists() {
    let mut code = BTreeSet::new();
    declared_metrics(&common::repo_file("middleware/src"), &mut code);
    declared_metrics(&common::repo_file("server/src"), &mut code);
    assert!(code.len() > 30, "found only {code:?}");
    let readme = documented_metrics();
    let undocumented: Vec<_> = code.difference(&readme).collect();
    let gone: Vec<_> = readme.difference(&code).collect();
    assert!(
        undocumented.is_empty() && gone.is_empty(),
        "README metrics table: missing {undocumented:?}, no longer recorded {gone:?}"
    );
}
