//! The demo run: a group under churn (joins, leaves, evictions, batches, refreshes) with datagram
//! loss, every datagram signed, packed to the MTU, delivered, verified and applied by every
//! member; then the verdict.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use lkh_tree::checker::KeyGraph;
use lkh_tree::{
    Batch, Epoch, GroupId, KeyTree, KeyVersion, NodeId, TrafficKey, TreeConfig, TreeError,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{AuthenticRekey, Codec, DataFrame, HeldPath, WireError, data, pack_signed};

/// Why a demo run stopped before its verdict.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The tree refused a batch or its parameters.
    #[error("key tree: {0}")]
    Tree(#[from] TreeError),
    /// Packing, signing or a member's datagram handling failed.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
}

/// Parameters of a demo run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Members admitted in the first epoch.
    pub members: usize,
    /// Rekeys after the first.
    pub epochs: usize,
    /// Tree degree.
    pub degree: u8,
    /// Per-receiver datagram loss probability, 0.0..1.0.
    pub loss: f64,
    /// Datagram size limit.
    pub mtu: usize,
    /// Seed of every random choice (keys, churn, loss).
    pub seed: u64,
}

/// One epoch's line of progress.
#[derive(Clone, Debug)]
pub struct EpochLine {
    /// The epoch.
    pub epoch: Epoch,
    /// What happened.
    pub change: String,
    /// Members after the rekey.
    pub members: usize,
    /// Encryptions in the rekey.
    pub encryptions: usize,
    /// Datagrams sent.
    pub datagrams: usize,
    /// Bytes multicast.
    pub bytes: usize,
    /// Members that lost their datagram and resynced.
    pub resyncs: usize,
}

/// The outcome of a demo run.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Current members at the end.
    pub members: usize,
    /// Current members whose traffic key differs from the controller's (must be 0).
    pub diverged: usize,
    /// Members that departed (left or were evicted).
    pub departed: usize,
    /// Group messages sent after someone departed, tried by each departed member.
    pub later_messages_tried: usize,
    /// Of those, decrypted by a departed member (must be 0).
    pub later_messages_decrypted: usize,
    /// Rekey datagrams a departed member managed to apply (must be 0).
    pub departed_rekeys_applied: usize,
    /// Current keys the coalition of all departed members reaches in the key graph (must be 0).
    pub coalition_reach: usize,
}

impl Verdict {
    /// Whether every check held.
    pub fn holds(&self) -> bool {
        self.diverged == 0
            && self.later_messages_decrypted == 0
            && self.departed_rekeys_applied == 0
            && self.coalition_reach == 0
            && self.later_messages_tried > 0
    }
}

struct Departed {
    path: HeldPath,
    welcome: Vec<(NodeId, KeyVersion)>,
}

/// The simulated group: controller side and every member.
struct Sim {
    config: DemoConfig,
    rng: ChaCha20Rng,
    signer: SigningKey,
    tree: KeyTree,
    /// Each member's keys (as the controller computed them at its join or last resync).
    members: HashMap<NodeId, HeldPath>,
    welcomes: HashMap<NodeId, Vec<(NodeId, KeyVersion)>>,
    departed: Vec<Departed>,
    graph: KeyGraph,
    verdict: Verdict,
}

/// Runs the demo, calling `progress` after every epoch.
pub fn run(
    config: &DemoConfig,
    mut progress: impl FnMut(&EpochLine),
) -> Result<Verdict, DemoError> {
    let mut sim = Sim::new(config.clone())?;
    let admit = Batch {
        leaves: vec![],
        joins: config.members,
    };
    progress(&sim.step(&admit, "admit".into())?);
    for _ in 0..config.epochs {
        let (batch, change) = sim.next_change();
        progress(&sim.step(&batch, change)?);
    }
    Ok(sim.finish())
}

impl Sim {
    fn new(config: DemoConfig) -> Result<Self, DemoError> {
        let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let signer = SigningKey::from_bytes(&seed);
        let tree_config = TreeConfig {
            degree: config.degree,
            ..TreeConfig::default()
        };
        let tree = KeyTree::new(GroupId(1), tree_config, &mut rng)?;
        Ok(Sim {
            config,
            rng,
            signer,
            tree,
            members: HashMap::new(),
            welcomes: HashMap::new(),
            departed: Vec::new(),
            graph: KeyGraph::new(),
            verdict: Verdict::default(),
        })
    }

    fn pick_members(&mut self, count: usize) -> Vec<NodeId> {
        let mut leaves: Vec<NodeId> = self.members.keys().copied().collect();
        leaves.sort_unstable();
        let mut chosen = Vec::new();
        for _ in 0..count.min(leaves.len()) {
            let i = self.below(leaves.len());
            chosen.push(leaves.swap_remove(i));
        }
        chosen
    }

    /// A uniform draw from 0..n (n ≥ 1).
    fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).unwrap_or(u64::MAX).max(1);
        usize::try_from(self.rng.next_u64() % n64).unwrap_or(0)
    }

    /// A random membership change: leave, eviction, join, batch or refresh.
    fn next_change(&mut self) -> (Batch, String) {
        let n = self.members.len();
        match self.rng.next_u64() % 6 {
            0 => (
                Batch {
                    leaves: self.pick_members(1),
                    joins: 0,
                },
                "leave".into(),
            ),
            1 => (
                Batch {
                    leaves: self.pick_members(1),
                    joins: 0,
                },
                "evict".into(),
            ),
            2 => (
                Batch {
                    leaves: vec![],
                    joins: 1,
                },
                "join".into(),
            ),
            3 => (Batch::default(), "refresh".into()),
            _ => {
                let leaves = 1 + self.below((n / 10).max(1));
                let joins = self.below((n / 10).max(1));
                let leaves = self.pick_members(leaves);
                let change = format!("batch -{} +{}", leaves.len(), joins);
                (Batch { leaves, joins }, change)
            }
        }
    }

    fn step(&mut self, batch: &Batch, change: String) -> Result<EpochLine, DemoError> {
        for leaf in &batch.leaves {
            if let Some(path) = self.members.remove(leaf) {
                let welcome = self.welcomes.remove(leaf).unwrap_or_default();
                self.departed.push(Departed { path, welcome });
            }
        }
        let rekey = self.tree.rekey(batch, &mut self.rng)?;
        self.graph.add_rekey(&rekey);
        let datagrams = pack_signed(&rekey, &self.tree, self.config.mtu, &self.signer)?;
        // Each receiver verifies what it receives; the signature check is the same for all, so
        // the simulator does it once per datagram.
        let controller = self.signer.verifying_key();
        let authentic = datagrams
            .iter()
            .map(|bytes| AuthenticRekey::verify(bytes, &controller))
            .collect::<Result<Vec<_>, _>>()?;
        let resyncs = self.deliver(&authentic)?;
        for joiner in rekey.joiners {
            let welcome = joiner
                .path
                .keys()
                .iter()
                .map(|k| (k.node, k.version))
                .collect();
            self.welcomes.insert(joiner.leaf, welcome);
            self.members
                .insert(joiner.leaf, HeldPath::trusted(joiner.path));
        }
        self.departed_try(&authentic);
        Ok(EpochLine {
            epoch: rekey.epoch,
            change,
            members: self.members.len(),
            encryptions: rekey.encryptions.len(),
            datagrams: datagrams.len(),
            bytes: datagrams.iter().map(Vec::len).sum(),
            resyncs,
        })
    }

    /// Delivers the datagrams to every current member with loss; a member that received none it
    /// could apply resyncs from the controller. Returns the number of resyncs.
    fn deliver(&mut self, datagrams: &[AuthenticRekey]) -> Result<usize, WireError> {
        let mut resyncs = 0;
        let mut leaves: Vec<NodeId> = self.members.keys().copied().collect();
        leaves.sort_unstable();
        for leaf in leaves {
            let mut applied = false;
            for authentic in datagrams {
                if self.lost() {
                    continue;
                }
                let Some(path) = self.members.get_mut(&leaf) else {
                    continue;
                };
                if let Ok(fresh) = authentic.fresh(path) {
                    match fresh.apply() {
                        Ok(_) => applied = true,
                        Err(WireError::NotForMe) => {}
                        Err(other) => return Err(other),
                    }
                }
            }
            if !applied {
                resyncs += 1;
                if let Some(current) = self.tree.member_path(leaf) {
                    self.members.insert(leaf, HeldPath::trusted(current));
                }
            }
        }
        Ok(resyncs)
    }

    fn lost(&mut self) -> bool {
        let draw = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        draw < self.config.loss
    }

    /// Every departed member tries every datagram and a group message sent under the new key.
    fn departed_try(&mut self, datagrams: &[AuthenticRekey]) {
        if self.departed.is_empty() {
            return;
        }
        let key = self
            .tree
            .root_key()
            .traffic_key(self.tree.group(), self.tree.epoch());
        let frame = data::seal(
            &key,
            self.tree.group(),
            self.tree.epoch(),
            1,
            0,
            b"after you left",
        );
        let frame = DataFrame::decode_exact(&frame.to_bytes()).ok();
        for gone in &mut self.departed {
            for authentic in datagrams {
                let applied = authentic
                    .fresh(&mut gone.path)
                    .is_ok_and(|fresh| fresh.apply().is_ok());
                if applied {
                    self.verdict.departed_rekeys_applied += 1;
                }
            }
            if let Some(frame) = &frame {
                self.verdict.later_messages_tried += 1;
                let stale: Option<TrafficKey> = gone.path.traffic_key();
                if stale.is_some_and(|k| data::open(&k, frame).is_ok()) {
                    self.verdict.later_messages_decrypted += 1;
                }
            }
        }
    }

    fn finish(mut self) -> Verdict {
        let root = self.tree.root_key();
        self.verdict.members = self.members.len();
        self.verdict.diverged = self
            .members
            .values()
            .filter(|p| p.root_key().is_none_or(|k| k.as_bytes() != root.as_bytes()))
            .count();
        self.verdict.departed = self.departed.len();
        let known = self
            .graph
            .reachable(self.departed.iter().flat_map(|d| d.welcome.iter().copied()));
        self.verdict.coalition_reach = self
            .tree
            .nodes()
            .filter_map(|n| self.tree.version(n).map(|v| (n, v)))
            .filter(|instance| known.contains(instance))
            .count();
        self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(seed: u64, loss: f64) -> DemoConfig {
        DemoConfig {
            members: 200,
            epochs: 40,
            degree: 4,
            loss,
            mtu: 1200,
            seed,
        }
    }

    #[test]
    fn demo_verdict_holds_with_and_without_loss() {
        for loss in [0.0, 0.2] {
            let mut lines = 0;
            let verdict = run(&config(5, loss), |_| lines += 1).unwrap();
            assert_eq!(lines, 41);
            assert!(verdict.holds(), "{verdict:?}");
            assert!(verdict.departed > 0);
        }
    }

    #[test]
    fn same_seed_same_run() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        run(&config(9, 0.1), |l| a.push(format!("{l:?}"))).unwrap();
        run(&config(9, 0.1), |l| b.push(format!("{l:?}"))).unwrap();
        assert_eq!(a, b);
    }
}
