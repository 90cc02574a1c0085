//! The storage key kept apart from the state it seals, and every state file private (GKM-V045):
//! `--storage-key-file`, `GKM_STORAGE_KEY` and a systemd credential each serve the state; a
//! state directory without the key serves nothing; a key file others may read is refused; the
//! files `init` and `run` make are mode 0600.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{Running, Server, new_member, register, temp_dir};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Starts this setup's daemon as `edit` changes its command, then stops it; or the log of its
/// refusal.
fn serve(setup: &Server, edit: impl FnOnce(&mut Command)) -> Result<(), String> {
    let mut cmd = setup.command();
    edit(&mut cmd);
    let daemon = setup
        .try_spawn(cmd, &setup.dir.join("server.log"))
        .map_err(|(_, log)| log)?;
    stop(daemon);
    Ok(())
}

fn stop(daemon: Running) {
    daemon.signal("TERM");
    assert!(daemon.wait(Duration::from_secs(20)).status.success());
}

#[test]
fn v045_the_storage_key_can_live_outside_the_state_directory_and_state_files_are_private() {
    let setup = Server::new("key-files", "");
    let vault = temp_dir("vault");
    let key = vault.join("storage.key");
    setup.init(&["--storage-key-file".as_ref(), key.as_os_str()]);
    assert!(
        !setup.state.join("storage.key").exists(),
        "init wrote the key beside the state"
    );
    for file in [
        &key,
        &setup.state.join("controller.key"),
        &setup.state.join("gkm-server.toml"),
    ] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    // From the file given: served (a member joins, so a state is sealed), and the state file
    // it makes is 0600.
    let mut cmd = setup.command();
    cmd.arg("--storage-key-file").arg(&key);
    let daemon = setup
        .try_spawn(cmd, &setup.dir.join("server.log"))
        .unwrap_or_else(|(_, log)| panic!("{log}"));
    let mut member = new_member(1, setup.public_key());
    assert!(register(setup.port, &mut member).is_some());
    stop(daemon);
    assert_eq!(mode(&setup.state.join("state.redb")), 0o600);
    for floor in ["epoch-floor.0", "epoch-floor.1", "audit.jsonl"] {
        assert_eq!(mode(&setup.state.join(floor)), 0o600, "{floor}");
    }

    // Without it: nothing is served, and the error says where a key may come from.
    let refused = serve(&setup, |_| {}).unwrap_err();
    assert!(refused.contains("--storage-key-file"), "{refused}");

    // From the environment, and from a systemd credential directory.
    let hex = hex::encode(std::fs::read(&key).unwrap());
    serve(&setup, |cmd| {
        cmd.env("GKM_STORAGE_KEY", &hex);
    })
    .unwrap();
    serve(&setup, |cmd| {
        cmd.env("CREDENTIALS_DIRECTORY", &vault);
    })
    .unwrap();
    // The controller key from the credential directory too (systemd's LoadCredential=), and
    // the control socket where --control-socket puts it (the service's runtime directory).
    let seed: [u8; 32] = std::fs::read(setup.state.join("controller.key"))
        .unwrap()
        .try_into()
        .unwrap();
    let public = hex::encode(
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes(),
    );
    std::fs::rename(
        setup.state.join("controller.key"),
        vault.join("controller.key"),
    )
    .unwrap();
    let control = setup.dir.join("run-control.sock");
    let mut cmd = setup.command();
    cmd.env("CREDENTIALS_DIRECTORY", &vault)
        .arg("--control-socket")
        .arg(&control);
    let daemon = Running::spawn(&mut cmd);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let out = Command::new(support::GKMCTL)
            .args(["status", "--json", "--socket"])
            .arg(&control)
            .output()
            .unwrap();
        if out.status.success() {
            break serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "{out:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status["public_key"], public.as_str(), "{status}");
    assert!(
        !setup.state.join("controller.key").exists(),
        "run made a new controller key beside the credential"
    );
    stop(daemon);
    std::fs::rename(
        vault.join("controller.key"),
        setup.state.join("controller.key"),
    )
    .unwrap();

    let refused = serve(&setup, |cmd| {
        cmd.env("GKM_STORAGE_KEY", "not a key");
    })
    .unwrap_err();
    assert!(refused.contains("not 64 hex digits"), "{refused}");
    assert!(
        !refused.contains("not a key"),
        "the variable's value was printed: {refused}"
    );

    // Another key does not open the state; a key file others may read is refused.
    let refused = serve(&setup, |cmd| {
        cmd.env("GKM_STORAGE_KEY", "11".repeat(32));
    })
    .unwrap_err();
    assert!(refused.contains("state.redb"), "{refused}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = serve(&setup, |cmd| {
        cmd.arg("--storage-key-file").arg(&key);
    })
    .unwrap_err();
    assert!(refused.contains("chmod 600"), "{refused}");
    let _ = std::fs::remove_dir_all(&vault);
}
