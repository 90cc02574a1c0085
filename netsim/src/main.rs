//! `netsim`: command-line front of the simulator.

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use netsim::churn::{self, ChurnConfig, LossModel};
use netsim::cost::{self, RekeyCost, Scheme};
use netsim::demo::{self, DemoConfig};
use netsim::paper;
use netsim::sweep;

#[derive(Parser)]
#[command(
    name = "netsim",
    about = "Simulate gkm groups on the real tree and wire code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How rekeys reach the members (`churn` and `replay`): batching, loss and repeats.
#[derive(clap::Args)]
struct Delivery {
    /// Batch interval, ms (0: rekey at once; changes within one 10 ms step share a rekey,
    /// as requests queued together do in the daemon).
    #[arg(long, default_value_t = 1_000)]
    interval: u64,
    /// Loss per datagram and receiver, 0.0..1.0.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// `bernoulli` or `gilbert-elliott` (mean burst 4).
    #[arg(long, default_value = "bernoulli")]
    loss_model: String,
    /// Sends per rekey datagram.
    #[arg(long, default_value_t = 1)]
    repeats: u8,
    /// Milliseconds between the sends of a rekey datagram (the policy's default: 100).
    #[arg(long, default_value_t = 100)]
    spacing: u64,
}

impl Delivery {
    /// `config` with this delivery.
    fn apply(&self, config: &ChurnConfig) -> anyhow::Result<ChurnConfig> {
        Ok(ChurnConfig {
            interval_ms: self.interval,
            loss: self.loss,
            model: loss_model_of(self.loss, &self.loss_model)?,
            repeats: self.repeats,
            spacing_ms: self.spacing,
            ..*config
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Batch costs over degrees and batch sizes: CSV and an SVG plot.
    Sweep {
        /// Members.
        #[arg(long, default_value_t = 4096)]
        members: usize,
        /// Degrees, comma-separated.
        #[arg(long, default_value = "2,4,8,16", value_delimiter = ',')]
        degrees: Vec<u8>,
        /// Departing members per batch, comma-separated.
        #[arg(long, default_value = "1,4,16,64,256,1024", value_delimiter = ',')]
        leaves: Vec<usize>,
        /// Trials per cell.
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to write the CSV.
        #[arg(long, default_value = "sweep.csv")]
        csv: std::path::PathBuf,
        /// Where to write the SVG plot.
        #[arg(long, default_value = "sweep.svg")]
        svg: std::path::PathBuf,
        /// Sweep batch intervals (ms, comma-separated) instead of batch sizes, at
        /// `--rate` leaves and joins per second, for the first of `--degrees`; CSV only.
        #[arg(long, value_delimiter = ',')]
        intervals: Vec<u64>,
        /// Leaves (and joins) per second for `--intervals`.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
    },
    /// Published analysis (Wong-Gouda-Lam, Li et al., Micciancio-Panjwani, TreeKEM) next to
    /// netsim's measured numbers and their deviation.
    Paper {
        /// Trials per batch size.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A group under Poisson churn on the sans-I/O controller and members: batches, loss,
    /// repeats, heartbeats, resync.
    Churn {
        /// Members admitted first.
        #[arg(long)]
        members: usize,
        /// Tree degree (2..=64).
        #[arg(long, default_value_t = 4)]
        degree: u8,
        /// Simulated seconds.
        #[arg(long, default_value_t = 60)]
        duration: u64,
        /// Joins per second.
        #[arg(long, default_value_t = 1.0)]
        join_rate: f64,
        /// Leaves per second.
        #[arg(long, default_value_t = 1.0)]
        leave_rate: f64,
        #[command(flatten)]
        delivery: Delivery,
        /// `full` (every member a `Member` state machine) or `subtree` (receivers modelled by
        /// the datagram covers; for large groups). Default: full up to 10,000 members.
        #[arg(long)]
        receivers: Option<String>,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Both churn models (full receivers and the subtree model) on the same seeds over a grid:
    /// resyncs, members resynced and convergence p99 side by side (a Markdown table).
    Agree {
        /// Group sizes, comma-separated.
        #[arg(long, default_value = "2000,10000", value_delimiter = ',')]
        members: Vec<usize>,
        /// Loss probabilities, comma-separated.
        #[arg(long, default_value = "0,0.01,0.05,0.2", value_delimiter = ',')]
        losses: Vec<f64>,
        /// Repeat counts, comma-separated.
        #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
        repeats: Vec<u8>,
        /// Repeat spacings (ms), comma-separated.
        #[arg(long, default_value = "0,100", value_delimiter = ',')]
        spacings: Vec<u64>,
        /// Batch intervals (ms), comma-separated.
        #[arg(long, default_value = "0,1000", value_delimiter = ',')]
        intervals: Vec<u64>,
        /// Simulated seconds per run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Joins and leaves per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Seed of every run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Also write the rows as JSON lines to this file.
        #[arg(long)]
        jsonl: Option<std::path::PathBuf>,
    },
    /// Replays a membership trace (CSV `time_ms,member,event`, see RFC-notes/netsim.md) on the
    /// real controller and members, with churn's loss, repeats and batching; churn's report.
    Replay {
        /// The trace file.
        #[arg(long)]
        trace: std::path::PathBuf,
        /// Members admitted before the trace starts.
        #[arg(long, default_value_t = 0)]
        members: usize,
        /// Tree degree (2..=64).
        #[arg(long, default_value_t = 4)]
        degree: u8,
        #[command(flatten)]
        delivery: Delivery,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Writes a synthetic membership trace: diurnal arrivals (a sinusoid over the day) and
    /// log-normal or Pareto session lengths, deterministic from the seed.
    TraceGen {
        /// Length of the trace, seconds.
        #[arg(long, default_value_t = 86_400)]
        duration: u64,
        /// Mean arrivals per second over a day.
        #[arg(long, default_value_t = 0.05)]
        rate: f64,
        /// Relative swing of the arrival rate over the day, 0..=1.
        #[arg(long, default_value_t = 0.8)]
        amplitude: f64,
        /// Length of the modelled day, seconds (shorter compresses a day).
        #[arg(long, default_value_t = 86_400)]
        day: u64,
        /// `lognormal` or `pareto`.
        #[arg(long, default_value = "lognormal")]
        sessions: String,
        /// Log-normal: mean of ln(seconds).
        #[arg(long, default_value_t = 6.0)]
        mu: f64,
        /// Log-normal: standard deviation of ln(seconds).
        #[arg(long, default_value_t = 1.5)]
        sigma: f64,
        /// Pareto: shortest session, seconds.
        #[arg(long, default_value_t = 60.0)]
        scale: f64,
        /// Pareto: tail index.
        #[arg(long, default_value_t = 1.2)]
        shape: f64,
        /// Seed of every draw.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to write the trace.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Plots both receiver models' resyncs against loss from `netsim agree --jsonl` rows (one
    /// cell of the other axes): STEM.svg and STEM.png.
    PlotAgree {
        /// Rows written by `netsim agree --jsonl`.
        #[arg(long)]
        jsonl: std::path::PathBuf,
        /// Members of the cell to plot.
        #[arg(long, default_value_t = 2_000)]
        members: usize,
        /// Repeats of the cell to plot.
        #[arg(long, default_value_t = 2)]
        repeats: u8,
        /// Repeat spacing (ms) of the cell to plot.
        #[arg(long, default_value_t = 100)]
        spacing: u64,
        /// Batch interval (ms) of the cell to plot.
        #[arg(long, default_value_t = 1_000)]
        interval: u64,
        /// Output path without extension.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Plots gkm's and Li et al.'s encryptions per batch against J/ℓ (measured, and the paper's
    /// expectation): STEM.svg and STEM.png.
    PlotAccounting {
        /// Members (a power of 4).
        #[arg(long, default_value_t = 4_096)]
        members: usize,
        /// Departures per batch.
        #[arg(long, default_value_t = 256)]
        leaves: usize,
        /// Joins per batch, comma-separated.
        #[arg(
            long,
            default_value = "0,32,64,128,192,256,320,384,512",
            value_delimiter = ','
        )]
        joins: Vec<usize>,
        /// Trials per point.
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output path without extension.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// One join or leave on a balanced tree of N members: exact costs.
    Single {
        /// Members.
        #[arg(long)]
        members: usize,
        /// Tree degree (2..=64).
        #[arg(long, default_value_t = 4)]
        degree: u8,
        /// `join` or `leave`.
        #[arg(long)]
        op: String,
        /// `group`, `key`, `user`, `lkh-plus` or `one-way`.
        #[arg(long, default_value = "group")]
        strategy: String,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A batch of uniformly chosen leaves and joins, over independent trials.
    Batch {
        /// Members.
        #[arg(long)]
        members: usize,
        /// Tree degree (2..=64).
        #[arg(long, default_value_t = 4)]
        degree: u8,
        /// Leaves per batch.
        #[arg(long)]
        leaves: usize,
        /// Joins per batch.
        #[arg(long, default_value_t = 0)]
        joins: usize,
        /// Independent trials.
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// `group`, `key`, `user`, `lkh-plus` or `one-way`.
        #[arg(long, default_value = "group")]
        strategy: String,
        /// How encryptions are counted: `gkm` (what gkm multicasts; joiners get their paths by
        /// unicast) or `paper` (Li, Yang, Gouda and Lam: joiners' keys in the multicast, every
        /// renewed key under each child).
        #[arg(long, default_value = "gkm")]
        accounting: String,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
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

fn scheme(name: &str) -> anyhow::Result<Scheme> {
    Scheme::parse(name).with_context(|| {
        format!("unknown --strategy {name:?}; use group, key, user, lkh-plus or one-way")
    })
}

fn print_cost(cost: &RekeyCost) {
    let rows: [(&str, String); 13] = [
        ("members", cost.members.to_string()),
        ("degree", cost.degree.to_string()),
        ("strategy", cost.strategy.clone()),
        ("encryptions", cost.encryptions.to_string()),
        ("paper_encryptions", cost.paper_encryptions.to_string()),
        ("encryptions_sent", cost.encryptions_sent.to_string()),
        ("datagrams", cost.datagrams.to_string()),
        ("multicast_bytes", cost.multicast_bytes.to_string()),
        ("unicast_keys", cost.unicast_keys.to_string()),
        ("unicast_bytes", cost.unicast_bytes.to_string()),
        ("signatures", cost.signatures.to_string()),
        (
            "member_decrypts_mean",
            format!("{:.3}", cost.member_decrypts_mean),
        ),
        ("member_decrypts_max", cost.member_decrypts_max.to_string()),
    ];
    for (name, value) in rows {
        println!("{name:<22} {value}");
    }
}

fn loss_model_of(loss: f64, name: &str) -> anyhow::Result<LossModel> {
    if !(0.0..1.0).contains(&loss) {
        bail!("--loss must be in 0.0..1.0 (got {loss})");
    }
    Ok(match name {
        "bernoulli" => LossModel::Bernoulli,
        "gilbert-elliott" => LossModel::GilbertElliott,
        other => bail!("unknown --loss-model {other:?}; use bernoulli or gilbert-elliott"),
    })
}

fn print_churn(report: &churn::ChurnReport, json: bool, seed: u64) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        for (k, v) in serde_json::to_value(report)?
            .as_object()
            .into_iter()
            .flatten()
        {
            println!("{k:<26} {v}");
        }
    }
    if report.diverged > 0 {
        bail!("{} members did not converge (seed {seed})", report.diverged);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sweep {
            members,
            degrees,
            leaves,
            trials,
            seed,
            csv,
            svg,
            intervals,
            rate,
        } => {
            if !intervals.is_empty() {
                let degree = degrees.first().copied().unwrap_or(4);
                let cells = sweep::run_intervals(members, degree, rate, &intervals, trials, seed)?;
                std::fs::write(&csv, sweep::intervals_csv(members, degree, rate, &cells))
                    .with_context(|| format!("cannot write {}", csv.display()))?;
                println!("wrote {}", csv.display());
                return Ok(());
            }
            let bar = indicatif::ProgressBar::new((degrees.len() * leaves.len()) as u64);
            let cells = sweep::run(members, &degrees, &leaves, trials, seed, |done, _| {
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            std::fs::write(&csv, sweep::csv(members, &cells))
                .with_context(|| format!("cannot write {}", csv.display()))?;
            sweep::svg(&svg, members, &cells)
                .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", svg.display()))?;
            println!(
                "wrote {}, {} and {}",
                csv.display(),
                svg.display(),
                svg.with_extension("png").display()
            );
            Ok(())
        }
        Command::Paper { trials, seed, json } => {
            let rows = paper::table(trials, seed)?;
            let (best, star) = paper::summary();
            if json {
                let out = serde_json::json!({"rows": rows, "best_degree": best, "key_star_wins_from_batch": star});
                println!("{out}");
                return Ok(());
            }
            println!(
                "{:<78} {:>6} {:>3} {:>12} {:>12} {:>9}",
                "quantity", "n", "d", "published", "measured", "deviation"
            );
            for r in &rows {
                println!(
                    "{:<78} {:>6} {:>3} {:>12.2} {:>12.2} {:>8.2}%",
                    r.quantity,
                    r.members,
                    r.degree,
                    r.published,
                    r.measured,
                    r.deviation * 100.0
                );
            }
            for (leaves, degree) in best {
                println!(
                    "Li et al.: best degree for a batch of {leaves:>3} leaves at n = 4096: {degree}"
                );
            }
            println!(
                "Li et al.: a flat key star costs less than the d = 4 tree from a batch of {star} leaves (n = 4096)"
            );
            Ok(())
        }
        Command::Churn {
            members,
            degree,
            duration,
            join_rate,
            leave_rate,
            delivery,
            receivers,
            seed,
            json,
        } => {
            let config = delivery.apply(&ChurnConfig {
                members,
                degree,
                duration_s: duration,
                join_rate,
                leave_rate,
                seed,
                ..ChurnConfig::default()
            })?;
            let subtree = match receivers.as_deref() {
                None => members > 10_000,
                Some("full") => false,
                Some("subtree") => true,
                Some(other) => bail!("unknown --receivers {other:?}; use full or subtree"),
            };
            let report = if subtree {
                netsim::scale::run(&config)?
            } else {
                churn::run(&config)?
            };
            print_churn(&report, json, seed)
        }
        Command::Agree {
            members,
            losses,
            repeats,
            spacings,
            intervals,
            duration,
            rate,
            seed,
            jsonl,
        } => {
            let grid = netsim::agree::Grid {
                members,
                losses,
                models: vec![LossModel::Bernoulli, LossModel::GilbertElliott],
                repeats,
                spacings,
                intervals,
                duration_s: duration,
                rate,
                seed,
            };
            let configs = grid.configs();
            let mut rows = Vec::new();
            let mut lines = String::new();
            // Row by row as the cells finish (a grid on 10,000 members takes a while).
            print!("{}", netsim::agree::MARKDOWN_HEADER);
            for config in &configs {
                let row = netsim::agree::compare(config)?;
                print!("{}", netsim::agree::markdown_row(&row));
                std::io::Write::flush(&mut std::io::stdout())?;
                lines.push_str(&serde_json::to_string(&row)?);
                lines.push('\n');
                if let Some(path) = &jsonl {
                    std::fs::write(path, &lines)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                rows.push(row);
            }
            let disagree = rows.iter().filter(|r| !r.agree).count();
            println!("{} of {} cells agree", rows.len() - disagree, rows.len());
            if disagree > 0 {
                bail!("{disagree} cells disagree");
            }
            Ok(())
        }
        Command::PlotAgree {
            jsonl,
            members,
            repeats,
            spacing,
            interval,
            out,
        } => {
            let text = std::fs::read_to_string(&jsonl)
                .with_context(|| format!("cannot read {}", jsonl.display()))?;
            let mut points = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let row: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}: not JSON", jsonl.display(), i + 1))?;
                let matches = row["members"].as_u64() == Some(members as u64)
                    && row["repeats"].as_u64() == Some(u64::from(repeats))
                    && row["spacing_ms"].as_u64() == Some(spacing)
                    && row["interval_ms"].as_u64() == Some(interval);
                if !matches {
                    continue;
                }
                let model = row["loss_model"].as_str().unwrap_or("?").to_owned();
                let loss = row["loss"].as_f64().unwrap_or(0.0);
                let full = row["full"]["resyncs"].as_u64().unwrap_or(0);
                let subtree = row["subtree"]["resyncs"].as_u64().unwrap_or(0);
                // Loss 0 is run once (with the first model): it starts both lines.
                let models: &[&str] = if loss == 0.0 {
                    &["bernoulli", "gilbert-elliott"]
                } else {
                    &[]
                };
                for m in models
                    .iter()
                    .copied()
                    .chain(std::iter::once(model.as_str()))
                {
                    let point = netsim::plot::AgreePoint {
                        loss,
                        model: m.to_owned(),
                        full,
                        subtree,
                    };
                    if !points.contains(&point) {
                        points.push(point);
                    }
                }
            }
            if points.is_empty() {
                bail!(
                    "no row of {} has {members} members, {repeats} repeats, {spacing} ms spacing and a {interval} ms interval",
                    jsonl.display()
                );
            }
            let title = format!(
                "Resyncs, n = {members}, {repeats} sends {spacing} ms apart, {interval} ms batches"
            );
            netsim::plot::agree(&out, &title, &points)
                .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", out.display()))?;
            println!("wrote {0}.svg and {0}.png", out.display());
            Ok(())
        }
        Command::PlotAccounting {
            members,
            leaves,
            joins,
            trials,
            seed,
            out,
        } => {
            let points = netsim::plot::accounting_points(members, leaves, &joins, trials, seed)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            netsim::plot::accounting(&out, members, leaves, &points)
                .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", out.display()))?;
            for p in &points {
                println!(
                    "J = {:>4}: gkm {:>8.1}  paper {:>8.1}  expected {:>8.1}  unicast {:>8.1}",
                    p.joins, p.gkm, p.paper, p.expected, p.unicast
                );
            }
            println!("wrote {0}.svg and {0}.png", out.display());
            Ok(())
        }
        Command::Replay {
            trace,
            members,
            degree,
            delivery,
            seed,
            json,
        } => {
            let text = std::fs::read_to_string(&trace)
                .with_context(|| format!("cannot read the trace {}", trace.display()))?;
            let parsed = netsim::trace::Trace::parse(&text)
                .with_context(|| format!("{} is not a valid trace", trace.display()))?;
            let config = delivery.apply(&ChurnConfig {
                members,
                degree,
                duration_s: parsed.duration_ms().div_ceil(1_000),
                join_rate: 0.0,
                leave_rate: 0.0,
                seed,
                ..ChurnConfig::default()
            })?;
            let report = churn::replay(&config, &parsed)?;
            print_churn(&report, json, seed)
        }
        Command::TraceGen {
            duration,
            rate,
            amplitude,
            day,
            sessions,
            mu,
            sigma,
            scale,
            shape,
            seed,
            out,
        } => {
            let sessions = match sessions.as_str() {
                "lognormal" => netsim::trace::Sessions::LogNormal { mu, sigma },
                "pareto" if scale > 0.0 && shape > 0.0 => {
                    netsim::trace::Sessions::Pareto { scale, shape }
                }
                "pareto" => bail!("--scale and --shape must be positive"),
                other => bail!("unknown --sessions {other:?}; use lognormal or pareto"),
            };
            if !(0.0..=1.0).contains(&amplitude) || rate < 0.0 {
                bail!("--amplitude must be in 0..=1 and --rate at least 0");
            }
            let generator = netsim::trace::TraceGen {
                duration_s: duration,
                rate,
                amplitude,
                day_s: day,
                sessions,
                seed,
            };
            let trace = generator.generate();
            std::fs::write(&out, trace.to_csv())
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "wrote {}: {} events, {} members, at most {} at once",
                out.display(),
                trace.events.len(),
                trace.names.len(),
                trace.peak_members()
            );
            Ok(())
        }
        Command::Single {
            members,
            degree,
            op,
            strategy,
            seed,
            json,
        } => {
            let leave = match op.as_str() {
                "leave" => true,
                "join" => false,
                other => bail!("unknown --op {other:?}; use join or leave"),
            };
            let cost = cost::single(members, degree, leave, scheme(&strategy)?, seed)?;
            if json {
                println!("{}", serde_json::to_string(&cost)?);
            } else {
                print_cost(&cost);
            }
            Ok(())
        }
        Command::Batch {
            members,
            degree,
            leaves,
            joins,
            trials,
            strategy,
            accounting,
            seed,
            json,
        } => {
            let accounting = cost::Accounting::parse(&accounting).ok_or_else(|| {
                anyhow::anyhow!("unknown --accounting {accounting:?}; use gkm or paper")
            })?;
            let cost = cost::batch_counted(
                members,
                degree,
                (leaves, joins),
                trials,
                scheme(&strategy)?,
                seed,
                accounting,
            )?;
            if json {
                println!("{}", serde_json::to_string(&cost)?);
            } else {
                print_cost(&cost.cost);
                println!("{:<22} {:?}", "accounting", cost.accounting);
                println!(
                    "{:<22} {:.2}",
                    "gkm_encryptions_mean", cost.gkm_encryptions_mean
                );
                println!(
                    "{:<22} {:.2}",
                    "paper_encryptions_mean", cost.paper_encryptions_mean
                );
                println!("{:<22} {:.2}", "unicast_keys_mean", cost.unicast_keys_mean);
                println!("{:<22} {:.2}", "encryptions_mean", cost.encryptions_mean);
                println!(
                    "{:<22} {:.2}",
                    "encryptions_stddev", cost.encryptions_stddev
                );
            }
            Ok(())
        }
        Command::Demo {
            members,
            epochs,
            degree,
            loss,
            mtu,
            seed,
        } => run_demo(members, epochs, degree, loss, mtu, seed),
    }
}

fn run_demo(
    members: usize,
    epochs: usize,
    degree: u8,
    loss: f64,
    mtu: usize,
    seed: u64,
) -> anyhow::Result<()> {
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
