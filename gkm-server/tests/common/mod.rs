//! Shared by the adversary tests: a real [`Controller`] and real [`Member`]s wired together in
//! memory on a virtual clock, recording everything the controller sends (the captures an
//! eavesdropper gets), the controller's traffic key of every epoch and what every member knew;
//! and ([`attack`]) attackers that forge or open wraps themselves.

#![allow(dead_code, reason = "each test file uses part of the harness")]
#![allow(unreachable_pub, reason = "shared by the test files, not exported")]
#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

use std::collections::{BTreeMap, HashMap};

use ed25519_dalek::SigningKey;
use gkm_member::{Member, MemberConfig};
use gkm_server::{
    Command, ConnId, Controller, Event, GroupPolicy, MemoryStore, StoreDriver, Timestamp, Transmit,
};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::HpkeSecret;

/// The group every test runs.
pub const GROUP: GroupId = GroupId(1);
/// Its name.
pub const NAME: &str = "demo";
/// The virtual clock's start.
pub const START: u64 = 1_800_000_000_000;
/// The controller's signing key seed.
pub const SIGNER_SEED: [u8; 32] = [42; 32];

pub mod attack;

pub use attack::Keys;

/// The default policy with fast heartbeats; `one_way` picks one-way leaves (the default) or
/// plain group-oriented LKH.
pub fn policy(one_way: bool) -> GroupPolicy {
    let mut p = GroupPolicy::new(NAME, GROUP);
    p.heartbeat_interval_ms = 1_000;
    p.lease_ms = 600_000;
    p.repeats = 1;
    p.tree.one_way = one_way;
    p
}

/// The identity key of the member made from `seed`.
pub fn identity(seed: u64) -> SigningKey {
    let mut bytes = [0u8; 32];
    ChaCha20Rng::seed_from_u64(seed).fill_bytes(&mut bytes);
    SigningKey::from_bytes(&bytes)
}

/// The HPKE key of the member made from `seed`.
pub fn hpke(seed: u64) -> HpkeSecret {
    HpkeSecret::generate(
        wire::Kem::XWing,
        &mut ChaCha20Rng::seed_from_u64(seed ^ 0x6870_6b65),
    )
}

/// A member's configuration (pinning the controller's key).
pub fn config() -> MemberConfig {
    let mut config = MemberConfig::new(GROUP, SigningKey::from_bytes(&SIGNER_SEED).verifying_key());
    config.renew_interval_ms = 300_000;
    config
}

/// One member agent and what the test knows about it.
pub struct Agent {
    /// The state machine.
    pub member: Member<ChaCha20Rng>,
    /// The seed of its keys.
    pub seed: u64,
    /// Whether it still receives traffic (false once evicted or gone).
    pub live: bool,
    /// The epoch it was admitted in.
    pub joined: Option<u64>,
    /// The epoch of the rekey that shut it out.
    pub left: Option<u64>,
    /// How many multicast datagrams were sent before it was shut out (captures from there on
    /// are what it records after its departure).
    pub captured_from: Option<usize>,
    /// Every path key it ever held.
    pub known: Keys,
}

/// A controller and its members in memory, with everything recorded.
pub struct Run {
    /// The controller.
    pub controller: StoreDriver<ChaCha20Rng>,
    /// The members, by index (departed ones stay, not live).
    pub agents: Vec<Agent>,
    /// The virtual clock.
    pub now: u64,
    /// Every multicast datagram the controller sent, in order.
    pub multicast: Vec<Vec<u8>>,
    /// The controller's traffic key of every epoch.
    pub traffic: BTreeMap<u64, [u8; 32]>,
    /// The version of every node's key just before the rekey of each epoch.
    pub versions: BTreeMap<u64, HashMap<u32, u64>>,
    /// Every audit event the controller emitted.
    pub events: Vec<Event>,
    /// Every request a member sent, with the member's index.
    pub requests: Vec<(usize, Vec<u8>)>,
    /// Every reply the controller sent, with the index of the member it went to.
    pub replies: Vec<(usize, Vec<u8>)>,
    seeds: u64,
    queue: Vec<Transmit>,
}

impl Run {
    /// A controller with `policy` and `n` admitted members.
    pub fn new(policy: GroupPolicy, n: usize) -> Run {
        let controller = StoreDriver::new(
            Controller::new(
                SigningKey::from_bytes(&SIGNER_SEED),
                ChaCha20Rng::seed_from_u64(1),
                vec![policy],
                vec![],
                Timestamp(START),
            )
            .expect("a valid policy"),
            Box::new(MemoryStore::default()),
        );
        let mut run = Run {
            controller,
            agents: Vec::new(),
            now: START,
            multicast: Vec::new(),
            traffic: BTreeMap::new(),
            versions: BTreeMap::new(),
            requests: Vec::new(),
            replies: Vec::new(),
            events: Vec::new(),
            seeds: 1000,
            queue: Vec::new(),
        };
        run.record_traffic_key();
        // One at a time: each join its own epoch, as members arriving apart would be.
        for _ in 0..n {
            run.add_member();
            run.pump();
        }
        run
    }

    /// A new member that registers now (admitted at the next pump).
    pub fn add_member(&mut self) -> usize {
        self.seeds += 1;
        let seed = self.seeds;
        let rng = ChaCha20Rng::seed_from_u64(seed ^ 0x0072_6e67);
        let member = Member::new(config(), identity(seed), hpke(seed), rng, self.now);
        self.agents.push(Agent {
            member,
            seed,
            live: true,
            joined: None,
            left: None,
            captured_from: None,
            known: Keys::new(),
        });
        self.agents.len() - 1
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.controller.traffic_key(GROUP).map_or(0, |(e, _)| e.0)
    }

    fn record_traffic_key(&mut self) {
        if let Some((epoch, key)) = self.controller.traffic_key(GROUP) {
            self.traffic.insert(epoch.0, *key.as_bytes());
        }
    }

    /// Calls the controller, recording the node versions before any rekey it makes, its new
    /// traffic key and what it queued.
    pub fn call<T>(&mut self, f: impl FnOnce(&mut StoreDriver<ChaCha20Rng>, Timestamp) -> T) -> T {
        let before = self.epoch();
        let versions: HashMap<u32, u64> = self
            .controller
            .tree(GROUP)
            .map(|t| {
                t.nodes()
                    .filter_map(|n| t.version(n).map(|v| (n.0, v.0)))
                    .collect()
            })
            .unwrap_or_default();
        let out = f(&mut self.controller, Timestamp(self.now));
        let after = self.epoch();
        assert!(after <= before + 1, "one controller call made two rekeys");
        if after > before {
            self.versions.insert(after, versions);
            self.record_traffic_key();
        }
        while let Some(t) = self.controller.poll_transmit() {
            self.queue.push(t);
        }
        while let Some(event) = self.controller.poll_event() {
            self.events.push(event);
        }
        out
    }

    /// Moves requests, replies and datagrams until nothing is left (bounded).
    pub fn pump(&mut self) {
        for _ in 0..1_000 {
            let mut moved = false;
            for i in 0..self.agents.len() {
                if !self.agents[i].live {
                    continue;
                }
                while let Some(request) = self.agents[i].member.poll_request() {
                    moved = true;
                    self.call(|c, now| c.handle_request(ConnId(i as u64), now, &request));
                    self.requests.push((i, request));
                }
            }
            // As the daemon does: what arrived is handled, then the due timers fire (a change
            // is rekeyed by the timer, at once with immediate rekeying).
            if self
                .controller
                .poll_timeout()
                .is_some_and(|t| t.0 <= self.now)
            {
                moved = true;
                self.call(StoreDriver::handle_timeout);
            }
            for t in std::mem::take(&mut self.queue) {
                moved = true;
                self.deliver(t);
            }
            self.note_keys();
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn deliver(&mut self, t: Transmit) {
        let now = self.now;
        match t {
            Transmit::Multicast { bytes, .. } => {
                for a in self.agents.iter_mut().filter(|a| a.live) {
                    a.member.handle_datagram(now, &bytes);
                }
                self.multicast.push(bytes);
            }
            Transmit::Reply { conn, bytes } => {
                if let Some(a) = self.agents.get_mut(conn.0 as usize).filter(|a| a.live) {
                    a.member.handle_reply(now, &bytes);
                }
                self.replies.push((conn.0 as usize, bytes));
            }
        }
    }

    /// Records every live member's current path keys and admission epoch.
    fn note_keys(&mut self) {
        for a in self.agents.iter_mut().filter(|a| a.live) {
            while a.member.poll_event().is_some() {}
            if let Some((_, path)) = a.member.membership() {
                a.joined.get_or_insert(path.epoch().0);
                for k in path.keys() {
                    a.known.insert((k.node.0, k.version.0), *k.key.as_bytes());
                }
            }
        }
    }

    /// Advances the clock by `total` ms in steps of `step`, firing timers.
    pub fn advance(&mut self, total: u64, step: u64) {
        let end = self.now + total;
        while self.now < end {
            self.now = (self.now + step).min(end);
            self.call(StoreDriver::handle_timeout);
            let now = self.now;
            for a in self.agents.iter_mut().filter(|a| a.live) {
                a.member.handle_timeout(now);
            }
            self.pump();
        }
    }

    /// The member id of agent `i`.
    pub fn member_id(&self, i: usize) -> u64 {
        self.agents[i]
            .member
            .membership()
            .expect("a current member")
            .0
            .0
    }

    /// Evicts agent `i` (an operator command); it hears nothing from now on.
    pub fn evict(&mut self, i: usize) {
        let id = self.member_id(i);
        self.agents[i].captured_from = Some(self.multicast.len());
        self.call(|c, now| c.handle_command(now, Command::Evict(NAME.into(), id)))
            .expect("a current member");
        self.agents[i].live = false;
        self.pump();
        self.agents[i].left = Some(self.epoch());
    }

    /// Agent `i` leaves; it hears nothing from now on.
    pub fn leave(&mut self, i: usize) {
        let now = self.now;
        self.agents[i].member.leave(now);
        let request = self.agents[i]
            .member
            .poll_request()
            .expect("a leave request");
        self.agents[i].live = false;
        self.agents[i].captured_from = Some(self.multicast.len());
        self.call(|c, now| c.handle_request(ConnId(i as u64), now, &request));
        self.requests.push((i, request));
        self.pump();
        self.agents[i].left = Some(self.epoch());
    }

    /// An operator-requested rekey.
    pub fn rekey(&mut self) {
        self.call(|c, now| c.handle_command(now, Command::Rekey(NAME.into())))
            .expect("the group exists");
        self.pump();
    }

    /// Whether every live member holds the controller's traffic key.
    pub fn converged(&self) -> bool {
        let current = self.traffic.get(&self.epoch());
        self.agents.iter().filter(|a| a.live).all(|a| {
            a.member
                .traffic_key()
                .is_some_and(|(_, k)| Some(k.as_bytes()) == current)
        })
    }

    /// `rounds` rounds of churn: each evicts one member, lets one leave, admits two and rekeys
    /// once with no change; `rng` picks who, never one of the first `keep` members. Every round
    /// ends converged.
    pub fn churn(&mut self, rounds: usize, keep: usize, rng: &mut ChaCha20Rng) {
        for _ in 0..rounds {
            let victim = self.random_live(keep, rng);
            self.evict(victim);
            let leaver = self.random_live(keep, rng);
            self.leave(leaver);
            self.add_member();
            self.pump();
            self.add_member();
            self.pump();
            self.rekey();
            self.advance(1_000, 500);
            assert!(self.converged(), "every live member holds the traffic key");
        }
    }

    /// A random live member, not one of the first `keep`.
    pub fn random_live(&self, keep: usize, rng: &mut ChaCha20Rng) -> usize {
        let live: Vec<usize> = (keep..self.agents.len())
            .filter(|&i| self.agents[i].live)
            .collect();
        live[(rng.next_u64() % live.len() as u64) as usize]
    }
}

/// What a member's state looks like from outside: epoch and traffic key, counters, next timer,
/// and whether it queued a request. A refused input must leave all of it unchanged.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    /// Epoch and traffic key bytes.
    pub key: Option<(u64, [u8; 32])>,
    /// Rekeys applied.
    pub applied: u64,
    /// Resyncs taken.
    pub resyncs: u64,
    /// The next timer.
    pub timeout: Option<u64>,
}

impl Seen {
    /// The member's state now.
    pub fn of(member: &Member<ChaCha20Rng>) -> Seen {
        Seen {
            key: member.traffic_key().map(|(e, k)| (e.0, *k.as_bytes())),
            applied: member.stats().applied,
            resyncs: member.stats().resyncs,
            timeout: member.poll_timeout(),
        }
    }
}

/// Datagrams the member refused, all reasons together.
pub fn dropped(member: &Member<ChaCha20Rng>) -> u64 {
    member.stats().dropped.values().sum()
}
