//! A group under churn, on the real sans-I/O controller ([`gkm_server::Controller`]) and member
//! state machines ([`gkm_member::Member`]), a virtual clock and seeded randomness: Poisson joins
//! and leaves, periodic batch rekeying, per-receiver loss (Bernoulli or Gilbert–Elliott), the
//! policy's repeats, heartbeats and unicast resync. Every member is a full `Member` object (about
//! 2 KiB each), so this suits groups up to some 10^4 members; [`crate::scale`] models receivers
//! by subtree for 2^20 and beyond. Both start from one restored group (the N first members
//! resume the paths the controller holds, spread over a warm-up of one renewal period) and are
//! churned by the same events (`netsim/src/start.rs`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_member::{Member, MemberConfig, MemberEvent};
use gkm_server::{
    Command, ConnId, GroupDelta, GroupState, Response, Store, StoreDriver, StoreError, Timestamp,
    Transmit,
};
use lkh_tree::{GroupId, NodeId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;
use wire::{HpkeSecret, Kem};

use crate::cost::CostError;
use crate::start::{self, GROUP, Model, RENEW_MS, START, TICK_MS};

/// How datagrams are lost on each receiver's link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum LossModel {
    /// Each datagram lost independently with probability `p`.
    #[default]
    Bernoulli,
    /// Two states (good: no loss, bad: all lost); the mean loss is `p`, mean burst 4 datagrams.
    GilbertElliott,
}

/// Parameters of a churn run (`Default` is zero everywhere with Bernoulli loss: a base to fill).
#[derive(Clone, Debug, Default)]
pub struct ChurnConfig {
    /// Members admitted before the clock starts.
    pub members: usize,
    /// Tree degree.
    pub degree: u8,
    /// Simulated seconds.
    pub duration_s: u64,
    /// Joins per second (Poisson).
    pub join_rate: f64,
    /// Leaves per second (Poisson).
    pub leave_rate: f64,
    /// Batch interval in milliseconds.
    pub interval_ms: u64,
    /// Loss probability per datagram and receiver.
    pub loss: f64,
    /// Loss model.
    pub model: LossModel,
    /// Sends per rekey datagram.
    pub repeats: u8,
    /// Milliseconds between the sends of a rekey datagram (the policy's `repeat_spacing_ms`;
    /// 100 by default).
    pub spacing_ms: u64,
    /// Seed of every random choice.
    pub seed: u64,
}

/// The outcome (stable JSON names, see `RFC-notes/netsim.md`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChurnReport {
    /// Members at the end.
    pub members: usize,
    /// Tree degree.
    pub degree: u8,
    /// Always `group` (the controller's default policy, with one-way leaves).
    pub strategy: String,
    /// Rekeys.
    pub rekeys: u64,
    /// Membership events (joins + leaves).
    pub events: u64,
    /// Encryptions made.
    pub encryptions: u64,
    /// Datagrams sent, repeats included.
    pub datagrams: u64,
    /// Bytes multicast, repeats included.
    pub multicast_bytes: u64,
    /// Resyncs answered with keys (a lease renewal racing a rekey counts too).
    pub resyncs: u64,
    /// Members that needed a resync at least once.
    pub members_resynced: usize,
    /// (full receivers only) Times a member lost every copy of a rekey datagram that carried
    /// its keys: the resyncs no waiting avoids. `None` in the subtree model.
    pub lost_every_copy: Option<u64>,
    /// Whether the resyncs went through the controller, so that their signature checks and
    /// HPKE seals are in `controller_cpu_us_per_op`: true in both models (the subtree model
    /// sends its modelled members' resync requests through the controller).
    pub resyncs_charged: bool,
    /// Time from a rekey to a receiving member holding its key: median.
    pub converged_ms_p50: u64,
    /// The same, 99th percentile.
    pub converged_ms_p99: u64,
    /// Members not holding the controller's key at the end (must be 0).
    pub diverged: usize,
    /// Controller CPU (wall time of its calls) per membership event, µs.
    pub controller_cpu_us_per_op: f64,
}

impl LossModel {
    /// Whether a datagram is lost, given one uniform draw `u` in [0, 1), the loss probability
    /// `p` and the link's burst state (Gilbert–Elliott: mean burst 4; leave the bad state with
    /// probability 1/4, enter it so that the stationary share of bad time is `p`).
    pub(crate) fn lost(self, p: f64, bad: &mut bool, u: f64) -> bool {
        match self {
            LossModel::Bernoulli => u < p,
            LossModel::GilbertElliott => {
                let enter = if p >= 1.0 { 1.0 } else { p / (1.0 - p) / 4.0 };
                *bad = if *bad { u >= 0.25 } else { u < enter };
                *bad
            }
        }
    }

    /// Whether a datagram is lost when the link's loss process stepped `steps` datagrams since
    /// the last draw (at least 1; `steps = 1` is [`LossModel::lost`] in distribution): for
    /// Gilbert–Elliott the `steps`-step transition of the two-state chain, so that a model that
    /// draws only for the datagrams that reach a member keeps the bursts of one that draws for
    /// every datagram.
    pub(crate) fn lost_after(self, p: f64, bad: &mut bool, u: f64, steps: u64) -> bool {
        match self {
            LossModel::Bernoulli => u < p,
            LossModel::GilbertElliott => {
                let (enter, leave) = if p >= 1.0 {
                    (1.0, 0.0)
                } else {
                    (p / (1.0 - p) / 4.0, 0.25)
                };
                let share = enter / (enter + leave);
                let n = i32::try_from(steps.max(1)).unwrap_or(i32::MAX);
                let fade = (1.0 - enter - leave).powi(n);
                let p_bad = if *bad {
                    share + (1.0 - share) * fade
                } else {
                    share * (1.0 - fade)
                };
                *bad = u < p_bad;
                *bad
            }
        }
    }
}

/// A uniform draw in [0, 1).
pub(crate) fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Milliseconds (fractional) to the next event of a Poisson process of `rate` per second.
pub(crate) fn exponential(rng: &mut ChaCha20Rng, rate: f64) -> f64 {
    if rate <= 0.0 {
        return f64::INFINITY;
    }
    -(1.0 - uniform(rng)).ln() / rate * 1_000.0
}

/// The nearest-rank percentile of sorted samples (0 when there are none).
pub(crate) fn percentile(sorted: &[u64], percent: usize) -> u64 {
    let n = sorted.len();
    if n == 0 {
        return 0;
    }
    sorted[(n * percent).div_ceil(100).max(1) - 1]
}

/// What both churn models count the same way: controller time, events and convergence delays.
#[derive(Default)]
pub(crate) struct Tally {
    /// Milliseconds from a rekey to each receiving member holding its key.
    pub(crate) converged: Vec<u64>,
    /// Wall time spent inside the controller's calls.
    pub(crate) controller_time: Duration,
    /// Membership events.
    pub(crate) events: u64,
}

/// What the receiver side counted at the end of a run.
pub(crate) struct Seen {
    pub(crate) members: usize,
    pub(crate) members_resynced: usize,
    pub(crate) diverged: usize,
    /// Resyncs counted by the receiver model, or `None` to take the controller's count.
    pub(crate) resyncs: Option<u64>,
    /// See [`ChurnReport::lost_every_copy`].
    pub(crate) lost_every_copy: Option<u64>,
    /// See [`ChurnReport::resyncs_charged`].
    pub(crate) resyncs_charged: bool,
}

impl Tally {
    /// Runs `f` on the controller at `now`, timing it.
    pub(crate) fn call(
        &mut self,
        controller: &mut StoreDriver<ChaCha20Rng>,
        now: u64,
        f: impl FnOnce(&mut StoreDriver<ChaCha20Rng>, Timestamp),
    ) {
        let started = Instant::now();
        f(controller, Timestamp(now));
        self.controller_time += started.elapsed();
    }

    /// The report: the controller's counters for `group`, this tally and what receivers saw.
    pub(crate) fn report(
        &mut self,
        controller: &mut StoreDriver<ChaCha20Rng>,
        now: u64,
        group: &str,
        degree: u8,
        seen: &Seen,
    ) -> ChurnReport {
        let stats = match controller.handle_command(Timestamp(now), Command::Stats(group.into())) {
            Ok(Response::Stats(s)) => s,
            _ => gkm_server::Stats::default(),
        };
        self.converged.sort_unstable();
        ChurnReport {
            members: seen.members,
            degree,
            strategy: "group".into(),
            rekeys: stats.rekeys,
            events: self.events,
            encryptions: stats.encryptions,
            datagrams: stats.datagrams,
            multicast_bytes: stats.bytes,
            resyncs: seen.resyncs.unwrap_or(stats.resyncs),
            members_resynced: seen.members_resynced,
            lost_every_copy: seen.lost_every_copy,
            resyncs_charged: seen.resyncs_charged,
            converged_ms_p50: percentile(&self.converged, 50),
            converged_ms_p99: percentile(&self.converged, 99),
            diverged: seen.diverged,
            controller_cpu_us_per_op: self.controller_time.as_secs_f64() * 1e6
                / self.events.max(1) as f64,
        }
    }
}

/// No persistence: the simulator measures the protocol, not the disk.
pub(crate) struct NoStore;

impl Store for NoStore {
    fn save(&mut self, _state: &GroupState) -> Result<(), StoreError> {
        Ok(())
    }
    fn save_delta(&mut self, _delta: &GroupDelta) -> Result<(), StoreError> {
        Ok(())
    }
}

struct Receiver {
    member: Member<ChaCha20Rng>,
    /// Gilbert–Elliott state: true while the link is bad.
    bad: bool,
    resynced: bool,
}

struct Sim {
    config: ChurnConfig,
    rng: ChaCha20Rng,
    controller: StoreDriver<ChaCha20Rng>,
    controller_key: VerifyingKey,
    receivers: HashMap<u64, Receiver>,
    /// Admitted members by leaf (receiver ids).
    by_leaf: HashMap<usize, u64>,
    /// One more than the largest leaf a member was admitted at.
    leaf_bound: usize,
    next_id: u64,
    now: u64,
    /// Epoch → when the controller sent it.
    sent_at: HashMap<u64, u64>,
    /// Each distinct rekey datagram sent: the receivers it carries keys for (a wrap under a key
    /// on their path), and whether a copy reached each.
    copies: HashMap<Vec<u8>, HashMap<u64, bool>>,
    tally: Tally,
}

/// Runs the churn simulation: the group of `start::start` (`netsim/src/start.rs`), its warm-up,
/// then `start::churn_events` and a settle.
pub fn run(config: &ChurnConfig) -> Result<ChurnReport, CostError> {
    let mut sim = Sim::started(config)?;
    start::churn_events(&mut sim, config);
    sim.settle();
    Ok(sim.report())
}

/// Replays a membership trace ([`crate::trace`]) on the real controller and members, after
/// `config.members` members restored and warmed up first (as [`run`] starts); `config`'s rates
/// and duration are not used (the trace sets them). The report is [`run`]'s.
pub fn replay(config: &ChurnConfig, trace: &crate::trace::Trace) -> Result<ChurnReport, CostError> {
    let mut sim = Sim::started(config)?;
    let start = sim.now;
    let mut ids: HashMap<usize, u64> = HashMap::new();
    let mut events = trace.events.iter().peekable();
    while events.peek().is_some() {
        sim.now += TICK_MS;
        while let Some(e) = events.next_if(|e| start + e.time_ms <= sim.now) {
            if e.join {
                ids.insert(e.member, sim.register());
            } else if let Some(id) = ids.remove(&e.member) {
                sim.leave_id(id);
            }
            sim.tally.events += 1;
        }
        sim.tick();
    }
    sim.settle();
    Ok(sim.report())
}

impl Model for Sim {
    fn now(&mut self) -> &mut u64 {
        &mut self.now
    }

    fn join(&mut self) {
        self.register();
        self.tally.events += 1;
    }

    fn leave(&mut self, leaf: usize) -> bool {
        let Some(id) = self.by_leaf.get(&leaf).copied() else {
            return false;
        };
        self.leave_id(id);
        self.tally.events += 1;
        true
    }

    fn leaf_bound(&self) -> usize {
        self.leaf_bound
    }

    /// Fires timers and moves every message until nothing moves (bounded).
    fn tick(&mut self) {
        self.controller_call(StoreDriver::handle_timeout);
        let now = self.now;
        for r in self.receivers.values_mut() {
            r.member.handle_timeout(now);
        }
        for _ in 0..1_000 {
            if !self.pump() {
                return;
            }
        }
        panic!("the simulated network did not settle (livelock)");
    }
}

impl Sim {
    /// The group of `start::start` (`netsim/src/start.rs`) with a full `Member` resumed for
    /// every restored member during the warm-up.
    fn started(config: &ChurnConfig) -> Result<Sim, CostError> {
        let start = start::start(config)?;
        let mut sim = Sim {
            config: config.clone(),
            rng: ChaCha20Rng::seed_from_u64(config.seed),
            controller: start.controller,
            controller_key: start.controller_key,
            receivers: HashMap::new(),
            by_leaf: HashMap::new(),
            leaf_bound: 0,
            next_id: 0,
            now: START,
            sent_at: HashMap::new(),
            copies: HashMap::new(),
            tally: Tally::default(),
        };
        let (identity, hpke) = (start.identity, start.hpke);
        start::warm_up(&mut sim, &start.resumes, |sim, leaf| {
            sim.resume(leaf, &identity, &hpke);
        });
        Ok(sim)
    }

    fn member_config(&self) -> MemberConfig {
        let mut config = MemberConfig::new(GroupId::from_name(GROUP), self.controller_key);
        // Lease renewals double as a slow resync path: a member that lost every heartbeat of a
        // long loss burst still learns it is behind when it renews.
        config.renew_interval_ms = RENEW_MS;
        config
    }

    fn member_rng(&mut self) -> ChaCha20Rng {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        ChaCha20Rng::from_seed(seed)
    }

    /// A restored member resumes its membership at `leaf` now (its resync request, answered
    /// with an acknowledgement, schedules its first renewal).
    fn resume(&mut self, leaf: NodeId, identity: &SigningKey, hpke: &HpkeSecret) {
        let Some(path) = self
            .controller
            .tree(GroupId::from_name(GROUP))
            .and_then(|t| t.member_path(leaf))
        else {
            return;
        };
        let member = Member::resume(
            self.member_config(),
            identity.clone(),
            hpke.clone(),
            self.member_rng(),
            start::member_id(leaf, 0),
            path,
            self.now,
        );
        let id = self.add(member);
        self.admitted(id);
    }

    /// A new member, registering now (its request goes to the controller at once): its
    /// receiver id.
    fn register(&mut self) -> u64 {
        let mut member_rng = self.member_rng();
        let mut seed = [0u8; 32];
        member_rng.fill_bytes(&mut seed);
        let identity = SigningKey::from_bytes(&seed);
        let hpke = HpkeSecret::generate(Kem::XWing, &mut member_rng);
        let member = Member::new(self.member_config(), identity, hpke, member_rng, self.now);
        let id = self.add(member);
        self.send_requests(id);
        id
    }

    fn add(&mut self, member: Member<ChaCha20Rng>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.receivers.insert(
            id,
            Receiver {
                member,
                bad: false,
                resynced: false,
            },
        );
        id
    }

    /// The receiver `id` holds a membership now: known by its leaf.
    fn admitted(&mut self, id: u64) {
        let Some(leaf) = self
            .receivers
            .get(&id)
            .and_then(|r| r.member.membership())
            .map(|(_, path)| path.leaf().0 as usize)
        else {
            return;
        };
        self.by_leaf.insert(leaf, id);
        self.leaf_bound = self.leaf_bound.max(leaf + 1);
    }

    /// The receiver `id` leaves (a signed leave request to the controller, at once).
    fn leave_id(&mut self, id: u64) {
        let Some(mut r) = self.receivers.remove(&id) else {
            return;
        };
        if let Some((_, path)) = r.member.membership() {
            self.by_leaf.remove(&(path.leaf().0 as usize));
        }
        r.member.leave(self.now);
        while let Some(request) = r.member.poll_request() {
            self.controller_call(|c, now| c.handle_request(ConnId(id), now, &request));
        }
    }

    /// Sends the receiver's queued requests to the controller; whether there were any.
    fn send_requests(&mut self, id: u64) -> bool {
        let mut moved = false;
        while let Some(request) = self
            .receivers
            .get_mut(&id)
            .and_then(|r| r.member.poll_request())
        {
            moved = true;
            self.controller_call(|c, now| c.handle_request(ConnId(id), now, &request));
        }
        moved
    }

    fn controller_call(&mut self, f: impl FnOnce(&mut StoreDriver<ChaCha20Rng>, Timestamp)) {
        self.tally.call(&mut self.controller, self.now, f);
    }

    fn lost(&mut self, id: u64) -> bool {
        let u = uniform(&mut self.rng);
        let (p, model) = (self.config.loss, self.config.model);
        self.receivers
            .get_mut(&id)
            .is_none_or(|r| model.lost(p, &mut r.bad, u))
    }

    fn pump(&mut self) -> bool {
        let mut moved = false;
        let mut ids: Vec<u64> = self.receivers.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            moved |= self.send_requests(id);
        }
        while let Some(t) = self.controller.poll_transmit() {
            moved = true;
            match t {
                Transmit::Multicast { bytes, .. } => {
                    if let Some(epoch) = wire::RekeyDatagram::peek_epoch(&bytes).map(|(_, e)| e.0) {
                        self.sent_at.entry(epoch).or_insert(self.now);
                        self.note_rekey(&bytes);
                    }
                    for &id in &ids {
                        if self.lost(id) {
                            continue;
                        }
                        if let Some(got) = self.copies.get_mut(&bytes).and_then(|c| c.get_mut(&id))
                        {
                            *got = true;
                        }
                        if let Some(r) = self.receivers.get_mut(&id) {
                            r.member.handle_datagram(self.now, &bytes);
                        }
                    }
                }
                Transmit::Reply { conn, bytes } => {
                    if let Some(r) = self.receivers.get_mut(&conn.0) {
                        r.member.handle_reply(self.now, &bytes);
                    }
                }
            }
        }
        while self.controller.poll_event().is_some() {}
        let mut joined = Vec::new();
        for (&id, r) in &mut self.receivers {
            while let Some(event) = r.member.poll_event() {
                match event {
                    MemberEvent::KeyChanged { epoch, .. } => {
                        if r.member.stats().resyncs > 0 {
                            r.resynced = true;
                        }
                        if let Some(&sent) = self.sent_at.get(&epoch.0) {
                            self.tally.converged.push(self.now - sent);
                        }
                    }
                    MemberEvent::Joined { .. } => joined.push(id),
                    _ => {}
                }
            }
        }
        for id in joined {
            self.admitted(id);
        }
        moved
    }

    /// The first copy of a rekey datagram: which receivers it carries keys for.
    fn note_rekey(&mut self, bytes: &[u8]) {
        if self.copies.contains_key(bytes) {
            return;
        }
        let Ok(rekey) = wire::AuthenticRekey::verify(bytes, &self.controller_key) else {
            return;
        };
        let wrapping: std::collections::HashSet<u32> =
            rekey.datagram().wraps().map(|w| w.wrapping.0).collect();
        let covered = self
            .receivers
            .iter()
            .filter(|(_, r)| {
                r.member.membership().is_some_and(|(_, path)| {
                    path.keys().iter().any(|k| wrapping.contains(&k.node.0))
                })
            })
            .map(|(id, _)| (*id, false))
            .collect();
        self.copies.insert(bytes.to_vec(), covered);
    }

    /// Lets timers run (heartbeats, resyncs) until every member holds the key (bounded).
    fn settle(&mut self) {
        for _ in 0..6_000 {
            self.now += TICK_MS;
            self.tick();
            if self.diverged() == 0 {
                return;
            }
        }
    }

    fn diverged(&self) -> usize {
        let Some((epoch, key)) = self.controller.traffic_key(GroupId::from_name(GROUP)) else {
            return self.receivers.len();
        };
        self.receivers
            .values()
            .filter(|r| {
                !r.member
                    .traffic_key()
                    .is_some_and(|(e, k)| e == epoch && k.as_bytes() == key.as_bytes())
            })
            .count()
    }

    fn report(&mut self) -> ChurnReport {
        let seen = Seen {
            members: self.receivers.len(),
            members_resynced: self.receivers.values().filter(|r| r.resynced).count(),
            diverged: self.diverged(),
            resyncs: None,
            lost_every_copy: Some(
                self.copies
                    .values()
                    .flat_map(|c| c.values())
                    .filter(|got| !**got)
                    .count() as u64,
            ),
            resyncs_charged: true,
        };
        self.tally.report(
            &mut self.controller,
            self.now,
            GROUP,
            self.config.degree,
            &seen,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(loss: f64, model: LossModel) -> ChurnConfig {
        ChurnConfig {
            members: 200,
            degree: 4,
            duration_s: 20,
            join_rate: 2.0,
            leave_rate: 2.0,
            interval_ms: 1_000,
            loss,
            model,
            repeats: 1,
            spacing_ms: 100,
            seed: 3,
        }
    }

    #[test]
    fn gilbert_elliott_steps_compose() {
        // k single steps and one k-step draw give the same loss rate and burst persistence.
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let p = 0.2;
        for steps in [1i32, 3] {
            let (mut bad, mut lost, mut both, n) = (false, 0u32, 0u32, 200_000);
            let mut before = false;
            for _ in 0..n {
                let u = uniform(&mut rng);
                let l = LossModel::GilbertElliott.lost_after(
                    p,
                    &mut bad,
                    u,
                    steps.unsigned_abs().into(),
                );
                lost += u32::from(l);
                both += u32::from(l && before);
                before = l;
            }
            let rate = f64::from(lost) / f64::from(n);
            assert!((rate - p).abs() < 0.01, "{steps} steps: loss {rate}");
            // P(lost | lost before) = share + (1 - share) λ^k, λ = 0.75 - enter.
            let enter = p / (1.0 - p) / 4.0;
            let want = p + (1.0 - p) * (0.75 - enter).powi(steps);
            let got = f64::from(both) / f64::from(lost);
            assert!((got - want).abs() < 0.02, "{steps} steps: {got} vs {want}");
        }
    }

    #[test]
    fn a_churn_run_with_loss_converges() {
        for model in [LossModel::Bernoulli, LossModel::GilbertElliott] {
            let report = run(&config(0.2, model)).unwrap();
            assert_eq!(report.diverged, 0, "{report:?}");
            assert!(report.events > 40, "{report:?}");
            assert!(report.resyncs > 0, "20% loss needs resyncs: {report:?}");
        }
        let clean = run(&config(0.0, LossModel::Bernoulli)).unwrap();
        assert_eq!(clean.members_resynced, 0, "{clean:?}");
        assert_eq!(clean.diverged, 0);
    }

    #[test]
    fn a_replayed_trace_churns_the_group_it_names() {
        let trace = crate::trace::Trace::parse(
            "time_ms,member,event\n0,a,join\n0,b,join\n400,c,join\n2000,a,leave\n2500,d,join\n4000,b,leave\n",
        )
        .unwrap();
        let mut config = config(0.2, LossModel::Bernoulli);
        config.members = 100;
        let report = replay(&config, &trace).unwrap();
        assert_eq!(report.events, 6, "{report:?}");
        assert_eq!(report.members, 102, "100 + 4 joined - 2 left: {report:?}");
        assert_eq!(report.diverged, 0, "{report:?}");
        assert!(report.rekeys >= 3, "{report:?}");
        assert!(report.resyncs > 0, "20% loss needs resyncs: {report:?}");
    }

    #[test]
    fn same_seed_same_report_except_cpu() {
        let mut a = run(&config(0.1, LossModel::Bernoulli)).unwrap();
        let mut b = run(&config(0.1, LossModel::Bernoulli)).unwrap();
        a.controller_cpu_us_per_op = 0.0;
        b.controller_cpu_us_per_op = 0.0;
        assert_eq!(a, b);
    }
}
