//! The driver: tokio tasks do the I/O and the stateless checks; one thread owns the controller.
//!
//! ```text
//! tokio workers (one per core)            controller thread ("gkm-controller")
//!   accept, read frame                      loop: take the queue (or sleep until poll_timeout)
//!   member-signed: Lookup ──────────────►         signer_of (the member's identity key)
//!   MemberSigned::check (Ed25519) ◄─ key ─
//!   verify_request(bytes, rng) ─ Inbound ─►       handle_inbound / _command / _subscription for
//!   (Ed25519, the welcome's X25519,               everything queued, then handle_timeout
//!    any worker)                                  (a rekey is staged: poll_persist ──► store
//!   control lines, UDP subscriptions ───►         thread; prepare_staged signs meanwhile;
//!                                                 Persisted ──► handle_persisted commits it)
//!   write the reply         ◄── oneshot ──        drain poll_transmit: replies, multicast
//! ```
//!
//! The controller needs no lock: only its thread touches it. Its blocking work (sealing a
//! batch's welcomes) never stalls the tokio workers, so requests keep being read and their
//! signatures verified on every core meanwhile; the durable save of each rekey runs on the store
//! thread ("gkm-store"), so a slow store holds back only the group whose save it is. The queue (see
//! [`crate::queue`]) lets registrations wait for their group's scheduled batch without waking
//! the thread. Fan-out: a datagram on the request port's UDP socket is a subscription
//! ([`gkm_server::Controller::handle_subscription`]): answered with a cookie at its source, or,
//! echoing one, confirming the member's one fan-out address; every multicast datagram of the
//! group is then also sent by unicast to each confirmed address, by a thread of its own
//! ("gkm-fanout") so that the controller's thread does not wait on those sends.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::metrics::{CONTENT_TYPE, Exposition, Kind, label};
use getrandom::SysRng;
use gkm_server::control::{MAX_LINE, Reply, Request};
use gkm_server::{
    Command, CommandError, ConnId, Controller, Event, GroupInfo, Inbound, MemberSigned, Persist,
    Persisted, Response, Saving, Stats, Store, Subscription, Timestamp, Transmit,
};
use lkh_tree::GroupId;
use rand_core::UnwrapErr;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};

use crate::config::{Backend, Config, Interface};
use crate::queue::{ControllerQueue, MAX_QUEUED_OTHER, ToController};
use crate::state::StateDir;

/// Largest request frame: the largest request, a registration with the longest token, is 229
/// bytes; this leaves room for post-quantum HPKE keys (an X-Wing public key is 1,216 bytes) and
/// bounds what one connection may make the daemon hold (it was 64 KiB).
const MAX_FRAME: usize = 4_096;
/// How long a connection admitted by closing another waits for that one's slot.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// Connections the kernel completes before we accept them (capped by `net.core.somaxconn`). The
/// default of 128 overflows when a few hundred members connect at once while the workers are
/// verifying; each overflow costs that member a 1 s SYN retransmission.
const LISTEN_BACKLOG: u32 = 4_096;
/// Concurrent control connections.
const MAX_CONTROL: usize = 16;
/// Time to read one request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time allowed on a control connection between lines.
const CONTROL_IDLE: Duration = Duration::from_secs(300);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The controller thread's longest sleep when no timer is set.
const IDLE_WAIT: Duration = Duration::from_secs(3_600);

type OsRng = UnwrapErr<SysRng>;

/// Request connections still reading their request, by number (so oldest first). A member sends
/// its request as soon as it connects; connections that stay silent (slowloris) are the ones
/// closed when every slot is taken, so they cannot lock members out for a read timeout at a time.
///
/// A connection is added before its task is spawned and gets its task's handle just after: on
/// the multi-thread runtime the task may finish (and call [`Readers::done`]) in between, and an
/// entry added after that would stay forever.
#[derive(Clone, Default)]
struct Readers(Arc<std::sync::Mutex<BTreeMap<ConnId, Option<AbortHandle>>>>);

impl Readers {
    fn push(&self, conn: ConnId) {
        if let Ok(mut readers) = self.0.lock() {
            readers.insert(conn, None);
        }
    }

    /// Gives `conn`'s entry its task, unless the task is already done.
    fn attach(&self, conn: ConnId, task: AbortHandle) {
        if let Ok(mut readers) = self.0.lock()
            && let Some(entry) = readers.get_mut(&conn)
        {
            *entry = Some(task);
        }
    }

    /// `conn` has read its request (or given up).
    fn done(&self, conn: ConnId) {
        if let Ok(mut readers) = self.0.lock() {
            readers.remove(&conn);
        }
    }

    /// Closes the oldest connection still reading; whether there was one.
    fn close_oldest(&self) -> bool {
        let Ok(mut readers) = self.0.lock() else {
            return false;
        };
        let Some(conn) = readers
            .iter()
            .find_map(|(conn, task)| task.is_some().then_some(*conn))
        else {
            return false;
        };
        readers
            .remove(&conn)
            .flatten()
            .map(|task| task.abort())
            .is_some()
    }
}

/// The most messages the controller's queue holds with `max_connections` request connections:
/// one per connection, control connection and other message, and a stop.
fn queue_capacity(max_connections: usize) -> usize {
    max_connections + MAX_CONTROL + MAX_QUEUED_OTHER + 1
}

/// A group's multicast socket.
struct GroupNet {
    name: String,
    socket: UdpSocket,
    to: SocketAddr,
}

/// One datagram for the fan-out thread and where to send it.
type FanoutJob = (Arc<[u8]>, Vec<SocketAddr>);

/// Datagrams waiting for the fan-out thread; past this, a datagram's fan-out is dropped (its
/// repeats and the members' resyncs cover it).
const FANOUT_QUEUE: usize = 1_024;

/// Sends each job's datagram to each of its addresses, until the sender is dropped.
fn fanout_thread(udp: &UdpSocket, jobs: std::sync::mpsc::Receiver<FanoutJob>) {
    for (bytes, addresses) in jobs {
        for to in addresses {
            if let Err(e) = udp.send_to(&bytes, to) {
                debug!("fan-out send to {to} failed: {e}");
            }
        }
    }
}

/// Makes each save the controller asks for, in order, and hands its outcome back through the
/// controller's queue, until the sender is dropped.
fn store_thread(
    mut store: Box<dyn Store + Send>,
    jobs: std::sync::mpsc::Receiver<Persist>,
    queue: &ControllerQueue,
) {
    for persist in jobs {
        let done = write_caught(persist, store.as_mut());
        if !queue.send(ToController::Persisted(done)) {
            return;
        }
    }
}

/// Makes `persist` durable in `store`. A store that panics fails this save and no other: the
/// controller undoes the rekey.
pub(crate) fn write_caught(persist: Persist, store: &mut (dyn Store + Send)) -> Persisted {
    let ticket = persist.ticket;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| persist.write(store)))
        .unwrap_or_else(|_| failed(ticket, "the store panicked"))
}

/// The outcome of save `ticket` that could not be made.
fn failed(ticket: gkm_server::PersistTicket, why: &str) -> Persisted {
    Persisted {
        ticket,
        result: Err(gkm_server::StoreError::Backend(why.into())),
        compacting: false,
        compaction_failures: Vec::new(),
        compaction_deferred: false,
    }
}

/// A command waiting for the controller's outstanding saves, or for its own.
enum Held {
    /// Not yet handled.
    Command(Command, oneshot::Sender<Reply>),
    /// A metrics scrape (it reads every group).
    Metrics(oneshot::Sender<String>),
    /// Handled; answered once the saves it asked for are reported.
    Answer(Answer),
}

/// A handled command's answer, and, for one that rekeys, the group's rekeys committed before it:
/// it is done once another is (with batching, at the end of the batch), or the group is no
/// longer led here, or its save failed.
struct Answer {
    saving: Option<Saving>,
    rekeys_before: Option<u64>,
    outcome: Result<Response, CommandError>,
    reply: oneshot::Sender<Reply>,
}

impl Answer {
    /// Whether it still waits for its group's rekey.
    fn waits(&self, controller: &Controller<OsRng>) -> bool {
        let Some(saving) = self.saving.as_ref().filter(|s| s.rekey) else {
            return false;
        };
        self.outcome.is_ok()
            && self.rekeys_before.is_some()
            && controller.rekeys_done(&saving.group) == self.rekeys_before
            && controller.save_failure(&saving.group).is_none()
    }

    fn send(self, controller: &Controller<OsRng>) {
        let outcome = controller.settle(self.saving, self.outcome);
        let _ = self.reply.send(Reply::from_outcome(outcome));
    }
}

/// The controller thread's state.
struct Driver {
    controller: Controller<OsRng>,
    /// The store thread's jobs; `None` once stopping.
    saves: Option<std::sync::mpsc::Sender<Persist>>,
    /// The store thread.
    store_thread: Option<std::thread::JoinHandle<()>>,
    /// High availability: the lease keeper and the follower.
    cluster: Option<crate::cluster::Threads>,
    /// High availability: the groups led here, with their terms and their leases' local
    /// deadlines (past one, the group is given up).
    leases: HashMap<GroupId, (u64, Instant)>,
    /// Commands and scrapes held while a save is outstanding (they must not read a staged
    /// rekey), in arrival order.
    held: std::collections::VecDeque<Held>,
    /// Answers of commands waiting for their group's batch to be rekeyed.
    awaiting: Vec<Answer>,
    /// Every configured group's policy (high availability: a group this controller comes to
    /// lead is served under it).
    policies: HashMap<GroupId, gkm_server::GroupPolicy>,
    groups: HashMap<GroupId, GroupNet>,
    /// The request port's UDP socket (a clone of the one the subscription task reads).
    udp: UdpSocket,
    /// Datagrams for the fan-out thread.
    fanout: std::sync::mpsc::SyncSender<FanoutJob>,
    pending: HashMap<ConnId, oneshot::Sender<Vec<u8>>>,
    /// Pending replies are pruned of closed connections when there are this many.
    prune_at: usize,
    audit: BufWriter<File>,
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the groups' policies from
/// `reload_from` ([`crate::reload`]). Tells systemd when it is ready and when it stops
/// ([`crate::notify`]).
pub(crate) async fn serve(
    mut config: Config,
    reload_from: &Path,
    dir: &StateDir,
    allow_rollback: bool,
) -> Result<()> {
    let signer = dir.signer()?;
    let (policies, groups) = group_nets(&config)?;
    let (mut controller, backing) = match config.storage.backend {
        Backend::Redb => redb_controller(signer, dir, allow_rollback, policies.clone(), &groups)?,
        Backend::Postgres => postgres_controller(signer, dir, &config, &policies)?,
    };
    controller.set_workers(std::thread::available_parallelism().map_or(1, std::num::NonZero::get));

    let listener = request_listener(config.listen).with_context(|| {
        format!(
            "cannot listen on {} (in use? set `listen` in the config)",
            config.listen
        )
    })?;
    let udp = UdpSocket::bind(config.listen).with_context(|| {
        format!(
            "cannot bind UDP {} for fan-out subscriptions",
            config.listen
        )
    })?;
    udp.set_nonblocking(true)?;
    let udp_in = tokio::net::UdpSocket::from_std(udp.try_clone()?)?;
    let control_path = dir.control();
    // The state lock is ours (open_store), so a socket file left here is stale.
    let _ = std::fs::remove_file(&control_path);
    let control = UnixListener::bind(&control_path)
        .with_context(|| format!("cannot bind control socket {}", control_path.display()))?;
    std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))?;
    // Files we create are owned by our effective uid: the only uid the control socket serves.
    let uid = std::fs::metadata(&control_path)?.uid();
    let audit = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(dir.audit())
        .with_context(|| format!("cannot open audit log {}", dir.audit().display()))?;
    let metrics = match config.metrics {
        Some(addr) => Some(TcpListener::bind(addr).await.with_context(|| {
            format!("cannot listen on {addr} for metrics (in use? change `metrics` in the config)")
        })?),
        None => None,
    };

    info!(
        listen = %config.listen,
        control = %control_path.display(),
        public_key = %hex::encode(controller.public_key()),
        "gkm-server serving"
    );
    warn_if_few_descriptors(config.max_connections);
    let (fanout, jobs) = std::sync::mpsc::sync_channel(FANOUT_QUEUE);
    let fanout_udp = udp.try_clone()?;
    std::thread::Builder::new()
        .name("gkm-fanout".into())
        .spawn(move || fanout_thread(&fanout_udp, jobs))
        .context("cannot start the fan-out thread")?;
    let queue = ControllerQueue::new(queue_capacity(config.max_connections));
    let (saves, jobs) = std::sync::mpsc::channel();
    let store_queue = queue.clone();
    let ids = policies.iter().map(|p| p.id).collect();
    let lease = config.storage.lease();
    let (store, cluster) = match backing {
        Backing::Redb(store) => (store, None),
        Backing::Postgres(connected) => {
            let crate::cluster::Connected {
                keeper,
                saver,
                follower,
            } = *connected;
            let threads = crate::cluster::start(keeper, follower, lease, ids, &queue)?;
            (Box::new(saver) as Box<dyn Store + Send>, Some(threads))
        }
    };
    let store_thread = std::thread::Builder::new()
        .name("gkm-store".into())
        .spawn(move || store_thread(store, jobs, &store_queue))
        .context("cannot start the store thread")?;
    let driver = Driver {
        controller,
        saves: Some(saves),
        store_thread: Some(store_thread),
        cluster,
        leases: HashMap::new(),
        held: std::collections::VecDeque::new(),
        awaiting: Vec::new(),
        policies: policies.into_iter().map(|p| (p.id, p)).collect(),
        groups,
        udp,
        fanout,
        pending: HashMap::new(),
        prune_at: 64,
        audit: BufWriter::new(audit),
    };
    let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
    let inbox = queue.clone();
    let thread = std::thread::Builder::new()
        .name("gkm-controller".into())
        .spawn(move || {
            driver.run(&inbox);
            inbox.close();
            let _ = stopped_tx.send(());
        })
        .context("cannot start the controller thread")?;

    let reply_wait = READ_TIMEOUT
        + Duration::from_millis(
            config
                .groups
                .iter()
                .filter_map(|g| g.policy().ok())
                .map(|p| p.batch_interval_ms)
                .max()
                .unwrap_or(0),
        );
    let tasks = [
        tokio::spawn(accept_requests(
            listener,
            queue.clone(),
            config.max_connections,
            reply_wait,
        )),
        tokio::spawn(receive_subscriptions(udp_in, queue.clone())),
        tokio::spawn(accept_control(control, uid, queue.clone())),
        tokio::spawn(accept_metrics(metrics, queue.clone())),
    ];
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut stopped_rx = stopped_rx;
    crate::notify::notify("READY=1");
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                info!("SIGTERM: stopping");
                break;
            }
            _ = sigint.recv() => {
                info!("SIGINT: stopping");
                break;
            }
            _ = sighup.recv() => {
                crate::reload::reload(reload_from, &mut config, &queue).await;
            }
            _ = &mut stopped_rx => {
                warn!("the controller thread ended");
                break;
            }
        }
    }
    crate::notify::notify("STOPPING=1");
    for task in &tasks {
        task.abort();
    }
    queue.send(ToController::Stop);
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    let _ = std::fs::remove_file(&control_path);
    if !matches!(joined, Ok(Ok(()))) {
        anyhow::bail!("the controller thread panicked; its message is above");
    }
    info!("stopped");
    Ok(())
}

/// Every configured group's policy and multicast socket.
fn group_nets(
    config: &Config,
) -> Result<(Vec<gkm_server::GroupPolicy>, HashMap<GroupId, GroupNet>)> {
    let mut policies = Vec::new();
    let mut groups = HashMap::new();
    for g in &config.groups {
        let policy = g.policy()?;
        if matches!(policy.enrollment, gkm_server::Enrollment::Open) {
            warn!(group = %g.name, "enrollment is open: anyone who can reach {} may join", config.listen);
        }
        groups.insert(
            g.id(),
            GroupNet {
                name: g.name.clone(),
                socket: multicast_socket(g.multicast, g.interface()?, g.ttl, g.multicast_loop)
                    .with_context(|| {
                        format!("group {:?}: cannot open its multicast socket", g.name)
                    })?,
                to: g.multicast,
            },
        );
        policies.push(policy);
    }
    Ok((policies, groups))
}

/// Where the store thread saves.
enum Backing {
    /// The redb file of the state directory, behind its epoch floor.
    Redb(Box<dyn Store + Send>),
    /// PostgreSQL, shared with other controllers (high availability).
    Postgres(Box<crate::cluster::Connected>),
}

/// The controller of one machine: every configured group served from the redb file.
fn redb_controller(
    signer: ed25519_dalek::SigningKey,
    dir: &StateDir,
    allow_rollback: bool,
    policies: Vec<gkm_server::GroupPolicy>,
    groups: &HashMap<GroupId, GroupNet>,
) -> Result<(Controller<OsRng>, Backing)> {
    let opened = dir.open_store(allow_rollback)?;
    let (store, restored) = (opened.store, opened.states);
    for state in &restored {
        let (group, epoch) = (state.tree.group, state.tree.epoch.0);
        if groups.contains_key(&group) {
            info!(%group, epoch, "restored group state");
        } else {
            warn!(
                %group,
                epoch,
                "the store holds a group that is not in the config: it is not served and its \
                 members are told the group is unknown; add it back under its old name to serve it"
            );
        }
    }
    let mut controller = Controller::new(signer, UnwrapErr(SysRng), policies, restored, now())
        .context("cannot build the controller from the stored state")?;
    // A state older than the epoch floor is served only reset: its first act excludes every
    // member, under an epoch above every one that went out before.
    for behind in &opened.behind {
        warn!(
            group = %behind.group,
            stored = behind.stored.0,
            floor = behind.floor.0,
            "--allow-rollback: the stored state is older than the epoch floor; resetting the group"
        );
        controller.reset(behind.group, now(), Some(behind.floor));
    }
    // A group started afresh (its state moved away) continues above the epochs it sent.
    for (group, floor) in &opened.unstored {
        if controller.reset(*group, now(), Some(*floor)) {
            info!(%group, floor = floor.0, "no stored state: starting above the epoch floor");
        }
    }
    Ok((controller, Backing::Redb(Box::new(store))))
}

/// A controller of a highly available set: it starts standing by for every group; its store
/// thread claims its share of them ([`crate::cluster`]).
fn postgres_controller(
    signer: ed25519_dalek::SigningKey,
    dir: &StateDir,
    config: &Config,
    policies: &[gkm_server::GroupPolicy],
) -> Result<(Controller<OsRng>, Backing)> {
    let connected = dir.open_postgres(config)?;
    let mut controller = Controller::new(signer, UnwrapErr(SysRng), Vec::new(), Vec::new(), now())
        .context("cannot build the controller")?;
    for policy in policies {
        controller.set_standby(policy.id, &policy.name, None, now());
    }
    Ok((controller, Backing::Postgres(Box::new(connected))))
}

/// Milliseconds since the Unix epoch.
fn now() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Timestamp(ms)
}

impl Driver {
    /// The controller thread: handles everything queued, then fires the timers that are due,
    /// until told to stop. Handling the queue first makes a burst of changes one rekey (a lone
    /// change still rekeys at once), and a registration that waited for its group's batch (see
    /// [`ControllerQueue`]) joins that batch.
    fn run(mut self, queue: &ControllerQueue) {
        self.flush();
        loop {
            self.dispatch_saves();
            let wait = self.controller.poll_timeout().map_or(IDLE_WAIT, |due| {
                Duration::from_millis(due.0.saturating_sub(now().0))
            });
            let wait = match self.leases.values().map(|l| l.1).min() {
                Some(until) => wait.min(until.saturating_duration_since(Instant::now())),
                None => wait,
            };
            for message in queue.receive(wait, self.controller.batching()) {
                if matches!(message, ToController::Stop) {
                    return self.stop();
                }
                self.handle(message);
            }
            self.expire_leases();
            if self
                .controller
                .poll_timeout()
                .is_some_and(|due| due <= now())
            {
                self.controller.handle_timeout(now());
                self.flush();
            }
        }
    }

    fn handle(&mut self, message: ToController) {
        match message {
            ToController::Request {
                conn,
                inbound,
                reply,
            } => self.request(conn, inbound, reply),
            ToController::Lookup {
                mut signed,
                from,
                reply,
            } => {
                let identity = match from {
                    Some(from) => self.controller.admit_subscription(now(), from, &mut signed),
                    None => self.controller.signer_of(&signed),
                };
                let _ = reply.send((signed, identity));
            }
            ToController::Subscribe { signed, from } => self.subscribe(signed, from),
            ToController::Command { command, reply } => {
                self.held.push_back(Held::Command(command, reply));
            }
            ToController::Metrics(reply) => self.held.push_back(Held::Metrics(reply)),
            ToController::Persisted(done) => self.controller.handle_persisted(now(), done),
            ToController::Lead {
                group,
                state,
                term,
                until,
            } => self.lead(group, state.as_deref(), term, until),
            ToController::Renewed { group, term, until } => {
                if let Some(lease) = self.leases.get_mut(&group).filter(|l| l.0 == term) {
                    lease.1 = lease.1.max(until);
                }
            }
            ToController::Standby {
                group,
                leader,
                lost,
            } => self.stand_by(group, leader, lost),
            ToController::Following {
                group,
                epoch,
                members,
                behind,
            } => self
                .controller
                .set_following(group, epoch, members, behind, now()),
            ToController::Stop => {}
        }
        self.dispatch_saves();
        self.run_held();
        self.answer_awaiting();
        self.flush();
    }

    /// High availability: leads `group` from its committed `state` until `until` (its lease's
    /// local deadline) unless the lease is renewed.
    fn lead(
        &mut self,
        group: GroupId,
        state: Option<&gkm_server::GroupState>,
        term: u64,
        until: Instant,
    ) {
        let Some(policy) = self.policies.get(&group).cloned() else {
            return;
        };
        let at = now();
        if let Err(e) = self.controller.adopt(policy, state, term, at) {
            return warn!(%group, "cannot serve the group's committed state: {e}");
        }
        self.leases.insert(group, (term, until));
        self.audit(&Event::Leading {
            group: group.0,
            term,
            at: at.0,
        });
        self.flush_audit();
    }

    /// High availability: stops leading every group whose lease reached its local deadline
    /// unrenewed (the database may expire it next, and another controller claim it), and has
    /// the keeper give the lease up. Nothing of the group is sent from here on.
    fn expire_leases(&mut self) {
        let at = Instant::now();
        let expired: Vec<(GroupId, u64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.1 <= at)
            .map(|(g, l)| (*g, l.0))
            .collect();
        for (group, term) in expired {
            warn!(%group, term, "the lease was not renewed in time: no longer leading the group");
            self.stand_by(group, None, Some(term));
            if let Some(cluster) = &self.cluster {
                let _ = cluster.stepped_down.send((group, term));
            }
        }
    }

    /// High availability: another controller leads `group`.
    fn stand_by(&mut self, group: GroupId, leader: Option<SocketAddr>, lost: Option<u64>) {
        let at = now();
        let name = self.policies.get(&group).map(|p| p.name.clone());
        // A group deposed by a save's outcome was released, and its event written, already.
        let leading = self.controller.leads(group);
        self.leases.remove(&group);
        self.controller
            .set_standby(group, &name.unwrap_or_default(), leader, at);
        if let Some(term) = lost.filter(|_| leading) {
            self.audit(&Event::Deposed {
                group: group.0,
                term,
                at: at.0,
            });
            self.flush_audit();
        }
    }

    /// Hands the saves the controller asks for to the store thread, then signs their rekeys'
    /// datagrams while they are made.
    fn dispatch_saves(&mut self) {
        let mut any = false;
        while let Some(persist) = self.controller.poll_persist() {
            any = true;
            let ticket = persist.ticket;
            let sent = self.saves.as_ref().is_some_and(|s| s.send(persist).is_ok());
            if !sent {
                let done = failed(ticket, "the store thread is gone");
                self.controller.handle_persisted(now(), done);
            }
        }
        if any {
            self.controller.prepare_staged();
        }
    }

    /// Handles held commands and scrapes while no save is outstanding. A command that makes a
    /// rekey is answered once that rekey's save is reported: an eviction with immediate
    /// rekeying is answered "done" only when it is durable and queued, as operators' scripts
    /// expect.
    fn run_held(&mut self) {
        while !self.controller.persisting() {
            let Some(held) = self.held.pop_front() else {
                return;
            };
            match held {
                Held::Answer(answer) if answer.waits(&self.controller) => {
                    self.awaiting.push(answer);
                }
                Held::Answer(answer) => answer.send(&self.controller),
                Held::Metrics(reply) => {
                    let _ = reply.send(self.metrics());
                }
                Held::Command(command, reply) => {
                    let saving = command.saving();
                    let rekeys_before = saving
                        .as_ref()
                        .and_then(|s| self.controller.rekeys_done(&s.group));
                    let outcome = self.controller.handle_command(now(), command);
                    // A burst of requests already handled is still coalesced into this rekey.
                    if self
                        .controller
                        .poll_timeout()
                        .is_some_and(|due| due <= now())
                    {
                        self.controller.handle_timeout(now());
                    }
                    self.dispatch_saves();
                    self.held.push_front(Held::Answer(Answer {
                        saving,
                        rekeys_before,
                        outcome,
                        reply,
                    }));
                }
            }
        }
    }

    /// Answers the commands whose rekey is done (or will not be, here).
    fn answer_awaiting(&mut self) {
        let (done, waiting): (Vec<Answer>, Vec<Answer>) = std::mem::take(&mut self.awaiting)
            .into_iter()
            .partition(|a| !a.waits(&self.controller));
        self.awaiting = waiting;
        for answer in done {
            answer.send(&self.controller);
        }
    }

    /// Stops: the save being made is finished (its outcome is not acted on: nothing of it was
    /// sent, and a restart rekeys above it), and everything queued is flushed.
    fn stop(mut self) {
        self.saves = None;
        if let Some(thread) = self.store_thread.take()
            && thread.join().is_err()
        {
            warn!("the store thread panicked; its message is above");
        }
        if let Some(cluster) = self.cluster.take() {
            cluster.stop();
        }
        self.flush();
    }

    /// The Prometheus text exposition: per group `gkm_epoch`, `gkm_members`,
    /// `gkm_pending_changes`, the `gkm_*_total` counters and `gkm_rejects_total` by reason; and
    /// `gkm_requests_rejected_total` by reason over every request, those naming no group included.
    fn metrics(&mut self) -> String {
        let at = now();
        let Ok(Response::Groups(groups)) = self.controller.handle_command(at, Command::Groups)
        else {
            return String::new();
        };
        let stats: Vec<(crate::metrics::Labels, Stats)> = groups
            .iter()
            .filter_map(|g| {
                match self
                    .controller
                    .handle_command(at, Command::Stats(g.name.clone()))
                {
                    Ok(Response::Stats(s)) => Some((label("group", &g.name), s)),
                    _ => None,
                }
            })
            .collect();
        let mut out = Exposition::default();
        // The group families are the leader's; a standby reports its warm copy apart.
        let by_group = |value: fn(&GroupInfo) -> u64| {
            groups
                .iter()
                .filter(|g| g.role == gkm_server::Role::Leader)
                .map(move |g| (label("group", &g.name), value(g)))
        };
        out.family(
            "epoch",
            Kind::Gauge,
            "The group's epoch.",
            by_group(|g| g.epoch),
        );
        out.family(
            "members",
            Kind::Gauge,
            "Current members.",
            by_group(|g| g.members as u64),
        );
        out.family(
            "leader",
            Kind::Gauge,
            "1 if this controller leads the group, 0 if it stands by for it.",
            groups.iter().map(|g| {
                let leads = u64::from(g.role == gkm_server::Role::Leader);
                (label("group", &g.name), leads)
            }),
        );
        out.family(
            "lease_term",
            Kind::Gauge,
            "The term of the group's lease this controller holds (high availability; 0: none).",
            by_group(|g| g.term.unwrap_or(0)),
        );
        out.family(
            "pending_changes",
            Kind::Gauge,
            "Joins and departures waiting for the next rekey.",
            by_group(|g| g.pending as u64),
        );
        let warm = |value: fn(&GroupInfo) -> Option<u64>| {
            groups
                .iter()
                .filter_map(move |g| Some((label("group", &g.name), value(g)?)))
        };
        out.family(
            "standby_epoch",
            Kind::Gauge,
            "The epoch of this standby's warm copy of the group.",
            warm(|g| g.behind.map(|_| g.epoch)),
        );
        out.family(
            "standby_behind_epochs",
            Kind::Gauge,
            "Epochs this standby's warm copy trailed the committed log by when it last caught up.",
            warm(|g| g.behind),
        );
        out.family(
            "standby_sync_age_milliseconds",
            Kind::Gauge,
            "Milliseconds since this standby's warm copy last matched the committed log.",
            warm(|g| g.synced_ms_ago),
        );
        let counters: [StatCounter; 7] = [
            ("rekeys", "Rekeys made.", |s| s.rekeys),
            ("encryptions", "Key encryptions made by rekeys.", |s| {
                s.encryptions
            }),
            (
                "datagrams",
                "Rekey datagrams sent, repeats included.",
                |s| s.datagrams,
            ),
            ("datagram_bytes", "Bytes of rekey datagrams sent.", |s| {
                s.bytes
            }),
            ("registrations", "Registrations accepted.", |s| {
                s.registrations
            }),
            ("resyncs", "Resyncs answered with keys.", |s| s.resyncs),
            ("heartbeats", "Heartbeats sent.", |s| s.heartbeats),
        ];
        for (name, help, value) in counters {
            let samples = stats.iter().map(|(group, s)| (group.clone(), value(s)));
            out.family(name, Kind::Counter, help, samples);
        }
        let rejects = stats.iter().flat_map(|(group, s)| {
            s.rejects.iter().map(move |(reason, count)| {
                let mut labels = group.clone();
                labels.extend(label("reason", reason.name()));
                (labels, *count)
            })
        });
        out.family(
            "rejects",
            Kind::Counter,
            "Requests for the group refused, by reason.",
            rejects,
        );
        // Every refusal, by reason, those naming no known group included.
        if let Ok(Response::Status { rejects, .. }) =
            self.controller.handle_command(at, Command::Status)
        {
            let samples = rejects
                .into_iter()
                .map(|(reason, count)| (label("reason", reason.name()), count));
            out.family(
                "requests_rejected",
                Kind::Counter,
                "Requests refused, by reason, over every group and none.",
                samples,
            );
        }
        out.encode()
    }

    fn request(&mut self, conn: ConnId, inbound: Inbound, reply: oneshot::Sender<Vec<u8>>) {
        // Connections that gave up waiting leave closed senders; drop them now and then.
        if self.pending.len() >= self.prune_at {
            self.pending.retain(|_, tx| !tx.is_closed());
            self.prune_at = (2 * self.pending.len()).max(64);
        }
        self.pending.insert(conn, reply);
        self.controller.handle_inbound(conn, now(), inbound);
    }

    fn subscribe(&mut self, signed: MemberSigned, from: SocketAddr) {
        match self
            .controller
            .handle_checked_subscription(now(), from, signed)
        {
            Ok(Subscription::Cookie(cookie)) => {
                if let Err(e) = self.udp.send_to(&cookie, from) {
                    debug!(%from, "cannot send a fan-out cookie: {e}");
                }
            }
            Ok(Subscription::Confirmed { group, member }) => {
                debug!(%from, %group, member = member.0, "fan-out address confirmed");
            }
            Err(reason) => debug!(%from, ?reason, "subscription refused"),
        }
    }

    /// Sends every queued transmit and writes every queued event.
    fn flush(&mut self) {
        while let Some(t) = self.controller.poll_transmit() {
            match t {
                Transmit::Reply { conn, bytes } => {
                    if let Some(tx) = self.pending.remove(&conn) {
                        let _ = tx.send(bytes);
                    }
                }
                Transmit::Multicast { group, bytes } => self.multicast(group, &bytes),
            }
        }
        let mut wrote = false;
        while let Some(event) = self.controller.poll_event() {
            self.audit(&event);
            wrote = true;
        }
        if wrote {
            self.flush_audit();
        }
    }

    /// Writes the audit lines buffered so far to the file.
    fn flush_audit(&mut self) {
        if let Err(e) = self.audit.flush() {
            warn!("cannot append to the audit log: {e}");
        }
    }

    fn multicast(&mut self, group: GroupId, bytes: &[u8]) {
        let Some(g) = self.groups.get_mut(&group) else {
            return;
        };
        if let Err(e) = g.socket.send_to(bytes, g.to) {
            warn!(group = %g.name, "multicast send to {} failed: {e}", g.to);
        }
        let addresses = self.controller.fanout_addresses(group, now());
        if !addresses.is_empty() && self.fanout.try_send((Arc::from(bytes), addresses)).is_err() {
            debug!(%group, "fan-out queue full: this datagram goes by multicast only");
        }
    }

    fn audit(&mut self, event: &Event) {
        match serde_json::to_string(event) {
            Ok(line) => {
                // One line per member would be one stderr write per registration; the audit
                // file has them all, the log has them at debug.
                if matches!(
                    event,
                    Event::Admitted { .. } | Event::Rewelcomed { .. } | Event::Departed { .. }
                ) {
                    debug!(target: "audit", "{line}");
                } else {
                    info!(target: "audit", "{line}");
                }
                if let Err(e) = writeln!(self.audit, "{line}") {
                    warn!("cannot append to the audit log: {e}");
                }
            }
            Err(e) => warn!("cannot serialize event: {e}"),
        }
    }
}

fn multicast_socket(
    to: SocketAddr,
    interface: Interface,
    ttl: u32,
    looped: bool,
) -> Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(to), Type::DGRAM, Some(Protocol::UDP))?;
    match (to.ip(), interface) {
        (IpAddr::V4(_), Interface::V4(ifaddr)) => {
            socket.set_multicast_if_v4(&ifaddr)?;
            socket.set_multicast_ttl_v4(ttl)?;
            socket.set_multicast_loop_v4(looped)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        }
        (IpAddr::V6(_), Interface::V6(index)) => {
            socket.set_multicast_if_v6(index)?;
            socket.set_multicast_hops_v6(ttl)?;
            socket.set_multicast_loop_v6(looped)?;
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        }
        _ => anyhow::bail!("multicast address and interface are of different IP versions"),
    }
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts request connections, each served by its own task. With `max_connections` open, the
/// oldest one still reading its request is closed to make room (see [`Readers`]); when none is
/// reading, a new one is refused.
async fn accept_requests(
    listener: TcpListener,
    queue: ControllerQueue,
    max_connections: usize,
    reply_wait: Duration,
) {
    let connections = Arc::new(Semaphore::new(max_connections));
    let readers = Readers::default();
    let mut next_conn = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let permit = match connections.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) if readers.close_oldest() => None,
                    Err(_) => {
                        warn!(%peer, "too many request connections; refusing");
                        continue;
                    }
                };
                next_conn += 1;
                let conn = ConnId(next_conn);
                let (queue, slots, done) = (queue.clone(), connections.clone(), readers.clone());
                readers.push(conn);
                let task = tokio::spawn(async move {
                    let Some(permit) = slot(permit, slots).await else {
                        done.done(conn);
                        return;
                    };
                    request_connection(stream, conn, &queue, reply_wait, &done).await;
                    drop(permit);
                });
                readers.attach(conn, task.abort_handle());
            }
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Warns when the open-file limit leaves too little room for `max_connections` (read from
/// `/proc/self/limits`; nothing is said where that file is missing).
fn warn_if_few_descriptors(max_connections: usize) {
    /// Descriptors the daemon needs besides request connections: sockets, state, audit, control.
    const OTHERS: usize = 64;
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft
        && soft < max_connections + OTHERS + MAX_CONTROL
    {
        warn!(
            "the open-file limit is {soft}, too low for max_connections = {max_connections}: \
             raise it (ulimit -n, or LimitNOFILE= under systemd) or lower max_connections"
        );
    }
}

/// The request port's listener, with room for a burst of connections ([`LISTEN_BACKLOG`]).
fn request_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Passes fan-out subscription datagrams to the controller, their signatures checked here, off
/// its thread: the controller names the key (a lookup), a tokio worker verifies under it.
async fn receive_subscriptions(udp: tokio::net::UdpSocket, queue: ControllerQueue) {
    let mut buf = vec![0u8; 65_536];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((n, from)) => {
                let bytes = buf.get(..n).unwrap_or_default().to_vec();
                let signed = MemberSigned::subscription(bytes);
                let Some(checked) = lookup(&queue, signed, Some(from)) else {
                    debug!(%from, "subscription dropped: the controller is busy");
                    continue;
                };
                let queue = queue.clone();
                tokio::spawn(async move {
                    // Not admitted (a bad cookie, a source over its budget, no such member):
                    // dropped without a signature check.
                    let Some((signed, true)) = checked.await else {
                        return;
                    };
                    if !queue.send(ToController::Subscribe { signed, from }) {
                        debug!(%from, "subscription dropped: the controller is busy");
                    }
                });
            }
            Err(e) => debug!("udp receive failed: {e}"),
        }
    }
}

/// Asks the controller which identity key signs `signed` (admitting it first if it is a
/// subscription from `from`) and, once it answers, verifies the signature under that key on
/// this (tokio) thread: one Ed25519 verification that the controller's thread does not make.
/// The future gives the request and whether a key was named. `None` when the queue is full or
/// closed.
fn lookup(
    queue: &ControllerQueue,
    signed: MemberSigned,
    from: Option<SocketAddr>,
) -> Option<impl Future<Output = Option<(MemberSigned, bool)>> + use<>> {
    let (reply, answer) = oneshot::channel();
    let sent = queue.send(ToController::Lookup {
        signed,
        from,
        reply,
    });
    sent.then_some(async move {
        let (signed, identity) = answer.await.ok()?;
        Some((signed.check(identity), identity.is_some()))
    })
}

/// Accepts control connections (at most [`MAX_CONTROL`]).
async fn accept_control(control: UnixListener, uid: u32, queue: ControllerQueue) {
    let controls = Arc::new(Semaphore::new(MAX_CONTROL));
    loop {
        match control.accept().await {
            Ok((stream, _)) => {
                let Ok(permit) = controls.clone().try_acquire_owned() else {
                    warn!("too many control connections; refusing");
                    continue;
                };
                let queue = queue.clone();
                tokio::spawn(async move {
                    control_connection(stream, uid, &queue).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!("control accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Metrics connections served at once; more are closed at once (a scraper needs one).
const MAX_METRICS_CONNECTIONS: usize = 8;

/// Answers metrics scrapes, if a metrics address is configured: at most
/// [`MAX_METRICS_CONNECTIONS`] at a time.
async fn accept_metrics(listener: Option<TcpListener>, queue: ControllerQueue) {
    let Some(listener) = listener else {
        return;
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_BACKOFF).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!("too many metrics connections; closing one");
            continue;
        };
        let (tx, rx) = oneshot::channel();
        if queue.send(ToController::Metrics(tx)) {
            tokio::spawn(async move {
                if let Ok(text) = rx.await {
                    serve_metrics(stream, text).await;
                }
                drop(slot);
            });
        }
    }
}

/// Answers one HTTP request (whatever it asks) with the metrics text.
async fn serve_metrics(mut stream: TcpStream, text: String) {
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut head)).await;
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A request slot: `permit` when one was free, else (a connection was closed to make room) the
/// slot that frees once the closed connection's task is dropped.
async fn slot(
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Semaphore>,
) -> Option<OwnedSemaphorePermit> {
    match permit {
        Some(permit) => Some(permit),
        None => tokio::time::timeout(SLOT_WAIT, slots.acquire_owned())
            .await
            .ok()?
            .ok(),
    }
}

/// One request connection: a length-prefixed frame in, its signature checks (on this worker),
/// then the controller; one frame out, close.
async fn request_connection(
    mut stream: TcpStream,
    conn: ConnId,
    queue: &ControllerQueue,
    reply_wait: Duration,
    readers: &Readers,
) {
    let read = tokio::time::timeout(READ_TIMEOUT, read_frame(&mut stream)).await;
    readers.done(conn);
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            debug!(conn = conn.0, "bad request frame: {e}");
            return;
        }
        Err(_) => {
            debug!(conn = conn.0, "request read timed out");
            return;
        }
    };
    // The signature check and the welcome's X25519 work run here, on whichever core is free; a
    // member-signed request's key is looked up by the controller and its signature checked here.
    let inbound = match gkm_server::verify_request(bytes, &mut UnwrapErr(SysRng)) {
        Inbound::MemberSigned(signed) => {
            let Some(checked) = lookup(queue, signed, None) else {
                return;
            };
            match checked.await {
                Some((signed, _)) => Inbound::MemberSigned(signed),
                None => return,
            }
        }
        other => other,
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = ToController::Request {
        conn,
        inbound,
        reply: reply_tx,
    };
    if !queue.send(request) {
        return;
    }
    if let Ok(Ok(reply)) = tokio::time::timeout(reply_wait, reply_rx).await {
        let Ok(len) = u32::try_from(reply.len()) else {
            return;
        };
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(&reply);
        // Corked, the reply waits in the socket until the stream is dropped; closing then sends
        // it with the FIN in one segment, which the member acknowledges once.
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_cork(true) {
            debug!(conn = conn.0, "cork failed: {e}");
        }
        if let Err(e) = stream.write_all(&frame).await {
            debug!(conn = conn.0, "reply write failed: {e}");
        }
    }
}

/// Reads one length-prefixed frame. A request usually arrives in one segment, so the first read
/// asks for more than the prefix and mostly gets the whole frame in one system call.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    const FIRST_READ: usize = 1_024;
    let mut bytes = vec![0u8; FIRST_READ];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut bytes[got..]).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let prefix: [u8; 4] = bytes[..4].try_into().unwrap_or_default();
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame length {len} outside 1..={MAX_FRAME}"),
        ));
    }
    // Anything after the frame is ignored, as it always was: one request per connection.
    bytes.resize(4 + len, 0);
    if let Some(rest) = bytes.get_mut(got..) {
        stream.read_exact(rest).await?;
    }
    bytes.drain(..4);
    Ok(bytes)
}

/// One control connection: JSON request lines in, JSON reply lines out.
async fn control_connection(stream: UnixStream, uid: u32, queue: &ControllerQueue) {
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == uid => {}
        Ok(cred) => {
            warn!(
                peer_uid = cred.uid(),
                "control connection from another uid refused"
            );
            let reply = Reply::error(format!(
                "refused: this control socket serves uid {uid} only; run gkmctl as that user"
            ));
            if let Ok(mut line) = serde_json::to_vec(&reply) {
                line.push(b'\n');
                let mut stream = stream;
                let _ = stream.write_all(&line).await;
            }
            return;
        }
        Err(e) => {
            warn!("cannot read control peer credentials: {e}");
            return;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        let got = tokio::time::timeout(
            CONTROL_IDLE,
            (&mut read).take(limit).read_until(b'\n', &mut line),
        )
        .await;
        match got {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
            Ok(Ok(_)) => {}
        }
        let too_long = line.len() > MAX_LINE;
        let reply = if too_long {
            Reply::error(format!("request line longer than {MAX_LINE} bytes"))
        } else {
            answer(&line, queue).await
        };
        let Ok(mut out) = serde_json::to_vec(&reply) else {
            return;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || too_long {
            return;
        }
    }
}

async fn answer(line: &[u8], queue: &ControllerQueue) -> Reply {
    let request: Request = match serde_json::from_slice(line.trim_ascii()) {
        Ok(r) => r,
        Err(e) => return Reply::parse_error(&e),
    };
    let command = match request.into_command() {
        Ok(c) => c,
        Err(message) => return Reply::error(message),
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if !queue.send(ToController::Command {
        command,
        reply: reply_tx,
    }) {
        return Reply::error("gkm-server is stopping");
    }
    reply_rx
        .await
        .unwrap_or_else(|_| Reply::error("gkm-server is stopping"))
}

/// A per-group counter of the exposition: its name (without `_total`), its help, and where
/// [`Stats`] holds it.
type StatCounter = (&'static str, &'static str, fn(&Stats) -> u64);
