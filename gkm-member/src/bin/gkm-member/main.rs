//! `gkm-member`: the member agent daemon and its small tools.
//!
//! ```text
//! gkm-member init [--state-dir DIR]              make the identity, HPKE and storage keys
//! gkm-member rotate-storage-key [--state-dir DIR]
//!                                                re-seal the membership under a new storage key
//! gkm-member run --controller ADDR [--controller ADDR ...] --group NAME --controller-key HEX
//!                                                register, follow rekeys, serve the local API;
//!                                                ask the group's leading controller
//! gkm-member send --api-socket PATH MESSAGE     reserve a sequence number, encrypt and
//!                                                multicast one message
//! gkm-member recv --api-socket PATH             follow the member's keys, print the group's
//!                                                messages
//! ```
//!
//! The protocol logic is the sans-I/O [`gkm_member::Member`]; this binary moves bytes and time.

mod api;
mod api_client;
mod daemon;
mod data;
mod framing;
mod net;
mod seq;
mod signing_file;
mod storage_key;
mod store;
mod tools;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gkm_member::cli::{Cli, Command, DataArgs, LogFormat};
use gkm_member::data_keys::{self, KeyDelays};

/// The tools' data settings.
fn data_config(args: DataArgs) -> tools::DataConfig {
    tools::DataConfig {
        api_socket: args.api_socket,
        data: args.data,
        interface: args.interface,
        interface_v6: args.interface_v6,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gkm-member: error: {e:#}");
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

/// The key delays of `run`, or what to pass instead.
fn delays(activation_ms: u64, deactivation_ms: u64) -> anyhow::Result<KeyDelays> {
    KeyDelays::new(activation_ms, deactivation_ms).map_err(|e| {
        anyhow::anyhow!(
            "{e}; pass --activation-ms up to {} and a longer --deactivation-ms up to {} \
             (defaults {} and {})",
            data_keys::MAX_ACTIVATION_MS,
            data_keys::MAX_DEACTIVATION_MS,
            data_keys::DEFAULT_ACTIVATION_MS,
            data_keys::DEFAULT_DEACTIVATION_MS
        )
    })
}

fn execute(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        Command::Init { state_dir, kem } => {
            let public = store::StateDir::new(&state_dir).init(kem)?;
            println!("{}", hex::encode(public.as_bytes()));
            Ok(())
        }
        Command::RotateStorageKey {
            state_dir,
            api_socket,
        } => {
            let dir = store::StateDir::new(&state_dir);
            let api = api_socket.unwrap_or_else(|| dir.api_socket());
            if dir.rotate_storage_key(&api)? {
                eprintln!(
                    "re-sealed {} under a new storage key; the old key was destroyed",
                    dir.membership_path().display()
                );
            } else {
                eprintln!(
                    "replaced the storage key (no membership file to re-seal: a member stopped \
                     cleanly has left its group); the old key was destroyed"
                );
            }
            Ok(())
        }
        Command::Run(args) => runtime.block_on(daemon::run(daemon::RunConfig {
            token: args
                .token_file
                .as_deref()
                .map(store::read_token)
                .transpose()?,
            controllers: args.controllers,
            group: args.group,
            controller_key: args.controller_key,
            state_dir: args.state_dir,
            kem: args.kem,
            multicast: args.multicast,
            interface: args.interface,
            interface_v6: args.interface_v6,
            api_socket: args.api_socket,
            no_multicast: args.no_multicast,
            renew_ms: args.renew_ms,
            fanout_after: (args.fanout_after_ms > 0)
                .then(|| std::time::Duration::from_millis(args.fanout_after_ms)),
            save_after_ms: args.save_after_ms,
            delays: delays(args.activation_ms, args.deactivation_ms)?,
        })),
        Command::Send { data, message } => {
            runtime.block_on(tools::send(&data_config(data), &message))
        }
        Command::Recv {
            data,
            count,
            timeout_ms,
        } => runtime.block_on(tools::recv(
            &data_config(data),
            count,
            timeout_ms.map(Duration::from_millis),
        )),
    }
}
