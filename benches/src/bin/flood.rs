//! `flood [SECONDS] [CONNECTIONS] [RUNS]`: a registration flood against a real `gkm-server` on
//! loopback (see `gkm_benches::flood`): garbage, oversize frames, unknown keys, bad signatures,
//! replays, and CONNECTIONS silent connections, for SECONDS (default 10, 256 connections, 3
//! runs), while one allow-listed member registers again and again. Prints its registration time
//! idle and under flood (p50/p99), the daemon's memory before, during and after, and the
//! refusals by reason, per run and the median over runs.
//!
//! `cargo build --release --bins && cargo run --release -p gkm-benches --bin flood -- 10 256`

use std::time::Duration;

use gkm_benches::flood::{Controller, Identity, Report, measure, percentile};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn print(run: usize, r: &Report) {
    println!(
        "run {run}: idle p50 {:.1} ms p99 {:.1} ms ({} regs) | flood p50 {:.1} ms p99 {:.1} ms \
         ({} regs, {} missed) | RSS KiB before {} during max {} after {} (HWM {}) | alive {}",
        ms(percentile(&r.idle, 50)),
        ms(percentile(&r.idle, 99)),
        r.idle.len(),
        ms(percentile(&r.flood, 50)),
        ms(percentile(&r.flood, 99)),
        r.flood.len(),
        r.missed,
        r.rss_before.0,
        r.rss_during,
        r.rss_after.0,
        r.rss_after.1,
        r.alive
    );
    println!(
        "       refused by reason {:?}; accepted {}; sent {:?}; replies {}, closed unanswered {}, \
         failed to connect {}",
        r.rejects, r.registrations, r.sent.requests, r.sent.replies, r.sent.closed, r.sent.failed
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let exe = std::env::current_exe().expect("own path");
    let bin_dir = exe.parent().expect("target directory");
    assert!(
        bin_dir.join("gkm-server").exists(),
        "build the daemon first: cargo build --release --bins"
    );
    let allowed = Identity::from_seed(1);
    let mut reports = Vec::new();
    for run in 1..=runs {
        let mut controller = Controller::start(bin_dir, &allowed).expect("gkm-server starts");
        let report = measure(
            &mut controller,
            &allowed,
            Duration::from_secs(seconds),
            2,
            connections,
            50,
        );
        print(run, &report);
        reports.push(report);
    }
    let med = |f: &dyn Fn(&Report) -> f64| median(reports.iter().map(f).collect());
    println!(
        "median of {runs}: idle p50 {:.1} ms p99 {:.1} ms | flood p50 {:.1} ms p99 {:.1} ms | \
         RSS KiB before {:.0} during max {:.0} after {:.0}",
        med(&|r| ms(percentile(&r.idle, 50))),
        med(&|r| ms(percentile(&r.idle, 99))),
        med(&|r| ms(percentile(&r.flood, 50))),
        med(&|r| ms(percentile(&r.flood, 99))),
        med(&|r| r.rss_before.0 as f64),
        med(&|r| r.rss_during as f64),
        med(&|r| r.rss_after.0 as f64),
    );
}
