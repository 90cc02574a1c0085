//! [`Follower`]: a standby's warm copy of groups' committed states, kept up with the log.
//!
//! A standby that holds a group's state when it takes the group over does not load it then (at
//! 2^20 members, 167 MB of sealed rows): [`Follower::follow`] reads only what was committed since
//! its last call — the log rows appended, checked and replayed as a load replays them — and
//! [`Follower::take`], called once the lease is claimed, catches up the last rows and hands the
//! state over. A group whose base rows changed (a compaction or a full save rewrote it) is loaded
//! whole again: the log after a compaction continues the old one, but a full save's does not, and
//! the two cannot be told apart from the head alone.
//!
//! Every read is one `REPEATABLE READ` snapshot, on a connection of the follower's own, and
//! checks what a load checks (rows authenticate under the storage key, in their table, group and
//! place; the epoch beside the head is the rows' epoch). A failed call drops the copy; the next
//! loads it whole.

use std::collections::BTreeMap;

use lkh_tree::{Epoch, GroupId};
use postgres::{Client, Transaction};

use super::{
    PgStore, Table, check_epoch, connect, load_records, pg_error, read, replay_run, sql_group,
    u64_of,
};
use crate::rows::{Head, Sealer, Span};
use crate::store::{GroupRecords, GroupState, StoreError};

/// Copies of groups' committed states, each kept up with its log (see the module docs).
pub struct Follower {
    pg: postgres::Config,
    /// The connection; `None` until the next call after it was lost.
    client: Option<Client>,
    sealer: Sealer,
    copies: BTreeMap<GroupId, Replica>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("connected", &self.client.is_some())
            .field("groups", &self.copies.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One group's copy: its records and the head they were read under.
struct Replica {
    records: GroupRecords,
    /// The head: its base, and the log replayed up to `head.log.next`.
    head: Head,
    /// The head row's commit number then.
    seq: u64,
}

/// Where a followed group's copy stands after a [`Follower::follow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Following {
    /// The group.
    pub group: GroupId,
    /// The epoch of the copy: the committed epoch when the call read the head.
    pub epoch: Epoch,
    /// Members in the copy.
    pub members: usize,
    /// Rows read by the call: 0 when nothing was committed since the last.
    pub rows: u64,
    /// Whether the call loaded the group whole (its first call, or its base rows changed).
    pub reloaded: bool,
}

impl PgStore {
    /// A follower on a connection of its own, with this store's storage key.
    pub fn follower(&self) -> Result<Follower, StoreError> {
        Ok(Follower {
            pg: self.pg.clone(),
            client: Some(connect(&self.pg)?),
            sealer: self.sealer.clone(),
            copies: BTreeMap::new(),
        })
    }
}

impl Follower {
    /// Brings the copy of `group` up to its committed log (see the module docs); `None` if the
    /// group was never saved. Errors as [`PgStore::load_group`]'s; the copy is then dropped.
    pub fn follow(&mut self, group: GroupId) -> Result<Option<Following>, StoreError> {
        let mut copy = self.copies.remove(&group);
        let sealer = &self.sealer;
        let outcome = read(&mut self.client, &self.pg, |tx| {
            catch_up(tx, sealer, group, &mut copy)
        });
        let (rows, reloaded) = match outcome {
            Ok(Some(read)) => read,
            Ok(None) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(copy) = copy else {
            return Ok(None);
        };
        let following = Following {
            group,
            epoch: copy.records.epoch,
            members: copy.records.members.len(),
            rows,
            reloaded,
        };
        self.copies.insert(group, copy);
        Ok(Some(following))
    }

    /// The committed state of `group`, caught up now, and no longer followed. Call it after
    /// claiming the group's lease ([`PgStore::claim`]): the state then holds every epoch the
    /// previous leader committed, as a load after the claim would.
    pub fn take(&mut self, group: GroupId) -> Result<Option<GroupState>, StoreError> {
        self.follow(group)?;
        Ok(self
            .copies
            .remove(&group)
            .map(|copy| copy.records.into_state()))
    }

    /// The copy of `group` as it stands, if one is held (a copy of every key in it).
    pub fn state(&self, group: GroupId) -> Option<GroupState> {
        self.copies.get(&group).map(|c| c.records.to_state())
    }
}

/// Brings `copy` up to the group's head in one snapshot: replays the log rows appended since it
/// was read, or loads the group whole when its base changed. Returns the rows read and whether
/// it loaded the group whole; `None` (and no copy) if the group has no head. On an error `copy`
/// is left `None`.
fn catch_up(
    tx: &mut Transaction<'_>,
    sealer: &Sealer,
    group: GroupId,
    copy: &mut Option<Replica>,
) -> Result<Option<(u64, bool)>, StoreError> {
    let row = tx
        .query_opt(
            "SELECT epoch, seq, head FROM gkm_heads WHERE group_id = $1",
            &[&sql_group(group)],
        )
        .map_err(|e| pg_error("cannot read the head", &e))?;
    let Some(row) = row else {
        *copy = None;
        return Ok(None);
    };
    let (epoch, seq): (i64, u64) = (row.get(0), u64_of(row.get(1), group, "head sequence")?);
    if copy.as_ref().is_some_and(|c| c.seq == seq) {
        return Ok(Some((0, false)));
    }
    let sealed: &[u8] = row.get(2);
    let head = sealer.open_head(group, sealed)?;
    let appended = copy.as_ref().is_some_and(|c| {
        c.head.base == head.base
            && c.head.log.first == head.log.first
            && c.head.log.next <= head.log.next
    });
    let Some(old) = copy.take().filter(|_| appended) else {
        let (records, head) = load_records(tx, sealer, group, epoch, sealed)?;
        let rows = head.base.len() + head.log.len();
        *copy = Some(Replica { records, head, seq });
        return Ok(Some((rows, true)));
    };
    let new = Span {
        first: old.head.log.next,
        next: head.log.next,
    };
    let mut records = Some(old.records);
    replay_run(tx, sealer, Table::Log, group, new, &mut records)?;
    let records = records.ok_or_else(|| StoreError::Backend("the copy was lost".into()))?;
    check_epoch(group, epoch, &records)?;
    *copy = Some(Replica { records, head, seq });
    Ok(Some((new.len(), false)))
}
