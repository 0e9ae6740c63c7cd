//! Protection policies through the real `cairn` binary: a group whose replica is created by
//! manual seeding (`cairn seed export` on the node, `cairn seed import` on the server, then
//! the mandatory consistency check), policy changes refused with their reason, `group show`,
//! `group plan`, `check --wait`, `verify --wait`, `alerts` and `rp list --calendar`.

use std::path::Path;
use std::time::Duration;

use cairn_tests::*;
use serde_json::Value;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn vm_json(server: &UpServer, name: &str) -> Option<Value> {
    server
        .get("/v1/vms")
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
}

#[test]
fn manual_seeding_then_the_mandatory_check_and_the_policy_commands() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = root.join("data");
    let disk = root.join("alpha-boot.raw");
    random_file(&disk, 8 << 20, 7);
    write_vm(
        &data.join("vms"),
        "alpha",
        "0b2f6c1e-2d3a-4b5c-9d6e-7f8091a2b3c4",
        &[("boot", &disk)],
    );
    let server = UpServer::start(&data, &["--timezone", "Europe/Berlin"], &[]);
    let url = server.url();
    wait_until(Duration::from_secs(60), "the VM in the inventory", || {
        vm_json(&server, "alpha").is_some()
    });
    cairn_ok(&[
        "group",
        "create",
        "gold",
        "--vm",
        "alpha",
        "--retention-days",
        "7",
        "--sync",
        "1h",
        "--rp-times",
        "08:00,20:00",
        "--replica",
        "manual-seed",
        "--cc",
        "auto",
        "--per-node",
        "2",
        "--server",
        &url,
    ]);

    // An invalid combination is refused with the reason, and changes nothing.
    let refused = cairn(&[
        "group",
        "set-policy",
        "gold",
        "--sync",
        "45m",
        "--rp-times",
        "13:00,13:30",
        "--server",
        &url,
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("at least one synchronization must fall between two recovery points"),
        "{stderr}"
    );
    let shown = cairn_ok(&["group", "show", "gold", "--server", &url]);
    assert!(shown.contains("manual-seed"), "{shown}");
    assert!(shown.contains("automatic when inconsistent"), "{shown}");
    assert!(shown.contains("synchronization  60m"), "{shown}");
    assert!(shown.contains("Europe/Berlin"), "{shown}");

    // Manual seeding: nothing is replicated over the network.
    let vm = vm_json(&server, "alpha").unwrap();
    assert_eq!(vm["disks"][0]["state"], "PendingReplicaCreation");
    assert!(server.get("/v1/jobs").as_array().unwrap().is_empty());

    let seed = root.join("usb").join("seed");
    let exported = cairn_ok(&[
        "seed",
        "export",
        "alpha",
        "--to",
        s(&seed),
        "--data-dir",
        s(&data),
    ]);
    assert!(exported.contains("cairn seed import"), "{exported}");
    let imported = cairn_ok(&[
        "seed",
        "import",
        s(&seed),
        "--vm",
        "alpha",
        "--wait",
        "--server",
        &url,
    ]);
    assert!(imported.contains("Succeeded"), "{imported}");
    wait_until(
        Duration::from_secs(120),
        "the mandatory consistency check",
        || {
            let jobs = server.get("/v1/jobs");
            let checked = jobs.as_array().unwrap().iter().any(|j| {
                j["kind"] == "ConsistencyCheck"
                    && j["state"] == "Succeeded"
                    && j["reason"] == "ReplicaInconsistent"
            });
            checked && vm_json(&server, "alpha").unwrap()["disks"][0]["state"] == "Protected"
        },
    );
    let alerts: Value =
        serde_json::from_str(&cairn_ok(&["alerts", "--all", "--json", "--server", &url])).unwrap();
    let seeded = alerts
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "ReplicaInconsistent")
        .expect("the seeded replica raised an inconsistency alert");
    assert_eq!(seeded["active"], false, "{seeded}");
    assert!(
        seeded["message"].as_str().unwrap().contains("seeded"),
        "{seeded}"
    );
    let active = cairn_ok(&["alerts", "--server", &url]);
    assert!(!active.contains("Critical"), "{active}");

    // A manual check and a verify, waited for.
    let checked = cairn_ok(&["check", "alpha", "--wait", "--server", &url]);
    assert!(checked.contains("Succeeded"), "{checked}");
    let verified = cairn_ok(&["verify", "alpha", "--wait", "--server", &url]);
    assert!(verified.contains("Succeeded"), "{verified}");
    let events = cairn_ok(&["events", "tail", "-n", "200", "--server", &url]);
    assert!(
        events.contains("consistency check: 0 of 128 chunks differed"),
        "{events}"
    );

    // The calendar and the disk allocation review.
    let calendar = cairn_ok(&["rp", "list", "alpha", "--calendar", "--server", &url]);
    assert!(
        calendar.contains("Mo  Tu  We  Th  Fr  Sa  Su"),
        "{calendar}"
    );
    let days: Value = serde_json::from_str(&cairn_ok(&[
        "rp",
        "list",
        "alpha",
        "--calendar",
        "--json",
        "--server",
        &url,
    ]))
    .unwrap();
    let per_day: u64 = days
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["recovery_points"].as_u64().unwrap())
        .sum();
    let rps = server.get(&format!(
        "/v1/vms/{}/recovery-points",
        vm["vm"].as_str().unwrap()
    ));
    assert_eq!(per_day, rps.as_array().unwrap().len() as u64);
    assert!(
        per_day >= 3,
        "seed, mandatory check, manual check: {calendar}"
    );
    let plan = cairn_ok(&["group", "plan", "gold", "--server", &url]);
    assert!(
        plan.contains("total data size             8.0 MiB"),
        "{plan}"
    );
    assert!(plan.contains("recommended space"), "{plan}");
    assert!(
        !plan.contains("unknown"),
        "the worker reported free space: {plan}"
    );
}
