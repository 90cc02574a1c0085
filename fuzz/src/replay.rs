//! Replays a committed fuzz corpus (`fuzz/corpus/<target>/*`) and saved crash inputs
//! (`fuzz/regressions/<target>-<name>`) through a target's check, catching panics. Shared by the
//! replay tests (`wire/tests/fuzz_corpus.rs` for the codec targets,
//! `gkm-server/tests/fuzz_corpus.rs` for the agent targets), which include this file with
//! `#[path]`, so `cargo test` needs no nightly, no sanitizer and no cargo-fuzz.
//!
//! File names say what a seed means: `valid-*` must be accepted (where the caller asks for it),
//! `invalid-*` must be refused, anything else may go either way.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// A target's check: `None` for an unknown target, else whether the input was accepted.
pub type Check = fn(&str, &[u8]) -> Option<bool>;

/// The `fuzz/` directory, from a crate directory next to it.
pub fn fuzz_dir(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir).join("..").join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
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
fn replay(check: Check, target: &str, path: &Path) -> Result<bool, String> {
    let bytes = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    match panic::catch_unwind(AssertUnwindSafe(|| check(target, &bytes))) {
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

/// What a corpus replay found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Files replayed.
    pub files: usize,
    /// Everything wrong, one line each.
    pub failures: Vec<String>,
}

impl Replayed {
    /// Panics with every failure, or when fewer than `min` files were replayed (files went
    /// missing).
    pub fn assert_clean(&self, min: usize) {
        assert_none("corpus", &self.failures);
        assert!(
            self.files >= min,
            "replayed only {} corpus files, expected at least {min}",
            self.files
        );
    }
}

/// Panics with every failure of the `what` replay, one per line.
pub fn assert_none(what: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} {what} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Replays `fuzz/corpus/<target>/` for every target. Each target needs at least 3 files and
/// one accepted; `strict(target)` says whether its `valid-*` files must be accepted.
pub fn corpus(fuzz: &Path, targets: &[&str], check: Check, strict: fn(&str) -> bool) -> Replayed {
    let mut out = Replayed::default();
    for &target in targets {
        let files = files_in(&fuzz.join("corpus").join(target));
        if files.len() < 3 {
            out.failures
                .push(format!("fuzz/corpus/{target} holds {} files", files.len()));
        }
        let mut accepted = 0;
        for path in &files {
            let name = name_of(path);
            match replay(check, target, path) {
                Ok(ok) => {
                    accepted += usize::from(ok);
                    if name.starts_with("invalid") && ok {
                        out.failures
                            .push(format!("{}: named invalid but accepted", path.display()));
                    }
                    if strict(target) && name.starts_with("valid") && !ok {
                        out.failures
                            .push(format!("{}: named valid but rejected", path.display()));
                    }
                }
                Err(failure) => out.failures.push(failure),
            }
            out.files += 1;
        }
        if accepted == 0 {
            out.failures.push(format!(
                "no file of fuzz/corpus/{target} is accepted (regenerate: cargo run --example make_corpus)"
            ));
        }
    }
    out
}

/// Replays the saved crash inputs of `fuzz/regressions/` whose name starts with one of
/// `targets` and a dash; other files belong to other replay tests. Returns the failures.
pub fn regressions(fuzz: &Path, targets: &[&str], check: Check) -> Vec<String> {
    let mut failures = Vec::new();
    for path in files_in(&fuzz.join("regressions")) {
        let name = name_of(&path);
        let target = targets.iter().find(|t| {
            name.strip_prefix(**t)
                .is_some_and(|rest| rest.starts_with('-'))
        });
        if let Some(target) = target
            && let Err(failure) = replay(check, target, &path)
        {
            failures.push(failure);
        }
    }
    failures
}
