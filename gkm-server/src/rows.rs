//! The stored form of group states, shared by the stores (`DiskStore`, `PgStore`): the records
//! of a state or delta cut into rows, each row sealed with ChaCha20-Poly1305 under the storage
//! key, and a head naming the runs of rows that hold a group's state.
//!
//! A row's plaintext is a sequence of records (a tag byte, then fixed-size fields, big-endian):
//! the base record (group, tree parameters, epoch) first in a state, then tree nodes, members,
//! spent tokens and bans; a delta begins with its epoch and lists what was removed before what
//! was added or changed. A row is cut once it holds [`ROW_BYTES`]. Sealed, it is
//! nonce (12, random) ‖ ciphertext ‖ tag (16), and its associated data names the row: the label of
//! its table, the group and the sequence number, so that rows cannot be moved between tables,
//! groups or positions. The store itself never sees a key: only sealed bytes leave this module.

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use lkh_tree::{Epoch, GroupId, KeyVersion, NodeId, NodeKey, NodeRecord, Strategy, TreeConfig};
use wire::{ANNOUNCEMENT_LEN, HpkePublicKey, Kem, MemberId};
use zeroize::Zeroizing;

use crate::policy::Timestamp;
use crate::signing::{SigningKeyRecord, append_signing_key};
use crate::store::{GroupDelta, GroupRecords, GroupState, HpkeDigest, MemberRecord, StoreError};

pub(crate) const LOG_LABEL: &[u8] = b"gkm v2 log row";
pub(crate) const BASE_LABEL: &[u8] = b"gkm v2 base row";
const HEAD_LABEL: &[u8] = b"gkm v2 head";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Plaintext bytes after which a row is cut. A row ends at most one record (< 128 bytes) past it,
/// so a sealed row stays under 256 KiB: redb allocates large values in power-of-two pages, and a
/// row just over 256 KiB would take 512.
pub(crate) const ROW_BYTES: usize = 256 * 1024 - 256;
/// Rows a compaction writes per transaction (about 4 MiB).
pub(crate) const COMPACTION_ROWS: usize = 16;
/// Records that fit one compaction transaction whatever their kind (a member record, the
/// largest, is 95 bytes): about 43,000.
pub(crate) const ONE_TRANSACTION_RECORDS: usize = COMPACTION_ROWS * (ROW_BYTES / 96);
/// Most tree nodes or members one stored group may hold (2^25).
pub const MAX_RECORDS: usize = 1 << 25;

const BASE: u8 = 1;
pub(crate) const EPOCH: u8 = 2;
pub(crate) const NODE: u8 = 3;
const NODE_GONE: u8 = 4;
const MEMBER: u8 = 5;
const MEMBER_GONE: u8 = 6;
const SPENT: u8 = 7;
const BANNED: u8 = 8;
const UNBANNED: u8 = 9;
/// A member with its HPKE key's KEM and digest (written since wire version 4; [`MEMBER`]
/// records, which held an X25519 key, are still read).
const MEMBER_KEM: u8 = 10;
/// A replacement signing key: whether its seed follows, the seed, its signed announcement.
const SIGNING_KEY: u8 = 11;
const NO_PARENT: u32 = u32::MAX;

/// The sequence numbers `first..next` of a run of rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) first: u64,
    pub(crate) next: u64,
}

impl Span {
    pub(crate) fn empty_at(seq: u64) -> Span {
        Span {
            first: seq,
            next: seq,
        }
    }

    pub(crate) fn is_empty(self) -> bool {
        self.first == self.next
    }

    /// Rows in the run.
    pub(crate) fn len(self) -> u64 {
        self.next.saturating_sub(self.first)
    }
}

/// Which rows hold a group's state: its full state in `gkm bases`, then the deltas in `gkm log`.
/// An empty base run means a file of the earlier layout, whose log begins with the full state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) base: Span,
    pub(crate) log: Span,
}

/// The storage key's cipher, and how rows and heads are sealed with it.
#[derive(Clone)]
pub(crate) struct Sealer(ChaCha20Poly1305);

impl Sealer {
    /// The cipher of the storage key `key`.
    pub(crate) fn new(key: &[u8; 32]) -> Sealer {
        Sealer(ChaCha20Poly1305::new(&(*key).into()))
    }

    /// nonce (12) ‖ ciphertext ‖ tag (16).
    pub(crate) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::Backend(format!("the OS random source failed: {e}")))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .0
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                aad,
                out.get_mut(NONCE_LEN..).unwrap_or_default().into(),
            )
            .map_err(|_| StoreError::Backend("row too large to seal".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    fn unseal(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, rest) = sealed.split_first_chunk::<NONCE_LEN>()?;
        let (body, tag) = rest.split_at(rest.len().checked_sub(TAG_LEN)?);
        let tag = Tag::try_from(tag).ok()?;
        let mut plain = Zeroizing::new(body.to_vec());
        self.0
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, plain.as_mut_slice().into(), &tag)
            .ok()?;
        Some(plain)
    }

    /// Seals `plain` as row `seq` of the group in the table labelled `label`.
    pub(crate) fn seal_row(
        &self,
        label: &[u8],
        group: GroupId,
        seq: u64,
        plain: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        self.seal(&row_aad(label, group, seq), plain)
    }

    /// The plaintext of row `seq` of the group in the table labelled `label`.
    pub(crate) fn open_row(
        &self,
        label: &[u8],
        group: GroupId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.unseal(&row_aad(label, group, seq), sealed)
            .ok_or_else(|| {
                corrupt(
                    group,
                    &format!("row {seq} does not authenticate (wrong storage.key, or altered)"),
                )
            })
    }

    /// Seals the group's head.
    pub(crate) fn seal_head(&self, group: GroupId, head: Head) -> Result<Vec<u8>, StoreError> {
        self.seal(&head_aad(group), &encode_head(head))
    }

    /// The group's head, authenticated and decoded.
    pub(crate) fn open_head(&self, group: GroupId, sealed: &[u8]) -> Result<Head, StoreError> {
        let plain = self.unseal(&head_aad(group), sealed).ok_or_else(|| {
            corrupt(
                group,
                "head does not authenticate (wrong storage.key, or altered)",
            )
        })?;
        decode_head(&plain).ok_or_else(|| corrupt(group, "head does not decode"))
    }

    /// Row `seq` of the group in the table labelled `label`, opened under this key and sealed
    /// again under `new`'s (with a fresh nonce, the same associated data): what a rotation of
    /// the storage key does to every row.
    pub(crate) fn reseal_row(
        &self,
        new: &Sealer,
        label: &[u8],
        group: GroupId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let plain = self.open_row(label, group, seq, sealed)?;
        new.seal_row(label, group, seq, &plain)
    }
}

/// One record of a stored state or delta.
pub(crate) enum Record<'a> {
    Base(&'a GroupState),
    Epoch(Epoch),
    Node(&'a NodeRecord),
    NodeGone(NodeId),
    Member(&'a MemberRecord),
    MemberGone(NodeId),
    /// An enrollment token's digest, spent.
    Spent(&'a [u8; 32]),
    /// An identity banned.
    Banned(&'a [u8; 32]),
    /// An identity no longer banned.
    Unbanned(&'a [u8; 32]),
    /// A replacement signing key, with its seed when the flag says so (only the current key's
    /// is written in a full state).
    SigningKey(&'a SigningKeyRecord, bool),
}

impl Record<'_> {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Record::Base(state) => encode_base(out, state),
            Record::Epoch(epoch) => {
                out.push(EPOCH);
                out.extend_from_slice(&epoch.0.to_be_bytes());
            }
            Record::Node(node) => encode_node(out, node),
            Record::NodeGone(id) => {
                out.push(NODE_GONE);
                out.extend_from_slice(&id.0.to_be_bytes());
            }
            Record::Member(member) => encode_member(out, member),
            Record::MemberGone(leaf) => {
                out.push(MEMBER_GONE);
                out.extend_from_slice(&leaf.0.to_be_bytes());
            }
            Record::Spent(digest) => {
                out.push(SPENT);
                out.extend_from_slice(*digest);
            }
            Record::Banned(identity) => {
                out.push(BANNED);
                out.extend_from_slice(*identity);
            }
            Record::Unbanned(identity) => {
                out.push(UNBANNED);
                out.extend_from_slice(*identity);
            }
            Record::SigningKey(record, with_seed) => {
                out.push(SIGNING_KEY);
                match record.seed.as_ref().filter(|_| *with_seed) {
                    Some(seed) => {
                        out.push(1);
                        out.extend_from_slice(seed.as_slice());
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&record.announcement);
            }
        }
    }
}

/// The rows (plaintexts) of a full state: the base record, the nodes, the members.
pub(crate) fn state_rows(state: &GroupState) -> impl Iterator<Item = Zeroizing<Vec<u8>>> + '_ {
    let records = std::iter::once(Record::Base(state))
        .chain(state.tree.nodes.iter().map(Record::Node))
        .chain(state.members.iter().map(Record::Member))
        .chain(state.enrollment.spent.iter().map(Record::Spent))
        .chain(state.enrollment.banned.iter().map(Record::Banned))
        .chain(signing_records(&state.signing));
    cut_rows(records)
}

/// The rows (plaintexts) of a delta: its epoch, what was removed, what was added or changed.
pub(crate) fn delta_rows(delta: &GroupDelta) -> impl Iterator<Item = Zeroizing<Vec<u8>>> + '_ {
    let records = std::iter::once(Record::Epoch(delta.epoch))
        .chain(delta.tree.removed.iter().map(|&id| Record::NodeGone(id)))
        .chain(delta.removed_members.iter().map(|&l| Record::MemberGone(l)))
        .chain(delta.tree.changed.iter().map(Record::Node))
        .chain(delta.members.iter().map(Record::Member))
        .chain(delta.enrollment.spent.iter().map(Record::Spent))
        .chain(delta.enrollment.banned.iter().map(Record::Banned))
        .chain(delta.enrollment.unbanned.iter().map(Record::Unbanned))
        .chain(signing_records(&delta.signing));
    cut_rows(records)
}

/// The records of a chain of signing keys: the seed with the last only.
fn signing_records(chain: &[SigningKeyRecord]) -> impl Iterator<Item = Record<'_>> {
    let last = chain.len().saturating_sub(1);
    chain
        .iter()
        .enumerate()
        .map(move |(i, r)| Record::SigningKey(r, i == last))
}

/// Encodes `records` into rows, each cut once it holds [`ROW_BYTES`].
fn cut_rows<'a>(
    records: impl Iterator<Item = Record<'a>>,
) -> impl Iterator<Item = Zeroizing<Vec<u8>>> {
    let mut records = records.peekable();
    std::iter::from_fn(move || {
        records.peek()?;
        let mut row = Zeroizing::new(Vec::with_capacity(ROW_BYTES + 128));
        while row.len() < ROW_BYTES {
            let Some(record) = records.next() else { break };
            record.encode(&mut row);
        }
        Some(row)
    })
}

pub(crate) fn corrupt(group: GroupId, what: &str) -> StoreError {
    StoreError::Corrupt(format!("group {group}: {what}"))
}

fn row_aad(label: &[u8], group: GroupId, seq: u64) -> Vec<u8> {
    let mut aad = label.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

pub(crate) fn head_aad(group: GroupId) -> Vec<u8> {
    let mut aad = HEAD_LABEL.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad
}

/// base run, log run (32 bytes).
pub(crate) fn encode_head(head: Head) -> Vec<u8> {
    [
        head.base.first,
        head.base.next,
        head.log.first,
        head.log.next,
    ]
    .iter()
    .flat_map(|n| n.to_be_bytes())
    .collect()
}

/// A head: base run and log run (32 bytes), or only the log run (16 bytes, the earlier layout).
/// Either run may be empty, not both; with no base run, the log begins with the state.
fn decode_head(bytes: &[u8]) -> Option<Head> {
    let mut r = Reader(bytes);
    let mut span = || -> Option<Span> {
        let span = Span {
            first: r.u64().ok()?,
            next: r.u64().ok()?,
        };
        (span.first <= span.next).then_some(span)
    };
    let head = match bytes.len() {
        16 => Head {
            base: Span::empty_at(0),
            log: span()?,
        },
        32 => Head {
            base: span()?,
            log: span()?,
        },
        _ => return None,
    };
    (!head.base.is_empty() || !head.log.is_empty()).then_some(head)
}

pub(crate) fn encode_base(out: &mut Vec<u8>, state: &GroupState) {
    let t = &state.tree;
    out.push(BASE);
    out.extend_from_slice(&t.group.0.to_be_bytes());
    out.push(t.config.degree);
    out.push(match t.config.strategy {
        Strategy::Key => 1,
        Strategy::User => 2,
        _ => 0,
    });
    out.push(u8::from(t.config.hash_forward_joins));
    out.push(u8::from(t.config.one_way));
    out.extend_from_slice(&t.epoch.0.to_be_bytes());
}

pub(crate) fn encode_node(out: &mut Vec<u8>, n: &NodeRecord) {
    out.push(NODE);
    out.extend_from_slice(&n.id.0.to_be_bytes());
    out.extend_from_slice(&n.parent.map_or(NO_PARENT, |p| p.0).to_be_bytes());
    out.push(u8::from(n.leaf));
    out.extend_from_slice(&n.version.0.to_be_bytes());
    out.extend_from_slice(n.key.as_bytes());
}

pub(crate) fn encode_member(out: &mut Vec<u8>, m: &MemberRecord) {
    out.push(MEMBER_KEM);
    out.extend_from_slice(&m.id.0.to_be_bytes());
    out.extend_from_slice(&m.identity);
    out.extend_from_slice(&m.hpke.kem.id().to_be_bytes());
    out.extend_from_slice(&m.hpke.digest);
    out.extend_from_slice(&m.leaf.0.to_be_bytes());
    out.extend_from_slice(&m.joined.to_be_bytes());
    out.extend_from_slice(&m.lease_until.0.to_be_bytes());
}

/// Applies the records of one row. `base` says whether this is the group's first row, which must
/// begin with the base record (and only it may).
pub(crate) fn replay(
    records: &mut Option<GroupRecords>,
    base: bool,
    plain: &[u8],
) -> Result<(), String> {
    let mut r = Reader(plain);
    if base {
        if r.u8()? != BASE {
            return Err("the first row does not begin with the base record".into());
        }
        *records = Some(decode_base(&mut r)?);
    }
    let records = records
        .as_mut()
        .ok_or_else(|| "a row before the base".to_owned())?;
    while !r.0.is_empty() {
        match r.u8()? {
            EPOCH => {
                let epoch = Epoch(r.u64()?);
                if epoch < records.epoch {
                    return Err(format!("epoch {epoch} goes back from {}", records.epoch));
                }
                records.epoch = epoch;
            }
            NODE => {
                let node = decode_node(&mut r)?;
                records.nodes.insert(node.id, node);
            }
            NODE_GONE => {
                records.nodes.remove(&NodeId(r.u32()?));
            }
            tag @ (MEMBER | MEMBER_KEM) => {
                let member = decode_member(&mut r, tag == MEMBER_KEM)?;
                records.members.insert(member.leaf, member);
            }
            MEMBER_GONE => {
                records.members.remove(&NodeId(r.u32()?));
            }
            SPENT => {
                records.enrollment.spent.insert(r.take()?);
            }
            BANNED => {
                records.enrollment.banned.insert(r.take()?);
            }
            UNBANNED => {
                records.enrollment.banned.remove(&r.take::<32>()?);
            }
            SIGNING_KEY => {
                let record = decode_signing_key(&mut r)?;
                append_signing_key(&mut records.signing, record);
            }
            tag => return Err(format!("unknown record {tag}")),
        }
        if records.nodes.len() > MAX_RECORDS
            || records.members.len() > MAX_RECORDS
            || records.enrollment.len() > MAX_RECORDS
        {
            return Err(format!("more than {MAX_RECORDS} records"));
        }
    }
    Ok(())
}

fn decode_signing_key(r: &mut Reader<'_>) -> Result<SigningKeyRecord, String> {
    let seed = match r.u8()? {
        0 => None,
        1 => Some(Zeroizing::new(r.take::<32>()?)),
        flag => return Err(format!("signing key record with seed flag {flag}")),
    };
    let announcement = r.take::<ANNOUNCEMENT_LEN>()?;
    SigningKeyRecord::parse(announcement, seed)
        .ok_or_else(|| "a signing key's announcement does not decode".to_owned())
}

fn decode_base(r: &mut Reader<'_>) -> Result<GroupRecords, String> {
    let group = GroupId(r.u64()?);
    let degree = r.u8()?;
    let strategy = match r.u8()? {
        0 => Strategy::Group,
        1 => Strategy::Key,
        2 => Strategy::User,
        s => return Err(format!("unknown strategy {s}")),
    };
    let config = TreeConfig {
        degree,
        strategy,
        hash_forward_joins: r.bool()?,
        one_way: r.bool()?,
    };
    Ok(GroupRecords {
        group,
        config,
        epoch: Epoch(r.u64()?),
        nodes: std::collections::BTreeMap::new(),
        members: std::collections::BTreeMap::new(),
        enrollment: crate::store::EnrollmentRecords::default(),
        signing: Vec::new(),
    })
}

fn decode_node(r: &mut Reader<'_>) -> Result<NodeRecord, String> {
    Ok(NodeRecord {
        id: NodeId(r.u32()?),
        parent: match r.u32()? {
            NO_PARENT => None,
            p => Some(NodeId(p)),
        },
        leaf: r.bool()?,
        version: KeyVersion(r.u64()?),
        key: NodeKey::from_bytes(r.take::<32>()?),
    })
}

/// A member record; `with_kem` for [`MEMBER_KEM`], else a [`MEMBER`] record, whose X25519 key
/// is read as its digest.
fn decode_member(r: &mut Reader<'_>, with_kem: bool) -> Result<MemberRecord, String> {
    let id = MemberId(r.u64()?);
    let identity = r.take()?;
    let hpke = if with_kem {
        let id = u16::from_be_bytes(r.take()?);
        HpkeDigest {
            kem: Kem::from_id(id).ok_or_else(|| format!("unknown KEM {id:#06x}"))?,
            digest: r.take()?,
        }
    } else {
        let key =
            HpkePublicKey::new(Kem::X25519, r.take::<32>()?.to_vec()).map_err(|e| e.to_string())?;
        HpkeDigest::of(&key)
    };
    let member = MemberRecord {
        id,
        identity,
        hpke,
        leaf: NodeId(r.u32()?),
        joined: r.u64()?,
        lease_until: Timestamp(r.u64()?),
    };
    if member.id.0 >> 32 != u64::from(member.leaf.0) {
        return Err(format!(
            "member {} is not at leaf {}",
            member.id.0, member.leaf
        ));
    }
    Ok(member)
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| "truncated".to_owned())?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.take()?))
    }
    fn bool(&mut self) -> Result<bool, String> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("bad flag {b}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lkh_tree::{NodeId, TreeConfig};
    use wire::MemberId;

    fn member(leaf: NodeId, joined: u64) -> MemberRecord {
        MemberRecord {
            id: MemberId((u64::from(leaf.0) << 32) | joined),
            identity: [u8::try_from(leaf.0 % 251).unwrap(); 32],
            hpke: HpkeDigest {
                kem: Kem::XWing,
                digest: [2; 32],
            },
            leaf,
            joined,
            lease_until: Timestamp(99),
        }
    }

    /// A row holding only the base record of an empty group 1 at epoch 3.
    fn base_row() -> Vec<u8> {
        let mut row = Vec::new();
        encode_base(
            &mut row,
            &GroupState {
                tree: lkh_tree::TreeSnapshot {
                    group: GroupId(1),
                    config: TreeConfig::default(),
                    epoch: Epoch(3),
                    nodes: Vec::new(),
                },
                members: Vec::new(),
                enrollment: Default::default(),
                signing: Vec::new(),
            },
        );
        row
    }

    #[test]
    fn v036_a_bad_record_in_an_authentic_row_is_an_error() {
        let mut records = None;
        assert!(replay(&mut records, false, &[NODE]).is_err(), "no base");
        let base = base_row();
        for cut in 0..base.len() {
            assert!(replay(&mut None, true, &base[..cut]).is_err(), "cut {cut}");
        }
        let mut bad = base.clone();
        bad.extend_from_slice(&[EPOCH, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("goes back")
        );
        let mut bad = base.clone();
        bad.push(99);
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("unknown record")
        );
        let mut bad = base;
        encode_member(
            &mut bad,
            &MemberRecord {
                leaf: NodeId(9),
                ..member(NodeId(8), 1)
            },
        );
        assert!(
            replay(&mut None, true, &bad)
                .unwrap_err()
                .contains("not at leaf")
        );
    }

    /// A store written before wire version 4 holds each member's X25519 key; it reads as that
    /// key's digest, so the member's next resync (which presents the key) is answered.
    #[test]
    fn a_member_record_with_an_x25519_key_reads_as_its_digest() {
        let mut records = None;
        let mut row = base_row();
        let old = member(NodeId(8), 1);
        row.push(MEMBER);
        row.extend_from_slice(&old.id.0.to_be_bytes());
        row.extend_from_slice(&old.identity);
        row.extend_from_slice(&[0x09; 32]);
        row.extend_from_slice(&old.leaf.0.to_be_bytes());
        row.extend_from_slice(&old.joined.to_be_bytes());
        row.extend_from_slice(&old.lease_until.0.to_be_bytes());
        replay(&mut records, true, &row).unwrap();
        let read = records.as_ref().unwrap().members[&NodeId(8)].clone();
        let key = HpkePublicKey::new(Kem::X25519, vec![0x09; 32]).unwrap();
        assert!(read.hpke.matches(&key));
        assert_eq!(read.hpke.kem, Kem::X25519);

        let mut now = Vec::new();
        encode_member(&mut now, &old);
        let mut replayed = records.clone();
        replay(&mut replayed, false, &now).unwrap();
        assert_eq!(replayed.unwrap().members[&NodeId(8)], old);
        let mut unknown = now;
        unknown[1 + 8 + 32..1 + 8 + 32 + 2].copy_from_slice(&[0, 0x10]);
        assert!(
            replay(&mut records, false, &unknown)
                .unwrap_err()
                .contains("unknown KEM")
        );
    }
}
