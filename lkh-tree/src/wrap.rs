//! Key wraps: a node key laid under a one-time pad derived from another (DESIGN.md §3, as
//! revised for wire version 3: encrypt-then-sign).
//!
//! The pad is `derive_key("gkm v3 … lkh wrap pad", wrapping key ‖ rekey salt ‖ binding)`, where
//! the binding is group, epoch, target node, wrapping node and wrapping version (32 bytes) and
//! the salt is 16 bytes drawn afresh for each rekey and signed in its datagrams. The wrap is the
//! 32-byte key XOR that pad: no tag. Within one rekey a key wraps at most one copy of a given
//! target, so no pad repeats under one wrapping key unless two 128-bit salts collide, even when
//! an epoch number comes back (a controller restored from an old copy of its state).
//!
//! Integrity is not the wrap's job: every byte of a rekey datagram is covered by the controller's
//! Ed25519 signature, verified before any wrap is opened, and the datagram carries the key check
//! value of the traffic key the member must end with, so a member whose unwraps went wrong (its
//! own keys were not the controller's) finds out before it changes anything. The argument is
//! written out in `RFC-notes/wire-format.md`.

use zeroize::Zeroize;

use crate::ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt};
use crate::secret::{KEY_LEN, NodeKey};

/// Length of a wrapped key: the 32-byte key under its pad, nothing else.
pub const WRAPPED_LEN: usize = KEY_LEN;

/// One encryption of a rekey: the new key of `target` (whose version is the rekey's epoch),
/// wrapped under the key of `wrapping` at `wrapping_version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    /// The node whose new key this carries.
    pub target: NodeId,
    /// The node whose key encrypts it: a child of `target`, or `target` itself (its old key).
    pub wrapping: NodeId,
    /// The version of the wrapping key.
    pub wrapping_version: KeyVersion,
    /// The key under its pad.
    pub ciphertext: [u8; WRAPPED_LEN],
}

impl Encryption {
    /// Whether the wrapping key was itself set in `epoch` (as opposed to held before it). This
    /// one bit is all the wire carries of the wrapping version.
    pub fn under_new_key(&self, epoch: Epoch) -> bool {
        self.wrapping_version == epoch.version()
    }
}

/// The fields a wrap's pad is bound to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WrapContext {
    pub(crate) group: GroupId,
    pub(crate) epoch: Epoch,
    pub(crate) target: NodeId,
    pub(crate) wrapping: NodeId,
    pub(crate) wrapping_version: KeyVersion,
    pub(crate) salt: RekeySalt,
}

impl WrapContext {
    fn binding(&self) -> [u8; 32] {
        let mut binding = [0u8; 32];
        binding[..8].copy_from_slice(&self.group.0.to_be_bytes());
        binding[8..16].copy_from_slice(&self.epoch.0.to_be_bytes());
        binding[16..20].copy_from_slice(&self.target.0.to_be_bytes());
        binding[20..24].copy_from_slice(&self.wrapping.0.to_be_bytes());
        binding[24..].copy_from_slice(&self.wrapping_version.0.to_be_bytes());
        binding
    }

    /// `bytes` XOR the pad of this wrap under `wrapping_key`: wraps and unwraps alike.
    fn xor_pad(&self, wrapping_key: &NodeKey, bytes: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
        let mut pad = wrapping_key.wrap_pad(&self.salt, &self.binding());
        for (p, b) in pad.iter_mut().zip(bytes) {
            *p ^= b;
        }
        pad
    }

    /// Wraps `key` under `wrapping_key`.
    pub(crate) fn seal(&self, wrapping_key: &NodeKey, key: &NodeKey) -> Encryption {
        Encryption {
            target: self.target,
            wrapping: self.wrapping,
            wrapping_version: self.wrapping_version,
            ciphertext: self.xor_pad(wrapping_key, key.as_bytes()),
        }
    }

    /// Unwraps a ciphertext made by [`WrapContext::seal`]. Any ciphertext opens to some key:
    /// whether it is the right one is for the rekey's key check value to say.
    pub(crate) fn open(&self, wrapping_key: &NodeKey, ciphertext: &[u8; WRAPPED_LEN]) -> NodeKey {
        let mut bytes = self.xor_pad(wrapping_key, ciphertext);
        let key = NodeKey::from_bytes(bytes);
        bytes.zeroize();
        key
    }
}

#[cfg(test)]
mod tests {
    use subtle::ConstantTimeEq;

    use super::*;

    fn context() -> WrapContext {
        WrapContext {
            group: GroupId(1),
            epoch: Epoch(5),
            target: NodeId(2),
            wrapping: NodeId(9),
            wrapping_version: KeyVersion(3),
            salt: RekeySalt([5; crate::ids::SALT_LEN]),
        }
    }

    #[test]
    fn wrap_round_trips_and_binds_its_context() {
        let kek = NodeKey::from_bytes([1; KEY_LEN]);
        let key = NodeKey::from_bytes([2; KEY_LEN]);
        let enc = context().seal(&kek, &key);
        assert_ne!(&enc.ciphertext, key.as_bytes());
        let opened = context().open(&kek, &enc.ciphertext);
        assert!(bool::from(opened.ct_eq(&key)));

        // Every bound field changes the pad, so the wrap opens to another key.
        let opens_to_key =
            |c: WrapContext, kek: &NodeKey| bool::from(c.open(kek, &enc.ciphertext).ct_eq(&key));
        let mut other = context();
        other.wrapping_version = KeyVersion(4);
        assert!(!opens_to_key(other, &kek));
        let mut other = context();
        other.epoch = Epoch(6);
        assert!(!opens_to_key(other, &kek));
        let mut other = context();
        other.group = GroupId(2);
        assert!(!opens_to_key(other, &kek));
        let mut other = context();
        other.target = NodeId(3);
        assert!(!opens_to_key(other, &kek));
        let mut other = context();
        other.wrapping = NodeId(8);
        assert!(!opens_to_key(other, &kek));
        let wrong = NodeKey::from_bytes([3; KEY_LEN]);
        assert!(!opens_to_key(context(), &wrong));
        let mut other = context();
        other.salt.0[0] ^= 1;
        assert!(!opens_to_key(other, &kek));
    }

    #[test]
    fn v041_the_same_epoch_and_keys_under_another_salt_share_no_keystream() {
        // The rollback case: an epoch number comes back with the same wrapping key, nonce and
        // associated data. Under another rekey salt the XOR of the plaintexts is not the XOR of
        // the ciphertexts (it is under the same salt: the nonce reuse this salt prevents).
        let kek = NodeKey::from_bytes([1; KEY_LEN]);
        let (a, b) = (
            NodeKey::from_bytes([2; KEY_LEN]),
            NodeKey::from_bytes([3; KEY_LEN]),
        );
        let first = context().seal(&kek, &a);
        let xor = |x: &[u8], y: &[u8]| x.iter().zip(y).map(|(p, q)| p ^ q).collect::<Vec<u8>>();
        let plain = xor(a.as_bytes(), b.as_bytes());
        let same = context().seal(&kek, &b);
        assert_eq!(xor(&first.ciphertext, &same.ciphertext), plain);
        let mut salted = context();
        salted.salt.0[15] ^= 0x80;
        let second = salted.seal(&kek, &b);
        assert_ne!(xor(&first.ciphertext, &second.ciphertext), plain);
    }
}
