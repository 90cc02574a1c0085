//! Key material: zeroizing newtypes that print as `***` and compare in constant time, and the
//! BLAKE3 `derive_key` derivations, each under its own context label.

use core::fmt;

use rand_core::CryptoRng;
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt, SALT_LEN};

/// Length of every symmetric key in gkm.
pub const KEY_LEN: usize = 32;
/// Length of a key check value.
pub const KCV_LEN: usize = 8;

const LABEL_WRAP_PAD: &str = "gkm v3 2026-12 lkh wrap pad";
const LABEL_HASH_FORWARD: &str = "gkm v1 2026-11 lkh hash-forward";
const LABEL_TRAFFIC: &str = "gkm v1 2026-11 traffic key";
const LABEL_KCV: &str = "gkm v1 2026-11 key check value";
const LABEL_ONE_WAY_KEY: &str = "gkm v1 2026-11 lkh one-way key";
const LABEL_ONE_WAY_NEXT: &str = "gkm v1 2026-11 lkh one-way next seed";

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Wraps raw key bytes. The caller's copy should be zeroized.
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes, for encoding into an encrypted container.
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }

            /// A key check value: lets a holder confirm it has the same key without revealing it.
            pub fn check_value(&self) -> Kcv {
                let full = blake3::derive_key(LABEL_KCV, &self.0);
                let mut kcv = [0u8; KCV_LEN];
                kcv.copy_from_slice(&full[..KCV_LEN]);
                Kcv(kcv)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(***)"))
            }
        }

        impl ConstantTimeEq for $name {
            fn ct_eq(&self, other: &Self) -> Choice {
                self.0.ct_eq(&other.0)
            }
        }
    };
}

secret_key!(
    /// The key of one tree node (a member's individual leaf key, or a key shared by a subtree).
    NodeKey
);

secret_key!(
    /// The traffic encryption key (TEK) of one epoch, derived from the root key. Applications
    /// encrypt group data under it.
    TrafficKey
);

impl NodeKey {
    /// A fresh random key from the injected CSPRNG.
    pub fn random<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The one-time pad this key lays over another key in the rekey salted with `salt`, for the
    /// wrap that `binding` names (group, epoch, target, wrapping node and version: see
    /// `wrap.rs`). A labelled derivation from this key, the salt and the binding, so no two
    /// wraps share a pad unless they share all three.
    pub(crate) fn wrap_pad(&self, salt: &RekeySalt, binding: &[u8; 32]) -> [u8; KEY_LEN] {
        let mut input = [0u8; KEY_LEN + SALT_LEN + 32];
        input[..KEY_LEN].copy_from_slice(&self.0);
        input[KEY_LEN..KEY_LEN + SALT_LEN].copy_from_slice(&salt.0);
        input[KEY_LEN + SALT_LEN..].copy_from_slice(binding);
        let pad = blake3::derive_key(LABEL_WRAP_PAD, &input);
        input.zeroize();
        pad
    }

    /// LKH+ hash-forward: the key of `node` at `version`, one-way from this (its previous) key.
    pub fn hash_forward(&self, node: NodeId, version: KeyVersion) -> NodeKey {
        let mut input = [0u8; KEY_LEN + 4 + 8];
        input[..KEY_LEN].copy_from_slice(&self.0);
        input[KEY_LEN..KEY_LEN + 4].copy_from_slice(&node.0.to_be_bytes());
        input[KEY_LEN + 4..].copy_from_slice(&version.0.to_be_bytes());
        let key = NodeKey(blake3::derive_key(LABEL_HASH_FORWARD, &input));
        input.zeroize();
        key
    }

    /// One-way path update: the key of `node` when this is its seed.
    pub fn one_way_key(&self, node: NodeId) -> NodeKey {
        self.derive_with_node(LABEL_ONE_WAY_KEY, node)
    }

    /// One-way path update: the seed of `parent` when this is the seed of its chain child.
    pub fn one_way_next(&self, parent: NodeId) -> NodeKey {
        self.derive_with_node(LABEL_ONE_WAY_NEXT, parent)
    }

    fn derive_with_node(&self, label: &str, node: NodeId) -> NodeKey {
        let mut input = [0u8; KEY_LEN + 4];
        input[..KEY_LEN].copy_from_slice(&self.0);
        input[KEY_LEN..].copy_from_slice(&node.0.to_be_bytes());
        let key = NodeKey(blake3::derive_key(label, &input));
        input.zeroize();
        key
    }

    /// The traffic key of `epoch` in `group`, when this is the root key of that epoch.
    pub fn traffic_key(&self, group: GroupId, epoch: Epoch) -> TrafficKey {
        let mut input = [0u8; KEY_LEN + 16];
        input[..KEY_LEN].copy_from_slice(&self.0);
        input[KEY_LEN..KEY_LEN + 8].copy_from_slice(&group.0.to_be_bytes());
        input[KEY_LEN + 8..].copy_from_slice(&epoch.0.to_be_bytes());
        let key = TrafficKey(blake3::derive_key(LABEL_TRAFFIC, &input));
        input.zeroize();
        key
    }
}

/// A key check value: the first 8 bytes of a labelled derivation of a key. Not secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kcv(pub [u8; KCV_LEN]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = NodeKey::from_bytes([0xab; KEY_LEN]);
        let shown = format!("{key:?}");
        assert_eq!(shown, "NodeKey(***)");
        assert!(!shown.contains("ab"));
    }

    #[test]
    fn derivations_are_separated() {
        let key = NodeKey::from_bytes([7; KEY_LEN]);
        let forward = key.hash_forward(NodeId(3), KeyVersion(9));
        let traffic = key.traffic_key(GroupId(1), Epoch(9));
        assert_ne!(forward.as_bytes(), key.as_bytes());
        assert_ne!(forward.as_bytes(), traffic.as_bytes());
        let binding = [0; 32];
        assert_ne!(
            key.wrap_pad(&RekeySalt([0; SALT_LEN]), &binding),
            *key.as_bytes()
        );
        assert_ne!(
            key.wrap_pad(&RekeySalt([0; SALT_LEN]), &binding),
            key.wrap_pad(&RekeySalt([1; SALT_LEN]), &binding)
        );
        assert_ne!(forward.check_value(), key.check_value());
        assert!(bool::from(key.ct_eq(&key.clone())));
        assert!(!bool::from(key.ct_eq(&forward)));
    }
}
