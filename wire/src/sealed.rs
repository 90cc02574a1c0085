//! Sealing a member's path keys to its HPKE key (RFC 9180, Base mode, HKDF-SHA256,
//! ChaCha20-Poly1305) under one of two KEMs: X-Wing (ML-KEM-768 + X25519, the default: the
//! hybrid keeps a welcome confidential against an adversary who records it now and has a quantum
//! computer later) or DHKEM(X25519, HKDF-SHA256), for members that cannot afford X-Wing's
//! 1,216-byte key. The `info` binds the protocol label and the group; the associated data binds
//! every field of the [`SealedPath`] but the encapsulation and the ciphertext (the KEM
//! included), so a welcome cannot be replayed as a resync, to another member, for another request
//! or under another KEM.

use std::net::SocketAddr;

use hpke::aead::{AeadCtxS, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::{X25519HkdfSha256, XWing};
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use lkh_tree::{GroupId, MemberPath};
use rand_core::CryptoRng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::codec::{Codec, DecodeError, Reader};
use crate::error::WireError;
use crate::held::HeldPath;
use crate::message::{MemberId, NONCE_LEN, PathKeys, SealedKind, SealedPath};
use crate::signed::Verified;

const INFO_LABEL: &[u8] = b"gkm v1 sealed path\0";
const DIGEST_LABEL: &str = "gkm v4 2026-12 hpke public key digest";

/// The KEM of a member's HPKE key, named on the wire by its RFC 9180 identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kem {
    /// X-Wing (ML-KEM-768 + X25519, draft-connolly-cfrg-xwing-kem), identifier 0x647a: a hybrid
    /// that stays confidential if either of its parts holds. 1,216-byte public keys, 1,120-byte
    /// encapsulations.
    XWing,
    /// DHKEM(X25519, HKDF-SHA256), identifier 0x0020: classical, 32-byte keys and
    /// encapsulations.
    X25519,
}

impl Kem {
    /// Every KEM, the default first.
    pub const ALL: [Kem; 2] = [Kem::XWing, Kem::X25519];

    /// The identifier on the wire (the HPKE KEM registry's).
    pub fn id(self) -> u16 {
        match self {
            Kem::XWing => <XWing as hpke::Kem>::KEM_ID,
            Kem::X25519 => <X25519HkdfSha256 as hpke::Kem>::KEM_ID,
        }
    }

    /// The KEM of a wire identifier.
    pub fn from_id(id: u16) -> Option<Kem> {
        Kem::ALL.into_iter().find(|kem| kem.id() == id)
    }

    /// Its name in configs, the CLI and JSON: `x-wing` or `x25519`.
    pub fn name(self) -> &'static str {
        match self {
            Kem::XWing => "x-wing",
            Kem::X25519 => "x25519",
        }
    }

    /// The KEM called `name` ([`Kem::name`]).
    pub fn from_name(name: &str) -> Option<Kem> {
        Kem::ALL.into_iter().find(|kem| kem.name() == name)
    }

    /// Length of its public keys.
    pub fn public_key_len(self) -> usize {
        match self {
            Kem::XWing => <XWing as hpke::Kem>::PublicKey::size(),
            Kem::X25519 => <X25519HkdfSha256 as hpke::Kem>::PublicKey::size(),
        }
    }

    /// Length of its encapsulations.
    pub fn encapped_len(self) -> usize {
        match self {
            Kem::XWing => <XWing as hpke::Kem>::EncappedKey::size(),
            Kem::X25519 => <X25519HkdfSha256 as hpke::Kem>::EncappedKey::size(),
        }
    }

    /// Reads a KEM identifier.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Kem, DecodeError> {
        Kem::from_id(r.u16("KEM")?).ok_or(DecodeError::Invalid("KEM is not x-wing or x25519"))
    }
}

impl core::fmt::Display for Kem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A member's HPKE public key and its KEM; its length is the KEM's.
#[derive(Clone, PartialEq, Eq)]
pub struct HpkePublicKey {
    kem: Kem,
    bytes: Vec<u8>,
}

impl core::fmt::Debug for HpkePublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HpkePublicKey({}, {} bytes)", self.kem, self.bytes.len())
    }
}

impl HpkePublicKey {
    /// A public key of `kem`; refuses bytes of another length (whether a path can be sealed to
    /// them is [`Encapsulation::new`]'s check).
    pub fn new(kem: Kem, bytes: Vec<u8>) -> Result<Self, DecodeError> {
        if bytes.len() != kem.public_key_len() {
            return Err(DecodeError::Invalid(
                "HPKE public key length is not its KEM's",
            ));
        }
        Ok(HpkePublicKey { kem, bytes })
    }

    /// Its KEM.
    pub fn kem(&self) -> Kem {
        self.kem
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What the controller keeps of it: a 32-byte BLAKE3 digest of the KEM and the key (an
    /// X-Wing key is 1,216 bytes; a million of them would be 1.2 GB). A member presents its key
    /// in every request that needs one, and the controller checks it against the digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key(DIGEST_LABEL);
        hasher.update(&self.kem.id().to_be_bytes());
        hasher.update(&self.bytes);
        *hasher.finalize().as_bytes()
    }

    /// Writes the KEM identifier and the key.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.kem.id().to_be_bytes());
        out.extend_from_slice(&self.bytes);
    }

    /// Reads a KEM identifier and a key of its length.
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kem = Kem::read(r)?;
        let bytes = r.take(kem.public_key_len(), "HPKE public key")?.to_vec();
        Ok(HpkePublicKey { kem, bytes })
    }
}

/// A member's HPKE secret key (32 bytes for both KEMs: X-Wing's is the seed its key pair expands
/// from). Zeroized on drop, printed as `***`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HpkeSecret {
    #[zeroize(skip)]
    kem: Kem,
    bytes: [u8; 32],
}

impl core::fmt::Debug for HpkeSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "HpkeSecret({}, ***)", self.kem)
    }
}

impl HpkeSecret {
    /// A fresh key pair of `kem` from the injected CSPRNG.
    pub fn generate<R: CryptoRng + ?Sized>(kem: Kem, rng: &mut R) -> Self {
        let mut ikm = [0u8; 32];
        rng.fill_bytes(&mut ikm);
        let mut bytes = [0u8; 32];
        match kem {
            Kem::XWing => XWing::derive_keypair(&ikm).0.write_exact(&mut bytes),
            Kem::X25519 => X25519HkdfSha256::derive_keypair(&ikm)
                .0
                .write_exact(&mut bytes),
        }
        ikm.zeroize();
        HpkeSecret { kem, bytes }
    }

    /// Wraps stored secret-key bytes of `kem`.
    pub fn from_bytes(kem: Kem, bytes: [u8; 32]) -> Self {
        HpkeSecret { kem, bytes }
    }

    /// The secret-key bytes, for storing in a file of mode 0600.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Its KEM.
    pub fn kem(&self) -> Kem {
        self.kem
    }

    /// The public key, to send in registration and resync requests (for X-Wing this expands the
    /// seed: keep the result).
    pub fn public_key(&self) -> Result<HpkePublicKey, WireError> {
        let bytes = match self.kem {
            Kem::XWing => public_of::<XWing>(&self.bytes),
            Kem::X25519 => public_of::<X25519HkdfSha256>(&self.bytes),
        }
        .ok_or(WireError::Decode(DecodeError::Invalid("HPKE secret key")))?;
        Ok(HpkePublicKey {
            kem: self.kem,
            bytes,
        })
    }
}

fn public_of<K: hpke::Kem>(secret: &[u8]) -> Option<Vec<u8>> {
    let secret = K::PrivateKey::from_bytes(secret).ok()?;
    Some(K::sk_to_pk(&secret).to_bytes().to_vec())
}

fn info(group: GroupId) -> Vec<u8> {
    let mut info = INFO_LABEL.to_vec();
    info.extend_from_slice(&group.0.to_be_bytes());
    info
}

/// The associated data: the sealed path's encoding without its encapsulation and ciphertext.
fn associated_data(sealed: &SealedPath) -> Vec<u8> {
    let mut header = sealed.clone();
    header.ciphertext = Vec::new();
    header.encapped = Vec::new();
    header.to_bytes()
}

/// Everything a sealed path names besides its keys and the key it is sealed to.
#[derive(Clone, Copy, Debug)]
pub struct SealedFor {
    /// Welcome or resync.
    pub kind: SealedKind,
    /// The member's id.
    pub member: MemberId,
    /// The nonce of the request being answered.
    pub request_nonce: [u8; NONCE_LEN],
    /// Where the group's rekeys are multicast, if the controller says.
    pub rekey_address: Option<SocketAddr>,
}

/// The sender's context of one KEM.
enum Sender {
    XWing(AeadCtxS<ChaCha20Poly1305, HkdfSha256, XWing>),
    X25519(AeadCtxS<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>),
}

/// The sender's half of HPKE for one recipient and group, made before the path it will seal
/// exists: the KEM's work of a welcome (for X25519 an ephemeral key and one Diffie-Hellman; for
/// X-Wing an ML-KEM encapsulation as well), so it can be done where a request is verified, on any
/// thread. Making one is also the check that a path can be sealed to the key at all: a
/// low-order X25519 point makes every Diffie-Hellman output zero, which HPKE refuses, and an
/// X-Wing key must decode. Its keys are zeroized on drop (by the HPKE crate); it prints as `***`.
pub struct Encapsulation {
    kem: Kem,
    digest: [u8; 32],
    group: GroupId,
    encapped: Vec<u8>,
    sender: Sender,
}

impl core::fmt::Debug for Encapsulation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Encapsulation(***)")
    }
}

impl Encapsulation {
    /// Encapsulates to `recipient` for `group`; refuses a key no path can be sealed to.
    pub fn new<R: CryptoRng + ?Sized>(
        recipient: &HpkePublicKey,
        group: GroupId,
        rng: &mut R,
    ) -> Result<Self, WireError> {
        let info = info(group);
        let (encapped, sender) = match recipient.kem {
            Kem::XWing => {
                let (encapped, context) = setup::<XWing, R>(&recipient.bytes, &info, rng)?;
                (encapped, Sender::XWing(context))
            }
            Kem::X25519 => {
                let (encapped, context) =
                    setup::<X25519HkdfSha256, R>(&recipient.bytes, &info, rng)?;
                (encapped, Sender::X25519(context))
            }
        };
        Ok(Encapsulation {
            kem: recipient.kem,
            digest: recipient.digest(),
            group,
            encapped,
            sender,
        })
    }

    /// The KEM of the key it encapsulates to.
    pub fn kem(&self) -> Kem {
        self.kem
    }

    /// The digest ([`HpkePublicKey::digest`]) of the key it encapsulates to.
    pub fn recipient_digest(&self) -> &[u8; 32] {
        &self.digest
    }

    fn seal(&mut self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, hpke::HpkeError> {
        match &mut self.sender {
            Sender::XWing(context) => context.seal(plaintext, aad),
            Sender::X25519(context) => context.seal(plaintext, aad),
        }
    }
}

type SenderOf<K> = AeadCtxS<ChaCha20Poly1305, HkdfSha256, K>;

fn setup<K: hpke::Kem, R: CryptoRng + ?Sized>(
    recipient: &[u8],
    info: &[u8],
    rng: &mut R,
) -> Result<(Vec<u8>, SenderOf<K>), WireError> {
    let unusable = || WireError::Decode(DecodeError::Invalid("HPKE public key"));
    let public = K::PublicKey::from_bytes(recipient).map_err(|_| unusable())?;
    let (encapped, context) = hpke::setup_sender_with_rng::<ChaCha20Poly1305, HkdfSha256, K>(
        &OpModeS::Base,
        &public,
        info,
        &mut RngRef(rng),
    )
    .map_err(|_| unusable())?;
    Ok((encapped.to_bytes().to_vec(), context))
}

/// Seals `path` to the member's key `recipient` (the caller signs the result with
/// [`crate::sign`]).
pub fn seal_path<R: CryptoRng + ?Sized>(
    path: &MemberPath,
    to: &SealedFor,
    recipient: &HpkePublicKey,
    rng: &mut R,
) -> Result<SealedPath, WireError> {
    let encapsulation = Encapsulation::new(recipient, path.group(), rng)?;
    seal_path_with(path, to, encapsulation)
}

/// Seals `path` to the member with an [`Encapsulation`] made earlier for the path's group (used
/// once: it is consumed).
pub fn seal_path_with(
    path: &MemberPath,
    to: &SealedFor,
    mut encapsulation: Encapsulation,
) -> Result<SealedPath, WireError> {
    if encapsulation.group != path.group() {
        return Err(WireError::Decode(DecodeError::Invalid(
            "encapsulation made for another group",
        )));
    }
    let mut sealed = SealedPath {
        kind: to.kind,
        group: path.group(),
        member: to.member,
        epoch: path.epoch(),
        request_nonce: to.request_nonce,
        kem: encapsulation.kem,
        encapped: std::mem::take(&mut encapsulation.encapped),
        rekey_address: to.rekey_address,
        ciphertext: Vec::new(),
    };
    let plaintext = PathKeys::encode(path);
    sealed.ciphertext = encapsulation
        .seal(&plaintext, &associated_data(&sealed))
        .map_err(|_| WireError::Decode(DecodeError::Invalid("HPKE seal")))?;
    Ok(sealed)
}

/// Opens a sealed path whose controller signature verified ([`crate::open`]) and checks the
/// path it holds: the keys a member then holds. A path sealed under another KEM than the
/// secret's is refused before anything is opened.
pub fn open_path(
    sealed: &Verified<SealedPath>,
    secret: &HpkeSecret,
) -> Result<HeldPath, WireError> {
    let sealed = sealed.message();
    if sealed.kem != secret.kem {
        return Err(WireError::Decode(DecodeError::Invalid(
            "sealed path is for another KEM than this member's key",
        )));
    }
    let aad = associated_data(sealed);
    let info = info(sealed.group);
    let opened = match secret.kem {
        Kem::XWing => open::<XWing>(secret, sealed, &info, &aad),
        Kem::X25519 => open::<X25519HkdfSha256>(secret, sealed, &info, &aad),
    };
    let mut plaintext = opened?;
    let path = PathKeys::decode(sealed.group, sealed.epoch, &plaintext);
    plaintext.zeroize();
    Ok(HeldPath::trusted(path?))
}

fn open<K: hpke::Kem>(
    secret: &HpkeSecret,
    sealed: &SealedPath,
    info: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, WireError> {
    let bad = |what| WireError::Decode(DecodeError::Invalid(what));
    let key = K::PrivateKey::from_bytes(&secret.bytes).map_err(|_| bad("HPKE secret key"))?;
    let encapped =
        K::EncappedKey::from_bytes(&sealed.encapped).map_err(|_| bad("encapsulated key"))?;
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, K>(
        &OpModeR::Base,
        &key,
        &encapped,
        info,
        &sealed.ciphertext,
        aad,
    )
    .map_err(|_| bad("sealed path does not open"))
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

    /// In a fresh tree of group 9 with `joins` members, joiner `index`'s path, an HPKE key of
    /// `kem` for it, and its welcome's addressing (member `index + 1`).
    fn welcome(
        kem: Kem,
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
        let secret = HpkeSecret::generate(kem, rng);
        let to = SealedFor {
            kind: SealedKind::Welcome,
            member: MemberId(index as u64 + 1),
            request_nonce: [7; 16],
            rekey_address: Some("239.255.77.1:47701".parse().unwrap()),
        };
        (path, secret, to)
    }

    /// Found by the `controller_request` fuzz target's corpus: a registration with a low-order
    /// key was admitted before its welcome failed to seal.
    #[test]
    fn v037_low_order_hpke_keys_are_unusable() {
        let good = HpkeSecret::generate(Kem::X25519, &mut ChaCha20Rng::seed_from_u64(3));
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let group = GroupId(1);
        assert!(Encapsulation::new(&good.public_key().unwrap(), group, &mut rng).is_ok());
        let mut one = [0u8; 32];
        one[0] = 1;
        for low_order in [[0u8; 32], one] {
            let key = HpkePublicKey::new(Kem::X25519, low_order.to_vec()).unwrap();
            assert!(Encapsulation::new(&key, group, &mut rng).is_err());
        }
    }

    #[test]
    fn public_keys_have_their_kems_length_and_digests_bind_the_kem() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        for kem in Kem::ALL {
            let public = HpkeSecret::generate(kem, &mut rng).public_key().unwrap();
            assert_eq!(public.as_bytes().len(), kem.public_key_len());
            assert_eq!(Kem::from_id(kem.id()), Some(kem));
            assert_eq!(Kem::from_name(kem.name()), Some(kem));
            assert!(HpkePublicKey::new(kem, vec![1; kem.public_key_len() - 1]).is_err());
        }
        let same_bytes = [Kem::XWing, Kem::X25519].map(|kem| {
            HpkePublicKey::new(kem, vec![9; kem.public_key_len()])
                .unwrap()
                .digest()
        });
        assert_ne!(same_bytes[0], same_bytes[1]);
        assert_eq!((Kem::XWing.id(), Kem::X25519.id()), (0x647a, 0x0020));
        assert_eq!(
            (Kem::XWing.public_key_len(), Kem::XWing.encapped_len()),
            (1216, 1120)
        );
    }

    #[test]
    fn an_encapsulation_made_ahead_seals_once_for_its_group_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for kem in Kem::ALL {
            let (path, secret, to) = welcome(kem, 2, 0, &mut rng);
            let public = secret.public_key().unwrap();
            let ahead = Encapsulation::new(&public, GroupId(9), &mut rng).unwrap();
            assert_eq!(format!("{ahead:?}"), "Encapsulation(***)");
            assert_eq!(ahead.recipient_digest(), &public.digest());
            let sealed = seal_path_with(&path, &to, ahead).unwrap();
            assert_eq!(sealed.encapped.len(), kem.encapped_len());
            assert!(open_path(&Verified::assume(sealed.clone()), &secret).is_ok());
            let other_group = Encapsulation::new(&public, GroupId(10), &mut rng).unwrap();
            assert!(seal_path_with(&path, &to, other_group).is_err());
        }
    }

    #[test]
    fn a_sealed_path_opens_only_for_its_member_kem_and_context() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for kem in Kem::ALL {
            let (path, secret, to) = welcome(kem, 5, 2, &mut rng);
            let sealed = seal_path(&path, &to, &secret.public_key().unwrap(), &mut rng).unwrap();
            assert_eq!(sealed.kem, kem);
            let opened = open_path(&Verified::assume(sealed.clone()), &secret).unwrap();
            assert_eq!(
                opened.root_key().unwrap().as_bytes(),
                path.root_key().unwrap().as_bytes()
            );
            for other_kem in Kem::ALL {
                let other = HpkeSecret::generate(other_kem, &mut rng);
                assert!(open_path(&Verified::assume(sealed.clone()), &other).is_err());
            }
            // The same secret bytes read as the other KEM's key open nothing either.
            let [first, second] = Kem::ALL;
            let swapped = if kem == first { second } else { first };
            let as_other = HpkeSecret::from_bytes(swapped, *secret.as_bytes());
            assert!(open_path(&Verified::assume(sealed.clone()), &as_other).is_err());
            let mut relabelled = sealed.clone();
            relabelled.kem = swapped;
            assert!(open_path(&Verified::assume(relabelled), &secret).is_err());
            let mut as_resync = sealed.clone();
            as_resync.kind = SealedKind::Resync;
            assert!(open_path(&Verified::assume(as_resync.clone()), &secret).is_err());
            let mut other_member = sealed;
            other_member.member = MemberId(4);
            assert!(open_path(&Verified::assume(other_member.clone()), &secret).is_err());
            assert_eq!(format!("{secret:?}"), format!("HpkeSecret({kem}, ***)"));
        }
    }
}
