//! Writes the checked-in corpus of encoded samples (`tests/corpus/v1/*.bin`).
//!
//! Run once after adding a variant: `cargo run -p cairn-schemas --example write_corpus`.
//! It writes only files that do not exist yet. An existing file whose bytes differ from what
//! this build encodes is reported and left alone, and the run fails: the checked-in bytes are
//! the frozen format, so a difference means the code changed the format, not the corpus.

#[path = "../tests/corpus/samples.rs"]
mod samples;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/v1");
    if let Err(err) = std::fs::create_dir_all(&dir) {
        eprintln!("cannot create {}: {err}", dir.display());
        return ExitCode::FAILURE;
    }
    let (mut n_written, mut n_same, mut n_differ) = (0, 0, 0);
    for sample in samples::samples() {
        let path = dir.join(&sample.file);
        let bytes = sample.value.encode();
        match std::fs::read(&path) {
            Ok(existing) if existing == bytes => n_same += 1,
            Ok(_) => {
                eprintln!(
                    "DIFFERS, left alone: {} (this build encodes the sample differently: \
                     the format changed)",
                    path.display()
                );
                n_differ += 1;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                // create_new: never replace a file that appeared meanwhile.
                let written = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .and_then(|mut file| std::io::Write::write_all(&mut file, &bytes));
                if let Err(err) = written {
                    eprintln!("cannot write {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {} ({} bytes)", path.display(), bytes.len());
                n_written += 1;
            }
            Err(err) => {
                eprintln!("cannot read {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    println!("{n_written} written, {n_same} unchanged, {n_differ} differ");
    if n_differ > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
