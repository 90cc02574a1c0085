//! The state directory: key files, the redb store of sealed group states, and their codec.
//!
//! Each group's [`GroupState`] is encoded by a bounded binary codec, sealed with
//! ChaCha20-Poly1305 under `storage.key` (random 12-byte nonce, the group id as associated data)
//! and stored under the group id in one redb table. A commit returns only once it is on disk.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use ed25519_dalek::SigningKey;
use gkm_server::{GroupState, MemberRecord, Store, StoreError, Timestamp};
use lkh_tree::TreeSnapshot;
use lkh_tree::{Epoch, GroupId, KeyVersion, NodeId, NodeKey, NodeRecord, Strategy, TreeConfig};
use redb::{Database, DatabaseError, ReadableDatabase, ReadableTable, TableDefinition};
use wire::MemberId;
use zeroize::Zeroizing;

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
const AAD_LABEL: &[u8] = b"gkm v1 group state";
const CODEC_VERSION: u8 = 1;
/// Most tree nodes or members one stored group may hold (2^25).
const MAX_RECORDS: usize = 1 << 25;

/// The files of a state directory.
pub(crate) struct StateDir {
    pub(crate) dir: PathBuf,
}

impl StateDir {
    pub(crate) fn new(dir: &Path) -> StateDir {
        StateDir {
            dir: dir.to_owned(),
        }
    }
    pub(crate) fn controller_key(&self) -> PathBuf {
        self.dir.join("controller.key")
    }
    pub(crate) fn storage_key(&self) -> PathBuf {
        self.dir.join("storage.key")
    }
    pub(crate) fn config(&self) -> PathBuf {
        self.dir.join("gkm-server.toml")
    }
    pub(crate) fn database(&self) -> PathBuf {
        self.dir.join("state.redb")
    }
    pub(crate) fn audit(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    pub(crate) fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// Whether both keys exist.
    pub(crate) fn initialized(&self) -> bool {
        self.controller_key().exists() && self.storage_key().exists()
    }

    /// Creates the directory (0700), both keys (0600) and a default config; returns the
    /// controller's public key. Refuses to overwrite a key.
    pub(crate) fn init(&self, default_config: &str) -> Result<[u8; 32]> {
        for key in [self.controller_key(), self.storage_key()] {
            if key.exists() {
                bail!(
                    "{} already exists; refusing to overwrite a key (delete it only to retire \
                     this controller and shred its stored groups, or pass another --state-dir)",
                    key.display()
                );
            }
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create state directory {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set mode 0700 on {}", self.dir.display()))?;
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut_slice()).context("the OS random source failed")?;
        write_new(&self.controller_key(), seed.as_slice())?;
        let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
        let mut storage = Zeroizing::new([0u8; 32]);
        getrandom::fill(storage.as_mut_slice()).context("the OS random source failed")?;
        write_new(&self.storage_key(), storage.as_slice())?;
        if !self.config().exists() {
            fs::write(self.config(), default_config)
                .with_context(|| format!("cannot write {}", self.config().display()))?;
        }
        Ok(public)
    }

    /// The controller's signing key.
    pub(crate) fn signer(&self) -> Result<SigningKey> {
        let seed = read_key(&self.controller_key())?;
        Ok(SigningKey::from_bytes(&seed))
    }

    /// Opens the store and loads every group; errors name the file and say what to do.
    pub(crate) fn open_store(&self) -> Result<(RedbStore, Vec<GroupState>)> {
        let key = read_key(&self.storage_key())?;
        let path = self.database();
        let db = match open_database(&path) {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen) => bail!(
                "state directory {} is in use by another gkm-server; stop it or pass --state-dir",
                self.dir.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot open state file {} (corrupt? restore it from a backup)",
                        path.display()
                    )
                });
            }
        };
        let store = RedbStore { db, key };
        let states = store
            .load_all()
            .with_context(|| format!("state file {} is corrupt or was tampered with; refusing to serve (restore it from a backup, or move it away to start every group afresh)", path.display()))?;
        Ok((store, states))
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

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn read_key(path: &Path) -> Result<Zeroizing<[u8; 32]>> {
    let bytes = Zeroizing::new(fs::read(path).with_context(|| {
        format!(
            "cannot read {}; run `gkm-server init` first",
            path.display()
        )
    })?);
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        bail!("{} is not a 32-byte key file", path.display());
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Group states in redb, sealed under the storage key.
pub(crate) struct RedbStore {
    db: Database,
    key: Zeroizing<[u8; 32]>,
}

impl RedbStore {
    fn load_all(&self) -> Result<Vec<GroupState>> {
        let tx = self.db.begin_read()?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (id, sealed) = entry?;
            let group = GroupId(id.value());
            let plain = open(&self.key, group, sealed.value())
                .with_context(|| format!("group {group} does not authenticate"))?;
            let state = decode_state(&plain)
                .map_err(|e| anyhow::anyhow!("group {group} does not decode: {e}"))?;
            if state.tree.group != group {
                bail!(
                    "group {group} holds the state of group {}",
                    state.tree.group
                );
            }
            out.push(state);
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        let backend = |e: &dyn std::fmt::Display| StoreError::Backend(e.to_string());
        let plain = Zeroizing::new(encode_state(state));
        let group = state.tree.group;
        let sealed = seal(&self.key, group, &plain).map_err(|e| backend(&e))?;
        let tx = self.db.begin_write().map_err(|e| backend(&e))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| backend(&e))?;
            table
                .insert(group.0, sealed.as_slice())
                .map_err(|e| backend(&e))?;
        }
        tx.commit().map_err(|e| backend(&e))
    }
}

fn aad(group: GroupId) -> Vec<u8> {
    let mut aad = AAD_LABEL.to_vec();
    aad.extend_from_slice(&group.0.to_be_bytes());
    aad
}

/// nonce (12) ‖ ciphertext ‖ tag (16).
fn seal(key: &[u8; 32], group: GroupId, plain: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).context("the OS random source failed")?;
    let mut body = Zeroizing::new(plain.to_vec());
    let cipher = ChaCha20Poly1305::new(&(*key).into());
    let tag = cipher
        .encrypt_inout_detached(&Nonce::from(nonce), &aad(group), body.as_mut_slice().into())
        .map_err(|_| anyhow::anyhow!("state too large to seal"))?;
    let mut out = Vec::with_capacity(12 + body.len() + 16);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    out.extend_from_slice(&tag);
    Ok(out)
}

fn open(key: &[u8; 32], group: GroupId, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let (nonce, rest) = sealed
        .split_first_chunk::<12>()
        .context("sealed state shorter than its nonce")?;
    let split = rest
        .len()
        .checked_sub(16)
        .context("sealed state shorter than its tag")?;
    let (body, tag) = rest.split_at(split);
    let tag = Tag::try_from(tag).map_err(|_| anyhow::anyhow!("bad tag length"))?;
    let mut plain = Zeroizing::new(body.to_vec());
    ChaCha20Poly1305::new(&(*key).into())
        .decrypt_inout_detached(
            &Nonce::from(*nonce),
            &aad(group),
            plain.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| anyhow::anyhow!("authentication failed (wrong storage.key, or altered)"))?;
    Ok(plain)
}

// ---- codec ----

const NODE_LEN: usize = 4 + 4 + 1 + 8 + 32;
const MEMBER_LEN: usize = 8 + 32 + 32 + 4 + 8 + 8;
const NO_PARENT: u32 = u32::MAX;

/// Encodes a group state (holds keys: the caller seals and zeroizes it).
pub(crate) fn encode_state(s: &GroupState) -> Vec<u8> {
    let t = &s.tree;
    let mut out = Vec::with_capacity(40 + t.nodes.len() * NODE_LEN + s.members.len() * MEMBER_LEN);
    out.push(CODEC_VERSION);
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
    out.extend_from_slice(
        &u32::try_from(t.nodes.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for n in &t.nodes {
        out.extend_from_slice(&n.id.0.to_be_bytes());
        out.extend_from_slice(&n.parent.map_or(NO_PARENT, |p| p.0).to_be_bytes());
        out.push(u8::from(n.leaf));
        out.extend_from_slice(&n.version.0.to_be_bytes());
        out.extend_from_slice(n.key.as_bytes());
    }
    out.extend_from_slice(
        &u32::try_from(s.members.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    for m in &s.members {
        out.extend_from_slice(&m.id.0.to_be_bytes());
        out.extend_from_slice(&m.identity);
        out.extend_from_slice(&m.hpke_key);
        out.extend_from_slice(&m.leaf.0.to_be_bytes());
        out.extend_from_slice(&m.joined.to_be_bytes());
        out.extend_from_slice(&m.lease_until.0.to_be_bytes());
    }
    out
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
    /// A record count, bounded by [`MAX_RECORDS`] and by the bytes left.
    fn count(&mut self, record_len: usize) -> Result<usize, String> {
        let n = usize::try_from(self.u32()?).map_err(|_| "count too large".to_owned())?;
        if n > MAX_RECORDS || n.saturating_mul(record_len) > self.0.len() {
            return Err(format!("count {n} exceeds the data"));
        }
        Ok(n)
    }
}

/// Decodes what [`encode_state`] wrote; any malformed input is an error, never a panic.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<GroupState, String> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != CODEC_VERSION {
        return Err(format!("unknown state format {version}"));
    }
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
    let epoch = Epoch(r.u64()?);
    let n = r.count(NODE_LEN)?;
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        let id = NodeId(r.u32()?);
        let parent = match r.u32()? {
            NO_PARENT => None,
            p => Some(NodeId(p)),
        };
        let leaf = r.bool()?;
        let version = KeyVersion(r.u64()?);
        let key = NodeKey::from_bytes(r.take::<32>()?);
        nodes.push(NodeRecord {
            id,
            parent,
            leaf,
            version,
            key,
        });
    }
    let m = r.count(MEMBER_LEN)?;
    let mut members = Vec::with_capacity(m);
    for _ in 0..m {
        members.push(MemberRecord {
            id: MemberId(r.u64()?),
            identity: r.take()?,
            hpke_key: r.take()?,
            leaf: NodeId(r.u32()?),
            joined: r.u64()?,
            lease_until: Timestamp(r.u64()?),
        });
    }
    if !r.0.is_empty() {
        return Err(format!("{} trailing bytes", r.0.len()));
    }
    Ok(GroupState {
        tree: TreeSnapshot {
            group,
            config,
            epoch,
            nodes,
        },
        members,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lkh_tree::{Batch, KeyTree};
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    fn sample() -> GroupState {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut tree = KeyTree::new(GroupId(9), TreeConfig::default(), &mut rng).unwrap();
        tree.rekey(
            &Batch {
                leaves: vec![],
                joins: 5,
            },
            &mut rng,
        )
        .unwrap();
        GroupState {
            tree: tree.snapshot(),
            members: vec![MemberRecord {
                id: MemberId(3),
                identity: [1; 32],
                hpke_key: [2; 32],
                leaf: NodeId(5),
                joined: 1,
                lease_until: Timestamp(99),
            }],
        }
    }

    #[test]
    fn state_round_trips_and_every_truncation_is_an_error() {
        let s = sample();
        let bytes = encode_state(&s);
        let back = decode_state(&bytes).unwrap();
        assert_eq!(encode_state(&back), bytes);
        for cut in 0..bytes.len() {
            assert!(decode_state(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_state(&long).is_err());
    }

    #[test]
    fn corrupt_bytes_never_panic() {
        let bytes = encode_state(&sample());
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for _ in 0..2_000 {
            let mut b = bytes.clone();
            let i = usize::try_from(rand_core::Rng::next_u32(&mut rng)).unwrap() % b.len();
            b[i] ^= u8::try_from(rand_core::Rng::next_u32(&mut rng) % 255 + 1).unwrap();
            let _ = decode_state(&b);
        }
    }

    #[test]
    fn sealed_state_is_bound_to_its_group() {
        let key = [7; 32];
        let sealed = seal(&key, GroupId(1), b"state").unwrap();
        assert_eq!(
            open(&key, GroupId(1), &sealed).unwrap().as_slice(),
            b"state"
        );
        assert!(open(&key, GroupId(2), &sealed).is_err());
        assert!(open(&[8; 32], GroupId(1), &sealed).is_err());
        assert!(open(&key, GroupId(1), &sealed[..20]).is_err());
    }
}
