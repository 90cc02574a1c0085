//! The local API: a Unix socket (mode 0600) where local applications read the current traffic
//! key. One JSON request per line, one JSON answer per line:
//!
//! ```text
//! {"op":"current"} -> {"group":G,"member":N,"epoch":E,"traffic_key":"hex","kcv":"hex",
//!                      "applied":A,"resyncs":R}
//!                     or {"error":"..."} before the member is admitted
//! {"op":"watch"}   -> the current line, then one line per change until the client closes
//! ```
//!
//! Lines are at most [`MAX_LINE`] bytes; a longer line is answered with an error and the
//! connection closed; anything that is not a known request is answered with an error line.
//! Only processes of the member's own uid are served (the socket's mode is 0600 and the peer's
//! credentials are checked too); another uid gets an error line and the connection is closed.

use std::io;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// The longest request line accepted.
pub(crate) const MAX_LINE: usize = 4096;
/// The longest answer line a client accepts.
const MAX_ANSWER: usize = 4096;

/// The key the member currently holds, as the API hands it out.
#[derive(Clone)]
pub(crate) struct KeyInfo {
    /// The group id.
    pub(crate) group: u64,
    /// The member's id.
    pub(crate) member: u64,
    /// The epoch.
    pub(crate) epoch: u64,
    /// The traffic key.
    pub(crate) key: Zeroizing<[u8; 32]>,
    /// Its check value.
    pub(crate) kcv: [u8; 8],
    /// Rekeys the member applied so far (this run).
    pub(crate) applied: u64,
    /// Unicast resyncs it needed so far (this run).
    pub(crate) resyncs: u64,
}

impl KeyInfo {
    /// The answer line, without the newline.
    pub(crate) fn to_line(&self) -> Zeroizing<String> {
        let key = Zeroizing::new(hex::encode(self.key.as_slice()));
        Zeroizing::new(format!(
            r#"{{"group":{},"member":{},"epoch":{},"traffic_key":"{}","kcv":"{}","applied":{},"resyncs":{}}}"#,
            self.group,
            self.member,
            self.epoch,
            key.as_str(),
            hex::encode(self.kcv),
            self.applied,
            self.resyncs
        ))
    }
}

/// A request line.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Request {
    /// The current key.
    Current,
    /// The current key and every change.
    Watch,
}

/// An error answer line.
pub(crate) fn error_line(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// The answer to the current state.
fn current_line(keys: &watch::Receiver<Option<KeyInfo>>) -> Zeroizing<String> {
    match &*keys.borrow() {
        Some(info) => info.to_line(),
        None => Zeroizing::new(error_line(
            "not admitted yet: the member is registering; retry shortly",
        )),
    }
}

/// Parses a request line.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| {
        format!(r#"bad request ({e}); send {{"op":"current"}} or {{"op":"watch"}}, one per line"#)
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
pub(crate) async fn serve(listener: Listener, keys: watch::Receiver<Option<KeyInfo>>) {
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
                let keys = keys.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(stream, keys).await {
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

async fn write_line<W: AsyncWriteExt + Unpin>(writer: &mut W, line: &str) -> io::Result<()> {
    let mut out = Zeroizing::new(Vec::with_capacity(line.len() + 1));
    out.extend_from_slice(line.as_bytes());
    out.push(b'\n');
    writer.write_all(&out).await
}

/// Answers one client's requests.
pub(crate) async fn client(
    stream: UnixStream,
    mut keys: watch::Receiver<Option<KeyInfo>>,
) -> io::Result<()> {
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
        match parse_request(&line) {
            Err(msg) => write_line(&mut writer, &error_line(&msg)).await?,
            Ok(Request::Current) => write_line(&mut writer, &current_line(&keys)).await?,
            Ok(Request::Watch) => return watch_changes(reader, writer, &mut keys).await,
        }
    }
}

async fn watch_changes<R: AsyncRead + Unpin, W: AsyncWriteExt + Unpin>(
    mut reader: R,
    mut writer: W,
    keys: &mut watch::Receiver<Option<KeyInfo>>,
) -> io::Result<()> {
    keys.mark_unchanged();
    write_line(&mut writer, &current_line(keys)).await?;
    let mut sink = [0u8; 256];
    loop {
        tokio::select! {
            changed = keys.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let line = current_line(keys);
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

/// An answer as a client reads it.
#[derive(Deserialize)]
struct Answer {
    error: Option<String>,
    group: Option<u64>,
    member: Option<u64>,
    epoch: Option<u64>,
    traffic_key: Option<String>,
    kcv: Option<String>,
    applied: Option<u64>,
    resyncs: Option<u64>,
}

/// Parses an answer line into a key, or the error it reports.
pub(crate) fn parse_answer(line: &[u8]) -> Result<KeyInfo, String> {
    let answer: Answer =
        serde_json::from_slice(line).map_err(|e| format!("unreadable answer from the API: {e}"))?;
    if let Some(error) = answer.error {
        return Err(error);
    }
    let (Some(group), Some(member), Some(epoch), Some(key_hex), Some(kcv_hex)) = (
        answer.group,
        answer.member,
        answer.epoch,
        answer.traffic_key.map(Zeroizing::new),
        answer.kcv,
    ) else {
        return Err("the API's answer lacks a field".into());
    };
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(key_hex.as_str(), key.as_mut_slice())
        .map_err(|e| format!("bad traffic_key in the API's answer: {e}"))?;
    let mut kcv = [0u8; 8];
    hex::decode_to_slice(&kcv_hex, &mut kcv)
        .map_err(|e| format!("bad kcv in the API's answer: {e}"))?;
    Ok(KeyInfo {
        group,
        member,
        epoch,
        key,
        kcv,
        applied: answer.applied.unwrap_or(0),
        resyncs: answer.resyncs.unwrap_or(0),
    })
}

/// Asks the member at `socket` for its current key.
pub(crate) async fn query_current(socket: &Path) -> anyhow::Result<KeyInfo> {
    let run = async {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the member API at {} ({e}); is `gkm-member run` running \
                 with this --api-socket?",
                socket.display()
            )
        })?;
        let (reader, mut writer) = stream.into_split();
        // A member that refuses us answers before reading: its answer counts more than our write.
        let sent = writer.write_all(b"{\"op\":\"current\"}\n").await;
        let mut reader = BufReader::new(reader);
        match read_line(&mut reader, MAX_ANSWER).await {
            Ok(Line::Text(line)) => parse_answer(&line)
                .map_err(|e| anyhow::anyhow!("the member at {} has no key: {e}", socket.display())),
            Ok(Line::Closed | Line::TooLong) | Err(_) => {
                sent?;
                anyhow::bail!("the member API at {} gave no answer", socket.display())
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the member API at {} did not answer in 5 s",
                socket.display()
            )
        })?
}
