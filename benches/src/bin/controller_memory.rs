//! `controller_memory [N]`: the controller's memory per member at N members (default 10^6), as
//! `Controller::memory_bytes` counts it (the key tree and the member roster), for a group
//! restored from a state of N members; and the size of that state as the daemon persists it
//! in a full save (50 bytes per tree node and 95 per member, plus 28 bytes of seal per row of
//! about 256 KiB).

use std::time::Instant;

use ed25519_dalek::SigningKey;
use gkm_benches::{config, full_tree, member_records, rng};
use gkm_server::{Controller, GroupPolicy, GroupState, MemoryStore, StoreDriver, Timestamp};

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let started = Instant::now();
    let fx = full_tree(n, config(4, false), 11);
    let snapshot = fx.tree.snapshot();
    let nodes = snapshot.nodes.len();
    let group = snapshot.group;
    let members = member_records(&fx.tree, 1, [0; 32]);
    drop(fx);
    let state = GroupState {
        tree: snapshot,
        members,
        enrollment: Default::default(),
        signing: Vec::new(),
    };
    let mut policy = GroupPolicy::new("bench", group);
    policy.tree = config(4, false);
    let controller = StoreDriver::new(
        Controller::new(
            SigningKey::from_bytes(&[1; 32]),
            rng(2),
            vec![policy],
            vec![state],
            Timestamp(0),
        )
        .expect("a valid state"),
        Box::new(MemoryStore::default()),
    );
    let bytes = controller.memory_bytes(group).expect("the group");
    let per = |b: usize| b as f64 / n as f64;
    println!(
        "members                        {n} (built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "controller (tree + roster)     {:>7.1} B/member",
        per(bytes)
    );
    println!(
        "persisted state (sealed)       {:>7.1} B/member",
        per((nodes * 50 + n * 93) * (256 * 1024 + 28) / (256 * 1024))
    );
}
