//! The epoch floor: the highest epoch each group's stored state has reached, kept outside the
//! state file, so that an older copy of that file (a restored backup) is refused instead of
//! served. Serving it would bring back members evicted since the copy was taken and number
//! rekeys with epochs that already went out under other keys.
//!
//! Two small files, `NAME.0` and `NAME.1`, written in turn: each holds a sequence number, every
//! group's floor and a BLAKE3 digest of the rest, and is flushed (`fdatasync`) before the save it
//! follows returns. A write torn by a power cut leaves the other file, one save older, as the
//! floor. [`FlooredStore`] raises the floor after every durable save of the store it wraps.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use lkh_tree::{Epoch, GroupId};
use thiserror::Error;

use crate::store::{CompactionFailure, GroupDelta, GroupState, Store, StoreError};

/// The first bytes of a floor file.
const MAGIC: [u8; 8] = *b"GKMFLR01";
/// The most groups a floor file holds.
const MAX_GROUPS: usize = 1 << 16;
/// Bytes of a floor file besides its groups: magic, sequence, count, digest.
const FIXED_LEN: usize = 8 + 8 + 4 + 32;
/// Bytes per group: id and epoch.
const ENTRY_LEN: usize = 16;

/// A group whose stored state is older than what this controller already served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    /// The group.
    pub group: GroupId,
    /// The epoch of the stored state.
    pub stored: Epoch,
    /// The highest epoch saved before, by the floor.
    pub floor: Epoch,
}

/// Why loading against the floor failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FloorError {
    /// Stored states are older than the floor: an old copy of the state file.
    #[error("{}", describe(.0))]
    RolledBack(Vec<Behind>),
    /// The floor files could not be read or written.
    #[error("epoch floor {path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        error: std::io::Error,
    },
    /// Neither floor file holds a whole, authentic record.
    #[error(
        "epoch floor {0}: neither copy is whole (damaged or edited); if the state file is \
         the newest you have, move both floor files away and start again"
    )]
    Damaged(PathBuf),
}

fn describe(behind: &[Behind]) -> String {
    let groups: Vec<String> = behind
        .iter()
        .map(|b| {
            format!(
                "group {} is stored at epoch {} but reached epoch {} before",
                b.group, b.stored.0, b.floor.0
            )
        })
        .collect();
    format!(
        "the state is older than this controller's epoch floor: {}",
        groups.join("; ")
    )
}

/// Every group's floor, and the two files it is kept in.
#[derive(Debug)]
pub struct EpochFloor {
    paths: [PathBuf; 2],
    files: [File; 2],
    sequence: u64,
    floors: BTreeMap<GroupId, Epoch>,
}

impl EpochFloor {
    /// Opens (or creates, mode 0600) the floor kept in `NAME.0` and `NAME.1` for `path` = NAME.
    pub fn open(path: &Path) -> Result<Self, FloorError> {
        let paths = [0, 1].map(|i| {
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".{i}"));
            PathBuf::from(name)
        });
        let open = |p: &PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)
                .map_err(|error| FloorError::Io {
                    path: p.clone(),
                    error,
                })
        };
        let mut files = [open(&paths[0])?, open(&paths[1])?];
        let mut newest: Option<(u64, BTreeMap<GroupId, Epoch>)> = None;
        let mut written = false;
        for (file, p) in files.iter_mut().zip(&paths) {
            let bytes = read_bounded(file).map_err(|error| FloorError::Io {
                path: p.clone(),
                error,
            })?;
            written |= !bytes.is_empty();
            if let Some((sequence, floors)) = decode(&bytes)
                && newest.as_ref().is_none_or(|(s, _)| sequence > *s)
            {
                newest = Some((sequence, floors));
            }
        }
        let (sequence, floors) = match newest {
            Some(found) => found,
            None if written => return Err(FloorError::Damaged(path.to_owned())),
            None => (0, BTreeMap::new()),
        };
        Ok(EpochFloor {
            paths,
            files,
            sequence,
            floors,
        })
    }

    /// The floor of `group`: the highest epoch saved for it, if any.
    pub fn floor(&self, group: GroupId) -> Option<Epoch> {
        self.floors.get(&group).copied()
    }

    /// The loaded states that are older than the floor.
    pub fn behind(&self, states: &[GroupState]) -> Vec<Behind> {
        states
            .iter()
            .filter_map(|s| {
                let floor = self.floor(s.tree.group)?;
                (s.tree.epoch < floor).then_some(Behind {
                    group: s.tree.group,
                    stored: s.tree.epoch,
                    floor,
                })
            })
            .collect()
    }

    /// Groups with a floor but no stored state (the state file was moved away to start afresh):
    /// their new trees must be numbered above the floor.
    pub fn unstored(&self, states: &[GroupState]) -> Vec<(GroupId, Epoch)> {
        self.floors
            .iter()
            .filter(|(g, _)| !states.iter().any(|s| s.tree.group == **g))
            .map(|(g, e)| (*g, *e))
            .collect()
    }

    /// Refuses states older than the floor.
    pub fn check(&self, states: &[GroupState]) -> Result<(), FloorError> {
        let behind = self.behind(states);
        if behind.is_empty() {
            Ok(())
        } else {
            Err(FloorError::RolledBack(behind))
        }
    }

    /// Raises the floor of `group` to `epoch` (never lowers it) and makes it durable.
    pub fn raise(&mut self, group: GroupId, epoch: Epoch) -> Result<(), FloorError> {
        if self.floor(group).is_some_and(|f| f >= epoch) {
            return Ok(());
        }
        if !self.floors.contains_key(&group) && self.floors.len() >= MAX_GROUPS {
            return Err(FloorError::Io {
                path: self.paths[0].clone(),
                error: std::io::Error::other(format!("more than {MAX_GROUPS} groups")),
            });
        }
        self.floors.insert(group, epoch);
        self.sequence += 1;
        let bytes = encode(self.sequence, &self.floors);
        let i = usize::from(self.sequence % 2 == 1);
        let file = &self.files[i];
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.set_len(bytes.len() as u64))
            .and_then(|()| file.sync_data())
            .map_err(|error| FloorError::Io {
                path: self.paths[i].clone(),
                error,
            })
    }
}

/// Reads a whole floor file, refusing one larger than a floor file can be.
fn read_bounded(file: &mut File) -> std::io::Result<Vec<u8>> {
    let limit = FIXED_LEN + MAX_GROUPS * ENTRY_LEN;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > limit {
        return Err(std::io::Error::other("larger than a floor file can be"));
    }
    Ok(bytes)
}

fn encode(sequence: u64, floors: &BTreeMap<GroupId, Epoch>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + floors.len() * ENTRY_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&sequence.to_be_bytes());
    let count = u32::try_from(floors.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (group, epoch) in floors {
        out.extend_from_slice(&group.0.to_be_bytes());
        out.extend_from_slice(&epoch.0.to_be_bytes());
    }
    let digest = blake3::hash(&out);
    out.extend_from_slice(digest.as_bytes());
    out
}

/// A whole, authentic floor record; `None` for anything else (empty, torn, edited).
fn decode(bytes: &[u8]) -> Option<(u64, BTreeMap<GroupId, Epoch>)> {
    let (body, digest) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
    if blake3::hash(body).as_bytes() != digest {
        return None;
    }
    let rest = body.strip_prefix(&MAGIC)?;
    let (sequence, rest) = rest.split_first_chunk::<8>()?;
    let (count, mut rest) = rest.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_be_bytes(*count)).ok()?;
    if count > MAX_GROUPS || rest.len() != count * ENTRY_LEN {
        return None;
    }
    let mut floors = BTreeMap::new();
    while let Some((group, tail)) = rest.split_first_chunk::<8>() {
        let (epoch, tail) = tail.split_first_chunk::<8>()?;
        floors.insert(
            GroupId(u64::from_be_bytes(*group)),
            Epoch(u64::from_be_bytes(*epoch)),
        );
        rest = tail;
    }
    Some((u64::from_be_bytes(*sequence), floors))
}

/// A store that raises an [`EpochFloor`] after every save of the store it wraps returns: the
/// floor never runs ahead of what is durable, and trails it only while a save is returning.
pub struct FlooredStore<S> {
    inner: S,
    floor: EpochFloor,
}

impl<S: Store> FlooredStore<S> {
    /// `inner`, with its saves recorded in `floor`.
    pub fn new(inner: S, floor: EpochFloor) -> Self {
        FlooredStore { inner, floor }
    }

    fn raised(&mut self, group: GroupId, epoch: Epoch) -> Result<(), StoreError> {
        self.floor
            .raise(group, epoch)
            .map_err(|e| StoreError::Backend(e.to_string()))
    }
}

impl<S: Store> Store for FlooredStore<S> {
    fn save(&mut self, state: &GroupState) -> Result<(), StoreError> {
        self.inner.save(state)?;
        self.raised(state.tree.group, state.tree.epoch)
    }

    fn save_delta(&mut self, delta: &GroupDelta) -> Result<(), StoreError> {
        self.inner.save_delta(delta)?;
        self.raised(delta.group, delta.epoch)
    }

    fn save_delta_and_compact(
        &mut self,
        delta: &GroupDelta,
        state: GroupState,
    ) -> Result<(), StoreError> {
        self.inner.save_delta_and_compact(delta, state)?;
        self.raised(delta.group, delta.epoch)
    }

    fn take_compaction_failure(&mut self) -> Option<CompactionFailure> {
        self.inner.take_compaction_failure()
    }

    fn compacting(&mut self) -> bool {
        self.inner.compacting()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gkm-floor-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("epoch-floor")
    }

    #[test]
    fn the_floor_survives_reopening_and_only_rises() {
        let path = temp("rise");
        let mut floor = EpochFloor::open(&path).unwrap();
        assert_eq!(floor.floor(GroupId(1)), None);
        for e in [3, 9, 4] {
            floor.raise(GroupId(1), Epoch(e)).unwrap();
        }
        floor.raise(GroupId(2), Epoch(7)).unwrap();
        drop(floor);
        let floor = EpochFloor::open(&path).unwrap();
        assert_eq!(floor.floor(GroupId(1)), Some(Epoch(9)));
        assert_eq!(floor.floor(GroupId(2)), Some(Epoch(7)));
    }

    #[test]
    fn a_torn_write_leaves_the_previous_floor_and_two_are_refused() {
        let path = temp("torn");
        let mut floor = EpochFloor::open(&path).unwrap();
        floor.raise(GroupId(1), Epoch(5)).unwrap();
        floor.raise(GroupId(1), Epoch(6)).unwrap();
        drop(floor);
        // The newest record (sequence 2) is in NAME.0: cut it short.
        let newest = PathBuf::from(format!("{}.0", path.display()));
        let len = std::fs::metadata(&newest).unwrap().len();
        File::options()
            .write(true)
            .open(&newest)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        assert_eq!(
            EpochFloor::open(&path).unwrap().floor(GroupId(1)),
            Some(Epoch(5))
        );
        let older = PathBuf::from(format!("{}.1", path.display()));
        let mut bytes = std::fs::read(&older).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&older, bytes).unwrap();
        assert!(matches!(
            EpochFloor::open(&path),
            Err(FloorError::Damaged(_))
        ));
    }

    #[test]
    fn garbage_of_any_length_decodes_to_nothing_without_panicking() {
        let record = encode(3, &BTreeMap::from([(GroupId(1), Epoch(2))]));
        for len in 0..record.len() {
            assert!(decode(&record[..len]).is_none());
        }
        assert!(decode(&record).is_some());
        assert!(decode(&[0xff; 100]).is_none());
    }
}
