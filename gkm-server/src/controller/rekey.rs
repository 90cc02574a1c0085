//! Rekeys: a batch staged on the tree and roster, saved (write-ahead), then committed and sent,
//! or undone when the save fails; welcomes, heartbeats, repeats and lease expiry.

use super::*;

/// What one rekey writes to the store.
pub(super) enum Save {
    /// The whole state.
    Full(GroupState),
    /// The changes since the last save.
    Delta(GroupDelta),
    /// The changes since the last save, and then the state they lead to in place of what the
    /// store holds (compaction).
    Compact(GroupDelta),
}

impl Save {
    /// Writes the save (for [`Save::Compact`], with the state that `tree` and `members` hold);
    /// returns its result and the time it was durable by `clock`.
    pub(super) fn write(
        &self,
        store: &mut (dyn Store + Send),
        clock: Option<fn() -> Duration>,
        (tree, members, gate): (&KeyTree, &Roster, &Gate),
    ) -> (Result<(), StoreError>, Option<Duration>) {
        let result = match self {
            Save::Full(state) => store.save(state),
            Save::Delta(delta) => store.save_delta(delta),
            Save::Compact(delta) => {
                store.save_delta_and_compact(delta, group_state(tree, members, gate))
            }
        };
        (result, clock.map(|now| now()))
    }
}

/// The durable state of a group whose tree, roster and gate these are.
pub(super) fn group_state(tree: &KeyTree, members: &Roster, gate: &Gate) -> GroupState {
    GroupState {
        tree: tree.snapshot(),
        members: members.records().collect(),
        enrollment: gate.records().clone(),
    }
}

/// One welcome to seal: its encapsulation, what it names, the keys.
pub(super) type WelcomeJob<'a> = (Encapsulation, SealedFor, &'a MemberPath);

/// How long a batch whose save failed waits before it is tried again.
pub(super) const SAVE_RETRY_MS: u64 = 1_000;

/// Encryptions in a rekey from which its save runs on a thread of its own while the datagrams are
/// packed and signed (about 40 encryptions fill a datagram, and a signature takes about 20 µs).
pub(super) const OVERLAP_SAVE_MIN: usize = 512;

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

    /// One rekey of group `id`: the pending batch, or a refresh.
    pub(super) fn rekey(&mut self, id: GroupId, now: Timestamp) {
        let started = self.profiler.map(|now| now());
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
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
        // Staged: until the save succeeds, the tree's changes can be undone (GKM-V053).
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
        // The roster changes with the tree, and is saved with it; nothing else changes (no
        // event, no reply, no address forgotten) until the save has succeeded.
        let removed: Vec<MemberRecord> = departures
            .keys()
            .filter_map(|member| g.members.remove(*member))
            .collect();
        let lease_until = now.plus(g.policy.lease_ms);
        let admitted: Vec<MemberId> = joins
            .iter()
            .zip(&rekey.joiners)
            .map(|(join, joiner)| {
                let recipient = *join.encapsulation.recipient();
                g.members
                    .insert(joiner.leaf, join.identity, recipient, epoch.0, lease_until)
            })
            .collect();
        let clock = self.profiler;
        let tree_done = clock.map(|now| now());
        // Write-ahead: the changes are durable before anything encrypted under them is queued.
        // With workers, a large rekey's save runs while its datagrams are packed and signed; for
        // a small one, the thread would cost more CPU than the signing it overlaps.
        // A compaction's snapshot of the state is taken on the same thread, while the datagrams
        // are signed.
        let save = g.take_save(self.store.compacting());
        let (mtu, tree, members) = (g.policy.mtu, &g.tree, &g.members);
        let parts = (tree, members, &g.gate);
        let (signer, workers, store) = (&self.signer, self.workers, self.store.as_mut());
        let pack_and_sign = || {
            let packed = pack_rekey(&rekey, tree, mtu);
            let packed_at = clock.map(|now| now());
            (sign_all(&packed, signer, workers), packed_at)
        };
        let overlap = workers > 1 && rekey.encryptions.len() >= OVERLAP_SAVE_MIN;
        let ((saved, persisted), (datagrams, packed)) = if overlap {
            std::thread::scope(|scope| {
                let writer = scope.spawn(|| save.write(store, clock, parts));
                let signed = pack_and_sign();
                let saved = writer.join().unwrap_or_else(|_| {
                    (Err(StoreError::Backend("the store panicked".into())), None)
                });
                (saved, signed)
            })
        } else {
            let saved = save.write(store, clock, parts);
            (saved, pack_and_sign())
        };
        let signed = clock.map(|now| now());
        drop(save);
        while let Some(failure) = self.store.take_compaction_failure() {
            self.events.push_back(Event::CompactionFailed {
                group: failure.group.0,
                epoch: failure.epoch.0,
                error: failure.error.to_string(),
            });
        }
        if let Err(error) = saved {
            self.store_failed(id, epoch, &error);
            let Some(g) = self.groups.get_mut(&id) else {
                return;
            };
            g.save_failure = Some(error.to_string());
            // Exactly as before: the epoch's keys and datagrams are dropped unsent, the roster
            // and the tree go back, and the batch is tried again after a pause.
            drop(datagrams);
            for member in admitted {
                g.members.remove(member);
            }
            for r in removed {
                g.members
                    .insert(r.leaf, r.identity, r.hpke_key, r.joined, r.lease_until);
            }
            let _ = g.members.take_changes();
            g.saved = false;
            if g.tree.abort().is_err() {
                self.tree_lost(id);
                return;
            }
            g.departures = departures;
            for join in joins {
                g.joins.push(join);
            }
            g.batch_due = Some(now.plus(SAVE_RETRY_MS));
            return;
        }
        let Some(g) = self.groups.get_mut(&id) else {
            return;
        };
        g.tree.commit();
        g.saved = true;
        g.save_failure = None;
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
        let replies = self.seal_welcomes(id, welcomes);
        if let (
            Some(now),
            Some(start),
            Some(tree_done),
            Some(persisted),
            Some(packed),
            Some(signed),
        ) = (clock, started, tree_done, persisted, packed, signed)
        {
            self.profile = Some(RekeyProfile {
                tree: tree_done.saturating_sub(start),
                persist: persisted.saturating_sub(tree_done),
                pack: packed.saturating_sub(tree_done),
                sign: signed.saturating_sub(packed),
                ready: signed.saturating_sub(start),
                welcomes: now().saturating_sub(signed),
            });
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
        self.heartbeat(id, now);
    }

    /// Seals and signs the welcomes of one rekey, on up to `workers` threads. The X25519 work was
    /// done when each registration was verified; what is left is an AEAD seal and a signature.
    pub(super) fn seal_welcomes(
        &self,
        group: GroupId,
        welcomes: Vec<WelcomeJob<'_>>,
    ) -> Vec<Vec<u8>> {
        let signer = &self.signer;
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
        let kcv = g.tree.root_key().traffic_key(id, epoch).check_value();
        let beat = Heartbeat {
            group: id,
            epoch,
            kcv,
            timestamp_ms: now.0,
        };
        g.next_heartbeat = now.plus(g.policy.heartbeat_interval_ms.max(1));
        g.stats.heartbeats += 1;
        self.transmits.push_back(Transmit::Multicast {
            group: id,
            bytes: sign(&beat, &self.signer),
        });
    }
}
