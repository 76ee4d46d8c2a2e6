//! `trackcheck compare`: several run reports side by side, trial by trial — a cross-kernel view.
//!
//! Each report (a `report.json` as `trackcheck run --out DIR` and the lanes write it) is a
//! column, labelled with its golden key and kernel release
//! (`aarch64-arm64-stage2@6.12 (6.12.118+deb12-arm64)`); each trial is a row; a cell is the
//! trial's verdict there: `pass`, `fail:<kind>`, `known-failure <golden token>` (the signature
//! it was judged within), `unexpected-pass`, `skip`, `not-exercised`, `error`, or `absent` (the
//! report is of the trial's architecture but does not hold it: a filtered run, or another
//! trackcheck version's matrix). A row *differs* when its cells differ; by default only those
//! rows are printed.
//!
//! What it can see: the verdicts the reports recorded, each judged on its own host against its
//! own golden file. So `pass` next to `known-failure` means the kernels behave differently, or
//! that one host has no golden file (its report says which); a skip's reason, a failure's lost
//! pages and the evidence are in the reports, not in the cells. What it cannot see: anything a
//! report did not record, and whether two reports ran the same trackcheck (their versions are
//! in the reports).
//!
//! Architectures: trial names start with the architecture, so reports of x86_64 and aarch64
//! hosts share no rows; a report's column reads `n/a` for the other architecture's trials, and
//! such rows are judged only among the reports of their architecture. `--by-scenario` drops the
//! architecture from the names, so that the same mechanism, scenario, backing and mode line up
//! across architectures (then every report is compared on every row, and a trial one
//! architecture lacks is `absent` there).
//!
//! Reports are read leniently: only the host key, the kernel's release and architecture, and
//! each trial's name, verdict, fail kind and evidence are needed, so reports written by other
//! trackcheck versions compare too.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trackcheck_harness::host::kernel_series;

use crate::golden;
use crate::trial::{FailKind, Verdict};

/// The file a run directory holds its JSON report in.
const REPORT_FILE: &str = "report.json";

/// Where a lane directory keeps the matrix run's report (`trackcheck vm`'s layout).
const LANE_MATRIX_DIR: &str = "matrix";

/// Options of `trackcheck compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Run reports: report.json files, or directories holding one (as `trackcheck run --out DIR`
    /// writes them; a lane's output directory is read from its matrix/ subdirectory).
    #[arg(required = true, value_name = "REPORT")]
    pub reports: Vec<PathBuf>,
    /// Print every row, not only those where the reports differ.
    #[arg(long)]
    pub all: bool,
    /// Drop the architecture from trial names, so that x86_64 and aarch64 reports line up.
    #[arg(long)]
    pub by_scenario: bool,
    /// Also write the whole table (every row, each marked whether it differs) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Why a comparison could not be made. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A report could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not a run report.
    #[error(
        "{path} is not a trackcheck run report (the report.json that `trackcheck run --out DIR` writes): {source}"
    )]
    NotAReport {
        /// The file.
        path: PathBuf,
        /// What the JSON reader met.
        source: serde_json::Error,
    },
    /// A directory holds no report.
    #[error("no report.json in {dir}{hint}")]
    NoReportIn {
        /// The directory.
        dir: PathBuf,
        /// Subdirectories that hold one, if any.
        hint: String,
    },
    /// The JSON table could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The part of a run report a comparison needs.
#[derive(Debug, Deserialize)]
struct ReportView {
    host_key: String,
    host: HostView,
    trials: Vec<TrialView>,
}

#[derive(Debug, Deserialize)]
struct HostView {
    kernel: KernelView,
}

#[derive(Debug, Deserialize)]
struct KernelView {
    release: String,
    arch: String,
}

#[derive(Debug, Deserialize)]
struct TrialView {
    name: String,
    verdict: Verdict,
    #[serde(default)]
    fail_kind: Option<FailKind>,
    #[serde(default)]
    evidence: Vec<String>,
}

/// One report: a column of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// `<golden key> (<kernel release>)`.
    pub label: String,
    /// The host profile `@` the kernel series.
    pub golden_key: String,
    /// `uname -r` of the host that ran it.
    pub release: String,
    /// Its architecture.
    pub arch: String,
    /// The file it was read from.
    pub source: PathBuf,
}

/// A trial's verdict in one report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cell {
    /// The verdict, with the fail kind of a failure or the golden token of a known failure.
    Verdict(String),
    /// The report is of the trial's architecture (or `--by-scenario`) and does not hold it.
    Absent,
    /// The report is of another architecture.
    NotApplicable,
}

impl Cell {
    fn of(t: &TrialView) -> Self {
        let v = t.verdict.name();
        Self::Verdict(match t.verdict {
            Verdict::Fail => t
                .fail_kind
                .map_or_else(|| v.to_string(), |k| format!("{v}:{}", k.name())),
            Verdict::KnownFailure => golden::recorded_token(&t.evidence)
                .map_or_else(|| v.to_string(), |token| format!("{v} {token}")),
            _ => v.to_string(),
        })
    }

    /// The text in the table.
    #[must_use]
    pub fn text(&self) -> &str {
        match self {
            Self::Verdict(v) => v,
            Self::Absent => "absent",
            Self::NotApplicable => "n/a",
        }
    }

    /// The verdict's name without its detail (`known-failure`, `fail`, `absent`), for counts.
    fn kind(&self) -> &str {
        self.text()
            .split([' ', ':'])
            .next()
            .unwrap_or_else(|| self.text())
    }
}

/// One trial across the reports.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The trial (without its architecture under `--by-scenario`).
    pub trial: String,
    /// One cell per column.
    pub cells: Vec<Cell>,
    /// Whether the cells of the reports it applies to differ.
    pub differs: bool,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The reports, in the order given.
    pub columns: Vec<Column>,
    /// Every trial, in the order the reports list them.
    pub rows: Vec<Row>,
    /// Whether names were compared without their architecture.
    pub by_scenario: bool,
}

/// Find the report a command-line argument names: the file itself, `DIR/report.json`, or a
/// lane's `DIR/matrix/report.json`.
fn resolve(path: &Path) -> Result<PathBuf, CompareError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    for candidate in [
        path.join(REPORT_FILE),
        path.join(LANE_MATRIX_DIR).join(REPORT_FILE),
    ] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let mut holding: Vec<String> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            e.path()
                .join(REPORT_FILE)
                .is_file()
                .then(|| e.path().display().to_string())
        })
        .collect();
    holding.sort();
    let hint = if holding.is_empty() {
        " (give the directory `trackcheck run --out DIR` wrote, or its report.json)".to_string()
    } else {
        format!(" (these subdirectories hold one: {})", holding.join(", "))
    };
    Err(CompareError::NoReportIn {
        dir: path.to_path_buf(),
        hint,
    })
}

fn read(path: &Path) -> Result<(PathBuf, ReportView), CompareError> {
    let file = resolve(path)?;
    let text = std::fs::read_to_string(&file).map_err(|source| CompareError::Read {
        path: file.clone(),
        source,
    })?;
    let report = serde_json::from_str(&text).map_err(|source| CompareError::NotAReport {
        path: file.clone(),
        source,
    })?;
    Ok((file, report))
}

/// The row key of a trial name: the name, or without `--by-scenario` its architecture prefix
/// dropped. Returns the key and the architecture the name starts with.
fn row_key(name: &str, by_scenario: bool) -> (String, &str) {
    let (arch, rest) = name.split_once("::").unwrap_or(("", name));
    if by_scenario {
        (rest.to_string(), arch)
    } else {
        (name.to_string(), arch)
    }
}

/// Read the reports `paths` name and line them up.
pub fn load(paths: &[PathBuf], by_scenario: bool) -> Result<Comparison, CompareError> {
    let reports = paths
        .iter()
        .map(|p| read(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(compare(&reports, by_scenario))
}

fn compare(reports: &[(PathBuf, ReportView)], by_scenario: bool) -> Comparison {
    let columns: Vec<Column> = reports
        .iter()
        .map(|(source, r)| {
            let series = kernel_series(&r.host.kernel.release).unwrap_or_else(|| "unknown".into());
            let golden_key = format!("{}@{series}", r.host_key);
            Column {
                label: format!("{golden_key} ({})", r.host.kernel.release),
                golden_key,
                release: r.host.kernel.release.clone(),
                arch: r.host.kernel.arch.clone(),
                source: source.clone(),
            }
        })
        .collect();
    // Rows in the order the reports list the trials (matrix order), first report first.
    let mut order: Vec<(String, String)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut cells: Vec<HashMap<String, Cell>> = Vec::new();
    for (_, report) in reports {
        let mut column = HashMap::new();
        for t in &report.trials {
            let (key, arch) = row_key(&t.name, by_scenario);
            if !index.contains_key(&key) {
                index.insert(key.clone(), order.len());
                order.push((key.clone(), arch.to_string()));
            }
            column.insert(key, Cell::of(t));
        }
        cells.push(column);
    }
    let rows = order
        .into_iter()
        .map(|(trial, arch)| {
            let row: Vec<Cell> = columns
                .iter()
                .zip(&cells)
                .map(|(col, column)| match column.get(&trial) {
                    Some(cell) => cell.clone(),
                    None if by_scenario || col.arch == arch => Cell::Absent,
                    None => Cell::NotApplicable,
                })
                .collect();
            let mut applicable = row.iter().filter(|c| **c != Cell::NotApplicable);
            let first = applicable.next();
            let differs = applicable.any(|c| Some(c) != first);
            Row {
                trial,
                cells: row,
                differs,
            }
        })
        .collect();
    Comparison {
        columns,
        rows,
        by_scenario,
    }
}

impl Comparison {
    /// The table (every row with `all`, else only those that differ) and a summary: rows
    /// compared, rows that differ, and per column the count of each verdict.
    #[must_use]
    pub fn text(&self, all: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trackcheck compare: {} report(s){}",
            self.columns.len(),
            if self.by_scenario {
                ", trials by scenario (architecture dropped)"
            } else {
                ""
            }
        );
        let label_w = self
            .columns
            .iter()
            .map(|c| c.label.len())
            .max()
            .unwrap_or(0);
        for (i, c) in self.columns.iter().enumerate() {
            let _ = writeln!(
                out,
                "  [{}] {:<label_w$}  {}",
                i + 1,
                c.label,
                c.source.display()
            );
        }
        let shown: Vec<&Row> = self.rows.iter().filter(|r| all || r.differs).collect();
        let differ = self.rows.iter().filter(|r| r.differs).count();
        if !shown.is_empty() {
            let name_w = shown
                .iter()
                .map(|r| r.trial.len())
                .max()
                .unwrap_or(5)
                .max(5);
            let widths: Vec<usize> = (0..self.columns.len())
                .map(|i| {
                    shown
                        .iter()
                        .map(|r| r.cells[i].text().len())
                        .max()
                        .unwrap_or(0)
                        .max(format!("[{}]", i + 1).len())
                })
                .collect();
            let mut header = format!("\n{:<name_w$}", "trial");
            for (i, w) in widths.iter().enumerate() {
                let _ = write!(header, "  {:<w$}", format!("[{}]", i + 1));
            }
            let _ = writeln!(out, "{}", header.trim_end());
            for r in &shown {
                let mut line = format!("{:<name_w$}", r.trial);
                for (cell, w) in r.cells.iter().zip(&widths) {
                    let _ = write!(line, "  {:<w$}", cell.text());
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        let _ = writeln!(
            out,
            "\n{} trial(s) compared, {differ} differ{}",
            self.rows.len(),
            match (all, differ) {
                (true, _) => " (every row shown)",
                (false, 0) => "",
                (false, _) => " (shown; --all shows every row)",
            }
        );
        let arches: std::collections::BTreeSet<&str> =
            self.columns.iter().map(|c| c.arch.as_str()).collect();
        if arches.len() > 1 && !self.by_scenario {
            let _ = writeln!(
                out,
                "reports of {} architectures: their trials share no rows (n/a); --by-scenario lines them up",
                arches.len()
            );
        }
        for i in 0..self.columns.len() {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for r in &self.rows {
                if r.cells[i] != Cell::NotApplicable {
                    *counts.entry(r.cells[i].kind()).or_default() += 1;
                }
            }
            let counts: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let _ = writeln!(out, "  [{}] {}", i + 1, counts.join(", "));
        }
        out
    }

    /// Write the whole table as JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<(), CompareError> {
        let json = serde_json::to_string_pretty(self).unwrap_or_default();
        std::fs::write(path, json).map_err(|source| CompareError::Write {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// `trackcheck compare`: the text to print, or why there is none.
pub fn run(args: &CompareArgs) -> Result<String, CompareError> {
    let comparison = load(&args.reports, args.by_scenario)?;
    if let Some(path) = &args.json {
        comparison.write_json(path)?;
    }
    Ok(comparison.text(args.all))
}

#[cfg(test)]
mod tests;
