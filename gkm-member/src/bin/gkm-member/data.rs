//! Group data frames for `send` and `recv`: sealing a message under the current traffic key, and
//! opening received frames with the key of their epoch while refusing replays.
//!
//! Replay protection keeps, per (epoch, sender), the last [`WINDOW`] accepted sequence numbers
//! and a floor below which everything is refused: a frame is accepted once, and reordering is
//! tolerated within the window. Senders use the time in microseconds as the sequence number, so
//! sequence numbers are sparse and a bitmap window over consecutive numbers would not fit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lkh_tree::{Epoch, GroupId, TrafficKey};
use wire::{Codec, DataFrame, MAX_PAYLOAD};

/// Accepted sequence numbers remembered per (epoch, sender).
pub(crate) const WINDOW: usize = 1024;
/// Epochs whose keys a receiver keeps.
pub(crate) const KEEP_EPOCHS: usize = 4;
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
    /// No key for its epoch, a bad tag, or not a frame at all.
    Undecryptable,
    /// A new sender beyond [`MAX_SENDERS`].
    TooManySenders,
}

/// Keys of the last few epochs and the replay windows of their senders.
pub(crate) struct Receiver {
    group: GroupId,
    keys: BTreeMap<u64, TrafficKey>,
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

    /// Adds the key of `epoch`; forgets the oldest epochs beyond [`KEEP_EPOCHS`].
    pub(crate) fn add_key(&mut self, epoch: Epoch, key: TrafficKey) {
        self.keys.insert(epoch.0, key);
        while self.keys.len() > KEEP_EPOCHS {
            if let Some((old, _)) = self.keys.pop_first() {
                self.windows.retain(|(e, _), _| *e != old);
            }
        }
    }

    /// Whether the key of `epoch` is held.
    pub(crate) fn has_key(&self, epoch: Epoch) -> bool {
        self.keys.contains_key(&epoch.0)
    }

    /// The newest epoch whose key is held.
    pub(crate) fn newest(&self) -> Option<Epoch> {
        self.keys.last_key_value().map(|(e, _)| Epoch(*e))
    }

    /// The epoch a datagram claims, if it decodes as a frame of this group.
    pub(crate) fn epoch_of(&self, bytes: &[u8]) -> Option<Epoch> {
        DataFrame::decode_exact(bytes)
            .ok()
            .filter(|f| f.group == self.group)
            .map(|f| f.epoch)
    }

    /// Decodes, checks replay, decrypts, then records the sequence number.
    pub(crate) fn open(&mut self, bytes: &[u8]) -> Opened {
        let Ok(frame) = DataFrame::decode_exact(bytes) else {
            return Opened::Undecryptable;
        };
        if frame.group != self.group {
            return Opened::OtherGroup;
        }
        let Some(key) = self.keys.get(&frame.epoch.0) else {
            return Opened::Undecryptable;
        };
        let id = (frame.epoch.0, frame.sender);
        if self.windows.get(&id).is_some_and(|w| !w.fresh(frame.seq)) {
            return Opened::Replayed;
        }
        let Ok(plain) = wire::data::open(key, &frame) else {
            return Opened::Undecryptable;
        };
        if !self.windows.contains_key(&id) && self.windows.len() >= MAX_SENDERS {
            return Opened::TooManySenders;
        }
        self.windows.entry(id).or_default().accept(frame.seq);
        Opened::Message(plain)
    }
}
