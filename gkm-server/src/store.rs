//! Persistence: the [`Store`] the controller writes every group's state to before anything
//! encrypted under it leaves the process (write-ahead), and [`MemoryStore`] for tests and netsim.

use std::collections::BTreeMap;

use lkh_tree::{GroupId, NodeId, TreeSnapshot};
use thiserror::Error;
use wire::MemberId;

use crate::policy::Timestamp;

/// A member as the controller stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberRecord {
    /// The member's id: its leaf and the epoch it joined in (`leaf << 32 | epoch mod 2^32`).
    pub id: MemberId,
    /// Its Ed25519 identity key.
    pub identity: [u8; 32],
    /// Its X25519 key for sealed paths.
    pub hpke_key: [u8; 32],
    /// Its leaf in the tree.
    pub leaf: NodeId,
    /// The epoch it joined in.
    pub joined: u64,
    /// When its lease ends unless renewed.
    pub lease_until: Timestamp,
}

/// One group's durable state.
#[derive(Clone, Debug)]
pub struct GroupState {
    /// The tree, every key included (the store seals it).
    pub tree: TreeSnapshot,
    /// The members.
    pub members: Vec<MemberRecord>,
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
}

/// Durable storage of group states.
pub trait Store {
    /// Durably replaces the state of `state.tree.group`. Returns only once it is on disk.
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError>;
}

/// A store in memory: what was saved last, per group.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The last state saved per group.
    pub saved: BTreeMap<GroupId, GroupState>,
    /// Saves so far.
    pub saves: u64,
}

impl Store for MemoryStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.saved.insert(state.tree.group, state.clone());
        self.saves += 1;
        Ok(())
    }
}
