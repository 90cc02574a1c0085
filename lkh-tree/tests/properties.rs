//! Property tests: random sequences of joins, leaves, batches and refreshes on trees of up to a few
//! thousand members, checked by members applying every rekey and by the key-graph checker.

use std::collections::{BTreeMap, HashMap, HashSet};

use lkh_tree::checker::{KeyGraph, KeyInstance};
use lkh_tree::{
    Batch, GroupId, KeyTree, KeyVersion, MemberPath, NodeId, PathUpdate, Rekey,
    Strategy as Rekeying, TreeConfig, Wrap, height_bound,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const GROUP: GroupId = GroupId(42);
/// Members whose paths apply every rekey.
const MAX_TRACKED: usize = 48;
/// Departed tracked members that keep trying every later rekey.
const MAX_GHOSTS: usize = 4;

/// A departing member: an index into the current members, or into the tracked ones.
#[derive(Clone, Debug)]
struct Pick {
    index: Index,
    tracked: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Join,
    Leave(Pick),
    Batch { leaves: Vec<Pick>, joins: usize },
    Refresh,
}

#[derive(Clone, Debug)]
struct Scenario {
    config: TreeConfig,
    seed: u64,
    initial: usize,
    ops: Vec<Op>,
}

fn pick() -> impl Strategy<Value = Pick> {
    (any::<Index>(), prop::bool::weighted(0.2)).prop_map(|(index, tracked)| Pick { index, tracked })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Join),
        3 => pick().prop_map(Op::Leave),
        3 => (prop::collection::vec(pick(), 0..50), 0usize..50)
            .prop_map(|(leaves, joins)| Op::Batch { leaves, joins }),
        1 => Just(Op::Refresh),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let strategy = prop_oneof![
        Just(Rekeying::Group),
        Just(Rekeying::Key),
        Just(Rekeying::User)
    ];
    // Small trees too, so that batches of leaves empty them or force rebalancing.
    let initial = prop_oneof![0usize..64, 0usize..2000];
    (
        prop::sample::select(vec![2u8, 3, 4, 8]),
        strategy,
        any::<bool>(),
        any::<u64>(),
        initial,
        prop::collection::vec(op(), 1..15),
    )
        .prop_map(
            |(degree, strategy, hash_forward_joins, seed, initial, ops)| Scenario {
                config: TreeConfig {
                    degree,
                    strategy,
                    // The tree refuses user-oriented rekeying with hash-forward joins.
                    hash_forward_joins: hash_forward_joins && strategy != Rekeying::User,
                    // One-way path updates on half the non-user-oriented runs.
                    one_way: seed & 1 == 1 && strategy != Rekeying::User,
                },
                seed,
                initial,
                ops,
            },
        )
}

/// Which properties a run asserts (the simulation is the same).
#[derive(Clone, Copy, Default)]
struct Checks {
    /// 1: tracked members apply every rekey and agree with the controller.
    members: bool,
    /// 2: departed members, together or alone, reach no current key.
    coalition: bool,
    /// 3: joiners reach no earlier root key.
    joiners: bool,
    /// 4: height within ceil(log_d n) + 1 and the member count.
    height: bool,
    /// 5: departed tracked members cannot apply later rekeys.
    ghosts: bool,
}

/// A member leaving in the current batch.
struct Departure {
    leaf: NodeId,
    welcome: Vec<KeyInstance>,
    path: Option<MemberPath>,
}

fn instances(path: &MemberPath) -> Vec<KeyInstance> {
    path.keys().iter().map(|k| (k.node, k.version)).collect()
}

struct Sim {
    checks: Checks,
    tree: KeyTree,
    rng: ChaCha20Rng,
    graph: KeyGraph,
    /// Current members, and where each sits in `members`.
    members: Vec<NodeId>,
    position: HashMap<NodeId, usize>,
    /// Welcome key instances of every current member.
    welcome: HashMap<NodeId, Vec<KeyInstance>>,
    /// Union of the welcome instances of every departed member.
    departed: HashSet<KeyInstance>,
    /// Union of the welcome instances of the joiners of each epoch.
    joined: BTreeMap<u64, HashSet<KeyInstance>>,
    tracked: BTreeMap<NodeId, MemberPath>,
    ghosts: Vec<MemberPath>,
    count: usize,
}

impl Sim {
    fn new(scenario: &Scenario, checks: Checks) -> Result<Self, TestCaseError> {
        let mut rng = ChaCha20Rng::seed_from_u64(scenario.seed);
        let tree = KeyTree::new(GROUP, scenario.config, &mut rng)
            .map_err(|e| TestCaseError::fail(format!("new tree: {e}")))?;
        Ok(Sim {
            checks,
            tree,
            rng,
            graph: KeyGraph::new(),
            members: Vec::new(),
            position: HashMap::new(),
            welcome: HashMap::new(),
            departed: HashSet::new(),
            joined: BTreeMap::new(),
            tracked: BTreeMap::new(),
            ghosts: Vec::new(),
            count: 0,
        })
    }

    fn run(scenario: &Scenario, checks: Checks) -> Result<(), TestCaseError> {
        let mut sim = Sim::new(scenario, checks)?;
        sim.rekey(scenario.initial, 0, &[])?;
        for op in &scenario.ops {
            sim.step(op)?;
        }
        sim.check_joiners()
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Join => self.rekey(0, 1, &[]),
            Op::Leave(pick) => {
                let departures = self.choose(std::slice::from_ref(pick));
                self.rekey(0, 0, &departures)
            }
            Op::Batch { leaves, joins } => {
                let departures = self.choose(leaves);
                self.rekey(0, *joins, &departures)
            }
            Op::Refresh => self.rekey(0, 0, &[]),
        }
    }

    /// Resolves picks to distinct current members and records their departure.
    fn choose(&mut self, picks: &[Pick]) -> Vec<Departure> {
        let mut departures = Vec::new();
        for pick in picks {
            let leaf = if pick.tracked && !self.tracked.is_empty() {
                let i = pick.index.index(self.tracked.len());
                self.tracked.keys().nth(i).copied()
            } else if !self.members.is_empty() {
                self.members
                    .get(pick.index.index(self.members.len()))
                    .copied()
            } else {
                None
            };
            let Some(leaf) = leaf else { continue };
            let Some(i) = self.position.remove(&leaf) else {
                continue;
            };
            self.members.swap_remove(i);
            if let Some(&moved) = self.members.get(i) {
                self.position.insert(moved, i);
            }
            let welcome = self.welcome.remove(&leaf).unwrap_or_default();
            self.departed.extend(welcome.iter().copied());
            departures.push(Departure {
                leaf,
                welcome,
                path: self.tracked.remove(&leaf),
            });
        }
        departures
    }

    /// Runs one rekey (`initial` joins of the bulk, or `joins` with `departures`) and checks it.
    fn rekey(
        &mut self,
        initial: usize,
        joins: usize,
        departures: &[Departure],
    ) -> Result<(), TestCaseError> {
        let before = self.tree.epoch();
        let leaves: Vec<NodeId> = departures.iter().map(|d| d.leaf).collect();
        let result = match (leaves.as_slice(), joins, initial) {
            ([], 0, 0) => self.tree.refresh(&mut self.rng),
            ([], 1, 0) => self.tree.join(&mut self.rng),
            (&[leaf], 0, 0) => self.tree.leave(leaf, &mut self.rng),
            ([], 0, n) => self.tree.rekey(
                &Batch {
                    leaves: Vec::new(),
                    joins: n,
                },
                &mut self.rng,
            ),
            _ => self.tree.rekey(
                &Batch {
                    leaves: leaves.clone(),
                    joins,
                },
                &mut self.rng,
            ),
        };
        let rekey = result.map_err(|e| TestCaseError::fail(format!("rekey refused: {e}")))?;
        let joins = joins + initial;
        prop_assert!(rekey.epoch > before && rekey.epoch == self.tree.epoch());
        prop_assert_eq!(&rekey.departed, &leaves);
        prop_assert_eq!(rekey.joiners.len(), joins);
        self.count = self.count + joins - leaves.len();
        self.graph.add_rekey(&rekey);

        let wraps: Vec<Wrap> = rekey
            .encryptions
            .iter()
            .map(|e| Wrap::from_encryption(e, rekey.epoch))
            .collect();
        let advances: Vec<NodeId> = rekey.advances.iter().map(|a| a.node).collect();
        let update = PathUpdate {
            epoch: rekey.epoch,
            wraps: &wraps,
            advances: &advances,
            links: &rekey.links,
            seeds: rekey.seeds,
            salt: rekey.salt,
            kcv: rekey.kcv,
        };

        self.check_members(&rekey, &update)?;
        let departing = departures.iter().filter_map(|d| d.path.clone()).collect();
        self.check_ghosts(&update, departing)?;
        self.admit(&rekey)?;
        self.check_height()?;
        self.check_coalition(departures)
    }

    /// Property 1: every tracked member applies the rekey, holds the controller's root key, its
    /// traffic key's check value and its path.
    fn check_members(
        &mut self,
        rekey: &Rekey,
        update: &PathUpdate<'_>,
    ) -> Result<(), TestCaseError> {
        let root = self.tree.root_key();
        let kcv = root.traffic_key(GROUP, rekey.epoch).check_value();
        for (&leaf, path) in &mut self.tracked {
            let applied = path.apply(update);
            if !self.checks.members {
                continue;
            }
            let applied = match applied {
                Ok(applied) => applied,
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "member {leaf} refused the rekey of epoch {}: {e}",
                        rekey.epoch
                    )));
                }
            };
            prop_assert_eq!(applied.epoch, rekey.epoch);
            prop_assert!(
                path.root_key()
                    .is_some_and(|k| k.as_bytes() == root.as_bytes()),
                "member {} holds a root key other than the controller's at epoch {}",
                leaf,
                rekey.epoch
            );
            prop_assert_eq!(
                applied.kcv,
                kcv,
                "traffic key check value of member {}",
                leaf
            );
            prop_assert_eq!(path.leaf(), leaf);
            let expected = self.tree.member_path(leaf).map(|p| instances(&p));
            prop_assert_eq!(
                Some(instances(path)),
                expected,
                "member {}'s path differs from the controller's at epoch {}",
                leaf,
                rekey.epoch
            );
        }
        Ok(())
    }

    /// Property 5: a departed tracked member cannot apply the rekey of its departure, nor any
    /// later one, while the group has members.
    fn check_ghosts(
        &mut self,
        update: &PathUpdate<'_>,
        mut departing: Vec<MemberPath>,
    ) -> Result<(), TestCaseError> {
        let nonempty = !self.tree.is_empty();
        let root = self.tree.root_key();
        for ghost in self.ghosts.iter_mut().chain(departing.iter_mut()) {
            let held = ghost.epoch();
            let result = ghost.apply(update);
            if self.checks.ghosts && nonempty {
                prop_assert!(
                    result.is_err(),
                    "departed member {} (path of epoch {}) applied the rekey of epoch {}; \
                     its root key equals the controller's: {}",
                    ghost.leaf(),
                    held,
                    update.epoch,
                    ghost
                        .root_key()
                        .is_some_and(|k| k.as_bytes() == root.as_bytes())
                );
            }
        }
        for path in departing {
            if self.ghosts.len() < MAX_GHOSTS {
                self.ghosts.push(path);
            }
        }
        Ok(())
    }

    /// Records the joiners: welcome instances, membership, and some to track.
    fn admit(&mut self, rekey: &Rekey) -> Result<(), TestCaseError> {
        let root = self.tree.root_key();
        let stride = (rekey.joiners.len() / 24).max(1);
        for (i, joiner) in rekey.joiners.iter().enumerate() {
            let leaf = joiner.leaf;
            prop_assert!(
                !self.position.contains_key(&leaf),
                "joiner {} is already a member",
                leaf
            );
            prop_assert_eq!(joiner.path.leaf(), leaf);
            prop_assert_eq!(joiner.path.epoch(), rekey.epoch);
            if self.checks.members {
                prop_assert!(
                    joiner
                        .path
                        .root_key()
                        .is_some_and(|k| k.as_bytes() == root.as_bytes()),
                    "joiner {} received a root key other than the controller's",
                    leaf
                );
            }
            let welcome = instances(&joiner.path);
            self.joined
                .entry(rekey.epoch.0)
                .or_default()
                .extend(welcome.iter().copied());
            self.welcome.insert(leaf, welcome);
            self.position.insert(leaf, self.members.len());
            self.members.push(leaf);
            if self.tracked.len() < MAX_TRACKED && i % stride == 0 {
                self.tracked.insert(leaf, joiner.path.clone());
            }
        }
        Ok(())
    }

    /// Property 4: the height bound and the member count.
    fn check_height(&self) -> Result<(), TestCaseError> {
        if !self.checks.height {
            return Ok(());
        }
        let degree = self.tree.config().degree;
        prop_assert_eq!(self.tree.len(), self.count);
        prop_assert_eq!(self.tree.members().count(), self.count);
        prop_assert!(
            self.tree.height() <= height_bound(self.tree.len(), degree),
            "height {} exceeds ceil(log_{} {}) + 1 = {} at epoch {}",
            self.tree.height(),
            degree,
            self.tree.len(),
            height_bound(self.tree.len(), degree),
            self.tree.epoch()
        );
        Ok(())
    }

    fn current_instances(&self) -> Vec<KeyInstance> {
        self.tree
            .nodes()
            .filter_map(|n| self.tree.version(n).map(|v| (n, v)))
            .collect()
    }

    /// Property 2: all departed members together reach no current key; nor does any member that
    /// departed in this rekey alone.
    fn check_coalition(&self, departures: &[Departure]) -> Result<(), TestCaseError> {
        if !self.checks.coalition || self.departed.is_empty() {
            return Ok(());
        }
        let current = self.current_instances();
        let known = self.graph.reachable(self.departed.iter().copied());
        for instance in &current {
            prop_assert!(
                !known.contains(instance),
                "the departed members reach the current key {:?} at epoch {}",
                instance,
                self.tree.epoch()
            );
        }
        for departure in departures {
            let known = self.graph.reachable(departure.welcome.iter().copied());
            for instance in &current {
                prop_assert!(
                    !known.contains(instance),
                    "departed member {} alone reaches the current key {:?} at epoch {}",
                    departure.leaf,
                    instance,
                    self.tree.epoch()
                );
            }
        }
        Ok(())
    }

    /// Property 3: no joiner reaches a root key older than its join. Reachability only grows as
    /// rekeys are added, so checking once over the whole graph covers every earlier moment; and
    /// a union reaches an instance exactly when one of its members does.
    fn check_joiners(&self) -> Result<(), TestCaseError> {
        if !self.checks.joiners {
            return Ok(());
        }
        for (&epoch, welcome) in &self.joined {
            let known = self.graph.reachable(welcome.iter().copied());
            let earlier = known
                .iter()
                .filter(|&&(node, version)| node == NodeId::ROOT && version < KeyVersion(epoch))
                .min();
            prop_assert!(
                earlier.is_none(),
                "a joiner of epoch {} reaches the earlier root key {:?}",
                epoch,
                earlier
            );
        }
        Ok(())
    }
}

/// 24 cases (PROPTEST_CASES overrides, for a longer run).
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    ProptestConfig {
        cases,
        max_shrink_iters: 512,
        max_shrink_time: 60_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn every_member_derives_the_same_root_key(scenario in scenario()) {
        Sim::run(&scenario, Checks { members: true, ..Checks::default() })?;
    }

    #[test]
    fn no_departed_coalition_reaches_a_current_key(scenario in scenario()) {
        Sim::run(&scenario, Checks { coalition: true, ..Checks::default() })?;
    }

    #[test]
    fn joiners_reach_no_earlier_root(scenario in scenario()) {
        Sim::run(&scenario, Checks { joiners: true, ..Checks::default() })?;
    }

    #[test]
    fn height_stays_within_one_of_ceil_log_d_n(scenario in scenario()) {
        Sim::run(&scenario, Checks { height: true, ..Checks::default() })?;
    }

    #[test]
    fn departed_members_cannot_apply_later_rekeys(scenario in scenario()) {
        Sim::run(&scenario, Checks { ghosts: true, ..Checks::default() })?;
    }
}

/// Applies `rekey` to every path and checks root key and path against the controller.
fn apply_all(paths: &mut [MemberPath], rekey: &Rekey, tree: &KeyTree) {
    let wraps: Vec<Wrap> = rekey
        .encryptions
        .iter()
        .map(|e| Wrap::from_encryption(e, rekey.epoch))
        .collect();
    let advances: Vec<NodeId> = rekey.advances.iter().map(|a| a.node).collect();
    let update = PathUpdate {
        epoch: rekey.epoch,
        wraps: &wraps,
        advances: &advances,
        links: &rekey.links,
        seeds: rekey.seeds,
        salt: rekey.salt,
        kcv: rekey.kcv,
    };
    for path in paths.iter_mut() {
        let leaf = path.leaf();
        if let Err(e) = path.apply(&update) {
            panic!(
                "member {leaf} refused the rekey of epoch {}: {e}",
                rekey.epoch
            );
        }
        assert_eq!(
            path.root_key().map(|k| *k.as_bytes()),
            Some(*tree.root_key().as_bytes())
        );
        assert_eq!(
            Some(instances(path)),
            tree.member_path(leaf).map(|p| instances(&p)),
            "member {leaf}'s path differs from the controller's at epoch {}",
            rekey.epoch
        );
    }
}

/// Found by `every_member_derives_the_same_root_key`: user-oriented rekeying lists a subgroup's
/// new ancestor keys as the chain of its path, and hash-forward keys would leave gaps in that
/// chain (a member then dropped an advanced node from its path). The combination is refused.
#[test]
fn user_oriented_rekeying_with_hash_forward_joins_is_refused() {
    let config = TreeConfig {
        degree: 2,
        strategy: Rekeying::User,
        hash_forward_joins: true,
        one_way: false,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    assert!(matches!(
        KeyTree::new(GROUP, config, &mut rng),
        Err(lkh_tree::TreeError::UserWithHashForward)
    ));
}

/// Shrunk from `departed_members_cannot_apply_later_rekeys`: with hash-forward joins, a join into
/// the slot a member just left is only advances; the departed member's apply of it succeeds (with
/// keys hashed forward from its stale ones, not the controller's).
#[test]
fn departed_member_cannot_apply_a_hash_forward_join() {
    let config = TreeConfig {
        degree: 2,
        strategy: Rekeying::Group,
        hash_forward_joins: true,
        one_way: false,
    };
    let mut rng = ChaCha20Rng::seed_from_u64(0);
    let mut tree = KeyTree::new(GROUP, config, &mut rng).expect("tree");
    let bulk = tree
        .rekey(
            &Batch {
                leaves: Vec::new(),
                joins: 4,
            },
            &mut rng,
        )
        .expect("bulk");
    let mut paths: Vec<MemberPath> = bulk.joiners.into_iter().map(|j| j.path).collect();
    let mut gone = paths.remove(0);
    for step in ["leave", "join"] {
        let rekey = if step == "leave" {
            tree.leave(gone.leaf(), &mut rng).expect("leave")
        } else {
            tree.join(&mut rng).expect("join")
        };
        let wraps: Vec<Wrap> = rekey
            .encryptions
            .iter()
            .map(|e| Wrap::from_encryption(e, rekey.epoch))
            .collect();
        let advances: Vec<NodeId> = rekey.advances.iter().map(|a| a.node).collect();
        let update = PathUpdate {
            epoch: rekey.epoch,
            wraps: &wraps,
            advances: &advances,
            links: &rekey.links,
            seeds: rekey.seeds,
            salt: rekey.salt,
            kcv: rekey.kcv,
        };
        assert!(
            gone.apply(&update).is_err(),
            "the departed member applied the {step} rekey of epoch {}",
            rekey.epoch
        );
        apply_all(&mut paths, &rekey, &tree);
    }
}
