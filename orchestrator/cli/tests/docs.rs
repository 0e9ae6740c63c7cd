//! `cairn completions SHELL` and `cairn man`, run as the real binary: a bad shell is refused
//! with clap's list of the good ones; the bash script, loaded into a real bash, completes
//! cairn's subcommands and the shells; the man pages are roff pages of every subcommand, and
//! `help` (clap's) has none.

use std::path::Path;
use std::process::{Command, Output};

fn cairn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .output()
        .expect("cairn runs")
}

fn stdout_of(args: &[&str]) -> String {
    let out = cairn(args);
    assert!(
        out.status.success(),
        "cairn {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[test]
fn an_unknown_shell_is_refused_with_the_ones_there_are() {
    let out = cairn(&["completions", "nosuchshell"]);
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(out.stdout.is_empty(), "no script on a refusal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'nosuchshell'"),
        "names the bad value: {stderr}"
    );
    assert!(
        stderr.contains("[possible values: bash, elvish, fish, powershell, zsh]"),
        "lists the shells: {stderr}"
    );
}

/// What `_cairn` offers for the words of `line` (the last one being completed), in bash.
fn bash_completions(script: &Path, words: &[&str]) -> Vec<String> {
    let program = r#"
        source "$1"; shift
        COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
        COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
        _cairn cairn "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let out = Command::new("bash")
        .args(["-c", program, "bash"])
        .arg(script)
        .args(words)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_bash_script_completes_subcommands_and_shells_in_bash() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cairn.bash");
    std::fs::write(&script, stdout_of(&["completions", "bash"])).unwrap();

    let mut offered = bash_completions(&script, &["cairn", "re"]);
    offered.sort();
    assert_eq!(offered, ["recover", "recover-items", "repo", "restore"]);
    let offered = bash_completions(&script, &["cairn", "completions", ""]);
    for shell in ["bash", "elvish", "fish", "powershell", "zsh"] {
        assert!(offered.iter().any(|o| o == shell), "{shell} in {offered:?}");
    }
    let offered = bash_completions(&script, &["cairn", "repo", "ba"]);
    assert_eq!(offered, ["backup"]);
}

#[test]
fn zsh_and_fish_scripts_are_for_cairn() {
    let zsh = stdout_of(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef cairn"), "{}", &zsh[..80]);
    let fish = stdout_of(&["completions", "fish"]);
    assert!(
        fish.contains("complete -c cairn "),
        "fish: {}",
        &fish[..200]
    );
    for subcommand in [
        "up",
        "orchestrator",
        "worker",
        "repo",
        "recover-items",
        "man",
    ] {
        assert!(
            fish.contains(&format!("-a \"{subcommand}\"")),
            "fish offers {subcommand}"
        );
    }
}

#[test]
fn the_man_page_names_cairn_its_subcommands_and_files() {
    let page = stdout_of(&["man"]);
    assert!(page.contains(".TH cairn 1"), "a section-1 title: {page}");
    assert!(page.contains("cairn \\- back up and recover KVM/QEMU virtual machines"));
    for see in [
        "cairn\\-up(1)",
        "cairn\\-worker(1)",
        "cairn\\-completions(1)",
    ] {
        assert!(page.contains(see), "{see} under SUBCOMMANDS");
    }
    assert!(
        !page.contains("cairn\\-help"),
        "clap's help is no subcommand of cairn's"
    );
    assert!(page.contains(".SH FILES") && page.contains("/etc/cairn/cairn.toml"));
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        page.contains(&format!("\"cairn {version}\"")),
        "the footer names the version"
    );
}

#[test]
fn man_out_writes_a_page_per_subcommand_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    let listed = stdout_of(&["man", "--out", out.to_str().unwrap()]);
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(
        listed[0],
        out.join("cairn.1").to_str().unwrap(),
        "cairn.1 first"
    );
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, on_disk, "every page written is listed, once");
    for page in [
        "cairn-up.1",
        "cairn-repo.1",
        "cairn-repo-backup.1",
        "cairn-group-set-policy.1",
        "cairn-completions.1",
        "cairn-man.1",
    ] {
        let text =
            std::fs::read_to_string(out.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        let name = page.trim_end_matches(".1");
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(".TH {name} 1  \"cairn {version}\"")),
            "{page}: {text}"
        );
    }
    assert!(
        !on_disk.iter().any(|p| p.contains("help")),
        "no page for clap's help: {on_disk:?}"
    );
}
