//! The local API: a Unix socket (mode 0600) where local applications get the group's traffic
//! keys and the sequence numbers to seal data frames with. One JSON request per line, one JSON
//! answer per line:
//!
//! ```text
//! {"op":"current"}   -> {"group":G,"member":N,"epoch":E,"traffic_key":"hex","kcv":"hex",
//!                        "applied":A,"resyncs":R,"sender":S,"send_epoch":F,"activate_in_ms":M,
//!                        "accept":[{"epoch":E,"traffic_key":"hex","kcv":"hex"},
//!                                  {"epoch":D,"traffic_key":"hex","kcv":"hex","drop_in_ms":T}]}
//!                       or {"error":"..."} while the member holds no key
//! {"op":"watch"}     -> the current line, then a line at every change until the client closes:
//!                       a new key, a new key becoming the send key, an old key dropped
//! {"op":"reserve","count":N}
//!                    -> {"group":G,"member":N,"epoch":F,"traffic_key":"hex","kcv":"hex",
//!                        "sender":S,"first":Q,"count":N}
//! ```
//!
//! - `epoch`, `traffic_key`, `kcv`: the newest key the member holds (the group's epoch).
//! - `send_epoch`: the key to SEND with now, one of `accept`. After a rekey it stays the previous
//!   epoch's for the activation delay (`gkm-member run --activation-ms`), so that receivers whose
//!   agents get the new key a little later already hold it; `activate_in_ms` says how long until
//!   `epoch`'s key takes over (0: it has).
//! - `accept`: the keys a receiver may ACCEPT, newest first. An older key carries `drop_in_ms`:
//!   receivers refuse frames under it from then on (the deactivation delay after the agent got
//!   the next key, `--deactivation-ms`); a key no longer listed is refused at once.
//! - `reserve`: `count` (1 to 65,536) sequence numbers `first .. first+count` for sender id
//!   `sender`, with the send key of that moment. Nonces are `sender ‖ seq`; the agent hands out
//!   every number once, to one application, across restarts too (a high-water mark is written
//!   to its state directory before numbers below it are handed out), so frames sealed with
//!   reserved numbers never repeat a (key, nonce). A block stays usable under later send keys
//!   while `member` is the same; once it is used up, reserve again. Never seal with a number you
//!   did not reserve (a clock, a counter of your own).
//!
//! Lines are at most [`MAX_LINE`] bytes; a longer line is answered with an error and the
//! connection closed; anything that is not a known request is answered with an error line.
//! Only processes of the member's own uid are served (the socket's mode is 0600 and the peer's
//! credentials are checked too); another uid gets an error line and the connection is closed.

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gkm_member::Millis;
use gkm_member::data_keys::{AcceptedKey, KeySchedule};
use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::seq::{Block, ReserveError, Sequences};

/// The longest request line accepted.
pub(crate) const MAX_LINE: usize = 4096;
/// Room for an answer line: 4 keys and the rest fit in well under this, so building one never
/// reallocates (a reallocation would leave a copy of the keys behind, not zeroized).
const ANSWER_CAPACITY: usize = 2048;
/// What an application hears while the member holds no key.
const NOT_ADMITTED: &str = "not admitted yet: the member is registering; retry shortly";

/// The member's keys, as the driver publishes them to the API.
#[derive(Clone)]
pub(crate) struct KeyInfo {
    /// The group id.
    pub(crate) group: u64,
    /// The member's id.
    pub(crate) member: u64,
    /// Rekeys the member applied so far (this run).
    pub(crate) applied: u64,
    /// Unicast resyncs it needed so far (this run).
    pub(crate) resyncs: u64,
    /// Its keys and when it got them (in the API clock's milliseconds).
    pub(crate) schedule: KeySchedule,
}

impl KeyInfo {
    /// The sender id of this member's frames: its leaf, the high 32 bits of its member id (a
    /// member id is `leaf << 32 | joined epoch`); a leaf is unique among the members holding a
    /// key, since a joiner never gets a key from before its join.
    pub(crate) fn sender(&self) -> u32 {
        u32::try_from(self.member >> 32).unwrap_or(u32::MAX)
    }

    /// The `current` answer at `now`, without the newline.
    pub(crate) fn to_line(&self, now: Millis) -> Zeroizing<String> {
        let newest = self.schedule.accepted(now).next();
        let (Some(newest), Some((send_epoch, _))) = (newest, self.schedule.send_key(now)) else {
            return Zeroizing::new(error_line(NOT_ADMITTED));
        };
        let activate_in = self
            .schedule
            .activate_at(now)
            .map_or(0, |at| at.saturating_sub(now));
        let mut out = Zeroizing::new(String::with_capacity(ANSWER_CAPACITY));
        let key = Zeroizing::new(hex::encode(newest.key.as_bytes()));
        let _ = write!(
            &mut *out,
            r#"{{"group":{},"member":{},"epoch":{},"traffic_key":"{}","kcv":"{}","applied":{},"resyncs":{},"sender":{},"send_epoch":{},"activate_in_ms":{activate_in},"accept":["#,
            self.group,
            self.member,
            newest.epoch.0,
            key.as_str(),
            hex::encode(newest.kcv.0),
            self.applied,
            self.resyncs,
            self.sender(),
            send_epoch.0,
        );
        for (i, accepted) in self.schedule.accepted(now).enumerate() {
            if i > 0 {
                out.push(',');
            }
            accepted_json(&mut out, &accepted, now);
        }
        out.push_str("]}");
        out
    }
}

/// One entry of `accept`.
fn accepted_json(out: &mut String, k: &AcceptedKey<'_>, now: Millis) {
    let key = Zeroizing::new(hex::encode(k.key.as_bytes()));
    let _ = write!(
        out,
        r#"{{"epoch":{},"traffic_key":"{}","kcv":"{}""#,
        k.epoch.0,
        key.as_str(),
        hex::encode(k.kcv.0)
    );
    if let Some(at) = k.drop_at {
        let _ = write!(out, r#","drop_in_ms":{}"#, at.saturating_sub(now));
    }
    out.push('}');
}

/// The API clock: milliseconds that never go back, the same clock as the driver's key schedule.
pub(crate) type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

/// What every API connection shares.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The member's keys as the driver last published them (`None`: no key).
    pub(crate) keys: watch::Receiver<Option<KeyInfo>>,
    /// The agent's one sequence counter. Taken for a reservation only; a reservation that
    /// raises the mark holds it over an fsync (once per [`crate::seq::CHUNK`] numbers).
    pub(crate) sequences: Arc<Mutex<Sequences>>,
    /// The clock.
    pub(crate) clock: Clock,
}

/// A request line.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Request {
    /// The current keys.
    Current,
    /// The current keys and every change.
    Watch,
    /// Sequence numbers to send with.
    Reserve {
        /// How many (1 to [`crate::seq::MAX_RESERVE`]).
        count: u64,
    },
}

/// An error answer line.
pub(crate) fn error_line(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The answer to the current state.
fn current_line(shared: &Shared) -> Zeroizing<String> {
    let now = (shared.clock)();
    match &*shared.keys.borrow() {
        Some(info) => info.to_line(now),
        None => Zeroizing::new(error_line(NOT_ADMITTED)),
    }
}

/// The answer to a reservation: a block of numbers and the send key, or why not. Nothing is
/// reserved while the member holds no key.
fn reserve_line(shared: &Shared, count: u64) -> Zeroizing<String> {
    let now = (shared.clock)();
    let sending = shared.keys.borrow().as_ref().and_then(|info| {
        let (epoch, key) = info.schedule.send_key(now)?;
        Some((info.group, info.member, info.sender(), epoch, key.clone()))
    });
    let Some((group, member, sender, epoch, key)) = sending else {
        return Zeroizing::new(error_line(NOT_ADMITTED));
    };
    let block = match shared.sequences.lock() {
        Ok(mut sequences) => sequences.reserve(count),
        Err(_) => Err(ReserveError::Store("the counter is unusable".into())),
    };
    let Block { first, count } = match block {
        Ok(block) => block,
        Err(e) => {
            if matches!(e, ReserveError::Store(_)) {
                tracing::warn!("{e}");
            }
            return Zeroizing::new(error_line(&e.to_string()));
        }
    };
    let hex_key = Zeroizing::new(hex::encode(key.as_bytes()));
    let mut out = Zeroizing::new(String::with_capacity(ANSWER_CAPACITY));
    let _ = write!(
        &mut *out,
        r#"{{"group":{group},"member":{member},"epoch":{},"traffic_key":"{}","kcv":"{}","sender":{sender},"first":{first},"count":{count}}}"#,
        epoch.0,
        hex_key.as_str(),
        hex::encode(key.check_value().0),
    );
    out
}

/// Parses a request line.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| {
        format!(
            r#"bad request ({e}); send {{"op":"current"}}, {{"op":"watch"}} or {{"op":"reserve","count":N}}, one per line"#
        )
    })
}

/// One line read with a bound.
pub(crate) enum Line {
    /// A line (without its newline).
    Text(Vec<u8>),
    /// The peer closed.
    Closed,
    /// More than the bound without a newline.
    TooLong,
}

/// Reads a line of at most `max` bytes (not counting the newline).
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let n = (&mut *reader)
        .take(limit)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Closed);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > max {
        return Ok(Line::TooLong);
    }
    Ok(Line::Text(buf))
}

/// The bound API socket and the one uid it serves (its owner: ours).
pub(crate) struct Listener {
    socket: UnixListener,
    uid: u32,
}

/// Binds the API socket (replacing a stale one) and sets its mode to 0600.
pub(crate) fn bind(path: &Path) -> anyhow::Result<Listener> {
    use anyhow::Context;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use by a running member; stop it or pass another --api-socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind the API socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod 600 {}", path.display()))?;
    let uid = std::fs::metadata(path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .uid();
    Ok(Listener {
        socket: listener,
        uid,
    })
}

/// Serves clients of our uid until the listener fails for good.
pub(crate) async fn serve(listener: Listener, shared: Shared) {
    loop {
        match listener.socket.accept().await {
            Ok((mut stream, _)) => {
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == listener.uid => {}
                    other => {
                        let peer = other.map_or_else(|e| e.to_string(), |c| c.uid().to_string());
                        tracing::warn!(peer, "API connection from another uid refused");
                        let msg = format!("refused: this API serves uid {} only", listener.uid);
                        let _ = write_line(&mut stream, &error_line(&msg)).await;
                        continue;
                    }
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(stream, shared).await {
                        tracing::debug!("API client: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("API socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Writes `line` and a newline in one write, from a buffer zeroized afterwards.
pub(crate) async fn write_line<W: AsyncWriteExt + Unpin>(
    writer: &mut W,
    line: &str,
) -> io::Result<()> {
    let mut out = Zeroizing::new(Vec::with_capacity(line.len() + 1));
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    writer.write_all(&out).await
}

/// Answers one client's requests.
pub(crate) async fn client(stream: UnixStream, mut shared: Shared) -> io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let line = match read_line(&mut reader, MAX_LINE).await? {
            Line::Closed => return Ok(()),
            Line::TooLong => {
                let msg = format!("request line longer than {MAX_LINE} bytes");
                return write_line(&mut writer, &error_line(&msg)).await;
            }
            Line::Text(line) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let answer = match parse_request(&line) {
            Err(msg) => Zeroizing::new(error_line(&msg)),
            Ok(Request::Current) => current_line(&shared),
            Ok(Request::Reserve { count }) => reserve_line(&shared, count),
            Ok(Request::Watch) => return watch_changes(reader, writer, &mut shared).await,
        };
        write_line(&mut writer, &answer).await?;
    }
}

async fn watch_changes<R: AsyncRead + Unpin, W: AsyncWriteExt + Unpin>(
    mut reader: R,
    mut writer: W,
    shared: &mut Shared,
) -> io::Result<()> {
    shared.keys.mark_unchanged();
    write_line(&mut writer, &current_line(shared)).await?;
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            changed = shared.keys.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let line = current_line(shared);
                write_line(&mut writer, &line).await?;
            }
            read = reader.read(&mut sink) => {
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
}
