//! Soft delete and retention locks through the real `cairn` binary: a recovery point deleted
//! with `cairn rp delete` is listed as deleted, refused for recovery, survives the
//! repository's gc, comes back with `cairn rp undelete` and restores byte-identical to the
//! disk it was taken of; a retention lock refuses a shorter retention and the deletion of
//! younger points; a VM removed from its group with its data has its points soft-deleted,
//! and comes back.

use std::path::Path;
use std::time::Duration;

use cairn_tests::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn rps(server: &UpServer, vm: &str) -> Vec<Value> {
    server
        .get(&format!("/v1/vms/{vm}/recovery-points"))
        .as_array()
        .unwrap()
        .clone()
}

fn no_open_job(server: &UpServer) -> bool {
    server.get("/v1/jobs").as_array().unwrap().iter().all(|j| {
        matches!(
            j["state"].as_str(),
            Some("Succeeded" | "Failed" | "Cancelled")
        )
    })
}

#[test]
fn a_deleted_point_survives_gc_and_is_restored_byte_identical_after_undelete() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data");
    let disk = root.join("alpha-boot.raw");
    random_file(&disk, 8 << 20, 7);
    let original = std::fs::read(&disk).unwrap();
    write_vm(
        &data.join("vms"),
        "alpha",
        "3c1d9a52-6b7e-4f80-9a1b-2c3d4e5f6a7b",
        &[("boot", &disk)],
    );
    let server = UpServer::start(&data, &[], &[]);
    let url = server.url();
    wait_until(Duration::from_secs(60), "the VM in the inventory", || {
        server
            .get("/v1/vms")
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "alpha")
    });
    let vm = server.get("/v1/vms").as_array().unwrap()[0]["vm"]
        .as_str()
        .unwrap()
        .to_string();
    cairn_ok(&[
        "group",
        "create",
        "gold",
        "--vm",
        "alpha",
        "--retention-days",
        "14",
        "--sync",
        "1h",
        "--server",
        &url,
    ]);
    wait_until(Duration::from_secs(120), "the first recovery point", || {
        rps(&server, &vm).len() == 1 && no_open_job(&server)
    });
    let first = rps(&server, &vm)[0]["rp"].as_str().unwrap().to_string();
    // The guest rewrites its disk; the second point holds none of the first one's chunks.
    random_file(&disk, 8 << 20, 11);
    let out = cairn_ok(&["backup", "alpha", "--wait", "--server", &url]);
    assert!(out.contains("Succeeded"), "{out}");
    assert_eq!(rps(&server, &vm).len(), 2);

    let deleted = cairn_ok(&["rp", "delete", "alpha", &first, "--server", &url]);
    assert!(deleted.contains("cairn rp undelete"), "{deleted}");
    let listed = cairn_ok(&["rp", "list", "alpha", "--server", &url]);
    assert!(listed.contains("deleted by"), "{listed}");
    let json = cairn_json(&["rp", "list", "alpha", "--server", &url]);
    let point = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rp"] == first.as_str())
        .unwrap()
        .clone();
    assert_eq!(point["state"], "deleted");
    let (deleted_at, purge_after) = (
        point["deleted_at"].as_u64().unwrap(),
        point["purge_after"].as_u64().unwrap(),
    );
    assert_eq!(purge_after - deleted_at, 14 * 86_400_000, "{point}");
    assert!(point["deleted_by"].as_str().unwrap().contains("token"));
    let alerts = cairn_ok(&["alerts", "--server", &url]);
    assert!(alerts.contains("deleted by"), "{alerts}");

    // Not usable while deleted, and said so.
    let to = root.join("out");
    let refused = cairn(&[
        "restore",
        "alpha",
        "--rp",
        &first,
        "--to",
        s(&to),
        "--server",
        &url,
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("rp_deleted"), "{stderr}");

    // gc of the repository keeps the deleted point's chunks: its index stays until the purge.
    let gc = cairn_ok(&["repo", "gc", s(&data.join("repo"))]);
    assert!(!gc.contains("skipped"), "{gc}");

    cairn_ok(&["rp", "undelete", "alpha", &first, "--server", &url]);
    let again = cairn(&["rp", "undelete", "alpha", &first, "--server", &url]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("rp_not_deleted"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let restored = cairn_ok(&[
        "restore",
        "alpha",
        "--rp",
        &first,
        "--to",
        s(&to),
        "--wait",
        "--server",
        &url,
    ]);
    assert!(restored.contains("Succeeded"), "{restored}");
    assert!(
        std::fs::read(to.join("alpha-boot.raw")).unwrap() == original,
        "the undeleted point restores the disk as it was"
    );

    // A retention lock: retention below it and deleting younger points are refused.
    let locked = cairn_ok(&[
        "group",
        "set-policy",
        "gold",
        "--retention-lock",
        "7d",
        "--server",
        &url,
    ]);
    assert!(locked.contains("retention lock 7 days"), "{locked}");
    for args in [
        vec!["group", "set-policy", "gold", "--retention-days", "3"],
        vec!["rp", "delete", "alpha", first.as_str()],
    ] {
        let mut args = args.clone();
        args.extend(["--server", url.as_str()]);
        let out = cairn(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("retention_locked") && stderr.contains("lock of 7 days"),
            "{args:?}: {stderr}"
        );
    }
    // Lowering it (the CLI's token is an admin's) waits for the old lock's period.
    let lowered = cairn_ok(&[
        "group",
        "set-policy",
        "gold",
        "--retention-lock",
        "0",
        "--server",
        &url,
    ]);
    assert!(lowered.contains("takes effect at"), "{lowered}");
    let shown = cairn_ok(&["group", "show", "gold", "--server", &url]);
    assert!(
        shown.contains("retention lock   7 days; lowered to 0 days"),
        "{shown}"
    );
    server.stop();
}

#[test]
fn a_vm_removed_from_its_group_with_its_data_is_soft_deleted_and_can_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data");
    for (name, uuid, seed) in [
        ("alpha", "3c1d9a52-6b7e-4f80-9a1b-2c3d4e5f6a01", 1),
        ("beta", "3c1d9a52-6b7e-4f80-9a1b-2c3d4e5f6a02", 2),
    ] {
        let disk = root.join(format!("{name}.raw"));
        random_file(&disk, 4 << 20, seed);
        write_vm(&data.join("vms"), name, uuid, &[("boot", &disk)]);
    }
    let server = UpServer::start(&data, &[], &[]);
    let url = server.url();
    wait_until(Duration::from_secs(60), "both VMs in the inventory", || {
        server.get("/v1/vms").as_array().unwrap().len() == 2
    });
    let listed = |name: &str, field: &str| {
        server
            .get("/v1/vms")
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()[field]
            .clone()
    };
    let beta = &listed("beta", "vm").as_str().unwrap().to_string();
    cairn_ok(&[
        "group", "create", "gold", "--vm", "alpha", "--vm", "beta", "--sync", "1h", "--server",
        &url,
    ]);
    wait_until(
        Duration::from_secs(120),
        "a recovery point of each VM",
        || rps(&server, beta).len() == 1 && no_open_job(&server),
    );

    let out = cairn_ok(&[
        "group",
        "remove-vm",
        "gold",
        "--vm",
        "beta",
        "--delete-recovery-points",
        "--server",
        &url,
    ]);
    assert!(out.contains("soft-deleted"), "{out}");
    let point = rps(&server, beta)[0].clone();
    assert_eq!(point["state"], "deleted", "{point}");
    let group = listed("beta", "group");
    assert!(group.is_null(), "beta is no longer protected: {group}");
    let alerts = cairn_ok(&["alerts", "--server", &url]);
    assert!(alerts.contains("beta"), "{alerts}");

    // Not a member any more: refused, nothing changes.
    let again = cairn(&[
        "group",
        "remove-vm",
        "gold",
        "--vm",
        "beta",
        "--server",
        &url,
    ]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("not a member"), "{stderr}");

    // Back into the group, and its point restored.
    cairn_ok(&["group", "add-vm", "gold", "--vm", "beta", "--server", &url]);
    let rp = point["rp"].as_str().unwrap();
    cairn_ok(&["rp", "undelete", "beta", rp, "--server", &url]);
    assert_eq!(rps(&server, beta)[0]["state"], "live");
    let group = listed("beta", "group");
    assert!(!group.is_null(), "beta is protected again: {group}");
    server.stop();
}
