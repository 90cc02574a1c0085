//! The controller thread's queue: what the tokio side hands the thread that owns the
//! `Controller`, and when that thread is woken for it.
//!
//! A registration for a group whose batch is already scheduled does not wake the thread: it joins
//! that batch whenever it is handled before the batch is due, and the thread handles everything
//! queued before it fires its timers. Under a stream of registrations with batching on, that
//! saves the thread a wake-up (and the waker a system call) per member. Everything else wakes it.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use gkm_server::control::Reply;
use gkm_server::{Command, ConnId, GroupState, Inbound, MemberSigned, Persisted};
use lkh_tree::GroupId;
use tokio::sync::oneshot;

/// Fan-out subscriptions waiting for the controller; more are dropped.
pub(crate) const MAX_QUEUED_SUBSCRIPTIONS: usize = 64;
/// Metrics scrapes waiting for the controller, apart from subscriptions (a subscription flood
/// does not blind monitoring, nor scrapes the subscriptions); more are refused.
pub(crate) const MAX_QUEUED_SCRAPES: usize = 4;
/// Subscriptions and scrapes waiting, at most.
pub(crate) const MAX_QUEUED_OTHER: usize = MAX_QUEUED_SUBSCRIPTIONS + MAX_QUEUED_SCRAPES;

/// What the tokio side hands the controller thread.
pub(crate) enum ToController {
    /// A request, after [`gkm_server::verify_request`].
    Request {
        conn: ConnId,
        inbound: Inbound,
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// Which identity key signs a member-signed request (a lookup, so that the signature is
    /// verified off the controller's thread); `from` a subscription's source (it is admitted
    /// first, and counts against the subscriptions' budget).
    Lookup {
        signed: MemberSigned,
        from: Option<SocketAddr>,
        reply: oneshot::Sender<(MemberSigned, Option<[u8; 32]>)>,
    },
    /// A fan-out subscription datagram, checked ([`MemberSigned::check`]).
    Subscribe {
        signed: MemberSigned,
        from: SocketAddr,
    },
    /// An operator's command.
    Command {
        command: Command,
        reply: oneshot::Sender<Reply>,
    },
    /// A metrics scrape.
    Metrics(oneshot::Sender<String>),
    /// The outcome of a save, from the store thread (always fits: one per group at most).
    Persisted(Persisted),
    /// High availability: this controller now leads `group`, from its committed state (always
    /// fits, as do the other leadership messages: a few per group per lease).
    /// It leads until `until` (the local deadline of its lease) unless [`ToController::Renewed`]
    /// says later.
    Lead {
        group: GroupId,
        state: Option<Box<GroupState>>,
        term: u64,
        until: std::time::Instant,
    },
    /// High availability: the lease of `group` under `term` was renewed until `until`.
    Renewed {
        group: GroupId,
        term: u64,
        until: std::time::Instant,
    },
    /// High availability: another controller leads `group` (at `leader` when known); `lost` is
    /// the term this one held, if it led the group until now.
    Standby {
        group: GroupId,
        leader: Option<SocketAddr>,
        lost: Option<u64>,
    },
    /// High availability: this controller's warm copy of `group`, which it stands by for,
    /// matches the committed log at `epoch` with `members`, after trailing it by `behind`
    /// epochs (dropped when the queue is full: the next comes a third of a lease later).
    Following {
        group: GroupId,
        epoch: lkh_tree::Epoch,
        members: usize,
        behind: u64,
    },
    /// Stop: flush and end the thread.
    Stop,
}

impl ToController {
    /// Subscriptions and scrapes are bounded apart, each by its own budget, so a UDP flood can
    /// crowd out neither registrations nor monitoring.
    fn budget(&self) -> Option<Budget> {
        match self {
            ToController::Subscribe { .. } | ToController::Lookup { from: Some(_), .. } => {
                Some(Budget::Subscriptions)
            }
            ToController::Metrics(_) => Some(Budget::Scrapes),
            _ => None,
        }
    }

    /// A registration for one of the `batching` groups: it can wait for that batch.
    fn can_wait(&self, batching: &HashSet<GroupId>) -> bool {
        matches!(
            self,
            ToController::Request { inbound: Inbound::Registration(r), .. }
                if batching.contains(&r.request().group)
        )
    }
}

/// The bounded kinds of message.
#[derive(Clone, Copy)]
enum Budget {
    Subscriptions,
    Scrapes,
}

impl Budget {
    fn limit(self) -> usize {
        match self {
            Budget::Subscriptions => MAX_QUEUED_SUBSCRIPTIONS,
            Budget::Scrapes => MAX_QUEUED_SCRAPES,
        }
    }
}

/// The queue's state, under one lock.
#[derive(Default)]
struct State {
    messages: VecDeque<ToController>,
    /// Subscriptions among `messages`.
    subscriptions: usize,
    /// Scrapes among `messages`.
    scrapes: usize,
    /// Messages among `messages` that must wake the thread.
    urgent: usize,
    /// Whether the thread is waiting (so a message that cannot wait must wake it).
    waiting: bool,
    /// Groups with a batch scheduled, as of the thread's last wait.
    batching: HashSet<GroupId>,
    /// The thread has ended: nothing more is taken.
    closed: bool,
}

impl State {
    fn count(&mut self, budget: Budget) -> &mut usize {
        match budget {
            Budget::Subscriptions => &mut self.subscriptions,
            Budget::Scrapes => &mut self.scrapes,
        }
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
}

/// Both ends of the queue (the tokio side sends, the controller thread receives). Requests and
/// control commands are bounded by their connection limits through `capacity`; subscriptions and
/// scrapes also by their own budgets ([`MAX_QUEUED_SUBSCRIPTIONS`], [`MAX_QUEUED_SCRAPES`]).
#[derive(Clone)]
pub(crate) struct ControllerQueue(Arc<Shared>);

impl ControllerQueue {
    /// A queue holding at most `capacity` messages.
    pub(crate) fn new(capacity: usize) -> ControllerQueue {
        ControllerQueue(Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            capacity,
        }))
    }

    /// Queues a message; false when it is full (for its kind; a stop and a save's outcome always
    /// fit) or the thread has ended.
    pub(crate) fn send(&self, message: ToController) -> bool {
        let Ok(mut state) = self.0.state.lock() else {
            return false;
        };
        let budget = message.budget();
        let full = state.messages.len() >= self.0.capacity
            && !matches!(
                message,
                ToController::Stop
                    | ToController::Persisted(_)
                    | ToController::Lead { .. }
                    | ToController::Renewed { .. }
                    | ToController::Standby { .. }
            );
        let spent = budget.is_some_and(|b| *state.count(b) >= b.limit());
        if state.closed || full || spent {
            return false;
        }
        let urgent = !message.can_wait(&state.batching);
        if let Some(b) = budget {
            *state.count(b) += 1;
        }
        state.urgent += usize::from(urgent);
        state.messages.push_back(message);
        let wake = urgent && state.waiting;
        drop(state);
        if wake {
            self.0.wake.notify_one();
        }
        true
    }

    /// The controller thread: everything queued, at once if anything is; otherwise after waiting
    /// (at most `timeout`) for a message that cannot wait, `batching` being the groups with a
    /// batch scheduled.
    pub(crate) fn receive(
        &self,
        timeout: Duration,
        batching: impl Iterator<Item = GroupId>,
    ) -> VecDeque<ToController> {
        let Ok(mut state) = self.0.state.lock() else {
            return VecDeque::new();
        };
        if state.messages.is_empty() {
            state.batching = batching.collect();
            state.waiting = true;
            let deadline = Instant::now() + timeout;
            while state.urgent == 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                state = match self.0.wake.wait_timeout(state, left) {
                    Ok((state, _)) => state,
                    Err(_) => return VecDeque::new(),
                };
            }
            state.waiting = false;
        }
        state.subscriptions = 0;
        state.scrapes = 0;
        state.urgent = 0;
        std::mem::take(&mut state.messages)
    }

    /// The controller thread has ended: later sends fail.
    pub(crate) fn close(&self) {
        if let Ok(mut state) = self.0.state.lock() {
            state.closed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape() -> ToController {
        ToController::Metrics(oneshot::channel().0)
    }

    #[test]
    fn a_queued_message_is_taken_without_waiting() {
        let queue = ControllerQueue::new(8);
        assert!(queue.send(ToController::Stop));
        let started = Instant::now();
        let taken = queue.receive(Duration::from_secs(10), std::iter::empty());
        assert_eq!(taken.len(), 1);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_message_that_cannot_wait_wakes_the_waiting_thread() {
        let queue = ControllerQueue::new(8);
        let sender = queue.clone();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(sender.send(ToController::Stop));
        });
        let started = Instant::now();
        let taken = queue.receive(Duration::from_secs(10), std::iter::empty());
        waker.join().unwrap();
        assert_eq!(taken.len(), 1);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken, not timed out"
        );
    }

    #[test]
    fn with_nothing_queued_the_thread_waits_for_its_timeout() {
        let queue = ControllerQueue::new(8);
        let started = Instant::now();
        let taken = queue.receive(Duration::from_millis(30), std::iter::empty());
        assert!(taken.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(30));
    }

    /// A verified registration for `group`.
    fn registration(group: GroupId) -> ToController {
        use rand_core::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let identity = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let request = wire::RegistrationRequest {
            group,
            identity: identity.verifying_key().to_bytes(),
            hpke_key: wire::HpkeSecret::generate(wire::Kem::XWing, &mut rng)
                .public_key()
                .unwrap(),
            timestamp_ms: 0,
            nonce: [1; 16],
            token: Vec::new(),
        };
        let inbound = gkm_server::verify_request(wire::sign(&request, &identity), &mut rng);
        assert!(matches!(inbound, Inbound::Registration(_)));
        ToController::Request {
            conn: ConnId(1),
            inbound,
            reply: oneshot::channel().0,
        }
    }

    /// Sends a registration for `group` 20 ms into a wait of `timeout` while `batching` is
    /// scheduled; how long the wait took and what it took.
    fn wait_with(group: GroupId, batching: GroupId, timeout: Duration) -> (Duration, usize) {
        let queue = ControllerQueue::new(8);
        let sender = queue.clone();
        let message = registration(group);
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            assert!(sender.send(message));
        });
        let started = Instant::now();
        let taken = queue.receive(timeout, std::iter::once(batching));
        waker.join().unwrap();
        (started.elapsed(), taken.len())
    }

    #[test]
    fn a_registration_waits_for_its_groups_batch_without_waking_the_thread() {
        let group = GroupId(1);
        let (waited, taken) = wait_with(group, group, Duration::from_millis(300));
        assert_eq!(taken, 1);
        assert!(
            waited >= Duration::from_millis(300),
            "woken after {waited:?}"
        );
        // For a group with no batch scheduled it wakes the thread: it starts one.
        let (waited, taken) = wait_with(GroupId(2), group, Duration::from_secs(10));
        assert_eq!(taken, 1);
        assert!(waited < Duration::from_secs(5), "not woken: {waited:?}");
    }

    fn subscription() -> ToController {
        ToController::Subscribe {
            signed: MemberSigned::subscription(Vec::new()),
            from: SocketAddr::from(([127, 0, 0, 1], 9)),
        }
    }

    #[test]
    fn the_queue_is_bounded_overall_and_for_subscriptions_and_scrapes_apart() {
        let queue = ControllerQueue::new(MAX_QUEUED_OTHER + 2);
        for _ in 0..MAX_QUEUED_SUBSCRIPTIONS {
            assert!(queue.send(subscription()));
        }
        assert!(
            !queue.send(subscription()),
            "subscriptions past their bound"
        );
        // A subscription flood leaves the scrapes their own room.
        for _ in 0..MAX_QUEUED_SCRAPES {
            assert!(queue.send(scrape()));
        }
        assert!(!queue.send(scrape()), "scrapes past their bound");
        assert!(queue.send(registration(GroupId(1))));
        assert!(queue.send(registration(GroupId(1))));
        assert!(!queue.send(registration(GroupId(1))), "past the capacity");
        assert!(queue.send(ToController::Stop), "a stop always fits");
        assert_eq!(
            queue.receive(Duration::ZERO, std::iter::empty()).len(),
            MAX_QUEUED_OTHER + 3
        );
        assert!(queue.send(scrape()), "room again once taken");
        queue.close();
        assert!(!queue.send(ToController::Stop));
    }
}
