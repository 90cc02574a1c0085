//! The subtree model held to the real members: both receiver models run on the same seed over a
//! few cells of issue 17's grid (small enough for a debug build), and the test fails if any cell
//! disagrees. The whole grid is `netsim agree` in release (results in `RFC-notes/netsim.md`).

use netsim::agree::{self, Grid, Row};
use netsim::churn::LossModel;

#[test]
fn both_models_agree_on_a_small_grid() {
    let grid = Grid {
        members: vec![500],
        losses: vec![0.05, 0.2],
        models: vec![LossModel::Bernoulli, LossModel::GilbertElliott],
        repeats: vec![2],
        spacings: vec![100],
        intervals: vec![1_000],
        duration_s: 15,
        rate: 3.0,
        seed: 2,
    };
    let mut configs = grid.configs();
    // One send, rekeys at once, back to back; two spaced sends, rekeys at once (a member learns
    // it missed one from the next rekey, while the repeat is still to come: the grace decides);
    // and three spaced sends under bursts.
    let mut at_once = configs[0].clone();
    (at_once.repeats, at_once.interval_ms, at_once.spacing_ms) = (1, 0, 0);
    let mut spaced = configs[0].clone();
    spaced.interval_ms = 0;
    let mut bursts = configs[3].clone();
    bursts.repeats = 3;
    configs.extend([at_once, spaced, bursts]);
    // The cells on threads of their own (each run is deterministic from its seed alone).
    let rows: Vec<Row> = std::thread::scope(|scope| {
        let runs: Vec<_> = configs
            .iter()
            .map(|c| scope.spawn(|| agree::compare(c).unwrap()))
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    });
    for r in &rows {
        assert_eq!((r.full.diverged, r.subtree.diverged), (0, 0), "{r:?}");
        assert!(r.full.resyncs > 0, "loss needs resyncs: {r:?}");
    }
    assert!(rows.iter().all(|r| r.agree), "{}", agree::markdown(&rows));
}
