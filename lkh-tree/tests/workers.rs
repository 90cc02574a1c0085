//! Sealing on several workers: the same rekeys, byte for byte, as on one.

use lkh_tree::{Batch, GroupId, KeyTree, NodeId, Rekey, Strategy, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

/// A tree with its generator, rekeyed on `workers` threads.
struct Run {
    tree: KeyTree,
    rng: ChaCha20Rng,
    members: Vec<NodeId>,
    workers: usize,
}

impl Run {
    fn new(config: TreeConfig, workers: usize) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(17);
        let tree = KeyTree::new(GroupId(5), config, &mut rng).unwrap();
        let mut run = Run {
            tree,
            rng,
            members: Vec::new(),
            workers,
        };
        run.batch(0, 6000);
        run
    }

    /// `leaves` random leaves (drawn from a generator of their own) and `joins` joins.
    fn batch(&mut self, leaves: usize, joins: usize) -> Rekey {
        let mut pick = ChaCha20Rng::seed_from_u64(self.members.len() as u64);
        let leaves = (0..leaves)
            .map(|_| {
                let i = usize::try_from(pick.next_u64() % self.members.len() as u64).unwrap();
                self.members.swap_remove(i)
            })
            .collect();
        let batch = Batch { leaves, joins };
        let rekey = self
            .tree
            .rekey_with_workers(&batch, &mut self.rng, self.workers)
            .unwrap();
        self.members.extend(rekey.joiners.iter().map(|j| j.leaf));
        rekey
    }
}

fn same(one: &Rekey, other: &Rekey) {
    assert_eq!(one.epoch, other.epoch);
    assert_eq!(one.encryptions, other.encryptions);
    assert_eq!(one.advances, other.advances);
    assert_eq!(one.links, other.links);
    let leaves = |r: &Rekey| r.joiners.iter().map(|j| j.leaf).collect::<Vec<_>>();
    assert_eq!(leaves(one), leaves(other));
}

#[test]
fn several_workers_seal_the_same_wraps_as_one() {
    let configs = [
        TreeConfig::default(),
        TreeConfig {
            strategy: Strategy::User,
            ..TreeConfig::default()
        },
        TreeConfig {
            degree: 2,
            one_way: true,
            hash_forward_joins: true,
            ..TreeConfig::default()
        },
    ];
    for config in configs {
        let mut runs: Vec<Run> = [1, 2, 3, 8].map(|w| Run::new(config, w)).into();
        for (leaves, joins) in [(1500, 1500), (3000, 0), (0, 0), (1, 1)] {
            let rekeys: Vec<Rekey> = runs.iter_mut().map(|r| r.batch(leaves, joins)).collect();
            assert!(rekeys[0].encryptions.len() > 1000 || leaves < 2);
            for other in &rekeys[1..] {
                same(&rekeys[0], other);
            }
        }
        let roots: Vec<_> = runs.iter().map(|r| *r.tree.root_key().as_bytes()).collect();
        assert!(roots.iter().all(|r| r == &roots[0]));
    }
}
