//! `report.png`: latency percentiles per mode (left) and mesh memory against tasks per
//! host (right). Text is drawn with DejaVu Sans (Debian's fonts-dejavu-core, installed by
//! `cargo xtask setup`), registered with plotters at run time.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use super::{
    MODES, SweepCell,
    report::{Agg, MIB},
};
use crate::setup::PLOT_FONT;

/// One colour per mode, in `MODES` order (direct, node, node-http, sidecar, peer,
/// node-base).
const COLORS: [RGBColor; super::MODES.len()] = [
    RGBColor(90, 90, 90),
    RGBColor(0, 114, 178),
    RGBColor(86, 180, 233),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
];

fn register_font() -> Result<()> {
    let bytes = std::fs::read(PLOT_FONT).with_context(|| {
        format!("{PLOT_FONT}: the plot's font (fonts-dejavu-core; `cargo xtask setup`)")
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{PLOT_FONT}: not a usable font"))
}

pub fn draw(
    path: &Path,
    keep: &BTreeMap<String, BTreeMap<u64, Agg>>,
    sweep: &[SweepCell],
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(700);

    // Left: percentiles at the highest rate.
    let rate = keep
        .values()
        .flat_map(|r| r.keys().copied())
        .max()
        .unwrap_or(0);
    let series: Vec<(&str, [f64; 4])> = MODES
        .iter()
        .filter_map(|m| {
            keep.get(*m)
                .and_then(|r| r.get(&rate))
                .map(|a| (*m, [a.p50, a.p90, a.p99, a.p999]))
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(10.0f64, f64::max)
        * 1.5;
    let ymin = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, 1e6)
        * 0.7;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!("latency percentiles at {rate} req/s (1 KiB HTTP, keep-alive)"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3f64..3.3f64, (ymin..ymax).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    let names = ["p50", "p90", "p99", "p99.9"];
    chart
        .configure_mesh()
        .x_labels(8)
        .x_label_formatter(&|x| {
            let r = x.round();
            if (x - r).abs() < 0.05 && (0.0..=3.0).contains(&r) {
                names[r as usize].to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("µs (log scale)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (mode, values) in &series {
        let color = COLORS[super::mode_index(mode)];
        let points: Vec<(f64, f64)> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v.max(1.0)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(*mode)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    // Right: memory of the mesh processes (both instances) against tasks per host.
    let xmax = sweep.iter().map(|s| s.tasks_per_host).max().unwrap_or(1) as f64;
    let ymax = sweep
        .iter()
        .map(|s| s.memory.rss_bytes as f64 / MIB)
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "mesh memory (RSS, both hosts) vs tasks per host",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..xmax * 1.05, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("tasks per host")
        .y_desc("MiB")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for mode in ["node", "sidecar"] {
        let color = COLORS[super::mode_index(mode)];
        let mut points: Vec<(f64, f64)> = sweep
            .iter()
            .filter(|s| s.mode == mode)
            .map(|s| (s.tasks_per_host as f64, s.memory.rss_bytes as f64 / MIB))
            .collect();
        points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(mode)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
