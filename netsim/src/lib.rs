//! # netsim: gkm on a virtual network
//!
//! Drives the real key tree ([`lkh_tree`]), the real packer and codecs ([`wire`]) and the real
//! member-side path (verify → fresh → apply) for a whole group, with seeded randomness and
//! per-receiver datagram loss, and checks the outcome: every current member holds the group's
//! traffic key; no departed member decrypts anything sent after it left.
//!
//! [`churn`] drives the real sans-I/O controller and members (state machines, timers, resyncs);
//! [`scale`] keeps the real controller and models receivers by subtree with the member's own
//! catch-up decision, held to the full model by [`agree`]; [`trace`] reads and generates
//! membership traces; [`plot`] writes every figure as SVG and PNG. [`demo`] is the older
//! tree-and-wire run, in which a member that missed its datagram takes its current path from the
//! tree, as a resync would deliver it. No sockets, no wall clock.

#![forbid(unsafe_code)]

pub mod agree;
pub mod churn;
pub mod cost;
pub mod demo;
pub mod paper;
pub mod plot;
pub mod scale;
mod start;
pub mod sweep;
pub mod trace;
