//! Who may register in one group: the policy's allow list and tokens (from the config, read at
//! every start) and the group's durable enrollment state, the tokens spent and the identities
//! banned ([`EnrollmentRecords`]), whose changes go into the group's next save. A banned identity
//! is refused under every enrollment mode; a token is spent once, for good, and only before it
//! expires and by the identity it is bound to, if any.

use wire::RegistrationRequest;

use crate::policy::{Enrollment, Timestamp};
use crate::reject::Reject;
use crate::store::{EnrollmentChanges, EnrollmentRecords};

/// The label of a token's digest: policies and the store hold digests, never tokens.
const LABEL_TOKEN: &str = "gkm v1 2026-12 enrollment token digest";

/// The digest by which a token is listed in a policy and recorded as spent.
pub fn token_digest(token: &[u8]) -> [u8; 32] {
    blake3::derive_key(LABEL_TOKEN, token)
}

/// A group's enrollment state and its unsaved changes.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    records: EnrollmentRecords,
    changes: EnrollmentChanges,
}

impl Gate {
    /// The gate of a group restored with `records`.
    pub(crate) fn new(records: EnrollmentRecords) -> Self {
        Gate {
            records,
            changes: EnrollmentChanges::default(),
        }
    }

    /// What is held, as the store keeps it.
    pub(crate) fn records(&self) -> &EnrollmentRecords {
        &self.records
    }

    /// The changes since the last take.
    pub(crate) fn take_changes(&mut self) -> EnrollmentChanges {
        std::mem::take(&mut self.changes)
    }

    /// Whether `identity` is banned.
    pub(crate) fn banned(&self, identity: &[u8; 32]) -> bool {
        self.records.banned.contains(identity)
    }

    /// Bans `identity`; whether it was not banned before.
    pub(crate) fn ban(&mut self, identity: [u8; 32]) -> bool {
        let new = self.records.banned.insert(identity);
        if new {
            self.changes.unbanned.retain(|i| *i != identity);
            self.changes.banned.push(identity);
        }
        new
    }

    /// Lifts the ban of `identity`; whether it was banned.
    pub(crate) fn unban(&mut self, identity: [u8; 32]) -> bool {
        let was = self.records.banned.remove(&identity);
        if was {
            self.changes.banned.retain(|i| *i != identity);
            self.changes.unbanned.push(identity);
        }
        was
    }

    /// Checks a registration of someone who is not a current member against `enrollment`, and
    /// spends its token if that is what admits it.
    pub(crate) fn authorize(
        &mut self,
        enrollment: &Enrollment,
        request: &RegistrationRequest,
        now: Timestamp,
    ) -> Result<(), Reject> {
        if self.banned(&request.identity) {
            return Err(Reject::Unauthorized);
        }
        let Enrollment::Restricted { allowed, tokens } = enrollment else {
            return Ok(());
        };
        if allowed.contains(&request.identity) {
            return Ok(());
        }
        let digest = token_digest(&request.token);
        let usable = tokens.get(&digest).is_some_and(|rule| {
            rule.expires.is_none_or(|end| now < end)
                && rule.identity.is_none_or(|bound| bound == request.identity)
        });
        if !usable || !self.records.spent.insert(digest) {
            return Err(Reject::Unauthorized);
        }
        self.changes.spent.push(digest);
        Ok(())
    }
}
