//! Charts as PNGs: training curves, panels of metrics, runs overlaid, a fit,
//! grouped bars. Every chart has a title, axes named with their units, tick
//! labels and, where it holds more than one series, a legend; the text is
//! drawn with the DejaVu Sans font compiled into the binary (`fonts/`), so
//! no system font is needed. Each chart is a [`Figure`], drawn by one
//! function on any plotters backend: PNG for the artifacts, SVG in the tests
//! (whose text elements show that the labels are there).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

type Points<'a> = &'a [(f64, f64)];
type Failure = Box<dyn std::error::Error>;

/// What a chart says of itself: its title and its axes' names, with units.
#[derive(Clone, Copy, Debug)]
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// A chart, before it is drawn.
enum Figure<'a> {
    /// Named lines on one pair of axes; `dots` drawn as points; with
    /// `log_x`, x holds log10 values and the ticks show the powers.
    Lines { labels: Labels<'a>, lines: Vec<(&'a str, Points<'a>, ShapeStyle)>, dots: Option<(&'a str, Points<'a>)>, log_x: bool },
    /// One small chart per series, `columns` to a row.
    Panels { panels: &'a [(Labels<'a>, Points<'a>)], columns: usize },
    /// One group of bars per entry of `groups`, one bar per series.
    Bars { labels: Labels<'a>, groups: &'a [String], series: &'a [String], values: &'a [Vec<Option<f64>>] },
}

/// Training loss (light blue) and the validation metric (red) against the step.
pub fn loss_curve(path: &Path, labels: Labels, train: Points, val: (&str, Points)) -> Result<()> {
    let lines = vec![("training loss", train, RGBColor(120, 160, 230).stroke_width(1)), (val.0, val.1, RED.stroke_width(3))];
    save(path, &Figure::Lines { labels, lines, dots: None, log_x: false })
}

/// One small chart per metric, in reading order, `columns` to a row; each
/// y axis spans its own series' range.
pub fn panels(path: &Path, panels: &[(Labels, Points)], columns: usize) -> Result<()> {
    save(path, &Figure::Panels { panels, columns: columns.clamp(1, panels.len().max(1)) })
}

/// Several runs' curves on one chart, each in its own colour ([`colour`]),
/// named in the legend.
pub fn overlay(path: &Path, labels: Labels, runs: &[(&str, Points)]) -> Result<()> {
    let lines = runs.iter().enumerate().map(|(i, (name, points))| (*name, *points, colour(i).stroke_width(2))).collect();
    save(path, &Figure::Lines { labels, lines, dots: None, log_x: false })
}

/// Measured points (black dots) and a fitted curve (red) through them, x
/// on a log axis: both take log10 of x.
pub fn fit(path: &Path, labels: Labels, points: (&str, Points), curve: (&str, Points)) -> Result<()> {
    let lines = vec![(curve.0, curve.1, RED.stroke_width(2))];
    save(path, &Figure::Lines { labels, lines, dots: Some(points), log_x: true })
}

/// Grouped bars: a group per name in `groups`, in each a bar per series
/// (missing values leave a gap) in the colours of [`colour`], a line at 0.
pub fn bars(path: &Path, labels: Labels, groups: &[String], series: &[String], values: &[Vec<Option<f64>>]) -> Result<()> {
    save(path, &Figure::Bars { labels, groups, series, values })
}

/// The colours of the series, in order, with their names (matplotlib's tab10).
pub const COLOURS: [(&str, RGBColor); 8] = [
    ("blue", RGBColor(31, 119, 180)),
    ("orange", RGBColor(255, 127, 14)),
    ("green", RGBColor(44, 160, 44)),
    ("red", RGBColor(214, 39, 40)),
    ("purple", RGBColor(148, 103, 189)),
    ("brown", RGBColor(140, 86, 75)),
    ("pink", RGBColor(227, 119, 194)),
    ("grey", RGBColor(127, 127, 127)),
];

/// Series `i`'s colour; the list repeats after eight.
pub fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()].1
}

const FONT: &str = "sans-serif";

fn register_font() {
    static FONT_ONCE: Once = Once::new();
    FONT_ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../fonts/DejaVuSans.ttf");
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| ()).expect("the shipped font parses");
    });
}

impl Figure<'_> {
    fn size(&self) -> (u32, u32) {
        match self {
            Figure::Lines { .. } => (900, 560),
            Figure::Panels { panels, columns } => (440 * *columns as u32, 300 * panels.len().div_ceil(*columns).max(1) as u32),
            Figure::Bars { groups, series, .. } => (200 + (40 + 28 * series.len() as u32) * groups.len() as u32, 520),
        }
    }

    /// Draws the figure on `root`.
    fn paint<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), Failure>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE)?;
        match self {
            Figure::Lines { labels, lines, dots, log_x } => {
                let all: Vec<(f64, f64)> =
                    lines.iter().flat_map(|l| l.1.iter()).chain(dots.iter().flat_map(|d| d.1.iter())).copied().collect();
                let (xs, ys) = ranges(&all);
                let mut chart = frame(root, labels, xs, ys, 22)?;
                let powers = |x: &f64| format!("{:.0e}", 10f64.powf(*x));
                let mut mesh = chart.configure_mesh();
                mesh.x_desc(labels.x).y_desc(labels.y).label_style((FONT, 15)).axis_desc_style((FONT, 17));
                if *log_x {
                    mesh.x_label_formatter(&powers);
                } else {
                    mesh.x_label_formatter(&tick);
                }
                mesh.draw()?;
                for (name, points, style) in lines {
                    let style = *style;
                    chart
                        .draw_series(LineSeries::new(points.iter().copied().filter(|p| p.1.is_finite()), style))?
                        .label(*name)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
                }
                if let Some((name, points)) = dots {
                    chart
                        .draw_series(points.iter().map(|&p| Circle::new(p, 5, BLACK.filled())))?
                        .label(*name)
                        .legend(|(x, y)| Circle::new((x + 12, y), 5, BLACK.filled()));
                }
                legend(&mut chart)?;
            }
            Figure::Panels { panels, columns } => {
                let rows = panels.len().div_ceil(*columns).max(1);
                for (area, (labels, points)) in root.split_evenly((rows, *columns)).iter().zip(panels.iter()) {
                    let (xs, ys) = ranges(points);
                    let mut chart = frame(area, labels, xs, ys, 16)?;
                    chart
                        .configure_mesh()
                        .x_desc(labels.x)
                        .y_desc(labels.y)
                        .x_label_formatter(&tick)
                        .label_style((FONT, 12))
                        .axis_desc_style((FONT, 13))
                        .draw()?;
                    chart.draw_series(LineSeries::new(points.iter().copied().filter(|p| p.1.is_finite()), BLUE.stroke_width(2)))?;
                }
            }
            Figure::Bars { labels, groups, series, values } => {
                let finite = || values.iter().flatten().flatten().copied().filter(|v| v.is_finite());
                let (lo, hi) = (finite().fold(0.0, f64::min), finite().fold(0.0, f64::max));
                let pad = ((hi - lo) * 0.08).max(0.01);
                let ys = (if lo < 0.0 { lo - pad } else { 0.0 }, hi + pad);
                let mut chart = frame(root, labels, (0.0, groups.len() as f64), ys, 20)?;
                chart
                    .configure_mesh()
                    .x_desc(labels.x)
                    .y_desc(labels.y)
                    .x_labels(0)
                    .disable_x_mesh()
                    .label_style((FONT, 14))
                    .axis_desc_style((FONT, 16))
                    .draw()?;
                // Each group's name under its middle, where an x tick label would stand.
                let below = TextStyle::from((FONT, 13)).pos(Pos::new(HPos::Center, VPos::Top));
                for (g, group) in groups.iter().enumerate() {
                    let (x, y) = chart.backend_coord(&(g as f64 + 0.5, ys.0));
                    root.draw(&Text::new(group.as_str(), (x, y + 6), below.clone()))?;
                }
                let width = 0.8 / series.len().max(1) as f64;
                for (s, series_name) in series.iter().enumerate() {
                    let bars = values.iter().enumerate().filter_map(|(g, group)| {
                        let v = group.get(s).copied().flatten().filter(|v| v.is_finite())?;
                        let x0 = g as f64 + 0.1 + s as f64 * width;
                        Some(Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], colour(s).filled()))
                    });
                    chart
                        .draw_series(bars)?
                        .label(series_name.as_str())
                        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], colour(s).filled()));
                }
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(0.0, 0.0), (groups.len() as f64, 0.0)], BLACK.stroke_width(1))))?;
                legend(&mut chart)?;
            }
        }
        root.present()?;
        Ok(())
    }
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// A chart titled and framed in `area`, spanning `xs` by `ys`, with room for tick labels.
fn frame<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    labels: &Labels,
    xs: (f64, f64),
    ys: (f64, f64),
    title_size: u32,
) -> Result<Chart<'a, DB>, Failure>
where
    DB::ErrorType: 'static,
{
    register_font();
    Ok(ChartBuilder::on(area)
        .caption(labels.title, (FONT, title_size))
        .margin(12)
        .x_label_area_size(title_size * 2 + 6)
        .y_label_area_size(title_size * 3 + 20)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?)
}

/// The legend, top right, when the chart names its series.
fn legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>) -> Result<(), Failure>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 15))
        .draw()?;
    Ok(())
}

/// An x tick label: steps print as whole numbers, not `20.0`.
fn tick(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}").trim_end_matches('0').to_string()
    }
}

/// The x and y ranges of `points` (non-finite y left out), with a margin so
/// a point on the edge is drawn whole.
fn ranges(points: &[(f64, f64)]) -> ((f64, f64), (f64, f64)) {
    let finite = || points.iter().filter(|(_, y)| y.is_finite());
    let span = |lo: f64, hi: f64, margin: f64| {
        if lo < hi {
            (lo - margin * (hi - lo), hi + margin * (hi - lo))
        } else if lo.is_finite() {
            (lo - 0.5, lo + 0.5) // a constant series
        } else {
            (0.0, 1.0)
        }
    };
    let (x_lo, x_hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (y_lo, y_hi) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    (span(x_lo, x_hi, 0.02), span(y_lo, y_hi, 0.05))
}

fn save(path: &Path, figure: &Figure) -> Result<()> {
    let root = BitMapBackend::new(path, figure.size()).into_drawing_area();
    figure.paint(&root).map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

#[cfg(test)]
fn svg(figure: &Figure) -> String {
    let mut text = String::new();
    figure.paint(&SVGBackend::with_string(&mut text, figure.size()).into_drawing_area()).unwrap();
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of an SVG's `<text>` elements.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
    }

    fn has(texts: &[String], wanted: &str) -> bool {
        texts.iter().any(|t| t == wanted)
    }

    #[test]
    fn every_chart_has_a_title_named_axes_ticks_and_a_legend() {
        let labels = Labels { title: "pretrain: loss", x: "step", y: "loss (nats/token)" };
        let train: Vec<(f64, f64)> = (1..100).map(|s| (s as f64, 5.0 / (s as f64).sqrt())).collect();
        let val = [(50.0, 1.0), (99.0, 0.8)];
        let lines = vec![("training loss", &train[..], BLUE.stroke_width(1)), ("validation loss", &val[..], RED.stroke_width(3))];
        let t = texts(&svg(&Figure::Lines { labels, lines, dots: None, log_x: false }));
        for wanted in ["pretrain: loss", "step", "loss (nats/token)", "training loss", "validation loss", "20", "40", "60", "80"] {
            assert!(has(&t, wanted), "no `{wanted}` in {t:?}");
        }

        let fitted = [(15.0, 3.0), (16.0, 2.5)];
        let curve = [(15.0, 3.1), (15.5, 2.7), (16.0, 2.45)];
        let labels = Labels { title: "loss against compute", x: "training compute (FLOPs, log scale)", y: "val_loss" };
        let lines = vec![("fit", &curve[..], RED.stroke_width(2))];
        let t = texts(&svg(&Figure::Lines { labels, lines, dots: Some(("runs", &fitted)), log_x: true }));
        for wanted in ["training compute (FLOPs, log scale)", "fit", "runs", "1e15", "1e16"] {
            assert!(has(&t, wanted), "no `{wanted}` in {t:?}");
        }

        let panels = [
            (Labels { title: "reward", x: "iteration", y: "mean reward" }, &train[..]),
            (Labels { title: "kl", x: "iteration", y: "nats" }, &val[..]),
        ];
        let t = texts(&svg(&Figure::Panels { panels: &panels, columns: 2 }));
        for wanted in ["reward", "kl", "iteration", "mean reward", "nats"] {
            assert!(has(&t, wanted), "no `{wanted}` in {t:?}");
        }

        let (groups, series) = (vec!["arc_easy".to_string(), "copa".to_string()], vec!["pretrain".to_string(), "sft".to_string()]);
        let values = vec![vec![Some(0.1), Some(-0.05)], vec![None, Some(0.2)]];
        let labels = Labels { title: "centered score per task", x: "task", y: "centered score" };
        let t = texts(&svg(&Figure::Bars { labels, groups: &groups, series: &series, values: &values }));
        for wanted in ["centered score per task", "task", "centered score", "arc_easy", "copa", "pretrain", "sft"] {
            assert!(has(&t, wanted), "no `{wanted}` in {t:?}");
        }
    }

    #[test]
    fn writes_pngs_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (1..100).map(|s| (s as f64, 5.0 / (s as f64).sqrt())).collect();
        let labels = Labels { title: "loss", x: "step", y: "loss (nats/token)" };
        loss_curve(&path, labels, &train, ("validation loss", &[(50.0, 1.0), (99.0, 0.8)])).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        let path = dir.path().join("panels.png");
        let panel = |title| (Labels { title, x: "step", y: "value" }, &train[..]);
        panels(&path, &[panel("a"), panel("b"), panel("c")], 2).unwrap();
        let png = std::fs::read(&path).unwrap();
        // Width and height in the IHDR chunk: two columns, two rows.
        assert_eq!((&png[16..20], &png[20..24]), (&880u32.to_be_bytes()[..], &600u32.to_be_bytes()[..]));
    }
}
