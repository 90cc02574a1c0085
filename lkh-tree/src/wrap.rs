//! Key wraps: ChaCha20-Poly1305 (RFC 8439) of one node key under another, with the deterministic
//! nonce and associated data of DESIGN.md §3.
//!
//! The nonce is `epoch ‖ target node` (8 + 4 bytes, big endian). The AEAD key is not the node key
//! itself but `derive_key("… lkh wrap key …", node key ‖ rekey salt)`, where the salt is 16 bytes
//! drawn afresh for each rekey and signed in its datagrams. Within one rekey a key wraps at most
//! one copy of a given target, so the nonce is unique under that rekey's AEAD key; across rekeys
//! the AEAD keys differ, even when an epoch number comes back (a controller restored from an old
//! copy of its state): no (key, nonce) pair repeats unless two 128-bit salts collide. The
//! associated data binds group, epoch, target node and version, wrapping node and version
//! (40 bytes).

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

use crate::ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt};
use crate::secret::{KEY_LEN, NodeKey};

/// Length of a wrapped key: 32 bytes of ciphertext and a 16-byte tag.
pub const WRAPPED_LEN: usize = KEY_LEN + 16;

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
    /// Ciphertext and tag.
    pub ciphertext: [u8; WRAPPED_LEN],
}

impl Encryption {
    /// Whether the wrapping key was itself set in `epoch` (as opposed to held before it). This
    /// one bit is all the wire carries of the wrapping version.
    pub fn under_new_key(&self, epoch: Epoch) -> bool {
        self.wrapping_version == epoch.version()
    }
}

/// The fields an encryption is bound to.
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
    fn nonce(&self) -> Nonce {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.epoch.0.to_be_bytes());
        nonce[8..].copy_from_slice(&self.target.0.to_be_bytes());
        Nonce::from(nonce)
    }

    fn associated_data(&self) -> [u8; 40] {
        let mut ad = [0u8; 40];
        ad[..8].copy_from_slice(&self.group.0.to_be_bytes());
        ad[8..16].copy_from_slice(&self.epoch.0.to_be_bytes());
        ad[16..20].copy_from_slice(&self.target.0.to_be_bytes());
        // The target's version is the epoch: repeated so the layout names every field.
        ad[20..28].copy_from_slice(&self.epoch.0.to_be_bytes());
        ad[28..32].copy_from_slice(&self.wrapping.0.to_be_bytes());
        ad[32..40].copy_from_slice(&self.wrapping_version.0.to_be_bytes());
        ad
    }

    fn cipher(&self, wrapping_key: &NodeKey) -> ChaCha20Poly1305 {
        let mut key = wrapping_key.wrap_key(&self.salt);
        let cipher = ChaCha20Poly1305::new(&key.into());
        key.zeroize();
        cipher
    }

    /// Wraps `key` under `wrapping_key`.
    pub(crate) fn seal(&self, wrapping_key: &NodeKey, key: &NodeKey) -> Encryption {
        let mut ciphertext = [0u8; WRAPPED_LEN];
        let (body, tag_out) = ciphertext.split_at_mut(KEY_LEN);
        body.copy_from_slice(key.as_bytes());
        let Ok(tag) = self.cipher(wrapping_key).encrypt_inout_detached(
            &self.nonce(),
            &self.associated_data(),
            body.into(),
        ) else {
            unreachable!("ChaCha20-Poly1305 accepts a 32-byte message and 40 bytes of AD")
        };
        tag_out.copy_from_slice(&tag);
        Encryption {
            target: self.target,
            wrapping: self.wrapping,
            wrapping_version: self.wrapping_version,
            ciphertext,
        }
    }

    /// Unwraps a ciphertext made by [`WrapContext::seal`]; `None` if it does not authenticate.
    pub(crate) fn open(
        &self,
        wrapping_key: &NodeKey,
        ciphertext: &[u8; WRAPPED_LEN],
    ) -> Option<NodeKey> {
        let mut body = [0u8; KEY_LEN];
        body.copy_from_slice(&ciphertext[..KEY_LEN]);
        let tag = Tag::try_from(&ciphertext[KEY_LEN..]).ok()?;
        let opened = self.cipher(wrapping_key).decrypt_inout_detached(
            &self.nonce(),
            &self.associated_data(),
            (&mut body[..]).into(),
            &tag,
        );
        let key = opened.is_ok().then(|| NodeKey::from_bytes(body));
        body.zeroize();
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
        let opened = context().open(&kek, &enc.ciphertext).expect("opens");
        assert!(bool::from(opened.ct_eq(&key)));

        let mut other = context();
        other.wrapping_version = KeyVersion(4);
        assert!(other.open(&kek, &enc.ciphertext).is_none());
        let mut other = context();
        other.epoch = Epoch(6);
        assert!(other.open(&kek, &enc.ciphertext).is_none());
        let wrong = NodeKey::from_bytes([3; KEY_LEN]);
        assert!(context().open(&wrong, &enc.ciphertext).is_none());
        let mut other = context();
        other.salt.0[0] ^= 1;
        assert!(other.open(&kek, &enc.ciphertext).is_none());
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
        assert_eq!(
            xor(&first.ciphertext[..KEY_LEN], &same.ciphertext[..KEY_LEN]),
            plain
        );
        let mut salted = context();
        salted.salt.0[15] ^= 0x80;
        let second = salted.seal(&kek, &b);
        assert_ne!(
            xor(&first.ciphertext[..KEY_LEN], &second.ciphertext[..KEY_LEN]),
            plain
        );
    }
}
