//! Churn at scale: the real sans-I/O controller (restored with N members, so no N registrations
//! are needed), real joins (signed requests, HPKE-sealed welcomes), evictions, batches, spaced
//! repeats, heartbeats, and receivers modelled by subtree: each rekey datagram is verified once
//! and delivered, with per-receiver loss, to the members under its covers. A modelled member
//! holds an epoch and decides when to resync with the real member's own decision,
//! [`gkm_member::catch_up::CatchUp`] (it waits a grace for a repeat, holds rekeys of later
//! epochs, resyncs if nothing applied meanwhile); its resyncs are real signed requests through
//! the controller, answered with HPKE-sealed paths, so the controller's time includes them
//! (`resyncs_charged`). About 80 bytes per member instead of a whole `Member`, so 2^20 members
//! and 10^5 events fit in minutes.
//!
//! It starts from the group the full model starts from (`netsim/src/start.rs`: the same tree,
//! member placement and controller) and is churned by the same events. Members renew their leases every
//! 5 s, as the full model's do (from the time they resume in the warm-up); a renewal of a member
//! behind is sent through the controller (a resync request, answered with its path or, while the
//! missed rekey is still being repeated, acknowledged), one of a member in step is not sent (it
//! would be acknowledged and change nothing), so the controller's time leaves those out.
//!
//! A member that missed a whole epoch learns it from any datagram of a later one, as a full
//! member does, and holds it as a full member does (the datagrams that serve others too: the
//! members holding an epoch older than the one before are listed once per epoch). What it leaves
//! out, next to full receivers: the silence timer and fan-out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_member::HELD_REKEYS;
use gkm_member::catch_up::{self, Arrival, CatchUp};
use gkm_server::{Command, ConnId, StoreDriver, Timestamp, Transmit};
use lkh_tree::{Epoch, GroupId, Kcv, KeyTree, NodeId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{
    Ack, AuthenticRekey, Codec, HpkePublicKey, HpkeSecret, Kem, MemberId, MessageType,
    RegistrationRequest, ResyncRequest, SealedKind, SealedPath,
};

use crate::churn::{ChurnConfig, ChurnReport, Seen, Tally, uniform};
use crate::cost::CostError;
use crate::start::{self, GROUP, Model, RENEW_MS, START, Start, TICK_MS};

/// The member's default grace ([`gkm_member::MemberConfig::new`]).
const GRACE_MS: u64 = 300;
/// A refused resync is asked again after the member's `retry_ms` (its default; the member adds
/// up to half of it at random).
const RETRY_MS: u64 = 2_000;
const ABSENT: u32 = u32::MAX;
/// Connection ids of resync requests: this bit and the leaf (joins count up from 0).
const RESYNC_CONN: u64 = 1 << 63;

/// Per leaf: the epoch its member holds (`ABSENT` if no member), the epoch it joined in, its
/// link's loss state, and its catch-up decision.
struct Receivers {
    held: Vec<u32>,
    joined: Vec<u32>,
    /// Gilbert–Elliott: whether the link was in a loss burst at its last draw.
    bad: Vec<bool>,
    /// The multicast count at the link's last draw (the loss process steps once per datagram
    /// sent to the group, as for a full receiver, drawn only when one reaches this member).
    drawn: Vec<u64>,
    resynced: Vec<bool>,
    /// A resync request waits for its answer.
    asking: Vec<bool>,
    /// When a refused resync is asked again (0: not).
    retry_at: Vec<u64>,
    /// When the member renews its lease (0: not scheduled).
    renew_at: Vec<u64>,
    catch_up: Vec<CatchUp<HeldRekey>>,
}

impl Receivers {
    fn ensure(&mut self, leaf: usize) {
        if self.held.len() <= leaf {
            let n = leaf + 1;
            self.held.resize(n, ABSENT);
            self.joined.resize(n, 0);
            self.bad.resize(n, false);
            self.drawn.resize(n, 0);
            self.resynced.resize(n, false);
            self.asking.resize(n, false);
            self.retry_at.resize(n, 0);
            self.renew_at.resize(n, 0);
            self.catch_up.resize(n, CatchUp::new(GRACE_MS));
        }
    }

    /// A new member at `leaf`, holding `epoch` (its renewal is the caller's to schedule).
    fn admit(&mut self, leaf: usize, epoch: u32, sent: u64) {
        self.ensure(leaf);
        self.held[leaf] = epoch;
        self.bad[leaf] = false;
        self.drawn[leaf] = sent;
        self.resynced[leaf] = false;
        self.asking[leaf] = false;
        self.retry_at[leaf] = 0;
        self.catch_up[leaf].reset();
    }
}

/// What a modelled member holds of a rekey datagram of a later epoch (the real member holds its
/// bytes): which datagram it is (its epoch and first cover) and whether it serves the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeldRekey {
    id: u64,
    serves: bool,
}

/// What a timer is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// The catch-up decision's resync.
    CatchUp,
    /// A refused resync asked again.
    Retry,
    /// A lease renewal.
    Renew,
}

/// A timer: when, which leaf, what for.
type Timer = Reverse<(u64, u32, Due)>;

struct Scale {
    config: ChurnConfig,
    rng: ChaCha20Rng,
    controller: StoreDriver<ChaCha20Rng>,
    controller_key: VerifyingKey,
    group: GroupId,
    rx: Receivers,
    now: u64,
    /// Epoch → when its first datagram was sent.
    sent_at: HashMap<u32, u64>,
    /// Epoch → check value of its traffic key (what a member holding it puts in a resync).
    kcvs: HashMap<u32, Kcv>,
    /// Multicast datagrams sent (copies and heartbeats).
    sent: u64,
    /// The controller's epoch.
    current: u32,
    timers: BinaryHeap<Timer>,
    /// The members that missed a whole epoch before `lagging_epoch` (listed at its first
    /// datagram).
    lagging: Vec<usize>,
    lagging_epoch: u32,
    /// The identity of every restored member (they share one: the controller checks signatures
    /// against the record, and a shared key costs the same to check).
    restored: SigningKey,
    /// The HPKE key of every restored member (shared, like their identity).
    restored_hpke: HpkePublicKey,
    /// Joiners' identities and HPKE keys, by leaf once admitted, by connection while
    /// registering.
    identities: HashMap<usize, (SigningKey, HpkePublicKey)>,
    registering: HashMap<u64, (SigningKey, HpkePublicKey)>,
    next_conn: u64,
    tally: Tally,
}

/// Runs churn on `config.members` members, receivers modelled by subtree: the group of
/// `start::start` (`netsim/src/start.rs`), its warm-up, then `start::churn_events` and up to 60
/// simulated seconds for heartbeats to bring every member in step.
pub fn run(config: &ChurnConfig) -> Result<ChurnReport, CostError> {
    let mut start = start::start(config)?;
    let resumes = std::mem::take(&mut start.resumes);
    let mut sim = Scale::new(config.clone(), start)?;
    start::warm_up(&mut sim, &resumes, Scale::resume);
    start::churn_events(&mut sim, config);
    for _ in 0..6_000 {
        sim.now += TICK_MS;
        sim.tick();
        if sim.diverged() == 0 {
            break;
        }
    }
    Ok(sim.report())
}

impl Model for Scale {
    fn now(&mut self) -> &mut u64 {
        &mut self.now
    }

    fn join(&mut self) {
        self.register();
    }

    fn leave(&mut self, leaf: usize) -> bool {
        if self.rx.held.get(leaf).is_none_or(|&h| h == ABSENT) {
            return false;
        }
        self.evict(leaf);
        true
    }

    fn leaf_bound(&self) -> usize {
        self.rx.held.len()
    }

    /// The controller's timers, the members' due resyncs, then every datagram and reply, in the
    /// order the controller queued them (as the full model's pump moves them).
    fn tick(&mut self) {
        self.call(StoreDriver::handle_timeout);
        self.fire_timers();
        while let Some(t) = self.controller.poll_transmit() {
            match t {
                Transmit::Multicast { bytes, .. } => {
                    self.sent += 1;
                    self.datagram(&bytes);
                }
                Transmit::Reply { conn, bytes } => self.reply(conn, &bytes),
            }
        }
        while self.controller.poll_event().is_some() {}
    }
}

impl Scale {
    /// The model of `start`'s group (its restored members are admitted as they resume).
    fn new(config: ChurnConfig, start: Start) -> Result<Self, CostError> {
        let group = GroupId::from_name(GROUP);
        let epoch = start
            .controller
            .traffic_key(group)
            .map_or(0, |(e, _)| u32::try_from(e.0).unwrap_or(0));
        let rx = Receivers {
            held: Vec::new(),
            joined: Vec::new(),
            bad: Vec::new(),
            drawn: Vec::new(),
            resynced: Vec::new(),
            asking: Vec::new(),
            retry_at: Vec::new(),
            renew_at: Vec::new(),
            catch_up: Vec::new(),
        };
        let mut sim = Scale {
            rng: ChaCha20Rng::seed_from_u64(config.seed),
            config,
            controller: start.controller,
            controller_key: start.controller_key,
            group,
            rx,
            now: START,
            sent_at: HashMap::new(),
            kcvs: HashMap::new(),
            sent: 0,
            current: epoch,
            timers: BinaryHeap::new(),
            lagging: Vec::new(),
            lagging_epoch: epoch,
            restored: start.identity,
            restored_hpke: start.hpke.public_key()?,
            identities: HashMap::new(),
            registering: HashMap::new(),
            next_conn: 0,
            tally: Tally::default(),
        };
        sim.note_kcv();
        Ok(sim)
    }

    /// Whether the next datagram to reach `leaf` is lost: the link's loss process stepped once
    /// per datagram multicast since its last draw.
    fn lost(&mut self, leaf: usize) -> bool {
        let u = uniform(&mut self.rng);
        let (p, model) = (self.config.loss, self.config.model);
        let (Some(bad), Some(drawn)) = (self.rx.bad.get_mut(leaf), self.rx.drawn.get_mut(leaf))
        else {
            return true;
        };
        let steps = self.sent.saturating_sub(*drawn).max(1);
        *drawn = self.sent;
        model.lost_after(p, bad, u, steps)
    }

    fn call(&mut self, f: impl FnOnce(&mut StoreDriver<ChaCha20Rng>, Timestamp)) {
        self.tally.call(&mut self.controller, self.now, f);
        self.note_kcv();
    }

    /// Remembers the current epoch's check value.
    fn note_kcv(&mut self) {
        if let Some((epoch, key)) = self.controller.traffic_key(self.group)
            && let Ok(epoch) = u32::try_from(epoch.0)
        {
            self.kcvs.entry(epoch).or_insert_with(|| key.check_value());
            self.current = epoch;
        }
    }

    /// A new member registers now: a real signed registration request.
    fn register(&mut self) {
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let identity = SigningKey::from_bytes(&seed);
        let hpke = HpkeSecret::generate(Kem::XWing, &mut self.rng);
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let Ok(hpke_key) = hpke.public_key() else {
            return;
        };
        let request = RegistrationRequest {
            group: self.group,
            identity: identity.verifying_key().to_bytes(),
            hpke_key: hpke_key.clone(),
            timestamp_ms: self.now,
            nonce,
            token: Vec::new(),
        };
        let bytes = wire::sign(&request, &identity);
        let conn = self.next_conn;
        self.next_conn += 1;
        self.registering.insert(conn, (identity, hpke_key));
        self.tally.events += 1;
        self.call(|c, now| c.handle_request(ConnId(conn), now, &bytes));
    }

    /// The member at `leaf` is evicted now.
    fn evict(&mut self, leaf: usize) {
        let id = self.member_id(leaf);
        self.rx.held[leaf] = ABSENT;
        self.rx.resynced[leaf] = false;
        self.rx.catch_up[leaf].reset();
        self.identities.remove(&leaf);
        self.tally.events += 1;
        self.call(|c, now| {
            let _ = c.handle_command(now, Command::Evict(GROUP.into(), id));
        });
    }

    fn member_id(&self, leaf: usize) -> u64 {
        (u64::try_from(leaf).unwrap_or(0) << 32) | u64::from(self.rx.joined[leaf])
    }

    fn fire_timers(&mut self) {
        while let Some(&Reverse((due, leaf, what))) = self.timers.peek() {
            if due > self.now {
                return;
            }
            self.timers.pop();
            let i = leaf as usize;
            if self.rx.held.get(i).is_none_or(|&h| h == ABSENT) {
                continue;
            }
            let fire = match what {
                Due::CatchUp => {
                    self.rx.catch_up[i].poll_timeout() == Some(due)
                        && self.rx.catch_up[i].handle_timeout(self.now)
                }
                Due::Retry => std::mem::take(&mut self.rx.retry_at[i]) == due,
                Due::Renew if self.rx.renew_at[i] == due => {
                    self.rx.renew_at[i] = 0;
                    // A member in step is acknowledged and changes nothing: its renewal is not
                    // sent (nor charged). One behind sends it: a resync request.
                    if self.rx.held[i] == self.current {
                        self.renew_later(i);
                        false
                    } else {
                        true
                    }
                }
                Due::Renew => false,
            };
            if fire {
                self.send_resync(i);
            }
        }
    }

    /// A restored member resumes its membership at `leaf` now, holding the current epoch, as a
    /// full member resumes with the path the controller holds: it asks for a resync at once, and
    /// its renewals count from the acknowledgement.
    fn resume(&mut self, leaf: NodeId) {
        let leaf = leaf.0 as usize;
        self.rx.admit(leaf, self.current, self.sent);
        self.send_resync(leaf);
    }

    /// The member at `leaf` renews its lease a period from now (after any answer).
    fn renew_later(&mut self, leaf: usize) {
        let due = self.now + RENEW_MS;
        self.rx.renew_at[leaf] = due;
        self.timers
            .push(Reverse((due, u32::try_from(leaf).unwrap_or(0), Due::Renew)));
    }

    /// A real signed resync request from the member at `leaf`, through the controller.
    fn send_resync(&mut self, leaf: usize) {
        let held = self.rx.held[leaf];
        let Some(&kcv) = self.kcvs.get(&held) else {
            return;
        };
        let mut nonce = [0u8; 16];
        self.rng.fill_bytes(&mut nonce);
        let request = ResyncRequest {
            group: self.group,
            member: MemberId(self.member_id(leaf)),
            epoch: Epoch(u64::from(held)),
            kcv,
            timestamp_ms: self.now,
            nonce,
            hpke_key: self
                .identities
                .get(&leaf)
                .map_or(&self.restored_hpke, |(_, hpke)| hpke)
                .clone(),
        };
        let key = self
            .identities
            .get(&leaf)
            .map_or(&self.restored, |(identity, _)| identity);
        let bytes = wire::sign(&request, key);
        self.rx.asking[leaf] = true;
        let conn = RESYNC_CONN | u64::try_from(leaf).unwrap_or(0);
        self.call(|c, now| c.handle_request(ConnId(conn), now, &bytes));
    }

    /// The member at `leaf` is behind: its catch-up decides when it resyncs.
    fn behind(&mut self, leaf: usize) {
        let c = &mut self.rx.catch_up[leaf];
        let before = c.poll_timeout();
        c.behind(self.now, self.rx.asking[leaf]);
        if let Some(due) = c.poll_timeout()
            && before != Some(due)
        {
            self.timers.push(Reverse((
                due,
                u32::try_from(leaf).unwrap_or(0),
                Due::CatchUp,
            )));
        }
    }

    /// The member at `leaf` holds `epoch` now (a rekey applied or a resync answered), then
    /// applies the held rekeys that follow.
    fn advance(&mut self, leaf: usize, epoch: u32) {
        self.rx.held[leaf] = epoch;
        self.rx.catch_up[leaf].caught_up();
        self.converged(epoch);
        self.apply_held(leaf);
    }

    /// Applies the held rekeys that follow the member's epoch (and gives up the stale and
    /// expired), as a member does after every datagram it receives.
    fn apply_held(&mut self, leaf: usize) {
        for _ in 0..HELD_REKEYS {
            let held = Epoch(u64::from(self.rx.held[leaf]));
            let Some(rekey) = self.rx.catch_up[leaf].next_held(self.now, held) else {
                return;
            };
            // One that serves others is dropped, as the member drops it.
            if rekey.serves {
                let next = u32::try_from(rekey.id >> 32).unwrap_or(0);
                self.rx.held[leaf] = next;
                self.rx.catch_up[leaf].caught_up();
                self.converged(next);
            }
        }
    }

    fn converged(&mut self, epoch: u32) {
        let sent = self.sent_at.get(&epoch).copied().unwrap_or(self.now);
        self.tally.converged.push(self.now.saturating_sub(sent));
    }

    fn reply(&mut self, conn: ConnId, bytes: &[u8]) {
        match MessageType::peek(bytes) {
            Ok(MessageType::Welcome | MessageType::ResyncResponse) => {}
            Ok(MessageType::Ack) => return self.ack(conn, bytes),
            Ok(MessageType::Error) => return self.refused(conn),
            _ => return,
        }
        let Ok(sealed) = SealedPath::decode_either(&mut wire::Reader::new(bytes)) else {
            return;
        };
        let leaf = usize::try_from(sealed.member.0 >> 32).unwrap_or(usize::MAX);
        let Ok(epoch) = u32::try_from(sealed.epoch.0) else {
            return;
        };
        match sealed.kind {
            SealedKind::Welcome => {
                self.rx.admit(leaf, epoch, self.sent);
                self.rx.joined[leaf] = u32::try_from(sealed.member.0 & 0xffff_ffff).unwrap_or(0);
                if let Some(identity) = self.registering.remove(&conn.0) {
                    self.identities.insert(leaf, identity);
                }
                self.renew_later(leaf);
            }
            SealedKind::Resync => {
                if self.rx.held.get(leaf).is_none_or(|&h| h == ABSENT) {
                    return;
                }
                self.rx.asking[leaf] = false;
                self.rx.retry_at[leaf] = 0;
                self.renew_later(leaf);
                if epoch > self.rx.held[leaf] {
                    self.rx.resynced[leaf] = true;
                    self.advance(leaf, epoch);
                }
            }
        }
    }

    /// A resync acknowledged (the member's epoch was current, or its successor still being
    /// repeated): behind if the acknowledgement names a later epoch.
    fn ack(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(leaf) = resync_leaf(conn, &self.rx.held) else {
            return;
        };
        let Ok(ack) = Ack::decode_exact(bytes) else {
            return;
        };
        self.rx.asking[leaf] = false;
        self.rx.retry_at[leaf] = 0;
        self.renew_later(leaf);
        if ack.epoch.0 > u64::from(self.rx.held[leaf]) {
            self.behind(leaf);
        }
    }

    /// A resync refused (rate-limited): asked again after the member's retry delay.
    fn refused(&mut self, conn: ConnId) {
        let Some(leaf) = resync_leaf(conn, &self.rx.held) else {
            return;
        };
        self.rx.asking[leaf] = false;
        let due = self.now + RETRY_MS;
        self.rx.retry_at[leaf] = due;
        self.timers
            .push(Reverse((due, u32::try_from(leaf).unwrap_or(0), Due::Retry)));
    }

    fn datagram(&mut self, bytes: &[u8]) {
        match MessageType::peek(bytes) {
            Ok(MessageType::Rekey) => self.rekey(bytes),
            Ok(MessageType::Heartbeat) => self.heartbeat(bytes),
            _ => {}
        }
    }

    /// One rekey datagram: verified once, then each member under a cover receives it or not,
    /// and applies it, holds it or drops it as [`catch_up::arrival`] says.
    fn rekey(&mut self, bytes: &[u8]) {
        let Ok(authentic) = AuthenticRekey::verify(bytes, &self.controller_key) else {
            return;
        };
        let d = authentic.datagram();
        let Ok(epoch) = u32::try_from(d.epoch.0) else {
            return;
        };
        self.sent_at.entry(epoch).or_insert(self.now);
        let Some(tree) = self.controller.tree(self.group) else {
            return;
        };
        // A datagram is known by its epoch and first cover (what a held copy is compared by).
        let id = (u64::from(epoch) << 32) | u64::from(d.covers.first().map_or(0, |c| c.0));
        // The members it serves (`RekeyDatagram::serves`): under a cover, or with a wrap under
        // their leaf key.
        let mut leaves = leaves_under(tree, &d.covers);
        leaves.extend(
            d.wraps()
                .map(|w| w.wrapping)
                .filter(|&n| tree.is_member(n))
                .map(|n| n.0 as usize),
        );
        leaves.sort_unstable();
        leaves.dedup();
        if self.lagging_epoch != epoch {
            self.lagging_epoch = epoch;
            self.lagging = self.lagging_members(epoch);
        }
        for &leaf in &leaves {
            let held = self.rx.held.get(leaf).copied().unwrap_or(ABSENT);
            if held == ABSENT || self.lost(leaf) {
                continue;
            }
            match catch_up::arrival(Epoch(u64::from(held)), d.epoch) {
                Arrival::Old => {}
                Arrival::Next => self.advance(leaf, epoch),
                Arrival::Later => {
                    self.rx.catch_up[leaf].hold(self.now, d.epoch, HeldRekey { id, serves: true });
                    self.behind(leaf);
                }
            }
            self.apply_held(leaf);
        }
        // A member that missed a whole epoch also learns it from the datagrams it does not need:
        // it holds them too, as the real member holds every verified datagram of a later epoch
        // (they take room among its `HELD_REKEYS`), and drops them when they come up.
        let lagging = std::mem::take(&mut self.lagging);
        for &leaf in &lagging {
            let held = self.rx.held[leaf];
            if held == ABSENT
                || held.saturating_add(1) >= epoch
                || leaves.binary_search(&leaf).is_ok()
                || self.lost(leaf)
            {
                continue;
            }
            self.rx.catch_up[leaf].hold(self.now, d.epoch, HeldRekey { id, serves: false });
            self.behind(leaf);
        }
        self.lagging = lagging;
    }

    /// The members holding an epoch before the one before `epoch`.
    fn lagging_members(&self, epoch: u32) -> Vec<usize> {
        self.rx
            .held
            .iter()
            .enumerate()
            .filter(|&(_, &h)| h != ABSENT && h.saturating_add(1) < epoch)
            .map(|(leaf, _)| leaf)
            .collect()
    }

    /// A heartbeat: every member that receives it and is not in step ([`catch_up::in_step`])
    /// is behind.
    fn heartbeat(&mut self, bytes: &[u8]) {
        let Ok(beat) = <wire::Heartbeat as Codec>::decode(&mut wire::Reader::new(bytes)) else {
            return;
        };
        for leaf in 0..self.rx.held.len() {
            let held = self.rx.held[leaf];
            if held == ABSENT || self.lost(leaf) {
                continue;
            }
            let kcv = self.kcvs.get(&held).copied();
            if !catch_up::in_step(Epoch(u64::from(held)), kcv, beat.epoch, beat.kcv) {
                self.behind(leaf);
            }
        }
    }

    fn diverged(&self) -> usize {
        let epoch = self
            .controller
            .traffic_key(self.group)
            .map_or(0, |(e, _)| e.0);
        let current = u32::try_from(epoch).unwrap_or(0);
        self.rx
            .held
            .iter()
            .filter(|&&h| h != ABSENT && h != current)
            .count()
    }

    fn report(&mut self) -> ChurnReport {
        let seen = Seen {
            members: self.rx.held.iter().filter(|&&h| h != ABSENT).count(),
            members_resynced: self.rx.resynced.iter().filter(|&&r| r).count(),
            diverged: self.diverged(),
            resyncs: None,
            lost_every_copy: None,
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

/// The leaf of a present member whose resync `conn` carried.
fn resync_leaf(conn: ConnId, held: &[u32]) -> Option<usize> {
    if conn.0 & RESYNC_CONN == 0 {
        return None;
    }
    let leaf = usize::try_from(conn.0 & !RESYNC_CONN).ok()?;
    held.get(leaf).is_some_and(|&h| h != ABSENT).then_some(leaf)
}

/// Every member leaf under the given cover nodes.
fn leaves_under(tree: &KeyTree, covers: &[NodeId]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut stack: Vec<NodeId> = covers.to_vec();
    while let Some(node) = stack.pop() {
        if tree.is_member(node) {
            out.push(node.0 as usize);
        } else {
            stack.extend(tree.children(node));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::churn::LossModel;

    #[test]
    fn the_subtree_model_converges_under_loss_and_charges_its_resyncs() {
        let config = ChurnConfig {
            members: 4096,
            degree: 4,
            duration_s: 10,
            join_rate: 20.0,
            leave_rate: 20.0,
            interval_ms: 1_000,
            loss: 0.1,
            model: LossModel::Bernoulli,
            repeats: 1,
            spacing_ms: 100,
            seed: 5,
        };
        let report = run(&config).unwrap();
        assert_eq!(report.diverged, 0, "{report:?}");
        assert!(report.events > 300, "{report:?}");
        assert!(report.resyncs > 0, "{report:?}");
        assert!(report.resyncs_charged);
        assert!(
            report.members_resynced as u64 <= report.resyncs,
            "{report:?}"
        );
    }
}
