//! `gkm-member run`: the driver around the sans-I/O [`gkm_member::Member`].
//!
//! ```text
//! loop: rekey/heartbeat datagram (multicast or fan-out) -> handle_datagram
//!       reply on a request's TCP connection              -> handle_reply
//!       request undelivered or unanswered (5 s)           -> next controller, handle_unreachable
//!       timer                                            -> handle_timeout
//!       key schedule timer (activation, deactivation) -> KeySchedule::handle_timeout
//!       then: each poll_event published on the API and logged (NotLeader: ask the named
//!             leader if configured, else the next controller); each poll_request on its own
//!             TCP connection (5 s) to the current controller; the membership file written (key
//!             changes coalesced, 30-60 s later); sleep until poll_timeout
//!       SIGTERM/SIGINT: leave(), send the leave request (following redirects, 10 s at most),
//!             exit 0
//! ```
//!
//! Controllers: `--controller` is repeatable ([`Controllers`]). Requests and fan-out
//! subscriptions go to the current one. It changes when the controller says it does not lead
//! the group (to the leader it names if that is a configured controller, else to the next), when
//! a request cannot be delivered or is not answered in 5 s, and when the member asks again while
//! the previous request is still unanswered.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use gkm_member::controllers::Controllers;
use gkm_member::data_keys::{KeyDelays, KeySchedule};
use gkm_member::{Member, MemberConfig, MemberEvent, Millis};
use lkh_tree::GroupId;
use rand_chacha::ChaCha20Rng;
use rand_core::Rng;
use tokio::net::{TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use wire::{Kem, Status};

use crate::api::{self, KeyInfo};
use crate::framing;
use crate::net;
use crate::seq::{SequenceFile, Sequences};
use crate::signing_file;
use crate::store::{self, StateDir};

/// How long a request connection may take, from connect to reply.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A request still unanswered this long when the member asks again counts as unanswered by
/// its controller (the next request goes to the next one); a shorter wait is two requests
/// queued together.
const UNANSWERED: Duration = Duration::from_secs(1);
/// How long a member stopping waits for its leave to be acknowledged, across controllers.
const LEAVE_LIMIT: Duration = Duration::from_secs(10);
/// Where rekeys are awaited until the controller names the group's address.
const DEFAULT_MULTICAST: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    Ipv4Addr::new(239, 255, 77, 1),
    47701,
));

/// Settings of `run`.
pub(crate) struct RunConfig {
    /// `--controller`, in order (at least one).
    pub(crate) controllers: Vec<String>,
    pub(crate) group: String,
    pub(crate) controller_key: String,
    pub(crate) state_dir: PathBuf,
    /// The KEM of the HPKE key the member registers with.
    pub(crate) kem: Kem,
    /// Given on the command line; else the controller's word, [`DEFAULT_MULTICAST`] until then.
    pub(crate) multicast: Option<SocketAddr>,
    pub(crate) interface: Ipv4Addr,
    pub(crate) interface_v6: u32,
    pub(crate) api_socket: Option<PathBuf>,
    pub(crate) token: Option<String>,
    pub(crate) no_multicast: bool,
    pub(crate) renew_ms: Option<u64>,
    /// Switch to fan-out after this long without multicast (once admitted).
    pub(crate) fanout_after: Option<Duration>,
    /// Key changes are written to the membership file `save_after_ms` to twice that after they
    /// happen, several in one write. Every member of a group changes keys at once, and writing
    /// the file (a new inode each time) costs more than verifying and applying the rekey:
    /// written after each change, the files of 300 agents sharing a 2-core host added about
    /// 10 ms to the p99 of `gkm-demo --evict-latency`, and it wears flash storage. A member
    /// restarted from an older file resyncs at once. A new membership is written at once.
    pub(crate) save_after_ms: u64,
    /// When applications switch to a new key and stop accepting the previous one.
    pub(crate) delays: KeyDelays,
}

/// Milliseconds of a clock that never goes back (since its first reading in this process): the
/// key schedule's and the API's. A wall clock stepped back must not keep an old key alive.
pub(crate) fn mono_ms() -> Millis {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where rekeys come from.
enum Rekeys {
    Multicast(UdpSocket),
    /// The controller sends to this socket's address as long as we ask every renewal period.
    Fanout(UdpSocket),
}

impl Rekeys {
    fn socket(&self) -> &UdpSocket {
        match self {
            Rekeys::Multicast(s) | Rekeys::Fanout(s) => s,
        }
    }
}

/// Runs the member until SIGTERM or SIGINT.
pub(crate) async fn run(cfg: RunConfig) -> Result<()> {
    let dir = StateDir::new(&cfg.state_dir);
    if !dir.initialized() {
        let public = dir.init(cfg.kem)?;
        info!(
            "initialized {}: identity public key {}",
            cfg.state_dir.display(),
            hex::encode(public.as_bytes())
        );
    }
    let (identity, hpke, made) = dir.load_keys(cfg.kem)?;
    if made {
        info!(
            "made a new {} HPKE key in {}: the member registers with it (--kem)",
            cfg.kem,
            cfg.state_dir.display()
        );
    }
    info!(
        "identity public key {}",
        hex::encode(identity.verifying_key().as_bytes())
    );
    let controller_key = parse_controller_key(&cfg.controller_key)?;
    let group = GroupId::from_name(&cfg.group);
    let controllers = resolve_all(&cfg.controllers).await?;
    let controller = controllers.current();
    if controllers.all().len() > 1 {
        let list: Vec<String> = controllers.all().iter().map(ToString::to_string).collect();
        info!("controllers {}: asking {controller} first", list.join(", "));
    }
    let mut config = MemberConfig::new(group, controller_key);
    config.controllers = controllers.all().len();
    if let Some(token) = &cfg.token {
        config.token = token.as_bytes().to_vec();
    }
    if let Some(ms) = cfg.renew_ms {
        config.renew_interval_ms = ms;
    }
    config.fanout_after_ms = cfg
        .fanout_after
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));

    let listening = cfg.multicast.unwrap_or(DEFAULT_MULTICAST);
    let rekeys = if cfg.no_multicast {
        Rekeys::Fanout(net::fanout_socket(controller).await?)
    } else {
        match net::multicast_receiver(listening, cfg.interface, cfg.interface_v6) {
            Ok(s) => {
                info!("listening for rekeys on multicast {listening}");
                Rekeys::Multicast(s)
            }
            Err(e) => {
                warn!(
                    "joining multicast group {listening} failed ({e}); asking the controller \
                     {controller} for fan-out instead"
                );
                Rekeys::Fanout(net::fanout_socket(controller).await?)
            }
        }
    };

    let (mark, unvouched) = sequence_mark(&dir);
    let api_path = cfg.api_socket.clone().unwrap_or_else(|| dir.api_socket());
    let listener = api::bind(&api_path)?;
    let (keys_tx, keys_rx) = watch::channel::<Option<KeyInfo>>(None);
    let sequences = Sequences::new(mark, Box::new(SequenceFile::new(&cfg.state_dir)));
    let sequences = Arc::new(Mutex::new(sequences));
    tokio::spawn(api::serve(
        listener,
        api::Shared {
            keys: keys_rx,
            sequences: Arc::clone(&sequences),
            clock: Arc::new(mono_ms),
        },
    ));
    info!("local API on {}", api_path.display());

    let now = now_ms();
    let start = Start {
        config,
        identity: identity.clone(),
        hpke,
        rng: store::os_rng()?,
        now,
        controller,
        group_name: cfg.group.clone(),
    };
    let mut member = start_member(&dir, group, start, unvouched.as_deref())?;
    restore_signing_keys(&dir, &mut member);
    if unvouched.is_some() {
        // Only now that no stored membership is left: a mark written before it was dropped
        // would vouch for its keys after a crash in between.
        save_first_mark(&sequences, &dir);
    }
    if matches!(rekeys, Rekeys::Fanout(_)) {
        member.use_fanout(now);
    }

    let mut driver = Driver {
        member,
        controllers,
        group,
        group_name: cfg.group.clone(),
        dir,
        keys: keys_tx,
        side_rng: store::os_rng()?,
        rekeys,
        multicast: Multicast {
            given: cfg.multicast,
            listening,
            told: None,
            interface: cfg.interface,
            interface_v6: cfg.interface_v6,
        },
        outcomes: mpsc::channel(64),
        sent: 0,
        in_flight: None,
        stop: None,
        left: false,
        save_after_ms: cfg.save_after_ms,
        persist_at: None,
        published: false,
        schedule: KeySchedule::new(cfg.delays),
    };
    driver.publish(false);
    let result = driver.run().await;
    let _ = std::fs::remove_file(&api_path);
    result
}

/// The sequence counter's high-water mark (0 without one), and why it cannot vouch for the keys
/// a stored membership holds, if it cannot: without the file (a release before it, or deleted)
/// or with a damaged one, the numbers an earlier run handed out under those keys are unknown.
fn sequence_mark(dir: &StateDir) -> (u64, Option<String>) {
    match dir.load_sequence() {
        Ok(Some(mark)) => (mark, None),
        Ok(None) => (
            0,
            Some(format!("{} does not exist", dir.sequence_path().display())),
        ),
        Err(e) => (0, Some(format!("{e:#}"))),
    }
}

/// Writes the sequence file of a run that found none (or a damaged one).
fn save_first_mark(sequences: &Mutex<Sequences>, dir: &StateDir) {
    let saved = match sequences.lock() {
        Ok(mut sequences) => sequences.save_mark(),
        Err(_) => Err(anyhow::anyhow!("the counter is unusable")),
    };
    if let Err(e) = saved {
        warn!(
            "cannot write {} ({e:#}); applications cannot reserve sequence numbers, and a \
             restart will register anew",
            dir.sequence_path().display()
        );
    }
}

/// What a member is made of.
struct Start {
    config: MemberConfig,
    identity: ed25519_dalek::SigningKey,
    hpke: wire::HpkeSecret,
    rng: ChaCha20Rng,
    now: Millis,
    /// For the log: where it registers, and the group's name.
    controller: SocketAddr,
    group_name: String,
}

/// The member: resuming the stored membership, or registering. A stored membership is not
/// resumed when the sequence counter cannot vouch for its keys (`unvouched` says why): this
/// agent may have handed out numbers under them that it no longer knows, so it registers anew
/// and gets keys no application of it ever sealed under.
fn start_member(
    dir: &StateDir,
    group: GroupId,
    s: Start,
    unvouched: Option<&str>,
) -> Result<Member<ChaCha20Rng>> {
    match dir.load_membership(group) {
        Ok(Some(_)) if unvouched.is_some() => {
            warn!(
                "{}: the sequence numbers used under the stored membership's keys are unknown; \
                 registering anew, for keys never sealed under",
                unvouched.unwrap_or_default()
            );
            dir.remove_membership();
            Ok(Member::new(s.config, s.identity, s.hpke, s.rng, s.now))
        }
        Ok(Some((_, _, kem))) if kem != s.hpke.kem() => {
            info!(
                "the stored membership was made with this member's {kem} key; registering \
                 again with its {} key (--kem)",
                s.hpke.kem()
            );
            dir.remove_membership();
            Ok(Member::new(s.config, s.identity, s.hpke, s.rng, s.now))
        }
        Ok(Some((id, path, _))) => {
            info!(
                "resuming membership {} at epoch {} from {}",
                id.0,
                path.epoch(),
                dir.membership_path().display()
            );
            Ok(Member::resume(
                s.config, s.identity, s.hpke, s.rng, id, path, s.now,
            ))
        }
        Ok(None) => {
            info!(
                "registering with controller {} for group {}",
                s.controller, s.group_name
            );
            Ok(Member::new(s.config, s.identity, s.hpke, s.rng, s.now))
        }
        Err(e) if e.is::<store::Unauthentic>() => Err(e.context(
            "refusing to use it, or to register anew over it: restore the storage.key it was \
             sealed under, or delete the membership file to register anew",
        )),
        Err(e) => {
            warn!("{e:#}; registering anew");
            dir.remove_membership();
            Ok(Member::new(s.config, s.identity, s.hpke, s.rng, s.now))
        }
    }
}

/// Continues from the controller's signing keys the member followed before it stopped, unless
/// the operator pinned another key since (then the member starts over from that one).
fn restore_signing_keys(dir: &StateDir, member: &mut Member<ChaCha20Rng>) {
    match signing_file::load(dir) {
        Ok(Some(keys)) => {
            let current = hex::encode(keys.current().as_bytes());
            if member.restore_signing_keys(keys) {
                info!(
                    "verifying with the controller's signing key {current}, followed from the pinned one"
                );
            } else {
                info!(
                    "--controller-key is not the key {} started from: following the group's \
                     signing keys from the new one",
                    signing_file::path(dir).display()
                );
            }
        }
        Ok(None) => {}
        Err(e) => warn!("{e:#}; following the group's signing keys from --controller-key"),
    }
}

/// Where the member listens for multicast rekeys, and what it was told.
struct Multicast {
    /// `--multicast`, kept whatever the controller says.
    given: Option<SocketAddr>,
    /// The address the receiver joined (or would have).
    listening: SocketAddr,
    /// The controller's word last acted on.
    told: Option<SocketAddr>,
    interface: Ipv4Addr,
    interface_v6: u32,
}

/// What became of a request sent to a controller.
struct Outcome {
    /// The request's number (see [`Driver::sent`]).
    request: u64,
    /// Where it went.
    controller: SocketAddr,
    /// The reply, or why there is none.
    reply: Result<Vec<u8>, String>,
}

struct Driver {
    member: Member<ChaCha20Rng>,
    /// The configured controllers and the one asked now.
    controllers: Controllers,
    group: GroupId,
    /// The group as given by `--group`.
    group_name: String,
    dir: StateDir,
    keys: watch::Sender<Option<KeyInfo>>,
    side_rng: ChaCha20Rng,
    rekeys: Rekeys,
    multicast: Multicast,
    outcomes: (mpsc::Sender<Outcome>, mpsc::Receiver<Outcome>),
    /// How many requests were sent: the number of the newest, whose outcome alone counts.
    sent: u64,
    /// The request in flight, and when it was sent. A newer one supersedes it: the member takes
    /// only the newest request's reply, so the older connection is closed rather than left to
    /// wait.
    in_flight: Option<(tokio::task::JoinHandle<()>, tokio::time::Instant)>,
    /// Set when the controller acknowledged the member's leave.
    left: bool,
    /// Set when the controller said no request of this member can succeed (no such group, or
    /// not its KEM): the daemon stops with this message.
    stop: Option<String>,
    /// Key changes are written this long to twice this long after they happen.
    save_after_ms: u64,
    /// When the membership file is next written: it changed since it was last written.
    persist_at: Option<tokio::time::Instant>,
    /// A key change was published to the API since the loop last yielded.
    published: bool,
    /// Which key applications send with and which they accept (monotonic clock).
    schedule: KeySchedule,
}

impl Driver {
    async fn run(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        let mut buf = vec![0u8; 65_536];
        loop {
            self.drain();
            if let Some(reason) = self.stop.take() {
                bail!("{reason}");
            }
            self.send_datagrams().await;
            if std::mem::take(&mut self.published) {
                // Applications hear of a new key first: the API tasks (woken by `publish`) write
                // it to their watchers before this task reads the next datagram or writes files.
                tokio::task::yield_now().await;
            }
            if self
                .persist_at
                .is_some_and(|at| at <= tokio::time::Instant::now())
            {
                self.persist_at = None;
                self.persist();
            }
            let persist_at = self.persist_at;
            let schedule_in = self
                .schedule
                .poll_timeout()
                .map(|at| Duration::from_millis(at.saturating_sub(mono_ms())));
            let sleep = self
                .member
                .poll_timeout()
                .map_or(Duration::from_secs(3600), |at| {
                    Duration::from_millis(at.saturating_sub(now_ms()))
                });
            tokio::select! {
                received = self.rekeys.socket().recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        debug!("datagram of {n} bytes from {from}");
                        if let Some(bytes) = buf.get(..n) {
                            self.member.handle_datagram(now_ms(), bytes);
                        }
                    }
                    Err(e) => debug!("receiving a datagram failed: {e}"),
                },
                Some(outcome) = self.outcomes.1.recv() => self.outcome(outcome),
                () = tokio::time::sleep(sleep) => self.member.handle_timeout(now_ms()),
                () = sleep_until_some(persist_at), if persist_at.is_some() => {}
                () = sleep_some(schedule_in), if schedule_in.is_some() => {
                    self.schedule.handle_timeout(mono_ms());
                    self.publish(true);
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
        }
        self.leave().await;
        Ok(())
    }

    /// Handles queued events (which may change the controller), then sends queued requests.
    fn drain(&mut self) {
        while let Some(event) = self.member.poll_event() {
            self.event(event);
        }
        while let Some(request) = self.member.poll_request() {
            if let Some((older, sent_at)) = self.in_flight.take() {
                if !older.is_finished() && sent_at.elapsed() >= UNANSWERED {
                    // The member asks again before the controller answered: ask the next one.
                    self.switch(Controllers::advance, "has not answered");
                }
                older.abort();
            }
            self.sent += 1;
            let (number, controller) = (self.sent, self.controllers.current());
            let outcomes = self.outcomes.0.clone();
            let task = tokio::spawn(async move {
                let reply = match tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    request_reply(controller, &request),
                )
                .await
                {
                    Ok(Ok(reply)) => Ok(reply),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer in {} s", REQUEST_TIMEOUT.as_secs())),
                };
                let _ = outcomes
                    .send(Outcome {
                        request: number,
                        controller,
                        reply,
                    })
                    .await;
            });
            self.in_flight = Some((task, tokio::time::Instant::now()));
        }
    }

    /// A request's reply to the member; a failure moves to the next controller. Outcomes of
    /// superseded requests are dropped (the member takes only the newest request's reply).
    fn outcome(&mut self, outcome: Outcome) {
        if outcome.request != self.sent {
            debug!("dropping the outcome of a superseded request");
            return;
        }
        match outcome.reply {
            Ok(reply) => self.member.handle_reply(now_ms(), &reply),
            Err(e) => {
                warn!("request to controller {} failed: {e}", outcome.controller);
                self.switch(Controllers::advance, "cannot be reached");
                self.member.handle_unreachable(now_ms());
            }
        }
    }

    /// Moves to the controller `choose` picks, if it picks another, saying why the current one
    /// is left (`why`, after its address).
    fn switch(&mut self, choose: impl FnOnce(&mut Controllers) -> Option<SocketAddr>, why: &str) {
        let from = self.controllers.current();
        match choose(&mut self.controllers) {
            Some(to) if to != from => {
                info!(
                    "controller {from} {why} for group {}; asking {to}",
                    self.group_name
                );
                self.member.controller_changed(now_ms());
            }
            _ => debug!("controller {from} {why}; it is the only one to ask"),
        }
    }

    fn event(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Joined { member, epoch, kcv } => {
                println!(
                    "joined as member {} epoch {epoch} kcv {}",
                    member.0,
                    hex::encode(kcv.0)
                );
                info!(
                    "joined as member {} at epoch {epoch}, kcv {}",
                    member.0,
                    hex::encode(kcv.0)
                );
                // Applications get the key first; the membership file follows (in `run`).
                self.publish(false);
                self.persist_within(Duration::ZERO);
                self.follow_rekey_address();
            }
            MemberEvent::KeyChanged { epoch, kcv } => {
                self.follow_rekey_address();
                self.publish(false);
                println!("epoch {epoch} kcv {}", hex::encode(kcv.0));
                info!("key changed: epoch {epoch}, kcv {}", hex::encode(kcv.0));
                let jitter = self.side_rng.next_u64() % self.save_after_ms.max(1);
                let delay = self.save_after_ms.saturating_add(jitter);
                self.persist_within(Duration::from_millis(delay));
            }
            MemberEvent::MembershipEnded { reason } => {
                warn!(
                    "membership ended: the controller says \"{}\"; registering again",
                    reason.escape_debug()
                );
                self.dir.remove_membership();
            }
            MemberEvent::FanoutStarted => warn!(
                "no verified rekey or heartbeat by multicast for {} ms: switching to unicast \
                 fan-out from controller {}",
                self.member_silence_ms(),
                self.controllers.current()
            ),
            MemberEvent::OtherWireVersion { version } => warn!(
                "a message of gkm wire version {version} arrived and was dropped; this member \
                 speaks version {}: run the same gkm release on the controller and its members",
                wire::VERSION
            ),
            MemberEvent::GroupUnknown { reason } => {
                self.dir.remove_membership();
                self.stop = Some(format!(
                    "controller {} has no group {:?} (id {}; it says \"{}\"): the group was \
                     removed or was never configured there; check --group against the NAME \
                     column of `gkmctl groups` on the controller",
                    self.controllers.current(),
                    self.group_name,
                    self.group.0,
                    reason.escape_debug()
                ));
            }
            MemberEvent::KemNotAccepted { ours, reason } => {
                let other = Kem::ALL.into_iter().find(|k| *k != ours).unwrap_or(ours);
                self.stop = Some(format!(
                    "controller {} does not take this member's {ours} key for group {:?} (it \
                     says \"{}\"): run gkm-member with --kem {other} (it makes that key and \
                     registers again), or have the controller's operator accept {ours} keys \
                     (kem = [\"{ours}\", ...] in the group's config, or `gkmctl policy {} --set \
                     kem=...`)",
                    self.controllers.current(),
                    self.group_name,
                    reason.escape_debug(),
                    self.group_name,
                ));
            }
            MemberEvent::SigningKeyChanged { key_id, from_epoch } => {
                info!(
                    "the controller's signing key for group {} is now key {key_id} ({}), from \
                     epoch {from_epoch}: announced and signed by the key before",
                    self.group_name,
                    hex::encode(self.member.signing_keys().current().as_bytes())
                );
                if let Err(e) = signing_file::save(&self.dir, self.member.signing_keys()) {
                    warn!("{e:#}; after a restart the member asks for the chain again");
                }
            }
            MemberEvent::SigningKeyUnknown { reason } => {
                self.stop = Some(format!(
                    "controller {} keeps no chain of announcements from the signing key this \
                     member holds ({}) for group {:?} (it says \"{}\"): the key was replaced \
                     more often than the controller keeps, or --controller-key is not the \
                     group's. Give the member the controller's current key (`gkmctl status` \
                     on the controller lists each group's key) with --controller-key",
                    self.controllers.current(),
                    hex::encode(self.member.signing_keys().current().as_bytes()),
                    self.group_name,
                    reason.escape_debug()
                ));
            }
            MemberEvent::NotLeader {
                leader,
                retry_in_ms,
            } => self.not_leader(leader, retry_in_ms),
            MemberEvent::Left { refused: None } => self.left = true,
            MemberEvent::Left {
                refused: Some((status, reason)),
            } => warn!(
                "the controller refused the leave: {status} \"{}\"; the lease will expire",
                reason.escape_debug()
            ),
            MemberEvent::Refused {
                status,
                reason,
                retry_in_ms,
            } => {
                let hint = if status == Status::Unauthorized {
                    "; the group admits listed identity keys and enrollment tokens only: ask its \
                     operator to list this member's identity key (logged at start) or for a \
                     token (--token-file)"
                } else {
                    ""
                };
                warn!(
                    "controller refused the request: {status} \"{}\"{hint}; asking again in {} s",
                    reason.escape_debug(),
                    retry_in_ms.div_ceil(1_000)
                );
            }
        }
        self.publish(false);
    }

    /// The current controller does not lead the group: ask the leader it names if that is a
    /// configured controller (the answer is unsigned: an address of anyone else's choosing is
    /// not followed), else the next one.
    fn not_leader(&mut self, leader: Option<SocketAddr>, retry_in_ms: u64) {
        let from = self.controllers.current();
        if let Some(named) = leader.filter(|l| !self.controllers.contains(*l)) {
            info!(
                "controller {from} names {named} as the leader of group {}, which is not one of \
                 the --controller addresses; not following it (pass every controller with \
                 --controller)",
                self.group_name
            );
        }
        match self.controllers.not_leader(leader) {
            Some(to) => {
                info!(
                    "controller {from} does not lead group {}; asking {to}",
                    self.group_name
                );
                self.member.controller_changed(now_ms());
            }
            None => info!(
                "controller {from} does not lead group {}; asking it again in {retry_in_ms} ms",
                self.group_name
            ),
        }
    }

    /// Feeds the member's key to the key schedule and publishes the API's view when it changed:
    /// a new key or membership, or none; with `force` (at a schedule timer: the send key changed
    /// or a key was dropped) in any case.
    fn publish(&mut self, force: bool) {
        let now = mono_ms();
        match (self.member.membership(), self.member.traffic_key()) {
            (Some((id, _)), Some((epoch, key))) => self.schedule.handle_key(now, id, epoch, &key),
            _ => self.schedule.clear(),
        }
        let info = match self.member.membership() {
            Some((id, path)) if self.schedule.newest().is_some() => Some(KeyInfo {
                group: path.group().0,
                member: id.0,
                applied: self.member.stats().applied,
                resyncs: self.member.stats().resyncs,
                schedule: self.schedule.clone(),
            }),
            _ => None,
        };
        let changed = force || {
            let old = self.keys.borrow();
            match (&*old, &info) {
                (Some(a), Some(b)) => a.member != b.member || !a.schedule.same_keys(&b.schedule),
                (None, None) => false,
                _ => true,
            }
        };
        if changed {
            self.keys.send_replace(info);
            self.published = true;
        }
    }

    /// Schedules writing the membership file within `delay` (or sooner, if already scheduled).
    fn persist_within(&mut self, delay: Duration) {
        let at = tokio::time::Instant::now() + delay;
        self.persist_at = Some(self.persist_at.map_or(at, |t| t.min(at)));
    }

    fn persist(&self) {
        if let Some((id, path)) = self.member.membership()
            && let Err(e) = self
                .dir
                .save_membership(self.group, id, path, self.member.kem())
        {
            warn!("cannot persist the membership: {e:#}; a restart will register again");
        }
    }

    /// Listens where the controller says the group's rekeys go, once it says (in a welcome or
    /// resync response), unless `--multicast` was given or the member is on fan-out.
    fn follow_rekey_address(&mut self) {
        let told = self.member.rekey_address();
        let m = &mut self.multicast;
        if told == m.told {
            return;
        }
        m.told = told;
        let Some(told) = told else {
            return;
        };
        if let Some(given) = m.given {
            if given != told {
                warn!(
                    "--multicast {given} was given, but the controller multicasts this group's \
                     rekeys to {told}; staying on {given}"
                );
            }
            return;
        }
        if told == m.listening || !matches!(self.rekeys, Rekeys::Multicast(_)) {
            return;
        }
        match net::multicast_receiver(told, m.interface, m.interface_v6) {
            Ok(socket) => {
                info!("the controller multicasts this group's rekeys to {told}: listening there");
                self.rekeys = Rekeys::Multicast(socket);
                m.listening = told;
            }
            Err(e) => warn!(
                "joining multicast group {told}, which the controller names, failed ({e}); \
                 staying on {}",
                m.listening
            ),
        }
    }

    fn member_silence_ms(&self) -> u64 {
        self.member.config().fanout_after_ms.unwrap_or_default()
    }

    /// Sends the member's datagrams for the controller (fan-out subscriptions), opening the
    /// fan-out socket first when the member moved to fan-out.
    async fn send_datagrams(&mut self) {
        let controller = self.controllers.current();
        let family_changed = |socket: &UdpSocket| {
            socket
                .local_addr()
                .is_ok_and(|local| local.is_ipv4() != controller.is_ipv4())
        };
        let reopen = match &self.rekeys {
            Rekeys::Multicast(_) => self.member.on_fanout(),
            // A controller of the other address family than the socket's.
            Rekeys::Fanout(socket) => family_changed(socket),
        };
        if reopen {
            match net::fanout_socket(controller).await {
                Ok(socket) => self.rekeys = Rekeys::Fanout(socket),
                Err(e) => warn!("cannot open a socket for fan-out ({e:#}); staying on multicast"),
            }
        }
        while let Some(bytes) = self.member.poll_datagram() {
            let Rekeys::Fanout(socket) = &self.rekeys else {
                continue;
            };
            match socket.send_to(&bytes, controller).await {
                Ok(_) => debug!("fan-out subscription sent to controller {controller}"),
                Err(e) => warn!("cannot send a fan-out subscription to {controller}: {e}"),
            }
        }
    }

    /// Leaves: sends the leave request to the current controller and follows redirects (to
    /// the leader, or past a controller that does not answer) for at most [`LEAVE_LIMIT`].
    async fn leave(&mut self) {
        if let Some((older, _)) = self.in_flight.take() {
            older.abort();
        }
        let had = self.member.membership().map(|(id, _)| id.0);
        self.member.leave(now_ms());
        let deadline = tokio::time::Instant::now() + LEAVE_LIMIT;
        while self.member.leaving() {
            while let Some(event) = self.member.poll_event() {
                self.event(event);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                warn!(
                    "the leave was not acknowledged within {} s; the lease will expire",
                    LEAVE_LIMIT.as_secs()
                );
                break;
            }
            let Some(request) = self.member.poll_request() else {
                // Redirected: the member asks again after a short delay.
                let at = self.member.poll_timeout().unwrap_or(u64::MAX);
                let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                tokio::time::sleep(wait.min(left)).await;
                self.member.handle_timeout(now_ms());
                continue;
            };
            let controller = self.controllers.current();
            match tokio::time::timeout(
                REQUEST_TIMEOUT.min(left),
                request_reply(controller, &request),
            )
            .await
            {
                Ok(Ok(reply)) => self.member.handle_reply(now_ms(), &reply),
                Ok(Err(e)) => {
                    warn!("leave request to controller {controller} failed: {e}");
                    self.switch(Controllers::advance, "cannot be reached");
                    self.member.handle_unreachable(now_ms());
                }
                Err(_) => {
                    warn!("controller {controller} did not answer the leave request in time");
                    self.switch(Controllers::advance, "has not answered");
                    self.member.handle_unreachable(now_ms());
                }
            }
        }
        while let Some(event) = self.member.poll_event() {
            self.event(event);
        }
        if let Some(id) = had.filter(|_| self.left) {
            info!("left the group (member {id})");
        }
        self.dir.remove_membership();
        self.keys.send_replace(None);
    }
}

/// Sleeps until `at`; never returns for `None`.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sleeps for `d`; never returns for `None`.
async fn sleep_some(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// One request on its own connection: frame out, frame back.
pub(crate) async fn request_reply(
    controller: SocketAddr,
    request: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(controller).await?;
    framing::write_frame(&mut stream, request).await?;
    framing::read_frame(&mut stream).await
}

fn parse_controller_key(hex_key: &str) -> Result<ed25519_dalek::VerifyingKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key.trim(), &mut bytes).map_err(|e| {
        anyhow::anyhow!(
            "--controller-key must be 64 hex digits (the controller's Ed25519 public key, as \
             `gkm-server init` prints it): {e}"
        )
    })?;
    wire::verifying_key(&bytes).map_err(|e| anyhow::anyhow!("--controller-key: {e}"))
}

/// Every address of every `--controller`, in order.
async fn resolve_all(names: &[String]) -> Result<Controllers> {
    let mut all = Vec::new();
    for name in names {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(name)
            .await
            .with_context(|| format!("cannot resolve controller address {name}; pass HOST:PORT"))?
            .collect();
        if addrs.is_empty() {
            bail!("controller address {name} resolves to nothing; pass HOST:PORT");
        }
        all.extend(addrs);
    }
    Controllers::new(all).context("no --controller given; pass one HOST:PORT per controller")
}
