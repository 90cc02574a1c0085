//! # wire: the byte formats of gkm
//!
//! Every message the system sends, with a hand-written codec (one [`Codec`] trait, as rustls):
//! registration request and welcome, rekey datagram, heartbeat, resync request and response,
//! leave, error, the signing key's announcements and chain, and the group data frame. Each layout is specified byte by byte in
//! `RFC-notes/wire-format.md`; every length has an explicit bound; decoding never panics, never
//! allocates more than its input holds and rejects trailing bytes.
//!
//! It also holds the rekey [`pack`]er (a [`lkh_tree::Rekey`] into signed datagrams of at most one
//! MTU, each member finding all it needs in one) and the member's checked path for a datagram:
//!
//! ```text
//! bytes --AuthenticRekey::verify--> AuthenticRekey --fresh(path)--> FreshRekey --apply--> keys
//!        (bounded decode, Ed25519)                 (group, epoch,                (all or
//!                                                   serves path)                 nothing)
//! ```
//!
//! Applying an unverified datagram does not compile: a member's keys are a [`HeldPath`], changed
//! only by [`FreshRekey::apply`] (made only from an [`AuthenticRekey`], which is only made by
//! verifying a signature, and bound to the path it was checked against) or replaced by
//! [`open_path`] of a welcome whose signature verified. The `compile_fail` examples in
//! [`HeldPath`]'s module show each shortcut refused.
//!
//! It seals and opens the path keys of welcomes and resync responses with HPKE (RFC 9180) under
//! X-Wing (ML-KEM-768 + X25519, the default) or X25519 ([`Kem`]).
//!
//! What it does not do: no I/O, no clock (timestamps are passed in), no randomness of its own
//! (an injected CSPRNG).

#![forbid(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod codec;
pub mod data;
mod error;
mod fanout;
mod held;
mod message;
mod rekey;
mod sealed;
mod signed;
mod signing;

pub use codec::{Codec, CountWidth, DecodeError, Reader};
pub use error::WireError;
pub use fanout::{COOKIE_LEN, Cookie, CookieReply, Subscribe};
pub use held::HeldPath;
pub use message::{
    Ack, Acked, DataFrame, ErrorMessage, HEADER_LEN, Heartbeat, LeaveRequest, MAGIC, MAX_PAYLOAD,
    MAX_REASON, MAX_SEALED, MAX_TOKEN, MemberId, MessageType, NONCE_LEN, PATH_KEY_LEN, PathKeys,
    RegistrationRequest, ResyncRequest, SealedKind, SealedPath, Status, VERSION,
};
pub use rekey::{
    AuthenticRekey, DATAGRAM_OVERHEAD, DEFAULT_MTU, FreshRekey, Item, MAX_COVERS, MAX_DATAGRAM,
    MAX_ITEMS, RekeyDatagram, pack, pack_signed,
};
pub use sealed::{
    Encapsulation, HpkePublicKey, HpkeSecret, Kem, SealedFor, open_path, seal_path, seal_path_with,
};
pub use signed::{
    SIGNATURE_LEN, Unverified, Verified, decode as decode_signed, open, open_with, sign,
    verifying_key,
};
pub use signing::{ANNOUNCEMENT_LEN, KeyAnnouncement, KeyChain, KeyChainRequest, MAX_CHAIN};
