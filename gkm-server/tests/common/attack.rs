//! Attackers that handle wraps themselves, with their own implementation of the key wrap from
//! the specification (RFC-notes/lkh.md, wire-format.md) rather than the product's: an insider
//! forges wraps under keys it holds ([`seal_wrap`]); departed members pool their keys and open
//! every wrap of every captured datagram they can ([`Loot::attack`]). Shared by the sans-I/O
//! adversary tests and the daemon-level coalition test in gkm-member (included with `#[path]`).

use std::collections::{BTreeMap, BTreeSet};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use lkh_tree::{Epoch, GroupId, KeyVersion, NodeId, NodeKey, Wrap};
use wire::RekeyDatagram;

/// A key instance an adversary may hold: (node, version) → key bytes.
pub type Keys = BTreeMap<(u32, u64), [u8; 32]>;

/// The AEAD of a wrap under `key` in the rekey salted with `salt` (RFC-notes/lkh.md:
/// ChaCha20-Poly1305 under `derive_key("gkm v2 2026-12 lkh wrap key with rekey salt", key ‖
/// salt)`, nonce `epoch ‖ target`, associated data `group ‖ epoch ‖ target ‖ epoch ‖ wrapping ‖
/// wrapping version`).
fn wrap_aead(
    group: GroupId,
    (key, salt): (&[u8; 32], &[u8; 16]),
    epoch: u64,
    wrap: (NodeId, NodeId, u64),
) -> (ChaCha20Poly1305, Nonce, [u8; 40]) {
    let (target, wrapping, wrapping_version) = wrap;
    let input = [&key[..], &salt[..]].concat();
    let label = "gkm v2 2026-12 lkh wrap key with rekey salt";
    let cipher = ChaCha20Poly1305::new(&blake3::derive_key(label, &input).into());
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&epoch.to_be_bytes());
    nonce[8..].copy_from_slice(&target.0.to_be_bytes());
    let mut ad = [0u8; 40];
    ad[..8].copy_from_slice(&group.0.to_be_bytes());
    ad[8..16].copy_from_slice(&epoch.to_be_bytes());
    ad[16..20].copy_from_slice(&target.0.to_be_bytes());
    ad[20..28].copy_from_slice(&epoch.to_be_bytes());
    ad[28..32].copy_from_slice(&wrapping.0.to_be_bytes());
    ad[32..40].copy_from_slice(&wrapping_version.to_be_bytes());
    (cipher, Nonce::from(nonce), ad)
}

/// Wraps `plain` as the new key of `target` in `epoch` under `key`, the key of `wrapping` at
/// `wrapping_version`: what an insider holding `key` can make.
pub fn seal_wrap(
    group: GroupId,
    key: (&[u8; 32], &[u8; 16]),
    epoch: Epoch,
    (target, wrapping, wrapping_version): (NodeId, NodeId, u64),
    plain: &[u8; 32],
) -> Wrap {
    let (cipher, nonce, ad) = wrap_aead(group, key, epoch.0, (target, wrapping, wrapping_version));
    let mut ciphertext = [0u8; 48];
    let (body, tag_out) = ciphertext.split_at_mut(32);
    body.copy_from_slice(plain);
    let tag = cipher
        .encrypt_inout_detached(&nonce, &ad, body.into())
        .expect("a 32-byte key wraps");
    tag_out.copy_from_slice(&tag);
    Wrap {
        target,
        wrapping,
        under_new: wrapping_version == epoch.0,
        ciphertext,
    }
}

/// Opens `wrap` of `epoch` with `key`, taken as the key of the wrapping node at
/// `wrapping_version`; `None` if it does not authenticate.
pub fn open_wrap(
    group: GroupId,
    key: (&[u8; 32], &[u8; 16]),
    epoch: u64,
    wrap: &Wrap,
    wrapping_version: u64,
) -> Option<[u8; 32]> {
    let (cipher, nonce, ad) = wrap_aead(
        group,
        key,
        epoch,
        (wrap.target, wrap.wrapping, wrapping_version),
    );
    let mut body = [0u8; 32];
    body.copy_from_slice(&wrap.ciphertext[..32]);
    let tag = Tag::try_from(&wrap.ciphertext[32..]).ok()?;
    cipher
        .decrypt_inout_detached(&nonce, &ad, (&mut body[..]).into(), &tag)
        .ok()?;
    Some(body)
}

/// Every key instance the attackers hold, several candidates per instance allowed.
type Pool = BTreeMap<(u32, u64), BTreeSet<[u8; 32]>>;

/// What the attackers learned.
pub struct Loot {
    group: GroupId,
    keys: Pool,
    seeds: Pool,
    /// Instances learned by opening a wrap (authenticated by the AEAD, so certainly real).
    pub opened: BTreeSet<(u32, u64)>,
}

impl Loot {
    /// Attackers of `group` holding `held`.
    pub fn new(group: GroupId, held: &Keys) -> Loot {
        let mut loot = Loot {
            group,
            keys: Pool::new(),
            seeds: Pool::new(),
            opened: BTreeSet::new(),
        };
        for (&instance, key) in held {
            loot.keys.entry(instance).or_default().insert(*key);
        }
        loot
    }

    fn add(pool: &mut Pool, instance: (u32, u64), key: [u8; 32]) -> bool {
        pool.entry(instance).or_default().insert(key)
    }

    /// Keys of `node` held at versions below `epoch`, with their versions.
    fn older(&self, node: NodeId, epoch: u64) -> Vec<(u64, [u8; 32])> {
        self.keys
            .range((node.0, 0)..(node.0, epoch))
            .flat_map(|(&(_, v), keys)| keys.iter().map(move |k| (v, *k)))
            .collect()
    }

    /// One pass over one datagram; whether anything new was learned.
    fn pass(&mut self, d: &RekeyDatagram) -> bool {
        let e = d.epoch.0;
        let mut progress = false;
        for &node in &d.advances {
            for (_, old) in self.older(node, e) {
                let new = NodeKey::from_bytes(old).hash_forward(node, KeyVersion(e));
                progress |= Loot::add(&mut self.keys, (node.0, e), *new.as_bytes());
            }
        }
        for wrap in &d.wraps {
            let candidates: Vec<(u64, [u8; 32])> = if wrap.under_new {
                let held = self
                    .keys
                    .get(&(wrap.wrapping.0, e))
                    .cloned()
                    .unwrap_or_default();
                held.into_iter().map(|k| (e, k)).collect()
            } else {
                self.older(wrap.wrapping, e)
            };
            for (version, key) in candidates {
                let Some(plain) = open_wrap(self.group, (&key, &d.salt.0), e, wrap, version) else {
                    continue;
                };
                let instance = (wrap.target.0, e);
                self.opened.insert(instance);
                progress |= self.learn(d.seeds, wrap.target, e, plain);
            }
        }
        for link in &d.links {
            let seeds = self
                .seeds
                .get(&(link.child.0, e))
                .cloned()
                .unwrap_or_default();
            for seed in seeds {
                let next = NodeKey::from_bytes(seed).one_way_next(link.parent);
                progress |= self.learn(true, link.parent, e, *next.as_bytes());
            }
        }
        progress
    }

    fn learn(&mut self, seeds: bool, node: NodeId, e: u64, plain: [u8; 32]) -> bool {
        if !seeds {
            return Loot::add(&mut self.keys, (node.0, e), plain);
        }
        let key = NodeKey::from_bytes(plain).one_way_key(node);
        Loot::add(&mut self.seeds, (node.0, e), plain)
            | Loot::add(&mut self.keys, (node.0, e), *key.as_bytes())
    }

    /// Decrypts until nothing more opens (bounded).
    pub fn attack(&mut self, captures: &[RekeyDatagram]) {
        for _ in 0..captures.len() + 2 {
            let mut progress = false;
            for d in captures {
                progress |= self.pass(d);
            }
            if !progress {
                return;
            }
        }
        panic!("the attack did not reach a fixed point");
    }

    /// Epochs whose real traffic key (as given in `traffic`) the attackers derived.
    pub fn traffic_epochs(&self, traffic: &BTreeMap<u64, [u8; 32]>) -> BTreeSet<u64> {
        self.keys
            .range((0, 0)..(1, 0))
            .filter(|((_, e), candidates)| {
                candidates.iter().any(|root| {
                    let derived = NodeKey::from_bytes(*root).traffic_key(self.group, Epoch(*e));
                    traffic.get(e) == Some(derived.as_bytes())
                })
            })
            .map(|((_, e), _)| *e)
            .collect()
    }
}
