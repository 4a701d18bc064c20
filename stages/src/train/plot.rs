//! Training curves as PNGs. Drawn without text (plotters' font support needs
//! system libraries); the numbers are in `metrics.jsonl`.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Points<'a> = &'a [(f64, f64)];

/// Training loss (light blue) and validation loss (red) against the step, on
/// a white background; the y axis spans the values' range.
pub fn loss_curve(path: &Path, train: Points, val: Points) -> Result<()> {
    draw(path, (800, 500), |root| chart(root, &[(train, RGBColor(120, 160, 230).stroke_width(1)), (val, RED.stroke_width(3))]).map(|_| ()))
}

/// One small chart per series, in reading order, `columns` to a row; each
/// y axis spans its own series' range.
pub fn panels(path: &Path, series: &[Points], columns: usize) -> Result<()> {
    let columns = columns.clamp(1, series.len().max(1));
    let rows = series.len().div_ceil(columns).max(1);
    draw(path, (400 * columns as u32, 250 * rows as u32), |root| {
        for (area, points) in root.split_evenly((rows, columns)).iter().zip(series) {
            chart(area, &[(points, BLUE.stroke_width(2))])?;
        }
        Ok(())
    })
}

/// Several runs' curves on one chart, each in its own colour: the colour of
/// series `i` is [`colour`]`(i)`, which a legend elsewhere can name.
pub fn overlay(path: &Path, series: &[Points]) -> Result<()> {
    let lines: Vec<(Points, ShapeStyle)> = series.iter().enumerate().map(|(i, s)| (*s, colour(i).stroke_width(2))).collect();
    draw(path, (800, 500), |root| chart(root, &lines).map(|_| ()))
}

/// Measured points (black dots) and a fitted curve (red) through them.
pub fn fit(path: &Path, points: Points, curve: Points) -> Result<()> {
    draw(path, (800, 500), |root| {
        // The points go in as an invisible line so the axes span them too.
        let mut chart = chart(root, &[(curve, RED.stroke_width(2)), (points, TRANSPARENT.stroke_width(1))])?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 5, BLACK.filled())))?;
        Ok(())
    })
}

/// The colours of [`overlay`], in order, with their names (matplotlib's tab10).
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

fn draw(path: &Path, size: (u32, u32), paint: impl FnOnce(&Area) -> Result<(), Box<dyn std::error::Error>>) -> Result<()> {
    let run = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE)?;
        paint(&root)?;
        root.present()?;
        Ok(())
    };
    run().map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// A framed chart of `lines` in `area`.
fn chart<'a, 'b>(area: &'a Area<'b>, lines: &[(Points, ShapeStyle)]) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let points = || lines.iter().flat_map(|(p, _)| p.iter()).filter(|(_, y)| y.is_finite());
    let (x_min, x_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (x_min, x_max) = if x_min < x_max {
        (x_min - 0.02 * (x_max - x_min), x_max + 0.02 * (x_max - x_min))
    } else if x_min.is_finite() {
        (x_min - 0.5, x_min + 0.5)
    } else {
        (0.0, 1.0)
    };
    let (y_min, y_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y_min, y_max) = match (y_min, y_max) {
        // A margin, so a point on the edge is drawn whole.
        (lo, hi) if lo < hi => (lo - 0.03 * (hi - lo), hi + 0.03 * (hi - lo)),
        (y, _) if y.is_finite() => (y - 0.5, y + 0.5), // a constant series
        _ => (0.0, 1.0),
    };
    let mut chart = ChartBuilder::on(area).margin(20).build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart.plotting_area().draw(&Rectangle::new([(x_min, y_min), (x_max, y_max)], BLACK.stroke_width(1)))?;
    for (points, style) in lines {
        chart.draw_series(LineSeries::new(points.iter().copied(), *style))?;
    }
    Ok(chart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (1..100).map(|s| (s as f64, 5.0 / (s as f64).sqrt())).collect();
        loss_curve(&path, &train, &[(50.0, 1.0), (99.0, 0.8)]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
        let path = dir.path().join("panels.png");
        panels(&path, &[&train, &[(1.0, 2.0), (2.0, 2.0)], &[]], 2).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // Width and height in the IHDR chunk: two columns, two rows.
        assert_eq!((&png[16..20], &png[20..24]), (&800u32.to_be_bytes()[..], &500u32.to_be_bytes()[..]));
    }
}
