//! The controller's signing key replaced in flight (`gkmctl signing-key rotate`): the new key is
//! announced signed by the current one and members switch; a member that missed the announcement
//! walks the chain; forged or replayed announcements change nothing; a rotation is durable with
//! its rekey (a failed save leaves the old key); both sides keep the key across restarts; a
//! member pinned to a key older than the kept chain is told to be re-provisioned. Controller and
//! members are the sans-I/O state machines, in memory.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

use std::sync::{Arc, Mutex};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_member::signing_keys::SigningKeys;
use gkm_member::{Member, MemberConfig, MemberEvent};
use gkm_server::{
    Command, CommandError, ConnId, Controller, GroupDelta, GroupPolicy, GroupState, MemoryStore,
    Response, Store, StoreDriver, StoreError, Timestamp, Transmit,
};
use lkh_tree::{Epoch, GroupId};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{Heartbeat, HpkeSecret, Kem, KeyAnnouncement, MAX_CHAIN, sign};

const GROUP: GroupId = GroupId(7);
const START: u64 = 1_800_000_000_000;

/// A memory store shared with the test (to restart a controller from it), which fails its saves
/// while `failing` is set.
#[derive(Clone, Default)]
struct Shared {
    store: Arc<Mutex<MemoryStore>>,
    failing: Arc<Mutex<bool>>,
}

impl Store for Shared {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.check()?;
        self.store.lock().unwrap().save(state)
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.check()?;
        self.store.lock().unwrap().save_delta(delta)
    }
}

impl Shared {
    fn check(&self) -> Result<(), StoreError> {
        match *self.failing.lock().unwrap() {
            true => Err(StoreError::Backend("disk on fire".into())),
            false => Ok(()),
        }
    }
}

struct Net {
    controller: StoreDriver<ChaCha20Rng>,
    store: Shared,
    members: Vec<Member<ChaCha20Rng>>,
    events: Vec<Vec<MemberEvent>>,
    /// Members whose multicast is dropped.
    deaf: Vec<bool>,
    now: u64,
    own: SigningKey,
}

fn policy() -> GroupPolicy {
    let mut policy = GroupPolicy::new("demo", GROUP);
    policy.kems = vec![Kem::X25519];
    policy
}

fn controller(own: &SigningKey, restored: Vec<GroupState>, now: u64) -> Controller<ChaCha20Rng> {
    Controller::new(
        own.clone(),
        ChaCha20Rng::seed_from_u64(now),
        vec![policy()],
        restored,
        Timestamp(now),
    )
    .unwrap()
}

impl Net {
    fn new() -> Net {
        let own = SigningKey::from_bytes(&[42; 32]);
        let store = Shared::default();
        Net {
            controller: StoreDriver::new(controller(&own, vec![], START), Box::new(store.clone())),
            store,
            members: Vec::new(),
            events: Vec::new(),
            deaf: Vec::new(),
            now: START,
            own,
        }
    }

    /// A member pinned to `pinned`, registering; its index.
    fn join(&mut self, pinned: VerifyingKey) -> usize {
        let i = self.members.len();
        let mut rng = ChaCha20Rng::seed_from_u64(100 + i as u64);
        let identity = SigningKey::from_bytes(&[i as u8 + 1; 32]);
        let hpke = HpkeSecret::generate(Kem::X25519, &mut rng);
        let config = MemberConfig::new(GROUP, pinned);
        self.members
            .push(Member::new(config, identity, hpke, rng, self.now));
        self.events.push(Vec::new());
        self.deaf.push(false);
        self.pump();
        // Admitted with the next batch (or told why not).
        for _ in 0..50 {
            if !self.events[i].is_empty() {
                break;
            }
            self.advance(100);
        }
        i
    }

    /// Moves requests, replies and datagrams until nothing moves.
    fn pump(&mut self) {
        for _ in 0..1_000 {
            let mut moved = false;
            for i in 0..self.members.len() {
                while let Some(request) = self.members[i].poll_request() {
                    moved = true;
                    self.controller
                        .handle_request(ConnId(i as u64), Timestamp(self.now), &request);
                    self.controller.persist(Timestamp(self.now));
                }
            }
            while let Some(t) = self.controller.poll_transmit() {
                moved = true;
                match t {
                    Transmit::Multicast { bytes, .. } => self.multicast(&bytes),
                    Transmit::Reply { conn, bytes } => {
                        self.members[conn.0 as usize].handle_reply(self.now, &bytes);
                    }
                }
            }
            for (i, m) in self.members.iter_mut().enumerate() {
                while let Some(e) = m.poll_event() {
                    self.events[i].push(e);
                }
            }
            while self.controller.poll_event().is_some() {}
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn multicast(&mut self, bytes: &[u8]) {
        for (i, m) in self.members.iter_mut().enumerate() {
            if !self.deaf[i] {
                m.handle_datagram(self.now, bytes);
            }
        }
    }

    /// Lets `ms` pass in steps of 100 ms, firing every timer.
    fn advance(&mut self, ms: u64) {
        for _ in 0..ms / 100 {
            self.now += 100;
            self.controller.handle_timeout(Timestamp(self.now));
            for m in &mut self.members {
                m.handle_timeout(self.now);
            }
            self.pump();
        }
    }

    fn command(&mut self, command: Command) -> Result<Response, CommandError> {
        let outcome = self.controller.handle_command(Timestamp(self.now), command);
        self.pump();
        outcome
    }

    fn rotate(&mut self) -> Result<Response, CommandError> {
        self.command(Command::RotateSigningKey("demo".into()))
    }

    /// The group's signing key as `gkmctl status` shows it: number and public key.
    fn status_key(&mut self) -> (u32, String) {
        let Ok(Response::Status { signing_keys, .. }) = self.command(Command::Status) else {
            panic!("status");
        };
        (signing_keys[0].key_id, signing_keys[0].key.clone())
    }

    fn switches(&self, i: usize) -> Vec<u32> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                MemberEvent::SigningKeyChanged { key_id, .. } => Some(*key_id),
                _ => None,
            })
            .collect()
    }

    /// Whether member `i` holds the controller's current traffic key.
    fn in_step(&self, i: usize) -> bool {
        let ours = self.members[i]
            .traffic_key()
            .map(|(e, k)| (e, k.check_value()));
        let theirs = self
            .controller
            .traffic_key(GROUP)
            .map(|(e, k)| (e, k.check_value()));
        ours.is_some() && ours == theirs
    }

    /// Evicts member `i` and lets the rekey go out.
    fn evict(&mut self, i: usize) {
        let member = self.members[i].membership().unwrap().0.0;
        self.command(Command::Evict("demo".into(), member)).unwrap();
        self.advance(2_000);
    }
}

fn hex_of(key: &VerifyingKey) -> String {
    key.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// GKM-V080: the rotation is announced signed by the current key; every member switches, the
/// next rekeys apply under the new key, and a heartbeat signed by the old key for a later epoch
/// is dropped.
#[test]
fn v080_members_switch_to_the_announced_key_and_the_old_one_stops_verifying() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    let members: Vec<usize> = (0..4).map(|_| net.join(pinned)).collect();
    assert_eq!(net.status_key(), (0, hex_of(&pinned)));
    net.rotate().unwrap();
    let (id, key) = net.status_key();
    assert_eq!(id, 1);
    assert_ne!(key, hex_of(&pinned));
    for &i in &members {
        assert_eq!(net.switches(i), [1], "member {i}: {:?}", net.events[i]);
        assert_eq!(hex_of(net.members[i].signing_keys().current()), key);
        assert!(net.in_step(i), "member {i} applied the rotation's rekey");
    }
    net.evict(1);
    for i in [0, 2, 3] {
        assert!(
            net.in_step(i),
            "member {i} applies rekeys under the new key"
        );
    }
    // The old key (leaked, say) no longer speaks for the group.
    let epoch = net.controller.traffic_key(GROUP).unwrap().0;
    let forged = Heartbeat {
        group: GROUP,
        epoch: Epoch(epoch.0 + 5),
        kcv: lkh_tree::Kcv([0; lkh_tree::KCV_LEN]),
        timestamp_ms: net.now,
    };
    let dropped = net.members[0].stats().dropped.get("bad heartbeat").copied();
    net.multicast(&sign(&forged, &net.own.clone()));
    assert_eq!(
        net.members[0].stats().dropped.get("bad heartbeat").copied(),
        Some(dropped.unwrap_or(0) + 1)
    );
    net.advance(1_000);
    assert!(net.in_step(0));
}

/// GKM-V081: a member that lost the announcement and the rekey (multicast loss) catches up: what
/// the new key signs does not verify for it, it asks for the chain, switches and resyncs.
#[test]
fn v081_a_member_that_missed_the_rotation_walks_the_chain_and_catches_up() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    let (a, b) = (net.join(pinned), net.join(pinned));
    net.deaf[b] = true;
    net.rotate().unwrap();
    net.rotate().unwrap();
    // Every repeat of both is lost too.
    net.advance(1_000);
    net.deaf[b] = false;
    assert!(net.switches(b).is_empty(), "{:?}", net.events[b]);
    assert!(!net.in_step(b));
    // What key 2 signs does not verify for it: it doubts its key, and asks for the chain with
    // the next request of its own (here, when the silence allowed runs out).
    net.advance(15_000);
    assert_eq!(net.switches(b), [2], "{:?}", net.events[b]);
    assert!(net.in_step(b), "{:?}", net.events[b]);
    assert!(net.in_step(a));
    assert_eq!(net.members[b].signing_keys().current_id(), Some(2));
}

/// GKM-V082: announcements that are not the next link change nothing: signed by a member's
/// identity key, by a random key, or an old one replayed.
#[test]
fn v082_forged_and_replayed_announcements_change_nothing() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    let i = net.join(pinned);
    let member_identity = SigningKey::from_bytes(&[1; 32]);
    let random = SigningKey::from_bytes(&[77; 32]);
    let attacker = SigningKey::from_bytes(&[66; 32]);
    let forge = |signer: &SigningKey, key_id: u32| {
        let announcement = KeyAnnouncement {
            group: GROUP,
            key_id,
            from_epoch: Epoch(1),
            grace_epochs: 1_000,
            issued_ms: START,
            key: attacker.verifying_key().to_bytes(),
        };
        sign(&announcement, signer)
    };
    let before = net.members[i].signing_keys().clone();
    for forged in [
        forge(&member_identity, 1),
        forge(&random, 1),
        forge(&random, 9),
    ] {
        net.multicast(&forged);
        net.pump();
        assert_eq!(net.members[i].signing_keys(), &before);
    }
    // A real announcement, captured, then replayed after the next rotation.
    let mut captured = Vec::new();
    net.rotate().unwrap();
    let Ok(Response::Status { .. }) = net.command(Command::Status) else {
        panic!("status");
    };
    for record in net.store.store.lock().unwrap().groups[&GROUP]
        .signing
        .iter()
    {
        captured.push(record.announcement.to_vec());
    }
    net.rotate().unwrap();
    let after = net.members[i].signing_keys().clone();
    assert_eq!(after.current_id(), Some(2));
    for old in &captured {
        net.multicast(old);
        net.pump();
    }
    assert_eq!(
        net.members[i].signing_keys(),
        &after,
        "replay changed nothing"
    );
    assert_eq!(net.switches(i), [1, 2]);
    assert!(net.in_step(i));
}

/// GKM-V083: the rotation is saved with its rekey: while the store fails, the command says so and
/// the group keeps its key; once the store works, the rotation goes out with the retried rekey.
#[test]
fn v083_a_rotation_whose_save_failed_leaves_the_old_key() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    let i = net.join(pinned);
    *net.store.failing.lock().unwrap() = true;
    let refused = net.rotate();
    assert!(
        matches!(refused, Err(CommandError::RekeyNotSaved(_))),
        "{refused:?}"
    );
    assert_eq!(net.status_key(), (0, hex_of(&pinned)));
    assert!(net.switches(i).is_empty());
    *net.store.failing.lock().unwrap() = false;
    net.advance(3_000);
    assert_eq!(net.status_key().0, 1);
    assert_eq!(net.switches(i), [1]);
    assert!(net.in_step(i));
}

/// GKM-V084: restarts. A controller restarted from its store signs with the group's rotated key
/// (members apply its rekeys); a member restarted with the keys it followed goes on, and one
/// restarted from the pinned key alone walks the chain again.
#[test]
fn v084_both_sides_keep_the_rotated_key_across_restarts() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    let (a, b) = (net.join(pinned), net.join(pinned));
    net.rotate().unwrap();
    let key = net.status_key();
    // The controller restarts from what it saved.
    net.now += 1_000;
    let states = net.store.store.lock().unwrap().states();
    let restarted = controller(&net.own, states, net.now);
    net.controller = StoreDriver::new(restarted, Box::new(net.store.clone()));
    assert_eq!(net.status_key(), key);
    // Member b restarts from the pinned key alone (its file of followed keys lost).
    let (id, path) = {
        let (id, path) = net.members[b].membership().unwrap();
        (id, path.clone())
    };
    let mut rng = ChaCha20Rng::seed_from_u64(101);
    let hpke = HpkeSecret::generate(Kem::X25519, &mut rng);
    net.members[b] = Member::resume(
        MemberConfig::new(GROUP, pinned),
        SigningKey::from_bytes(&[b as u8 + 1; 32]),
        hpke,
        rng,
        id,
        path,
        net.now,
    );
    net.pump();
    net.advance(15_000);
    for i in [a, b] {
        assert!(net.in_step(i), "member {i}: {:?}", net.events[i]);
    }
    assert_eq!(net.members[b].signing_keys().current_id(), Some(1));
    // Member a restarts with what it followed: it takes the next rekey at once.
    let keys = net.members[a].signing_keys().clone();
    let (id, path) = {
        let (id, path) = net.members[a].membership().unwrap();
        (id, path.clone())
    };
    let mut rng = ChaCha20Rng::seed_from_u64(100);
    let hpke = HpkeSecret::generate(Kem::X25519, &mut rng);
    let mut resumed = Member::resume(
        MemberConfig::new(GROUP, pinned),
        SigningKey::from_bytes(&[a as u8 + 1; 32]),
        hpke,
        rng,
        id,
        path,
        net.now,
    );
    // Keys followed from another pinned key (the operator re-provisioned) are not taken.
    let other = SigningKeys::pinned(SigningKey::from_bytes(&[5; 32]).verifying_key());
    assert!(!resumed.restore_signing_keys(other));
    assert!(resumed.restore_signing_keys(keys));
    net.members[a] = resumed;
    net.events[a].clear();
    net.pump();
    net.evict(1);
    assert!(net.in_step(a));
    assert!(net.switches(a).is_empty(), "no chain walked again");
}

/// GKM-V085: a member registering with the key it was first given, after rotations, walks the
/// chain and verifies its welcome; past the chain the controller keeps, it is told to be
/// re-provisioned and stops, while one given the current key joins.
#[test]
fn v085_new_members_join_through_the_chain_or_are_told_to_be_reprovisioned() {
    let mut net = Net::new();
    let pinned = net.own.verifying_key();
    net.rotate().unwrap();
    net.rotate().unwrap();
    // Long after the announcements and their repeats.
    net.advance(1_000);
    let late = net.join(pinned);
    net.advance(5_000);
    assert!(net.in_step(late), "{:?}", net.events[late]);
    assert_eq!(net.switches(late), [2], "{:?}", net.events[late]);
    for _ in 0..MAX_CHAIN {
        net.rotate().unwrap();
    }
    net.advance(1_000);
    let stale = net.join(pinned);
    net.advance(10_000);
    assert!(!net.in_step(stale));
    assert!(
        net.events[stale]
            .iter()
            .any(|e| matches!(e, MemberEvent::SigningKeyUnknown { .. })),
        "{:?}",
        net.events[stale]
    );
    let (_, current) = net.status_key();
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&current[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let current = VerifyingKey::from_bytes(&bytes.try_into().unwrap()).unwrap();
    let fresh = net.join(current);
    net.advance(2_000);
    assert!(net.in_step(fresh));
    assert!(net.in_step(late), "the member that followed every rotation");
}
