//! The primitives a rekey is made of (DESIGN.md §3, §9), each alone:
//! - BLAKE3 `derive_key` of 32 bytes (the tree derives one AEAD key per wrap with it);
//! - ChaCha20-Poly1305 seal and open of a 32-byte key with 40 bytes of associated data, under a
//!   ready key (`chacha20poly1305` crate directly);
//! - one wrap as the tree makes it (derive, then seal) and as a member opens it;
//! - one wrap applied by a member through the public API: `MemberPath::apply` of a refresh,
//!   whose only encryption is the new root key under the old one (one unwrap, plus the path
//!   bookkeeping and the traffic key and check value derivations);
//! - Ed25519 sign and `verify_strict` of a 1200-byte datagram (`ed25519-dalek` directly).
//!
//! Built without `--cfg poly1305_backend="soft"`: the default Poly1305 backend, whose AVX2 path is
//! slow on short messages (DESIGN.md §9).

use divan::{Bencher, black_box};
use ed25519_dalek::{Signer, SigningKey};
use gkm_benches::{
    WRAP_LABEL, byte, config, controller_key, full_tree, seal_32, unwrap_like_member, wrap_ad,
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
fn chacha20poly1305_seal_32_ad40() -> [u8; 48] {
    seal_32(
        black_box(&[1; 32]),
        black_box([2; 12]),
        black_box(&wrap_ad(3)),
        black_box(&[4; 32]),
    )
}

#[divan::bench]
fn chacha20poly1305_open_32_ad40(bencher: Bencher) {
    // Open with the AEAD key the wrap was sealed under (derive outside the timing).
    let wrapping = [1u8; 32];
    let ad = wrap_ad(3);
    let wrapped = wrap_like_tree(&wrapping, [2; 12], &ad, &[4; 32]);
    let aead_key = blake3::derive_key(WRAP_LABEL, &wrapping);
    bencher.bench_local(|| {
        use chacha20poly1305::aead::AeadInOut;
        use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
        let cipher = ChaCha20Poly1305::new(&black_box(aead_key).into());
        let mut body = [0u8; 32];
        body.copy_from_slice(&wrapped[..32]);
        let tag = Tag::try_from(&wrapped[32..]).expect("16 bytes");
        cipher
            .decrypt_inout_detached(&Nonce::from([2; 12]), &ad, (&mut body[..]).into(), &tag)
            .expect("authentic");
        body
    });
}

#[divan::bench]
fn wrap_derive_and_seal() -> [u8; 48] {
    wrap_like_tree(
        black_box(&[1; 32]),
        black_box([2; 12]),
        black_box(&wrap_ad(3)),
        black_box(&[4; 32]),
    )
}

#[divan::bench]
fn unwrap_derive_and_open(bencher: Bencher) {
    let ad = wrap_ad(3);
    let wrapped = wrap_like_tree(&[1; 32], [2; 12], &ad, &[4; 32]);
    bencher.bench_local(|| {
        unwrap_like_member(black_box(&[1; 32]), [2; 12], &ad, black_box(&wrapped)).expect("opens")
    });
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
