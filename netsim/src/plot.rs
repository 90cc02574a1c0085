//! Figures, each as an SVG and a PNG side by side, readable on a slide: 1,600 × 1,000 pixels,
//! 44-pixel titles, 30-pixel labels, 3-pixel lines. Text in the PNGs is drawn with DejaVu Sans,
//! checked in under `netsim/fonts/` with its licence (Bitstream Vera; DejaVu's changes are in the
//! public domain), so that a fresh machine needs no system font; plotters' bitmap backend draws
//! text with `ab_glyph` from that file. The SVGs name the same family and leave it to the viewer.
//!
//! The figures of issue 17: [`agree`] (both receiver models' resyncs against loss) and
//! [`accounting`] (gkm's and the paper's encryptions per batch against J/ℓ).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cost::{self, Accounting, Scheme};
use crate::paper;

/// Any error of a figure (plotters' drawing errors, a font that does not load, a cost run).
pub type PlotError = Box<dyn std::error::Error>;

/// Pixels of every figure.
pub const SIZE: (u32, u32) = (1_600, 1_000);
/// Margin around the chart, pixels.
pub const MARGIN: u32 = 30;
/// Height of the x axis' label area, pixels.
pub const X_LABELS: u32 = 90;
/// Width of the y axis' label area, pixels.
pub const Y_LABELS: u32 = 130;

static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Registers the checked-in font as `sans-serif` (once; before any drawing).
pub fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The file is checked in and known to parse; a failure would show as missing text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// The title font.
pub fn caption() -> TextStyle<'static> {
    ("sans-serif", 44).into_font().into()
}

/// The label font.
pub fn label() -> TextStyle<'static> {
    ("sans-serif", 30).into_font().into()
}

/// An SVG drawing area at [`SIZE`].
pub fn svg(path: &Path) -> DrawingArea<SVGBackend<'_>, Shift> {
    SVGBackend::new(path, SIZE).into_drawing_area()
}

/// Draws on an RGB bitmap at [`SIZE`] and writes it to `path` as a PNG (encoded by the `png`
/// crate: plotters' own encoder would bring the whole `image` crate).
pub fn png(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), PlotError>,
) -> Result<(), PlotError> {
    let (w, h) = SIZE;
    let mut pixels = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = ::png::Encoder::new(file, w, h);
    encoder.set_color(::png::ColorType::Rgb);
    encoder.set_depth(::png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&pixels)?;
    Ok(())
}

/// One point of [`agree`]: a loss, a loss model's name, both models' resyncs.
#[derive(Clone, Debug, PartialEq)]
pub struct AgreePoint {
    /// Loss per datagram and receiver.
    pub loss: f64,
    /// `bernoulli` or `gilbert-elliott`.
    pub model: String,
    /// Resyncs with full receivers.
    pub full: u64,
    /// Resyncs in the subtree model.
    pub subtree: u64,
}

/// Resyncs against loss, full receivers (solid, dots) and the subtree model (dashed, triangles), one
/// colour per loss model; `title` says which cell of the grid. Writes `stem.svg` and `stem.png`.
pub fn agree(stem: &Path, title: &str, points: &[AgreePoint]) -> Result<(), PlotError> {
    fonts();
    draw_agree(&svg(&stem.with_extension("svg")), title, points)?;
    png(&stem.with_extension("png"), |root| {
        draw_agree(root, title, points)
    })
}

fn draw_agree<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[AgreePoint],
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let max_loss = points.iter().map(|p| p.loss).fold(0.01, f64::max);
    let max_y = points
        .iter()
        .map(|p| p.full.max(p.subtree))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let mut chart = ChartBuilder::on(root)
        .caption(title, caption())
        .margin(MARGIN)
        .x_label_area_size(X_LABELS)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0f64..max_loss * 1.05, 0f64..max_y * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("loss per datagram and receiver")
        .y_desc("resyncs")
        .label_style(label())
        .axis_desc_style(label())
        .draw()?;
    let mut models: Vec<&str> = points.iter().map(|p| p.model.as_str()).collect();
    models.sort_unstable();
    models.dedup();
    for (i, model) in models.iter().enumerate() {
        let color = [BLUE, RED, GREEN][i % 3];
        let mut series: Vec<&AgreePoint> = points.iter().filter(|p| p.model == *model).collect();
        series.sort_by(|a, b| a.loss.total_cmp(&b.loss));
        let full: Vec<(f64, f64)> = series.iter().map(|p| (p.loss, p.full as f64)).collect();
        let subtree: Vec<(f64, f64)> = series.iter().map(|p| (p.loss, p.subtree as f64)).collect();
        chart
            .draw_series(LineSeries::new(full.clone(), color.stroke_width(4)))?
            .label(format!("full receivers, {model}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 40, y)], color.stroke_width(4))
            });
        chart.draw_series(full.iter().map(|&p| Circle::new(p, 9, color.filled())))?;
        chart
            .draw_series(DashedLineSeries::new(
                subtree.clone(),
                14,
                8,
                color.stroke_width(3),
            ))?
            .label(format!("subtree model, {model}"))
            .legend(move |(x, y)| TriangleMarker::new((x + 20, y), 10, color.filled()));
        chart.draw_series(
            subtree
                .iter()
                .map(|&p| TriangleMarker::new(p, 12, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .legend_area_size(60)
        .label_font(label())
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A line of [`accounting`]: its name, colour and value.
type Series = (&'static str, RGBColor, fn(&AccountingPoint) -> f64);

/// One point of [`accounting`]: joins per batch and the means.
#[derive(Clone, Debug, PartialEq)]
pub struct AccountingPoint {
    /// Joins in the batch.
    pub joins: usize,
    /// gkm's multicast encryptions (measured).
    pub gkm: f64,
    /// The paper's count of the same rekeys (measured).
    pub paper: f64,
    /// The paper's expectation ([`paper::expected_batch_paper`]).
    pub expected: f64,
    /// Keys gkm sends joiners by unicast (measured).
    pub unicast: f64,
}

/// Measures gkm's and the paper's accounting on `members` (a full tree, d = 4) with `leaves`
/// departures and each of `joins`.
pub fn accounting_points(
    members: usize,
    leaves: usize,
    joins: &[usize],
    trials: usize,
    seed: u64,
) -> Result<Vec<AccountingPoint>, PlotError> {
    let degree = 4u8;
    let mut height = 0u32;
    while 4usize.saturating_pow(height) < members {
        height += 1;
    }
    joins
        .iter()
        .map(|&j| {
            let b = cost::batch_counted(
                members,
                degree,
                (leaves, j),
                trials,
                Scheme::Group,
                seed,
                Accounting::Gkm,
            )?;
            let expected = paper::expected_batch_paper(degree, height, leaves as u64, j as u64)
                .unwrap_or(f64::NAN);
            Ok(AccountingPoint {
                joins: j,
                gkm: b.gkm_encryptions_mean,
                paper: b.paper_encryptions_mean,
                expected,
                unicast: b.unicast_keys_mean,
            })
        })
        .collect()
}

/// Encryptions per batch against J/ℓ: gkm's multicast, the paper's count (measured and
/// expected) and gkm's unicast keys. Writes `stem.svg` and `stem.png`.
pub fn accounting(
    stem: &Path,
    members: usize,
    leaves: usize,
    points: &[AccountingPoint],
) -> Result<(), PlotError> {
    fonts();
    draw_accounting(&svg(&stem.with_extension("svg")), members, leaves, points)?;
    png(&stem.with_extension("png"), |root| {
        draw_accounting(root, members, leaves, points)
    })
}

fn draw_accounting<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    members: usize,
    leaves: usize,
    points: &[AccountingPoint],
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let l = leaves.max(1) as f64;
    let max_x = points
        .iter()
        .map(|p| p.joins as f64 / l)
        .fold(0.1, f64::max);
    let max_y = points
        .iter()
        .map(|p| p.gkm.max(p.paper).max(p.unicast).max(p.expected))
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Encryptions per batch, n = {members}, d = 4, ℓ = {leaves}"),
            caption(),
        )
        .margin(MARGIN)
        .x_label_area_size(X_LABELS)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0f64..max_x * 1.02, 0f64..max_y * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("joins per departure (J / ℓ)")
        .y_desc("encryptions (keys) per batch")
        .label_style(label())
        .axis_desc_style(label())
        .draw()?;
    let grey = RGBColor(110, 110, 110);
    let series: [Series; 4] = [
        ("gkm: multicast encryptions", BLUE, |p| p.gkm),
        ("Li et al.'s count of the same rekeys", RED, |p| p.paper),
        ("Li et al.'s expectation (paper.rs)", grey, |p| p.expected),
        ("gkm: path keys sent to joiners by unicast", GREEN, |p| {
            p.unicast
        }),
    ];
    for (name, color, value) in series {
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.joins as f64 / l, value(p)))
            .filter(|(_, y)| y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(4)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 40, y)], color.stroke_width(4))
            });
        chart.draw_series(line.iter().map(|&p| Circle::new(p, 8, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .legend_area_size(60)
        .label_font(label())
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
    fn both_figures_write_an_svg_and_a_png_with_their_text() {
        let dir = std::env::temp_dir().join(format!("netsim-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let points = vec![
            AgreePoint {
                loss: 0.0,
                model: "bernoulli".into(),
                full: 0,
                subtree: 0,
            },
            AgreePoint {
                loss: 0.2,
                model: "bernoulli".into(),
                full: 100,
                subtree: 95,
            },
        ];
        agree(&dir.join("agree"), "resyncs", &points).unwrap();
        let rows = accounting_points(256, 16, &[0, 16, 32], 2, 1).unwrap();
        assert!(rows[2].paper > rows[2].gkm, "{rows:?}");
        accounting(&dir.join("accounting"), 256, 16, &rows).unwrap();
        for (stem, text) in [("agree", "subtree model"), ("accounting", "J / ℓ")] {
            let svg = std::fs::read_to_string(dir.join(stem).with_extension("svg")).unwrap();
            assert!(svg.contains(text), "{stem}");
            let png = std::fs::read(dir.join(stem).with_extension("png")).unwrap();
            assert!(png.starts_with(b"\x89PNG") && png.len() > 20_000, "{stem}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
