//! Group data frames for `send` and `recv`: sealing a message under the send key, and opening
//! received frames with the key of their epoch, among the keys the member agent says to accept,
//! while refusing replays.
//!
//! The receiver holds exactly the keys its agent's `watch` lines name, each until its drop time
//! (the deactivation delay after the agent got the next key): a frame under any other epoch
//! older than the newest is refused as [`Opened::Retired`], however authentic (an evicted member
//! keeps the old key). Replay protection keeps, per (epoch, sender), the last [`WINDOW`]
//! accepted sequence numbers and a floor below which everything is refused: a frame is accepted
//! once, and reordering is tolerated within the window. A sender's numbers come from its agent's
//! one counter, in blocks shared out among the agent's applications, so they rise with gaps;
//! applications of one agent sending at once interleave their blocks, and a frame more than
//! [`WINDOW`] accepted numbers behind its sender's newest is refused as a replay.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use gkm_member::Millis;
use lkh_tree::{Epoch, GroupId, Kcv, TrafficKey};
use wire::{Codec, DataFrame, MAX_PAYLOAD};

/// Accepted sequence numbers remembered per (epoch, sender).
pub(crate) const WINDOW: usize = 1024;
/// Keys a receiver holds at most (its agent names no more).
pub(crate) const MAX_KEYS: usize = gkm_member::data_keys::MAX_HELD;
/// Senders tracked per receiver (replay windows are bounded in number too).
pub(crate) const MAX_SENDERS: usize = 4096;

/// Encrypts `payload` into an encoded frame; refuses payloads longer than a frame holds.
pub(crate) fn seal_frame(
    key: &TrafficKey,
    group: GroupId,
    epoch: Epoch,
    sender: u32,
    seq: u64,
    payload: &[u8],
) -> Result<Vec<u8>, String> {
    if payload.len() > MAX_PAYLOAD {
        return Err(format!(
            "message of {} bytes is longer than the {MAX_PAYLOAD} bytes a frame holds",
            payload.len()
        ));
    }
    Ok(wire::data::seal(key, group, epoch, sender, seq, payload).to_bytes())
}

/// The sequence numbers of one sender in one epoch that were already accepted.
#[derive(Debug, Default)]
pub(crate) struct ReplayWindow {
    /// Everything at or below this is refused.
    floor: Option<u64>,
    seen: BTreeSet<u64>,
}

impl ReplayWindow {
    /// Whether `seq` would be accepted (not seen, not below the window).
    pub(crate) fn fresh(&self, seq: u64) -> bool {
        self.floor.is_none_or(|floor| seq > floor) && !self.seen.contains(&seq)
    }

    /// Records `seq` as accepted; the window slides once it holds more than [`WINDOW`] numbers.
    pub(crate) fn accept(&mut self, seq: u64) {
        self.seen.insert(seq);
        while self.seen.len() > WINDOW {
            if let Some(oldest) = self.seen.pop_first() {
                self.floor = Some(oldest);
            }
        }
    }
}

/// What became of a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// A fresh, authentic message.
    Message(Vec<u8>),
    /// Authentic or not, its (epoch, sender, seq) was seen before or is below the window.
    Replayed,
    /// A frame of another group.
    OtherGroup,
    /// Under the key of an epoch older than the newest held, which the receiver dropped (past its
    /// deactivation delay) or never accepted: refused unopened.
    Retired,
    /// No key for its (newer) epoch, a bad tag, or not a frame at all.
    Undecryptable,
    /// A new sender beyond [`MAX_SENDERS`].
    TooManySenders,
}

/// A key held by a receiver.
struct Held {
    key: TrafficKey,
    kcv: Kcv,
    /// When it is dropped; `None` for the newest key.
    drop_at: Option<Millis>,
}

/// The keys the member agent says to accept, and the replay windows of their senders.
pub(crate) struct Receiver {
    group: GroupId,
    keys: BTreeMap<u64, Held>,
    windows: HashMap<(u64, u32), ReplayWindow>,
}

impl Receiver {
    /// A receiver for `group` holding no keys yet.
    pub(crate) fn new(group: GroupId) -> Self {
        Receiver {
            group,
            keys: BTreeMap::new(),
            windows: HashMap::new(),
        }
    }

    /// Takes the agent's word at `now`: exactly these keys (epoch, key, drop time) are accepted
    /// from now on, at most [`MAX_KEYS`] of the newest. A drop time is never put off: a key
    /// already held keeps the earlier of its two. A held epoch with another key (its group was
    /// reset) starts with an empty replay window.
    pub(crate) fn follow<'a>(
        &mut self,
        now: Millis,
        keys: impl IntoIterator<Item = (Epoch, &'a TrafficKey, Option<Millis>)>,
    ) {
        let mut next = BTreeMap::new();
        for (epoch, key, drop_at) in keys {
            let kcv = key.check_value();
            let held = self.keys.remove(&epoch.0).filter(|h| h.kcv == kcv);
            if held.is_none() {
                self.windows.retain(|(e, _), _| *e != epoch.0);
            }
            let earlier = held.and_then(|h| h.drop_at);
            let drop_at = match (earlier, drop_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            next.insert(
                epoch.0,
                Held {
                    key: key.clone(),
                    kcv,
                    drop_at,
                },
            );
        }
        while next.len() > MAX_KEYS {
            next.pop_first();
        }
        self.keys = next;
        self.expire(now);
    }

    /// The agent holds no key: nothing is accepted.
    pub(crate) fn clear(&mut self) {
        self.keys.clear();
        self.windows.clear();
    }

    /// Drops the keys whose time has come, and their replay windows.
    fn expire(&mut self, now: Millis) {
        self.keys
            .retain(|_, held| held.drop_at.is_none_or(|at| at > now));
        let keys = &self.keys;
        self.windows.retain(|(e, _), _| keys.contains_key(e));
    }

    /// Decodes, drops expired keys, checks the key and replay, decrypts, then records the
    /// sequence number.
    pub(crate) fn open(&mut self, now: Millis, bytes: &[u8]) -> Opened {
        let Ok(frame) = DataFrame::decode_exact(bytes) else {
            return Opened::Undecryptable;
        };
        if frame.group != self.group {
            return Opened::OtherGroup;
        }
        self.expire(now);
        let Some(held) = self.keys.get(&frame.epoch.0) else {
            let newest = self.keys.last_key_value().map(|(e, _)| *e);
            return match newest {
                Some(newest) if frame.epoch.0 < newest => Opened::Retired,
                _ => Opened::Undecryptable,
            };
        };
        let id = (frame.epoch.0, frame.sender);
        if self.windows.get(&id).is_some_and(|w| !w.fresh(frame.seq)) {
            return Opened::Replayed;
        }
        let Ok(plain) = wire::data::open(&held.key, &frame) else {
            return Opened::Undecryptable;
        };
        if !self.windows.contains_key(&id) && self.windows.len() >= MAX_SENDERS {
            return Opened::TooManySenders;
        }
        self.windows.entry(id).or_default().accept(frame.seq);
        Opened::Message(plain)
    }
}
