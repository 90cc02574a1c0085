//! The wire side of one leave at n = 2^20, d = 4, MTU 1200 (DESIGN.md §5):
//! - `pack` (unsigned) and `pack_signed` of the leave's rekey;
//! - `decode_exact` of one (unsigned) datagram, `AuthenticRekey::verify` (bounded decode and
//!   Ed25519 `verify_strict`) of one signed datagram;
//! - a member's whole path for its datagram: verify → fresh → apply, for the departed member's
//!   sibling (every path key changed: L = 10 unwraps) and for a member in another subtree of the
//!   root (only the root changed: one unwrap). The member's path is cloned outside the timing.
//!
//! The tree is built and the leave made once, outside any timing; packing reads them only.

use std::sync::LazyLock;

use divan::{Bencher, black_box};
use gkm_benches::{Fixture, LeaveCase, config, controller_key, full_tree};
use lkh_tree::MemberPath;
use wire::{AuthenticRekey, Codec, DEFAULT_MTU, HeldPath, RekeyDatagram, pack, pack_signed};

struct Setup {
    fixture: Fixture,
    case: LeaveCase,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let mut fixture = full_tree(1 << 20, config(4, false), 20);
    let case = fixture.leave_and_pack(DEFAULT_MTU);
    Setup { fixture, case }
});

fn main() {
    divan::main();
}

#[divan::bench]
fn pack_leave_2p20(bencher: Bencher) {
    let s = &*SETUP;
    bencher.bench_local(|| pack(black_box(&s.case.rekey), &s.fixture.tree, DEFAULT_MTU));
}

#[divan::bench]
fn pack_signed_leave_2p20(bencher: Bencher) {
    let s = &*SETUP;
    let key = controller_key();
    bencher
        .bench_local(|| pack_signed(black_box(&s.case.rekey), &s.fixture.tree, DEFAULT_MTU, &key));
}

#[divan::bench]
fn decode_exact_datagram(bencher: Bencher) {
    let s = &*SETUP;
    let datagrams = pack(&s.case.rekey, &s.fixture.tree, DEFAULT_MTU).expect("packs");
    let bytes = datagrams.first().expect("a datagram").to_bytes();
    bencher.bench_local(|| RekeyDatagram::decode_exact(black_box(&bytes)).expect("decodes"));
}

#[divan::bench]
fn authentic_rekey_verify(bencher: Bencher) {
    let s = &*SETUP;
    let controller = controller_key().verifying_key();
    let bytes = s.case.datagrams.first().expect("a datagram");
    bencher.bench_local(|| AuthenticRekey::verify(black_box(bytes), &controller).expect("valid"));
}

fn member_path(bencher: Bencher, path: &MemberPath) {
    let s = &*SETUP;
    let controller = controller_key().verifying_key();
    let index = s
        .case
        .datagram_for(path)
        .expect("a datagram serves every member");
    let bytes = &s.case.datagrams[index];
    bencher
        .with_inputs(|| HeldPath::trusted(path.clone()))
        .bench_local_values(|mut path| {
            let authentic = AuthenticRekey::verify(black_box(bytes), &controller).expect("valid");
            let fresh = authentic.fresh(&mut path).expect("fresh");
            fresh.apply().expect("applies");
            path
        });
}

#[divan::bench]
fn member_verify_fresh_apply_sibling(bencher: Bencher) {
    member_path(bencher, &SETUP.case.sibling);
}

#[divan::bench]
fn member_verify_fresh_apply_far(bencher: Bencher) {
    member_path(bencher, &SETUP.case.far);
}
