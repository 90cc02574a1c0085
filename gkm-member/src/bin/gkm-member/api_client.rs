//! The local API as an application uses it (`gkm-member send` and `recv`): a reservation of
//! sequence numbers with the key to send with, and the `watch` stream of the keys to accept.
//! Answers are read with a bound ([`MAX_ANSWER`] bytes a line) and parsed without panicking;
//! relative times (`drop_in_ms`) become times of the caller's clock.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use gkm_member::Millis;
use gkm_member::data_keys::MAX_HELD;
use lkh_tree::{Epoch, GroupId, TrafficKey};
use serde::Deserialize;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use zeroize::{Zeroize, Zeroizing};

use crate::api::{Line, read_line};

/// The longest answer line accepted.
pub(crate) const MAX_ANSWER: usize = 4096;
/// How long the member's API may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// A key the member says to accept.
pub(crate) struct Accepted {
    /// Its epoch.
    pub(crate) epoch: Epoch,
    /// The key.
    pub(crate) key: TrafficKey,
    /// When receivers drop it, in the caller's clock (`None` for the newest).
    pub(crate) drop_at: Option<Millis>,
}

/// A `current` or `watch` line.
pub(crate) struct Keys {
    /// The group id.
    pub(crate) group: GroupId,
    /// The newest key's epoch.
    pub(crate) epoch: Epoch,
    /// The epoch of the key to send with now.
    pub(crate) send_epoch: Epoch,
    /// The keys to accept, newest first.
    pub(crate) accept: Vec<Accepted>,
}

/// A block of sequence numbers and the key to send with.
pub(crate) struct Reservation {
    /// The group id.
    pub(crate) group: GroupId,
    /// The send key's epoch.
    pub(crate) epoch: Epoch,
    /// The send key.
    pub(crate) key: TrafficKey,
    /// The sender id.
    pub(crate) sender: u32,
    /// The first number of the block (`send` reserves one).
    pub(crate) first: u64,
}

/// A key as an answer carries it; its hex is zeroized on drop.
#[derive(Deserialize)]
struct KeyField {
    epoch: u64,
    traffic_key: String,
    drop_in_ms: Option<u64>,
}

impl Drop for KeyField {
    fn drop(&mut self) {
        self.traffic_key.zeroize();
    }
}

/// A `current`/`watch` answer as read.
#[derive(Deserialize)]
struct KeysAnswer {
    error: Option<String>,
    group: Option<u64>,
    epoch: Option<u64>,
    send_epoch: Option<u64>,
    accept: Option<Vec<KeyField>>,
}

/// A `reserve` answer as read.
#[derive(Deserialize)]
struct ReserveAnswer {
    error: Option<String>,
    group: Option<u64>,
    epoch: Option<u64>,
    traffic_key: Option<String>,
    sender: Option<u32>,
    first: Option<u64>,
    count: Option<u64>,
}

impl Drop for ReserveAnswer {
    fn drop(&mut self) {
        if let Some(key) = &mut self.traffic_key {
            key.zeroize();
        }
    }
}

fn key_from_hex(hex_key: &str) -> Result<TrafficKey, String> {
    let mut key = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_key, key.as_mut_slice())
        .map_err(|e| format!("bad traffic_key in the API's answer: {e}"))?;
    Ok(TrafficKey::from_bytes(*key))
}

/// Parses a `current` or `watch` line read at `now`, or returns the error it reports.
pub(crate) fn parse_keys(line: &[u8], now: Millis) -> Result<Keys, String> {
    let answer: KeysAnswer =
        serde_json::from_slice(line).map_err(|e| format!("unreadable answer from the API: {e}"))?;
    if let Some(error) = answer.error {
        return Err(error);
    }
    let (Some(group), Some(epoch), Some(send_epoch), Some(fields)) =
        (answer.group, answer.epoch, answer.send_epoch, answer.accept)
    else {
        return Err("the API's answer lacks a field".into());
    };
    if fields.is_empty() || fields.len() > MAX_HELD {
        return Err(format!(
            "the API's answer names {} keys to accept, not 1 to {MAX_HELD}",
            fields.len()
        ));
    }
    let mut accept = Vec::with_capacity(fields.len());
    for field in &fields {
        accept.push(Accepted {
            epoch: Epoch(field.epoch),
            key: key_from_hex(&field.traffic_key)?,
            drop_at: field.drop_in_ms.map(|ms| now.saturating_add(ms)),
        });
    }
    if !accept.iter().any(|k| k.epoch.0 == send_epoch) {
        return Err("the API's send key is not among the keys it accepts".into());
    }
    Ok(Keys {
        group: GroupId(group),
        epoch: Epoch(epoch),
        send_epoch: Epoch(send_epoch),
        accept,
    })
}

/// Parses a `reserve` answer, or returns the error it reports.
pub(crate) fn parse_reservation(line: &[u8]) -> Result<Reservation, String> {
    let answer: ReserveAnswer =
        serde_json::from_slice(line).map_err(|e| format!("unreadable answer from the API: {e}"))?;
    if let Some(error) = &answer.error {
        return Err(error.clone());
    }
    let (Some(group), Some(epoch), Some(key), Some(sender), Some(first), Some(count)) = (
        answer.group,
        answer.epoch,
        answer.traffic_key.as_deref(),
        answer.sender,
        answer.first,
        answer.count,
    ) else {
        return Err("the API's answer lacks a field".into());
    };
    if count == 0 || first.checked_add(count).is_none() {
        return Err(format!("the API reserved a bad block ({first}, {count})"));
    }
    Ok(Reservation {
        group: GroupId(group),
        epoch: Epoch(epoch),
        key: key_from_hex(key)?,
        sender,
        first,
    })
}

/// A connection to the member's API.
struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Connection {
    async fn open(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            anyhow!(
                "cannot connect to the member API at {} ({e}); is `gkm-member run` running \
                 with this --api-socket?",
                socket.display()
            )
        })?;
        let (reader, writer) = stream.into_split();
        Ok(Connection {
            reader: BufReader::new(reader),
            writer,
        })
    }

    /// Sends `request` and reads the first answer line. A member that refuses us answers
    /// before reading: its answer counts more than our write.
    async fn ask(&mut self, request: &[u8], socket: &Path) -> Result<Vec<u8>> {
        let sent = self.writer.write_all(request).await;
        match self.next_line().await {
            Ok(Some(line)) => Ok(line),
            Ok(None) | Err(_) => {
                sent?;
                bail!("the member API at {} gave no answer", socket.display())
            }
        }
    }

    /// The next line; `None` when the member closed.
    async fn next_line(&mut self) -> Result<Option<Vec<u8>>> {
        match read_line(&mut self.reader, MAX_ANSWER).await? {
            Line::Text(line) => Ok(Some(line)),
            Line::Closed => Ok(None),
            Line::TooLong => bail!("the member API sent a line longer than {MAX_ANSWER} bytes"),
        }
    }
}

/// Bounds `run` by [`ANSWER_TIMEOUT`].
async fn in_time<T>(socket: &Path, run: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(ANSWER_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow!(
                "the member API at {} did not answer in {} s",
                socket.display(),
                ANSWER_TIMEOUT.as_secs()
            )
        })?
}

/// Reserves `count` sequence numbers from the member at `socket`.
pub(crate) async fn reserve(socket: &Path, count: u64) -> Result<Reservation> {
    in_time(socket, async {
        let mut connection = Connection::open(socket).await?;
        let request = format!("{{\"op\":\"reserve\",\"count\":{count}}}\n");
        let line = connection.ask(request.as_bytes(), socket).await?;
        parse_reservation(&line).map_err(|e| {
            anyhow!(
                "the member at {} reserved no sequence numbers: {e}",
                socket.display()
            )
        })
    })
    .await
}

/// The member's keys as they change.
pub(crate) struct Watch {
    connection: Connection,
}

impl Watch {
    /// Opens a watch on the member at `socket`; its first line (the current keys) is returned
    /// too, read at `now()`. An error if the member holds no key now.
    pub(crate) async fn open(socket: &Path, now: impl Fn() -> Millis) -> Result<(Self, Keys)> {
        in_time(socket, async {
            let mut connection = Connection::open(socket).await?;
            let line = connection.ask(b"{\"op\":\"watch\"}\n", socket).await?;
            let keys = parse_keys(&line, now())
                .map_err(|e| anyhow!("the member at {} has no key: {e}", socket.display()))?;
            Ok((Watch { connection }, keys))
        })
        .await
    }

    /// The next line: `Ok(Some(Ok(keys)))`, `Ok(Some(Err(why the member has no key)))`, or
    /// `Ok(None)` when the member closed the watch.
    pub(crate) async fn next(
        &mut self,
        now: impl Fn() -> Millis,
    ) -> Result<Option<Result<Keys, String>>> {
        let line = self
            .connection
            .next_line()
            .await
            .context("reading the member's key changes")?;
        Ok(line.map(|line| parse_keys(&line, now())))
    }
}
