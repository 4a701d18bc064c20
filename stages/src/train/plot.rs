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
    draw(path, (800, 500), |root| chart(root, &[(train, RGBColor(120, 160, 230).stroke_width(1)), (val, RED.stroke_width(3))]))
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

/// A framed chart of `lines` in `area`.
fn chart(area: &Area, lines: &[(Points, ShapeStyle)]) -> Result<(), Box<dyn std::error::Error>> {
    let points = || lines.iter().flat_map(|(p, _)| p.iter()).filter(|(_, y)| y.is_finite());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let (y_min, y_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y_min, y_max) = match (y_min, y_max) {
        (lo, hi) if lo < hi => (lo, hi),
        (y, _) if y.is_finite() => (y - 0.5, y + 0.5), // a constant series
        _ => (0.0, 1.0),
    };
    let mut chart = ChartBuilder::on(area).margin(20).build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    chart.plotting_area().draw(&Rectangle::new([(0.0, y_min), (x_max, y_max)], BLACK.stroke_width(1)))?;
    for (points, style) in lines {
        chart.draw_series(LineSeries::new(points.iter().copied(), *style))?;
    }
    Ok(())
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
