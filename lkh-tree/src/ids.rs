//! Identifiers: newtypes for node ids, key versions, epochs and groups, so that no bare integer
//! crosses an API.

use core::fmt;

/// A node of the key tree (leaf or internal). Ids are arena indices below [`NodeId::LIMIT`]; the
/// wire format uses the top bit of a 32-bit field as a flag, so ids never reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The root of every tree. It is always an internal node and never moves.
    pub const ROOT: NodeId = NodeId(0);
    /// Exclusive upper bound of node ids (2^31): about 1.6 × 10^9 members at degree 4.
    pub const LIMIT: u32 = 1 << 31;
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// The version of a node's key: the epoch in which the key was last set. It increases whenever
/// the key changes (a node changes at most once per epoch), so a rekey need not carry it: every
/// key set by the rekey of epoch `e` has version `e`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyVersion(pub u64);

/// A rekey epoch. Every rekey of a group increments it; it never repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one, or `None` at the end of the range.
    pub fn next(self) -> Option<Epoch> {
        self.0.checked_add(1).map(Epoch)
    }

    /// The version every key set in this epoch carries.
    pub fn version(self) -> KeyVersion {
        KeyVersion(self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A group, as numbered by its controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

impl GroupId {
    /// The id of a group named `name`: the first 8 bytes of a labelled BLAKE3 derivation, so a
    /// controller and its members agree on it from the name alone.
    pub fn from_name(name: &str) -> GroupId {
        let digest = blake3::derive_key("gkm v1 2026-11 group id", name.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        GroupId(u64::from_be_bytes(id))
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Length of a [`RekeySalt`].
pub const SALT_LEN: usize = 16;

/// Fresh randomness drawn for each rekey and carried (signed) in its datagrams. It enters the
/// key of every wrap of that rekey, so no (key, nonce) pair repeats even if an epoch number is
/// used twice (a controller restored from an older copy of its state). Public, not secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RekeySalt(pub [u8; SALT_LEN]);
