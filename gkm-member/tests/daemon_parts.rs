//! The `gkm-member` binary's pieces, tested in-process: request framing bounds, the local API's
//! answers (garbage, long lines, current, watch, reserve), sequence numbers (unique with a frozen
//! clock and across restarts, GKM-V054), the key schedule seen through the API by senders and
//! receivers (activation and deactivation delays, GKM-V055), data frames and the replay window,
//! and the membership and sequence files. The modules are the binary's own source files,
//! compiled in here; the clock the API reads is the test's.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "the binary's modules are compiled into this test; not every item is used"
)]

#[path = "../src/bin/gkm-member/api.rs"]
mod api;
#[path = "../src/bin/gkm-member/api_client.rs"]
mod api_client;
#[path = "../src/bin/gkm-member/data.rs"]
mod data;
#[path = "../src/bin/gkm-member/framing.rs"]
mod framing;
#[path = "../src/bin/gkm-member/seq.rs"]
mod seq;
#[path = "../src/bin/gkm-member/storage_key.rs"]
mod storage_key;
#[path = "../src/bin/gkm-member/store.rs"]
mod store;

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gkm_member::data_keys::{KeyDelays, KeySchedule};
use lkh_tree::{Batch, Epoch, GroupId, KeyTree, MemberPath, TrafficKey, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use wire::{Codec, DataFrame, Kem, MemberId};

use data::{Opened, Receiver, WINDOW, seal_frame};

#[test]
fn frame_length_prefix_is_bounded() {
    assert!(framing::frame_len(1_000_000_000u32.to_be_bytes()).is_err());
    assert!(framing::frame_len(0u32.to_be_bytes()).is_err());
    assert!(framing::frame_len(65_537u32.to_be_bytes()).is_err());
    assert_eq!(framing::frame_len(65_536u32.to_be_bytes()).unwrap(), 65_536);
    assert_eq!(framing::frame_len(1u32.to_be_bytes()).unwrap(), 1);
}

#[tokio::test]
async fn a_huge_frame_is_refused_before_reading_its_body() {
    // 10^9 announced, nothing follows: refused as invalid, not a read of a 1 GB body.
    let mut input: &[u8] = &1_000_000_000u32.to_be_bytes();
    let err = framing::read_frame(&mut input).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidData);
    let mut empty_frame: &[u8] = &[0, 0, 0, 0];
    assert_eq!(
        framing::read_frame(&mut empty_frame)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidData
    );
    let mut out = Vec::new();
    assert!(framing::write_frame(&mut out, &[]).await.is_err());
    assert!(
        framing::write_frame(&mut out, &vec![0; framing::MAX_FRAME + 1])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn frames_round_trip() {
    let (mut a, mut b) = tokio::io::duplex(1 << 17);
    framing::write_frame(&mut a, b"hello").await.unwrap();
    framing::write_frame(&mut a, &vec![7; framing::MAX_FRAME])
        .await
        .unwrap();
    assert_eq!(framing::read_frame(&mut b).await.unwrap(), b"hello");
    assert_eq!(
        framing::read_frame(&mut b).await.unwrap().len(),
        framing::MAX_FRAME
    );
    drop(a);
    assert_eq!(
        framing::read_frame(&mut b).await.unwrap_err().kind(),
        ErrorKind::UnexpectedEof
    );
}

/// Member 7 of group 42 (leaf 5), holding the key `[byte; 32]` of `epoch`, got at time 0.
fn key_info(epoch: u64, byte: u8) -> api::KeyInfo {
    let mut schedule = KeySchedule::new(KeyDelays::default());
    schedule.handle_key(0, MEMBER, Epoch(epoch), &TrafficKey::from_bytes([byte; 32]));
    api::KeyInfo {
        group: 42,
        member: MEMBER.0,
        applied: epoch,
        resyncs: 2,
        schedule,
    }
}

/// Member 7 at leaf 5: sender id 5.
const MEMBER: MemberId = MemberId(5 << 32 | 7);

/// A counter's store in memory: every mark saved, and whether saving fails.
#[derive(Clone, Default)]
struct Marks {
    saved: Arc<Mutex<Vec<u64>>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl seq::HighWater for Marks {
    fn save(&mut self, mark: u64) -> anyhow::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            anyhow::bail!("the disk is full (test)");
        }
        self.saved.lock().unwrap().push(mark);
        Ok(())
    }
}

impl Marks {
    fn last(&self) -> Option<u64> {
        self.saved.lock().unwrap().last().copied()
    }
}

/// A clock the test sets.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }

    fn clock(&self) -> api::Clock {
        let ms = Arc::clone(&self.0);
        Arc::new(move || ms.load(Ordering::SeqCst))
    }
}

/// What an API connection shares: `keys`, a counter at `mark` over `store`, `clock`.
fn shared(
    keys: watch::Receiver<Option<api::KeyInfo>>,
    mark: u64,
    store: impl seq::HighWater + 'static,
    clock: &TestClock,
) -> api::Shared {
    api::Shared {
        keys,
        sequences: Arc::new(Mutex::new(seq::Sequences::new(mark, Box::new(store)))),
        clock: clock.clock(),
    }
}

/// An API connection to `shared`, served by a task.
fn connect(
    shared: api::Shared,
) -> (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (client, server) = UnixStream::pair().unwrap();
    let task = tokio::spawn(api::client(server, shared));
    let (reader, writer) = client.into_split();
    (BufReader::new(reader), writer, task)
}

/// Sends `request` and reads the answer.
async fn ask(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    request: &str,
) -> serde_json::Value {
    writer
        .write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    line(reader).await
}

async fn line(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> serde_json::Value {
    let mut s = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), reader.read_line(&mut s))
        .await
        .expect("the API answers within 5 s")
        .unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

#[tokio::test]
async fn api_answers_garbage_with_an_error_and_keeps_serving() {
    let (keys_tx, keys_rx) = watch::channel(None);
    let clock = TestClock::default();
    let (mut reader, mut writer, task) = connect(shared(keys_rx, 0, Marks::default(), &clock));

    writer.write_all(b"{\"op\":\"current\"}\n").await.unwrap();
    let v = line(&mut reader).await;
    assert!(v["error"].as_str().unwrap().contains("not admitted"), "{v}");

    for garbage in [
        &b"garbage\n"[..],
        b"{\"op\":\"format-disk\"}\n",
        b"\xff\xfe\x00\n",
        b"[1,2,3]\n",
        b"{\"op\":\"current\",\"extra\":1}\n",
        b"{\"op\":\"reserve\"}\n",
        b"{\"op\":\"reserve\",\"count\":-1}\n",
        b"{\"op\":\"reserve\",\"count\":18446744073709551616}\n",
        b"{\"op\":\"reserve\",\"count\":1,\"sender\":3}\n",
    ] {
        writer.write_all(garbage).await.unwrap();
        let v = line(&mut reader).await;
        assert!(v["error"].is_string(), "{v}");
    }

    keys_tx.send_replace(Some(key_info(5, 0xab)));
    writer.write_all(b"{\"op\":\"current\"}\n").await.unwrap();
    let v = line(&mut reader).await;
    assert_eq!(v["epoch"], 5);
    assert_eq!(v["member"], MEMBER.0);
    assert_eq!(v["traffic_key"], "ab".repeat(32));
    assert_eq!(
        (v["applied"].as_u64(), v["resyncs"].as_u64()),
        (Some(5), Some(2))
    );
    assert_eq!(
        (v["sender"].as_u64(), v["send_epoch"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(v["activate_in_ms"], 0);
    let keys = api_client::parse_keys(v.to_string().as_bytes(), 0).unwrap();
    assert_eq!(
        (keys.group, keys.epoch, keys.send_epoch),
        (GroupId(42), Epoch(5), Epoch(5))
    );
    assert_eq!(keys.accept.len(), 1);
    assert_eq!(*keys.accept[0].key.as_bytes(), [0xab; 32]);
    assert_eq!(keys.accept[0].drop_at, None);

    // A line past the bound: an error, then the server closes the connection.
    let long = vec![b'x'; api::MAX_LINE + 10];
    writer.write_all(&long).await.unwrap();
    writer.write_all(b"\n").await.unwrap();
    let v = line(&mut reader).await;
    assert!(v["error"].as_str().unwrap().contains("longer"), "{v}");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn api_watch_sends_current_then_each_change() {
    let (keys_tx, keys_rx) = watch::channel(Some(key_info(1, 1)));
    let clock = TestClock::default();
    let (mut reader, mut writer, task) = connect(shared(keys_rx, 0, Marks::default(), &clock));
    writer.write_all(b"{\"op\":\"watch\"}\n").await.unwrap();
    assert_eq!(line(&mut reader).await["epoch"], 1);
    keys_tx.send_replace(Some(key_info(2, 2)));
    assert_eq!(line(&mut reader).await["epoch"], 2);
    keys_tx.send_replace(None);
    assert!(line(&mut reader).await["error"].is_string());
    keys_tx.send_replace(Some(key_info(3, 3)));
    assert_eq!(line(&mut reader).await["epoch"], 3);
    drop(writer);
    drop(reader);
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the watcher ends when the client closes")
        .unwrap()
        .unwrap();
}

const GROUP: GroupId = GroupId(42);

#[test]
fn data_frames_open_once_and_only_under_their_key() {
    let key = TrafficKey::from_bytes([9; 32]);
    let mut rx = Receiver::new(GROUP);
    rx.follow(0, [(Epoch(3), &key, None)]);
    let frame = seal_frame(&key, GROUP, Epoch(3), 1, 1000, b"hello").unwrap();
    assert_eq!(rx.open(0, &frame), Opened::Message(b"hello".to_vec()));
    assert_eq!(rx.open(0, &frame), Opened::Replayed, "a replay is refused");

    let other_sender = seal_frame(&key, GROUP, Epoch(3), 2, 1000, b"same seq").unwrap();
    assert_eq!(
        rx.open(0, &other_sender),
        Opened::Message(b"same seq".to_vec())
    );

    let wrong_key = seal_frame(
        &TrafficKey::from_bytes([8; 32]),
        GROUP,
        Epoch(3),
        1,
        2000,
        b"x",
    );
    assert_eq!(rx.open(0, &wrong_key.unwrap()), Opened::Undecryptable);
    // A forged frame does not burn its sequence number for the real one.
    let real = seal_frame(&key, GROUP, Epoch(3), 1, 2000, b"real").unwrap();
    assert_eq!(rx.open(0, &real), Opened::Message(b"real".to_vec()));

    let unknown_epoch = seal_frame(&key, GROUP, Epoch(4), 1, 1, b"x").unwrap();
    assert_eq!(rx.open(0, &unknown_epoch), Opened::Undecryptable);
    let other_group = seal_frame(&key, GroupId(43), Epoch(3), 1, 5, b"x").unwrap();
    assert_eq!(rx.open(0, &other_group), Opened::OtherGroup);
    assert_eq!(rx.open(0, b"not a frame"), Opened::Undecryptable);

    let mut tampered = frame.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(rx.open(0, &tampered), Opened::Replayed);
    let mut tampered = seal_frame(&key, GROUP, Epoch(3), 1, 3000, b"t").unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(rx.open(0, &tampered), Opened::Undecryptable);

    assert!(seal_frame(&key, GROUP, Epoch(3), 1, 9, &vec![0; 65_001]).is_err());
    let decoded = DataFrame::decode_exact(&frame).unwrap();
    assert_eq!(
        (decoded.epoch, decoded.sender, decoded.seq),
        (Epoch(3), 1, 1000)
    );
}

#[test]
fn replay_window_slides_and_tolerates_reordering() {
    let mut w = data::ReplayWindow::default();
    assert!(w.fresh(0));
    for seq in (0..u64::try_from(WINDOW).unwrap() * 2).rev().step_by(2) {
        assert!(w.fresh(seq));
        w.accept(seq);
        assert!(!w.fresh(seq));
    }
    // Reordered, within the window and unseen: fresh. Below the window: refused.
    let top = u64::try_from(WINDOW).unwrap() * 2;
    assert!(w.fresh(top + 1));
    w.accept(top + 1);
    w.accept(top + 3);
    assert!(!w.fresh(0), "fell below the floor");
    assert!(w.fresh(top + 2));
}

#[test]
fn receiver_holds_exactly_the_keys_its_agent_names() {
    let keys: Vec<TrafficKey> = (0..=10u8)
        .map(|e| TrafficKey::from_bytes([e; 32]))
        .collect();
    let mut rx = Receiver::new(GROUP);
    rx.follow(
        0,
        (1..=10u8).map(|e| (Epoch(e.into()), &keys[usize::from(e)], None)),
    );
    let frame =
        |e: u8| seal_frame(&keys[usize::from(e)], GROUP, Epoch(e.into()), 1, 1, b"x").unwrap();
    assert_eq!(rx.open(0, &frame(10)), Opened::Message(b"x".to_vec()));
    assert_eq!(rx.open(0, &frame(7)), Opened::Message(b"x".to_vec()));
    assert_eq!(
        rx.open(0, &frame(6)),
        Opened::Retired,
        "at most {} keys, the newest",
        data::MAX_KEYS
    );
    // The agent names only 10 now: 7 is refused at once, unopened.
    rx.follow(1, [(Epoch(10), &keys[10], None)]);
    assert_eq!(rx.open(1, &frame(7)), Opened::Retired);
    // A key the agent names again with a later drop time keeps the earlier one.
    rx.follow(1, [(Epoch(10), &keys[10], Some(50))]);
    rx.follow(2, [(Epoch(10), &keys[10], Some(500))]);
    let late = seal_frame(&keys[10], GROUP, Epoch(10), 1, 2, b"y").unwrap();
    assert_eq!(rx.open(50, &late), Opened::Undecryptable, "no key left");
    // The same epoch with another key (a reset group): that key, and a fresh replay window.
    let other = TrafficKey::from_bytes([0x77; 32]);
    rx.follow(60, [(Epoch(10), &other, None)]);
    let again = seal_frame(&other, GROUP, Epoch(10), 1, 1, b"z").unwrap();
    assert_eq!(rx.open(60, &again), Opened::Message(b"z".to_vec()));
    assert_eq!(
        rx.open(60, &frame(10)),
        Opened::Replayed,
        "(1, 1) was seen under it now"
    );
    rx.clear();
    assert_eq!(rx.open(60, &again), Opened::Undecryptable);
}

fn a_path() -> MemberPath {
    a_path_of(GROUP)
}

/// A member's path in a small tree of `group`.
fn a_path_of(group: GroupId) -> MemberPath {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut tree = KeyTree::new(group, TreeConfig::default(), &mut rng).unwrap();
    let rekey = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 5,
            },
            &mut rng,
        )
        .unwrap();
    rekey.joiners[2].path.clone()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("gkm-member-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn membership_file_round_trips_and_corruption_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let path = a_path();
    let bytes = store::encode_membership(GROUP, MemberId(77), &path, Kem::XWing);
    let (member, back, kem) = store::decode_membership(GROUP, &bytes).unwrap();
    assert_eq!((member, kem), (MemberId(77), Kem::XWing));
    assert_eq!(back.epoch(), path.epoch());
    assert_eq!(
        back.traffic_key().unwrap().as_bytes(),
        path.traffic_key().unwrap().as_bytes()
    );
    assert!(
        store::decode_membership(GroupId(1), &bytes).is_err(),
        "other group"
    );
    assert!(
        store::decode_membership(GROUP, &bytes[..bytes.len() - 1]).is_err(),
        "truncated"
    );
    assert!(
        store::decode_membership(GROUP, &bytes[..10]).is_err(),
        "short header"
    );
    let mut bad_magic = bytes.to_vec();
    bad_magic[0] = b'X';
    assert!(store::decode_membership(GROUP, &bad_magic).is_err());
    let mut trailing = bytes.to_vec();
    trailing.push(0);
    assert!(store::decode_membership(GROUP, &trailing).is_err());
    // The KEM follows the 29-byte header; an unknown one is refused.
    let mut unknown_kem = bytes.to_vec();
    unknown_kem[29..31].copy_from_slice(&[0, 0x10]);
    assert!(store::decode_membership(GROUP, &unknown_kem).is_err());
    // A version 1 file (before the KEM was recorded) was made under the X25519 key.
    let mut v1 = bytes.to_vec();
    v1[4] = 1;
    v1.drain(29..31);
    let (member, _, kem) = store::decode_membership(GROUP, &v1).unwrap();
    assert_eq!((member, kem), (MemberId(77), Kem::X25519));

    let dir = temp_dir("membership");
    let state = store::StateDir::new(&dir);
    state.init(Kem::XWing).unwrap();
    assert!(state.load_membership(GROUP).unwrap().is_none());
    state
        .save_membership(GROUP, MemberId(77), &path, Kem::X25519)
        .unwrap();
    let mode = std::fs::metadata(state.membership_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (member, back, kem) = state.load_membership(GROUP).unwrap().unwrap();
    assert_eq!((member, back.epoch()), (MemberId(77), path.epoch()));
    assert_eq!(kem, Kem::X25519);
    std::fs::write(state.membership_path(), b"GKMM\x01garbage").unwrap();
    assert!(state.load_membership(GROUP).is_err());
    state.remove_membership();
    assert!(state.load_membership(GROUP).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state directory made before X-Wing (identity and X25519 key) gets an X-Wing key the first
/// time the member runs with `--kem x-wing`, once; the X25519 key stays for `--kem x25519`.
#[test]
fn a_missing_kem_key_is_made_once_and_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("kem-keys");
    let state = store::StateDir::new(&dir);
    state.init(Kem::X25519).unwrap();
    let (identity, x25519, made) = state.load_keys(Kem::X25519).unwrap();
    assert!(!made);
    assert_eq!(x25519.kem(), Kem::X25519);
    let (same_identity, x_wing, made) = state.load_keys(Kem::XWing).unwrap();
    assert!(made);
    assert_eq!(same_identity.to_bytes(), identity.to_bytes());
    assert_eq!(x_wing.kem(), Kem::XWing);
    let (_, again, made) = state.load_keys(Kem::XWing).unwrap();
    assert!(!made);
    assert_eq!(again.as_bytes(), x_wing.as_bytes());
    assert_eq!(
        again.public_key().unwrap().as_bytes().len(),
        Kem::XWing.public_key_len()
    );
    for name in ["hpke.key", "hpke-x-wing.key"] {
        let mode = std::fs::metadata(dir.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    assert!(state.init(Kem::XWing).is_err(), "init twice");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sequence_file_round_trips_is_private_and_damage_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("sequence-file");
    let state = store::StateDir::new(&dir);
    state.init(Kem::XWing).unwrap();
    assert_eq!(state.load_sequence().unwrap(), None);
    for mark in [0, 1 << 20, u64::MAX] {
        state.save_sequence(mark).unwrap();
        assert_eq!(state.load_sequence().unwrap(), Some(mark));
    }
    let mode = std::fs::metadata(state.sequence_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(!dir.join("sequence.tmp").exists());
    let good = std::fs::read(state.sequence_path()).unwrap();
    let mut flipped = good.clone();
    flipped[8] ^= 1;
    for bad in [
        &good[..20],
        &[good.as_slice(), &[0]].concat(),
        &flipped,
        b"GKMQ",
    ] {
        std::fs::write(state.sequence_path(), bad).unwrap();
        assert!(state.load_sequence().is_err(), "{bad:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The (epoch, sender, first, count) of a `reserve` answer.
fn block_of(v: &serde_json::Value) -> (u64, u64, u64, u64) {
    let n = |f: &str| {
        v[f].as_u64()
            .unwrap_or_else(|| panic!("no {f} in the answer: {v}"))
    };
    (n("epoch"), n("sender"), n("first"), n("count"))
}

#[tokio::test]
async fn v054_two_senders_of_one_agent_never_share_a_nonce_with_a_frozen_clock() {
    let (_keys_tx, keys_rx) = watch::channel(Some(key_info(9, 0x5a)));
    // The clock never moves: numbers must not come from it.
    let clock = TestClock::default();
    clock.set(1_000);
    let marks = Marks::default();
    let shared = shared(keys_rx, 0, marks.clone(), &clock);
    let (mut r1, mut w1, _t1) = connect(shared.clone());
    let (mut r2, mut w2, _t2) = connect(shared);
    let mut used = BTreeSet::new();
    for round in 0..300u64 {
        let (c1, c2) = (1 + round % 3, 1 + (round + 1) % 4);
        // Both applications ask at once.
        let (q1, q2) = (
            format!(r#"{{"op":"reserve","count":{c1}}}"#),
            format!(r#"{{"op":"reserve","count":{c2}}}"#),
        );
        let (a, b) = tokio::join!(ask(&mut r1, &mut w1, &q1), ask(&mut r2, &mut w2, &q2));
        for (v, count) in [(a, c1), (b, c2)] {
            let (epoch, sender, first, n) = block_of(&v);
            assert_eq!((epoch, sender, n), (9, 5, count), "{v}");
            assert!(
                first + n <= marks.last().unwrap(),
                "numbers handed out only below a mark already saved"
            );
            for seq in first..first + n {
                assert!(
                    used.insert((epoch, sender, seq)),
                    "(epoch {epoch}, sender {sender}, seq {seq}) handed out twice"
                );
            }
        }
    }
    assert_eq!(
        marks.saved.lock().unwrap().len(),
        1,
        "one write ahead covers them all"
    );
}

#[tokio::test]
async fn v054_an_agent_restarted_at_the_same_epoch_never_hands_out_a_number_again() {
    let dir = temp_dir("sequence-restart");
    let state = store::StateDir::new(&dir);
    state.init(Kem::XWing).unwrap();
    let clock = TestClock::default();
    clock.set(1_000);
    let mut end_so_far = 0;
    for run in 0..3 {
        // Every run holds the same epoch's key, and the clock reads the same.
        let mark = state.load_sequence().unwrap().unwrap_or(0);
        let (_keys_tx, keys_rx) = watch::channel(Some(key_info(9, 0x5a)));
        let (mut reader, mut writer, task) =
            connect(shared(keys_rx, mark, seq::SequenceFile::new(&dir), &clock));
        for count in [1, 5, seq::MAX_RESERVE, 2] {
            let request = format!(r#"{{"op":"reserve","count":{count}}}"#);
            let (epoch, _, first, n) = block_of(&ask(&mut reader, &mut writer, &request).await);
            assert_eq!((epoch, n), (9, count));
            assert!(
                first >= end_so_far,
                "run {run}: {first} was handed out before (up to {end_so_far})"
            );
            end_so_far = first + n;
            assert!(
                state.load_sequence().unwrap().unwrap() >= end_so_far,
                "saved first"
            );
        }
        // The agent dies without a word.
        task.abort();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn v054_reservations_are_bounded_and_a_failed_save_hands_out_nothing() {
    let (keys_tx, keys_rx) = watch::channel(None);
    let clock = TestClock::default();
    let marks = Marks::default();
    let (mut reader, mut writer, _task) = connect(shared(keys_rx, 0, marks.clone(), &clock));
    let v = ask(&mut reader, &mut writer, r#"{"op":"reserve","count":1}"#).await;
    assert!(v["error"].as_str().unwrap().contains("not admitted"), "{v}");
    keys_tx.send_replace(Some(key_info(9, 0x5a)));
    for count in [0, seq::MAX_RESERVE + 1, u64::MAX] {
        let request = format!(r#"{{"op":"reserve","count":{count}}}"#);
        let v = ask(&mut reader, &mut writer, &request).await;
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(e.contains("count must be 1 to 65536"), "{e}");
    }
    marks.failing.store(true, Ordering::SeqCst);
    let v = ask(&mut reader, &mut writer, r#"{"op":"reserve","count":1}"#).await;
    let e = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(
        e.contains("the disk is full") && e.contains("none were handed out"),
        "{e}"
    );
    marks.failing.store(false, Ordering::SeqCst);
    let v = ask(&mut reader, &mut writer, r#"{"op":"reserve","count":1}"#).await;
    assert_eq!(
        block_of(&v),
        (9, 5, 0, 1),
        "nothing was burnt by the refusals"
    );
    assert!(v["traffic_key"].as_str().unwrap() == "5a".repeat(32));
}

/// Delays of 250 ms and 5 s, and an API whose keys the test sets: epoch 4 got at 0.
struct Rekeyed {
    schedule: KeySchedule,
    keys_tx: watch::Sender<Option<api::KeyInfo>>,
    clock: TestClock,
    old: TrafficKey,
    new: TrafficKey,
}

impl Rekeyed {
    fn new() -> (Self, api::Shared) {
        let mut schedule = KeySchedule::new(KeyDelays::new(250, 5_000).unwrap());
        let old = TrafficKey::from_bytes([4; 32]);
        schedule.handle_key(0, MEMBER, Epoch(4), &old);
        let (keys_tx, keys_rx) = watch::channel(None);
        let clock = TestClock::default();
        let shared = shared(keys_rx, 0, Marks::default(), &clock);
        let this = Rekeyed {
            schedule,
            keys_tx,
            clock,
            old,
            new: TrafficKey::from_bytes([5; 32]),
        };
        this.publish();
        (this, shared)
    }

    /// Publishes the schedule, as the driver does.
    fn publish(&self) {
        self.keys_tx.send_replace(Some(api::KeyInfo {
            group: 42,
            member: MEMBER.0,
            applied: 0,
            resyncs: 0,
            schedule: self.schedule.clone(),
        }));
    }

    /// At `at`, the agent gets epoch 5's key.
    fn rekey(&mut self, at: u64) {
        self.clock.set(at);
        self.schedule.handle_key(at, MEMBER, Epoch(5), &self.new);
        self.publish();
    }

    /// At `at`, the schedule's timer fires.
    fn tick(&mut self, at: u64) {
        self.clock.set(at);
        self.schedule.handle_timeout(at);
        self.publish();
    }
}

/// Takes a watch line into `rx`, read at `now` of the receiver's clock.
fn follow(rx: &mut Receiver, v: &serde_json::Value, now: u64) {
    let keys = api_client::parse_keys(v.to_string().as_bytes(), now)
        .unwrap_or_else(|e| panic!("{e}: {v}"));
    rx.follow(
        now,
        keys.accept.iter().map(|k| (k.epoch, &k.key, k.drop_at)),
    );
}

#[tokio::test]
async fn v055_a_receiver_refuses_the_previous_key_once_the_deactivation_delay_passed() {
    let (mut agent, shared) = Rekeyed::new();
    let (mut reader, mut writer, _task) = connect(shared);
    writer.write_all(b"{\"op\":\"watch\"}\n").await.unwrap();
    let mut rx = Receiver::new(GROUP);
    follow(&mut rx, &line(&mut reader).await, 0);
    // A member evicted by the coming rekey keeps epoch 4's key and goes on sealing under it.
    let old = agent.old.clone();
    let evicted = move |seq| seal_frame(&old, GROUP, Epoch(4), 99, seq, b"evicted").unwrap();
    assert_eq!(
        rx.open(0, &evicted(1)),
        Opened::Message(b"evicted".to_vec())
    );

    // The rekey: the receiver hears of it through watch, before any frame under it.
    agent.rekey(10_000);
    let v = line(&mut reader).await;
    assert_eq!(
        (v["epoch"].as_u64(), v["send_epoch"].as_u64()),
        (Some(5), Some(4)),
        "{v}"
    );
    assert_eq!(v["accept"][1]["drop_in_ms"], 5_000, "{v}");
    follow(&mut rx, &v, 10_000);
    let fresh = seal_frame(&agent.new, GROUP, Epoch(5), 5, 1, b"new").unwrap();
    assert_eq!(rx.open(10_000, &fresh), Opened::Message(b"new".to_vec()));
    // Within the deactivation delay the old key still opens (a slower sender may use it)...
    assert_eq!(
        rx.open(14_999, &evicted(2)),
        Opened::Message(b"evicted".to_vec())
    );
    // ... and from then on it never does.
    assert_eq!(rx.open(15_000, &evicted(3)), Opened::Retired);
    assert_eq!(rx.open(86_400_000, &evicted(4)), Opened::Retired);

    // The agent drops the key at its own time and says so: a receiver whose clock runs behind
    // (it read the rekey's line at its time 0, so it would drop the key at its 5 000) drops it
    // on that line.
    let mut lagging = Receiver::new(GROUP);
    follow(&mut lagging, &v, 0);
    assert_eq!(
        lagging.open(1, &evicted(5)),
        Opened::Message(b"evicted".to_vec())
    );
    agent.tick(10_250);
    let activated = line(&mut reader).await;
    assert_eq!(activated["send_epoch"], 5, "{activated}");
    agent.tick(15_000);
    let dropped = line(&mut reader).await;
    assert_eq!(dropped["accept"].as_array().unwrap().len(), 1, "{dropped}");
    follow(&mut lagging, &dropped, 2);
    assert_eq!(lagging.open(2, &evicted(6)), Opened::Retired);
    assert_eq!(lagging.open(2, &fresh), Opened::Message(b"new".to_vec()));
}

#[tokio::test]
async fn v055_a_sender_keeps_the_old_key_until_the_activation_delay_passes() {
    let (mut agent, shared) = Rekeyed::new();
    let (mut reader, mut writer, _task) = connect(shared);
    let reserve = r#"{"op":"reserve","count":1}"#;
    let old_kcv = hex::encode(agent.old.check_value().0);
    let new_kcv = hex::encode(agent.new.check_value().0);
    agent.rekey(10_000);
    let v = ask(&mut reader, &mut writer, r#"{"op":"current"}"#).await;
    assert_eq!(
        (v["epoch"].as_u64(), v["send_epoch"].as_u64()),
        (Some(5), Some(4)),
        "{v}"
    );
    assert_eq!(v["activate_in_ms"], 250, "{v}");
    for at in [10_000, 10_249] {
        agent.clock.set(at);
        let v = ask(&mut reader, &mut writer, reserve).await;
        assert_eq!(
            (v["epoch"].as_u64(), v["kcv"].as_str()),
            (Some(4), Some(old_kcv.as_str())),
            "at {at}: {v}"
        );
    }
    // No timer fired yet: the API goes by its clock.
    agent.clock.set(10_250);
    let v = ask(&mut reader, &mut writer, reserve).await;
    assert_eq!(
        (v["epoch"].as_u64(), v["kcv"].as_str()),
        (Some(5), Some(new_kcv.as_str())),
        "{v}"
    );
    let v = ask(&mut reader, &mut writer, r#"{"op":"current"}"#).await;
    assert_eq!(
        (v["send_epoch"].as_u64(), v["activate_in_ms"].as_u64()),
        (Some(5), Some(0)),
        "{v}"
    );
    let reserved = api_client::parse_reservation(
        ask(&mut reader, &mut writer, reserve)
            .await
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!((reserved.epoch, reserved.sender), (Epoch(5), 5));
    assert_eq!(reserved.key.check_value(), agent.new.check_value());
}

/// A valid Ed25519 public key nobody holds the secret of (RFC 8032 test 1).
const SOME_CONTROLLER_KEY: &str =
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

/// The member daemon on `state` for group "g", its controller nowhere (it keeps its stored keys).
fn daemon(state: &std::path::Path) -> common::Running {
    let multicast = format!("239.255.77.1:{}", 30_000 + std::process::id() % 2_000);
    common::Running::spawn(
        std::process::Command::new(common::BIN)
            .args([
                "run",
                "--group",
                "g",
                "--controller-key",
                SOME_CONTROLLER_KEY,
            ])
            .args(["--controller", "127.0.0.1:9", "--multicast", &multicast])
            .arg("--state-dir")
            .arg(state)
            .env("RUST_LOG", "info"),
    )
}

/// One request to the API socket at `socket`, once it answers with `field`.
fn api_request(socket: &std::path::Path, request: &str, field: &str) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut answer = serde_json::Value::Null;
    common::wait_for(std::time::Duration::from_secs(10), "an API answer", || {
        let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let _ = stream.write_all(format!("{request}\n").as_bytes());
        let mut text = String::new();
        let _ = std::io::BufReader::new(stream).read_line(&mut text);
        answer = serde_json::from_str(&text).unwrap_or_default();
        !answer[field].is_null()
    });
    answer
}

#[test]
fn v054_a_restarted_daemon_continues_above_its_mark_and_without_one_registers_anew() {
    let dir = temp_dir("daemon-sequence");
    let state = dir.join("state");
    let sd = store::StateDir::new(&state);
    sd.init(Kem::XWing).unwrap();
    let group = GroupId::from_name("g");
    let socket = sd.api_socket();

    // A membership but no sequence file (a release before it): not resumed.
    sd.save_membership(group, MEMBER, &a_path_of(group), Kem::XWing)
        .unwrap();
    let first = daemon(&state);
    let v = api_request(&socket, r#"{"op":"reserve","count":1}"#, "error");
    assert!(v["error"].as_str().unwrap().contains("not admitted"), "{v}");
    first.signal("TERM");
    let out = first.wait(std::time::Duration::from_secs(10));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("registering anew, for keys never sealed under"),
        "{log}"
    );
    assert!(!sd.membership_path().exists());
    assert_eq!(
        sd.load_sequence().unwrap(),
        Some(0),
        "that run wrote the file, so the next one can vouch for its keys"
    );

    // With one, the membership is resumed; a run killed without a word, then restarted with
    // the same key, hands out only numbers above what the first run handed out.
    sd.save_membership(group, MEMBER, &a_path_of(group), Kem::XWing)
        .unwrap();
    let mut handed = 0;
    let mut kcv = None;
    for run in 0..2 {
        let member = daemon(&state);
        let v = api_request(&socket, r#"{"op":"reserve","count":3}"#, "first");
        let (epoch, sender, first, n) = block_of(&v);
        assert_eq!((sender, n), (5, 3), "{v}");
        assert!(first >= handed, "run {run}: {first} was handed out before");
        handed = first + n;
        let this = (epoch, v["kcv"].clone());
        assert!(kcv.is_none_or(|k| k == this), "the same key in both runs");
        kcv = Some(this);
        member.signal("KILL");
        drop(member.wait(std::time::Duration::from_secs(5)));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
