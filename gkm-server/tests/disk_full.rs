//! GKM-V059: a state disk that fills up, then has room again. Found by driving the daemon by
//! hand: with the state directory on a full file system an eviction's save failed, as it should
//! (nothing of the epoch went out, GKM-V053), but once space was freed every later save failed
//! too ("Previous I/O error occurred. Please close and re-open the database."): redb refuses
//! every write after a failed one until the file is reopened, so the controller retried once a
//! second, forever, until restarted. The store now reopens its file before the next write.
//!
//! A small tmpfs of its own, so the test needs root and `mount`; elsewhere it fails saying so,
//! unless `GKM_SKIP_NETNS=1` (the variable the other root-only tests honour).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use gkm_server::{DiskStore, GroupState, Store, Timestamp};
use lkh_tree::GroupId;

mod support;

const KEY: [u8; 32] = [3; 32];

/// A tmpfs mounted for the test, unmounted (and its directory removed) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("gkm-disk-full-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs on {}",
            dir.display()
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn missing() -> Option<&'static str> {
    if !rustix::process::geteuid().is_root() {
        return Some("root (to mount a tmpfs)");
    }
    let mount = Command::new("mount").arg("--version").output();
    (!mount.is_ok_and(|o| o.status.success())).then_some("mount (`apt-get install mount`)")
}

/// A group of `members` members, as the controller saves it.
fn state(members: usize, seed: u64) -> GroupState {
    support::stored_group(GroupId(1), members, seed, Timestamp(1_800_000_000_000))
}

/// Fills the file system holding `dir` (bounded: it is a small tmpfs).
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("fill");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 * 1024];
    for _ in 0..1_000 {
        if file.write_all(&block).is_err() {
            break;
        }
    }
    path
}

#[test]
fn v059_the_store_writes_again_once_a_full_disk_has_room() {
    if let Some(what) = missing() {
        if std::env::var_os("GKM_SKIP_NETNS").is_some() {
            println!("skipped (GKM_SKIP_NETNS): needs {what}");
            return;
        }
        panic!("this test needs {what}; set GKM_SKIP_NETNS=1 to skip it");
    }
    let disk = Tmpfs::mount("8m");
    let path = disk.0.join("state.redb");
    let (mut store, _) = DiskStore::open(&path, &KEY).unwrap();
    store.save(&state(200, 1)).unwrap();
    let filler = fill(&disk.0);
    // Larger and larger states until one does not fit (the file may have room inside it).
    let failed = (1..=8).any(|k| store.save(&state(2_000 * k, k as u64)).is_err());
    assert!(failed, "no save failed on a full disk");
    std::fs::remove_file(&filler).unwrap();
    let last = state(300, 99);
    store
        .save(&last)
        .expect("the store writes again once the disk has room");
    drop(store);
    let (_, loaded) = DiskStore::open(&path, &KEY).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(loaded[0].members, last.members);
    assert_eq!(loaded[0].tree.nodes.len(), last.tree.nodes.len());
}
