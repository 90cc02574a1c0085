//! The subtree model held to the real members: both churn models ([`crate::churn`], every member
//! a real `gkm_member::Member`; [`crate::scale`], receivers modelled by subtree with the member's
//! own catch-up decision) run on the same parameters and seed over a grid, and their resyncs,
//! members resynced and convergence p99 compared. Both start from the same group and see the
//! same membership events (`netsim/src/start.rs`), so their controllers send the same rekeys;
//! they draw their losses from different streams, so they agree in distribution, not datagram by
//! datagram: a count agrees when it is within 10% of the larger or within three standard
//! deviations of a Poisson count of that size plus 3 (for small counts).
//!
//! Convergence p99 is held to one heartbeat interval (1,000 ms), and reported against 10% (or
//! 100 ms): with 1 s batches the delays cluster (0 for a member that got a copy, the grace after
//! the next heartbeat, a second more for one that lost the heartbeat too) with a sparse, flat
//! stretch between the clusters, and when the p99 rank falls in that stretch a few percent more
//! or fewer late members (well within the counts' tolerance) move it by hundreds of
//! milliseconds. Measured (2,000 members, 10 s, 5% Bernoulli loss, one send, 1 s batches): 984
//! late samples in the full model and 895 in the subtree model put p99 at 530 and 410 ms.

use serde::Serialize;

use crate::churn::{self, ChurnConfig, ChurnReport, LossModel};
use crate::cost::CostError;
use crate::scale;

/// One cell of the grid: both models' reports and whether they agree.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Members at the start.
    pub members: usize,
    /// Loss per datagram and receiver.
    pub loss: f64,
    /// `bernoulli` or `gilbert-elliott`.
    pub loss_model: &'static str,
    /// Sends per rekey datagram.
    pub repeats: u8,
    /// Milliseconds between sends.
    pub spacing_ms: u64,
    /// Batch interval, ms.
    pub interval_ms: u64,
    /// Every member a real `Member`.
    pub full: ChurnReport,
    /// Receivers modelled by subtree.
    pub subtree: ChurnReport,
    /// Whether resyncs, members resynced and convergence p99 agree (see the module docs).
    pub agree: bool,
}

/// Whether two counts agree: within 10% of the larger, or within 3·√(larger) + 3.
pub fn counts_agree(a: u64, b: u64) -> bool {
    let (hi, lo) = (a.max(b) as f64, a.min(b) as f64);
    hi - lo <= (0.10 * hi).max(3.0 * hi.sqrt() + 3.0)
}

/// Whether two convergence p99s agree as the grid holds them: within 10% of the larger, or
/// within one heartbeat interval, 1,000 ms (see the module docs for why not 10%).
pub fn p99_agree(a: u64, b: u64) -> bool {
    let (hi, lo) = (a.max(b) as f64, a.min(b) as f64);
    hi - lo <= (0.10 * hi).max(1_000.0)
}

/// Whether two convergence p99s are within 10% of the larger or 100 ms (reported, not held).
pub fn p99_close(a: u64, b: u64) -> bool {
    let (hi, lo) = (a.max(b) as f64, a.min(b) as f64);
    hi - lo <= (0.10 * hi).max(100.0)
}

/// Runs both models on `config` and compares them.
pub fn compare(config: &ChurnConfig) -> Result<Row, CostError> {
    let full = churn::run(config)?;
    let subtree = scale::run(config)?;
    let agree = counts_agree(full.resyncs, subtree.resyncs)
        && counts_agree(
            full.members_resynced as u64,
            subtree.members_resynced as u64,
        )
        && p99_agree(full.converged_ms_p99, subtree.converged_ms_p99);
    Ok(Row {
        members: config.members,
        loss: config.loss,
        loss_model: match config.model {
            LossModel::Bernoulli => "bernoulli",
            LossModel::GilbertElliott => "gilbert-elliott",
        },
        repeats: config.repeats,
        spacing_ms: config.spacing_ms,
        interval_ms: config.interval_ms,
        full,
        subtree,
        agree,
    })
}

/// The grid's axes.
#[derive(Clone, Debug)]
pub struct Grid {
    /// Group sizes.
    pub members: Vec<usize>,
    /// Loss probabilities.
    pub losses: Vec<f64>,
    /// Loss models.
    pub models: Vec<LossModel>,
    /// Repeat counts.
    pub repeats: Vec<u8>,
    /// Repeat spacings, ms.
    pub spacings: Vec<u64>,
    /// Batch intervals, ms.
    pub intervals: Vec<u64>,
    /// Simulated seconds per run.
    pub duration_s: u64,
    /// Joins (and leaves) per second.
    pub rate: f64,
    /// Seed of every run.
    pub seed: u64,
}

impl Grid {
    /// The grid of issue 17: loss 0–20%, both loss models, 1–3 repeats, spacing 0 and 100 ms,
    /// batch intervals 0 and 1 s, 2,000 and 10,000 members; 20 s at 5 joins and 5 leaves per
    /// second.
    pub fn issue_17() -> Self {
        Grid {
            members: vec![2_000, 10_000],
            losses: vec![0.0, 0.01, 0.05, 0.2],
            models: vec![LossModel::Bernoulli, LossModel::GilbertElliott],
            repeats: vec![1, 2, 3],
            spacings: vec![0, 100],
            intervals: vec![0, 1_000],
            duration_s: 20,
            rate: 5.0,
            seed: 1,
        }
    }

    /// Every cell's parameters (at loss 0 only the first loss model: the model draws nothing
    /// then).
    pub fn configs(&self) -> Vec<ChurnConfig> {
        let mut out = Vec::new();
        for &members in &self.members {
            for &loss in &self.losses {
                for (i, &model) in self.models.iter().enumerate() {
                    if loss == 0.0 && i > 0 {
                        continue;
                    }
                    for &repeats in &self.repeats {
                        for &spacing_ms in &self.spacings {
                            for &interval_ms in &self.intervals {
                                out.push(ChurnConfig {
                                    members,
                                    degree: 4,
                                    duration_s: self.duration_s,
                                    join_rate: self.rate,
                                    leave_rate: self.rate,
                                    interval_ms,
                                    loss,
                                    model,
                                    repeats,
                                    spacing_ms,
                                    seed: self.seed,
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// The rows as a Markdown table (for `RFC-notes/netsim.md`).
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(MARKDOWN_HEADER);
    for r in rows {
        out.push_str(&markdown_row(r));
    }
    out
}

/// The header of [`markdown`]'s table.
pub const MARKDOWN_HEADER: &str = "| members | loss | model | repeats | spacing ms | interval ms | resyncs full / subtree | members resynced full / subtree | p99 ms full / subtree | p99 within 10% | agree |\n| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |\n";

/// One row of [`markdown`]'s table.
pub fn markdown_row(r: &Row) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} | {} / {} | {} | {} |\n",
        r.members,
        r.loss,
        r.loss_model,
        r.repeats,
        r.spacing_ms,
        r.interval_ms,
        r.full.resyncs,
        r.subtree.resyncs,
        r.full.members_resynced,
        r.subtree.members_resynced,
        r.full.converged_ms_p99,
        r.subtree.converged_ms_p99,
        if p99_close(r.full.converged_ms_p99, r.subtree.converged_ms_p99) {
            "yes"
        } else {
            "no"
        },
        if r.agree { "yes" } else { "**no**" },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerances() {
        assert!(counts_agree(1_000, 1_099));
        assert!(!counts_agree(1_000, 1_200));
        assert!(counts_agree(36, 20), "small counts: 3·√36 + 3 = 21");
        assert!(!counts_agree(36, 1_106), "the issue's example");
        assert!(p99_agree(1_300, 400));
        assert!(!p99_agree(2_300, 1_000));
        assert!(p99_close(1_300, 1_200) && !p99_close(400, 780));
    }
}
