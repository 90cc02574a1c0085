//! Key tree operations at n = 2^10, 2^14, 2^17, 2^20 members, d = 4 (DESIGN.md §6).
//!
//! One tree per size (and one per size with hash-forward joins) is built on first use, outside
//! any timing, and kept for every benchmark. Each sample is one operation (`sample_size = 1`) so
//! that an untimed step can run between two timed ones and keep the size at n:
//! - `leave`: timed leave of a random member, then (untimed, before the next) a join that refills
//!   the vacancy. Every leave is one from a full tree: d·L − 1 encryptions for n = 4^L.
//! - `join`, `join_hash_forward`: an untimed leave of a random member, then the timed join into
//!   that vacancy (L multicast encryptions, or none with hash-forward, plus L unicast keys).
//! - `refresh`: a new root key, no membership change; the tree does not change size.
//! - `batch_64_64`: 64 random leaves and 64 joins in one rekey (marking algorithm); the joins
//!   fill the 64 vacancies, so it repeats as is. The 64 members are drawn untimed.
//!
//! The returned `Rekey` is dropped outside the timing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use divan::Bencher;
use gkm_benches::{Fixture, config, full_tree};
use lkh_tree::Batch;

const SIZES: [usize; 4] = [1 << 10, 1 << 14, 1 << 17, 1 << 20];
const DEGREE: u8 = 4;

static TREES: LazyLock<Mutex<HashMap<(usize, bool), Fixture>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Runs `bench` with the tree of `n` members (built on first use), then puts it back.
fn with_tree(n: usize, hash_forward: bool, bench: impl FnOnce(&RefCell<Fixture>)) {
    let mut trees = TREES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let seed = n as u64 * 2 + u64::from(hash_forward);
    let fixture = trees
        .remove(&(n, hash_forward))
        .unwrap_or_else(|| full_tree(n, config(DEGREE, hash_forward), seed));
    let cell = RefCell::new(fixture);
    bench(&cell);
    let fixture = cell.into_inner();
    assert_eq!(fixture.tree.len(), n, "the benchmark kept the size");
    trees.insert((n, hash_forward), fixture);
}

fn main() {
    divan::main();
}

#[divan::bench(args = SIZES, sample_size = 1, sample_count = 1000)]
fn leave(bencher: Bencher, n: usize) {
    with_tree(n, false, |cell| {
        // Each input is followed by exactly one timed leave (sample_size = 1), so the next
        // input first refills the vacancy that leave opened.
        let pending_join = RefCell::new(false);
        bencher
            .with_inputs(|| {
                let mut fx = cell.borrow_mut();
                if pending_join.replace(true) {
                    fx.join_untimed();
                }
                fx.random_member()
            })
            .bench_local_values(|member| {
                let fx = &mut *cell.borrow_mut();
                fx.tree.leave(member, &mut fx.rng)
            });
        if pending_join.replace(false) {
            cell.borrow_mut().join_untimed();
        }
    });
}

fn join_with(bencher: Bencher, n: usize, hash_forward: bool) {
    with_tree(n, hash_forward, |cell| {
        bencher
            .with_inputs(|| cell.borrow_mut().leave_untimed())
            .bench_local_values(|()| {
                let fx = &mut *cell.borrow_mut();
                fx.tree.join(&mut fx.rng)
            });
    });
}

#[divan::bench(args = SIZES, sample_size = 1, sample_count = 1000)]
fn join(bencher: Bencher, n: usize) {
    join_with(bencher, n, false);
}

#[divan::bench(args = SIZES, sample_size = 1, sample_count = 1000)]
fn join_hash_forward(bencher: Bencher, n: usize) {
    join_with(bencher, n, true);
}

#[divan::bench(args = SIZES, sample_count = 1000)]
fn refresh(bencher: Bencher, n: usize) {
    with_tree(n, false, |cell| {
        bencher.bench_local(|| {
            let fx = &mut *cell.borrow_mut();
            fx.tree.refresh(&mut fx.rng)
        });
    });
}

#[divan::bench(args = SIZES, sample_size = 1, sample_count = 200)]
fn batch_64_64(bencher: Bencher, n: usize) {
    with_tree(n, false, |cell| {
        bencher
            .with_inputs(|| Batch {
                leaves: cell.borrow_mut().random_members(64),
                joins: 64,
            })
            .bench_local_values(|batch| {
                let fx = &mut *cell.borrow_mut();
                fx.tree.rekey(&batch, &mut fx.rng)
            });
    });
}
