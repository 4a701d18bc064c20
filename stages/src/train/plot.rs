//! The loss curve as a PNG. Drawn without text (plotters' font support needs
//! system libraries); the numbers are in `metrics.jsonl`.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// Training loss (light blue) and validation loss (red) against the step, on
/// a white background; the y axis spans the values' range.
pub fn loss_curve(path: &Path, train: &[(f64, f64)], val: &[(f64, f64)]) -> Result<()> {
    let points = || train.iter().chain(val).filter(|(_, y)| y.is_finite());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let (y_min, y_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let (y_min, y_max) = if y_min < y_max { (y_min, y_max) } else { (0.0, 1.0) };
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root).margin(20).build_cartesian_2d(0.0..x_max, y_min..y_max)?;
        chart.plotting_area().draw(&Rectangle::new([(0.0, y_min), (x_max, y_max)], BLACK.stroke_width(1)))?;
        chart.draw_series(LineSeries::new(train.iter().copied(), RGBColor(120, 160, 230).stroke_width(1)))?;
        chart.draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(3)))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<(f64, f64)> = (1..100).map(|s| (s as f64, 5.0 / (s as f64).sqrt())).collect();
        loss_curve(&path, &train, &[(50.0, 1.0), (99.0, 0.8)]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }
}
