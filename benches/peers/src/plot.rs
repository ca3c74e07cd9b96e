//! The SVG plot: throughput relative to rvm (region) per workload, and
//! reopen times after the crash, both on log scales.

use crate::bank::{System, SYSTEMS};
use crate::{Results, WORKLOADS};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(114, 178, 224),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];

fn color(s: System) -> RGBColor {
    COLORS[SYSTEMS.iter().position(|x| *x == s).unwrap_or(0)]
}

/// Log-scale bounds that hold every value, in whole powers of ten, the
/// lower one below the smallest value (so its bar shows).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.filter(|v| *v > 0.0).fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(v), h.max(v)));
    if lo > hi {
        return (0.1, 10.0);
    }
    let bottom = (lo / 2.0).log10().floor();
    (10f64.powf(bottom), 10f64.powf(hi.log10().ceil().max(bottom + 1.0)))
}

pub fn draw(path: &Path, r: &Results) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = SVGBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (left, right) = root.split_horizontally(700);

    // Throughput, as ratios to rvm (region).
    let mut ratios = Vec::new();
    for (g, w) in WORKLOADS.iter().enumerate() {
        let base = r.median_rate(*w, System::Flat);
        for (i, s) in SYSTEMS.iter().enumerate() {
            if let (Some(v), Some(b)) = (r.median_rate(*w, *s), base) {
                ratios.push((g, i, *s, v / b));
            }
        }
    }
    let (lo, hi) = bounds(ratios.iter().map(|x| x.3));
    let mut chart = ChartBuilder::on(&left)
        .caption("Throughput relative to rvm (region), higher is better", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..WORKLOADS.len() as f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(WORKLOADS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let g = x.floor() as usize;
            if (x - g as f64 - 0.5).abs() < 0.01 && g < WORKLOADS.len() {
                WORKLOADS[g].short().to_string()
            } else {
                String::new()
            }
        })
        .y_desc("ratio (log scale)")
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    let width = 0.8 / SYSTEMS.len() as f64;
    for &s in SYSTEMS {
        let bars: Vec<_> = ratios
            .iter()
            .filter(|x| x.2 == s)
            .map(|&(g, i, _, v)| {
                let x0 = g as f64 + 0.1 + i as f64 * width;
                Rectangle::new([(x0, lo), (x0 + width * 0.9, v)], color(s).filled())
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(s.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color(s).filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    // Reopen after the crash, milliseconds.
    let phases = ["to first read", "all balances"];
    let mut times = Vec::new();
    for (i, s) in SYSTEMS.iter().enumerate() {
        if let Some((first, full)) = r.median_reopen(*s) {
            times.push((0, i, *s, first));
            times.push((1, i, *s, full));
        }
    }
    let (lo, hi) = bounds(times.iter().map(|x| x.3));
    let mut chart = ChartBuilder::on(&right)
        .caption("Reopen after a crash, ms, lower is better", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..phases.len() as f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(phases.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let g = x.floor() as usize;
            if (x - g as f64 - 0.5).abs() < 0.01 && g < phases.len() {
                phases[g].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("ms (log scale)")
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(times.iter().map(|&(g, i, s, v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            Rectangle::new([(x0, lo), (x0 + width * 0.9, v)], color(s).filled())
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
