//! High availability on PostgreSQL (`[storage] backend = "postgres"`): the store thread of a
//! controller that shares its groups with others through one database.
//!
//! Per group one controller leads: it holds the group's lease ([`PgStore::claim`]), renews it
//! three times a lease, and every save it makes checks the lease's term in the same transaction
//! (a deposed leader cannot commit, so it sends nothing of a new epoch). The others stand by:
//! they answer the group's members `NotLeader` with the leader's address, and claim the lease
//! when it runs out (the leader died, stopped or lost the database), load the group's committed
//! state and rekey above it. Each controller takes no more than its share of the groups: the
//! groups divided by the controllers alive (`gkm_controllers`, [`PgStore::announce`]); one that
//! holds more (it started first) hands the excess over, one lease at a time. See
//! `RFC-notes/ha.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use gkm_server::{Persist, PgStore, Store, StoreError};
use lkh_tree::GroupId;
use tracing::{info, warn};

use crate::queue::{ControllerQueue, ToController};

/// A controller missing from `gkm_controllers` for this many leases is no longer counted alive
/// (it announces itself three times a lease).
const ALIVE_LEASES: u32 = 2;
/// A controller over its share for this many leases hands a group over (not at once: a
/// controller that just died or started changes the share for a while).
const OVER_LEASES: u32 = 3;
/// A controller missing for this many leases is forgotten.
const FORGET_LEASES: u32 = 100;

/// What the store thread of a highly available controller keeps.
pub(crate) struct Cluster {
    store: PgStore,
    lease: Duration,
    /// The configured groups.
    groups: Vec<GroupId>,
    /// The groups this controller leads, with their terms and local deadlines.
    held: BTreeMap<GroupId, (u64, Instant)>,
    /// The leader told to the controller thread for each group it stands by for.
    told: BTreeMap<GroupId, Option<SocketAddr>>,
    /// Since when each group without a leader has been seen so.
    free_since: BTreeMap<GroupId, Instant>,
    /// Since when this controller has held more than its share.
    over_since: Option<Instant>,
    queue: ControllerQueue,
}

/// A name for this process in the leases: host, process id and a random part (a restarted
/// controller is a new holder, so it cannot mistake its predecessor's lease for its own).
pub(crate) fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    let mut random = [0u8; 4];
    let _ = getrandom::fill(&mut random);
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        u32::from_be_bytes(random)
    )
}

impl Cluster {
    pub(crate) fn new(
        store: PgStore,
        lease: Duration,
        groups: Vec<GroupId>,
        queue: ControllerQueue,
    ) -> Cluster {
        Cluster {
            store,
            lease,
            groups,
            held: BTreeMap::new(),
            told: BTreeMap::new(),
            free_since: BTreeMap::new(),
            over_since: None,
            queue,
        }
    }

    /// The store thread: makes the saves asked for, in order, and between them keeps the
    /// leases (three times a lease), until the sender is dropped; then gives up every lease, so
    /// that a standby takes over at once.
    pub(crate) fn run(mut self, jobs: &Receiver<Persist>) {
        let tick = self.lease / 3;
        let mut next = Instant::now();
        loop {
            match jobs.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(persist) => self.save(persist),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.release_all(),
            }
            if Instant::now() >= next {
                self.tick();
                next = Instant::now() + tick;
            }
        }
    }

    fn save(&mut self, persist: Persist) {
        let group = persist.group;
        let done = crate::driver::write_caught(persist, &mut self.store);
        if let Err(StoreError::Deposed { term, .. }) = &done.result {
            // The controller releases the group itself on this outcome.
            warn!(%group, term, "deposed: another controller leads the group now");
            self.held.remove(&group);
            self.told.insert(group, None);
        }
        self.queue.send(ToController::Persisted(done));
    }

    /// Renews, hands over and claims leases.
    fn tick(&mut self) {
        let alive = self.lease * ALIVE_LEASES;
        let live = match self.store.announce(alive, self.lease * FORGET_LEASES) {
            Ok(live) => live.len().max(1),
            Err(e) => {
                warn!("cannot reach the database: {e}");
                self.renew();
                return;
            }
        };
        let share = self.groups.len().div_ceil(live);
        self.renew();
        self.hand_over(share);
        self.claim(share);
    }

    /// Renews every lease held; one that could not be renewed in time is given up.
    fn renew(&mut self) {
        let held: Vec<(GroupId, (u64, Instant))> =
            self.held.iter().map(|(g, h)| (*g, *h)).collect();
        for (group, (term, until)) in held {
            match self.store.renew(group) {
                Ok(Some(lease)) => {
                    self.held.insert(group, (term, lease.until));
                }
                Ok(None) | Err(StoreError::Deposed { .. }) => self.lost(group, term, "taken"),
                Err(e) if Instant::now() >= until => {
                    warn!(%group, "cannot renew the lease: {e}");
                    self.lost(group, term, "not renewed in time");
                }
                Err(e) => warn!(%group, "cannot renew the lease yet: {e}"),
            }
        }
    }

    /// Gives up a lease held beyond `share` once this controller has been over its share for
    /// [`OVER_LEASES`], one per tick, so that another controller takes it.
    fn hand_over(&mut self, share: usize) {
        if self.held.len() <= share {
            self.over_since = None;
            return;
        }
        let since = *self.over_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.lease * OVER_LEASES {
            return;
        }
        let Some((&group, &(term, _))) = self.held.iter().next_back() else {
            return;
        };
        info!(%group, share, "more than this controller's share: handing the group over");
        if let Err(e) = self.store.release(group) {
            warn!(%group, "cannot release the lease: {e}");
        }
        self.lost(group, term, "handed over");
    }

    /// Claims free groups while under `share`; tells the controller thread where the others'
    /// leaders are.
    fn claim(&mut self, share: usize) {
        let leases = match self.store.leases() {
            Ok(leases) => leases,
            Err(e) => return warn!("cannot read the leases: {e}"),
        };
        let live: BTreeMap<GroupId, Option<SocketAddr>> = leases
            .iter()
            .filter(|l| l.expires_in.is_some() && l.holder != self.store.holder())
            .map(|l| (l.group, l.address.parse().ok()))
            .collect();
        let free: BTreeSet<GroupId> = self
            .groups
            .iter()
            .copied()
            .filter(|g| !self.held.contains_key(g) && !live.contains_key(g))
            .collect();
        self.free_since.retain(|g, _| free.contains(g));
        for group in free {
            let since = *self.free_since.entry(group).or_insert_with(Instant::now);
            // Seen without a leader at two ticks: claimed by a controller at its share too. A
            // group is never left unserved for the sake of balance (a controller that died is
            // still counted alive for ALIVE_LEASES); an excess is handed over later.
            let orphaned = since.elapsed() >= self.lease / 3;
            if self.held.len() < share || orphaned {
                self.lead(group);
            }
        }
        for (group, leader) in live {
            if self.groups.contains(&group) && self.told.get(&group) != Some(&leader) {
                self.told.insert(group, leader);
                self.queue.send(ToController::Standby {
                    group,
                    leader,
                    lost: None,
                });
            }
        }
    }

    /// Claims `group` and, once claimed, loads its committed state (after the claim: every epoch
    /// the previous leader committed is in it) and hands it to the controller thread.
    fn lead(&mut self, group: GroupId) {
        let lease = match self.store.claim(group, self.lease) {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => return warn!(%group, "cannot claim the lease: {e}"),
        };
        let state = match self.store.load_group(group) {
            Ok(state) => state,
            Err(e) => {
                warn!(%group, "cannot load the group after claiming it: {e}; giving it up");
                let _ = self.store.release(group);
                return;
            }
        };
        info!(%group, term = lease.term, "leading the group");
        self.held.insert(group, (lease.term, lease.until));
        self.told.remove(&group);
        self.free_since.remove(&group);
        self.queue.send(ToController::Lead {
            group,
            state: state.map(Box::new),
            term: lease.term,
        });
    }

    /// This controller no longer leads `group`.
    fn lost(&mut self, group: GroupId, term: u64, why: &str) {
        warn!(%group, term, "no longer leading the group: lease {why}");
        self.held.remove(&group);
        self.told.insert(group, None);
        self.queue.send(ToController::Standby {
            group,
            leader: None,
            lost: Some(term),
        });
    }

    fn release_all(&mut self) {
        let groups: Vec<GroupId> = self.held.keys().copied().collect();
        for group in groups {
            if let Err(e) = self.store.release(group) {
                warn!(%group, "cannot release the lease on the way out: {e}");
            }
        }
        // A compaction still running finishes before the store is dropped.
        let _ = self.store.compacting();
    }
}
