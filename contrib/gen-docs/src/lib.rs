//! # gkm-docs: man pages and shell completions for gkm's binaries
//!
//! [`generate`] writes, from the clap definitions the binaries parse with
//! ([`gkm_server::cli`], [`gkm_member::cli`]), a man page per binary and per subcommand
//! (`man/gkmctl.1`, `man/gkmctl-status.1`, …) and bash, zsh and fish completions
//! (`completions/bash/gkmctl`, `completions/zsh/_gkmctl`, `completions/fish/gkmctl.fish`).
//! The repository keeps the output under `contrib/`; the crate's test regenerates it into a
//! temporary directory and fails on any difference, so the files never drift from the code.
//!
//! Regenerate with `cargo run -p gkm-docs -- contrib` from the repository's root.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap_complete::Shell;

/// The command the crate's drift test tells a developer to run.
pub const REGENERATE: &str = "cargo run -p gkm-docs -- contrib";

/// Every binary's clap command: gkm-server, gkmctl, gkm-member, gkm-demo.
#[must_use]
pub fn commands() -> Vec<clap::Command> {
    vec![
        gkm_server::cli::server_command(),
        gkm_server::cli::ctl_command(),
        gkm_member::cli::command(),
        gkm_server::cli::demo_command(),
    ]
}

/// Writes the man pages under `out/man` and the completions under `out/completions/{bash,zsh,fish}`
/// and returns the files written, relative to `out`, sorted.
///
/// # Errors
/// A directory or file that cannot be written.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man = out.join("man");
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    for command in commands() {
        clap_mangen::generate_to(command, &man)
            .with_context(|| format!("writing man pages into {}", man.display()))?;
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let dir = out.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for mut command in commands() {
            let name = command.get_name().to_owned();
            // The names the shells' completion directories expect.
            let file = dir.join(match shell {
                Shell::Zsh => format!("_{name}"),
                Shell::Fish => format!("{name}.fish"),
                _ => name.clone(),
            });
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, name, &mut script);
            std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
        }
    }
    let mut written = files(out, &man)?;
    written.extend(files(out, &out.join("completions"))?);
    written.sort();
    Ok(written)
}

/// Every file under `dir`, relative to `root`.
///
/// # Errors
/// A directory that cannot be read.
pub fn files(root: &Path, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(files(root, &path)?);
        } else {
            found.push(path.strip_prefix(root)?.to_owned());
        }
    }
    Ok(found)
}
