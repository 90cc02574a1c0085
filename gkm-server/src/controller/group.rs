//! One group's state: tree, roster, gate, queues and timers, and what a save of it holds.

use super::*;

pub(super) struct PendingJoin {
    pub(super) conn: ConnId,
    pub(super) identity: [u8; 32],
    pub(super) nonce: [u8; NONCE_LEN],
    pub(super) encapsulation: Encapsulation,
}

impl PendingJoin {
    /// What its welcome, as member `member`, names.
    pub(super) fn welcome_for(
        &self,
        member: MemberId,
        rekey_address: Option<SocketAddr>,
    ) -> SealedFor {
        SealedFor {
            kind: SealedKind::Welcome,
            member,
            request_nonce: self.nonce,
            rekey_address,
        }
    }
}

/// The joins waiting for a group's next rekey, in arrival order, found by identity in constant
/// time (a batch may hold hundreds of thousands).
#[derive(Default)]
pub(super) struct PendingJoins {
    pub(super) list: Vec<PendingJoin>,
    pub(super) by_identity: HashMap<[u8; 32], usize>,
}

impl PendingJoins {
    /// Puts `join` in place of a pending join of the same identity; hands it back if there is
    /// none.
    pub(super) fn replace(&mut self, join: PendingJoin) -> Option<PendingJoin> {
        match self.by_identity.get(&join.identity) {
            Some(&at) => {
                if let Some(pending) = self.list.get_mut(at) {
                    *pending = join;
                }
                None
            }
            None => Some(join),
        }
    }

    pub(super) fn push(&mut self, join: PendingJoin) {
        self.by_identity.insert(join.identity, self.list.len());
        self.list.push(join);
    }

    pub(super) fn len(&self) -> usize {
        self.list.len()
    }

    /// All of them, leaving none.
    pub(super) fn take(&mut self) -> Vec<PendingJoin> {
        self.by_identity.clear();
        std::mem::take(&mut self.list)
    }
}

pub(super) struct Group {
    pub(super) policy: GroupPolicy,
    pub(super) tree: KeyTree,
    pub(super) members: Roster,
    /// Spent tokens and bans.
    pub(super) gate: Gate,
    /// Confirmed fan-out addresses.
    pub(super) subscribers: Subscribers,
    /// When each member was last sent its path by resync.
    pub(super) resynced: RateLimit,
    pub(super) next_lease_scan: Timestamp,
    pub(super) joins: PendingJoins,
    pub(super) departures: BTreeMap<MemberId, DepartReason>,
    /// The latest departures, to tell a departed member why.
    pub(super) departed: Departed,
    /// The last [`RECENT_COMMITS`] epochs committed: epoch, key check value, when.
    pub(super) commits: VecDeque<(Epoch, lkh_tree::Kcv, Timestamp)>,
    pub(super) batch_due: Option<Timestamp>,
    pub(super) next_heartbeat: Timestamp,
    pub(super) next_refresh: Option<Timestamp>,
    pub(super) nonces: SeenNonces,
    pub(super) epoch_times: BTreeMap<u64, Timestamp>,
    /// Repeat sends waiting for their time, earliest first.
    pub(super) spaced: VecDeque<(Timestamp, Vec<u8>)>,
    /// After a restart: requests made before it are refused (their nonces were not kept).
    pub(super) fresh_since: Option<Timestamp>,
    pub(super) stats: Stats,
    /// Whether the store holds this group's state (so a delta can be applied to it).
    pub(super) saved: bool,
    /// Records written as deltas since the last full state (save or compaction).
    pub(super) logged: usize,
    /// Why the last rekey's save failed, until one succeeds.
    pub(super) save_failure: Option<String>,
    /// The save asked for and not yet reported: the group takes no command, makes no rekey and
    /// sends no heartbeat until it is.
    pub(super) persisting: Option<PersistTicket>,
    /// The rekey waiting for that save.
    pub(super) staged: Option<Box<Staged>>,
    /// The lease's term, when this controller leads the group by a lease (high availability).
    pub(super) term: Option<u64>,
    /// Requests that came while a rekey was staged, handled once its save is reported (they
    /// must not read the staged tree or roster).
    pub(super) deferred: VecDeque<(ConnId, Inbound)>,
    /// The group's signing keys (the controller's own until the first rotation).
    pub(super) signing: SigningChain,
    /// A rotation asked for: the new key's seed, staged with the next rekey.
    pub(super) rotation: Option<Zeroizing<[u8; 32]>>,
}

/// Request nonces seen within the last `keep_ms`, forgotten oldest first (so a request costs
/// the same however many are remembered).
#[derive(Default)]
pub(super) struct SeenNonces {
    pub(super) seen: HashSet<[u8; NONCE_LEN]>,
    pub(super) order: VecDeque<(Timestamp, [u8; NONCE_LEN])>,
}

impl SeenNonces {
    /// Whether `nonce` is remembered (it may be older than the window until the next insert).
    pub(super) fn contains(&self, nonce: &[u8; NONCE_LEN]) -> bool {
        self.seen.contains(nonce)
    }

    /// Records `nonce` at `now`; false if it was seen within the last `keep_ms`.
    pub(super) fn insert(&mut self, nonce: [u8; NONCE_LEN], now: Timestamp, keep_ms: u64) -> bool {
        while let Some(&(at, old)) = self.order.front() {
            if at.0.saturating_add(keep_ms) > now.0 {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&old);
        }
        if !self.seen.insert(nonce) {
            return false;
        }
        self.order.push_back((now, nonce));
        true
    }
}

impl Group {
    pub(super) fn new<R: CryptoRng>(
        policy: GroupPolicy,
        rng: &mut R,
        now: Timestamp,
    ) -> Result<Self, TreeError> {
        let tree = KeyTree::new(policy.id, policy.tree, rng)?;
        Ok(Self::with_tree(
            policy,
            tree,
            Vec::new(),
            Gate::default(),
            now,
        ))
    }

    pub(super) fn restore(
        policy: GroupPolicy,
        state: &GroupState,
        now: Timestamp,
    ) -> Result<Self, TreeError> {
        let tree = KeyTree::restore(&state.tree)?;
        let gate = Gate::new(state.enrollment.clone());
        let lease_ms = policy.lease_ms;
        let mut group = Self::with_tree(policy, tree, state.members.clone(), gate, now);
        group.signing = SigningChain::restore(&state.signing);
        // Renewals are saved with the next rekey, so the stored leases may predate renewals made
        // since (at this controller before it stopped, or at a leader that died): no lease is
        // checked for a whole lease from now, so that every member renews (and is saved) rather
        // than expiring for a renewal the store never saw.
        group.next_lease_scan = now.plus(lease_ms);
        group.saved = true;
        // A restarted controller rekeys at once: its first epoch is above every persisted one,
        // and members that missed the crash window resync from the heartbeat.
        group.batch_due = Some(now);
        // The nonces seen before the restart are gone: a request made before it could be
        // replayed within the freshness window, so only requests made since are taken.
        group.fresh_since = Some(now);
        Ok(group)
    }

    pub(super) fn with_tree(
        policy: GroupPolicy,
        mut tree: KeyTree,
        members: Vec<MemberRecord>,
        gate: Gate,
        now: Timestamp,
    ) -> Self {
        tree.track_changes();
        Group {
            next_lease_scan: now.plus(policy.lease_ms / 4),
            next_refresh: (policy.refresh_interval_ms > 0)
                .then(|| now.plus(policy.refresh_interval_ms)),
            policy,
            tree,
            members: Roster::new(members),
            gate,
            subscribers: Subscribers::default(),
            resynced: RateLimit::new(RESYNC_INTERVAL_MS),
            joins: PendingJoins::default(),
            departures: BTreeMap::new(),
            departed: Departed::default(),
            commits: VecDeque::new(),
            batch_due: None,
            next_heartbeat: now,
            nonces: SeenNonces::default(),
            epoch_times: BTreeMap::new(),
            spaced: VecDeque::new(),
            fresh_since: None,
            stats: Stats::default(),
            saved: false,
            logged: 0,
            save_failure: None,
            persisting: None,
            staged: None,
            term: None,
            deferred: VecDeque::new(),
            signing: SigningChain::default(),
            rotation: None,
        }
    }

    /// What makes the changes since the last save durable: the whole state when the store holds
    /// none of this group (first save, or the last save failed), else a delta, which asks for a
    /// compaction once the deltas since the last full state (or compaction) hold about as many
    /// records as the state, so the stored log stays within about twice the state. While the
    /// store is `compacting` (another group, or a slow disk), the compaction is asked for at a
    /// later rekey instead. Clears the record of changes.
    pub(super) fn take_save(&mut self, compacting: bool) -> Save {
        let (members, removed_members) = self.members.take_changes();
        let delta = GroupDelta {
            group: self.policy.id,
            config: self.tree.config(),
            epoch: self.tree.epoch(),
            tree: self.tree.take_changes(),
            members,
            removed_members,
            enrollment: self.gate.take_changes(),
            signing: self.signing.take_changes(),
        };
        if !self.saved {
            self.logged = 0;
            return Save::Full(self.state());
        }
        self.logged = self.logged.saturating_add(delta.records());
        if self.logged > self.compaction_threshold() && !compacting {
            self.logged = 0;
            let state = self.state();
            Save::Compact(delta, state)
        } else {
            Save::Delta(delta)
        }
    }

    /// Records logged since the last full state past which a compaction is asked for: about
    /// the state's (each member's record and at most two nodes per member).
    fn compaction_threshold(&self) -> usize {
        self.members.len().saturating_mul(3).max(64)
    }

    /// A compaction asked for was not started: it is asked for at the next save.
    pub(super) fn compaction_due(&mut self) {
        self.logged = self
            .logged
            .max(self.compaction_threshold().saturating_add(1));
    }

    pub(super) fn state(&self) -> GroupState {
        group_state(self)
    }

    pub(super) fn schedule(&mut self, now: Timestamp) {
        let due = now.plus(self.policy.batch_interval_ms);
        self.batch_due = Some(self.batch_due.map_or(due, |t| t.min(due)));
    }

    pub(super) fn check_fresh(
        &mut self,
        now: Timestamp,
        at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(), Reject> {
        self.check_window(now, at_ms, nonce)?;
        self.remember(now, nonce);
        Ok(())
    }

    /// Whether a request made at `at_ms` with `nonce` is fresh: within the window, made since a
    /// restart, its nonce not seen. Records nothing.
    pub(super) fn check_window(
        &self,
        now: Timestamp,
        at_ms: u64,
        nonce: [u8; NONCE_LEN],
    ) -> Result<(), Reject> {
        let window = self.policy.freshness_window_ms;
        if at_ms.abs_diff(now.0) > window || self.fresh_since.is_some_and(|t| at_ms < t.0) {
            return Err(Reject::StaleRequest);
        }
        if self.nonces.contains(&nonce) {
            return Err(Reject::Replayed);
        }
        Ok(())
    }

    /// Records `nonce`, seen at `now`.
    pub(super) fn remember(&mut self, now: Timestamp, nonce: [u8; NONCE_LEN]) {
        self.nonces
            .insert(nonce, now, 2 * self.policy.freshness_window_ms);
    }

    pub(super) fn info(&self) -> GroupInfo {
        GroupInfo {
            name: self.policy.name.clone(),
            id: self.policy.id.0,
            epoch: self.tree.epoch().0,
            members: self.members.len(),
            degree: self.policy.tree.degree,
            height: self.tree.height(),
            pending: self.joins.len() + self.departures.len(),
            role: Role::Leader,
            term: self.term,
            leader: None,
            behind: None,
            synced_ms_ago: None,
        }
    }

    pub(super) fn signing_key_info(&self, own: &SigningKey, now: Timestamp) -> SigningKeyInfo {
        let record = self
            .signing
            .current_record()
            .map(crate::SigningKeyRecord::announced);
        SigningKeyInfo {
            group: self.policy.name.clone(),
            key_id: self.signing.current_id(),
            key: hex(&self.signing.signer(own).verifying_key().to_bytes()),
            age_s: record.map(|a| now.0.saturating_sub(a.issued_ms) / 1000),
        }
    }

    pub(super) fn policy_info(&self) -> PolicyInfo {
        let p = &self.policy;
        PolicyInfo {
            degree: p.tree.degree,
            strategy: format!("{:?}", p.tree.strategy).to_lowercase(),
            hash_forward_joins: p.tree.hash_forward_joins,
            one_way: p.tree.one_way,
            batch_interval_ms: p.batch_interval_ms,
            heartbeat_interval_ms: p.heartbeat_interval_ms,
            lease_ms: p.lease_ms,
            refresh_interval_ms: p.refresh_interval_ms,
            repeats: p.repeats,
            repeat_spacing_ms: p.repeat_spacing_ms,
            mtu: p.mtu,
            freshness_window_ms: p.freshness_window_ms,
            enrollment: match &p.enrollment {
                Enrollment::Open => EnrollmentInfo::Open,
                Enrollment::Restricted { allowed, tokens } => EnrollmentInfo::Restricted {
                    keys: allowed.len(),
                    tokens: tokens.len(),
                },
            },
            rekey_address: p.rekey_address.map(|a| a.to_string()),
            fanout: p.fanout,
            kem: p.kems.iter().map(|k| k.name().to_owned()).collect(),
        }
    }

    /// One runtime setting ([`GroupPolicy::RUNTIME_KEYS`]), checked by [`GroupPolicy::set`].
    pub(super) fn set_policy(
        &mut self,
        key: &str,
        value: &str,
        now: Timestamp,
    ) -> Result<(), CommandError> {
        if !GroupPolicy::RUNTIME_KEYS.contains(&key) {
            return Err(CommandError::BadPolicy(format!(
                "unknown or read-only policy key {key:?}; settable: {}",
                GroupPolicy::RUNTIME_KEYS.join(", ")
            )));
        }
        self.policy
            .set(key, value)
            .map_err(|e| CommandError::BadPolicy(e.to_string()))?;
        if key == "refresh_interval_ms" {
            let every = self.policy.refresh_interval_ms;
            self.next_refresh = (every > 0).then(|| now.plus(every));
        }
        Ok(())
    }

    pub(super) fn inventory(&self, now: Timestamp) -> KeyInventory {
        let epoch = self.tree.epoch().0;
        let mut holders: HashMap<NodeId, usize> = HashMap::new();
        let mut members_by_kem: BTreeMap<String, usize> =
            Kem::ALL.iter().map(|k| (k.name().to_owned(), 0)).collect();
        for record in self.members.records() {
            *members_by_kem
                .entry(record.hpke.kem.name().to_owned())
                .or_default() += 1;
            let mut node = Some(record.leaf);
            while let Some(n) = node {
                *holders.entry(n).or_default() += 1;
                node = self.tree.parent(n);
            }
        }
        let refresh_left = self.next_refresh.map(|t| t.0.saturating_sub(now.0));
        let mut out: Vec<KeyInfo> = self
            .tree
            .nodes()
            .filter_map(|node| {
                let version = self.tree.version(node)?.0;
                Some(KeyInfo {
                    node: node.0,
                    version,
                    age_epochs: epoch.saturating_sub(version),
                    age_ms: self
                        .epoch_times
                        .get(&version)
                        .map(|t| now.0.saturating_sub(t.0)),
                    expires_in_ms: if node == NodeId::ROOT {
                        refresh_left
                    } else {
                        None
                    },
                    holders: holders.get(&node).copied().unwrap_or(0),
                })
            })
            .collect();
        out.sort_by_key(|k| k.node);
        KeyInventory {
            members_by_kem,
            keys: out,
        }
    }
}

impl MemberRecord {
    pub(super) fn info(&self, now: Timestamp) -> MemberInfo {
        MemberInfo {
            id: self.id.0,
            identity: hex(&self.identity),
            leaf: self.leaf.0,
            joined: self.joined,
            lease_left_ms: self.lease_until.0.saturating_sub(now.0),
            kem: self.hpke.kem.name().to_owned(),
        }
    }
}

/// Lower-case hex of public (never secret) bytes.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Epochs whose commit time a group keeps for key ages (`gkmctl keys`): about a day of one
/// rekey a second; an older key's age is shown as unknown.
pub(super) const EPOCH_TIMES: usize = 1 << 16;

/// Time a datagram is allowed on its way to a member, on top of the repeats' span (see
/// [`Group::in_flight`]).
const IN_TRANSIT_MS: u64 = 100;

/// Epochs a group remembers the commit of (see [`Group::in_flight`]).
pub(super) const RECENT_COMMITS: usize = 8;

impl Group {
    /// The key check value of the current epoch's traffic key: kept from its commit, derived
    /// only for a group restored since.
    pub(super) fn kcv(&self) -> lkh_tree::Kcv {
        let epoch = self.tree.epoch();
        match self.commits.back() {
            Some(&(committed, kcv, _)) if committed == epoch => kcv,
            _ => self
                .tree
                .root_key()
                .traffic_key(self.policy.id, epoch)
                .check_value(),
        }
    }

    /// Notes that `epoch`, the tree's epoch now, was committed at `now`.
    pub(super) fn committed(&mut self, epoch: Epoch, now: Timestamp) {
        let kcv = self
            .tree
            .root_key()
            .traffic_key(self.policy.id, epoch)
            .check_value();
        if self.commits.len() == RECENT_COMMITS {
            self.commits.pop_front();
        }
        self.commits.push_back((epoch, kcv, now));
    }

    /// Whether a member holding `epoch` with key check value `kcv` can still get every later
    /// epoch from the multicast: `epoch` was committed here and the epoch after it less than the
    /// repeats' span (plus 100 ms on the way) ago, so its copies are still being sent. Such a
    /// member's lease renewal is acknowledged (the acknowledgement names the current epoch, and
    /// the member resyncs by itself if the datagrams do not come) instead of answered with a
    /// sealed path: at high rekey rates, renewals race rekeys all the time.
    pub(super) fn in_flight(&self, epoch: Epoch, kcv: lkh_tree::Kcv, now: Timestamp) -> bool {
        let span = u64::from(self.policy.repeats.saturating_sub(1)) * self.policy.repeat_spacing_ms;
        let held = self.commits.iter().any(|c| c.0 == epoch && c.1 == kcv);
        let next = self.commits.iter().find(|c| Some(c.0) == epoch.next());
        held && next.is_some_and(|c| now.0.saturating_sub(c.2.0) <= span + IN_TRANSIT_MS)
    }
}

/// A group another controller leads.
#[derive(Debug)]
pub(super) struct Standby {
    pub(super) name: String,
    /// Where its leader answers, when known.
    pub(super) leader: Option<SocketAddr>,
    /// This controller's warm copy of it, once one matched the committed log.
    pub(super) copy: Option<WarmCopy>,
}

/// Where a standby's warm copy of a group stood when it last matched the committed log.
#[derive(Clone, Copy, Debug)]
pub(super) struct WarmCopy {
    pub(super) epoch: Epoch,
    pub(super) members: usize,
    /// Epochs it trailed the log by before that.
    pub(super) behind: u64,
    pub(super) synced: Timestamp,
}

impl Standby {
    pub(super) fn info(&self, id: GroupId, now: Timestamp) -> GroupInfo {
        GroupInfo {
            name: self.name.clone(),
            id: id.0,
            epoch: self.copy.map_or(0, |c| c.epoch.0),
            members: self.copy.map_or(0, |c| c.members),
            degree: 0,
            height: 0,
            pending: 0,
            role: Role::Standby,
            term: None,
            leader: self.leader.map(|a| a.to_string()),
            behind: self.copy.map(|c| c.behind),
            synced_ms_ago: self.copy.map(|c| now.0.saturating_sub(c.synced.0)),
        }
    }
}
