//! Which controller key a member verifies with, and how it follows the group's chain of
//! signing keys ([`wire::KeyAnnouncement`]). Performs no I/O.
//!
//! The member starts from the key its operator pinned. An announcement is taken only when it
//! verifies under the key the member holds and names a later key number: so one signed by a
//! member, by a random key, or an old one replayed (signed by a key the member no longer holds)
//! changes nothing. After a switch the previous key is still accepted, for messages of the
//! epochs before the new key's first, until the member's epoch passes that first epoch by the
//! announced grace; never for announcements.

use ed25519_dalek::VerifyingKey;
use lkh_tree::{Epoch, GroupId};
use wire::{KeyAnnouncement, decode_signed};

/// The key the member verifies with, and the one before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SigningKeys {
    /// The key the operator pinned (the chain's start, as far as this member knows).
    pinned: VerifyingKey,
    /// The key messages are verified with.
    current: VerifyingKey,
    /// Its number in the group's chain, once an announcement named it (`None`: the pinned key,
    /// whose number the member does not know).
    current_id: Option<u32>,
    /// The key before, accepted for messages of epochs before `from_epoch` while the member's
    /// epoch is below `from_epoch + grace`.
    previous: Option<Previous>,
}

/// The key replaced by the last announcement taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Previous {
    /// The replaced key.
    pub key: VerifyingKey,
    /// The first epoch the current key signs.
    pub from_epoch: Epoch,
    /// How many epochs past `from_epoch` the replaced key is still accepted for older epochs.
    pub grace_epochs: u32,
}

/// An announcement taken: the member now verifies with its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Switched {
    /// The new key's number in the chain.
    pub key_id: u32,
    /// The first epoch it signs.
    pub from_epoch: Epoch,
}

/// Why an announcement was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotTaken {
    /// It does not decode.
    Malformed,
    /// It is for another group.
    OtherGroup,
    /// It names a key number not above the member's: old, or replayed.
    Stale,
    /// It does not verify under the key the member holds: forged, or one link of a chain the
    /// member has not walked yet (a later number than the next).
    BadSignature {
        /// The key number it names (unauthenticated: a hint that the member missed a link).
        key_id: u32,
    },
}

impl SigningKeys {
    /// A member that holds only the key its operator pinned.
    pub fn pinned(key: VerifyingKey) -> Self {
        SigningKeys {
            pinned: key,
            current: key,
            current_id: None,
            previous: None,
        }
    }

    /// Restored from what [`SigningKeys::parts`] gave (the member's own store).
    pub fn restore(
        pinned: VerifyingKey,
        current: VerifyingKey,
        current_id: Option<u32>,
        previous: Option<Previous>,
    ) -> Self {
        SigningKeys {
            pinned,
            current,
            current_id,
            previous,
        }
    }

    /// What to persist: the pinned key, the current key and its number, the previous key.
    pub fn parts(&self) -> (VerifyingKey, VerifyingKey, Option<u32>, Option<Previous>) {
        (self.pinned, self.current, self.current_id, self.previous)
    }

    /// The pinned key.
    pub fn pinned_key(&self) -> &VerifyingKey {
        &self.pinned
    }

    /// The key messages are verified with.
    pub fn current(&self) -> &VerifyingKey {
        &self.current
    }

    /// The current key's number in the group's chain (`None`: the pinned key).
    pub fn current_id(&self) -> Option<u32> {
        self.current_id
    }

    /// The key that verifies a message of `epoch`, for a member at `held`: the previous key for
    /// an epoch before the current key's first while the grace lasts, else the current key.
    pub fn for_epoch(&self, epoch: Epoch, held: Epoch) -> &VerifyingKey {
        match &self.previous {
            Some(p)
                if epoch < p.from_epoch
                    && held.0 < p.from_epoch.0.saturating_add(u64::from(p.grace_epochs)) =>
            {
                &p.key
            }
            _ => &self.current,
        }
    }

    /// Takes `bytes`, a signed announcement for `group`, if it verifies under the current key
    /// and names a later key.
    pub fn take(&mut self, group: GroupId, bytes: &[u8]) -> Result<Switched, NotTaken> {
        let unverified =
            decode_signed::<KeyAnnouncement>(bytes).map_err(|_| NotTaken::Malformed)?;
        let announced = unverified.message();
        if announced.group != group {
            return Err(NotTaken::OtherGroup);
        }
        if self.current_id.is_some_and(|id| announced.key_id <= id) {
            return Err(NotTaken::Stale);
        }
        let key_id = announced.key_id;
        let verified = unverified
            .verify(&self.current)
            .map_err(|_| NotTaken::BadSignature { key_id })?;
        let announced = verified.into_message();
        let key = VerifyingKey::from_bytes(&announced.key).map_err(|_| NotTaken::Malformed)?;
        self.previous = Some(Previous {
            key: self.current,
            from_epoch: announced.from_epoch,
            grace_epochs: announced.grace_epochs,
        });
        self.current = key;
        self.current_id = Some(announced.key_id);
        Ok(Switched {
            key_id: announced.key_id,
            from_epoch: announced.from_epoch,
        })
    }

    /// Walks a chain's links in order from the current key, taking each that follows; the last
    /// switch, if any. Links before the member's key are skipped; a link that fails stops the
    /// walk.
    pub fn walk<'a>(
        &mut self,
        group: GroupId,
        links: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<Switched> {
        let mut last = None;
        for link in links {
            match self.take(group, link) {
                Ok(switched) => last = Some(switched),
                Err(NotTaken::Stale) => {}
                Err(_) => break,
            }
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use wire::sign;

    use super::*;

    const GROUP: GroupId = GroupId(3);

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    fn announce(signer: &SigningKey, key_id: u32, new: &SigningKey, from: u64) -> Vec<u8> {
        let announcement = KeyAnnouncement {
            group: GROUP,
            key_id,
            from_epoch: Epoch(from),
            grace_epochs: 4,
            issued_ms: 1,
            key: new.verifying_key().to_bytes(),
        };
        sign(&announcement, signer)
    }

    #[test]
    fn a_link_signed_by_the_held_key_switches_and_forgeries_and_replays_do_not() {
        let mut keys = SigningKeys::pinned(key(0).verifying_key());
        let by_member = announce(&key(9), 1, &key(9), 10);
        assert_eq!(
            keys.take(GROUP, &by_member),
            Err(NotTaken::BadSignature { key_id: 1 })
        );
        let first = announce(&key(0), 1, &key(1), 10);
        assert_eq!(
            keys.take(GroupId(4), &first),
            Err(NotTaken::OtherGroup),
            "another group's"
        );
        assert_eq!(
            keys.take(GROUP, &first),
            Ok(Switched {
                key_id: 1,
                from_epoch: Epoch(10)
            })
        );
        assert_eq!(keys.current(), &key(1).verifying_key());
        // Replayed: its number is not above the member's.
        assert_eq!(keys.take(GROUP, &first), Err(NotTaken::Stale));
        // Signed by the replaced key (one that leaked later): refused.
        let by_old = announce(&key(0), 2, &key(7), 20);
        assert_eq!(
            keys.take(GROUP, &by_old),
            Err(NotTaken::BadSignature { key_id: 2 })
        );
        assert_eq!(keys.current(), &key(1).verifying_key());
    }

    #[test]
    fn the_previous_key_verifies_older_epochs_only_during_the_grace() {
        let mut keys = SigningKeys::pinned(key(0).verifying_key());
        keys.take(GROUP, &announce(&key(0), 1, &key(1), 10))
            .unwrap();
        let (old, new) = (key(0).verifying_key(), key(1).verifying_key());
        assert_eq!(keys.for_epoch(Epoch(9), Epoch(9)), &old);
        assert_eq!(keys.for_epoch(Epoch(10), Epoch(9)), &new);
        assert_eq!(keys.for_epoch(Epoch(9), Epoch(13)), &old);
        assert_eq!(keys.for_epoch(Epoch(9), Epoch(14)), &new, "grace over");
    }

    #[test]
    fn a_chain_is_walked_from_the_held_key_and_stops_at_a_bad_link() {
        let chain = [
            announce(&key(0), 1, &key(1), 10),
            announce(&key(1), 2, &key(2), 20),
            announce(&key(9), 3, &key(3), 30),
            announce(&key(2), 3, &key(3), 30),
        ];
        let mut keys = SigningKeys::pinned(key(0).verifying_key());
        let last = keys.walk(GROUP, chain.iter().map(Vec::as_slice));
        assert_eq!(
            last.map(|s| s.key_id),
            Some(2),
            "stopped at the forged link"
        );
        // Walked again from key 2: the old links are skipped, the good third taken.
        let last = keys.walk(GROUP, [&chain[0], &chain[1], &chain[3]].map(Vec::as_slice));
        assert_eq!(last.map(|s| s.key_id), Some(3));
        assert_eq!(keys.current(), &key(3).verifying_key());
    }
}
