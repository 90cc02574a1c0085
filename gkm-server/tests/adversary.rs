//! Insiders, tampering and replay against the real state machines: a real controller produces
//! real signed datagrams, real members receive them, and an attacker (a member who holds every
//! key of its path, the group key included, or anyone on the network) forges, flips bits and
//! replays. Every forged, damaged or replayed input is refused and leaves the member's epoch,
//! traffic key, counters and timers as they were; the next legitimate datagram still applies.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

mod common;

use common::attack::seal_wrap;
use common::{GROUP, Run, Seen, dropped, hpke, identity, policy};
use ed25519_dalek::SigningKey;
use gkm_member::Member;
use gkm_server::{Command, ConnId, Response, Timestamp, Transmit};
use lkh_tree::{Epoch, Kcv, MemberPath, NodeId, NodeKey, PathKey, PathUpdate, RekeySalt};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{
    Codec, ErrorMessage, Heartbeat, Item, MessageType, RekeyDatagram, ResyncRequest, SIGNATURE_LEN,
    SealedFor, SealedKind, Status, open, seal_path, sign,
};

/// How an insider signs a forgery: the key it has, or none at all.
fn forged_signatures(
    body: &[u8],
    insider: &SigningKey,
    group_key: &[u8; 32],
    real: &[u8],
) -> Vec<Vec<u8>> {
    let with = |signature: &[u8]| [body, signature].concat();
    let sign_with = |key: &SigningKey| {
        let message = RekeyDatagram::decode_exact(body).map(|d| d.sign(key));
        message.unwrap_or_else(|_| {
            let beat = Heartbeat::decode_exact(body).expect("a rekey or heartbeat body");
            sign(&beat, key)
        })
    };
    let real_signature = &real[real.len() - SIGNATURE_LEN..];
    vec![
        sign_with(insider),
        sign_with(&SigningKey::from_bytes(&[0x5e; 32])),
        // The group key itself as an Ed25519 seed: the one secret every member shares.
        sign_with(&SigningKey::from_bytes(group_key)),
        with(&[0; SIGNATURE_LEN]),
        with(real_signature),
        body.to_vec(),
    ]
}

/// Every single-bit flip, every truncation and four extensions of `bytes`.
fn damaged(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.to_vec();
        flipped[bit / 8] ^= 1 << (bit % 8);
        out.push(flipped);
    }
    out.extend((0..bytes.len()).map(|len| bytes[..len].to_vec()));
    for tail in [&[0u8][..], &[0xff], &[0; SIGNATURE_LEN], bytes] {
        out.push([bytes, tail].concat());
    }
    out
}

/// Feeds `bytes` to the member and checks it was refused and changed nothing.
fn refused(member: &mut Member<ChaCha20Rng>, now: u64, bytes: &[u8]) {
    let before = Seen::of(member);
    member.handle_datagram(now, bytes);
    assert_eq!(
        Seen::of(member),
        before,
        "a forged or damaged datagram changed the member"
    );
    assert!(
        member.poll_request().is_none(),
        "a forged or damaged datagram made it ask"
    );
}

/// The salt of forged datagrams (any value: the insider chooses it).
const FORGED_SALT: RekeySalt = RekeySalt([0x42; 16]);

/// A datagram for epoch `epoch` that replaces the root by `new_root`, wrapped under the root key
/// the insider holds and covering every member: valid in every part but the signature.
fn root_forgery(path: &MemberPath, epoch: Epoch, new_root: &[u8; 32]) -> RekeyDatagram {
    let root = path.keys().last().expect("a path has a root");
    let wrap = seal_wrap(
        GROUP,
        (root.key.as_bytes(), &FORGED_SALT.0),
        epoch,
        (NodeId::ROOT, NodeId::ROOT, root.version.0),
        new_root,
    );
    RekeyDatagram {
        group: GROUP,
        epoch,
        salt: FORGED_SALT,
        kcv: NodeKey::from_bytes(*new_root)
            .traffic_key(GROUP, epoch)
            .check_value(),
        index: 0,
        count: 1,
        seeds: false,
        covers: vec![NodeId::ROOT],
        items: vec![Item::Wrap(wrap)],
    }
}

#[test]
fn v023_an_insider_cannot_forge_rekeys_heartbeats_or_resyncs() {
    let mut run = Run::new(policy(true), 12);
    let (victim, insider) = (0, 1);
    let insider_key = identity(run.agents[insider].seed);
    let path = run.agents[insider]
        .member
        .membership()
        .expect("admitted")
        .1
        .clone();
    let victim_path = run.agents[victim]
        .member
        .membership()
        .expect("admitted")
        .1
        .clone();
    let (epoch, group_key) = run.agents[insider].member.traffic_key().expect("admitted");
    let group_key = *group_key.as_bytes();
    let next = epoch.next().expect("small epochs");
    let real = run
        .multicast
        .iter()
        .rev()
        .find(|b| MessageType::peek(b) == Ok(MessageType::Rekey))
        .expect("the run sent rekeys")
        .clone();

    // The forgery is sound at the key level: the victim's own path code takes it. Only the
    // controller's signature stands between the insider and the group.
    let new_root = [0x99; 32];
    let forged = root_forgery(&path, next, &new_root);
    let update = PathUpdate {
        epoch: next,
        wraps: &forged.wraps().cloned().collect::<Vec<_>>(),
        advances: &[],
        links: &[],
        seeds: false,
        salt: forged.salt,
        kcv: forged.kcv,
    };
    let taken = victim_path
        .clone()
        .apply(&update)
        .expect("the insider's wrap opens");
    let planted = NodeKey::from_bytes(new_root).traffic_key(GROUP, next);
    assert_eq!(taken.traffic_key.as_bytes(), planted.as_bytes());

    let mut bodies = vec![forged.to_bytes()];
    // Far ahead (a resync if it were believed), and in every other epoch near the current one.
    for ahead in [2, 5, 1_000] {
        let far = Epoch(epoch.0 + ahead);
        bodies.push(root_forgery(&path, far, &new_root).to_bytes());
    }
    for ahead in [0, 1, 2, 1_000, u64::MAX - epoch.0] {
        let beat = Heartbeat {
            group: GROUP,
            epoch: Epoch(epoch.0 + ahead),
            kcv: Kcv([7; 8]),
            timestamp_ms: run.now,
        };
        bodies.push(beat.to_bytes());
    }
    let member = &mut run.agents[victim].member;
    let dropped_before = dropped(member);
    let mut cases = 0;
    for body in &bodies {
        for bytes in forged_signatures(body, &insider_key, &group_key, &real) {
            refused(member, run.now, &bytes);
            cases += 1;
        }
    }
    // A storm of forged heartbeats asks nothing either, even once the grace period is over.
    for i in 0..1_000u64 {
        let beat = Heartbeat {
            group: GROUP,
            epoch: Epoch(epoch.0 + 1 + i),
            kcv: Kcv([i as u8; 8]),
            timestamp_ms: run.now,
        };
        refused(member, run.now, &sign(&beat, &insider_key));
        cases += 1;
    }
    let before = Seen::of(member);
    member.handle_timeout(run.now + 5_000);
    assert!(
        member.poll_request().is_none(),
        "forged heartbeats caused a resync"
    );
    assert_eq!(Seen::of(member), before);
    assert_eq!(
        dropped(member) - dropped_before,
        cases,
        "every refusal is counted"
    );
    println!("{cases} forged datagrams refused");

    // The next legitimate rekey still applies.
    run.rekey();
    let member = &run.agents[victim].member;
    assert_eq!(member.stats().applied, before.applied + 1);
    assert!(run.converged());
}

#[test]
fn v023_v024_forged_or_damaged_resync_responses_are_refused() {
    let mut run = Run::new(policy(true), 8);
    let (victim, insider) = (0, 1);
    let seed = run.agents[victim].seed;
    let (id, path) = run.agents[victim].member.membership().expect("admitted");
    let path = path.clone();
    // The victim restarts and asks for a resync; the insider saw the request (and its nonce).
    let mut resumed = Member::resume(
        common::config(),
        identity(seed),
        hpke(seed),
        ChaCha20Rng::seed_from_u64(77),
        id,
        path.clone(),
        run.now,
    );
    let request = resumed.poll_request().expect("a resync request");
    let nonce = open::<ResyncRequest>(&request, &identity(seed).verifying_key())
        .expect("signed by the victim")
        .into_message()
        .nonce;
    let next = path.epoch().next().expect("small epochs");
    let mut keys: Vec<PathKey> = path.keys().to_vec();
    let root = keys.last_mut().expect("a root");
    root.version = next.version();
    root.key = NodeKey::from_bytes([0x99; 32]);
    let planted = MemberPath::from_keys(GROUP, next, keys).expect("a well-formed path");
    let to = SealedFor {
        kind: SealedKind::Resync,
        member: id,
        request_nonce: nonce,
        rekey_address: None,
    };
    let recipient = hpke(seed).public_key().expect("a valid key");
    let sealed = seal_path(
        &planted,
        &to,
        &recipient,
        &mut ChaCha20Rng::seed_from_u64(5),
    )
    .expect("seals");
    let insider_key = identity(run.agents[insider].seed);
    for key in [insider_key, SigningKey::from_bytes(&[0x5e; 32])] {
        let before = Seen::of(&resumed);
        resumed.handle_reply(run.now, &sign(&sealed, &key));
        assert_eq!(
            Seen::of(&resumed),
            before,
            "a forged resync response was taken"
        );
    }
    // Once the group has moved on (and the rekey's copies were sent: a request racing them is
    // only acknowledged), the controller answers; damaged copies of its answer are refused, the
    // answer itself is taken.
    run.rekey();
    run.now += 1_000;
    let reply = answer(&mut run, &request);
    let before = Seen::of(&resumed);
    let variants = damaged(&reply);
    for bytes in &variants {
        resumed.handle_reply(run.now, bytes);
        assert_eq!(
            Seen::of(&resumed),
            before,
            "a damaged resync response was taken"
        );
        assert!(resumed.poll_request().is_none());
    }
    println!("{} damaged resync responses refused", variants.len());
    resumed.handle_reply(run.now, &reply);
    assert_eq!(resumed.stats().resyncs, 1);
    let key = resumed.traffic_key().expect("keys").1;
    assert_eq!(Some(key.as_bytes()), run.traffic.get(&run.epoch()));
}

#[test]
fn v024_every_bit_flip_truncation_and_extension_of_captured_datagrams_is_refused() {
    let mut run = Run::new(policy(true), 12);
    let victim = 0;
    // Capture an eviction's rekey and the heartbeat after it (one interval later: the rekey
    // stands in for the one that was due with it) before the victim hears them.
    let start = run.multicast.len();
    run.agents[victim].live = false;
    run.evict(5);
    let interval = policy(true).heartbeat_interval_ms;
    run.advance(interval + 100, 100);
    run.agents[victim].live = true;
    let captured: Vec<Vec<u8>> = run.multicast[start..].to_vec();
    let (beats, rekeys): (Vec<&Vec<u8>>, Vec<&Vec<u8>>) = captured
        .iter()
        .partition(|b| MessageType::peek(b) == Ok(MessageType::Heartbeat));
    assert!(!rekeys.is_empty() && !beats.is_empty());
    let now = run.now;
    let member = &mut run.agents[victim].member;
    let mut cases = 0;
    // Heartbeats first: an authentic one would make the member (one epoch behind) resync.
    for bytes in beats.iter().chain(&rekeys) {
        let bytes: &[u8] = bytes;
        for damaged in damaged(bytes) {
            refused(member, now, &damaged);
            cases += 1;
        }
    }
    println!("{cases} damaged datagrams refused");
    let before = member.stats().applied;
    for bytes in &rekeys {
        member.handle_datagram(now, bytes);
    }
    assert_eq!(
        member.stats().applied,
        before + 1,
        "the undamaged rekey applies"
    );
    assert!(run.converged());
}

/// Feeds every captured datagram to the member; none may change it.
fn replay_all(member: &mut Member<ChaCha20Rng>, now: u64, captured: &[&Vec<u8>]) -> usize {
    let before = Seen::of(member);
    for bytes in captured {
        member.handle_datagram(now, bytes);
        assert!(
            member.poll_request().is_none(),
            "a replay made the member ask"
        );
    }
    assert_eq!(
        Seen::of(member),
        before,
        "a replayed datagram changed the member"
    );
    captured.len()
}

fn shuffled<'a>(captured: &[&'a Vec<u8>], seed: u64) -> Vec<&'a Vec<u8>> {
    let mut out = captured.to_vec();
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    for i in (1..out.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
    out
}

#[test]
fn v025_a_replayed_run_is_refused_in_order_reversed_shuffled_and_after_a_restart() {
    let mut run = Run::new(policy(true), 16);
    let mut rng = ChaCha20Rng::seed_from_u64(25);
    run.churn(8, 1, &mut rng);
    assert!(
        run.epoch() >= 30,
        "at least 30 epochs of churn: {}",
        run.epoch()
    );
    let multicast = run.multicast.clone();
    let captured: Vec<&Vec<u8>> = multicast.iter().collect();
    let rekeys = captured
        .iter()
        .filter(|b| MessageType::peek(b) == Ok(MessageType::Rekey))
        .count();
    let now = run.now;
    let member = &mut run.agents[0].member;
    let stale_before = member
        .stats()
        .dropped
        .get("stale or replayed")
        .copied()
        .unwrap_or(0);
    let mut cases = replay_all(member, now, &captured);
    let reversed: Vec<&Vec<u8>> = captured.iter().rev().copied().collect();
    cases += replay_all(member, now, &reversed);
    for seed in 0..3 {
        cases += replay_all(member, now, &shuffled(&captured, seed));
    }
    let stale = member
        .stats()
        .dropped
        .get("stale or replayed")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        stale - stale_before,
        5 * rekeys as u64,
        "every replayed rekey counted"
    );

    // Restart from the persisted membership (what the daemon writes on every key change).
    let seed = run.agents[0].seed;
    let (id, path) = run.agents[0].member.membership().expect("a member");
    let (id, path) = (id, path.clone());
    let mut restarted = Member::resume(
        common::config(),
        identity(seed),
        hpke(seed),
        ChaCha20Rng::seed_from_u64(0xbeef),
        id,
        path,
        now,
    );
    let request = restarted.poll_request().expect("a resync on resume");
    let reply = answer(&mut run, &request);
    restarted.handle_reply(now, &reply);
    cases += replay_all(&mut restarted, now, &captured);
    cases += replay_all(&mut restarted, now, &reversed);
    cases += replay_all(&mut restarted, now, &shuffled(&captured, 9));
    println!("{cases} replayed datagrams refused ({rekeys} rekeys in the run)");
    assert_eq!(restarted.stats().applied, 0);

    // A new rekey still reaches both.
    let start = run.multicast.len();
    run.rekey();
    for bytes in &run.multicast[start..] {
        restarted.handle_datagram(run.now, bytes);
    }
    assert_eq!(restarted.stats().applied, 1);
    assert!(run.converged());
}

/// The controller's reply to one request on a fresh connection.
fn answer(run: &mut Run, request: &[u8]) -> Vec<u8> {
    let conn = ConnId(1_000);
    run.controller
        .handle_request(conn, Timestamp(run.now), request);
    let mut reply = None;
    while let Some(t) = run.controller.poll_transmit() {
        if let Transmit::Reply { conn: c, bytes } = t
            && c == conn
        {
            reply = Some(bytes);
        }
    }
    reply.expect("a reply")
}

#[test]
fn v025_replayed_requests_change_nothing_at_the_controller() {
    let mut run = Run::new(policy(true), 10);
    let mut rng = ChaCha20Rng::seed_from_u64(18);
    run.churn(4, 0, &mut rng);
    let requests: Vec<Vec<u8>> = run.requests.iter().map(|(_, r)| r.clone()).collect();
    let epoch = run.epoch();
    let members = member_count(&mut run);
    let mut cases = 0;
    // Within the freshness window the nonces are remembered; after it the timestamps are stale.
    for wait in [0, 200_000] {
        run.now += wait;
        let order = shuffled(&requests.iter().collect::<Vec<_>>(), wait);
        for request in order {
            let reply = answer(&mut run, request);
            let code = ErrorMessage::decode_exact(&reply).map(|e| e.status);
            assert!(
                matches!(code, Ok(Status::Stale | Status::NotAMember)),
                "a replayed request was not refused: {code:?}"
            );
            cases += 1;
        }
        assert_eq!(run.epoch(), epoch, "a replayed request caused a rekey");
    }
    assert_eq!(member_count(&mut run), members);
    println!("{cases} replayed requests refused");
}

fn member_count(run: &mut Run) -> usize {
    match run
        .controller
        .handle_command(Timestamp(run.now), Command::Groups)
    {
        Ok(Response::Groups(groups)) => groups[0].members,
        other => panic!("no groups: {other:?}"),
    }
}

/// Found by the `controller_request` fuzz target's corpus: a registration carrying a low-order
/// X25519 key was admitted (a rekey, and a current member re-registering lost its membership)
/// before its welcome failed to seal.
#[test]
fn v037_a_registration_with_an_unusable_hpke_key_changes_nothing() {
    let mut run = Run::new(policy(true), 6);
    let epoch = run.epoch();
    let members = member_count(&mut run);
    let current = identity(run.agents[2].seed);
    let stranger = SigningKey::from_bytes(&[0x31; 32]);
    for (i, who) in [current, stranger].iter().enumerate() {
        let request = wire::RegistrationRequest {
            group: GROUP,
            identity: who.verifying_key().to_bytes(),
            // A low-order X25519 point: every Diffie-Hellman with it is zero.
            hpke_key: wire::HpkePublicKey::new(wire::Kem::X25519, vec![0; 32]).expect("32 bytes"),
            timestamp_ms: run.now,
            nonce: [i as u8 + 1; 16],
            token: Vec::new(),
        };
        let reply = answer(&mut run, &sign(&request, who));
        assert_eq!(
            ErrorMessage::decode_exact(&reply).map(|e| e.status),
            Ok(Status::Malformed)
        );
        assert_eq!(run.epoch(), epoch, "no rekey");
        assert_eq!(member_count(&mut run), members);
    }
    run.advance(2_000, 500);
    assert!(
        run.converged(),
        "the member whose identity was used is still in"
    );
}
