//! Architecture invariant: `schemas` does no IO. It depends on serde, postcard, uuid and
//! thiserror only, and its sources use no filesystem, network or async runtime.

use std::path::{Path, PathBuf};

const ALLOWED_DEPENDENCIES: &[&str] = &["serde", "postcard", "uuid", "thiserror"];

/// Names declared in `[dependencies]`-like tables (not dev-dependencies: tests may do IO).
fn dependencies(manifest: &str) -> Vec<String> {
    let mut in_deps = false;
    let mut names = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            // [dependencies], [target.'cfg(..)'.dependencies], [build-dependencies], or a
            // [dependencies.name] table.
            let table = line.trim_matches(|c| c == '[' || c == ']');
            in_deps = false;
            if let Some(name) = table.strip_prefix("dependencies.") {
                names.push(name.trim().to_owned());
            } else if table == "dependencies"
                || table == "build-dependencies"
                || table.ends_with(".dependencies")
                || table.ends_with(".build-dependencies")
            {
                in_deps = true;
            }
            continue;
        }
        if in_deps
            && !line.is_empty()
            && !line.starts_with('#')
            && let Some((key, _)) = line.split_once('=')
        {
            let key = key.trim();
            names.push(key.split('.').next().unwrap_or(key).trim().to_owned());
        }
    }
    names
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn depends_only_on_serde_postcard_uuid_thiserror() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps = dependencies(&manifest);
    assert!(
        !deps.is_empty(),
        "parser found no dependencies in {manifest}"
    );
    let unexpected: Vec<_> = deps
        .iter()
        .filter(|dep| !ALLOWED_DEPENDENCIES.contains(&dep.as_str()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "schemas must stay pure (no tokio, sled, async-nats, hyper, axum, ...): \
         unexpected dependencies {unexpected:?}"
    );
}

#[test]
fn parser_sees_forbidden_dependencies() {
    let manifest = "[dependencies]\nserde.workspace = true\ntokio = \"1\"\n\
                    [dev-dependencies]\ntempfile = \"3\"\n[dependencies.sled]\nversion = \"0.34\"\n";
    assert_eq!(dependencies(manifest), ["serde", "tokio", "sled"]);
}

#[test]
fn sources_use_no_io() {
    const FORBIDDEN: &[&str] = &[
        "std::fs",
        "std::net",
        "std::process",
        "std::env",
        "tokio",
        "async_nats",
        "sled",
        "hyper",
        "axum",
        "SystemTime",
        "Instant::now",
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(!files.is_empty());
    let mut hits = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (line_idx, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if code.contains(word) {
                    hits.push(format!("{}:{}: {word}", file.display(), line_idx + 1));
                }
            }
        }
    }
    assert!(hits.is_empty(), "IO in schemas/src:\n{}", hits.join("\n"));
}
