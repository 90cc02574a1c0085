//! `gkm-member send` and `gkm-member recv`: a minimal application using the local API. `send`
//! reserves one sequence number, seals one message under the send key into a data frame and
//! multicasts it; `recv` joins the data group, follows the member's keys through `watch` and
//! prints each fresh, authentic message on a line.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use gkm_member::Millis;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::api_client::{self, Keys, Watch};
use crate::data::{Opened, Receiver, seal_frame};
use crate::net;

/// Settings shared by `send` and `recv`.
pub(crate) struct DataConfig {
    pub(crate) api_socket: PathBuf,
    pub(crate) data: SocketAddr,
    pub(crate) interface: Ipv4Addr,
    pub(crate) interface_v6: u32,
}

/// How long `recv` waits before watching again when the member closed its watch.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// Sends `message` once, with a sequence number reserved from the member.
pub(crate) async fn send(cfg: &DataConfig, message: &str) -> Result<()> {
    let block = api_client::reserve(&cfg.api_socket, 1).await?;
    let frame = seal_frame(
        &block.key,
        block.group,
        block.epoch,
        block.sender,
        block.first,
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
        "sent {} bytes to {} (epoch {}, sender {}, seq {})",
        message.len(),
        cfg.data,
        block.epoch,
        block.sender,
        block.first
    );
    Ok(())
}

/// What became of the datagrams `recv` received.
#[derive(Default)]
struct Counts {
    accepted: u64,
    undecryptable: u64,
    replayed: u64,
    retired: u64,
}

impl Counts {
    fn report(&self) {
        eprintln!("undecryptable: {}", self.undecryptable);
        if self.replayed > 0 {
            eprintln!("replayed: {}", self.replayed);
        }
        if self.retired > 0 {
            eprintln!(
                "retired: {} (frames under a key the member no longer accepts)",
                self.retired
            );
        }
    }
}

/// The receiving side's clock: milliseconds since `recv` started, never going back.
fn clock(start: Instant) -> impl Fn() -> Millis + Copy {
    move || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Takes a watch line: the keys it names, or none at all when the member has none.
fn follow(receiver: &mut Receiver, now: Millis, line: Result<Keys, String>) {
    match line {
        Ok(keys) => {
            receiver.follow(
                now,
                keys.accept.iter().map(|k| (k.epoch, &k.key, k.drop_at)),
            );
            let epochs: Vec<String> = keys.accept.iter().map(|k| k.epoch.to_string()).collect();
            eprintln!(
                "recv: accepting epochs {} (the member sends under {})",
                epochs.join(", "),
                keys.send_epoch
            );
        }
        Err(e) => {
            receiver.clear();
            eprintln!("recv: the member holds no key ({e}); refusing every frame until it does");
        }
    }
}

/// Waits for the next watch line; pending forever without a watch.
async fn next_line(
    watch: &mut Option<Watch>,
    now: impl Fn() -> Millis,
) -> Result<Option<Result<Keys, String>>> {
    match watch {
        Some(w) => w.next(now).await,
        None => std::future::pending().await,
    }
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
    let start = Instant::now();
    let now = clock(start);
    let (watch, keys) = Watch::open(&cfg.api_socket, now).await?;
    let mut receiver = Receiver::new(keys.group);
    eprintln!("recv: listening on {} at epoch {}", cfg.data, keys.epoch);
    follow(&mut receiver, now(), Ok(keys));
    let until = Until {
        count,
        deadline: timeout.map(|t| start + t),
    };
    let counts = receive(cfg, &socket, &mut receiver, watch, &until, now).await;
    counts.report();
    if let Some(c) = count
        && counts.accepted < c
    {
        bail!(
            "received {} of {c} messages before the timeout; check that senders use \
             the same group and --data address, or raise --timeout-ms",
            counts.accepted
        );
    }
    Ok(())
}

/// When `recv` stops.
struct Until {
    /// After this many messages.
    count: Option<u64>,
    /// At this time.
    deadline: Option<Instant>,
}

/// The receive loop: datagrams, the member's key changes, and a new watch when the member
/// closed the last one (it restarted), until enough messages or the deadline.
async fn receive(
    cfg: &DataConfig,
    socket: &UdpSocket,
    receiver: &mut Receiver,
    watch: Watch,
    until: &Until,
    now: impl Fn() -> Millis + Copy,
) -> Counts {
    let mut watch = Some(watch);
    let mut rewatch_at = None;
    let mut counts = Counts::default();
    let mut buf = vec![0u8; 65_536];
    while until.count.is_none_or(|c| counts.accepted < c) {
        tokio::select! {
            () = sleep_until(until.deadline) => break,
            () = sleep_until(rewatch_at), if rewatch_at.is_some() => {
                rewatch_at = None;
                match Watch::open(&cfg.api_socket, now).await {
                    Ok((w, keys)) => {
                        follow(receiver, now(), Ok(keys));
                        watch = Some(w);
                    }
                    Err(e) => {
                        eprintln!("recv: {e:#}; trying again");
                        rewatch_at = Some(Instant::now() + REWATCH_AFTER);
                    }
                }
            }
            line = next_line(&mut watch, now) => match line {
                Ok(Some(line)) => follow(receiver, now(), line),
                Ok(None) | Err(_) => {
                    eprintln!("recv: the member closed its key watch; watching again");
                    watch = None;
                    rewatch_at = Some(Instant::now() + REWATCH_AFTER);
                }
            },
            received = socket.recv_from(&mut buf) => {
                let Ok((n, _)) = received else { continue };
                let Some(bytes) = buf.get(..n) else { continue };
                tally(&mut counts, receiver.open(now(), bytes));
            }
        }
    }
    counts
}

/// Counts one datagram; prints a message.
fn tally(counts: &mut Counts, opened: Opened) {
    match opened {
        Opened::Message(plain) => {
            counts.accepted += 1;
            println!("{}", String::from_utf8_lossy(&plain));
        }
        Opened::Replayed => counts.replayed += 1,
        Opened::Retired => {
            counts.retired += 1;
            tracing::debug!("refused a frame under a key the member no longer accepts");
        }
        Opened::OtherGroup => {}
        Opened::Undecryptable | Opened::TooManySenders => counts.undecryptable += 1,
    }
}

/// Sleeps until `at`; never returns for `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
