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
//!
//! Three threads, each on its own connection: the store thread makes the saves (a
//! [`PgStore::connect_another`] of the lease keeper's store, fenced by its leases), the keeper
//! ("gkm-leases") announces, renews, claims and hands over, so no save, however long, holds back
//! a renewal; and the follower ("gkm-follower") keeps a warm copy of every group this controller
//! stands by for ([`Follower`]), so that a takeover reads only what was committed since its last
//! look instead of loading the group.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gkm_server::{Follower, PgStore, StoreError};
use lkh_tree::{Epoch, GroupId};
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

/// What the lease keeper of a highly available controller keeps.
struct Cluster {
    store: PgStore,
    warm: Arc<Mutex<Warm>>,
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

/// The follower and the groups it follows: those this controller stands by for.
struct Warm {
    follower: Follower,
    following: BTreeSet<GroupId>,
}

/// The stores of a controller in a cluster, connected (off the async runtime: the driver runs a
/// runtime of its own).
pub(crate) struct Connected {
    /// Keeps the leases.
    pub(crate) keeper: PgStore,
    /// Makes the saves, fenced by the keeper's leases.
    pub(crate) saver: PgStore,
    pub(crate) follower: Follower,
}

/// The keeper's and the follower's threads.
pub(crate) struct Threads {
    /// Groups the controller thread stepped down from, with the terms it held (their leases
    /// ran out unrenewed); the keeper gives those leases up. Once every clone is dropped, the
    /// keeper stops.
    pub(crate) stepped_down: Sender<(GroupId, u64)>,
    keeper: JoinHandle<()>,
    stop_follower: Sender<()>,
    follower: JoinHandle<()>,
}

impl Threads {
    /// Stops both threads: the keeper gives up every lease it holds, so that a standby takes
    /// over at once. Call it once the saves are done and every clone of `stepped_down` is gone.
    pub(crate) fn stop(self) {
        drop((self.stepped_down, self.stop_follower));
        for thread in [self.keeper, self.follower] {
            if thread.join().is_err() {
                warn!("a cluster thread panicked; its message is above");
            }
        }
    }
}

/// Starts the keeper and the follower of the configured `groups`; both report to `queue`.
pub(crate) fn start(
    keeper: PgStore,
    follower: Follower,
    lease: Duration,
    groups: Vec<GroupId>,
    queue: &ControllerQueue,
) -> Result<Threads> {
    let warm = Arc::new(Mutex::new(Warm {
        follower,
        following: groups.iter().copied().collect(),
    }));
    let cluster = Cluster {
        store: keeper,
        warm: Arc::clone(&warm),
        lease,
        groups,
        held: BTreeMap::new(),
        told: BTreeMap::new(),
        free_since: BTreeMap::new(),
        over_since: None,
        queue: queue.clone(),
    };
    let (stepped_down, inbox) = std::sync::mpsc::channel();
    let keeper = std::thread::Builder::new()
        .name("gkm-leases".into())
        .spawn(move || cluster.run(&inbox))
        .context("cannot start the lease thread")?;
    let (stop_follower, stopped) = std::sync::mpsc::channel();
    let queue = queue.clone();
    let follower = std::thread::Builder::new()
        .name("gkm-follower".into())
        .spawn(move || follow(&warm, lease / 3, &stopped, &queue))
        .context("cannot start the follower thread")?;
    Ok(Threads {
        stepped_down,
        keeper,
        stop_follower,
        follower,
    })
}

/// The warm copies (a poisoned lock is taken over: the follower drops a copy it failed on).
fn lock(warm: &Mutex<Warm>) -> MutexGuard<'_, Warm> {
    warm.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The follower thread: every `every`, brings each followed group's copy up to the committed
/// log and tells the controller thread where it stands, until `stop`'s sender is dropped.
fn follow(warm: &Mutex<Warm>, every: Duration, stop: &Receiver<()>, queue: &ControllerQueue) {
    let mut last: BTreeMap<GroupId, Epoch> = BTreeMap::new();
    let mut failing = BTreeSet::new();
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        let groups: Vec<GroupId> = lock(warm).following.iter().copied().collect();
        last.retain(|g, _| groups.contains(g));
        for group in groups {
            let mut w = lock(warm);
            if !w.following.contains(&group) {
                continue;
            }
            let outcome = w.follower.follow(group);
            drop(w);
            match outcome {
                Ok(Some(following)) => {
                    if failing.remove(&group) {
                        info!(%group, "following the committed log again");
                    }
                    let behind = last
                        .insert(group, following.epoch)
                        .map_or(0, |e| following.epoch.0.saturating_sub(e.0));
                    queue.send(ToController::Following {
                        group,
                        epoch: following.epoch,
                        members: following.members,
                        behind,
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    if failing.insert(group) {
                        warn!(%group, "cannot follow the committed log: {e}");
                    }
                }
            }
        }
    }
}

impl Cluster {
    /// The keeper: keeps the leases (three times a lease), and gives up those of the groups
    /// the controller thread stepped down from (`inbox`), until every sender is dropped; then
    /// gives up every lease, so that a standby takes over at once.
    fn run(mut self, inbox: &Receiver<(GroupId, u64)>) {
        let tick = self.lease / 3;
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                self.tick();
                next = Instant::now() + tick;
            }
            match inbox.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok((group, term)) => self.stepped_down(group, term),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return self.release_all(),
            }
        }
    }

    /// The controller thread stopped leading `group` under `term` (its lease ran out by the
    /// local clock before a renewal came back): that lease is given up and the group followed
    /// again. A later term (this keeper found the lease lost and claimed the group again before
    /// reading the message) is kept.
    fn stepped_down(&mut self, group: GroupId, term: u64) {
        if self.held.get(&group).is_none_or(|held| held.0 != term) {
            return;
        }
        self.held.remove(&group);
        if let Err(e) = self.store.release(group) {
            warn!(%group, "cannot release the lease: {e}");
        }
        self.told.insert(group, None);
        lock(&self.warm).following.insert(group);
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
                    self.queue.send(ToController::Renewed {
                        group,
                        term,
                        until: lease.until,
                    });
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

    /// Claims `group` and, once claimed, takes its committed state from the follower (caught
    /// up after the claim: every epoch the previous leader committed is in it) and hands it to
    /// the controller thread.
    fn lead(&mut self, group: GroupId) {
        let lease = match self.store.claim(group, self.lease) {
            Ok(Some(lease)) => lease,
            Ok(None) => return,
            Err(e) => return warn!(%group, "cannot claim the lease: {e}"),
        };
        let mut warm = lock(&self.warm);
        warm.following.remove(&group);
        let state = warm.follower.take(group);
        drop(warm);
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                warn!(%group, "cannot load the group after claiming it: {e}; giving it up");
                let _ = self.store.release(group);
                lock(&self.warm).following.insert(group);
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
            until: lease.until,
        });
    }

    /// This controller no longer leads `group`.
    fn lost(&mut self, group: GroupId, term: u64, why: &str) {
        warn!(%group, term, "no longer leading the group: lease {why}");
        self.held.remove(&group);
        lock(&self.warm).following.insert(group);
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
    }
}
