//! `gkm-server rotate-storage-key` (GKM-V073..V076): the state re-sealed under a new key that
//! the daemon then serves from, the old key opening nothing; key sources gkm-server does not
//! write refused with what to do (and handed over with `--new-key-file`); a wrong key and a
//! running daemon refused, changing nothing; and `kill -9` of the real command at random
//! (seeded) moments across a measured rotation of a large state, each leaving exactly one key
//! that opens the state, settled by the next command or daemon with the same epochs.
//!
//! `GKM_ROTATE_SEED=S` replays another schedule of kills.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gkm_server::{DiskStore, StoreError, Timestamp};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use support::{Running, SERVER, Server, new_member, register, stored_group};

/// `gkm-server rotate-storage-key --state-dir STATE --config CONFIG ARGS`.
fn rotate_command(setup: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(SERVER);
    cmd.args(["rotate-storage-key", "--state-dir"])
        .arg(&setup.state)
        .arg("--config")
        .arg(&setup.config)
        .args(args);
    cmd
}

fn rotate(setup: &Server, args: &[&str]) -> Output {
    rotate_command(setup, args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn database(setup: &Server) -> PathBuf {
    setup.state.join("state.redb")
}

fn key_of(path: &Path) -> [u8; 32] {
    std::fs::read(path).unwrap().try_into().unwrap()
}

/// The epochs of the groups the file at `path` holds under `key`, or the store's error.
fn epochs(path: &Path, key: &[u8; 32]) -> Result<Vec<(GroupId, u64)>, StoreError> {
    let (_, states) = DiskStore::open(path, key)?;
    let mut epochs: Vec<_> = states
        .iter()
        .map(|s| (s.tree.group, s.tree.epoch.0))
        .collect();
    epochs.sort();
    Ok(epochs)
}

/// Waits (at most 10 s) until the daemon serves group "demo" with `members` members above
/// the stored `epoch` (a restarted controller rekeys at once); panics otherwise.
fn serves(setup: &Server, epoch: u64, members: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let group = setup.ctl_json(&["groups"])[0].clone();
        let (now, held) = (group["epoch"].as_u64(), group["members"].as_u64());
        if now == Some(epoch + 1) && held == Some(members) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serves {group}, not epoch {} with {members} members",
            epoch + 1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(daemon: Running) {
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(30)).status.success());
}

/// A controller with a member registered and a rekey or two behind it, stopped; its epoch.
fn served(setup: &Server) -> u64 {
    setup.init(&[]);
    let daemon = setup.start();
    let mut member = new_member(1, setup.public_key());
    assert!(register(setup.port, &mut member).is_some());
    let out = setup.ctl(&["rekey", "demo"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let epoch = setup.epoch();
    stop(daemon);
    epoch
}

#[test]
fn v073_a_rotated_state_is_served_under_the_new_key_and_the_old_key_opens_nothing() {
    let setup = Server::new("rotate", "");
    let epoch = served(&setup);
    let key_path = setup.state.join("storage.key");
    let old = key_of(&key_path);
    let before = epochs(&database(&setup), &old).unwrap();

    let out = rotate(&setup, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("the old key was destroyed"),
        "{}",
        stderr(&out)
    );
    let new = key_of(&key_path);
    assert_ne!(new, old);
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!setup.state.join("storage.key.next").exists());
    assert!(matches!(
        epochs(&database(&setup), &old),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(epochs(&database(&setup), &new).unwrap(), before);

    // The daemon serves the same group, with its member, rekeying above the stored epoch.
    let daemon = setup.start();
    serves(&setup, epoch, 1);
    assert!(setup.ctl(&["rekey", "demo"]).status.success());
    assert!(setup.epoch() > epoch + 1);
    stop(daemon);
}

#[test]
fn v075_a_running_daemon_or_a_wrong_key_is_refused_and_nothing_changes() {
    let setup = Server::new("rotate-refused", "");
    served(&setup);
    let key_path = setup.state.join("storage.key");
    let old = key_of(&key_path);

    let daemon = setup.start();
    let out = rotate(&setup, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stop gkm-server first"),
        "{}",
        stderr(&out)
    );
    assert_eq!(key_of(&key_path), old);
    assert!(!setup.state.join("storage.key.next").exists());
    stop(daemon);

    // A key that does not open the state: refused, saying what to do, nothing written.
    let wrong = setup.dir.join("wrong.key");
    std::fs::write(&wrong, [9u8; 32]).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = rotate(&setup, &["--storage-key-file", wrong.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("does not open under the storage key"),
        "{}",
        stderr(&out)
    );
    assert_eq!(key_of(&wrong), [9u8; 32]);
    assert!(!setup.dir.join("wrong.key.next").exists());
    assert!(epochs(&database(&setup), &old).is_ok());
}

#[test]
fn v076_a_key_from_the_environment_is_handed_over_through_a_new_key_file() {
    let setup = Server::new("rotate-env", "");
    let epoch = served(&setup);
    let key_path = setup.state.join("storage.key");
    let old_hex = hex::encode(key_of(&key_path));
    std::fs::remove_file(&key_path).unwrap();

    let out = rotate_command(&setup, &[])
        .env("GKM_STORAGE_KEY", &old_hex)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--new-key-file"), "{}", stderr(&out));

    let file = setup.dir.join("new.key");
    let out = rotate_command(&setup, &["--new-key-file", file.to_str().unwrap()])
        .env("GKM_STORAGE_KEY", &old_hex)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("set GKM_STORAGE_KEY"),
        "{}",
        stderr(&out)
    );
    let new_hex = hex::encode(key_of(&file));

    // The old key serves nothing any more, and says what may be wrong; the new one serves.
    let mut cmd = setup.command();
    cmd.env("GKM_STORAGE_KEY", &old_hex);
    let (_, log) = setup
        .try_spawn(cmd, &setup.dir.join("old-key.log"))
        .err()
        .expect("the old key must not serve");
    assert!(log.contains("another storage key"), "{log}");
    let mut cmd = setup.command();
    cmd.env("GKM_STORAGE_KEY", &new_hex);
    let daemon = setup
        .try_spawn(cmd, &setup.dir.join("new-key.log"))
        .unwrap_or_else(|(_, log)| panic!("{log}"));
    serves(&setup, epoch, 1);
    stop(daemon);
}

/// Members in the state the kill test rotates: large enough for a rotation to take a
/// measurable time (several hundred milliseconds in a debug build).
const MEMBERS: usize = 150_000;
const KILLS: u64 = 30;

/// A state directory holding group "demo" of [`MEMBERS`] members under a new storage key.
fn large_state(setup: &Server) -> u64 {
    setup.init(&[]);
    let key = key_of(&setup.state.join("storage.key"));
    let state = stored_group(
        GroupId::from_name("demo"),
        MEMBERS,
        3,
        Timestamp(4_000_000_000_000),
    );
    let (mut store, _) = DiskStore::open(&database(setup), &key).unwrap();
    gkm_server::Store::save(&mut store, &state).unwrap();
    state.tree.epoch.0
}

/// The key files beside the state (`storage.key` and, after a cut, `storage.key.next`), with
/// whether each opens it.
fn opening(setup: &Server, want: &[(GroupId, u64)]) -> Vec<(PathBuf, bool)> {
    ["storage.key", "storage.key.next"]
        .iter()
        .map(|name| setup.state.join(name))
        .filter(|path| path.exists())
        .map(|path| {
            let opens = std::fs::read(&path)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .is_some_and(|key| match epochs(&database(setup), &key) {
                    Ok(epochs) => {
                        assert_eq!(epochs, want, "{}", path.display());
                        true
                    }
                    Err(StoreError::Corrupt(_)) => false,
                    Err(e) => panic!("{}: {e}", path.display()),
                });
            (path, opens)
        })
        .collect()
}

/// Copies the files of `from`'s state directory into `to`'s (a fresh one).
fn copy_state(from: &Server, to: &Server) {
    let _ = std::fs::remove_dir_all(&to.state);
    std::fs::create_dir_all(&to.state).unwrap();
    std::fs::set_permissions(&to.state, std::fs::Permissions::from_mode(0o700)).unwrap();
    for entry in std::fs::read_dir(&from.state).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.state.join(entry.file_name())).unwrap();
    }
}

#[test]
fn v074_kill_9_at_random_moments_of_a_rotation_leaves_one_key_that_opens_the_state() {
    let template = Server::new("rotate-template", "");
    let epoch = large_state(&template);
    let want = vec![(GroupId::from_name("demo"), epoch)];
    let setup = Server::new("rotate-kill", "");

    // One rotation uninterrupted, timed from spawn to exit.
    copy_state(&template, &setup);
    let start = Instant::now();
    let out = rotate(&setup, &[]);
    let whole = start.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        whole > Duration::from_millis(200),
        "a rotation took {whole:?}: too short to be cut at random; raise MEMBERS"
    );

    let seed = std::env::var("GKM_ROTATE_SEED").map_or(16, |s| s.parse().unwrap());
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    // Kills before the new key was written, during the re-sealing (both keys present, the old
    // one opens), after the commit (the new one opens), after the end.
    let (mut before, mut during, mut committed, mut ended) = (0, 0, 0, 0);
    for kill in 0..KILLS {
        copy_state(&template, &setup);
        let original = key_of(&setup.state.join("storage.key"));
        let span = u64::try_from(whole.as_micros()).unwrap() * 11 / 10;
        let delay = Duration::from_micros(rng.next_u64() % span);
        let mut child = Running::spawn(&mut rotate_command(&setup, &[]));
        std::thread::sleep(delay);
        child.kill();

        let keys = opening(&setup, &want);
        let open: Vec<_> = keys.iter().filter(|(_, opens)| *opens).collect();
        assert_eq!(
            open.len(),
            1,
            "kill {kill} (seed {seed}) after {delay:?}: keys {keys:?}"
        );
        let (path, _) = open[0];
        match (
            path.ends_with("storage.key"),
            key_of(path) == original,
            keys.len(),
        ) {
            (true, true, 1) => before += 1,
            (true, true, _) => during += 1,
            (true, false, _) => ended += 1,
            (false, _, _) => committed += 1,
        }

        // The next command or daemon settles it, and the state keeps its epochs (the daemon
        // rekeys once above them).
        let after = if kill % 4 == 3 {
            let daemon = setup.start();
            serves(&setup, epoch, MEMBERS as u64);
            stop(daemon);
            vec![(GroupId::from_name("demo"), epoch + 1)]
        } else {
            let out = rotate(&setup, &[]);
            assert!(out.status.success(), "kill {kill}: {}", stderr(&out));
            want.clone()
        };
        assert!(
            !setup.state.join("storage.key.next").exists(),
            "kill {kill}"
        );
        let keys = opening(&setup, &after);
        assert_eq!(keys.len(), 1, "kill {kill}: {keys:?}");
        assert!(keys[0].1, "kill {kill}: the state does not open");
    }
    eprintln!(
        "{KILLS} kills over a rotation of {whole:?}: {before} before the new key was written, \
         {during} while re-sealing (rolled back), {committed} after the commit (finished), \
         {ended} after the end"
    );
    // Other tests running beside this one may make the timed rotation slower than the later
    // ones: a few kills inside are enough for the run to mean something.
    assert!(
        before + during + committed >= 5,
        "too few kills landed inside a rotation to test anything"
    );
}

/// GKM-V075 with PostgreSQL, through the command: refused while the daemon holds the group's
/// lease (no `storage.key.next` left behind, the key unchanged); once it stopped, re-sealed
/// under a new key the daemon then serves from, the old key opening nothing.
#[test]
fn v075_with_postgresql_the_command_waits_for_every_controller_to_stop() {
    let Some(pg) = support::postgres::PgServer::start("rotate-pg") else {
        return;
    };
    let setup = Server::new("rotate-pg", "");
    let config = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        config.replacen(
            "\n\n[[group]]",
            &format!(
                "\n\n[storage]\nbackend = \"postgres\"\nurl = \"{}\"\nlease_ms = 1000\n\n[[group]]",
                pg.url()
            ),
            1,
        ),
    )
    .unwrap();
    let epoch = served(&setup);
    let key_path = setup.state.join("storage.key");
    let old = key_of(&key_path);
    let pg_config = gkm_server::PgConfig {
        url: pg.url(),
        password_file: None,
    };

    // On the running controller's machine its state lock refuses; on another controller's
    // (the same keys, another state directory) the live lease does.
    let daemon = setup.start();
    let out = rotate(&setup, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another gkm-server"),
        "{}",
        stderr(&out)
    );
    let other = setup.dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o700)).unwrap();
    let other_key = other.join("storage.key");
    std::fs::copy(&key_path, &other_key).unwrap();
    let out = Command::new(SERVER)
        .args(["rotate-storage-key", "--state-dir"])
        .arg(&other)
        .arg("--config")
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("stop gkm-server first: stop every controller"),
        "{}",
        stderr(&out)
    );
    assert_eq!(key_of(&key_path), old);
    assert_eq!(key_of(&other_key), old);
    assert!(!other.join("storage.key.next").exists());
    assert!(!setup.state.join("storage.key.next").exists());
    stop(daemon);

    let out = rotate(&setup, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let new = key_of(&key_path);
    assert_ne!(new, old);
    assert_eq!(
        gkm_server::PgStore::key_fit(&pg_config, &old).unwrap(),
        gkm_server::KeyFit::Refused
    );
    assert_eq!(
        gkm_server::PgStore::key_fit(&pg_config, &new).unwrap(),
        gkm_server::KeyFit::Opens
    );
    let daemon = setup.start();
    // Stopped once since `served` (a restart rekeys once), and started again now.
    serves(&setup, epoch + 1, 1);
    stop(daemon);
}
