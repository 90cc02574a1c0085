//! `gkm-member send` and `gkm-member recv`: a minimal application using the local API. `send`
//! encrypts one message under the current traffic key into a data frame and multicasts it;
//! `recv` joins the data group and prints each fresh, authentic message on a line.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, bail};
use lkh_tree::{Epoch, GroupId, TrafficKey};

use crate::api::{self, KeyInfo};
use crate::data::{Opened, Receiver, seal_frame};
use crate::net;

/// Settings shared by `send` and `recv`.
pub(crate) struct DataConfig {
    pub(crate) api_socket: PathBuf,
    pub(crate) data: SocketAddr,
    pub(crate) interface: Ipv4Addr,
    pub(crate) interface_v6: u32,
}

fn traffic_key(info: &KeyInfo) -> TrafficKey {
    TrafficKey::from_bytes(*info.key)
}

/// Sends `message` once.
pub(crate) async fn send(cfg: &DataConfig, sender: Option<u32>, message: &str) -> Result<()> {
    let info = api::query_current(&cfg.api_socket).await?;
    // A member id is `leaf << 32 | joined epoch`; the leaf is unique among the members holding
    // this epoch's key, so (sender, seq) nonces never collide between members.
    let sender = sender.unwrap_or_else(|| u32::try_from(info.member >> 32).unwrap_or(u32::MAX));
    let seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let frame = seal_frame(
        &traffic_key(&info),
        GroupId(info.group),
        Epoch(info.epoch),
        sender,
        seq,
        message.as_bytes(),
    )
    .map_err(anyhow::Error::msg)?;
    let socket = net::multicast_sender(cfg.data, cfg.interface, cfg.interface_v6).map_err(|e| {
        anyhow::anyhow!(
            "cannot open a multicast sender for {} ({e}); check --data",
            cfg.data
        )
    })?;
    socket
        .send_to(&frame, cfg.data)
        .await
        .map_err(|e| anyhow::anyhow!("cannot send to {} ({e}); check --data", cfg.data))?;
    eprintln!(
        "sent {} bytes to {} (epoch {}, sender {sender}, seq {seq})",
        message.len(),
        cfg.data,
        info.epoch
    );
    Ok(())
}

/// Receives until `count` messages arrived or `timeout` passed.
pub(crate) async fn recv(
    cfg: &DataConfig,
    count: Option<u64>,
    timeout: Option<Duration>,
) -> Result<()> {
    let socket =
        net::multicast_receiver(cfg.data, cfg.interface, cfg.interface_v6).map_err(|e| {
            anyhow::anyhow!(
                "cannot join the data group {} ({e}); check --data",
                cfg.data
            )
        })?;
    let info = api::query_current(&cfg.api_socket).await?;
    let mut receiver = Receiver::new(GroupId(info.group));
    receiver.add_key(Epoch(info.epoch), traffic_key(&info));
    eprintln!("recv: listening on {} at epoch {}", cfg.data, info.epoch);

    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let (mut accepted, mut undecryptable, mut replayed) = (0u64, 0u64, 0u64);
    let mut buf = vec![0u8; 65_536];
    while count.is_none_or(|c| accepted < c) {
        let received = match deadline {
            Some(d) => match tokio::time::timeout_at(d, socket.recv_from(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => socket.recv_from(&mut buf).await,
        };
        let Ok((n, _)) = received else { continue };
        let Some(bytes) = buf.get(..n) else { continue };
        if let Some(epoch) = receiver.epoch_of(bytes)
            && !receiver.has_key(epoch)
            && receiver.newest().is_none_or(|newest| epoch > newest)
        {
            // A newer epoch than we know: the member may have rekeyed since.
            if let Ok(info) = api::query_current(&cfg.api_socket).await {
                receiver.add_key(Epoch(info.epoch), traffic_key(&info));
            }
        }
        match receiver.open(bytes) {
            Opened::Message(plain) => {
                accepted += 1;
                println!("{}", String::from_utf8_lossy(&plain));
            }
            Opened::Replayed => replayed += 1,
            Opened::OtherGroup => {}
            Opened::Undecryptable | Opened::TooManySenders => undecryptable += 1,
        }
    }
    eprintln!("undecryptable: {undecryptable}");
    if replayed > 0 {
        eprintln!("replayed: {replayed}");
    }
    if let Some(c) = count
        && accepted < c
    {
        bail!(
            "received {accepted} of {c} messages before the timeout; check that senders use \
             the same group and --data address, or raise --timeout-ms"
        );
    }
    Ok(())
}
