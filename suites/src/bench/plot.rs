//! SVG plots of a sweep: one panel per phase (dirty pass, harvest, rearm, write-fault overhead),
//! cost against the swept variable, one line per mechanism — O(memory) and O(dirty) paths show
//! as different slopes.

use plotters::prelude::*;

use super::{MechResult, SweepResult};

type Metric = (&'static str, &'static str, fn(&MechResult) -> f64);

const METRICS: [Metric; 4] = [
    ("dirty pass", "ms", |r| {
        r.phases.get("dirty").map_or(0.0, |s| s.median_ms)
    }),
    ("harvest", "ms", |r| {
        r.phases.get("harvest").map_or(0.0, |s| s.median_ms)
    }),
    ("rearm", "ms", |r| {
        r.phases.get("rearm").map_or(0.0, |s| s.median_ms)
    }),
    ("write-fault overhead", "ns/page", |r| {
        r.fault_overhead_ns_per_page.max(0.0)
    }),
];

/// Write `sweep` as an SVG to `path`.
pub fn plot(sweep: &SweepResult, title: &str, path: &std::path::Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, 2));
    let mechanisms: Vec<String> = sweep
        .points
        .iter()
        .flat_map(|(_, rs)| {
            rs.iter()
                .filter(|r| r.skipped.is_none())
                .map(|r| r.mechanism.clone())
        })
        .fold(Vec::new(), |mut v, m| {
            if !v.contains(&m) {
                v.push(m);
            }
            v
        });
    let x_max = sweep.points.iter().map(|(x, _)| *x).fold(1.0, f64::max);
    for (panel, (name, unit, metric)) in panels.iter().zip(METRICS) {
        let series: Vec<(String, Vec<(f64, f64)>)> = mechanisms
            .iter()
            .map(|m| {
                let points = sweep
                    .points
                    .iter()
                    .filter_map(|(x, rs)| {
                        rs.iter()
                            .find(|r| &r.mechanism == m && r.skipped.is_none())
                            .map(|r| (*x, metric(r)))
                    })
                    .collect();
                (m.clone(), points)
            })
            .collect();
        // Costs span orders of magnitude between mechanisms: a log axis, floored at 1 us.
        let floor = 1e-3;
        let series: Vec<(String, Vec<(f64, f64)>)> = series
            .into_iter()
            .map(|(m, p)| (m, p.into_iter().map(|(x, y)| (x, y.max(floor))).collect()))
            .collect();
        let y_max = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(floor, f64::max)
            * 2.0;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{name} ({unit})"), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max * 1.05, (floor..y_max).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(sweep.unit.as_str())
            .y_desc(format!("{unit} (log)"))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (m, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(m.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
