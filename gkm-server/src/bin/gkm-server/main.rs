//! `gkm-server`: the group controller daemon. A thin tokio driver around the sans-I/O
//! [`gkm_server::Controller`]: member requests over TCP, fan-out subscriptions over UDP, rekeys
//! and heartbeats by multicast (and unicast fan-out), operator commands on a Unix socket,
//! group states sealed in redb, audit events as JSON lines.
//!
//! `gkm-server init` makes the keys; `gkm-server run` serves (and inits first if needed);
//! `gkm-server rotate-storage-key` re-seals the state under a new storage key.

mod cluster;
mod config;
mod driver;
mod metrics;
mod notify;
mod queue;
mod reload;
mod rotate;
mod state;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use gkm_server::cli::{LogFormat, ServerCli as Cli, ServerCmd as Cmd};

use crate::state::StateDir;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Cmd::Init {
            state_dir,
            storage_key_file,
        } => init(&StateDir::new(&state_dir, storage_key_file.as_deref())),
        Cmd::Run {
            config,
            state_dir,
            storage_key_file,
            control_socket,
            allow_rollback,
        } => run(
            config.as_deref(),
            &StateDir::new(&state_dir, storage_key_file.as_deref()).with_control(control_socket),
            allow_rollback,
        ),
        Cmd::RotateStorageKey {
            config,
            state_dir,
            storage_key_file,
            new_key_file,
        } => rotate_storage_key(
            config.as_deref(),
            &StateDir::new(&state_dir, storage_key_file.as_deref()),
            new_key_file.as_deref(),
        ),
        Cmd::CheckConfig { config, state_dir } => {
            check_config(config.as_deref(), &StateDir::new(&state_dir, None))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gkm-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs on standard error, filtered by `RUST_LOG` (default `info`), as text or JSON lines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

fn init(dir: &StateDir) -> anyhow::Result<()> {
    let public = dir.init(config::DEFAULT_TOML)?;
    println!("{}", hex::encode(public));
    eprintln!(
        "initialized {}; members pass the line above as --controller-key",
        dir.dir.display()
    );
    Ok(())
}

/// The config `run` serves: `--config`, else the state directory's file, else the defaults.
fn load_config(config: Option<&Path>, dir: &StateDir) -> anyhow::Result<config::Config> {
    let path = match config {
        Some(path) => path.to_owned(),
        None if dir.config().exists() => dir.config(),
        None => {
            tracing::info!(
                "no {} and no --config: serving the defaults",
                dir.config().display()
            );
            return Ok(config::Config::default());
        }
    };
    config::Config::load(&path)
}

fn run(config: Option<&Path>, dir: &StateDir, allow_rollback: bool) -> anyhow::Result<()> {
    // A config given on the command line is checked before anything is created.
    let given = config.map(config::Config::load).transpose()?;
    // A state directory whose storage key is missing is not made anew: opening the store says
    // where the key may come from.
    if !dir.controller_key().exists() {
        // Said as a log line: under a service manager stderr is the log (maybe JSON lines).
        let public = dir.init(config::DEFAULT_TOML)?;
        tracing::info!(
            public_key = %hex::encode(public),
            "initialized {}; members pass public_key as --controller-key",
            dir.dir.display()
        );
    }
    // SIGHUP re-reads the file given, else the state directory's (made since, perhaps).
    let reload_from = config.map_or_else(|| dir.config(), Path::to_owned);
    let config = match given {
        Some(config) => config,
        None => load_config(None, dir)?,
    };
    // I/O and request signature checks on every core; the controller has its own thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, std::num::NonZero::get))
        .enable_all()
        .build()?;
    runtime.block_on(driver::serve(config, &reload_from, dir, allow_rollback))
}

fn rotate_storage_key(
    config: Option<&Path>,
    dir: &StateDir,
    new_key_file: Option<&Path>,
) -> anyhow::Result<()> {
    let config = load_config(config, dir)?;
    rotate::rotate(dir, &config, new_key_file)
}

fn check_config(config: Option<&Path>, dir: &StateDir) -> anyhow::Result<()> {
    let config = load_config(config, dir)?;
    print!("{}", config.describe()?);
    Ok(())
}
