//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/*`) and any saved crash inputs
//! (`fuzz/regressions/<target>-<name>`) through the very checks the fuzz targets run: the
//! fuzz crate's `src/lib.rs` is included here as a module, so `cargo test` needs no nightly,
//! no sanitizer and no cargo-fuzz. A decoder that panics, a decoded message that does not encode
//! back to its input, or a member path that panics on a datagram fails this test.
//!
//! After a change to the formats or the tree, regenerate the corpus with
//! `cargo run --example make_corpus` in `fuzz/`.

#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use fuzz_checks::{TARGETS, run};

/// The corpus holds 138 files; fewer than this means files went missing.
const MIN_REPLAYED: usize = 120;
/// The targets that decode one message; the others are the member's verify, fresh and apply.
const DECODERS: usize = 9;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs `target`'s check on the file; `Err` with a description if it panicked.
fn replay(target: &str, path: &Path) -> Result<bool, String> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    match panic::catch_unwind(AssertUnwindSafe(|| run(target, &bytes))) {
        Ok(Some(accepted)) => Ok(accepted),
        Ok(None) => Err(format!("{}: unknown target {target}", path.display())),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!("{}: panicked: {message}", path.display()))
        }
    }
}

#[test]
fn corpus_replays_without_panics_and_seeds_mean_what_they_say() {
    assert!(
        TARGETS.len() > DECODERS,
        "the target list lost its member targets"
    );
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (i, &target) in TARGETS.iter().enumerate() {
        let files = files_in(&fuzz_dir().join("corpus").join(target));
        assert!(
            files.len() >= 3,
            "fuzz/corpus/{target} holds {} files",
            files.len()
        );
        let mut accepted = 0;
        for path in &files {
            let name = name_of(path);
            match replay(target, path) {
                Ok(ok) => {
                    accepted += usize::from(ok);
                    if name.starts_with("invalid") && ok {
                        failures.push(format!("{}: named invalid but accepted", path.display()));
                    }
                    if i < DECODERS && name.starts_with("valid") && !ok {
                        failures.push(format!("{}: named valid but rejected", path.display()));
                    }
                }
                Err(failure) => failures.push(failure),
            }
            replayed += 1;
        }
        if accepted == 0 {
            failures.push(format!(
                "no file of fuzz/corpus/{target} is accepted (regenerate: cargo run --example make_corpus)"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        replayed >= MIN_REPLAYED,
        "replayed only {replayed} corpus files, expected at least {MIN_REPLAYED}"
    );
}

#[test]
fn saved_crash_inputs_no_longer_panic() {
    let mut failures = Vec::new();
    for path in files_in(&fuzz_dir().join("regressions")) {
        let name = name_of(&path);
        let Some(target) = TARGETS.iter().find(|t| {
            name.strip_prefix(**t)
                .is_some_and(|rest| rest.starts_with('-'))
        }) else {
            failures.push(format!(
                "{}: name does not start with <target>-",
                path.display()
            ));
            continue;
        };
        if let Err(failure) = replay(target, &path) {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} regression failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
