//! `evict [MEMBERS] [EVICTIONS] [DEGREE]`: single evictions through the real controller, and
//! what each costs the members.
//!
//! A `Controller` (the library, seeded RNG, one worker) is restored with MEMBERS members (default
//! 8,192) and the product's policy (degree DEGREE, default 4; one-way leaves; immediate rekeying;
//! MTU 1,200), over the in-memory store through the `StoreDriver`, so that no disk time is in
//! the numbers. Each eviction (default 400) is one `Command::Evict` and one `handle_timeout`,
//! timed until the rekey is durable and its datagrams are queued: tree and wraps, the save,
//! packing and signing. Between evictions, untimed, the datagrams of the rekey are handed to 64
//! members (held paths, as the member agent holds them): each finds its datagram from the
//! unverified header and covers, verifies its signature and applies it, timed. The floor of a
//! member is one Ed25519 `verify_strict` of its datagram plus one pad derivation per key of its
//! path that changed.
//!
//! Prints the key tree's memory per member and the keys on a member's path; per eviction, the
//! median controller time, datagrams and bytes (one copy of each datagram); and for the members
//! the median time against the floor.
//!
//! `cargo run --release -p gkm-benches --bin evict -- 8192 400 4`

use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, SigningKey};
use gkm_benches::{full_tree, median, member_records, unwrap_like_member, wrap_binding};
use gkm_server::{
    Command, Controller, GroupPolicy, GroupState, MemoryStore, Store, StoreDriver, Timestamp,
    Transmit,
};
use lkh_tree::TreeConfig;
use wire::{AuthenticRekey, HeldPath, RekeyDatagram, SIGNATURE_LEN};

const START: u64 = 1_800_000_000_000;
/// Members whose applies are timed.
const WATCHED: usize = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8_192);
    let evictions: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(400);
    let degree: u8 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let tree_config = TreeConfig {
        degree,
        one_way: true,
        ..TreeConfig::default()
    };
    let mut fx = full_tree(n, tree_config, 11);
    let tree_bytes = fx.tree.memory_bytes();
    let path_keys = fx.tree.height() + 1;
    let snapshot = fx.tree.snapshot();
    let group = snapshot.group;
    let epoch = snapshot.epoch.0;
    let members = member_records(&fx.tree, epoch, [9; 32]);
    let picked = fx.random_members(WATCHED);
    let mut watched: Vec<HeldPath> = picked
        .iter()
        .filter_map(|&leaf| fx.tree.member_path(leaf))
        .map(HeldPath::trusted)
        .collect();
    let watched_leaves: Vec<u32> = watched.iter().map(|p| p.leaf().0).collect();
    let mut evictable: Vec<u64> = members
        .iter()
        .filter(|m| !watched_leaves.contains(&m.leaf.0))
        .map(|m| m.id.0)
        .collect();
    gkm_benches::shuffle(&mut evictable, 5);
    let state = GroupState {
        tree: snapshot,
        members,
        enrollment: Default::default(),
        signing: Vec::new(),
    };
    let mut policy = GroupPolicy::new("bench", group);
    policy.tree = tree_config;
    policy.lease_ms = 1 << 40;
    // One send per datagram: the repeats are the same bytes, later.
    policy.repeats = 1;
    let signer = SigningKey::from_bytes(&[1; 32]);
    let verifying = signer.verifying_key();
    let mut store = MemoryStore::default();
    store.save(&state).expect("the first save");
    let mut controller = StoreDriver::new(
        Controller::new(
            signer,
            gkm_benches::rng(2),
            vec![policy],
            vec![state],
            Timestamp(START),
        )
        .expect("a valid state"),
        Box::new(store),
    );
    controller.set_workers(1);
    let mut now = START;
    // The restored group rekeys at once (untimed); the watched members apply it.
    controller.handle_timeout(Timestamp(now));
    let first = rekey_datagrams(&mut controller);
    deliver(&mut watched, &first, &verifying);

    let (mut controller_us, mut datagrams, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
    let (mut member_us, mut floor_us) = (Vec::new(), Vec::new());
    let binding = wrap_binding(3);
    for _ in 0..evictions {
        let Some(member) = evictable.pop() else { break };
        now += 10;
        let t = Instant::now();
        controller
            .handle_command(Timestamp(now), Command::Evict("bench".into(), member))
            .expect("a member");
        controller.handle_timeout(Timestamp(now));
        let elapsed = t.elapsed();
        let sent = rekey_datagrams(&mut controller);
        controller_us.push(us(elapsed));
        datagrams.push(sent.len() as f64);
        bytes.push(sent.iter().map(Vec::len).sum::<usize>() as f64);
        for (time, floor) in deliver(&mut watched, &sent, &verifying) {
            member_us.push(us(time));
            // The floor: one signature check of the same bytes, and the same unwraps bare.
            let (body, signature) = floor.0.split_at(floor.0.len() - SIGNATURE_LEN);
            let signature = Signature::from_slice(signature).expect("64 bytes");
            let t = Instant::now();
            let mut message = b"gkm v1 signed message\0".to_vec();
            message.extend_from_slice(body);
            verifying
                .verify_strict(&message, &signature)
                .expect("the controller signed it");
            for _ in 0..floor.1 {
                std::hint::black_box(unwrap_like_member(&[1; 32], &binding, &[2; 32]));
            }
            floor_us.push(us(t.elapsed()));
        }
    }
    let member = median(&mut member_us);
    let floor = median(&mut floor_us);
    println!(
        "n = {n}, d = {degree}, one-way, MTU 1200, {} evictions through the controller (in-memory store)",
        controller_us.len()
    );
    println!(
        "key tree: {:.1} B per member (KeyTree::memory_bytes); a member holds {path_keys} path keys",
        tree_bytes as f64 / n as f64
    );
    println!(
        "controller per eviction: p50 {:.1} µs; datagrams p50 {}; bytes p50 {} (max {})",
        median(&mut controller_us),
        median(&mut datagrams),
        median(&mut bytes),
        bytes.iter().copied().fold(0.0, f64::max)
    );
    println!(
        "member per rekey ({} applies): p50 {member:.1} µs; floor (verify_strict + its unwraps) p50 {floor:.1} µs; ratio {:.2}",
        member_us.len(),
        member / floor
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The distinct rekey datagrams queued (the first copies; spaced repeats are not yet due).
fn rekey_datagrams(controller: &mut StoreDriver<rand_chacha::ChaCha20Rng>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(t) = controller.poll_transmit() {
        if let Transmit::Multicast { bytes, .. } = t
            && wire::MessageType::peek(&bytes) == Ok(wire::MessageType::Rekey)
            && !out.contains(&bytes)
        {
            out.push(bytes);
        }
    }
    while controller.poll_event().is_some() {}
    out
}

/// Each watched member takes the datagram that serves it, as the agent does: unverified header
/// and covers first, then one signature check and the apply. Returns, per member, the time and
/// (its datagram, the wraps it opened) for the floor.
fn deliver(
    watched: &mut [HeldPath],
    datagrams: &[Vec<u8>],
    controller: &ed25519_dalek::VerifyingKey,
) -> Vec<(Duration, (Vec<u8>, usize))> {
    let mut out = Vec::with_capacity(watched.len());
    for path in watched.iter_mut() {
        let before: Vec<(u32, u64)> = path
            .keys()
            .iter()
            .map(|k| (k.node.0, k.version.0))
            .collect();
        let t = Instant::now();
        let mut used = None;
        for bytes in datagrams {
            let Ok(unverified) = wire::decode_signed::<RekeyDatagram>(bytes) else {
                continue;
            };
            if !unverified.message().serves(path) {
                continue;
            }
            let authentic = AuthenticRekey::check(unverified, controller).expect("signed");
            authentic
                .fresh(path)
                .and_then(wire::FreshRekey::apply)
                .expect("applies");
            used = Some(bytes.clone());
            break;
        }
        let elapsed = t.elapsed();
        let used = used.expect("a datagram serves every member");
        // The keys of the path that changed: each cost the member one derivation, an unwrap's
        // pad or a one-way step (a one-way step is two derivations, seed and key: counted as
        // one, so the floor is low).
        let renewed = path
            .keys()
            .iter()
            .filter(|k| !before.contains(&(k.node.0, k.version.0)))
            .count();
        out.push((elapsed, (used, renewed)));
    }
    out
}
