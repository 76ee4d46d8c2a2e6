//! Running one trial: verdict, evidence and the record reports are made of.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use trackcheck_harness::HostProfile;
use trackcheck_harness::oracle::LostPage;
use trackcheck_harness::track::inject::Fault;

use trackcheck_harness::vcpu::collect_tids;

use crate::kernel_log::KernelWatch;
use crate::scenarios::{self, TrialError};
use crate::spec::TrialSpec;

/// A trial's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Every written page was reported.
    Pass,
    /// The kernel lost pages, misbehaved (API, hazard), or a required mechanism is missing.
    Fail,
    /// Fails the way the golden matrix records for this host (does not fail the run).
    KnownFailure,
    /// The golden matrix records a failure, but it passed: review the golden file.
    UnexpectedPass,
    /// Cannot run on this host; the reason says why.
    Skip,
    /// Ran and lost nothing, but could not prove it exercised the path it is about (KVM's
    /// stats show no huge mapping to split, say); the reason says what was missing.
    NotExercised,
    /// The harness could not run it.
    Error,
}

impl Verdict {
    /// Name in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::Fail => "fail",
            Self::KnownFailure => "known-failure",
            Self::UnexpectedPass => "unexpected-pass",
            Self::Skip => "skip",
            Self::NotExercised => "not-exercised",
            Self::Error => "error",
        }
    }

    /// True when this verdict makes the run fail (exit 1, failed test).
    #[must_use]
    pub const fn is_unexpected(self) -> bool {
        matches!(self, Self::Fail | Self::UnexpectedPass | Self::Error)
    }
}

/// Why a trial failed, coarsely: the golden matrix compares this, so a known failure must
/// still fail the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailKind {
    /// Written pages were not reported.
    Lost,
    /// The kernel hung, stormed or shut down a vCPU, or logged a WARN.
    Hazard,
    /// An interface misbehaved (a CLEAR range rule, a cross-check disagreement).
    Problem,
    /// A mechanism demanded by TRACKCHECK_REQUIRE is missing.
    Required,
}

impl FailKind {
    /// Name in golden files.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Hazard => "hazard",
            Self::Problem => "problem",
            Self::Required => "required",
        }
    }
}

/// Everything known about one trial run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrialResult {
    /// `arch::mechanism::scenario::backing::mode`.
    pub name: String,
    /// Mechanism with parameters (`clear-log/chunk64`).
    pub mechanism: String,
    /// Scenario (`concurrent-random-v2`).
    pub scenario: String,
    /// Execution mode.
    pub mode: String,
    /// Backing.
    pub backing: String,
    /// Verdict.
    pub verdict: Verdict,
    /// For fail/skip/error: why; for known failures: what the golden file expects too.
    pub reason: Option<String>,
    /// How it failed, for failures.
    pub fail_kind: Option<FailKind>,
    /// Seed of the programs.
    pub seed: u64,
    /// The command that runs this trial again with this seed.
    pub replay: String,
    /// Pages that had to be reported, summed over harvests (concurrent: distinct pages written).
    pub written: u64,
    /// Pages reported, summed over harvests.
    pub reported: u64,
    /// Reported pages no write required (allowed + unexplained).
    pub extra: u64,
    /// Extra pages by allowance.
    pub allowed: BTreeMap<String, u64>,
    /// Extra pages no allowance explains.
    pub unexplained: u64,
    /// Lost writes.
    pub lost: Vec<LostPage>,
    /// Harvest rounds.
    pub rounds: u32,
    /// Wall time of the trial.
    pub duration_ms: f64,
    /// Supporting facts: mode evidence, counts, kernel log lines.
    pub evidence: Vec<String>,
    /// Hazards the trial met (also in the evidence): a vCPU stuck, a kernel WARN charged to
    /// the trial's threads. Golden signatures match them by class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hazards: Vec<String>,
    /// Interface problems the trial met (also in the evidence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// Pages an injected fault touched (self-tests).
    pub injected_pages: Option<Vec<(u32, u64)>>,
    /// `drop-page` self-tests whose driver knew the pages at stake: the dropped pages, each a
    /// lost write the oracle must name (so named = injected, exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub injected_lost: Option<Vec<(u32, u64)>>,
    /// The trial, to replay it; `None` for a model trial (`model::`, see `designs::trials`),
    /// which `trackcheck run --exact NAME` replays.
    #[serde(default)]
    pub spec: Option<TrialSpec>,
}

impl TrialResult {
    /// A passing result with nothing counted yet.
    #[must_use]
    pub fn new(spec: &TrialSpec, seed: u64) -> Self {
        Self {
            name: spec.name(),
            mechanism: spec.tracker.label(),
            scenario: spec.scenario.name(),
            mode: spec.mode.name().into(),
            backing: spec.backing.name().into(),
            verdict: Verdict::Pass,
            reason: None,
            fail_kind: None,
            seed,
            replay: replay_command(spec, seed),
            written: 0,
            reported: 0,
            extra: 0,
            allowed: BTreeMap::new(),
            unexplained: 0,
            lost: Vec::new(),
            rounds: 0,
            duration_ms: 0.0,
            evidence: Vec::new(),
            hazards: Vec::new(),
            problems: Vec::new(),
            injected_pages: None,
            injected_lost: None,
            spec: Some(*spec),
        }
    }

    /// A passing result of the model trial `name` (no KVM trial: no spec, no seed; `mode` and
    /// `backing` read `model`), with nothing counted yet.
    #[must_use]
    pub fn model(name: &str, design: &str, scenario: &str) -> Self {
        Self {
            name: name.into(),
            mechanism: design.into(),
            scenario: scenario.into(),
            mode: "model".into(),
            backing: "model".into(),
            verdict: Verdict::Pass,
            reason: None,
            fail_kind: None,
            seed: 0,
            replay: format!("trackcheck run --exact '{name}'"),
            written: 0,
            reported: 0,
            extra: 0,
            allowed: BTreeMap::new(),
            unexplained: 0,
            lost: Vec::new(),
            rounds: 0,
            duration_ms: 0.0,
            evidence: Vec::new(),
            hazards: Vec::new(),
            problems: Vec::new(),
            injected_pages: None,
            injected_lost: None,
            spec: None,
        }
    }

    /// The loss injected into this trial (self-tests), if any.
    #[must_use]
    pub fn inject(&self) -> Option<Fault> {
        self.spec.and_then(|s| s.inject)
    }
}

/// Whether `required` (see [`required_mechanisms`]) demands the mechanism of `spec`, by
/// mechanism name (`dirty-ring`) or label with parameters (`dirty-ring/4k`).
#[must_use]
pub fn is_demanded(spec: &TrialSpec, required: &[String]) -> bool {
    let mechanism = spec.tracker.mechanism();
    required
        .iter()
        .any(|r| r == mechanism.name() || *r == spec.tracker.label())
}

/// Mechanisms `TRACKCHECK_REQUIRE` (comma separated) demands.
#[must_use]
pub fn required_mechanisms() -> Vec<String> {
    std::env::var("TRACKCHECK_REQUIRE")
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// The replay command for `spec` with `seed`.
#[must_use]
pub fn replay_command(spec: &TrialSpec, seed: u64) -> String {
    match spec.inject {
        None => format!("trackcheck run --exact '{}' --seed {seed}", spec.name()),
        Some(_) if crate::matrix::selftests().contains(spec) => format!(
            "trackcheck run --selftest --exact '{}' --seed {seed}",
            spec.name()
        ),
        Some(fault) => {
            let base = TrialSpec {
                inject: None,
                ..*spec
            };
            format!(
                "trackcheck run --exact '{}' --inject-loss {fault} --seed {seed}",
                base.name()
            )
        }
    }
}

/// Run `spec` with `seed` on `host`. The verdict is raw (pass / fail / skip / error); golden
/// expectations are applied by the caller.
#[must_use]
pub fn run_trial(
    spec: &TrialSpec,
    seed: u64,
    host: &HostProfile,
    required: &[String],
) -> TrialResult {
    let start = Instant::now();
    let mut result = TrialResult::new(spec, seed);
    let demanded = is_demanded(spec, required);
    if let Err(reason) = scenarios::precheck(spec, host) {
        skip_or_require(&mut result, reason, demanded);
        result.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        return result;
    }
    let watch = KernelWatch::start();
    let (outcome, tids) = collect_tids(|| scenarios::run(spec, seed));
    let hazards = watch.finish(&tids);
    match outcome {
        Err(TrialError::Skip(reason)) => skip_or_require(&mut result, reason, demanded),
        Err(TrialError::Error(reason)) => {
            result.verdict = Verdict::Error;
            result.reason = Some(reason);
        }
        Err(TrialError::Hazard(reason)) => {
            result.hazards.push(reason.clone());
            fail(&mut result, FailKind::Hazard, reason);
        }
        Ok(f) => {
            let r = f.report;
            result.written = r.written;
            result.reported = r.reported;
            result.extra = r.extra();
            result.allowed.clone_from(&r.allowed);
            result.unexplained = r.unexplained;
            result.rounds = r.rounds;
            result.evidence = f.evidence;
            result.injected_pages = f.affected.map(|a| a.iter().collect());
            result.injected_lost = f.lost_for_sure.map(|a| a.iter().collect());
            result.lost = r.lost;
            result.evidence.extend(f.hazards.iter().cloned());
            result
                .evidence
                .extend(f.problems.iter().map(|p| format!("problem: {p}")));
            result.hazards.clone_from(&f.hazards);
            result.problems.clone_from(&f.problems);
            // Whatever else went wrong is named in the reason too, after the gravest finding.
            let also = |rest: &[&String]| match rest {
                [] => String::new(),
                [one] => format!("; also: {one}"),
                [one, more @ ..] => format!("; also: {one} (+{} more in the evidence)", more.len()),
            };
            if !result.lost.is_empty() {
                let first = first_lost(&result.lost);
                let more = if result.lost.len() > 3 {
                    format!(" (+{} more)", result.lost.len() - 3)
                } else {
                    String::new()
                };
                let rest: Vec<&String> = f.hazards.iter().chain(&f.problems).collect();
                let reason = format!(
                    "lost {} page(s): {}{more}{}",
                    result.lost.len(),
                    first,
                    also(&rest)
                );
                fail(&mut result, FailKind::Lost, reason);
            } else if let Some((h, others)) = f.hazards.split_first() {
                let rest: Vec<&String> = others.iter().chain(&f.problems).collect();
                fail(&mut result, FailKind::Hazard, format!("{h}{}", also(&rest)));
            } else if !f.problems.is_empty() {
                fail(&mut result, FailKind::Problem, f.problems.join("; "));
            } else if let Some(why) = f.not_exercised {
                if spec.inject.is_some() {
                    // A self-test is judged by whether it caught its loss, never excused.
                    result.evidence.push(format!("path not exercised: {why}"));
                } else {
                    result.verdict = Verdict::NotExercised;
                    result.reason = Some(why);
                }
            }
        }
    }
    charge_kernel_hazards(&mut result, &hazards);
    result.duration_ms = start.elapsed().as_secs_f64() * 1e3;
    result
}

/// Charge kernel hazards (log lines attributed to the trial's threads, see
/// [`KernelWatch::finish`]) to a trial that ran: they join its hazards and evidence, and any
/// verdict short of a failure or a harness error becomes a hazard failure: a WARN fails a
/// trial that passed, skipped after it started, or could not prove its path alike. A trial
/// that already failed keeps its gravest finding in front; the golden signature must then
/// explain the hazard too. A harness error stays an error (it fails the run already), with
/// the hazard in its reason.
pub fn charge_kernel_hazards(result: &mut TrialResult, hazards: &[String]) {
    let Some(first) = hazards.first() else {
        return;
    };
    result.evidence.extend(hazards.iter().cloned());
    result.hazards.extend(hazards.iter().cloned());
    match result.verdict {
        Verdict::Fail => {}
        Verdict::Error => {
            let why = result.reason.get_or_insert_with(String::new);
            why.push_str(&format!("; also a kernel hazard: {first}"));
        }
        before => {
            let was = match (before, result.reason.as_deref()) {
                (Verdict::Pass, _) => String::new(),
                (v, Some(why)) => format!(" (it would have been {}: {why})", v.name()),
                (v, None) => format!(" (it would have been {})", v.name()),
            };
            fail(
                result,
                FailKind::Hazard,
                format!("kernel hazard during the trial: {first}{was}"),
            );
        }
    }
}

/// The first three lost pages, for a reason.
#[must_use]
pub fn first_lost(lost: &[LostPage]) -> String {
    let first: Vec<String> = lost.iter().take(3).map(ToString::to_string).collect();
    first.join("; ")
}

fn fail(result: &mut TrialResult, kind: FailKind, reason: String) {
    result.verdict = Verdict::Fail;
    result.fail_kind = Some(kind);
    result.reason = Some(reason);
}

fn skip_or_require(result: &mut TrialResult, reason: String, demanded: bool) {
    if demanded {
        fail(
            result,
            FailKind::Required,
            format!("required by TRACKCHECK_REQUIRE but unavailable: {reason}"),
        );
    } else {
        result.verdict = Verdict::Skip;
        result.reason = Some(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use trackcheck_harness::Backing;

    #[test]
    fn a_kernel_warn_fails_any_trial_that_ran() {
        let spec = TrialSpec::example(Backing::Anon);
        let warn = "kernel: WARNING: CPU: 0 PID: 7 at virt/kvm/kvm_main.c:1 f+0x0/0x1".to_string();
        for before in [Verdict::Pass, Verdict::Skip, Verdict::NotExercised] {
            let mut r = TrialResult::new(&spec, 1);
            r.verdict = before;
            if before != Verdict::Pass {
                r.reason = Some("no 2 MiB mapping".into());
            }
            charge_kernel_hazards(&mut r, std::slice::from_ref(&warn));
            assert_eq!(r.verdict, Verdict::Fail, "{before:?}");
            assert_eq!(r.fail_kind, Some(FailKind::Hazard));
            assert_eq!(r.hazards, vec![warn.clone()]);
            let why = r.reason.unwrap_or_default();
            assert!(why.contains("virt/kvm/kvm_main.c:1"), "{why}");
            assert_eq!(
                why.contains("no 2 MiB mapping"),
                before != Verdict::Pass,
                "{why}"
            );
        }
        // A loss stays the gravest finding; the hazard joins it for the golden signature.
        let mut r = TrialResult::new(&spec, 1);
        r.verdict = Verdict::Fail;
        r.fail_kind = Some(FailKind::Lost);
        r.reason = Some("lost 1 page(s)".into());
        charge_kernel_hazards(&mut r, std::slice::from_ref(&warn));
        assert_eq!(r.fail_kind, Some(FailKind::Lost));
        assert_eq!(r.hazards, vec![warn.clone()]);
        // No hazard: nothing changes.
        let mut r = TrialResult::new(&spec, 1);
        r.verdict = Verdict::NotExercised;
        charge_kernel_hazards(&mut r, &[]);
        assert_eq!(r.verdict, Verdict::NotExercised);
    }
}
