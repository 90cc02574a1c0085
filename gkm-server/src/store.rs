//! Persistence: the [`Store`] the controller writes every rekey's changes to before anything
//! encrypted under them leaves the process (write-ahead), and [`MemoryStore`] for tests.

use std::collections::{BTreeMap, BTreeSet};

use lkh_tree::{Epoch, GroupId, NodeId, NodeRecord, TreeChanges, TreeConfig, TreeSnapshot};
use thiserror::Error;
use wire::{Encapsulation, HpkePublicKey, Kem, MemberId};

use crate::policy::Timestamp;
use crate::signing::SigningKeyRecord;
use crate::signing::append_signing_key;

/// A member as the controller stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    /// The member's id: its leaf and the epoch it joined in (`leaf << 32 | epoch mod 2^32`).
    pub id: MemberId,
    /// Its Ed25519 identity key.
    pub identity: [u8; 32],
    /// What the controller keeps of its HPKE key, to which paths are sealed.
    pub hpke: HpkeDigest,
    /// Its leaf in the tree.
    pub leaf: NodeId,
    /// The epoch it joined in.
    pub joined: u64,
    /// When its lease ends unless renewed.
    pub lease_until: Timestamp,
}

/// What the controller keeps of a member's HPKE key: its KEM and a 32-byte digest
/// ([`HpkePublicKey::digest`]), not the key (an X-Wing key is 1,216 bytes). The member presents
/// the key itself in the requests that need it, and the controller checks it against this.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HpkeDigest {
    /// The key's KEM.
    pub kem: Kem,
    /// The key's digest.
    pub digest: [u8; 32],
}

impl HpkeDigest {
    /// The digest of `key`.
    pub fn of(key: &HpkePublicKey) -> Self {
        HpkeDigest {
            kem: key.kem(),
            digest: key.digest(),
        }
    }

    /// The digest of the key `encapsulation` was made for.
    pub fn of_recipient(encapsulation: &Encapsulation) -> Self {
        HpkeDigest {
            kem: encapsulation.kem(),
            digest: *encapsulation.recipient_digest(),
        }
    }

    /// Whether `key` is the key this is the digest of.
    pub fn matches(&self, key: &HpkePublicKey) -> bool {
        *self == HpkeDigest::of(key)
    }
}

/// What keeps a group's enrollment closed across restarts: the tokens spent and the identities
/// banned. The config's allow list and tokens are policy, read at every start; these are state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollmentRecords {
    /// Digests of the enrollment tokens spent (`derive_key("… spent token", token)`).
    pub spent: BTreeSet<[u8; 32]>,
    /// Identity keys refused under every enrollment mode.
    pub banned: BTreeSet<[u8; 32]>,
}

/// One group's durable state.
#[derive(Clone, Debug)]
pub struct GroupState {
    /// The tree, every key included (the store seals it).
    pub tree: TreeSnapshot,
    /// The members.
    pub members: Vec<MemberRecord>,
    /// Spent tokens and bans.
    pub enrollment: EnrollmentRecords,
    /// The group's replacement signing keys, oldest first (empty: the controller's own key).
    pub signing: Vec<SigningKeyRecord>,
}

/// Why the store failed. The controller sends nothing of a rekey it could not persist.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed (disk full, locked, I/O error).
    #[error("state store failed: {0}")]
    Backend(String),
    /// Stored state did not decode or authenticate.
    #[error("stored state is corrupt: {0}")]
    Corrupt(String),
    /// Another process holds the store.
    #[error("the state store is in use by another process")]
    InUse,
    /// This controller no longer leads the group: another controller holds its lease with a
    /// later term, or the lease ran out. Nothing was saved; the controller stops serving the
    /// group as leader (fencing, see `RFC-notes/ha.md`).
    #[error("group {group}: no longer the leader (lease term {term} is over)")]
    Deposed {
        /// The group.
        group: GroupId,
        /// The term this controller held.
        term: u64,
    },
    /// A controller holds a live lease of the group: the storage key cannot be rotated under a
    /// running controller (see `RFC-notes/ha.md`).
    #[error("group {group}: its lease is held by {holder}, a controller still running")]
    LeaseLive {
        /// The group.
        group: GroupId,
        /// The controller holding it.
        holder: String,
    },
}

/// Whether a storage key opens the stored state (asked when a rotation of the key was cut short,
/// to tell which of the two keys the state is sealed under).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFit {
    /// Every group's head authenticates under the key.
    Opens,
    /// No group's head does.
    Refused,
    /// Nothing is stored: any key opens it.
    Empty,
}

/// What a rotation of the storage key re-sealed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resealed {
    /// Groups (heads) re-sealed.
    pub groups: usize,
    /// Rows re-sealed.
    pub rows: u64,
    /// Rows no head names (left by a compaction cut short), deleted rather than re-sealed.
    pub dropped: u64,
}

impl KeyFit {
    /// The fit of a key under which `opened` heads of `heads` authenticated; a mix is corrupt.
    #[cfg(any(feature = "disk", feature = "postgres"))]
    pub(crate) fn of(heads: usize, opened: usize) -> Result<KeyFit, StoreError> {
        match (heads, opened) {
            (0, _) => Ok(KeyFit::Empty),
            (h, o) if h == o => Ok(KeyFit::Opens),
            (_, 0) => Ok(KeyFit::Refused),
            (h, o) => Err(StoreError::Corrupt(format!(
                "{o} of {h} group heads authenticate under the storage key, the others do not"
            ))),
        }
    }
}

/// What one rekey changed in a group's durable state (write-ahead: the controller hands it to
/// [`Store::save_delta`] before anything encrypted under the new keys is queued). Holds keys: the
/// store seals it.
#[derive(Clone, Debug)]
pub struct GroupDelta {
    /// The group.
    pub group: GroupId,
    /// The tree parameters (unchanged since the group was created).
    pub config: TreeConfig,
    /// The new epoch.
    pub epoch: Epoch,
    /// Tree nodes added or changed, and removed.
    pub tree: TreeChanges,
    /// Member records added or changed (a lease renewed), keyed by their leaf.
    pub members: Vec<MemberRecord>,
    /// Leaves whose member record is gone.
    pub removed_members: Vec<NodeId>,
    /// Enrollment tokens spent (digests), identities banned and unbanned, in that order.
    pub enrollment: EnrollmentChanges,
    /// Signing keys that replaced the group's (a rotation), in order.
    pub signing: Vec<SigningKeyRecord>,
}

/// Changes to a group's [`EnrollmentRecords`], applied spent, banned, unbanned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnrollmentChanges {
    /// Token digests spent.
    pub spent: Vec<[u8; 32]>,
    /// Identities banned.
    pub banned: Vec<[u8; 32]>,
    /// Identities no longer banned.
    pub unbanned: Vec<[u8; 32]>,
}

impl EnrollmentChanges {
    /// How many changes.
    pub fn len(&self) -> usize {
        self.spent.len() + self.banned.len() + self.unbanned.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl EnrollmentRecords {
    /// Applies `changes`.
    pub fn apply(&mut self, changes: &EnrollmentChanges) {
        self.spent.extend(changes.spent.iter().copied());
        self.banned.extend(changes.banned.iter().copied());
        for identity in &changes.unbanned {
            self.banned.remove(identity);
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.spent.len() + self.banned.len()
    }

    /// Whether none are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl GroupDelta {
    /// Records in this delta (what the controller counts to decide when to compact).
    pub fn records(&self) -> usize {
        self.tree.changed.len()
            + self.tree.removed.len()
            + self.members.len()
            + self.removed_members.len()
            + self.enrollment.len()
            + self.signing.len()
    }
}

impl GroupState {
    /// Records in this state.
    pub fn records(&self) -> usize {
        self.tree.nodes.len() + self.members.len() + self.enrollment.len() + self.signing.len()
    }
}

/// Durable storage of group states, written incrementally.
///
/// The controller calls [`Store::save`] for a group's first save and after a failed save, and
/// [`Store::save_delta`] for every other rekey. Both return only once the data is durable; a
/// failed call may have written nothing or everything, never a part. Once the deltas since the
/// last full state hold more records than the state, the controller calls
/// [`Store::save_delta_and_compact`] instead of [`Store::save_delta`], unless
/// [`Store::compacting`] says that an earlier compaction still runs. Loading (store-specific)
/// gives back the full [`GroupState`]: the last full state with every later delta applied.
pub trait Store {
    /// Durably replaces the whole state of `state.tree.group`.
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError>;
    /// Durably applies one rekey's changes to the state saved so far. A group with no saved state
    /// is an error (the controller then saves it in full).
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError>;
    /// Durably applies `delta`, as [`Store::save_delta`] does, and replaces what the store holds
    /// of the group (a full state and the deltas after it) by `state`, the state `delta` leads
    /// to, so that what is stored stops growing. The result is the delta's: once it is `Ok`,
    /// the delta is durable. The replacement may finish later, with deltas saved meanwhile, and
    /// report a failure through [`Store::take_compaction_failure`]; nothing is lost if it fails
    /// or never finishes. By default it is a [`Store::save`] of `state`.
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        let _ = delta;
        self.save(&state)
    }
    /// The oldest compaction that failed in the background and was not yet taken, if any.
    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        None
    }
    /// Whether a compaction that [`Store::save_delta_and_compact`] started still runs; the
    /// controller then asks for no other, so that no rekey waits for it. By default, never.
    fn compacting(&mut self) -> bool {
        false
    }
}

/// A compaction that failed after [`Store::save_delta_and_compact`] returned. The stored full
/// state and deltas it would have replaced are intact.
#[derive(Debug)]
pub struct CompactionFailure {
    /// The group.
    pub group: GroupId,
    /// The epoch of the state that was being written.
    pub epoch: Epoch,
    /// Why it failed.
    pub error: StoreError,
}

/// The compaction a store runs on a thread of its own (one at a time), and the failures of those
/// that ended, oldest first, until taken. Only the stores that compact (redb, PostgreSQL) have it.
#[cfg(any(feature = "disk", feature = "postgres"))]
#[derive(Default)]
pub(crate) struct Compactions {
    running: Option<Running>,
    failures: std::collections::VecDeque<CompactionFailure>,
}

/// A compaction running on its thread.
#[cfg(any(feature = "disk", feature = "postgres"))]
struct Running {
    group: GroupId,
    epoch: Epoch,
    thread: std::thread::JoinHandle<Result<(), StoreError>>,
}

#[cfg(any(feature = "disk", feature = "postgres"))]
impl Compactions {
    /// Runs `job`, the compaction of `group` to `epoch`, on a thread, once the one running
    /// finished. A job that could not be made, or a thread that cannot start, is a failure.
    pub(crate) fn start(
        &mut self,
        group: GroupId,
        epoch: Epoch,
        job: Result<impl FnOnce() -> Result<(), StoreError> + Send + 'static, StoreError>,
    ) {
        self.finish();
        let job = match job {
            Ok(job) => job,
            Err(error) => return self.fail(group, epoch, error),
        };
        let started = std::thread::Builder::new()
            .name("gkm-compaction".into())
            .spawn(job);
        match started {
            Ok(thread) => {
                self.running = Some(Running {
                    group,
                    epoch,
                    thread,
                });
            }
            Err(e) => self.fail(
                group,
                epoch,
                StoreError::Backend(format!("cannot start the compaction: {e}")),
            ),
        }
    }

    /// Keeps the failure of the compaction of `group` to `epoch`.
    fn fail(&mut self, group: GroupId, epoch: Epoch, error: StoreError) {
        self.failures.push_back(CompactionFailure {
            group,
            epoch,
            error,
        });
    }

    /// Waits for the running compaction, if any, and keeps its failure.
    pub(crate) fn finish(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        let error = match running.thread.join() {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(_) => StoreError::Backend("the compaction thread panicked".into()),
        };
        self.fail(running.group, running.epoch, error);
    }

    /// [`Compactions::finish`] if the compaction is done (never waits).
    fn reap(&mut self) {
        if self
            .running
            .as_ref()
            .is_some_and(|r| r.thread.is_finished())
        {
            self.finish();
        }
    }

    /// The oldest failure not yet taken ([`Store::take_compaction_failure`]).
    pub(crate) fn take_failure(&mut self) -> Option<CompactionFailure> {
        self.reap();
        self.failures.pop_front()
    }

    /// Whether one was started and has not been seen to end (never waits, never reaps).
    pub(crate) fn started(&self) -> bool {
        self.running.is_some()
    }

    /// Whether one still runs ([`Store::compacting`]).
    pub(crate) fn running(&mut self) -> bool {
        self.reap();
        self.running.is_some()
    }
}

/// One group's records as a store keeps them: by node id and by leaf.
#[derive(Clone, Debug)]
pub struct GroupRecords {
    /// The group.
    pub group: GroupId,
    /// The tree parameters.
    pub config: TreeConfig,
    /// The epoch.
    pub epoch: Epoch,
    /// Tree nodes by id.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Members by leaf.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// Spent tokens and bans.
    pub enrollment: EnrollmentRecords,
    /// The group's replacement signing keys, oldest first.
    pub signing: Vec<SigningKeyRecord>,
}

impl GroupRecords {
    /// The records of a full state.
    pub fn from_state(state: &GroupState) -> Self {
        GroupRecords {
            group: state.tree.group,
            config: state.tree.config,
            epoch: state.tree.epoch,
            nodes: state.tree.nodes.iter().map(|n| (n.id, n.clone())).collect(),
            members: state.members.iter().map(|m| (m.leaf, m.clone())).collect(),
            enrollment: state.enrollment.clone(),
            signing: state.signing.clone(),
        }
    }

    /// Applies a delta of the same group (removals first, then additions and changes).
    pub fn apply(&mut self, delta: &GroupDelta) {
        self.epoch = delta.epoch;
        for id in &delta.tree.removed {
            self.nodes.remove(id);
        }
        for leaf in &delta.removed_members {
            self.members.remove(leaf);
        }
        for node in &delta.tree.changed {
            self.nodes.insert(node.id, node.clone());
        }
        for member in &delta.members {
            self.members.insert(member.leaf, member.clone());
        }
        self.enrollment.apply(&delta.enrollment);
        for record in &delta.signing {
            append_signing_key(&mut self.signing, record.clone());
        }
    }

    /// The full state, the records moved out (what [`GroupRecords::to_state`] gives, without a
    /// copy of every key).
    pub fn into_state(self) -> GroupState {
        GroupState {
            tree: TreeSnapshot {
                group: self.group,
                config: self.config,
                epoch: self.epoch,
                nodes: self.nodes.into_values().collect(),
            },
            members: self.members.into_values().collect(),
            enrollment: self.enrollment,
            signing: self.signing,
        }
    }

    /// The full state (nodes by id: [`lkh_tree::KeyTree::restore`] takes any order).
    pub fn to_state(&self) -> GroupState {
        GroupState {
            tree: TreeSnapshot {
                group: self.group,
                config: self.config,
                epoch: self.epoch,
                nodes: self.nodes.values().cloned().collect(),
            },
            members: self.members.values().cloned().collect(),
            enrollment: self.enrollment.clone(),
            signing: self.signing.clone(),
        }
    }
}

/// A store in memory: every group's records, with deltas applied as they come.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The records per group.
    pub groups: BTreeMap<GroupId, GroupRecords>,
    /// Full saves so far.
    pub saves: u64,
    /// Deltas saved so far.
    pub deltas: u64,
}

impl MemoryStore {
    /// Every group's state as a restart would load it.
    pub fn states(&self) -> Vec<GroupState> {
        self.groups.values().map(GroupRecords::to_state).collect()
    }
}

impl Store for MemoryStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.groups
            .insert(state.tree.group, GroupRecords::from_state(state));
        self.saves += 1;
        Ok(())
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        let records = self
            .groups
            .get_mut(&delta.group)
            .ok_or_else(|| StoreError::Backend(format!("group {} was never saved", delta.group)))?;
        records.apply(delta);
        self.deltas += 1;
        Ok(())
    }
}
