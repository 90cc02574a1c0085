//! Every message of the protocol except the rekey datagram: header, registration request and
//! welcome, heartbeat, resync request and response, leave, error, and the group data frame.
//! Byte layouts are specified in `RFC-notes/wire-format.md`.

use std::net::{IpAddr, SocketAddr};

use lkh_tree::{
    Epoch, GroupId, KCV_LEN, KEY_LEN, Kcv, KeyVersion, MAX_DEPTH, MemberPath, NodeId, NodeKey,
    PathKey,
};
use zeroize::Zeroizing;

use crate::codec::{Codec, CountWidth, DecodeError, Reader, put_count};
use crate::sealed::{HpkePublicKey, Kem};

/// Magic bytes that open every message.
pub const MAGIC: [u8; 2] = *b"GK";
/// The protocol version this crate speaks. Version 4 names the KEM of every HPKE key and
/// encapsulation (X-Wing or X25519) and has members present their HPKE key in resync requests.
/// Version 3 made rekey datagrams encrypt-then-sign
/// (32-byte wraps without tags, delta-coded node references, the key check value in every
/// datagram); version 2 put a per-rekey salt into rekey datagrams and every wrap key. Messages of
/// other versions are refused ([`DecodeError::BadVersion`]).
pub const VERSION: u8 = 4;
/// Length of the common header: magic, version, type, group.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 8;
/// Length of a request nonce.
pub const NONCE_LEN: usize = 16;
/// Longest enrollment token.
pub const MAX_TOKEN: usize = 64;
/// Longest error reason, in bytes of UTF-8.
pub const MAX_REASON: usize = 256;
/// Longest group data payload.
pub const MAX_PAYLOAD: usize = 65_000;
/// Length of an encoded path key: node, version, key.
pub const PATH_KEY_LEN: usize = 4 + 8 + KEY_LEN;
/// Longest sealed path: a count byte, 65 path keys, the AEAD tag.
pub const MAX_SEALED: usize = 1 + (MAX_DEPTH + 1) * PATH_KEY_LEN + 16;

/// A member as numbered by the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MemberId(pub u64);

/// The kind of a message (its type byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Member → controller, TCP: registration.
    RegistrationRequest = 1,
    /// Controller → member, TCP: the path keys of a new member.
    Welcome = 2,
    /// Controller → group, UDP multicast: one datagram of a rekey.
    Rekey = 3,
    /// Controller → group: the current epoch and traffic key check value.
    Heartbeat = 4,
    /// Member → controller: a member that missed an epoch asks for its path keys.
    ResyncRequest = 5,
    /// Controller → member: the current path keys.
    ResyncResponse = 6,
    /// Member → controller: a member leaves.
    Leave = 7,
    /// Controller → member: a refusal with a reason.
    Error = 8,
    /// Member → group: application data under the traffic key.
    Data = 9,
    /// Member → controller, UDP: a fan-out subscription (asks for a cookie, or echoes one).
    Subscribe = 10,
    /// Controller → a subscription's source address: the cookie to echo.
    CookieReply = 11,
    /// Controller → member: a request done that needs no keys (a lease renewed, a leave).
    Ack = 12,
    /// Controller → group: the group's next signing key, signed by the current one.
    KeyAnnouncement = 13,
    /// Member → controller: the announcements that lead from a signing key it knows.
    KeyChainRequest = 14,
    /// Controller → member: those announcements.
    KeyChain = 15,
}

impl MessageType {
    fn from_byte(byte: u8) -> Result<Self, DecodeError> {
        Ok(match byte {
            1 => Self::RegistrationRequest,
            2 => Self::Welcome,
            3 => Self::Rekey,
            4 => Self::Heartbeat,
            5 => Self::ResyncRequest,
            6 => Self::ResyncResponse,
            7 => Self::Leave,
            8 => Self::Error,
            9 => Self::Data,
            10 => Self::Subscribe,
            11 => Self::CookieReply,
            12 => Self::Ack,
            13 => Self::KeyAnnouncement,
            14 => Self::KeyChainRequest,
            15 => Self::KeyChain,
            other => return Err(DecodeError::BadType(other)),
        })
    }

    /// The type of the message in `bytes`, from its header, without decoding the rest.
    pub fn peek(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::peek_group(bytes).map(|(ty, _)| ty)
    }

    /// The type of the message in `bytes` and the group its header names, without decoding the
    /// rest (nothing is authenticated yet).
    pub fn peek_group(bytes: &[u8]) -> Result<(Self, GroupId), DecodeError> {
        Header::read_any(&mut Reader::new(bytes))
    }
}

/// The common header: magic, version, type, group.
pub(crate) struct Header;

impl Header {
    pub(crate) fn write(out: &mut Vec<u8>, ty: MessageType, group: GroupId) {
        out.extend_from_slice(&Self::bytes(ty, group));
    }

    /// The header's bytes.
    pub(crate) fn bytes(ty: MessageType, group: GroupId) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2] = VERSION;
        header[3] = ty as u8;
        header[4..].copy_from_slice(&group.0.to_be_bytes());
        header
    }

    fn read_any(reader: &mut Reader<'_>) -> Result<(MessageType, GroupId), DecodeError> {
        if reader.array::<2>("magic")? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = reader.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::BadVersion(version));
        }
        let ty = MessageType::from_byte(reader.u8("type")?)?;
        Ok((ty, GroupId(reader.u64("group")?)))
    }

    /// Reads a header and checks its type is `expected`.
    pub(crate) fn read(
        reader: &mut Reader<'_>,
        expected: MessageType,
    ) -> Result<GroupId, DecodeError> {
        let (ty, group) = Self::read_any(reader)?;
        if ty != expected {
            return Err(DecodeError::BadType(ty as u8));
        }
        Ok(group)
    }
}

pub(crate) fn node_id(reader: &mut Reader<'_>, what: &'static str) -> Result<NodeId, DecodeError> {
    let id = reader.u32(what)?;
    if id >= NodeId::LIMIT {
        return Err(DecodeError::Invalid(what));
    }
    Ok(NodeId(id))
}

/// Member → controller: asks to join `group`. Signed by the member's identity key, which it also
/// carries; fresh by its timestamp and nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationRequest {
    /// The group to join.
    pub group: GroupId,
    /// The member's Ed25519 identity public key (also the key that signs this request).
    pub identity: [u8; 32],
    /// The member's HPKE public key (X-Wing or X25519), to which the welcome is sealed.
    pub hpke_key: HpkePublicKey,
    /// Milliseconds since the Unix epoch when the request was made.
    pub timestamp_ms: u64,
    /// A random nonce; the controller refuses a nonce seen before.
    pub nonce: [u8; NONCE_LEN],
    /// A single-use enrollment token (empty when the identity is on the allow list).
    pub token: Vec<u8>,
}

impl Codec for RegistrationRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::RegistrationRequest, self.group);
        out.extend_from_slice(&self.identity);
        self.hpke_key.write(out);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        put_count(out, CountWidth::U8, self.token.len());
        out.extend_from_slice(&self.token);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::RegistrationRequest)?;
        let identity = r.array("identity key")?;
        let hpke_key = HpkePublicKey::read(r)?;
        let timestamp_ms = r.u64("timestamp")?;
        let nonce = r.array("nonce")?;
        let len = r.count(CountWidth::U8, 1, MAX_TOKEN, "token length")?;
        let token = r.take(len, "token")?.to_vec();
        Ok(RegistrationRequest {
            group,
            identity,
            hpke_key,
            timestamp_ms,
            nonce,
            token,
        })
    }
}

/// Whether a sealed path answers a registration or a resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedKind {
    /// A welcome (type 2).
    Welcome,
    /// A resync response (type 6).
    Resync,
}

impl SealedKind {
    fn message_type(self) -> MessageType {
        match self {
            SealedKind::Welcome => MessageType::Welcome,
            SealedKind::Resync => MessageType::ResyncResponse,
        }
    }
}

/// Controller → member: the member's path keys sealed to its HPKE key (RFC 9180, see
/// [`crate::seal_path`]), signed by the controller, naming the KEM it was sealed under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedPath {
    /// Welcome or resync response.
    pub kind: SealedKind,
    /// The group.
    pub group: GroupId,
    /// The member's id at the controller.
    pub member: MemberId,
    /// The epoch of the keys.
    pub epoch: Epoch,
    /// The nonce of the request this answers.
    pub request_nonce: [u8; NONCE_LEN],
    /// The KEM of the member's key, under which the path is sealed.
    pub kem: Kem,
    /// The HPKE encapsulated key (the KEM's length).
    pub encapped: Vec<u8>,
    /// Where the controller multicasts the group's rekeys and heartbeats (as its config says),
    /// so that a member need not be told; `None` when it does not say.
    pub rekey_address: Option<SocketAddr>,
    /// The HPKE ciphertext of a [`PathKeys`] encoding.
    pub ciphertext: Vec<u8>,
}

impl SealedPath {
    /// Decodes a welcome or a resync response.
    pub fn decode_either(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (ty, group) = Header::read_any(r)?;
        let kind = match ty {
            MessageType::Welcome => SealedKind::Welcome,
            MessageType::ResyncResponse => SealedKind::Resync,
            other => return Err(DecodeError::BadType(other as u8)),
        };
        let member = MemberId(r.u64("member id")?);
        let epoch = Epoch(r.u64("epoch")?);
        let request_nonce = r.array("request nonce")?;
        let kem = Kem::read(r)?;
        let encapped = r.take(kem.encapped_len(), "encapsulated key")?.to_vec();
        let rekey_address = read_address(r)?;
        let len = usize::from(r.u16("ciphertext length")?);
        if len > MAX_SEALED {
            return Err(DecodeError::TooLong {
                field: "ciphertext length",
                value: len,
                limit: MAX_SEALED,
            });
        }
        let ciphertext = r.take(len, "ciphertext")?.to_vec();
        Ok(SealedPath {
            kind,
            group,
            member,
            epoch,
            request_nonce,
            kem,
            encapped,
            rekey_address,
            ciphertext,
        })
    }
}

/// An optional socket address: a family byte (0: none, 4: IPv4, 6: IPv6), then the address
/// (4 or 16 bytes) and the port (2 bytes).
fn write_address(out: &mut Vec<u8>, address: Option<SocketAddr>) {
    match address {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

fn read_address(r: &mut Reader<'_>) -> Result<Option<SocketAddr>, DecodeError> {
    let ip = match r.u8("rekey address family")? {
        0 => return Ok(None),
        4 => IpAddr::from(r.array::<4>("rekey address")?),
        6 => IpAddr::from(r.array::<16>("rekey address")?),
        _ => {
            return Err(DecodeError::Invalid(
                "rekey address family is not 0, 4 or 6",
            ));
        }
    };
    Ok(Some(SocketAddr::new(ip, r.u16("rekey port")?)))
}

impl Codec for SealedPath {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, self.kind.message_type(), self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
        out.extend_from_slice(&self.request_nonce);
        out.extend_from_slice(&self.kem.id().to_be_bytes());
        out.extend_from_slice(&self.encapped);
        write_address(out, self.rekey_address);
        put_count(out, CountWidth::U16, self.ciphertext.len());
        out.extend_from_slice(&self.ciphertext);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Self::decode_either(r)
    }
}

/// The plaintext inside a [`SealedPath`]: the member's keys, leaf first, root last.
pub struct PathKeys;

impl PathKeys {
    /// Encodes a member's path into a buffer that is zeroized on drop.
    pub fn encode(path: &MemberPath) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(1 + path.keys().len() * PATH_KEY_LEN));
        put_count(&mut out, CountWidth::U8, path.keys().len());
        for key in path.keys() {
            out.extend_from_slice(&key.node.0.to_be_bytes());
            out.extend_from_slice(&key.version.0.to_be_bytes());
            out.extend_from_slice(key.key.as_bytes());
        }
        out
    }

    /// Decodes and checks a path (see [`MemberPath::from_keys`]).
    pub fn decode(group: GroupId, epoch: Epoch, bytes: &[u8]) -> Result<MemberPath, DecodeError> {
        let mut r = Reader::new(bytes);
        let count = r.count(CountWidth::U8, PATH_KEY_LEN, MAX_DEPTH + 1, "path length")?;
        let mut keys = Vec::with_capacity(count);
        for _ in 0..count {
            let node = node_id(&mut r, "path node")?;
            let version = KeyVersion(r.u64("key version")?);
            let key = Zeroizing::new(r.array::<KEY_LEN>("path key")?);
            keys.push(PathKey {
                node,
                version,
                key: NodeKey::from_bytes(*key),
            });
        }
        r.finish()?;
        MemberPath::from_keys(group, epoch, keys).map_err(|_| DecodeError::Invalid("member path"))
    }
}

/// Controller → group: the current epoch and the check value of its traffic key, so a member
/// that missed a rekey notices. Signed; fresh by its timestamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The group.
    pub group: GroupId,
    /// The current epoch.
    pub epoch: Epoch,
    /// Check value of the current traffic key.
    pub kcv: Kcv,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl Codec for Heartbeat {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Heartbeat, self.group);
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
        out.extend_from_slice(&self.kcv.0);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Heartbeat)?;
        let epoch = Epoch(r.u64("epoch")?);
        let kcv = Kcv(r.array::<KCV_LEN>("key check value")?);
        let timestamp_ms = r.u64("timestamp")?;
        Ok(Heartbeat {
            group,
            epoch,
            kcv,
            timestamp_ms,
        })
    }
}

/// Member → controller: asks for its current path keys after missing an epoch. Signed by the
/// member's identity key; fresh by timestamp and nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncRequest {
    /// The group.
    pub group: GroupId,
    /// The member's id.
    pub member: MemberId,
    /// The last epoch the member holds.
    pub epoch: Epoch,
    /// The check value of the traffic key the member holds for `epoch`: a member whose keys are
    /// not the controller's for that epoch gets its path, not an acknowledgement.
    pub kcv: Kcv,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// A random nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The member's HPKE public key, to which a path is sealed: the controller keeps only its
    /// digest and refuses a key that does not match it.
    pub hpke_key: HpkePublicKey,
}

impl Codec for ResyncRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::ResyncRequest, self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
        out.extend_from_slice(&self.kcv.0);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        self.hpke_key.write(out);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::ResyncRequest)?;
        let member = MemberId(r.u64("member id")?);
        let epoch = Epoch(r.u64("epoch")?);
        let kcv = Kcv(r.array("key check value")?);
        let timestamp_ms = r.u64("timestamp")?;
        let nonce = r.array("nonce")?;
        let hpke_key = HpkePublicKey::read(r)?;
        Ok(ResyncRequest {
            group,
            member,
            epoch,
            kcv,
            timestamp_ms,
            nonce,
            hpke_key,
        })
    }
}

/// Member → controller: the member leaves. Signed by its identity key; fresh by timestamp and
/// nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaveRequest {
    /// The group.
    pub group: GroupId,
    /// The member's id.
    pub member: MemberId,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// A random nonce.
    pub nonce: [u8; NONCE_LEN],
}

impl Codec for LeaveRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Leave, self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&self.nonce);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Leave)?;
        let member = MemberId(r.u64("member id")?);
        let timestamp_ms = r.u64("timestamp")?;
        let nonce = r.array("nonce")?;
        Ok(LeaveRequest {
            group,
            member,
            timestamp_ms,
            nonce,
        })
    }
}

/// Why the controller refused a request: the code of an [`ErrorMessage`], numbered as HTTP's.
/// A code this crate does not know (from a later release) decodes as [`Status::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 400: not a well-formed request, or a key no path can be sealed to.
    Malformed,
    /// 401: a signature that does not verify (a registration's; for a member's request the
    /// answer is [`Status::NotAMember`], so that no one learns who is a member).
    BadSignature,
    /// 403: the identity is not allowed (not listed, banned, or its token spent).
    Unauthorized,
    /// 404: the request names no current member of the group (departed, or never one).
    NotAMember,
    /// 405: a message kind a controller does not accept.
    UnexpectedMessage,
    /// 406: the group's policy does not accept the KEM of the member's HPKE key; the reason
    /// names the KEMs it accepts (`accepts: x25519`).
    KemNotAccepted,
    /// 409: outside the freshness window, or a replay.
    Stale,
    /// 412: the signing key a member named is not one the group's chain of announcements
    /// reaches (never the group's, or older than the announcements the controller keeps): the
    /// member must be given the controller's current key (re-provisioned).
    SigningKeyUnknown,
    /// 410: the controller has no such group (removed, or never configured).
    UnknownGroup,
    /// 421: this controller does not lead the group (high availability); the reason is the
    /// leader's request address (`ip:port`) when the controller knows it, else empty. Ask the
    /// leader, or the next controller the member knows.
    NotLeader,
    /// 429: too many requests; ask again later.
    RateLimited,
    /// 503: the controller cannot make the change durable now; ask again later.
    Unavailable,
    /// 507: the group is full.
    GroupFull,
    /// A code this release does not know.
    Other(u16),
}

impl Status {
    /// The code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Status::Malformed => 400,
            Status::BadSignature => 401,
            Status::Unauthorized => 403,
            Status::NotAMember => 404,
            Status::UnexpectedMessage => 405,
            Status::KemNotAccepted => 406,
            Status::Stale => 409,
            Status::SigningKeyUnknown => 412,
            Status::UnknownGroup => 410,
            Status::NotLeader => 421,
            Status::RateLimited => 429,
            Status::Unavailable => 503,
            Status::GroupFull => 507,
            Status::Other(code) => code,
        }
    }

    /// The status of a code (0 is not one: an acknowledgement is an [`Ack`]).
    pub fn from_code(code: u16) -> Result<Status, DecodeError> {
        Ok(match code {
            0 => {
                return Err(DecodeError::Invalid(
                    "error code 0 (an acknowledgement is an Ack)",
                ));
            }
            400 => Status::Malformed,
            401 => Status::BadSignature,
            403 => Status::Unauthorized,
            404 => Status::NotAMember,
            405 => Status::UnexpectedMessage,
            406 => Status::KemNotAccepted,
            409 => Status::Stale,
            412 => Status::SigningKeyUnknown,
            410 => Status::UnknownGroup,
            421 => Status::NotLeader,
            429 => Status::RateLimited,
            503 => Status::Unavailable,
            507 => Status::GroupFull,
            other => Status::Other(other),
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Controller → member over the registration connection: why a request was refused. Unsigned
/// and advisory: a member never changes keys because of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorMessage {
    /// The group.
    pub group: GroupId,
    /// Why.
    pub status: Status,
    /// A human-readable reason (UTF-8, at most 256 bytes).
    pub reason: String,
}

impl Codec for ErrorMessage {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Error, self.group);
        out.extend_from_slice(&self.status.code().to_be_bytes());
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = self.reason.get(..end).unwrap_or_default();
        put_count(out, CountWidth::U16, reason.len());
        out.extend_from_slice(reason.as_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Error)?;
        let status = Status::from_code(r.u16("error code")?)?;
        let len = r.count(CountWidth::U16, 1, MAX_REASON, "reason length")?;
        let reason = std::str::from_utf8(r.take(len, "reason")?)
            .map_err(|_| DecodeError::Invalid("reason is not UTF-8"))?
            .to_owned();
        Ok(ErrorMessage {
            group,
            status,
            reason,
        })
    }
}

/// What an [`Ack`] acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acked {
    /// A resync at the current epoch and keys: the member's lease was renewed.
    LeaseRenewed = 1,
    /// A leave: the member departs with the next rekey.
    Left = 2,
}

/// Controller → member over the registration connection: a request done that needs no keys.
/// Unsigned and advisory, as an [`ErrorMessage`]: it only tells the member when to ask next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The group.
    pub group: GroupId,
    /// The member.
    pub member: MemberId,
    /// What was done.
    pub acked: Acked,
    /// The nonce of the request acknowledged.
    pub request_nonce: [u8; NONCE_LEN],
    /// The controller's epoch.
    pub epoch: Epoch,
}

impl Codec for Ack {
    fn encode(&self, out: &mut Vec<u8>) {
        Header::write(out, MessageType::Ack, self.group);
        out.extend_from_slice(&self.member.0.to_be_bytes());
        out.push(self.acked as u8);
        out.extend_from_slice(&self.request_nonce);
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Ack)?;
        let member = MemberId(r.u64("member id")?);
        let acked = match r.u8("acknowledged request")? {
            1 => Acked::LeaseRenewed,
            2 => Acked::Left,
            _ => return Err(DecodeError::Invalid("acknowledged request")),
        };
        let request_nonce = r.array("request nonce")?;
        let epoch = Epoch(r.u64("epoch")?);
        Ok(Ack {
            group,
            member,
            acked,
            request_nonce,
            epoch,
        })
    }
}

/// Member → group: application data encrypted under the epoch's traffic key (see
/// [`crate::data`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFrame {
    /// The group.
    pub group: GroupId,
    /// The epoch whose traffic key encrypts it.
    pub epoch: Epoch,
    /// The sender, unique among the group's senders.
    pub sender: u32,
    /// The sender's sequence number in this epoch; never repeats.
    pub seq: u64,
    /// Ciphertext and 16-byte tag.
    pub ciphertext: Vec<u8>,
}

impl DataFrame {
    /// Bytes of the frame up to the ciphertext length: the associated data of its AEAD.
    pub(crate) fn associated_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 20);
        Header::write(&mut out, MessageType::Data, self.group);
        out.extend_from_slice(&self.epoch.0.to_be_bytes());
        out.extend_from_slice(&self.sender.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out
    }
}

impl Codec for DataFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.associated_data());
        put_count(out, CountWidth::U16, self.ciphertext.len());
        out.extend_from_slice(&self.ciphertext);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let group = Header::read(r, MessageType::Data)?;
        let epoch = Epoch(r.u64("epoch")?);
        let sender = r.u32("sender")?;
        let seq = r.u64("sequence number")?;
        let len = r.count(CountWidth::U16, 1, MAX_PAYLOAD + 16, "ciphertext length")?;
        if len < 16 {
            return Err(DecodeError::Invalid("ciphertext shorter than its tag"));
        }
        let ciphertext = r.take(len, "ciphertext")?.to_vec();
        Ok(DataFrame {
            group,
            epoch,
            sender,
            seq,
            ciphertext,
        })
    }
}
