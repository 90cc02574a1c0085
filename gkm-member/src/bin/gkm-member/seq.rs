//! Sequence numbers for data frames: one counter per member agent, handed out in blocks to the
//! applications that send (`{"op":"reserve","count":N}` on the local API), as RFC 9838 §2.5 hands
//! out sender ids. A frame's nonce is `sender ‖ seq`, the sender being the member's leaf (unique
//! among the holders of a key), so no two applications of an agent, and no two runs of it, ever
//! seal two frames under one key with one nonce, whatever the clock does.
//!
//! The counter never goes back: a high-water mark is written durably (the state directory's
//! `sequence` file, fsynced) *before* any number below it is handed out, [`CHUNK`] numbers ahead,
//! so that most reservations write nothing. A restarted agent continues at the mark, skipping
//! the numbers the previous run had reserved but not handed out. Nothing here reads a clock.

use std::path::Path;

use crate::store::StateDir;

/// The most numbers one request may reserve.
pub(crate) const MAX_RESERVE: u64 = 65_536;
/// How far ahead of what is handed out the mark is written: one write per million numbers.
pub(crate) const CHUNK: u64 = 1 << 20;

/// Where the high-water mark is kept.
pub(crate) trait HighWater: Send {
    /// Records `mark` durably: no number at or above it has been handed out.
    fn save(&mut self, mark: u64) -> anyhow::Result<()>;
}

/// The sequence file of a state directory, as the counter's durable store.
pub(crate) struct SequenceFile(StateDir);

impl SequenceFile {
    /// The sequence file of the state directory `dir`.
    pub(crate) fn new(dir: &Path) -> Self {
        SequenceFile(StateDir::new(dir))
    }
}

impl HighWater for SequenceFile {
    fn save(&mut self, mark: u64) -> anyhow::Result<()> {
        self.0.save_sequence(mark)
    }
}

/// Numbers `first .. first + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Block {
    /// The first number.
    pub(crate) first: u64,
    /// How many.
    pub(crate) count: u64,
}

/// Why a reservation was refused; nothing was handed out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReserveError {
    /// A count of 0 or above [`MAX_RESERVE`].
    #[error(
        "count must be 1 to {MAX_RESERVE} (asked for {0}); reserve what you send in the next \
         few seconds and ask again when it is used"
    )]
    BadCount(u64),
    /// The counter reached 2^64.
    #[error(
        "this agent's sequence numbers are used up; run the member from a new --state-dir \
         (a new identity)"
    )]
    Exhausted,
    /// The mark could not be written.
    #[error(
        "cannot reserve sequence numbers: {0}; none were handed out; check the member's state \
         directory (disk full? read-only?) and ask again"
    )]
    Store(String),
}

/// The agent's counter.
pub(crate) struct Sequences {
    /// The next number to hand out.
    next: u64,
    /// Durably recorded: nothing at or above it was handed out.
    mark: u64,
    store: Box<dyn HighWater>,
}

impl Sequences {
    /// A counter continuing at `mark`, the high-water mark a previous run left (0 for none).
    pub(crate) fn new(mark: u64, store: Box<dyn HighWater>) -> Self {
        Sequences {
            next: mark,
            mark,
            store,
        }
    }

    /// Saves the mark as it is (a run that found no usable mark writes one at start, so that
    /// the next run can vouch for the keys this one holds).
    pub(crate) fn save_mark(&mut self) -> anyhow::Result<()> {
        self.store.save(self.mark)
    }

    /// Hands out `count` numbers no one got before, raising and saving the mark first if they
    /// reach it.
    pub(crate) fn reserve(&mut self, count: u64) -> Result<Block, ReserveError> {
        if count == 0 || count > MAX_RESERVE {
            return Err(ReserveError::BadCount(count));
        }
        let end = self
            .next
            .checked_add(count)
            .ok_or(ReserveError::Exhausted)?;
        if end > self.mark {
            let mark = end.saturating_add(CHUNK);
            self.store
                .save(mark)
                .map_err(|e| ReserveError::Store(format!("{e:#}")))?;
            self.mark = mark;
        }
        let block = Block {
            first: self.next,
            count,
        };
        self.next = end;
        Ok(block)
    }
}
