//! `gkm-server`: the group controller daemon. A thin tokio driver around the sans-I/O
//! [`gkm_server::Controller`]: member requests over TCP, fan-out subscriptions over UDP, rekeys
//! and heartbeats by multicast (and unicast fan-out), operator commands on a Unix socket,
//! group states sealed in redb, audit events as JSON lines.
//!
//! `gkm-server init` makes the keys; `gkm-server run` serves (and inits first if needed).

mod config;
mod driver;
mod queue;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::state::StateDir;

#[derive(Parser)]
#[command(name = "gkm-server", version, about = "gkm group controller (GCKS)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the state directory, the controller and storage keys and a default config.
    Init {
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
    },
    /// Serve (runs `init` first when the keys are missing).
    Run {
        /// Config file (TOML); defaults apply without one.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Cmd::Init { state_dir } => init(&StateDir::new(&state_dir)),
        Cmd::Run { config, state_dir } => run(config.as_deref(), &StateDir::new(&state_dir)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gkm-server: error: {e:#}");
            ExitCode::FAILURE
        }
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

fn run(config: Option<&std::path::Path>, dir: &StateDir) -> anyhow::Result<()> {
    let config = config::Config::load(config)?;
    if !dir.initialized() {
        init(dir)?;
    }
    // I/O and request signature checks on every core; the controller has its own thread.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, std::num::NonZero::get))
        .enable_all()
        .build()?;
    runtime.block_on(driver::serve(config, dir))
}
