//! The key tree's structure: a node arena in fixed-size chunks, child lists, and the buckets that
//! find the shallowest vacant slot and the shallowest leaf in O(1).
//!
//! Layout. A node is 64 bytes (key 32, version 8, four 32-bit links, depth, child count, kind).
//! At degree 4 a tree holds about 4/3 nodes per member, so it costs about 85 bytes of node arena
//! plus 4 bytes of bucket entry per member; the arena grows in chunks of 16,384 nodes, never by
//! doubling. Members are named by their leaf's [`NodeId`], which stays the same for as long as the
//! member belongs (a split or a rebalancing move re-parents the leaf; it never renumbers it).
//!
//! Shape rules:
//! - The root is an internal node and never goes away.
//! - A join takes the shallowest vacant slot (a missing child of an internal node). Only when no
//!   slot is vacant does it split the shallowest leaf: a new internal node takes that leaf's
//!   place, with the old leaf and the joiner as its children.
//! - A leave removes the leaf. An internal node left with no children is removed too (up to the
//!   root). A node left with one child stays: its key is rekeyed like any other ancestor, and the
//!   next join fills the vacancy (no collapsing, so no member's path is renumbered by a leave).
//! - After a batch, if the height exceeds ceil(log_d n) + 1 (possible after many leaves), the
//!   deepest members are moved, one at a time, to the shallowest position (vacant slot or split),
//!   each move rekeyed as a leave from the old place and an arrival at the new one.

use zeroize::Zeroize;

use crate::ids::{KeyVersion, NodeId};
use crate::secret::{KEY_LEN, NodeKey};

pub(crate) const NIL: u32 = u32::MAX;
const CHUNK_BITS: u32 = 14;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;
const CHUNK_MASK: u32 = (1 << CHUNK_BITS) - 1;

/// The deepest a node may sit. The height rule keeps real trees far shallower (at d = 2 and
/// 2^31 nodes, 32); this bounds paths on the wire.
pub const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Free,
    Leaf,
    Internal,
}

#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) key: [u8; KEY_LEN],
    pub(crate) version: u64,
    pub(crate) parent: u32,
    pub(crate) first_child: u32,
    pub(crate) next_sibling: u32,
    /// Position in the bucket (leaves by depth, or open internal nodes by depth), or NIL.
    pub(crate) slot: u32,
    pub(crate) depth: u8,
    pub(crate) children: u8,
    pub(crate) kind: Kind,
    /// Listed in [`Shape::touched`] (only while changes are tracked).
    touched: bool,
    /// Its value before the open stage is kept in [`Shape::journal`].
    journaled: bool,
}

const FREE_NODE: Node = Node {
    key: [0; KEY_LEN],
    version: 0,
    parent: NIL,
    first_child: NIL,
    next_sibling: NIL,
    slot: NIL,
    depth: 0,
    children: 0,
    kind: Kind::Free,
    touched: false,
    journaled: false,
};

impl Node {
    pub(crate) fn node_key(&self) -> NodeKey {
        NodeKey::from_bytes(self.key)
    }
}

/// Nodes in chunks of 16,384, so growth never copies the whole tree nor doubles its memory.
#[derive(Default)]
pub(crate) struct Arena {
    chunks: Vec<Box<[Node]>>,
    len: u32,
}

impl Arena {
    pub(crate) fn len(&self) -> u32 {
        self.len
    }

    pub(crate) fn get(&self, id: u32) -> Option<&Node> {
        if id >= self.len {
            return None;
        }
        self.chunks
            .get((id >> CHUNK_BITS) as usize)?
            .get((id & CHUNK_MASK) as usize)
    }

    pub(crate) fn node(&self, id: u32) -> &Node {
        &self.chunks[(id >> CHUNK_BITS) as usize][(id & CHUNK_MASK) as usize]
    }

    pub(crate) fn node_mut(&mut self, id: u32) -> &mut Node {
        &mut self.chunks[(id >> CHUNK_BITS) as usize][(id & CHUNK_MASK) as usize]
    }

    fn push(&mut self) -> u32 {
        if (self.len as usize).is_multiple_of(CHUNK_LEN) {
            self.chunks
                .push(vec![FREE_NODE; CHUNK_LEN].into_boxed_slice());
        }
        self.len += 1;
        self.len - 1
    }

    pub(crate) fn bytes(&self) -> usize {
        self.chunks.len() * CHUNK_LEN * size_of::<Node>()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        for chunk in &mut self.chunks {
            for node in chunk.iter_mut() {
                node.key.zeroize();
            }
        }
    }
}

/// The bare structure of a tree: nodes, links and buckets. Keys are set by the rekey logic.
pub(crate) struct Shape {
    pub(crate) degree: u8,
    pub(crate) nodes: Arena,
    free: Vec<u32>,
    /// Ids freed during the current batch; reusable only from the next batch on.
    pending_free: Vec<u32>,
    leaves_by_depth: Vec<Vec<u32>>,
    open_by_depth: Vec<Vec<u32>>,
    pub(crate) members: usize,
    /// Whether node changes are recorded in `touched` (see [`Shape::take_touched`]).
    track: bool,
    /// Nodes whose persisted fields (parent, kind, version, key) changed since the last take.
    touched: Vec<u32>,
    /// What the open stage keeps, if one is open.
    journal: Option<Stage>,
}

/// What a stage keeps to undo itself.
#[derive(Default)]
pub(crate) struct Stage {
    /// Each changed node's record from before the stage (`None` for a node that was free), in
    /// the order first changed.
    pub(crate) kept: Vec<(u32, Option<Record>)>,
    /// How many entries of [`Shape::touched`] predate the stage (and have not been taken since).
    pub(crate) touched_before: usize,
}

/// A node as persisted: (id, parent, kind, version, key).
pub(crate) type Record = (u32, u32, Kind, u64, NodeKey);

/// Where a join or a move lands.
#[derive(Clone, Copy)]
pub(crate) enum Position {
    /// A vacant slot under this internal node.
    Under(u32),
    /// Split this leaf.
    Split(u32),
}

impl Shape {
    /// A tree holding only its root.
    pub(crate) fn new(degree: u8, root_key: &NodeKey) -> Self {
        let mut shape = Shape {
            degree,
            nodes: Arena::default(),
            free: Vec::new(),
            pending_free: Vec::new(),
            leaves_by_depth: vec![Vec::new(); MAX_DEPTH + 1],
            open_by_depth: vec![Vec::new(); MAX_DEPTH + 1],
            members: 0,
            track: false,
            touched: Vec::new(),
            journal: None,
        };
        let root = shape.alloc(Kind::Internal, 0);
        debug_assert_eq!(root, NodeId::ROOT.0);
        shape.set_key(root, root_key, KeyVersion(0));
        shape
    }

    pub(crate) fn is_leaf(&self, id: NodeId) -> bool {
        self.nodes.get(id.0).is_some_and(|n| n.kind == Kind::Leaf)
    }

    pub(crate) fn set_key(&mut self, id: u32, key: &NodeKey, version: KeyVersion) {
        self.keep_old(id);
        let node = self.nodes.node_mut(id);
        node.key = *key.as_bytes();
        node.version = version.0;
        self.touch(id);
    }

    /// Whether changed nodes are recorded.
    pub(crate) fn tracking(&self) -> bool {
        self.track
    }

    /// Starts recording changed nodes (idempotent).
    pub(crate) fn track(&mut self) {
        self.track = true;
    }

    /// Opens a stage: from now on each node's persisted fields are kept before they first change,
    /// until [`Shape::close_stage`].
    pub(crate) fn open_stage(&mut self) {
        self.journal = Some(Stage {
            kept: Vec::new(),
            touched_before: self.touched.len(),
        });
    }

    /// Closes the open stage and returns what it kept (nothing when none was open).
    pub(crate) fn close_stage(&mut self) -> Stage {
        let journal = self.journal.take().unwrap_or_default();
        for &(id, _) in &journal.kept {
            if self.nodes.get(id).is_some_and(|node| node.journaled) {
                self.nodes.node_mut(id).journaled = false;
            }
        }
        journal
    }

    /// Keeps `id`'s persisted fields, before a change, if a stage is open and they are not kept
    /// yet. An id at or beyond the arena's end was free.
    fn keep_old(&mut self, id: u32) {
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let Some(node) = self.nodes.get(id) else {
            journal.kept.push((id, None));
            return;
        };
        if node.journaled {
            return;
        }
        let record = (node.kind != Kind::Free)
            .then(|| (id, node.parent, node.kind, node.version, node.node_key()));
        journal.kept.push((id, record));
        self.nodes.node_mut(id).journaled = true;
    }

    /// Lists `ids` as touched again (after a rebuild that forgot them), growing the arena with free
    /// ids where one lies beyond it, so that a removal not yet taken is still reported.
    pub(crate) fn retouch(&mut self, ids: &[u32]) {
        for &id in ids {
            while self.nodes.len() <= id {
                let free = self.nodes.push();
                self.free.push(free);
            }
            self.touch(id);
        }
    }

    /// The ids listed as touched, in the order first changed.
    pub(crate) fn touched_ids(&self) -> &[u32] {
        &self.touched
    }

    /// Records that `id`'s persisted fields changed (once until the next take).
    fn touch(&mut self, id: u32) {
        if !self.track {
            return;
        }
        let node = self.nodes.node_mut(id);
        if !node.touched {
            node.touched = true;
            self.touched.push(id);
        }
    }

    /// The nodes changed (or freed) since the last call, ascending; clears the record.
    pub(crate) fn take_touched(&mut self) -> Vec<u32> {
        if let Some(stage) = self.journal.as_mut() {
            stage.touched_before = 0;
        }
        let mut ids = std::mem::take(&mut self.touched);
        for &id in &ids {
            self.nodes.node_mut(id).touched = false;
        }
        ids.sort_unstable();
        ids
    }

    /// Children of `id`, in list order (none for an id outside the arena, such as [`NIL`]).
    pub(crate) fn children(&self, id: u32) -> Children<'_> {
        Children {
            nodes: &self.nodes,
            next: self.nodes.get(id).map_or(NIL, |n| n.first_child),
        }
    }

    /// Ids that can be allocated without reaching [`NodeId::LIMIT`].
    pub(crate) fn spare_ids(&self) -> u64 {
        u64::from(NodeId::LIMIT - self.nodes.len()) + self.free.len() as u64
    }

    fn alloc(&mut self, kind: Kind, depth: u8) -> u32 {
        let id = match self.free.pop() {
            Some(id) => id,
            None => self.nodes.push(),
        };
        self.keep_old(id);
        let node = self.nodes.node_mut(id);
        // A freed id taken again keeps its places in the lists of touched and kept nodes.
        let (touched, journaled) = (node.touched, node.journaled);
        *node = FREE_NODE;
        node.touched = touched;
        node.journaled = journaled;
        node.kind = kind;
        node.depth = depth;
        self.bucket_refresh(id);
        self.touch(id);
        id
    }

    /// Rebuilds a shape from records listed parents first (the root, id 0, first). Checks every
    /// link: ids below the limit and unique, parents present and internal, no more than `degree`
    /// children, depth within [`MAX_DEPTH`], no empty internal node but the root.
    pub(crate) fn restore(degree: u8, records: &[Record]) -> Option<Self> {
        let max = records.iter().map(|r| r.0).max()?;
        if max >= NodeId::LIMIT || records.first()?.0 != NodeId::ROOT.0 {
            return None;
        }
        let mut shape = Shape {
            degree,
            nodes: Arena::default(),
            free: Vec::new(),
            pending_free: Vec::new(),
            leaves_by_depth: vec![Vec::new(); MAX_DEPTH + 1],
            open_by_depth: vec![Vec::new(); MAX_DEPTH + 1],
            members: 0,
            track: false,
            touched: Vec::new(),
            journal: None,
        };
        while shape.nodes.len() <= max {
            shape.nodes.push();
        }
        for (i, (id, parent, kind, version, key)) in records.iter().enumerate() {
            let (id, parent, kind) = (*id, *parent, *kind);
            // A parent is a node placed before this one (never the node itself), so no cycle.
            if kind == Kind::Free || parent == id || shape.nodes.node(id).kind != Kind::Free {
                return None;
            }
            let node = shape.nodes.node_mut(id);
            node.kind = kind;
            node.version = *version;
            node.key = *key.as_bytes();
            if i == 0 {
                if kind != Kind::Internal || parent != NIL {
                    return None;
                }
                shape.bucket_refresh(id);
                continue;
            }
            let p = shape.nodes.get(parent)?;
            if p.kind != Kind::Internal || p.children >= degree || usize::from(p.depth) >= MAX_DEPTH
            {
                return None;
            }
            shape.attach(parent, id);
            if kind == Kind::Leaf {
                shape.members += 1;
            }
        }
        let empty_internal = (1..=max).any(|id| {
            let n = shape.nodes.node(id);
            n.kind == Kind::Internal && n.children == 0
        });
        if empty_internal {
            return None;
        }
        shape.free = (1..=max)
            .filter(|&id| shape.nodes.node(id).kind == Kind::Free)
            .collect();
        Some(shape)
    }

    /// Live nodes, parents before children, as (id, parent, kind, version, key).
    pub(crate) fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.nodes.len() as usize);
        let mut stack = vec![NodeId::ROOT.0];
        while let Some(id) = stack.pop() {
            let n = self.nodes.node(id);
            out.push((id, n.parent, n.kind, n.version, n.node_key()));
            stack.extend(self.children(id));
        }
        out
    }

    /// Frees a detached node; its id becomes reusable after [`Shape::end_batch`].
    fn release(&mut self, id: u32) {
        self.keep_old(id);
        self.bucket_remove(id);
        let node = self.nodes.node_mut(id);
        node.key.zeroize();
        node.kind = Kind::Free;
        node.parent = NIL;
        node.first_child = NIL;
        node.next_sibling = NIL;
        node.children = 0;
        self.pending_free.push(id);
        self.touch(id);
    }

    pub(crate) fn end_batch(&mut self) {
        self.free.append(&mut self.pending_free);
    }

    fn attach(&mut self, parent: u32, child: u32) {
        let depth = self.nodes.node(parent).depth + 1;
        let head = self.nodes.node(parent).first_child;
        self.keep_old(child);
        self.bucket_remove(child);
        {
            let node = self.nodes.node_mut(child);
            node.parent = parent;
            node.next_sibling = head;
            node.depth = depth;
        }
        self.touch(child);
        let p = self.nodes.node_mut(parent);
        p.first_child = child;
        p.children += 1;
        self.bucket_refresh(child);
        self.bucket_refresh(parent);
    }

    fn detach(&mut self, child: u32) -> u32 {
        self.keep_old(child);
        let parent = self.nodes.node(child).parent;
        let after = self.nodes.node(child).next_sibling;
        if self.nodes.node(parent).first_child == child {
            self.nodes.node_mut(parent).first_child = after;
        } else {
            let mut cursor = self.nodes.node(parent).first_child;
            while self.nodes.node(cursor).next_sibling != child {
                cursor = self.nodes.node(cursor).next_sibling;
            }
            self.nodes.node_mut(cursor).next_sibling = after;
        }
        let node = self.nodes.node_mut(child);
        node.parent = NIL;
        node.next_sibling = NIL;
        self.nodes.node_mut(parent).children -= 1;
        self.bucket_refresh(parent);
        parent
    }

    /// Adds a member leaf at `position`; returns the leaf and, for a split, the new internal node.
    pub(crate) fn insert_leaf(&mut self, position: Position) -> (u32, Option<u32>) {
        let leaf = self.alloc(Kind::Leaf, 0);
        self.members += 1;
        let split = self.place(leaf, position);
        (leaf, split)
    }

    /// Attaches the detached leaf `leaf` at `position`; returns the new internal node of a split.
    pub(crate) fn place(&mut self, leaf: u32, position: Position) -> Option<u32> {
        match position {
            Position::Under(parent) => {
                self.attach(parent, leaf);
                None
            }
            Position::Split(old) => {
                let parent = self.detach(old);
                let depth = self.nodes.node(old).depth;
                let split = self.alloc(Kind::Internal, depth);
                self.attach(parent, split);
                self.attach(split, old);
                self.attach(split, leaf);
                Some(split)
            }
        }
    }

    /// Removes a member's leaf and every ancestor it leaves empty; returns the lowest remaining
    /// ancestor.
    pub(crate) fn remove_leaf(&mut self, leaf: u32) -> u32 {
        let parent = self.take_leaf(leaf);
        self.release(leaf);
        self.members -= 1;
        parent
    }

    /// Detaches a leaf (to move it) and prunes emptied ancestors; returns the lowest remaining one.
    pub(crate) fn take_leaf(&mut self, leaf: u32) -> u32 {
        let mut parent = self.detach(leaf);
        self.bucket_remove(leaf);
        while parent != NodeId::ROOT.0 && self.nodes.node(parent).children == 0 {
            let up = self.detach(parent);
            self.release(parent);
            parent = up;
        }
        parent
    }

    /// The join rule: the shallowest vacant slot; a split of the shallowest leaf only when full.
    pub(crate) fn join_position(&self) -> Position {
        match self.shallowest(&self.open_by_depth) {
            Some((_, open)) => Position::Under(open),
            None => self.shallowest_leaf_split(),
        }
    }

    /// The rebalancing rule: whichever of a vacant slot and a split sits shallower.
    pub(crate) fn shallowest_position(&self) -> Position {
        let open = self.shallowest(&self.open_by_depth);
        let leaf = self.shallowest(&self.leaves_by_depth);
        match (open, leaf) {
            (Some((open_depth, open)), Some((leaf_depth, _))) if open_depth <= leaf_depth => {
                Position::Under(open)
            }
            (Some((_, open)), None) => Position::Under(open),
            _ => self.shallowest_leaf_split(),
        }
    }

    fn shallowest_leaf_split(&self) -> Position {
        match self.shallowest(&self.leaves_by_depth) {
            Some((_, leaf)) => Position::Split(leaf),
            // No leaf and no vacancy cannot happen: an empty root is open.
            None => Position::Under(NodeId::ROOT.0),
        }
    }

    fn shallowest(&self, buckets: &[Vec<u32>]) -> Option<(usize, u32)> {
        buckets
            .iter()
            .enumerate()
            .find_map(|(depth, bucket)| bucket.last().map(|&id| (depth, id)))
    }

    /// Depth of the deepest leaf (0 for an empty tree).
    pub(crate) fn height(&self) -> usize {
        self.leaves_by_depth
            .iter()
            .rposition(|bucket| !bucket.is_empty())
            .unwrap_or(0)
    }

    /// Some leaf at the deepest level.
    pub(crate) fn deepest_leaf(&self) -> Option<u32> {
        self.leaves_by_depth.get(self.height())?.last().copied()
    }

    fn bucket_of(&mut self, id: u32) -> Option<&mut Vec<u32>> {
        let node = self.nodes.node(id);
        let depth = usize::from(node.depth);
        match node.kind {
            Kind::Leaf => self.leaves_by_depth.get_mut(depth),
            Kind::Internal if node.children < self.degree => self.open_by_depth.get_mut(depth),
            _ => None,
        }
    }

    fn bucket_remove(&mut self, id: u32) {
        let slot = self.nodes.node(id).slot;
        if slot == NIL {
            return;
        }
        let (depth, kind) = (self.nodes.node(id).depth, self.nodes.node(id).kind);
        let buckets = if kind == Kind::Leaf {
            &mut self.leaves_by_depth
        } else {
            &mut self.open_by_depth
        };
        let bucket = &mut buckets[usize::from(depth)];
        bucket.swap_remove(slot as usize);
        if let Some(&moved) = bucket.get(slot as usize) {
            self.nodes.node_mut(moved).slot = slot;
        }
        self.nodes.node_mut(id).slot = NIL;
    }

    /// Puts `id` in the bucket its kind, depth and child count call for.
    fn bucket_refresh(&mut self, id: u32) {
        self.bucket_remove(id);
        let Some(bucket) = self.bucket_of(id) else {
            return;
        };
        let slot = u32::try_from(bucket.len()).unwrap_or(NIL);
        bucket.push(id);
        self.nodes.node_mut(id).slot = slot;
    }

    pub(crate) fn bucket_bytes(&self) -> usize {
        self.leaves_by_depth
            .iter()
            .chain(&self.open_by_depth)
            .chain([&self.free, &self.pending_free])
            .map(|bucket| bucket.capacity() * size_of::<u32>())
            .sum()
    }
}

/// Iterator over a node's children.
pub(crate) struct Children<'a> {
    nodes: &'a Arena,
    next: u32,
}

impl Iterator for Children<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.next == NIL {
            return None;
        }
        let current = self.next;
        self.next = self.nodes.node(current).next_sibling;
        Some(current)
    }
}
