//! The rooms of the house, checked: which crate may depend on which, and which modules may
//! use the libraries that tie the control plane to a transport.
//!
//! - Only the `cairn` binary joins the control plane and the data plane: no other crate of
//!   the workspace (the test harness aside) depends on both `cairn-orchestrator` and
//!   `cairn-worker`, and neither depends on the other.
//! - In the crates' sources, only `orchestrator/src/bus/` and the JetStream log
//!   (`orchestrator/src/log/jetstream*`) use `async_nats`; only `orchestrator/src/api/` uses
//!   `axum`. (Benchmarks and tests use what they measure.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_tests::workspace;

/// Each workspace package's name → the names of its dependencies (normal, dev and build).
fn workspace_dependencies() -> BTreeMap<String, Vec<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("a name").to_owned())
                .collect();
            (p["name"].as_str().expect("a name").to_owned(), deps)
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Library and binary sources (`src/` of every crate; benchmarks and tests may use what they
/// measure) that mention `library` as a path (`library::`), relative to the workspace.
fn users_of(library: &str) -> Vec<String> {
    let root = workspace();
    let mut files = Vec::new();
    for krate in [
        "schemas",
        "orchestrator",
        "orchestrator/cli",
        "worker",
        "ops/vmdisk",
    ] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    files.dedup();
    let needle = format!("{library}::");
    let mut users: Vec<String> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .expect("a source file")
                .contains(&needle)
        })
        .map(|f| {
            f.strip_prefix(&root)
                .expect("inside the workspace")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    users.sort();
    users
}

#[test]
fn only_the_binary_joins_the_control_plane_and_the_data_plane() {
    let deps = workspace_dependencies();
    let has = |package: &str, dep: &str| deps[package].iter().any(|d| d == dep);
    assert!(deps.contains_key("cairn"), "{:?}", deps.keys());
    assert!(has("cairn", "cairn-orchestrator") && has("cairn", "cairn-worker"));
    for package in deps.keys() {
        if package == "cairn" || package == "cairn-tests" {
            continue;
        }
        assert!(
            !(has(package, "cairn-orchestrator") && has(package, "cairn-worker")),
            "{package} depends on both the orchestrator and the worker; only the binary may"
        );
    }
    assert!(!has("cairn-orchestrator", "cairn-worker"));
    assert!(!has("cairn-worker", "cairn-orchestrator"));
    assert!(!has("cairn-schemas", "cairn-orchestrator") && !has("cairn-schemas", "cairn-worker"));
}

#[test]
fn only_the_bus_and_the_jetstream_log_speak_nats_and_only_the_api_speaks_http() {
    for file in users_of("async_nats") {
        assert!(
            file.starts_with("orchestrator/src/bus/") || file.starts_with("orchestrator/src/log/"),
            "{file} uses async_nats; only bus/ and the JetStream log may"
        );
        if let Some(rest) = file.strip_prefix("orchestrator/src/log/") {
            assert!(
                rest.starts_with("jetstream") || rest.starts_with("tests/jetstream"),
                "{file} uses async_nats; in log/ only the JetStream log may"
            );
        }
    }
    for file in users_of("axum") {
        assert!(
            file.starts_with("orchestrator/src/api/"),
            "{file} uses axum; only api/ may"
        );
    }
    // The checks see what they look for.
    assert!(users_of("async_nats").contains(&"orchestrator/src/log/jetstream.rs".to_owned()));
    assert!(users_of("axum").contains(&"orchestrator/src/api/mod.rs".to_owned()));
}
