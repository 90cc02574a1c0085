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
    Ack, Acked, Codec, Cookie, CookieReply, Encapsulation, ErrorMessage, Heartbeat, LeaveRequest,
    MemberId, MessageType, NONCE_LEN, RegistrationRequest, RekeyDatagram, ResyncRequest, SealedFor,
    SealedKind, Subscribe, WireError, open_with, pack, seal_path_with, sign, verifying_key,
};
use zeroize::Zeroize;

use crate::fanout::{Cookies, RateLimit, Subscribers};
use crate::gate::Gate;
use crate::policy::{ConnId, Enrollment, GroupPolicy, MAX_REPEAT_SPACING_MS, Timestamp};
use crate::roster::{Departed, Departure, RECENT_DEPARTURES, Roster};
use crate::store::{GroupDelta, GroupState, MemberRecord, Store, StoreError};

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
    store: Box<dyn Store + Send>,
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
}

impl<R: CryptoRng> Controller<R> {
    /// A controller serving `groups` (new, or continued from `restored` states).
    pub fn new(
        signer: SigningKey,
        mut rng: R,
        store: Box<dyn Store + Send>,
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
            store,
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
        })
    }

    /// Lets the controller seal a batch's welcomes and sign its datagrams on up to `workers`
    /// threads (default 1), and, with more than one, run the store's save on a thread of its own
    /// while the datagrams are packed and signed (nothing is queued before the save returns). The
    /// driver passes the machine's parallelism. The tree's key wraps are sealed on as many.
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
            let batch_due = group.batch_due.is_some_and(|t| t <= now);
            let refresh_due = group.next_refresh.is_some_and(|t| t <= now);
            if batch_due || refresh_due {
                self.rekey(id, now);
            }
            if self
                .groups
                .get(&id)
                .is_some_and(|g| g.next_heartbeat <= now)
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
                [
                    g.batch_due,
                    Some(g.next_heartbeat),
                    g.next_refresh,
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

    /// An operator's command.
    pub fn handle_command(
        &mut self,
        now: Timestamp,
        command: Command,
    ) -> Result<Response, CommandError> {
        match command {
            Command::Status => Ok(Response::Status {
                groups: self.groups.len(),
                members: self.groups.values().map(|g| g.members.len()).sum(),
                public_key: hex(&self.public_key()),
                rejects: self.rejects.clone(),
            }),
            Command::Groups => Ok(Response::Groups(
                self.groups.values().map(Group::info).collect(),
            )),
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
                Ok(Response::Policy(g.policy_list()))
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

    /// Saves what changed in group `id` now, outside a rekey (a ban or its lifting).
    fn save_now(&mut self, id: GroupId) -> Result<(), CommandError> {
        let compacting = self.store.compacting();
        let g = self
            .groups
            .get_mut(&id)
            .ok_or_else(|| CommandError::UnknownGroup(id.to_string()))?;
        let save = g.take_save(compacting);
        let (saved, _) = save.write(self.store.as_mut(), None, (&g.tree, &g.members, &g.gate));
        g.saved = saved.is_ok();
        saved.map_err(|e| CommandError::NotSaved(e.to_string()))
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
        if let Some(above) = above {
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
        self.names
            .get(name)
            .and_then(|id| self.groups.get(id))
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn group_id(&self, name: &str) -> Result<GroupId, CommandError> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn group_mut(&mut self, id: GroupId) -> Result<&mut Group, CommandError> {
        self.groups
            .get_mut(&id)
            .ok_or_else(|| CommandError::UnknownGroup(id.to_string()))
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
        let datagrams = pack_rekey(&rekey, &tree, 576);
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
