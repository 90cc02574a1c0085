//! The controller state machine. See the crate docs for the call order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use lkh_tree::{Batch, Epoch, GroupId, KeyTree, MemberPath, NodeId, TreeError, dot};
use rand_core::CryptoRng;
use serde::Serialize;
use thiserror::Error;
use wire::{
    Ack, Acked, Codec, Cookie, CookieReply, Encapsulation, ErrorMessage, Heartbeat, Kem, KeyChain,
    KeyChainRequest, LeaveRequest, MemberId, MessageType, NONCE_LEN, RegistrationRequest,
    RekeyDatagram, ResyncRequest, SealedFor, SealedKind, Subscribe, WireError, open_with, pack,
    seal_path_with, sign, verifying_key,
};
use zeroize::{Zeroize, Zeroizing};

use crate::fanout::{Cookies, RateLimit, Subscribers};
use crate::gate::Gate;
use crate::persist::{Persist, PersistTicket, Persisted, Save};
use crate::policy::kem_names;
use crate::policy::{ConnId, Enrollment, GroupPolicy, Timestamp};
use crate::roster::{Departed, Departure, RECENT_DEPARTURES, Roster};
use crate::signing::SigningChain;
use crate::store::{GroupDelta, GroupState, HpkeDigest, MemberRecord, StoreError};

mod admission;
mod api;
mod group;
mod rekey;
mod workers;

pub use admission::{Inbound, MemberSigned, VerifiedRegistration, verify_request};
pub use api::*;
use group::*;
use rekey::*;
use workers::*;

/// The controller: every group's tree, members and timers.
pub struct Controller<R> {
    signer: SigningKey,
    rng: R,
    groups: BTreeMap<GroupId, Group>,
    names: BTreeMap<String, GroupId>,
    cookies: Cookies,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    workers: usize,
    rejects: BTreeMap<Reject, u64>,
    profiler: Option<fn() -> Duration>,
    profile: Option<RekeyProfile>,
    /// Member signatures verified on the controller's own thread.
    signatures_verified: std::cell::Cell<u64>,
    /// Saves asked for and not yet taken by the driver.
    persists: VecDeque<Persist>,
    /// The last save ticket handed out.
    tickets: u64,
    /// Whether the store said, at its last report, that a compaction still runs.
    store_compacting: bool,
    /// Groups another controller leads, by id: their names and the leader's request address
    /// when known. Their requests are answered [`Reject::NotLeader`].
    standby: BTreeMap<GroupId, Standby>,
}

impl<R: CryptoRng> Controller<R> {
    /// A controller serving `groups` (new, or continued from `restored` states).
    pub fn new(
        signer: SigningKey,
        mut rng: R,
        groups: Vec<GroupPolicy>,
        restored: Vec<GroupState>,
        now: Timestamp,
    ) -> Result<Self, TreeError> {
        let mut by_id: HashMap<GroupId, GroupState> =
            restored.into_iter().map(|s| (s.tree.group, s)).collect();
        let mut out = BTreeMap::new();
        let mut names = BTreeMap::new();
        for policy in groups {
            let group = match by_id.remove(&policy.id) {
                Some(state) => Group::restore(policy, &state, now)?,
                None => Group::new(policy, &mut rng, now)?,
            };
            names.insert(group.policy.name.clone(), group.policy.id);
            out.insert(group.policy.id, group);
        }
        let mut cookie_key = [0u8; 32];
        rng.fill_bytes(&mut cookie_key);
        let cookies = Cookies::new(cookie_key);
        cookie_key.zeroize();
        Ok(Controller {
            signer,
            rng,
            groups: out,
            names,
            cookies,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            workers: 1,
            rejects: BTreeMap::new(),
            signatures_verified: std::cell::Cell::new(0),
            profiler: None,
            profile: None,
            persists: VecDeque::new(),
            tickets: 0,
            store_compacting: false,
            standby: BTreeMap::new(),
        })
    }

    /// Lets the controller seal a batch's welcomes and sign its datagrams on up to `workers`
    /// threads (default 1), each joined before the call that started it returns. The driver
    /// passes the machine's parallelism. The tree's key wraps are sealed on as many.
    pub fn set_workers(&mut self, workers: usize) {
        self.workers = workers.max(1);
    }

    /// Lets the controller time the phases of each rekey with `clock`, a reading as time since
    /// any fixed origin that the driver passes: monotonic wall time, or the process's CPU time
    /// (benchmarks only). See [`Controller::last_rekey_profile`].
    pub fn set_profiler(&mut self, clock: fn() -> Duration) {
        self.profiler = Some(clock);
    }

    /// How long the phases of the last rekey took, once a profiler is set.
    pub fn last_rekey_profile(&self) -> Option<RekeyProfile> {
        self.profile
    }

    /// The controller's public key, which members pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.verifying_key().to_bytes()
    }

    /// Where group `id`'s datagrams go by unicast besides multicast: the confirmed fan-out
    /// address of each member that renewed its subscription within its lease.
    pub fn fanout_addresses(&mut self, id: GroupId, now: Timestamp) -> Vec<SocketAddr> {
        self.groups.get_mut(&id).map_or_else(Vec::new, |g| {
            let lease = g.policy.lease_ms;
            g.subscribers.addresses(now, lease)
        })
    }

    /// Fires due batches, repeat sends, heartbeats, lease expiries and refreshes.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        let ids: Vec<GroupId> = self.groups.keys().copied().collect();
        for id in ids {
            self.send_due_repeats(id, now);
            self.expire_leases(id, now);
            let Some(group) = self.groups.get(&id) else {
                continue;
            };
            // A group waiting for a save reads nothing of its staged tree: no rekey, no
            // heartbeat until the save is reported.
            if group.persisting.is_some() {
                continue;
            }
            let batch_due = group.batch_due.is_some_and(|t| t <= now);
            let refresh_due = group.next_refresh.is_some_and(|t| t <= now);
            if batch_due || refresh_due {
                self.rekey(id, now);
            }
            // The rekey just staged is not durable yet: its epoch is announced once it is.
            if self
                .groups
                .get(&id)
                .is_some_and(|g| g.persisting.is_none() && g.next_heartbeat <= now)
            {
                self.heartbeat(id, now);
            }
        }
    }

    /// The earliest time [`Controller::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.groups
            .values()
            .flat_map(|g| {
                // Rekeys and heartbeats of a group wait for its outstanding save.
                let idle = g.persisting.is_none();
                [
                    g.batch_due.filter(|_| idle),
                    Some(g.next_heartbeat).filter(|_| idle),
                    g.next_refresh.filter(|_| idle),
                    Some(g.next_lease_scan),
                    g.spaced.front().map(|(due, _)| *due),
                ]
            })
            .flatten()
            .min()
    }

    /// The groups with a batch scheduled (due at or before [`Controller::poll_timeout`]'s
    /// answer for them). A registration for one of these joins that batch whenever it is handled
    /// before the batch is due, so a driver that handles its input before firing timers may hold
    /// such registrations until then.
    pub fn batching(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups
            .iter()
            .filter(|(_, g)| g.batch_due.is_some())
            .map(|(id, _)| *id)
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next audit event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next save to make durable (write-ahead): a staged rekey's, or a change's outside a
    /// rekey (a ban). Saves of one group come one at a time, in order; report each with
    /// [`Controller::handle_persisted`].
    pub fn poll_persist(&mut self) -> Option<Persist> {
        self.persists.pop_front()
    }

    /// Whether a save was asked for and not yet reported. While one is, commands are answered
    /// [`CommandError::Busy`]: a driver holds them until none is.
    pub fn persisting(&self) -> bool {
        !self.persists.is_empty() || self.groups.values().any(|g| g.persisting.is_some())
    }

    /// Packs and signs the datagrams of every staged rekey, on the workers: a driver calls it
    /// while the saves run, so that the two overlap. Optional: [`Controller::handle_persisted`]
    /// does it otherwise. Nothing is queued.
    pub fn prepare_staged(&mut self) {
        let (own, workers, clock) = (&self.signer, self.workers, self.profiler);
        for g in self.groups.values_mut() {
            if let Some(staged) = g.staged.as_mut() {
                let signer = g.signing.signer(own);
                Self::prepare(staged, (&g.tree, g.policy.mtu), signer, workers, clock);
            }
        }
    }

    /// The outcome of a save ([`Controller::poll_persist`]). Durable: a staged rekey is committed
    /// and its datagrams, welcomes and events queued. Failed: the stage is dropped and the group
    /// is exactly as before; its batch is tried again after a second, and its next save is of
    /// the whole state. Then the requests that waited for the save are handled.
    pub fn handle_persisted(&mut self, now: Timestamp, done: Persisted) {
        self.store_compacting = done.compacting;
        for failure in done.compaction_failures {
            self.events.push_back(Event::CompactionFailed {
                group: failure.group.0,
                epoch: failure.epoch.0,
                error: failure.error.to_string(),
            });
        }
        let Some(id) = self
            .groups
            .iter()
            .find(|(_, g)| g.persisting == Some(done.ticket))
            .map(|(id, _)| *id)
        else {
            return;
        };
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.persisting = None;
        let staged = g.staged.take();
        match done.result {
            Ok(()) => {
                g.saved = true;
                g.save_failure = None;
                if done.compaction_deferred {
                    g.compaction_due();
                }
                if let Some(staged) = staged {
                    self.commit(id, *staged, now);
                }
            }
            Err(error) => {
                g.saved = false;
                g.save_failure = Some(error.to_string());
                let epoch = staged.as_ref().map_or(g.tree.epoch(), |s| s.rekey.epoch);
                self.store_failed(id, epoch, &error);
                if let Some(staged) = staged {
                    self.undo(id, *staged, now);
                }
                // Another controller leads the group: this one stops serving it at once.
                if let StoreError::Deposed { term, .. } = error {
                    self.events.push_back(Event::Deposed {
                        group: id.0,
                        term,
                        at: now.0,
                    });
                    let name = self.groups.get(&id).map(|g| g.policy.name.clone());
                    self.set_standby(id, &name.unwrap_or_default(), None, now);
                    return;
                }
            }
        }
        self.handle_deferred(id, now);
    }

    /// The answer to a command once the saves it asked for were reported ([`Command::saving`]):
    /// one whose save failed says so instead of "done".
    pub fn settle(
        &self,
        saving: Option<Saving>,
        outcome: Result<Response, CommandError>,
    ) -> Result<Response, CommandError> {
        let Some(saving) = saving else {
            return outcome;
        };
        // Deposed while the command's save was outstanding: nothing of it was done here.
        if outcome.is_ok()
            && let Err(elsewhere) = self.group_id(&saving.group)
        {
            return Err(elsewhere);
        }
        match self.save_failure(&saving.group) {
            Some(failure) if outcome.is_ok() && saving.rekey => {
                Err(CommandError::RekeyNotSaved(failure))
            }
            Some(failure) if outcome.is_ok() => Err(CommandError::NotSaved(failure)),
            _ => outcome,
        }
    }

    /// A new save ticket.
    fn next_ticket(&mut self) -> PersistTicket {
        self.tickets += 1;
        PersistTicket(self.tickets)
    }

    /// An operator's command. Answered [`CommandError::Busy`] while a save is outstanding
    /// ([`Controller::persisting`]).
    pub fn handle_command(
        &mut self,
        now: Timestamp,
        command: Command,
    ) -> Result<Response, CommandError> {
        if self.persisting() {
            return Err(CommandError::Busy);
        }
        match command {
            Command::Status => Ok(Response::Status {
                groups: self.groups.len(),
                members: self.groups.values().map(|g| g.members.len()).sum(),
                public_key: hex(&self.public_key()),
                rejects: self.rejects.clone(),
                standby: self.standby.len(),
                signing_keys: self
                    .groups
                    .values()
                    .map(|g| g.signing_key_info(&self.signer, now))
                    .collect(),
            }),
            Command::Groups => {
                let mut groups: Vec<GroupInfo> = self.groups.values().map(Group::info).collect();
                groups.extend(self.standby.iter().map(|(id, s)| s.info(*id, now)));
                groups.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Response::Groups(groups))
            }
            Command::Members(name) => {
                let g = self.group(&name)?;
                let mut list: Vec<MemberInfo> = g.members.records().map(|m| m.info(now)).collect();
                list.sort_by_key(|m| m.id);
                Ok(Response::Members(list))
            }
            Command::Evict(name, member) => {
                let id = self.group_id(&name)?;
                let g = self.group_mut(id)?;
                if !g.members.contains(MemberId(member)) {
                    return Err(CommandError::UnknownMember {
                        group: name,
                        member,
                    });
                }
                g.departures.insert(MemberId(member), DepartReason::Evicted);
                g.schedule(now);
                Ok(Response::Ok)
            }
            Command::Rekey(name) => {
                let id = self.group_id(&name)?;
                self.rekey(id, now);
                Ok(Response::Ok)
            }
            Command::Policy(name, change) => {
                let id = self.group_id(&name)?;
                let g = self.group_mut(id)?;
                if let Some((key, value)) = change {
                    g.set_policy(&key, &value, now)?;
                }
                Ok(Response::Policy(g.policy_info()))
            }
            Command::Keys(name) => Ok(Response::Keys(self.group(&name)?.inventory(now))),
            Command::Tree(name) => Ok(Response::Tree(dot::tree_dot(&self.group(&name)?.tree))),
            Command::Stats(name) => Ok(Response::Stats(self.group(&name)?.stats.clone())),
            Command::Reset(name) => {
                let id = self.group_id(&name)?;
                self.reset(id, now, None);
                Ok(Response::Ok)
            }
            Command::Ban(name, target) => self.ban(now, &name, target),
            Command::Unban(name, identity) => {
                let id = self.group_id(&name)?;
                if !self.group_mut(id)?.gate.unban(identity) {
                    return Err(CommandError::NotBanned(hex(&identity), name));
                }
                self.events.push_back(Event::Unbanned {
                    group: id.0,
                    identity: hex(&identity),
                    at: now.0,
                });
                self.save_now(id)?;
                Ok(Response::Ok)
            }
            Command::RotateSigningKey(name) => {
                let id = self.group_id(&name)?;
                let mut seed = Zeroizing::new([0u8; 32]);
                self.rng.fill_bytes(seed.as_mut_slice());
                self.group_mut(id)?.rotation = Some(seed);
                self.rekey(id, now);
                Ok(Response::Ok)
            }
            Command::Bans(name) => {
                let banned = &self.group(&name)?.gate.records().banned;
                Ok(Response::Bans(banned.iter().map(|i| hex(i)).collect()))
            }
        }
    }

    /// Bans an identity (`gkmctl ban`, `gkmctl evict --ban`): durable with the eviction's rekey
    /// when a member is evicted, else saved at once.
    fn ban(
        &mut self,
        now: Timestamp,
        name: &str,
        target: BanTarget,
    ) -> Result<Response, CommandError> {
        let id = self.group_id(name)?;
        let g = self.group_mut(id)?;
        let (identity, member) = match target {
            BanTarget::Member(member) => {
                let record =
                    g.members
                        .get(MemberId(member))
                        .ok_or_else(|| CommandError::UnknownMember {
                            group: name.to_owned(),
                            member,
                        })?;
                (record.identity, Some(record.id))
            }
            BanTarget::Identity(identity) => (identity, g.members.by_identity(&identity)),
        };
        g.gate.ban(identity);
        self.events.push_back(Event::Banned {
            group: id.0,
            identity: hex(&identity),
            at: now.0,
        });
        match member {
            Some(member) => {
                let g = self.group_mut(id)?;
                g.departures.insert(member, DepartReason::Evicted);
                g.schedule(now);
            }
            None => self.save_now(id)?,
        }
        Ok(Response::Ok)
    }

    /// Asks for a save of what changed in group `id`, outside a rekey (a ban or its lifting).
    fn save_now(&mut self, id: GroupId) -> Result<(), CommandError> {
        let ticket = self.next_ticket();
        let compacting = self.store_compacting;
        let g = self.group_mut(id)?;
        let save = g.take_save(compacting);
        g.persisting = Some(ticket);
        let epoch = g.tree.epoch();
        self.persists.push_back(Persist {
            ticket,
            group: id,
            epoch,
            rekey: false,
            encryptions: 0,
            save,
        });
        Ok(())
    }

    /// Excludes every member of group `id` at once, as RFC 9838 does when a key server is
    /// suspected compromised: one rekey in which every member departs (reason
    /// [`DepartReason::Reset`]), so every key is new and no one holds any; members that ask are
    /// told, and register again. With `above`, the reset's epoch is numbered above it (the epoch
    /// floor of a group restored from an older copy of its state). Returns whether the group
    /// exists.
    pub fn reset(&mut self, id: GroupId, now: Timestamp, above: Option<Epoch>) -> bool {
        let Some(g) = self.groups.get_mut(&id) else {
            return false;
        };
        if let Some(above) = above
            && g.persisting.is_none()
        {
            g.tree.skip_epoch_to(above);
        }
        let everyone: Vec<MemberId> = g.members.records().map(|r| r.id).collect();
        for member in everyone {
            g.departures.insert(member, DepartReason::Reset);
        }
        self.events.push_back(Event::Reset {
            group: id.0,
            members: g.departures.len(),
            at: now.0,
        });
        self.rekey(id, now);
        true
    }

    /// Starts serving a group (high availability: this controller took over its lease), from its
    /// durable `state` if it has one: as at a restart, its first act is a rekey above every
    /// persisted epoch. A group already served is replaced.
    pub fn adopt(
        &mut self,
        policy: GroupPolicy,
        state: Option<&GroupState>,
        term: u64,
        now: Timestamp,
    ) -> Result<(), TreeError> {
        let mut group = match state {
            Some(state) => Group::restore(policy, state, now)?,
            None => Group::new(policy, &mut self.rng, now)?,
        };
        group.term = Some(term);
        let id = group.policy.id;
        self.release(id);
        self.standby.remove(&id);
        self.names.insert(group.policy.name.clone(), id);
        self.groups.insert(id, group);
        Ok(())
    }

    /// Group `id` is led by another controller, reached at `leader` when known: requests naming
    /// it are answered [`Reject::NotLeader`] with that address (members go there). A group this
    /// controller serves is released first.
    pub fn set_standby(
        &mut self,
        id: GroupId,
        name: &str,
        leader: Option<SocketAddr>,
        now: Timestamp,
    ) {
        let waited = self
            .groups
            .get_mut(&id)
            .map(|g| std::mem::take(&mut g.deferred))
            .unwrap_or_default();
        self.release(id);
        let standby = self.standby.entry(id).or_insert_with(|| Standby {
            name: name.to_owned(),
            leader,
            copy: None,
        });
        standby.leader = leader;
        // Requests that waited for a save are answered as a standby answers them.
        for (conn, inbound) in waited {
            self.handle_inbound(conn, now, inbound);
        }
    }

    /// Whether this controller serves group `id` (leads it, with high availability).
    pub fn leads(&self, id: GroupId) -> bool {
        self.groups.contains_key(&id)
    }

    /// High availability: this standby's warm copy of group `id` (the PostgreSQL store's
    /// follower) matched the committed log at `now`, at `epoch` with
    /// `members`, after trailing it by `behind` epochs. Shown by [`Command::Groups`]; ignored for a
    /// group this controller leads.
    pub fn set_following(
        &mut self,
        id: GroupId,
        epoch: Epoch,
        members: usize,
        behind: u64,
        now: Timestamp,
    ) {
        if let Some(standby) = self.standby.get_mut(&id) {
            standby.copy = Some(WarmCopy {
                epoch,
                members,
                behind,
                synced: now,
            });
        }
    }

    /// Stops serving group `id`: a staged rekey is dropped unsent and nothing of the group is
    /// sent from now on. Only through [`Controller::set_standby`] (which answers the requests
    /// that waited) or [`Controller::adopt`] (which replaces the group).
    fn release(&mut self, id: GroupId) {
        let Some(g) = self.groups.remove(&id) else {
            return;
        };
        self.names.remove(&g.policy.name);
        self.persists.retain(|p| p.group != id);
        self.transmits.retain(|t| match t {
            Transmit::Multicast { group, .. } => *group != id,
            Transmit::Reply { .. } => true,
        });
    }

    /// The current state of a group, as the store holds it (for tests and the daemon).
    pub fn group_state(&self, group: GroupId) -> Option<GroupState> {
        self.groups.get(&group).map(Group::state)
    }

    /// A group's key tree, read-only (for simulators that model receivers by subtree).
    pub fn tree(&self, group: GroupId) -> Option<&KeyTree> {
        self.groups.get(&group).map(|g| &g.tree)
    }

    /// Bytes a group's tree and member roster hold in memory, for memory reports.
    pub fn memory_bytes(&self, group: GroupId) -> Option<usize> {
        let g = self.groups.get(&group)?;
        Some(g.tree.memory_bytes() + g.members.memory_bytes())
    }

    /// The current epoch and traffic key of a group (for checks in tests and the demo).
    pub fn traffic_key(&self, group: GroupId) -> Option<(Epoch, lkh_tree::TrafficKey)> {
        let g = self.groups.get(&group)?;
        let epoch = g.tree.epoch();
        Some((epoch, g.tree.root_key().traffic_key(group, epoch)))
    }

    fn group(&self, name: &str) -> Result<&Group, CommandError> {
        let id = self.group_id(name)?;
        self.groups
            .get(&id)
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    /// The id of a group this controller serves; a group it stands by for is
    /// [`CommandError::NotLeader`].
    fn group_id(&self, name: &str) -> Result<GroupId, CommandError> {
        if let Some(id) = self.names.get(name) {
            return Ok(*id);
        }
        match self.standby.values().find(|s| s.name == name) {
            Some(standby) => Err(CommandError::NotLeader {
                group: name.to_owned(),
                leader: standby.leader.map(|a| a.to_string()),
            }),
            None => Err(CommandError::UnknownGroup(name.to_owned())),
        }
    }

    fn group_mut(&mut self, id: GroupId) -> Result<&mut Group, CommandError> {
        self.groups
            .get_mut(&id)
            .ok_or_else(|| CommandError::UnknownGroup(id.to_string()))
    }

    /// Rekeys committed in group `name` so far (`None`: not served here). A driver answers a
    /// command that rekeys once this moves: with batching, an eviction is done only when the
    /// batch's rekey is durable and sent.
    pub fn rekeys_done(&self, name: &str) -> Option<u64> {
        let id = self.names.get(name)?;
        Some(self.groups.get(id)?.stats.rekeys)
    }

    /// Why group `name`'s last rekey could not be saved, while its batch waits to be tried
    /// again; `None` once a save succeeded. A driver tells an operator whose eviction or rekey
    /// is not yet done.
    pub fn save_failure(&self, name: &str) -> Option<String> {
        let id = self.names.get(name)?;
        self.groups.get(id)?.save_failure.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn signing_on_workers_keeps_the_datagrams_in_order() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut tree = KeyTree::new(GroupId(7), lkh_tree::TreeConfig::default(), &mut rng).unwrap();
        let grow = |joins| Batch {
            leaves: Vec::new(),
            joins,
        };
        tree.rekey(&grow(4_096), &mut rng).unwrap();
        let rekey = tree.rekey(&grow(2_048), &mut rng).unwrap();
        let datagrams = pack_rekey(&rekey, &tree, 400);
        assert!(datagrams.len() > 3 * 64, "{} datagrams", datagrams.len());
        let signer = SigningKey::from_bytes(&[9; 32]);
        let alone = sign_all(&datagrams, &signer, 1);
        assert_eq!(alone.len(), datagrams.len());
        for workers in [2, 3, 8] {
            assert!(
                sign_all(&datagrams, &signer, workers) == alone,
                "{workers} workers"
            );
        }
    }
}
