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
//! positions. The records, rows and sealing live in `rows.rs`, shared with the PostgreSQL store,
//! whose rows are the same bytes.
//!
//! Loading checks everything: every row the head names authenticates, sequence numbers are
//! contiguous within each run and the log holds no row outside its run, the first row of the
//! state holds the base record, record counts stay within [`MAX_RECORDS`]. Anything else is
//! [`StoreError::Corrupt`] and nothing is served.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use lkh_tree::GroupId;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle,
};
use zeroize::Zeroizing;

use crate::rows::{
    BASE_LABEL, COMPACTION_ROWS, Head, LOG_LABEL, ONE_TRANSACTION_RECORDS, Sealer, Span, corrupt,
    delta_rows, replay, state_rows,
};
use crate::store::{
    CompactionFailure, Compactions, GroupDelta, GroupRecords, GroupState, KeyFit, Resealed, Store,
    StoreError,
};

type Rows = TableDefinition<'static, (u64, u64), &'static [u8]>;
const LOG: Rows = TableDefinition::new("gkm log");
const BASES: Rows = TableDefinition::new("gkm bases");
const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("gkm heads");
/// The table of the first format (one sealed blob per group), which this store refuses.
const OLD_TABLE: &str = "groups";

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
    compactions: Compactions,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("written", &self.bytes_written())
            .field("compacting", &self.compactions.started())
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

/// [`open_database`], its errors as the store's.
fn open_file(path: &Path) -> Result<Database, StoreError> {
    match open_database(path) {
        Ok(db) => Ok(db),
        Err(DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::InUse),
        Err(e) => Err(StoreError::Backend(e.to_string())),
    }
}

impl DiskStore {
    /// Opens (or creates) the store at `path` and loads every group.
    ///
    /// Errors: [`StoreError::InUse`] when another process holds the file, [`StoreError::Corrupt`]
    /// when anything in it does not authenticate or decode (or it is of the first, unsupported
    /// format), [`StoreError::Backend`] for I/O errors.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<(DiskStore, Vec<GroupState>), StoreError> {
        let store = DiskStore {
            db: Some(Arc::new(open_file(path)?)),
            path: path.to_path_buf(),
            failed: false,
            sealer: Sealer::new(key),
            written: Arc::new(AtomicU64::new(0)),
            compactions: Compactions::default(),
        };
        let states = store.load()?;
        Ok((store, states))
    }

    /// Whether `key` opens the store at `path`, by its heads (a rotation re-seals them with the
    /// rows, in one transaction); a missing file holds nothing. Creates nothing. Errors as
    /// [`DiskStore::open`]'s.
    pub fn key_fit(path: &Path, key: &[u8; 32]) -> Result<KeyFit, StoreError> {
        if !path.exists() {
            return Ok(KeyFit::Empty);
        }
        let db = open_file(path)?;
        let tx = db.begin_read().map_err(backend)?;
        let has_heads = tx
            .list_tables()
            .map_err(backend)?
            .any(|t| t.name() == HEADS.name());
        if !has_heads {
            return Ok(KeyFit::Empty);
        }
        let sealer = Sealer::new(key);
        let (mut heads, mut opened) = (0, 0);
        for entry in tx
            .open_table(HEADS)
            .map_err(backend)?
            .iter()
            .map_err(backend)?
        {
            let (group, sealed) = entry.map_err(backend)?;
            heads += 1;
            if sealer
                .open_head(GroupId(group.value()), sealed.value())
                .is_ok()
            {
                opened += 1;
            }
        }
        KeyFit::of(heads, opened)
    }

    /// Re-seals every group's head and rows under the storage key `new`, in one write
    /// transaction committed durably before it returns: a crash keeps the whole state under the
    /// old key or the whole state under the new one, never a mix. Base rows no head names (left
    /// by a compaction cut short) are deleted instead. The store seals under `new` from then on.
    /// Pages the file no longer uses may still hold rows sealed under the old key until redb
    /// reuses them: destroying the old key is what makes them unreadable.
    pub fn reseal(&mut self, new: &[u8; 32]) -> Result<Resealed, StoreError> {
        self.compactions.finish();
        let new = Sealer::new(new);
        let resealed = self.write(|store| store.reseal_all(&new))?;
        self.sealer = new;
        Ok(resealed)
    }

    fn reseal_all(&self, new: &Sealer) -> Result<Resealed, StoreError> {
        let tx = self.db()?.begin_write().map_err(backend)?;
        let mut done = Resealed::default();
        {
            let mut heads = tx.open_table(HEADS).map_err(backend)?;
            let mut log = tx.open_table(LOG).map_err(backend)?;
            let mut bases = tx.open_table(BASES).map_err(backend)?;
            let mut groups = Vec::new();
            for entry in heads.iter().map_err(backend)? {
                let (group, sealed) = entry.map_err(backend)?;
                let group = GroupId(group.value());
                groups.push((group, self.sealer.open_head(group, sealed.value())?));
            }
            for &(group, head) in &groups {
                done.rows += self.reseal_run(new, &mut bases, BASE_LABEL, group, head.base)?;
                done.rows += self.reseal_run(new, &mut log, LOG_LABEL, group, head.log)?;
                done.dropped += remove_outside(&mut bases, group, head.base)?;
                new.write_head(&mut heads, group, head)?;
            }
            bases
                .retain(|key, _| {
                    let named = groups.iter().any(|&(g, _)| g.0 == key.0);
                    done.dropped += u64::from(!named);
                    named
                })
                .map_err(backend)?;
            done.groups = groups.len();
        }
        tx.commit().map_err(backend)?;
        Ok(done)
    }

    /// Re-seals the rows `run` of the group in `table` under `new`; returns how many.
    fn reseal_run(
        &self,
        new: &Sealer,
        table: &mut Table<'_, (u64, u64), &'static [u8]>,
        label: &[u8],
        group: GroupId,
        run: Span,
    ) -> Result<u64, StoreError> {
        for seq in run.first..run.next {
            let sealed = table
                .get((group.0, seq))
                .map_err(backend)?
                .ok_or_else(|| corrupt(group, &format!("row {seq} is missing")))?
                .value()
                .to_vec();
            let resealed = self.sealer.reseal_row(new, label, group, seq, &sealed)?;
            table
                .insert((group.0, seq), resealed.as_slice())
                .map_err(backend)?;
        }
        Ok(run.len())
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
        self.compactions.finish();
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
        self.compactions.finish();
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
}

impl Drop for DiskStore {
    /// Lets a running compaction finish (a process killed instead loses nothing but its work).
    fn drop(&mut self) {
        self.compactions.finish();
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
        self.compactions.finish();
        let (group, epoch) = (state.tree.group, state.tree.epoch);
        let job = Compaction::start(self, group).map(|job| move || job.run(&state));
        self.compactions.start(group, epoch, job);
        Ok(())
    }

    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.compactions.take_failure()
    }

    fn compacting(&mut self) -> bool {
        self.compactions.running()
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

/// Deletes the group's rows outside `run`; returns how many.
fn remove_outside(
    table: &mut Table<'_, (u64, u64), &'static [u8]>,
    group: GroupId,
    run: Span,
) -> Result<u64, StoreError> {
    let mut removed = 0;
    let mut count = |_: (u64, u64), _: &[u8]| {
        removed += 1;
        false
    };
    table
        .retain_in((group.0, 0)..(group.0, run.first), &mut count)
        .map_err(backend)?;
    table
        .retain_in((group.0, run.next)..=(group.0, u64::MAX), &mut count)
        .map_err(backend)?;
    Ok(removed)
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

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// How the sealer writes and reads redb tables.
impl Sealer {
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
        let sealed = self.seal_row(label, group, seq, plain)?;
        table
            .insert((group.0, seq), sealed.as_slice())
            .map_err(backend)?;
        Ok(sealed.len() as u64)
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

    /// Seals and stores the group's head; returns the sealed size.
    fn write_head(
        &self,
        heads: &mut Table<'_, u64, &'static [u8]>,
        group: GroupId,
        head: Head,
    ) -> Result<u64, StoreError> {
        let sealed = self.seal_head(group, head)?;
        heads.insert(group.0, sealed.as_slice()).map_err(backend)?;
        Ok(sealed.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Timestamp;
    use crate::rows::{Record, encode_base, encode_head, encode_member, encode_node, head_aad};
    use crate::store::{EnrollmentChanges, MemberRecord};
    use lkh_tree::{Batch, KeyTree};
    use lkh_tree::{NodeId, NodeRecord, TreeConfig};
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};
    use std::path::PathBuf;
    use wire::MemberId;

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
            hpke: crate::HpkeDigest {
                kem: wire::Kem::XWing,
                digest: [2; 32],
            },
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
            signing: Vec::new(),
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
                signing: Vec::new(),
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
                signing: Vec::new(),
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
        assert!(store.compactions.started(), "on the thread");
        for _ in 0..3 {
            let delta = churn.delta();
            store.save_delta(&delta).unwrap();
            after_delta += rows(&delta);
        }
        store.compactions.finish();
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
        assert!(
            !store.compactions.started(),
            "no thread for one transaction"
        );
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
        store.compactions.finish();
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
    fn v073_a_reseal_moves_every_row_to_the_new_key_and_drops_the_rows_no_head_names() {
        const NEW: [u8; 32] = [8; 32];
        let dir = Temp::new("reseal");
        let path = dir.file("state.redb");
        let (mut store, mut churn) = saved(&path, 100_000);
        compact(&mut store, &mut churn);
        store.compactions.finish();
        store.save_delta(&churn.delta()).unwrap();
        // Rows of a compaction cut short: named by no head.
        let job = Compaction::start(&store, GroupId(4)).unwrap();
        job.stage(state_rows(&churn.state()).take(2)).unwrap();
        drop(job);
        let head = head(&store);
        assert!(matches!(
            DiskStore::key_fit(&path, &KEY),
            Err(StoreError::InUse)
        ));

        let done = store.reseal(&NEW).unwrap();
        assert_eq!(done.groups, 1);
        assert_eq!(done.rows, head.base.len() + head.log.len());
        assert_eq!(done.dropped, 2);
        store.save_delta(&churn.delta()).unwrap();
        drop(store);
        assert_eq!(DiskStore::key_fit(&path, &KEY).unwrap(), KeyFit::Refused);
        assert_eq!(DiskStore::key_fit(&path, &NEW).unwrap(), KeyFit::Opens);
        assert!(matches!(
            DiskStore::open(&path, &KEY),
            Err(StoreError::Corrupt(_))
        ));
        let (_, mut loaded) = DiskStore::open(&path, &NEW).unwrap();
        assert_eq!(contents(&loaded.pop().unwrap()), contents(&churn.state()));
        assert_eq!(
            DiskStore::key_fit(&dir.file("none.redb"), &KEY).unwrap(),
            KeyFit::Empty
        );
        assert!(!dir.file("none.redb").exists(), "key_fit creates nothing");
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
}
