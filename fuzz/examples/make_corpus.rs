//! Writes the seed corpus `fuzz/corpus/<target>/`: a few valid encodings per target and a few
//! invalid ones (truncated, bad magic, over a bound, ...). Deterministic: run it again and the
//! files are the same. `cargo run --example make_corpus` from `fuzz/`.

use std::fs;
use std::path::Path;

use gkm_fuzz::{Fixture, GROUP, PATH_EPOCH, TARGETS, agents};
use lkh_tree::{Epoch, GroupId, Kcv, NodeId, WRAPPED_LEN, Wrap};
use wire::{
    Ack, Acked, Codec, DataFrame, ErrorMessage, HEADER_LEN, Heartbeat, HpkePublicKey, Item, Kem,
    KeyAnnouncement, KeyChain, KeyChainRequest, LeaveRequest, MAX_REASON, MAX_SEALED, MAX_TOKEN,
    MemberId, PathKeys, RegistrationRequest, RekeyDatagram, ResyncRequest, SealedKind, SealedPath,
    Status, Subscribe,
};

/// The files of one target: (name, bytes).
type Files = Vec<(String, Vec<u8>)>;

fn named(files: &mut Files, name: &str, bytes: Vec<u8>) {
    files.push((name.to_owned(), bytes));
}

/// Invalid variants of a valid encoding: truncated, bad magic, bad or old version, other type,
/// trailing.
fn invalid_variants(files: &mut Files, valid: &[u8]) {
    named(
        files,
        "invalid-truncated",
        valid[..valid.len() - 1].to_vec(),
    );
    named(
        files,
        "invalid-header-only",
        valid[..valid.len().min(wire::HEADER_LEN)].to_vec(),
    );
    let mut magic = valid.to_vec();
    magic[0] = b'X';
    named(files, "invalid-bad-magic", magic);
    let mut version = valid.to_vec();
    version[2] = wire::VERSION + 1;
    named(files, "invalid-bad-version", version);
    // The same bytes under version 1, before the rekey salt: refused by the header alone.
    let mut old = valid.to_vec();
    old[2] = 1;
    named(files, "invalid-old-version-1", old);
    let mut ty = valid.to_vec();
    ty[3] = if ty[3] == 9 { 1 } else { ty[3] + 1 };
    named(files, "invalid-other-type", ty);
    let mut trailing = valid.to_vec();
    trailing.push(0);
    named(files, "invalid-trailing-byte", trailing);
    named(files, "invalid-empty", Vec::new());
}

fn registration_request() -> Files {
    let mut files = Files::new();
    let base = RegistrationRequest {
        group: GROUP,
        identity: [0x11; 32],
        hpke_key: HpkePublicKey::new(Kem::XWing, vec![0x22; Kem::XWing.public_key_len()])
            .expect("an X-Wing key's length"),
        timestamp_ms: 1_760_000_000_000,
        nonce: [0x33; 16],
        token: Vec::new(),
    };
    named(&mut files, "valid-no-token", base.to_bytes());
    let token = RegistrationRequest {
        token: b"enroll-2f9c".to_vec(),
        ..base.clone()
    };
    named(&mut files, "valid-token", token.to_bytes());
    let long = RegistrationRequest {
        token: vec![0xee; MAX_TOKEN],
        group: GroupId(u64::MAX),
        ..base.clone()
    };
    named(&mut files, "valid-max-token", long.to_bytes());
    let x25519 = RegistrationRequest {
        hpke_key: HpkePublicKey::new(Kem::X25519, vec![0x23; 32]).expect("an X25519 key's length"),
        ..base.clone()
    };
    named(&mut files, "valid-x25519", x25519.to_bytes());
    let mut unknown_kem = base.to_bytes();
    unknown_kem[wire::HEADER_LEN + 32..wire::HEADER_LEN + 34].copy_from_slice(&[0x00, 0x10]);
    named(&mut files, "invalid-unknown-kem", unknown_kem);
    let mut relabelled = x25519.to_bytes();
    relabelled[wire::HEADER_LEN + 32..wire::HEADER_LEN + 34]
        .copy_from_slice(&Kem::XWing.id().to_be_bytes());
    named(&mut files, "invalid-x25519-key-labelled-x-wing", relabelled);
    let mut over = long.to_bytes();
    let at = over.len() - MAX_TOKEN - 1;
    over[at] = u8::try_from(MAX_TOKEN + 1).unwrap_or(u8::MAX);
    over.push(0xee);
    named(&mut files, "invalid-token-too-long", over);
    invalid_variants(&mut files, &token.to_bytes());
    files
}

fn sealed_path() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    // A realistic ciphertext length: a count byte, the path keys, the AEAD tag.
    let sealed_len = PathKeys::encode(&fixture.path).len() + 16;
    let welcome = SealedPath {
        kind: SealedKind::Welcome,
        group: GROUP,
        member: MemberId(1),
        epoch: PATH_EPOCH,
        request_nonce: [0x44; 16],
        kem: Kem::XWing,
        encapped: vec![0x55; Kem::XWing.encapped_len()],
        rekey_address: Some(std::net::SocketAddr::from(([239, 255, 77, 1], 47701))),
        ciphertext: (0..sealed_len).map(|i| (i * 7 % 251) as u8).collect(),
    };
    named(&mut files, "valid-welcome", welcome.to_bytes());
    let resync = SealedPath {
        kind: SealedKind::Resync,
        member: MemberId(19),
        epoch: Epoch(21),
        ..welcome.clone()
    };
    named(&mut files, "valid-resync", resync.to_bytes());
    let unsaid = SealedPath {
        rekey_address: None,
        ..resync.clone()
    };
    named(&mut files, "valid-no-rekey-address", unsaid.to_bytes());
    let empty = SealedPath {
        ciphertext: Vec::new(),
        ..resync.clone()
    };
    named(&mut files, "valid-empty-ciphertext", empty.to_bytes());
    let max = SealedPath {
        ciphertext: vec![0xab; MAX_SEALED],
        ..welcome.clone()
    };
    named(&mut files, "valid-max-ciphertext", max.to_bytes());
    let mut over = max.to_bytes();
    let at = over.len() - MAX_SEALED - 2;
    over[at..at + 2].copy_from_slice(
        &u16::try_from(MAX_SEALED + 1)
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    over.push(0xab);
    named(&mut files, "invalid-ciphertext-too-long", over);
    invalid_variants(&mut files, &welcome.to_bytes());
    files
}

fn heartbeat() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    let kcv = fixture
        .path
        .traffic_key()
        .map_or(Kcv([0; 8]), |k| k.check_value());
    let beat = Heartbeat {
        group: GROUP,
        epoch: PATH_EPOCH,
        kcv,
        timestamp_ms: 1_760_000_000_123,
    };
    named(&mut files, "valid", beat.to_bytes());
    let other = Heartbeat {
        group: GroupId(0),
        epoch: Epoch(u64::MAX),
        kcv: Kcv([0xff; 8]),
        timestamp_ms: 0,
    };
    named(&mut files, "valid-extremes", other.to_bytes());
    invalid_variants(&mut files, &beat.to_bytes());
    files
}

fn resync_request() -> Files {
    let mut files = Files::new();
    let request = ResyncRequest {
        group: GROUP,
        member: MemberId(4),
        epoch: Epoch(18),
        kcv: Kcv([0x5c; 8]),
        timestamp_ms: 1_760_000_000_456,
        nonce: [0x66; 16],
        hpke_key: HpkePublicKey::new(Kem::XWing, vec![0x67; Kem::XWing.public_key_len()])
            .expect("an X-Wing key's length"),
    };
    named(&mut files, "valid", request.to_bytes());
    let zero = ResyncRequest {
        group: GroupId(0),
        member: MemberId(0),
        epoch: Epoch(0),
        kcv: Kcv([0x5c; 8]),
        timestamp_ms: 0,
        nonce: [0; 16],
        hpke_key: HpkePublicKey::new(Kem::X25519, vec![0; 32]).expect("an X25519 key's length"),
    };
    named(&mut files, "valid-zero", zero.to_bytes());
    invalid_variants(&mut files, &request.to_bytes());
    files
}

fn leave_request() -> Files {
    let mut files = Files::new();
    let leave = LeaveRequest {
        group: GROUP,
        member: MemberId(2),
        timestamp_ms: 1_760_000_000_789,
        nonce: [0x77; 16],
    };
    named(&mut files, "valid", leave.to_bytes());
    let max = LeaveRequest {
        group: GroupId(u64::MAX),
        member: MemberId(u64::MAX),
        timestamp_ms: u64::MAX,
        nonce: [0xff; 16],
    };
    named(&mut files, "valid-max", max.to_bytes());
    invalid_variants(&mut files, &leave.to_bytes());
    files
}

fn ack() -> Files {
    let mut files = Files::new();
    let ack = Ack {
        group: GROUP,
        member: MemberId(2),
        acked: Acked::LeaseRenewed,
        request_nonce: [0x77; 16],
        epoch: Epoch(9),
    };
    named(&mut files, "valid", ack.to_bytes());
    let left = Ack {
        group: GroupId(u64::MAX),
        member: MemberId(u64::MAX),
        acked: Acked::Left,
        request_nonce: [0xff; 16],
        epoch: Epoch(u64::MAX),
    };
    named(&mut files, "valid-max", left.to_bytes());
    let mut unknown = ack.to_bytes();
    unknown[HEADER_LEN + 8] = 3;
    named(&mut files, "invalid-unknown-kind", unknown);
    invalid_variants(&mut files, &ack.to_bytes());
    files
}

fn error_message() -> Files {
    let mut files = Files::new();
    let error = ErrorMessage {
        group: GROUP,
        status: Status::Unauthorized,
        reason: "enrollment token already used".to_owned(),
    };
    named(&mut files, "valid-ascii", error.to_bytes());
    let utf8 = ErrorMessage {
        group: GROUP,
        status: Status::Stale,
        reason: "clé déjà utilisée — 鍵".to_owned(),
    };
    named(&mut files, "valid-utf8", utf8.to_bytes());
    let empty = ErrorMessage {
        group: GROUP,
        status: Status::UnknownGroup,
        reason: String::new(),
    };
    named(&mut files, "valid-empty-reason", empty.to_bytes());
    // Code 0 was an acknowledgement before wire version 2 gave it a message of its own.
    let mut zero = empty.to_bytes();
    zero[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&[0, 0]);
    named(&mut files, "invalid-code-0", zero);
    let max = ErrorMessage {
        group: GROUP,
        status: Status::Other(u16::MAX),
        reason: "r".repeat(MAX_REASON),
    };
    named(&mut files, "valid-max-reason", max.to_bytes());
    let mut bad_utf8 = error.to_bytes();
    let last = bad_utf8.len() - 1;
    bad_utf8[last] = 0xff;
    named(&mut files, "invalid-not-utf8", bad_utf8);
    let mut over = max.to_bytes();
    let at = over.len() - MAX_REASON - 2;
    over[at..at + 2].copy_from_slice(
        &u16::try_from(MAX_REASON + 1)
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    over.push(b'r');
    named(&mut files, "invalid-reason-too-long", over);
    invalid_variants(&mut files, &error.to_bytes());
    files
}

fn data_frame() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    let Some(key) = fixture.path.traffic_key() else {
        return files;
    };
    let frame = wire::data::seal(&key, GROUP, PATH_EPOCH, 3, 1, b"hello, group");
    named(&mut files, "valid-sealed", frame.to_bytes());
    let empty = wire::data::seal(&key, GROUP, PATH_EPOCH, 3, 2, b"");
    named(&mut files, "valid-empty-payload", empty.to_bytes());
    let big = wire::data::seal(&key, GROUP, PATH_EPOCH, u32::MAX, u64::MAX, &[0x5c; 1000]);
    named(&mut files, "valid-1000-bytes", big.to_bytes());
    let short = DataFrame {
        ciphertext: vec![0; 15],
        ..empty
    };
    named(&mut files, "invalid-shorter-than-tag", short.to_bytes());
    invalid_variants(&mut files, &frame.to_bytes());
    files
}

/// A datagram of every shape the packer does not make: many covers, advances, flagged wraps.
fn handmade_datagram() -> RekeyDatagram {
    let wrap = |target: u32, wrapping: u32, under_new: bool, fill: u8| Wrap {
        target: NodeId(target),
        wrapping: NodeId(wrapping),
        under_new,
        ciphertext: [fill; WRAPPED_LEN],
    };
    RekeyDatagram {
        group: GROUP,
        epoch: Epoch(21),
        salt: lkh_tree::RekeySalt([0x5a; lkh_tree::SALT_LEN]),
        kcv: lkh_tree::Kcv([0xc5; lkh_tree::KCV_LEN]),
        index: 2,
        count: 3,
        seeds: true,
        covers: vec![NodeId(0), NodeId(5), NodeId(NodeId::LIMIT - 1)],
        items: vec![
            Item::Advance(NodeId(1)),
            Item::Wrap(wrap(1, 4, false, 0x01)),
            Item::Link(lkh_tree::Link {
                child: NodeId(4),
                parent: NodeId(1),
            }),
            Item::Wrap(wrap(0, 1, true, 0x02)),
            Item::Advance(NodeId(2)),
            Item::Wrap(wrap(2, NodeId::LIMIT - 1, true, 0x03)),
        ],
    }
}

fn rekey_datagram() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    for (i, datagram) in fixture.datagrams.iter().enumerate() {
        named(
            &mut files,
            &format!("valid-leave-{i:02}"),
            datagram.to_bytes(),
        );
    }
    let handmade = handmade_datagram();
    named(&mut files, "valid-handmade", handmade.to_bytes());
    let empty = RekeyDatagram {
        covers: Vec::new(),
        items: Vec::new(),
        ..handmade.clone()
    };
    named(&mut files, "valid-empty", empty.to_bytes());
    let index = RekeyDatagram {
        index: 3,
        ..handmade.clone()
    };
    named(
        &mut files,
        "invalid-index-not-below-count",
        index.to_bytes(),
    );
    // Header, epoch, salt, check value, index 2, count 3, flags; then the counts.
    let fixed = wire::HEADER_LEN + 8 + lkh_tree::SALT_LEN + lkh_tree::KCV_LEN + 3;
    let mut top = empty.to_bytes();
    top.truncate(fixed);
    top.extend_from_slice(&[1, 0x80, 0x80, 0x80, 0x80, 0x10, 0]);
    named(&mut files, "invalid-cover-above-node-limit", top);
    let mut many = empty.to_bytes();
    many.truncate(fixed);
    many.extend_from_slice(&[0, 0xff, 0xff, 0x03, 0]);
    named(&mut files, "invalid-items-over-limit", many);
    let mut overlong = empty.to_bytes();
    overlong.truncate(fixed);
    overlong.extend_from_slice(&[0x80, 0x00, 0]);
    named(&mut files, "invalid-count-not-minimal", overlong);
    let mut targetless = empty.to_bytes();
    targetless.truncate(fixed);
    // One wrap item (kind 0) naming no target, before any target was named.
    targetless.extend_from_slice(&[0, 1, 0]);
    targetless.extend_from_slice(&[0x11; 32]);
    named(&mut files, "invalid-wrap-without-target", targetless);
    let mut version2 = handmade.to_bytes();
    version2[2] = 2;
    named(&mut files, "invalid-wire-version-2", version2);
    invalid_variants(&mut files, &handmade.to_bytes());
    files
}

fn path_keys() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    for (i, path) in fixture.paths.iter().take(4).enumerate() {
        named(
            &mut files,
            &format!("valid-member-{i:02}"),
            PathKeys::encode(path).to_vec(),
        );
    }
    let valid = PathKeys::encode(&fixture.path).to_vec();
    named(
        &mut files,
        "invalid-truncated",
        valid[..valid.len() - 1].to_vec(),
    );
    let mut trailing = valid.clone();
    trailing.push(0);
    named(&mut files, "invalid-trailing-byte", trailing);
    named(&mut files, "invalid-empty-path", vec![0]);
    named(&mut files, "invalid-count-66", vec![66]);
    let leaf_only: Vec<u8> = valid.iter().copied().take(1 + 44).collect();
    let mut one = leaf_only;
    one[0] = 1;
    named(&mut files, "invalid-leaf-only", one);
    // The leaf twice: same node in two places.
    let mut twice = valid.clone();
    let count = usize::from(twice[0]);
    if count >= 3 {
        let leaf = twice[1..5].to_vec();
        twice[1 + 44..1 + 44 + 4].copy_from_slice(&leaf);
        named(&mut files, "invalid-node-twice", twice);
    }
    // The root's version above the epoch.
    let mut future = valid.clone();
    let root_version = 1 + (count - 1) * 44 + 4;
    future[root_version..root_version + 8].copy_from_slice(&(PATH_EPOCH.0 + 1).to_be_bytes());
    named(&mut files, "invalid-version-above-epoch", future);
    files
}

fn member_datagram() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    let signed: Vec<Vec<u8>> = fixture
        .datagrams
        .iter()
        .map(|d| d.sign(&fixture.signing))
        .collect();
    for (i, bytes) in signed.iter().enumerate() {
        named(&mut files, &format!("valid-leave-{i:02}"), bytes.clone());
    }
    let first = &signed[0];
    let mut flipped = first.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    named(&mut files, "invalid-signature-bit", flipped);
    let mut body_flip = first.clone();
    body_flip[wire::HEADER_LEN + 3] ^= 0x10;
    named(&mut files, "invalid-body-bit", body_flip);
    named(
        &mut files,
        "invalid-no-signature",
        fixture.datagrams[0].to_bytes(),
    );
    let wrong_group = RekeyDatagram {
        group: GroupId(8),
        ..fixture.datagrams[0].clone()
    };
    named(
        &mut files,
        "invalid-other-group",
        wrong_group.sign(&fixture.signing),
    );
    let stale = RekeyDatagram {
        epoch: PATH_EPOCH,
        ..fixture.datagrams[0].clone()
    };
    named(&mut files, "invalid-stale", stale.sign(&fixture.signing));
    named(
        &mut files,
        "invalid-handmade",
        handmade_datagram().sign(&fixture.signing),
    );
    invalid_variants(&mut files, first);
    files
}

fn member_apply() -> Files {
    let mut files = Files::new();
    let fixture = Fixture::get();
    for (i, datagram) in fixture.datagrams.iter().enumerate() {
        named(
            &mut files,
            &format!("valid-leave-{i:02}"),
            datagram.to_bytes(),
        );
    }
    named(
        &mut files,
        "invalid-handmade",
        handmade_datagram().to_bytes(),
    );
    if let Some(first) = fixture.datagrams.first() {
        let mut advanced = first.clone();
        advanced
            .items
            .extend(fixture.path.keys().iter().map(|k| Item::Advance(k.node)));
        named(&mut files, "edge-advances-whole-path", advanced.to_bytes());
        let mut reversed = first.clone();
        reversed.items.reverse();
        named(&mut files, "valid-items-reversed", reversed.to_bytes());
        let mut flagged = first.clone();
        for item in &mut flagged.items {
            if let Item::Wrap(wrap) = item {
                wrap.under_new = !wrap.under_new;
            }
        }
        named(&mut files, "invalid-flags-flipped", flagged.to_bytes());
        let mut bad_kcv = first.clone();
        bad_kcv.kcv.0[0] ^= 1;
        named(&mut files, "invalid-key-check-value", bad_kcv.to_bytes());
    }
    files
}

/// A member-signed or controller-signed seed for the agent targets: selector 1 and the body.
fn to_sign(selector: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend(body);
    out
}

/// A raw seed for the agent targets: selector 0 and the bytes.
fn raw(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(bytes);
    out
}

/// The unsigned body of a signed message.
fn body(signed: &[u8]) -> Vec<u8> {
    signed[..signed.len() - wire::SIGNATURE_LEN].to_vec()
}

fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out[at] ^= 0x04;
    out
}

fn resync(id: MemberId, at: u64, nonce: u8) -> ResyncRequest {
    ResyncRequest {
        group: agents::GROUP,
        member: id,
        epoch: Epoch(1),
        kcv: Kcv([0x5c; 8]),
        timestamp_ms: at,
        nonce: [nonce; 16],
        hpke_key: agents::hpke(0).public_key().expect("a valid X-Wing secret"),
    }
}

fn registration(identity: &ed25519_dalek::SigningKey, at: u64, nonce: u8) -> RegistrationRequest {
    RegistrationRequest {
        group: agents::GROUP,
        identity: identity.verifying_key().to_bytes(),
        hpke_key: wire::HpkeSecret::from_bytes(wire::Kem::XWing, [0x42; 32])
            .public_key()
            .expect("a valid X-Wing secret"),
        timestamp_ms: at,
        nonce: [nonce; 16],
        token: Vec::new(),
    }
}

/// Requests shared by the controller targets: (name, input).
fn requests() -> Files {
    let mut files = Files::new();
    let a = agents::Agents::get();
    let now = agents::NOW;
    let (_, member_resync) = a.member();
    let stranger = agents::identity(agents::MEMBERS + 1);
    let m = agents::MEMBERS as u8;
    named(&mut files, "valid-resync", raw(&member_resync));
    let reg = wire::sign(&registration(&stranger, now, 1), &stranger);
    named(&mut files, "valid-register-stranger", raw(&reg));
    let leave = LeaveRequest {
        group: agents::GROUP,
        member: a.ids[1],
        timestamp_ms: now,
        nonce: [2; 16],
    };
    named(
        &mut files,
        "valid-leave",
        raw(&wire::sign(&leave, &agents::identity(1))),
    );
    named(
        &mut files,
        "valid-signed-leave-body",
        to_sign(1, leave.to_bytes()),
    );
    let own = resync(a.ids[0], now, 3);
    named(
        &mut files,
        "valid-signed-resync-body",
        to_sign(m, own.to_bytes()),
    );
    let again = registration(&agents::identity(2), now, 4);
    // A low-order X25519 key: nothing can be sealed to it.
    let unusable = RegistrationRequest {
        hpke_key: HpkePublicKey::new(Kem::X25519, vec![0; 32]).expect("an X25519 key's length"),
        ..registration(&agents::identity(1), now, 8)
    };
    // An X25519 key where the group takes X-Wing keys only.
    let classical = RegistrationRequest {
        hpke_key: wire::HpkeSecret::from_bytes(Kem::X25519, [0x43; 32])
            .public_key()
            .expect("a valid X25519 secret"),
        ..registration(&stranger, now, 9)
    };
    named(
        &mut files,
        "invalid-kem-not-accepted",
        raw(&wire::sign(&classical, &stranger)),
    );
    // Member 0's resync presenting a key other than the one it registered with.
    let other_key = ResyncRequest {
        hpke_key: agents::hpke(1).public_key().expect("a valid X-Wing secret"),
        ..resync(a.ids[0], now, 10)
    };
    named(
        &mut files,
        "invalid-resync-wrong-hpke-key",
        to_sign(m, other_key.to_bytes()),
    );
    named(
        &mut files,
        "invalid-unusable-hpke-key",
        to_sign(1, unusable.to_bytes()),
    );
    named(
        &mut files,
        "valid-signed-register-body",
        to_sign(2, again.to_bytes()),
    );
    named(
        &mut files,
        "invalid-resync-signed-by-another-member",
        to_sign(1, own.to_bytes()),
    );
    named(
        &mut files,
        "invalid-resync-signature-bit",
        raw(&flipped(&member_resync, member_resync.len() - 1)),
    );
    named(
        &mut files,
        "invalid-resync-body-bit",
        raw(&flipped(&member_resync, wire::HEADER_LEN + 2)),
    );
    let stale = wire::sign(&registration(&stranger, now - 600_000, 5), &stranger);
    named(&mut files, "invalid-stale-registration", raw(&stale));
    let other = ResyncRequest {
        group: GroupId(12),
        ..resync(a.ids[0], now, 6)
    };
    named(
        &mut files,
        "invalid-other-group",
        to_sign(m, other.to_bytes()),
    );
    let forged = ResyncRequest {
        member: MemberId(0xdead_beef),
        ..resync(a.ids[0], now, 7)
    };
    named(
        &mut files,
        "invalid-not-a-member",
        to_sign(m, forged.to_bytes()),
    );
    named(&mut files, "invalid-empty", raw(&[]));
    named(
        &mut files,
        "invalid-garbage",
        raw(b"GK\x01\x05 not a request"),
    );
    files
}

fn controller_request() -> Files {
    let mut files = requests();
    let chain = KeyChainRequest {
        group: agents::GROUP,
        known_key: [9; 32],
        nonce: [3; 16],
    };
    named(&mut files, "key-chain-request", raw(&chain.to_bytes()));
    let (multicast, _) = agents::Agents::get().captures();
    named(
        &mut files,
        "invalid-multicast-as-request",
        raw(&multicast[0]),
    );
    files
}

fn controller_subscribe() -> Files {
    let a = agents::Agents::get();
    let now = agents::NOW;
    let m = agents::MEMBERS as u8;
    let subscribe = |member: MemberId, nonce: u8, cookie| Subscribe {
        group: agents::GROUP,
        member,
        timestamp_ms: now,
        nonce: [nonce; 16],
        cookie,
    };
    let mut files = Files::new();
    let ask = subscribe(a.ids[0], 1, None);
    let signed = wire::sign(&ask, &agents::identity(0));
    named(&mut files, "valid-ask-for-cookie", raw(&signed));
    named(
        &mut files,
        "valid-signed-ask-body",
        to_sign(m, ask.to_bytes()),
    );
    let cookie = agents::cookie_for(&signed).expect("the fixture answers with a cookie");
    let confirm = subscribe(a.ids[0], 2, Some(cookie));
    let confirmed = wire::sign(&confirm, &agents::identity(0));
    named(&mut files, "valid-echo-cookie", raw(&confirmed));
    let mut forged = cookie;
    forged.mac[0] ^= 1;
    let bad = wire::sign(&subscribe(a.ids[0], 3, Some(forged)), &agents::identity(0));
    named(&mut files, "invalid-forged-cookie", raw(&bad));
    let stale = wire::Cookie {
        issued_ms: now - gkm_server::COOKIE_LIFETIME_MS - 1,
        ..cookie
    };
    let old = wire::sign(&subscribe(a.ids[0], 4, Some(stale)), &agents::identity(0));
    named(&mut files, "invalid-expired-cookie", raw(&old));
    let other = wire::sign(&subscribe(a.ids[1], 5, Some(cookie)), &agents::identity(1));
    named(&mut files, "invalid-another-members-cookie", raw(&other));
    let stranger = wire::sign(
        &subscribe(MemberId(0xdead_beef), 6, None),
        &agents::identity(agents::MEMBERS + 1),
    );
    named(&mut files, "invalid-not-a-member", raw(&stranger));
    named(
        &mut files,
        "invalid-signature-bit",
        raw(&flipped(&signed, signed.len() - 1)),
    );
    // The version 1 subscription (a resync request by UDP) and other requests are refused.
    for (name, bytes) in requests() {
        if let Some(rest) = name.strip_prefix("valid-") {
            named(
                &mut files,
                &format!("invalid-not-a-subscription-{rest}"),
                bytes,
            );
        }
    }
    files
}

fn control_json() -> Files {
    let a = agents::Agents::get();
    let g = agents::GROUP_NAME;
    let lines = [
        ("valid-status", r#"{"cmd":"status"}"#.to_owned()),
        ("valid-groups", r#"{"cmd":"groups"}"#.to_owned()),
        (
            "valid-members",
            format!(r#"{{"cmd":"members","group":"{g}"}}"#),
        ),
        (
            "valid-evict",
            format!(r#"{{"cmd":"evict","group":"{g}","member":{}}}"#, a.ids[1].0),
        ),
        ("valid-rekey", format!(r#"{{"cmd":"rekey","group":"{g}"}}"#)),
        (
            "valid-policy",
            format!(r#"{{"cmd":"policy","group":"{g}"}}"#),
        ),
        (
            "valid-policy-set",
            format!(r#"{{"cmd":"policy","group":"{g}","set":"repeats=3"}}"#),
        ),
        ("valid-keys", format!(r#"{{"cmd":"keys","group":"{g}"}}"#)),
        ("valid-tree", format!(r#"{{"cmd":"tree","group":"{g}"}}"#)),
        ("valid-stats", format!(r#"{{"cmd":"stats","group":"{g}"}}"#)),
        (
            "invalid-unknown-group",
            r#"{"cmd":"members","group":"nope"}"#.to_owned(),
        ),
        (
            "invalid-unknown-member",
            format!(r#"{{"cmd":"evict","group":"{g}","member":999}}"#),
        ),
        ("invalid-unknown-cmd", r#"{"cmd":"nope"}"#.to_owned()),
        (
            "invalid-extra-field",
            r#"{"cmd":"status","x":1}"#.to_owned(),
        ),
        (
            "invalid-not-key-value",
            format!(r#"{{"cmd":"policy","group":"{g}","set":"repeats"}}"#),
        ),
        (
            "invalid-bad-value",
            format!(r#"{{"cmd":"policy","group":"{g}","set":"repeats=99"}}"#),
        ),
        ("invalid-not-json", "garbage".to_owned()),
    ];
    lines
        .into_iter()
        .map(|(name, line)| (name.to_owned(), line.into_bytes()))
        .collect()
}

fn member_multicast() -> Files {
    let mut files = Files::new();
    let (multicast, _) = agents::Agents::get().captures();
    let (beats, rekeys): (Vec<_>, Vec<_>) = multicast
        .iter()
        .partition(|b| wire::MessageType::peek(b) == Ok(wire::MessageType::Heartbeat));
    for (i, bytes) in rekeys.iter().enumerate() {
        let applies = agents::member_multicast(&raw(bytes));
        let name = if applies { "valid-rekey" } else { "rekey" };
        named(&mut files, &format!("{name}-{i:02}"), raw(bytes));
        named(
            &mut files,
            &format!("{name}-body-{i:02}"),
            to_sign(1, body(bytes)),
        );
    }
    let rekey = rekeys[0];
    named(
        &mut files,
        "invalid-rekey-signature-bit",
        raw(&flipped(rekey, rekey.len() - 1)),
    );
    named(
        &mut files,
        "invalid-rekey-body-bit",
        raw(&flipped(rekey, wire::HEADER_LEN + 3)),
    );
    named(
        &mut files,
        "invalid-rekey-truncated",
        raw(&rekey[..rekey.len() - 1]),
    );
    let mut stale = RekeyDatagram::decode_exact(&body(rekey)).expect("a captured rekey decodes");
    stale.epoch = Epoch(stale.epoch.0 - 1);
    named(
        &mut files,
        "invalid-stale-rekey-body",
        to_sign(1, stale.to_bytes()),
    );
    let announcement = KeyAnnouncement {
        group: agents::GROUP,
        key_id: 1,
        from_epoch: Epoch(2),
        grace_epochs: 16,
        issued_ms: agents::NOW,
        key: agents::identity(7).verifying_key().to_bytes(),
    };
    named(
        &mut files,
        "announcement-body",
        to_sign(1, announcement.to_bytes()),
    );
    named(
        &mut files,
        "invalid-announcement-by-a-member",
        raw(&wire::sign(&announcement, &agents::identity(1))),
    );
    let beat = beats[0];
    named(&mut files, "beat-ahead", raw(beat));
    let mut far = Heartbeat::decode_exact(&body(beat)).expect("a captured heartbeat decodes");
    far.epoch = Epoch(u64::MAX);
    named(
        &mut files,
        "beat-far-ahead-body",
        to_sign(1, far.to_bytes()),
    );
    named(
        &mut files,
        "invalid-beat-signature-bit",
        raw(&flipped(beat, beat.len() - 1)),
    );
    named(
        &mut files,
        "invalid-garbage",
        raw(b"GK\x01\x03 not a datagram"),
    );
    files
}

fn member_reply() -> Files {
    let mut files = Files::new();
    let (_, reply) = agents::Agents::get().captures();
    named(&mut files, "valid-resync", raw(&reply));
    named(&mut files, "valid-resync-body", to_sign(1, body(&reply)));
    named(
        &mut files,
        "invalid-signature-bit",
        raw(&flipped(&reply, reply.len() - 1)),
    );
    named(
        &mut files,
        "invalid-body-bit",
        raw(&flipped(&reply, reply.len() / 2)),
    );
    let mut other = SealedPath::decode_exact(&body(&reply)).expect("a captured reply decodes");
    other.request_nonce = [0; 16];
    named(
        &mut files,
        "invalid-other-nonce-body",
        to_sign(1, other.to_bytes()),
    );
    for status in [Status::NotAMember, Status::Stale, Status::UnknownGroup] {
        let error = ErrorMessage {
            group: agents::GROUP,
            status,
            reason: "seed".into(),
        };
        let name = format!("error-{}", status.code());
        named(&mut files, &name, raw(&error.to_bytes()));
    }
    let ack = Ack {
        group: agents::GROUP,
        member: wire::MemberId(1),
        acked: Acked::LeaseRenewed,
        request_nonce: [0; 16],
        epoch: Epoch(1),
    };
    named(&mut files, "ack-unasked", raw(&ack.to_bytes()));
    let chain = KeyChain {
        group: agents::GROUP,
        request_nonce: [0; 16],
        announcements: Vec::new(),
    };
    named(&mut files, "key-chain-unasked", raw(&chain.to_bytes()));
    let unknown = ErrorMessage {
        group: agents::GROUP,
        status: Status::SigningKeyUnknown,
        reason: "seed".into(),
    };
    named(&mut files, "error-412-unasked", raw(&unknown.to_bytes()));
    named(
        &mut files,
        "invalid-garbage",
        raw(b"GK\x01\x06 not a reply"),
    );
    files
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    for &target in TARGETS.iter().chain(agents::TARGETS) {
        let files = match target {
            "registration_request" => registration_request(),
            "sealed_path" => sealed_path(),
            "heartbeat" => heartbeat(),
            "resync_request" => resync_request(),
            "leave_request" => leave_request(),
            "error_message" => error_message(),
            "ack" => ack(),
            "data_frame" => data_frame(),
            "rekey_datagram" => rekey_datagram(),
            "path_keys" => path_keys(),
            "member_datagram" => member_datagram(),
            "member_apply" => member_apply(),
            "controller_request" => controller_request(),
            "controller_subscribe" => controller_subscribe(),
            "control_json" => control_json(),
            "member_multicast" => member_multicast(),
            "member_reply" => member_reply(),
            other => panic!("no corpus for target {other}"),
        };
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("remove the old corpus");
        }
        fs::create_dir_all(&dir).expect("create the corpus directory");
        let (mut valid, mut accepted) = (0, 0);
        for (name, bytes) in &files {
            // Every file goes through the target's own check now, so a bad seed fails here.
            let ok = gkm_fuzz::run_any(target, bytes).expect("a known target");
            accepted += usize::from(ok);
            valid += usize::from(name.starts_with("valid"));
            fs::write(dir.join(name), bytes).expect("write a corpus file");
        }
        println!(
            "{target:22} {:3} files, {valid:2} named valid, {accepted:2} accepted",
            files.len()
        );
        total += files.len();
    }
    println!("{total} files in {}", root.display());
}
