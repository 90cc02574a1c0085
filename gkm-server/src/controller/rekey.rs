//! Rekeys: a batch staged on the tree and roster, its save asked for (write-ahead), then
//! committed and sent once the save is reported durable, or undone when it failed; welcomes,
//! heartbeats, repeats and lease expiry.

use super::*;

/// The durable state of a group: tree, roster, gate and signing keys.
pub(super) fn group_state(g: &Group) -> GroupState {
    GroupState {
        tree: g.tree.snapshot(),
        members: g.members.records().collect(),
        enrollment: g.gate.records().clone(),
        signing: g.signing.records().to_vec(),
    }
}

/// A rekey computed on the tree and the roster, waiting for its save to be reported.
pub(super) struct Staged {
    pub(super) rekey: lkh_tree::Rekey,
    pub(super) departures: BTreeMap<MemberId, DepartReason>,
    pub(super) joins: Vec<PendingJoin>,
    /// The joiners' member ids, in the order of `joins`.
    pub(super) admitted: Vec<MemberId>,
    /// The departed members' records (to put back if the save fails).
    pub(super) removed: Vec<MemberRecord>,
    /// Signed datagrams, once packed ([`Controller::prepare_staged`]).
    pub(super) datagrams: Option<Vec<Vec<u8>>>,
    /// Whether the rekey brings in a new signing key (its announcement goes out first).
    pub(super) rotated: bool,
    pub(super) profile: RekeyProfile,
    /// When the rekey started, by the profiler's clock.
    pub(super) started: Option<Duration>,
}

/// One welcome to seal: its encapsulation, what it names, the keys.
pub(super) type WelcomeJob<'a> = (Encapsulation, SealedFor, &'a MemberPath);

/// How long a batch whose save failed waits before it is tried again.
pub(super) const SAVE_RETRY_MS: u64 = 1_000;

/// Packs a rekey into datagrams: at the MTU, or at the largest datagram if a node's items do not
/// fit in it.
pub(super) fn pack_rekey(
    rekey: &lkh_tree::Rekey,
    tree: &KeyTree,
    mtu: usize,
) -> Vec<RekeyDatagram> {
    pack(rekey, tree, mtu)
        .or_else(|_| pack(rekey, tree, wire::MAX_DATAGRAM))
        .unwrap_or_default()
}

impl<R: CryptoRng> Controller<R> {
    /// Queues the repeat sends of `id` that are due.
    pub(super) fn send_due_repeats(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        while g.spaced.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, bytes)) = g.spaced.pop_front() {
                self.transmits
                    .push_back(Transmit::Multicast { group: id, bytes });
            }
        }
    }

    pub(super) fn expire_leases(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        if g.next_lease_scan > now {
            return;
        }
        // Leases are checked a few times per lease period, not per member: a lease ends at most a
        // quarter period late, and no timer is kept per member.
        g.next_lease_scan = now.plus((g.policy.lease_ms / 4).max(1));
        let expired: Vec<MemberId> = g
            .members
            .expired(now)
            .into_iter()
            .filter(|m| !g.departures.contains_key(m))
            .collect();
        for member in expired {
            g.departures.insert(member, DepartReason::Expired);
            g.schedule(now);
        }
    }

    /// One rekey of group `id`: the pending batch, or a refresh, staged. The tree and the roster
    /// change, and the save is asked for ([`Controller::poll_persist`]); nothing else changes
    /// (no event, no reply, no address forgotten, nothing queued) until the save is reported
    /// ([`Controller::handle_persisted`]). A group whose last save is not yet reported is
    /// rekeyed once it is.
    pub(super) fn rekey(&mut self, id: GroupId, now: Timestamp) {
        let started = self.profiler.map(|now| now());
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        if g.persisting.is_some() {
            g.batch_due = Some(g.batch_due.map_or(now, |t| t.min(now)));
            return;
        }
        let departures = std::mem::take(&mut g.departures);
        let leaves: Vec<NodeId> = departures
            .keys()
            .filter_map(|m| g.members.get(*m).map(|r| r.leaf))
            .collect();
        let room = (NodeId::LIMIT as usize / 2).saturating_sub(g.tree.len());
        // A registration that waited for this batch while its identity was banned is refused.
        let (banned, mut joins): (Vec<_>, Vec<_>) = g
            .joins
            .take()
            .into_iter()
            .partition(|join| g.gate.banned(&join.identity));
        for refused in banned {
            self.refuse_join(
                refused.conn,
                id,
                Reject::Unauthorized,
                "Unauthorized".into(),
            );
        }
        if joins.len() > room {
            for refused in joins.split_off(room) {
                self.refuse_join(refused.conn, id, Reject::GroupFull, "group full".into());
            }
        }
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.batch_due = None;
        let batch = Batch {
            leaves,
            joins: joins.len(),
        };
        // Staged: until the save is reported, the tree's changes can be undone (GKM-V053).
        g.tree.stage();
        let rekey = match g
            .tree
            .rekey_with_workers(&batch, &mut self.rng, self.workers)
        {
            Ok(rekey) => rekey,
            Err(error) => {
                // Nothing changed: the departures wait for the next batch, the joiners hear why.
                if g.tree.abort().is_err() {
                    self.tree_lost(id);
                    return;
                }
                g.departures = departures;
                let reason = format!("rekey refused: {error}");
                for join in joins {
                    self.refuse_join(join.conn, id, Reject::GroupFull, reason.clone());
                }
                return;
            }
        };
        let epoch = rekey.epoch;
        // A rotation asked for: the new key signs from this rekey on, and is saved with it.
        let rotated = g
            .rotation
            .take()
            .is_some_and(|seed| g.signing.stage(id, seed, epoch, now.0, &self.signer));
        // The roster changes with the tree, and is saved with it.
        let removed: Vec<MemberRecord> = departures
            .keys()
            .filter_map(|member| g.members.remove(*member))
            .collect();
        let lease_until = now.plus(g.policy.lease_ms);
        let admitted: Vec<MemberId> = joins
            .iter()
            .zip(&rekey.joiners)
            .map(|(join, joiner)| {
                let hpke = HpkeDigest::of_recipient(&join.encapsulation);
                g.members
                    .insert(joiner.leaf, join.identity, hpke, epoch.0, lease_until)
            })
            .collect();
        let tree_time = self
            .profiler
            .zip(started)
            .map(|(now, start)| now().saturating_sub(start));
        let save = g.take_save(self.store_compacting);
        let records = self
            .profiler
            .map(|now| now().saturating_sub(started.unwrap_or_default()));
        let encryptions = rekey.encryptions.len();
        let ticket = self.next_ticket();
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.persisting = Some(ticket);
        g.staged = Some(Box::new(Staged {
            rekey,
            departures,
            joins,
            admitted,
            removed,
            datagrams: None,
            rotated,
            profile: RekeyProfile {
                tree: tree_time.unwrap_or_default(),
                records: records
                    .unwrap_or_default()
                    .saturating_sub(tree_time.unwrap_or_default()),
                ..RekeyProfile::default()
            },
            started,
        }));
        self.persists.push_back(Persist {
            ticket,
            group: id,
            epoch,
            rekey: true,
            encryptions,
            save,
        });
    }

    /// Packs and signs the datagrams of `staged`, a rekey staged on `tree`, unless done.
    pub(super) fn prepare(
        staged: &mut Staged,
        (tree, mtu): (&KeyTree, usize),
        signer: &SigningKey,
        workers: usize,
        clock: Option<fn() -> Duration>,
    ) {
        if staged.datagrams.is_some() {
            return;
        }
        let start = clock.map(|now| now());
        let packed = pack_rekey(&staged.rekey, tree, mtu);
        let packed_at = clock.map(|now| now());
        staged.datagrams = Some(sign_all(&packed, signer, workers));
        if let (Some(now), Some(start), Some(packed_at)) = (clock, start, packed_at) {
            staged.profile.pack = packed_at.saturating_sub(start);
            staged.profile.sign = now().saturating_sub(packed_at);
        }
    }

    /// The save of a staged rekey failed: the tree and the roster go back, the departures and
    /// registrations wait again, and the batch is tried again after a pause. Nothing of the
    /// epoch was queued.
    pub(super) fn undo(&mut self, id: GroupId, staged: Staged, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let Staged {
            departures,
            joins,
            admitted,
            removed,
            rotated,
            ..
        } = staged;
        if rotated {
            g.rotation = g.signing.unstage();
        }
        for member in admitted {
            g.members.remove(member);
        }
        for r in removed {
            g.members
                .insert(r.leaf, r.identity, r.hpke, r.joined, r.lease_until);
        }
        let _ = g.members.take_changes();
        g.saved = false;
        if g.tree.abort().is_err() {
            self.tree_lost(id);
            return;
        }
        for (member, reason) in departures {
            g.departures.entry(member).or_insert(reason);
        }
        let later = g.joins.take();
        for join in joins.into_iter().chain(later) {
            if let Some(join) = g.joins.replace(join) {
                g.joins.push(join);
            }
        }
        g.batch_due = Some(now.plus(SAVE_RETRY_MS));
    }

    /// The save of a staged rekey is durable: the rekey is committed, and its departures, welcomes
    /// and datagrams go out.
    pub(super) fn commit(&mut self, id: GroupId, mut staged: Staged, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let on = (&g.tree, g.policy.mtu);
        let signer = g.signing.signer(&self.signer);
        Self::prepare(&mut staged, on, signer, self.workers, self.profiler);
        let committing = self.profiler.map(|now| now());
        g.tree.commit();
        let Staged {
            rekey,
            departures,
            joins,
            admitted,
            removed,
            datagrams,
            rotated,
            mut profile,
            started,
        } = staged;
        let mut datagrams = datagrams.unwrap_or_default();
        let epoch = rekey.epoch;
        if rotated {
            g.signing.settle();
            if let Some(record) = g.signing.current_record() {
                // Sent before the first datagram the new key signs, with the same repeats.
                datagrams.insert(0, record.announcement.to_vec());
                self.events.push_back(Event::SigningKeyRotated {
                    group: id.0,
                    key_id: record.announced().key_id,
                    key: hex(&record.announced().key),
                    from_epoch: epoch.0,
                    at: now.0,
                });
            }
        }
        // Only the last RECENT_DEPARTURES of a batch would be remembered: skip recording the
        // rest (a batch of 100,000 departures at 2^20 members).
        let unrecorded = removed.len().saturating_sub(RECENT_DEPARTURES);
        for (i, record) in removed.iter().enumerate() {
            let member = record.id;
            let reason = departures
                .get(&member)
                .copied()
                .unwrap_or(DepartReason::Left);
            g.subscribers.remove(member);
            g.resynced.remove(member);
            if i >= unrecorded {
                let departure = Departure {
                    identity: record.identity,
                    reason,
                    epoch,
                };
                g.departed.record(member, departure);
            }
            self.events.push_back(Event::Departed {
                group: id.0,
                member: member.0,
                reason,
                epoch: epoch.0,
                at: now.0,
            });
        }
        let joined = joins.len();
        let mut welcomes = Vec::with_capacity(joined);
        let mut replies_to = Vec::with_capacity(joined);
        for ((join, joiner), member) in joins.into_iter().zip(&rekey.joiners).zip(admitted) {
            let to = join.welcome_for(member, g.policy.rekey_address);
            welcomes.push((join.encapsulation, to, &joiner.path));
            replies_to.push((join.conn, member, join.identity));
        }
        g.epoch_times.insert(epoch.0, now);
        // Bounded: older keys' ages are shown as unknown.
        while g.epoch_times.len() > EPOCH_TIMES {
            g.epoch_times.pop_first();
        }
        g.committed(epoch, now);
        g.next_refresh =
            (g.policy.refresh_interval_ms > 0).then(|| now.plus(g.policy.refresh_interval_ms));
        let bytes: usize = datagrams.iter().map(Vec::len).sum();
        let repeats = usize::from(g.policy.repeats.max(1));
        g.stats.rekeys += 1;
        g.stats.encryptions += rekey.encryptions.len() as u64;
        g.stats.datagrams += (datagrams.len() * repeats) as u64;
        g.stats.bytes += (bytes * repeats) as u64;
        g.stats.registrations += replies_to.len() as u64;
        let spacing = g.policy.repeat_spacing_ms;
        for copy in 0..repeats as u64 {
            for d in &datagrams {
                if copy == 0 || spacing == 0 {
                    self.transmits.push_back(Transmit::Multicast {
                        group: id,
                        bytes: d.clone(),
                    });
                } else {
                    let due = now.plus(spacing.saturating_mul(copy));
                    let at = g.spaced.partition_point(|(t, _)| *t <= due);
                    g.spaced.insert(at, (due, d.clone()));
                }
            }
        }
        let sealing = self.profiler.map(|now| now());
        let replies = self.seal_welcomes(id, welcomes);
        if let (Some(now), Some(sealing), Some(committing)) = (self.profiler, sealing, committing) {
            profile.ready = committing.saturating_sub(started.unwrap_or_default());
            profile.commit = sealing.saturating_sub(committing);
            profile.welcomes = now().saturating_sub(sealing);
            self.profile = Some(profile);
        }
        for ((conn, member, identity), reply) in replies_to.into_iter().zip(replies) {
            self.transmits
                .push_back(Transmit::Reply { conn, bytes: reply });
            self.events.push_back(Event::Admitted {
                group: id.0,
                member: member.0,
                identity: hex(&identity),
                epoch: epoch.0,
                at: now.0,
            });
        }
        self.events.push_back(Event::Rekeyed {
            group: id.0,
            epoch: epoch.0,
            joins: joined,
            departures: removed.len(),
            encryptions: rekey.encryptions.len(),
            datagrams: datagrams.len(),
            bytes,
            at: now.0,
        });
        // The rekey carries the epoch and the key check value a heartbeat would: the next one is
        // due a whole interval from now (issue 15).
        if let Some(g) = self.groups.get_mut(&id) {
            g.next_heartbeat = now.plus(g.policy.heartbeat_interval_ms.max(1));
        }
    }

    /// Seals and signs the welcomes of one rekey, on up to `workers` threads. The X25519 work was
    /// done when each registration was verified; what is left is an AEAD seal and a signature.
    pub(super) fn seal_welcomes(
        &self,
        group: GroupId,
        welcomes: Vec<WelcomeJob<'_>>,
    ) -> Vec<Vec<u8>> {
        let signer = self
            .groups
            .get(&group)
            .map_or(&self.signer, |g| g.signing.signer(&self.signer));
        let seal = |(encapsulation, to, path): WelcomeJob<'_>| match seal_path_with(
            path,
            &to,
            encapsulation,
        ) {
            Ok(sealed) => sign(&sealed, signer),
            Err(_) => ErrorMessage {
                group,
                status: Reject::Malformed.status(),
                reason: "unusable HPKE key".into(),
            }
            .to_bytes(),
        };
        on_workers(welcomes, self.workers, seal)
    }

    /// A staged tree that could not be put back (never expected: the abort rebuilds a tree the
    /// controller itself built): the group is dropped from memory, so that nothing of the unsaved
    /// epoch is served; a restart loads its last durable state.
    pub(super) fn tree_lost(&mut self, id: GroupId) {
        if let Some(g) = self.groups.remove(&id) {
            self.events.push_back(Event::StoreFailed {
                group: id.0,
                epoch: g.tree.epoch().0,
                error: "the group's unsaved rekey could not be undone; the group is unloaded \
                        until the controller restarts from its store"
                    .into(),
            });
        }
    }

    pub(super) fn store_failed(&mut self, id: GroupId, epoch: Epoch, error: &StoreError) {
        self.events.push_back(Event::StoreFailed {
            group: id.0,
            epoch: epoch.0,
            error: error.to_string(),
        });
    }

    pub(super) fn heartbeat(&mut self, id: GroupId, now: Timestamp) {
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        let epoch = g.tree.epoch();
        let kcv = g.kcv();
        let beat = Heartbeat {
            group: id,
            epoch,
            kcv,
            timestamp_ms: now.0,
        };
        g.next_heartbeat = now.plus(g.policy.heartbeat_interval_ms.max(1));
        g.stats.heartbeats += 1;
        let bytes = sign(&beat, g.signing.signer(&self.signer));
        self.transmits
            .push_back(Transmit::Multicast { group: id, bytes });
    }
}
