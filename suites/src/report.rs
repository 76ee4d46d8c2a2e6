//! Reports of a run: a text table, JSON, and KTAP (kselftest / KernelCI).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use trackcheck_harness::HostProfile;

use crate::trial::{TrialResult, Verdict};

/// A whole run. It reads back from its JSON (`trackcheck compare` reads only a few fields of it,
/// so that reports of other trackcheck versions compare too).
#[derive(Debug, Serialize, Deserialize)]
pub struct RunReport {
    /// The host profile.
    pub host: HostProfile,
    /// Its key (golden files are per key).
    pub host_key: String,
    /// The golden file applied, and whether it existed.
    pub golden: GoldenInfo,
    /// trackcheck's version and git revision.
    pub version: String,
    /// Wall time of the run, seconds.
    pub seconds: f64,
    /// Trials per second.
    pub trials_per_second: f64,
    /// Count per verdict.
    pub summary: BTreeMap<String, usize>,
    /// Every trial, in matrix order.
    pub trials: Vec<TrialResult>,
    /// Kernel hazard lines of the run that no trial's threads logged (each once; see
    /// `kernel_log`): they fail the run, since they may belong to any trial running then.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unattributed_kernel_log: Vec<String>,
}

/// Which golden file was applied.
#[derive(Debug, Serialize, Deserialize)]
pub struct GoldenInfo {
    /// Its key: host profile `@` kernel series (`x86_64-pvm-shadow@6.18`).
    #[serde(default)]
    pub key: String,
    /// Its path.
    pub path: String,
    /// Whether it existed.
    pub found: bool,
    /// Golden entries with no trial in this run (stale or filtered out).
    pub unmatched: usize,
    /// When it did not exist: which file was looked for, which kernel series of this host
    /// profile have one, and what that means (`Golden::missing_note`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing: Option<String>,
}

impl RunReport {
    /// Assemble a report.
    #[must_use]
    pub fn new(
        host: HostProfile,
        golden: GoldenInfo,
        trials: Vec<TrialResult>,
        seconds: f64,
    ) -> Self {
        let mut summary = BTreeMap::new();
        for t in &trials {
            *summary.entry(t.verdict.name().to_string()).or_insert(0) += 1;
        }
        let trials_per_second = if seconds > 0.0 {
            trials.len() as f64 / seconds
        } else {
            0.0
        };
        Self {
            host_key: host.key(),
            host,
            golden,
            version: format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                option_env!("TRACKCHECK_GIT_REV").unwrap_or("unknown revision")
            ),
            seconds,
            trials_per_second,
            summary,
            trials,
            unattributed_kernel_log: Vec::new(),
        }
    }

    /// True when any trial's verdict is unexpected (exit status 1). A trial with an injected
    /// loss is expected to fail naming only pages the fault touched: there, a pass (the loss
    /// was missed) is what is unexpected.
    #[must_use]
    pub fn has_unexpected(&self) -> bool {
        !self.unattributed_kernel_log.is_empty()
            || self.trials.iter().any(|t| match t.inject() {
                Some(_) => {
                    !matches!(t.verdict, Verdict::Skip | Verdict::NotExercised) && !caught(t)
                }
                None => t.verdict.is_unexpected(),
            })
    }

    /// Injected losses caught and missed (self-test runs).
    #[must_use]
    pub fn selftest_counts(&self) -> Option<SelftestCounts> {
        let injected: Vec<&TrialResult> = self
            .trials
            .iter()
            .filter(|t| {
                t.inject().is_some() && !matches!(t.verdict, Verdict::Skip | Verdict::NotExercised)
            })
            .collect();
        if injected.is_empty() {
            return None;
        }
        let mut counts = SelftestCounts::default();
        for t in injected {
            if caught(t) {
                counts.caught += 1;
            } else {
                counts.missed += 1;
            }
            if let Some(must) = &t.injected_lost {
                counts.dropped += must.len();
                counts.dropped_named += must
                    .iter()
                    .filter(|p| t.lost.iter().any(|l| (l.slot, l.page) == **p))
                    .count();
            }
        }
        Some(counts)
    }

    /// The final table and summary.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::new();
        let w = self
            .trials
            .iter()
            .map(|t| t.name.len())
            .max()
            .unwrap_or(20)
            .max(5);
        let _ = writeln!(
            out,
            "{:<w$}  {:<16} {:>8} {:>8} {:>6} {:>6}",
            "trial", "verdict", "written", "reported", "lost", "extra"
        );
        for t in &self.trials {
            let counts = if matches!(t.verdict, Verdict::Skip) {
                String::new()
            } else {
                format!(
                    "{:>8} {:>8} {:>6} {:>6}",
                    t.written,
                    t.reported,
                    t.lost.len(),
                    t.extra
                )
            };
            let _ = writeln!(
                out,
                "{:<w$}  {:<16} {counts}",
                t.name,
                t.verdict.name().to_uppercase()
            );
        }
        let attention: Vec<&TrialResult> = self
            .trials
            .iter()
            .filter(|t| {
                !matches!(
                    t.verdict,
                    Verdict::Pass | Verdict::Skip | Verdict::NotExercised
                )
            })
            .collect();
        if !attention.is_empty() {
            let _ = writeln!(out, "\nfailures, known failures and errors:");
            for t in attention {
                let _ = writeln!(out, "  {} {}", t.verdict.name().to_uppercase(), t.name);
                if let Some(r) = &t.reason {
                    let _ = writeln!(out, "      {r}");
                }
                for e in t.evidence.iter().filter(|e| e.starts_with("kernel")) {
                    let _ = writeln!(out, "      {e}");
                }
                let _ = writeln!(out, "      seed {}; replay: {}", t.seed, t.replay);
            }
        }
        for (verdict, title) in [
            (Verdict::Skip, "skipped"),
            (Verdict::NotExercised, "ran but did not exercise their path"),
        ] {
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            for t in self.trials.iter().filter(|t| t.verdict == verdict) {
                *reasons
                    .entry(t.reason.as_deref().unwrap_or("no reason"))
                    .or_default() += 1;
            }
            if !reasons.is_empty() {
                let _ = writeln!(out, "\n{title} (reason: trials):");
                for (reason, n) in reasons {
                    let _ = writeln!(out, "  {n:>4}  {reason}");
                }
            }
        }
        if !self.unattributed_kernel_log.is_empty() {
            let _ = writeln!(
                out,
                "\nkernel hazards no trial's threads logged (unattributed, charged to no trial; they fail the run):"
            );
            for line in &self.unattributed_kernel_log {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(c) = self.selftest_counts() {
            let _ = writeln!(
                out,
                "\nself-test: {} injected losses caught (failed naming only pages the fault touched, and every page it surely lost), {} missed; drop-page: {} pages dropped with a write at stake, {} of them named",
                c.caught, c.missed, c.dropped, c.dropped_named
            );
        }
        let counts: Vec<String> = self
            .summary
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect();
        let _ = writeln!(
            out,
            "\n{} trials in {:.1}s ({:.1} trials/s): {}",
            self.trials.len(),
            self.seconds,
            self.trials_per_second,
            counts.join(", ")
        );
        let _ = writeln!(
            out,
            "host {} | kernel {} | golden {}",
            self.host_key, self.host.kernel.release, self.golden.path,
        );
        if let Some(missing) = &self.golden.missing {
            let _ = writeln!(out, "{missing}");
        } else if !self.golden.found {
            let _ = writeln!(
                out,
                "no golden file: every trial is judged on its own; record expectations with --bless"
            );
        }
        out
    }

    /// KTAP version 1: one result line per trial; known failures are `ok ... # XFAIL`,
    /// skips `ok ... # SKIP`, harness errors `not ok ... # ERROR`.
    #[must_use]
    pub fn ktap(&self) -> String {
        let mut out = String::from("KTAP version 1\n");
        let _ = writeln!(
            out,
            "# trackcheck {} on {} (kernel {})",
            self.version, self.host_key, self.host.kernel.release
        );
        let _ = writeln!(out, "1..{}", self.trials.len());
        for (i, t) in self.trials.iter().enumerate() {
            let n = i + 1;
            let reason = one_line(t.reason.as_deref().unwrap_or(""));
            for l in t.lost.iter().take(5) {
                let _ = writeln!(out, "# {}: lost {l}", t.name);
            }
            let line = match t.verdict {
                Verdict::Pass => format!("ok {n} {}", t.name),
                Verdict::Skip => format!("ok {n} {} # SKIP {reason}", t.name),
                Verdict::NotExercised => {
                    format!("ok {n} {} # SKIP path not exercised: {reason}", t.name)
                }
                Verdict::KnownFailure => format!("ok {n} {} # XFAIL {reason}", t.name),
                Verdict::Fail => format!("not ok {n} {} # {reason}", t.name),
                Verdict::UnexpectedPass => {
                    format!("not ok {n} {} # unexpected pass: {reason}", t.name)
                }
                Verdict::Error => format!("not ok {n} {} # ERROR {reason}", t.name),
            };
            let _ = writeln!(out, "{}", line.trim_end());
        }
        let counts: Vec<String> = self
            .summary
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let _ = writeln!(out, "# Totals: {}", counts.join(" "));
        out
    }
}

/// What a self-test run showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelftestCounts {
    /// Trials whose injected loss the oracle caught.
    pub caught: usize,
    /// Trials whose injected loss it missed (or where it named pages the fault did not touch).
    pub missed: usize,
    /// `drop-page`: dropped pages that each lost a write (summed over trials that know).
    pub dropped: usize,
    /// Of those, the ones the oracle named.
    pub dropped_named: usize,
}

/// Whether the oracle caught a trial's injected loss (see [`judge_selftest`]).
#[must_use]
pub fn caught(t: &TrialResult) -> bool {
    judge_selftest(t).is_ok()
}

/// Judge a self-test: the oracle caught its injected loss when the trial failed, named lost
/// pages, every page it named is one the fault touched, and it named every page the fault
/// surely lost (`drop-page` where the driver knew the pages at stake: then named = dropped,
/// exactly). The error says what was missed or wrongly named.
pub fn judge_selftest(t: &TrialResult) -> Result<(), String> {
    use std::collections::BTreeSet;
    let affected: BTreeSet<(u32, u64)> = t.injected_pages.iter().flatten().copied().collect();
    let named: BTreeSet<(u32, u64)> = t.lost.iter().map(|l| (l.slot, l.page)).collect();
    let must: BTreeSet<(u32, u64)> = t.injected_lost.iter().flatten().copied().collect();
    let fault = t.inject().map_or("no fault", |f| f.name());
    if t.verdict != Verdict::Fail || named.is_empty() {
        return Err(format!(
            "{fault} was not caught: verdict {} ({}); the fault touched {} page(s), surely lost {}; seed {}",
            t.verdict.name(),
            t.reason.as_deref().unwrap_or_default(),
            affected.len(),
            must.len(),
            t.seed
        ));
    }
    let wrong: Vec<&(u32, u64)> = named.difference(&affected).collect();
    if !wrong.is_empty() {
        return Err(format!(
            "the oracle named {} page(s) the fault did not touch: {:?}; seed {}",
            wrong.len(),
            wrong.iter().take(8).collect::<Vec<_>>(),
            t.seed
        ));
    }
    let missed: Vec<&(u32, u64)> = must.difference(&named).collect();
    if !missed.is_empty() {
        return Err(format!(
            "the oracle missed {} of {} dropped page(s) that each lost a write: {:?}; seed {}",
            missed.len(),
            must.len(),
            missed.iter().take(8).collect::<Vec<_>>(),
            t.seed
        ));
    }
    Ok(())
}

/// A reason on one line without `#` (which would start a new KTAP directive).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ").replace('#', "No.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::TrialSpec;
    use crate::trial::FailKind;

    use trackcheck_harness::Backing;

    fn result(verdict: Verdict, reason: Option<&str>) -> TrialResult {
        let spec = TrialSpec::example(Backing::Anon);
        let mut r = TrialResult::new(&spec, 7);
        r.name = format!("{}-{}", spec.name(), verdict.name());
        r.verdict = verdict;
        r.reason = reason.map(String::from);
        r.fail_kind = (verdict == Verdict::Fail).then_some(FailKind::Lost);
        r.written = 3;
        r.reported = 3;
        r.rounds = 2;
        r.duration_ms = 1.0;
        r
    }

    /// Every line is a KTAP line: version, plan, result (`ok`/`not ok` N name [# ...]) or a
    /// diagnostic (`#`); results are numbered 1..N in order; the plan matches.
    #[test]
    fn ktap_is_well_formed() {
        let trials = vec![
            result(Verdict::Pass, None),
            result(Verdict::Skip, Some("no pool")),
            result(Verdict::NotExercised, Some("no 2 MiB mapping")),
            result(Verdict::KnownFailure, Some("lost 2 page(s) # see")),
            result(Verdict::Fail, Some("lost\n1 page")),
            result(Verdict::UnexpectedPass, Some("review")),
            result(Verdict::Error, Some("EIO")),
        ];
        let report = RunReport::new(
            HostProfile::probe(),
            GoldenInfo {
                key: "k@6.18".into(),
                path: "g".into(),
                found: true,
                unmatched: 0,
                missing: None,
            },
            trials,
            1.0,
        );
        let ktap = report.ktap();
        let lines: Vec<&str> = ktap.lines().collect();
        assert_eq!(lines[0], "KTAP version 1");
        let plan = lines.iter().find(|l| l.starts_with("1..")).expect("plan");
        assert_eq!(*plan, "1..7");
        let mut next = 1;
        for l in &lines[1..] {
            if l.starts_with('#') || l.starts_with("1..") {
                continue;
            }
            let rest = l
                .strip_prefix("ok ")
                .or_else(|| l.strip_prefix("not ok "))
                .unwrap_or_else(|| panic!("not a KTAP line: {l}"));
            let (num, tail) = rest.split_once(' ').expect("number and name");
            assert_eq!(num.parse::<usize>().expect("number"), next);
            next += 1;
            assert_eq!(
                tail.matches('#').count().min(1),
                usize::from(tail.contains('#'))
            );
            assert!(
                tail.matches(" # ").count() <= 1,
                "one directive at most: {l}"
            );
        }
        assert_eq!(next, 8);
        assert!(
            ktap.contains("# SKIP no pool")
                && ktap.contains("# SKIP path not exercised: no 2 MiB mapping")
                && ktap.contains("# XFAIL lost 2 page(s) No. see")
                && ktap.contains("# ERROR EIO")
        );
        assert!(report.has_unexpected());
    }

    #[test]
    fn a_report_reads_back_from_its_json_and_names_a_missing_golden_file() {
        let missing = "no golden file for k@6.19 (have: @6.18); every trial is judged on its own; trackcheck run --bless writes one (g)";
        let report = RunReport::new(
            HostProfile::probe(),
            GoldenInfo {
                key: "k@6.19".into(),
                path: "g".into(),
                found: false,
                unmatched: 0,
                missing: Some(missing.into()),
            },
            vec![
                result(Verdict::Pass, None),
                result(Verdict::Fail, Some("lost")),
            ],
            1.0,
        );
        assert!(report.text().contains(missing));
        let json = serde_json::to_string(&report).expect("serialises");
        let back: RunReport = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back.golden.missing.as_deref(), Some(missing));
        assert_eq!(back.trials.len(), 2);
        assert_eq!(back.trials[1].verdict, Verdict::Fail);
        assert_eq!(back.text(), report.text());
    }
}
