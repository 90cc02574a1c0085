//! # gkm-benches: what a rekey costs
//!
//! Benchmarks (divan, `cargo bench -p gkm-benches`) and a cost report
//! (`cargo run --release -p gkm-benches --bin report`) for the key tree and the wire format,
//! measured against the reference numbers of DESIGN.md §6 and the primitive costs of §9.
//!
//! | target | what it times |
//! | --- | --- |
//! | `benches/tree.rs` | leave, join, hash-forward join, refresh and a batch of 64 leaves + 64 joins at n = 2^10, 2^14, 2^17, 2^20 (d = 4) |
//! | `benches/crypto.rs` | the primitives: BLAKE3 `derive_key`, ChaCha20-Poly1305 seal/open of a 32-byte key with 40 bytes of AD, one wrap as the tree makes it, one wrap applied by a member, Ed25519 sign / `verify_strict` of 1200 bytes |
//! | `benches/wire.rs` | pack and pack_signed of one leave at 2^20, decode of one datagram, `AuthenticRekey::verify`, and a member's verify → fresh → apply |
//! | `src/bin/flood.rs` | a registration flood against the real daemon ([`flood`]): a legitimate member's registration time idle and under flood, the daemon's memory, refusals by reason |
//! | `src/bin/report.rs` | wire bytes per leave, rekey time against the time of its wraps and signatures alone, member apply against one verify plus its unwraps, memory per member |
//!
//! This library holds the setup they share, all deterministic (ChaCha20 seeded by a constant, a
//! fixed Ed25519 key), so two runs time the same trees:
//! - [`full_tree`] builds a tree of n members by joins, in batches of [`BUILD_BATCH`]; for
//!   n = d^L the join rule (shallowest vacancy, split only when full) makes it full and balanced.
//! - [`Fixture::random_member`] and [`Fixture::random_members`] pick members uniformly, in O(1)
//!   expected time, by drawing node ids and keeping the leaves.
//! - [`Fixture::leave_and_pack`] makes the one-leave rekey the wire benchmarks and the report
//!   take apart, with a member that needs the whole changed path ([`LeaveCase::sibling`]) and
//!   one that needs only the root ([`LeaveCase::far`]).
//! - [`wrap_like_tree`] and [`unwrap_like_member`] repeat, with the bare primitives, the work of
//!   one key wrap (wire version 3: one BLAKE3 `derive_key` of the wrapping key, salt and binding,
//!   80 bytes, XORed onto the 32-byte key): the floor a rekey's time is compared with.
//!
//! Keeping a tree's size steady while timing. A leave shrinks the tree and a join grows it, and
//! rebuilding a 2^20 tree per iteration would take seconds. So each timed leave is followed by an
//! untimed join (which takes the vacancy the leave opened: it is the shallowest), and each timed
//! join is preceded by an untimed leave of a random member; a batch of 64 leaves and 64 joins
//! keeps the size by itself. The tree's shape stays that of the full tree, no clone is needed,
//! and one tree per size serves every benchmark.

pub mod flood;

use ed25519_dalek::SigningKey;
use gkm_server::{HpkeDigest, MemberRecord, Timestamp};
use lkh_tree::{Batch, GroupId, KeyTree, MemberPath, NodeId, Rekey, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::Kem;

/// The group every benchmark tree belongs to.
pub const GROUP: GroupId = GroupId(7);

/// Joins per rekey while building a tree: large enough that building 2^20 members takes about
/// a second, small enough that the joiners' key paths of one batch stay a few MiB.
pub const BUILD_BATCH: usize = 4096;

/// The context label of a wrap pad, as the tree uses it (see `lkh-tree`'s `secret.rs`).
pub const WRAP_LABEL: &str = "gkm v3 2026-12 lkh wrap pad";

/// What a wrap's pad is bound to besides the wrapping key: the rekey salt (16) and group, epoch,
/// target, wrapping node and wrapping version (32).
pub const WRAP_BINDING_LEN: usize = 48;

/// A ChaCha20 generator seeded with `seed`: every benchmark's keys and choices come from one.
pub fn rng(seed: u64) -> ChaCha20Rng {
    ChaCha20Rng::seed_from_u64(seed)
}

/// The controller's fixed Ed25519 signing key.
pub fn controller_key() -> SigningKey {
    SigningKey::from_bytes(&[0x42; 32])
}

/// A degree-`degree` tree configuration with group-oriented rekeying.
pub fn config(degree: u8, hash_forward_joins: bool) -> TreeConfig {
    TreeConfig {
        degree,
        hash_forward_joins,
        ..TreeConfig::default()
    }
}

/// A built tree with its generator and what is needed to pick members quickly.
pub struct Fixture {
    /// The tree.
    pub tree: KeyTree,
    /// The generator every later rekey draws keys from.
    pub rng: ChaCha20Rng,
    /// One above the largest member leaf id seen while building: random ids below it are
    /// members about three times in four at d = 4.
    pub id_bound: u32,
}

/// Builds a tree of `n` members by joins, [`BUILD_BATCH`] per rekey, deterministically from
/// `seed`. For n = d^L the result is full: every member at depth L.
///
/// # Panics
///
/// If the tree refuses a batch (it cannot, below 2^30 members).
pub fn full_tree(n: usize, config: TreeConfig, seed: u64) -> Fixture {
    let mut rng = rng(seed);
    let mut tree = KeyTree::new(GROUP, config, &mut rng).expect("a valid degree");
    let mut id_bound = 0;
    let mut left = n;
    while left > 0 {
        let joins = left.min(BUILD_BATCH);
        let rekey = tree
            .rekey(
                &Batch {
                    leaves: Vec::new(),
                    joins,
                },
                &mut rng,
            )
            .expect("the tree has room");
        id_bound = rekey
            .joiners
            .iter()
            .map(|j| j.leaf.0 + 1)
            .fold(id_bound, u32::max);
        left -= joins;
    }
    Fixture {
        tree,
        rng,
        id_bound,
    }
}

/// A record for every member of `tree`, as if all joined in epoch `joined` (identities made
/// from their index, one X-Wing key digest for all, leases that never run out).
pub fn member_records(tree: &KeyTree, joined: u64, digest: [u8; 32]) -> Vec<MemberRecord> {
    tree.members()
        .enumerate()
        .map(|(i, leaf)| {
            let mut identity = [0u8; 32];
            identity[..8].copy_from_slice(&(i as u64).to_be_bytes());
            MemberRecord {
                id: wire::MemberId((u64::from(leaf.0) << 32) | (joined & 0xffff_ffff)),
                identity,
                hpke: HpkeDigest {
                    kem: Kem::XWing,
                    digest,
                },
                leaf,
                joined,
                lease_until: Timestamp(u64::MAX),
            }
        })
        .collect()
}

/// The one-leave rekey of a tree, packed and signed, with two members' paths from before it.
pub struct LeaveCase {
    /// The rekey of the leave.
    pub rekey: Rekey,
    /// Its datagrams, signed, in order.
    pub datagrams: Vec<Vec<u8>>,
    /// A sibling of the departed member: every key on its path changed, so it unwraps L keys.
    pub sibling: MemberPath,
    /// A member in another subtree of the root: only the root changed, one unwrap.
    pub far: MemberPath,
}

impl LeaveCase {
    /// The index of the datagram that serves `path` (each member needs exactly one).
    pub fn datagram_for(&self, path: &MemberPath) -> Option<usize> {
        let key = controller_key().verifying_key();
        self.datagrams.iter().position(|bytes| {
            wire::AuthenticRekey::verify(bytes, &key).is_ok_and(|a| a.datagram().serves(path))
        })
    }

    /// How many wraps a member with `path` opens: one per key of its path that the rekey set.
    pub fn unwraps_for(&self, path: &MemberPath) -> usize {
        path.keys()
            .iter()
            .filter(|k| self.rekey.encryptions.iter().any(|e| e.target == k.node))
            .count()
    }
}

impl Fixture {
    /// A current member, uniformly among those with an id below [`Fixture::id_bound`].
    pub fn random_member(&mut self) -> NodeId {
        let bound = u64::from(self.id_bound.max(1));
        loop {
            let id = u32::try_from(self.rng.next_u64() % bound).unwrap_or(0);
            if self.tree.is_member(NodeId(id)) {
                return NodeId(id);
            }
        }
    }

    /// `k` distinct current members (k must not exceed the tree's size).
    pub fn random_members(&mut self, k: usize) -> Vec<NodeId> {
        let mut picked = Vec::with_capacity(k);
        let mut seen = std::collections::HashSet::with_capacity(k);
        while picked.len() < k {
            let member = self.random_member();
            if seen.insert(member) {
                picked.push(member);
            }
        }
        picked
    }

    /// One join, for restoring the size after a leave (its result is dropped).
    ///
    /// # Panics
    ///
    /// If the tree is full to its id limit.
    pub fn join_untimed(&mut self) {
        self.tree.join(&mut self.rng).expect("room for one join");
    }

    /// One leave of a random member, for opening a vacancy before a join (result dropped).
    ///
    /// # Panics
    ///
    /// If the tree has no member.
    pub fn leave_untimed(&mut self) {
        let member = self.random_member();
        self.tree
            .leave(member, &mut self.rng)
            .expect("a current member");
    }

    /// Leaves a random member whose parent is full, packs and signs the rekey at `mtu`. The tree
    /// is left one member smaller (call [`Fixture::join_untimed`] to restore it).
    ///
    /// # Panics
    ///
    /// If the tree is too small to have a member in another subtree of the root, or packing fails.
    pub fn leave_and_pack(&mut self, mtu: usize) -> LeaveCase {
        let degree = usize::from(self.tree.config().degree);
        let (victim, sibling) = loop {
            let victim = self.random_member();
            let parent = self.tree.parent(victim).expect("a member has a parent");
            let children = self.tree.children(parent);
            if children.len() == degree
                && let Some(&sibling) = children.iter().find(|&&c| c != victim)
            {
                break (victim, sibling);
            }
        };
        let top = |tree: &KeyTree, mut node: NodeId| {
            while let Some(parent) = tree.parent(node) {
                if parent == NodeId::ROOT {
                    break;
                }
                node = parent;
            }
            node
        };
        let far = loop {
            let member = self.random_member();
            if top(&self.tree, member) != top(&self.tree, victim) {
                break member;
            }
        };
        let sibling = self.tree.member_path(sibling).expect("a member");
        let far = self.tree.member_path(far).expect("a member");
        let rekey = self
            .tree
            .leave(victim, &mut self.rng)
            .expect("a current member");
        let datagrams =
            wire::pack_signed(&rekey, &self.tree, mtu, &controller_key()).expect("packs");
        LeaveCase {
            rekey,
            datagrams,
            sibling,
            far,
        }
    }
}

/// Shuffles `items` (Fisher–Yates) with a generator seeded with `seed`: the order in which a
/// benchmark evicts its members.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = rng(seed);
    for i in (1..items.len()).rev() {
        let j = usize::try_from(rng.next_u64() % (i as u64 + 1)).unwrap_or(0);
        items.swap(i, j);
    }
}

/// The low byte of `i`: filler for keys, nonces and messages whose contents do not matter.
pub fn byte(i: usize) -> u8 {
    i.to_le_bytes()[0]
}

/// A wrap-shaped binding (the contents do not change the cost).
pub fn wrap_binding(seed: u8) -> [u8; WRAP_BINDING_LEN] {
    [seed; WRAP_BINDING_LEN]
}

/// The pad of one wrap, with the bare primitive: `blake3::derive_key(WRAP_LABEL, wrapping key ‖
/// binding)`.
fn pad(wrapping_key: &[u8; 32], binding: &[u8; WRAP_BINDING_LEN]) -> [u8; 32] {
    let mut input = [0u8; 32 + WRAP_BINDING_LEN];
    input[..32].copy_from_slice(wrapping_key);
    input[32..].copy_from_slice(binding);
    blake3::derive_key(WRAP_LABEL, &input)
}

/// One key wrap done with the bare primitives, as the tree does it: the key XOR its pad.
pub fn wrap_like_tree(
    wrapping_key: &[u8; 32],
    binding: &[u8; WRAP_BINDING_LEN],
    key: &[u8; 32],
) -> [u8; 32] {
    let mut out = pad(wrapping_key, binding);
    for (o, k) in out.iter_mut().zip(key) {
        *o ^= k;
    }
    out
}

/// Opens a [`wrap_like_tree`] wrap, as a member does: the same pad, XORed off.
pub fn unwrap_like_member(
    wrapping_key: &[u8; 32],
    binding: &[u8; WRAP_BINDING_LEN],
    wrapped: &[u8; 32],
) -> [u8; 32] {
    wrap_like_tree(wrapping_key, binding, wrapped)
}

/// CPU seconds (user + system, all threads) that process `pid` (or `"self"`) has used so far,
/// from `/proc/PID/stat` at the kernel's tick; 0 if unreadable.
pub fn cpu_seconds(pid: &str) -> f64 {
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs on.
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its closing parenthesis;
    // utime and stime are fields 14 and 15, so the 12th and 13th from there.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS
}

/// TCP segments this host has sent so far (`OutSegs` of `/proc/net/snmp`, every process
/// together); 0 if unreadable.
pub fn tcp_segments_sent() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    // Two "Tcp:" lines: the field names, then their values, in the same order.
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutSegs")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The process's peak resident set (`VmHWM` of `/proc/self/status`), in KiB, if readable.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// The process's current resident set (`VmRSS`), in KiB, if readable.
pub fn rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The median of some durations or rates (sorts `values`); 0 for none.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_tree_of_4_pow_5_is_balanced_and_a_leave_packs() {
        let mut fx = full_tree(1024, config(4, false), 1);
        assert_eq!(fx.tree.len(), 1024);
        assert_eq!(fx.tree.height(), 5);
        let case = fx.leave_and_pack(wire::DEFAULT_MTU);
        assert_eq!(case.rekey.encryptions.len(), 4 * 5 - 1);
        assert_eq!(case.unwraps_for(&case.sibling), 5);
        assert_eq!(case.unwraps_for(&case.far), 1);
        assert!(case.datagram_for(&case.sibling).is_some());
        fx.join_untimed();
        assert_eq!(fx.tree.len(), 1024);
        assert_eq!(fx.tree.height(), 5);
    }

    #[test]
    fn bare_wrap_round_trips() {
        let binding = wrap_binding(1);
        let wrapped = wrap_like_tree(&[1; 32], &binding, &[3; 32]);
        assert_ne!(wrapped, [3; 32]);
        assert_eq!(unwrap_like_member(&[1; 32], &binding, &wrapped), [3; 32]);
        assert_ne!(unwrap_like_member(&[9; 32], &binding, &wrapped), [3; 32]);
    }
}
