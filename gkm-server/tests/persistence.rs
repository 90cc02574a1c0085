//! Incremental persistence: after random churn (evictions, joins, lease renewals), the deltas the
//! controller saved rebuild exactly its in-memory state, in memory and on disk, and a controller
//! restarted from the disk continues the group.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

mod support;

use ed25519_dalek::SigningKey;
use gkm_server::{
    Command, CompactionFailure, ConnId, Controller, DiskStore, Event, GroupDelta, GroupPolicy,
    GroupState, MemberRecord, MemoryStore, Response, Store, StoreDriver, StoreError, Timestamp,
};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{HpkeSecret, MemberId, RegistrationRequest, ResyncRequest, sign};

const GROUP: GroupId = GroupId(3);
const START: u64 = 1_800_000_000_000;
const KEY: [u8; 32] = [5; 32];

/// Both stores, written in step; the disk one can be taken out to reopen its file.
#[derive(Clone)]
struct Tee(Arc<Mutex<(MemoryStore, Option<DiskStore>)>>);

impl Store for Tee {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        let mut both = self.0.lock().unwrap();
        both.0.save(state)?;
        both.1.as_mut().unwrap().save(state)
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        let mut both = self.0.lock().unwrap();
        both.0.save_delta(delta)?;
        both.1.as_mut().unwrap().save_delta(delta)
    }
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        let mut both = self.0.lock().unwrap();
        both.0.save_delta_and_compact(delta, state.clone())?;
        both.1
            .as_mut()
            .unwrap()
            .save_delta_and_compact(delta, state)
    }
    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.0
            .lock()
            .unwrap()
            .1
            .as_mut()
            .unwrap()
            .take_compaction_failure()
    }
    fn compacting(&mut self) -> bool {
        self.0.lock().unwrap().1.as_mut().unwrap().compacting()
    }
}

type Contents = (
    u64,
    Vec<(u32, Option<u32>, bool, u64, [u8; 32])>,
    Vec<MemberRecord>,
);

/// Comparable contents: the epoch, nodes by id with their key bytes, members by leaf.
fn contents(state: &GroupState) -> Contents {
    let mut nodes: Vec<_> = state
        .tree
        .nodes
        .iter()
        .map(|n| {
            (
                n.id.0,
                n.parent.map(|p| p.0),
                n.leaf,
                n.version.0,
                *n.key.as_bytes(),
            )
        })
        .collect();
    nodes.sort_unstable();
    let mut members = state.members.clone();
    members.sort_by_key(|m| m.leaf);
    (state.tree.epoch.0, nodes, members)
}

fn policy() -> GroupPolicy {
    let mut p = GroupPolicy::new("g", GROUP);
    p.batch_interval_ms = 1_000;
    p.heartbeat_interval_ms = 1_000;
    p.lease_ms = 3_600_000;
    // Its members register with X25519 keys: the group takes both KEMs.
    p.kems = vec![wire::Kem::XWing, wire::Kem::X25519];
    p
}

fn initial(members: usize) -> GroupState {
    support::stored_group(GROUP, members, 8, Timestamp(START + 3_600_000))
}

struct Run {
    controller: StoreDriver<ChaCha20Rng>,
    rng: ChaCha20Rng,
    now: u64,
    conn: u64,
    /// Identity keys of the members that joined by request, by public key.
    keys: HashMap<[u8; 32], (SigningKey, wire::HpkePublicKey)>,
}

impl Run {
    fn members(&mut self) -> Vec<(u64, [u8; 32])> {
        let Ok(Response::Members(list)) = self
            .controller
            .handle_command(Timestamp(self.now), Command::Members("g".into()))
        else {
            panic!("members")
        };
        list.iter()
            .map(|m| {
                let mut identity = [0u8; 32];
                for (i, byte) in identity.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&m.identity[2 * i..2 * i + 2], 16).unwrap();
                }
                (m.id, identity)
            })
            .collect()
    }

    fn join(&mut self) {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let identity = SigningKey::from_bytes(&seed);
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let request = RegistrationRequest {
            group: GROUP,
            identity: identity.verifying_key().to_bytes(),
            hpke_key: HpkeSecret::generate(wire::Kem::X25519, &mut self.rng)
                .public_key()
                .unwrap(),
            timestamp_ms: self.now,
            nonce,
            token: Vec::new(),
        };
        self.conn += 1;
        self.controller.handle_request(
            ConnId(self.conn),
            Timestamp(self.now),
            &sign(&request, &identity),
        );
        self.keys
            .insert(request.identity, (identity, request.hpke_key));
    }

    fn renew(&mut self, member: u64, identity: &[u8; 32]) {
        let Some((key, hpke_key)) = self.keys.get(identity) else {
            return;
        };
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        // At the current epoch with its keys: a renewal, answered without a path.
        let (epoch, traffic) = self.controller.traffic_key(GROUP).expect("the group");
        let request = ResyncRequest {
            group: GROUP,
            member: MemberId(member),
            epoch,
            kcv: traffic.check_value(),
            timestamp_ms: self.now,
            nonce,
            hpke_key: hpke_key.clone(),
        };
        self.conn += 1;
        self.controller.handle_request(
            ConnId(self.conn),
            Timestamp(self.now),
            &sign(&request, key),
        );
    }

    /// One batch: evictions, joins and renewals, then the rekey a second later; returns the
    /// events.
    fn churn(&mut self) -> Vec<Event> {
        let members = self.members();
        for (id, identity) in &members {
            match self.rng.next_u32() % 8 {
                0 => {
                    self.controller
                        .handle_command(Timestamp(self.now), Command::Evict("g".into(), *id))
                        .unwrap();
                }
                1 => self.renew(*id, identity),
                _ => {}
            }
        }
        for _ in 0..self.rng.next_u32() % 50 {
            self.join();
        }
        self.now += 1_000;
        self.controller.handle_timeout(Timestamp(self.now));
        while self.controller.poll_transmit().is_some() {}
        let events = std::iter::from_fn(|| self.controller.poll_event()).collect();
        self.now += 500;
        events
    }

    fn state(&self) -> GroupState {
        self.controller.group_state(GROUP).unwrap()
    }
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gkm-persist-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Asserts that the store neither failed nor failed to compact.
fn no_failure(events: &[Event]) {
    for event in events {
        assert!(
            !matches!(
                event,
                Event::StoreFailed { .. } | Event::CompactionFailed { .. }
            ),
            "{event:?}"
        );
    }
}

fn start(restored: Vec<GroupState>, store: Box<dyn Store + Send>, now: u64, seed: u64) -> Run {
    let mut controller = StoreDriver::new(
        Controller::new(
            SigningKey::from_bytes(&[9; 32]),
            ChaCha20Rng::seed_from_u64(seed),
            vec![policy()],
            restored,
            Timestamp(now),
        )
        .unwrap(),
        store,
    );
    // Two workers: the save runs on its own thread while the datagrams are signed.
    controller.set_workers(2);
    Run {
        controller,
        rng: ChaCha20Rng::seed_from_u64(seed + 1),
        now,
        conn: 0,
        keys: HashMap::new(),
    }
}

#[test]
fn saved_deltas_rebuild_the_controllers_state_in_memory_and_on_disk() {
    rebuild("churn", 200);
}

/// Compactions of more than one transaction (over about 43,000 records) run on the disk store's
/// own thread.
#[test]
fn a_large_group_compacted_in_the_background_reloads_as_the_controller_holds_it() {
    rebuild("churn-large", 60_000);
}

/// Churn through the controller into a memory store and a disk store side by side, every round
/// compared; then the disk store reopened and the group continued from it.
fn rebuild(name: &str, members: usize) {
    let dir = temp(name);
    let path = dir.join("state.redb");
    let base = initial(members);
    let (mut disk, loaded) = DiskStore::open(&path, &KEY).unwrap();
    assert!(loaded.is_empty());
    disk.save(&base).unwrap();
    let mut memory = MemoryStore::default();
    memory.save(&base).unwrap();
    let store = Tee(Arc::new(Mutex::new((memory, Some(disk)))));
    let mut run = start(vec![base], Box::new(store.clone()), START, 1);
    run.controller.handle_timeout(Timestamp(START));
    for round in 0..16 {
        no_failure(&run.churn());
        let saved = store.0.lock().unwrap().0.states();
        assert_eq!(saved.len(), 1);
        assert_eq!(contents(&saved[0]), contents(&run.state()), "round {round}");
    }
    let (saves, deltas) = {
        let both = store.0.lock().unwrap();
        (both.0.saves, both.0.deltas)
    };
    assert!(
        saves >= 2,
        "compaction wrote the state again ({saves} full saves)"
    );
    assert!(deltas >= 10, "most rekeys saved deltas ({deltas})");
    let renewed = run
        .state()
        .members
        .iter()
        .filter(|m| m.lease_until.0 > START + 3_600_000)
        .count();
    assert!(renewed > 0, "some leases were renewed");

    // Reopen the file: the same state, and a controller restarted from it continues the group.
    let want = run.state();
    let (epoch, now) = (want.tree.epoch, run.now);
    drop(run);
    store.0.lock().unwrap().1 = None;
    let (disk, loaded) = DiskStore::open(&path, &KEY).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(contents(&loaded[0]), contents(&want));
    let mut memory = MemoryStore::default();
    memory.save(&loaded[0]).unwrap();
    let store = Tee(Arc::new(Mutex::new((memory, Some(disk)))));
    let mut run = start(loaded, Box::new(store.clone()), now, 50);
    run.controller.handle_timeout(Timestamp(now));
    no_failure(&run.churn());
    assert!(run.state().tree.epoch > epoch);
    assert_eq!(
        contents(&store.0.lock().unwrap().0.states()[0]),
        contents(&run.state())
    );
    drop(run);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store in memory whose compactions fail (reported later, as a store that compacts in the
/// background does), counting them.
#[derive(Clone, Default)]
struct FailingCompactions(Arc<Mutex<(MemoryStore, usize, Option<CompactionFailure>)>>);

impl Store for FailingCompactions {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.0.lock().unwrap().0.save(state)
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.0.lock().unwrap().0.save_delta(delta)
    }
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        let mut store = self.0.lock().unwrap();
        store.0.save_delta(delta)?;
        store.1 += 1;
        store.2 = Some(CompactionFailure {
            group: state.tree.group,
            epoch: state.tree.epoch,
            error: StoreError::Backend("no space left on device".into()),
        });
        Ok(())
    }
    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.0.lock().unwrap().2.take()
    }
}

#[test]
fn a_failed_compaction_is_reported_and_deltas_are_saved_as_before() {
    let base = initial(200);
    let store = FailingCompactions::default();
    store.0.lock().unwrap().0.save(&base).unwrap();
    let mut run = start(vec![base], Box::new(store.clone()), START, 3);
    run.controller.handle_timeout(Timestamp(START));
    let mut reported = 0;
    for round in 0..16 {
        for event in run.churn() {
            match event {
                Event::CompactionFailed { error, .. } => {
                    assert!(error.contains("no space left"), "{error}");
                    reported += 1;
                }
                Event::StoreFailed { .. } => panic!("{event:?}"),
                _ => {}
            }
        }
        let saved = store.0.lock().unwrap().0.states();
        assert_eq!(contents(&saved[0]), contents(&run.state()), "round {round}");
    }
    let both = store.0.lock().unwrap();
    let (saves, tried) = (both.0.saves, both.1);
    assert!(tried >= 2, "compactions were tried again ({tried})");
    assert_eq!(reported, tried, "each failure is reported");
    assert_eq!(saves, 1, "no full save: the deltas were all durable");
}

/// A store in memory that says it is compacting while `busy` is set, and records the round of
/// each compaction asked of it.
#[derive(Clone, Default)]
struct BusyStore(Arc<Mutex<BusyState>>);

#[derive(Default)]
struct BusyState {
    store: MemoryStore,
    busy: bool,
    round: usize,
    compactions: Vec<usize>,
}

impl Store for BusyStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.0.lock().unwrap().store.save(state)
    }
    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.0.lock().unwrap().store.save_delta(delta)
    }
    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        let mut busy = self.0.lock().unwrap();
        assert!(!busy.busy, "a compaction was asked for while one ran");
        let round = busy.round;
        busy.compactions.push(round);
        busy.store.save_delta_and_compact(delta, state)
    }
    fn compacting(&mut self) -> bool {
        self.0.lock().unwrap().busy
    }
}

#[test]
fn a_compaction_due_while_another_runs_is_asked_for_at_the_first_rekey_after_it() {
    let base = initial(200);
    let store = BusyStore::default();
    store.0.lock().unwrap().store.save(&base).unwrap();
    let mut run = start(vec![base], Box::new(store.clone()), START, 4);
    run.controller.handle_timeout(Timestamp(START));
    // Free, then busy long past the point where a compaction is due, then free again.
    let busy_rounds = 6..18;
    for round in 0..24 {
        {
            let mut state = store.0.lock().unwrap();
            state.round = round;
            state.busy = busy_rounds.contains(&round);
        }
        no_failure(&run.churn());
        let saved = store.0.lock().unwrap().store.states();
        assert_eq!(contents(&saved[0]), contents(&run.state()), "round {round}");
    }
    let compactions = store.0.lock().unwrap().compactions.clone();
    let waited = compactions.iter().position(|r| *r >= busy_rounds.end);
    assert!(
        compactions.iter().all(|r| !busy_rounds.contains(r)),
        "{compactions:?}"
    );
    assert!(
        compactions.len() >= 2 && waited.is_some(),
        "compactions before and after the busy rounds: {compactions:?}"
    );
    // The controller learns that the store is free from the report of its next save, so the
    // compaction held back comes with the first or second rekey after the busy rounds.
    assert!(
        (busy_rounds.end..=busy_rounds.end + 1).contains(&compactions[waited.unwrap()]),
        "the compaction held back is asked for right after: {compactions:?}"
    );
}
