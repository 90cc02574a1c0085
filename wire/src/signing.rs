//! The controller's signing key, replaced in flight: a chain of announcements.
//!
//! Members pin one Ed25519 key. To move a group to a new key, the controller multicasts a
//! [`KeyAnnouncement`] signed by the group's current key: the new key, its number in the chain,
//! and the first epoch it signs. A member that verifies it under the key it holds switches; one
//! that missed it asks for the chain ([`KeyChainRequest`], answered by [`KeyChain`]) and walks it
//! from the key it holds, each link verified under the one before.
//!
//! ```text
//! pinned key 0 ──signs──► announcement 1 (key 1, from epoch E1) ──signs──► announcement 2 …
//! ```
//!
//! Forgeries change nothing: an announcement verifies only under the key it follows, so one
//! signed by anyone else, or an old one replayed (signed by a key the member no longer holds),
//! fails its check. The chain message itself is unsigned: every link in it is.

use lkh_tree::{Epoch, GroupId};

use crate::codec::{Codec, CountWidth, DecodeError, Reader};
use crate::message::{HEADER_LEN, Header, MessageType, NONCE_LEN};
use crate::signed::SIGNATURE_LEN;

/// The bytes of a signed announcement: header, key number, epoch, grace, time, key, signature.
pub const ANNOUNCEMENT_LEN: usize = HEADER_LEN + 4 + 8 + 4 + 8 + 32 + SIGNATURE_LEN;

/// The most announcements a [`KeyChain`] carries (and a controller keeps per group): a member
/// whose key is older than these must be re-provisioned.
pub const MAX_CHAIN: usize = 16;

/// Controller → group (multicast, and in a [`KeyChain`]): from `from_epoch` on, the group's
/// messages are signed by `key`. Signed by the key numbered `key_id - 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAnnouncement {
    /// The group.
    pub group: GroupId,
    /// The new key's number in the group's chain (the key members were first given is 0).
    pub key_id: u32,
    /// The first epoch whose messages the new key signs.
    pub from_epoch: Epoch,
    /// For how many epochs after `from_epoch` a member still accepts the previous key for
    /// messages of the epochs before it (late repeats).
    pub grace_epochs: u32,
    /// When the key was made, in milliseconds since the Unix epoch.
    pub issued_ms: u64,
    /// The new Ed25519 public key.
    pub key: [u8; 32],
}

impl Codec for KeyAnnouncement {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::KeyAnnouncement, self.group);
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&self.from_epoch.0.to_be_bytes());
        out.extend_from_slice(&self.grace_epochs.to_be_bytes());
        out.extend_from_slice(&self.issued_ms.to_be_bytes());
        out.extend_from_slice(&self.key);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::KeyAnnouncement)?;
        let key_id = r.u32("key id")?;
        if key_id == 0 {
            return Err(DecodeError::Invalid(
                "key id 0 (the first key is never announced)",
            ));
        }
        Ok(KeyAnnouncement {
            group,
            key_id,
            from_epoch: Epoch(r.u64("from epoch")?),
            grace_epochs: r.u32("grace")?,
            issued_ms: r.u64("issued")?,
            key: r.array("key")?,
        })
    }
}

/// Member → controller: the announcements that lead from `known_key` to the group's current
/// key. Unsigned: the answer is public, and verified link by link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChainRequest {
    /// The group.
    pub group: GroupId,
    /// The signing key the member holds.
    pub known_key: [u8; 32],
    /// A random nonce, echoed in the answer.
    pub nonce: [u8; NONCE_LEN],
}

impl Codec for KeyChainRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::KeyChainRequest, self.group);
        out.extend_from_slice(&self.known_key);
        out.extend_from_slice(&self.nonce);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::KeyChainRequest)?;
        Ok(KeyChainRequest {
            group,
            known_key: r.array("known key")?,
            nonce: r.array("nonce")?,
        })
    }
}

/// Controller → member: the signed announcements after the one that introduced the key the
/// request named, oldest first (none when that key is current). Unsigned container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyChain {
    /// The group.
    pub group: GroupId,
    /// The request's nonce.
    pub request_nonce: [u8; NONCE_LEN],
    /// Signed announcements, each [`ANNOUNCEMENT_LEN`] bytes, at most [`MAX_CHAIN`].
    pub announcements: Vec<[u8; ANNOUNCEMENT_LEN]>,
}

impl Codec for KeyChain {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::KeyChain, self.group);
        out.extend_from_slice(&self.request_nonce);
        let count = self.announcements.len().min(MAX_CHAIN);
        out.push(u8::try_from(count).unwrap_or(u8::MAX));
        for announcement in self.announcements.iter().take(count) {
            out.extend_from_slice(announcement);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::KeyChain)?;
        let request_nonce = r.array("request nonce")?;
        let count = r.count(CountWidth::U8, ANNOUNCEMENT_LEN, MAX_CHAIN, "announcements")?;
        let announcements = (0..count)
            .map(|_| r.array("announcement"))
            .collect::<Result<_, _>>()?;
        Ok(KeyChain {
            group,
            request_nonce,
            announcements,
        })
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::signed::{open, sign};

    fn announcement() -> KeyAnnouncement {
        KeyAnnouncement {
            group: GroupId(7),
            key_id: 1,
            from_epoch: Epoch(42),
            grace_epochs: 16,
            issued_ms: 1_700_000_000_000,
            key: SigningKey::from_bytes(&[2; 32]).verifying_key().to_bytes(),
        }
    }

    #[test]
    fn an_announcement_is_its_fixed_length_and_verifies_only_under_the_key_before() {
        let old = SigningKey::from_bytes(&[1; 32]);
        let bytes = sign(&announcement(), &old);
        assert_eq!(bytes.len(), ANNOUNCEMENT_LEN);
        let opened = open::<KeyAnnouncement>(&bytes, &old.verifying_key()).unwrap();
        assert_eq!(opened.message(), &announcement());
        let other = SigningKey::from_bytes(&[3; 32]).verifying_key();
        assert!(open::<KeyAnnouncement>(&bytes, &other).is_err());
    }

    #[test]
    fn key_id_zero_is_refused() {
        let mut zero = announcement();
        zero.key_id = 0;
        assert!(KeyAnnouncement::decode_exact(&zero.to_bytes()).is_err());
    }

    #[test]
    fn a_chain_round_trips_and_its_count_is_bounded() {
        let old = SigningKey::from_bytes(&[1; 32]);
        let link: [u8; ANNOUNCEMENT_LEN] = sign(&announcement(), &old).try_into().unwrap();
        let chain = KeyChain {
            group: GroupId(7),
            request_nonce: [5; NONCE_LEN],
            announcements: vec![link; 3],
        };
        assert_eq!(KeyChain::decode_exact(&chain.to_bytes()).unwrap(), chain);
        let mut long = chain.to_bytes();
        long[HEADER_LEN + NONCE_LEN] = u8::try_from(MAX_CHAIN + 1).unwrap();
        assert!(KeyChain::decode_exact(&long).is_err());
        let request = KeyChainRequest {
            group: GroupId(7),
            known_key: [9; 32],
            nonce: [4; NONCE_LEN],
        };
        assert_eq!(
            KeyChainRequest::decode_exact(&request.to_bytes()).unwrap(),
            request
        );
    }
}
