//! Exact costs on full trees n = d^L (Wong, Gouda, Lam; DESIGN.md §6).

use lkh_tree::{
    Batch, GroupId, KeyTree, MemberPath, NodeId, PathUpdate, Strategy, TreeConfig, Wrap,
};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use subtle::ConstantTimeEq;

fn full_tree(
    degree: u8,
    levels: u32,
    config: TreeConfig,
) -> (KeyTree, Vec<MemberPath>, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(degree) * 100 + u64::from(levels));
    let config = TreeConfig { degree, ..config };
    let mut tree = KeyTree::new(GroupId(7), config, &mut rng).unwrap();
    let n = usize::from(degree).pow(levels);
    let rekey = tree
        .rekey(
            &Batch {
                leaves: vec![],
                joins: n,
            },
            &mut rng,
        )
        .unwrap();
    assert_eq!(tree.len(), n);
    assert_eq!(
        tree.height(),
        levels as usize,
        "a tree of d^L joins is full and balanced"
    );
    let paths = rekey.joiners.into_iter().map(|j| j.path).collect();
    (tree, paths, rng)
}

fn apply_all(paths: &mut [MemberPath], rekey: &lkh_tree::Rekey, tree: &KeyTree) {
    let view = rekey.member_view();
    for path in paths.iter_mut() {
        path.apply(&view.update())
            .expect("member applies the rekey");
        assert!(bool::from(path.root_key().unwrap().ct_eq(&tree.root_key())));
    }
}

const SHAPES: [(u8, u32); 5] = [(2, 8), (2, 10), (4, 4), (4, 5), (8, 3)];

#[test]
fn one_leave_costs_d_l_minus_1_encryptions() {
    for (d, l) in SHAPES {
        let (mut tree, mut paths, mut rng) = full_tree(d, l, TreeConfig::default());
        let gone = paths.swap_remove(5);
        let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
        assert_eq!(
            rekey.encryptions.len(),
            usize::from(d) * l as usize - 1,
            "d={d} L={l}"
        );
        assert!(rekey.advances.is_empty());
        apply_all(&mut paths, &rekey, &tree);
    }
}

#[test]
fn one_join_into_a_vacant_slot_costs_l_multicast_and_l_unicast() {
    for (d, l) in SHAPES {
        let (mut tree, mut paths, mut rng) = full_tree(d, l, TreeConfig::default());
        let gone = paths.swap_remove(0);
        let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
        apply_all(&mut paths, &rekey, &tree);
        let rekey = tree.join(&mut rng).unwrap();
        assert_eq!(rekey.encryptions.len(), l as usize, "d={d} L={l}");
        assert_eq!(rekey.unicast_keys(), l as usize);
        assert_eq!(tree.height(), l as usize);
        apply_all(&mut paths, &rekey, &tree);
    }
}

#[test]
fn hash_forward_join_costs_no_multicast_encryption() {
    let config = TreeConfig {
        hash_forward_joins: true,
        ..TreeConfig::default()
    };
    for (d, l) in SHAPES {
        let (mut tree, mut paths, mut rng) = full_tree(d, l, config);
        let gone = paths.swap_remove(3);
        let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
        assert_eq!(rekey.encryptions.len(), usize::from(d) * l as usize - 1);
        apply_all(&mut paths, &rekey, &tree);
        let rekey = tree.join(&mut rng).unwrap();
        assert_eq!(rekey.encryptions.len(), 0, "d={d} L={l}");
        assert_eq!(rekey.advances.len(), l as usize);
        assert_eq!(rekey.unicast_keys(), l as usize);
        apply_all(&mut paths, &rekey, &tree);
        let mut joiner = rekey.joiners.into_iter().next().unwrap().path;
        let refresh = tree.refresh(&mut rng).unwrap();
        assert_eq!(
            refresh.encryptions.len(),
            1,
            "a refresh is one fresh root key under the old"
        );
        apply_all(&mut paths, &refresh, &tree);
        apply_all(std::slice::from_mut(&mut joiner), &refresh, &tree);
    }
}

#[test]
fn user_oriented_leave_costs_d_minus_1_times_l_l_plus_1_over_2() {
    let config = TreeConfig {
        strategy: Strategy::User,
        ..TreeConfig::default()
    };
    for (d, l) in SHAPES {
        let (mut tree, mut paths, mut rng) = full_tree(d, l, config);
        let gone = paths.swap_remove(9);
        let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
        let expected = (usize::from(d) - 1) * (l * (l + 1) / 2) as usize;
        assert_eq!(rekey.encryptions.len(), expected, "d={d} L={l}");
        apply_all(&mut paths, &rekey, &tree);
    }
}

#[test]
fn key_oriented_makes_the_group_oriented_wraps() {
    let config = TreeConfig {
        strategy: Strategy::Key,
        ..TreeConfig::default()
    };
    let (mut tree, mut paths, mut rng) = full_tree(4, 4, config);
    let gone = paths.swap_remove(1);
    let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
    assert_eq!(rekey.encryptions.len(), 4 * 4 - 1);
    apply_all(&mut paths, &rekey, &tree);
}

#[test]
fn v012_a_departed_member_cannot_apply_the_next_rekey() {
    let (mut tree, mut paths, mut rng) = full_tree(4, 3, TreeConfig::default());
    let mut gone = paths.swap_remove(2);
    let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
    let wraps: Vec<Wrap> = rekey
        .encryptions
        .iter()
        .map(|e| Wrap::from_encryption(e, rekey.epoch))
        .collect();
    let update = PathUpdate {
        epoch: rekey.epoch,
        wraps: &wraps,
        advances: &[],
        links: &[],
        seeds: false,
        salt: rekey.salt,
        kcv: rekey.kcv,
    };
    let before = gone.epoch();
    assert!(gone.apply(&update).is_err());
    assert_eq!(gone.epoch(), before, "a refused update changes nothing");
    apply_all(&mut paths, &rekey, &tree);
}

#[test]
fn v013_bad_input_is_refused_and_changes_nothing() {
    let (mut tree, paths, mut rng) = full_tree(4, 2, TreeConfig::default());
    let epoch = tree.epoch();
    let leaf = paths[0].leaf();
    assert!(
        tree.rekey(
            &Batch {
                leaves: vec![leaf, leaf],
                joins: 0
            },
            &mut rng
        )
        .is_err()
    );
    assert!(
        tree.rekey(
            &Batch {
                leaves: vec![NodeId::ROOT],
                joins: 0
            },
            &mut rng
        )
        .is_err()
    );
    assert!(
        tree.rekey(
            &Batch {
                leaves: vec![NodeId(1 << 30)],
                joins: 0
            },
            &mut rng
        )
        .is_err()
    );
    assert_eq!(tree.epoch(), epoch);
    assert_eq!(tree.len(), 16);
    assert!(
        KeyTree::new(
            GroupId(1),
            TreeConfig {
                degree: 1,
                ..TreeConfig::default()
            },
            &mut rng
        )
        .is_err()
    );
    assert!(
        KeyTree::new(
            GroupId(1),
            TreeConfig {
                degree: 65,
                ..TreeConfig::default()
            },
            &mut rng
        )
        .is_err()
    );
}

#[test]
fn v011_stale_and_tampered_updates_leave_the_path_unchanged() {
    let (mut tree, mut paths, mut rng) = full_tree(4, 3, TreeConfig::default());
    let gone = paths.swap_remove(7);
    let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
    let mut wraps: Vec<Wrap> = rekey
        .encryptions
        .iter()
        .map(|e| Wrap::from_encryption(e, rekey.epoch))
        .collect();
    for w in &mut wraps {
        w.ciphertext[3] ^= 1;
    }
    let update = PathUpdate {
        epoch: rekey.epoch,
        wraps: &wraps,
        advances: &[],
        links: &[],
        seeds: false,
        salt: rekey.salt,
        kcv: rekey.kcv,
    };
    let member = &mut paths[0];
    let before: Vec<_> = member.keys().iter().map(|k| (k.node, k.version)).collect();
    assert_eq!(
        member.apply(&update).err(),
        Some(lkh_tree::ApplyError::KeyCheck)
    );
    let after: Vec<_> = member.keys().iter().map(|k| (k.node, k.version)).collect();
    assert_eq!(before, after);
    let stale = PathUpdate {
        epoch: member.epoch(),
        wraps: &[],
        advances: &[],
        links: &[],
        seeds: false,
        salt: rekey.salt,
        kcv: rekey.kcv,
    };
    assert!(matches!(
        member.apply(&stale),
        Err(lkh_tree::ApplyError::StaleEpoch { .. })
    ));
}

#[test]
fn one_way_leave_costs_d_minus_1_times_l_encryptions() {
    let config = TreeConfig {
        one_way: true,
        ..TreeConfig::default()
    };
    for (d, l) in SHAPES {
        let (mut tree, mut paths, mut rng) = full_tree(d, l, config);
        let gone = paths.swap_remove(4);
        let rekey = tree.leave(gone.leaf(), &mut rng).unwrap();
        assert_eq!(
            rekey.encryptions.len(),
            (usize::from(d) - 1) * l as usize,
            "d={d} L={l}"
        );
        assert_eq!(rekey.links.len(), l as usize - 1);
        apply_all(&mut paths, &rekey, &tree);
        let rekey = tree.join(&mut rng).unwrap();
        assert_eq!(rekey.encryptions.len(), l as usize);
        apply_all(&mut paths, &rekey, &tree);
    }
}
