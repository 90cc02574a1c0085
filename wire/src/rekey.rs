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

use std::collections::{HashMap, HashSet};

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
    let mut entries = Vec::new();
    plan.visit(NodeId::ROOT, budget, &mut entries)
        .map_err(|()| WireError::MtuTooSmall(mtu))?;
    let mut bins: Vec<(Vec<NodeId>, Vec<usize>)> = Vec::new();
    let mut current: (Vec<NodeId>, HashSet<usize>, usize) = (Vec::new(), HashSet::new(), 0);
    for cover in entries {
        let items = plan.items(cover);
        let extra: usize = 4 + items
            .iter()
            .filter(|i| !current.1.contains(i))
            .map(|&i| plan.size(i))
            .sum::<usize>();
        if current.2 + extra > budget || current.0.len() == MAX_COVERS {
            let (covers, set, _) = std::mem::take(&mut current);
            bins.push((covers, set.into_iter().collect()));
        }
        let added: usize = 4 + items
            .iter()
            .filter(|i| !current.1.contains(i))
            .map(|&i| plan.size(i))
            .sum::<usize>();
        current.0.push(cover);
        current.1.extend(items);
        current.2 += added;
    }
    if !current.0.is_empty() {
        bins.push((current.0, current.1.into_iter().collect()));
    }
    let count = u16::try_from(bins.len()).map_err(|_| WireError::MtuTooSmall(mtu))?;
    let epoch = rekey.epoch;
    Ok(bins
        .into_iter()
        .zip(0u16..)
        .map(|((covers, mut items), index)| {
            items.sort_unstable();
            let wraps = items
                .iter()
                .filter_map(|&i| rekey.encryptions.get(i))
                .map(|e| Wrap::from_encryption(e, epoch))
                .collect();
            let advances = items
                .iter()
                .filter_map(|&i| i.checked_sub(rekey.encryptions.len()))
                .filter_map(|i| rekey.advances.get(i))
                .map(|a| a.node)
                .collect();
            let links = items
                .iter()
                .filter_map(|&i| i.checked_sub(rekey.encryptions.len() + rekey.advances.len()))
                .filter_map(|i| rekey.links.get(i))
                .copied()
                .collect();
            RekeyDatagram {
                group: rekey.group,
                epoch,
                index,
                count,
                seeds: rekey.seeds,
                covers,
                advances,
                links,
                wraps,
            }
        })
        .collect())
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

/// What each node's key is needed for: items (wraps, then advances, then links) by the node whose
/// key opens them, and the bytes of everything below each node.
struct Plan<'a> {
    tree: &'a KeyTree,
    wraps: usize,
    advances: usize,
    own: HashMap<NodeId, Vec<usize>>,
    below: HashMap<NodeId, usize>,
}

impl<'a> Plan<'a> {
    fn new(rekey: &Rekey, tree: &'a KeyTree) -> Self {
        let wraps = rekey.encryptions.len();
        let advances = rekey.advances.len();
        let keyed = rekey
            .encryptions
            .iter()
            .map(|e| e.wrapping)
            .chain(rekey.advances.iter().map(|a| a.node))
            .chain(rekey.links.iter().map(|l| l.child));
        let mut own: HashMap<NodeId, Vec<usize>> = HashMap::new();
        let mut below: HashMap<NodeId, usize> = HashMap::new();
        let size_of = |item: usize| item_size(item, wraps, advances);
        for (item, node) in keyed.enumerate() {
            own.entry(node).or_default().push(item);
            let size = size_of(item);
            let mut cursor = Some(node);
            while let Some(n) = cursor {
                *below.entry(n).or_default() += size;
                cursor = tree.parent(n);
            }
        }
        Plan {
            tree,
            wraps,
            advances,
            own,
            below,
        }
    }

    fn size(&self, item: usize) -> usize {
        item_size(item, self.wraps, self.advances)
    }

    fn own_bytes(&self, node: NodeId) -> usize {
        self.own
            .get(&node)
            .map_or(0, |items| items.iter().map(|&i| self.size(i)).sum())
    }

    /// Bytes of the items opened by strict ancestors of `node`.
    fn above_bytes(&self, node: NodeId) -> usize {
        let mut total = 0;
        let mut cursor = self.tree.parent(node);
        while let Some(n) = cursor {
            total += self.own_bytes(n);
            cursor = self.tree.parent(n);
        }
        total
    }

    fn visit(&self, node: NodeId, budget: usize, entries: &mut Vec<NodeId>) -> Result<(), ()> {
        let above = self.above_bytes(node);
        let below = self.below.get(&node).copied().unwrap_or(0);
        let fits = above + below + 4 <= budget;
        // Small subtrees stay whole (few covers); large ones are split even when they fit, so
        // the greedy fill below can pack datagrams tightly.
        let small = below <= budget / 4 || below == self.own_bytes(node);
        if fits && (small || self.tree.is_member(node)) {
            entries.push(node);
            return Ok(());
        }
        if self.tree.is_member(node) {
            return Err(());
        }
        let quiet_above = above + self.own_bytes(node);
        for child in self.tree.children(node) {
            if self.below.contains_key(&child) {
                self.visit(child, budget, entries)?;
            } else if quiet_above + 4 <= budget {
                // Nothing is keyed below this child: its members need only the path above.
                entries.push(child);
            } else {
                return Err(());
            }
        }
        Ok(())
    }

    /// The items the members below a cover need.
    fn items(&self, cover: NodeId) -> Vec<usize> {
        let mut items = Vec::new();
        let mut cursor = Some(cover);
        while let Some(n) = cursor {
            items.extend(self.own.get(&n).into_iter().flatten());
            cursor = self.tree.parent(n);
        }
        let mut stack: Vec<NodeId> = self.tree.children(cover);
        while let Some(n) = stack.pop() {
            if !self.below.contains_key(&n) {
                continue;
            }
            items.extend(self.own.get(&n).into_iter().flatten());
            stack.extend(self.tree.children(n));
        }
        items
    }
}
