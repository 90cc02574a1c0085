//! No key material in what the controller reports. The library crates log nothing themselves
//! (no `tracing` in lkh-tree, wire, the controller or the member state machine); what the
//! daemons log about them is the controller's audit events, its answers to operator commands,
//! and the `Debug` and `Display` forms of its states, errors and the members' events and paths.
//! Through a run of churn this test renders all of those and searches them for every node key
//! the controller's tree held at any epoch and every traffic key, as hex of any 12-byte window
//! (either case). The daemons' real trace logs are scanned by `gkm-member/tests/log_scan.rs`.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

mod common;

use std::collections::HashSet;

use common::{GROUP, NAME, Run, policy};
use gkm_server::Command;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// Bytes of the shortest key fragment searched for.
const WINDOW: usize = 12;

/// Lower-case hex of every 12-byte window of every key.
fn windows(keys: &HashSet<[u8; 32]>) -> HashSet<String> {
    keys.iter()
        .flat_map(|k| k.windows(WINDOW).map(hex::encode).collect::<Vec<_>>())
        .collect()
}

/// The fragments of `text` that are hex of a key window: every run of hex digits, lowered,
/// looked up window by window.
fn leaks(text: &str, windows: &HashSet<String>) -> Vec<String> {
    let mut found = Vec::new();
    for run in text.split(|c: char| !c.is_ascii_hexdigit()) {
        let run = run.to_ascii_lowercase();
        for start in 0..run.len().saturating_sub(2 * WINDOW - 1) {
            let window = &run[start..start + 2 * WINDOW];
            if windows.contains(window) {
                found.push(window.to_owned());
            }
        }
    }
    found
}

/// Every node key of the controller's tree now.
fn node_keys(run: &Run) -> Vec<[u8; 32]> {
    let tree = run.controller.tree(GROUP).expect("the group");
    tree.nodes()
        .filter_map(|n| tree.node_key(n).map(|k| *k.as_bytes()))
        .collect()
}

/// Everything the controller and the members say about themselves now.
fn reports(run: &mut Run) -> String {
    let mut out = String::new();
    let commands = [
        Command::Status,
        Command::Groups,
        Command::Members(NAME.into()),
        Command::Keys(NAME.into()),
        Command::Tree(NAME.into()),
        Command::Stats(NAME.into()),
        Command::Policy(NAME.into(), None),
        Command::Members("nope".into()),
        Command::Evict(NAME.into(), 12_345),
        Command::Policy(NAME.into(), Some(("mtu".into(), "1".into()))),
    ];
    for command in commands {
        let answer = run.call(|c, now| c.handle_command(now, command));
        match answer {
            Ok(response) => out += &serde_json::to_string(&response).expect("encodes"),
            Err(error) => out += &format!("{error} {error:?}"),
        }
        out.push('\n');
    }
    out += &format!("{:?}\n", run.controller.group_state(GROUP));
    for a in &run.agents {
        out += &format!("{:?} {:?}\n", a.member.membership(), a.member.stats());
        out += &format!("{:?}\n", a.member.traffic_key());
    }
    out
}

#[test]
fn v027_audit_events_reports_and_debug_output_hold_no_key_material() {
    let mut run = Run::new(policy(true), 12);
    let mut rng = ChaCha20Rng::seed_from_u64(27);
    let mut keys: HashSet<[u8; 32]> = node_keys(&run).into_iter().collect();
    let mut text = reports(&mut run);
    for _ in 0..6 {
        run.churn(1, 0, &mut rng);
        keys.extend(node_keys(&run));
        text += &reports(&mut run);
    }
    keys.extend(run.traffic.values().copied());
    for a in &run.agents {
        keys.extend(a.known.values().copied());
    }
    for event in &run.events {
        text += &serde_json::to_string(event).expect("encodes");
        text += &format!("{event:?}\n");
    }
    let windows = windows(&keys);
    // The search finds a key that is there.
    let planted = keys.iter().next().expect("keys");
    assert!(!leaks(&format!("x{}y", hex::encode_upper(planted)), &windows).is_empty());
    let found = leaks(&text, &windows);
    println!(
        "{} keys searched in {} bytes of reports and {} events",
        keys.len(),
        text.len(),
        run.events.len()
    );
    assert!(keys.len() > 100 && run.events.len() > 50);
    assert!(found.is_empty(), "key material in reports: {found:?}");
}
