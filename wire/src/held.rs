//! The keys a member holds, changed only by what verified.
//!
//! A member's path keys are an [`lkh_tree::MemberPath`] inside a [`HeldPath`], which hands out
//! no `&mut MemberPath`: they change only by [`crate::FreshRekey::apply`] (a rekey datagram whose
//! controller signature verified, of the next epoch, serving this path, applied to the path it
//! was checked against) or are replaced by [`crate::open_path`] (a welcome or resync response
//! whose signature verified). `lkh-tree` keeps [`lkh_tree::MemberPath::apply`] public as the
//! tree's own arithmetic, for the controller's side, simulations and tests; it cannot ask for
//! `wire`'s proofs without depending on `wire`.
//!
//! Applying an update that did not verify does not compile:
//!
//! ```compile_fail
//! // No `&mut MemberPath` comes out of a HeldPath, so `MemberPath::apply` cannot reach it.
//! fn forge(held: &mut wire::HeldPath, update: &lkh_tree::PathUpdate<'_>) {
//!     let path: &mut lkh_tree::MemberPath = held;
//!     let _ = path.apply(update);
//! }
//! ```
//!
//! ```compile_fail
//! // A datagram checked against one path cannot be applied to another.
//! fn other(rekey: &wire::AuthenticRekey, checked: &mut wire::HeldPath, other: &mut wire::HeldPath) {
//!     let _ = rekey.fresh(checked).unwrap().apply(other);
//! }
//! ```
//!
//! ```compile_fail
//! // A FreshRekey is made only by `AuthenticRekey::fresh`.
//! fn make<'a>(d: &'a wire::RekeyDatagram, p: &'a mut wire::HeldPath) -> wire::FreshRekey<'a, 'a> {
//!     wire::FreshRekey { datagram: d, path: p }
//! }
//! ```
//!
//! ```compile_fail
//! // A welcome opens only once its signature verified.
//! fn unsigned(sealed: &wire::SealedPath, secret: &wire::HpkeSecret) {
//!     let _ = wire::open_path(sealed, secret);
//! }
//! ```
//!
//! The verified path compiles:
//!
//! ```
//! fn follow(bytes: &[u8], key: &ed25519_dalek::VerifyingKey, held: &mut wire::HeldPath) {
//!     if let Ok(rekey) = wire::AuthenticRekey::verify(bytes, key) {
//!         let _ = rekey.fresh(held).and_then(|fresh| fresh.apply());
//!     }
//! }
//! ```

use std::ops::Deref;

use lkh_tree::MemberPath;

/// A member's path keys; read them through `Deref`, change them only through the verified
/// path (see the module docs).
#[derive(Clone, Debug)]
pub struct HeldPath(MemberPath);

impl HeldPath {
    /// A path the caller vouches for: the member's own state file (as trusted as its identity
    /// key), or one the controller computed itself (simulations, tests). Never a path built from
    /// bytes off the network: those come from [`crate::open_path`] or change by
    /// [`crate::FreshRekey::apply`].
    pub fn trusted(path: MemberPath) -> Self {
        HeldPath(path)
    }

    /// The keys for a change made by the verified path.
    pub(crate) fn keys_mut(&mut self) -> &mut MemberPath {
        &mut self.0
    }
}

impl Deref for HeldPath {
    type Target = MemberPath;

    fn deref(&self) -> &MemberPath {
        &self.0
    }
}
