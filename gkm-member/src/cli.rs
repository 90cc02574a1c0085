//! The member agent's command line as clap types, so that its man page and shell completions
//! are made from the definitions the binary parses with. Parsing only: no I/O.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::data_keys;
use wire::Kem;

/// A `--kem` value: `x-wing` or `x25519`.
fn parse_kem(name: &str) -> Result<Kem, String> {
    Kem::from_name(name).ok_or_else(|| format!("{name:?} is not x-wing or x25519"))
}

/// How the agent writes its logs (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object a line (timestamp, level, target, fields), for a log pipeline.
    Json,
}

/// `gkm-member`'s clap command (for man pages and completions).
#[must_use]
pub fn command() -> clap::Command {
    Cli::command()
}

/// `gkm-member`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "gkm-member",
    version,
    about = "gkm group member agent",
    after_long_help = "Environment: RUST_LOG filters the logs (default info).\n\nExit status: 0 \
after SIGTERM or SIGINT (run) or when done; 1 on an error (the message says what to do); 2 on a \
command-line error. Local applications reach the member on its API socket, as the member's user."
)]
pub struct Cli {
    /// Log format on standard error: `text` for people, `json` (one object a line) for a log
    /// pipeline (before or after the command).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `gkm-member`'s commands.
#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum Command {
    /// Create the state directory with a new identity key, HPKE key and storage key.
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
    /// Re-seal the membership file under a new storage key and destroy the old key
    /// (DIR/storage.key). Run it with the member stopped; a rotation cut short is finished or
    /// rolled back by the next `rotate-storage-key` or `run`.
    RotateStorageKey {
        /// The state directory.
        #[arg(long, default_value = "./gkm-member-state")]
        state_dir: PathBuf,
        /// The member's local API socket, checked to be silent (default: STATE_DIR/api.sock).
        #[arg(long)]
        api_socket: Option<PathBuf>,
    },
    /// Encrypt MESSAGE under the send key and multicast it. The member hands out the sender id
    /// (its leaf) and a sequence number no other sender of it ever got.
    Send {
        /// The API socket and the data group.
        #[command(flatten)]
        data: DataArgs,
        /// The message.
        message: String,
    },
    /// Print each fresh, authentic message of the group on a line, under the keys the member
    /// accepts (followed as they change).
    Recv {
        /// The API socket and the data group.
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
pub const MAX_SAVE_AFTER_MS: u64 = 86_400_000;

/// The arguments of `gkm-member run`.
#[derive(Args, Debug, PartialEq, Eq)]
pub struct RunArgs {
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
    pub controllers: Vec<String>,
    /// The group's name.
    #[arg(long)]
    pub group: String,
    /// The controller's Ed25519 public key, 64 hex digits.
    #[arg(long)]
    pub controller_key: String,
    /// The state directory (created with new keys if missing).
    #[arg(long, default_value = "./gkm-member-state")]
    pub state_dir: PathBuf,
    /// The KEM of the HPKE key the controller seals this member's keys to: x-wing (ML-KEM-768 +
    /// X25519; a welcome recorded today stays closed to a quantum computer later) or x25519 (for
    /// constrained members; the group's policy must accept it). The key is made in the state
    /// directory when missing; a membership made with the other KEM's key registers again.
    #[arg(long, default_value = "x-wing", value_parser = parse_kem)]
    pub kem: Kem,
    /// The group's rekey multicast address. By default the one the controller names in its
    /// welcome (239.255.77.1:47701 until then); given, it is kept whatever the controller says
    /// (a relay's address, say). A wrong one hears no rekey of the group, and the member falls
    /// back to fan-out.
    #[arg(long)]
    pub multicast: Option<SocketAddr>,
    /// The local API socket (default: STATE_DIR/api.sock).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A file holding an enrollment token (its first line; mode 0600, like a key): a token is a
    /// secret, and `ps` shows command lines.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// IPv4 interface address for multicast.
    #[arg(long, default_value = "127.0.0.1")]
    pub interface: Ipv4Addr,
    /// IPv6 interface index for multicast (0: the kernel chooses).
    #[arg(long, default_value_t = 0)]
    pub interface_v6: u32,
    /// Do not join the multicast group; ask the controller for fan-out.
    #[arg(long)]
    pub no_multicast: bool,
    /// Lease renewal period in milliseconds (default 20000).
    #[arg(long)]
    pub renew_ms: Option<u64>,
    /// When no rekey or heartbeat arrives for this many milliseconds: on multicast, switch to
    /// unicast fan-out (a network that silently drops multicast); on fan-out, ask the controller
    /// for the current keys over TCP. 0: never.
    #[arg(long, default_value_t = 10_000)]
    pub fanout_after_ms: u64,
    /// Key changes are written to the membership file this many to twice as many milliseconds
    /// after they happen, many changes in one write (a new membership is written at once). A
    /// restarted member resyncs at once, so an older file costs nothing; fewer writes spare
    /// flash storage, and agents sharing a host do not write in step. At most a day.
    #[arg(
        long,
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(..=MAX_SAVE_AFTER_MS)
    )]
    pub save_after_ms: u64,
    /// After a rekey, applications keep sending under the previous key for this many
    /// milliseconds (RFC 9838's activation delay), so that receivers whose member gets the new
    /// key a little later already hold it. At most 60000.
    #[arg(long, default_value_t = data_keys::DEFAULT_ACTIVATION_MS)]
    pub activation_ms: u64,
    /// After a rekey, receivers accept frames under the previous key for this many
    /// milliseconds, then refuse them (RFC 9838's deactivation delay): how long a member evicted
    /// by the rekey can still inject frames. Longer than --activation-ms; at most 600000.
    #[arg(long, default_value_t = data_keys::DEFAULT_DEACTIVATION_MS)]
    pub deactivation_ms: u64,
}

/// The arguments `send` and `recv` share.
#[derive(Args, Debug, PartialEq, Eq)]
pub struct DataArgs {
    /// The member's local API socket.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// The data multicast group.
    #[arg(long, default_value = "239.255.77.2:47702")]
    pub data: SocketAddr,
    /// IPv4 interface address for multicast.
    #[arg(long, default_value = "127.0.0.1")]
    pub interface: Ipv4Addr,
    /// IPv6 interface index for multicast (0: the kernel chooses).
    #[arg(long, default_value_t = 0)]
    pub interface_v6: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("gkm-member").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn log_format_goes_anywhere() {
        let key = "00".repeat(32);
        let before = parse(&[
            "--log-format",
            "json",
            "run",
            "--group",
            "g",
            "--controller-key",
            &key,
        ]);
        let after = parse(&[
            "run",
            "--group",
            "g",
            "--log-format",
            "json",
            "--controller-key",
            &key,
        ]);
        assert_eq!(before.log_format, LogFormat::Json);
        assert_eq!(after.log_format, LogFormat::Json);
        assert_eq!(before.command, after.command);
        let recv = parse(&["recv", "--api-socket", "/a", "--log-format", "json"]);
        assert_eq!(recv.log_format, LogFormat::Json);
        assert_eq!(parse(&["init"]).log_format, LogFormat::Text);
    }
}
