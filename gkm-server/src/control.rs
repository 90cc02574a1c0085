//! The control socket's JSON messages, shared by the daemon and `gkmctl`: one [`Request`] per
//! line in, one [`Reply`] per line out. Pure serde; no I/O.
//!
//! ```text
//! {"cmd":"evict","group":"demo","member":3}   ──►   {"ok":true,"data":null}
//! {"cmd":"members","group":"nope"}            ──►   {"ok":false,"error":"unknown group ..."}
//! ```

use serde::{Deserialize, Serialize};

use crate::controller::{BanTarget, Command, CommandError, Response};

/// Longest request or reply line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// One operator request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The controller in brief. (Variants without fields are written `{}` so that
    /// `deny_unknown_fields` applies to them too: serde ignores extra fields of unit variants.)
    Status {},
    /// Every group.
    Groups {},
    /// A group's members.
    Members {
        /// Group name.
        group: String,
    },
    /// End a membership now.
    Evict {
        /// Group name.
        group: String,
        /// Member id.
        member: u64,
        /// Also ban its identity.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ban: bool,
    },
    /// Rekey a group now.
    Rekey {
        /// Group name.
        group: String,
    },
    /// Show a group's policy, or change one setting (`"key=value"`).
    Policy {
        /// Group name.
        group: String,
        /// `key=value`, if a setting changes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        set: Option<String>,
    },
    /// A group's key inventory (never key material).
    Keys {
        /// Group name.
        group: String,
    },
    /// A group's tree in DOT.
    Tree {
        /// Group name.
        group: String,
    },
    /// A group's counters.
    Stats {
        /// Group name.
        group: String,
    },
    /// Exclude every member of a group at once (every key new; members register again).
    Reset {
        /// Group name.
        group: String,
    },
    /// Keep an identity out of a group (a current member with it is evicted).
    Ban {
        /// Group name.
        group: String,
        /// Ed25519 identity key, hex.
        identity: String,
    },
    /// Lift a ban.
    Unban {
        /// Group name.
        group: String,
        /// Ed25519 identity key, hex.
        identity: String,
    },
    /// A group's banned identities.
    Bans {
        /// Group name.
        group: String,
    },
    /// Replace a group's signing key (announced to the group, signed by the current key).
    RotateSigningKey {
        /// Group name.
        group: String,
    },
}

impl Request {
    /// The controller command this request asks for; `Err` says what is wrong with it.
    pub fn into_command(self) -> Result<Command, String> {
        Ok(match self {
            Request::Status {} => Command::Status,
            Request::Groups {} => Command::Groups,
            Request::Members { group } => Command::Members(group),
            Request::Evict {
                group,
                member,
                ban: false,
            } => Command::Evict(group, member),
            Request::Evict {
                group,
                member,
                ban: true,
            } => Command::Ban(group, BanTarget::Member(member)),
            Request::Rekey { group } => Command::Rekey(group),
            Request::Policy { group, set: None } => Command::Policy(group, None),
            Request::Policy {
                group,
                set: Some(kv),
            } => {
                let (key, value) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("policy setting {kv:?} is not key=value"))?;
                Command::Policy(
                    group,
                    Some((key.trim().to_owned(), value.trim().to_owned())),
                )
            }
            Request::Keys { group } => Command::Keys(group),
            Request::Tree { group } => Command::Tree(group),
            Request::Stats { group } => Command::Stats(group),
            Request::Reset { group } => Command::Reset(group),
            Request::Ban { group, identity } => {
                Command::Ban(group, BanTarget::Identity(identity_key(&identity)?))
            }
            Request::Unban { group, identity } => Command::Unban(group, identity_key(&identity)?),
            Request::Bans { group } => Command::Bans(group),
            Request::RotateSigningKey { group } => Command::RotateSigningKey(group),
        })
    }
}

/// An Ed25519 identity key given as 64 hex digits.
fn identity_key(hex: &str) -> Result<[u8; 32], String> {
    let bytes: Option<[u8; 32]> = (hex.len() == 64)
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()
        })
        .flatten()
        .and_then(|v| v.try_into().ok());
    bytes.ok_or_else(|| {
        format!("identity {hex:?} is not 64 hex digits; `gkmctl members GROUP` shows identities")
    })
}

/// One reply: `{"ok":true,"data":...}` or `{"ok":false,"error":"..."}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the command was carried out.
    pub ok: bool,
    /// The answer (`null` for commands that only act).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// What went wrong and what to do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A refusal.
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }

    /// The reply to a command's outcome: the response's data without its kind tag.
    pub fn from_outcome(outcome: Result<Response, CommandError>) -> Reply {
        match outcome {
            Err(e) => Reply::error(e.to_string()),
            Ok(response) => {
                let data = match serde_json::to_value(&response) {
                    Ok(serde_json::Value::Object(mut map)) => {
                        map.remove("data").unwrap_or(serde_json::Value::Null)
                    }
                    Ok(_) => serde_json::Value::Null,
                    Err(e) => return Reply::error(format!("internal error: {e}")),
                };
                Reply {
                    ok: true,
                    data: Some(data),
                    error: None,
                }
            }
        }
    }

    /// The reply to a line that is not a request.
    pub fn parse_error(error: &serde_json::Error) -> Reply {
        Reply::error(format!(
            "bad request ({error}); send one JSON object per line, e.g. {{\"cmd\":\"status\"}}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_the_documented_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"evict","group":"demo","member":3}"#)
            .expect("valid request");
        assert_eq!(r.into_command(), Ok(Command::Evict("demo".into(), 3)));
        let r: Request =
            serde_json::from_str(r#"{"cmd":"evict","group":"demo","member":3,"ban":true}"#)
                .unwrap();
        assert_eq!(
            r.into_command(),
            Ok(Command::Ban("demo".into(), BanTarget::Member(3)))
        );
        let key = "0a".repeat(32);
        let r: Request = serde_json::from_str(&format!(
            r#"{{"cmd":"ban","group":"demo","identity":"{key}"}}"#
        ))
        .unwrap();
        assert_eq!(
            r.into_command(),
            Ok(Command::Ban("demo".into(), BanTarget::Identity([10; 32])))
        );
        for bad in ["0a", "zz".repeat(32).as_str(), &"0a".repeat(33)] {
            let r = Request::Unban {
                group: "demo".into(),
                identity: bad.into(),
            };
            assert!(r.into_command().unwrap_err().contains("not 64 hex digits"));
        }
        let r: Request =
            serde_json::from_str(r#"{"cmd":"policy","group":"g","set":"repeats=3"}"#).unwrap();
        assert_eq!(
            r.into_command(),
            Ok(Command::Policy(
                "g".into(),
                Some(("repeats".into(), "3".into()))
            ))
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"nope"}"#).is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"status"}"#).expect("valid request");
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"cmd":"status"}"#);
        assert!(serde_json::from_str::<Request>("garbage").is_err());
    }

    #[test]
    fn reject_names_are_their_json_names() {
        use crate::Reject;
        for reason in [
            Reject::Malformed,
            Reject::BadSignature,
            Reject::UnknownGroup,
            Reject::Unauthorized,
            Reject::StaleRequest,
            Reject::Replayed,
            Reject::NotAMember,
            Reject::UnexpectedMessage,
            Reject::GroupFull,
        ] {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.name()));
        }
    }

    /// Found by the `control_json` fuzz target: `{"cmd":"status","x":1}` was accepted.
    #[test]
    fn v029_control_requests_with_unknown_fields_are_refused() {
        for line in [
            r#"{"cmd":"status","x":1}"#,
            r#"{"cmd":"groups","group":"demo"}"#,
            r#"{"cmd":"rekey","group":"demo","now":true}"#,
        ] {
            assert!(serde_json::from_str::<Request>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn replies_carry_data_without_the_kind_tag() {
        let reply = Reply::from_outcome(Ok(Response::Tree("digraph {}".into())));
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(line, r#"{"ok":true,"data":"digraph {}"}"#);
        let reply = Reply::from_outcome(Err(CommandError::UnknownGroup("x".into())));
        assert!(!reply.ok);
        assert!(reply.error.unwrap().contains("gkmctl groups"));
    }
}
