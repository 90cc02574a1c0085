//! The primitives a rekey is made of (DESIGN.md §3, §9), each alone:
//! - BLAKE3 `derive_key` of 32 bytes (the key derivations of the tree);
//! - one wrap as the tree makes it and as a member opens it (wire version 3: one `derive_key` of
//!   80 bytes, the pad, XORed onto the key);
//! - one wrap applied by a member through the public API: `MemberPath::apply` of a refresh,
//!   whose only encryption is the new root key under the old one (one unwrap, plus the path
//!   bookkeeping and the traffic key and check value derivations);
//! - Ed25519 sign and `verify_strict` of a 1200-byte datagram (`ed25519-dalek` directly).

use divan::{Bencher, black_box};
use ed25519_dalek::{Signer, SigningKey};
use gkm_benches::{
    WRAP_LABEL, byte, config, controller_key, full_tree, unwrap_like_member, wrap_binding,
    wrap_like_tree,
};
use wire::DEFAULT_MTU;

fn main() {
    divan::main();
}

#[divan::bench]
fn blake3_derive_key_32() -> [u8; 32] {
    blake3::derive_key(WRAP_LABEL, black_box(&[7u8; 32]))
}

#[divan::bench]
fn wrap_pad_and_xor() -> [u8; 32] {
    wrap_like_tree(
        black_box(&[1; 32]),
        black_box(&wrap_binding(3)),
        black_box(&[4; 32]),
    )
}

#[divan::bench]
fn unwrap_pad_and_xor(bencher: Bencher) {
    let binding = wrap_binding(3);
    let wrapped = wrap_like_tree(&[1; 32], &binding, &[4; 32]);
    bencher.bench_local(|| unwrap_like_member(black_box(&[1; 32]), &binding, black_box(&wrapped)));
}

/// `MemberPath::apply` of a one-wrap update (a refresh) at n = 2^20, d = 4: an 11-key path.
#[divan::bench]
fn member_apply_one_wrap(bencher: Bencher) {
    let mut fx = full_tree(1 << 20, config(4, false), 11);
    let member = fx.random_member();
    let path = fx.tree.member_path(member).expect("a member");
    let rekey = fx.tree.refresh(&mut fx.rng).expect("refresh");
    assert_eq!(rekey.encryptions.len(), 1);
    let view = rekey.member_view();
    let update = view.update();
    bencher
        .with_inputs(|| path.clone())
        .bench_local_values(|mut path| {
            path.apply(black_box(&update)).expect("applies");
            path
        });
}

fn datagram() -> Vec<u8> {
    (0..DEFAULT_MTU).map(|i| byte(i % 251)).collect()
}

#[divan::bench]
fn ed25519_sign_1200(bencher: Bencher) {
    let key: SigningKey = controller_key();
    let message = datagram();
    bencher.bench_local(|| key.sign(black_box(&message)));
}

#[divan::bench]
fn ed25519_verify_strict_1200(bencher: Bencher) {
    let key = controller_key();
    let message = datagram();
    let signature = key.sign(&message);
    let public = key.verifying_key();
    bencher.bench_local(|| {
        public
            .verify_strict(black_box(&message), black_box(&signature))
            .expect("valid");
    });
}
