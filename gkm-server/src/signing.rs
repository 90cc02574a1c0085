//! A group's signing keys: the controller's own key (`controller.key`, number 0, the one
//! members pin) and the keys that replaced it (`gkmctl signing-key rotate`), each announced in a
//! [`wire::KeyAnnouncement`] signed by the key before.
//!
//! The chain lives in the group's durable state, sealed under the storage key with the tree:
//! a standby that takes the group over signs with the group's current key, and the rotation is
//! saved with the rekey that first uses the new key (write-ahead: nothing signed by a key leaves
//! before the key is durable). Only the current key's seed is kept; the announcements are kept
//! (at most [`wire::MAX_CHAIN`]) for members that missed them.

use std::fmt;

use ed25519_dalek::SigningKey;
use lkh_tree::{Epoch, GroupId};
use wire::{ANNOUNCEMENT_LEN, KeyAnnouncement, MAX_CHAIN, decode_signed, sign};
use zeroize::Zeroizing;

/// For how many epochs after a new key's first a member still accepts the key before it, for
/// messages of earlier epochs (repeats still on their way).
pub const GRACE_EPOCHS: u32 = 16;

/// One replacement key: its signed announcement and, for the group's current key, its seed.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKeyRecord {
    /// The announcement, as signed by the key before.
    pub announcement: [u8; ANNOUNCEMENT_LEN],
    /// The key's Ed25519 seed (only the current key's is kept).
    pub seed: Option<Zeroizing<[u8; 32]>>,
    /// What the announcement says.
    announced: KeyAnnouncement,
}

impl fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("announced", &self.announced)
            .field("seed", &self.seed.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SigningKeyRecord {
    /// A record from stored bytes (the controller's own, sealed under the storage key): `None`
    /// if the announcement does not decode.
    pub fn parse(
        announcement: [u8; ANNOUNCEMENT_LEN],
        seed: Option<Zeroizing<[u8; 32]>>,
    ) -> Option<Self> {
        let announced = decode_signed::<KeyAnnouncement>(&announcement)
            .ok()?
            .message()
            .clone();
        Some(SigningKeyRecord {
            announcement,
            seed,
            announced,
        })
    }

    /// What the announcement says.
    pub fn announced(&self) -> &KeyAnnouncement {
        &self.announced
    }
}

/// Appends `record` to a stored chain (a delta's rotation replayed): the records before it lose
/// their seeds, and only the newest [`MAX_CHAIN`] are kept.
pub(crate) fn append_signing_key(records: &mut Vec<SigningKeyRecord>, record: SigningKeyRecord) {
    records.push(record);
    keep_newest(records);
}

/// Drops the seeds of every record but the last, and the records past the newest [`MAX_CHAIN`].
fn keep_newest(records: &mut Vec<SigningKeyRecord>) {
    let last = records.len().saturating_sub(1);
    for record in records.iter_mut().take(last) {
        record.seed = None;
    }
    let excess = records.len().saturating_sub(MAX_CHAIN);
    records.drain(..excess);
}

/// A group's chain of signing keys (see the module docs).
#[derive(Default)]
pub(crate) struct SigningChain {
    records: Vec<SigningKeyRecord>,
    /// The current key, when it is not the controller's own.
    current: Option<SigningKey>,
    /// Records added since the last save.
    changes: Vec<SigningKeyRecord>,
}

impl SigningChain {
    /// The chain of a stored state (the last record's seed is the current key).
    pub(crate) fn restore(records: &[SigningKeyRecord]) -> Self {
        let current = records
            .last()
            .and_then(|r| r.seed.as_ref())
            .map(|seed| SigningKey::from_bytes(seed));
        SigningChain {
            records: records.to_vec(),
            current,
            changes: Vec::new(),
        }
    }

    /// The key the group's messages are signed with: `own` (the controller's key) until the
    /// group's first rotation.
    pub(crate) fn signer<'a>(&'a self, own: &'a SigningKey) -> &'a SigningKey {
        self.current.as_ref().unwrap_or(own)
    }

    /// The current key's number (0: the controller's own).
    pub(crate) fn current_id(&self) -> u32 {
        self.records.last().map_or(0, |r| r.announced.key_id)
    }

    /// The current key's announcement, if the group rotated.
    pub(crate) fn current_record(&self) -> Option<&SigningKeyRecord> {
        self.records.last()
    }

    /// Every record kept, oldest first.
    pub(crate) fn records(&self) -> &[SigningKeyRecord] {
        &self.records
    }

    /// The records added since the last call (for the group's next save).
    pub(crate) fn take_changes(&mut self) -> Vec<SigningKeyRecord> {
        std::mem::take(&mut self.changes)
    }

    /// Replaces the current key by the one of `seed`, first signing at `from_epoch`: the
    /// announcement is signed by the current key (`own` until the first rotation). Staged: the
    /// key before is kept until [`SigningChain::settle`], and [`SigningChain::unstage`] puts it
    /// back. Whether it staged.
    pub(crate) fn stage(
        &mut self,
        group: GroupId,
        seed: Zeroizing<[u8; 32]>,
        from_epoch: Epoch,
        issued_ms: u64,
        own: &SigningKey,
    ) -> bool {
        let next = SigningKey::from_bytes(&seed);
        let announced = KeyAnnouncement {
            group,
            key_id: self.current_id().saturating_add(1),
            from_epoch,
            grace_epochs: GRACE_EPOCHS,
            issued_ms,
            key: next.verifying_key().to_bytes(),
        };
        // An announcement is always ANNOUNCEMENT_LEN bytes; were it not, nothing is staged.
        let Ok(announcement) =
            <[u8; ANNOUNCEMENT_LEN]>::try_from(sign(&announced, self.signer(own)))
        else {
            return false;
        };
        let record = SigningKeyRecord {
            announcement,
            seed: Some(seed),
            announced,
        };
        self.changes.push(record.clone());
        self.records.push(record);
        self.current = Some(next);
        true
    }

    /// Undoes [`SigningChain::stage`] (its save failed): the key before is current again; the
    /// staged seed is returned, to be staged again with the next rekey.
    pub(crate) fn unstage(&mut self) -> Option<Zeroizing<[u8; 32]>> {
        let record = self.records.pop()?;
        self.changes.clear();
        self.current = self
            .records
            .last()
            .and_then(|r| r.seed.as_ref())
            .map(|seed| SigningKey::from_bytes(seed));
        record.seed
    }

    /// The staged key is durable: the seeds of the keys before it are dropped (zeroized), and
    /// only the newest [`MAX_CHAIN`] announcements are kept.
    pub(crate) fn settle(&mut self) {
        keep_newest(&mut self.records);
    }

    /// The announcements that lead from `known` to the current key, oldest first; `None` when
    /// `known` is not a key the kept chain reaches (`own_public` is the controller's own key,
    /// number 0, reached only while the first announcement is kept).
    pub(crate) fn links_after(
        &self,
        known: &[u8; 32],
        own_public: &[u8; 32],
    ) -> Option<Vec<[u8; ANNOUNCEMENT_LEN]>> {
        let from = if known == own_public
            && self.records.first().is_none_or(|r| r.announced.key_id == 1)
        {
            0
        } else {
            self.records
                .iter()
                .position(|r| &r.announced.key == known)?
                .saturating_add(1)
        };
        Some(
            self.records
                .iter()
                .skip(from)
                .map(|r| r.announcement)
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(rotations: u8, own: &SigningKey) -> SigningChain {
        let mut chain = SigningChain::default();
        for n in 1..=rotations {
            chain.stage(
                GroupId(1),
                Zeroizing::new([n; 32]),
                Epoch(u64::from(n) * 10),
                0,
                own,
            );
            chain.settle();
        }
        chain
    }

    #[test]
    fn each_link_is_signed_by_the_key_before_and_only_the_current_seed_is_kept() {
        let own = SigningKey::from_bytes(&[0; 32]);
        let chain = chain_of(3, &own);
        let mut key = own.verifying_key();
        for record in chain.records() {
            let opened = wire::open::<KeyAnnouncement>(&record.announcement, &key).unwrap();
            key = ed25519_dalek::VerifyingKey::from_bytes(&opened.message().key).unwrap();
        }
        assert_eq!(key, chain.signer(&own).verifying_key());
        assert_eq!(chain.current_id(), 3);
        let seeds: Vec<bool> = chain.records().iter().map(|r| r.seed.is_some()).collect();
        assert_eq!(seeds, [false, false, true]);
        let shown = format!("{:?}", chain.records()[2]);
        assert!(
            shown.contains("***") && !shown.contains("3, 3, 3, 3, 3, 3"),
            "{shown}"
        );
    }

    #[test]
    fn links_start_after_the_known_key_and_an_unknown_or_dropped_key_has_none() {
        let own = SigningKey::from_bytes(&[0; 32]);
        let own_public = own.verifying_key().to_bytes();
        let chain = chain_of(3, &own);
        assert_eq!(
            chain.links_after(&own_public, &own_public).unwrap().len(),
            3
        );
        let second = chain.records()[1].announced().key;
        assert_eq!(chain.links_after(&second, &own_public).unwrap().len(), 1);
        assert_eq!(chain.links_after(&[7; 32], &own_public), None);
        let long = chain_of(u8::try_from(MAX_CHAIN).unwrap() + 1, &own);
        assert_eq!(long.records().len(), MAX_CHAIN);
        assert_eq!(
            long.links_after(&own_public, &own_public),
            None,
            "link 1 dropped"
        );
    }

    #[test]
    fn unstage_puts_the_key_before_back() {
        let own = SigningKey::from_bytes(&[0; 32]);
        let mut chain = chain_of(1, &own);
        let before = chain.signer(&own).verifying_key();
        chain.stage(GroupId(1), Zeroizing::new([9; 32]), Epoch(20), 0, &own);
        assert_ne!(chain.signer(&own).verifying_key(), before);
        assert_eq!(*chain.unstage().unwrap(), [9; 32]);
        assert_eq!(chain.signer(&own).verifying_key(), before);
        assert!(chain.take_changes().is_empty());
    }
}
