//! Decodes every checked-in corpus file and compares it with the value it was made from.
//! A failure here means a change broke stored events (or specs, reports, commands): see the
//! rules in `cairn_schemas::v1`.

#[path = "corpus/samples.rs"]
mod samples;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use samples::{Sample, Value};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/v1")
}

#[test]
fn every_corpus_file_decodes_to_its_sample() {
    let dir = corpus_dir();
    let mut failures = Vec::new();
    for Sample { file, value } in samples::samples() {
        let path = dir.join(&file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                failures.push(format!(
                    "{file}: cannot read ({err}); new variant? run \
                     `cargo run -p cairn-schemas --example write_corpus` and check the file in"
                ));
                continue;
            }
        };
        match value.decode_like(&bytes) {
            Ok(decoded) if decoded == value => {}
            Ok(decoded) => failures.push(format!(
                "{file}: decodes to a different value\n  expected {value:?}\n  got      {decoded:?}"
            )),
            Err(err) => failures.push(format!("{file}: does not decode: {err}")),
        }
        // Encoding is deterministic and unchanged: the same value still makes the same bytes.
        if value.encode() != bytes {
            failures.push(format!("{file}: this build encodes the sample differently"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_corpus_file_has_a_sample() {
    let expected: BTreeSet<String> = samples::samples().into_iter().map(|s| s.file).collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    let orphans: Vec<_> = on_disk.difference(&expected).collect();
    assert!(
        orphans.is_empty(),
        "corpus files without a sample (never delete a sample): {orphans:?}"
    );
}

#[test]
fn every_variant_has_a_sample() {
    let (mut events, mut works, mut reports, mut commands) = (
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::new(),
    );
    for sample in samples::samples() {
        match &sample.value {
            Value::Event(v) => events.insert(samples::event_variant(&v.payload).0),
            Value::Spec(v) => works.insert(samples::work_variant(&v.work).0),
            Value::Report(v) => reports.insert(samples::report_variant(&v.body).0),
            Value::Command(v) => commands.insert(samples::command_variant(&v.command).0),
        };
    }
    let all = |n: usize| (0..n).collect::<BTreeSet<_>>();
    assert_eq!(events, all(samples::N_EVENT_VARIANTS), "event variants");
    assert_eq!(works, all(samples::N_WORK_VARIANTS), "step work variants");
    assert_eq!(reports, all(samples::N_REPORT_VARIANTS), "report variants");
    assert_eq!(
        commands,
        all(samples::N_COMMAND_VARIANTS),
        "command variants"
    );
}

#[test]
fn a_flipped_byte_never_decodes_to_the_same_value() {
    // Not a guarantee of postcard, but what the corpus relies on: spot-check the biggest sample.
    let sample = samples::samples()
        .into_iter()
        .max_by_key(|s| s.value.encode().len())
        .unwrap();
    let bytes = sample.value.encode();
    for idx in 1..bytes.len() {
        let mut changed = bytes.clone();
        changed[idx] ^= 0x01;
        if let Ok(decoded) = sample.value.decode_like(&changed) {
            assert_ne!(decoded, sample.value, "flip at byte {idx} went unnoticed");
        }
    }
}
