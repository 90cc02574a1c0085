//! `controller_memory [N]`: the controller's memory per member at N members (default 10^6): the
//! key tree (measured with `KeyTree::memory_bytes`) plus the two member maps the controller keeps
//! (member id → record, identity → member id), measured from their real capacity, and the size
//! of one group's persisted state per member (the daemon's state codec: 49 bytes per node and
//! 92 per member, plus a 28-byte seal).

use std::collections::HashMap;
use std::time::Instant;

use gkm_benches::{config, full_tree};
use gkm_server::{MemberRecord, Timestamp};
use wire::MemberId;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let started = Instant::now();
    let fx = full_tree(n, config(4, false), 11);
    let tree = fx.tree.memory_bytes();
    let mut members: HashMap<MemberId, MemberRecord> = HashMap::new();
    let mut by_identity: HashMap<[u8; 32], MemberId> = HashMap::new();
    for (i, leaf) in fx.tree.members().enumerate() {
        let id = MemberId(i as u64);
        let mut identity = [0u8; 32];
        identity[..8].copy_from_slice(&(i as u64).to_be_bytes());
        members.insert(
            id,
            MemberRecord {
                id,
                identity,
                hpke_key: [0; 32],
                leaf,
                joined: 1,
                lease_until: Timestamp(0),
            },
        );
        by_identity.insert(identity, id);
    }
    // hashbrown: buckets = (capacity · 8/7) rounded up to a power of two, one control byte each.
    let map_bytes = |cap: usize, entry: usize| (cap * 8 / 7).next_power_of_two() * (entry + 1);
    let records = map_bytes(members.capacity(), size_of::<(MemberId, MemberRecord)>());
    let identities = map_bytes(by_identity.capacity(), size_of::<([u8; 32], MemberId)>());
    let nodes = fx.tree.nodes().count();
    let state = nodes * 49 + n * 92 + 28;
    let per = |b: usize| b as f64 / n as f64;
    println!(
        "members                          {n} (built in {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "key tree                         {:>7.1} B/member",
        per(tree)
    );
    println!(
        "member records (id -> record)    {:>7.1} B/member",
        per(records)
    );
    println!(
        "identity index (key -> id)       {:>7.1} B/member",
        per(identities)
    );
    println!(
        "controller total                 {:>7.1} B/member",
        per(tree + records + identities)
    );
    println!(
        "persisted state (sealed)         {:>7.1} B/member",
        per(state)
    );
}
