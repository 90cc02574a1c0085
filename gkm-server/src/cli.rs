//! The command lines of the binaries (`gkm-server`, `gkmctl`, `gkm-demo`) as clap types, so
//! that the man pages and shell completions under `contrib/` are made from the same definitions
//! the binaries parse with (`cargo run -p gkm-docs -- contrib` writes them). Parsing only: no
//! I/O. Feature `daemon`.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

/// How the daemons write their logs (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object a line (timestamp, level, target, fields), for a log pipeline.
    Json,
}

/// The end of `gkm-server --help` and of its man page.
const SERVER_AFTER_HELP: &str = "Signals: SIGTERM and SIGINT stop the daemon; SIGHUP re-reads the \
config file and applies the settings that may change at run time (logged; a bad file changes \
nothing). Under systemd (Type=notify) it sends READY=1 and STOPPING=1 to $NOTIFY_SOCKET.

Environment: RUST_LOG filters the logs (default info); GKM_STORAGE_KEY may hold the storage key \
(64 hex digits); $CREDENTIALS_DIRECTORY/storage.key and $CREDENTIALS_DIRECTORY/controller.key \
(systemd LoadCredential=) are used when present.

Exit status: 0 after SIGTERM or SIGINT; 1 on an error (the message says what to do); 2 on a \
command-line error. The operator's guide is RFC-notes/operations.md.";

/// `gkm-server`'s clap command (for man pages and completions).
#[must_use]
pub fn server_command() -> clap::Command {
    ServerCli::command()
}

/// `gkmctl`'s clap command (for man pages and completions).
#[must_use]
pub fn ctl_command() -> clap::Command {
    CtlCli::command()
}

/// `gkm-demo`'s clap command (for man pages and completions).
#[must_use]
pub fn demo_command() -> clap::Command {
    DemoCli::command()
}

/// `gkm-server`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "gkm-server",
    version,
    about = "gkm group controller (GCKS)",
    after_long_help = SERVER_AFTER_HELP
)]
pub struct ServerCli {
    /// Log format on standard error: `text` for people, `json` (one object a line) for a log
    /// pipeline (before or after the command).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: ServerCmd,
}

/// `gkm-server`'s commands.
#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum ServerCmd {
    /// Create the state directory, the controller and storage keys and a default config.
    Init {
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
        /// Keep the storage key in this file (made if missing) instead of the state directory.
        #[arg(long)]
        storage_key_file: Option<PathBuf>,
    },
    /// Serve (runs `init` first when the controller key is missing).
    Run {
        /// Config file (TOML); without it, STATE_DIR/gkm-server.toml (the one `init` writes),
        /// or the defaults when that file does not exist.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
        /// The storage key's file, if not in the state directory. Also: GKM_STORAGE_KEY (64 hex
        /// digits) or $CREDENTIALS_DIRECTORY/storage.key (systemd LoadCredential=).
        #[arg(long)]
        storage_key_file: Option<PathBuf>,
        /// The control socket gkmctl talks to (default: STATE_DIR/control.sock); under systemd,
        /// in the service's runtime directory.
        #[arg(long, value_name = "PATH")]
        control_socket: Option<PathBuf>,
        /// Serve a state file older than this controller's epoch floor (a restored backup),
        /// resetting each such group first: every member is excluded and registers again.
        #[arg(long)]
        allow_rollback: bool,
    },
    /// Re-seal the stored state under a new storage key and destroy the old key
    /// (crypto-shredding: copies of the state sealed under the old key can no longer be opened).
    /// Run it with the daemon stopped (every controller, with PostgreSQL). Crash-safe: a rotation
    /// cut short is finished or rolled back by the next `rotate-storage-key` or `run`.
    RotateStorageKey {
        /// Config file (TOML), to find the store ([storage]); without it,
        /// STATE_DIR/gkm-server.toml, as `run` reads.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
        /// The storage key's file, if not in the state directory (replaced in place).
        #[arg(long)]
        storage_key_file: Option<PathBuf>,
        /// Write the new key to this new file (mode 0600) and leave the old key where it is, for
        /// the operator to move the new key into place: needed when the key comes from
        /// GKM_STORAGE_KEY or a systemd credential, which gkm-server does not write.
        #[arg(long, value_name = "FILE")]
        new_key_file: Option<PathBuf>,
    },
    /// Check a config and print what `run` would serve with it; exits 1 if it would not start.
    CheckConfig {
        /// Config file (TOML); without it, STATE_DIR/gkm-server.toml, as `run` reads.
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory.
        #[arg(long, default_value = "./gkm-state")]
        state_dir: PathBuf,
    },
}

/// `gkmctl`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "gkmctl",
    version,
    about = "Control a running gkm-server",
    after_long_help = "Exit status: 0 done; 1 the daemon refused (its message says what to do \
next); 2 no daemon answered on the socket, or a command-line error. Run gkmctl as the daemon's \
user: the socket serves its owner's uid only."
)]
pub struct CtlCli {
    /// The daemon's control socket (before or after the command).
    #[arg(long, global = true, default_value = "./gkm-state/control.sock")]
    pub socket: PathBuf,
    /// Print the raw JSON data (before or after the command).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to ask the daemon.
    #[command(subcommand)]
    pub command: CtlCmd,
}

/// `gkmctl`'s commands: one control request each.
#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum CtlCmd {
    /// The controller in brief.
    Status,
    /// Every group.
    Groups,
    /// A group's members.
    Members {
        /// Group name.
        group: String,
    },
    /// End a membership now (the group is rekeyed).
    Evict {
        /// Group name.
        group: String,
        /// Member id (see `gkmctl members GROUP`).
        member: u64,
        /// Also ban its identity: it cannot register again, across restarts, until `unban`.
        #[arg(long)]
        ban: bool,
    },
    /// Keep an identity out of a group under every enrollment mode, across restarts (a current
    /// member with it is evicted).
    Ban {
        /// Group name.
        group: String,
        /// Ed25519 identity key, 64 hex digits (see `gkmctl members GROUP`).
        identity: String,
    },
    /// Lift a ban.
    Unban {
        /// Group name.
        group: String,
        /// Ed25519 identity key, 64 hex digits (see `gkmctl bans GROUP`).
        identity: String,
    },
    /// A group's banned identities.
    Bans {
        /// Group name.
        group: String,
    },
    /// The group's signing key (`gkmctl status` shows each group's key number and age).
    #[command(subcommand)]
    SigningKey(SigningKeyCmd),
    /// Rekey a group now.
    Rekey {
        /// Group name.
        group: String,
    },
    /// Show a group's policy, or change one setting.
    Policy {
        /// Group name.
        group: String,
        /// `key=value`.
        #[arg(long)]
        set: Option<String>,
    },
    /// A group's key inventory (never key material).
    Keys {
        /// Group name.
        group: String,
    },
    /// A group's tree.
    Tree {
        /// Group name.
        group: String,
        /// Print Graphviz DOT (the only format so far).
        #[arg(long)]
        dot: bool,
    },
    /// A group's counters.
    Stats {
        /// Group name.
        group: String,
    },
    /// Exclude every member of a group at once, for a controller host suspected compromised:
    /// every key is new and no one holds one; members register again (and are authorized
    /// again) after a random delay.
    Reset {
        /// Group name.
        group: String,
        /// Confirm: every member loses the group key until it registers again.
        #[arg(long)]
        yes: bool,
    },
}

/// `gkmctl signing-key` commands.
#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum SigningKeyCmd {
    /// Replace the group's signing key: a new key is made and announced to the group, signed by
    /// the current one, and signs from the rekey that goes out with it; members switch, and the
    /// old key is accepted for older epochs for a grace of 16 epochs.
    Rotate {
        /// Group name.
        group: String,
    },
}

/// The most members `gkm-demo` starts.
pub const DEMO_MAX_MEMBERS: u64 = 1_000;

/// `gkm-demo`'s command line.
#[derive(Parser, Debug)]
#[command(
    name = "gkm-demo",
    version,
    about = "Run a controller and member agents on this machine and check the group's keys",
    long_about = "Starts a gkm-server and member agents (gkm-member) as real processes on this \
machine (multicast on the loopback interface), runs evictions, leaves, joins and batch rekeys, \
and ends with a verdict it checked: every current member holds the controller's traffic key, \
and no departed member decrypts group messages sent after it left. Runs the binaries next to \
its own executable. Exits 0 when the verdict holds, 1 when it does not (the temporary \
directory and its logs are kept), 2 on an error. Set GKM_DEMO_KEEP to keep the directory."
)]
pub struct DemoCli {
    /// How many member agents to start.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(2..=DEMO_MAX_MEMBERS))]
    pub members: u64,
    /// Instead of the churn run: measure ROUNDS times the time from an eviction command to the
    /// last member holding the new key, and print the median and 99th percentile.
    #[arg(long, value_name = "ROUNDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub evict_latency: Option<u64>,
    /// Keep the controller's state in PostgreSQL (a connection string such as `host=/tmp/pg
    /// user=gkm dbname=gkm`, without quotes, backslashes or line breaks) instead of its redb
    /// file; give it an empty database.
    #[arg(long, value_name = "URL", value_parser = plain_url)]
    pub postgres: Option<String>,
}

/// A connection string that can stand in the config's quotes as it is.
fn plain_url(url: &str) -> Result<String, String> {
    if url.is_empty() || url.contains(['"', '\\', '\n', '\r']) {
        return Err("give a connection string without quotes, backslashes or line breaks".into());
    }
    Ok(url.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctl(args: &[&str]) -> CtlCli {
        CtlCli::try_parse_from(std::iter::once("gkmctl").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn commands_are_consistent() {
        server_command().debug_assert();
        ctl_command().debug_assert();
        demo_command().debug_assert();
    }

    #[test]
    fn gkmctl_global_flags_go_anywhere() {
        for args in [
            &["--json", "--socket", "/s", "status"][..],
            &["status", "--json", "--socket", "/s"],
            &["--socket", "/s", "status", "--json"],
        ] {
            let cli = ctl(args);
            assert!(cli.json, "{args:?}");
            assert_eq!(cli.socket, PathBuf::from("/s"), "{args:?}");
            assert_eq!(cli.command, CtlCmd::Status, "{args:?}");
        }
        let cli = ctl(&["policy", "g", "--json"]);
        assert!(cli.json);
        assert_eq!(
            cli.command,
            CtlCmd::Policy {
                group: "g".into(),
                set: None
            }
        );
        assert!(!ctl(&["status"]).json);
    }

    #[test]
    fn gkm_server_log_format_goes_anywhere() {
        let parse = |args: &[&str]| {
            ServerCli::try_parse_from(std::iter::once("gkm-server").chain(args.iter().copied()))
                .unwrap()
        };
        assert_eq!(parse(&["run"]).log_format, LogFormat::Text);
        assert_eq!(
            parse(&["--log-format", "json", "run"]).log_format,
            LogFormat::Json
        );
        assert_eq!(
            parse(&["run", "--log-format", "json"]).log_format,
            LogFormat::Json
        );
        let err = ServerCli::try_parse_from(["gkm-server", "run", "--log-format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("text") && err.contains("json"), "{err}");
    }

    #[test]
    fn gkm_demo_checks_its_arguments() {
        let parse = |args: &[&str]| {
            DemoCli::try_parse_from(std::iter::once("gkm-demo").chain(args.iter().copied()))
        };
        let cli = parse(&[]).unwrap();
        assert_eq!((cli.members, cli.evict_latency), (50, None));
        assert_eq!(parse(&["--members", "300"]).unwrap().members, 300);
        assert!(parse(&["--members", "1"]).is_err());
        assert!(parse(&["--members", "1001"]).is_err());
        assert!(parse(&["--evict-latency", "0"]).is_err());
        assert!(parse(&["--postgres", "host=\"x\""]).is_err());
        assert_eq!(
            parse(&["--postgres", "host=/tmp/pg dbname=gkm"])
                .unwrap()
                .postgres
                .as_deref(),
            Some("host=/tmp/pg dbname=gkm")
        );
    }
}
