//! The `gkm-member` binary's pieces, tested in-process: request framing bounds, the local API's
//! answers (garbage, long lines, current, watch), data frames and the replay window, and the
//! membership file. The modules are the binary's own source files, compiled in here.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "the binary's modules are compiled into this test; not every item is used"
)]

#[path = "../src/bin/gkm-member/api.rs"]
mod api;
#[path = "../src/bin/gkm-member/data.rs"]
mod data;
#[path = "../src/bin/gkm-member/framing.rs"]
mod framing;
#[path = "../src/bin/gkm-member/store.rs"]
mod store;

use std::io::ErrorKind;

use lkh_tree::{Batch, Epoch, GroupId, KeyTree, MemberPath, TrafficKey, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use wire::{Codec, DataFrame, MemberId};
use zeroize::Zeroizing;

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

fn key_info(epoch: u64, byte: u8) -> api::KeyInfo {
    let key = TrafficKey::from_bytes([byte; 32]);
    api::KeyInfo {
        group: 42,
        member: 7,
        epoch,
        key: Zeroizing::new([byte; 32]),
        kcv: key.check_value().0,
        applied: epoch,
        resyncs: 2,
    }
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
    let (client, server) = UnixStream::pair().unwrap();
    let task = tokio::spawn(api::client(server, keys_rx));
    let (reader, mut writer) = client.into_split();
    let mut reader = BufReader::new(reader);

    writer.write_all(b"{\"op\":\"current\"}\n").await.unwrap();
    let v = line(&mut reader).await;
    assert!(v["error"].as_str().unwrap().contains("not admitted"), "{v}");

    for garbage in [
        &b"garbage\n"[..],
        b"{\"op\":\"format-disk\"}\n",
        b"\xff\xfe\x00\n",
        b"[1,2,3]\n",
        b"{\"op\":\"current\",\"extra\":1}\n",
    ] {
        writer.write_all(garbage).await.unwrap();
        let v = line(&mut reader).await;
        assert!(v["error"].is_string(), "{v}");
    }

    keys_tx.send_replace(Some(key_info(5, 0xab)));
    writer.write_all(b"{\"op\":\"current\"}\n").await.unwrap();
    let v = line(&mut reader).await;
    assert_eq!(v["epoch"], 5);
    assert_eq!(v["member"], 7);
    assert_eq!(v["traffic_key"], "ab".repeat(32));
    assert_eq!(
        (v["applied"].as_u64(), v["resyncs"].as_u64()),
        (Some(5), Some(2))
    );
    let info = api::parse_answer(v.to_string().as_bytes()).unwrap();
    assert_eq!(*info.key, [0xab; 32]);
    assert_eq!((info.applied, info.resyncs), (5, 2));

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
    let (client, server) = UnixStream::pair().unwrap();
    let task = tokio::spawn(api::client(server, keys_rx));
    let (reader, mut writer) = client.into_split();
    let mut reader = BufReader::new(reader);
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
    rx.add_key(Epoch(3), TrafficKey::from_bytes([9; 32]));
    let frame = seal_frame(&key, GROUP, Epoch(3), 1, 1000, b"hello").unwrap();
    assert_eq!(rx.open(&frame), Opened::Message(b"hello".to_vec()));
    assert_eq!(rx.open(&frame), Opened::Replayed, "a replay is refused");

    let other_sender = seal_frame(&key, GROUP, Epoch(3), 2, 1000, b"same seq").unwrap();
    assert_eq!(
        rx.open(&other_sender),
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
    assert_eq!(rx.open(&wrong_key.unwrap()), Opened::Undecryptable);
    // A forged frame does not burn its sequence number for the real one.
    let real = seal_frame(&key, GROUP, Epoch(3), 1, 2000, b"real").unwrap();
    assert_eq!(rx.open(&real), Opened::Message(b"real".to_vec()));

    let unknown_epoch = seal_frame(&key, GROUP, Epoch(4), 1, 1, b"x").unwrap();
    assert_eq!(rx.open(&unknown_epoch), Opened::Undecryptable);
    let other_group = seal_frame(&key, GroupId(43), Epoch(3), 1, 5, b"x").unwrap();
    assert_eq!(rx.open(&other_group), Opened::OtherGroup);
    assert_eq!(rx.open(b"not a frame"), Opened::Undecryptable);

    let mut tampered = frame.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(rx.open(&tampered), Opened::Replayed);
    let mut tampered = seal_frame(&key, GROUP, Epoch(3), 1, 3000, b"t").unwrap();
    *tampered.last_mut().unwrap() ^= 1;
    assert_eq!(rx.open(&tampered), Opened::Undecryptable);

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
fn receiver_keeps_only_the_last_epochs() {
    let mut rx = Receiver::new(GROUP);
    for e in 1..=10 {
        rx.add_key(
            Epoch(e),
            TrafficKey::from_bytes([u8::try_from(e).unwrap(); 32]),
        );
    }
    assert_eq!(rx.newest(), Some(Epoch(10)));
    assert!(rx.has_key(Epoch(7)));
    assert!(!rx.has_key(Epoch(6)));
    let old = seal_frame(
        &TrafficKey::from_bytes([5; 32]),
        GROUP,
        Epoch(5),
        1,
        1,
        b"x",
    )
    .unwrap();
    assert_eq!(rx.open(&old), Opened::Undecryptable);
}

fn a_path() -> MemberPath {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut tree = KeyTree::new(GROUP, TreeConfig::default(), &mut rng).unwrap();
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
    let bytes = store::encode_membership(GROUP, MemberId(77), &path);
    let (member, back) = store::decode_membership(GROUP, &bytes).unwrap();
    assert_eq!(member, MemberId(77));
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

    let dir = temp_dir("membership");
    let state = store::StateDir::new(&dir);
    state.init().unwrap();
    assert!(state.load_membership(GROUP).unwrap().is_none());
    state.save_membership(GROUP, MemberId(77), &path).unwrap();
    let mode = std::fs::metadata(state.membership_path())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (member, back) = state.load_membership(GROUP).unwrap().unwrap();
    assert_eq!((member, back.epoch()), (MemberId(77), path.epoch()));
    std::fs::write(state.membership_path(), b"GKMM\x01garbage").unwrap();
    assert!(state.load_membership(GROUP).is_err());
    state.remove_membership();
    assert!(state.load_membership(GROUP).unwrap().is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
