//! Which traffic key a member's applications send with, and which keys they accept: the
//! activation and deactivation delays of RFC 9838 (`GWP_ATD`, `GWP_DTD`), as a sans-I/O
//! schedule.
//!
//! ```text
//!           the agent gets key E+1    + activation delay        + deactivation delay
//!                    │                        │                          │
//!   send with:   E ──┼────────── E ───────────┼───────── E+1 ────────────┼──── E+1
//!   accept:      E   │        E+1, E          │        E+1, E            │     E+1
//! ```
//!
//! A sender switches to a new key the activation delay after its agent got it, so that receivers
//! whose agents got it a little later already hold it. A receiver accepts frames under the
//! previous key until the deactivation delay after its agent got the new one, then refuses them:
//! a member evicted by the rekey keeps the old key, and that key stops opening frames a bounded
//! time after the rekey (before, receivers kept the last four epochs' keys for as long as no
//! newer frame arrived).
//!
//! Call order: [`KeySchedule::handle_key`] whenever the member's traffic key may have changed
//! ([`KeySchedule::clear`] when it holds none), [`KeySchedule::handle_timeout`] at
//! [`KeySchedule::poll_timeout`]; read [`KeySchedule::send_key`] and [`KeySchedule::accepted`].
//! Times are milliseconds of a clock that never goes back (the driver's monotonic clock, not the
//! wall clock: a clock stepped back must not keep an old key alive); the schedule reads none.

use std::collections::VecDeque;

use lkh_tree::{Epoch, Kcv, TrafficKey};
use wire::MemberId;

use crate::Millis;

/// The default activation delay (`GWP_ATD`): 250 ms. A rekey is multicast twice, 100 ms apart
/// (the controller's default `repeats` and `repeat_spacing_ms`), so a member that lost the first
/// copy holds the key some 100 ms after the others; 250 ms covers that copy and the scheduling
/// of agents on a busy host. A member that lost both copies learns the key by resync, seconds
/// later; waiting that long would keep senders on a key the controller has retired, so it is
/// not covered (raise the delay towards the heartbeat interval where loss is common).
pub const DEFAULT_ACTIVATION_MS: u64 = 250;
/// The default deactivation delay (`GWP_DTD`): 5 s. A receiver must still accept the frames a
/// sender sealed under the previous key until that sender switched: up to the activation delay
/// after the *sender's* agent got the new key, which can be seconds after the receiver's (the
/// multi-host tests measured key arrival spreads of up to 2.6 s p99 under 20% loss: a member that
/// lost a rekey notices at the next heartbeat, 2 s by default, and resyncs). 5 s covers that with
/// margin; it is also how long a member evicted by the rekey can still inject frames under the
/// key it kept.
pub const DEFAULT_DEACTIVATION_MS: u64 = 5_000;
/// The longest activation delay accepted: a minute.
pub const MAX_ACTIVATION_MS: u64 = 60_000;
/// The longest deactivation delay accepted: ten minutes.
pub const MAX_DEACTIVATION_MS: u64 = 600_000;
/// Keys held at most (the newest and those not yet dropped); more rekeys within a deactivation
/// delay drop the oldest early.
pub const MAX_HELD: usize = 4;

/// The activation and deactivation delays, checked: the deactivation delay is longer than the
/// activation delay, so a sender never sends under a key its receivers dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyDelays {
    activation_ms: u64,
    deactivation_ms: u64,
}

impl Default for KeyDelays {
    /// [`DEFAULT_ACTIVATION_MS`] and [`DEFAULT_DEACTIVATION_MS`].
    fn default() -> Self {
        KeyDelays {
            activation_ms: DEFAULT_ACTIVATION_MS,
            deactivation_ms: DEFAULT_DEACTIVATION_MS,
        }
    }
}

impl KeyDelays {
    /// The delays, if each is within its bound and deactivation comes after activation.
    pub fn new(activation_ms: u64, deactivation_ms: u64) -> Result<Self, DelayError> {
        if activation_ms > MAX_ACTIVATION_MS {
            return Err(DelayError::ActivationTooLong(activation_ms));
        }
        if deactivation_ms > MAX_DEACTIVATION_MS {
            return Err(DelayError::DeactivationTooLong(deactivation_ms));
        }
        if deactivation_ms <= activation_ms {
            return Err(DelayError::DeactivationNotAfterActivation {
                activation_ms,
                deactivation_ms,
            });
        }
        Ok(KeyDelays {
            activation_ms,
            deactivation_ms,
        })
    }

    /// How long after its agent got a key a sender switches to it.
    pub fn activation_ms(&self) -> u64 {
        self.activation_ms
    }

    /// How long after its agent got a key a receiver still accepts the one before it.
    pub fn deactivation_ms(&self) -> u64 {
        self.deactivation_ms
    }
}

/// Delays that cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DelayError {
    /// The activation delay is above [`MAX_ACTIVATION_MS`].
    #[error("an activation delay of {0} ms is longer than the {MAX_ACTIVATION_MS} ms allowed")]
    ActivationTooLong(u64),
    /// The deactivation delay is above [`MAX_DEACTIVATION_MS`].
    #[error("a deactivation delay of {0} ms is longer than the {MAX_DEACTIVATION_MS} ms allowed")]
    DeactivationTooLong(u64),
    /// The deactivation delay is not longer than the activation delay.
    #[error(
        "the deactivation delay ({deactivation_ms} ms) must be longer than the activation delay \
         ({activation_ms} ms): senders would still use a key their receivers dropped"
    )]
    DeactivationNotAfterActivation {
        /// The activation delay given.
        activation_ms: u64,
        /// The deactivation delay given.
        deactivation_ms: u64,
    },
}

/// A key receivers accept now.
#[derive(Debug)]
pub struct AcceptedKey<'a> {
    /// Its epoch.
    pub epoch: Epoch,
    /// The key.
    pub key: &'a TrafficKey,
    /// Its check value.
    pub kcv: Kcv,
    /// When receivers drop it (`None` for the newest key: not yet known).
    pub drop_at: Option<Millis>,
}

#[derive(Clone)]
struct Held {
    epoch: Epoch,
    key: TrafficKey,
    kcv: Kcv,
    /// When the agent got it.
    got_at: Millis,
}

/// The traffic keys a member holds for its applications, oldest first, each with the time the
/// agent got it.
#[derive(Clone)]
pub struct KeySchedule {
    delays: KeyDelays,
    member: Option<MemberId>,
    keys: VecDeque<Held>,
    /// The latest time handed in.
    now: Millis,
}

impl KeySchedule {
    /// A schedule holding no key.
    pub fn new(delays: KeyDelays) -> Self {
        KeySchedule {
            delays,
            member: None,
            keys: VecDeque::new(),
            now: 0,
        }
    }

    /// The delays.
    pub fn delays(&self) -> KeyDelays {
        self.delays
    }

    /// Member `member` holds `key` of `epoch` at `now`. The same key again changes nothing. A
    /// newer epoch is the new key: the previous stays the send key for the activation delay and
    /// is accepted for the deactivation delay. A new membership, an older epoch or the same
    /// epoch with another key (the group was reset, or its controller's state rolled back)
    /// replace every key at once: no earlier key is sent with or accepted any more.
    pub fn handle_key(&mut self, now: Millis, member: MemberId, epoch: Epoch, key: &TrafficKey) {
        self.advance(now);
        let kcv = key.check_value();
        let same_member = self.member == Some(member);
        match self.keys.back() {
            Some(newest) if same_member && newest.epoch == epoch && newest.kcv == kcv => return,
            Some(newest) if same_member && newest.epoch < epoch => {}
            _ => self.keys.clear(),
        }
        self.member = Some(member);
        self.keys.push_back(Held {
            epoch,
            key: key.clone(),
            kcv,
            got_at: self.now,
        });
        while self.keys.len() > MAX_HELD {
            self.keys.pop_front();
        }
        self.expire();
    }

    /// The member holds no key (not admitted, or its membership ended): nothing is sent with or
    /// accepted.
    pub fn clear(&mut self) {
        self.member = None;
        self.keys.clear();
    }

    /// Time passed: drops the keys whose deactivation delay is over.
    pub fn handle_timeout(&mut self, now: Millis) {
        self.advance(now);
        self.expire();
    }

    /// The next time the send key changes or a key is dropped, after the last time handed in.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.keys
            .iter()
            .skip(1)
            .flat_map(|k| {
                [
                    k.got_at.saturating_add(self.delays.activation_ms),
                    k.got_at.saturating_add(self.delays.deactivation_ms),
                ]
            })
            .filter(|&at| at > self.now)
            .min()
    }

    /// The key to send with at `now`: the newest whose activation delay is over, else the oldest
    /// still accepted (the first key of a membership is sent with at once).
    pub fn send_key(&self, now: Millis) -> Option<(Epoch, &TrafficKey)> {
        let live: Vec<&Held> = self.live(now).map(|(held, _)| held).collect();
        live.iter()
            .rev()
            .find(|k| k.got_at.saturating_add(self.delays.activation_ms) <= now)
            .or_else(|| live.first())
            .map(|k| (k.epoch, &k.key))
    }

    /// When the newest key becomes the send key; `None` once it is (or with fewer than two keys).
    pub fn activate_at(&self, now: Millis) -> Option<Millis> {
        let newest = self.keys.back()?;
        let at = newest.got_at.saturating_add(self.delays.activation_ms);
        (self.keys.len() > 1 && at > now).then_some(at)
    }

    /// The keys receivers accept at `now`, newest first.
    pub fn accepted(&self, now: Millis) -> impl Iterator<Item = AcceptedKey<'_>> {
        let held: Vec<(&Held, Option<Millis>)> = self.live(now).collect();
        held.into_iter().rev().map(|(k, drop_at)| AcceptedKey {
            epoch: k.epoch,
            key: &k.key,
            kcv: k.kcv,
            drop_at,
        })
    }

    /// The newest key's epoch.
    pub fn newest(&self) -> Option<Epoch> {
        self.keys.back().map(|k| k.epoch)
    }

    /// Whether `other` holds the same keys, got at the same times, for the same member.
    pub fn same_keys(&self, other: &KeySchedule) -> bool {
        self.member == other.member
            && self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .zip(&other.keys)
                .all(|(a, b)| (a.epoch, a.kcv, a.got_at) == (b.epoch, b.kcv, b.got_at))
    }

    /// The keys not dropped at `now`, oldest first, each with its drop time.
    fn live(&self, now: Millis) -> impl Iterator<Item = (&Held, Option<Millis>)> {
        let deactivation = self.delays.deactivation_ms;
        let next_got = self
            .keys
            .iter()
            .skip(1)
            .map(|k| Some(k.got_at))
            .chain([None]);
        self.keys
            .iter()
            .zip(next_got)
            .map(move |(k, next)| (k, next.map(|at| at.saturating_add(deactivation))))
            .filter(move |(_, drop_at)| drop_at.is_none_or(|at| at > now))
    }

    fn advance(&mut self, now: Millis) {
        self.now = self.now.max(now);
    }

    fn expire(&mut self) {
        while let Some(next) = self.keys.get(1) {
            if next.got_at.saturating_add(self.delays.deactivation_ms) > self.now {
                break;
            }
            self.keys.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACT: u64 = 250;
    const DEACT: u64 = 5_000;

    fn key(byte: u8) -> TrafficKey {
        TrafficKey::from_bytes([byte; 32])
    }

    fn schedule() -> KeySchedule {
        KeySchedule::new(KeyDelays::new(ACT, DEACT).unwrap())
    }

    fn send_epoch(s: &KeySchedule, now: Millis) -> Option<u64> {
        s.send_key(now).map(|(e, _)| e.0)
    }

    fn accepted(s: &KeySchedule, now: Millis) -> Vec<(u64, Option<Millis>)> {
        s.accepted(now).map(|k| (k.epoch.0, k.drop_at)).collect()
    }

    const M: MemberId = MemberId(7 << 32);

    #[test]
    fn v055_a_sender_keeps_the_old_key_until_the_activation_delay_passes() {
        let mut s = schedule();
        s.handle_key(1_000, M, Epoch(4), &key(4));
        assert_eq!(
            send_epoch(&s, 1_000),
            Some(4),
            "a first key is sent with at once"
        );
        s.handle_key(2_000, M, Epoch(5), &key(5));
        assert_eq!(send_epoch(&s, 2_000), Some(4));
        assert_eq!(send_epoch(&s, 2_000 + ACT - 1), Some(4));
        assert_eq!(s.activate_at(2_000), Some(2_000 + ACT));
        assert_eq!(send_epoch(&s, 2_000 + ACT), Some(5));
        assert_eq!(s.activate_at(2_000 + ACT), None);
        let (_, k) = s.send_key(2_000 + ACT).unwrap();
        assert_eq!(k.check_value(), key(5).check_value());
    }

    #[test]
    fn v055_the_previous_key_is_accepted_until_the_deactivation_delay_then_dropped() {
        let mut s = schedule();
        s.handle_key(1_000, M, Epoch(4), &key(4));
        s.handle_key(2_000, M, Epoch(5), &key(5));
        let drop = 2_000 + DEACT;
        assert_eq!(accepted(&s, 2_000), [(5, None), (4, Some(drop))]);
        assert_eq!(accepted(&s, drop - 1), [(5, None), (4, Some(drop))]);
        assert_eq!(accepted(&s, drop), [(5, None)], "dropped at its time");
        assert_eq!(s.poll_timeout(), Some(2_000 + ACT));
        s.handle_timeout(2_000 + ACT);
        assert_eq!(s.poll_timeout(), Some(drop));
        s.handle_timeout(drop);
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(accepted(&s, drop), [(5, None)]);
    }

    #[test]
    fn rapid_rekeys_activate_in_turn_and_keep_at_most_max_held() {
        let mut s = schedule();
        for (i, at) in [0u64, 100, 200].into_iter().enumerate() {
            let e = 10 + u64::try_from(i).unwrap();
            s.handle_key(at, M, Epoch(e), &key(u8::try_from(e).unwrap()));
        }
        assert_eq!(send_epoch(&s, 300), Some(10));
        assert_eq!(send_epoch(&s, 100 + ACT), Some(11));
        assert_eq!(send_epoch(&s, 200 + ACT), Some(12));
        for e in 13..20u8 {
            s.handle_key(300, M, Epoch(e.into()), &key(e));
        }
        assert_eq!(accepted(&s, 300).len(), MAX_HELD);
        assert_eq!(send_epoch(&s, 300), Some(16), "the oldest held");
    }

    #[test]
    fn a_new_membership_an_older_epoch_or_other_keys_replace_every_key_at_once() {
        let mut s = schedule();
        s.handle_key(0, M, Epoch(4), &key(4));
        s.handle_key(10, M, Epoch(5), &key(5));
        s.handle_key(20, M, Epoch(5), &key(5));
        assert_eq!(
            accepted(&s, 20).len(),
            2,
            "the same key again changes nothing"
        );
        s.handle_key(30, M, Epoch(5), &key(0x55));
        assert_eq!(accepted(&s, 30), [(5, None)]);
        assert_eq!(send_epoch(&s, 30), Some(5));
        s.handle_key(40, M, Epoch(3), &key(3));
        assert_eq!(accepted(&s, 40), [(3, None)]);
        s.handle_key(50, MemberId(9 << 32), Epoch(6), &key(6));
        assert_eq!(accepted(&s, 50), [(6, None)]);
        s.clear();
        assert!(s.send_key(60).is_none());
        assert_eq!(s.accepted(60).count(), 0);
    }

    #[test]
    fn delays_are_bounded_and_deactivation_comes_after_activation() {
        assert_eq!(
            KeyDelays::default(),
            KeyDelays::new(DEFAULT_ACTIVATION_MS, DEFAULT_DEACTIVATION_MS).unwrap()
        );
        assert!(KeyDelays::new(0, 1).is_ok());
        assert_eq!(
            KeyDelays::new(500, 500),
            Err(DelayError::DeactivationNotAfterActivation {
                activation_ms: 500,
                deactivation_ms: 500
            })
        );
        assert!(KeyDelays::new(MAX_ACTIVATION_MS + 1, MAX_DEACTIVATION_MS).is_err());
        assert!(KeyDelays::new(0, MAX_DEACTIVATION_MS + 1).is_err());
        let e = KeyDelays::new(300, 200).unwrap_err().to_string();
        assert!(
            e.contains("must be longer than the activation delay"),
            "{e}"
        );
    }
}
