//! Persistence as an output of the controller (write-ahead, GKM-V053): the controller stages a
//! rekey and asks for its save ([`Persist`], from [`Controller::poll_persist`]); the driver makes
//! it durable in a [`Store`] wherever it likes (its own thread, another process's database) and
//! reports the outcome ([`Persisted`], to [`Controller::handle_persisted`]). Only then is the
//! rekey committed and its datagrams and welcomes queued; a failed save drops the stage and the
//! controller is exactly as before.
//!
//! [`StoreDriver`] is the small driver that tests, netsim and the benchmarks use: a controller
//! and a store, each save made on the calling thread (overlapping the signing of a large rekey's
//! datagrams on a thread of its own, as the daemon does).

use std::ops::{Deref, DerefMut};

use lkh_tree::{Epoch, GroupId};
use rand_core::CryptoRng;

use crate::controller::{Command, CommandError, Controller, Response};
use crate::policy::Timestamp;
use crate::store::{CompactionFailure, GroupDelta, GroupState, Store, StoreError};

/// Which save a [`Persisted`] reports: one per [`Persist`], never reused by a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PersistTicket(pub(crate) u64);

/// What one save writes.
#[derive(Clone, Debug)]
pub enum Save {
    /// The group's whole state (its first save, or the first after a failed one).
    Full(GroupState),
    /// The changes since the last save.
    Delta(GroupDelta),
    /// The changes since the last save, and the state they lead to, to replace what the store
    /// holds of the group ([`Store::save_delta_and_compact`]).
    Compact(GroupDelta, GroupState),
}

/// A save the controller asks for ([`Controller::poll_persist`]). Holds keys: a [`Store`] seals
/// them. Saves of one group are to be made in the order they are asked for; the controller asks
/// for the next save of a group only once the last one was reported.
#[derive(Debug)]
pub struct Persist {
    /// The ticket to report with the outcome.
    pub ticket: PersistTicket,
    /// The group.
    pub group: GroupId,
    /// The epoch the save leads to.
    pub epoch: Epoch,
    /// Whether a rekey waits for it (else it saves a change outside a rekey: a ban).
    pub rekey: bool,
    /// Encryptions in the staged rekey: a driver may run a large save beside the signing of its
    /// datagrams ([`Controller::prepare_staged`]).
    pub encryptions: usize,
    /// What to write.
    pub save: Save,
}

/// The outcome of a [`Persist`], for [`Controller::handle_persisted`].
#[derive(Debug)]
pub struct Persisted {
    /// The save's ticket.
    pub ticket: PersistTicket,
    /// Durable, or why not. [`StoreError::Deposed`] says another controller leads the group.
    pub result: Result<(), StoreError>,
    /// Whether the store still runs a compaction ([`Store::compacting`]): the controller then
    /// asks for none until it is done.
    pub compacting: bool,
    /// Compactions that failed in the background since the last report.
    pub compaction_failures: Vec<CompactionFailure>,
    /// A compaction asked for was not started (the store still ran one): only the delta was
    /// saved, and the controller asks again at the group's next save.
    pub compaction_deferred: bool,
}

impl Persist {
    /// Writes the save to `store` and says how it went.
    /// A compaction is not started while the store still runs one (the controller learns of
    /// that only from the last report): the delta is saved alone.
    pub fn write(self, store: &mut (dyn Store + Send)) -> Persisted {
        let mut deferred = false;
        let result = match self.save {
            Save::Full(state) => store.save(&state),
            Save::Delta(delta) => store.save_delta(&delta),
            Save::Compact(delta, _) if store.compacting() => {
                deferred = true;
                store.save_delta(&delta)
            }
            Save::Compact(delta, state) => store.save_delta_and_compact(&delta, state),
        };
        let mut done = Persisted::after(self.ticket, result, store);
        done.compaction_deferred = deferred;
        done
    }
}

impl Persisted {
    /// The report of save `ticket` that ended with `result`, with what `store` says of its
    /// compactions.
    pub fn after(
        ticket: PersistTicket,
        result: Result<(), StoreError>,
        store: &mut (dyn Store + Send),
    ) -> Persisted {
        let mut compaction_failures = Vec::new();
        while let Some(failure) = store.take_compaction_failure() {
            compaction_failures.push(failure);
        }
        Persisted {
            ticket,
            result,
            compacting: store.compacting(),
            compaction_failures,
            compaction_deferred: false,
        }
    }
}

/// Encryptions in a rekey from which [`StoreDriver`] runs its save on a thread of its own while
/// the datagrams are packed and signed (about 40 encryptions fill a datagram, and a signature
/// takes about 20 µs; below this, the thread would cost more than the signing it overlaps).
pub const OVERLAP_SAVE_MIN: usize = 512;

/// A controller and its store, every save made as soon as it is asked for: the driver of tests,
/// netsim and the benchmarks. It dereferences to the [`Controller`]; the calls that may stage a
/// rekey ([`StoreDriver::handle_timeout`], [`StoreDriver::handle_command`],
/// [`StoreDriver::reset`]) make its save before they return.
pub struct StoreDriver<R> {
    controller: Controller<R>,
    store: Box<dyn Store + Send>,
    workers: usize,
}

impl<R: CryptoRng> StoreDriver<R> {
    /// `controller` saving to `store`.
    pub fn new(controller: Controller<R>, store: Box<dyn Store + Send>) -> Self {
        StoreDriver {
            controller,
            store,
            workers: 1,
        }
    }

    /// As [`Controller::set_workers`]; with more than one, a large rekey's save runs on a thread
    /// of its own while its datagrams are signed.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers.max(1);
        self.controller.set_workers(workers);
    }

    /// [`Controller::handle_timeout`], then the saves it asked for.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.controller.handle_timeout(now);
        self.persist(now);
    }

    /// [`Controller::handle_command`], then the saves it asked for, answered as
    /// [`Controller::settle`] says (as the daemon does).
    pub fn handle_command(
        &mut self,
        now: Timestamp,
        command: Command,
    ) -> Result<Response, CommandError> {
        let saving = command.saving();
        let outcome = self.controller.handle_command(now, command);
        self.persist(now);
        self.controller.settle(saving, outcome)
    }

    /// [`Controller::reset`], then its save.
    pub fn reset(&mut self, id: GroupId, now: Timestamp, above: Option<Epoch>) -> bool {
        let found = self.controller.reset(id, now, above);
        self.persist(now);
        found
    }

    /// Makes every save asked for, reporting each; returns how many.
    pub fn persist(&mut self, now: Timestamp) -> usize {
        let mut saves = 0;
        while let Some(persist) = self.controller.poll_persist() {
            saves += 1;
            let ticket = persist.ticket;
            let (controller, store) = (&mut self.controller, self.store.as_mut());
            let done = if self.workers > 1 && persist.encryptions >= OVERLAP_SAVE_MIN {
                std::thread::scope(|scope| {
                    let writer = scope.spawn(move || persist.write(store));
                    controller.prepare_staged();
                    writer.join()
                })
                .unwrap_or_else(|_| Persisted {
                    ticket,
                    result: Err(StoreError::Backend("the store panicked".into())),
                    compacting: false,
                    compaction_failures: Vec::new(),
                    compaction_deferred: false,
                })
            } else {
                persist.write(store)
            };
            self.controller.handle_persisted(now, done);
        }
        saves
    }
}

impl<R> Deref for StoreDriver<R> {
    type Target = Controller<R>;

    fn deref(&self) -> &Controller<R> {
        &self.controller
    }
}

impl<R> DerefMut for StoreDriver<R> {
    fn deref_mut(&mut self) -> &mut Controller<R> {
        &mut self.controller
    }
}
