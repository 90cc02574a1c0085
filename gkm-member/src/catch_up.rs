//! When a member that fell behind asks for a resync: the one decision [`crate::Member`] takes
//! and netsim's subtree model calls for each modelled receiver, so that the two cannot drift.
//!
//! A member learns it is behind from a heartbeat that names a later epoch (or its own epoch with
//! another key), from a rekey datagram of a later epoch than the next, from a datagram of the
//! next epoch that does not apply, from an acknowledgement that names a later epoch, or from a
//! silent channel. It does not resync at once: the controller repeats every rekey datagram
//! (spaced, by default 100 ms apart), so it waits [`CatchUp::grace_ms`] (longer than the
//! repeats take) and resyncs only if no rekey applied meanwhile. Datagrams of later epochs that
//! arrive while it waits are held (at most [`HELD_REKEYS`], each for the grace) and applied in
//! order once the missed epoch arrives.
//!
//! Pure: no I/O, no clock (every call takes `now`), no randomness. Call order for a driver:
//! `behind`/`caught_up`/`hold` as messages arrive, `next_held` after every applied rekey, and
//! `handle_timeout` when [`CatchUp::poll_timeout`] is due (a resync request is sent when it
//! answers `true`).

use std::collections::VecDeque;

use lkh_tree::{Epoch, Kcv};

use crate::Millis;

/// Rekey datagrams of later epochs a member holds while it waits for the one it missed: at most
/// this many, the oldest given up first.
pub const HELD_REKEYS: usize = 16;

/// What a rekey datagram's epoch means to a member holding `mine` (see [`arrival`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The member's epoch or an older one: a repeat or a replay, dropped.
    Old,
    /// The next epoch: applied if it serves the member.
    Next,
    /// A later epoch than the next: the member missed one; held, and the member is behind.
    Later,
}

/// What a rekey datagram of epoch `got` means to a member holding epoch `mine` (the order in
/// which `wire::AuthenticRekey::fresh` checks it).
pub fn arrival(mine: Epoch, got: Epoch) -> Arrival {
    if got <= mine {
        Arrival::Old
    } else if mine.next() == Some(got) {
        Arrival::Next
    } else {
        Arrival::Later
    }
}

/// Whether a heartbeat of the member's group naming `beat` (with key check value `beat_kcv`)
/// leaves a member holding `mine` (with traffic key check value `kcv`) in step: an older epoch,
/// or its own with the same key. Otherwise the member is behind.
pub fn in_step(mine: Epoch, kcv: Option<Kcv>, beat: Epoch, beat_kcv: Kcv) -> bool {
    beat < mine || (beat == mine && Some(beat_kcv) == kcv)
}

/// Whether holding a datagram kept or dropped something (the member counts what it drops).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Held.
    Held,
    /// A copy of one held already: dropped.
    Duplicate,
    /// Held, and the oldest held one was given up to make room.
    HeldDroppingOldest,
}

/// A datagram of a later epoch, held until the missed epoch arrives or `until`.
#[derive(Clone, Debug)]
struct Held<T> {
    epoch: Epoch,
    until: Millis,
    item: T,
}

/// A member's resync timer and held rekeys. `T` is what is held of a datagram: its bytes in
/// [`crate::Member`], nothing (`()`) in a model that knows the datagram from its epoch.
#[derive(Clone, Debug)]
pub struct CatchUp<T> {
    grace_ms: u64,
    resync_at: Option<Millis>,
    held: VecDeque<Held<T>>,
}

impl<T: PartialEq> CatchUp<T> {
    /// Nothing due, nothing held; a member behind waits `grace_ms` before it resyncs.
    pub fn new(grace_ms: u64) -> Self {
        CatchUp {
            grace_ms,
            resync_at: None,
            held: VecDeque::new(),
        }
    }

    /// How long a member behind waits for a repeat before it resyncs.
    pub fn grace_ms(&self) -> u64 {
        self.grace_ms
    }

    /// The member learned at `now` that it is behind: a resync is due after the grace, unless
    /// one is due already or `asking` (a resync or renewal waits for its answer, which brings
    /// the keys or names the epoch).
    pub fn behind(&mut self, now: Millis, asking: bool) {
        if self.resync_at.is_none() && !asking {
            self.resync_at = Some(now.saturating_add(self.grace_ms));
        }
    }

    /// The member applied a rekey or received its keys: no resync is due. (One still behind
    /// learns it again from the next heartbeat or datagram.)
    pub fn caught_up(&mut self) {
        self.resync_at = None;
    }

    /// No resync is due and nothing is held (the member left, or its membership ended).
    pub fn reset(&mut self) {
        self.resync_at = None;
        self.held.clear();
    }

    /// When the resync is due, if one is.
    pub fn poll_timeout(&self) -> Option<Millis> {
        self.resync_at
    }

    /// Whether a resync is due at `now`: `true` once, then the timer is clear (the member sends
    /// its resync request now).
    pub fn handle_timeout(&mut self, now: Millis) -> bool {
        if self.resync_at.is_some_and(|t| t <= now) {
            self.resync_at = None;
            return true;
        }
        false
    }

    /// Holds a verified datagram of a later epoch than the next, for the grace: applied in order
    /// once the missed epoch arrives ([`CatchUp::next_held`]). Bounded by [`HELD_REKEYS`]. A
    /// copy of one held is dropped, unless the held one's time ran out (then the copy is held
    /// afresh: a repeat after the grace still serves).
    pub fn hold(&mut self, now: Millis, epoch: Epoch, item: T) -> Hold {
        self.held.retain(|h| h.until > now);
        if self.held.iter().any(|h| h.item == item) {
            return Hold::Duplicate;
        }
        let mut outcome = Hold::Held;
        if self.held.len() >= HELD_REKEYS {
            self.held.pop_front();
            outcome = Hold::HeldDroppingOldest;
        }
        self.held.push_back(Held {
            epoch,
            until: now.saturating_add(self.grace_ms),
            item,
        });
        outcome
    }

    /// The held datagram of the epoch after `mine`, to apply now; gives up those that are stale
    /// or whose time ran out. Call again after each one applied (at most [`HELD_REKEYS`] times).
    pub fn next_held(&mut self, now: Millis, mine: Epoch) -> Option<T> {
        let next = mine.next();
        self.held.retain(|h| h.until > now && Some(h.epoch) >= next);
        let i = self.held.iter().position(|h| Some(h.epoch) == next)?;
        self.held.remove(i).map(|h| h.item)
    }

    /// Gives up every held datagram.
    pub fn clear_held(&mut self) {
        self.held.clear();
    }

    /// Whether anything is held.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_behind_resyncs_after_the_grace_unless_a_rekey_applies() {
        let mut c = CatchUp::<()>::new(300);
        c.behind(1_000, false);
        c.behind(1_100, false);
        assert_eq!(
            c.poll_timeout(),
            Some(1_300),
            "the first notice sets the time"
        );
        assert!(!c.handle_timeout(1_299));
        assert!(c.handle_timeout(1_300));
        assert!(!c.handle_timeout(1_300), "once");
        c.behind(2_000, false);
        c.caught_up();
        assert_eq!(c.poll_timeout(), None, "a repeat applied in time");
        c.behind(3_000, true);
        assert_eq!(c.poll_timeout(), None, "a request is outstanding");
    }

    #[test]
    fn held_rekeys_apply_in_order_within_the_grace() {
        let mut c = CatchUp::<u8>::new(300);
        assert_eq!(c.hold(0, Epoch(7), 7), Hold::Held);
        assert_eq!(c.hold(0, Epoch(6), 6), Hold::Held);
        assert_eq!(c.hold(10, Epoch(6), 6), Hold::Duplicate);
        assert_eq!(c.next_held(100, Epoch(4)), None, "epoch 5 still missing");
        assert_eq!(c.next_held(100, Epoch(5)), Some(6));
        assert_eq!(c.next_held(100, Epoch(6)), Some(7));
        assert!(!c.holds());
        c.hold(0, Epoch(9), 9);
        assert_eq!(c.next_held(300, Epoch(8)), None, "its time ran out");
        assert!(!c.holds());
        c.hold(0, Epoch(9), 9);
        assert_eq!(c.hold(299, Epoch(9), 9), Hold::Duplicate);
        assert_eq!(
            c.hold(300, Epoch(9), 9),
            Hold::Held,
            "a copy after the grace: afresh"
        );
        assert_eq!(c.next_held(599, Epoch(8)), Some(9));
        for e in 0..16u8 {
            assert_eq!(c.hold(0, Epoch(10 + u64::from(e)), e), Hold::Held);
        }
        assert_eq!(HELD_REKEYS, 16);
        assert_eq!(c.hold(0, Epoch(99), 99), Hold::HeldDroppingOldest);
        assert_eq!(c.next_held(1, Epoch(9)), None, "epoch 10 was given up");
    }

    #[test]
    fn arrivals_and_heartbeats() {
        assert_eq!(arrival(Epoch(5), Epoch(5)), Arrival::Old);
        assert_eq!(arrival(Epoch(5), Epoch(4)), Arrival::Old);
        assert_eq!(arrival(Epoch(5), Epoch(6)), Arrival::Next);
        assert_eq!(arrival(Epoch(5), Epoch(8)), Arrival::Later);
        let k = Kcv([1; lkh_tree::KCV_LEN]);
        let other = Kcv([2; lkh_tree::KCV_LEN]);
        assert!(in_step(Epoch(5), Some(k), Epoch(5), k));
        assert!(in_step(Epoch(5), Some(k), Epoch(4), other));
        assert!(!in_step(Epoch(5), Some(k), Epoch(5), other));
        assert!(!in_step(Epoch(5), Some(k), Epoch(6), k));
    }
}
