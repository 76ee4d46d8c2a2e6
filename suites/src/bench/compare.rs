//! `trackcheck bench --compare A.json B.json`: phase-by-phase ratios of two runs (two kernels,
//! two builds). Ratios only: no absolute pass/fail threshold.

use std::fmt::Write as _;

use super::BenchReport;

/// Read a bench report written by `--json`.
pub fn load(path: &std::path::Path) -> Result<BenchReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a trackcheck bench report: {e}", path.display()))
}

/// Median of B over median of A for every mechanism and phase both have.
#[must_use]
pub fn compare(a: &BenchReport, b: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "A: {} | kernel {} | rev {} | {}",
        a.host_key, a.kernel, a.revision, a.backend
    );
    let _ = writeln!(
        out,
        "B: {} | kernel {} | rev {} | {}",
        b.host_key, b.kernel, b.revision, b.backend
    );
    if a.config != b.config {
        let _ = writeln!(
            out,
            "note: the configurations differ; ratios compare unlike runs"
        );
    }
    let _ = writeln!(
        out,
        "{:<30} {:<15} {:>12} {:>12} {:>8}",
        "mechanism", "phase", "A median ms", "B median ms", "B/A"
    );
    let mut rows = 0;
    for ra in &a.results {
        let Some(rb) = b.results.iter().find(|r| r.mechanism == ra.mechanism) else {
            continue;
        };
        if ra.skipped.is_some() || rb.skipped.is_some() {
            let _ = writeln!(
                out,
                "{:<28} skipped in {}",
                ra.mechanism,
                if ra.skipped.is_some() { "A" } else { "B" }
            );
            continue;
        }
        for (phase, sa) in &ra.phases {
            let Some(sb) = rb.phases.get(phase) else {
                continue;
            };
            // Below a microsecond a ratio says nothing.
            let ratio = if sa.median_ms >= 1e-3 {
                format!("{:.2}", sb.median_ms / sa.median_ms)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<30} {:<15} {:>12.3} {:>12.3} {:>8}",
                ra.mechanism, phase, sa.median_ms, sb.median_ms, ratio
            );
            rows += 1;
        }
    }
    if rows == 0 {
        let _ = writeln!(out, "no mechanism ran in both reports");
    }
    out
}

pub use load as load_report;
