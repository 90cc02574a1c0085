//! `gkmctl`: the operator's client for gkm-server's control socket. Prints tables for people and
//! the raw JSON data with `--json`.
//!
//! Exit codes: 0 done; 1 the daemon refused (its message says what to do next); 2 no daemon
//! answered on the socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gkm_server::cli::{CtlCli as Cli, CtlCmd as Cmd, SigningKeyCmd};
use gkm_server::control::{MAX_LINE, Reply, Request};
use serde_json::Value;

/// The control request of a command.
fn request(command: &Cmd) -> Request {
    match command {
        Cmd::Status => Request::Status {},
        Cmd::Groups => Request::Groups {},
        Cmd::Members { group } => Request::Members {
            group: group.clone(),
        },
        Cmd::Evict { group, member, ban } => Request::Evict {
            group: group.clone(),
            member: *member,
            ban: *ban,
        },
        Cmd::Ban { group, identity } => Request::Ban {
            group: group.clone(),
            identity: identity.clone(),
        },
        Cmd::Unban { group, identity } => Request::Unban {
            group: group.clone(),
            identity: identity.clone(),
        },
        Cmd::Bans { group } => Request::Bans {
            group: group.clone(),
        },
        Cmd::Rekey { group } => Request::Rekey {
            group: group.clone(),
        },
        Cmd::Policy { group, set } => Request::Policy {
            group: group.clone(),
            set: set.clone(),
        },
        Cmd::Keys { group } => Request::Keys {
            group: group.clone(),
        },
        Cmd::Tree { group, .. } => Request::Tree {
            group: group.clone(),
        },
        Cmd::Stats { group } => Request::Stats {
            group: group.clone(),
        },
        Cmd::Reset { group, .. } => Request::Reset {
            group: group.clone(),
        },
        Cmd::SigningKey(SigningKeyCmd::Rotate { group }) => Request::RotateSigningKey {
            group: group.clone(),
        },
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Reset { group, yes: false } = &cli.command {
        eprintln!(
            "gkmctl: `reset {group}` excludes every member of {group} at once: each loses the \
             group key until it registers again. Run `gkmctl reset {group} --yes` to do it."
        );
        return ExitCode::from(1);
    }
    let reply = match call(&cli.socket, &request(&cli.command)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "gkmctl: cannot talk to gkm-server on {}: {e}; is gkm-server running? \
                 (pass --socket DIR/control.sock for another state directory)",
                cli.socket.display()
            );
            return ExitCode::from(2);
        }
    };
    if !reply.ok {
        eprintln!(
            "gkmctl: {}",
            reply
                .error
                .as_deref()
                .unwrap_or("refused (no reason given)")
        );
        return ExitCode::from(1);
    }
    let data = reply.data.unwrap_or(Value::Null);
    if cli.json {
        println!("{data}");
    } else {
        print!("{}", render(&cli.command, &data));
    }
    ExitCode::SUCCESS
}

fn call(socket: &PathBuf, request: &Request) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // A daemon that refuses us answers before reading: its reply counts more than our write.
    let sent = stream.write_all(&line);
    let mut reader = BufReader::new(stream.take(u64::try_from(MAX_LINE * 64).unwrap_or(u64::MAX)));
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        sent?;
        read?;
        return Err(std::io::Error::other("the daemon closed the connection"));
    }
    serde_json::from_str(&answer).map_err(std::io::Error::other)
}

use std::io::Read as _;

/// The human rendering of a command's data.
fn render(command: &Cmd, data: &Value) -> String {
    match command {
        Cmd::Evict {
            group,
            member,
            ban: false,
        } => format!("evicted member {member} of {group}; rekeyed\n"),
        Cmd::Evict {
            group,
            member,
            ban: true,
        } => format!("evicted and banned member {member} of {group}; rekeyed\n"),
        Cmd::Ban { group, identity } => format!("banned {identity} from {group}\n"),
        Cmd::Unban { group, identity } => format!("lifted the ban of {identity} in {group}\n"),
        Cmd::Bans { .. } => {
            let mut out = String::new();
            for identity in data.as_array().into_iter().flatten() {
                out.push_str(identity.as_str().unwrap_or_default());
                out.push('\n');
            }
            out
        }
        Cmd::Rekey { group } => format!("rekeyed {group}\n"),
        Cmd::Reset { group, .. } => {
            format!("reset {group}: every member was excluded and registers again\n")
        }
        Cmd::SigningKey(SigningKeyCmd::Rotate { group }) => format!(
            "rotated the signing key of {group}: announced and in use (`gkmctl status` shows it)\n"
        ),
        Cmd::Status => {
            let keys = table(&data["signing_keys"], &["group", "key_id", "key", "age_s"]);
            let summary = pairs(data, &["groups", "standby", "members", "public_key"]);
            format!("{summary}signing keys (key 0 is public_key):\n{keys}")
        }
        Cmd::Groups => {
            let mut columns = vec![
                "name", "id", "role", "term", "leader", "epoch", "members", "degree", "height",
                "pending",
            ];
            // A standby's warm copy: shown when the controller stands by for a group.
            let warm = data
                .as_array()
                .into_iter()
                .flatten()
                .any(|g| !g["synced_ms_ago"].is_null());
            if warm {
                columns.extend(["behind", "synced_ms_ago"]);
            }
            table(data, &columns)
        }
        Cmd::Members { .. } => table(
            data,
            &["id", "identity", "leaf", "joined", "lease_left_ms", "kem"],
        ),
        Cmd::Keys { .. } => {
            let kems: Vec<String> = data["members_by_kem"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(kem, n)| format!("{kem} {}", cell(n)))
                .collect();
            let keys = table(
                &data["keys"],
                &[
                    "node",
                    "version",
                    "age_epochs",
                    "age_ms",
                    "expires_in_ms",
                    "holders",
                ],
            );
            format!("members by KEM: {}\n{keys}", kems.join(", "))
        }
        Cmd::Policy { .. } => {
            let mut out = String::new();
            for (k, v) in data.as_object().into_iter().flatten() {
                let shown = match (k.as_str(), v) {
                    ("enrollment", v) if v["mode"] == "restricted" => format!(
                        "restricted ({} keys, {} tokens)",
                        cell(&v["keys"]),
                        cell(&v["tokens"])
                    ),
                    ("enrollment", v) => cell(&v["mode"]),
                    (_, v) => cell(v),
                };
                out.push_str(&format!("{k:<22} {shown}\n"));
            }
            out
        }
        Cmd::Tree { .. } => format!("{}\n", data.as_str().unwrap_or_default().trim_end()),
        Cmd::Stats { .. } => {
            let mut out = pairs(
                data,
                &[
                    "rekeys",
                    "encryptions",
                    "datagrams",
                    "bytes",
                    "registrations",
                    "resyncs",
                    "heartbeats",
                ],
            );
            if let Some(rejects) = data.get("rejects").and_then(Value::as_object) {
                for (reason, n) in rejects {
                    out.push_str(&format!(
                        "{:<14} {}\n",
                        format!("rejects.{reason}"),
                        cell(n)
                    ));
                }
            }
            out
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

fn pairs(data: &Value, keys: &[&str]) -> String {
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(0);
    keys.iter()
        .map(|k| {
            let v = data.get(k).map(cell).unwrap_or_default();
            format!("{k:<width$} {v}\n")
        })
        .collect()
}

fn table(data: &Value, columns: &[&str]) -> String {
    let rows: Vec<Vec<String>> = data
        .as_array()
        .into_iter()
        .flatten()
        .map(|row| {
            columns
                .iter()
                .map(|c| row.get(c).map(cell).unwrap_or_default())
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<&str>| -> String {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    out.push_str(&line(
        columns
            .iter()
            .map(|c| c.to_uppercase())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    if rows.is_empty() {
        out.push_str("(none)\n");
    }
    out
}
