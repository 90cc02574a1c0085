//! `gkm-member`: the member agent daemon and its small tools.
//!
//! ```text
//! gkm-member init [--state-dir DIR]              make the identity and HPKE keys
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
mod store;
mod tools;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use gkm_member::data_keys::{self, KeyDelays};
use wire::Kem;

#[derive(Parser)]
#[command(name = "gkm-member", version, about = "gkm group member agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the state directory with a new identity key and HPKE key.
    Init {
        /// The state directory.
        #[arg(long, default_value = "./gkm-member-state")]
        state_dir: PathBuf,
        /// The KEM of the HPKE key to make (see `run --kem`).
        #[arg(long, default_value = "x-wing", value_parser = parse_kem)]
        kem: Kem,
    },
    /// Run the member: register, follow rekeys, serve the local API.
    Run(RunArgs),
    /// Encrypt MESSAGE under the send key and multicast it. The member hands out the sender id
    /// (its leaf) and a sequence number no other sender of it ever got.
    Send {
        #[command(flatten)]
        data: DataArgs,
        /// The message.
        message: String,
    },
    /// Print each fresh, authentic message of the group on a line, under the keys the member
    /// accepts (followed as they change).
    Recv {
        #[command(flatten)]
        data: DataArgs,
        /// Stop after this many messages (exit 1 if the timeout comes first).
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
}

/// The longest `--save-after-ms`: a day (a longer wait would overflow the timer).
const MAX_SAVE_AFTER_MS: u64 = 86_400_000;

#[derive(Args)]
struct RunArgs {
    /// A controller's TCP (and fan-out UDP) address, HOST:PORT. Repeat it for each controller
    /// of a highly available group: the member asks the first; a controller that does not lead
    /// the group names the leader, which the member asks when it is one of these (else the next
    /// one); a controller that does not answer is passed over for the next. All must share the
    /// key given as --controller-key. The member keeps its membership and keys throughout.
    #[arg(
        long = "controller",
        value_name = "ADDR",
        default_value = "127.0.0.1:47700"
    )]
    controllers: Vec<String>,
    /// The group's name.
    #[arg(long)]
    group: String,
    /// The controller's Ed25519 public key, 64 hex digits.
    #[arg(long)]
    controller_key: String,
    /// The state directory (created with new keys if missing).
    #[arg(long, default_value = "./gkm-member-state")]
    state_dir: PathBuf,
    /// The KEM of the HPKE key the controller seals this member's keys to: x-wing (ML-KEM-768 +
    /// X25519; a welcome recorded today stays closed to a quantum computer later) or x25519 (for
    /// constrained members; the group's policy must accept it). The key is made in the state
    /// directory when missing; a membership made with the other KEM's key registers again.
    #[arg(long, default_value = "x-wing", value_parser = parse_kem)]
    kem: Kem,
    /// The group's rekey multicast address. By default the one the controller names in its
    /// welcome (239.255.77.1:47701 until then); given, it is kept whatever the controller says
    /// (a relay's address, say). A wrong one hears no rekey of the group, and the member falls
    /// back to fan-out.
    #[arg(long)]
    multicast: Option<SocketAddr>,
    /// The local API socket (default: STATE_DIR/api.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// A file holding an enrollment token (its first line; mode 0600, like a key): a token is a
    /// secret, and `ps` shows command lines.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// IPv4 interface address for multicast.
    #[arg(long, default_value = "127.0.0.1")]
    interface: Ipv4Addr,
    /// IPv6 interface index for multicast (0: the kernel chooses).
    #[arg(long, default_value_t = 0)]
    interface_v6: u32,
    /// Do not join the multicast group; ask the controller for fan-out.
    #[arg(long)]
    no_multicast: bool,
    /// Lease renewal period in milliseconds (default 20000).
    #[arg(long)]
    renew_ms: Option<u64>,
    /// When no rekey or heartbeat arrives for this many milliseconds: on multicast, switch to
    /// unicast fan-out (a network that silently drops multicast); on fan-out, ask the controller
    /// for the current keys over TCP. 0: never.
    #[arg(long, default_value_t = 10_000)]
    fanout_after_ms: u64,
    /// Key changes are written to the membership file this many to twice as many milliseconds
    /// after they happen, many changes in one write (a new membership is written at once). A
    /// restarted member resyncs at once, so an older file costs nothing; fewer writes spare
    /// flash storage, and agents sharing a host do not write in step. At most a day.
    #[arg(
        long,
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(..=MAX_SAVE_AFTER_MS)
    )]
    save_after_ms: u64,
    /// After a rekey, applications keep sending under the previous key for this many
    /// milliseconds (RFC 9838's activation delay), so that receivers whose member gets the new
    /// key a little later already hold it. At most 60000.
    #[arg(long, default_value_t = data_keys::DEFAULT_ACTIVATION_MS)]
    activation_ms: u64,
    /// After a rekey, receivers accept frames under the previous key for this many
    /// milliseconds, then refuse them (RFC 9838's deactivation delay): how long a member evicted
    /// by the rekey can still inject frames. Longer than --activation-ms; at most 600000.
    #[arg(long, default_value_t = data_keys::DEFAULT_DEACTIVATION_MS)]
    deactivation_ms: u64,
}

#[derive(Args)]
struct DataArgs {
    /// The member's local API socket.
    #[arg(long)]
    api_socket: PathBuf,
    /// The data multicast group.
    #[arg(long, default_value = "239.255.77.2:47702")]
    data: SocketAddr,
    /// IPv4 interface address for multicast.
    #[arg(long, default_value = "127.0.0.1")]
    interface: Ipv4Addr,
    /// IPv6 interface index for multicast (0: the kernel chooses).
    #[arg(long, default_value_t = 0)]
    interface_v6: u32,
}

impl DataArgs {
    fn config(self) -> tools::DataConfig {
        tools::DataConfig {
            api_socket: self.api_socket,
            data: self.data,
            interface: self.interface,
            interface_v6: self.interface_v6,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gkm-member: error: {e:#}");
            ExitCode::FAILURE
        }
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

/// A `--kem` value: `x-wing` or `x25519`.
fn parse_kem(name: &str) -> Result<Kem, String> {
    Kem::from_name(name).ok_or_else(|| format!("{name:?} is not x-wing or x25519"))
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
        Command::Send { data, message } => runtime.block_on(tools::send(&data.config(), &message)),
        Command::Recv {
            data,
            count,
            timeout_ms,
        } => runtime.block_on(tools::recv(
            &data.config(),
            count,
            timeout_ms.map(Duration::from_millis),
        )),
    }
}
