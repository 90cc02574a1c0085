//! Membership traces: the CSV format `netsim replay` reads, and `netsim trace-gen`'s synthetic
//! traces with diurnal load and heavy-tailed session lengths.
//!
//! A trace is a header line `time_ms,member,event` and then one line per membership change:
//! milliseconds from the start (non-decreasing), a member name (any text without a comma), and
//! `join` or `leave`. A member joins only while absent and leaves only while present; it may
//! join again after it left. Blank lines and lines starting with `#` are skipped.
//!
//! The generator draws arrivals from a Poisson process whose rate follows the time of day
//! (a sinusoid over 24 h: `rate · (1 + amplitude · sin(2π (t − 6 h) / 24 h))`, lowest at
//! midnight, highest at noon; by thinning), and gives each arrival a log-normal or Pareto session
//! length. Live-streaming and IPTV measurement studies report both shapes: diurnal arrivals and
//! heavy-tailed, roughly log-normal session lengths (Veloso, Almeida, Meira, Bestavros and Jin,
//! "A hierarchical characterization of a live streaming media workload", IEEE/ACM ToN 14(1),
//! 2006; Sripanidkulchai, Maggs and Zhang, "An analysis of live streaming workloads on the
//! Internet", IMC 2004; Cha, Rodriguez, Crowcroft, Moon and Amatriain, "Watching television over
//! an IP network", IMC 2008). The defaults are illustrative, not fitted to any of them.

use std::collections::HashMap;
use std::fmt::Write as _;

use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

use crate::churn::uniform;

/// The header line of a trace.
pub const HEADER: &str = "time_ms,member,event";

/// One membership change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// Milliseconds from the start of the trace.
    pub time_ms: u64,
    /// The member (an index into [`Trace::names`]).
    pub member: usize,
    /// Join (`true`) or leave (`false`).
    pub join: bool,
}

/// A parsed, checked trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// Member names, as the trace spells them.
    pub names: Vec<String>,
    /// The changes, in time order.
    pub events: Vec<TraceEvent>,
}

/// A line of a trace that cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TraceError {
    /// The first line is not the header.
    #[error("line {line}: expected the header `{HEADER}`, found {found:?}")]
    Header {
        /// 1-based line number.
        line: usize,
        /// What was there.
        found: String,
    },
    /// A line that is not `time_ms,member,join|leave`.
    #[error("line {line}: {reason} (expected `time_ms,member,join|leave`, found {found:?})")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
        /// The line.
        found: String,
    },
    /// A change that cannot happen: time going back, a join of a present member or a leave of
    /// an absent one.
    #[error("line {line}: {reason}")]
    Impossible {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl Trace {
    /// Parses and checks a trace.
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut trace = Trace::default();
        let mut ids: HashMap<&str, usize> = HashMap::new();
        let mut present: Vec<bool> = Vec::new();
        let mut header = false;
        let mut last = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let text = raw.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            if !header {
                if text != HEADER {
                    return Err(TraceError::Header {
                        line,
                        found: text.into(),
                    });
                }
                header = true;
                continue;
            }
            let malformed = |reason| TraceError::Malformed {
                line,
                reason,
                found: text.into(),
            };
            let fields: Vec<&str> = text.split(',').map(str::trim).collect();
            let [time, name, event] = fields.as_slice() else {
                return Err(malformed("not three comma-separated fields"));
            };
            let time_ms: u64 = time
                .parse()
                .map_err(|_| malformed("time_ms is not a whole number of milliseconds"))?;
            if name.is_empty() {
                return Err(malformed("empty member name"));
            }
            let join = match *event {
                "join" => true,
                "leave" => false,
                _ => return Err(malformed("the event is neither join nor leave")),
            };
            if time_ms < last {
                return Err(TraceError::Impossible {
                    line,
                    reason: format!("time goes back ({time_ms} ms after {last} ms)"),
                });
            }
            last = time_ms;
            let member = *ids.entry(name).or_insert_with(|| {
                trace.names.push((*name).to_owned());
                present.push(false);
                trace.names.len() - 1
            });
            if present[member] == join {
                let reason = if join {
                    format!("{name:?} joins while it is a member")
                } else {
                    format!("{name:?} leaves while it is not a member")
                };
                return Err(TraceError::Impossible { line, reason });
            }
            present[member] = join;
            trace.events.push(TraceEvent {
                time_ms,
                member,
                join,
            });
        }
        if !header {
            return Err(TraceError::Header {
                line: 1,
                found: String::new(),
            });
        }
        Ok(trace)
    }

    /// The time of the last change, ms.
    pub fn duration_ms(&self) -> u64 {
        self.events.last().map_or(0, |e| e.time_ms)
    }

    /// The trace as CSV, header first.
    pub fn to_csv(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for e in &self.events {
            let event = if e.join { "join" } else { "leave" };
            let _ = writeln!(out, "{},{},{event}", e.time_ms, self.names[e.member]);
        }
        out
    }

    /// The most members present at once.
    pub fn peak_members(&self) -> usize {
        let (mut now, mut peak) = (0usize, 0usize);
        for e in &self.events {
            if e.join {
                now += 1;
                peak = peak.max(now);
            } else {
                now = now.saturating_sub(1);
            }
        }
        peak
    }
}

/// Session lengths.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sessions {
    /// Log-normal: `exp(N(mu, sigma²))` seconds.
    LogNormal {
        /// Mean of the logarithm (of seconds).
        mu: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
    /// Pareto: `scale / U^(1/shape)` seconds (shape ≤ 2: infinite variance).
    Pareto {
        /// Shortest session, seconds.
        scale: f64,
        /// Tail index.
        shape: f64,
    },
}

/// Parameters of a synthetic trace.
#[derive(Clone, Debug)]
pub struct TraceGen {
    /// Length of the trace, seconds.
    pub duration_s: u64,
    /// Mean arrivals per second over a day.
    pub rate: f64,
    /// Relative swing of the rate over the day, 0..=1 (0: constant).
    pub amplitude: f64,
    /// Length of the modelled day, seconds (86,400; shorter to compress a day).
    pub day_s: u64,
    /// Session lengths.
    pub sessions: Sessions,
    /// Seed of every draw.
    pub seed: u64,
}

impl TraceGen {
    /// The arrival rate at `t` seconds (lowest at midnight, highest at noon).
    pub fn rate_at(&self, t: f64) -> f64 {
        let day = self.day_s.max(1) as f64;
        let phase = 2.0 * std::f64::consts::PI * (t / day - 0.25);
        (self.rate * (1.0 + self.amplitude.clamp(0.0, 1.0) * phase.sin())).max(0.0)
    }

    /// A trace: arrivals by thinning a Poisson process at the peak rate, each with a session
    /// length; leaves that fall after the end are left out (those members stay).
    pub fn generate(&self) -> Trace {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        let peak = self.rate * (1.0 + self.amplitude.clamp(0.0, 1.0));
        let end = self.duration_s as f64;
        let mut raw: Vec<(u64, usize, bool)> = Vec::new();
        let mut names = Vec::new();
        let mut t = 0.0;
        if peak > 0.0 {
            loop {
                t += -(1.0 - uniform(&mut rng)).ln() / peak;
                if t >= end {
                    break;
                }
                if uniform(&mut rng) * peak > self.rate_at(t) {
                    continue;
                }
                let member = names.len();
                names.push(format!("m{member}"));
                let session = self.session(&mut rng);
                raw.push((ms(t), member, true));
                let leave = t + session;
                if leave < end {
                    // At least 1 ms after the join, so that the order within a member holds.
                    raw.push((ms(leave).max(ms(t) + 1), member, false));
                }
            }
        }
        raw.sort_by_key(|&(time, member, join)| (time, !join, member));
        Trace {
            names,
            events: raw
                .into_iter()
                .map(|(time_ms, member, join)| TraceEvent {
                    time_ms,
                    member,
                    join,
                })
                .collect(),
        }
    }

    fn session(&self, rng: &mut ChaCha20Rng) -> f64 {
        match self.sessions {
            Sessions::LogNormal { mu, sigma } => {
                // Box–Muller.
                let u1 = 1.0 - uniform(rng);
                let u2 = uniform(rng);
                let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                (mu + sigma * z).exp()
            }
            Sessions::Pareto { scale, shape } => scale / (1.0 - uniform(rng)).powf(1.0 / shape),
        }
    }
}

#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "whole milliseconds of a non-negative time far below 2^53 (negative and NaN saturate to 0)"
)]
fn ms(seconds: f64) -> u64 {
    (seconds * 1_000.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_round_trips_and_bad_lines_name_their_line() {
        let text = "time_ms,member,event\n0,alice,join\n# a comment\n\n5,bob,join\n900,alice,leave\n900,alice,join\n";
        let trace = Trace::parse(text).unwrap();
        assert_eq!(trace.events.len(), 4);
        assert_eq!(trace.names, ["alice", "bob"]);
        assert_eq!(Trace::parse(&trace.to_csv()).unwrap(), trace);
        assert_eq!(trace.peak_members(), 2);

        let cases = [
            ("0,alice,join\n", 1, "header"),
            ("time_ms,member,event\n0,alice\n", 2, "three"),
            ("time_ms,member,event\nsoon,alice,join\n", 2, "whole number"),
            (
                "time_ms,member,event\n0,alice,arrive\n",
                2,
                "neither join nor leave",
            ),
            ("time_ms,member,event\n0,,join\n", 2, "empty member"),
            (
                "time_ms,member,event\n5,a,join\n4,b,join\n",
                3,
                "time goes back",
            ),
            (
                "time_ms,member,event\n0,a,join\n1,a,join\n",
                3,
                "joins while",
            ),
            ("time_ms,member,event\n\n0,a,leave\n", 3, "leaves while"),
            ("", 1, "header"),
        ];
        for (text, line, says) in cases {
            let error = Trace::parse(text).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("line {line}:")) && error.contains(says),
                "{text:?}: {error}"
            );
        }
    }

    fn generator(sessions: Sessions) -> TraceGen {
        TraceGen {
            duration_s: 86_400,
            rate: 0.05,
            amplitude: 0.8,
            day_s: 86_400,
            sessions,
            seed: 9,
        }
    }

    #[test]
    fn generated_traces_are_deterministic_diurnal_and_heavy_tailed() {
        let g = generator(Sessions::LogNormal {
            mu: 6.0,
            sigma: 1.5,
        });
        let trace = g.generate();
        assert_eq!(trace, g.generate(), "same seed, same trace");
        assert_eq!(
            Trace::parse(&trace.to_csv()).unwrap(),
            trace,
            "a valid trace"
        );
        let joins: Vec<u64> = trace
            .events
            .iter()
            .filter(|e| e.join)
            .map(|e| e.time_ms)
            .collect();
        // About 0.05 · 86,400 = 4,320 arrivals; four times as many around noon as at midnight.
        assert!((3_900..4_750).contains(&joins.len()), "{}", joins.len());
        let hour = |h: u64| {
            joins
                .iter()
                .filter(|&&t| (h * 3_600_000..(h + 2) * 3_600_000).contains(&t))
                .count()
        };
        assert!(hour(11) > 4 * hour(0), "{} vs {}", hour(11), hour(0));
        // Heavy tail: the longest sessions are far above the median.
        let mut lengths = session_lengths(&trace);
        lengths.sort_unstable();
        let median = lengths[lengths.len() / 2];
        let p99 = lengths[lengths.len() * 99 / 100];
        assert!(p99 > 15 * median, "median {median} ms, p99 {p99} ms");

        let pareto = generator(Sessions::Pareto {
            scale: 60.0,
            shape: 1.2,
        })
        .generate();
        let mut lengths = session_lengths(&pareto);
        lengths.sort_unstable();
        assert!(lengths[0] >= 59_000, "{}", lengths[0]);
        assert!(lengths[lengths.len() * 99 / 100] > 15 * lengths[lengths.len() / 2]);
    }

    /// Session lengths of the members that left within the trace, ms.
    fn session_lengths(trace: &Trace) -> Vec<u64> {
        let mut joined = HashMap::new();
        let mut out = Vec::new();
        for e in &trace.events {
            if e.join {
                joined.insert(e.member, e.time_ms);
            } else if let Some(t) = joined.remove(&e.member) {
                out.push(e.time_ms - t);
            }
        }
        out
    }
}
