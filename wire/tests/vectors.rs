//! Known-answer vectors: `wire/test-vectors/*.json` hold the encodings of deterministic messages
//! and of a signed rekey with the member's keys before and the traffic-key check value after.
//! The test rebuilds every message from its fields and compares byte for byte, then decodes the
//! stored bytes and compares the values. `GKM_BLESS_VECTORS=1 cargo test -p wire --test vectors`
//! rewrites the files (only after a deliberate format change).

#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use lkh_tree::{Batch, Epoch, GroupId, Kcv, KeyTree, NodeId, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use serde_json::{Value, json};
use wire::{
    Ack, Acked, AuthenticRekey, Codec, DataFrame, ErrorMessage, Heartbeat, HeldPath, HpkePublicKey,
    HpkeSecret, Kem, LeaveRequest, MemberId, PathKeys, RegistrationRequest, ResyncRequest,
    SealedFor, SealedKind, SealedPath, Status, pack_signed,
};

fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("test-vectors")
        .join(name)
}

fn check_or_bless(name: &str, built: &Value) -> Value {
    let path = vector_path(name);
    if std::env::var_os("GKM_BLESS_VECTORS").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(built).unwrap() + "\n").unwrap();
    }
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(&stored, built, "{name} differs from the stored vector");
    stored
}

fn group() -> GroupId {
    GroupId(0x0102_0304_0506_0708)
}

/// A public key of `kem` whose every byte is `byte` (the codec checks only its length).
fn key_of(kem: Kem, byte: u8) -> HpkePublicKey {
    HpkePublicKey::new(kem, vec![byte; kem.public_key_len()]).unwrap()
}

fn messages() -> Vec<(&'static str, Vec<u8>)> {
    let g = group();
    vec![
        (
            "registration_request",
            RegistrationRequest {
                group: g,
                identity: [0x11; 32],
                hpke_key: key_of(Kem::XWing, 0x22),
                timestamp_ms: 1_800_000_000_000,
                nonce: [0x33; 16],
                token: b"enroll-7".to_vec(),
            }
            .to_bytes(),
        ),
        (
            "registration_request_x25519",
            RegistrationRequest {
                group: g,
                identity: [0x11; 32],
                hpke_key: key_of(Kem::X25519, 0x23),
                timestamp_ms: 1_800_000_000_000,
                nonce: [0x34; 16],
                token: Vec::new(),
            }
            .to_bytes(),
        ),
        (
            "welcome",
            SealedPath {
                kind: SealedKind::Welcome,
                group: g,
                member: MemberId(42),
                epoch: Epoch(9),
                request_nonce: [0x33; 16],
                kem: Kem::XWing,
                encapped: vec![0x44; Kem::XWing.encapped_len()],
                rekey_address: Some("239.255.77.1:47701".parse().unwrap()),
                ciphertext: vec![0x55; 40],
            }
            .to_bytes(),
        ),
        (
            "resync_response",
            SealedPath {
                kind: SealedKind::Resync,
                group: g,
                member: MemberId(42),
                epoch: Epoch(10),
                request_nonce: [0x66; 16],
                kem: Kem::X25519,
                encapped: vec![0x77; Kem::X25519.encapped_len()],
                rekey_address: Some("[ff15::77]:47702".parse().unwrap()),
                ciphertext: vec![0x88; 17],
            }
            .to_bytes(),
        ),
        (
            "heartbeat",
            Heartbeat {
                group: g,
                epoch: Epoch(10),
                kcv: Kcv([1, 2, 3, 4, 5, 6, 7, 8]),
                timestamp_ms: 1_800_000_000_500,
            }
            .to_bytes(),
        ),
        (
            "resync_request",
            ResyncRequest {
                group: g,
                member: MemberId(42),
                epoch: Epoch(8),
                kcv: Kcv([0x5c; 8]),
                timestamp_ms: 1_800_000_001_000,
                nonce: [0x99; 16],
                hpke_key: key_of(Kem::X25519, 0x5a),
            }
            .to_bytes(),
        ),
        (
            "leave",
            LeaveRequest {
                group: g,
                member: MemberId(42),
                timestamp_ms: 1_800_000_002_000,
                nonce: [0xaa; 16],
            }
            .to_bytes(),
        ),
        (
            "error",
            ErrorMessage {
                group: g,
                status: Status::Unauthorized,
                reason: "not on the allow list".into(),
            }
            .to_bytes(),
        ),
        (
            "ack",
            Ack {
                group: g,
                member: MemberId(42),
                acked: Acked::LeaseRenewed,
                request_nonce: [0x99; 16],
                epoch: Epoch(10),
            }
            .to_bytes(),
        ),
        (
            "data",
            DataFrame {
                group: g,
                epoch: Epoch(10),
                sender: 7,
                seq: 3,
                ciphertext: vec![0xbb; 21],
            }
            .to_bytes(),
        ),
    ]
}

#[test]
fn message_encodings_match_the_stored_vectors() {
    let built: Value = messages()
        .into_iter()
        .map(|(name, bytes)| (name.to_owned(), json!(hex::encode(bytes))))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let stored = check_or_bless("messages.json", &built);
    let bytes = |name: &str| hex::decode(stored[name].as_str().unwrap()).unwrap();
    let reencode = |name: &str, value: Vec<u8>| assert_eq!(value, bytes(name), "{name}");
    reencode(
        "registration_request",
        RegistrationRequest::decode_exact(&bytes("registration_request"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "registration_request_x25519",
        RegistrationRequest::decode_exact(&bytes("registration_request_x25519"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "welcome",
        SealedPath::decode_exact(&bytes("welcome"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "resync_response",
        SealedPath::decode_exact(&bytes("resync_response"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "heartbeat",
        Heartbeat::decode_exact(&bytes("heartbeat"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "resync_request",
        ResyncRequest::decode_exact(&bytes("resync_request"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "leave",
        LeaveRequest::decode_exact(&bytes("leave"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "error",
        ErrorMessage::decode_exact(&bytes("error"))
            .unwrap()
            .to_bytes(),
    );
    reencode(
        "data",
        DataFrame::decode_exact(&bytes("data")).unwrap().to_bytes(),
    );
    let welcome = SealedPath::decode_exact(&bytes("welcome")).unwrap();
    assert_eq!(welcome.member, MemberId(42));
    assert_eq!(
        welcome.rekey_address,
        Some("239.255.77.1:47701".parse().unwrap())
    );
    assert_eq!(welcome.kem, Kem::XWing);
    // The rekey address's family byte (after header, member, epoch, nonce, KEM and X-Wing
    // encapsulation): 0 is no address, and anything but 0, 4 and 6 is refused.
    const FAMILY: usize = 12 + 8 + 8 + 16 + 2 + 1120;
    let none = SealedPath {
        rekey_address: None,
        ..welcome.clone()
    };
    assert_eq!(none.to_bytes()[FAMILY], 0);
    assert_eq!(SealedPath::decode_exact(&none.to_bytes()).unwrap(), none);
    let mut odd = bytes("welcome");
    assert_eq!(odd[FAMILY], 4);
    odd[FAMILY] = 5;
    assert!(SealedPath::decode_exact(&odd).is_err());
}

#[test]
fn rekey_vector_decrypts_to_the_stored_traffic_key_check_value() {
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut tree = KeyTree::new(group(), TreeConfig::default(), &mut rng).unwrap();
    let joined = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 16,
            },
            &mut rng,
        )
        .unwrap();
    let member = joined.joiners[0].path.clone();
    let gone = joined.joiners[5].leaf;
    let rekey = tree.leave(gone, &mut rng).unwrap();
    let datagrams = pack_signed(&rekey, &tree, 1200, &key).unwrap();
    let expected_kcv = tree
        .root_key()
        .traffic_key(group(), rekey.epoch)
        .check_value();
    let built = json!({
        "controller_public_key": hex::encode(key.verifying_key().to_bytes()),
        "group": group().0,
        "member_epoch": member.epoch().0,
        "member_path": hex::encode(PathKeys::encode(&member).as_slice()),
        "departed_leaf": gone.0,
        "datagrams": datagrams.iter().map(hex::encode).collect::<Vec<_>>(),
        "traffic_kcv_after": hex::encode(expected_kcv.0),
    });
    let stored = check_or_bless("rekey.json", &built);

    let controller = wire::verifying_key(
        &hex::decode(stored["controller_public_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap(),
    )
    .unwrap();
    let path_bytes = hex::decode(stored["member_path"].as_str().unwrap()).unwrap();
    let mut path = HeldPath::trusted(
        PathKeys::decode(
            group(),
            Epoch(stored["member_epoch"].as_u64().unwrap()),
            &path_bytes,
        )
        .unwrap(),
    );
    assert_ne!(
        path.leaf(),
        NodeId(stored["departed_leaf"].as_u64().unwrap() as u32)
    );
    let mut kcv = None;
    for d in stored["datagrams"].as_array().unwrap() {
        let authentic =
            AuthenticRekey::verify(&hex::decode(d.as_str().unwrap()).unwrap(), &controller)
                .unwrap();
        if let Ok(fresh) = authentic.fresh(&mut path) {
            kcv = Some(fresh.apply().unwrap().kcv);
        }
    }
    assert_eq!(
        hex::encode(kcv.unwrap().0),
        stored["traffic_kcv_after"].as_str().unwrap()
    );
}

/// Welcomes sealed under each KEM from a seeded RNG (so the bytes are reproducible), with the
/// member's secret key: the welcome opens to the stored path, and sealing again gives the same
/// bytes. X-Wing is draft-connolly-cfrg-xwing-kem as HPKE KEM 0x647a; X25519 is RFC 9180's
/// DHKEM(X25519, HKDF-SHA256).
#[test]
fn welcome_vectors_open_to_the_stored_path_under_each_kem() {
    let controller = SigningKey::from_bytes(&[7; 32]);
    let built: Value = Kem::ALL
        .into_iter()
        .map(|kem| {
            let mut rng = ChaCha20Rng::seed_from_u64(2027);
            let mut tree = KeyTree::new(group(), TreeConfig::default(), &mut rng).unwrap();
            let batch = Batch {
                leaves: vec![],
                joins: 4,
            };
            let path = tree.rekey(&batch, &mut rng).unwrap().joiners[1]
                .path
                .clone();
            let secret = HpkeSecret::generate(kem, &mut rng);
            let public = secret.public_key().unwrap();
            let to = SealedFor {
                kind: SealedKind::Welcome,
                member: MemberId(2),
                request_nonce: [0x21; 16],
                rekey_address: Some("239.255.77.1:47701".parse().unwrap()),
            };
            let sealed = wire::seal_path(&path, &to, &public, &mut rng).unwrap();
            let vector = json!({
                "member_secret_key": hex::encode(secret.as_bytes()),
                "member_public_key": hex::encode(public.as_bytes()),
                "signed_welcome": hex::encode(wire::sign(&sealed, &controller)),
                "path": hex::encode(PathKeys::encode(&path).as_slice()),
            });
            (kem.name().to_owned(), vector)
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    let stored = check_or_bless("welcome.json", &built);
    for kem in Kem::ALL {
        let vector = &stored[kem.name()];
        let field = |name: &str| hex::decode(vector[name].as_str().unwrap()).unwrap();
        let secret = HpkeSecret::from_bytes(kem, field("member_secret_key").try_into().unwrap());
        assert_eq!(
            secret.public_key().unwrap().as_bytes(),
            field("member_public_key")
        );
        let welcome =
            wire::open::<SealedPath>(&field("signed_welcome"), &controller.verifying_key())
                .unwrap();
        assert_eq!(welcome.message().kem, kem);
        assert_eq!(welcome.message().encapped.len(), kem.encapped_len());
        let held = wire::open_path(&welcome, &secret).unwrap();
        let path = PathKeys::decode(group(), welcome.message().epoch, &field("path")).unwrap();
        assert_eq!(
            held.root_key().unwrap().as_bytes(),
            path.root_key().unwrap().as_bytes(),
            "{kem}"
        );
    }
}
