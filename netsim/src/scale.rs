//! Churn at scale: the real sans-I/O controller (restored with N members, so no N registrations
//! are needed), real joins (signed requests, HPKE-sealed welcomes), evictions, batches, repeats,
//! heartbeats, and receivers modelled by subtree: each rekey datagram is verified once and
//! delivered, with per-receiver loss, to the members under its covers; a member holds an epoch,
//! applies the next one from its datagram, and resyncs when a heartbeat shows it behind. Four
//! bytes of epoch and one of loss state per member instead of a whole `Member`, so 2^20 members
//! and 10^5 events fit in minutes. The receiver rules are those of `gkm_member::Member`;
//! resyncs are counted (and timed at the next heartbeat plus the member's 300 ms grace), not
//! sent through the controller.

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use gkm_server::{
    Command, ConnId, Controller, GroupPolicy, GroupState, HpkeDigest, MemberRecord, StoreDriver,
    Timestamp, Transmit,
};
use lkh_tree::{GroupId, KeyTree, NodeId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{
    AuthenticRekey, Codec, HpkeSecret, Kem, MemberId, MessageType, RegistrationRequest, SealedPath,
};

use crate::churn::{ChurnConfig, ChurnReport, NoStore, Seen, Tally, exponential, uniform};
use crate::cost::{self, CostError, Scheme};

const START: u64 = 1_800_000_000_000;
const NAME: &str = "netsim";
const GRACE_MS: u64 = 300;
const ABSENT: u32 = u32::MAX;

/// Per leaf: the epoch its member holds (`ABSENT` if no member), the epoch it joined in, and
/// whether its link is in a loss burst.
struct Receivers {
    held: Vec<u32>,
    joined: Vec<u32>,
    bad: Vec<bool>,
    resynced: Vec<bool>,
}

impl Receivers {
    fn ensure(&mut self, leaf: usize) {
        if self.held.len() <= leaf {
            let n = leaf + 1;
            self.held.resize(n, ABSENT);
            self.joined.resize(n, 0);
            self.bad.resize(n, false);
            self.resynced.resize(n, false);
        }
    }
}

struct Scale {
    config: ChurnConfig,
    rng: ChaCha20Rng,
    controller: StoreDriver<ChaCha20Rng>,
    group: GroupId,
    rx: Receivers,
    now: u64,
    sent_at: HashMap<u32, u64>,
    resyncs: u64,
    tally: Tally,
}

/// Runs churn on `config.members` members, receivers modelled by subtree.
pub fn run(config: &ChurnConfig) -> Result<ChurnReport, CostError> {
    let mut sim = Scale::new(config.clone())?;
    sim.tick();
    let end = sim.now + config.duration_s * 1_000;
    let mut next_join = sim.now as f64 + exponential(&mut sim.rng, config.join_rate);
    let mut next_leave = sim.now as f64 + exponential(&mut sim.rng, config.leave_rate);
    while sim.now < end {
        sim.now += 10;
        while next_join <= sim.now as f64 {
            sim.join();
            next_join += exponential(&mut sim.rng, config.join_rate);
        }
        while next_leave <= sim.now as f64 {
            sim.evict_one();
            next_leave += exponential(&mut sim.rng, config.leave_rate);
        }
        sim.tick();
    }
    // Let heartbeats bring every member in step (bounded: 60 simulated seconds).
    for _ in 0..6_000 {
        sim.now += 10;
        sim.tick();
        if sim.diverged() == 0 {
            break;
        }
    }
    Ok(sim.report())
}

impl Scale {
    fn new(config: ChurnConfig) -> Result<Self, CostError> {
        let mut rng = ChaCha20Rng::seed_from_u64(config.seed);
        let group = GroupId::from_name(NAME);
        let mut policy = GroupPolicy::new(NAME, group);
        policy.tree.degree = config.degree;
        policy.batch_interval_ms = config.interval_ms;
        policy.repeats = config.repeats.max(1);
        policy.heartbeat_interval_ms = 1_000;
        policy.lease_ms = u64::MAX / 4;
        let tree = cost::build(config.members, Scheme::OneWay, config.degree, &mut rng)?;
        let mut snapshot = tree.snapshot();
        snapshot.group = group;
        let members: Vec<MemberRecord> = tree
            .members()
            .map(|leaf| MemberRecord {
                id: MemberId(u64::from(leaf.0) << 32),
                identity: leaf_identity(leaf),
                hpke: HpkeDigest {
                    kem: Kem::XWing,
                    digest: [0; 32],
                },
                leaf,
                joined: 0,
                lease_until: Timestamp(u64::MAX / 2),
            })
            .collect();
        let epoch = u32::try_from(tree.epoch().0).unwrap_or(0);
        let mut rx = Receivers {
            held: Vec::new(),
            joined: Vec::new(),
            bad: Vec::new(),
            resynced: Vec::new(),
        };
        for m in &members {
            let leaf = m.leaf.0 as usize;
            rx.ensure(leaf);
            rx.held[leaf] = epoch;
        }
        drop(tree);
        let mut signer_seed = [0u8; 32];
        rng.fill_bytes(&mut signer_seed);
        let mut controller_seed = [0u8; 32];
        rng.fill_bytes(&mut controller_seed);
        let controller = StoreDriver::new(
            Controller::new(
                SigningKey::from_bytes(&signer_seed),
                ChaCha20Rng::from_seed(controller_seed),
                vec![policy],
                vec![GroupState {
                    tree: snapshot,
                    members,
                    enrollment: Default::default(),
                }],
                Timestamp(START),
            )?,
            Box::new(NoStore),
        );
        Ok(Scale {
            config,
            rng,
            controller,
            group,
            rx,
            now: START,
            sent_at: HashMap::new(),
            resyncs: 0,
            tally: Tally::default(),
        })
    }

    fn lost(&mut self, leaf: usize) -> bool {
        let u = uniform(&mut self.rng);
        let (p, model) = (self.config.loss, self.config.model);
        self.rx
            .bad
            .get_mut(leaf)
            .is_none_or(|bad| model.lost(p, bad, u))
    }

    fn call(&mut self, f: impl FnOnce(&mut StoreDriver<ChaCha20Rng>, Timestamp)) {
        self.tally.call(&mut self.controller, self.now, f);
    }

    fn join(&mut self) {
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
            hpke_key,
            timestamp_ms: self.now,
            nonce,
            token: Vec::new(),
        };
        let bytes = wire::sign(&request, &identity);
        self.tally.events += 1;
        self.call(|c, now| c.handle_request(ConnId(0), now, &bytes));
    }

    fn evict_one(&mut self) {
        let present = self.rx.held.iter().filter(|&&h| h != ABSENT).count();
        if present == 0 {
            return;
        }
        let n = u64::try_from(self.rx.held.len()).unwrap_or(u64::MAX);
        // Rejection sampling over leaves: members are most leaf slots, so this ends fast.
        for _ in 0..1_000 {
            let leaf = usize::try_from(self.rng.next_u64() % n).unwrap_or(0);
            if self.rx.held.get(leaf).is_some_and(|&h| h != ABSENT) {
                let id = (u64::try_from(leaf).unwrap_or(0) << 32) | u64::from(self.rx.joined[leaf]);
                self.rx.held[leaf] = ABSENT;
                self.tally.events += 1;
                self.call(|c, now| {
                    let _ = c.handle_command(now, Command::Evict(NAME.into(), id));
                });
                return;
            }
        }
    }

    fn tick(&mut self) {
        self.call(StoreDriver::handle_timeout);
        while let Some(t) = self.controller.poll_transmit() {
            match t {
                Transmit::Multicast { bytes, .. } => self.datagram(&bytes),
                Transmit::Reply { bytes, .. } => self.welcome(&bytes),
            }
        }
        while self.controller.poll_event().is_some() {}
    }

    fn welcome(&mut self, bytes: &[u8]) {
        if MessageType::peek(bytes) != Ok(MessageType::Welcome) {
            return;
        }
        let Ok(sealed) = SealedPath::decode(&mut wire::Reader::new(bytes)) else {
            return;
        };
        let leaf = usize::try_from(sealed.member.0 >> 32).unwrap_or(usize::MAX);
        let epoch = u32::try_from(sealed.epoch.0).unwrap_or(0);
        self.rx.ensure(leaf);
        self.rx.held[leaf] = epoch;
        self.rx.joined[leaf] = u32::try_from(sealed.member.0 & 0xffff_ffff).unwrap_or(0);
    }

    fn datagram(&mut self, bytes: &[u8]) {
        match MessageType::peek(bytes) {
            Ok(MessageType::Rekey) => self.rekey(bytes),
            Ok(MessageType::Heartbeat) => self.heartbeat(bytes),
            _ => {}
        }
    }

    /// One rekey datagram: verified once, then each member under a cover receives it or not.
    fn rekey(&mut self, bytes: &[u8]) {
        let Some(key) = self.controller_key() else {
            return;
        };
        let Ok(authentic) = AuthenticRekey::verify(bytes, &key) else {
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
        let leaves = leaves_under(tree, &d.covers);
        for leaf in leaves {
            let held = self.rx.held.get(leaf).copied().unwrap_or(ABSENT);
            if held == ABSENT || held.saturating_add(1) != epoch || self.lost(leaf) {
                continue;
            }
            self.rx.held[leaf] = epoch;
            self.tally.converged.push(0);
        }
    }

    /// A heartbeat: every member that receives it and is behind resyncs after its grace.
    fn heartbeat(&mut self, bytes: &[u8]) {
        let Ok(beat) = <wire::Heartbeat as Codec>::decode(&mut wire::Reader::new(bytes)) else {
            return;
        };
        let Ok(epoch) = u32::try_from(beat.epoch.0) else {
            return;
        };
        let sent = self.sent_at.get(&epoch).copied().unwrap_or(self.now);
        for leaf in 0..self.rx.held.len() {
            let held = self.rx.held[leaf];
            if held == ABSENT || held >= epoch || self.lost(leaf) {
                continue;
            }
            self.rx.held[leaf] = epoch;
            self.rx.resynced[leaf] = true;
            self.resyncs += 1;
            self.tally.converged.push(self.now + GRACE_MS - sent);
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

    fn controller_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        wire::verifying_key(&self.controller.public_key()).ok()
    }

    fn report(&mut self) -> ChurnReport {
        let seen = Seen {
            members: self.rx.held.iter().filter(|&&h| h != ABSENT).count(),
            members_resynced: self.rx.resynced.iter().filter(|&&r| r).count(),
            diverged: self.diverged(),
            resyncs: Some(self.resyncs),
            lost_every_copy: None,
            resyncs_charged: false,
        };
        self.tally.report(
            &mut self.controller,
            self.now,
            NAME,
            self.config.degree,
            &seen,
        )
    }
}

/// A stand-in identity for a member restored into the controller (never used to sign).
fn leaf_identity(leaf: NodeId) -> [u8; 32] {
    let mut id = [0u8; 32];
    id[..4].copy_from_slice(&leaf.0.to_be_bytes());
    id
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
    fn the_subtree_model_converges_under_loss() {
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
            seed: 5,
        };
        let report = run(&config).unwrap();
        assert_eq!(report.diverged, 0, "{report:?}");
        assert!(report.events > 300, "{report:?}");
        assert!(report.resyncs > 0, "{report:?}");
    }
}
