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
    WRAPPED_LEN, Wrap,
};

use crate::codec::{Codec, CountWidth, DecodeError, Reader, put_count};
use crate::error::WireError;
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
pub const DATAGRAM_OVERHEAD: usize = HEADER_LEN + 8 + 2 + 2 + 1 + 1 + 2 + 2 + 2 + SIGNATURE_LEN;
const FLAG_SEEDS: u8 = 1;

const UNDER_NEW: u32 = 1 << 31;

/// One datagram of a rekey, decoded (not yet authenticated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyDatagram {
    /// The group.
    pub group: GroupId,
    /// The rekey's epoch.
    pub epoch: Epoch,
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
    /// and serves its path.
    pub fn fresh(&self, path: &MemberPath) -> Result<FreshRekey<'_>, WireError> {
        let d = &self.0;
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
        Ok(FreshRekey(&self.0))
    }
}

/// An authentic datagram newer than the member's epoch: the only kind that can be applied.
#[derive(Debug)]
pub struct FreshRekey<'a>(&'a RekeyDatagram);

impl FreshRekey<'_> {
    /// Applies the datagram to the member's path: all or nothing. A datagram that lacks a key of
    /// the member's path is [`WireError::NotForMe`] (another datagram of the epoch, or a resync,
    /// serves it).
    pub fn apply(self, path: &mut MemberPath) -> Result<Applied, WireError> {
        let d = self.0;
        let update = PathUpdate {
            epoch: d.epoch,
            wraps: &d.wraps,
            advances: &d.advances,
            links: &d.links,
            seeds: d.seeds,
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
    plan.visit(NodeId::ROOT, 0, budget, &mut covers)
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
        let (wraps, advances) = (rekey.encryptions.len(), rekey.advances.len());
        let mut datagram = RekeyDatagram {
            group: rekey.group,
            epoch: rekey.epoch,
            index,
            count,
            seeds: rekey.seeds,
            covers: self.covers,
            advances: Vec::new(),
            links: Vec::new(),
            wraps: Vec::new(),
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

/// What each node's key is needed for: items (wraps, then advances, then links) grouped by the
/// node whose key opens them, and the bytes of everything keyed at or below each node.
struct Plan<'a> {
    tree: &'a KeyTree,
    sizes: Vec<usize>,
    /// Item indices sorted by their key node; `own` maps a node to its range here and its bytes.
    by_node: Vec<usize>,
    own: HashMap<NodeId, (usize, usize, usize)>,
    below: HashMap<NodeId, usize>,
}

impl<'a> Plan<'a> {
    fn new(rekey: &Rekey, tree: &'a KeyTree) -> Self {
        let (wraps, advances) = (rekey.encryptions.len(), rekey.advances.len());
        let keys: Vec<NodeId> = rekey
            .encryptions
            .iter()
            .map(|e| e.wrapping)
            .chain(rekey.advances.iter().map(|a| a.node))
            .chain(rekey.links.iter().map(|l| l.child))
            .collect();
        let sizes: Vec<usize> = (0..keys.len())
            .map(|i| item_size(i, wraps, advances))
            .collect();
        let mut by_node: Vec<usize> = (0..keys.len()).collect();
        by_node.sort_by_key(|&i| (keys.get(i).copied(), i));
        let mut own: HashMap<NodeId, (usize, usize, usize)> = HashMap::default();
        let mut below: HashMap<NodeId, usize> = HashMap::default();
        for (position, &item) in by_node.iter().enumerate() {
            let (Some(&node), Some(&size)) = (keys.get(item), sizes.get(item)) else {
                continue;
            };
            let range = own.entry(node).or_insert((position, position, 0));
            range.1 = position + 1;
            range.2 += size;
        }
        for (&node, &(_, _, bytes)) in &own {
            let mut cursor = Some(node);
            while let Some(n) = cursor {
                *below.entry(n).or_default() += bytes;
                cursor = tree.parent(n);
            }
        }
        Plan {
            tree,
            sizes,
            by_node,
            own,
            below,
        }
    }

    fn own_bytes(&self, node: NodeId) -> usize {
        self.own.get(&node).map_or(0, |&(_, _, bytes)| bytes)
    }

    fn own_items(&self, node: NodeId) -> &[usize] {
        self.own
            .get(&node)
            .and_then(|&(start, end, _)| self.by_node.get(start..end))
            .unwrap_or_default()
    }

    /// Finds the covers under `node`, whose strict ancestors open `above` bytes of items.
    fn visit(
        &self,
        node: NodeId,
        above: usize,
        budget: usize,
        covers: &mut Vec<NodeId>,
    ) -> Result<(), ()> {
        let below = self.below.get(&node).copied().unwrap_or(0);
        let own = self.own_bytes(node);
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
        for child in self.tree.children(node) {
            if self.below.contains_key(&child) {
                self.visit(child, above + own, budget, covers)?;
            } else if above + own + 4 <= budget {
                // Nothing is keyed below this child: its members need only the path above.
                covers.push(child);
            } else {
                return Err(());
            }
        }
        Ok(())
    }

    /// The items the members below a cover need: those opened on its path and in its subtree.
    fn items(&self, cover: NodeId, out: &mut Vec<usize>) {
        out.clear();
        let mut cursor = Some(cover);
        while let Some(n) = cursor {
            out.extend_from_slice(self.own_items(n));
            cursor = self.tree.parent(n);
        }
        let mut stack: Vec<NodeId> = self.tree.children(cover);
        while let Some(n) = stack.pop() {
            if self.below.contains_key(&n) {
                out.extend_from_slice(self.own_items(n));
                stack.extend(self.tree.children(n));
            }
        }
    }

    /// Fills covers into bins greedily in depth-first order.
    fn fill(&self, covers: &[NodeId], budget: usize) -> Vec<Bin> {
        // The bin number (plus one) that last took each item.
        let mut taken = vec![0usize; self.sizes.len()];
        let mut bins = vec![Bin::default()];
        let mut items = Vec::new();
        for &cover in covers {
            self.items(cover, &mut items);
            let new_bytes = |bin: usize, taken: &[usize]| {
                4 + items
                    .iter()
                    .filter(|&&i| taken.get(i) != Some(&bin))
                    .filter_map(|&i| self.sizes.get(i))
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
            for &i in &items {
                if let Some(t) = taken.get_mut(i).filter(|t| **t != bin) {
                    *t = bin;
                    current.items.push(i);
                }
            }
        }
        bins.retain(|b| !b.covers.is_empty());
        bins
    }
}
