//! The packer's output, pinned: random rekeys (degrees 2 to 64, every strategy, hash-forward and
//! one-way updates, batches from no change to 10^4, MTUs from too small to the largest, and
//! a sweep of MTUs in small steps) are packed and a digest of every datagram's encoding is
//! compared with `wire/test-vectors/pack.json`. A change to the
//! packer must leave every datagram byte-identical; `GKM_BLESS_VECTORS=1 cargo test -p wire
//! --test packing` rewrites the file (only after a deliberate change of the packing).

#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::path::PathBuf;

use lkh_tree::{Batch, GroupId, KeyTree, NodeId, Strategy, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde_json::{Map, Value};
use wire::{Codec, MAX_DATAGRAM, pack};

/// MTUs each rekey is packed at: too small for anything, tight, the default, jumbo, the largest.
const MTUS: [usize; 9] = [
    100,
    300,
    576,
    1200,
    4000,
    9000,
    12_000,
    20_000,
    MAX_DATAGRAM,
];

/// FNV-1a (64 bits): a fixed, dependency-free digest (std's hasher may change between releases).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A tree of `members` members and the leaves it can drop.
struct Case {
    tree: KeyTree,
    members: Vec<NodeId>,
    rng: ChaCha20Rng,
}

impl Case {
    fn new(config: TreeConfig, members: usize, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut tree = KeyTree::new(GroupId(seed), config, &mut rng).unwrap();
        let joins = Batch {
            leaves: vec![],
            joins: members,
        };
        let rekey = tree.rekey(&joins, &mut rng).unwrap();
        let members = rekey.joiners.iter().map(|j| j.leaf).collect();
        Case { tree, members, rng }
    }

    /// One batch of `leaves` random leaves and `joins` joins; returns the digest of its packing
    /// at each of `mtus` (an error counts by its message).
    fn batch(&mut self, leaves: usize, joins: usize, mtus: &[usize]) -> String {
        let leaves = (0..leaves.min(self.members.len()))
            .map(|_| {
                let i = (self.rng.next_u64() % self.members.len() as u64) as usize;
                self.members.swap_remove(i)
            })
            .collect();
        let rekey = self
            .tree
            .rekey(&Batch { leaves, joins }, &mut self.rng)
            .unwrap();
        self.members.extend(rekey.joiners.iter().map(|j| j.leaf));
        let mut digest = Fnv::new();
        for &mtu in mtus {
            digest.write(&(mtu as u64).to_be_bytes());
            match pack(&rekey, &self.tree, mtu) {
                Ok(datagrams) => {
                    digest.write(&(datagrams.len() as u64).to_be_bytes());
                    for d in &datagrams {
                        assert!(d.wire_len() <= mtu);
                        digest.write(&d.to_bytes());
                    }
                }
                Err(error) => digest.write(error.to_string().as_bytes()),
            }
        }
        format!("{:016x}", digest.0)
    }
}

fn config(degree: u8, strategy: Strategy, hash_forward_joins: bool, one_way: bool) -> TreeConfig {
    TreeConfig {
        degree,
        strategy,
        hash_forward_joins,
        one_way,
    }
}

/// One pinned case: a tree of `members` members, then `batches` of (leaves, joins), each packed
/// at every MTU of `mtus`.
struct Spec {
    name: String,
    config: TreeConfig,
    members: usize,
    batches: Vec<(usize, usize)>,
    mtus: Vec<usize>,
}

fn spec(name: &str, config: TreeConfig, members: usize, batches: &[(usize, usize)]) -> Spec {
    Spec {
        name: name.to_string(),
        config,
        members,
        batches: batches.to_vec(),
        mtus: MTUS.to_vec(),
    }
}

fn cases() -> Vec<Spec> {
    let batches = [(0, 0), (1, 0), (0, 1), (1, 1), (7, 3), (40, 60), (300, 300)];
    let mut out = Vec::new();
    for degree in [2, 3, 4, 8, 16] {
        let plain = config(degree, Strategy::Group, false, false);
        out.push(spec(&format!("d{degree}"), plain, 3000, &batches));
    }
    let variants = [
        ("hash-forward", config(4, Strategy::Group, true, false)),
        ("one-way", config(4, Strategy::Group, false, true)),
        (
            "one-way+hash-forward",
            config(2, Strategy::Group, true, true),
        ),
        ("user", config(4, Strategy::User, false, false)),
        ("key", config(3, Strategy::Key, false, false)),
    ];
    for (name, c) in variants {
        out.push(spec(name, c, 3000, &batches));
    }
    // Large batches, rebalancing after mass leaves, wide nodes (many covers per datagram).
    let large = [(5000, 5000), (9000, 1000), (0, 10_000)];
    let d4 = config(4, Strategy::Group, false, false);
    out.push(spec("large-d4", d4, 16_384, &large));
    let large = [(2000, 2000), (6000, 100)];
    let d2 = config(2, Strategy::Group, false, true);
    out.push(spec("large-d2-one-way", d2, 8192, &large));
    let wide = [(3000, 0), (100, 100), (0, 3000), (64, 0), (1000, 0)];
    let d64 = config(64, Strategy::Group, false, false);
    out.push(spec("wide", d64, 20_000, &wide));
    let d64_hash_forward = config(64, Strategy::Group, true, false);
    out.push(spec("wide-hash-forward", d64_hash_forward, 20_000, &wide));
    out.push(spec(
        "tiny",
        d4,
        3,
        &[(0, 0), (1, 0), (1, 1), (0, 5), (2, 0)],
    ));
    // Every split and fill decision near its bound: MTUs in small steps.
    let mut sweep = spec("sweep", d64, 20_000, &[(300, 0), (64, 64), (2000, 0)]);
    sweep.mtus = (400..20_000).step_by(61).collect();
    out.push(sweep);
    let mut sweep = spec(
        "sweep-d3",
        config(3, Strategy::Group, false, false),
        5000,
        &[(200, 100)],
    );
    sweep.mtus = (200..6000).step_by(13).collect();
    out.push(sweep);
    out
}

#[test]
fn packing_matches_the_stored_digests() {
    let mut built = Map::new();
    for (seed, spec) in cases().into_iter().enumerate() {
        let mut case = Case::new(spec.config, spec.members, seed as u64 + 1);
        let digests: Vec<Value> = spec
            .batches
            .iter()
            .map(|&(leaves, joins)| Value::String(case.batch(leaves, joins, &spec.mtus)))
            .collect();
        built.insert(spec.name, Value::Array(digests));
    }
    let built = Value::Object(built);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("test-vectors/pack.json");
    if std::env::var_os("GKM_BLESS_VECTORS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&built).unwrap() + "\n").unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (Value::Object(stored), Value::Object(built)) = (&stored, &built) else {
        panic!("pack.json is not an object");
    };
    for (name, digests) in built {
        assert_eq!(
            stored.get(name),
            Some(digests),
            "packing of case {name} changed"
        );
    }
    assert_eq!(stored.len(), built.len(), "pack.json lists other cases");
}
