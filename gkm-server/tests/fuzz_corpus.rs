//! Replays the committed fuzz corpus of the agent targets (`fuzz/corpus/<target>/*` for
//! `controller_request`, `controller_subscribe`, `control_json`, `member_multicast`,
//! `member_reply`) and their saved crash inputs (`fuzz/regressions/<target>-<name>`) through the
//! very checks the fuzz targets run (`fuzz/src/agents.rs`, included here with the shared replay
//! helper `fuzz/src/replay.rs`). The codec targets are replayed by `wire/tests/fuzz_corpus.rs`.
//!
//! After a change to the formats or the agents, regenerate the corpus with
//! `cargo run --example make_corpus` in `fuzz/`.

#![allow(clippy::cast_possible_truncation, reason = "small fixture indices")]

#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/agents.rs"]
mod agents;
#[allow(unreachable_pub, dead_code)]
#[path = "../../fuzz/src/replay.rs"]
mod replay;

/// The agent corpus holds about 60 files; fewer than this means files went missing.
const MIN_REPLAYED: usize = 40;

#[test]
fn v028_agent_corpus_replays_without_panics_and_refusals_change_nothing() {
    let fuzz = replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let replayed = replay::corpus(&fuzz, agents::TARGETS, agents::run, |_| true);
    replayed.assert_clean(MIN_REPLAYED);
}

#[test]
fn saved_agent_crash_inputs_no_longer_panic() {
    let fuzz = replay::fuzz_dir(env!("CARGO_MANIFEST_DIR"));
    let failures = replay::regressions(&fuzz, agents::TARGETS, agents::run);
    replay::assert_none("regression", &failures);
}
