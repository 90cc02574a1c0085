//! [`DiskStore`]: group states in a redb file, written incrementally and sealed under a storage
//! key (feature `disk`).
//!
//! Layout: each group is a log of sealed rows in the table `gkm log`, keyed by (group, sequence
//! number), and a sealed head in `gkm heads` (group → first and next sequence number). A full
//! save deletes the group's rows and writes the whole state as new rows starting with a base
//! record; a delta appends rows. Each save is one redb write transaction, committed durably
//! (fsync) before it returns, so a crash keeps a save whole or not at all. Sequence numbers are
//! never reused, so a row of an older save cannot stand in for a newer one.
//!
//! Why a log and not a row per tree node: at a million members a batch of 100,000 changes touches
//! a quarter of the records, spread over nearly every page of a B-tree keyed by node, and redb
//! writes a touched page whole (copy-on-write), so per-node rows would rewrite most of the file
//! every batch. The log writes each changed record once; the controller rewrites the state in
//! full (compaction) once the deltas hold about as many records as the state.
//!
//! Sealing: ChaCha20-Poly1305 under the storage key, with a random 96-bit nonce per row from the
//! OS (never a counter: a counter rewound by a restored backup or a lost write would repeat a
//! nonce; random nonces need no state and, at a few hundred rows a second, collide with
//! probability below 2^-40 within a century of rows). The associated data names the row (label,
//! group, sequence number), so rows cannot be moved between groups or positions.
//!
//! Loading checks everything: every row authenticates, sequence numbers are contiguous from the
//! head's first to its next, the first row holds the base record, record counts stay within
//! [`MAX_RECORDS`]. Anything else is [`StoreError::Corrupt`] and nothing is served.

use std::collections::HashMap;
use std::path::Path;

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use lkh_tree::{Epoch, GroupId, KeyVersion, NodeId, NodeKey, NodeRecord, Strategy, TreeConfig};
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition, TableHandle,
};
use wire::MemberId;
use zeroize::Zeroizing;

use crate::policy::Timestamp;
use crate::store::{GroupDelta, GroupRecords, GroupState, MemberRecord, Store, StoreError};

const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("gkm log");
const HEADS: TableDefinition<u64, &[u8]> = TableDefinition::new("gkm heads");
/// The table of the first format (one sealed blob per group), which this store refuses.
const OLD_TABLE: &str = "groups";
const LOG_LABEL: &[u8] = b"gkm v2 log row";
const HEAD_LABEL: &[u8] = b"gkm v2 head";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Plaintext bytes after which a row is cut. A row ends at most one record (< 128 bytes) past it,
/// so a sealed row stays under 256 KiB: redb allocates large values in power-of-two pages, and a
/// row just over 256 KiB would take 512.
const ROW_BYTES: usize = 256 * 1024 - 256;
/// Most tree nodes or members one stored group may hold (2^25).
pub const MAX_RECORDS: usize = 1 << 25;

const BASE: u8 = 1;
const EPOCH: u8 = 2;
const NODE: u8 = 3;
const NODE_GONE: u8 = 4;
const MEMBER: u8 = 5;
const MEMBER_GONE: u8 = 6;
const NO_PARENT: u32 = u32::MAX;

/// Where a group's log stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    /// The sequence number of the base row.
    first: u64,
    /// The sequence number the next row takes.
    next: u64,
}

/// Group states in a redb file, sealed under a storage key (see the module docs).
pub struct DiskStore {
    db: Database,
    cipher: ChaCha20Poly1305,
    heads: HashMap<GroupId, Head>,
    written: u64,
}

impl std::fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStore")
            .field("groups", &self.heads.len())
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// Opens the database, checking every page's checksum: redb trusts a cleanly closed file
/// otherwise, and may panic on one altered outside it ("Malformed allocator state"). An existing
/// file is opened, never initialized: redb would turn an empty (truncated) file into a new, empty
/// database, and the daemon would start every group afresh at epoch 0.
fn open_database(path: &Path) -> Result<Database, DatabaseError> {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    if path.exists() {
        builder.open(path)
    } else {
        builder.create(path)
    }
}

impl DiskStore {
    /// Opens (or creates) the store at `path` and loads every group.
    ///
    /// Errors: [`StoreError::InUse`] when another process holds the file, [`StoreError::Corrupt`]
    /// when anything in it does not authenticate or decode (or it is of the first, unsupported
    /// format), [`StoreError::Backend`] for I/O errors.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<(DiskStore, Vec<GroupState>), StoreError> {
        let db = match open_database(path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => return Err(StoreError::InUse),
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        };
        let mut store = DiskStore {
            db,
            cipher: ChaCha20Poly1305::new(&(*key).into()),
            heads: HashMap::new(),
            written: 0,
        };
        let states = store.load()?;
        Ok((store, states))
    }

    /// Sealed bytes written since the store was opened (rows and heads).
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    fn load(&mut self) -> Result<Vec<GroupState>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let tables: Vec<String> = tx
            .list_tables()
            .map_err(backend)?
            .map(|t| t.name().to_owned())
            .collect();
        if tables.iter().any(|t| t == OLD_TABLE) {
            return Err(StoreError::Corrupt(
                "the state file is of the first format (one sealed blob per group), which this \
                 version does not read; move it away to start every group afresh"
                    .into(),
            ));
        }
        if !tables.iter().any(|t| t == HEADS.name()) {
            return Ok(Vec::new());
        }
        let heads = tx.open_table(HEADS).map_err(backend)?;
        let log = tx.open_table(LOG).map_err(backend)?;
        let mut states = Vec::new();
        for entry in heads.iter().map_err(backend)? {
            let (group, sealed) = entry.map_err(backend)?;
            let group = GroupId(group.value());
            let head = self.open_head(group, sealed.value())?;
            states.push(self.load_group(&log, group, head)?);
            self.heads.insert(group, head);
        }
        // Rows of a group with no head are left over from nothing this store writes.
        for entry in log.iter().map_err(backend)? {
            let (key, _) = entry.map_err(backend)?;
            let group = GroupId(key.value().0);
            if !self.heads.contains_key(&group) {
                return Err(corrupt(group, "has log rows but no head"));
            }
        }
        Ok(states)
    }

    fn load_group(
        &self,
        log: &impl ReadableTable<(u64, u64), &'static [u8]>,
        group: GroupId,
        head: Head,
    ) -> Result<GroupState, StoreError> {
        let mut records: Option<GroupRecords> = None;
        let mut expected = head.first;
        let rows = log
            .range((group.0, 0)..=(group.0, u64::MAX))
            .map_err(backend)?;
        for entry in rows {
            let (key, sealed) = entry.map_err(backend)?;
            let seq = key.value().1;
            if seq != expected || seq >= head.next {
                return Err(corrupt(group, &format!("row {seq} is out of sequence")));
            }
            let plain = self.open_row(group, seq, sealed.value())?;
            replay(&mut records, seq == head.first, &plain)
                .map_err(|e| corrupt(group, &format!("row {seq} does not decode: {e}")))?;
            expected += 1;
        }
        if expected != head.next {
            return Err(corrupt(group, &format!("rows {expected}.. are missing")));
        }
        let records = records.ok_or_else(|| corrupt(group, "has no base row"))?;
        if records.group != group {
            return Err(corrupt(group, "holds another group's state"));
        }
        Ok(records.to_state())
    }

    /// Writes `rows` (plaintexts) after the group's log, or, for a full save, in place of it.
    fn write(
        &mut self,
        group: GroupId,
        rows: &[Zeroizing<Vec<u8>>],
        full: bool,
    ) -> Result<(), StoreError> {
        let old = self.heads.get(&group).copied();
        let head = match (old, full) {
            (Some(h), true) => Head {
                first: h.next,
                next: h.next,
            },
            (Some(h), false) => h,
            (None, true) => Head { first: 0, next: 0 },
            (None, false) => {
                return Err(StoreError::Backend(format!(
                    "group {group} was never saved"
                )));
            }
        };
        let mut written = 0u64;
        let tx = self.db.begin_write().map_err(backend)?;
        let mut next = head.next;
        {
            let mut log = tx.open_table(LOG).map_err(backend)?;
            if let (Some(h), true) = (old, full) {
                for seq in h.first..h.next {
                    log.remove((group.0, seq)).map_err(backend)?;
                }
            }
            for row in rows {
                let sealed = self.seal(&row_aad(group, next), row)?;
                log.insert((group.0, next), sealed.as_slice())
                    .map_err(backend)?;
                written += sealed.len() as u64;
                next += 1;
            }
            let head = Head {
                first: head.first,
                next,
            };
            let sealed = self.seal(&head_aad(group), &encode_head(head))?;
            let mut heads = tx.open_table(HEADS).map_err(backend)?;
            heads.insert(group.0, sealed.as_slice()).map_err(backend)?;
            written += sealed.len() as u64;
        }
        tx.commit().map_err(backend)?;
        self.heads.insert(
            group,
            Head {
                first: head.first,
                next,
            },
        );
        self.written += written;
        Ok(())
    }

    /// nonce (12) ‖ ciphertext ‖ tag (16).
    fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| StoreError::Backend(format!("the OS random source failed: {e}")))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .cipher
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
        self.cipher
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, plain.as_mut_slice().into(), &tag)
            .ok()?;
        Some(plain)
    }

    fn open_row(
        &self,
        group: GroupId,
        seq: u64,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.unseal(&row_aad(group, seq), sealed).ok_or_else(|| {
            corrupt(
                group,
                &format!("row {seq} does not authenticate (wrong storage.key, or altered)"),
            )
        })
    }

    fn open_head(&self, group: GroupId, sealed: &[u8]) -> Result<Head, StoreError> {
        let plain = self.unseal(&head_aad(group), sealed).ok_or_else(|| {
            corrupt(
                group,
                "head does not authenticate (wrong storage.key, or altered)",
            )
        })?;
        decode_head(&plain).ok_or_else(|| corrupt(group, "head does not decode"))
    }
}

impl Store for DiskStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        let mut rows = Rows::default();
        encode_base(rows.open(), state);
        for node in &state.tree.nodes {
            encode_node(rows.open(), node);
        }
        for member in &state.members {
            encode_member(rows.open(), member);
        }
        self.write(state.tree.group, &rows.done(), true)
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        let mut rows = Rows::default();
        let out = rows.open();
        out.push(EPOCH);
        out.extend_from_slice(&delta.epoch.0.to_be_bytes());
        for id in &delta.tree.removed {
            let out = rows.open();
            out.push(NODE_GONE);
            out.extend_from_slice(&id.0.to_be_bytes());
        }
        for leaf in &delta.removed_members {
            let out = rows.open();
            out.push(MEMBER_GONE);
            out.extend_from_slice(&leaf.0.to_be_bytes());
        }
        for node in &delta.tree.changed {
            encode_node(rows.open(), node);
        }
        for member in &delta.members {
            encode_member(rows.open(), member);
        }
        self.write(delta.group, &rows.done(), false)
    }
}

/// Plaintext rows being filled, each cut at about [`ROW_BYTES`].
#[derive(Default)]
struct Rows(Vec<Zeroizing<Vec<u8>>>);

impl Rows {
    /// The row to append the next record to.
    fn open(&mut self) -> &mut Vec<u8> {
        if self.0.last().is_none_or(|r| r.len() >= ROW_BYTES) {
            self.0
                .push(Zeroizing::new(Vec::with_capacity(ROW_BYTES + 128)));
        }
        let last = self.0.len() - 1;
        &mut self.0[last]
    }

    fn done(self) -> Vec<Zeroizing<Vec<u8>>> {
        self.0
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(group: GroupId, what: &str) -> StoreError {
    StoreError::Corrupt(format!("group {group}: {what}"))
}

fn row_aad(group: GroupId, seq: u64) -> Vec<u8> {
    let mut aad = LOG_LABEL.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad.extend_from_slice(&seq.to_be_bytes());
    aad
}

fn head_aad(group: GroupId) -> Vec<u8> {
    let mut aad = HEAD_LABEL.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad
}

fn encode_head(head: Head) -> Vec<u8> {
    let mut out = head.first.to_be_bytes().to_vec();
    out.extend_from_slice(&head.next.to_be_bytes());
    out
}

fn decode_head(bytes: &[u8]) -> Option<Head> {
    let mut r = Reader(bytes);
    let head = Head {
        first: r.u64().ok()?,
        next: r.u64().ok()?,
    };
    (r.0.is_empty() && head.first < head.next).then_some(head)
}

fn encode_base(out: &mut Vec<u8>, state: &GroupState) {
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

fn encode_node(out: &mut Vec<u8>, n: &NodeRecord) {
    out.push(NODE);
    out.extend_from_slice(&n.id.0.to_be_bytes());
    out.extend_from_slice(&n.parent.map_or(NO_PARENT, |p| p.0).to_be_bytes());
    out.push(u8::from(n.leaf));
    out.extend_from_slice(&n.version.0.to_be_bytes());
    out.extend_from_slice(n.key.as_bytes());
}

fn encode_member(out: &mut Vec<u8>, m: &MemberRecord) {
    out.push(MEMBER);
    out.extend_from_slice(&m.id.0.to_be_bytes());
    out.extend_from_slice(&m.identity);
    out.extend_from_slice(&m.hpke_key);
    out.extend_from_slice(&m.leaf.0.to_be_bytes());
    out.extend_from_slice(&m.joined.to_be_bytes());
    out.extend_from_slice(&m.lease_until.0.to_be_bytes());
}

/// Applies the records of one row. `base` says whether this is the group's first row, which must
/// begin with the base record (and only it may).
fn replay(records: &mut Option<GroupRecords>, base: bool, plain: &[u8]) -> Result<(), String> {
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
            MEMBER => {
                let member = decode_member(&mut r)?;
                records.members.insert(member.leaf, member);
            }
            MEMBER_GONE => {
                records.members.remove(&NodeId(r.u32()?));
            }
            tag => return Err(format!("unknown record {tag}")),
        }
        if records.nodes.len() > MAX_RECORDS || records.members.len() > MAX_RECORDS {
            return Err(format!("more than {MAX_RECORDS} records"));
        }
    }
    Ok(())
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

fn decode_member(r: &mut Reader<'_>) -> Result<MemberRecord, String> {
    let member = MemberRecord {
        id: MemberId(r.u64()?),
        identity: r.take()?,
        hpke_key: r.take()?,
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
    use lkh_tree::{Batch, KeyTree};
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};
    use std::path::PathBuf;

    const KEY: [u8; 32] = [7; 32];

    /// A directory removed when the test ends.
    struct Temp(PathBuf);

    impl Temp {
        fn new(name: &str) -> Temp {
            let dir = std::env::temp_dir().join(format!("gkm-disk-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Temp(dir)
        }
        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn member(leaf: NodeId, joined: u64) -> MemberRecord {
        MemberRecord {
            id: MemberId((u64::from(leaf.0) << 32) | joined),
            identity: [u8::try_from(leaf.0 % 251).unwrap(); 32],
            hpke_key: [2; 32],
            leaf,
            joined,
            lease_until: Timestamp(99),
        }
    }

    fn state_of(tree: &KeyTree, members: &GroupRecords) -> GroupState {
        GroupState {
            tree: tree.snapshot(),
            members: members.members.values().cloned().collect(),
        }
    }

    /// Comparable contents: the base record, then nodes by id and members by leaf, encoded.
    fn contents(state: &GroupState) -> Vec<u8> {
        let mut nodes: Vec<&NodeRecord> = state.tree.nodes.iter().collect();
        nodes.sort_by_key(|n| n.id);
        let mut members: Vec<&MemberRecord> = state.members.iter().collect();
        members.sort_by_key(|m| m.leaf);
        let mut out = Vec::new();
        encode_base(&mut out, state);
        for n in nodes {
            encode_node(&mut out, n);
        }
        for m in members {
            encode_member(&mut out, m);
        }
        out
    }

    /// A store holding a full save and then `rounds` deltas of random churn (a full save again
    /// halfway); returns the state it should load.
    fn churned(path: &Path, rounds: u64) -> GroupState {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut tree = KeyTree::new(GroupId(4), TreeConfig::default(), &mut rng).unwrap();
        tree.rekey(
            &Batch {
                leaves: vec![],
                joins: 300,
            },
            &mut rng,
        )
        .unwrap();
        tree.track_changes();
        let mut members = GroupRecords::from_state(&GroupState {
            tree: tree.snapshot(),
            members: tree.members().map(|l| member(l, 1)).collect(),
        });
        let (mut store, loaded) = DiskStore::open(path, &KEY).unwrap();
        assert!(loaded.is_empty());
        store.save(&state_of(&tree, &members)).unwrap();
        for round in 0..rounds {
            let leaves: Vec<NodeId> = tree.members().filter(|_| rng.next_u32() % 5 == 0).collect();
            let joins = usize::try_from(rng.next_u32() % 60).unwrap();
            let rekey = tree
                .rekey(
                    &Batch {
                        leaves: leaves.clone(),
                        joins,
                    },
                    &mut rng,
                )
                .unwrap();
            let joined: Vec<MemberRecord> = rekey
                .joiners
                .iter()
                .map(|j| member(j.leaf, tree.epoch().0))
                .collect();
            let delta = GroupDelta {
                group: tree.group(),
                config: tree.config(),
                epoch: tree.epoch(),
                tree: tree.take_changes(),
                members: joined,
                removed_members: leaves,
            };
            members.apply(&delta);
            if round == rounds / 2 {
                store.save(&state_of(&tree, &members)).unwrap();
            } else {
                store.save_delta(&delta).unwrap();
            }
        }
        state_of(&tree, &members)
    }

    #[test]
    fn saves_and_deltas_load_as_the_state_they_describe() {
        let dir = Temp::new("reload");
        let want = churned(&dir.file("state.redb"), 12);
        let (_, loaded) = DiskStore::open(&dir.file("state.redb"), &KEY).unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(contents(&loaded[0]), contents(&want));
        KeyTree::restore(&loaded[0].tree).unwrap();
    }

    /// Opens a copy of a good store after `tamper` changed it; returns the load error.
    fn tampered(dir: &Temp, good: &Path, name: &str, tamper: impl FnOnce(&Database)) -> String {
        let path = dir.file(name);
        std::fs::copy(good, &path).unwrap();
        {
            let db = Database::create(&path).unwrap();
            tamper(&db);
        }
        match DiskStore::open(&path, &KEY) {
            Err(StoreError::Corrupt(message)) => message,
            other => panic!(
                "{name}: expected Corrupt, got {:?}",
                other.map(|(_, s)| s.len())
            ),
        }
    }

    fn edit_log(db: &Database, f: impl FnOnce(&mut redb::Table<'_, (u64, u64), &'static [u8]>)) {
        let tx = db.begin_write().unwrap();
        f(&mut tx.open_table(LOG).unwrap());
        tx.commit().unwrap();
    }

    fn row(db: &Database, seq: u64) -> Vec<u8> {
        let tx = db.begin_read().unwrap();
        let table = tx.open_table(LOG).unwrap();
        table.get((4, seq)).unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn v036_altered_missing_or_moved_rows_are_refused() {
        let dir = Temp::new("corrupt");
        let good = dir.file("good.redb");
        churned(&good, 8);
        // Rows 0..: base (rows 0..=k), deltas; the full save at round 4 began a new base.
        let (store, _) = DiskStore::open(&good, &KEY).unwrap();
        let head = store.heads[&GroupId(4)];
        drop(store);
        assert!(head.next - head.first >= 3);

        let flipped = tampered(&dir, &good, "flipped.redb", |db| {
            let mut bytes = row(db, head.first + 1);
            bytes[20] ^= 1;
            edit_log(db, |t| {
                t.insert((4, head.first + 1), bytes.as_slice()).unwrap();
            });
        });
        assert!(flipped.contains("does not authenticate"), "{flipped}");

        let swapped = tampered(&dir, &good, "swapped.redb", |db| {
            let (a, b) = (row(db, head.first + 1), row(db, head.first + 2));
            edit_log(db, |t| {
                t.insert((4, head.first + 1), b.as_slice()).unwrap();
                t.insert((4, head.first + 2), a.as_slice()).unwrap();
            });
        });
        assert!(swapped.contains("does not authenticate"), "{swapped}");

        let gap = tampered(&dir, &good, "gap.redb", |db| {
            edit_log(db, |t| {
                t.remove((4, head.first + 1)).unwrap();
            });
        });
        assert!(gap.contains("out of sequence"), "{gap}");

        let cut = tampered(&dir, &good, "cut.redb", |db| {
            edit_log(db, |t| {
                t.remove((4, head.next - 1)).unwrap();
            });
        });
        assert!(cut.contains("missing"), "{cut}");

        let stale = tampered(&dir, &good, "stale.redb", |db| {
            let old = row(db, head.first);
            edit_log(db, |t| {
                t.insert((4, head.first - 1), old.as_slice()).unwrap();
            });
        });
        assert!(stale.contains("out of sequence"), "{stale}");

        let moved = tampered(&dir, &good, "moved.redb", |db| {
            let tx = db.begin_write().unwrap();
            {
                let mut heads = tx.open_table(HEADS).unwrap();
                let head = heads.get(4).unwrap().unwrap().value().to_vec();
                heads.insert(5, head.as_slice()).unwrap();
            }
            tx.commit().unwrap();
        });
        assert!(moved.contains("g5: head does not authenticate"), "{moved}");
    }

    #[test]
    fn v036_an_old_format_file_is_refused_with_what_to_do() {
        let dir = Temp::new("old");
        let path = dir.file("state.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let old: TableDefinition<u64, &[u8]> = TableDefinition::new(OLD_TABLE);
                tx.open_table(old)
                    .unwrap()
                    .insert(1, &[0u8; 40][..])
                    .unwrap();
            }
            tx.commit().unwrap();
        }
        let Err(StoreError::Corrupt(message)) = DiskStore::open(&path, &KEY) else {
            panic!("an old file must be refused");
        };
        assert!(message.contains("first format") && message.contains("move it away"));
    }

    #[test]
    fn a_wrong_key_or_a_garbage_file_is_an_error() {
        let dir = Temp::new("garbage");
        let good = dir.file("good.redb");
        churned(&good, 1);
        assert!(matches!(
            DiskStore::open(&good, &[8; 32]),
            Err(StoreError::Corrupt(_))
        ));
        let garbage = dir.file("garbage.redb");
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut bytes = vec![0u8; 64 * 1024];
        rng.fill_bytes(&mut bytes);
        std::fs::write(&garbage, &bytes).unwrap();
        assert!(DiskStore::open(&garbage, &KEY).is_err());
    }

    #[test]
    fn v036_a_bad_record_in_an_authentic_row_is_an_error() {
        let mut records = None;
        assert!(replay(&mut records, false, &[NODE]).is_err(), "no base");
        let mut base = Vec::new();
        encode_base(
            &mut base,
            &GroupState {
                tree: lkh_tree::TreeSnapshot {
                    group: GroupId(1),
                    config: TreeConfig::default(),
                    epoch: Epoch(3),
                    nodes: Vec::new(),
                },
                members: Vec::new(),
            },
        );
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
}
