//! The checks behind every fuzz target, in three parts: [`codecs`] (the wire decoders and the
//! member's verify, fresh and apply path), [`agents`] (the controller's request handling, the
//! control socket's JSON and the member agent's datagram and reply handling) and [`replay`]
//! (the corpus replay the ordinary tests run). The fuzz binaries call these checks; the replay
//! tests include the same files, so the fuzzer and `cargo test` run exactly the same logic.

pub mod agents;
pub mod codecs;
pub mod replay;

pub use codecs::*;

/// Runs the check of any target, codec or agent. `None` for an unknown target.
pub fn run_any(target: &str, data: &[u8]) -> Option<bool> {
    codecs::run(target, data).or_else(|| agents::run(target, data))
}
