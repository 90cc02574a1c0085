//! Exact costs of single operations and batches on the real tree and packer: encryptions made
//! and sent, datagrams, bytes, unicast keys and bytes, signatures, and the decryptions each
//! receiving member performs (counted over every member by walking the tree once).

use std::collections::{HashMap, HashSet};

use lkh_tree::{Batch, GroupId, KeyTree, NodeId, Rekey, Strategy, TreeConfig, TreeError};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;
use wire::{DEFAULT_MTU, PATH_KEY_LEN, SIGNATURE_LEN, WireError, pack};

/// A rekeying scheme by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Group-oriented (the default).
    Group,
    /// Key-oriented.
    Key,
    /// User-oriented.
    User,
    /// Group-oriented with LKH+ hash-forward joins.
    LkhPlus,
    /// Group-oriented with the one-way (PRG) path update on leaves.
    OneWay,
}

impl Scheme {
    /// Parses `group|key|user|lkh-plus|one-way`.
    pub fn parse(name: &str) -> Option<Scheme> {
        Some(match name {
            "group" => Scheme::Group,
            "key" => Scheme::Key,
            "user" => Scheme::User,
            "lkh-plus" => Scheme::LkhPlus,
            "one-way" => Scheme::OneWay,
            _ => return None,
        })
    }

    /// The name `parse` takes.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Group => "group",
            Scheme::Key => "key",
            Scheme::User => "user",
            Scheme::LkhPlus => "lkh-plus",
            Scheme::OneWay => "one-way",
        }
    }

    /// The tree parameters of this scheme at `degree`.
    pub fn config(self, degree: u8) -> TreeConfig {
        TreeConfig {
            degree,
            strategy: match self {
                Scheme::Key => Strategy::Key,
                Scheme::User => Strategy::User,
                _ => Strategy::Group,
            },
            hash_forward_joins: self == Scheme::LkhPlus,
            one_way: self == Scheme::OneWay,
        }
    }
}

/// The cost of one rekey (stable JSON field names, see `RFC-notes/netsim.md`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RekeyCost {
    /// Members before the rekey.
    pub members: usize,
    /// Tree degree.
    pub degree: u8,
    /// Scheme name.
    pub strategy: String,
    /// Distinct wraps computed.
    pub encryptions: usize,
    /// The encryptions Li, Yang, Gouda and Lam's accounting counts for the same rekey: every
    /// renewed node's new key under each child that still has members (a joiner's individual key
    /// included: the paper delivers a joiner's path in the multicast message, where gkm sends it
    /// by unicast, and wraps a join-only key under each child, where gkm wraps it once).
    pub paper_encryptions: usize,
    /// Wraps sent, with the repetition of the packing.
    pub encryptions_sent: usize,
    /// Datagrams (one signature each).
    pub datagrams: usize,
    /// Bytes of those datagrams.
    pub multicast_bytes: usize,
    /// Keys sent by unicast to joiners.
    pub unicast_keys: usize,
    /// Bytes of the joiners' signed, sealed welcomes.
    pub unicast_bytes: usize,
    /// Signatures made.
    pub signatures: usize,
    /// Mean decryptions per receiving member (joiners excluded).
    pub member_decrypts_mean: f64,
    /// Most decryptions any receiving member performs.
    pub member_decrypts_max: usize,
}

/// Why a cost could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CostError {
    /// The tree refused the operation.
    #[error("key tree: {0}")]
    Tree(#[from] TreeError),
    /// The packer failed.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The parameters make no sense (e.g. a leave from an empty group).
    #[error("{0}")]
    Parameters(&'static str),
}

/// A balanced tree of `members` built by joins (full when members = d^L).
pub fn build(
    members: usize,
    scheme: Scheme,
    degree: u8,
    rng: &mut ChaCha20Rng,
) -> Result<KeyTree, CostError> {
    let mut tree = KeyTree::new(GroupId(1), scheme.config(degree), rng)?;
    let mut left = members;
    while left > 0 {
        let joins = left.min(1 << 16);
        tree.rekey(
            &Batch {
                leaves: Vec::new(),
                joins,
            },
            rng,
        )?;
        left -= joins;
    }
    Ok(tree)
}

/// Picks `count` distinct current members uniformly.
pub fn pick_members(tree: &KeyTree, count: usize, rng: &mut ChaCha20Rng) -> Vec<NodeId> {
    let mut all: Vec<NodeId> = tree.members().collect();
    let mut chosen = Vec::with_capacity(count);
    for _ in 0..count.min(all.len()) {
        let n = u64::try_from(all.len()).unwrap_or(u64::MAX);
        let i = usize::try_from(rng.next_u64() % n).unwrap_or(0);
        chosen.push(all.swap_remove(i));
    }
    chosen
}

/// The cost of a rekey just made on `tree` (which is the tree after it).
pub fn cost(
    tree: &KeyTree,
    rekey: &Rekey,
    members_before: usize,
    scheme: Scheme,
) -> Result<RekeyCost, CostError> {
    let datagrams = pack(rekey, tree, DEFAULT_MTU)?;
    let (mean, max) = member_decrypts(tree, rekey);
    let welcome_fixed =
        wire::HEADER_LEN + 8 + 8 + wire::NONCE_LEN + 32 + 2 + 1 + 16 + SIGNATURE_LEN;
    Ok(RekeyCost {
        members: members_before,
        degree: tree.config().degree,
        strategy: scheme.name().to_owned(),
        encryptions: rekey.encryptions.len(),
        paper_encryptions: paper_encryptions(tree, rekey),
        encryptions_sent: datagrams.iter().map(|d| d.wraps().count()).sum(),
        datagrams: datagrams.len(),
        multicast_bytes: datagrams.iter().map(wire::RekeyDatagram::wire_len).sum(),
        unicast_keys: rekey.unicast_keys(),
        unicast_bytes: rekey
            .joiners
            .iter()
            .map(|j| welcome_fixed + PATH_KEY_LEN * j.path.keys().len())
            .sum(),
        signatures: datagrams.len(),
        member_decrypts_mean: mean,
        member_decrypts_max: max,
    })
}

/// The paper's count for a rekey just made on `tree` (see [`RekeyCost::paper_encryptions`]):
/// for each internal node whose key the rekey set, its children with a member below them.
pub fn paper_encryptions(tree: &KeyTree, rekey: &Rekey) -> usize {
    let version = rekey.epoch.version();
    // Nodes with a member at or below them: one walk up from each member, stopping at the first
    // node already found.
    let mut occupied: HashSet<NodeId> = HashSet::new();
    for member in tree.members() {
        let mut node = Some(member);
        while let Some(n) = node {
            if !occupied.insert(n) {
                break;
            }
            node = tree.parent(n);
        }
    }
    occupied
        .iter()
        .filter(|&&n| !tree.is_member(n) && tree.version(n) == Some(version))
        .map(|&n| {
            tree.iter_children(n)
                .filter(|c| occupied.contains(c))
                .count()
        })
        .sum()
}

/// Decryptions per receiving member: each wrapped (not derived) renewed key on its path costs
/// one. Walks the whole tree once, passing the count down.
fn member_decrypts(tree: &KeyTree, rekey: &Rekey) -> (f64, usize) {
    let targets: HashSet<NodeId> = rekey.encryptions.iter().map(|e| e.target).collect();
    let chain: HashMap<NodeId, NodeId> = rekey.links.iter().map(|l| (l.parent, l.child)).collect();
    let epoch = rekey.epoch.version();
    let (mut total, mut max, mut receivers) = (0usize, 0usize, 0usize);
    let mut stack = vec![(NodeId::ROOT, 0usize)];
    while let Some((node, above)) = stack.pop() {
        if tree.is_member(node) {
            if tree.version(node) != Some(epoch) {
                total += above;
                max = max.max(above);
                receivers += 1;
            }
            continue;
        }
        let wrapped = targets.contains(&node);
        for child in tree.children(node) {
            let derived = chain.get(&node) == Some(&child);
            stack.push((child, above + usize::from(wrapped && !derived)));
        }
    }
    let mean = if receivers == 0 {
        0.0
    } else {
        total as f64 / receivers as f64
    };
    (mean, max)
}

/// One join or leave on a balanced tree of `members`.
pub fn single(
    members: usize,
    degree: u8,
    leave: bool,
    scheme: Scheme,
    seed: u64,
) -> Result<RekeyCost, CostError> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut tree = build(members, scheme, degree, &mut rng)?;
    let batch = if leave {
        let leaves = pick_members(&tree, 1, &mut rng);
        if leaves.is_empty() {
            return Err(CostError::Parameters("a leave needs at least one member"));
        }
        Batch { leaves, joins: 0 }
    } else {
        Batch {
            leaves: Vec::new(),
            joins: 1,
        }
    };
    let rekey = tree.rekey(&batch, &mut rng)?;
    cost(&tree, &rekey, members, scheme)
}

/// How a batch's encryptions are counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Accounting {
    /// The wraps gkm multicasts (joiners get their paths by unicast; a join-only key is wrapped
    /// once, under its old key).
    #[default]
    Gkm,
    /// Li, Yang, Gouda and Lam's: every renewed key under each child with members, a joiner's
    /// individual key included.
    Paper,
}

impl Accounting {
    /// Parses `gkm|paper`.
    pub fn parse(name: &str) -> Option<Accounting> {
        match name {
            "gkm" => Some(Accounting::Gkm),
            "paper" => Some(Accounting::Paper),
            _ => None,
        }
    }
}

/// Mean and standard deviation of a batch's costs over independent trials.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BatchCost {
    /// The first trial's full cost (the other fields are means over all trials).
    #[serde(flatten)]
    pub cost: RekeyCost,
    /// Leaves per batch.
    pub leaves: usize,
    /// Joins per batch.
    pub joins: usize,
    /// Trials.
    pub trials: usize,
    /// Which accounting `encryptions_mean` and `encryptions_stddev` follow: `gkm` (the wraps
    /// gkm multicasts) or `paper` (Li et al.'s count, joiners' keys in the multicast).
    pub accounting: Accounting,
    /// Mean encryptions over the trials.
    pub encryptions_mean: f64,
    /// Mean of gkm's count (whatever the accounting).
    pub gkm_encryptions_mean: f64,
    /// Mean of the paper's count (whatever the accounting).
    pub paper_encryptions_mean: f64,
    /// Mean keys sent to joiners by unicast (gkm's welcomes).
    pub unicast_keys_mean: f64,
    /// Standard deviation of encryptions over the trials.
    pub encryptions_stddev: f64,
}

/// `trials` independent batches of `leaves` uniformly chosen leaves and `joins` joins, each on a
/// fresh balanced tree of `members`.
pub fn batch(
    members: usize,
    degree: u8,
    leaves: usize,
    joins: usize,
    trials: usize,
    scheme: Scheme,
    seed: u64,
) -> Result<BatchCost, CostError> {
    batch_counted(
        members,
        degree,
        (leaves, joins),
        trials,
        scheme,
        seed,
        Accounting::Gkm,
    )
}

/// As [`batch`], the mean and deviation following `accounting`.
pub fn batch_counted(
    members: usize,
    degree: u8,
    (leaves, joins): (usize, usize),
    trials: usize,
    scheme: Scheme,
    seed: u64,
    accounting: Accounting,
) -> Result<BatchCost, CostError> {
    if leaves > members || trials == 0 {
        return Err(CostError::Parameters(
            "need leaves <= members and at least one trial",
        ));
    }
    let mut costs = Vec::with_capacity(trials);
    for trial in 0..trials {
        let mut rng = ChaCha20Rng::seed_from_u64(seed.wrapping_add(trial as u64));
        let mut tree = build(members, scheme, degree, &mut rng)?;
        let gone = pick_members(&tree, leaves, &mut rng);
        let rekey = tree.rekey(
            &Batch {
                leaves: gone,
                joins,
            },
            &mut rng,
        )?;
        costs.push(cost(&tree, &rekey, members, scheme)?);
    }
    let n = costs.len() as f64;
    let counted = |c: &RekeyCost| match accounting {
        Accounting::Gkm => c.encryptions as f64,
        Accounting::Paper => c.paper_encryptions as f64,
    };
    let mean_of = |f: &dyn Fn(&RekeyCost) -> f64| costs.iter().map(f).sum::<f64>() / n;
    let mean = mean_of(&counted);
    let var = costs
        .iter()
        .map(|c| (counted(c) - mean).powi(2))
        .sum::<f64>()
        / n;
    let gkm_mean = mean_of(&|c| c.encryptions as f64);
    let paper_mean = mean_of(&|c| c.paper_encryptions as f64);
    let unicast_mean = mean_of(&|c| c.unicast_keys as f64);
    let mut first = costs
        .first()
        .cloned()
        .ok_or(CostError::Parameters("no trials"))?;
    first.member_decrypts_mean = costs.iter().map(|c| c.member_decrypts_mean).sum::<f64>() / n;
    Ok(BatchCost {
        cost: first,
        leaves,
        joins,
        trials,
        accounting,
        encryptions_mean: mean,
        gkm_encryptions_mean: gkm_mean,
        paper_encryptions_mean: paper_mean,
        unicast_keys_mean: unicast_mean,
        encryptions_stddev: var.sqrt(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_operations_match_the_closed_forms_on_full_trees() {
        for (d, l) in [(2u8, 10u32), (4, 5), (8, 3)] {
            let n = usize::from(d).pow(l);
            let (d_, l_) = (usize::from(d), l as usize);
            let leave = single(n, d, true, Scheme::Group, 1).unwrap();
            assert_eq!(leave.encryptions, d_ * l_ - 1);
            assert_eq!(
                leave.member_decrypts_max, l_,
                "the departed's siblings unwrap L keys"
            );
            assert_eq!(leave.unicast_keys, 0);
            let join = single(n, d, false, Scheme::Group, 1).unwrap();
            // A full tree splits a leaf: L + 1 new keys, one more wrap for the split leaf.
            assert_eq!(join.unicast_keys, l_ + 1);
            let user = single(n, d, true, Scheme::User, 1).unwrap();
            assert_eq!(user.encryptions, (d_ - 1) * l_ * (l_ + 1) / 2);
            let one_way = single(n, d, true, Scheme::OneWay, 1).unwrap();
            assert_eq!(one_way.encryptions, (d_ - 1) * l_);
            assert_eq!(one_way.member_decrypts_max, 1, "one seed, the rest derived");
            let plus = single(n, d, false, Scheme::LkhPlus, 1).unwrap();
            assert!(
                plus.encryptions <= 1,
                "hash-forward: at most the split leaf's wrap"
            );
        }
    }

    #[test]
    fn same_seed_same_numbers() {
        let a = batch(1024, 4, 16, 8, 3, Scheme::Group, 7).unwrap();
        let b = batch(1024, 4, 16, 8, 3, Scheme::Group, 7).unwrap();
        assert_eq!(a, b);
        assert!(a.encryptions_stddev >= 0.0);
    }
}
