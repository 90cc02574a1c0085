//! Sealing a member's path keys to its X25519 key: HPKE (RFC 9180) Base mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305. The `info` binds the protocol label
//! and the group; the associated data binds every field of the [`SealedPath`] but the ciphertext,
//! so a welcome cannot be replayed as a resync, to another member or for another request.

use std::net::SocketAddr;

use hpke::aead::AeadCtxS;
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use lkh_tree::{GroupId, MemberPath};
use rand_core::CryptoRng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::codec::{Codec, DecodeError};
use crate::error::WireError;
use crate::held::HeldPath;
use crate::message::{MemberId, NONCE_LEN, PathKeys, SealedKind, SealedPath};
use crate::signed::Verified;

type Kem = X25519HkdfSha256;

const INFO_LABEL: &[u8] = b"gkm v1 sealed path\0";

/// A member's X25519 secret key for HPKE. Zeroized on drop, printed as `***`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HpkeSecret([u8; 32]);

impl core::fmt::Debug for HpkeSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("HpkeSecret(***)")
    }
}

impl HpkeSecret {
    /// A fresh key pair from the injected CSPRNG.
    pub fn generate<R: CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut ikm = [0u8; 32];
        rng.fill_bytes(&mut ikm);
        let (secret, _) = Kem::derive_keypair(&ikm);
        ikm.zeroize();
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&secret.to_bytes());
        HpkeSecret(bytes)
    }

    /// Wraps stored secret-key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        HpkeSecret(bytes)
    }

    /// The secret-key bytes, for storing in a file of mode 0600.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public key, to send in a registration request.
    pub fn public_key(&self) -> Result<[u8; 32], WireError> {
        let secret = <Kem as hpke::Kem>::PrivateKey::from_bytes(&self.0)
            .map_err(|_| WireError::Decode(DecodeError::Invalid("HPKE secret key")))?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&Kem::sk_to_pk(&secret).to_bytes());
        Ok(out)
    }
}

fn info(group: GroupId) -> Vec<u8> {
    let mut info = INFO_LABEL.to_vec();
    info.extend_from_slice(&group.0.to_be_bytes());
    info
}

/// The associated data: the sealed path's encoding with an empty ciphertext.
fn associated_data(sealed: &SealedPath) -> Vec<u8> {
    let mut header = sealed.clone();
    header.ciphertext = Vec::new();
    header.encapped = [0; 32];
    header.to_bytes()
}

/// Everything a sealed path names besides its keys.
#[derive(Clone, Copy, Debug)]
pub struct SealedFor {
    /// Welcome or resync.
    pub kind: SealedKind,
    /// The member's id.
    pub member: MemberId,
    /// The nonce of the request being answered.
    pub request_nonce: [u8; NONCE_LEN],
    /// The member's X25519 public key.
    pub recipient: [u8; 32],
    /// Where the group's rekeys are multicast, if the controller says.
    pub rekey_address: Option<SocketAddr>,
}

/// The sender's half of HPKE for one recipient and group, made before the path it will seal
/// exists: the X25519 work of a welcome (an ephemeral key and one Diffie-Hellman), so it can be
/// done where a registration is verified, on any thread. Making one is also the check that a
/// path can be sealed to the key at all: a low-order point makes every Diffie-Hellman output
/// zero, which HPKE refuses. Its keys are zeroized on drop (by the HPKE crate); it prints as
/// `***`.
pub struct Encapsulation {
    recipient: [u8; 32],
    group: GroupId,
    encapped: [u8; 32],
    context: AeadCtxS<ChaCha20Poly1305, HkdfSha256, Kem>,
}

impl core::fmt::Debug for Encapsulation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Encapsulation(***)")
    }
}

impl Encapsulation {
    /// Encapsulates to the X25519 key `recipient` for `group`; refuses a key no path can be
    /// sealed to.
    pub fn new<R: CryptoRng + ?Sized>(
        recipient: &[u8; 32],
        group: GroupId,
        rng: &mut R,
    ) -> Result<Self, WireError> {
        let unusable = || WireError::Decode(DecodeError::Invalid("HPKE public key"));
        let public =
            <Kem as hpke::Kem>::PublicKey::from_bytes(recipient).map_err(|_| unusable())?;
        let (encapped, context) = hpke::setup_sender_with_rng::<ChaCha20Poly1305, HkdfSha256, Kem>(
            &OpModeS::Base,
            &public,
            &info(group),
            &mut RngRef(rng),
        )
        .map_err(|_| unusable())?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&encapped.to_bytes());
        Ok(Encapsulation {
            recipient: *recipient,
            group,
            encapped: bytes,
            context,
        })
    }

    /// The key it encapsulates to.
    pub fn recipient(&self) -> &[u8; 32] {
        &self.recipient
    }
}

/// Seals `path` to the member (the caller signs the result with [`crate::sign`]).
pub fn seal_path<R: CryptoRng + ?Sized>(
    path: &MemberPath,
    to: &SealedFor,
    rng: &mut R,
) -> Result<SealedPath, WireError> {
    let encapsulation = Encapsulation::new(&to.recipient, path.group(), rng)?;
    seal_path_with(path, to, encapsulation)
}

/// Seals `path` to the member with an [`Encapsulation`] made earlier for `to.recipient` and the
/// path's group (used once: it is consumed).
pub fn seal_path_with(
    path: &MemberPath,
    to: &SealedFor,
    mut encapsulation: Encapsulation,
) -> Result<SealedPath, WireError> {
    if encapsulation.recipient != to.recipient || encapsulation.group != path.group() {
        return Err(WireError::Decode(DecodeError::Invalid(
            "encapsulation made for another recipient or group",
        )));
    }
    let mut sealed = SealedPath {
        kind: to.kind,
        group: path.group(),
        member: to.member,
        epoch: path.epoch(),
        request_nonce: to.request_nonce,
        encapped: encapsulation.encapped,
        rekey_address: to.rekey_address,
        ciphertext: Vec::new(),
    };
    let plaintext = PathKeys::encode(path);
    sealed.ciphertext = encapsulation
        .context
        .seal(&plaintext, &associated_data(&sealed))
        .map_err(|_| WireError::Decode(DecodeError::Invalid("HPKE seal")))?;
    Ok(sealed)
}

/// Opens a sealed path whose controller signature verified ([`crate::open`]) and checks the
/// path it holds: the keys a member then holds.
pub fn open_path(
    sealed: &Verified<SealedPath>,
    secret: &HpkeSecret,
) -> Result<HeldPath, WireError> {
    let sealed = sealed.message();
    let bad = |what| WireError::Decode(DecodeError::Invalid(what));
    let key = <Kem as hpke::Kem>::PrivateKey::from_bytes(secret.as_bytes())
        .map_err(|_| bad("HPKE secret key"))?;
    let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&sealed.encapped)
        .map_err(|_| bad("encapsulated key"))?;
    let mut plaintext = hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &key,
        &encapped,
        &info(sealed.group),
        &sealed.ciphertext,
        &associated_data(sealed),
    )
    .map_err(|_| bad("sealed path does not open"))?;
    let path = PathKeys::decode(sealed.group, sealed.epoch, &plaintext);
    plaintext.zeroize();
    Ok(HeldPath::trusted(path?))
}

/// Adapts `&mut R` (possibly unsized) to the sized RNG the HPKE API takes.
struct RngRef<'a, R: ?Sized>(&'a mut R);

impl<R: CryptoRng + ?Sized> rand_core::TryRng for RngRef<'_, R> {
    type Error = core::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.0.next_u32())
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill_bytes(dst);
        Ok(())
    }
}

impl<R: CryptoRng + ?Sized> rand_core::TryCryptoRng for RngRef<'_, R> {}

#[cfg(test)]
mod tests {
    use lkh_tree::{Batch, KeyTree, TreeConfig};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    use super::*;

    /// In a fresh tree of group 9 with `joins` members, joiner `index`'s path, an HPKE key for
    /// it, and its welcome's addressing (member `index + 1`).
    fn welcome(
        joins: usize,
        index: usize,
        rng: &mut ChaCha20Rng,
    ) -> (MemberPath, HpkeSecret, SealedFor) {
        let mut tree = KeyTree::new(GroupId(9), TreeConfig::default(), rng).unwrap();
        let batch = Batch {
            leaves: vec![],
            joins,
        };
        let path = tree.rekey(&batch, rng).unwrap().joiners[index].path.clone();
        let secret = HpkeSecret::generate(rng);
        let to = SealedFor {
            kind: SealedKind::Welcome,
            member: MemberId(index as u64 + 1),
            request_nonce: [7; 16],
            recipient: secret.public_key().unwrap(),
            rekey_address: Some("239.255.77.1:47701".parse().unwrap()),
        };
        (path, secret, to)
    }

    /// Found by the `controller_request` fuzz target's corpus: a registration with a low-order
    /// key was admitted before its welcome failed to seal.
    #[test]
    fn v037_low_order_hpke_keys_are_unusable() {
        let good = HpkeSecret::generate(&mut ChaCha20Rng::seed_from_u64(3));
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let group = GroupId(1);
        assert!(Encapsulation::new(&good.public_key().unwrap(), group, &mut rng).is_ok());
        let mut one = [0u8; 32];
        one[0] = 1;
        for low_order in [[0u8; 32], one] {
            assert!(Encapsulation::new(&low_order, group, &mut rng).is_err());
        }
    }

    #[test]
    fn an_encapsulation_made_ahead_seals_once_for_its_recipient_and_group_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (path, secret, to) = welcome(2, 0, &mut rng);
        let other = HpkeSecret::generate(&mut rng);
        let ahead = Encapsulation::new(&to.recipient, GroupId(9), &mut rng).unwrap();
        assert_eq!(format!("{ahead:?}"), "Encapsulation(***)");
        let sealed = seal_path_with(&path, &to, ahead).unwrap();
        assert!(open_path(&Verified::assume(sealed.clone()), &secret).is_ok());
        let for_other = Encapsulation::new(&other.public_key().unwrap(), GroupId(9), &mut rng);
        assert!(seal_path_with(&path, &to, for_other.unwrap()).is_err());
        let other_group = Encapsulation::new(&to.recipient, GroupId(10), &mut rng).unwrap();
        assert!(seal_path_with(&path, &to, other_group).is_err());
    }

    #[test]
    fn a_sealed_path_opens_only_for_its_member_and_context() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let (path, secret, to) = welcome(5, 2, &mut rng);
        let sealed = seal_path(&path, &to, &mut rng).unwrap();
        let opened = open_path(&Verified::assume(sealed.clone()), &secret).unwrap();
        assert_eq!(
            opened.root_key().unwrap().as_bytes(),
            path.root_key().unwrap().as_bytes()
        );
        let other = HpkeSecret::generate(&mut rng);
        assert!(open_path(&Verified::assume(sealed.clone()), &other).is_err());
        let mut as_resync = sealed.clone();
        as_resync.kind = SealedKind::Resync;
        assert!(open_path(&Verified::assume(as_resync.clone()), &secret).is_err());
        let mut other_member = sealed;
        other_member.member = MemberId(4);
        assert!(open_path(&Verified::assume(other_member.clone()), &secret).is_err());
        assert_eq!(format!("{secret:?}"), "HpkeSecret(***)");
    }
}
