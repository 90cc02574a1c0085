//! The checks behind the codec and member-path fuzz targets, shared with the corpus replay test
//! (`wire/tests/fuzz_corpus.rs` includes this file with `#[path]`), so that the fuzzer and
//! `cargo test` run exactly the same logic. Each check panics only on a real bug: a decoder that
//! panics, a non-canonical encoding, or a member path that panics on a hostile datagram.
//!
//! Uses only crates that `wire` also has (as dependencies or dev-dependencies): `wire`,
//! `lkh-tree`, `ed25519-dalek`, `rand_chacha`, `rand_core`.

use std::sync::OnceLock;

use ed25519_dalek::{SigningKey, VerifyingKey};
use lkh_tree::{Epoch, GroupId, KeyTree, MemberPath, NodeId, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{
    Ack, AuthenticRekey, Codec, DataFrame, ErrorMessage, FreshRekey, Heartbeat, HeldPath,
    LeaveRequest, MessageType, PathKeys, RegistrationRequest, RekeyDatagram, ResyncRequest,
    SIGNATURE_LEN, SealedKind, SealedPath,
};

/// Every codec and member-path target, by the name of its directory under `fuzz/corpus/` and of its binary.
pub const TARGETS: &[&str] = &[
    "registration_request",
    "sealed_path",
    "heartbeat",
    "resync_request",
    "leave_request",
    "error_message",
    "ack",
    "data_frame",
    "rekey_datagram",
    "path_keys",
    "member_datagram",
    "member_apply",
];

/// Runs the check of `target` on `data`. `None` for an unknown target; otherwise whether the
/// input was accepted (decoded, or for the member targets: verified, fresh and applied).
pub fn run(target: &str, data: &[u8]) -> Option<bool> {
    Some(match target {
        "registration_request" => registration_request(data),
        "sealed_path" => sealed_path(data),
        "heartbeat" => heartbeat(data),
        "resync_request" => resync_request(data),
        "leave_request" => leave_request(data),
        "error_message" => error_message(data),
        "ack" => ack(data),
        "data_frame" => data_frame(data),
        "rekey_datagram" => rekey_datagram(data),
        "path_keys" => path_keys(data),
        "member_datagram" => member_datagram(data),
        "member_apply" => member_apply(data),
        _ => return None,
    })
}

/// Decodes exactly; if that succeeds, the encoding must give back the input (the codec is
/// canonical) and the header must peek as `expected`.
fn roundtrip<T: Codec>(data: &[u8], expected: impl FnOnce(&T) -> MessageType) -> Option<T> {
    let value = T::decode_exact(data).ok()?;
    assert_eq!(
        value.to_bytes(),
        data,
        "decode then encode does not give back the input"
    );
    assert_eq!(
        MessageType::peek(data),
        Ok(expected(&value)),
        "header peeks as another type"
    );
    Some(value)
}

/// `RegistrationRequest::decode_exact`.
pub fn registration_request(data: &[u8]) -> bool {
    roundtrip::<RegistrationRequest>(data, |_| MessageType::RegistrationRequest).is_some()
}

/// `SealedPath::decode_exact` (welcome or resync response).
pub fn sealed_path(data: &[u8]) -> bool {
    roundtrip::<SealedPath>(data, |s| match s.kind {
        SealedKind::Welcome => MessageType::Welcome,
        SealedKind::Resync => MessageType::ResyncResponse,
    })
    .is_some()
}

/// `Heartbeat::decode_exact`.
pub fn heartbeat(data: &[u8]) -> bool {
    roundtrip::<Heartbeat>(data, |_| MessageType::Heartbeat).is_some()
}

/// `ResyncRequest::decode_exact`.
pub fn resync_request(data: &[u8]) -> bool {
    roundtrip::<ResyncRequest>(data, |_| MessageType::ResyncRequest).is_some()
}

/// `LeaveRequest::decode_exact`.
pub fn leave_request(data: &[u8]) -> bool {
    roundtrip::<LeaveRequest>(data, |_| MessageType::Leave).is_some()
}

/// `ErrorMessage::decode_exact`.
pub fn error_message(data: &[u8]) -> bool {
    roundtrip::<ErrorMessage>(data, |_| MessageType::Error).is_some()
}

/// `Ack::decode_exact`.
pub fn ack(data: &[u8]) -> bool {
    roundtrip::<Ack>(data, |_| MessageType::Ack).is_some()
}

/// `DataFrame::decode_exact`.
pub fn data_frame(data: &[u8]) -> bool {
    roundtrip::<DataFrame>(data, |_| MessageType::Data).is_some()
}

/// `RekeyDatagram::decode_exact` of an unsigned body; its `wire_len` counts the signature too.
pub fn rekey_datagram(data: &[u8]) -> bool {
    let Some(datagram) = roundtrip::<RekeyDatagram>(data, |_| MessageType::Rekey) else {
        return false;
    };
    assert_eq!(
        datagram.wire_len(),
        data.len() + SIGNATURE_LEN,
        "wire_len disagrees with the encoding"
    );
    true
}

/// The group of the fixture tree, and of the `path_keys` target.
pub const GROUP: GroupId = GroupId(7);
/// The epoch of the fixture member's path (after 20 single joins), and of `path_keys`.
pub const PATH_EPOCH: Epoch = Epoch(20);

/// `PathKeys::decode(GROUP, PATH_EPOCH, data)`; a decoded path encodes back to the input.
pub fn path_keys(data: &[u8]) -> bool {
    let Ok(path) = PathKeys::decode(GROUP, PATH_EPOCH, data) else {
        return false;
    };
    assert_eq!(path.group(), GROUP);
    assert_eq!(path.epoch(), PATH_EPOCH);
    assert_eq!(
        PathKeys::encode(&path).as_slice(),
        data,
        "path keys do not encode back to the input"
    );
    true
}

/// A deterministic controller and member: a degree-4 tree of group [`GROUP`] grown by 20 single
/// joins (epochs 1..=20), a member's path at epoch 20, then one leave (epoch 21) packed and
/// signed by a controller key made from a constant seed.
pub struct Fixture {
    /// The controller's signing key.
    pub signing: SigningKey,
    /// Its public key, which the member verifies against.
    pub controller: VerifyingKey,
    /// The member's path at epoch 20, before the leave.
    pub path: MemberPath,
    /// The departed member's leaf.
    pub departed: NodeId,
    /// The leave's datagrams, unsigned, packed for the MTUs of [`FIXTURE_MTUS`] in turn.
    pub datagrams: Vec<RekeyDatagram>,
    /// Every member's path at epoch 20 (the member's first), e.g. for the `path_keys` corpus.
    pub paths: Vec<MemberPath>,
}

/// The MTUs the fixture's leave is packed for.
pub const FIXTURE_MTUS: &[usize] = &[wire::DEFAULT_MTU, 400, 250];

/// The seed of the controller's Ed25519 key.
pub const CONTROLLER_SEED: [u8; 32] = [0x5a; 32];

impl Fixture {
    fn build() -> Fixture {
        let mut rng = ChaCha20Rng::seed_from_u64(0x0067_6b6d_f022);
        let mut tree =
            KeyTree::new(GROUP, TreeConfig::default(), &mut rng).expect("degree 4 is valid");
        let mut leaves = Vec::new();
        for _ in 0..20 {
            let rekey = tree.join(&mut rng).expect("a small tree takes a join");
            leaves.extend(rekey.joiners.iter().map(|j| j.leaf));
        }
        let member = *leaves.first().expect("20 joins");
        let departed = *leaves.get(1).expect("20 joins");
        let path = tree.member_path(member).expect("a current member");
        assert_eq!(path.epoch(), PATH_EPOCH);
        let paths = leaves
            .iter()
            .filter_map(|&leaf| tree.member_path(leaf))
            .collect();
        let rekey = tree
            .leave(departed, &mut rng)
            .expect("a current member leaves");
        let datagrams = FIXTURE_MTUS
            .iter()
            .flat_map(|&mtu| wire::pack(&rekey, &tree, mtu).expect("a small tree fits these MTUs"))
            .collect();
        let signing = SigningKey::from_bytes(&CONTROLLER_SEED);
        let controller = signing.verifying_key();
        Fixture {
            signing,
            controller,
            path,
            departed,
            datagrams,
            paths,
        }
    }

    /// The fixture, built once.
    pub fn get() -> &'static Fixture {
        static FIXTURE: OnceLock<Fixture> = OnceLock::new();
        FIXTURE.get_or_init(Fixture::build)
    }
}

/// The member's full path on a signed datagram: verify, fresh, apply (on a copy of the fixture
/// path). Must never panic. Whether the datagram applied.
pub fn member_datagram(data: &[u8]) -> bool {
    let fixture = Fixture::get();
    let mut path = HeldPath::trusted(fixture.path.clone());
    AuthenticRekey::verify(data, &fixture.controller)
        .and_then(|a| a.fresh(&mut path).and_then(FreshRekey::apply))
        .is_ok()
}

/// As [`member_datagram`], but the input is an unsigned datagram body that the harness signs
/// with the controller key first, so the fuzzer reaches `fresh` and `MemberPath::apply` with
/// arbitrary covers, advances and wraps (it cannot forge a signature).
pub fn member_apply(data: &[u8]) -> bool {
    let fixture = Fixture::get();
    let Ok(datagram) = RekeyDatagram::decode_exact(data) else {
        return false;
    };
    let signed = datagram.sign(&fixture.signing);
    member_datagram(&signed)
}
