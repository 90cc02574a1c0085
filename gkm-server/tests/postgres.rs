//! The PostgreSQL store against a real server the test starts (`support::postgres`): round trips
//! against `MemoryStore`, corruption refusals, schema versions, fencing by leases, and a database
//! restart between saves. Needs Debian's `postgresql` (`initdb`, `pg_ctl`); fails saying so
//! unless `GKM_SKIP_POSTGRES=1`.

mod support;

use std::time::{Duration, Instant};

use gkm_server::{
    EnrollmentChanges, GroupDelta, GroupRecords, GroupState, KeyFit, MemberRecord, MemoryStore,
    PgConfig, PgStore, SCHEMA_VERSION, Store, StoreError, Timestamp,
};
use lkh_tree::{Batch, GroupId, KeyTree, NodeId, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use support::postgres::{PgServer, wait_until};
use wire::MemberId;

const KEY: [u8; 32] = [7; 32];

fn config(server: &PgServer) -> PgConfig {
    PgConfig {
        url: server.url(),
        password_file: None,
    }
}

fn open(server: &PgServer, holder: &str) -> (PgStore, Vec<GroupState>) {
    PgStore::open(
        &config(server),
        &KEY,
        holder,
        &format!("{holder}.example:7000"),
    )
    .unwrap()
}

/// A plain connection, to look at and alter the tables as an attacker or operator would.
fn sql(server: &PgServer) -> postgres::Client {
    postgres::Client::connect(&server.url(), postgres::NoTls).unwrap()
}

fn member(leaf: NodeId, joined: u64) -> MemberRecord {
    MemberRecord {
        id: MemberId((u64::from(leaf.0) << 32) | joined),
        identity: [u8::try_from(leaf.0 % 251).unwrap(); 32],
        hpke: gkm_server::HpkeDigest {
            kem: wire::Kem::XWing,
            digest: [2; 32],
        },
        leaf,
        joined,
        lease_until: Timestamp(99),
    }
}

/// Comparable contents of a state: tree parameters and epoch, nodes by id (keys included),
/// members by leaf, enrollment records.
fn contents(state: &GroupState) -> String {
    let mut nodes: Vec<_> = state
        .tree
        .nodes
        .iter()
        .map(|n| (n.id, n.parent, n.leaf, n.version, *n.key.as_bytes()))
        .collect();
    nodes.sort_by_key(|n| n.0);
    let mut members = state.members.clone();
    members.sort_by_key(|m| m.leaf);
    format!(
        "{:?} {:?} {:?} {nodes:?} {members:?} {:?}",
        state.tree.group, state.tree.config, state.tree.epoch, state.enrollment
    )
}

/// Random churn of one real group: a key tree, its members, and the deltas between them.
struct Churn {
    rng: ChaCha20Rng,
    tree: KeyTree,
    records: GroupRecords,
    /// One member in this many leaves at each rekey.
    leave_one_in: u32,
}

impl Churn {
    fn new(group: u64, members: usize, seed: u64) -> Churn {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut tree = KeyTree::new(GroupId(group), TreeConfig::default(), &mut rng).unwrap();
        let joins = Batch {
            leaves: vec![],
            joins: members,
        };
        tree.rekey(&joins, &mut rng).unwrap();
        tree.track_changes();
        let records = GroupRecords::from_state(&GroupState {
            tree: tree.snapshot(),
            members: tree.members().map(|l| member(l, 1)).collect(),
            enrollment: Default::default(),
            signing: Vec::new(),
        });
        Churn {
            rng,
            tree,
            records,
            leave_one_in: 5,
        }
    }

    /// Continues from a loaded state (a new leader's view).
    fn resume(state: &GroupState, seed: u64) -> Churn {
        let mut tree = KeyTree::restore(&state.tree).unwrap();
        tree.track_changes();
        Churn {
            rng: ChaCha20Rng::seed_from_u64(seed),
            tree,
            records: GroupRecords::from_state(state),
            leave_one_in: 5,
        }
    }

    /// One rekey: about one member in `leave_one_in` leaves, up to 60 join; a token spent and an
    /// identity banned, every third round a ban lifted.
    fn delta(&mut self) -> GroupDelta {
        let (rng, one_in) = (&mut self.rng, self.leave_one_in);
        let leaves: Vec<NodeId> = self
            .tree
            .members()
            .filter(|_| rng.next_u32().is_multiple_of(one_in))
            .collect();
        let joins = usize::try_from(rng.next_u32() % 60).unwrap();
        let batch = Batch {
            leaves: leaves.clone(),
            joins,
        };
        let rekey = self.tree.rekey(&batch, rng).unwrap();
        let epoch = self.tree.epoch().0;
        let tag = epoch.to_be_bytes()[7];
        let delta = GroupDelta {
            group: self.tree.group(),
            config: self.tree.config(),
            epoch: self.tree.epoch(),
            tree: self.tree.take_changes(),
            members: rekey
                .joiners
                .iter()
                .map(|j| member(j.leaf, epoch))
                .collect(),
            removed_members: leaves,
            enrollment: EnrollmentChanges {
                spent: vec![[tag; 32]],
                banned: vec![[tag; 32]],
                unbanned: if epoch.is_multiple_of(3) {
                    vec![[tag.wrapping_sub(1); 32]]
                } else {
                    Vec::new()
                },
            },
            signing: Vec::new(),
        };
        self.records.apply(&delta);
        delta
    }

    fn state(&self) -> GroupState {
        GroupState {
            tree: self.tree.snapshot(),
            members: self.records.members.values().cloned().collect(),
            enrollment: self.records.enrollment.clone(),
            signing: Vec::new(),
        }
    }
}

/// Both stores, fed the same calls.
struct Pair<'a> {
    pg: &'a mut PgStore,
    memory: MemoryStore,
}

impl Pair<'_> {
    fn save(&mut self, state: &GroupState) {
        self.pg.save(state).unwrap();
        self.memory.save(state).unwrap();
    }
    fn delta(&mut self, delta: &GroupDelta) {
        self.pg.save_delta(delta).unwrap();
        self.memory.save_delta(delta).unwrap();
    }
    fn compact(&mut self, delta: &GroupDelta, state: GroupState) {
        self.pg
            .save_delta_and_compact(delta, state.clone())
            .unwrap();
        self.memory.save_delta_and_compact(delta, state).unwrap();
    }
}

fn count(client: &mut postgres::Client, query: &str) -> i64 {
    client.query_one(query, &[]).unwrap().get(0)
}

#[test]
fn saves_deltas_and_compactions_load_as_the_memory_store_holds_them() {
    let Some(server) = PgServer::start("roundtrip") else {
        return;
    };
    let (mut store, loaded) = open(&server, "a");
    assert!(loaded.is_empty());
    let lease = Duration::from_secs(60);
    for group in [4, 5] {
        assert_eq!(store.claim(GroupId(group), lease).unwrap().unwrap().term, 1);
    }
    // Group 4 small (compacted in full at once), group 5 over one compaction transaction
    // (compacted on the thread while deltas are saved).
    let mut small = Churn::new(4, 300, 1);
    let mut large = Churn::new(5, 40_000, 2);
    large.leave_one_in = 100;
    let mut pair = Pair {
        pg: &mut store,
        memory: MemoryStore::default(),
    };
    pair.save(&small.state());
    pair.save(&large.state());
    for round in 0..10 {
        let delta = small.delta();
        match round {
            4 => pair.save(&small.state()),
            7 => pair.compact(&delta, small.state()),
            _ => pair.delta(&delta),
        }
        pair.delta(&large.delta());
    }
    let delta = large.delta();
    pair.compact(&delta, large.state());
    assert!(
        pair.pg.compacting(),
        "a large state is compacted on the thread"
    );
    for _ in 0..3 {
        pair.delta(&large.delta());
        pair.delta(&small.delta());
    }
    let memory = std::mem::take(&mut pair.memory);
    assert!(wait_until(Duration::from_secs(60), || !store.compacting()));
    assert!(store.take_compaction_failure().is_none());

    // The compaction left the new base and the deltas after it, nothing else.
    let mut client = sql(&server);
    let old_log = count(
        &mut client,
        "SELECT count(*) FROM gkm_log WHERE group_id = 5",
    );
    assert_eq!(
        old_log, 3,
        "only the three deltas saved during the compaction"
    );

    let want: Vec<String> = memory.states().iter().map(contents).collect();
    let position = store.log_position(GroupId(5)).unwrap().unwrap();
    assert_eq!(position.epoch, large.tree.epoch());
    assert_eq!(
        contents(&store.load_group(GroupId(5)).unwrap().unwrap()),
        want[1]
    );
    assert!(store.load_group(GroupId(6)).unwrap().is_none());
    assert!(store.log_position(GroupId(6)).unwrap().is_none());
    drop(store);
    let (_, loaded) = open(&server, "b");
    let got: Vec<String> = loaded.iter().map(contents).collect();
    assert_eq!(got, want);
    for state in &loaded {
        KeyTree::restore(&state.tree).unwrap();
    }
}

/// A database holding groups 4 and 5, each a full save and then deltas; its good tables are
/// kept as `good_*` to restore between tamperings.
fn good_database(server: &PgServer) -> postgres::Client {
    let (mut store, _) = open(server, "a");
    for group in [4, 5] {
        store
            .claim(GroupId(group), Duration::from_secs(60))
            .unwrap()
            .unwrap();
        let mut churn = Churn::new(group, 300, group);
        store.save(&churn.state()).unwrap();
        for _ in 0..5 {
            store.save_delta(&churn.delta()).unwrap();
        }
    }
    drop(store);
    let mut client = sql(server);
    client
        .batch_execute(
            "CREATE TABLE good_log AS SELECT * FROM gkm_log;
             CREATE TABLE good_bases AS SELECT * FROM gkm_bases;
             CREATE TABLE good_heads AS SELECT * FROM gkm_heads;",
        )
        .unwrap();
    client
}

/// Restores the good tables, applies `tamper`, and returns what opening the store says.
fn tampered(server: &PgServer, client: &mut postgres::Client, tamper: &str) -> String {
    client
        .batch_execute(&format!(
            "BEGIN;
             TRUNCATE gkm_log, gkm_bases, gkm_heads;
             INSERT INTO gkm_log SELECT * FROM good_log;
             INSERT INTO gkm_bases SELECT * FROM good_bases;
             INSERT INTO gkm_heads SELECT * FROM good_heads;
             {tamper};
             COMMIT;"
        ))
        .unwrap();
    match PgStore::open(&config(server), &KEY, "c", "c") {
        Err(StoreError::Corrupt(message)) => message,
        Err(other) => panic!("{tamper}: expected Corrupt, got {other}"),
        Ok((_, states)) => panic!("{tamper}: expected Corrupt, loaded {} groups", states.len()),
    }
}

#[test]
fn v036_altered_missing_moved_or_stray_rows_are_refused() {
    let Some(server) = PgServer::start("corrupt") else {
        return;
    };
    let mut client = good_database(&server);
    // The log run of group 4: five deltas after the base.
    let (first, last): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT min(seq), max(seq) FROM gkm_log WHERE group_id = 4",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(last - first, 4);
    let middle = first + 2;
    let cases = [
        (
            format!(
                "UPDATE gkm_log SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) \
                 WHERE group_id = 4 AND seq = {middle}"
            ),
            "does not authenticate",
        ),
        (
            "UPDATE gkm_bases SET sealed = set_byte(sealed, 30, get_byte(sealed, 30) # 1) \
             WHERE group_id = 5"
                .to_owned(),
            "does not authenticate",
        ),
        (
            format!("DELETE FROM gkm_log WHERE group_id = 4 AND seq = {middle}"),
            "out of sequence",
        ),
        (
            format!("DELETE FROM gkm_log WHERE group_id = 4 AND seq = {last}"),
            "missing",
        ),
        (
            "DELETE FROM gkm_bases WHERE group_id = 4".to_owned(),
            "missing",
        ),
        // Rows swapped between the groups (same positions).
        (
            format!(
                "UPDATE gkm_log SET group_id = 9 WHERE group_id = 4 AND seq = {middle};
                 UPDATE gkm_log SET group_id = 4 WHERE group_id = 5 AND seq = {middle};
                 UPDATE gkm_log SET group_id = 5 WHERE group_id = 9"
            ),
            "does not authenticate",
        ),
        // Heads swapped between the groups.
        (
            "UPDATE gkm_heads SET group_id = -group_id;
             UPDATE gkm_heads SET group_id = 9 - (-group_id) WHERE group_id < 0"
                .to_owned(),
            "head does not authenticate",
        ),
        // A base row put in the log.
        (
            format!(
                "UPDATE gkm_log SET sealed = (SELECT sealed FROM gkm_bases WHERE group_id = 4 \
                 ORDER BY seq LIMIT 1) WHERE group_id = 4 AND seq = {middle}"
            ),
            "does not authenticate",
        ),
        // An old row left before the run.
        (
            format!(
                "INSERT INTO gkm_log SELECT group_id, {first} - 1, sealed FROM gkm_log \
                 WHERE group_id = 4 AND seq = {first}"
            ),
            "out of sequence",
        ),
        // Log rows of a group with no head.
        (
            "INSERT INTO gkm_log SELECT 9, seq, sealed FROM gkm_log WHERE group_id = 4".to_owned(),
            "g9: has log rows but no head",
        ),
        // The epoch in the clear does not match the rows.
        (
            "UPDATE gkm_heads SET epoch = epoch + 1 WHERE group_id = 5".to_owned(),
            "head says epoch",
        ),
    ];
    for (tamper, want) in &cases {
        let message = tampered(&server, &mut client, tamper);
        assert!(message.contains(want), "{tamper}: {message}");
    }
    // Restored, it loads; under another storage key it does not.
    tampered_ok(&server, &mut client);
    assert!(matches!(
        PgStore::open(&config(&server), &[8; 32], "c", "c"),
        Err(StoreError::Corrupt(_))
    ));
}

fn tampered_ok(server: &PgServer, client: &mut postgres::Client) {
    client
        .batch_execute(
            "TRUNCATE gkm_log, gkm_bases, gkm_heads;
             INSERT INTO gkm_log SELECT * FROM good_log;
             INSERT INTO gkm_bases SELECT * FROM good_bases;
             INSERT INTO gkm_heads SELECT * FROM good_heads;",
        )
        .unwrap();
    let (_, states) = open(server, "c");
    assert_eq!(states.len(), 2);
}

#[test]
fn a_schema_newer_than_the_binary_is_refused_and_concurrent_opens_migrate_once() {
    let Some(server) = PgServer::start("schema") else {
        return;
    };
    // Four controllers starting at once on an empty database.
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let config = config(&server);
            std::thread::spawn(move || {
                PgStore::open(&config, &KEY, &format!("h{i}"), "x").map(|(_, s)| s.len())
            })
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().unwrap().unwrap(), 0);
    }
    let mut client = sql(&server);
    // Each migration recorded once.
    assert_eq!(
        count(&mut client, "SELECT count(*) FROM gkm_schema"),
        i64::from(SCHEMA_VERSION)
    );
    assert_eq!(
        count(&mut client, "SELECT max(version)::bigint FROM gkm_schema"),
        i64::from(SCHEMA_VERSION)
    );

    let newer = SCHEMA_VERSION + 1;
    client
        .execute("INSERT INTO gkm_schema (version) VALUES ($1)", &[&newer])
        .unwrap();
    let error = PgStore::open(&config(&server), &KEY, "a", "a").unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, StoreError::Backend(_)), "{message}");
    assert!(
        message.contains(&format!("version {newer}"))
            && message.contains(&format!("version {SCHEMA_VERSION}")),
        "{message}"
    );
}

/// GKM-V073, GKM-V075 (PostgreSQL): the storage key is rotated in one transaction, every head
/// and row re-sealed (rows a cut-short compaction left are deleted); refused, changing nothing,
/// while a controller holds a live lease; afterwards the old key opens nothing and the new one
/// loads the same state, which goes on.
#[test]
fn v075_the_storage_key_rotates_in_one_transaction_and_never_under_a_live_lease() {
    let Some(server) = PgServer::start("reseal") else {
        return;
    };
    const NEW: [u8; 32] = [8; 32];
    let (group, lease) = (GroupId(4), Duration::from_secs(30));
    let (mut a, _) = open(&server, "a");
    let mut churn = Churn::new(4, 60_000, 2);
    a.claim(group, lease).unwrap().unwrap();
    a.save(&churn.state()).unwrap();
    a.save_delta(&churn.delta()).unwrap();
    a.save_delta_and_compact(&churn.delta(), churn.state())
        .unwrap();
    a.save_delta(&churn.delta()).unwrap();
    let want = contents(&churn.state());
    // A base row no head names, as a compaction cut short leaves it.
    let mut client = sql(&server);
    client
        .execute(
            "INSERT INTO gkm_bases (group_id, seq, sealed) VALUES (4, 1000000, '\\x00')",
            &[],
        )
        .unwrap();

    let refused = PgStore::reseal(&config(&server), &KEY, &NEW).unwrap_err();
    assert!(
        matches!(&refused, StoreError::LeaseLive { group: g, holder } if *g == group && holder == "a"),
        "{refused}"
    );
    assert_eq!(
        PgStore::key_fit(&config(&server), &KEY).unwrap(),
        KeyFit::Opens
    );
    assert_eq!(
        PgStore::key_fit(&config(&server), &NEW).unwrap(),
        KeyFit::Refused
    );

    a.release(group).unwrap();
    drop(a);
    let done = PgStore::reseal(&config(&server), &KEY, &NEW).unwrap();
    assert_eq!((done.groups, done.dropped), (1, 1), "{done:?}");
    assert!(done.rows > 2, "{done:?}");
    assert_eq!(
        PgStore::key_fit(&config(&server), &KEY).unwrap(),
        KeyFit::Refused
    );
    assert!(matches!(
        PgStore::open(&config(&server), &KEY, "b", "b.example:7000"),
        Err(StoreError::Corrupt(_))
    ));
    let (mut b, loaded) = PgStore::open(&config(&server), &NEW, "b", "b.example:7000").unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(contents(&loaded[0]), want);
    b.claim(group, lease).unwrap().unwrap();
    b.save_delta(&churn.delta()).unwrap();
    assert_eq!(
        contents(&b.load_group(group).unwrap().unwrap()),
        contents(&churn.state())
    );
}

#[test]
fn a_deposed_leader_cannot_save_and_a_new_one_takes_over_after_expiry() {
    let Some(server) = PgServer::start("fencing") else {
        return;
    };
    let group = GroupId(4);
    let lease = Duration::from_secs(1);
    let (mut a, _) = open(&server, "a");
    let (mut b, _) = open(&server, "b");

    // Never claimed: a save is refused.
    let mut churn = Churn::new(4, 300, 1);
    assert!(matches!(
        a.save(&churn.state()),
        Err(StoreError::Deposed { group: g, term: 0 }) if g == group
    ));

    let claimed = a.claim(group, lease).unwrap().unwrap();
    assert_eq!(claimed.term, 1);
    assert!(claimed.until <= Instant::now() + lease);
    a.save(&churn.state()).unwrap();
    a.save_delta(&churn.delta()).unwrap();
    // Claiming again while holding it keeps the term.
    assert_eq!(a.claim(group, lease).unwrap().unwrap().term, 1);

    // B cannot take a live lease.
    assert!(b.claim(group, lease).unwrap().is_none());
    let leases = b.leases().unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].group, leases[0].term, leases[0].holder.as_str()),
        (group, 1, "a")
    );
    assert_eq!(leases[0].address, "a.example:7000");
    assert!(leases[0].expires_in.is_some_and(|d| d <= lease));

    // After it expires (by the database's clock), B takes it with the next term.
    std::thread::sleep(lease + Duration::from_millis(100));
    assert!(b.leases().unwrap()[0].expires_in.is_none());
    let taken = b.claim(group, lease * 30).unwrap().unwrap();
    assert_eq!(taken.term, 2);
    let a_state = churn.state();
    let loaded = b.load_group(group).unwrap().unwrap();
    assert_eq!(
        contents(&loaded),
        contents(&a_state),
        "B sees all A committed"
    );
    let mut b_churn = Churn::resume(&loaded, 9);
    let b_delta = b_churn.delta();
    b.save_delta(&b_delta).unwrap();

    // A, deposed, commits nothing: neither a delta, nor a full save, nor a renewal.
    let a_delta = churn.delta();
    assert!(matches!(
        a.save_delta(&a_delta),
        Err(StoreError::Deposed { group: g, term: 1 }) if g == group
    ));
    assert!(matches!(
        a.save(&churn.state()),
        Err(StoreError::Deposed { term: 1, .. })
    ));
    assert!(a.renew(group).unwrap().is_none());
    assert!(
        a.claim(group, lease).unwrap().is_none(),
        "B's lease is live"
    );
    let stored = b.load_group(group).unwrap().unwrap();
    assert_eq!(contents(&stored), contents(&b_churn.state()));
    assert_eq!(b.log_position(group).unwrap().unwrap().epoch, b_delta.epoch);

    // B renews and releases; the next claim (A's) raises the term again.
    assert_eq!(b.renew(group).unwrap().unwrap().term, 2);
    b.release(group).unwrap();
    assert!(matches!(
        b.save_delta(&b_churn.delta()),
        Err(StoreError::Deposed { term: 0, .. })
    ));
    assert_eq!(a.claim(group, lease).unwrap().unwrap().term, 3);
    let (_, states) = open(&server, "c");
    assert_eq!(
        contents(&states[0]),
        contents(&stored),
        "nothing after B's delta"
    );
}

#[test]
fn a_follower_keeps_a_warm_copy_through_deltas_full_saves_and_compactions() {
    let Some(server) = PgServer::start("follower") else {
        return;
    };
    let group = GroupId(4);
    let (mut a, _) = open(&server, "a");
    let (mut b, _) = open(&server, "b");
    let mut follower = b.follower().unwrap();
    assert!(follower.follow(group).unwrap().is_none(), "never saved");
    a.claim(group, Duration::from_secs(1)).unwrap().unwrap();
    let mut churn = Churn::new(4, 300, 3);
    a.save(&churn.state()).unwrap();
    let held = |follower: &gkm_server::Follower, a: &mut PgStore| {
        let state = follower.state(group).unwrap();
        assert_eq!(
            contents(&state),
            contents(&a.load_group(group).unwrap().unwrap())
        );
    };

    let first = follower.follow(group).unwrap().unwrap();
    assert!(first.reloaded && first.rows > 0);
    assert_eq!((first.epoch, first.members), (churn.tree.epoch(), 300));
    held(&follower, &mut a);
    let idle = follower.follow(group).unwrap().unwrap();
    assert_eq!((idle.rows, idle.reloaded), (0, false), "nothing committed");

    // Deltas: only the new log rows are read.
    for round in 0..12 {
        let delta = churn.delta();
        match round {
            5 => a.save(&churn.state()).unwrap(),
            9 => a.save_delta_and_compact(&delta, churn.state()).unwrap(),
            _ => a.save_delta(&delta).unwrap(),
        }
        if round % 2 == 1 {
            let step = follower.follow(group).unwrap().unwrap();
            let rewrote = matches!(round, 5 | 9);
            assert_eq!(step.reloaded, rewrote, "round {round}");
            assert!(step.rows > 0);
            assert_eq!(step.epoch, churn.tree.epoch());
            held(&follower, &mut a);
        }
    }

    // A tampered row appended after the copy is refused, and the copy dropped.
    a.save_delta(&churn.delta()).unwrap();
    let mut client = sql(&server);
    client
        .execute(
            "UPDATE gkm_log SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1)
             WHERE group_id = 4 AND seq = (SELECT max(seq) FROM gkm_log WHERE group_id = 4)",
            &[],
        )
        .unwrap();
    assert!(matches!(
        follower.follow(group),
        Err(StoreError::Corrupt(_))
    ));
    assert!(follower.state(group).is_none());
    assert!(a.load_group(group).is_err(), "a load refuses it too");
    a.save(&churn.state()).unwrap();
    assert!(follower.follow(group).unwrap().unwrap().reloaded);

    // Takeover: B claims once A's lease ran out and takes the copy, caught up to A's last save.
    a.save_delta(&churn.delta()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        b.claim(group, Duration::from_secs(30))
            .unwrap()
            .unwrap()
            .term,
        2
    );
    let taken = follower.take(group).unwrap().unwrap();
    assert_eq!(contents(&taken), contents(&churn.state()));
    assert!(follower.state(group).is_none(), "handed over");
}

#[test]
fn a_save_while_the_database_is_down_fails_quickly_and_the_next_one_after_works() {
    let Some(server) = PgServer::start("restart") else {
        return;
    };
    let group = GroupId(4);
    let (mut store, _) = open(&server, "a");
    store
        .claim(group, Duration::from_secs(600))
        .unwrap()
        .unwrap();
    let mut churn = Churn::new(4, 300, 1);
    store.save(&churn.state()).unwrap();
    store.save_delta(&churn.delta()).unwrap();

    // Restarted between two saves: the second one reconnects by itself.
    server.stop();
    server.start_again();
    store.save_delta(&churn.delta()).unwrap();

    // Down: the save fails within a bounded time, and says why.
    server.stop();
    let started = Instant::now();
    let delta = churn.delta();
    let error = store.save_delta(&delta).unwrap_err();
    println!("down: {error} after {:?}", started.elapsed());
    assert!(matches!(error, StoreError::Backend(_)), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let again = Instant::now();
    assert!(matches!(
        store.save_delta(&delta),
        Err(StoreError::Backend(_))
    ));
    assert!(again.elapsed() < Duration::from_secs(10));

    // Back: the next save (in full, as the controller does after a failed one) works.
    server.start_again();
    store.save(&churn.state()).unwrap();
    store.save_delta(&churn.delta()).unwrap();
    drop(store);
    let (_, states) = open(&server, "b");
    assert_eq!(states.len(), 1);
    assert_eq!(contents(&states[0]), contents(&churn.state()));
}

// ---------------------------------------------------------------------------------------------
// GKM-V053 on PostgreSQL: the failing-store test of `failing_store.rs` with a `PgStore` behind
// the switch, under a `StoreDriver` and real sans-I/O members; the store fails on command (at a
// delta and at the full save after it) or because the database is really down.

mod v053 {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ed25519_dalek::SigningKey;
    use gkm_member::{Member, MemberConfig, MemberEvent};
    use gkm_server::{
        Command, CompactionFailure, ConnId, Controller, Event, GroupDelta, GroupPolicy, GroupState,
        PgStore, Store, StoreDriver, StoreError, Timestamp, Transmit,
    };
    use lkh_tree::{Epoch, GroupId};
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};
    use wire::HpkeSecret;

    use super::{PgServer, open};

    const GROUP: GroupId = GroupId(1);
    const START: u64 = 1_800_000_000_000;

    /// Where a save can fail.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum Point {
        Full,
        Delta,
        Compact,
    }

    struct Switch {
        store: PgStore,
        failing: BTreeSet<Point>,
        asked: Vec<Point>,
    }

    /// A `PgStore` that fails on command.
    #[derive(Clone)]
    struct Failing(Arc<Mutex<Switch>>);

    impl Failing {
        fn attempt(&self, point: Point) -> Result<(), StoreError> {
            let mut s = self.0.lock().unwrap();
            s.asked.push(point);
            if s.failing.contains(&point) {
                return Err(StoreError::Backend("the database refused (test)".into()));
            }
            Ok(())
        }

        fn set(&self, failing: &[Point]) {
            self.0.lock().unwrap().failing = failing.iter().copied().collect();
        }

        /// What the database holds of the group.
        fn stored(&self) -> Contents {
            contents(
                &self
                    .0
                    .lock()
                    .unwrap()
                    .store
                    .load_group(GROUP)
                    .unwrap()
                    .unwrap(),
            )
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
        fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
            self.0.lock().unwrap().store.take_compaction_failure()
        }
        fn compacting(&mut self) -> bool {
            self.0.lock().unwrap().store.compacting()
        }
    }

    /// Epoch, member count and a digest of the nodes (keys included) and member records (leases
    /// left out: they are renewed while the store fails).
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
        store: Failing,
        controller_events: Vec<Event>,
        now: u64,
        seeds: u64,
        signer: SigningKey,
    }

    impl Net {
        fn new(server: &PgServer, n: usize) -> Net {
            let (mut pg, _) = open(server, "v053");
            pg.claim(GROUP, Duration::from_secs(600)).unwrap().unwrap();
            let store = Failing(Arc::new(Mutex::new(Switch {
                store: pg,
                failing: BTreeSet::new(),
                asked: Vec::new(),
            })));
            let signer = SigningKey::from_bytes(&[42; 32]);
            let mut policy = GroupPolicy::new("demo", GROUP);
            policy.heartbeat_interval_ms = 500;
            policy.lease_ms = 60_000;
            let controller = StoreDriver::new(
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
            let mut net = Net {
                controller,
                members: Vec::new(),
                events: Vec::new(),
                store,
                controller_events: Vec::new(),
                now: START,
                seeds: 100,
                signer,
            };
            for _ in 0..n {
                net.add_member();
            }
            net.advance(500);
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
                        let conn = ConnId(u64::try_from(i).unwrap());
                        self.controller
                            .handle_request(conn, Timestamp(self.now), &request);
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
                            for m in &mut self.members {
                                m.handle_datagram(self.now, &bytes);
                            }
                        }
                        Transmit::Reply { conn, bytes } => {
                            let i = usize::try_from(conn.0).unwrap();
                            self.members[i].handle_reply(self.now, &bytes);
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

    /// While the store fails (`fail`, undone by `heal`): a member is evicted and one registers.
    /// Nothing of the unsaved epoch reaches any member, the controller and the database hold
    /// what they held; once the store is back the batch goes through, durably, and every member
    /// but the evicted one converges on it.
    fn fail_then_recover(net: &mut Net, fail: impl FnOnce(&Net), heal: impl FnOnce(&Net)) {
        let before = net.state();
        let (epoch, key) = net.controller.traffic_key(GROUP).unwrap();
        assert_eq!(before, net.store.stored(), "the database holds the state");
        let failures = net.failures();
        let evicted = net.members[0].membership().unwrap().0;

        fail(net);
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
            let (held, k) = m.traffic_key().unwrap();
            assert_eq!((held, k.as_bytes()), (epoch, key.as_bytes()), "member {i}");
        }
        assert!(
            net.members[joiner].traffic_key().is_none(),
            "no welcome went out"
        );

        heal(net);
        assert_eq!(net.store.stored(), before, "nothing was stored");
        net.advance(3_000);
        let (now_epoch, now_key) = net.controller.traffic_key(GROUP).unwrap();
        assert!(now_epoch > epoch);
        assert_eq!(
            net.state(),
            net.store.stored(),
            "the retried batch is durable"
        );
        for (i, m) in net.members.iter().enumerate() {
            let current = m
                .traffic_key()
                .is_some_and(|(e, k)| e == now_epoch && k.as_bytes() == now_key.as_bytes());
            if i == 0 {
                let id = m.membership().map(|(id, _)| id);
                assert!(!current || id != Some(evicted), "the evicted member is out");
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
        // The evicted member's place goes; the others carry on.
        net.members.swap_remove(0);
        net.events.swap_remove(0);
    }

    #[test]
    fn v053_on_postgres_a_failed_save_leaves_nothing_of_the_epoch_in_circulation() {
        let Some(server) = PgServer::start("v053") else {
            return;
        };
        let mut net = Net::new(&server, 24);
        // Refused at the delta and at the full save that follows a failed one.
        fail_then_recover(
            &mut net,
            |net| net.store.set(&[Point::Delta, Point::Full]),
            |net| net.store.set(&[]),
        );
        let asked = net.store.0.lock().unwrap().asked.clone();
        let failed_at = asked.iter().position(|p| *p == Point::Delta).unwrap();
        assert!(
            asked[failed_at..].contains(&Point::Full),
            "after a failed delta the whole state is saved: {asked:?}"
        );
        // The database itself down: every save fails (quickly) until it is back.
        fail_then_recover(&mut net, |_| server.stop(), |_| server.start_again());
    }
}
