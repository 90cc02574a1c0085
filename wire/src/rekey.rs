//! The rekey datagram, the packer that lays a [`Rekey`] out into signed datagrams of at most one
//! MTU, and the member-side path raw → [`AuthenticRekey`] → [`FreshRekey`] → applied, where only
//! a fresh, authentic datagram can be applied.
//!
//! Packing is user-oriented (Zhang, Lam, Lee, Yang 2003): every member finds everything it needs
//! for one epoch in one datagram. A member needs the wraps made under keys on its path and the
//! advances of nodes on its path. The packer walks the tree from the root: a subtree whose needs
//! (its own wraps plus the wraps under its ancestors' keys) fit one datagram, and are small (a
//! quarter of a datagram), is a *cover*; a larger subtree is split into its children. Covers partition the members, so each
//! member is served by exactly one datagram: the one listing a node of its path as a cover (a
//! member whose path gained a node in this epoch also finds a wrap under its own leaf key
//! there). Covers are filled into datagrams greedily in depth-first order, so neighbours share
//! the wraps near the root; those repeat across datagrams, nothing else does.

use rustc_hash::FxHashMap as HashMap;

use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::{
    Applied, ApplyError, Epoch, GroupId, KeyTree, Link, MemberPath, NodeId, PathUpdate, Rekey,
    RekeySalt, SALT_LEN, WRAPPED_LEN, Wrap,
};

use crate::codec::{Codec, CountWidth, DecodeError, Reader, put_count};
use crate::error::WireError;
use crate::held::HeldPath;
use crate::message::{HEADER_LEN, Header, MessageType, node_id};
use crate::signed::{self, SIGNATURE_LEN};

/// Default MTU: under the IPv6 minimum of 1280 with room for IP and UDP headers.
pub const DEFAULT_MTU: usize = 1200;
/// Largest datagram the codec accepts (the UDP maximum over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;
/// Bytes of one wrap on the wire: target (4), wrapping node and flag (4), ciphertext and tag (48).
pub const WRAP_LEN: usize = 4 + 4 + WRAPPED_LEN;
/// Most covers in one datagram.
pub const MAX_COVERS: usize = 255;
/// Most wraps in one datagram.
pub const MAX_WRAPS: usize = MAX_DATAGRAM / WRAP_LEN;
/// Most advances in one datagram.
pub const MAX_ADVANCES: usize = MAX_DATAGRAM / 4;
/// Most one-way links in one datagram.
pub const MAX_LINKS: usize = MAX_DATAGRAM / 8;
/// Bytes of a datagram with no covers, advances, links or wraps (header through signature).
pub const DATAGRAM_OVERHEAD: usize =
    HEADER_LEN + 8 + SALT_LEN + 2 + 2 + 1 + 1 + 2 + 2 + 2 + SIGNATURE_LEN;
const FLAG_SEEDS: u8 = 1;

const UNDER_NEW: u32 = 1 << 31;

/// One datagram of a rekey, decoded (not yet authenticated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyDatagram {
    /// The group.
    pub group: GroupId,
    /// The rekey's epoch.
    pub epoch: Epoch,
    /// The rekey's salt, in every wrap key (the same in every datagram of the rekey).
    pub salt: RekeySalt,
    /// This datagram's index among the epoch's datagrams.
    pub index: u16,
    /// How many datagrams the epoch has.
    pub count: u16,
    /// Whether the wraps carry one-way seeds rather than keys.
    pub seeds: bool,
    /// Roots of the subtrees this datagram serves.
    pub covers: Vec<NodeId>,
    /// Nodes whose keys advanced by hash-forward.
    pub advances: Vec<NodeId>,
    /// One-way chain links.
    pub links: Vec<Link>,
    /// Wraps, in the order the tree made them.
    pub wraps: Vec<Wrap>,
}

impl Codec for RekeyDatagram {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Rekey, self.group);
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
        out.extend_from_slice(&self.salt.0);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.push(if self.seeds { FLAG_SEEDS } else { 0 });
        put_count(out, CountWidth::U8, self.covers.len());
        for cover in &self.covers {
            out.extend_from_slice(&cover.0.to_be_bytes());
        }
        put_count(out, CountWidth::U16, self.advances.len());
        for node in &self.advances {
            out.extend_from_slice(&node.0.to_be_bytes());
        }
        put_count(out, CountWidth::U16, self.links.len());
        for link in &self.links {
            out.extend_from_slice(&link.child.0.to_be_bytes());
            out.extend_from_slice(&link.parent.0.to_be_bytes());
        }
        put_count(out, CountWidth::U16, self.wraps.len());
        for wrap in &self.wraps {
            out.extend_from_slice(&wrap.target.0.to_be_bytes());
            let flag = if wrap.under_new { UNDER_NEW } else { 0 };
            out.extend_from_slice(&(wrap.wrapping.0 | flag).to_be_bytes());
            out.extend_from_slice(&wrap.ciphertext);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Rekey)?;
        let epoch = Epoch(r.u64("epoch")?);
        let salt = RekeySalt(r.array("rekey salt")?);
        let index = r.u16("datagram index")?;
        let count = r.u16("datagram count")?;
        if index >= count {
            return Err(DecodeError::Invalid("datagram index"));
        }
        let seeds = match r.u8("flags")? {
            0 => false,
            FLAG_SEEDS => true,
            _ => return Err(DecodeError::Invalid("flags")),
        };
        let n = r.count(CountWidth::U8, 4, MAX_COVERS, "cover count")?;
        let covers = (0..n)
            .map(|_| node_id(r, "cover"))
            .collect::<Result<_, _>>()?;
        let n = r.count(CountWidth::U16, 4, MAX_ADVANCES, "advance count")?;
        let advances = (0..n)
            .map(|_| node_id(r, "advance"))
            .collect::<Result<_, _>>()?;
        let n = r.count(CountWidth::U16, 8, MAX_LINKS, "link count")?;
        let links = (0..n)
            .map(|_| {
                Ok(Link {
                    child: node_id(r, "link child")?,
                    parent: node_id(r, "link parent")?,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        let n = r.count(CountWidth::U16, WRAP_LEN, MAX_WRAPS, "wrap count")?;
        let mut wraps = Vec::with_capacity(n);
        for _ in 0..n {
            let target = node_id(r, "wrap target")?;
            let field = r.u32("wrapping node")?;
            let wrapping = NodeId(field & !UNDER_NEW);
            let ciphertext = r.array::<WRAPPED_LEN>("wrapped key")?;
            wraps.push(Wrap {
                target,
                wrapping,
                under_new: field & UNDER_NEW != 0,
                ciphertext,
            });
        }
        Ok(RekeyDatagram {
            group,
            epoch,
            salt,
            index,
            count,
            seeds,
            covers,
            advances,
            links,
            wraps,
        })
    }
}

impl RekeyDatagram {
    /// The group and epoch named by a rekey datagram's header, read without decoding or
    /// verifying the rest: a receiver already at that epoch drops a repeat without paying for a
    /// signature check. Nothing read here may be trusted for anything else.
    pub fn peek_epoch(bytes: &[u8]) -> Option<(GroupId, Epoch)> {
        let mut r = Reader::new(bytes);
        let group = Header::read(&mut r, MessageType::Rekey).ok()?;
        Some((group, Epoch(r.u64("epoch").ok()?)))
    }

    /// Encoded length including the signature.
    pub fn wire_len(&self) -> usize {
        DATAGRAM_OVERHEAD
            + 4 * self.covers.len()
            + 4 * self.advances.len()
            + 8 * self.links.len()
            + WRAP_LEN * self.wraps.len()
    }

    /// Encodes and signs.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        signed::sign(self, key)
    }

    /// Whether this datagram serves the holder of `path`: a cover lies on its path, or a wrap is
    /// made under its leaf key (its path gained a node this epoch).
    pub fn serves(&self, path: &MemberPath) -> bool {
        let leaf = path.leaf();
        self.covers
            .iter()
            .any(|c| path.keys().iter().any(|k| k.node == *c))
            || self.wraps.iter().any(|w| w.wrapping == leaf)
    }
}

/// A rekey datagram whose controller signature verified. Only [`AuthenticRekey::verify`] makes
/// one.
#[derive(Debug)]
pub struct AuthenticRekey(RekeyDatagram);

impl AuthenticRekey {
    /// Decodes (bounded) and verifies the controller's signature.
    pub fn verify(bytes: &[u8], controller: &VerifyingKey) -> Result<Self, WireError> {
        signed::open::<RekeyDatagram>(bytes, controller).map(|v| AuthenticRekey(v.into_message()))
    }

    /// The datagram.
    pub fn datagram(&self) -> &RekeyDatagram {
        &self.0
    }

    /// Checks that the datagram is for this member's group, of the epoch after its own (replays
    /// and duplicates are [`WireError::Stale`], a skipped epoch is [`WireError::Gap`]: resync)
    /// and serves its path; the result applies to that path only.
    pub fn fresh<'p>(&self, held: &'p mut HeldPath) -> Result<FreshRekey<'_, 'p>, WireError> {
        let d = &self.0;
        let path: &MemberPath = held;
        if d.group != path.group() {
            return Err(WireError::WrongGroup {
                expected: path.group(),
                got: d.group,
            });
        }
        if d.epoch <= path.epoch() {
            return Err(WireError::Stale {
                current: path.epoch(),
                got: d.epoch,
            });
        }
        if path.epoch().next() != Some(d.epoch) {
            return Err(WireError::Gap {
                current: path.epoch(),
                got: d.epoch,
            });
        }
        if !d.serves(path) {
            return Err(WireError::NotForMe);
        }
        Ok(FreshRekey {
            datagram: &self.0,
            path: held,
        })
    }
}

/// An authentic datagram of the epoch after the member's, that serves its path, bound to that
/// path: the only kind that can be applied (see [`HeldPath`]).
#[derive(Debug)]
pub struct FreshRekey<'a, 'p> {
    datagram: &'a RekeyDatagram,
    path: &'p mut HeldPath,
}

impl FreshRekey<'_, '_> {
    /// Applies the datagram to the path it was checked against: all or nothing. A datagram that
    /// lacks a key of the member's path is [`WireError::NotForMe`] (another datagram of the
    /// epoch, or a resync, serves it).
    pub fn apply(self) -> Result<Applied, WireError> {
        let d = self.datagram;
        let path = self.path.keys_mut();
        let update = PathUpdate {
            epoch: d.epoch,
            wraps: &d.wraps,
            advances: &d.advances,
            links: &d.links,
            seeds: d.seeds,
            salt: d.salt,
        };
        path.apply(&update).map_err(|e| match e {
            ApplyError::MissingKey(_) => WireError::NotForMe,
            other => WireError::Apply(other),
        })
    }
}

/// Lays a rekey out into datagrams of at most `mtu` bytes (unsigned).
pub fn pack(rekey: &Rekey, tree: &KeyTree, mtu: usize) -> Result<Vec<RekeyDatagram>, WireError> {
    let mtu = mtu.min(MAX_DATAGRAM);
    let budget = mtu
        .checked_sub(DATAGRAM_OVERHEAD)
        .ok_or(WireError::MtuTooSmall(mtu))?;
    let plan = Plan::new(rekey, tree);
    let mut covers = Vec::new();
    plan.visit(
        NodeId::ROOT,
        plan.slot(NodeId::ROOT),
        0,
        budget,
        &mut covers,
    )
    .map_err(|()| WireError::MtuTooSmall(mtu))?;
    let bins = plan.fill(&covers, budget);
    let count = u16::try_from(bins.len()).map_err(|_| WireError::MtuTooSmall(mtu))?;
    Ok(bins
        .into_iter()
        .zip(0u16..)
        .map(|(bin, index)| bin.datagram(rekey, index, count))
        .collect())
}

/// The covers and items of one datagram.
#[derive(Default)]
struct Bin {
    covers: Vec<NodeId>,
    items: Vec<usize>,
    bytes: usize,
}

impl Bin {
    fn datagram(mut self, rekey: &Rekey, index: u16, count: u16) -> RekeyDatagram {
        self.items.sort_unstable();
        // Items are numbered wraps first, then advances, then links.
        let (wraps, advances) = (rekey.encryptions.len(), rekey.advances.len());
        let first_advance = self.items.partition_point(|&i| i < wraps);
        let first_link = self.items.partition_point(|&i| i < wraps + advances);
        let mut datagram = RekeyDatagram {
            group: rekey.group,
            epoch: rekey.epoch,
            salt: rekey.salt,
            index,
            count,
            seeds: rekey.seeds,
            covers: self.covers,
            advances: Vec::with_capacity(first_link - first_advance),
            links: Vec::with_capacity(self.items.len() - first_link),
            wraps: Vec::with_capacity(first_advance),
        };
        for &item in &self.items {
            if let Some(e) = rekey.encryptions.get(item) {
                datagram.wraps.push(Wrap::from_encryption(e, rekey.epoch));
            } else if let Some(a) = item.checked_sub(wraps).and_then(|i| rekey.advances.get(i)) {
                datagram.advances.push(a.node);
            } else if let Some(l) = item
                .checked_sub(wraps + advances)
                .and_then(|i| rekey.links.get(i))
            {
                datagram.links.push(*l);
            }
        }
        datagram
    }
}

/// Bytes of item `item` of a plan: a wrap, an advance or a link.
fn item_size(item: usize, wraps: usize, advances: usize) -> usize {
    if item < wraps {
        WRAP_LEN
    } else if item < wraps + advances {
        4
    } else {
        8
    }
}

/// Packs and signs: the datagrams to multicast, in order.
pub fn pack_signed(
    rekey: &Rekey,
    tree: &KeyTree,
    mtu: usize,
    key: &SigningKey,
) -> Result<Vec<Vec<u8>>, WireError> {
    Ok(pack(rekey, tree, mtu)?
        .iter()
        .map(|d| d.sign(key))
        .collect())
}

/// What each node's key is needed for: the items (wraps, then advances, then links) grouped by
/// the node whose key opens them, and the bytes of everything opened at or below each node.
///
/// Only nodes whose key opens an item, and their ancestors, have a [`Slot`], found by one walk up
/// from each such node that stops at the first node already found. `by_slot` lists the items
/// slot by slot in depth-first order (each node before its descendants), so the items opened in
/// a node's subtree are one run of it.
struct Plan<'a> {
    tree: &'a KeyTree,
    /// Item indices, grouped by the slot of the node whose key opens them.
    by_slot: Vec<usize>,
    slots: Vec<Slot>,
    /// Each found node's slot.
    index: NodeIndex,
}

/// A node of a [`Plan`]: its parent's slot, its runs of `by_slot` and their bytes.
#[derive(Clone, Copy, Default)]
struct Slot {
    /// The parent's slot (`None` for the root, or for a node outside the tree).
    parent: Option<usize>,
    /// The node's own items are `by_slot[start..own_end]`, its subtree's `by_slot[start..end]`.
    start: usize,
    own_end: usize,
    end: usize,
    /// Bytes of the node's own items.
    own: usize,
    /// Bytes of the items opened at or below the node.
    below: usize,
}

impl<'a> Plan<'a> {
    fn new(rekey: &Rekey, tree: &'a KeyTree) -> Self {
        let (wraps, advances) = (rekey.encryptions.len(), rekey.advances.len());
        let keys = rekey
            .encryptions
            .iter()
            .map(|e| e.wrapping)
            .chain(rekey.advances.iter().map(|a| a.node))
            .chain(rekey.links.iter().map(|l| l.child));
        let count = wraps + advances + rekey.links.len();
        let largest = keys.clone().map(|n| n.0).max().unwrap_or(0);
        let mut found = Found::new(tree, count, largest);
        // Runs of items opened by one node (user-oriented wraps) look it up once.
        let mut last: Option<(NodeId, usize)> = None;
        let mut item_slots = Vec::with_capacity(count);
        for (item, node) in keys.enumerate() {
            let slot = match last {
                Some((n, slot)) if n == node => slot,
                _ => found.slot(node),
            };
            last = Some((node, slot));
            found.add_item(slot, item_size(item, wraps, advances));
            item_slots.push(slot);
        }
        found.into_plan(&item_slots)
    }

    fn slot(&self, node: NodeId) -> Option<&Slot> {
        self.index.get(node).and_then(|s| self.slots.get(s))
    }

    /// Finds the covers under `node` (whose slot is `slot`), whose strict ancestors open `above`
    /// bytes of items.
    fn visit(
        &self,
        node: NodeId,
        slot: Option<&Slot>,
        above: usize,
        budget: usize,
        covers: &mut Vec<NodeId>,
    ) -> Result<(), ()> {
        let (below, own) = slot.map_or((0, 0), |s| (s.below, s.own));
        let fits = above + below + 4 <= budget;
        // Small subtrees stay whole (few covers); large ones are split even when they fit, so
        // the greedy fill can pack datagrams tightly.
        let small = below <= budget / 4 || below == own;
        let member = self.tree.is_member(node);
        if fits && (small || member) {
            covers.push(node);
            return Ok(());
        }
        if member {
            return Err(());
        }
        for child in self.tree.iter_children(node) {
            if let Some(child_slot) = self.slot(child) {
                self.visit(child, Some(child_slot), above + own, budget, covers)?;
            } else if above + own + 4 <= budget {
                // Nothing is keyed below this child: its members need only the path above.
                covers.push(child);
            } else {
                return Err(());
            }
        }
        Ok(())
    }

    /// The slots of `node`'s strict ancestors (`node`'s own slot is `slot`), into `out`.
    fn ancestors(&self, node: NodeId, slot: Option<usize>, out: &mut Vec<usize>) {
        out.clear();
        let mut parent = match slot {
            Some(s) => self.slots.get(s).and_then(|s| s.parent),
            // A node with nothing keyed below it: its nearest ancestor with a slot.
            None => std::iter::successors(self.tree.parent(node), |&n| self.tree.parent(n))
                .find_map(|n| self.index.get(n)),
        };
        while let Some(p) = parent {
            out.push(p);
            parent = self.slots.get(p).and_then(|s| s.parent);
        }
    }

    fn own_items(&self, slot: usize) -> &[usize] {
        self.slots
            .get(slot)
            .and_then(|s| self.by_slot.get(s.start..s.own_end))
            .unwrap_or_default()
    }

    fn subtree_items(&self, slot: Option<usize>) -> &[usize] {
        slot.and_then(|s| self.slots.get(s))
            .and_then(|s| self.by_slot.get(s.start..s.end))
            .unwrap_or_default()
    }

    /// Fills covers into bins greedily in depth-first order. The members below a cover need the
    /// items opened on its path and in its subtree. Covers never nest, so a cover's subtree items
    /// are new to every bin; the items of a node on its path are in a bin all together or not at
    /// all.
    fn fill(&self, covers: &[NodeId], budget: usize) -> Vec<Bin> {
        // The bin number (plus one) that last took each slot's own items.
        let mut taken = vec![0usize; self.slots.len()];
        let mut bins = vec![Bin::default()];
        let mut path = Vec::new();
        for &cover in covers {
            let slot = self.index.get(cover);
            self.ancestors(cover, slot, &mut path);
            let below = slot.and_then(|s| self.slots.get(s)).map_or(0, |s| s.below);
            let new_bytes = |bin: usize, taken: &[usize]| {
                4 + below
                    + path
                        .iter()
                        .filter(|&&a| taken.get(a) != Some(&bin))
                        .filter_map(|&a| self.slots.get(a))
                        .map(|s| s.own)
                        .sum::<usize>()
            };
            let mut bin = bins.len();
            let mut extra = new_bytes(bin, &taken);
            let full = bins
                .last()
                .is_some_and(|b| b.bytes + extra > budget || b.covers.len() == MAX_COVERS);
            if full {
                bins.push(Bin::default());
                bin = bins.len();
                extra = new_bytes(bin, &taken);
            }
            let Some(current) = bins.last_mut() else {
                continue;
            };
            current.covers.push(cover);
            current.bytes += extra;
            for &a in &path {
                if let Some(t) = taken.get_mut(a).filter(|t| **t != bin) {
                    *t = bin;
                    current.items.extend_from_slice(self.own_items(a));
                }
            }
            current.items.extend_from_slice(self.subtree_items(slot));
        }
        bins.retain(|b| !b.covers.is_empty());
        bins
    }
}

/// The slots of a [`Plan`] being found, numbered in the order found.
struct Found<'a> {
    tree: &'a KeyTree,
    found: Vec<Slot>,
    /// How many items each slot's node opens.
    counts: Vec<usize>,
    index: NodeIndex,
}

impl<'a> Found<'a> {
    /// Room for `items` items whose key nodes' ids are at most `largest`.
    fn new(tree: &'a KeyTree, items: usize, largest: u32) -> Self {
        Found {
            tree,
            found: Vec::with_capacity(items),
            counts: Vec::with_capacity(items),
            index: NodeIndex::new(items, largest),
        }
    }

    /// The slot of `node`, made, with those of its ancestors not yet found, if it is new.
    fn slot(&mut self, node: NodeId) -> usize {
        if let Some(slot) = self.index.get(node) {
            return slot;
        }
        let first = self.push(node);
        let mut child = first;
        let mut cursor = self.tree.parent(node);
        while let Some(parent) = cursor {
            let known = self.index.get(parent);
            let slot = known.unwrap_or_else(|| self.push(parent));
            if let Some(c) = self.found.get_mut(child) {
                c.parent = Some(slot);
            }
            if known.is_some() {
                break;
            }
            child = slot;
            cursor = self.tree.parent(parent);
        }
        first
    }

    fn push(&mut self, node: NodeId) -> usize {
        let slot = self.found.len();
        self.index.insert(node, slot);
        self.found.push(Slot::default());
        self.counts.push(0);
        slot
    }

    fn add_item(&mut self, slot: usize, bytes: usize) {
        if let (Some(s), Some(count)) = (self.found.get_mut(slot), self.counts.get_mut(slot)) {
            s.own += bytes;
            *count += 1;
        }
    }

    /// The slots in depth-first order: each before its descendants.
    fn depth_first(&self) -> Vec<usize> {
        // Child lists as links (`usize::MAX` ends a list): each slot's first child and next sibling.
        let n = self.found.len();
        let mut first_child = vec![usize::MAX; n];
        let mut next_sibling = vec![usize::MAX; n];
        let mut stack = Vec::new();
        for (slot, s) in self.found.iter().enumerate() {
            let head = s.parent.and_then(|p| first_child.get_mut(p));
            match (head, next_sibling.get_mut(slot)) {
                (Some(head), Some(next)) => *next = std::mem::replace(head, slot),
                _ => stack.push(slot),
            }
        }
        let mut order = Vec::with_capacity(n);
        while let Some(slot) = stack.pop() {
            order.push(slot);
            let mut child = first_child.get(slot).copied().unwrap_or(usize::MAX);
            while let Some(&next) = next_sibling.get(child) {
                stack.push(child);
                child = next;
            }
        }
        order
    }

    /// Lays the items out slot by slot in depth-first order, so that each subtree's items are one
    /// run; `item_slots` holds each item's slot.
    fn into_plan(mut self, item_slots: &[usize]) -> Plan<'a> {
        let order = self.depth_first();
        let mut next = 0;
        for &slot in &order {
            let (Some(s), Some(count)) = (self.found.get_mut(slot), self.counts.get_mut(slot))
            else {
                continue;
            };
            s.start = next;
            next += *count;
            (s.own_end, s.end, s.below) = (next, next, s.own);
            // From here on, where the slot's next item goes.
            *count = s.start;
        }
        // Descendants before ancestors: add each subtree into its parent's.
        for &slot in order.iter().rev() {
            let Some(&Slot {
                parent: Some(parent),
                end,
                below,
                ..
            }) = self.found.get(slot)
            else {
                continue;
            };
            if let Some(p) = self.found.get_mut(parent) {
                p.end = p.end.max(end);
                p.below += below;
            }
        }
        let mut by_slot = vec![0; item_slots.len()];
        for (item, &slot) in item_slots.iter().enumerate() {
            if let Some(position) = self.counts.get_mut(slot) {
                if let Some(place) = by_slot.get_mut(*position) {
                    *place = item;
                }
                *position += 1;
            }
        }
        Plan {
            tree: self.tree,
            by_slot,
            slots: self.found,
            index: self.index,
        }
    }
}

/// Slots by node id: a table indexed by id when ids are dense enough, else a hash map.
enum NodeIndex {
    /// Entry `id` holds the slot of node `id` plus one, or 0.
    Table(Vec<u32>),
    Map(HashMap<NodeId, usize>),
}

impl NodeIndex {
    /// A table when it takes at most 32 bytes per item (a large batch), else a map.
    fn new(items: usize, largest: u32) -> Self {
        let len = largest as usize + 1;
        if len / 8 <= items {
            NodeIndex::Table(vec![0; len])
        } else {
            NodeIndex::Map(HashMap::with_capacity_and_hasher(items, Default::default()))
        }
    }

    fn get(&self, node: NodeId) -> Option<usize> {
        match self {
            NodeIndex::Table(table) => {
                let entry = *table.get(node.0 as usize)?;
                (entry as usize).checked_sub(1)
            }
            NodeIndex::Map(map) => map.get(&node).copied(),
        }
    }

    fn insert(&mut self, node: NodeId, slot: usize) {
        match self {
            NodeIndex::Table(table) => {
                let id = node.0 as usize;
                if id >= table.len() {
                    // An ancestor made after the keyed nodes (a split) can have a larger id.
                    table.resize((id + 1).max(table.len() + table.len() / 8), 0);
                }
                // Slots are distinct ids, so `slot + 1` fits in a u32.
                if let Some(entry) = table.get_mut(id) {
                    *entry = u32::try_from(slot + 1).unwrap_or(0);
                }
            }
            NodeIndex::Map(map) => {
                map.insert(node, slot);
            }
        }
    }
}
