//! `memory [N] [DEGREE]`: builds a tree of N members (default 10^7, d = 4), prints the tree's own
//! memory per member, the process's peak RSS per member, and the time of one leave at that size.
//!
//! `cargo run --release -p gkm-benches --bin memory -- 10000000`

use std::time::Instant;

use gkm_benches::{config, full_tree};

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let degree: u8 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let started = Instant::now();
    let mut fx = full_tree(n, config(degree, false), 9);
    let built = started.elapsed();
    let bytes = fx.tree.memory_bytes();
    println!("members                      {n}");
    println!("degree                       {degree}");
    println!("height                       {}", fx.tree.height());
    println!("built in                     {:.1} s", built.as_secs_f64());
    println!(
        "tree memory                  {bytes} B = {:.1} B per member",
        bytes as f64 / n as f64
    );
    if let Some(kib) = peak_rss_kib() {
        println!(
            "peak RSS (VmHWM)             {:.0} MiB = {:.1} B per member",
            kib as f64 / 1024.0,
            kib as f64 * 1024.0 / n as f64
        );
    }
    let leaf = fx.random_member();
    let started = Instant::now();
    let rekey = fx.tree.leave(leaf, &mut fx.rng).expect("a member leaves");
    println!(
        "one leave                    {} encryptions in {:.1} µs",
        rekey.encryptions.len(),
        started.elapsed().as_secs_f64() * 1e6
    );
}
