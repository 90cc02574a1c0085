//! The key tree and its rekeys: joins, leaves, batches (the marking algorithm of Li, Yang, Gouda
//! and Lam) and refreshes, under group-, key- or user-oriented rekeying, with optional LKH+
//! hash-forward joins.
//!
//! Marking. Every batch marks the nodes whose key must change: the ancestors of each departed
//! leaf and of each leaf moved away are marked *full* (their new key must reach every remaining
//! child, so it is wrapped under each child's key); the ancestors of each joiner are marked
//! *join-only* unless already full (existing members below hold the old key, so the new key is
//! wrapped once, under the old key, or, with hash-forward joins, derived as KDF(old key) with no
//! wrap at all). A node created by a split is *new* (wrapped under its existing child). The root
//! is always marked, so every rekey changes the traffic key. Shared path nodes are rekeyed once.
//!
//! Strategies (Wong, Gouda, Lam 1998) decide which wraps are made:
//! - group-oriented: each new key under each child's current key (new if the child changed); one
//!   message for the group. For one leave: d·L − 1 encryptions.
//! - key-oriented: the same wraps as group-oriented; the packer and netsim count one message per
//!   new key instead of one for the group.
//! - user-oriented: each subgroup that kept its key gets every new key it needs, each wrapped
//!   directly under that one key: more encryptions, one message per subgroup.

use rustc_hash::FxHashMap as HashMap;

use rand_core::CryptoRng;
use thiserror::Error;

use crate::ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt, SALT_LEN};
use crate::member::{Link, MemberPath, PathKey, PathUpdate, Wrap};
use crate::secret::{Kcv, NodeKey};
use crate::tree::{Kind, MAX_DEPTH, NIL, Record, Shape};
use crate::wrap::{Encryption, WrapContext};

/// Which wraps a rekey makes (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// One message for the whole group; each new key wrapped under each child's current key.
    #[default]
    Group,
    /// The group-oriented wraps, one message per new key.
    Key,
    /// One message per subgroup, holding every new key that subgroup needs.
    User,
}

/// A tree's fixed parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeConfig {
    /// Children per internal node, 2 ≤ d ≤ 64.
    pub degree: u8,
    /// Which wraps a rekey makes.
    pub strategy: Strategy,
    /// LKH+: join-only path keys become KDF(old key) instead of fresh keys wrapped in multicast.
    pub hash_forward_joins: bool,
    /// One-way path update on leave (Canetti et al. 1999): wraps carry seeds; a renewed node with
    /// exactly one renewed child takes the seed `one_way_next(child seed)`, so the members below
    /// that child derive it and it is wrapped only for the other children. A leave then costs
    /// (d − 1)·L encryptions instead of d·L − 1 (L = log2 n at d = 2).
    pub one_way: bool,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig {
            degree: 4,
            strategy: Strategy::Group,
            hash_forward_joins: false,
            one_way: false,
        }
    }
}

/// The membership changes of one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Leaves of departing members (each a current member leaf, no repeats).
    pub leaves: Vec<NodeId>,
    /// How many members join.
    pub joins: usize,
}

/// A key advanced by hash-forward: the new key is `old.hash_forward(node, epoch version)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance {
    /// The node whose key advanced.
    pub node: NodeId,
    /// The version it advanced from.
    pub from: KeyVersion,
}

/// What a joiner receives by unicast: its leaf and every key on its path.
#[derive(Debug)]
pub struct JoinerKeys {
    /// The joiner's leaf, which names it in the tree from now on.
    pub leaf: NodeId,
    /// Its keys, leaf to root, all at the rekey's epoch.
    pub path: MemberPath,
}

/// The result of one rekey, as a value: everything to send, nothing yet sent.
#[derive(Debug)]
pub struct Rekey {
    /// The group.
    pub group: GroupId,
    /// The new epoch; every key this rekey sets has this as its version.
    pub epoch: Epoch,
    /// The multicast encryptions, deepest targets first.
    pub encryptions: Vec<Encryption>,
    /// Keys advanced by hash-forward (members derive them; nothing is encrypted).
    pub advances: Vec<Advance>,
    /// One-way chain links: the parent's seed is `one_way_next(child's seed)`.
    pub links: Vec<Link>,
    /// Whether the wraps carry seeds (one-way path update) rather than keys.
    pub seeds: bool,
    /// This rekey's salt: fresh randomness in every wrap pad (carried in the datagrams).
    pub salt: RekeySalt,
    /// The check value of the new epoch's traffic key (carried in the datagrams: members use
    /// what they unwrap only if it leads to this).
    pub kcv: Kcv,
    /// One entry per joiner, for unicast.
    pub joiners: Vec<JoinerKeys>,
    /// Departed leaves, as given.
    pub departed: Vec<NodeId>,
    /// Members moved by rebalancing (their leaf ids are unchanged; their paths changed).
    pub moved: Vec<NodeId>,
}

/// A rekey as every member sees it (all wraps, advances and links), for tests and simulations
/// that skip the wire.
#[derive(Debug)]
pub struct MemberView {
    epoch: Epoch,
    wraps: Vec<Wrap>,
    advances: Vec<NodeId>,
    links: Vec<Link>,
    seeds: bool,
    salt: RekeySalt,
    kcv: Kcv,
}

impl MemberView {
    /// The update to hand to [`MemberPath::apply`].
    pub fn update(&self) -> PathUpdate<'_> {
        PathUpdate {
            epoch: self.epoch,
            wraps: &self.wraps,
            advances: &self.advances,
            links: &self.links,
            seeds: self.seeds,
            salt: self.salt,
            kcv: self.kcv,
        }
    }
}

impl Rekey {
    /// Everything in this rekey, as a member would receive it.
    pub fn member_view(&self) -> MemberView {
        MemberView {
            epoch: self.epoch,
            wraps: self
                .encryptions
                .iter()
                .map(|e| Wrap::from_encryption(e, self.epoch))
                .collect(),
            advances: self.advances.iter().map(|a| a.node).collect(),
            links: self.links.clone(),
            seeds: self.seeds,
            salt: self.salt,
            kcv: self.kcv,
        }
    }

    /// Unicast path keys handed to joiners (internal nodes only; the leaf key is the joiner's
    /// individual key, delivered with them).
    pub fn unicast_keys(&self) -> usize {
        self.joiners
            .iter()
            .map(|j| j.path.keys().len().saturating_sub(1))
            .sum()
    }
}

/// Why a batch was refused. A refused batch changes nothing.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TreeError {
    /// The degree is outside 2..=64.
    #[error("tree degree {0} is outside 2..=64")]
    BadDegree(u8),
    /// A departing node is not a member leaf of this tree.
    #[error("node {0} is not a member leaf of this tree")]
    NotAMember(NodeId),
    /// A departing leaf is listed twice.
    #[error("node {0} is listed twice in one batch")]
    DuplicateLeave(NodeId),
    /// The tree would exceed its node id space.
    #[error("the tree cannot hold {0} more members")]
    Full(usize),
    /// User-oriented rekeying lists each subgroup's new ancestor keys as the chain of its path;
    /// keys derived by the members (hash-forward or one-way) would leave gaps in that chain, so
    /// they are not combined.
    #[error("user-oriented rekeying cannot be combined with hash-forward joins or one-way updates")]
    UserWithHashForward,
    /// A snapshot does not describe a valid tree.
    #[error("the tree snapshot is not a valid tree")]
    BadSnapshot,
    /// The epoch counter is exhausted.
    #[error("the epoch counter is exhausted")]
    EpochExhausted,
}

const MARK_FULL: u8 = 1;
const MARK_NEW: u8 = 2;
const MARK_JOIN: u8 = 4;
const MARK_REFRESH: u8 = 8;

/// A group's key tree: the controller's view (every key).
///
/// Call order: [`KeyTree::new`], then any sequence of [`KeyTree::rekey`] (or
/// [`KeyTree::rekey_with_workers`], or the shorthands [`KeyTree::join`], [`KeyTree::leave`],
/// [`KeyTree::refresh`]); each returns a [`Rekey`] to persist and send. The tree changes in
/// memory at once: persist the result before anything encrypted under it leaves the process,
/// and open a stage first ([`KeyTree::stage`]) to be able to undo a rekey whose save failed.
pub struct KeyTree {
    group: GroupId,
    config: TreeConfig,
    epoch: Epoch,
    pub(crate) shape: Shape,
    /// The epoch before the open stage, if one is open.
    staged_from: Option<Epoch>,
}

impl KeyTree {
    /// A tree with no members, at epoch 0, with a random root key.
    pub fn new<R: CryptoRng + ?Sized>(
        group: GroupId,
        config: TreeConfig,
        rng: &mut R,
    ) -> Result<Self, TreeError> {
        if !(2..=64).contains(&config.degree) {
            return Err(TreeError::BadDegree(config.degree));
        }
        if config.strategy == Strategy::User && (config.hash_forward_joins || config.one_way) {
            return Err(TreeError::UserWithHashForward);
        }
        Ok(KeyTree {
            group,
            config,
            epoch: Epoch(0),
            shape: Shape::new(config.degree, &NodeKey::random(rng)),
            staged_from: None,
        })
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The parameters.
    pub fn config(&self) -> TreeConfig {
        self.config
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Moves the epoch forward to `epoch` without changing a key, so that the next rekey is
    /// numbered above it; never moves it back. For a reset of a group restored from an older
    /// copy of its state: no epoch number that already went out under other keys is used again.
    pub fn skip_epoch_to(&mut self, epoch: Epoch) {
        self.epoch = self.epoch.max(epoch);
    }

    /// Current members.
    pub fn len(&self) -> usize {
        self.shape.members
    }

    /// Whether the group has no members.
    pub fn is_empty(&self) -> bool {
        self.shape.members == 0
    }

    /// Depth of the deepest member leaf (the root is at depth 0).
    pub fn height(&self) -> usize {
        self.shape.height()
    }

    /// Whether `leaf` is a current member leaf.
    pub fn is_member(&self, leaf: NodeId) -> bool {
        self.shape.is_leaf(leaf)
    }

    /// Bytes the tree holds in memory (arena, buckets), for memory reports.
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>() + self.shape.nodes.bytes() + self.shape.bucket_bytes()
    }

    /// The current root key.
    pub fn root_key(&self) -> NodeKey {
        self.shape.nodes.node(NodeId::ROOT.0).node_key()
    }

    /// The current keys of `leaf`'s path (leaf to root), e.g. to resync a member.
    pub fn member_path(&self, leaf: NodeId) -> Option<MemberPath> {
        self.shape.is_leaf(leaf).then(|| self.path_of(leaf.0))
    }

    /// Current member leaves, in no particular order.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.shape.nodes.len())
            .filter(|&id| self.shape.nodes.node(id).kind == Kind::Leaf)
            .map(NodeId)
    }

    /// One join.
    pub fn join<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) -> Result<Rekey, TreeError> {
        self.rekey(
            &Batch {
                leaves: Vec::new(),
                joins: 1,
            },
            rng,
        )
    }

    /// One leave.
    pub fn leave<R: CryptoRng + ?Sized>(
        &mut self,
        leaf: NodeId,
        rng: &mut R,
    ) -> Result<Rekey, TreeError> {
        self.rekey(
            &Batch {
                leaves: vec![leaf],
                joins: 0,
            },
            rng,
        )
    }

    /// A new root key (and so a new traffic key) with no membership change.
    pub fn refresh<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) -> Result<Rekey, TreeError> {
        self.rekey(&Batch::default(), rng)
    }

    /// Processes a batch of leaves and joins as one rekey (the marking algorithm).
    pub fn rekey<R: CryptoRng + ?Sized>(
        &mut self,
        batch: &Batch,
        rng: &mut R,
    ) -> Result<Rekey, TreeError> {
        self.rekey_with_workers(batch, rng, 1)
    }

    /// As [`KeyTree::rekey`], with the wraps sealed on up to `workers` threads. The result is the
    /// same for any number of workers: every random draw is made first, in order, on the calling
    /// thread; only the encryption is split, by runs of renewed nodes, and the runs are joined
    /// in order.
    pub fn rekey_with_workers<R: CryptoRng + ?Sized>(
        &mut self,
        batch: &Batch,
        rng: &mut R,
        workers: usize,
    ) -> Result<Rekey, TreeError> {
        self.check(batch)?;
        let epoch = self.epoch.next().ok_or(TreeError::EpochExhausted)?;
        let mut marks = Marks::default();
        for leaf in &batch.leaves {
            let low = self.shape.remove_leaf(leaf.0);
            marks.mark(&self.shape, low, MARK_FULL);
        }
        let mut joined = Vec::with_capacity(batch.joins);
        for _ in 0..batch.joins {
            let (leaf, split) = self.shape.insert_leaf(self.shape.join_position());
            self.shape
                .set_key(leaf, &NodeKey::random(rng), epoch.version());
            if let Some(split) = split {
                marks.flag(split, MARK_NEW);
            }
            marks.mark(&self.shape, self.shape.nodes.node(leaf).parent, MARK_JOIN);
            joined.push(leaf);
        }
        let moved = self.rebalance(&mut marks);
        // A refresh (or a batch that touched nothing) still renews the root, at random.
        marks.flags.entry(NodeId::ROOT.0).or_insert(MARK_REFRESH);
        let order = marks.bottom_up(&self.shape);
        let (renewed, advances, links) = self.renew_keys(&order, epoch, rng);
        // Drawn after the keys, so that a seeded run's keys do not depend on it.
        let mut salt = RekeySalt([0; SALT_LEN]);
        rng.fill_bytes(&mut salt.0);
        let encryptions = self.wraps(&order, &renewed, epoch, salt, workers);
        self.shape.end_batch();
        self.epoch = epoch;
        let joiners = joined
            .into_iter()
            .map(|leaf| JoinerKeys {
                leaf: NodeId(leaf),
                path: self.path_of(leaf),
            })
            .collect();
        let kcv = self.root_key().traffic_key(self.group, epoch).check_value();
        Ok(Rekey {
            group: self.group,
            epoch,
            encryptions,
            advances,
            links,
            seeds: self.config.one_way,
            salt,
            kcv,
            joiners,
            departed: batch.leaves.clone(),
            moved,
        })
    }

    fn check(&self, batch: &Batch) -> Result<(), TreeError> {
        let mut seen = std::collections::HashSet::with_capacity(batch.leaves.len());
        for &leaf in &batch.leaves {
            if !self.shape.is_leaf(leaf) {
                return Err(TreeError::NotAMember(leaf));
            }
            if !seen.insert(leaf) {
                return Err(TreeError::DuplicateLeave(leaf));
            }
        }
        // A join allocates at most two nodes (leaf and split node).
        let needed = (batch.joins as u64).saturating_mul(2);
        if needed > self.shape.spare_ids() {
            return Err(TreeError::Full(batch.joins));
        }
        Ok(())
    }

    /// Moves the deepest members up while the height exceeds ceil(log_d n) + 1.
    fn rebalance(&mut self, marks: &mut Marks) -> Vec<NodeId> {
        let mut moved = Vec::new();
        let bound = height_bound(self.shape.members, self.config.degree);
        while self.shape.height() > bound {
            let Some(leaf) = self.shape.deepest_leaf() else {
                break;
            };
            let low = self.shape.take_leaf(leaf);
            marks.mark(&self.shape, low, MARK_FULL);
            let position = self.shape.shallowest_position();
            if let Some(split) = self.shape.place(leaf, position) {
                marks.flag(split, MARK_NEW);
            }
            marks.mark(&self.shape, self.shape.nodes.node(leaf).parent, MARK_FULL);
            moved.push(NodeId(leaf));
        }
        moved
    }

    /// Sets the new key of every marked node, deepest first. Returns the renewed (random or
    /// one-way) nodes with their old keys, the hash-forward advances and the one-way links.
    fn renew_keys<R: CryptoRng + ?Sized>(
        &mut self,
        order: &[(u32, u8)],
        epoch: Epoch,
        rng: &mut R,
    ) -> (HashMap<u32, Renewed>, Vec<Advance>, Vec<Link>) {
        let mut renewed: HashMap<u32, Renewed> =
            HashMap::with_capacity_and_hasher(order.len(), Default::default());
        let mut advances = Vec::new();
        let mut links = Vec::new();
        for &(id, flags) in order {
            let node = self.shape.nodes.node(id);
            let old = node.node_key();
            let from = KeyVersion(node.version);
            let join_only = flags & (MARK_FULL | MARK_NEW | MARK_REFRESH) == 0;
            if self.config.hash_forward_joins && join_only {
                advances.push(Advance {
                    node: NodeId(id),
                    from,
                });
                let key = old.hash_forward(NodeId(id), epoch.version());
                self.shape.set_key(id, &key, epoch.version());
                continue;
            }
            let chain = self.chain_child(id, flags, &renewed);
            let secret = match chain {
                Some(child) => {
                    links.push(Link {
                        child: NodeId(child),
                        parent: NodeId(id),
                    });
                    renewed[&child].secret.one_way_next(NodeId(id))
                }
                None => NodeKey::random(rng),
            };
            let key = if self.config.one_way {
                secret.one_way_key(NodeId(id))
            } else {
                secret.clone()
            };
            self.shape.set_key(id, &key, epoch.version());
            renewed.insert(
                id,
                Renewed {
                    old,
                    from,
                    flags,
                    secret,
                    chain,
                },
            );
        }
        (renewed, advances, links)
    }

    /// With one-way updates, the one renewed child a full node's seed is derived from.
    fn chain_child(&self, id: u32, flags: u8, renewed: &HashMap<u32, Renewed>) -> Option<u32> {
        if !self.config.one_way || flags & MARK_FULL == 0 || flags & MARK_NEW != 0 {
            return None;
        }
        let mut changed = self.shape.children(id).filter(|c| renewed.contains_key(c));
        match (changed.next(), changed.next()) {
            (Some(child), None) => Some(child),
            _ => None,
        }
    }

    /// The encryptions for every renewed node, in `order`, sealed on up to `workers` threads.
    fn wraps(
        &self,
        order: &[(u32, u8)],
        renewed: &HashMap<u32, Renewed>,
        epoch: Epoch,
        salt: RekeySalt,
        workers: usize,
    ) -> Vec<Encryption> {
        // A wrap takes about half a microsecond and a thread some tens: a thread gets at least
        // 512 renewed nodes (about 2,000 wraps at degree 4).
        let chunk = order.len().div_ceil(workers.max(1)).max(512);
        let mut parts = order.chunks(chunk);
        let Some(first) = parts.next() else {
            return Vec::new();
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = parts
                .map(|part| {
                    let sealing = scope.spawn(move || self.wraps_of(part, renewed, epoch, salt));
                    (part, sealing)
                })
                .collect();
            let mut out = self.wraps_of(first, renewed, epoch, salt);
            for (part, sealing) in others {
                // A worker that failed has its run redone here.
                let sealed = sealing
                    .join()
                    .unwrap_or_else(|_| self.wraps_of(part, renewed, epoch, salt));
                out.extend(sealed);
            }
            out
        })
    }

    /// The encryptions for the renewed nodes of `order`, by strategy.
    fn wraps_of(
        &self,
        order: &[(u32, u8)],
        renewed: &HashMap<u32, Renewed>,
        epoch: Epoch,
        salt: RekeySalt,
    ) -> Vec<Encryption> {
        let mut out = Vec::new();
        for &(id, _) in order {
            let Some(info) = renewed.get(&id) else {
                continue;
            };
            let holders = self.holders(id, info, renewed, epoch);
            match self.config.strategy {
                Strategy::Group | Strategy::Key => {
                    for (holder, version, key) in &holders {
                        out.push(self.seal(
                            (epoch, salt),
                            id,
                            &info.secret,
                            *holder,
                            *version,
                            key,
                        ));
                    }
                }
                Strategy::User => {
                    for (holder, version, key) in &holders {
                        let mut target = id;
                        while target != NIL {
                            if let Some(t) = renewed.get(&target) {
                                out.push(self.seal(
                                    (epoch, salt),
                                    target,
                                    &t.secret,
                                    *holder,
                                    *version,
                                    key,
                                ));
                            }
                            target = self.shape.nodes.node(target).parent;
                        }
                    }
                }
            }
        }
        out
    }

    /// The keys a renewed node's new key is wrapped under.
    fn holders(
        &self,
        id: u32,
        info: &Renewed,
        renewed: &HashMap<u32, Renewed>,
        epoch: Epoch,
    ) -> Vec<(u32, KeyVersion, NodeKey)> {
        let nodes = &self.shape.nodes;
        let user = self.config.strategy == Strategy::User;
        if info.flags & (MARK_FULL | MARK_NEW) == 0 {
            return vec![(id, info.from, info.old.clone())];
        }
        self.shape
            .children(id)
            .filter(|&c| {
                let child = nodes.node(c);
                let fresh_joiner = child.kind == Kind::Leaf && child.version == epoch.0;
                let derives = info.chain == Some(c);
                !(fresh_joiner || derives || (user && renewed.contains_key(&c)))
            })
            .map(|c| {
                let child = nodes.node(c);
                (c, KeyVersion(child.version), child.node_key())
            })
            .collect()
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one wrap is bound to all of these"
    )]
    fn seal(
        &self,
        (epoch, salt): (Epoch, RekeySalt),
        target: u32,
        secret: &NodeKey,
        wrapping: u32,
        wrapping_version: KeyVersion,
        wrapping_key: &NodeKey,
    ) -> Encryption {
        let context = WrapContext {
            group: self.group,
            epoch,
            target: NodeId(target),
            wrapping: NodeId(wrapping),
            wrapping_version,
            salt,
        };
        context.seal(wrapping_key, secret)
    }

    fn path_of(&self, leaf: u32) -> MemberPath {
        let mut keys = Vec::new();
        let mut id = leaf;
        while id != NIL {
            let node = self.shape.nodes.node(id);
            keys.push(PathKey {
                node: NodeId(id),
                version: KeyVersion(node.version),
                key: node.node_key(),
            });
            id = node.parent;
        }
        MemberPath::new(self.group, self.epoch, keys)
    }

    /// The parent of a node, if it has one (for pictures and checks).
    pub fn parent(&self, node: NodeId) -> Option<NodeId> {
        let parent = self.shape.nodes.get(node.0)?.parent;
        (parent != NIL).then_some(NodeId(parent))
    }

    /// The children of an internal node (empty for a leaf or an unknown id).
    pub fn children(&self, node: NodeId) -> Vec<NodeId> {
        self.iter_children(node).collect()
    }

    /// The children of an internal node, in the order of [`KeyTree::children`], without
    /// allocating (none for a leaf or an unknown id).
    pub fn iter_children(&self, node: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let internal = self
            .shape
            .nodes
            .get(node.0)
            .is_some_and(|n| n.kind == Kind::Internal);
        self.shape
            .children(if internal { node.0 } else { NIL })
            .map(NodeId)
    }

    /// The version of a node's current key.
    pub fn version(&self, node: NodeId) -> Option<KeyVersion> {
        let n = self.shape.nodes.get(node.0)?;
        (n.kind != Kind::Free).then_some(KeyVersion(n.version))
    }

    /// The current key of a node (for the key-graph checker and tests).
    pub fn node_key(&self, node: NodeId) -> Option<NodeKey> {
        let n = self.shape.nodes.get(node.0)?;
        (n.kind != Kind::Free).then(|| n.node_key())
    }

    /// Every live node id.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.shape.nodes.len())
            .filter(|&id| self.shape.nodes.node(id).kind != Kind::Free)
            .map(NodeId)
    }
}

/// One node of a [`TreeSnapshot`].
#[derive(Clone, Debug)]
pub struct NodeRecord {
    /// The node.
    pub id: NodeId,
    /// Its parent (`None` for the root).
    pub parent: Option<NodeId>,
    /// Whether it is a member leaf.
    pub leaf: bool,
    /// Its key's version.
    pub version: KeyVersion,
    /// Its key.
    pub key: NodeKey,
}

impl NodeRecord {
    /// A node as the tree keeps it, for a snapshot.
    fn from_record((id, parent, kind, version, key): Record) -> Self {
        NodeRecord {
            id: NodeId(id),
            parent: (parent != NIL).then_some(NodeId(parent)),
            leaf: kind == Kind::Leaf,
            version: KeyVersion(version),
            key,
        }
    }
}

/// The nodes that changed since the last [`KeyTree::take_changes`]: what an incremental store
/// writes after a rekey. Holds keys: seal it before it leaves memory.
#[derive(Clone, Debug, Default)]
pub struct TreeChanges {
    /// Live nodes whose parent, kind, key or version changed (new nodes included), by id.
    pub changed: Vec<NodeRecord>,
    /// Nodes that were removed (their ids are free), by id.
    pub removed: Vec<NodeId>,
}

/// Everything needed to rebuild a tree: for persistence. Holds every key: seal it before it
/// leaves memory.
#[derive(Clone, Debug)]
pub struct TreeSnapshot {
    /// The group.
    pub group: GroupId,
    /// The parameters.
    pub config: TreeConfig,
    /// The epoch.
    pub epoch: Epoch,
    /// Live nodes. [`KeyTree::snapshot`] lists parents before children, the root first;
    /// [`KeyTree::restore`] takes them in any order (e.g. by id, as a store keeps them).
    pub nodes: Vec<NodeRecord>,
}

impl KeyTree {
    /// A snapshot of the whole tree.
    pub fn snapshot(&self) -> TreeSnapshot {
        let nodes = self
            .shape
            .records()
            .into_iter()
            .map(NodeRecord::from_record)
            .collect();
        TreeSnapshot {
            group: self.group,
            config: self.config,
            epoch: self.epoch,
            nodes,
        }
    }

    /// Starts recording which nodes change, for [`KeyTree::take_changes`]. Off by default (a
    /// tree that is never drained records nothing); the record holds at most one entry per node.
    pub fn track_changes(&mut self) {
        self.shape.track();
    }

    /// The nodes changed or removed since tracking started or since the last call, and clears
    /// that record. Applied to a snapshot taken at that point (replace or add each changed node,
    /// drop each removed one, set the epoch) it gives the current [`KeyTree::snapshot`], up to
    /// the order of the nodes.
    pub fn take_changes(&mut self) -> TreeChanges {
        let mut out = TreeChanges::default();
        for id in self.shape.take_touched() {
            let n = self.shape.nodes.node(id);
            if n.kind == Kind::Free {
                out.removed.push(NodeId(id));
                continue;
            }
            out.changed.push(NodeRecord {
                id: NodeId(id),
                parent: (n.parent != NIL).then_some(NodeId(n.parent)),
                leaf: n.kind == Kind::Leaf,
                version: KeyVersion(n.version),
                key: n.node_key(),
            });
        }
        out
    }

    /// Rebuilds a tree from a snapshot, checking its structure (see [`TreeError::BadSnapshot`]).
    pub fn restore(snapshot: &TreeSnapshot) -> Result<KeyTree, TreeError> {
        let config = snapshot.config;
        if !(2..=64).contains(&config.degree) {
            return Err(TreeError::BadDegree(config.degree));
        }
        let order = parents_first(&snapshot.nodes).ok_or(TreeError::BadSnapshot)?;
        let records: Vec<_> = order
            .into_iter()
            .filter_map(|i| snapshot.nodes.get(i))
            .map(|r| {
                let kind = if r.leaf { Kind::Leaf } else { Kind::Internal };
                let parent = r.parent.map_or(NIL, |p| p.0);
                (r.id.0, parent, kind, r.version.0, r.key.clone())
            })
            .collect();
        let versions_ok = snapshot
            .nodes
            .iter()
            .all(|r| r.version <= snapshot.epoch.version());
        let shape = Shape::restore(config.degree, &records)
            .filter(|_| versions_ok)
            .ok_or(TreeError::BadSnapshot)?;
        Ok(KeyTree {
            group: snapshot.group,
            config,
            epoch: snapshot.epoch,
            shape,
            staged_from: None,
        })
    }
}

/// Staged rekeys: a rekey that cannot be made durable is undone.
///
/// [`KeyTree::stage`] opens a stage: the tree then keeps, for each node a rekey changes, its
/// value from before (one record per node touched, so the cost follows the rekey, not the tree).
/// [`KeyTree::commit`] drops what was kept once the rekey is saved; [`KeyTree::abort`] puts the
/// tree back exactly as it was when the stage opened (keys, structure, epoch, and the record of
/// changes not yet taken), for a save that failed. An abort rebuilds the tree's indexes, in time
/// linear in its size: it is the rare path.
impl KeyTree {
    /// Opens a stage (an open one is committed first).
    pub fn stage(&mut self) {
        self.commit();
        self.staged_from = Some(self.epoch);
        self.shape.open_stage();
    }

    /// Whether a stage is open.
    pub fn is_staged(&self) -> bool {
        self.staged_from.is_some()
    }

    /// Keeps every change since [`KeyTree::stage`] (nothing if no stage is open).
    pub fn commit(&mut self) {
        self.staged_from = None;
        self.shape.close_stage();
    }

    /// Undoes every change since [`KeyTree::stage`] (nothing if no stage is open). Changes
    /// recorded before the stage and not yet taken are still reported by the next
    /// [`KeyTree::take_changes`]; changes taken during the stage were of the stage, so the
    /// caller's next save after an abort is of the whole tree.
    pub fn abort(&mut self) -> Result<(), TreeError> {
        let stage = self.shape.close_stage();
        let Some(epoch) = self.staged_from.take() else {
            return Ok(());
        };
        let mut by_id: HashMap<u32, Record> = self
            .shape
            .records()
            .into_iter()
            .map(|record| (record.0, record))
            .collect();
        let mut retouch = self.shape.touched_ids()[..stage.touched_before].to_vec();
        for (id, old) in stage.kept {
            match old {
                Some(record) => {
                    by_id.insert(id, record);
                    retouch.push(id);
                }
                None => {
                    by_id.remove(&id);
                }
            };
        }
        let nodes = by_id.into_values().map(NodeRecord::from_record).collect();
        let snapshot = TreeSnapshot {
            group: self.group,
            config: self.config,
            epoch,
            nodes,
        };
        let mut before = KeyTree::restore(&snapshot)?;
        if self.shape.tracking() {
            before.shape.track();
            before.shape.retouch(&retouch);
        }
        *self = before;
        Ok(())
    }
}

/// Indices of `nodes` ordered parents first, from the one root (breadth-first), or `None` when
/// some node is not reachable from it (no root, two roots, an orphan, a cycle, a repeated id).
fn parents_first(nodes: &[NodeRecord]) -> Option<Vec<usize>> {
    let mut roots = nodes.iter().enumerate().filter(|(_, r)| r.parent.is_none());
    let (root, None) = (roots.next()?.0, roots.next()) else {
        return None;
    };
    let mut by_parent: Vec<(u32, usize)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((r.parent?.0, i)))
        .collect();
    by_parent.sort_unstable();
    let mut order = Vec::with_capacity(nodes.len());
    order.push(root);
    let mut next = 0;
    while let Some(&parent) = order.get(next) {
        next += 1;
        let id = nodes.get(parent)?.id.0;
        let start = by_parent.partition_point(|&(p, _)| p < id);
        let end = by_parent.partition_point(|&(p, _)| p <= id);
        order.extend(by_parent.get(start..end)?.iter().map(|&(_, i)| i));
        if order.len() > nodes.len() {
            return None;
        }
    }
    (order.len() == nodes.len()).then_some(order)
}

/// The largest height allowed for `members` members: ceil(log_d n) + 1.
pub fn height_bound(members: usize, degree: u8) -> usize {
    let mut levels = 0usize;
    let mut capacity = 1u128;
    while capacity < members as u128 && levels < MAX_DEPTH {
        capacity *= u128::from(degree);
        levels += 1;
    }
    levels + 1
}

struct Renewed {
    old: NodeKey,
    from: KeyVersion,
    flags: u8,
    /// What the wraps carry: the new key, or with one-way updates its seed.
    secret: NodeKey,
    /// The child this node's seed derives from (one-way updates).
    chain: Option<u32>,
}

/// The marks of one batch.
#[derive(Default)]
struct Marks {
    flags: HashMap<u32, u8>,
}

impl Marks {
    /// Marks `from` and its ancestors with `flags` (the MARK_NEW flag is never inherited).
    fn mark(&mut self, shape: &Shape, from: u32, flags: u8) {
        let mut id = from;
        while id != NIL {
            let entry = self.flags.entry(id).or_insert(0);
            if *entry & flags == flags && *entry != 0 {
                break;
            }
            *entry |= flags;
            id = shape.nodes.node(id).parent;
        }
    }

    fn flag(&mut self, id: u32, flags: u8) {
        *self.flags.entry(id).or_insert(0) |= flags;
    }

    /// Live marked internal nodes, deepest first (ties by id, for determinism).
    fn bottom_up(&self, shape: &Shape) -> Vec<(u32, u8)> {
        let mut live: Vec<(u32, u8)> = self
            .flags
            .iter()
            .filter(|&(&id, _)| shape.nodes.node(id).kind == Kind::Internal)
            .map(|(&id, &flags)| (id, flags))
            .collect();
        live.sort_unstable_by_key(|&(id, _)| (std::cmp::Reverse(shape.nodes.node(id).depth), id));
        live
    }
}
