//! [`PgStore`]: group states as sealed rows in PostgreSQL, with a lease per group that fences
//! every save (feature `postgres`).
//!
//! Layout: the same rows as the redb store (`rows.rs`), in the tables `gkm_bases` (each group's
//! full state) and `gkm_log` (the deltas saved since), both `(group_id bigint, seq bigint,
//! sealed bytea)` keyed by `(group_id, seq)`, and `gkm_heads (group_id, epoch, seq, head)`, whose
//! sealed `head` names the two runs of rows that hold the group's state. `epoch` and `seq` beside
//! it are in the clear, for standbys that follow the log ([`PgStore::log_position`]): the epoch of
//! the last save and a number that grows with every commit that changes the head. Loading checks
//! the epoch against the rows. `gkm_leases (group_id, term, holder, address, expires)` holds the
//! leases, `gkm_schema (version)` the migrations applied, `gkm_controllers (holder, address,
//! seen)` the controllers alive ([`PgStore::announce`]). The database only ever sees sealed
//! rows, heads and epochs: no key material, and rows cannot be moved between tables, groups or
//! positions (their associated data names all three). A group id is stored as the `bigint` with
//! the same 64 bits.
//!
//! Transactions: a full save, a delta and the last step of a compaction are each one
//! transaction (`READ COMMITTED`), committed before the call returns; a load is one `REPEATABLE
//! READ` read-only transaction, so it sees one committed state. Sequence numbers only grow
//! within a table, as in the redb store. Compaction (see [`Store::save_delta_and_compact`]) runs
//! on a thread of the store with its own connection: it writes the new base rows 16 rows (about
//! 4 MiB) per transaction, and only its last transaction points the head at them and deletes
//! what they replace; a state of up to about 43,000 records is saved in full at once instead.
//!
//! Schema: migrations are numbered in [`MIGRATIONS`]; [`PgStore::open`] applies the missing ones
//! in one transaction under an advisory lock (two controllers starting together wait for each
//! other), and refuses a database whose schema is newer than this binary's.
//!
//! Fencing. A controller leads a group while it holds the group's lease: [`PgStore::claim`] takes
//! a free or expired lease (raising its term), [`PgStore::renew`] extends it, and every write
//! transaction begins by locking the lease row (`SELECT … FOR UPDATE`) and checking that its
//! term is the term this store claimed, its holder is this store and it has not expired. Why no
//! deposed leader can commit once another one has claimed:
//!
//! - Expiry is judged by the database's clock (`clock_timestamp()`) alone: for the check in a
//!   save and for the claim that takes an expired lease. Controllers' clocks, and how long a
//!   controller was paused, do not enter.
//! - The check and the commit are one transaction, and the check holds the lease row's lock until
//!   the commit. A claim updates that row, so it waits for the save to commit or roll back: every
//!   committed save of term `t` is ordered before the claim that makes term `t + 1`, and every
//!   save that starts after that claim finds a term other than its own and rolls back with
//!   [`StoreError::Deposed`]. A lease that runs out while a save holds the lock is taken only
//!   once that save has ended. A new leader that loads the group after its claim therefore sees
//!   every epoch its predecessor committed, and rekeys above them.
//! - A controller that stops in the middle of a save holds the lock only until the database ends
//!   its session (`idle_in_transaction_session_timeout`, 5 s); a claim waiting on the lock gives
//!   up after `lock_timeout` (5 s) with an error and can be retried.
//!
//! The controller, not the store, must stop *sending* as leader once its lease may have expired:
//! [`Lease::until`] is a deadline by the controller's monotonic clock taken before the claim or
//! renewal was sent, so it falls before the database's expiry (as long as the two clocks run at
//! about the same rate). Fencing makes that a matter of
//! liveness only: a rekey is sent after its save committed, and a save cannot commit once the
//! term changed.
//!
//! Failures: a lost connection fails the call with [`StoreError::Backend`] within a few seconds
//! (connect timeout 5 s, TCP keepalives and user timeout 5 s; a statement times out after 30 s),
//! and the next call connects again. A transaction that fails when it begins on a dead
//! connection (the server restarted since the last call) is retried once on a new one; nothing
//! else is retried, since a commit whose answer was lost may have happened (the caller treats the
//! save as failed and saves in full next).
//!
//! Limits: no TLS (connect over a Unix socket or a trusted network); row and state limits as the
//! redb store ([`MAX_RECORDS`](crate::MAX_RECORDS)); one store per holder identity (two
//! processes with one identity take the lease from each other). There is no deadline on the
//! client's side: a server that is alive but stalled (its process stopped, its kernel still
//! answering) holds a call until the server's own timeouts end it, or forever if it never
//! resumes; a lost host or network is bounded by the keepalives and TCP user timeout, a dead
//! server at once. Only the `PG*` settings written in the connection string and `PGPASSWORD`
//! are read, not `PGHOST` and the others (the driver does not read the environment).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lkh_tree::{Epoch, GroupId};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel, NoTls, Transaction};
use zeroize::Zeroizing;

mod follow;
pub use follow::{Follower, Following};

use crate::rows::{
    BASE_LABEL, COMPACTION_ROWS, Head, LOG_LABEL, ONE_TRANSACTION_RECORDS, Sealer, Span, corrupt,
    delta_rows, replay, state_rows,
};
use crate::store::{
    CompactionFailure, Compactions, GroupDelta, GroupRecords, GroupState, KeyFit, Resealed, Store,
    StoreError,
};

/// How to reach the database. `Debug` hides a password written in the connection string.
#[derive(Clone, PartialEq, Eq)]
pub struct PgConfig {
    /// A connection string: a URL (`postgresql://user@host:5432/db`, or
    /// `postgresql://user@%2Frun%2Fpostgresql/db` for a Unix-socket directory) or `key=value`
    /// pairs (`host=/run/postgresql user=gkm dbname=gkm`).
    pub url: String,
    /// A file holding the password (trailing newlines ignored). Without it, the `PGPASSWORD`
    /// environment variable is used if set; never the command line.
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redacted(&self.url))
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// `url` with the password of a URL's user part, or of a `password=` pair, as `***`.
fn redacted(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if let Some((user_info, host)) = authority.rsplit_once('@')
            && let Some((user, _)) = user_info.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}{path}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some(("password", _)) => "password=***".to_owned(),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The schema migrations, numbered from 1 by their place in this list. Applied in order, each
/// once, by [`PgStore::open`]; never edit one that has shipped, add another.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything.
    "CREATE TABLE gkm_schema (
         version integer PRIMARY KEY,
         applied timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE gkm_heads (
         group_id bigint PRIMARY KEY,
         epoch bigint NOT NULL,
         seq bigint NOT NULL,
         head bytea NOT NULL
     );
     CREATE TABLE gkm_bases (
         group_id bigint NOT NULL,
         seq bigint NOT NULL,
         sealed bytea NOT NULL,
         PRIMARY KEY (group_id, seq)
     );
     CREATE TABLE gkm_log (
         group_id bigint NOT NULL,
         seq bigint NOT NULL,
         sealed bytea NOT NULL,
         PRIMARY KEY (group_id, seq)
     );
     -- Sealed rows do not compress: store them out of line as they are.
     ALTER TABLE gkm_bases ALTER COLUMN sealed SET STORAGE EXTERNAL;
     ALTER TABLE gkm_log ALTER COLUMN sealed SET STORAGE EXTERNAL;
     CREATE TABLE gkm_leases (
         group_id bigint PRIMARY KEY,
         term bigint NOT NULL CHECK (term > 0),
         holder text NOT NULL,
         address text NOT NULL,
         expires timestamptz NOT NULL
     );",
    // 2: the controllers alive, so that each takes no more than its share of the groups.
    "CREATE TABLE gkm_controllers (
         holder text PRIMARY KEY,
         address text NOT NULL,
         seen timestamptz NOT NULL
     );",
];

/// The schema version this binary writes: the number of [`MIGRATIONS`].
pub const SCHEMA_VERSION: i32 = 2;

/// The advisory lock key under which migrations run ("gkm" and a 1).
const MIGRATION_LOCK: i64 = 0x676b_6d00_0000_0001;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Session settings: a statement that runs away, a lock held by a stalled peer, a transaction
/// left open by a paused process.
const SESSION: &str = "SET statement_timeout = '30s'; SET lock_timeout = '5s'; \
                       SET idle_in_transaction_session_timeout = '5s'";

/// A lease this store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The group.
    pub group: GroupId,
    /// Its term: raised by every change of holder (and by a claim after expiry).
    pub term: u64,
    /// Until when this store may act as the group's leader, by the local monotonic clock: the
    /// moment the claim or renewal was sent plus the lease, never after the database's expiry.
    pub until: Instant,
}

/// A lease as the database holds it, for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    /// The group.
    pub group: GroupId,
    /// The term.
    pub term: u64,
    /// Who holds (or last held) it.
    pub holder: String,
    /// Where that controller answers.
    pub address: String,
    /// How long it still runs by the database's clock; `None` once expired (or released).
    pub expires_in: Option<Duration>,
}

/// Where a group's committed log stands, for a standby deciding whether to reload it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    /// The epoch of the last save.
    pub epoch: Epoch,
    /// Grows with every committed save, delta and compaction of the group.
    pub seq: u64,
}

/// The term this store claimed for a group and the length of its lease.
#[derive(Clone, Copy, Debug)]
struct Held {
    term: u64,
    lease: Duration,
}

/// Group states in PostgreSQL, sealed under a storage key, fenced by per-group leases (see the
/// module docs).
pub struct PgStore {
    /// Connection parameters, password included.
    pg: postgres::Config,
    /// The connection; `None` until the next call after it was lost.
    client: Option<Client>,
    sealer: Sealer,
    holder: String,
    address: String,
    /// The leases this store claimed: shared with the stores made by [`PgStore::connect_another`].
    held: Arc<Mutex<HashMap<GroupId, Held>>>,
    compactions: Compactions,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("holder", &self.holder)
            .field("address", &self.address)
            .field("connected", &self.client.is_some())
            .field("held", &*self.held())
            .field("compacting", &self.compactions.started())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects, brings the schema up to [`SCHEMA_VERSION`] and loads every group.
    ///
    /// `holder` names this controller in the leases (unique per process: a restarted controller
    /// may reuse its name, and then takes its old leases at once, with a new term); `address` is
    /// where it answers, shown to operators and members looking for the leader. `key` is the
    /// storage key.
    ///
    /// Errors: [`StoreError::Backend`] when the database cannot be reached or its schema is newer
    /// than this binary's, [`StoreError::Corrupt`] when a stored row does not authenticate or
    /// decode, or a group's rows are not the runs its head names.
    pub fn open(
        config: &PgConfig,
        key: &[u8; 32],
        holder: &str,
        address: &str,
    ) -> Result<(PgStore, Vec<GroupState>), StoreError> {
        let pg = pg_config(config)?;
        let mut client = connect(&pg)?;
        migrate(&mut client)?;
        let mut store = PgStore {
            pg,
            client: Some(client),
            sealer: Sealer::new(key),
            holder: holder.to_owned(),
            address: address.to_owned(),
            held: Arc::default(),
            compactions: Compactions::default(),
        };
        let states = store.load_all()?;
        Ok((store, states))
    }

    /// Whether `key` opens the groups stored in the database, by their heads (a rotation
    /// re-seals them with the rows, in one transaction). Reads only; a database without the
    /// gkm tables holds nothing.
    pub fn key_fit(config: &PgConfig, key: &[u8; 32]) -> Result<KeyFit, StoreError> {
        let pg = pg_config(config)?;
        let mut client = Some(connect(&pg)?);
        let sealer = Sealer::new(key);
        read(&mut client, &pg, |tx| {
            let exists: bool = tx
                .query_one("SELECT to_regclass('gkm_heads') IS NOT NULL", &[])
                .map_err(|e| pg_error("cannot read the schema", &e))?
                .get(0);
            if !exists {
                return Ok(KeyFit::Empty);
            }
            let heads = tx
                .query("SELECT group_id, head FROM gkm_heads", &[])
                .map_err(|e| pg_error("cannot read the heads", &e))?;
            let opened = heads
                .iter()
                .filter(|row| sealer.open_head(group_of(row.get(0)), row.get(1)).is_ok())
                .count();
            KeyFit::of(heads.len(), opened)
        })
    }

    /// Re-seals every group's head and rows, opened under the storage key `old`, under `new`,
    /// in one transaction: a crash or a lost connection leaves the whole state under one key.
    /// Base rows no head names (left by a compaction cut short) are deleted instead. The
    /// transaction locks the four tables (`EXCLUSIVE`: a controller's claim or save waits for
    /// it) and is refused with [`StoreError::LeaseLive`] while any group's lease is live: every
    /// controller shares the key, so all of them must be stopped first (`RFC-notes/ha.md`).
    pub fn reseal(
        config: &PgConfig,
        old: &[u8; 32],
        new: &[u8; 32],
    ) -> Result<Resealed, StoreError> {
        let pg = pg_config(config)?;
        let mut client = connect(&pg)?;
        migrate(&mut client)?;
        let (old, new) = (Sealer::new(old), Sealer::new(new));
        transact(&mut Some(client), &pg, |tx| {
            tx.batch_execute(
                "LOCK TABLE gkm_leases, gkm_heads, gkm_bases, gkm_log IN EXCLUSIVE MODE",
            )
            .map_err(|e| pg_error("cannot lock the tables", &e))?;
            refuse_live_leases(tx)?;
            let heads = tx
                .query(
                    "SELECT group_id, head FROM gkm_heads ORDER BY group_id",
                    &[],
                )
                .map_err(|e| pg_error("cannot read the heads", &e))?;
            let mut done = Resealed::default();
            for row in &heads {
                let group = group_of(row.get(0));
                let head = old.open_head(group, row.get(1))?;
                done.rows += reseal_run(tx, (&old, &new), Table::Bases, group, head.base)?;
                done.rows += reseal_run(tx, (&old, &new), Table::Log, group, head.log)?;
                done.dropped += remove_outside(tx, group, head.base)?;
                write_head(tx, &new, group, head, None)?;
            }
            done.dropped += tx
                .execute(
                    "DELETE FROM gkm_bases WHERE group_id NOT IN (SELECT group_id FROM gkm_heads)",
                    &[],
                )
                .map_err(|e| pg_error("cannot delete stray rows", &e))?;
            done.groups = heads.len();
            Ok(done)
        })
    }

    /// This store's holder identity.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The term this store claimed for `group`, if it claimed it (it may have been deposed
    /// since: only a save or [`PgStore::renew`] finds out).
    pub fn term(&self, group: GroupId) -> Option<u64> {
        self.held().get(&group).map(|h| h.term)
    }

    /// Another store of this holder on a connection of its own, sharing the leases this one
    /// claims (its saves are fenced by them): one thread keeps the leases while another saves,
    /// so a long save does not hold back a renewal. Loads nothing.
    pub fn connect_another(&self) -> Result<PgStore, StoreError> {
        Ok(PgStore {
            pg: self.pg.clone(),
            client: Some(connect(&self.pg)?),
            sealer: self.sealer.clone(),
            holder: self.holder.clone(),
            address: self.address.clone(),
            held: Arc::clone(&self.held),
            compactions: Compactions::default(),
        })
    }

    /// The leases claimed (a poisoned lock is taken over: the map is consistent after every
    /// statement).
    fn held(&self) -> MutexGuard<'_, HashMap<GroupId, Held>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lease of `group` for `lease` if it is free, expired, or held by this holder;
    /// `None` if another holder's lease is live. The term rises unless this store already holds
    /// the live lease under the term it claimed. After a claim that raised the term, load the
    /// group ([`PgStore::load_group`]) before rekeying it: the load sees every epoch the previous
    /// leader committed.
    pub fn claim(&mut self, group: GroupId, lease: Duration) -> Result<Option<Lease>, StoreError> {
        let sent = Instant::now();
        let mine = match self.term(group) {
            Some(term) => sql_u64(term)?,
            None => 0,
        };
        let (id, holder, address) = (sql_group(group), &self.holder, &self.address);
        let secs = lease.as_secs_f64();
        let row = transact(&mut self.client, &self.pg, |tx| {
            tx.query_opt(
                "INSERT INTO gkm_leases AS l (group_id, term, holder, address, expires)
                 VALUES ($1, 1, $2, $3, clock_timestamp() + $4::float8 * interval '1 second')
                 ON CONFLICT (group_id) DO UPDATE SET
                     term = CASE WHEN l.holder = $2 AND l.term = $5
                                      AND l.expires > clock_timestamp()
                                 THEN l.term ELSE l.term + 1 END,
                     holder = EXCLUDED.holder,
                     address = EXCLUDED.address,
                     expires = EXCLUDED.expires
                 WHERE l.holder = $2 OR l.expires <= clock_timestamp()
                 RETURNING term",
                &[&id, holder, address, &secs, &mine],
            )
            .map_err(|e| pg_error("cannot claim the lease", &e))
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let term = u64_of(row.get(0), group, "lease term")?;
        self.held().insert(group, Held { term, lease });
        Ok(Some(Lease {
            group,
            term,
            until: sent + lease,
        }))
    }

    /// Extends this store's live lease of `group` by the length it was claimed for; `None` if
    /// this store does not hold it (never claimed, released, expired, or taken by another).
    pub fn renew(&mut self, group: GroupId) -> Result<Option<Lease>, StoreError> {
        let Some(held) = self.held().get(&group).copied() else {
            return Ok(None);
        };
        let sent = Instant::now();
        let (id, holder, term) = (sql_group(group), &self.holder, sql_u64(held.term)?);
        let secs = held.lease.as_secs_f64();
        let renewed = transact(&mut self.client, &self.pg, |tx| {
            tx.execute(
                "UPDATE gkm_leases
                 SET expires = clock_timestamp() + $4::float8 * interval '1 second'
                 WHERE group_id = $1 AND holder = $2 AND term = $3
                       AND expires > clock_timestamp()",
                &[&id, holder, &term, &secs],
            )
            .map_err(|e| pg_error("cannot renew the lease", &e))
        })?;
        Ok((renewed == 1).then_some(Lease {
            group,
            term: held.term,
            until: sent + held.lease,
        }))
    }

    /// Gives up this store's lease of `group` (it expires now, keeping its term, so the next
    /// claim raises it). Later saves of the group are [`StoreError::Deposed`].
    pub fn release(&mut self, group: GroupId) -> Result<(), StoreError> {
        let Some(held) = self.held().remove(&group) else {
            return Ok(());
        };
        let (id, holder, term) = (sql_group(group), &self.holder, sql_u64(held.term)?);
        transact(&mut self.client, &self.pg, |tx| {
            tx.execute(
                "UPDATE gkm_leases SET expires = clock_timestamp()
                 WHERE group_id = $1 AND holder = $2 AND term = $3",
                &[&id, holder, &term],
            )
            .map_err(|e| pg_error("cannot release the lease", &e))
        })?;
        Ok(())
    }

    /// Says this controller is alive (by the database's clock), forgets controllers not seen for
    /// `forget`, and returns those seen within `alive` (this one included), holder and address,
    /// by holder. Groups are shared among these.
    pub fn announce(
        &mut self,
        alive: Duration,
        forget: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let (holder, address) = (&self.holder, &self.address);
        let (alive, forget) = (alive.as_secs_f64(), forget.as_secs_f64());
        let rows = transact(&mut self.client, &self.pg, |tx| {
            tx.execute(
                "INSERT INTO gkm_controllers (holder, address, seen)
                 VALUES ($1, $2, clock_timestamp())
                 ON CONFLICT (holder) DO UPDATE
                 SET address = EXCLUDED.address, seen = EXCLUDED.seen",
                &[holder, address],
            )
            .map_err(|e| pg_error("cannot announce this controller", &e))?;
            tx.execute(
                "DELETE FROM gkm_controllers
                 WHERE seen < clock_timestamp() - $1::float8 * interval '1 second'",
                &[&forget],
            )
            .map_err(|e| pg_error("cannot forget old controllers", &e))?;
            tx.query(
                "SELECT holder, address FROM gkm_controllers
                 WHERE seen >= clock_timestamp() - $1::float8 * interval '1 second'
                 ORDER BY holder",
                &[&alive],
            )
            .map_err(|e| pg_error("cannot read the controllers", &e))
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every lease in the database, by group.
    pub fn leases(&mut self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = read(&mut self.client, &self.pg, |tx| {
            tx.query(
                "SELECT group_id, term, holder, address,
                        CASE WHEN expires > clock_timestamp()
                             THEN (extract(epoch FROM expires - clock_timestamp()) * 1000000)::bigint
                        END
                 FROM gkm_leases ORDER BY group_id",
                &[],
            )
            .map_err(|e| pg_error("cannot read the leases", &e))
        })?;
        rows.iter()
            .map(|row| {
                let group = group_of(row.get(0));
                Ok(LeaseRow {
                    group,
                    term: u64_of(row.get(1), group, "lease term")?,
                    holder: row.get(2),
                    address: row.get(3),
                    expires_in: row
                        .get::<_, Option<i64>>(4)
                        .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
                })
            })
            .collect()
    }

    /// Where the committed log of `group` stands (`None` if it was never saved): cheap, one row.
    /// A standby reloads the group when it moved. The values are read in the clear; the state
    /// itself only ever comes from authenticated rows ([`PgStore::load_group`]).
    pub fn log_position(&mut self, group: GroupId) -> Result<Option<LogPosition>, StoreError> {
        let id = sql_group(group);
        let row = read(&mut self.client, &self.pg, |tx| {
            tx.query_opt(
                "SELECT epoch, seq FROM gkm_heads WHERE group_id = $1",
                &[&id],
            )
            .map_err(|e| pg_error("cannot read the head", &e))
        })?;
        row.map(|row| {
            Ok(LogPosition {
                epoch: Epoch(u64_of(row.get(0), group, "epoch")?),
                seq: u64_of(row.get(1), group, "head sequence")?,
            })
        })
        .transpose()
    }

    /// The committed state of `group` (`None` if it was never saved), checked as at open.
    pub fn load_group(&mut self, group: GroupId) -> Result<Option<GroupState>, StoreError> {
        let sealer = &self.sealer;
        read(&mut self.client, &self.pg, |tx| {
            let row = tx
                .query_opt(
                    "SELECT epoch, head FROM gkm_heads WHERE group_id = $1",
                    &[&sql_group(group)],
                )
                .map_err(|e| pg_error("cannot read the head", &e))?;
            row.map(|row| load_one(tx, sealer, group, row.get(0), row.get(1)))
                .transpose()
        })
    }

    /// Every group's committed state, checked: what [`PgStore::open`] returns.
    pub fn load_all(&mut self) -> Result<Vec<GroupState>, StoreError> {
        let sealer = &self.sealer;
        read(&mut self.client, &self.pg, |tx| {
            let heads = tx
                .query(
                    "SELECT group_id, epoch, head FROM gkm_heads ORDER BY group_id",
                    &[],
                )
                .map_err(|e| pg_error("cannot read the heads", &e))?;
            let mut states = Vec::with_capacity(heads.len());
            for row in &heads {
                states.push(load_one(
                    tx,
                    sealer,
                    group_of(row.get(0)),
                    row.get(1),
                    row.get(2),
                )?);
            }
            // Rows of a group with no head are left over from nothing this store writes.
            let stray = tx
                .query_opt(
                    "SELECT group_id FROM gkm_log
                     WHERE group_id NOT IN (SELECT group_id FROM gkm_heads) LIMIT 1",
                    &[],
                )
                .map_err(|e| pg_error("cannot read the log", &e))?;
            if let Some(row) = stray {
                return Err(corrupt(group_of(row.get(0)), "has log rows but no head"));
            }
            Ok(states)
        })
    }

    /// Writes a group's whole state in one transaction, in place of what it held.
    fn save_state(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.compactions.finish();
        let group = state.tree.group;
        let (term, sealer) = (self.term(group), &self.sealer);
        let fence = Fence {
            holder: &self.holder,
            group,
            term,
        };
        transact(&mut self.client, &self.pg, |tx| {
            fence.check(tx)?;
            let old = read_head(tx, sealer, group)?;
            let mut base = Span::empty_at(next_seq(tx, Table::Bases, group)?);
            let insert = tx
                .prepare(Table::Bases.insert())
                .map_err(|e| pg_error("cannot prepare", &e))?;
            for row in state_rows(state) {
                insert_row(tx, &insert, sealer, Table::Bases, group, base.next, &row)?;
                base.next += 1;
            }
            let log_next = old.map_or(0, |h| h.log.next);
            remove_below(tx, Table::Bases, group, base.first)?;
            remove_below(tx, Table::Log, group, log_next)?;
            let head = Head {
                base,
                log: Span::empty_at(log_next),
            };
            write_head(tx, sealer, group, head, Some(state.tree.epoch))
        })
    }

    /// Writes the delta's rows after the group's log, in one transaction.
    fn append(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        let (group, epoch) = (delta.group, delta.epoch);
        let (term, sealer) = (self.term(group), &self.sealer);
        let fence = Fence {
            holder: &self.holder,
            group,
            term,
        };
        transact(&mut self.client, &self.pg, |tx| {
            fence.check(tx)?;
            let mut head = read_head(tx, sealer, group)?
                .ok_or_else(|| StoreError::Backend(format!("group {group} was never saved")))?;
            let insert = tx
                .prepare(Table::Log.insert())
                .map_err(|e| pg_error("cannot prepare", &e))?;
            for row in delta_rows(delta) {
                insert_row(tx, &insert, sealer, Table::Log, group, head.log.next, &row)?;
                head.log.next += 1;
            }
            write_head(tx, sealer, group, head, Some(epoch))
        })
    }

    /// The compaction of `group`, from its head now.
    fn compaction(&mut self, group: GroupId) -> Result<Compaction, StoreError> {
        let sealer = &self.sealer;
        let start = read(&mut self.client, &self.pg, |tx| {
            read_head(tx, sealer, group)
        })?
        .ok_or_else(|| StoreError::Backend(format!("group {group} was never saved")))?;
        Ok(Compaction {
            pg: self.pg.clone(),
            sealer: self.sealer.clone(),
            holder: self.holder.clone(),
            group,
            term: self.term(group),
            start,
        })
    }
}

impl Drop for PgStore {
    /// Lets a running compaction finish (a process killed instead loses nothing but its work).
    fn drop(&mut self) {
        self.compactions.finish();
    }
}

impl Store for PgStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.save_state(state)
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.append(delta)
    }

    /// Saves `delta`, then writes `state` on a thread of the store with its own connection (see
    /// the module docs), once any earlier compaction finished. A state that fits one of the
    /// thread's transactions is saved in full at once instead of the delta.
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
        let job = self.compaction(group).map(|job| move || job.run(&state));
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

/// One compaction: the state written as new base rows, then the head switched to them, over a
/// connection of its own.
struct Compaction {
    pg: postgres::Config,
    sealer: Sealer,
    holder: String,
    group: GroupId,
    term: Option<u64>,
    /// The head when it started: the deltas after the state being written begin at its log's
    /// `next`.
    start: Head,
}

impl Compaction {
    fn run(self, state: &GroupState) -> Result<(), StoreError> {
        let mut client = None;
        let base = self.stage(&mut client, state)?;
        self.switch(&mut client, base)
    }

    fn fence(&self) -> Fence<'_> {
        Fence {
            holder: &self.holder,
            group: self.group,
            term: self.term,
        }
    }

    /// Writes the state's rows as base rows after every base row of the group,
    /// [`COMPACTION_ROWS`] per transaction; returns their run. The head does not name them yet.
    fn stage(&self, client: &mut Option<Client>, state: &GroupState) -> Result<Span, StoreError> {
        let (group, fence) = (self.group, self.fence());
        let mut rows = state_rows(state).peekable();
        let mut run: Option<Span> = None;
        while rows.peek().is_some() {
            let batch: Vec<Zeroizing<Vec<u8>>> = rows.by_ref().take(COMPACTION_ROWS).collect();
            let first = run.map(|r| r.next);
            let span = transact(client, &self.pg, |tx| {
                fence.check(tx)?;
                let mut span = match first {
                    Some(next) => Span::empty_at(next),
                    None => Span::empty_at(next_seq(tx, Table::Bases, group)?),
                };
                let insert = tx
                    .prepare(Table::Bases.insert())
                    .map_err(|e| pg_error("cannot prepare", &e))?;
                for row in &batch {
                    insert_row(
                        tx,
                        &insert,
                        &self.sealer,
                        Table::Bases,
                        group,
                        span.next,
                        row,
                    )?;
                    span.next += 1;
                }
                Ok(span)
            })?;
            run = Some(match run {
                Some(r) => Span {
                    first: r.first,
                    next: span.next,
                },
                None => span,
            });
        }
        run.ok_or_else(|| StoreError::Backend("a state has at least its base record".into()))
    }

    /// Points the head at `base` and the deltas saved since the compaction started, and deletes
    /// the rows the new base replaces, in one transaction.
    fn switch(&self, client: &mut Option<Client>, base: Span) -> Result<(), StoreError> {
        let (group, fence, start) = (self.group, self.fence(), self.start);
        transact(client, &self.pg, |tx| {
            fence.check(tx)?;
            let now = read_head(tx, &self.sealer, group)?;
            let unchanged = now.is_some_and(|h| {
                h.base == start.base
                    && h.log.first == start.log.first
                    && h.log.next >= start.log.next
            });
            let Some(now) = now.filter(|_| unchanged) else {
                return Err(StoreError::Backend(format!(
                    "group {group} was saved in full during its compaction"
                )));
            };
            remove_below(tx, Table::Bases, group, base.first)?;
            remove_below(tx, Table::Log, group, start.log.next)?;
            let head = Head {
                base,
                log: Span {
                    first: start.log.next,
                    next: now.log.next,
                },
            };
            write_head(tx, &self.sealer, group, head, None)
        })
    }
}

/// The lease check at the start of every write transaction.
#[derive(Clone, Copy)]
struct Fence<'a> {
    holder: &'a str,
    group: GroupId,
    /// The term this store claimed; `None` if it never claimed the group.
    term: Option<u64>,
}

impl Fence<'_> {
    /// Locks the group's lease row until the transaction ends and checks that it is this
    /// store's live lease of the term it claimed; [`StoreError::Deposed`] otherwise.
    fn check(self, tx: &mut Transaction<'_>) -> Result<(), StoreError> {
        let deposed = StoreError::Deposed {
            group: self.group,
            term: self.term.unwrap_or(0),
        };
        let Some(term) = self.term else {
            return Err(deposed);
        };
        let row = tx
            .query_opt(
                "SELECT term, holder = $2 AND expires > clock_timestamp()
                 FROM gkm_leases WHERE group_id = $1 FOR UPDATE",
                &[&sql_group(self.group), &self.holder],
            )
            .map_err(|e| pg_error("cannot check the lease", &e))?;
        match row {
            Some(row) if row.get::<_, i64>(0) == sql_u64(term)? && row.get::<_, bool>(1) => Ok(()),
            _ => Err(deposed),
        }
    }
}

/// The two tables of rows.
#[derive(Clone, Copy)]
enum Table {
    Bases,
    Log,
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Bases => "gkm_bases",
            Table::Log => "gkm_log",
        }
    }

    fn label(self) -> &'static [u8] {
        match self {
            Table::Bases => BASE_LABEL,
            Table::Log => LOG_LABEL,
        }
    }

    fn insert(self) -> &'static str {
        match self {
            Table::Bases => "INSERT INTO gkm_bases (group_id, seq, sealed) VALUES ($1, $2, $3)",
            Table::Log => "INSERT INTO gkm_log (group_id, seq, sealed) VALUES ($1, $2, $3)",
        }
    }
}

/// Parses the connection string and adds the password and the timeouts.
fn pg_config(config: &PgConfig) -> Result<postgres::Config, StoreError> {
    let mut pg: postgres::Config = config.url.parse().map_err(|e: postgres::Error| {
        StoreError::Backend(format!(
            "the PostgreSQL connection string does not parse: {}",
            describe(&e)
        ))
    })?;
    if let Some(path) = &config.password_file {
        let password = Zeroizing::new(std::fs::read(path).map_err(|e| {
            StoreError::Backend(format!(
                "cannot read the PostgreSQL password file {}: {e}",
                path.display()
            ))
        })?);
        let end = password
            .iter()
            .rposition(|&b| b != b'\n' && b != b'\r')
            .map_or(0, |i| i + 1);
        pg.password(password.get(..end).unwrap_or_default());
    } else if let Some(password) = std::env::var_os("PGPASSWORD") {
        pg.password(password.as_encoded_bytes());
    }
    if pg.get_application_name().is_none() {
        pg.application_name("gkm-server");
    }
    pg.connect_timeout(CONNECT_TIMEOUT)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(5));
    Ok(pg)
}

/// A new connection with the session settings.
fn connect(pg: &postgres::Config) -> Result<Client, StoreError> {
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let mut client = pg.connect(NoTls).map_err(|e| {
        StoreError::Backend(format!(
            "cannot connect to PostgreSQL at {} (check that it runs and the url, user and \
             password): {}",
            hosts.join(","),
            describe(&e)
        ))
    })?;
    client
        .batch_execute(SESSION)
        .map_err(|e| pg_error("cannot set up the session", &e))?;
    Ok(client)
}

/// Applies the missing migrations in one transaction under an advisory lock; refuses a schema
/// newer than this binary's.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client
        .transaction()
        .map_err(|e| pg_error("cannot begin", &e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(|e| pg_error("cannot lock the schema", &e))?;
    let exists: bool = tx
        .query_one("SELECT to_regclass('gkm_schema') IS NOT NULL", &[])
        .map_err(|e| pg_error("cannot read the schema version", &e))?
        .get(0);
    let version: i32 = if exists {
        tx.query_one("SELECT coalesce(max(version), 0) FROM gkm_schema", &[])
            .map_err(|e| pg_error("cannot read the schema version", &e))?
            .get(0)
    } else {
        0
    };
    if version > SCHEMA_VERSION {
        return Err(StoreError::Backend(format!(
            "the database's gkm schema is version {version}, newer than this gkm-server's \
             version {SCHEMA_VERSION}: run a gkm-server at least as new as the one that \
             upgraded it"
        )));
    }
    for (number, migration) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.batch_execute(migration)
            .map_err(|e| pg_error(&format!("schema migration {number} failed"), &e))?;
        tx.execute("INSERT INTO gkm_schema (version) VALUES ($1)", &[&number])
            .map_err(|e| pg_error("cannot record the schema version", &e))?;
    }
    tx.commit()
        .map_err(|e| pg_error("cannot commit the schema", &e))
}

/// Why a transaction failed: when it began (nothing was sent but `BEGIN`), or later.
enum Failed {
    Begin(postgres::Error),
    Later(StoreError),
}

/// Runs `body` in a write transaction and commits it, connecting first if `slot` holds no live
/// connection. A connection found dead when the transaction begins is replaced once; any other
/// failure rolls back, and a lost connection is dropped so that the next call connects again.
fn transact<T>(
    slot: &mut Option<Client>,
    pg: &postgres::Config,
    body: impl FnMut(&mut Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    within(slot, pg, false, body)
}

/// Runs `body` in a `REPEATABLE READ` read-only transaction (one snapshot), as [`transact`].
fn read<T>(
    slot: &mut Option<Client>,
    pg: &postgres::Config,
    body: impl FnMut(&mut Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    within(slot, pg, true, body)
}

/// [`transact`] (`read_only` false) or [`read`].
fn within<T>(
    slot: &mut Option<Client>,
    pg: &postgres::Config,
    read_only: bool,
    mut body: impl FnMut(&mut Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    run(slot, pg, |client| {
        let begun = if read_only {
            client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
        } else {
            client.transaction()
        };
        let mut tx = begun.map_err(Failed::Begin)?;
        let value = body(&mut tx).map_err(Failed::Later)?;
        tx.commit()
            .map_err(|e| Failed::Later(pg_error("cannot commit", &e)))?;
        Ok(value)
    })
}

fn run<T>(
    slot: &mut Option<Client>,
    pg: &postgres::Config,
    mut attempt: impl FnMut(&mut Client) -> Result<T, Failed>,
) -> Result<T, StoreError> {
    let mut retried = false;
    loop {
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(connect(pg)?);
        }
        let Some(client) = slot.as_mut() else {
            return Err(StoreError::Backend("no connection".into()));
        };
        let outcome = attempt(client);
        let closed = client.is_closed();
        if closed {
            *slot = None;
        }
        match outcome {
            Ok(value) => return Ok(value),
            Err(Failed::Begin(_)) if closed && !retried => retried = true,
            Err(Failed::Begin(e)) => return Err(pg_error("cannot begin a transaction", &e)),
            Err(Failed::Later(error)) => return Err(error),
        }
    }
}

/// Loads one group whose head row holds `epoch` and `sealed`.
fn load_one(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    group: GroupId,
    epoch: i64,
    sealed: &[u8],
) -> Result<GroupState, StoreError> {
    let (records, _) = load_records(tx, sealer, group, epoch, sealed)?;
    Ok(records.into_state())
}

/// The records of one group whose head row holds `epoch` and `sealed`, and its head.
fn load_records(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    group: GroupId,
    epoch: i64,
    sealed: &[u8],
) -> Result<(GroupRecords, Head), StoreError> {
    let head = sealer.open_head(group, sealed)?;
    let mut records = None;
    if !head.base.is_empty() {
        replay_run(tx, sealer, Table::Bases, group, head.base, &mut records)?;
    }
    replay_run(tx, sealer, Table::Log, group, head.log, &mut records)?;
    check_log_within(tx, group, head.log)?;
    let records = records.ok_or_else(|| corrupt(group, "has no base row"))?;
    if records.group != group {
        return Err(corrupt(group, "holds another group's state"));
    }
    check_epoch(group, epoch, &records)?;
    Ok((records, head))
}

/// The epoch beside a group's head is the epoch of its rows.
fn check_epoch(group: GroupId, epoch: i64, records: &GroupRecords) -> Result<(), StoreError> {
    if u64::try_from(epoch).ok() == Some(records.epoch.0) {
        return Ok(());
    }
    Err(corrupt(
        group,
        &format!(
            "its head says epoch {epoch}, its rows epoch {}",
            records.epoch
        ),
    ))
}

/// Replays the rows `run` of `table` onto `records`, streaming them.
fn replay_run(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    table: Table,
    group: GroupId,
    run: Span,
    records: &mut Option<GroupRecords>,
) -> Result<(), StoreError> {
    let query = match table {
        Table::Bases => {
            "SELECT seq, sealed FROM gkm_bases
             WHERE group_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq"
        }
        Table::Log => {
            "SELECT seq, sealed FROM gkm_log
             WHERE group_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq"
        }
    };
    let (id, first, next) = (sql_group(group), sql_u64(run.first)?, sql_u64(run.next)?);
    let params: [&(dyn ToSql + Sync); 3] = [&id, &first, &next];
    let mut rows = tx
        .query_raw(query, params)
        .map_err(|e| pg_error("cannot read rows", &e))?;
    let mut expected = run.first;
    while let Some(row) = rows.next().map_err(|e| pg_error("cannot read rows", &e))? {
        let seq = u64_of(row.get(0), group, "row sequence")?;
        if seq != expected {
            return Err(corrupt(group, &format!("row {seq} is out of sequence")));
        }
        let sealed: &[u8] = row.get(1);
        let plain = sealer.open_row(table.label(), group, seq, sealed)?;
        replay(records, records.is_none(), &plain)
            .map_err(|e| corrupt(group, &format!("row {seq} does not decode: {e}")))?;
        expected += 1;
    }
    if expected != run.next {
        return Err(corrupt(group, &format!("rows {expected}.. are missing")));
    }
    Ok(())
}

/// [`StoreError::LeaseLive`] for the first group whose lease is live.
fn refuse_live_leases(tx: &mut Transaction<'_>) -> Result<(), StoreError> {
    let live = tx
        .query_opt(
            "SELECT group_id, holder FROM gkm_leases
             WHERE expires > clock_timestamp() ORDER BY group_id LIMIT 1",
            &[],
        )
        .map_err(|e| pg_error("cannot read the leases", &e))?;
    match live {
        Some(row) => Err(StoreError::LeaseLive {
            group: group_of(row.get(0)),
            holder: row.get(1),
        }),
        None => Ok(()),
    }
}

/// Re-seals the rows `run` of the group in `table` from the first sealer's key to the
/// second's; returns how many.
fn reseal_run(
    tx: &mut Transaction<'_>,
    (old, new): (&Sealer, &Sealer),
    table: Table,
    group: GroupId,
    run: Span,
) -> Result<u64, StoreError> {
    let name = table.name();
    let select = format!("SELECT sealed FROM {name} WHERE group_id = $1 AND seq = $2");
    let update = format!("UPDATE {name} SET sealed = $3 WHERE group_id = $1 AND seq = $2");
    for seq in run.first..run.next {
        let (id, sql_seq) = (sql_group(group), sql_u64(seq)?);
        let row = tx
            .query_opt(&select, &[&id, &sql_seq])
            .map_err(|e| pg_error("cannot read rows", &e))?
            .ok_or_else(|| corrupt(group, &format!("row {seq} is missing")))?;
        let sealed = old.reseal_row(new, table.label(), group, seq, row.get(0))?;
        tx.execute(&update, &[&id, &sql_seq, &sealed])
            .map_err(|e| pg_error("cannot write a row", &e))?;
    }
    Ok(run.len())
}

/// Deletes the group's base rows outside `run`; returns how many.
fn remove_outside(tx: &mut Transaction<'_>, group: GroupId, run: Span) -> Result<u64, StoreError> {
    let (id, first, next) = (sql_group(group), sql_u64(run.first)?, sql_u64(run.next)?);
    tx.execute(
        "DELETE FROM gkm_bases WHERE group_id = $1 AND (seq < $2 OR seq >= $3)",
        &[&id, &first, &next],
    )
    .map_err(|e| pg_error("cannot delete stray rows", &e))
}

/// The log holds no row of the group outside its run.
fn check_log_within(tx: &mut Transaction<'_>, group: GroupId, run: Span) -> Result<(), StoreError> {
    let (id, first, next) = (sql_group(group), sql_u64(run.first)?, sql_u64(run.next)?);
    let row = tx
        .query_opt(
            "SELECT seq FROM gkm_log WHERE group_id = $1 AND (seq < $2 OR seq >= $3) LIMIT 1",
            &[&id, &first, &next],
        )
        .map_err(|e| pg_error("cannot read the log", &e))?;
    match row {
        Some(row) => {
            let seq: i64 = row.get(0);
            Err(corrupt(group, &format!("row {seq} is out of sequence")))
        }
        None => Ok(()),
    }
}

fn read_head(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    group: GroupId,
) -> Result<Option<Head>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT head FROM gkm_heads WHERE group_id = $1",
            &[&sql_group(group)],
        )
        .map_err(|e| pg_error("cannot read the head", &e))?;
    row.map(|row| sealer.open_head(group, row.get(0)))
        .transpose()
}

/// Seals and stores the group's head, with the epoch of its state (`None`: unchanged); the
/// head's commit number rises.
fn write_head(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    group: GroupId,
    head: Head,
    epoch: Option<Epoch>,
) -> Result<(), StoreError> {
    let sealed = sealer.seal_head(group, head)?;
    let epoch = epoch.map(|e| sql_u64(e.0)).transpose()?;
    tx.execute(
        "INSERT INTO gkm_heads AS h (group_id, epoch, seq, head)
         VALUES ($1, coalesce($2::bigint, 0), 1, $3)
         ON CONFLICT (group_id) DO UPDATE SET
             epoch = coalesce($2::bigint, h.epoch), seq = h.seq + 1, head = EXCLUDED.head",
        &[&sql_group(group), &epoch, &sealed],
    )
    .map_err(|e| pg_error("cannot write the head", &e))?;
    Ok(())
}

fn insert_row(
    tx: &mut Transaction<'_>,
    insert: &postgres::Statement,
    sealer: &Sealer,
    table: Table,
    group: GroupId,
    seq: u64,
    plain: &[u8],
) -> Result<(), StoreError> {
    let sealed = sealer.seal_row(table.label(), group, seq, plain)?;
    tx.execute(insert, &[&sql_group(group), &sql_u64(seq)?, &sealed])
        .map_err(|e| pg_error("cannot write a row", &e))?;
    Ok(())
}

/// The sequence number after the group's last row in `table` (0 if it has none).
fn next_seq(tx: &mut Transaction<'_>, table: Table, group: GroupId) -> Result<u64, StoreError> {
    let query = match table {
        Table::Bases => "SELECT max(seq) FROM gkm_bases WHERE group_id = $1",
        Table::Log => "SELECT max(seq) FROM gkm_log WHERE group_id = $1",
    };
    let last: Option<i64> = tx
        .query_one(query, &[&sql_group(group)])
        .map_err(|e| pg_error("cannot read rows", &e))?
        .get(0);
    match last {
        None => Ok(0),
        Some(last) => u64_of(last, group, "row sequence")?
            .checked_add(1)
            .filter(|&next| i64::try_from(next).is_ok())
            .ok_or_else(|| corrupt(group, "has a row numbered 2^63 - 1")),
    }
}

/// Deletes the group's rows numbered below `seq`.
fn remove_below(
    tx: &mut Transaction<'_>,
    table: Table,
    group: GroupId,
    seq: u64,
) -> Result<(), StoreError> {
    let query = match table {
        Table::Bases => "DELETE FROM gkm_bases WHERE group_id = $1 AND seq < $2",
        Table::Log => "DELETE FROM gkm_log WHERE group_id = $1 AND seq < $2",
    };
    tx.execute(query, &[&sql_group(group), &sql_u64(seq)?])
        .map_err(|e| pg_error("cannot delete rows", &e))?;
    Ok(())
}

/// A group id as the `bigint` with the same bits.
fn sql_group(group: GroupId) -> i64 {
    i64::from_be_bytes(group.0.to_be_bytes())
}

fn group_of(id: i64) -> GroupId {
    GroupId(u64::from_be_bytes(id.to_be_bytes()))
}

/// A sequence number, term or epoch as a `bigint` (all stay far below 2^63).
fn sql_u64(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Backend(format!("{n} does not fit a bigint")))
}

/// A stored `bigint` that must not be negative.
fn u64_of(n: i64, group: GroupId, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| corrupt(group, &format!("{what} {n} is negative")))
}

/// A PostgreSQL error as a backend failure, with its causes (the database's message included).
fn pg_error(context: &str, e: &postgres::Error) -> StoreError {
    StoreError::Backend(format!("{context}: {}", describe(e)))
}

fn describe(e: &postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_moves_to_a_store_thread() {
        fn send<T: Send>() {}
        send::<PgStore>();
    }

    #[test]
    fn the_password_comes_from_its_file_and_never_shows_in_debug_or_errors() {
        let dir = std::env::temp_dir().join(format!("gkm-pg-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        let config = PgConfig {
            url: "host=/run/postgresql user=gkm".into(),
            password_file: Some(file.clone()),
        };
        let pg = pg_config(&config).unwrap();
        assert_eq!(pg.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(pg.get_connect_timeout(), Some(&CONNECT_TIMEOUT));

        let missing = PgConfig {
            password_file: Some(dir.join("missing")),
            ..config
        };
        let error = pg_config(&missing).unwrap_err().to_string();
        assert!(error.contains("missing"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();

        for url in [
            "postgresql://gkm:hunter2@db.example:5432/gkm?sslmode=disable",
            "host=db.example user=gkm password=hunter2 dbname=gkm",
        ] {
            let config = PgConfig {
                url: url.into(),
                password_file: None,
            };
            let shown = format!("{config:?}");
            assert!(
                !shown.contains("hunter2") && shown.contains("***"),
                "{shown}"
            );
        }
        let bad = PgConfig {
            url: "postgresql://gkm:hunter2@db.example:notaport/gkm".into(),
            password_file: None,
        };
        let error = pg_config(&bad).unwrap_err().to_string();
        assert!(
            error.contains("does not parse") && !error.contains("hunter2"),
            "{error}"
        );
    }
}
