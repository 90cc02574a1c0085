//! Rekeys through the wire: packing, signing, the member's verify → fresh → apply path, and
//! every truncation and single-bit flip of a signed datagram.

#![allow(clippy::cast_possible_truncation, reason = "small test values")]

use ed25519_dalek::SigningKey;
use lkh_tree::{Batch, GroupId, KeyTree, Strategy, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{AuthenticRekey, DEFAULT_MTU, HeldPath, WireError, pack, pack_signed};

struct Group {
    tree: KeyTree,
    members: Vec<HeldPath>,
    rng: ChaCha20Rng,
    key: SigningKey,
}

fn group(n: usize, config: TreeConfig, seed: u64) -> Group {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let key = SigningKey::from_bytes(&[seed as u8; 32]);
    let mut tree = KeyTree::new(GroupId(3), config, &mut rng).unwrap();
    let rekey = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: n,
            },
            &mut rng,
        )
        .unwrap();
    let members = rekey
        .joiners
        .into_iter()
        .map(|j| HeldPath::trusted(j.path))
        .collect();
    Group {
        tree,
        members,
        rng,
        key,
    }
}

/// Delivers every datagram to every member; each must apply exactly one and end on the root.
fn deliver(g: &mut Group, datagrams: &[Vec<u8>]) {
    let controller = g.key.verifying_key();
    let root = *g.tree.root_key().as_bytes();
    let authentic: Vec<AuthenticRekey> = datagrams
        .iter()
        .map(|bytes| AuthenticRekey::verify(bytes, &controller).expect("authentic"))
        .collect();
    for member in &mut g.members {
        let mut applied = 0;
        for authentic in &authentic {
            match authentic.fresh(member) {
                Ok(fresh) => {
                    fresh.apply().expect("applies");
                    applied += 1;
                }
                Err(WireError::NotForMe | WireError::Stale { .. }) => {}
                Err(other) => panic!("unexpected: {other}"),
            }
        }
        assert_eq!(applied, 1);
        assert_eq!(member.root_key().unwrap().as_bytes(), &root);
    }
}

fn leave_and_deliver(g: &mut Group, leaves: usize, joins: usize, mtu: usize) -> Vec<Vec<u8>> {
    let gone: Vec<_> = (0..leaves)
        .map(|_| {
            let i = (g.rng.next_u64() % g.members.len() as u64) as usize;
            g.members.swap_remove(i).leaf()
        })
        .collect();
    let rekey = g
        .tree
        .rekey(
            &Batch {
                leaves: gone,
                joins,
            },
            &mut g.rng,
        )
        .unwrap();
    let datagrams = pack_signed(&rekey, &g.tree, mtu, &g.key).unwrap();
    assert!(datagrams.iter().all(|d| d.len() <= mtu));
    deliver(g, &datagrams);
    g.members
        .extend(rekey.joiners.into_iter().map(|j| HeldPath::trusted(j.path)));
    datagrams
}

#[test]
fn every_member_finds_its_keys_in_one_datagram() {
    for (strategy, hash_forward, one_way) in [
        (Strategy::Group, false, false),
        (Strategy::Key, false, false),
        (Strategy::User, false, false),
        (Strategy::Group, true, false),
        (Strategy::Group, false, true),
        (Strategy::Group, true, true),
    ] {
        let config = TreeConfig {
            strategy,
            hash_forward_joins: hash_forward,
            one_way,
            degree: 4,
        };
        let mut g = group(1000, config, 11);
        leave_and_deliver(&mut g, 1, 0, DEFAULT_MTU);
        leave_and_deliver(&mut g, 0, 1, DEFAULT_MTU);
        leave_and_deliver(&mut g, 40, 25, DEFAULT_MTU);
        leave_and_deliver(&mut g, 300, 0, DEFAULT_MTU);
        leave_and_deliver(&mut g, 0, 0, DEFAULT_MTU);
    }
}

#[test]
fn small_mtus_still_serve_every_member() {
    let mut g = group(4096, TreeConfig::default(), 12);
    let datagrams = leave_and_deliver(&mut g, 1, 0, 600);
    assert!(datagrams.len() >= 3);
    leave_and_deliver(&mut g, 20, 20, 9000);
    let rekey = g.tree.refresh(&mut g.rng).unwrap();
    assert!(matches!(
        pack(&rekey, &g.tree, 100),
        Err(WireError::MtuTooSmall(100))
    ));
}

#[test]
fn one_leave_at_16k_members_takes_three_datagrams_of_1200_bytes() {
    // d·L − 1 = 27 wraps for n = 4^7; user-oriented packing repeats the wraps near the root.
    let mut g = group(1 << 14, TreeConfig::default(), 13);
    let datagrams = leave_and_deliver(&mut g, 1, 0, DEFAULT_MTU);
    assert!(datagrams.len() <= 3, "{} datagrams", datagrams.len());
}

#[test]
fn one_leave_at_a_million_members() {
    // n = 4^10: a group-oriented leave is d·L − 1 = 39 wraps; a member below the leaf's parent
    // needs 12 of them, one below the root 1, and the wraps near the root repeat across
    // datagrams: at 1,200 bytes no packing fits two datagrams (a member deep in the tree and
    // one at the top cannot share one, and one of the two must carry 24 wraps, 1,344 bytes). The
    // one-way update needs (d − 1)·L = 30 wraps and 9 links, each member needing exactly one wrap.
    for (one_way, datagrams) in [(false, 2), (true, 1)] {
        let config = TreeConfig {
            one_way,
            ..TreeConfig::default()
        };
        let mut g = group(1 << 20, config, 16);
        g.members.truncate(2000);
        let sent = leave_and_deliver(&mut g, 1, 0, DEFAULT_MTU);
        assert_eq!(sent.len(), datagrams, "one_way = {one_way}");
    }
}

#[test]
fn v002_every_truncation_and_bit_flip_of_a_signed_datagram_is_rejected() {
    let mut g = group(64, TreeConfig::default(), 14);
    let gone = g.members.swap_remove(5).leaf();
    let rekey = g.tree.leave(gone, &mut g.rng).unwrap();
    let datagrams = pack_signed(&rekey, &g.tree, DEFAULT_MTU, &g.key).unwrap();
    let controller = g.key.verifying_key();
    let bytes = &datagrams[0];
    assert!(AuthenticRekey::verify(bytes, &controller).is_ok());
    for len in 0..bytes.len() {
        assert!(
            AuthenticRekey::verify(&bytes[..len], &controller).is_err(),
            "truncated to {len}"
        );
    }
    let mut extended = bytes.clone();
    extended.push(0);
    assert!(AuthenticRekey::verify(&extended, &controller).is_err());
    let mut flipped = bytes.clone();
    for bit in 0..bytes.len() * 8 {
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(
            AuthenticRekey::verify(&flipped, &controller).is_err(),
            "bit {bit}"
        );
        flipped[bit / 8] ^= 1 << (bit % 8);
    }
}

#[test]
fn v001_v004_forged_and_replayed_datagrams_are_refused() {
    let mut g = group(64, TreeConfig::default(), 15);
    let gone = g.members.swap_remove(1).leaf();
    let rekey = g.tree.leave(gone, &mut g.rng).unwrap();
    let controller = g.key.verifying_key();
    let insider = SigningKey::from_bytes(&[99; 32]);
    let forged = pack_signed(&rekey, &g.tree, DEFAULT_MTU, &insider).unwrap();
    assert!(matches!(
        AuthenticRekey::verify(&forged[0], &controller),
        Err(WireError::BadSignature)
    ));
    let datagrams = pack_signed(&rekey, &g.tree, DEFAULT_MTU, &g.key).unwrap();
    deliver(&mut g, &datagrams);
    let member = &mut g.members[0];
    let replay = AuthenticRekey::verify(&datagrams[0], &controller).unwrap();
    assert!(matches!(replay.fresh(member), Err(WireError::Stale { .. })));
}

#[test]
fn v003_v005_other_groups_and_skipped_epochs_are_refused() {
    let mut g = group(64, TreeConfig::default(), 17);
    let controller = g.key.verifying_key();
    let first = g.tree.refresh(&mut g.rng).unwrap();
    let first = pack_signed(&first, &g.tree, DEFAULT_MTU, &g.key).unwrap();
    let second = g.tree.refresh(&mut g.rng).unwrap();
    let second = pack_signed(&second, &g.tree, DEFAULT_MTU, &g.key).unwrap();
    let mut member = g.members[0].clone();
    let ahead = AuthenticRekey::verify(&second[0], &controller).unwrap();
    assert!(matches!(
        ahead.fresh(&mut member),
        Err(WireError::Gap { .. })
    ));

    let mut other = group(64, TreeConfig::default(), 17);
    other.tree = KeyTree::new(GroupId(4), TreeConfig::default(), &mut other.rng).unwrap();
    let rekey = other
        .tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 3,
            },
            &mut other.rng,
        )
        .unwrap();
    let foreign = pack_signed(&rekey, &other.tree, DEFAULT_MTU, &g.key).unwrap();
    let foreign = AuthenticRekey::verify(&foreign[0], &controller).unwrap();
    assert!(matches!(
        foreign.fresh(&mut member),
        Err(WireError::WrongGroup { .. })
    ));
    // The right datagram still applies after both refusals.
    let next = AuthenticRekey::verify(&first[0], &controller).unwrap();
    next.fresh(&mut member).unwrap().apply().unwrap();
}

#[test]
fn v009_node_ids_at_or_above_2_pow_31_are_malformed() {
    let mut g = group(16, TreeConfig::default(), 18);
    let rekey = g.tree.refresh(&mut g.rng).unwrap();
    let mut datagram = pack(&rekey, &g.tree, DEFAULT_MTU).unwrap().remove(0);
    datagram.covers = vec![lkh_tree::NodeId(1 << 31)];
    let bytes = datagram.sign(&g.key);
    assert!(matches!(
        AuthenticRekey::verify(&bytes, &g.key.verifying_key()),
        Err(WireError::Decode(wire::DecodeError::Invalid("cover")))
    ));
}

#[test]
fn v068_a_signed_datagram_whose_check_value_does_not_match_changes_nothing() {
    // The controller's own signature over a wrong check value (as a controller bug, or keys
    // that are not the ones the member holds, would give): verified, fresh, and still refused
    // before any key changes.
    let mut g = group(256, TreeConfig::default(), 17);
    let gone = g.members.swap_remove(3).leaf();
    let rekey = g.tree.leave(gone, &mut g.rng).unwrap();
    let mut datagrams = pack(&rekey, &g.tree, DEFAULT_MTU).unwrap();
    assert_eq!(
        datagrams.len(),
        1,
        "a single leave at 256 members is one datagram"
    );
    datagrams[0].kcv.0[7] ^= 1;
    let bytes = datagrams[0].sign(&g.key);
    let authentic = AuthenticRekey::verify(&bytes, &g.key.verifying_key()).expect("signed");
    let member = &mut g.members[0];
    let before: Vec<_> = member.keys().iter().map(|k| (k.node, k.version)).collect();
    let outcome = authentic.fresh(member).and_then(wire::FreshRekey::apply);
    assert!(
        matches!(
            outcome,
            Err(WireError::Apply(lkh_tree::ApplyError::KeyCheck))
        ),
        "{outcome:?}"
    );
    let after: Vec<_> = member.keys().iter().map(|k| (k.node, k.version)).collect();
    assert_eq!(before, after);
    // The true check value applies.
    datagrams[0].kcv.0[7] ^= 1;
    let bytes = datagrams[0].sign(&g.key);
    let authentic = AuthenticRekey::verify(&bytes, &g.key.verifying_key()).expect("signed");
    let applied = authentic
        .fresh(member)
        .and_then(wire::FreshRekey::apply)
        .expect("applies");
    assert_eq!(applied.kcv, rekey.kcv);
}
