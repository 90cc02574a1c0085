//! The rekey datagram's decoder under mutation: real datagrams of every strategy, each changed at
//! random (bits flipped, bytes set, cut short, extended, spliced) thousands of times. Nothing may
//! panic, and whatever still decodes is in the one encoding the encoder writes: re-encoding gives
//! back the same bytes (varints in shortest form, a target named only when it changes).

#![allow(
    clippy::cast_possible_truncation,
    reason = "random bytes and indices from a test generator"
)]

use lkh_tree::{Batch, GroupId, KeyTree, Strategy, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{Codec, DEFAULT_MTU, RekeyDatagram, pack};

fn datagrams() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (strategy, hash_forward_joins, one_way) in [
        (Strategy::Group, false, true),
        (Strategy::Group, true, false),
        (Strategy::User, false, false),
    ] {
        let config = TreeConfig {
            degree: 4,
            strategy,
            hash_forward_joins,
            one_way,
        };
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut tree = KeyTree::new(GroupId(3), config, &mut rng).unwrap();
        tree.rekey(
            &Batch {
                leaves: Vec::new(),
                joins: 300,
            },
            &mut rng,
        )
        .unwrap();
        let members: Vec<_> = tree.members().collect();
        let batch = Batch {
            leaves: members.iter().step_by(37).copied().collect(),
            joins: 5,
        };
        let rekey = tree.rekey(&batch, &mut rng).unwrap();
        out.extend(
            pack(&rekey, &tree, DEFAULT_MTU)
                .unwrap()
                .iter()
                .map(Codec::to_bytes),
        );
    }
    out
}

#[test]
fn mutated_datagrams_never_panic_and_what_decodes_is_canonical() {
    let seeds = datagrams();
    assert!(seeds.len() >= 3);
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let (mut decoded, mut total) = (0usize, 0usize);
    for round in 0..30_000usize {
        let mut bytes = seeds[round % seeds.len()].clone();
        for _ in 0..1 + rng.next_u32() % 3 {
            let len = bytes.len().max(1);
            let at = (rng.next_u32() as usize) % len;
            match rng.next_u32() % 5 {
                0 => {
                    if let Some(b) = bytes.get_mut(at) {
                        *b ^= 1 << (rng.next_u32() % 8);
                    }
                }
                1 => {
                    if let Some(b) = bytes.get_mut(at) {
                        *b = rng.next_u32() as u8;
                    }
                }
                2 => bytes.truncate(at),
                3 => bytes.insert(at.min(bytes.len()), rng.next_u32() as u8),
                _ => {
                    let other = &seeds[(rng.next_u32() as usize) % seeds.len()];
                    let from = (rng.next_u32() as usize) % other.len();
                    bytes.truncate(at);
                    bytes.extend_from_slice(&other[from..]);
                }
            }
        }
        total += 1;
        if let Ok(d) = RekeyDatagram::decode_exact(&bytes) {
            decoded += 1;
            assert_eq!(
                d.to_bytes(),
                bytes,
                "a second encoding decoded (round {round})"
            );
        }
    }
    println!("{decoded} of {total} mutants decoded, each in the one encoding");
    // The mutations must reach past the header now and then, or the test tests nothing.
    assert!(decoded > 100, "only {decoded} of {total} mutants decoded");
}
