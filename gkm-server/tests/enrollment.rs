//! Enrollment that stays closed across daemon restarts (GKM-V048, GKM-V049), as the issue
//! reproduced it: a member joins with a single-use token and is evicted; after a restart another
//! identity presents the same token; after another, the evicted one comes back. Bans through
//! `gkmctl` hold across restarts and under open enrollment.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::time::Duration;

use gkm_member::Member;
use rand_chacha::ChaCha20Rng;
use support::{Running, Server, member_config, member_keys, now_ms, register};

/// A member of group "demo" with keys from `seed`, presenting `token`.
fn member(setup: &Server, seed: u64, token: &[u8]) -> Member<ChaCha20Rng> {
    let (identity, hpke, rng) = member_keys(seed);
    let mut config = member_config(setup.public_key());
    config.token = token.to_vec();
    Member::new(config, identity, hpke, rng, now_ms())
}

fn identity_hex(seed: u64) -> String {
    hex::encode(member_keys(seed).0.verifying_key().to_bytes())
}

fn restart(setup: &Server, daemon: Running) -> Running {
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(20)).status.success());
    setup.start()
}

fn ctl_ok(setup: &Server, args: &[&str]) -> String {
    let out = setup.ctl(args);
    assert!(
        out.status.success(),
        "gkmctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn v048_a_used_token_admits_no_one_after_a_restart() {
    let setup = Server::new(
        "tokens",
        "enrollment = \"restricted\"\ntokens = [\"tok-1\"]\nrepeats = 1",
    );
    let daemon = setup.start();
    let mut a = member(&setup, 1, b"tok-1");
    let a_id = register(setup.port, &mut a).expect("a joins with the token");
    ctl_ok(&setup, &["evict", "demo", &a_id.0.to_string()]);
    let daemon = restart(&setup, daemon);
    let mut b = member(&setup, 2, b"tok-1");
    assert!(
        register(setup.port, &mut b).is_none(),
        "b was admitted with a spent token"
    );
    let _daemon = restart(&setup, daemon);
    let mut a = member(&setup, 1, b"tok-1");
    assert!(
        register(setup.port, &mut a).is_none(),
        "a is back with its spent token"
    );
}

#[test]
fn v049_gkmctl_bans_hold_across_restarts_under_open_enrollment() {
    let setup = Server::new("bans", "repeats = 1");
    let daemon = setup.start();
    let mut a = member(&setup, 11, b"");
    let a_id = register(setup.port, &mut a).expect("a joins");
    let said = ctl_ok(&setup, &["evict", "--ban", "demo", &a_id.0.to_string()]);
    assert!(said.contains("evicted and banned"), "{said}");
    let stranger = identity_hex(12);
    ctl_ok(&setup, &["ban", "demo", &stranger]);
    let daemon = restart(&setup, daemon);
    let bans = ctl_ok(&setup, &["bans", "demo"]);
    assert!(
        bans.contains(&identity_hex(11)) && bans.contains(&stranger),
        "{bans}"
    );
    for seed in [11, 12] {
        let mut m = member(&setup, seed, b"");
        assert!(
            register(setup.port, &mut m).is_none(),
            "banned member {seed} admitted"
        );
    }
    ctl_ok(&setup, &["unban", "demo", &stranger]);
    let _daemon = restart(&setup, daemon);
    let mut m = member(&setup, 12, b"");
    assert!(
        register(setup.port, &mut m).is_some(),
        "the lifted ban still holds"
    );
    let refused = setup.ctl(&["unban", "demo", &stranger]);
    assert!(!refused.status.success());
    let audit = std::fs::read_to_string(setup.state.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("banned") && audit.contains("unbanned"),
        "{audit}"
    );
}
