//! Attackers that handle wraps themselves, with their own implementation of the key wrap from
//! the specification (RFC-notes/lkh.md, wire-format.md) rather than the product's: an insider
//! forges wraps under keys it holds ([`seal_wrap`]); departed members pool their keys and open
//! every wrap of every captured datagram they can ([`Loot::attack`]). Shared by the sans-I/O
//! adversary tests and the daemon-level coalition test in gkm-member (included with `#[path]`).

use std::collections::{BTreeMap, BTreeSet};

use lkh_tree::{Epoch, GroupId, Kcv, KeyVersion, NodeId, NodeKey, Wrap};
use wire::RekeyDatagram;

/// A key instance an adversary may hold: (node, version) → key bytes.
pub type Keys = BTreeMap<(u32, u64), [u8; 32]>;

/// The pad of a wrap under `key` in the rekey salted with `salt` (RFC-notes/wire-format.md,
/// version 3: `derive_key("gkm v3 2026-12 lkh wrap pad", key ‖ salt ‖ group ‖ epoch ‖ target ‖
/// wrapping ‖ wrapping version)`, the wrap being the key XOR the pad).
fn pad(
    group: GroupId,
    (key, salt): (&[u8; 32], &[u8; 16]),
    epoch: u64,
    (target, wrapping, wrapping_version): (NodeId, NodeId, u64),
) -> [u8; 32] {
    let mut input = Vec::with_capacity(80);
    input.extend_from_slice(key);
    input.extend_from_slice(salt);
    input.extend_from_slice(&group.0.to_be_bytes());
    input.extend_from_slice(&epoch.to_be_bytes());
    input.extend_from_slice(&target.0.to_be_bytes());
    input.extend_from_slice(&wrapping.0.to_be_bytes());
    input.extend_from_slice(&wrapping_version.to_be_bytes());
    blake3::derive_key("gkm v3 2026-12 lkh wrap pad", &input)
}

fn xor(a: [u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = a;
    for (o, b) in out.iter_mut().zip(b) {
        *o ^= b;
    }
    out
}

/// Wraps `plain` as the new key of `target` in `epoch` under `key`, the key of `wrapping` at
/// `wrapping_version`: what an insider holding `key` can make.
pub fn seal_wrap(
    group: GroupId,
    key: (&[u8; 32], &[u8; 16]),
    epoch: Epoch,
    (target, wrapping, wrapping_version): (NodeId, NodeId, u64),
    plain: &[u8; 32],
) -> Wrap {
    let pad = pad(group, key, epoch.0, (target, wrapping, wrapping_version));
    Wrap {
        target,
        wrapping,
        under_new: wrapping_version == epoch.0,
        ciphertext: xor(pad, plain),
    }
}

/// Opens `wrap` of `epoch` with `key`, taken as the key of the wrapping node at
/// `wrapping_version`. Every key opens every wrap to something: only the right one to the key.
pub fn open_wrap(
    group: GroupId,
    key: (&[u8; 32], &[u8; 16]),
    epoch: u64,
    wrap: &Wrap,
    wrapping_version: u64,
) -> [u8; 32] {
    let pad = pad(
        group,
        key,
        epoch,
        (wrap.target, wrap.wrapping, wrapping_version),
    );
    xor(pad, &wrap.ciphertext)
}

/// A candidate value of a key or seed instance: (kind, node, version, bytes), kind 0 for keys
/// and 1 for seeds.
type Candidate = (u8, u32, u64, [u8; 32]);

/// What the attackers learned.
///
/// Wraps carry no tags, so a wrap opened under the wrong key yields garbage that looks like a
/// key. The attackers pick keys as a member does: a wrap under a node's key held before the
/// epoch uses the version that node had then, which the captures tell (a node's key changes in
/// the epochs whose datagrams set it). That is not always enough (a departed member's leaf id
/// given to a joiner changes the leaf's key with nothing on the wire), so every candidate keeps
/// where it came from, and what the attack *opened* for certain is what leads to a root whose
/// traffic key has the check value the epoch's datagrams carry.
pub struct Loot {
    group: GroupId,
    /// Every candidate, with the candidates it was derived from.
    found: BTreeMap<Candidate, Vec<Candidate>>,
    /// Candidates obtained by opening a wrap.
    unwrapped: BTreeSet<Candidate>,
    /// The versions each node's key is known to have had: held, or set by a captured datagram.
    versions: BTreeMap<u32, BTreeSet<u64>>,
    /// Instances learned by opening a wrap, confirmed by a key check value.
    pub opened: BTreeSet<(u32, u64)>,
}

impl Loot {
    /// Attackers of `group` holding `held`.
    pub fn new(group: GroupId, held: &Keys) -> Loot {
        let mut loot = Loot {
            group,
            found: BTreeMap::new(),
            unwrapped: BTreeSet::new(),
            versions: BTreeMap::new(),
            opened: BTreeSet::new(),
        };
        for (&(node, version), key) in held {
            loot.found.insert((0, node, version, *key), Vec::new());
            loot.versions.entry(node).or_default().insert(version);
        }
        loot
    }

    fn add(&mut self, candidate: Candidate, from: Candidate) -> bool {
        let sources = self.found.entry(candidate).or_default();
        if sources.contains(&from) {
            return false;
        }
        sources.push(from);
        true
    }

    fn of(&self, kind: u8, node: u32, version: u64) -> Vec<Candidate> {
        self.found
            .range((kind, node, version, [0; 32])..=(kind, node, version, [0xff; 32]))
            .map(|(c, _)| *c)
            .collect()
    }

    /// The key candidates of `node` at the version it had just before `epoch`.
    fn current(&self, node: NodeId, epoch: u64) -> Vec<Candidate> {
        self.versions
            .get(&node.0)
            .and_then(|v| v.range(..epoch).next_back())
            .map_or_else(Vec::new, |&version| self.of(0, node.0, version))
    }

    /// Notes the nodes whose keys the captured datagrams set, and in which epochs.
    fn note_versions(&mut self, captures: &[RekeyDatagram]) {
        for d in captures {
            let e = d.epoch.0;
            let set = d
                .wraps()
                .map(|w| w.target)
                .chain(d.links().map(|l| l.parent))
                .chain(d.advances())
                .chain([NodeId::ROOT]);
            for node in set {
                self.versions.entry(node.0).or_default().insert(e);
            }
        }
    }

    /// One pass over one datagram; whether anything new was learned.
    fn pass(&mut self, d: &RekeyDatagram) -> bool {
        let e = d.epoch.0;
        let mut progress = false;
        for node in d.advances() {
            for old in self.current(node, e) {
                let new = NodeKey::from_bytes(old.3).hash_forward(node, KeyVersion(e));
                progress |= self.add((0, node.0, e, *new.as_bytes()), old);
            }
        }
        for wrap in d.wraps() {
            let openers = if wrap.under_new {
                self.of(0, wrap.wrapping.0, e)
            } else {
                self.current(wrap.wrapping, e)
            };
            for opener in openers {
                let plain = open_wrap(self.group, (&opener.3, &d.salt.0), e, wrap, opener.2);
                let learned = (u8::from(d.seeds), wrap.target.0, e, plain);
                self.unwrapped.insert(learned);
                progress |= self.learn(learned, opener);
            }
        }
        for link in d.links() {
            for seed in self.of(1, link.child.0, e) {
                let next = NodeKey::from_bytes(seed.3).one_way_next(link.parent);
                progress |= self.learn((1, link.parent.0, e, *next.as_bytes()), seed);
            }
        }
        progress
    }

    /// A key, or a seed and the key it makes, learned from `from`.
    fn learn(&mut self, learned: Candidate, from: Candidate) -> bool {
        let (kind, node, e, plain) = learned;
        if kind == 0 {
            return self.add(learned, from);
        }
        let key = NodeKey::from_bytes(plain).one_way_key(NodeId(node));
        self.add(learned, from) | self.add((0, node, e, *key.as_bytes()), learned)
    }

    /// Decrypts until nothing more opens (bounded), then confirms what the check values say.
    pub fn attack(&mut self, captures: &[RekeyDatagram]) {
        self.note_versions(captures);
        let mut settled = false;
        for _ in 0..captures.len() + 2 {
            let mut progress = false;
            for d in captures {
                progress |= self.pass(d);
            }
            if !progress {
                settled = true;
                break;
            }
        }
        assert!(settled, "the attack did not reach a fixed point");
        self.confirm(captures);
    }

    /// Marks opened what leads to a root with the check value its epoch's datagrams carry.
    fn confirm(&mut self, captures: &[RekeyDatagram]) {
        let kcvs: BTreeMap<u64, Kcv> = captures.iter().map(|d| (d.epoch.0, d.kcv)).collect();
        let group = self.group;
        let mut todo: Vec<Candidate> = Vec::new();
        for (&e, &kcv) in &kcvs {
            todo.extend(self.of(0, NodeId::ROOT.0, e).into_iter().filter(|root| {
                NodeKey::from_bytes(root.3)
                    .traffic_key(group, Epoch(e))
                    .check_value()
                    == kcv
            }));
        }
        let mut seen = BTreeSet::new();
        while let Some(candidate) = todo.pop() {
            if !seen.insert(candidate) {
                continue;
            }
            if self.unwrapped.contains(&candidate) {
                self.opened.insert((candidate.1, candidate.2));
            }
            todo.extend(self.found.get(&candidate).into_iter().flatten().copied());
        }
    }

    /// Epochs whose real traffic key (as given in `traffic`) the attackers derived.
    pub fn traffic_epochs(&self, traffic: &BTreeMap<u64, [u8; 32]>) -> BTreeSet<u64> {
        self.found
            .keys()
            .filter(|(kind, node, _, _)| *kind == 0 && *node == NodeId::ROOT.0)
            .filter(|(_, _, e, root)| {
                let derived = NodeKey::from_bytes(*root).traffic_key(self.group, Epoch(*e));
                traffic.get(e) == Some(derived.as_bytes())
            })
            .map(|(_, _, e, _)| *e)
            .collect()
    }
}
