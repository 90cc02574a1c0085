//! Forward secrecy against coalitions: members evicted (or gone) during churn pool everything
//! they ever held and record every datagram the controller multicasts after their departure
//! (the real signed bytes). They then decrypt for real: every wrap of every captured datagram
//! under every key they hold, following hash-forward advances and one-way links, adding what
//! opens, until nothing more opens. Neither one of them alone nor all of them together may learn
//! the traffic key of any epoch in which none of them was a member; the key-graph checker
//! (`lkh_tree::checker::KeyGraph`, built from the same captures) agrees. A member that stayed,
//! given only the keys it held when the first of them left, decrypts every later traffic key
//! with the same code, so the attack is not vacuous.

#![allow(clippy::cast_possible_truncation, reason = "small test indices")]

mod common;

use std::collections::BTreeSet;

use common::attack::{Keys, Loot};
use common::{GROUP, Run, policy};
use ed25519_dalek::SigningKey;
use lkh_tree::checker::KeyGraph;
use lkh_tree::{Advance, Encryption, KeyVersion, NodeId, Rekey};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use wire::{AuthenticRekey, MessageType, RekeyDatagram};

/// The verified rekey datagrams among the multicast captures from index `from` on.
fn rekeys(run: &Run, from: usize) -> Vec<RekeyDatagram> {
    let controller = SigningKey::from_bytes(&common::SIGNER_SEED).verifying_key();
    run.multicast[from..]
        .iter()
        .filter(|b| MessageType::peek(b) == Ok(MessageType::Rekey))
        .map(|b| {
            AuthenticRekey::verify(b, &controller)
                .expect("the controller signed it")
                .datagram()
                .clone()
        })
        .collect()
}

/// The key graph of the captured datagrams, with wrapping versions from the controller's tree
/// just before each rekey.
fn key_graph(run: &Run, captures: &[RekeyDatagram]) -> KeyGraph {
    let mut graph = KeyGraph::new();
    for d in captures {
        let e = d.epoch.0;
        let versions = &run.versions[&e];
        let before = |node: NodeId| KeyVersion(versions[&node.0]);
        let rekey = Rekey {
            group: GROUP,
            epoch: d.epoch,
            encryptions: d
                .wraps()
                .map(|w| Encryption {
                    target: w.target,
                    wrapping: w.wrapping,
                    wrapping_version: if w.under_new {
                        KeyVersion(e)
                    } else {
                        before(w.wrapping)
                    },
                    ciphertext: w.ciphertext,
                })
                .collect(),
            advances: d
                .advances()
                .map(|node| Advance {
                    node,
                    from: before(node),
                })
                .collect(),
            links: d.links().copied().collect(),
            seeds: d.seeds,
            salt: d.salt,
            kcv: d.kcv,
            joiners: Vec::new(),
            departed: Vec::new(),
            moved: Vec::new(),
        };
        graph.add_rekey(&rekey);
    }
    graph
}

/// Epochs in which at least one of `who` was a member.
fn member_epochs(run: &Run, who: &[usize]) -> BTreeSet<u64> {
    who.iter()
        .flat_map(|&i| {
            let a = &run.agents[i];
            let joined = a.joined.expect("admitted");
            joined..a.left.unwrap_or(u64::MAX).min(run.epoch() + 1)
        })
        .collect()
}

/// Runs the attack of coalition `who` on everything captured since the first of them left and
/// checks it against the real traffic keys and the key graph. Returns the epochs it attacked.
fn coalition_learns_nothing_new(run: &Run, who: &[usize]) -> usize {
    let from = who
        .iter()
        .filter_map(|&i| run.agents[i].captured_from)
        .min()
        .expect("departed members");
    let captures = rekeys(run, from);
    let mut held = Keys::new();
    for &i in who {
        held.extend(run.agents[i].known.iter().map(|(k, v)| (*k, *v)));
    }
    let mut loot = Loot::new(GROUP, &held);
    loot.attack(&captures);
    let allowed = member_epochs(run, who);
    let learned = loot.traffic_epochs(&run.traffic);
    let forbidden: Vec<&u64> = learned.difference(&allowed).collect();
    assert!(
        forbidden.is_empty(),
        "coalition {who:?} decrypted the traffic keys of epochs {forbidden:?}"
    );
    let graph = key_graph(run, &captures);
    let reachable = graph.reachable(
        held.keys()
            .map(|&(node, version)| (NodeId(node), KeyVersion(version))),
    );
    for &(node, version) in &loot.opened {
        assert!(
            reachable.contains(&(NodeId(node), KeyVersion(version))),
            "the attack opened n{node} v{version}, which the key graph says is out of reach"
        );
    }
    let roots: Vec<u64> = reachable
        .iter()
        .filter(|(node, version)| *node == NodeId::ROOT && !allowed.contains(&version.0))
        .map(|(_, version)| version.0)
        .filter(|&v| run.traffic.contains_key(&v))
        .collect();
    assert!(
        roots.is_empty(),
        "the key graph lets coalition {who:?} reach the roots of epochs {roots:?}"
    );
    captures.len()
}

/// A member that stayed, given only the keys it held when the first departure happened,
/// decrypts every later traffic key from the same captures with the same code.
fn a_stayer_decrypts_everything(run: &Run, stayer: usize, from_member: usize) {
    let from = run.agents[from_member].captured_from.expect("departed");
    let captures = rekeys(run, from);
    let start = captures.first().expect("captures").epoch.0;
    let held: Keys = run.agents[stayer]
        .known
        .iter()
        .filter(|((_, v), _)| *v < start)
        .map(|(k, v)| (*k, *v))
        .collect();
    let mut loot = Loot::new(GROUP, &held);
    loot.attack(&captures);
    let learned = loot.traffic_epochs(&run.traffic);
    let wanted: BTreeSet<u64> = (start..=run.epoch()).collect();
    assert_eq!(
        wanted.difference(&learned).count(),
        0,
        "the attack code missed keys a member derives"
    );
    let graph = key_graph(run, &captures);
    let reachable = graph.reachable(
        held.keys()
            .map(|&(node, version)| (NodeId(node), KeyVersion(version))),
    );
    assert!(reachable.contains(&(NodeId::ROOT, KeyVersion(run.epoch()))));
}

fn coalitions(one_way: bool, hash_forward_joins: bool, seed: u64) {
    let mut p = policy(one_way);
    p.tree.hash_forward_joins = hash_forward_joins;
    let mut run = Run::new(p, 20);
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    run.churn(8, 1, &mut rng);
    assert!(run.epoch() >= 50, "epochs: {}", run.epoch());
    let departed: Vec<usize> = (0..run.agents.len())
        .filter(|&i| run.agents[i].left.is_some())
        .collect();
    assert_eq!(departed.len(), 16);
    let mut attacked = 0;
    for &i in &departed {
        attacked += coalition_learns_nothing_new(&run, &[i]);
    }
    attacked += coalition_learns_nothing_new(&run, &departed);
    a_stayer_decrypts_everything(&run, 0, departed[0]);
    println!(
        "one_way={one_way} hash_forward_joins={hash_forward_joins}: {} departed, {} epochs, \
         {attacked} captured datagrams attacked",
        departed.len(),
        run.epoch()
    );
}

#[test]
fn v026_evicted_members_alone_and_together_learn_no_later_traffic_key_one_way() {
    coalitions(true, false, 26);
}

#[test]
fn v026_evicted_members_alone_and_together_learn_no_later_traffic_key_group_oriented() {
    coalitions(false, false, 27);
}

#[test]
fn v026_evicted_members_alone_and_together_learn_no_later_traffic_key_hash_forward_joins() {
    coalitions(true, true, 28);
}
