//! `netsim`: command-line front of the simulator.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use netsim::demo::{self, DemoConfig};

#[derive(Parser)]
#[command(
    name = "netsim",
    about = "Simulate gkm groups on the real tree and wire code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A group under churn with loss; checks that members converge and departed members read nothing.
    Demo {
        /// Members admitted at the start.
        #[arg(long, default_value_t = 500)]
        members: usize,
        /// Rekeys after the admission.
        #[arg(long, default_value_t = 30)]
        epochs: usize,
        /// Tree degree (2..=64).
        #[arg(long, default_value_t = 4)]
        degree: u8,
        /// Per-receiver datagram loss, 0.0..1.0.
        #[arg(long, default_value_t = 0.05)]
        loss: f64,
        /// Datagram size limit in bytes.
        #[arg(long, default_value_t = wire::DEFAULT_MTU)]
        mtu: usize,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let Command::Demo {
        members,
        epochs,
        degree,
        loss,
        mtu,
        seed,
    } = Cli::parse().command;
    if !(0.0..1.0).contains(&loss) {
        bail!("--loss must be in 0.0..1.0 (got {loss}); try --loss 0.05");
    }
    let config = DemoConfig {
        members,
        epochs,
        degree,
        loss,
        mtu,
        seed,
    };
    println!(
        "{:>5}  {:<14} {:>7} {:>6} {:>5} {:>7} {:>7}",
        "epoch", "change", "members", "wraps", "dgrams", "bytes", "resyncs"
    );
    let verdict = demo::run(&config, |l| {
        println!(
            "{:>5}  {:<14} {:>7} {:>6} {:>5} {:>7} {:>7}",
            l.epoch.0, l.change, l.members, l.encryptions, l.datagrams, l.bytes, l.resyncs
        );
    })
    .context("the simulated group failed; rerun with the same --seed to reproduce")?;
    let status = if verdict.holds() { "PASS" } else { "FAIL" };
    println!(
        "verdict: {status}: {}/{} current members hold the controller's traffic key; {} departed members decrypted {} of {} later group messages, applied {} later rekeys, and together reach {} current keys",
        verdict.members - verdict.diverged,
        verdict.members,
        verdict.departed,
        verdict.later_messages_decrypted,
        verdict.later_messages_tried,
        verdict.departed_rekeys_applied,
        verdict.coalition_reach,
    );
    if !verdict.holds() {
        bail!("verdict failed (seed {seed})");
    }
    Ok(())
}
