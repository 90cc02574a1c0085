//! # gkm-server: the group controller (GCKS, RFC 4046)
//!
//! [`Controller`] is the controller's protocol logic as a sans-I/O state machine, in the style of
//! quinn-proto: it takes bytes, commands and the time, and hands back bytes to send, events for
//! the audit log and the time of its next timer. It never reads a clock, a socket or the OS
//! random source: the driver (the daemon, or netsim) passes `now` and the RNG in.
//!
//! ```text
//! any thread:   request bytes   ──► verify_request(bytes, rng) ──► Inbound   (signature, HPKE)
//!               member-signed   ──► signer_of (a lookup, driver loop) ──► MemberSigned::check
//!                                   (Ed25519 under that key, any thread)
//! driver loop:  Inbound         ──► handle_inbound(conn, now, inbound)
//!               (or both in one: handle_request(conn, now, bytes))
//!               control command ──► handle_command(now, command) ──► response
//!               timer fired     ──► handle_timeout(now)
//!               save to make    ◄── poll_persist()   (a staged rekey's, write-ahead)
//!                 (any thread: Persist::write(store), meanwhile prepare_staged() signs)
//!               save's outcome  ──► handle_persisted(now, persisted)
//!               then drain      ◄── poll_transmit()  (multicast datagrams, replies)
//!                               ◄── poll_event()     (audit: admissions, departures, rekeys)
//!               sleep until     ◄── poll_timeout()
//! ```
//!
//! A join or departure never rekeys inside the `handle_*` call that brings it (only the operator's
//! `rekey` command does, since it asks for one now): it is scheduled, and the rekey is made by the
//! `handle_timeout` that `poll_timeout` asks for. With immediate rekeying
//! (`batch_interval_ms = 0`) that timer is due at once, so a driver that handles everything
//! already queued before it fires its timers turns a burst of changes into one rekey, and a
//! lone change still goes out at once.
//!
//! Per group it keeps a key tree ([`lkh_tree::KeyTree`]), the member records and the policy; it
//! admits members (signed, fresh, authorized registration requests, answered with HPKE-sealed,
//! signed welcomes), gathers joins and departures for one batch interval, rekeys, asks for the
//! save of what the rekey changed ([`Persist`]) and queues nothing encrypted under it until the
//! driver reports the save durable (a rekey whose save fails is undone: nothing of its epoch
//! leaves; until the outcome, the group's requests wait and its commands are answered busy),
//! multicasts the signed datagrams (repeated as configured), sends heartbeats, answers resyncs
//! and renews leases. [`StoreDriver`] is the driver that makes each save at once, on the calling
//! thread, for tests, simulators and benchmarks.
//!
//! What it does not do: sockets, files, a store, the control socket, timers, threads that outlive
//! a call (see the binaries; its workers sign and seal inside a call). The
//! feature `disk` (on by default, through `daemon`) adds `DiskStore`, the daemon's store in a
//! redb file, and `EpochFloor`, the epoch floor kept beside it that refuses an older copy of
//! that file; the controller itself never touches a store. The feature `postgres` (also on
//! through `daemon`) adds `PgStore`, the same sealed rows in PostgreSQL with a lease per group
//! that fences every save, for controllers that take over from each other.

#![forbid(unsafe_code)]

#[cfg(feature = "daemon")]
pub mod cli;
pub mod control;
mod controller;
#[cfg(feature = "disk")]
mod disk;
mod fanout;
#[cfg(feature = "disk")]
mod floor;
mod gate;
mod persist;
#[cfg(feature = "postgres")]
mod pg;
mod policy;
mod reject;
mod roster;
#[cfg(any(feature = "disk", feature = "postgres"))]
mod rows;
mod signing;
mod store;

pub use controller::{
    BanTarget, Command, CommandError, Controller, DepartReason, EnrollmentInfo, Event, GroupInfo,
    Inbound, KeyInfo, KeyInventory, MemberInfo, MemberSigned, PolicyInfo, RESYNC_INTERVAL_MS,
    Reject, RekeyProfile, Response, Role, Saving, SigningKeyInfo, Stats, Subscription, Transmit,
    VerifiedRegistration, verify_request,
};
#[cfg(feature = "disk")]
pub use disk::DiskStore;
pub use fanout::{COOKIE_INTERVAL_MS, COOKIE_LIFETIME_MS, SOURCE_BUDGET};
#[cfg(feature = "disk")]
pub use floor::{Behind, EpochFloor, FloorError, FlooredStore};
pub use gate::token_digest;
pub use persist::{OVERLAP_SAVE_MIN, Persist, PersistTicket, Persisted, Save, StoreDriver};
#[cfg(feature = "postgres")]
pub use pg::{
    Follower, Following, Lease, LeaseRow, LogPosition, MIGRATIONS, PgConfig, PgStore,
    SCHEMA_VERSION,
};
pub use policy::{
    ConnId, Enrollment, GroupPolicy, MAX_REPEAT_SPACING_MS, PolicyError, Timestamp, TokenRule,
};
#[cfg(any(feature = "disk", feature = "postgres"))]
pub use rows::MAX_RECORDS;
pub use signing::{GRACE_EPOCHS, SigningKeyRecord};
pub use store::{
    CompactionFailure, EnrollmentChanges, EnrollmentRecords, GroupDelta, GroupRecords, GroupState,
    HpkeDigest, KeyFit, MemberRecord, MemoryStore, Resealed, Store, StoreError,
};
