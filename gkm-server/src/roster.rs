//! The members of one group, stored densely by leaf: a member's id is its leaf and the epoch it
//! joined in (`leaf << 32 | epoch mod 2^32`), so no id → record map is needed, and a departed
//! member's id never names the member that later takes its leaf. Identities are indexed by a
//! keyed 64-bit fingerprint (the key is random per process, so fingerprints cannot be aimed at
//! a collision); the full key is compared on every hit. About 150 bytes per member at degree 4
//! (an 88-byte slot per tree node id that is a leaf or not, and the index).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};

use lkh_tree::{Epoch, NodeId};
use serde::Serialize;
use wire::MemberId;

use crate::policy::Timestamp;
use crate::store::{HpkeDigest, MemberRecord};

#[derive(Clone)]
struct Slot {
    identity: [u8; 32],
    hpke: HpkeDigest,
    joined: u64,
    lease_until: Timestamp,
    /// Listed in `changed` (cleared by [`Roster::take_changes`]).
    changed: bool,
}

/// A group's members.
pub(crate) struct Roster {
    slots: Vec<Option<Slot>>,
    identities: HashMap<u64, u32>,
    fingerprint: RandomState,
    len: usize,
    /// Leaves whose record was added, changed or removed since the last take (a leaf at most
    /// once while its slot is held; a removed and refilled leaf may repeat until the take).
    changed: Vec<u32>,
}

impl Roster {
    pub(crate) fn new(records: Vec<MemberRecord>) -> Self {
        let highest = records
            .iter()
            .map(|r| r.leaf.0 as usize + 1)
            .max()
            .unwrap_or(0);
        let mut roster = Roster {
            slots: Vec::with_capacity(highest),
            identities: HashMap::new(),
            fingerprint: RandomState::new(),
            len: 0,
            changed: Vec::new(),
        };
        for r in records {
            roster.insert(r.leaf, r.identity, r.hpke, r.joined, r.lease_until);
        }
        // The restored records are the stored ones: nothing to save.
        roster.take_changed_leaves();
        roster
    }

    /// Notes that the record at `leaf` changed.
    fn mark(&mut self, leaf: usize) {
        if let Some(Some(slot)) = self.slots.get_mut(leaf) {
            if slot.changed {
                return;
            }
            slot.changed = true;
        }
        self.changed.push(u32::try_from(leaf).unwrap_or(u32::MAX));
    }

    /// The leaves changed since the last take, ascending, each once; clears the record.
    fn take_changed_leaves(&mut self) -> Vec<u32> {
        let mut leaves = std::mem::take(&mut self.changed);
        leaves.sort_unstable();
        leaves.dedup();
        for &leaf in &leaves {
            if let Some(Some(slot)) = self.slots.get_mut(leaf as usize) {
                slot.changed = false;
            }
        }
        leaves
    }

    /// The records added or changed since the last take, and the leaves whose record is gone.
    pub(crate) fn take_changes(&mut self) -> (Vec<MemberRecord>, Vec<NodeId>) {
        let mut records = Vec::new();
        let mut removed = Vec::new();
        for leaf in self.take_changed_leaves() {
            match self.record(leaf as usize) {
                Some(record) => records.push(record),
                None => removed.push(NodeId(leaf)),
            }
        }
        (records, removed)
    }

    /// The id of the member that joined at `leaf` in epoch `joined`.
    pub(crate) fn id(leaf: NodeId, joined: u64) -> MemberId {
        MemberId((u64::from(leaf.0) << 32) | (joined & 0xffff_ffff))
    }

    fn index(&self, id: MemberId) -> Option<usize> {
        let leaf = usize::try_from(id.0 >> 32).ok()?;
        let slot = self.slots.get(leaf)?.as_ref()?;
        (Self::id(NodeId(u32::try_from(leaf).ok()?), slot.joined) == id).then_some(leaf)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn contains(&self, id: MemberId) -> bool {
        self.index(id).is_some()
    }

    pub(crate) fn get(&self, id: MemberId) -> Option<MemberRecord> {
        let leaf = self.index(id)?;
        self.record(leaf)
    }

    /// Extends a member's lease.
    pub(crate) fn renew(&mut self, id: MemberId, until: Timestamp) -> bool {
        let Some(leaf) = self.index(id) else {
            return false;
        };
        if let Some(Some(slot)) = self.slots.get_mut(leaf) {
            slot.lease_until = until;
        }
        self.mark(leaf);
        true
    }

    pub(crate) fn by_identity(&self, identity: &[u8; 32]) -> Option<MemberId> {
        let leaf = *self.identities.get(&self.fingerprint.hash_one(identity))?;
        let record = self.record(usize::try_from(leaf).ok()?)?;
        (record.identity == *identity).then_some(record.id)
    }

    pub(crate) fn insert(
        &mut self,
        leaf: NodeId,
        identity: [u8; 32],
        hpke: HpkeDigest,
        joined: u64,
        lease_until: Timestamp,
    ) -> MemberId {
        let index = usize::try_from(leaf.0).unwrap_or(usize::MAX);
        if self.slots.len() <= index {
            // Grow by an eighth, not by doubling: at a million members a doubled vector would
            // hold a hundred bytes per member of empty slots.
            let want = index + 1;
            if want > self.slots.capacity() {
                let more = (want - self.slots.len()).max(self.slots.len() / 8);
                self.slots.reserve_exact(more);
            }
            self.slots.resize(want, None);
        }
        if let Some(slot) = self.slots.get_mut(index) {
            if slot.is_none() {
                self.len += 1;
            }
            *slot = Some(Slot {
                identity,
                hpke,
                joined,
                lease_until,
                changed: false,
            });
        }
        self.mark(index);
        self.identities
            .insert(self.fingerprint.hash_one(identity), leaf.0);
        Self::id(leaf, joined)
    }

    pub(crate) fn remove(&mut self, id: MemberId) -> Option<MemberRecord> {
        let leaf = self.index(id)?;
        let record = self.record(leaf)?;
        if let Some(slot) = self.slots.get_mut(leaf) {
            *slot = None;
        }
        self.mark(leaf);
        self.len -= 1;
        let key = self.fingerprint.hash_one(record.identity);
        if self.identities.get(&key) == Some(&record.leaf.0) {
            self.identities.remove(&key);
        }
        Some(record)
    }

    fn record(&self, leaf: usize) -> Option<MemberRecord> {
        let slot = self.slots.get(leaf)?.as_ref()?;
        let leaf = NodeId(u32::try_from(leaf).ok()?);
        Some(MemberRecord {
            id: Self::id(leaf, slot.joined),
            identity: slot.identity,
            hpke: slot.hpke,
            leaf,
            joined: slot.joined,
            lease_until: slot.lease_until,
        })
    }

    /// Every member, by leaf.
    pub(crate) fn records(&self) -> impl Iterator<Item = MemberRecord> + '_ {
        (0..self.slots.len()).filter_map(|leaf| self.record(leaf))
    }

    /// Members whose lease ended by `now`.
    pub(crate) fn expired(&self, now: Timestamp) -> Vec<MemberId> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(leaf, slot)| {
                let slot = slot.as_ref()?;
                let leaf = NodeId(u32::try_from(leaf).ok()?);
                (slot.lease_until <= now).then(|| Self::id(leaf, slot.joined))
            })
            .collect()
    }

    /// Bytes held, for memory reports.
    pub(crate) fn memory_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Option<Slot>>()
            + self
                .identities
                .capacity()
                .saturating_mul(8)
                .div_ceil(7)
                .next_power_of_two()
                * (size_of::<(u64, u32)>() + 1)
    }
}

/// Departures remembered per group, so that a departed member that asks later is told why.
pub(crate) const RECENT_DEPARTURES: usize = 4_096;

/// How a membership ended: the identity that held it, why, and the epoch that ended it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Departure {
    pub(crate) identity: [u8; 32],
    pub(crate) reason: DepartReason,
    pub(crate) epoch: Epoch,
}

/// The group's latest [`RECENT_DEPARTURES`] departures (the oldest are forgotten; a restart
/// forgets all). Kept in memory only: what a departed member is told is a courtesy, not state.
#[derive(Debug, Default)]
pub(crate) struct Departed {
    order: VecDeque<MemberId>,
    by_id: HashMap<MemberId, Departure>,
}

impl Departed {
    pub(crate) fn record(&mut self, member: MemberId, departure: Departure) {
        if self.by_id.insert(member, departure).is_none() {
            self.order.push_back(member);
        }
        if self.order.len() > RECENT_DEPARTURES
            && let Some(oldest) = self.order.pop_front()
        {
            self.by_id.remove(&oldest);
        }
    }

    pub(crate) fn get(&self, member: MemberId) -> Option<&Departure> {
        self.by_id.get(&member)
    }
}

/// Why a membership ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DepartReason {
    /// The member left.
    Left,
    /// An operator evicted it.
    Evicted,
    /// Its lease ran out.
    Expired,
    /// It registered again with a new HPKE key, having lost its keys (its old leaf is replaced).
    Replaced,
    /// An operator reset the group: every member was excluded at once and registers again.
    Reset,
}

impl DepartReason {
    /// What member `member` is told when it asks after its membership ended at `epoch`.
    pub(crate) fn told(self, member: MemberId, epoch: Epoch) -> String {
        let how = match self {
            DepartReason::Left => "left the group",
            DepartReason::Evicted => "was evicted by an operator",
            DepartReason::Expired => "let its lease run out",
            DepartReason::Replaced => "was replaced by a registration with a new HPKE key",
            DepartReason::Reset => "was excluded when an operator reset the group",
        };
        format!("member {} {how} at epoch {}", member.0, epoch.0)
    }
}
