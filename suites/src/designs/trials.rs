//! `model::<design>::<scenario>` trials: the models as trials of `trackcheck list / run` and
//! `cargo test`. Each gives a [`TrialResult`] (no [`crate::spec::TrialSpec`]: a model trial is
//! not a KVM trial), so reports, JSON, KTAP and golden files take them like any trial. They
//! need no KVM (but the anchor) and give the same verdict on every host; the host's golden
//! file records them as passing, and lanes leave them out (`trackcheck run --no-models`).
//!
//! Per design: `exhaustive-<scenario>` (every interleaving within the scenario's bound; the
//! bound, states and schedules are in the evidence), `proptest-<scenario>` (random schedules,
//! shrunk on failure), `mutants` (every known-bad variant must lose a write in some exhaustive
//! scenario; each one's shortest schedule is in the evidence) and `costs` (the seed's cost
//! claim, measured in model steps, with the figures in the evidence). The baseline also has
//! `anchor-stepped` ([`super::anchor`]): the model against this host's KVM. A trial passes
//! only if its exploration found no loss and no stuck schedule, and (`mutants`) every mutant
//! was caught by a loss.

use std::time::Instant;

use super::explore::{Counterexample, exhaustive, sample};
use super::scenarios::{self, cost_setup, stepped};
use super::world::{Costs, Design};
use super::{designs, mutants};
use crate::golden::Golden;
use crate::trial::{FailKind, TrialResult, Verdict};

/// What a model trial checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Exhaustive exploration of exhaustive scenario `i`.
    Exhaustive(usize),
    /// Proptest over schedules of exhaustive scenario `i`.
    Proptest(usize),
    /// Every mutant of the design is caught.
    Mutants,
    /// The design's cost claim.
    Costs,
    /// The model against real KVM (the baseline only).
    Anchor,
}

/// One model trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelTrial {
    /// Index into [`designs`].
    pub design: usize,
    /// What it checks.
    pub check: Check,
}

impl ModelTrial {
    /// The trial's name.
    #[must_use]
    pub fn name(&self) -> String {
        let design = designs()[self.design].name();
        let scenario = match self.check {
            Check::Exhaustive(i) => format!("exhaustive-{}", scenarios::exhaustive()[i].name),
            Check::Proptest(i) => format!("proptest-{}", scenarios::exhaustive()[i].name),
            Check::Mutants => "mutants".into(),
            Check::Costs => "costs".into(),
            Check::Anchor => "anchor-stepped".into(),
        };
        format!("model::{design}::{scenario}")
    }
}

/// Every model trial, in order.
#[must_use]
pub fn all() -> Vec<ModelTrial> {
    let n = scenarios::exhaustive().len();
    let mut out = Vec::new();
    for design in 0..designs().len() {
        let checks =
            (0..n)
                .map(Check::Exhaustive)
                .chain([Check::Proptest(0), Check::Mutants, Check::Costs]);
        out.extend(checks.map(|check| ModelTrial { design, check }));
        if design == 0 {
            out.push(ModelTrial {
                design,
                check: Check::Anchor,
            });
        }
    }
    out
}

/// Model trials whose names contain one of `filters` (or equal one, when `exact`); all when
/// `filters` is empty.
#[must_use]
pub fn select(filters: &[String], exact: bool) -> Vec<ModelTrial> {
    all()
        .into_iter()
        .filter(|t| {
            let name = t.name();
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        name == *f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect()
}

fn counterexample_lines(c: &Counterexample) -> String {
    format!("{} steps:\n{c}", c.lines.len())
}

/// A failure from an exploration's counterexample: a loss, or a stuck schedule.
fn explored(c: &Counterexample) -> (FailKind, String) {
    if c.is_loss() {
        (
            FailKind::Lost,
            format!("loses a write: {}", counterexample_lines(c)),
        )
    } else {
        (
            FailKind::Problem,
            format!("a schedule gets stuck: {}", counterexample_lines(c)),
        )
    }
}

/// Run one model trial.
#[must_use]
pub fn run(trial: ModelTrial) -> TrialResult {
    let start = Instant::now();
    let name = trial.name();
    let design = &designs()[trial.design];
    let scenario = name.rsplit("::").next().unwrap_or_default();
    let mut r = TrialResult::model(&name, &design.name(), scenario);
    let problem = |why: String| (FailKind::Problem, why);
    let failure = match trial.check {
        Check::Exhaustive(i) => {
            let s = &scenarios::exhaustive()[i];
            let x = exhaustive(design.as_ref(), &s.setup);
            r.evidence.push(format!("bound: {}", x.bound));
            r.evidence.push(format!(
                "{} states, {} schedules in {:.2} s ({:.0} states/s)",
                x.states,
                x.schedules,
                x.seconds,
                x.states as f64 / x.seconds.max(1e-9)
            ));
            x.counterexample.as_ref().map(explored)
        }
        Check::Proptest(i) => {
            let s = &scenarios::exhaustive()[i];
            let cases = 256;
            r.evidence
                .push(format!("{cases} random schedules of {}", s.name));
            sample(design.as_ref(), &s.setup, cases)
                .as_ref()
                .map(explored)
        }
        Check::Mutants => mutants_caught(design.as_ref(), &mut r.evidence).map(problem),
        Check::Costs => cost_claim(trial.design, &mut r.evidence).map(|why| {
            let kind = if why.contains("lost a write") {
                FailKind::Lost
            } else {
                FailKind::Problem
            };
            (kind, why)
        }),
        Check::Anchor => {
            let a = super::anchor::run();
            r.evidence.extend(a.evidence);
            r.written = a.written;
            r.reported = a.total.kvm_pages;
            r.allowed = a.total.allowed;
            r.extra = r.allowed.values().sum();
            r.rounds = u32::try_from(a.total.rounds).unwrap_or(u32::MAX);
            r.seed = super::anchor::SEED;
            if let Some(why) = a.skip {
                r.verdict = Verdict::Skip;
                r.reason = Some(why);
            } else if let Some(why) = a.error {
                r.verdict = Verdict::Error;
                r.reason = Some(why);
            }
            a.failure
        }
    };
    if let Some((kind, why)) = failure {
        r.verdict = Verdict::Fail;
        r.fail_kind = Some(kind);
        r.reason = Some(why);
    }
    r.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    r
}

fn mutants_caught(design: &dyn Design, evidence: &mut Vec<String>) -> Option<String> {
    let prefix = format!("{}/", design.name());
    let mut escaped = Vec::new();
    let mine: Vec<_> = mutants()
        .into_iter()
        .filter(|m| m.name().starts_with(&prefix))
        .collect();
    if mine.is_empty() {
        return Some(format!("{} has no mutants to catch", design.name()));
    }
    for m in &mine {
        let caught = scenarios::exhaustive().into_iter().find_map(|s| {
            exhaustive(m.as_ref(), &s.setup)
                .counterexample
                .map(|c| (s.name, c))
        });
        match caught {
            Some((scenario, c)) if c.is_loss() => evidence.push(format!(
                "mutant {} caught in {scenario}, shortest schedule {}",
                m.name(),
                counterexample_lines(&c)
            )),
            Some((_, c)) => escaped.push(format!("{} ({})", m.name(), c.verdict)),
            None => escaped.push(m.name()),
        }
    }
    (!escaped.is_empty()).then(|| format!("mutants not caught: {}", escaped.join(", ")))
}

/// Dense (4 neighbouring pages) or sparse (4 pages spread over memory) writes.
fn figures(design: &dyn Design, dense: bool) -> Result<Vec<(usize, Costs)>, String> {
    [4, 16, 64]
        .into_iter()
        .map(|pages| stepped(design, &cost_setup(pages, dense)).map(|w| (pages, w.costs)))
        .collect()
}

fn cost_claim(design: usize, evidence: &mut Vec<String>) -> Option<String> {
    let all = designs();
    let d = all[design].as_ref();
    let base = all[0].as_ref();
    let run = |d: &dyn Design, dense| figures(d, dense);
    let (mine, theirs) = match (run(d, false), run(base, false)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Some(format!("the cost run lost a write: {e}")),
    };
    for ((pages, c), (_, b)) in mine.iter().zip(&theirs) {
        evidence.push(format!(
            "{pages} pages, 12 writes over 3 rounds: {c:?}; baseline: {} protect steps, {} faults",
            b.protect_steps, b.faults
        ));
    }
    match d.name().as_str() {
        "gen-wp" => {
            let steps: Vec<u64> = mine.iter().map(|(_, c)| c.protect_steps).collect();
            evidence.push(format!(
                "claim (004): write-protect cost independent of memory size; host write-protect \
                 steps at 4/16/64 pages: {steps:?} (baseline: {:?}); root entries made read-only \
                 at reload: {:?} (one per root entry: the seed's root has few)",
                theirs
                    .iter()
                    .map(|(_, c)| c.protect_steps)
                    .collect::<Vec<_>>(),
                mine.iter().map(|(_, c)| c.root_entries).collect::<Vec<_>>()
            ));
            (steps.windows(2).any(|w| w[0] != w[1]))
                .then(|| format!("write-protect steps grow with memory: {steps:?}"))
        }
        "dbm" => {
            let dense = match run(d, true) {
                Ok(f) => f,
                Err(e) => return Some(format!("the cost run lost a write: {e}")),
            };
            let line = |f: &[(usize, Costs)]| {
                f.iter()
                    .map(|(p, c)| format!("{}/{} of {p}x3", c.sync_scanned, p * 3))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            evidence.push(format!(
                "claim (002): PTEs scanned at sync vs a full scan (3 syncs): dense writes {}; \
                 sparse writes {}",
                line(&dense),
                line(&mine)
            ));
            dense
                .iter()
                .find(|(p, c)| *p > 4 && c.sync_scanned >= (*p as u64) * 3)
                .map(|(p, c)| format!("sync scans as much as a full scan at {p} pages: {c:?}"))
        }
        "pml" => {
            let exits = |c: &Costs| c.faults + c.pml_full_exits + c.kick_exits;
            let avoided: Vec<i64> = mine
                .iter()
                .zip(&theirs)
                .map(|((_, c), (_, b))| {
                    i64::try_from(b.faults).unwrap_or(i64::MAX)
                        - i64::try_from(exits(c)).unwrap_or(i64::MAX)
                })
                .collect();
            evidence.push(format!(
                "claim (000): exits avoided against write-protect faults (faults + PML-full + \
                 kicks, PML buffer of 2): {avoided:?} at 4/16/64 pages"
            ));
            avoided
                .iter()
                .any(|&a| a <= 0)
                .then(|| format!("PML did not avoid exits: {avoided:?}"))
        }
        "idle-walk" => idle_claim(evidence),
        _ => {
            evidence.push("baseline: the figures the other designs compare against".into());
            None
        }
    }
}

/// Seed 001: with a TLB flush per scan no access after a scan is missed; without it the miss
/// rate is measured (the mutants trial shows the schedule).
fn idle_claim(evidence: &mut Vec<String>) -> Option<String> {
    use super::idle::{Idle, Mutant};
    let mut rates = Vec::new();
    for mutant in [None, Some(Mutant::NoTlbFlush)] {
        let d = Idle { mutant };
        let mut line = Vec::new();
        for pages in [4, 16, 64] {
            match stepped(&d, &cost_setup(pages, true)) {
                Ok(w) => {
                    let a = &w.access;
                    line.push(format!(
                        "{pages} pages: {} of {} missed ({:.0}%)",
                        a.missed,
                        a.due,
                        a.miss_rate()
                    ));
                    rates.push((mutant, a.missed));
                }
                Err(e) => return Some(format!("the cost run lost a write: {e}")),
            }
        }
        evidence.push(format!(
            "claim (001): accesses after a scan reported by the next one, {}: {}",
            if mutant.is_some() {
                "no TLB flush (as first posted)"
            } else {
                "TLB flush per scan"
            },
            line.join("; ")
        ));
    }
    rates
        .iter()
        .find(|(m, missed)| m.is_none() && *missed > 0)
        .map(|_| "the scan with a TLB flush missed accesses".to_string())
}

/// Text table of model results with their evidence (bounds, schedules, costs, counterexamples).
#[must_use]
pub fn text(results: &[TrialResult]) -> String {
    let mut out =
        String::from("model trials (the same verdict on every host; the anchor needs KVM)\n");
    for r in results {
        out.push_str(&format!(
            "  {:<6} {} ({:.0} ms)\n",
            r.verdict.name(),
            r.name,
            r.duration_ms
        ));
        if let Some(why) = &r.reason {
            out.push_str(&format!("         {}\n", why.replace('\n', "\n         ")));
        }
        for e in &r.evidence {
            out.push_str(&format!("         {}\n", e.replace('\n', "\n         ")));
        }
    }
    out
}

/// Run `trials` one after another, applying `golden` to each; `progress(i, result)` is called
/// as the i-th (0-based) finishes.
pub fn run_all(
    trials: &[ModelTrial],
    golden: &Golden,
    progress: &dyn Fn(usize, &TrialResult),
) -> Vec<TrialResult> {
    trials
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let mut r = run(t);
            golden.apply(&mut r);
            progress(i, &r);
            r
        })
        .collect()
}

/// Write `model-report.txt` (the model trials of `results`, with their evidence) into `out`.
pub fn write_text(results: &[TrialResult], out: &std::path::Path) -> std::io::Result<()> {
    let models: Vec<TrialResult> = results
        .iter()
        .filter(|r| r.spec.is_none())
        .cloned()
        .collect();
    if models.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("model-report.txt"), text(&models))
}
