//! `--plot FILE.svg`: a histogram of the tasks' total latency, with p50/p90/p99 marked.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::Report;

const BINS: usize = 40;

pub fn histogram(path: &Path, report: &Report, totals_ns: &[u64]) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<std::io::Error>| anyhow!("{e}");
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "caisson bench launch --kind {:?}: {} ({} tasks, {} at a time)",
        report.kind, report.target, report.count, report.concurrency
    )
    .to_lowercase();
    let Some(total) = report.phases.iter().find(|p| p.name == "total") else {
        // Nothing succeeded: an empty chart saying so, rather than no file.
        root.draw(&Text::new(
            format!("{title}: no successful task"),
            (20, 20),
            ("sans-serif", 18),
        ))
        .map_err(err)?;
        return root.present().map_err(err);
    };
    // Milliseconds unless the tasks are far shorter (Wasm).
    let (unit, scale) = if total.max_us >= 1000.0 {
        ("ms", 1e-6)
    } else {
        ("µs", 1e-3)
    };
    let xs: Vec<f64> = totals_ns.iter().map(|&v| v as f64 * scale).collect();
    let lo = total.min_us * 1e3 * scale;
    // A few slow outliers would squeeze every other task into one bar: past 1.5 x p99 they
    // are counted in the last bar, and the caption says how many.
    let max = total.max_us * 1e3 * scale;
    let hi = max
        .min(total.p99_us * 1e3 * scale * 1.5)
        .max(lo * 1.0001 + 1e-9);
    let width = (hi - lo) / BINS as f64;
    let mut counts = [0u32; BINS];
    let mut beyond = 0;
    for x in &xs {
        beyond += usize::from(*x > hi);
        let i = (((x - lo) / width) as usize).min(BINS - 1);
        counts[i] += 1;
    }
    let title = if beyond > 0 {
        format!(
            "{title}; last bar: {beyond} up to {}",
            super::fmt_us(total.max_us)
        )
    } else {
        title
    };
    let ymax = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(lo..hi + width, 0u32..ymax + ymax / 10 + 1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!("total latency ({unit})"))
        .y_desc("tasks")
        .disable_x_mesh()
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c > 0)
                .map(|(i, &c)| {
                    let x0 = lo + i as f64 * width;
                    Rectangle::new([(x0, 0), (x0 + width, c)], BLUE.mix(0.6).filled())
                }),
        )
        .map_err(err)?;
    for (label, us, color) in [
        ("p50", total.p50_us, GREEN),
        ("p90", total.p90_us, MAGENTA),
        ("p99", total.p99_us, RED),
    ] {
        let x = us * 1e3 * scale;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0), (x, ymax)],
                color.stroke_width(2),
            )))
            .map_err(err)?
            .label(format!("{label} {}", super::fmt_us(us)))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}
