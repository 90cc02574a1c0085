//! # lkh-tree: the Logical Key Hierarchy of gkm
//!
//! A d-ary key tree (RFC 2627; Wong, Gouda and Lam 1998) for one group: the controller's
//! [`KeyTree`], which decides which keys change on joins, leaves, batches and refreshes and wraps
//! the new keys, and the member's [`MemberPath`], which applies those wraps.
//!
//! ```text
//!                      root (traffic key = KDF(root key, group, epoch))
//!                /        |        |        \
//!              k1        k2       k3        k4          one key per subtree
//!            / | \ \
//!          m1 m2 m3 m4 ...                             one individual key per member
//! ```
//!
//! What it does:
//! - [`KeyTree::rekey`] processes a [`Batch`] of leaves and joins with the marking algorithm of
//!   Li, Yang, Gouda and Lam (2001) and returns a [`Rekey`] value: the new epoch, the
//!   [`Encryption`]s (each key under a one-time pad derived from the wrapping key, the rekey's
//!   salt and the wrap's place: `wrap.rs`; no tag, the datagram's signature and key check value
//!   stand in), the hash-forward [`Advance`]s (LKH+), the new traffic key's check value and the
//!   joiners' unicast keys.
//!   [`Strategy`] picks group-, key- or user-oriented rekeying.
//! - [`MemberPath::apply`] unwraps a member's path bottom-up from a [`PathUpdate`] and yields the
//!   new traffic key if its check value is the update's; inconsistent input is an error that
//!   leaves the path unchanged.
//! - [`checker::KeyGraph`] (petgraph) answers which keys an adversary holding some keys reaches by
//!   decrypting what it saw; [`dot::tree_dot`] draws a tree.
//!
//! What it does not do: no I/O, no clock, no randomness of its own (an injected
//! [`rand_core::CryptoRng`]), no wire format (see the `wire` crate), no persistence. The only
//! threads are those [`KeyTree::rekey_with_workers`] seals wraps on (scoped, joined before it
//! returns; the result is the same on any number).
//!
//! Memory: about 92 bytes per member at degree 4 and 10^6 members (see
//! [`KeyTree::memory_bytes`]).

#![forbid(unsafe_code)]

pub mod checker;
pub mod dot;
mod ids;
mod member;
mod rekey;
mod secret;
mod tree;
mod wrap;

pub use ids::{Epoch, GroupId, KeyVersion, NodeId, RekeySalt, SALT_LEN};
pub use member::{Applied, ApplyError, Link, MemberPath, PathKey, PathUpdate, Wrap};
pub use rekey::{
    Advance, Batch, JoinerKeys, KeyTree, MemberView, NodeRecord, Rekey, Strategy, TreeChanges,
    TreeConfig, TreeError, TreeSnapshot, height_bound,
};
pub use secret::{KCV_LEN, KEY_LEN, Kcv, NodeKey, TrafficKey};
pub use tree::MAX_DEPTH;
pub use wrap::{Encryption, WRAPPED_LEN};
