//! Snapshots: a restored tree continues exactly where the original stood.

use lkh_tree::{Batch, GroupId, KeyTree, NodeId, TreeConfig, TreeError};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

#[test]
fn a_restored_tree_continues_the_same_group() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let mut tree = KeyTree::new(GroupId(2), TreeConfig::default(), &mut rng).unwrap();
    let rekey = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 300,
            },
            &mut rng,
        )
        .unwrap();
    let mut paths: Vec<_> = rekey.joiners.into_iter().map(|j| j.path).collect();
    let gone: Vec<NodeId> = paths.drain(..40).map(|p| p.leaf()).collect();
    let rekey = tree
        .rekey(
            &Batch {
                leaves: gone,
                joins: 7,
            },
            &mut rng,
        )
        .unwrap();
    for p in &mut paths {
        p.apply(&rekey.member_view().update()).unwrap();
    }
    let mut restored = KeyTree::restore(&tree.snapshot()).unwrap();
    assert_eq!(restored.epoch(), tree.epoch());
    assert_eq!(restored.len(), tree.len());
    assert_eq!(restored.height(), tree.height());
    assert_eq!(restored.root_key().as_bytes(), tree.root_key().as_bytes());
    let next = restored.leave(paths[3].leaf(), &mut rng).unwrap();
    for p in paths.iter_mut().skip(4) {
        p.apply(&next.member_view().update()).unwrap();
        assert_eq!(
            p.root_key().unwrap().as_bytes(),
            restored.root_key().as_bytes()
        );
    }
    // The restored tree's free ids are reused by later joins without clashing.
    restored
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 60,
            },
            &mut rng,
        )
        .unwrap();
    assert_eq!(restored.len(), tree.len() - 1 + 60);
}

#[test]
fn a_corrupt_snapshot_is_refused() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut tree = KeyTree::new(GroupId(2), TreeConfig::default(), &mut rng).unwrap();
    tree.rekey(
        &Batch {
            leaves: vec![],
            joins: 30,
        },
        &mut rng,
    )
    .unwrap();
    let good = tree.snapshot();

    let mut cyclic = good.clone();
    cyclic.nodes[5].parent = Some(cyclic.nodes[7].id);
    assert_eq!(
        KeyTree::restore(&cyclic).err(),
        Some(TreeError::BadSnapshot)
    );

    let mut twice = good.clone();
    let dup = twice.nodes[3].clone();
    twice.nodes.push(dup);
    assert_eq!(KeyTree::restore(&twice).err(), Some(TreeError::BadSnapshot));

    let mut under_leaf = good.clone();
    let leaf = under_leaf.nodes.iter().find(|n| n.leaf).unwrap().id;
    let last = under_leaf.nodes.len() - 1;
    under_leaf.nodes[last].parent = Some(leaf);
    assert_eq!(
        KeyTree::restore(&under_leaf).err(),
        Some(TreeError::BadSnapshot)
    );

    let mut future = good.clone();
    future.nodes[2].version = lkh_tree::KeyVersion(good.epoch.0 + 1);
    assert_eq!(
        KeyTree::restore(&future).err(),
        Some(TreeError::BadSnapshot)
    );

    // An internal node that names itself as parent would make a cycle.
    let mut own_parent = good.clone();
    // (one with room for one more child, so that no degree check catches it instead).
    let children = |id| {
        own_parent
            .nodes
            .iter()
            .filter(|n| n.parent == Some(id))
            .count()
    };
    let internal = (1..own_parent.nodes.len())
        .find(|&i| !own_parent.nodes[i].leaf && children(own_parent.nodes[i].id) < 4)
        .unwrap();
    own_parent.nodes[internal].parent = Some(own_parent.nodes[internal].id);
    assert_eq!(
        KeyTree::restore(&own_parent).err(),
        Some(TreeError::BadSnapshot)
    );

    let mut no_root = good;
    no_root.nodes.remove(0);
    assert_eq!(
        KeyTree::restore(&no_root).err(),
        Some(TreeError::BadSnapshot)
    );
}

/// Nodes of a snapshot by id, as comparable tuples (the key bytes included).
fn by_id(
    nodes: &[lkh_tree::NodeRecord],
) -> std::collections::BTreeMap<u32, (Option<u32>, bool, u64, [u8; 32])> {
    nodes
        .iter()
        .map(|n| {
            (
                n.id.0,
                (
                    n.parent.map(|p| p.0),
                    n.leaf,
                    n.version.0,
                    *n.key.as_bytes(),
                ),
            )
        })
        .collect()
}

#[test]
fn tracked_changes_turn_an_old_snapshot_into_the_current_one() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let config = TreeConfig {
        degree: 3,
        ..TreeConfig::default()
    };
    let mut tree = KeyTree::new(GroupId(2), config, &mut rng).unwrap();
    tree.rekey(
        &Batch {
            leaves: vec![],
            joins: 200,
        },
        &mut rng,
    )
    .unwrap();
    tree.track_changes();
    let mut stored = by_id(&tree.snapshot().nodes);
    for round in 0..30_u64 {
        let members: Vec<NodeId> = tree.members().collect();
        // Many leaves in some rounds force splits, prunes and rebalancing moves.
        let step = if round % 5 == 4 { 2 } else { 7 };
        let leaves = members.iter().step_by(step).copied().collect();
        let joins = usize::try_from(round % 4 * 20).unwrap();
        tree.rekey(&Batch { leaves, joins }, &mut rng).unwrap();
        let changes = tree.take_changes();
        for id in &changes.removed {
            assert!(
                stored.remove(&id.0).is_some(),
                "removed node {id} was stored"
            );
        }
        stored.extend(by_id(&changes.changed));
        assert_eq!(stored, by_id(&tree.snapshot().nodes), "round {round}");
    }
    // The nodes as a store keeps them (by id, not parents first) restore the same tree.
    let mut snapshot = tree.snapshot();
    snapshot.nodes.sort_by_key(|n| n.id);
    let restored = KeyTree::restore(&snapshot).unwrap();
    assert_eq!(by_id(&restored.snapshot().nodes), stored);
    assert!(
        tree.take_changes().changed.is_empty(),
        "a take clears the record"
    );
}

/// GKM-V053: a rekey whose save failed is undone exactly: the same nodes, keys and epoch; the
/// members who held the old keys follow the next rekey; the record of changes still turns the
/// last stored state into the current one.
#[test]
fn v053_an_aborted_stage_leaves_the_tree_exactly_as_before() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let config = TreeConfig {
        degree: 3,
        one_way: true,
        ..TreeConfig::default()
    };
    let mut tree = KeyTree::new(GroupId(5), config, &mut rng).unwrap();
    let first = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: 150,
            },
            &mut rng,
        )
        .unwrap();
    let mut paths: Vec<_> = first.joiners.into_iter().map(|j| j.path).collect();
    tree.track_changes();
    let mut stored = by_id(&tree.snapshot().nodes);
    let _ = tree.take_changes();
    for round in 0..24_usize {
        let members: Vec<NodeId> = tree.members().collect();
        // Some rounds change nothing durable before the stage; others leave changes untaken.
        let step = if round % 3 == 0 { 2 } else { 5 + round % 4 };
        let leaves: Vec<NodeId> = members.iter().step_by(step).copied().collect();
        let joins = round % 4 * 15;
        let fail = round % 2 == 0;
        let before = by_id(&tree.snapshot().nodes);
        let (epoch, root) = (tree.epoch(), *tree.root_key().as_bytes());
        tree.stage();
        let rekey = tree.rekey(&Batch { leaves, joins }, &mut rng).unwrap();
        assert!(tree.is_staged());
        if fail {
            tree.abort().unwrap();
            assert!(!tree.is_staged());
            assert_eq!(by_id(&tree.snapshot().nodes), before, "round {round}");
            assert_eq!(tree.epoch(), epoch);
            assert_eq!(tree.root_key().as_bytes(), &root);
            continue;
        }
        tree.commit();
        let changes = tree.take_changes();
        for id in &changes.removed {
            assert!(
                stored.remove(&id.0).is_some(),
                "removed node {id} was stored"
            );
        }
        stored.extend(by_id(&changes.changed));
        assert_eq!(stored, by_id(&tree.snapshot().nodes), "round {round}");
        paths.retain(|p| !rekey.departed.contains(&p.leaf()));
        for p in &mut paths {
            p.apply(&rekey.member_view().update()).unwrap();
            assert_eq!(p.root_key().unwrap().as_bytes(), tree.root_key().as_bytes());
        }
        paths.extend(rekey.joiners.into_iter().map(|j| j.path));
    }
}

/// An abort keeps the changes recorded before the stage: they are reported by the next take.
#[test]
fn v053_an_abort_keeps_changes_recorded_before_the_stage() {
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let mut tree = KeyTree::new(GroupId(5), TreeConfig::default(), &mut rng).unwrap();
    tree.rekey(
        &Batch {
            leaves: vec![],
            joins: 40,
        },
        &mut rng,
    )
    .unwrap();
    tree.track_changes();
    let mut stored = by_id(&tree.snapshot().nodes);
    let members: Vec<NodeId> = tree.members().collect();
    let leaves = members.iter().step_by(3).copied().collect();
    tree.rekey(&Batch { leaves, joins: 4 }, &mut rng).unwrap();
    tree.stage();
    let members: Vec<NodeId> = tree.members().collect();
    let leaves = members.iter().step_by(2).copied().collect();
    tree.rekey(&Batch { leaves, joins: 9 }, &mut rng).unwrap();
    tree.abort().unwrap();
    let changes = tree.take_changes();
    for id in &changes.removed {
        assert!(
            stored.remove(&id.0).is_some(),
            "removed node {id} was stored"
        );
    }
    stored.extend(by_id(&changes.changed));
    assert_eq!(stored, by_id(&tree.snapshot().nodes));
}
