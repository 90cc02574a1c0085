//! The member's storage key (GKM-V077..V079): the membership file sealed under `storage.key`, a
//! tampered one refused changing nothing, a plaintext one of version 2 read and sealed at the
//! next write; `gkm-member rotate-storage-key` refused while the member answers, and crash-safe:
//! every state a crash can leave (built by hand, and left by `kill -9` of the real command at
//! random moments) has exactly one key that opens the membership, and the next command or start
//! keeps it. The store's modules are the binary's own source files, compiled in here.

#![allow(
    dead_code,
    unreachable_pub,
    reason = "the binary's modules are compiled into this test; not every item is used"
)]
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

#[path = "../src/bin/gkm-member/storage_key.rs"]
mod storage_key;
#[path = "../src/bin/gkm-member/store.rs"]
mod store;

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lkh_tree::{Batch, GroupId, KeyTree, MemberPath, TreeConfig};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use storage_key::{StorageKey, next_path};
use store::StateDir;
use wire::{Kem, MemberId};

const GROUP: GroupId = GroupId(42);
const SEALED: &[u8; 5] = b"GKMM\x03";

/// A member's path in a small tree.
fn a_path() -> MemberPath {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let mut tree = KeyTree::new(GROUP, TreeConfig::default(), &mut rng).unwrap();
    let batch = Batch {
        leaves: vec![],
        joins: 5,
    };
    tree.rekey(&batch, &mut rng).unwrap().joiners[2]
        .path
        .clone()
}

/// A fresh state directory, `init`ed, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("gkm-member-key-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir::new(&dir).init(Kem::XWing).unwrap();
        Dir(dir)
    }
    fn state(&self) -> StateDir {
        StateDir::new(&self.0)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// Saves a membership (member 77 at the path's epoch).
    fn save(&self) {
        self.state()
            .save_membership(GROUP, MemberId(77), &a_path(), Kem::XWing)
            .unwrap();
    }
    /// The stored membership's member and epoch.
    fn loaded(&self) -> (MemberId, u64) {
        let (member, path, _) = self.state().load_membership(GROUP).unwrap().unwrap();
        (member, path.epoch().0)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn rotate(dir: &Dir) -> Output {
    rotate_command(dir).output().unwrap()
}

fn rotate_command(dir: &Dir) -> Command {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["rotate-storage-key", "--state-dir"]).arg(&dir.0);
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The key files present (`storage.key`, `storage.key.next`) and whether each opens the
/// membership file.
fn opening(dir: &Dir) -> Vec<(&'static str, bool)> {
    let membership = read(&dir.file("membership"));
    ["storage.key", "storage.key.next"]
        .into_iter()
        .filter(|name| dir.file(name).exists())
        .map(|name| {
            let opens = StorageKey::read(&dir.file(name))
                .ok()
                .is_some_and(|key| key.open(SEALED, &membership).is_some());
            (name, opens)
        })
        .collect()
}

#[test]
fn v077_the_membership_is_sealed_and_a_tampered_file_is_refused_changing_nothing() {
    let dir = Dir::new("sealed");
    assert_eq!(read(&dir.file("storage.key")).len(), 32);
    dir.save();
    let sealed = read(&dir.file("membership"));
    assert!(sealed.starts_with(SEALED));
    let plain = store::encode_membership(GROUP, MemberId(77), &a_path(), Kem::XWing);
    assert!(
        !sealed
            .windows(32)
            .any(|w| a_path().traffic_key().unwrap().as_bytes() == w),
        "a key in the clear"
    );
    assert!(
        !sealed.windows(8).any(|w| w == &plain[13..21]),
        "member id in the clear"
    );
    assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));

    for at in [4, 5, 20, sealed.len() - 1] {
        let mut tampered = sealed.clone();
        tampered[at] ^= 1;
        std::fs::write(dir.file("membership"), &tampered).unwrap();
        let key = read(&dir.file("storage.key"));
        // The version byte flipped makes it a plaintext file that does not decode.
        let refusal = if at == 4 {
            "is unusable"
        } else {
            "does not authenticate"
        };
        let error = dir.state().load_membership(GROUP).unwrap_err();
        assert_eq!(
            error.is::<store::Unauthentic>(),
            at != 4,
            "byte {at}: {error:#}"
        );
        assert!(
            format!("{error:#}").contains(refusal),
            "byte {at}: {error:#}"
        );
        let out = rotate(&dir);
        assert!(!out.status.success(), "byte {at}");
        assert!(
            stderr(&out).contains(refusal),
            "byte {at}: {}",
            stderr(&out)
        );
        if at != 4 {
            // The daemon stops rather than registering anew over it.
            let out = Command::new(common::BIN)
                .args(["run", "--group", "g", "--controller", "127.0.0.1:9"])
                .args(["--controller-key", &"00".repeat(32), "--no-multicast"])
                .arg("--state-dir")
                .arg(&dir.0)
                .output()
                .unwrap();
            assert!(!out.status.success(), "byte {at}");
            assert!(
                stderr(&out).contains("does not authenticate"),
                "{}",
                stderr(&out)
            );
        }
        assert_eq!(read(&dir.file("membership")), tampered, "byte {at}");
        assert_eq!(read(&dir.file("storage.key")), key, "byte {at}");
        assert!(!dir.file("storage.key.next").exists(), "byte {at}");
    }
}

#[test]
fn v078_a_plaintext_version_2_file_is_read_then_sealed_at_the_next_write() {
    let dir = Dir::new("migrate");
    let plain = store::encode_membership(GROUP, MemberId(77), &a_path(), Kem::XWing);
    std::fs::write(dir.file("membership"), &*plain).unwrap();
    assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));
    assert_eq!(
        read(&dir.file("membership")),
        *plain,
        "reading rewrites nothing"
    );
    dir.save();
    assert!(read(&dir.file("membership")).starts_with(SEALED));
    assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));

    // A rotation seals a plaintext file too.
    std::fs::write(dir.file("membership"), &*plain).unwrap();
    let out = rotate(&dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(read(&dir.file("membership")).starts_with(SEALED));
    assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));
}

#[test]
fn v079_a_rotation_reseals_under_a_new_key_and_is_refused_while_the_member_answers() {
    let dir = Dir::new("rotate");
    dir.save();
    let (old_key, old_file) = (
        read(&dir.file("storage.key")),
        read(&dir.file("membership")),
    );

    let api = UnixListener::bind(dir.file("api.sock")).unwrap();
    let out = rotate(&dir);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stop gkm-member first"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read(&dir.file("storage.key")), old_key);
    drop(api);
    std::fs::remove_file(dir.file("api.sock")).unwrap();

    let out = rotate(&dir);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(read(&dir.file("storage.key")), old_key);
    assert!(!dir.file("storage.key.next").exists());
    let old = StorageKey::read(&dir.file("storage.key")).unwrap();
    assert!(
        old.open(SEALED, &old_file).is_none(),
        "the new key opens the old file"
    );
    assert_eq!(opening(&dir), [("storage.key", true)]);
    assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));
}

/// Leaves a state directory as a crash in a rotation to the given key would.
type Cut = fn(&Dir, &StorageKey);

/// Each state a rotation passes through, built by hand: the next start keeps the one key that
/// opens the membership.
#[test]
fn v079_every_state_a_crash_can_leave_is_settled_to_the_key_that_opens_it() {
    let want = (MemberId(77), a_path().epoch().0);
    let cases: [(&str, Cut); 4] = [
        ("new key torn", |dir, _| {
            std::fs::write(dir.file("storage.key.next"), [1u8; 7]).unwrap();
        }),
        ("new key written", |dir, new| {
            new.write_new(&dir.file("storage.key.next")).unwrap();
        }),
        ("membership re-sealed", |dir, new| {
            new.write_new(&dir.file("storage.key.next")).unwrap();
            let plain = store::encode_membership(GROUP, MemberId(77), &a_path(), Kem::XWing);
            std::fs::write(dir.file("membership"), new.seal(SEALED, &plain).unwrap()).unwrap();
        }),
        ("old key zeroed", |dir, new| {
            new.write_new(&dir.file("storage.key.next")).unwrap();
            let plain = store::encode_membership(GROUP, MemberId(77), &a_path(), Kem::XWing);
            std::fs::write(dir.file("membership"), new.seal(SEALED, &plain).unwrap()).unwrap();
            std::fs::write(dir.file("storage.key"), [0u8; 32]).unwrap();
        }),
    ];
    for (i, (name, cut)) in cases.iter().enumerate() {
        let dir = Dir::new(&format!("cut-{i}"));
        dir.save();
        let old = read(&dir.file("storage.key"));
        let new = StorageKey::generate().unwrap();
        cut(&dir, &new);
        let open: Vec<_> = opening(&dir).into_iter().filter(|(_, o)| *o).collect();
        assert_eq!(open.len(), 1, "{name}: {:?}", opening(&dir));
        assert_eq!(dir.loaded(), want, "{name}");
        assert!(!dir.file("storage.key.next").exists(), "{name}");
        assert_eq!(opening(&dir), [("storage.key", true)], "{name}");
        let rolled_back = read(&dir.file("storage.key")) == old;
        assert_eq!(rolled_back, i < 2, "{name}");
    }
}

#[test]
fn v079_kill_9_at_random_moments_of_a_rotation_leaves_one_key_that_opens_the_membership() {
    let dir = Dir::new("kill");
    dir.save();
    let start = Instant::now();
    assert!(rotate(&dir).status.success());
    let whole = start.elapsed();

    let mut rng = ChaCha20Rng::seed_from_u64(79);
    let span = u64::try_from(whole.as_micros()).unwrap() * 11 / 10;
    let (mut cut, mut settled_by_start) = (0, 0);
    for kill in 0..25 {
        let before = read(&dir.file("storage.key"));
        let child = common::Running::spawn(&mut rotate_command(&dir));
        std::thread::sleep(Duration::from_micros(rng.next_u64() % span));
        drop(child); // SIGKILL, reaped
        let keys = opening(&dir);
        let open: Vec<_> = keys.iter().filter(|(_, o)| *o).collect();
        assert_eq!(open.len(), 1, "kill {kill}: {keys:?}");
        if next_path(&dir.file("storage.key")).exists() {
            cut += 1;
        }
        // The next start (a load) or rotation settles it.
        if kill % 2 == 0 {
            assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));
            settled_by_start += 1;
        } else {
            let out = rotate(&dir);
            assert!(out.status.success(), "kill {kill}: {}", stderr(&out));
            assert_ne!(read(&dir.file("storage.key")), before, "kill {kill}");
        }
        assert_eq!(opening(&dir), [("storage.key", true)], "kill {kill}");
        assert_eq!(dir.loaded(), (MemberId(77), a_path().epoch().0));
    }
    eprintln!(
        "25 kills over a rotation of {whole:?}: {cut} left storage.key.next, {settled_by_start} \
         settled by a start"
    );
}
