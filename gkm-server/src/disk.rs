//! [`DiskStore`]: group states in a redb file, written incrementally and sealed under a storage
//! key (feature `disk`).
//!
//! Layout: each group's full state is a run of sealed rows in the table `gkm bases`, and the
//! deltas saved since are a run of sealed rows in `gkm log`, both keyed by (group, sequence
//! number); a sealed head in `gkm heads` (group → both runs) says which rows hold the state. A
//! full save writes the state as new base rows, deletes the old ones and the deltas, and points
//! the head at them; a delta appends log rows. Each is one redb write transaction, committed
//! durably (fsync) before it returns, so a crash keeps a save whole or not at all. Sequence
//! numbers are never reused within a table, so a row of an older save cannot stand in for a
//! newer one. (Files written before `gkm bases` existed have no base run: their state begins with
//! the first log row, and they load as they are.)
//!
//! Why a log and not a row per tree node: at a million members a batch of 100,000 changes touches
//! a quarter of the records, spread over nearly every page of a B-tree keyed by node, and redb
//! writes a touched page whole (copy-on-write), so per-node rows would rewrite most of the file
//! every batch. The log writes each changed record once.
//!
//! Compaction: once the deltas hold about as many records as the state, the controller hands the
//! store a delta together with the state it leads to ([`Store::save_delta_and_compact`]). The
//! delta is saved as usual; then a thread of the store writes the state as new base rows, a few
//! MiB per transaction, so a delta saved meanwhile waits for one of them at most, never for the
//! whole state (at a million members, 167 MB and over a second). Only the last transaction points
//! the head at the new rows and deletes the old base and the deltas the new base already holds.
//! Until then the head names the old rows, so a crash or a failure in the middle loses nothing;
//! the rows it wrote are ignored by loading and deleted by the next compaction or full save. A
//! state that fits one such transaction (about 43,000 records) is saved in full at once instead
//! of the delta. One compaction runs at a time: while it does, [`Store::compacting`] says so and
//! the controller saves other groups' deltas alone, asking for their compaction at a later rekey
//! rather than making that rekey wait.
//!
//! Sealing: ChaCha20-Poly1305 under the storage key, with a random 96-bit nonce per row from the
//! OS (never a counter: a counter rewound by a restored backup or a lost write would repeat a
//! nonce; random nonces need no state and, at a few hundred rows a second, collide with
//! probability below 2^-40 within a century of rows). The associated data names the row (label
//! of its table, group, sequence number), so rows cannot be moved between tables, groups or
//! positions.
//!
//! Loading checks everything: every row the head names authenticates, sequence numbers are
//! contiguous within each run and the log holds no row outside its run, the first row of the
//! state holds the base record, record counts stay within [`MAX_RECORDS`]. Anything else is
//! [`StoreError::Corrupt`] and nothing is served.

use std::collections::VecDeque;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use lkh_tree::{Epoch, GroupId, KeyVersion, NodeId, NodeKey, NodeRecord, Strategy, TreeConfig};
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle,
};
use wire::MemberId;
use zeroize::Zeroizing;

use crate::policy::Timestamp;
use crate::store::{
    CompactionFailure, GroupDelta, GroupRecords, GroupState, MemberRecord, Store, StoreError,
};

type Rows = TableDefinition<'static, (u64, u64), &'static [u8]>;
const LOG: Rows = TableDefinition::new("gkm log");
const BASES: Rows = TableDefinition::new("gkm bases");
const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("gkm heads");
/// The table of the first format (one sealed blob per group), which this store refuses.
const OLD_TABLE: &str = "groups";
const LOG_LABEL: &[u8] = b"gkm v2 log row";
const BASE_LABEL: &[u8] = b"gkm v2 base row";
const HEAD_LABEL: &[u8] = b"gkm v2 head";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Plaintext bytes after which a row is cut. A row ends at most one record (< 128 bytes) past it,
/// so a sealed row stays under 256 KiB: redb allocates large values in power-of-two pages, and a
/// row just over 256 KiB would take 512.
const ROW_BYTES: usize = 256 * 1024 - 256;
/// Rows a compaction writes per transaction (about 4 MiB).
const COMPACTION_ROWS: usize = 16;
/// Records that fit one compaction transaction whatever their kind (a member record, the
/// largest, is 93 bytes): about 43,000.
const ONE_TRANSACTION_RECORDS: usize = COMPACTION_ROWS * (ROW_BYTES / 96);
/// Most tree nodes or members one stored group may hold (2^25).
pub const MAX_RECORDS: usize = 1 << 25;

const BASE: u8 = 1;
const EPOCH: u8 = 2;
const NODE: u8 = 3;
const NODE_GONE: u8 = 4;
const MEMBER: u8 = 5;
const MEMBER_GONE: u8 = 6;
const SPENT: u8 = 7;
const BANNED: u8 = 8;
const UNBANNED: u8 = 9;
const NO_PARENT: u32 = u32::MAX;

/// The sequence numbers `first..next` of a run of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    first: u64,
    next: u64,
}

impl Span {
    fn empty_at(seq: u64) -> Span {
        Span {
            first: seq,
            next: seq,
        }
    }

    fn is_empty(self) -> bool {
        self.first == self.next
    }
}

/// Which rows hold a group's state: its full state in `gkm bases`, then the deltas in `gkm log`.
/// An empty base run means a file of the earlier layout, whose log begins with the full state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    base: Span,
    log: Span,
}

/// A compaction running on its own thread.
struct Running {
    group: GroupId,
    epoch: Epoch,
    thread: JoinHandle<Result<(), StoreError>>,
}

/// Group states in a redb file, sealed under a storage key (see the module docs).
pub struct DiskStore {
    /// The open file; `None` only while it is reopened after a failed write.
    db: Option<Arc<Database>>,
    /// Where it lives, to reopen it.
    path: PathBuf,
    /// A write failed: redb refuses every later one ("Previous I/O error occurred") until the
    /// file is reopened, which the next save does (a disk that was full, then freed).
    failed: bool,
    sealer: Sealer,
    written: Arc<AtomicU64>,
    compaction: Option<Running>,
    /// Failed compactions not yet taken, oldest first (at most two: one finished, one that could
    /// not start).
    failures: VecDeque<CompactionFailure>,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("written", &self.bytes_written())
            .field("compacting", &self.compaction.is_some())
            .finish_non_exhaustive()
    }
}

/// Opens the database, checking every page's checksum: redb trusts a cleanly closed file
/// otherwise, and may panic on one altered outside it ("Malformed allocator state"). An existing
/// file is opened, never initialized: redb would turn an empty (truncated) file into a new, empty
/// database, and the daemon would start every group afresh at epoch 0. A new file is made mode
/// 0600 before redb initializes it (redb would create it with the umask's mode).
fn open_database(path: &Path) -> Result<Database, DatabaseError> {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    if path.exists() {
        builder.open(path)
    } else {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| DatabaseError::Storage(redb::StorageError::Io(e)))?;
        builder.create(path)
    }
}

impl DiskStore {
    /// Opens (or creates) the store at `path` and loads every group.
    ///
    /// Errors: [`StoreError::InUse`] when another process holds the file, [`StoreError::Corrupt`]
    /// when anything in it does not authenticate or decode (or it is of the first, unsupported
    /// format), [`StoreError::Backend`] for I/O errors.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<(DiskStore, Vec<GroupState>), StoreError> {
        let db = match open_database(path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse),
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        };
        let store = DiskStore {
            db: Some(Arc::new(db)),
            path: path.to_path_buf(),
            failed: false,
            sealer: Sealer(ChaCha20Poly1305::new(&(*key).into())),
            written: Arc::new(AtomicU64::new(0)),
            compaction: None,
            failures: VecDeque::new(),
        };
        let states = store.load()?;
        Ok((store, states))
    }

    /// The open file.
    fn db(&self) -> Result<&Arc<Database>, StoreError> {
        self.db.as_ref().ok_or_else(|| {
            StoreError::Backend(format!(
                "{} could not be reopened after a failed write",
                self.path.display()
            ))
        })
    }

    /// After a failed write, closes and reopens the file (redb recovers it to its last commit),
    /// once a running compaction, which shares it, has ended.
    fn reopen_if_failed(&mut self) -> Result<(), StoreError> {
        if !self.failed {
            return Ok(());
        }
        self.finish_compaction();
        self.db = None;
        let db = open_database(&self.path).map_err(|e| {
            StoreError::Backend(format!(
                "cannot reopen {} after a failed write: {e}",
                self.path.display()
            ))
        })?;
        self.db = Some(Arc::new(db));
        self.failed = false;
        Ok(())
    }

    /// Runs a write, noting its failure (see [`DiskStore::reopen_if_failed`]).
    fn write<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.reopen_if_failed()?;
        let result = write(self);
        self.failed = result.is_err();
        result
    }

    /// Sealed bytes written since the store was opened (rows and heads, compactions included).
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    fn load(&self) -> Result<Vec<GroupState>, StoreError> {
        let tx = self.db()?.begin_read().map_err(backend)?;
        let tables: Vec<String> = tx
            .list_tables()
            .map_err(backend)?
            .map(|t| t.name().to_owned())
            .collect();
        if tables.iter().any(|t| t == OLD_TABLE) {
            return Err(StoreError::Corrupt(
                "the state file is of the first format (one sealed blob per group), which this \
                 version does not read; move it away to start every group afresh"
                    .into(),
            ));
        }
        if !tables.iter().any(|t| t == HEADS.name()) {
            return Ok(Vec::new());
        }
        let heads = tx.open_table(HEADS).map_err(backend)?;
        let log = tx.open_table(LOG).map_err(backend)?;
        let bases = if tables.iter().any(|t| t == BASES.name()) {
            Some(tx.open_table(BASES).map_err(backend)?)
        } else {
            None
        };
        let mut states = Vec::new();
        let mut groups = Vec::new();
        for entry in heads.iter().map_err(backend)? {
            let (group, sealed) = entry.map_err(backend)?;
            let group = GroupId(group.value());
            let head = self.sealer.open_head(group, sealed.value())?;
            let mut records = None;
            if !head.base.is_empty() {
                let bases = bases
                    .as_ref()
                    .ok_or_else(|| corrupt(group, "its base rows are missing"))?;
                self.replay_run(bases, BASE_LABEL, group, head.base, &mut records)?;
            }
            self.replay_run(&log, LOG_LABEL, group, head.log, &mut records)?;
            check_log_within(&log, group, head.log)?;
            let records = records.ok_or_else(|| corrupt(group, "has no base row"))?;
            if records.group != group {
                return Err(corrupt(group, "holds another group's state"));
            }
            states.push(records.to_state());
            groups.push(group);
        }
        // Rows of a group with no head are left over from nothing this store writes.
        for entry in log.iter().map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            let group = GroupId(key.value().0);
            if !groups.contains(&group) {
                return Err(corrupt(group, "has log rows but no head"));
            }
        }
        Ok(states)
    }

    /// Replays the rows `run` of `table` onto `records`; the state's first row (when `records`
    /// is still empty) must begin with the base record.
    fn replay_run(
        &self,
        table: &impl ReadableTable<(u64, u64), &'static [u8]>,
        label: &[u8],
        group: GroupId,
        run: Span,
        records: &mut Option<GroupRecords>,
    ) -> Result<(), StoreError> {
        let mut expected = run.first;
        let rows = table
            .range((group.0, run.first)..(group.0, run.next))
            .map_err(backend)?;
        for entry in rows {
            let (key, sealed) = entry.map_err(backend)?;
            let seq = key.value().1;
            if seq != expected {
                return Err(corrupt(group, &format!("row {seq} is out of sequence")));
            }
            let plain = self.sealer.open_row(label, group, seq, sealed.value())?;
            replay(records, records.is_none(), &plain)
                .map_err(|e| corrupt(group, &format!("row {seq} does not decode: {e}")))?;
            expected += 1;
        }
        if expected != run.next {
            return Err(corrupt(group, &format!("rows {expected}.. are missing")));
        }
        Ok(())
    }

    /// Writes a group's whole state in one transaction, in place of what it held.
    fn save_state(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.finish_compaction();
        let group = state.tree.group;
        let tx = self.db()?.begin_write().map_err(backend)?;
        let written = {
            let mut heads = tx.open_table(HEADS).map_err(backend)?;
            let mut log = tx.open_table(LOG).map_err(backend)?;
            let mut bases = tx.open_table(BASES).map_err(backend)?;
            let old = self.sealer.read_head(&heads, group)?;
            let mut base = Span::empty_at(next_seq(&bases, group)?);
            let mut written = 0;
            for row in state_rows(state) {
                written += self
                    .sealer
                    .insert_row(&mut bases, BASE_LABEL, group, base.next, &row)?;
                base.next += 1;
            }
            let log_next = old.map_or(0, |h| h.log.next);
            remove_below(&mut bases, group, base.first)?;
            remove_below(&mut log, group, log_next)?;
            let head = Head {
                base,
                log: Span::empty_at(log_next),
            };
            written + self.sealer.write_head(&mut heads, group, head)?
        };
        tx.commit().map_err(backend)?;
        self.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `rows` (plaintexts) after the group's log.
    fn append(
        &mut self,
        group: GroupId,
        rows: impl Iterator<Item = Zeroizing<Vec<u8>>>,
    ) -> Result<(), StoreError> {
        self.reap_compaction();
        let tx = self.db()?.begin_write().map_err(backend)?;
        let written = {
            let mut heads = tx.open_table(HEADS).map_err(backend)?;
            let mut log = tx.open_table(LOG).map_err(backend)?;
            let mut head = self
                .sealer
                .read_head(&heads, group)?
                .ok_or_else(|| StoreError::Backend(format!("group {group} was never saved")))?;
            let mut written = 0;
            for row in rows {
                written +=
                    self.sealer
                        .insert_row(&mut log, LOG_LABEL, group, head.log.next, &row)?;
                head.log.next += 1;
            }
            written + self.sealer.write_head(&mut heads, group, head)?
        };
        tx.commit().map_err(backend)?;
        self.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for the running compaction, if any, and keeps its failure for
    /// [`Store::take_compaction_failure`].
    fn finish_compaction(&mut self) {
        let Some(running) = self.compaction.take() else {
            return;
        };
        let error = match running.thread.join() {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(_) => StoreError::Backend("the compaction thread panicked".into()),
        };
        self.failures.push_back(CompactionFailure {
            group: running.group,
            epoch: running.epoch,
            error,
        });
    }

    /// [`DiskStore::finish_compaction`] if the compaction is done (never waits).
    fn reap_compaction(&mut self) {
        if self
            .compaction
            .as_ref()
            .is_some_and(|r| r.thread.is_finished())
        {
            self.finish_compaction();
        }
    }
}

impl Drop for DiskStore {
    /// Lets a running compaction finish (a process killed instead loses nothing but its work).
    fn drop(&mut self) {
        self.finish_compaction();
    }
}

impl Store for DiskStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.write(|store| store.save_state(state))
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.write(|store| store.append(delta.group, delta_rows(delta)))
    }

    /// Saves `delta`, then starts writing `state` on a thread of the store (see the module
    /// docs), once any earlier compaction finished. A state that fits one of the thread's
    /// transactions is saved in full at once instead of the delta: the thread would write it in
    /// one transaction too, and add the delta's and its last one.
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        if state.records() <= ONE_TRANSACTION_RECORDS {
            return self.save(&state);
        }
        self.save_delta(delta)?;
        self.finish_compaction();
        let (group, epoch) = (state.tree.group, state.tree.epoch);
        let started = Compaction::start(self, group).and_then(|job| {
            std::thread::Builder::new()
                .name("gkm-compaction".into())
                .spawn(move || job.run(&state))
                .map_err(|e| StoreError::Backend(format!("cannot start the compaction: {e}")))
        });
        match started {
            Ok(thread) => {
                self.compaction = Some(Running {
                    group,
                    epoch,
                    thread,
                });
            }
            Err(error) => {
                self.failures.push_back(CompactionFailure {
                    group,
                    epoch,
                    error,
                });
            }
        }
        Ok(())
    }

    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.reap_compaction();
        self.failures.pop_front()
    }

    fn compacting(&mut self) -> bool {
        self.reap_compaction();
        self.compaction.is_some()
    }
}

/// One compaction: the state written as new base rows, then the head switched to them.
struct Compaction {
    db: Arc<Database>,
    sealer: Sealer,
    written: Arc<AtomicU64>,
    group: GroupId,
    /// The head when it started: the deltas after the state being written begin at its log's
    /// `next`.
    start: Head,
}

impl Compaction {
    fn start(store: &DiskStore, group: GroupId) -> Result<Compaction, StoreError> {
        let tx = store.db()?.begin_read().map_err(backend)?;
        let heads = tx.open_table(HEADS).map_err(backend)?;
        let start = store
            .sealer
            .read_head(&heads, group)?
            .ok_or_else(|| StoreError::Backend(format!("group {group} was never saved")))?;
        Ok(Compaction {
            db: Arc::clone(store.db()?),
            sealer: store.sealer.clone(),
            written: Arc::clone(&store.written),
            group,
            start,
        })
    }

    fn run(self, state: &GroupState) -> Result<(), StoreError> {
        let base = self.stage(state_rows(state))?;
        self.switch(base)
    }

    /// Writes `rows` as base rows after every base row of the group, [`COMPACTION_ROWS`] per
    /// transaction; returns their run. The head does not name them yet.
    fn stage(&self, rows: impl Iterator<Item = Zeroizing<Vec<u8>>>) -> Result<Span, StoreError> {
        let mut rows = rows.peekable();
        let mut run: Option<Span> = None;
        while rows.peek().is_some() {
            let tx = self.db.begin_write().map_err(backend)?;
            let mut written = 0;
            {
                let mut bases = tx.open_table(BASES).map_err(backend)?;
                let span = match &mut run {
                    Some(span) => span,
                    None => run.insert(Span::empty_at(next_seq(&bases, self.group)?)),
                };
                for row in rows.by_ref().take(COMPACTION_ROWS) {
                    written += self
                        .sealer
                        .insert_row(&mut bases, BASE_LABEL, self.group, span.next, &row)?;
                    span.next += 1;
                }
            }
            tx.commit().map_err(backend)?;
            self.written.fetch_add(written, Ordering::Relaxed);
        }
        run.ok_or_else(|| StoreError::Backend("a state has at least its base record".into()))
    }

    /// Points the head at `base` and the deltas saved since the compaction started, and deletes
    /// the rows the new base replaces, in one transaction.
    fn switch(&self, base: Span) -> Result<(), StoreError> {
        let group = self.group;
        let tx = self.db.begin_write().map_err(backend)?;
        let written = {
            let mut heads = tx.open_table(HEADS).map_err(backend)?;
            let mut log = tx.open_table(LOG).map_err(backend)?;
            let mut bases = tx.open_table(BASES).map_err(backend)?;
            let now = self.sealer.read_head(&heads, group)?;
            let unchanged = now.is_some_and(|h| {
                h.base == self.start.base
                    && h.log.first == self.start.log.first
                    && h.log.next >= self.start.log.next
            });
            let Some(now) = now.filter(|_| unchanged) else {
                return Err(StoreError::Backend(format!(
                    "group {group} was saved in full during its compaction"
                )));
            };
            remove_below(&mut bases, group, base.first)?;
            remove_below(&mut log, group, self.start.log.next)?;
            let head = Head {
                base,
                log: Span {
                    first: self.start.log.next,
                    next: now.log.next,
                },
            };
            self.sealer.write_head(&mut heads, group, head)?
        };
        tx.commit().map_err(backend)?;
        self.written.fetch_add(written, Ordering::Relaxed);
        Ok(())
    }
}

/// The sequence number after the group's last row in `table` (0 if it has none). Keys are not
/// authenticated, so a row numbered `u64::MAX` is refused, not wrapped around.
fn next_seq(
    table: &Table<'_, (u64, u64), &'static [u8]>,
    group: GroupId,
) -> Result<u64, StoreError> {
    let last = table
        .range((group.0, 0)..=(group.0, u64::MAX))
        .map_err(backend)?
        .next_back()
        .transpose()
        .map_err(backend)?;
    match last {
        None => Ok(0),
        Some((key, _)) => key
            .value()
            .1
            .checked_add(1)
            .ok_or_else(|| corrupt(group, "has a row numbered 2^64 - 1")),
    }
}

/// Deletes the group's rows numbered below `seq`.
fn remove_below(
    table: &mut Table<'_, (u64, u64), &'static [u8]>,
    group: GroupId,
    seq: u64,
) -> Result<(), StoreError> {
    table
        .retain_in((group.0, 0)..(group.0, seq), |_, _| false)
        .map_err(backend)
}

/// The log holds no row of the group outside its run.
fn check_log_within(
    log: &impl ReadableTable<(u64, u64), &'static [u8]>,
    group: GroupId,
    run: Span,
) -> Result<(), StoreError> {
    let before = log
        .range((group.0, 0)..(group.0, run.first))
        .map_err(backend)?;
    let after = log
        .range((group.0, run.next)..=(group.0, u64::MAX))
        .map_err(backend)?;
    match before.chain(after).next() {
        Some(entry) => {
            let seq = entry.map_err(backend)?.0.value().1;
            Err(corrupt(group, &format!("row {seq} is out of sequence")))
        }
        None => Ok(()),
    }
}

/// The storage key's cipher, and how rows and heads are sealed with it.
#[derive(Clone)]
struct Sealer(ChaCha20Poly1305);

impl Sealer {
    /// nonce (12) ‖ ciphertext ‖ tag (16).
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::Backend(format!("the OS random source failed: {e}")))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .0
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                aad,
                out.get_mut(NONCE_LEN..).unwrap_or_default().into(),
            )
            .map_err(|_| StoreError::Backend("row too large to seal".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, rest) = sealed.split_first_chunk::<NONCE_LEN>()?;
        let (body, tag) = rest.split_at(rest.len().checked_sub(TAG_LEN)?);
        let tag = Tag::try_from(tag).ok()?;
        let mut plain = Zeroizing::new(body.to_vec());
        self.0
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, plain.as_mut_slice().into(), &tag)
            .ok()?;
        Some(plain)
    }

    /// Seals `plain` as row `seq` of the group in `table` (labelled `label`); returns the sealed
    /// size.
    fn insert_row(
        &self,
        table: &mut Table<'_, (u64, u64), &'static [u8]>,
        label: &[u8],
        group: GroupId,
        seq: u64,
        plain: &[u8],
    ) -> Result<u64, StoreError> {
        let sealed = self.seal(&row_aad(label, group, seq), plain)?;
        table
            .insert((group.0, seq), sealed.as_slice())
            .map_err(backend)?;
        Ok(sealed.len() as u64)
    }

    fn open_row(
        &self,
        label: &[u8],
        group: GroupId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.unseal(&row_aad(label, group, seq), sealed)
            .ok_or_else(|| {
                corrupt(
                    group,
                    &format!("row {seq} does not authenticate (wrong storage.key, or altered)"),
                )
            })
    }

    fn read_head(
        &self,
        heads: &impl ReadableTable<u64, &'static [u8]>,
        group: GroupId,
    ) -> Result<Option<Head>, StoreError> {
        match heads.get(group.0).map_err(backend)? {
            Some(sealed) => self.open_head(group, sealed.value()).map(Some),
            None => Ok(None),
        }
    }

    fn open_head(&self, group: GroupId, sealed: &[u8]) -> Result<Head, StoreError> {
        let plain = self.unseal(&head_aad(group), sealed).ok_or_else(|| {
            corrupt(
                group,
                "head does not authenticate (wrong storage.key, or altered)",
            )
        })?;
        decode_head(&plain).ok_or_else(|| corrupt(group, "head does not decode"))
    }

    /// Seals and stores the group's head; returns the sealed size.
    fn write_head(
        &self,
        heads: &mut Table<'_, u64, &'static [u8]>,
        group: GroupId,
        head: Head,
    ) -> Result<u64, StoreError> {
        let sealed = self.seal(&head_aad(group), &encode_head(head))?;
        heads.insert(group.0, sealed.as_slice()).map_err(backend)?;
        Ok(sealed.len() as u64)
    }
}

/// One record of a stored state or delta.
enum Record<'a> {
    Base(&'a GroupState),
    Epoch(Epoch),
    Node(&'a NodeRecord),
    NodeGone(NodeId),
    Member(&'a MemberRecord),
    MemberGone(NodeId),
    /// An enrollment token's digest, spent.
    Spent(&'a [u8; 32]),
    /// An identity banned.
    Banned(&'a [u8; 32]),
    /// An identity no longer banned.
    Unbanned(&'a [u8; 32]),
}

impl Record<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Base(state) => encode_base(out, state),
            Record::Epoch(epoch) => {
                out.push(EPOCH);
                out.extend_from_slice(&epoch.0.to_be_bytes());
            }
            Record::Node(node) => encode_node(out, node),
            Record::NodeGone(id) => {
                out.push(NODE_GONE);
                out.extend_from_slice(&id.0.to_be_bytes());
            }
            Record::Member(member) => encode_member(out, member),
            Record::MemberGone(leaf) => {
                out.push(MEMBER_GONE);
                out.extend_from_slice(&leaf.0.to_be_bytes());
            }
            Record::Spent(digest) => {
                out.push(SPENT);
                out.extend_from_slice(*digest);
            }
            Record::Banned(identity) => {
                out.push(BANNED);
                out.extend_from_slice(*identity);
            }
            Record::Unbanned(identity) => {
                out.push(UNBANNED);
                out.extend_from_slice(*identity);
            }
        }
    }
}

/// The rows (plaintexts) of a full state: the base record, the nodes, the members.
fn state_rows(state: &GroupState) -> impl Iterator<Item = Zeroizing<Vec<u8>>> + '_ {
    let records = std::iter::once(Record::Base(state))
        .chain(state.tree.nodes.iter().map(Record::Node))
        .chain(state.members.iter().map(Record::Member))
        .chain(state.enrollment.spent.iter().map(Record::Spent))
        .chain(state.enrollment.banned.iter().map(Record::Banned));
    cut_rows(records)
}

/// The rows (plaintexts) of a delta: its epoch, what was removed, what was added or changed.
fn delta_rows(delta: &GroupDelta) -> impl Iterator<Item = Zeroizing<Vec<u8>>> + '_ {
    let records = std::iter::once(Record::Epoch(delta.epoch))
        .chain(delta.tree.removed.iter().map(|&id| Record::NodeGone(id)))
        .chain(delta.removed_members.iter().map(|&l| Record::MemberGone(l)))
        .chain(delta.tree.changed.iter().map(Record::Node))
        .chain(delta.members.iter().map(Record::Member))
        .chain(delta.enrollment.spent.iter().map(Record::Spent))
        .chain(delta.enrollment.banned.iter().map(Record::Banned))
        .chain(delta.enrollment.unbanned.iter().map(Record::Unbanned));
    cut_rows(records)
}

/// Encodes `records` into rows, each cut once it holds [`ROW_BYTES`].
fn cut_rows<'a>(
    records: impl Iterator<Item = Record<'a>>,
) -> impl Iterator<Item = Zeroizing<Vec<u8>>> {
    let mut records = records.peekable();
    std::iter::from_fn(move || {
        records.peek()?;
        let mut row = Zeroizing::new(Vec::with_capacity(ROW_BYTES + 128));
        while row.len() < ROW_BYTES {
            let Some(record) = records.next() else { break };
            record.encode(&mut row);
        }
        Some(row)
    })
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(group: GroupId, what: &str) -> StoreError {
    StoreError::Corrupt(format!("group {group}: {what}"))
}

fn row_aad(label: &[u8], group: GroupId, seq: u64) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

fn head_aad(group: GroupId) -> Vec<u8> {
    let mut aad = HEAD_LABEL.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad
}

/// base run, log run (32 bytes).
fn encode_head(head: Head) -> Vec<u8> {
    [
        head.base.first,
        head.base.next,
        head.log.first,
        head.log.next,
    ]
    .iter()
    .flat_map(|n| n.to_be_bytes())
    .collect()
}

/// A head: base run and log run (32 bytes), or only the log run (16 bytes, the earlier layout).
/// Either run may be empty, not both; with no base run, the log begins with the state.
fn decode_head(bytes: &[u8]) -> Option<Head> {
    let mut r = Reader(bytes);
    let mut span = || -> Option<Span> {
        let span = Span {
            first: r.u64().ok()?,
            next: r.u64().ok()?,
        };
        (span.first <= span.next).then_some(span)
    };
    let head = match bytes.len() {
        16 => Head {
            base: Span::empty_at(0),
            log: span()?,
        },
        32 => Head {
            base: span()?,
            log: span()?,
        },
        _ => return None,
    };
    (!head.base.is_empty() || !head.log.is_empty()).then_some(head)
}

fn encode_base(out: &mut Vec<u8>, state: &GroupState) {
    let t = &state.tree;
    out.push(BASE);
    out.extend_from_slice(&t.group.0.to_be_bytes());
    out.push(t.config.degree);
    out.push(match t.config.strategy {
        Strategy::Key => 1,
        Strategy::User => 2,
        _ => 0,
    });
    out.push(u8::from(t.config.hash_forward_joins));
    out.push(u8::from(t.config.one_way));
    out.extend_from_slice(&t.epoch.0.to_be_bytes());
}

fn encode_node(out: &mut Vec<u8>, n: &NodeRecord) {
    out.push(NODE);
    out.extend_from_slice(&n.id.0.to_be_bytes());
    out.extend_from_slice(&n.parent.map_or(NO_PARENT, |p| p.0).to_be_bytes());
    out.push(u8::from(n.leaf));
    out.extend_from_slice(&n.version.0.to_be_bytes());
    out.extend_from_slice(n.key.as_bytes());
}

fn encode_member(out: &mut Vec<u8>, m: &MemberRecord) {
    out.push(MEMBER);
    out.extend_from_slice(&m.id.0.to_be_bytes());
    out.extend_from_slice(&m.identity);
    out.extend_from_slice(&m.hpke_key);
    out.extend_from_slice(&m.leaf.0.to_be_bytes());
    out.extend_from_slice(&m.joined.to_be_bytes());
    out.extend_from_slice(&m.lease_until.0.to_be_bytes());
}

/// Applies the records of one row. `base` says whether this is the group's first row, which must
/// begin with the base record (and only it may).
fn replay(records: &mut Option<GroupRecords>, base: bool, plain: &[u8]) -> Result<(), String> {
    let mut r = Reader(plain);
    if base {
        if r.u8()? != BASE {
            return Err("the first row does not begin with the base record".into());
        }
        *records = Some(decode_base(&mut r)?);
    }
    let records = records
        .as_mut()
        .ok_or_else(|| "a row before the base".to_owned())?;
    while !r.0.is_empty() {
        match r.u8()? {
            EPOCH => {
                let epoch = Epoch(r.u64()?);
                if epoch < records.epoch {
                    return Err(format!("epoch {epoch} goes back from {}", records.epoch));
                }
                records.epoch = epoch;
            }
            NODE => {
                let node = decode_node(&mut r)?;
                records.nodes.insert(node.id, node);
            }
            NODE_GONE => {
                records.nodes.remove(&NodeId(r.u32()?));
            }
            MEMBER => {
                let member = decode_member(&mut r)?;
                records.members.insert(member.leaf, member);
            }
            MEMBER_GONE => {
                records.members.remove(&NodeId(r.u32()?));
            }
            SPENT => {
                records.enrollment.spent.insert(r.take()?);
            }
            BANNED => {
                records.enrollment.banned.insert(r.take()?);
            }
            UNBANNED => {
                records.enrollment.banned.remove(&r.take::<32>()?);
            }
            tag => return Err(format!("unknown record {tag}")),
        }
        if records.nodes.len() > MAX_RECORDS
            || records.members.len() > MAX_RECORDS
            || records.enrollment.len() > MAX_RECORDS
        {
            return Err(format!("more than {MAX_RECORDS} records"));
        }
    }
    Ok(())
}

fn decode_base(r: &mut Reader<'_>) -> Result<GroupRecords, String> {
    let group = GroupId(r.u64()?);
    let degree = r.u8()?;
    let strategy = match r.u8()? {
        0 => Strategy::Group,
        1 => Strategy::Key,
        2 => Strategy::User,
        s => return Err(format!("unknown strategy {s}")),
    };
    let config = TreeConfig {
        degree,
        strategy,
        hash_forward_joins: r.bool()?,
        one_way: r.bool()?,
    };
    Ok(GroupRecords {
        group,
        config,
        epoch: Epoch(r.u64()?),
        nodes: std::collections::BTreeMap::new(),
        members: std::collections::BTreeMap::new(),
        enrollment: crate::store::EnrollmentRecords::default(),
    })
}

fn decode_node(r: &mut Reader<'_>) -> Result<NodeRecord, String> {
    Ok(NodeRecord {
        id: NodeId(r.u32()?),
        parent: match r.u32()? {
            NO_PARENT => None,
            p => Some(NodeId(p)),
        },
        leaf: r.bool()?,
        version: KeyVersion(r.u64()?),
        key: NodeKey::from_bytes(r.take::<32>()?),
    })
}

fn decode_member(r: &mut Reader<'_>) -> Result<MemberRecord, String> {
    let member = MemberRecord {
        id: MemberId(r.u64()?),
        identity: r.take()?,
        hpke_key: r.take()?,
        leaf: NodeId(r.u32()?),
        joined: r.u64()?,
        lease_until: Timestamp(r.u64()?),
    };
    if member.id.0 >> 32 != u64::from(member.leaf.0) {
        return Err(format!(
            "member {} is not at leaf {}",
            member.id.0, member.leaf
        ));
    }
    Ok(member)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| "truncated".to_owned())?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("bad flag {b}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::EnrollmentChanges;
    use lkh_tree::{Batch, KeyTree};
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};
    use std::path::PathBuf;

    const KEY: [u8; 32] = [7; 32];

    /// A directory removed when the test ends.
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Temp {
            let dir = std::env::temp_dir().join(format!("gkm-disk-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Temp(dir)
        }
        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn member(leaf: NodeId, joined: u64) -> MemberRecord {
        MemberRecord {
            id: MemberId((u64::from(leaf.0) << 32) | joined),
            identity: [u8::try_from(leaf.0 % 251).unwrap(); 32],
            hpke_key: [2; 32],
            leaf,
            joined,
            lease_until: Timestamp(99),
        }
    }

    fn state_of(tree: &KeyTree, members: &GroupRecords) -> GroupState {
        GroupState {
            tree: tree.snapshot(),
            members: members.members.values().cloned().collect(),
            enrollment: members.enrollment.clone(),
        }
    }

    /// Comparable contents: the base record, then nodes by id and members by leaf, encoded, then
    /// the spent tokens and bans.
    fn contents(state: &GroupState) -> Vec<u8> {
        let mut nodes: Vec<&NodeRecord> = state.tree.nodes.iter().collect();
        nodes.sort_by_key(|n| n.id);
        let mut members: Vec<&MemberRecord> = state.members.iter().collect();
        members.sort_by_key(|m| m.leaf);
        let mut out = Vec::new();
        encode_base(&mut out, state);
        for n in nodes {
            encode_node(&mut out, n);
        }
        for m in members {
            encode_member(&mut out, m);
        }
        for record in state.enrollment.spent.iter().map(Record::Spent) {
            record.encode(&mut out);
        }
        for record in state.enrollment.banned.iter().map(Record::Banned) {
            record.encode(&mut out);
        }
        out
    }

    /// Random churn of one group: a tree, its members, and the deltas between them.
    struct Churn {
        rng: ChaCha20Rng,
        tree: KeyTree,
        members: GroupRecords,
    }

    impl Churn {
        fn new(members: usize) -> Churn {
            let mut rng = ChaCha20Rng::seed_from_u64(3);
            let mut tree = KeyTree::new(GroupId(4), TreeConfig::default(), &mut rng).unwrap();
            let joins = Batch {
                leaves: vec![],
                joins: members,
            };
            tree.rekey(&joins, &mut rng).unwrap();
            tree.track_changes();
            let members = GroupRecords::from_state(&GroupState {
                tree: tree.snapshot(),
                members: tree.members().map(|l| member(l, 1)).collect(),
                enrollment: Default::default(),
            });
            Churn { rng, tree, members }
        }

        /// One rekey: about a fifth of the members leave, up to 60 join.
        fn delta(&mut self) -> GroupDelta {
            let rng = &mut self.rng;
            let leaves: Vec<NodeId> = self
                .tree
                .members()
                .filter(|_| rng.next_u32().is_multiple_of(5))
                .collect();
            let joins = usize::try_from(rng.next_u32() % 60).unwrap();
            let batch = Batch {
                leaves: leaves.clone(),
                joins,
            };
            let rekey = self.tree.rekey(&batch, rng).unwrap();
            let epoch = self.tree.epoch().0;
            let delta = GroupDelta {
                group: self.tree.group(),
                config: self.tree.config(),
                epoch: self.tree.epoch(),
                tree: self.tree.take_changes(),
                members: rekey
                    .joiners
                    .iter()
                    .map(|j| member(j.leaf, epoch))
                    .collect(),
                removed_members: leaves,
                // A token spent and an identity banned each round; every third lifts a ban.
                enrollment: {
                    let tag = epoch.to_be_bytes()[7];
                    EnrollmentChanges {
                        spent: vec![[tag; 32]],
                        banned: vec![[tag; 32]],
                        unbanned: if epoch.is_multiple_of(3) {
                            vec![[tag.wrapping_sub(1); 32]]
                        } else {
                            Vec::new()
                        },
                    }
                },
            };
            self.members.apply(&delta);
            delta
        }

        fn state(&self) -> GroupState {
            state_of(&self.tree, &self.members)
        }
    }

    /// A store holding a full save and then `rounds` deltas of random churn (a full save again
    /// halfway); returns the state it should load.
    fn churned(path: &Path, rounds: u64) -> GroupState {
        let mut churn = Churn::new(300);
        let (mut store, loaded) = DiskStore::open(path, &KEY).unwrap();
        assert!(loaded.is_empty());
        store.save(&churn.state()).unwrap();
        for round in 0..rounds {
            let delta = churn.delta();
            if round == rounds / 2 {
                store.save(&churn.state()).unwrap();
            } else {
                store.save_delta(&delta).unwrap();
            }
        }
        churn.state()
    }

    fn head(store: &DiskStore) -> Head {
        let tx = store.db().unwrap().begin_read().unwrap();
        let heads = tx.open_table(HEADS).unwrap();
        store.sealer.read_head(&heads, GroupId(4)).unwrap().unwrap()
    }

    /// The sequence numbers of the group's rows in `table`.
    fn seqs(store: &DiskStore, table: Rows) -> Vec<u64> {
        let tx = store.db().unwrap().begin_read().unwrap();
        let table = tx.open_table(table).unwrap();
        table
            .range((4, 0)..=(4, u64::MAX))
            .unwrap()
            .map(|e| e.unwrap().0.value().1)
            .collect()
    }

    /// A store at `path` holding a full save of a churning group of `members` and one delta.
    fn saved(path: &Path, members: usize) -> (DiskStore, Churn) {
        let mut churn = Churn::new(members);
        let (mut store, _) = DiskStore::open(path, &KEY).unwrap();
        store.save(&churn.state()).unwrap();
        store.save_delta(&churn.delta()).unwrap();
        (store, churn)
    }

    /// One more delta of `churn`, saved with a compaction.
    fn compact(store: &mut DiskStore, churn: &mut Churn) {
        let delta = churn.delta();
        store.save_delta_and_compact(&delta, churn.state()).unwrap();
    }

    fn reopened(path: &Path) -> GroupState {
        let (_, mut loaded) = DiskStore::open(path, &KEY).unwrap();
        assert_eq!(loaded.len(), 1);
        loaded.pop().unwrap()
    }

    #[test]
    fn saves_and_deltas_load_as_the_state_they_describe() {
        let dir = Temp::new("reload");
        let want = churned(&dir.file("state.redb"), 12);
        let loaded = reopened(&dir.file("state.redb"));
        assert_eq!(contents(&loaded), contents(&want));
        KeyTree::restore(&loaded.tree).unwrap();
    }

    #[test]
    fn a_compaction_replaces_the_stored_rows_while_deltas_are_saved() {
        let dir = Temp::new("compact");
        let path = dir.file("state.redb");
        let (mut store, mut churn) = saved(&path, 100_000);
        for _ in 0..4 {
            store.save_delta(&churn.delta()).unwrap();
        }
        let before = head(&store);
        let rows = |delta: &GroupDelta| delta_rows(delta).count() as u64;
        let delta = churn.delta();
        store.save_delta_and_compact(&delta, churn.state()).unwrap();
        let mut after_delta = rows(&delta);
        assert!(store.compaction.is_some(), "on the thread");
        for _ in 0..3 {
            let delta = churn.delta();
            store.save_delta(&delta).unwrap();
            after_delta += rows(&delta);
        }
        store.finish_compaction();
        assert!(!store.compacting());
        assert!(store.take_compaction_failure().is_none());
        let after = head(&store);
        assert!(after.base.first >= before.base.next, "{after:?} {before:?}");
        assert!(after.base.next - after.base.first > 16, "{after:?}");
        assert_eq!(
            after.log,
            Span {
                first: before.log.next + rows(&delta),
                next: before.log.next + after_delta,
            }
        );
        // The old base and the deltas the new base holds are gone.
        let base_rows: Vec<u64> = (after.base.first..after.base.next).collect();
        assert_eq!(seqs(&store, BASES), base_rows);
        let log_rows: Vec<u64> = (after.log.first..after.log.next).collect();
        assert_eq!(seqs(&store, LOG), log_rows);
        store.save_delta(&churn.delta()).unwrap();
        drop(store);
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));
    }

    #[test]
    fn v036_a_row_numbered_at_the_end_of_the_sequence_is_refused_not_wrapped() {
        let dir = Temp::new("last-seq");
        let (mut store, churn) = saved(&dir.file("state.redb"), 300);
        let tx = store.db().unwrap().begin_write().unwrap();
        tx.open_table(BASES)
            .unwrap()
            .insert((4, u64::MAX), &[0u8; 40][..])
            .unwrap();
        tx.commit().unwrap();
        let before = head(&store);
        let error = store.save(&churn.state()).unwrap_err();
        assert!(error.to_string().contains("2^64 - 1"), "{error}");
        assert_eq!(head(&store), before, "nothing changed");
    }

    #[test]
    fn a_small_state_is_compacted_in_full_at_once() {
        let dir = Temp::new("compact-small");
        let (mut store, mut churn) = saved(&dir.file("state.redb"), 300);
        let before = head(&store);
        compact(&mut store, &mut churn);
        assert!(store.compaction.is_none(), "no thread for one transaction");
        let after = head(&store);
        assert_eq!(after.base.next - after.base.first, 1);
        assert!(after.base.first >= before.base.next && after.log.is_empty());
        assert!(seqs(&store, LOG).is_empty());
    }

    #[test]
    fn a_compaction_cut_short_loses_nothing_and_the_next_one_clears_its_rows() {
        let dir = Temp::new("cut-short");
        let path = dir.file("state.redb");
        let (mut store, mut churn) = saved(&path, 100_000);
        // Two of its rows written, one per transaction, then the process dies.
        let job = Compaction::start(&store, GroupId(4)).unwrap();
        let state = churn.state();
        let staged = job.stage(state_rows(&state).take(2)).unwrap();
        assert_eq!(staged.next - staged.first, 2);
        drop(job);
        store.save_delta(&churn.delta()).unwrap();
        let old = head(&store);
        drop(store);
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));

        let (mut store, _) = DiskStore::open(&path, &KEY).unwrap();
        assert_eq!(head(&store), old);
        compact(&mut store, &mut churn);
        store.finish_compaction();
        assert!(store.take_compaction_failure().is_none());
        let new = head(&store);
        assert!(new.base.first >= staged.next, "{new:?} {staged:?}");
        let base_rows: Vec<u64> = (new.base.first..new.base.next).collect();
        assert_eq!(
            seqs(&store, BASES),
            base_rows,
            "the cut-short rows are gone"
        );
        drop(store);
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));
    }

    #[test]
    fn a_compaction_overtaken_by_a_full_save_is_dropped() {
        let dir = Temp::new("overtaken");
        let path = dir.file("state.redb");
        let (mut store, mut churn) = saved(&path, 300);
        let job = Compaction::start(&store, GroupId(4)).unwrap();
        let stale = churn.state();
        let staged = job.stage(state_rows(&stale)).unwrap();
        churn.delta();
        store.save(&churn.state()).unwrap();
        let error = job.switch(staged).unwrap_err();
        assert!(error.to_string().contains("saved in full"), "{error}");
        drop((job, store));
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));
    }

    #[test]
    fn a_file_of_the_earlier_layout_loads_and_is_compacted() {
        let dir = Temp::new("earlier");
        let path = dir.file("state.redb");
        let mut churn = Churn::new(300);
        {
            // As stores wrote before `gkm bases`: the state then the deltas in the log, and a
            // head of the log's run only.
            let (store, _) = DiskStore::open(&path, &KEY).unwrap();
            let state = churn.state();
            let delta = churn.delta();
            let tx = store.db().unwrap().begin_write().unwrap();
            {
                let mut log = tx.open_table(LOG).unwrap();
                let mut next = 7;
                for row in state_rows(&state).chain(delta_rows(&delta)) {
                    store
                        .sealer
                        .insert_row(&mut log, LOG_LABEL, GroupId(4), next, &row)
                        .unwrap();
                    next += 1;
                }
                let run = Span { first: 7, next };
                let sealed = store.sealer.seal(
                    &head_aad(GroupId(4)),
                    &encode_head(Head {
                        base: run,
                        log: run,
                    })[16..],
                );
                let mut heads = tx.open_table(HEADS).unwrap();
                heads.insert(4, sealed.unwrap().as_slice()).unwrap();
            }
            tx.commit().unwrap();
        }
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));
        let (mut store, _) = DiskStore::open(&path, &KEY).unwrap();
        compact(&mut store, &mut churn);
        assert!(store.take_compaction_failure().is_none());
        assert!(seqs(&store, LOG).is_empty(), "the old log is gone");
        drop(store);
        assert_eq!(contents(&reopened(&path)), contents(&churn.state()));
    }

    /// Opens a copy of a good store after `tamper` changed it; returns the load error.
    fn tampered(dir: &Temp, good: &Path, name: &str, tamper: impl FnOnce(&Database)) -> String {
        let path = dir.file(name);
        std::fs::copy(good, &path).unwrap();
        {
            let db = Database::create(&path).unwrap();
            tamper(&db);
        }
        match DiskStore::open(&path, &KEY) {
            Err(StoreError::Corrupt(message)) => message,
            other => panic!(
                "{name}: expected Corrupt, got {:?}",
                other.map(|(_, s)| s.len())
            ),
        }
    }

    fn edit(
        db: &Database,
        table: Rows,
        f: impl FnOnce(&mut redb::Table<'_, (u64, u64), &'static [u8]>),
    ) {
        let tx = db.begin_write().unwrap();
        f(&mut tx.open_table(table).unwrap());
        tx.commit().unwrap();
    }

    fn row(db: &Database, table: Rows, seq: u64) -> Vec<u8> {
        let tx = db.begin_read().unwrap();
        let table = tx.open_table(table).unwrap();
        table.get((4, seq)).unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn v036_altered_missing_or_moved_rows_are_refused() {
        let dir = Temp::new("corrupt");
        let good = dir.file("good.redb");
        churned(&good, 8);
        // The full save at round 4 wrote a new base; the log holds the deltas after it.
        let (store, _) = DiskStore::open(&good, &KEY).unwrap();
        let Head { base, log } = head(&store);
        drop(store);
        assert!(log.next - log.first >= 3 && log.first > 0, "{log:?}");

        let flipped = tampered(&dir, &good, "flipped.redb", |db| {
            let mut bytes = row(db, LOG, log.first + 1);
            bytes[20] ^= 1;
            edit(db, LOG, |t| {
                t.insert((4, log.first + 1), bytes.as_slice()).unwrap();
            });
        });
        assert!(flipped.contains("does not authenticate"), "{flipped}");

        let flipped_base = tampered(&dir, &good, "flipped-base.redb", |db| {
            let mut bytes = row(db, BASES, base.first);
            bytes[20] ^= 1;
            edit(db, BASES, |t| {
                t.insert((4, base.first), bytes.as_slice()).unwrap();
            });
        });
        assert!(
            flipped_base.contains("does not authenticate"),
            "{flipped_base}"
        );

        let swapped = tampered(&dir, &good, "swapped.redb", |db| {
            let (a, b) = (row(db, LOG, log.first + 1), row(db, LOG, log.first + 2));
            edit(db, LOG, |t| {
                t.insert((4, log.first + 1), b.as_slice()).unwrap();
                t.insert((4, log.first + 2), a.as_slice()).unwrap();
            });
        });
        assert!(swapped.contains("does not authenticate"), "{swapped}");

        // A base row (sealed for `gkm bases`) put in the log.
        let moved_row = tampered(&dir, &good, "moved-row.redb", |db| {
            let bytes = row(db, BASES, base.first);
            edit(db, LOG, |t| {
                t.insert((4, log.first + 1), bytes.as_slice()).unwrap();
            });
        });
        assert!(moved_row.contains("does not authenticate"), "{moved_row}");

        let gap = tampered(&dir, &good, "gap.redb", |db| {
            edit(db, LOG, |t| {
                t.remove((4, log.first + 1)).unwrap();
            });
        });
        assert!(gap.contains("out of sequence"), "{gap}");

        let cut = tampered(&dir, &good, "cut.redb", |db| {
            edit(db, LOG, |t| {
                t.remove((4, log.next - 1)).unwrap();
            });
        });
        assert!(cut.contains("missing"), "{cut}");

        let no_base = tampered(&dir, &good, "no-base.redb", |db| {
            edit(db, BASES, |t| {
                t.remove((4, base.first)).unwrap();
            });
        });
        assert!(no_base.contains("missing"), "{no_base}");

        let stale = tampered(&dir, &good, "stale.redb", |db| {
            let old = row(db, LOG, log.first);
            edit(db, LOG, |t| {
                t.insert((4, log.first - 1), old.as_slice()).unwrap();
            });
        });
        assert!(stale.contains("out of sequence"), "{stale}");

        let moved = tampered(&dir, &good, "moved.redb", |db| {
            let tx = db.begin_write().unwrap();
            {
                let mut heads = tx.open_table(HEADS).unwrap();
                let head = heads.get(4).unwrap().unwrap().value().to_vec();
                heads.insert(5, head.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        });
        assert!(moved.contains("g5: head does not authenticate"), "{moved}");
    }

    #[test]
    fn v036_an_old_format_file_is_refused_with_what_to_do() {
        let dir = Temp::new("old");
        let path = dir.file("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let old: TableDefinition<u64, &[u8]> = TableDefinition::new(OLD_TABLE);
                tx.open_table(old)
                    .unwrap()
                    .insert(1, &[0u8; 40][..])
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let Err(StoreError::Corrupt(message)) = DiskStore::open(&path, &KEY) else {
            panic!("an old file must be refused");
        };
        assert!(message.contains("first format") && message.contains("move it away"));
    }

    #[test]
    fn a_wrong_key_or_a_garbage_file_is_an_error() {
        let dir = Temp::new("garbage");
        let good = dir.file("good.redb");
        churned(&good, 1);
        assert!(matches!(
            DiskStore::open(&good, &[8; 32]),
            Err(StoreError::Corrupt(_))
        ));
        let garbage = dir.file("garbage.redb");
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut bytes = vec![0u8; 64 * 1024];
        rng.fill_bytes(&mut bytes);
        std::fs::write(&garbage, &bytes).unwrap();
        assert!(DiskStore::open(&garbage, &KEY).is_err());
    }

    #[test]
    fn v036_a_bad_record_in_an_authentic_row_is_an_error() {
        let mut records = None;
        assert!(replay(&mut records, false, &[NODE]).is_err(), "no base");
        let mut base = Vec::new();
        encode_base(
            &mut base,
            &GroupState {
                tree: lkh_tree::TreeSnapshot {
                    group: GroupId(1),
                    config: TreeConfig::default(),
                    epoch: Epoch(3),
                    nodes: Vec::new(),
                },
                members: Vec::new(),
                enrollment: Default::default(),
            },
        );
        for cut in 0..base.len() {
            assert!(replay(&mut None, true, &base[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = base.clone();
        bad.extend_from_slice(&[EPOCH, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("goes back")
        );
        let mut bad = base.clone();
        bad.push(99);
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("unknown record")
        );
        let mut bad = base;
        encode_member(
            &mut bad,
            &MemberRecord {
                leaf: NodeId(9),
                ..member(NodeId(8), 1)
            },
        );
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("not at leaf")
        );
    }
}
