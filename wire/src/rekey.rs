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
    Applied, ApplyError, Encryption, Epoch, GroupId, KCV_LEN, Kcv, KeyTree, Link, MemberPath,
    NodeId, PathUpdate, Rekey, RekeySalt, SALT_LEN, Strategy, WRAPPED_LEN, Wrap,
};

use crate::codec::{Codec, DecodeError, Reader, put_varint, varint_len};
use crate::error::WireError;
use crate::held::HeldPath;
use crate::message::{HEADER_LEN, Header, MessageType};
use crate::signed::{self, SIGNATURE_LEN, Unverified};

/// Default MTU: under the IPv6 minimum of 1280 with room for IP and UDP headers.
pub const DEFAULT_MTU: usize = 1200;
/// Largest datagram the codec accepts (the UDP maximum over IPv4).
pub const MAX_DATAGRAM: usize = 65_507;
/// Most covers in one datagram.
pub const MAX_COVERS: usize = 255;
/// Most items (wraps, links, advances) in one datagram: each takes at least a byte.
pub const MAX_ITEMS: usize = MAX_DATAGRAM;
/// Bytes of a datagram with no covers and no items, its counts one byte each (header, epoch,
/// salt, key check value, index, count, flags, two counts, signature).
pub const DATAGRAM_OVERHEAD: usize =
    HEADER_LEN + 8 + SALT_LEN + KCV_LEN + 1 + 1 + 1 + 1 + 1 + SIGNATURE_LEN;
const FLAG_SEEDS: u8 = 1;

/// The kind of an item, in the low two bits of its head.
const KIND_WRAP_OLD: u64 = 0;
const KIND_WRAP_NEW: u64 = 1;
const KIND_LINK: u64 = 2;
const KIND_ADVANCE: u64 = 3;
/// The head bit saying a target node follows.
const NEW_TARGET: u64 = 1 << 2;

/// One entry of a rekey datagram, in the order the datagram carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A new key (or one-way seed) wrapped under a key members may hold.
    Wrap(Wrap),
    /// A one-way link: the parent's seed continues the child's.
    Link(Link),
    /// A key advanced by hash-forward (members derive it from the key they hold).
    Advance(NodeId),
}

/// What the codec needs of an item, borrowed (from a decoded [`Item`] or from the controller's
/// [`Rekey`], so that the packer can size items without building them).
#[derive(Clone, Copy)]
struct ItemView<'a> {
    /// The node whose key opens the item.
    opener: NodeId,
    /// The node whose key it sets (none for an advance: the opener's own).
    target: Option<NodeId>,
    kind: u64,
    ciphertext: Option<&'a [u8; WRAPPED_LEN]>,
}

impl Item {
    fn view(&self) -> ItemView<'_> {
        match self {
            Item::Wrap(w) => ItemView {
                opener: w.wrapping,
                target: Some(w.target),
                kind: if w.under_new {
                    KIND_WRAP_NEW
                } else {
                    KIND_WRAP_OLD
                },
                ciphertext: Some(&w.ciphertext),
            },
            Item::Link(l) => ItemView {
                opener: l.child,
                target: Some(l.parent),
                kind: KIND_LINK,
                ciphertext: None,
            },
            Item::Advance(node) => ItemView {
                opener: *node,
                target: None,
                kind: KIND_ADVANCE,
                ciphertext: None,
            },
        }
    }
}

/// Where encoded bytes go: a buffer, or a tally of their length.
trait Out {
    fn bytes(&mut self, bytes: &[u8]);
    fn varint(&mut self, value: u64);
}

impl Out for Vec<u8> {
    fn bytes(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn varint(&mut self, value: u64) {
        put_varint(self, value);
    }
}

/// Counts bytes instead of writing them.
#[derive(Default)]
struct Tally(usize);

impl Out for Tally {
    fn bytes(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn varint(&mut self, value: u64) {
        self.0 += varint_len(value);
    }
}

fn zigzag(delta: i64) -> u64 {
    ((delta << 1) ^ (delta >> 63)).cast_unsigned()
}

fn unzigzag(value: u64) -> i64 {
    (value >> 1).cast_signed() ^ -(value & 1).cast_signed()
}

/// The delta coding of node references: each node relative to the one before it.
#[derive(Clone, Copy, Default)]
struct Cursor {
    opener: i64,
    target: Option<NodeId>,
}

impl Cursor {
    fn put<O: Out>(&mut self, out: &mut O, item: ItemView<'_>) {
        let opener = i64::from(item.opener.0);
        let new_target = item.target.is_some() && item.target != self.target;
        let head =
            zigzag(opener - self.opener) << 3 | if new_target { NEW_TARGET } else { 0 } | item.kind;
        out.varint(head);
        if let (true, Some(target)) = (new_target, item.target) {
            out.varint(u64::from(target.0));
        }
        if let Some(ciphertext) = item.ciphertext {
            out.bytes(ciphertext);
        }
        self.opener = opener;
        if item.target.is_some() {
            self.target = item.target;
        }
    }

    fn read(&mut self, r: &mut Reader<'_>) -> Result<Item, DecodeError> {
        let head = r.varint("item")?;
        let opener = self.opener.saturating_add(unzigzag(head >> 3));
        let opener = u32::try_from(opener)
            .ok()
            .filter(|&id| id < NodeId::LIMIT)
            .map(NodeId)
            .ok_or(DecodeError::Invalid("item node"))?;
        self.opener = i64::from(opener.0);
        let kind = head & 3;
        if kind == KIND_ADVANCE {
            if head & NEW_TARGET != 0 {
                return Err(DecodeError::Invalid("advance with a target"));
            }
            return Ok(Item::Advance(opener));
        }
        if head & NEW_TARGET != 0 {
            let id = r.varint_at_most(u64::from(NodeId::LIMIT - 1), "item target")?;
            let target =
                NodeId(u32::try_from(id).map_err(|_| DecodeError::Invalid("item target"))?);
            // A target is named only when it changes: one encoding per datagram.
            if self.target == Some(target) {
                return Err(DecodeError::Invalid("item target named again"));
            }
            self.target = Some(target);
        }
        let target = self.target.ok_or(DecodeError::Invalid("item target"))?;
        Ok(match kind {
            KIND_LINK => Item::Link(Link {
                child: opener,
                parent: target,
            }),
            _ => Item::Wrap(Wrap {
                target,
                wrapping: opener,
                under_new: kind == KIND_WRAP_NEW,
                ciphertext: r.array("wrapped key")?,
            }),
        })
    }
}

/// One datagram of a rekey, decoded (not yet authenticated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyDatagram {
    /// The group.
    pub group: GroupId,
    /// The rekey's epoch.
    pub epoch: Epoch,
    /// The rekey's salt, in every wrap pad (the same in every datagram of the rekey).
    pub salt: RekeySalt,
    /// The check value of the epoch's traffic key: a member uses what it unwraps only if it
    /// leads to this.
    pub kcv: Kcv,
    /// This datagram's index among the epoch's datagrams.
    pub index: u16,
    /// How many datagrams the epoch has.
    pub count: u16,
    /// Whether the wraps carry one-way seeds rather than keys.
    pub seeds: bool,
    /// Roots of the subtrees this datagram serves.
    pub covers: Vec<NodeId>,
    /// Wraps, links and advances, in the order the datagram carries them.
    pub items: Vec<Item>,
}

impl RekeyDatagram {
    fn write<O: Out>(&self, out: &mut O) {
        out.bytes(&Header::bytes(MessageType::Rekey, self.group));
        out.bytes(&self.epoch.0.to_be_bytes());
        out.bytes(&self.salt.0);
        out.bytes(&self.kcv.0);
        out.varint(u64::from(self.index));
        out.varint(u64::from(self.count));
        out.bytes(&[if self.seeds { FLAG_SEEDS } else { 0 }]);
        out.varint(self.covers.len() as u64);
        let mut previous = 0i64;
        for cover in &self.covers {
            out.varint(zigzag(i64::from(cover.0) - previous));
            previous = i64::from(cover.0);
        }
        out.varint(self.items.len() as u64);
        let mut cursor = Cursor::default();
        for item in &self.items {
            cursor.put(out, item.view());
        }
    }
}

impl Codec for RekeyDatagram {
    fn encode(&self, out: &mut Vec<u8>) {
        self.write(out);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Rekey)?;
        let epoch = Epoch(r.u64("epoch")?);
        let salt = RekeySalt(r.array("rekey salt")?);
        let kcv = Kcv(r.array("key check value")?);
        let index = r.varint_at_most(u64::from(u16::MAX), "datagram index")?;
        let count = r.varint_at_most(u64::from(u16::MAX), "datagram count")?;
        if index >= count {
            return Err(DecodeError::Invalid("datagram index"));
        }
        let seeds = match r.u8("flags")? {
            0 => false,
            FLAG_SEEDS => true,
            _ => return Err(DecodeError::Invalid("flags")),
        };
        let n = bounded_count(r, MAX_COVERS, "cover count")?;
        let mut covers = Vec::with_capacity(n);
        let mut previous = 0i64;
        for _ in 0..n {
            let id = previous.saturating_add(unzigzag(r.varint("cover")?));
            let id = u32::try_from(id)
                .ok()
                .filter(|&id| id < NodeId::LIMIT)
                .ok_or(DecodeError::Invalid("cover"))?;
            previous = i64::from(id);
            covers.push(NodeId(id));
        }
        let n = bounded_count(r, MAX_ITEMS, "item count")?;
        let mut items = Vec::with_capacity(n);
        let mut cursor = Cursor::default();
        for _ in 0..n {
            items.push(cursor.read(r)?);
        }
        Ok(RekeyDatagram {
            group,
            epoch,
            salt,
            kcv,
            index: u16::try_from(index).map_err(|_| DecodeError::Invalid("datagram index"))?,
            count: u16::try_from(count).map_err(|_| DecodeError::Invalid("datagram count"))?,
            seeds,
            covers,
            items,
        })
    }
}

/// A count of at least one-byte entries: at most `limit` and at most the bytes left, so the
/// caller may allocate it.
fn bounded_count(
    r: &mut Reader<'_>,
    limit: usize,
    what: &'static str,
) -> Result<usize, DecodeError> {
    let n = r.varint_at_most(limit as u64, what)?;
    let n = usize::try_from(n).map_err(|_| DecodeError::Invalid(what))?;
    if n > r.remaining() {
        return Err(DecodeError::Truncated(what));
    }
    Ok(n)
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
        let mut tally = Tally::default();
        self.write(&mut tally);
        tally.0 + SIGNATURE_LEN
    }

    /// Encodes and signs.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        signed::sign(self, key)
    }

    /// The wraps, in order.
    pub fn wraps(&self) -> impl Iterator<Item = &Wrap> + '_ {
        self.items.iter().filter_map(|i| match i {
            Item::Wrap(w) => Some(w),
            _ => None,
        })
    }

    /// The one-way links, in order.
    pub fn links(&self) -> impl Iterator<Item = &Link> + '_ {
        self.items.iter().filter_map(|i| match i {
            Item::Link(l) => Some(l),
            _ => None,
        })
    }

    /// The nodes advanced by hash-forward, in order.
    pub fn advances(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.items.iter().filter_map(|i| match i {
            Item::Advance(n) => Some(*n),
            _ => None,
        })
    }

    /// Whether this datagram serves the holder of `path`: a cover lies on its path, or a wrap is
    /// made under its leaf key (its path gained a node this epoch).
    pub fn serves(&self, path: &MemberPath) -> bool {
        let leaf = path.leaf();
        self.covers
            .iter()
            .any(|c| path.keys().iter().any(|k| k.node == *c))
            || self.wraps().any(|w| w.wrapping == leaf)
    }
}

/// A rekey datagram whose controller signature verified. Only [`AuthenticRekey::verify`] and
/// [`AuthenticRekey::check`] make one.
#[derive(Debug)]
pub struct AuthenticRekey(RekeyDatagram);

impl AuthenticRekey {
    /// Decodes (bounded) and verifies the controller's signature.
    pub fn verify(bytes: &[u8], controller: &VerifyingKey) -> Result<Self, WireError> {
        Self::check(signed::decode(bytes)?, controller)
    }

    /// Verifies a datagram decoded already (a member looks at the unverified header and covers
    /// first, to check only the signature of the datagram that serves it).
    pub fn check(
        unverified: Unverified<'_, RekeyDatagram>,
        controller: &VerifyingKey,
    ) -> Result<Self, WireError> {
        unverified
            .verify(controller)
            .map(|v| AuthenticRekey(v.into_message()))
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
    /// Applies the datagram to the path it was checked against: all or nothing, and only if the
    /// keys it yields lead to the datagram's key check value. A datagram that lacks a key of the
    /// member's path is [`WireError::NotForMe`] (another datagram of the epoch, or a resync,
    /// serves it).
    pub fn apply(self) -> Result<Applied, WireError> {
        let d = self.datagram;
        let path = self.path.keys_mut();
        let wraps: Vec<Wrap> = d.wraps().cloned().collect();
        let advances: Vec<NodeId> = d.advances().collect();
        let links: Vec<Link> = d.links().copied().collect();
        let update = PathUpdate {
            epoch: d.epoch,
            wraps: &wraps,
            advances: &advances,
            links: &links,
            seeds: d.seeds,
            salt: d.salt,
            kcv: d.kcv,
        };
        path.apply(&update).map_err(|e| match e {
            ApplyError::MissingKey(_) => WireError::NotForMe,
            other => WireError::Apply(other),
        })
    }
}

/// Lays a rekey out into datagrams of at most `mtu` bytes (unsigned).
///
/// Node references are delta-coded, so an item's size depends on its neighbours: the plan sizes
/// each item as it would sit in the whole rekey laid out in order, and every datagram is then
/// measured exactly. A datagram that came out larger than the MTU is split in two by its
/// covers; a single cover that does not fit makes the plan again with a smaller budget.
pub fn pack(rekey: &Rekey, tree: &KeyTree, mtu: usize) -> Result<Vec<RekeyDatagram>, WireError> {
    let mtu = mtu.min(MAX_DATAGRAM);
    let budget = mtu
        .checked_sub(DATAGRAM_OVERHEAD)
        .ok_or(WireError::MtuTooSmall(mtu))?;
    let plan = Plan::new(rekey, tree);
    for eighths in [8, 7, 6] {
        if let Some(mut datagrams) = plan.datagrams(rekey, budget * eighths / 8, mtu) {
            let count = u16::try_from(datagrams.len()).map_err(|_| WireError::MtuTooSmall(mtu))?;
            for (datagram, index) in datagrams.iter_mut().zip(0u16..) {
                (datagram.index, datagram.count) = (index, count);
            }
            return Ok(datagrams);
        }
    }
    Err(WireError::MtuTooSmall(mtu))
}

/// The covers and items of one datagram.
#[derive(Default)]
struct Bin {
    covers: Vec<NodeId>,
    items: Vec<usize>,
    bytes: usize,
}

impl Bin {
    /// The datagram, its items in the plan's order; index and count are set by [`pack`] (here
    /// their largest values, so that the size measured is an upper bound).
    fn datagram(mut self, plan: &Plan<'_>, rekey: &Rekey) -> RekeyDatagram {
        self.items
            .sort_unstable_by_key(|&i| plan.order.get(i).copied());
        let items = self
            .items
            .iter()
            .filter_map(|&item| {
                Some(match rekey_item(rekey, item)? {
                    RekeyItem::Wrap(e) => Item::Wrap(Wrap::from_encryption(e, rekey.epoch)),
                    RekeyItem::Advance(node) => Item::Advance(node),
                    RekeyItem::Link(link) => Item::Link(link),
                })
            })
            .collect();
        RekeyDatagram {
            group: rekey.group,
            epoch: rekey.epoch,
            salt: rekey.salt,
            kcv: rekey.kcv,
            index: u16::MAX - 1,
            count: u16::MAX,
            seeds: rekey.seeds,
            covers: self.covers,
            items,
        }
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

/// One of a [`Rekey`]'s items, borrowed.
enum RekeyItem<'a> {
    Wrap(&'a Encryption),
    Advance(NodeId),
    Link(Link),
}

/// The item a [`Rekey`]'s item number stands for (wraps first, then advances, then links).
fn rekey_item(rekey: &Rekey, item: usize) -> Option<RekeyItem<'_>> {
    let (wraps, advances) = (rekey.encryptions.len(), rekey.advances.len());
    if let Some(e) = rekey.encryptions.get(item) {
        return Some(RekeyItem::Wrap(e));
    }
    if let Some(a) = item.checked_sub(wraps).and_then(|i| rekey.advances.get(i)) {
        return Some(RekeyItem::Advance(a.node));
    }
    item.checked_sub(wraps + advances)
        .and_then(|i| rekey.links.get(i))
        .map(|l| RekeyItem::Link(*l))
}

/// What the codec needs of a [`Rekey`]'s item, without building it.
fn item_view(rekey: &Rekey, item: usize) -> Option<ItemView<'_>> {
    Some(match rekey_item(rekey, item)? {
        RekeyItem::Wrap(e) => encryption_view(e, rekey.epoch),
        RekeyItem::Advance(node) => ItemView {
            opener: node,
            target: None,
            kind: KIND_ADVANCE,
            ciphertext: None,
        },
        RekeyItem::Link(link) => ItemView {
            opener: link.child,
            target: Some(link.parent),
            kind: KIND_LINK,
            ciphertext: None,
        },
    })
}

fn encryption_view(e: &Encryption, epoch: Epoch) -> ItemView<'_> {
    ItemView {
        opener: e.wrapping,
        target: Some(e.target),
        kind: if e.under_new_key(epoch) {
            KIND_WRAP_NEW
        } else {
            KIND_WRAP_OLD
        },
        ciphertext: Some(&e.ciphertext),
    }
}

/// The order items take in a datagram, as one sort key per item: by target, in the order the
/// tree made its first wrap (so the wraps of one new key sit together and name it once), wraps
/// before links, and by the node that opens them (so siblings, whose ids are close, cost a byte
/// each); advances last.
///
/// User-oriented rekeys keep the order the tree made: there one key wraps the whole changed path
/// above it, nearest first, and members learn that chain from the order.
fn item_order(rekey: &Rekey, strategy: Strategy) -> Vec<u64> {
    let items = rekey.encryptions.len() + rekey.advances.len() + rekey.links.len();
    if strategy == Strategy::User {
        return (0..items as u64).collect();
    }
    let mut rank: HashMap<NodeId, u64> = HashMap::default();
    let mut rank_of = |node: NodeId| {
        let next = rank.len() as u64;
        *rank.entry(node).or_insert(next)
    };
    let key = |rank: u64, sub: u64, opener: NodeId| rank << 33 | sub << 31 | u64::from(opener.0);
    let mut order = Vec::with_capacity(items);
    for e in &rekey.encryptions {
        order.push(key(rank_of(e.target), 0, e.wrapping));
    }
    for a in &rekey.advances {
        order.push(key(u64::from(u32::MAX), 2, a.node));
    }
    for l in &rekey.links {
        order.push(key(rank_of(l.parent), 1, l.child));
    }
    order
}

/// Each item's encoded size when the whole rekey is laid out in `order`: the estimate the plan
/// works with.
fn item_sizes(rekey: &Rekey, order: &[u64]) -> Vec<usize> {
    let mut sorted: Vec<usize> = (0..order.len()).collect();
    sorted.sort_unstable_by_key(|&i| order.get(i).copied());
    let mut sizes = vec![0; order.len()];
    let mut cursor = Cursor::default();
    for item in sorted {
        let Some(view) = item_view(rekey, item) else {
            continue;
        };
        let mut tally = Tally::default();
        cursor.put(&mut tally, view);
        if let Some(size) = sizes.get_mut(item) {
            *size = tally.0;
        }
    }
    sizes
}

/// Bytes a cover is planned at (a delta-coded node id: 1 to 5 bytes, usually 1 to 3).
const COVER_ESTIMATE: usize = 3;

/// What each node's key is needed for: the items (wraps, then advances, then links) grouped by
/// the node whose key opens them, and the bytes of everything opened at or below each node.
///
/// Only nodes whose key opens an item, and their ancestors, have a [`Slot`], found by one walk up
/// from each such node that stops at the first node already found. `by_slot` lists the items
/// slot by slot in depth-first order (each node before its descendants), so the items opened in
/// a node's subtree are one run of it.
struct Plan<'a> {
    tree: &'a KeyTree,
    /// Each item's sort key in a datagram ([`item_order`]).
    order: Vec<u64>,
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
        let order = item_order(rekey, tree.config().strategy);
        let sizes = item_sizes(rekey, &order);
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
            found.add_item(slot, sizes.get(item).copied().unwrap_or(0));
            item_slots.push(slot);
        }
        found.into_plan(&item_slots, order)
    }

    /// The datagrams of a plan made with `budget` bytes for covers and items, each measured to
    /// fit `mtu`; `None` if a cover alone does not.
    fn datagrams(&self, rekey: &Rekey, budget: usize, mtu: usize) -> Option<Vec<RekeyDatagram>> {
        if let Some(whole) = self.whole(rekey, budget, mtu) {
            return Some(vec![whole]);
        }
        // Not whole: even a single bin of these covers would not fit (its items are the whole
        // rekey's), so every bin keeps its covers and is settled on its own.
        let covers = self.covers(budget)?;
        let bins = self.fill(&covers, budget);
        let mut out = Vec::with_capacity(bins.len());
        for bin in bins {
            self.settle(rekey, bin, budget, mtu, &mut out)?;
        }
        Some(out)
    }

    /// The covers of a plan with `budget` bytes for covers and items; `None` if a member's needs
    /// alone exceed it.
    fn covers(&self, budget: usize) -> Option<Vec<NodeId>> {
        let mut covers = Vec::new();
        self.visit(
            NodeId::ROOT,
            self.slot(NodeId::ROOT),
            0,
            budget,
            &mut covers,
        )
        .ok()?;
        Some(covers)
    }

    /// The whole rekey as one datagram serving every member (its cover the root), if it fits:
    /// tried when the estimate comes near the budget, since estimates are not exact.
    fn whole(&self, rekey: &Rekey, budget: usize, mtu: usize) -> Option<RekeyDatagram> {
        let total = self.slot(NodeId::ROOT).map_or(0, |s| s.below);
        if total > budget + budget / 8 {
            return None;
        }
        let bin = Bin {
            covers: vec![NodeId::ROOT],
            items: (0..self.order.len()).collect(),
            bytes: total,
        };
        let datagram = bin.datagram(self, rekey);
        (datagram.wire_len() <= mtu).then_some(datagram)
    }

    /// Keeps a bin's datagram if it fits `mtu`, else splits its covers in two and settles each
    /// half; `None` if a single cover does not fit.
    fn settle(
        &self,
        rekey: &Rekey,
        bin: Bin,
        budget: usize,
        mtu: usize,
        out: &mut Vec<RekeyDatagram>,
    ) -> Option<()> {
        let covers = bin.covers.clone();
        let datagram = bin.datagram(self, rekey);
        if datagram.wire_len() <= mtu {
            out.push(datagram);
            return Some(());
        }
        if covers.len() < 2 {
            return None;
        }
        let (first, second) = covers.split_at(covers.len() / 2);
        for half in [first, second] {
            for bin in self.fill(half, budget) {
                self.settle(rekey, bin, budget, mtu, out)?;
            }
        }
        Some(())
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
        let fits = above + below + COVER_ESTIMATE <= budget;
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
            } else if above + own + COVER_ESTIMATE <= budget {
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
                COVER_ESTIMATE
                    + below
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
    fn into_plan(mut self, item_slots: &[usize], item_order: Vec<u64>) -> Plan<'a> {
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
            order: item_order,
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
