//! The Debian package as an administrator gets it: `ops/package-deb` packages this build's
//! `cairn` binary, `dpkg-deb` shows what the package holds, `dpkg -i` installs it into this
//! machine, and the installed files are checked with the tools an administrator uses: `cairn
//! --version`, `systemd-analyze verify` on every unit, `man -l` on the man page, bash loading
//! the completion script, the `cairn` system user and its folders. It is installed a second
//! time over itself (the maintainer scripts run again), then `dpkg -r` and `dpkg -P` must leave
//! nothing behind.
//!
//! dpkg needs root: as another user the test goes through `sudo -n`, and fails saying so when
//! that does not work. It never touches a cairn that was there before it: an installed `cairn`
//! package, a `cairn` user or group, `/etc/cairn` or `/var/lib/cairn` make it fail at once with
//! what it found. Once it has installed the package, a guard purges it however the test ends.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cairn_tests::{cairn_bin, cairn_ok, fingerprint, nats::nats_server_bin, sh, workspace};

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A command run as root: directly when the test is root, else through `sudo -n`.
fn as_root(program: &str, args: &[&str]) -> Output {
    let mut command = if running_as_root() {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", program]);
        sudo
    };
    command
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}

fn running_as_root() -> bool {
    sh("id", &["-u"]).trim() == "0"
}

/// Runs `program ARGS` as root and fails the test unless it succeeds; returns stdout.
fn root_ok(program: &str, args: &[&str]) -> String {
    let out = as_root(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// dpkg's status of the cairn package ("install ok installed", "deinstall ok config-files"),
/// or `None` when dpkg does not know it.
fn package_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "cairn"])
        .output()
        .expect("dpkg-query runs");
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !status.ends_with("not-installed")).then_some(status)
}

/// An entry of the passwd or group database (`getent DATABASE NAME`), split at its colons.
fn getent(database: &str, name: &str) -> Option<Vec<String>> {
    let out = Command::new("getent")
        .args([database, name])
        .output()
        .expect("getent runs");
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_owned)
            .collect()
    })
}

/// Purges the package when dropped, so a failed check leaves the machine as it was.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if package_status().is_some() {
            let out = as_root("dpkg", &["-P", "cairn"]);
            if !out.status.success() {
                eprintln!(
                    "cleanup: dpkg -P cairn failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// Fails unless root is at hand and no cairn is on this machine yet.
fn check_the_machine() {
    if !running_as_root() {
        let sudo = Command::new("sudo").args(["-n", "true"]).output();
        let works = sudo.as_ref().is_ok_and(|out| out.status.success());
        assert!(
            works,
            "the package test installs cairn's .deb into this machine with dpkg, which needs \
             root: run it as root, or as a user for whom `sudo -n` works (here it does not: {})",
            match &sudo {
                Ok(out) => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                Err(e) => e.to_string(),
            }
        );
    }
    if let Some(status) = package_status() {
        panic!(
            "a cairn package is already on this machine ({status}); the package test installs \
             and purges its own and will not replace it: remove it (dpkg -P cairn) or run the \
             test elsewhere"
        );
    }
    for database in ["passwd", "group"] {
        assert!(
            getent(database, "cairn").is_none(),
            "this machine already has a cairn entry in {database}; purging the test's package \
             would remove it: run the test on a machine without one"
        );
    }
    for dir in ["/etc/cairn", "/var/lib/cairn"] {
        assert!(
            !Path::new(dir).exists(),
            "{dir} exists already; the test's package would take it over and its purge would \
             change it: run the test on a machine without one"
        );
    }
}

/// The files the package must hold, derived from the workspace: the binary, the units and
/// nats-server configurations of `ops/`, the conffile, the docs, a man page for every page
/// `cairn man --out` writes, and the three completion scripts.
fn expected_files(man_pages: &Path) -> BTreeSet<String> {
    let root = workspace();
    let mut files: BTreeSet<String> = [
        "/usr/bin/cairn",
        "/etc/cairn/cairn.toml",
        "/usr/share/doc/cairn/README.md",
        "/usr/share/doc/cairn/copyright",
        "/usr/share/bash-completion/completions/cairn",
        "/usr/share/zsh/vendor-completions/_cairn",
        "/usr/share/fish/vendor_completions.d/cairn.fish",
    ]
    .map(String::from)
    .into();
    for entry in std::fs::read_dir(root.join("ops/systemd")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        // cairn's own units are installed; nats-server's is an example (it is not packaged).
        let dir = if name.starts_with("cairn-") {
            "/usr/lib/systemd/system"
        } else {
            "/usr/share/cairn/systemd"
        };
        files.insert(format!("{dir}/{name}"));
    }
    let nats = root.join("ops/nats");
    let mut pending = vec![nats.clone()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(&nats).unwrap().display().to_string();
                files.insert(format!("/usr/share/cairn/nats/{relative}"));
            }
        }
    }
    for page in cairn_ok(&["man", "--out", man_pages.to_str().unwrap()]).lines() {
        let name = Path::new(page).file_name().unwrap().to_str().unwrap();
        files.insert(format!("/usr/share/man/man1/{name}.gz"));
    }
    files
}

/// `dpkg-deb -c`: (mode, owner, path) of every entry, paths made absolute ("./usr" → "/usr").
fn package_entries(deb: &Path) -> Vec<(String, String, String)> {
    sh("dpkg-deb", &["-c", deb.to_str().unwrap()])
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "one path per entry, no links: {line}");
            let path = fields[5].trim_start_matches('.').to_owned();
            (fields[0].to_owned(), fields[1].to_owned(), path)
        })
        .collect()
}

fn systemd_analyze_verify(unit: &Path, cwd: &Path) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .current_dir(cwd)
        .output()
        .expect("systemd-analyze runs (ops/install-deps installs systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {} ({}):\n{said}",
        unit.display(),
        out.status
    );
}

/// The nats-server binary the tests use, as an absolute path.
fn nats_server_path() -> PathBuf {
    let bin = nats_server_bin();
    if bin.is_absolute() {
        return bin;
    }
    let found = sh(
        "sh",
        &["-c", "command -v \"$0\" || true", bin.to_str().unwrap()],
    );
    assert!(
        !found.trim().is_empty(),
        "nats-server is not on PATH (ops/install-deps installs it, or set NATS_SERVER)"
    );
    PathBuf::from(found.trim())
}

fn mode_of(path: &str) -> (u32, u32) {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (meta.uid(), meta.permissions().mode() & 0o7777)
}

#[test]
fn the_debian_package_installs_works_and_goes_away_cleanly() {
    check_the_machine();
    let scratch = tempfile::tempdir().unwrap();
    let out_dir = scratch.path().join("deb");

    // Build it from this test build's binary (no release build needed).
    let binary = cairn_bin();
    let printed = sh(
        workspace().join("ops/package-deb").to_str().unwrap(),
        &[
            "--binary",
            binary.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let arch = sh("dpkg", &["--print-architecture"]).trim().to_owned();
    let deb = out_dir.join(format!("cairn_{VERSION}_{arch}.deb"));
    assert_eq!(
        printed.trim(),
        deb.to_str().unwrap(),
        "prints the .deb's path"
    );
    let deb_arg = deb.to_str().unwrap();
    let in_out_dir: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(in_out_dir.len(), 1, "no staging left: {in_out_dir:?}");

    // What it holds.
    let field = |name: &str| sh("dpkg-deb", &["-f", deb_arg, name]).trim().to_owned();
    assert_eq!(field("Package"), "cairn");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), arch);
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>= 2.") && depends.contains("adduser"),
        "Depends: {depends}"
    );
    assert_eq!(
        sh("dpkg-deb", &["-I", deb_arg, "conffiles"]),
        "/etc/cairn/cairn.toml\n"
    );
    let info = sh("dpkg-deb", &["-I", deb_arg]);
    for script in ["postinst", "prerm", "postrm"] {
        assert!(
            info.contains(&format!(" {script} ")),
            "{script} in:\n{info}"
        );
    }
    let entries = package_entries(&deb);
    let files: BTreeSet<String> = entries
        .iter()
        .filter(|(mode, _, _)| mode.starts_with('-'))
        .map(|(_, _, path)| path.clone())
        .collect();
    let expected = expected_files(&scratch.path().join("man1"));
    let missing: Vec<_> = expected.difference(&files).collect();
    assert!(missing.is_empty(), "missing from the package: {missing:?}");
    for (mode, owner, path) in &entries {
        assert_eq!(owner, "root/root", "{path}");
        assert!(
            path == "/" || path.starts_with("/usr/") || path.starts_with("/etc/"),
            "only /usr and /etc: {path}"
        );
        let want = if mode.starts_with('d') {
            "drwxr-xr-x"
        } else if path == "/usr/bin/cairn" {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want, "{path}");
    }

    // Installed.
    let _purge = PurgeOnDrop;
    root_ok("dpkg", &["-i", deb_arg]);
    assert_eq!(
        package_status().as_deref(),
        Some("install ok installed"),
        "dpkg -i"
    );
    assert_eq!(
        fingerprint(Path::new("/usr/bin/cairn")),
        fingerprint(&binary),
        "/usr/bin/cairn is the binary given to ops/package-deb"
    );
    assert_eq!(
        sh("/usr/bin/cairn", &["--version"]),
        format!("cairn {VERSION}\n")
    );
    for path in &expected {
        assert!(
            Path::new(path).is_file(),
            "{path} is not installed (does a dpkg path-exclude in /etc/dpkg/dpkg.cfg.d drop it?)"
        );
    }
    let verified = sh("dpkg", &["--verify", "cairn"]);
    assert!(verified.is_empty(), "dpkg --verify: {verified}");

    // Every unit passes systemd-analyze verify, offline: the installed ones as they are, the
    // example nats-server unit with its ExecStart pointed at the nats-server the tests use
    // (wherever it is installed here; nothing else changes).
    let listed = sh("dpkg", &["-L", "cairn"]);
    let units: Vec<&str> = listed
        .lines()
        .filter(|p| p.starts_with("/usr/lib/systemd/system/") && p.ends_with(".service"))
        .collect();
    assert_eq!(
        units,
        [
            "/usr/lib/systemd/system/cairn-orchestrator.service",
            "/usr/lib/systemd/system/cairn-worker.service"
        ]
    );
    for unit in &units {
        systemd_analyze_verify(Path::new(unit), scratch.path());
    }
    let nats_unit =
        std::fs::read_to_string("/usr/share/cairn/systemd/nats-server.service").unwrap();
    let exec = "ExecStart=/usr/local/bin/nats-server ";
    assert!(nats_unit.contains(exec), "{nats_unit}");
    let nats_unit = nats_unit.replace(
        exec,
        &format!("ExecStart={} ", nats_server_path().display()),
    );
    let units_dir = scratch.path().join("units");
    std::fs::create_dir(&units_dir).unwrap();
    std::fs::write(units_dir.join("nats-server.service"), nats_unit).unwrap();
    systemd_analyze_verify(&units_dir.join("nats-server.service"), scratch.path());

    // The man pages: the main one renders, the subcommands' are where man looks.
    let man = Command::new("man")
        .args(["-l", "/usr/share/man/man1/cairn.1.gz"])
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("LC_ALL", "C")
        .output()
        .expect("man runs (ops/install-deps installs man-db)");
    let text = String::from_utf8_lossy(&man.stdout);
    assert!(
        man.status.success() && man.stderr.is_empty(),
        "man -l: {}",
        String::from_utf8_lossy(&man.stderr)
    );
    for line in [
        "cairn - back up and recover KVM/QEMU virtual machines",
        "cairn-repo(1)",
        "/etc/cairn/cairn.toml",
    ] {
        assert!(text.contains(line), "{line:?} in the man page:\n{text}");
    }
    assert_eq!(
        sh("man", &["-w", "cairn-repo-backup"]).trim(),
        "/usr/share/man/man1/cairn-repo-backup.1.gz"
    );

    // The bash completion loads in bash and completes.
    let completed = sh(
        "bash",
        &[
            "-c",
            "source /usr/share/bash-completion/completions/cairn && complete -p cairn && \
             COMP_WORDS=(cairn rep) COMP_CWORD=1 && _cairn cairn rep cairn && \
             printf '%s\\n' \"${COMPREPLY[@]}\"",
        ],
    );
    let mut lines = completed.lines();
    let registered = lines.next().unwrap_or_default();
    assert!(
        registered.starts_with("complete ") && registered.ends_with(" -F _cairn cairn"),
        "complete -p cairn: {registered}"
    );
    assert_eq!(lines.collect::<Vec<_>>(), ["repo"], "cairn rep<TAB>");

    // The system user and its folders, as the units expect them.
    let user = getent("passwd", "cairn").expect("postinst made the cairn user");
    let uid: u32 = user[2].parse().unwrap();
    assert!(uid < 1000, "a system user: {user:?}");
    assert_eq!(user[5], "/var/lib/cairn", "{user:?}");
    assert_eq!(user[6], "/usr/sbin/nologin", "{user:?}");
    let group = getent("group", "cairn").expect("postinst made the cairn group");
    assert_eq!(group[2], user[3], "cairn's primary group is cairn");
    assert_eq!(mode_of("/var/lib/cairn"), (0, 0o755));
    assert_eq!(mode_of("/var/lib/cairn/vms"), (0, 0o755));
    assert_eq!(mode_of("/var/lib/cairn/orchestrator"), (uid, 0o750));

    // Installed again over itself: the maintainer scripts run again and change nothing.
    root_ok("dpkg", &["-i", deb_arg]);
    assert_eq!(getent("passwd", "cairn"), Some(user.clone()));
    assert_eq!(mode_of("/var/lib/cairn/orchestrator"), (uid, 0o750));

    // Removed: every file goes but the conffile, which stays until the purge.
    root_ok("dpkg", &["-r", "cairn"]);
    assert_eq!(
        package_status().as_deref(),
        Some("deinstall ok config-files")
    );
    for path in &files {
        let kept = path == "/etc/cairn/cairn.toml";
        assert_eq!(Path::new(path).exists(), kept, "{path} after dpkg -r");
    }
    for dir in ["/usr/share/cairn", "/usr/share/doc/cairn"] {
        assert!(!Path::new(dir).exists(), "{dir} after dpkg -r");
    }

    // Purged: the conffile, /etc/cairn, the state folders and the user go too.
    root_ok("dpkg", &["-P", "cairn"]);
    assert_eq!(package_status(), None, "dpkg -P");
    for dir in ["/etc/cairn", "/var/lib/cairn"] {
        assert!(!Path::new(dir).exists(), "{dir} after dpkg -P");
    }
    assert_eq!(getent("passwd", "cairn"), None, "the user after dpkg -P");
    assert_eq!(getent("group", "cairn"), None, "the group after dpkg -P");
}
