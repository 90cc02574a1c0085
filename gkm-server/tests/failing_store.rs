//! GKM-V053: a rekey whose save fails leaves nothing of its epoch in circulation. A store that
//! fails on command, at each point of a rekey's save (a delta, the whole state after a failed
//! delta, a delta with a compaction, a store that panics on the save's own thread), under real
//! sans-I/O members: while the store fails, no member hears of the unsaved epoch (no datagram, no
//! heartbeat, no welcome, no resync answer), the controller's state is what it was, and the
//! batch goes through once the store is back.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use gkm_member::{Member, MemberConfig, MemberEvent};
use gkm_server::{
    Command, ConnId, Controller, Event, GroupDelta, GroupPolicy, GroupState, MemoryStore, Store,
    StoreDriver, StoreError, Timestamp, Transmit,
};
use lkh_tree::{Epoch, GroupId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::HpkeSecret;

const GROUP: GroupId = GroupId(1);
const START: u64 = 1_800_000_000_000;

/// Where a save can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Point {
    /// The whole state (the first save, or the one after a failed save).
    Full,
    /// The changes since the last save.
    Delta,
    /// The changes and a compaction of the stored log.
    Compact,
}

#[derive(Default)]
struct Switch {
    store: MemoryStore,
    /// The points that fail while set.
    failing: BTreeSet<Point>,
    /// A failing save panics instead of answering.
    panics: bool,
    /// Every save asked for, in order.
    asked: Vec<Point>,
}

/// A store in memory that fails on command.
#[derive(Clone, Default)]
struct Failing(Arc<Mutex<Switch>>);

impl Failing {
    fn attempt(&self, point: Point) -> Result<(), StoreError> {
        let mut s = self.0.lock().unwrap();
        s.asked.push(point);
        if !s.failing.contains(&point) {
            return Ok(());
        }
        let panics = s.panics;
        drop(s);
        assert!(!panics, "the store fell over (test)");
        Err(StoreError::Backend("no space left on device (test)".into()))
    }

    fn set(&self, failing: &[Point], panics: bool) {
        let mut s = self.0.lock().unwrap();
        s.failing = failing.iter().copied().collect();
        s.panics = panics;
    }
}

impl Store for Failing {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.attempt(Point::Full)?;
        self.0.lock().unwrap().store.save(state)
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.attempt(Point::Delta)?;
        self.0.lock().unwrap().store.save_delta(delta)
    }
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        self.attempt(Point::Compact)?;
        self.0
            .lock()
            .unwrap()
            .store
            .save_delta_and_compact(delta, state)
    }
}

/// A group's state as comparable values: epoch, members, and a digest of the nodes (with
/// their keys) by id and of the member records by leaf.
type Contents = (u64, usize, [u8; 32]);

fn contents(state: &GroupState) -> Contents {
    let mut nodes: Vec<_> = state
        .tree
        .nodes
        .iter()
        .map(|n| {
            let parent = n.parent.map(|p| p.0);
            (n.id.0, parent, n.leaf, n.version.0, *n.key.as_bytes())
        })
        .collect();
    nodes.sort_unstable();
    // Leases are renewed while the store fails, as they should be: not compared.
    let mut members: Vec<_> = state
        .members
        .iter()
        .map(|m| (m.leaf.0, m.id.0, m.identity, m.hpke, m.joined))
        .collect();
    members.sort_unstable();
    let digest = blake3::hash(format!("{nodes:?}{members:?}").as_bytes());
    (state.tree.epoch.0, members.len(), *digest.as_bytes())
}

struct Net {
    controller: StoreDriver<ChaCha20Rng>,
    members: Vec<Member<ChaCha20Rng>>,
    events: Vec<Vec<MemberEvent>>,
    /// A member that hears no multicast while set.
    deaf: Option<usize>,
    store: Failing,
    controller_events: Vec<Event>,
    now: u64,
    seeds: u64,
    signer: SigningKey,
}

impl Net {
    fn new(n: usize, workers: usize) -> Net {
        let signer = SigningKey::from_bytes(&[42; 32]);
        let store = Failing::default();
        let mut policy = GroupPolicy::new("demo", GROUP);
        policy.heartbeat_interval_ms = 500;
        policy.lease_ms = 60_000;
        let mut controller = StoreDriver::new(
            Controller::new(
                signer.clone(),
                ChaCha20Rng::seed_from_u64(1),
                vec![policy],
                vec![],
                Timestamp(START),
            )
            .unwrap(),
            Box::new(store.clone()),
        );
        controller.set_workers(workers);
        let mut net = Net {
            controller,
            members: Vec::new(),
            events: Vec::new(),
            deaf: None,
            store,
            controller_events: Vec::new(),
            now: START,
            seeds: 100,
            signer,
        };
        for _ in 0..n {
            net.add_member();
        }
        net.pump();
        net
    }

    fn add_member(&mut self) -> usize {
        self.seeds += 1;
        let mut rng = ChaCha20Rng::seed_from_u64(self.seeds);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let hpke = HpkeSecret::generate(wire::Kem::XWing, &mut rng);
        let config = MemberConfig::new(GROUP, self.signer.verifying_key());
        let member = Member::new(config, SigningKey::from_bytes(&seed), hpke, rng, self.now);
        self.members.push(member);
        self.events.push(Vec::new());
        self.members.len() - 1
    }

    /// Moves requests, replies and datagrams until nothing is left (bounded).
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for i in 0..self.members.len() {
                while let Some(request) = self.members[i].poll_request() {
                    moved = true;
                    let (conn, now) = (ConnId(i as u64), Timestamp(self.now));
                    self.controller.handle_request(conn, now, &request);
                }
            }
            if self
                .controller
                .poll_timeout()
                .is_some_and(|t| t.0 <= self.now)
            {
                self.controller.handle_timeout(Timestamp(self.now));
            }
            while let Some(t) = self.controller.poll_transmit() {
                moved = true;
                match t {
                    Transmit::Multicast { bytes, .. } => {
                        for i in 0..self.members.len() {
                            if self.deaf != Some(i) {
                                self.members[i].handle_datagram(self.now, &bytes);
                            }
                        }
                    }
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
            while let Some(event) = self.controller.poll_event() {
                self.controller_events.push(event);
            }
            if !moved {
                return;
            }
        }
        panic!("the network did not settle (livelock)");
    }

    /// Advances the virtual clock by `total` ms in steps of 100 ms, firing timers.
    fn advance(&mut self, total: u64) {
        let end = self.now + total;
        while self.now < end {
            self.now = (self.now + 100).min(end);
            self.controller.handle_timeout(Timestamp(self.now));
            for m in &mut self.members {
                m.handle_timeout(self.now);
            }
            self.pump();
        }
    }

    fn evict(&mut self, i: usize) {
        let id = self.members[i].membership().unwrap().0.0;
        self.controller
            .handle_command(Timestamp(self.now), Command::Evict("demo".into(), id))
            .unwrap();
    }

    fn state(&self) -> Contents {
        contents(&self.controller.group_state(GROUP).unwrap())
    }

    fn stored(&self) -> Contents {
        contents(&self.store.0.lock().unwrap().store.states()[0])
    }

    /// The highest epoch any member holds a key for.
    fn highest_member_epoch(&self) -> Epoch {
        self.members
            .iter()
            .filter_map(|m| m.traffic_key().map(|(e, _)| e))
            .max()
            .unwrap()
    }

    fn failures(&self) -> usize {
        self.controller_events
            .iter()
            .filter(|e| matches!(e, Event::StoreFailed { .. }))
            .count()
    }
}

/// While the store fails at `points`: a member is evicted and one registers. Nothing of the
/// unsaved epoch reaches any member (a member that missed the last rekey resyncs meanwhile and
/// gets the durable epoch), the controller's state is unchanged; once the store is back the batch
/// goes through and every member but the evicted one converges.
fn fail_then_recover(net: &mut Net, points: &[Point], panics: bool) {
    // A member misses the last durable rekey, so that it resyncs while the store fails.
    net.deaf = Some(1);
    let mut evicted = [wire::MemberId(0); 2];
    evicted[1] = net.members.last().unwrap().membership().unwrap().0;
    evicted[0] = net.members[0].membership().unwrap().0;
    net.evict(net.members.len() - 1);
    net.advance(200);
    net.deaf = None;
    let before = net.state();
    let (epoch, key) = net.controller.traffic_key(GROUP).unwrap();
    assert_eq!(
        before,
        net.stored(),
        "the store holds what the controller holds"
    );
    let failures = net.failures();

    net.store.set(points, panics);
    net.evict(0);
    let joiner = net.add_member();
    net.advance(4_000);
    assert!(
        net.failures() >= failures + 2,
        "the failed batch was tried again"
    );
    assert_eq!(net.state(), before, "the controller is exactly as before");
    assert_eq!(net.controller.traffic_key(GROUP).unwrap().0, epoch);
    assert_eq!(
        net.highest_member_epoch(),
        epoch,
        "no member heard of the unsaved epoch"
    );
    for (i, m) in net.members.iter().enumerate().take(joiner) {
        if i == net.members.len() - 2 {
            continue; // evicted before the failure
        }
        let (held, k) = m.traffic_key().unwrap();
        assert_eq!(held, epoch, "member {i}");
        assert_eq!(k.as_bytes(), key.as_bytes(), "member {i}");
    }
    assert!(
        net.members[joiner].traffic_key().is_none(),
        "no welcome went out"
    );
    assert_eq!(net.stored(), before, "nothing was stored");

    net.store.set(&[], false);
    net.advance(3_000);
    let (now_epoch, now_key) = net.controller.traffic_key(GROUP).unwrap();
    assert!(now_epoch > epoch);
    assert_eq!(net.state(), net.stored(), "the retried batch is durable");
    for (i, m) in net.members.iter().enumerate() {
        let current = m
            .traffic_key()
            .is_some_and(|(e, k)| e == now_epoch && k.as_bytes() == now_key.as_bytes());
        let id = m.membership().map(|(id, _)| id);
        if i == 0 || i == joiner - 1 {
            // Evicted: out, or back in under a new member id.
            assert!(
                !current || id != Some(evicted[usize::from(i != 0)]),
                "member {i}"
            );
        } else {
            assert!(current, "member {i}");
        }
    }
    assert!(
        net.events[joiner]
            .iter()
            .any(|e| matches!(e, MemberEvent::Joined { .. })),
        "the waiting registration was admitted"
    );
}

#[test]
fn v053_a_failed_delta_and_full_save_leave_nothing_of_the_epoch_in_circulation() {
    let mut net = Net::new(24, 1);
    fail_then_recover(&mut net, &[Point::Delta, Point::Full], false);
    let asked = net.store.0.lock().unwrap().asked.clone();
    let failed_at = asked.iter().position(|p| *p == Point::Delta).unwrap();
    assert!(
        asked[failed_at..].contains(&Point::Full),
        "after a failed delta the whole state is saved: {asked:?}"
    );
}

#[test]
fn v053_a_failed_compaction_save_leaves_nothing_of_the_epoch_in_circulation() {
    let mut net = Net::new(16, 1);
    // Churn until a save is a compaction (the log has grown to about the state's size); that
    // one fails.
    for round in 0.. {
        assert!(round < 200, "no compaction was asked for");
        let before = net.state();
        let epoch = net.controller.traffic_key(GROUP).unwrap().0;
        let asked_before = net.store.0.lock().unwrap().asked.len();
        net.store.set(&[Point::Compact], false);
        net.evict(2);
        let joiner = net.add_member();
        // The eviction and the registration in one batch.
        net.pump();
        let asked = net.store.0.lock().unwrap().asked[asked_before..].to_vec();
        net.store.set(&[], false);
        if asked.contains(&Point::Compact) {
            assert_eq!(net.state(), before, "round {round}");
            assert_eq!(net.highest_member_epoch(), epoch);
            assert!(net.members[joiner].traffic_key().is_none());
            net.advance(2_000);
            assert!(net.controller.traffic_key(GROUP).unwrap().0 > epoch);
            assert_eq!(net.state(), net.stored());
            assert!(net.members[joiner].traffic_key().is_some());
            return;
        }
        // The evicted member's place goes to the joiner.
        net.members.swap_remove(2);
        net.events.swap_remove(2);
        net.advance(2_000);
    }
}

#[test]
fn v053_a_store_that_panics_on_the_saves_own_thread_leaves_nothing_in_circulation() {
    // Two workers and a batch of over 512 encryptions: the save runs on its own thread.
    let mut net = Net::new(600, 2);
    net.store.set(&[Point::Delta, Point::Full], true);
    let before = net.state();
    let epoch = net.controller.traffic_key(GROUP).unwrap().0;
    let ids: Vec<_> = net
        .members
        .iter()
        .map(|m| m.membership().unwrap().0)
        .collect();
    for i in (0..600).step_by(3) {
        net.evict(i);
    }
    net.advance(1_500);
    assert!(net.failures() >= 1);
    assert_eq!(net.state(), before);
    assert_eq!(net.highest_member_epoch(), epoch);
    net.store.set(&[], false);
    net.advance(3_000);
    let (now_epoch, key) = net.controller.traffic_key(GROUP).unwrap();
    assert!(now_epoch > epoch);
    for (i, m) in net.members.iter().enumerate() {
        let current = m
            .traffic_key()
            .is_some_and(|(e, k)| e == now_epoch && k.as_bytes() == key.as_bytes());
        // An evicted member is out, or back in under a new member id.
        let back = m.membership().is_some_and(|(id, _)| id != ids[i]);
        assert!(current == (i % 3 != 0) || back, "member {i}");
    }
    assert_eq!(net.state(), net.stored());
}

/// GKM-V060: while a rekey's save is outstanding (the driver runs it elsewhere), nothing reads the
/// staged rekey: requests of the group wait for the outcome, commands are answered busy, no
/// heartbeat or rekey timer fires for the group, and nothing of the staged epoch is queued. A
/// failed outcome leaves the controller as before and the waiting requests are then answered
/// from the durable state; a durable one sends the rekey, then answers them.
#[test]
fn v060_while_a_save_is_outstanding_nothing_reads_the_staged_rekey() {
    for durable in [false, true] {
        let mut net = Net::new(8, 1);
        net.advance(1_000);
        let before = net.state();
        let epoch = net.controller.traffic_key(GROUP).unwrap().0;
        let now = Timestamp(net.now);
        // The rekey is staged by the controller itself; its save is held by the test.
        let leaver = 3;
        let id = net.members[7].membership().unwrap().0.0;
        let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
        controller
            .handle_command(now, Command::Evict("demo".into(), id))
            .unwrap();
        controller.handle_timeout(now);
        let persist = controller.poll_persist().expect("a save is asked for");
        assert!(persist.rekey);
        assert_eq!(persist.epoch, epoch.next().unwrap());
        assert!(controller.persisting());
        assert!(
            controller.poll_transmit().is_none(),
            "nothing is queued before the save is reported"
        );
        assert_eq!(
            controller.handle_command(now, Command::Status),
            Err(gkm_server::CommandError::Busy)
        );
        // A registration and a leave arrive meanwhile: they wait.
        let joiner = net.add_member();
        let registration = net.members[joiner].poll_request().unwrap();
        net.members[leaver].leave(net.now);
        let leave = net.members[leaver].poll_request().unwrap();
        let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
        controller.handle_request(ConnId(joiner as u64), now, &registration);
        controller.handle_request(ConnId(leaver as u64), now, &leave);
        assert!(controller.poll_transmit().is_none(), "the requests wait");
        // Time passes while the save runs: no heartbeat or rekey of the group is due.
        let later = Timestamp(net.now + 5_000);
        assert!(
            controller.poll_timeout().is_none_or(|t| t > now),
            "no timer of the waiting group is due"
        );
        controller.handle_timeout(later);
        while let Some(t) = controller.poll_transmit() {
            if let Transmit::Multicast { bytes, .. } = t {
                for m in &mut net.members {
                    m.handle_datagram(later.0, &bytes);
                }
            }
        }
        assert_eq!(
            net.highest_member_epoch(),
            epoch,
            "the staged epoch stays in"
        );

        let ticket = persist.ticket;
        let done = if durable {
            persist.write(&mut net.store.clone())
        } else {
            drop(persist);
            failed_save(ticket)
        };
        net.controller.handle_persisted(later, done);
        assert!(!net.controller.persisting());
        let mut replies = Vec::new();
        let mut datagrams = 0;
        while let Some(t) = net.controller.poll_transmit() {
            match t {
                Transmit::Reply { conn, bytes } => replies.push((conn, bytes)),
                Transmit::Multicast { .. } => datagrams += 1,
            }
        }
        // The leave is answered either way (the registration joins the next batch).
        assert!(replies.iter().any(|(c, _)| c.0 == leaver as u64));
        if durable {
            assert!(datagrams >= 1, "the committed rekey goes out");
            assert!(net.controller.traffic_key(GROUP).unwrap().0 > epoch);
        } else {
            assert_eq!(datagrams, 0, "nothing of the failed rekey goes out");
            assert_eq!(net.state(), before, "exactly as before");
        }
        // The driver takes over again: everyone left converges, the joiner is in.
        net.now = later.0;
        net.advance(3_000);
        assert!(
            net.members[joiner].traffic_key().is_some(),
            "durable {durable}"
        );
        let (now_epoch, key) = net.controller.traffic_key(GROUP).unwrap();
        for (i, m) in net.members.iter().enumerate() {
            if i == 7 || i == leaver {
                continue;
            }
            let (e, k) = m.traffic_key().unwrap();
            assert_eq!((e, k.as_bytes()), (now_epoch, key.as_bytes()), "member {i}");
        }
        assert_eq!(net.state(), net.stored());
    }
}

/// The outcome of save `ticket` when the database went away.
fn failed_save(ticket: gkm_server::PersistTicket) -> gkm_server::Persisted {
    gkm_server::Persisted {
        ticket,
        result: Err(StoreError::Backend("the database went away (test)".into())),
        compacting: false,
        compaction_failures: Vec::new(),
        compaction_deferred: false,
    }
}

/// The epochs of the heartbeats among `transmits`.
fn heartbeat_epochs(controller: &mut Controller<ChaCha20Rng>) -> Vec<Epoch> {
    let key = ed25519_dalek::VerifyingKey::from_bytes(&controller.public_key()).unwrap();
    let mut epochs = Vec::new();
    while let Some(t) = controller.poll_transmit() {
        if let Transmit::Multicast { bytes, .. } = t
            && let Ok(beat) = wire::open::<wire::Heartbeat>(&bytes, &key)
        {
            epochs.push(beat.message().epoch);
        }
    }
    epochs
}

/// GKM-V060: a heartbeat that falls due with a rekey waits for the rekey's save: it never
/// announces the staged epoch (found by `tests/ha.rs` with 1,000 members: a new leader's first
/// rekey, refused as deposed, had been announced by a heartbeat with its key check value).
#[test]
fn v060_a_heartbeat_due_with_a_staged_rekey_announces_only_committed_epochs() {
    for durable in [false, true] {
        let mut net = Net::new(6, 1);
        net.advance(1_000);
        let epoch = net.controller.traffic_key(GROUP).unwrap().0;
        // Both due at once: the eviction's rekey, and a heartbeat (interval 500 ms).
        let now = Timestamp(net.now + 5_000);
        let id = net.members[5].membership().unwrap().0.0;
        let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
        controller
            .handle_command(now, Command::Evict("demo".into(), id))
            .unwrap();
        controller.handle_timeout(now);
        let persist = controller.poll_persist().expect("a save is asked for");
        assert!(
            heartbeat_epochs(controller).is_empty(),
            "no heartbeat while the rekey's save is outstanding"
        );
        let ticket = persist.ticket;
        let done = if durable {
            persist.write(&mut net.store.clone())
        } else {
            drop(persist);
            failed_save(ticket)
        };
        let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
        controller.handle_persisted(now, done);
        controller.handle_timeout(now);
        let committed = controller.traffic_key(GROUP).unwrap().0;
        let beats = heartbeat_epochs(controller);
        // Committed, the rekey itself carries the new epoch and check value and puts the
        // heartbeat off by an interval (issue 15); refused, the heartbeat goes out at once.
        assert_eq!(
            beats.is_empty(),
            durable,
            "durable {durable}: heartbeats {beats:?} once the save is reported"
        );
        assert!(
            beats.iter().all(|e| *e == committed),
            "durable {durable}: heartbeats {beats:?}, committed {committed:?}"
        );
        assert_eq!(committed > epoch, durable);
    }
}

/// GKM-V061: a save answered `Deposed` (another controller took the group's lease) drops the
/// staged rekey unsent and releases the group: nothing of it is sent from then on, its requests
/// (those that waited for the save too) are answered 421 `NotLeader`, and commands on it say it
/// is led elsewhere; the members keep the last durable epoch.
#[test]
fn v061_a_deposed_leader_sends_nothing_more_and_answers_not_leader() {
    let mut net = Net::new(6, 1);
    net.advance(1_000);
    let epoch = net.controller.traffic_key(GROUP).unwrap().0;
    let now = Timestamp(net.now);
    let id = net.members[5].membership().unwrap().0.0;
    let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
    controller
        .handle_command(now, Command::Evict("demo".into(), id))
        .unwrap();
    controller.handle_timeout(now);
    let persist = controller.poll_persist().expect("a save is asked for");
    // A registration waits for the save's outcome.
    let joiner = net.add_member();
    let registration = net.members[joiner].poll_request().unwrap();
    let controller: &mut Controller<ChaCha20Rng> = &mut net.controller;
    controller.handle_request(ConnId(joiner as u64), now, &registration);
    controller.handle_persisted(
        now,
        gkm_server::Persisted {
            ticket: persist.ticket,
            result: Err(StoreError::Deposed {
                group: GROUP,
                term: 4,
            }),
            compacting: false,
            compaction_failures: Vec::new(),
            compaction_deferred: false,
        },
    );
    let mut replies = Vec::new();
    while let Some(t) = controller.poll_transmit() {
        match t {
            Transmit::Multicast { .. } => panic!("a deposed leader multicast something"),
            Transmit::Reply { conn, bytes } => replies.push((conn, bytes)),
        }
    }
    let code = |bytes: &[u8]| {
        <wire::ErrorMessage as wire::Codec>::decode_exact(bytes)
            .ok()
            .map(|e| e.status)
    };
    assert_eq!(replies.len(), 1, "the waiting registration is answered");
    assert_eq!(code(&replies[0].1), Some(wire::Status::NotLeader));
    let events: Vec<Event> = std::iter::from_fn(|| controller.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Deposed { term: 4, .. })),
        "{events:?}"
    );
    assert!(matches!(
        controller.handle_command(now, Command::Members("demo".into())),
        Err(gkm_server::CommandError::NotLeader { .. })
    ));
    // Time passes: no heartbeat, no rekey, no repeat of the group; a resync is sent elsewhere.
    let later = Timestamp(net.now + 10_000);
    controller.handle_timeout(later);
    assert!(controller.poll_persist().is_none());
    while let Some(t) = controller.poll_transmit() {
        assert!(
            !matches!(t, Transmit::Multicast { .. }),
            "sent after deposed"
        );
    }
    let mut resync = None;
    net.members[0].handle_timeout(later.0 + 600_000);
    while let Some(request) = net.members[0].poll_request() {
        resync = Some(request);
    }
    if let Some(request) = resync {
        net.controller.handle_request(ConnId(0), later, &request);
        let Some(Transmit::Reply { bytes, .. }) = net.controller.poll_transmit() else {
            panic!("the resync is answered");
        };
        assert_eq!(code(&bytes), Some(wire::Status::NotLeader));
    }
    assert_eq!(
        net.highest_member_epoch(),
        epoch,
        "nothing of the staged epoch"
    );
}
