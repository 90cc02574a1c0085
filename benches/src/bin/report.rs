//! The cost report: `cargo run --release -p gkm-benches --bin report`.
//!
//! Everything is measured in this run, with `std::time::Instant` around many iterations; each
//! time printed is the median of [`RUNS`] runs, with the spread (min..max of the runs) beside it.
//! - (a) bytes on the wire per encryption, and datagrams and bytes of one leave at n = 2^20,
//!   d = 4, MTU 1200;
//! - (b) one leave rekey (`tree.leave` + `pack_signed`) against the same number of bare wraps
//!   (one BLAKE3 `derive_key` of 80 bytes, the pad, XORed onto the key) plus one Ed25519
//!   signature per datagram, and the ratio;
//! - (c) a member's verify → fresh → apply of its datagram against one Ed25519 `verify_strict`
//!   of the same signed input plus its unwraps (pad and XOR), and the ratio;
//! - (d) memory per member: `KeyTree::memory_bytes() / n` at n = 10^6, and the process's peak
//!   RSS (`VmHWM`).
//!
//! The leaves of (b) are of random members of the full 2^20 tree; after each, an untimed join
//! refills the vacancy, so every leave costs d·L − 1 = 39 encryptions.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::hint::black_box;
use std::time::{Duration, Instant};

use ed25519_dalek::Signer;
use gkm_benches::{
    Fixture, LeaveCase, byte, config, controller_key, full_tree, median, peak_rss_kib, rss_kib,
    unwrap_like_member, wrap_binding, wrap_like_tree,
};
use lkh_tree::{MemberPath, TreeConfig};
use wire::{AuthenticRekey, DATAGRAM_OVERHEAD, DEFAULT_MTU, HeldPath, pack, pack_signed};

/// Runs per measurement; the median is printed.
const RUNS: usize = 7;
/// Leaves per run of (b).
const LEAVES: usize = 400;
/// Member applies per run of (c).
const APPLIES: usize = 2000;
/// The signature covers this label and the datagram body (see `wire`'s `signed.rs`).
const SIGNED_LABEL_LEN: usize = b"gkm v1 signed message\0".len();
const SIGNATURE_LEN: usize = 64;
const N_WIRE: usize = 1 << 20;
const N_MEMORY: usize = 1_000_000;
const DEGREE: u8 = 4;
const WIDTH: usize = 100;

/// A measurement: the median and the range of the per-operation means of [`RUNS`] runs, in µs.
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(mut per_op_us: Vec<f64>) -> Stat {
        let min = per_op_us.iter().copied().fold(f64::INFINITY, f64::min);
        let max = per_op_us.iter().copied().fold(0.0, f64::max);
        Stat {
            median: median(&mut per_op_us),
            min,
            max,
        }
    }
}

impl Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>9.2} µs   ({:.2}..{:.2})",
            self.median, self.min, self.max
        )
    }
}

/// Runs `run` [`RUNS`] times; each returns the total time of `ops` operations.
fn measure(ops: usize, mut run: impl FnMut() -> Duration) -> Stat {
    let per_op = (0..RUNS)
        .map(|_| run().as_secs_f64() * 1e6 / ops as f64)
        .collect();
    Stat::of(per_op)
}

fn us(value: f64) -> String {
    format!("{value:>9.2} µs")
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "n/a".to_owned(),
        |k| format!("{:.1} MiB", k as f64 / 1024.0),
    )
}

fn heading(title: &str) {
    println!("{title}");
    println!("{}", "-".repeat(WIDTH));
}

fn end() {
    println!("{}", "-".repeat(WIDTH));
    println!();
}

/// One row of a table: a label, left-aligned in a fixed column, and its value.
fn row(label: &str, value: impl Display) {
    println!("  {label:<54}{value}");
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!("gkm cost report: d = {DEGREE}, group-oriented rekeying, MTU {DEFAULT_MTU}");
    println!(
        "machine: {cores} cores, {}; times: median of {RUNS} runs (min..max of the runs)",
        cpu_model()
    );
    println!();

    // (d) is built first, so that the peak RSS read after it holds only the 10^6 tree.
    let started = Instant::now();
    let fx = full_tree(N_MEMORY, config(DEGREE, false), 1);
    let build_1m = started.elapsed();
    let memory_1m = fx.tree.memory_bytes();
    let (rss_1m, hwm_1m) = (rss_kib(), peak_rss_kib());
    drop(fx);

    // The same leave with the one-way path update, for comparison in (a).
    let one_way = {
        let one_way = TreeConfig {
            one_way: true,
            ..config(DEGREE, false)
        };
        full_tree(N_WIRE, one_way, 3).leave_and_pack(DEFAULT_MTU)
    };

    let started = Instant::now();
    let mut fx = full_tree(N_WIRE, config(DEGREE, false), 2);
    let build_wire = started.elapsed();
    assert_eq!(fx.tree.height(), 10, "2^20 = 4^10 joins make a full tree");
    let memory_wire = fx.tree.memory_bytes();

    let case = fx.leave_and_pack(DEFAULT_MTU);
    fx.join_untimed();
    report_wire(&case, &one_way);
    report_leave_time(&mut fx, &case);
    report_member_time(&case);

    heading("(d) memory per member, d = 4");
    row(
        "KeyTree::memory_bytes() / n at n = 10^6",
        format!(
            "{:>9.1} B    ({memory_1m} B; built in {:.1} s)",
            memory_1m as f64 / N_MEMORY as f64,
            build_1m.as_secs_f64()
        ),
    );
    row(
        "KeyTree::memory_bytes() / n at n = 2^20",
        format!(
            "{:>9.1} B    ({memory_wire} B; built in {:.1} s)",
            memory_wire as f64 / N_WIRE as f64,
            build_wire.as_secs_f64()
        ),
    );
    row(
        "peak RSS (VmHWM) after building the 10^6 tree",
        format!("{:>11}   (VmRSS {})", mib(hwm_1m), mib(rss_1m)),
    );
    row(
        "  = per member (whole process)",
        hwm_1m.map_or_else(
            || "n/a".to_owned(),
            |k| format!("{:>9.1} B", k as f64 * 1024.0 / N_MEMORY as f64),
        ),
    );
    row(
        "peak RSS (VmHWM) at the end (2^20 tree live)",
        format!("{:>11}   (VmRSS {})", mib(peak_rss_kib()), mib(rss_kib())),
    );
    end();
}

fn report_wire(case: &LeaveCase, one_way: &LeaveCase) {
    let e = case.rekey.encryptions.len();
    let sizes: Vec<usize> = case.datagrams.iter().map(Vec::len).collect();
    let total: usize = sizes.iter().sum();
    let controller = controller_key().verifying_key();
    let carried: usize = case
        .datagrams
        .iter()
        .map(|b| AuthenticRekey::verify(b, &controller).map_or(0, |a| a.datagram().wraps().count()))
        .sum();
    let per_wrap = (total - DATAGRAM_OVERHEAD * sizes.len()) as f64 / carried.max(1) as f64;
    let fit = (DEFAULT_MTU - DATAGRAM_OVERHEAD) as f64 / per_wrap;
    heading(&format!(
        "(a) bytes on the wire: one leave at n = 2^20 (L = 10), d = 4, MTU {DEFAULT_MTU}"
    ));
    row(
        "bytes per encryption carried (measured)",
        format!("{per_wrap:>9.1} B    (key under its pad 32, delta-coded node references, covers)"),
    );
    row(
        "bytes per datagram besides items (DATAGRAM_OVERHEAD)",
        format!("{DATAGRAM_OVERHEAD:>9} B    (header, epoch, salt, KCV, counts, …, signature 64)"),
    );
    row(
        "encryptions of the leave (d·L − 1)",
        format!("{e:>9}      ({} B of keys under pads)", e * 32),
    );
    row(
        "datagrams",
        format!("{:>9}      sizes {sizes:?} B", sizes.len()),
    );
    row("bytes on the wire, all datagrams", format!("{total:>9} B"));
    row(
        "wraps carried (near-root wraps repeat)",
        format!("{carried:>9}"),
    );
    row(
        "wraps that fit one datagram at this MTU",
        format!(
            "{fit:>9.1}      (so at least {} datagrams for {e} encryptions)",
            (e as f64 / fit).ceil()
        ),
    );
    let sizes: Vec<usize> = one_way.datagrams.iter().map(Vec::len).collect();
    row(
        "same leave, one-way path update (TreeConfig::one_way)",
        format!(
            "{:>9}      encryptions in {} datagrams, {} B, sizes {sizes:?} B",
            one_way.rekey.encryptions.len(),
            sizes.len(),
            sizes.iter().sum::<usize>()
        ),
    );
    end();
}

fn report_leave_time(fx: &mut Fixture, case: &LeaveCase) {
    let key = controller_key();
    let e = case.rekey.encryptions.len();

    let (mut tree_us, mut signed_us, mut total_us, mut pack_us) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // (encryptions, datagrams) → leaves; and the signed inputs' count and total length.
    let mut shapes = BTreeMap::<(usize, usize), usize>::new();
    let (mut signatures, mut signed_bytes) = (0usize, 0usize);
    for _ in 0..RUNS {
        let (mut tree_t, mut signed_t, mut pack_t) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..LEAVES {
            let victim = fx.random_member();
            let t0 = Instant::now();
            let rekey = fx.tree.leave(victim, &mut fx.rng).expect("a member");
            let t1 = Instant::now();
            let datagrams = pack_signed(&rekey, &fx.tree, DEFAULT_MTU, &key).expect("packs");
            let t2 = Instant::now();
            // Packing alone, again on the same rekey, to split pack_signed (not in the total).
            black_box(pack(&rekey, &fx.tree, DEFAULT_MTU).expect("packs"));
            let t3 = Instant::now();
            tree_t += t1 - t0;
            signed_t += t2 - t1;
            pack_t += t3 - t2;
            *shapes
                .entry((rekey.encryptions.len(), datagrams.len()))
                .or_default() += 1;
            signatures += datagrams.len();
            signed_bytes += datagrams
                .iter()
                .map(|d| d.len() - SIGNATURE_LEN + SIGNED_LABEL_LEN)
                .sum::<usize>();
            drop(black_box((rekey, datagrams)));
            fx.join_untimed();
        }
        let per = |t: Duration| t.as_secs_f64() * 1e6 / LEAVES as f64;
        tree_us.push(per(tree_t));
        signed_us.push(per(signed_t));
        total_us.push(per(tree_t + signed_t));
        pack_us.push(per(pack_t));
    }
    let total = Stat::of(total_us);
    let leaves = RUNS * LEAVES;
    let sigs_per_leave = signatures as f64 / leaves as f64;
    let signed_len = signed_bytes / signatures.max(1);

    // The floor: the same number of bare wraps, and one signature per datagram.
    let binding = wrap_binding(5);
    let wraps = measure(LEAVES, || {
        let t0 = Instant::now();
        for i in 0..LEAVES {
            for w in 0..e {
                let k = [byte(i ^ w); 32];
                black_box(wrap_like_tree(&k, &binding, &k));
            }
        }
        t0.elapsed()
    });
    let message = vec![0x5a; signed_len];
    let signature = measure(LEAVES, || {
        let t0 = Instant::now();
        for _ in 0..LEAVES {
            black_box(key.sign(black_box(&message)));
        }
        t0.elapsed()
    });
    let sigs = signature.median * sigs_per_leave;
    let floor = wraps.median + sigs;

    heading("(b) controller: one leave rekey at n = 2^20, d = 4 (random member, refilled untimed)");
    for ((enc, dgs), count) in &shapes {
        row(
            &format!("leaves with {enc} encryptions in {dgs} datagrams"),
            format!("{count:>9}      of {leaves}"),
        );
    }
    row("tree.leave", Stat::of(tree_us));
    row(
        &format!("pack_signed ({sigs_per_leave:.2} datagrams on average)"),
        Stat::of(signed_us),
    );
    row(
        "  of which pack alone (unsigned, timed apart)",
        Stat::of(pack_us),
    );
    row("leave rekey = tree.leave + pack_signed", &total);
    row(
        "one wrap alone: pad (derive_key of 80 B) + XOR",
        us(wraps.median / e as f64),
    );
    row(
        &format!("one Ed25519 signature alone ({signed_len} B signed)"),
        &signature,
    );
    row(
        &format!("{e} wraps + {sigs_per_leave:.2} signatures alone"),
        format!(
            "{}   (wraps {:.2} + signatures {sigs:.2})",
            us(floor),
            wraps.median
        ),
    );
    row(
        "ratio: leave rekey / (wraps + signatures)",
        format!(
            "{:>9.2} x    (everything else: {:.2} µs)",
            total.median / floor,
            total.median - floor
        ),
    );
    end();
}

/// Times verify → fresh → apply of the member's datagram, and the floor: one `verify_strict` of
/// a signed input of the same length plus as many bare unwraps as the member opens.
fn member_case(case: &LeaveCase, path: &MemberPath) -> (Stat, Stat, usize, usize) {
    let controller = controller_key().verifying_key();
    let index = case
        .datagram_for(path)
        .expect("a datagram serves the member");
    let bytes = &case.datagrams[index];
    let unwraps = case.unwraps_for(path);

    let paths: Vec<HeldPath> = (0..APPLIES)
        .map(|_| HeldPath::trusted(path.clone()))
        .collect();
    let full = measure(APPLIES, || {
        let mut paths = paths.clone();
        let t0 = Instant::now();
        for path in &mut paths {
            let authentic = AuthenticRekey::verify(black_box(bytes), &controller).expect("valid");
            let fresh = authentic.fresh(path).expect("fresh");
            black_box(fresh.apply().expect("applies"));
        }
        let elapsed = t0.elapsed();
        drop(paths);
        elapsed
    });

    let key = controller_key();
    let message = vec![0x5a; bytes.len() - SIGNATURE_LEN + SIGNED_LABEL_LEN];
    let signature = key.sign(&message);
    let binding = wrap_binding(9);
    let wrapped: Vec<([u8; 32], [u8; 32])> = (0..unwraps)
        .map(|i| {
            let k = [byte(i); 32];
            (k, wrap_like_tree(&k, &binding, &[1; 32]))
        })
        .collect();
    let floor = measure(APPLIES, || {
        let t0 = Instant::now();
        for _ in 0..APPLIES {
            controller
                .verify_strict(black_box(&message), black_box(&signature))
                .expect("valid");
            for (k, w) in &wrapped {
                black_box(unwrap_like_member(k, &binding, black_box(w)));
            }
        }
        t0.elapsed()
    });
    (full, floor, unwraps, bytes.len())
}

fn report_member_time(case: &LeaveCase) {
    heading(
        "(c) member: verify → fresh → apply of its datagram of that leave (path cloned untimed)",
    );
    for (name, path) in [
        (
            "sibling of the departed (every path key changed)",
            &case.sibling,
        ),
        ("member under another child of the root", &case.far),
    ] {
        let (full, floor, unwraps, len) = member_case(case, path);
        println!("  {name}: datagram of {len} B, {unwraps} unwrap(s)");
        row("  AuthenticRekey::verify + fresh + apply", &full);
        row(
            &format!("  verify_strict + {unwraps} unwrap(s) alone"),
            &floor,
        );
        row(
            "  ratio",
            format!(
                "{:>9.2} x    (everything else: {:.2} µs)",
                full.median / floor.median,
                full.median - floor.median
            ),
        );
    }
    end();
}
