//! The member side: a member's path keys with their versions, and [`MemberPath::apply`], which
//! takes the wraps of one rekey, unwraps bottom-up and yields the new root and traffic key.
//!
//! A member learns changes of its path from the wraps themselves: a key wrapped under a child's
//! key is that child's parent's key, so a wrap from one of its nodes to another node re-parents
//! it (a split inserted a node above its leaf, or rebalancing moved it). A node inserted by a
//! split takes the place of the node it was inserted above. Wraps it cannot use are ignored;
//! anything inconsistent (a changed path key it cannot obtain, keys that do not lead to the
//! traffic key whose check value the update names) is an error and leaves the path unchanged.

use thiserror::Error;

use crate::ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt};
use crate::secret::{Kcv, NodeKey, TrafficKey};
use crate::tree::MAX_DEPTH;
use crate::wrap::{Encryption, WRAPPED_LEN, WrapContext};

/// One key of a member's path.
#[derive(Clone, Debug)]
pub struct PathKey {
    /// The node.
    pub node: NodeId,
    /// Its key's version.
    pub version: KeyVersion,
    /// Its key.
    pub key: NodeKey,
}

/// A wrap as a member receives it: the wrapping version is not carried, only whether the
/// wrapping key was set in this epoch (`under_new`) or held before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wrap {
    /// The node whose new key this carries.
    pub target: NodeId,
    /// The node whose key encrypts it.
    pub wrapping: NodeId,
    /// Whether the wrapping key is the one set in this epoch.
    pub under_new: bool,
    /// The key under its pad.
    pub ciphertext: [u8; WRAPPED_LEN],
}

impl Wrap {
    /// The member's view of a controller-side encryption of `epoch`.
    pub fn from_encryption(encryption: &Encryption, epoch: Epoch) -> Wrap {
        Wrap {
            target: encryption.target,
            wrapping: encryption.wrapping,
            under_new: encryption.under_new_key(epoch),
            ciphertext: encryption.ciphertext,
        }
    }
}

/// A one-way chain link: members that learn `child`'s seed derive `parent`'s seed from it (and
/// learn that `parent` is `child`'s parent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The renewed child whose seed continues the chain.
    pub child: NodeId,
    /// Its parent.
    pub parent: NodeId,
}

/// The part of one rekey a member applies, taken as authentic (see [`MemberPath::apply`]).
#[derive(Clone, Copy, Debug)]
pub struct PathUpdate<'a> {
    /// The rekey's epoch.
    pub epoch: Epoch,
    /// Wraps (any order; those the member cannot use are ignored).
    pub wraps: &'a [Wrap],
    /// Nodes whose keys advanced by hash-forward in this epoch.
    pub advances: &'a [NodeId],
    /// One-way chain links of this epoch.
    pub links: &'a [Link],
    /// Whether the wraps carry one-way seeds rather than keys.
    pub seeds: bool,
    /// The rekey's salt (in every wrap pad).
    pub salt: RekeySalt,
    /// The check value of the traffic key the update leads to: the keys derived are used only
    /// if they match it.
    pub kcv: Kcv,
}

/// What a successful apply yields.
#[derive(Debug)]
pub struct Applied {
    /// The new epoch.
    pub epoch: Epoch,
    /// Its traffic key.
    pub traffic_key: TrafficKey,
    /// The traffic key's check value.
    pub kcv: Kcv,
}

/// Why a path or an update was refused. The path is unchanged.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyError {
    /// The update is not newer than the path.
    #[error("rekey epoch {got} is not newer than the current epoch {current}")]
    StaleEpoch {
        /// The path's epoch.
        current: Epoch,
        /// The update's epoch.
        got: Epoch,
    },
    /// The update skips epochs: the member missed a rekey and must resync.
    #[error("rekey epoch {got} skips epochs after {current}; resync")]
    Gap {
        /// The path's epoch.
        current: Epoch,
        /// The update's epoch.
        got: Epoch,
    },
    /// The keys derived from the update do not lead to the traffic key it names: the path
    /// held is not the controller's (resync).
    #[error("the keys derived from the rekey do not match its key check value; resync")]
    KeyCheck,
    /// A key of the member's path changed but the update holds no usable wrap of it.
    #[error("node {0} of the path changed but no usable wrap of it was received")]
    MissingKey(NodeId),
    /// The update or path is malformed for this member.
    #[error("inconsistent key path: {0}")]
    Inconsistent(&'static str),
}

/// A member's keys: its leaf (individual) key and every ancestor key up to the root.
#[derive(Clone, Debug)]
pub struct MemberPath {
    group: GroupId,
    epoch: Epoch,
    keys: Vec<PathKey>,
}

impl MemberPath {
    pub(crate) fn new(group: GroupId, epoch: Epoch, keys: Vec<PathKey>) -> Self {
        MemberPath { group, epoch, keys }
    }

    /// A path received from the controller (welcome or resync), checked for shape: leaf first,
    /// root last, at most 65 keys, no node twice, no version above the epoch, root at the epoch.
    pub fn from_keys(group: GroupId, epoch: Epoch, keys: Vec<PathKey>) -> Result<Self, ApplyError> {
        let Some(root) = keys.last() else {
            return Err(ApplyError::Inconsistent("empty path"));
        };
        if keys.len() < 2 || keys.len() > MAX_DEPTH + 1 {
            return Err(ApplyError::Inconsistent("path length out of range"));
        }
        if root.node != NodeId::ROOT || root.version != epoch.version() {
            return Err(ApplyError::Inconsistent(
                "path does not end at the current root",
            ));
        }
        for (i, key) in keys.iter().enumerate() {
            if key.version > epoch.version() || key.node.0 >= NodeId::LIMIT {
                return Err(ApplyError::Inconsistent("path key out of range"));
            }
            if keys.iter().skip(i + 1).any(|other| other.node == key.node) {
                return Err(ApplyError::Inconsistent("node twice in a path"));
            }
        }
        Ok(MemberPath { group, epoch, keys })
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The epoch of the keys held.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The member's leaf.
    pub fn leaf(&self) -> NodeId {
        self.keys.first().map_or(NodeId::ROOT, |k| k.node)
    }

    /// Keys, leaf first, root last.
    pub fn keys(&self) -> &[PathKey] {
        &self.keys
    }

    /// The root key.
    pub fn root_key(&self) -> Option<&NodeKey> {
        self.keys.last().map(|k| &k.key)
    }

    /// The traffic key of the current epoch.
    pub fn traffic_key(&self) -> Option<TrafficKey> {
        self.root_key()
            .map(|root| root.traffic_key(self.group, self.epoch))
    }

    /// Applies the rekey of the next epoch: all or nothing. Keys of a rekey only make sense on
    /// top of the epoch before it (hash-forward advances, in particular, carry no check), so an
    /// older epoch is [`ApplyError::StaleEpoch`] and a later one [`ApplyError::Gap`].
    ///
    /// This is the tree's arithmetic, trusting its input: for the controller's side, simulations
    /// and tests. A member agent's keys are a `wire::HeldPath`, which this cannot reach: they
    /// change only by a rekey datagram whose signature verified (`wire::FreshRekey::apply`).
    pub fn apply(&mut self, update: &PathUpdate<'_>) -> Result<Applied, ApplyError> {
        if update.epoch <= self.epoch {
            return Err(ApplyError::StaleEpoch {
                current: self.epoch,
                got: update.epoch,
            });
        }
        if self.epoch.next() != Some(update.epoch) {
            return Err(ApplyError::Gap {
                current: self.epoch,
                got: update.epoch,
            });
        }
        let mut work = Working::new(&self.keys);
        work.advance(update)?;
        work.unwrap_all(self.group, update)?;
        let path = work.rebuild(&self.keys)?;
        let keys = work.collect(&path, update)?;
        let traffic_key = keys
            .last()
            .ok_or(ApplyError::Inconsistent("empty path"))?
            .key
            .traffic_key(self.group, update.epoch);
        let kcv = traffic_key.check_value();
        if kcv != update.kcv {
            return Err(ApplyError::KeyCheck);
        }
        self.keys = keys;
        self.epoch = update.epoch;
        Ok(Applied {
            epoch: update.epoch,
            traffic_key,
            kcv,
        })
    }
}

/// One node during an apply: the key held before and the key set in this epoch.
struct Slot {
    node: NodeId,
    old: Option<(KeyVersion, NodeKey)>,
    new: Option<NodeKey>,
    /// The one-way seed the new key came from.
    seed: Option<NodeKey>,
    parent: Option<NodeId>,
    chain_tail: Option<NodeId>,
}

struct Working {
    slots: Vec<Slot>,
}

impl Working {
    fn new(keys: &[PathKey]) -> Self {
        let slots = keys
            .iter()
            .map(|k| Slot {
                node: k.node,
                old: Some((k.version, k.key.clone())),
                new: None,
                seed: None,
                parent: None,
                chain_tail: None,
            })
            .collect();
        Working { slots }
    }

    fn slot(&self, node: NodeId) -> Option<&Slot> {
        self.slots.iter().find(|s| s.node == node)
    }

    fn advance(&mut self, update: &PathUpdate<'_>) -> Result<(), ApplyError> {
        let version = update.epoch.version();
        for &node in update.advances {
            let Some(slot) = self.slots.iter_mut().find(|s| s.node == node) else {
                continue;
            };
            if slot.new.is_some() {
                return Err(ApplyError::Inconsistent("a key advanced twice"));
            }
            slot.new = slot
                .old
                .as_ref()
                .map(|(_, key)| key.hash_forward(node, version));
        }
        Ok(())
    }

    /// The key a wrap is made under, if held, with its version.
    fn wrapping_key(&self, wrap: &Wrap, epoch: Epoch) -> Option<(KeyVersion, NodeKey)> {
        let slot = self.slot(wrap.wrapping)?;
        if wrap.under_new {
            slot.new.clone().map(|key| (epoch.version(), key))
        } else {
            slot.old.clone()
        }
    }

    /// Opens every usable wrap, repeating while new keys make more wraps usable.
    fn unwrap_all(&mut self, group: GroupId, update: &PathUpdate<'_>) -> Result<(), ApplyError> {
        let mut used = vec![false; update.wraps.len()];
        loop {
            let mut progress = false;
            for (wrap, used) in update.wraps.iter().zip(used.iter_mut()) {
                if *used {
                    continue;
                }
                let Some((version, key)) = self.wrapping_key(wrap, update.epoch) else {
                    continue;
                };
                *used = true;
                self.link(wrap)?;
                if self.slot(wrap.target).is_some_and(|s| s.new.is_some()) {
                    continue;
                }
                let context = WrapContext {
                    group,
                    epoch: update.epoch,
                    target: wrap.target,
                    wrapping: wrap.wrapping,
                    wrapping_version: version,
                    salt: update.salt,
                };
                let opened = context.open(&key, &wrap.ciphertext);
                self.learn(wrap.target, opened, update.seeds)?;
                progress = true;
            }
            progress |= self.follow_links(update.links)?;
            if !progress {
                return Ok(());
            }
        }
    }

    /// Records structure: the targets one key wraps (other than itself) form the chain of
    /// ancestors above it, nearest first (one target in group- and key-oriented rekeying, the
    /// whole changed path above it in user-oriented rekeying).
    fn link(&mut self, wrap: &Wrap) -> Result<(), ApplyError> {
        if wrap.wrapping == wrap.target {
            return Ok(());
        }
        let tail = self.slot(wrap.wrapping).and_then(|s| s.chain_tail);
        let below = tail.unwrap_or(wrap.wrapping);
        self.slot_mut(below)?.parent.get_or_insert(wrap.target);
        self.slot_mut(wrap.wrapping)?.chain_tail = Some(wrap.target);
        self.slot_mut(wrap.target)?;
        Ok(())
    }

    /// The slot of `node`, created empty if the update names a node not yet seen.
    fn slot_mut(&mut self, node: NodeId) -> Result<&mut Slot, ApplyError> {
        let index = match self.slots.iter().position(|s| s.node == node) {
            Some(index) => index,
            None if self.slots.len() <= 2 * MAX_DEPTH => {
                self.slots.push(Slot {
                    node,
                    old: None,
                    new: None,
                    seed: None,
                    parent: None,
                    chain_tail: None,
                });
                self.slots.len() - 1
            }
            None => return Err(ApplyError::Inconsistent("too many keys in one update")),
        };
        self.slots
            .get_mut(index)
            .ok_or(ApplyError::Inconsistent("slot vanished"))
    }

    fn learn(&mut self, node: NodeId, opened: NodeKey, seeds: bool) -> Result<(), ApplyError> {
        let slot = self.slot_mut(node)?;
        if seeds {
            slot.new = Some(opened.one_way_key(node));
            slot.seed = Some(opened);
        } else {
            slot.new = Some(opened);
        }
        Ok(())
    }

    /// Derives parents' seeds along one-way links from seeds already known; true if any new.
    fn follow_links(&mut self, links: &[Link]) -> Result<bool, ApplyError> {
        let mut progress = false;
        for link in links {
            let Some(seed) = self.slot(link.child).and_then(|s| s.seed.clone()) else {
                continue;
            };
            if self.slot(link.parent).is_some_and(|s| s.new.is_some()) {
                continue;
            }
            self.slot_mut(link.child)?.parent.get_or_insert(link.parent);
            self.learn(link.parent, seed.one_way_next(link.parent), true)?;
            progress = true;
        }
        Ok(progress)
    }

    /// The new path, leaf to root.
    fn rebuild(&self, old: &[PathKey]) -> Result<Vec<NodeId>, ApplyError> {
        let Some(first) = old.first() else {
            return Err(ApplyError::Inconsistent("empty path"));
        };
        let mut path = vec![first.node];
        let mut last_old = 0usize;
        let mut node = first.node;
        while node != NodeId::ROOT {
            let old_index = old.iter().position(|k| k.node == node);
            if let Some(i) = old_index {
                last_old = i;
            }
            let inherited = old.get(last_old + 1).map(|k| k.node);
            let next = self
                .slot(node)
                .and_then(|s| s.parent)
                .or(inherited)
                .ok_or(ApplyError::Inconsistent("path does not reach the root"))?;
            if path.contains(&next) || path.len() > MAX_DEPTH {
                return Err(ApplyError::Inconsistent("path loops or is too long"));
            }
            path.push(next);
            node = next;
        }
        Ok(path)
    }

    fn collect(
        &self,
        path: &[NodeId],
        update: &PathUpdate<'_>,
    ) -> Result<Vec<PathKey>, ApplyError> {
        let version = update.epoch.version();
        let mut keys = Vec::with_capacity(path.len());
        for &node in path {
            let slot = self.slot(node).ok_or(ApplyError::MissingKey(node))?;
            let changed = node == NodeId::ROOT
                || update.advances.contains(&node)
                || update.links.iter().any(|l| l.parent == node)
                || update.wraps.iter().any(|w| w.target == node);
            let key = match (&slot.new, &slot.old) {
                (Some(new), _) => PathKey {
                    node,
                    version,
                    key: new.clone(),
                },
                (None, Some((old_version, old))) if !changed => PathKey {
                    node,
                    version: *old_version,
                    key: old.clone(),
                },
                _ => return Err(ApplyError::MissingKey(node)),
            };
            keys.push(key);
        }
        Ok(keys)
    }
}
