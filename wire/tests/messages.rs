//! Messages other than the rekey: signatures, bounds, data frames.

use ed25519_dalek::SigningKey;
use lkh_tree::{Epoch, GroupId, NodeKey};
use wire::{
    Codec, DecodeError, Heartbeat, HpkePublicKey, Kem, LeaveRequest, MessageType,
    RegistrationRequest, WireError, data, open, open_with, sign, verifying_key,
};

fn request() -> RegistrationRequest {
    let member = SigningKey::from_bytes(&[5; 32]);
    RegistrationRequest {
        group: GroupId(1),
        identity: member.verifying_key().to_bytes(),
        hpke_key: HpkePublicKey::new(Kem::X25519, vec![9; 32]).unwrap(),
        timestamp_ms: 1,
        nonce: [2; 16],
        token: vec![],
    }
}

/// GKM-V070: a registration names its KEM by HPKE identifier, and its key has that KEM's length:
/// an unknown KEM, or a key cut or padded to another KEM's length, is refused.
#[test]
fn v070_a_registration_names_a_known_kem_and_a_key_of_its_length() {
    let x_wing = RegistrationRequest {
        hpke_key: HpkePublicKey::new(Kem::XWing, vec![9; 1216]).unwrap(),
        ..request()
    };
    for good in [request(), x_wing.clone()] {
        assert_eq!(
            RegistrationRequest::decode_exact(&good.to_bytes()).unwrap(),
            good
        );
    }
    // The KEM identifier follows the 12-byte header and the 32-byte identity.
    const KEM_AT: usize = 12 + 32;
    let mut unknown = request().to_bytes();
    unknown[KEM_AT..KEM_AT + 2].copy_from_slice(&0x0010u16.to_be_bytes());
    assert_eq!(
        RegistrationRequest::decode_exact(&unknown),
        Err(DecodeError::Invalid("KEM is not x-wing or x25519"))
    );
    // An X25519 key labelled X-Wing is far too short; an X-Wing key labelled X25519 leaves bytes.
    let mut relabelled = request().to_bytes();
    relabelled[KEM_AT..KEM_AT + 2].copy_from_slice(&Kem::XWing.id().to_be_bytes());
    assert!(RegistrationRequest::decode_exact(&relabelled).is_err());
    let mut relabelled = x_wing.to_bytes();
    relabelled[KEM_AT..KEM_AT + 2].copy_from_slice(&Kem::X25519.id().to_be_bytes());
    assert!(RegistrationRequest::decode_exact(&relabelled).is_err());
    assert!(HpkePublicKey::new(Kem::XWing, vec![9; 32]).is_err());
}

#[test]
fn v014_a_registration_request_verifies_under_the_key_it_carries_only() {
    let member = SigningKey::from_bytes(&[5; 32]);
    let bytes = sign(&request(), &member);
    let opened = open_with::<RegistrationRequest>(&bytes, |r| verifying_key(&r.identity)).unwrap();
    assert_eq!(opened.message(), &request());
    let impostor = SigningKey::from_bytes(&[6; 32]);
    let forged = sign(&request(), &impostor);
    assert_eq!(
        open_with::<RegistrationRequest>(&forged, |r| verifying_key(&r.identity)).unwrap_err(),
        WireError::BadSignature
    );
}

#[test]
fn v015_one_signed_kind_cannot_stand_in_for_another() {
    let controller = SigningKey::from_bytes(&[1; 32]);
    let heartbeat = Heartbeat {
        group: GroupId(1),
        epoch: Epoch(3),
        kcv: lkh_tree::Kcv([0; 8]),
        timestamp_ms: 5,
    };
    let bytes = sign(&heartbeat, &controller);
    assert_eq!(MessageType::peek(&bytes).unwrap(), MessageType::Heartbeat);
    assert!(open::<Heartbeat>(&bytes, &controller.verifying_key()).is_ok());
    assert!(matches!(
        open::<LeaveRequest>(&bytes, &controller.verifying_key()),
        Err(WireError::Decode(DecodeError::BadType(4)))
    ));
}

#[test]
fn v006_v008_header_and_bounds_are_checked() {
    let mut bytes = request().to_bytes();
    bytes[0] = b'X';
    assert_eq!(
        RegistrationRequest::decode_exact(&bytes),
        Err(DecodeError::BadMagic)
    );
    for old_or_new in [1, wire::VERSION + 1] {
        let mut bytes = request().to_bytes();
        bytes[2] = old_or_new;
        let refused = RegistrationRequest::decode_exact(&bytes);
        assert_eq!(refused, Err(DecodeError::BadVersion(old_or_new)));
        let said = refused.unwrap_err().to_string();
        assert!(said.contains("same gkm release"), "{said}");
    }
    let mut long = request();
    long.token = vec![0; 65];
    let bytes = long.to_bytes();
    assert!(matches!(
        RegistrationRequest::decode_exact(&bytes),
        Err(DecodeError::TooLong { .. })
    ));
    let mut bytes = request().to_bytes();
    bytes.push(0);
    assert_eq!(
        RegistrationRequest::decode_exact(&bytes),
        Err(DecodeError::TrailingBytes(1))
    );
}

#[test]
fn v016_data_frames_round_trip_and_reject_tampering_and_other_epochs() {
    let root = NodeKey::from_bytes([4; 32]);
    let key = root.traffic_key(GroupId(1), Epoch(7));
    let frame = data::seal(&key, GroupId(1), Epoch(7), 3, 99, b"hello group");
    let decoded = wire::DataFrame::decode_exact(&frame.to_bytes()).unwrap();
    assert_eq!(data::open(&key, &decoded).unwrap(), b"hello group");
    let mut tampered = decoded.clone();
    tampered.seq = 100;
    assert_eq!(data::open(&key, &tampered), Err(WireError::BadFrame));
    let mut tampered = decoded.clone();
    tampered.ciphertext[0] ^= 1;
    assert_eq!(data::open(&key, &tampered), Err(WireError::BadFrame));
    let next = root.traffic_key(GroupId(1), Epoch(8));
    assert_eq!(data::open(&next, &decoded), Err(WireError::BadFrame));
}

#[test]
fn v010_a_sealed_path_must_be_a_well_formed_path() {
    use lkh_tree::{Batch, KeyTree, TreeConfig};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;
    use wire::PathKeys;

    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let mut tree = KeyTree::new(GroupId(1), TreeConfig::default(), &mut rng).unwrap();
    let rekey = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 20,
            },
            &mut rng,
        )
        .unwrap();
    let path = &rekey.joiners[7].path;
    let bytes = PathKeys::encode(path);
    let decoded = PathKeys::decode(GroupId(1), rekey.epoch, &bytes).unwrap();
    assert_eq!(decoded.leaf(), path.leaf());
    // Wrong epoch (the root's version must be the epoch), truncated, trailing, reordered.
    assert!(PathKeys::decode(GroupId(1), Epoch(rekey.epoch.0 + 1), &bytes).is_err());
    assert!(PathKeys::decode(GroupId(1), rekey.epoch, &bytes[..bytes.len() - 1]).is_err());
    let mut trailing = bytes.to_vec();
    trailing.push(0);
    assert!(PathKeys::decode(GroupId(1), rekey.epoch, &trailing).is_err());
    let mut reversed = vec![bytes[0]];
    for chunk in bytes[1..].chunks(wire::PATH_KEY_LEN).rev() {
        reversed.extend_from_slice(chunk);
    }
    assert!(PathKeys::decode(GroupId(1), rekey.epoch, &reversed).is_err());
}

/// GKM-V056: status codes are an enum both ways; an unknown code survives as `Other`; code 0
/// (the acknowledgement before `Ack`) is refused.
#[test]
fn v056_status_codes_map_both_ways_and_code_0_is_not_an_error() {
    use wire::Status;
    for status in [
        Status::Malformed,
        Status::BadSignature,
        Status::Unauthorized,
        Status::NotAMember,
        Status::UnexpectedMessage,
        Status::Stale,
        Status::UnknownGroup,
        Status::NotLeader,
        Status::RateLimited,
        Status::Unavailable,
        Status::GroupFull,
        Status::Other(599),
    ] {
        assert_eq!(Status::from_code(status.code()), Ok(status));
    }
    assert_ne!(Status::NotAMember.code(), Status::UnknownGroup.code());
    assert!(Status::from_code(0).is_err());
}

/// The sizes `RFC-notes/wire-format.md` §2 states for a member of a 2^20-member tree of degree 4
/// (11 path keys): signed welcomes, registration and resync requests under each KEM.
#[test]
fn hpke_message_sizes_are_as_documented() {
    use lkh_tree::{KeyVersion, MemberPath, NodeId, PathKey};
    use rand_core::SeedableRng;
    use wire::{HpkeSecret, MemberId, ResyncRequest, SealedFor, SealedKind};
    let keys = (0..11u32)
        .rev()
        .map(|node| PathKey {
            node: NodeId(node),
            version: KeyVersion(1),
            key: NodeKey::from_bytes([7; 32]),
        })
        .collect();
    let path = MemberPath::from_keys(GroupId(1), Epoch(1), keys).unwrap();
    let signer = SigningKey::from_bytes(&[5; 32]);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mut sizes = Vec::new();
    for kem in Kem::ALL {
        let public = HpkeSecret::generate(kem, &mut rng).public_key().unwrap();
        let to = SealedFor {
            kind: SealedKind::Welcome,
            member: MemberId(1),
            request_nonce: [0; 16],
            rekey_address: Some("239.255.77.1:47701".parse().unwrap()),
        };
        let welcome = wire::seal_path(&path, &to, &public, &mut rng).unwrap();
        let request = RegistrationRequest {
            hpke_key: public.clone(),
            ..request()
        };
        let resync = ResyncRequest {
            group: GroupId(1),
            member: MemberId(1),
            epoch: Epoch(1),
            kcv: lkh_tree::Kcv([0; 8]),
            timestamp_ms: 1,
            nonce: [0; 16],
            hpke_key: public,
        };
        sizes.push([
            sign(&welcome, &signer).len(),
            sign(&request, &signer).len(),
            sign(&resync, &signer).len(),
        ]);
    }
    assert_eq!(sizes, [[1_740, 1_351, 1_342], [652, 167, 158]]);
}
