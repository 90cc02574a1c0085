//! `netsim sweep`: batch costs over a grid of degrees and batch sizes, to CSV and to an SVG and
//! a PNG plot (plotters) with titled axes, next to a flat key star (n − ℓ) and ℓ · log2 n: the
//! Micciancio–Panjwani floor for ℓ changes, and the public-key encryptions of ℓ TreeKEM removes
//! (RFC 9420 §7: one HPKE encryption per copath node, each 80 bytes).

use std::fmt::Write as _;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cost::{self, CostError, Scheme};
use crate::plot::{self, PlotError};

/// One grid cell.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// Degree.
    pub degree: u8,
    /// Leaves per batch.
    pub leaves: usize,
    /// Mean encryptions over the trials.
    pub encryptions_mean: f64,
    /// Standard deviation.
    pub encryptions_stddev: f64,
}

/// Runs the grid; `progress` is called after each cell with (done, total).
pub fn run(
    members: usize,
    degrees: &[u8],
    leaves: &[usize],
    trials: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Cell>, CostError> {
    let total = degrees.len() * leaves.len();
    let mut cells = Vec::with_capacity(total);
    for &degree in degrees {
        for &l in leaves {
            let c = cost::batch(members, degree, l, 0, trials, Scheme::Group, seed)?;
            cells.push(Cell {
                degree,
                leaves: l,
                encryptions_mean: c.encryptions_mean,
                encryptions_stddev: c.encryptions_stddev,
            });
            progress(cells.len(), total);
        }
    }
    Ok(cells)
}

/// One cell of an interval sweep: rekeying cost per second at a churn rate.
#[derive(Clone, Debug, PartialEq)]
pub struct IntervalCell {
    /// Batch interval, ms.
    pub interval_ms: u64,
    /// Departures (and as many joins) per batch at the given rate.
    pub changes: usize,
    /// Mean encryptions per batch.
    pub encryptions_mean: f64,
    /// Encryptions per second of group life.
    pub encryptions_per_s: f64,
}

/// Rekeying cost per second when `rate` members leave and `rate` join per second, for each
/// batch interval: one batch of `rate · interval` leaves and as many joins per interval, on a
/// balanced tree of `members` (`trials` trials each).
pub fn run_intervals(
    members: usize,
    degree: u8,
    rate: f64,
    intervals_ms: &[u64],
    trials: usize,
    seed: u64,
) -> Result<Vec<IntervalCell>, CostError> {
    intervals_ms
        .iter()
        .map(|&interval_ms| {
            let per_batch = rate * interval_ms as f64 / 1_000.0;
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a small, non-negative count"
            )]
            let changes = (per_batch.round() as usize).clamp(1, members / 2);
            let c = cost::batch(
                members,
                degree,
                changes,
                changes,
                trials,
                Scheme::Group,
                seed,
            )?;
            Ok(IntervalCell {
                interval_ms,
                changes,
                encryptions_mean: c.encryptions_mean,
                encryptions_per_s: c.encryptions_mean * 1_000.0 / interval_ms as f64,
            })
        })
        .collect()
}

/// An interval sweep as CSV.
pub fn intervals_csv(members: usize, degree: u8, rate: f64, cells: &[IntervalCell]) -> String {
    let mut out = String::from(
        "members,degree,rate_per_s,interval_ms,changes_per_batch,encryptions_mean,encryptions_per_s\n",
    );
    for c in cells {
        let _ = writeln!(
            out,
            "{members},{degree},{rate},{},{},{:.3},{:.3}",
            c.interval_ms, c.changes, c.encryptions_mean, c.encryptions_per_s
        );
    }
    out
}

/// The cells as CSV with a header line.
pub fn csv(members: usize, cells: &[Cell]) -> String {
    let mut out = String::from(
        "members,degree,leaves,encryptions_mean,encryptions_stddev,key_star,mp_floor\n",
    );
    for c in cells {
        let star = members.saturating_sub(c.leaves);
        let floor = c.leaves as f64 * (members as f64).log2();
        let _ = writeln!(
            out,
            "{members},{},{},{:.3},{:.3},{star},{floor:.1}",
            c.degree, c.leaves, c.encryptions_mean, c.encryptions_stddev
        );
    }
    out
}

/// Draws encryptions against batch size (both axes logarithmic), one line per degree, to `path`
/// (SVG) and to the same path with a `.png` extension.
pub fn svg(path: &Path, members: usize, cells: &[Cell]) -> Result<(), PlotError> {
    plot::fonts();
    draw(&plot::svg(path), members, cells)?;
    plot::png(&path.with_extension("png"), |root| {
        draw(root, members, cells)
    })
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    members: usize,
    cells: &[Cell],
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let max_leaves = cells.iter().map(|c| c.leaves).max().unwrap_or(1) as f64;
    let max_y = cells
        .iter()
        .map(|c| c.encryptions_mean)
        .fold(members as f64, f64::max);
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Batch rekeying cost, n = {members} (netsim, group-oriented LKH)"),
            plot::caption(),
        )
        .margin(plot::MARGIN)
        .x_label_area_size(plot::X_LABELS)
        .y_label_area_size(plot::Y_LABELS)
        .build_cartesian_2d(
            (1f64..max_leaves).log_scale(),
            (1f64..max_y * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("departing members per batch (ℓ)")
        .y_desc("encryptions per batch")
        .label_style(plot::label())
        .axis_desc_style(plot::label())
        .draw()?;
    let palette = [&RED, &BLUE, &GREEN, &MAGENTA, &CYAN, &BLACK];
    let mut degrees: Vec<u8> = cells.iter().map(|c| c.degree).collect();
    degrees.dedup();
    for (i, degree) in degrees.iter().enumerate() {
        let color = palette[i % palette.len()];
        let points: Vec<(f64, f64)> = cells
            .iter()
            .filter(|c| c.degree == *degree)
            .map(|c| (c.leaves as f64, c.encryptions_mean.max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(format!("LKH, d = {degree}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 40, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 6, color.filled())),
        )?;
    }
    let xs: Vec<f64> = {
        let mut v: Vec<f64> = cells.iter().map(|c| c.leaves as f64).collect();
        v.sort_by(f64::total_cmp);
        v.dedup();
        v
    };
    let star: Vec<(f64, f64)> = xs
        .iter()
        .map(|&l| (l, (members as f64 - l).max(1.0)))
        .collect();
    chart
        .draw_series(LineSeries::new(star, BLACK.stroke_width(3)))?
        .label("flat key star (n − ℓ)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 40, y)], BLACK.stroke_width(3)));
    let floor: Vec<(f64, f64)> = xs
        .iter()
        .map(|&l| (l, l * (members as f64).log2()))
        .collect();
    let grey = RGBColor(128, 128, 128);
    chart
        .draw_series(LineSeries::new(floor, grey.stroke_width(3)))?
        .label("ℓ · log2 n: MP floor; TreeKEM public-key encryptions for ℓ removes")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 40, y)], grey.stroke_width(3)));
    chart
        .configure_series_labels()
        .legend_area_size(60)
        .label_font(plot::label())
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longer_intervals_cost_fewer_encryptions_per_second() {
        let cells = run_intervals(1024, 4, 20.0, &[100, 1_000, 10_000], 3, 1).unwrap();
        assert_eq!(cells.len(), 3);
        assert!(
            cells[0].encryptions_per_s > cells[2].encryptions_per_s,
            "{cells:?}"
        );
        assert!(intervals_csv(1024, 4, 20.0, &cells).lines().count() == 4);
    }

    #[test]
    fn a_small_sweep_writes_csv_and_svg() {
        let cells = run(256, &[2, 4], &[1, 4, 16], 2, 1, |_, _| {}).unwrap();
        assert_eq!(cells.len(), 6);
        let text = csv(256, &cells);
        assert_eq!(text.lines().count(), 7);
        assert!(text.starts_with("members,degree,leaves"));
        let path = std::env::temp_dir().join(format!("netsim-sweep-{}.svg", std::process::id()));
        svg(&path, 256, &cells).unwrap();
        let drawn = std::fs::read_to_string(&path).unwrap();
        assert!(drawn.contains("<svg") && drawn.contains("encryptions per batch"));
        let png = std::fs::read(path.with_extension("png")).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG next to the SVG");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("png"));
    }
}
