//! Replays the committed fuzz corpus of the codec and member-path targets
//! (`fuzz/corpus/<target>/*`) and any saved crash inputs (`fuzz/regressions/<target>-<name>`)
//! through the very checks the fuzz targets run: the fuzz crate's `src/codecs.rs` and
//! `src/replay.rs` are included here as modules, so `cargo test` needs no nightly, no sanitizer
//! and no cargo-fuzz. A decoder that panics, a decoded message that does not encode back to its
//! input, or a member path that panics on a datagram fails this test. The agent targets are
//! replayed by `gkm-server/tests/fuzz_corpus.rs`.
//!
//! After a change to the formats or the tree, regenerate the corpus with
//! `cargo run --example make_corpus` in `fuzz/`.

#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/codecs.rs"]
mod fuzz_checks;
#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use fuzz_checks::{TARGETS, run};

/// The corpus holds 138 files; fewer than this means files went missing.
const MIN_REPLAYED: usize = 120;
/// The targets that decode one message; the others are the member's verify, fresh and apply.
const DECODERS: usize = 10;

/// Decoders must accept their `valid-*` seeds; the member targets name seeds by intent only.
fn strict(target: &str) -> bool {
    TARGETS
        .iter()
        .position(|t| *t == target)
        .is_some_and(|i| i < DECODERS)
}

#[test]
fn corpus_replays_without_panics_and_seeds_mean_what_they_say() {
    assert!(
        TARGETS.len() > DECODERS,
        "the target list lost its member targets"
    );
    let fuzz = replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let replayed = replay::corpus(&fuzz, TARGETS, run, strict);
    replayed.assert_clean(MIN_REPLAYED);
}

#[test]
fn saved_crash_inputs_no_longer_panic() {
    let fuzz = replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let failures = replay::regressions(&fuzz, TARGETS, run);
    replay::assert_none("regression", &failures);
}
