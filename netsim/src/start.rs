//! What both churn models share so that they differ only in how receivers are modelled: the
//! group they start from (one tree, one placement of its members, one controller, restored from
//! the same seed) and the membership events that churn it (the same join and leave times, the
//! same member leaving, drawn from their own stream of the seed).
//!
//! The start: a balanced tree of `members` built as [`cost::build`] builds it, restored into the
//! controller with a record per member; every restored member shares one identity and one HPKE
//! key (the controller checks signatures against the record, and a shared key costs the same to
//! check). The restored members resume during a warm-up of one renewal period, each at its own
//! time (from the seed), so that their lease renewals spread over the period as a real group's
//! do; the churn starts when the warm-up ends.

use ed25519_dalek::{SigningKey, VerifyingKey};
use gkm_server::{
    Controller, GroupPolicy, GroupState, HpkeDigest, MemberRecord, StoreDriver, Timestamp,
};
use lkh_tree::{GroupId, NodeId};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};
use wire::{HpkeSecret, Kem, MemberId};

use crate::churn::{ChurnConfig, NoStore, exponential};
use crate::cost::{self, CostError, Scheme};

/// The virtual clock at the start (ms).
pub(crate) const START: u64 = 1_800_000_000_000;
/// The group's name.
pub(crate) const GROUP: &str = "netsim";
/// Lease renewals: every member renews every 5 s (the warm-up lasts one period).
pub(crate) const RENEW_MS: u64 = 5_000;
/// The virtual clock's tick (ms).
pub(crate) const TICK_MS: u64 = 10;

/// The group both models start from.
pub(crate) struct Start {
    /// The controller, restored with every member.
    pub(crate) controller: StoreDriver<ChaCha20Rng>,
    /// The controller's public key (members pin it).
    pub(crate) controller_key: VerifyingKey,
    /// The identity every restored member shares.
    pub(crate) identity: SigningKey,
    /// The HPKE key every restored member shares.
    pub(crate) hpke: HpkeSecret,
    /// Each restored member's leaf and the warm-up tick at which it resumes (ms after
    /// [`START`], in `(0, RENEW_MS]`), in leaf order.
    pub(crate) resumes: Vec<(NodeId, u64)>,
}

/// The group's policy for a run: the degree, batch interval, repeats and spacing of `config`,
/// a heartbeat every second, leases that do not expire.
pub(crate) fn policy(config: &ChurnConfig) -> GroupPolicy {
    let mut policy = GroupPolicy::new(GROUP, GroupId::from_name(GROUP));
    policy.tree.degree = config.degree;
    policy.batch_interval_ms = config.interval_ms;
    policy.repeats = config.repeats.max(1);
    policy.repeat_spacing_ms = config.spacing_ms;
    policy.heartbeat_interval_ms = 1_000;
    policy.lease_ms = u64::MAX / 4;
    policy
}

/// The id of the member at `leaf` that joined in epoch `joined` (as the controller numbers
/// members).
pub(crate) fn member_id(leaf: NodeId, joined: u32) -> MemberId {
    MemberId((u64::from(leaf.0) << 32) | u64::from(joined))
}

/// The group both models start from, from `config`'s seed (its own stream).
pub(crate) fn start(config: &ChurnConfig) -> Result<Start, CostError> {
    // "start" in ASCII.
    let mut rng = ChaCha20Rng::seed_from_u64(config.seed ^ 0x0073_7461_7274);
    let group = GroupId::from_name(GROUP);
    let tree = cost::build(config.members, Scheme::OneWay, config.degree, &mut rng)?;
    let mut snapshot = tree.snapshot();
    snapshot.group = group;
    let identity = signing_key(&mut rng);
    let hpke = HpkeSecret::generate(Kem::XWing, &mut rng);
    let digest = HpkeDigest::of(&hpke.public_key()?);
    let mut leaves: Vec<NodeId> = tree.members().collect();
    leaves.sort_unstable();
    let members = leaves
        .iter()
        .map(|&leaf| MemberRecord {
            id: member_id(leaf, 0),
            identity: identity.verifying_key().to_bytes(),
            hpke: digest,
            leaf,
            joined: 0,
            lease_until: Timestamp(u64::MAX / 2),
        })
        .collect();
    let ticks = RENEW_MS / TICK_MS;
    let resumes = leaves
        .into_iter()
        .map(|leaf| (leaf, (1 + rng.next_u64() % ticks) * TICK_MS))
        .collect();
    let signer = signing_key(&mut rng);
    let mut controller_seed = [0u8; 32];
    rng.fill_bytes(&mut controller_seed);
    let controller = Controller::new(
        signer.clone(),
        ChaCha20Rng::from_seed(controller_seed),
        vec![policy(config)],
        vec![GroupState {
            tree: snapshot,
            members,
            enrollment: Default::default(),
            signing: Vec::new(),
        }],
        Timestamp(START),
    )?;
    Ok(Start {
        controller: StoreDriver::new(controller, Box::new(NoStore)),
        controller_key: signer.verifying_key(),
        identity,
        hpke,
        resumes,
    })
}

fn signing_key(rng: &mut ChaCha20Rng) -> SigningKey {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

/// A churn model, as [`churn_events`] drives it.
pub(crate) trait Model {
    /// The virtual clock (ms).
    fn now(&mut self) -> &mut u64;
    /// A new member registers now.
    fn join(&mut self);
    /// The member at `leaf`, if there is one (admitted, not gone), leaves now; whether there was.
    fn leave(&mut self, leaf: usize) -> bool;
    /// One more than the largest leaf a member was ever admitted at.
    fn leaf_bound(&self) -> usize;
    /// Fires timers and moves every message (one tick).
    fn tick(&mut self);
}

/// Churns `model` for `config.duration_s` seconds from now: Poisson joins and leaves at the
/// configured rates, the member leaving chosen uniformly among the admitted (by leaf: both
/// models place members alike, so they see the same member leave).
pub(crate) fn churn_events(model: &mut impl Model, config: &ChurnConfig) {
    let end = *model.now() + config.duration_s * 1_000;
    // "events" in ASCII.
    let mut times = ChaCha20Rng::seed_from_u64(config.seed ^ 0x6576_656e_7473);
    let mut next_join = *model.now() as f64 + exponential(&mut times, config.join_rate);
    let mut next_leave = *model.now() as f64 + exponential(&mut times, config.leave_rate);
    while *model.now() < end {
        *model.now() += TICK_MS;
        let now = *model.now() as f64;
        while next_join <= now {
            model.join();
            next_join += exponential(&mut times, config.join_rate);
        }
        while next_leave <= now {
            leave_one(model, &mut times);
            next_leave += exponential(&mut times, config.leave_rate);
        }
        model.tick();
    }
}

/// A member chosen uniformly among the admitted leaves (rejection sampling over leaf ids:
/// members are most of them, so this ends fast) leaves.
fn leave_one(model: &mut impl Model, times: &mut ChaCha20Rng) {
    let bound = u64::try_from(model.leaf_bound()).unwrap_or(u64::MAX);
    if bound == 0 {
        return;
    }
    for _ in 0..1_000 {
        let leaf = usize::try_from(times.next_u64() % bound).unwrap_or(0);
        if model.leave(leaf) {
            return;
        }
    }
}

/// Runs the warm-up: each tick runs, then `resume` is called for each restored member due (after
/// the tick, so that none resumes before the restored controller's first rekey), until one
/// renewal period has passed.
pub(crate) fn warm_up<M: Model>(
    model: &mut M,
    resumes: &[(NodeId, u64)],
    mut resume: impl FnMut(&mut M, NodeId),
) {
    let mut order: Vec<(u64, NodeId)> = resumes.iter().map(|&(leaf, at)| (at, leaf)).collect();
    order.sort_unstable();
    let mut next = order.into_iter().peekable();
    for _ in 0..RENEW_MS / TICK_MS {
        *model.now() += TICK_MS;
        model.tick();
        let now = *model.now();
        while let Some((_, leaf)) = next.next_if(|&(at, _)| START + at <= now) {
            resume(model, leaf);
        }
    }
}
