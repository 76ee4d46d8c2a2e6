//! Cross-check: the same deterministic stepped program under two mechanisms. Both must pass the
//! containment oracle, and per round their reported sets must agree except for pages an
//! allowance of the reporting mechanism explains.

use trackcheck_harness::track::TrackerSpec;

use super::{Findings, TrialError, TrialTracker};
use crate::programs;
use crate::spec::TrialSpec;

pub(super) fn run(
    spec: &TrialSpec,
    against: TrackerSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let pages = super::data_pages(&spec.scenario);
    let program = programs::stepped(seed, super::vcpus(&spec.scenario), pages, 6, 40);
    let mut ma = super::machine(spec, spec.tracker.ring_bytes())?;
    let a = super::stepped::drive(&mut ma, &program, tracker.get(), false)?;
    ma.detach(tracker.get())?;
    let mut reference = against.build();
    let mut mb = super::machine(spec, against.ring_bytes())?;
    let b = super::stepped::drive(&mut mb, &program, reference.as_mut(), false)?;
    mb.detach(reference.as_mut())?;
    let mut findings = a.findings;
    for lost in &b.findings.report.lost {
        findings
            .problems
            .push(format!("reference {} lost {lost}", against.label()));
    }
    let explained =
        |extras: &[trackcheck_harness::oracle::ExtraRecord], round: u32, slot: u32, page: u64| {
            extras.iter().any(|e| {
                e.round == round && e.slot == slot && e.page == page && e.allowance.is_some()
            })
        };
    let mut disagreements = 0;
    for (i, (ra, rb)) in a.rounds.iter().zip(&b.rounds).enumerate() {
        let round = u32::try_from(i + 1).unwrap_or(u32::MAX);
        for (slot, page) in ra.iter().filter(|(s, p)| !rb.contains(*s, *p)) {
            if !explained(&a.extras, round, slot, page) {
                disagreements += 1;
                if disagreements <= 5 {
                    findings.problems.push(format!("round {round}: slot {slot} page {page} reported by {} only, no allowance explains it", spec.tracker.label()));
                }
            }
        }
        for (slot, page) in rb.iter().filter(|(s, p)| !ra.contains(*s, *p)) {
            if !explained(&b.extras, round, slot, page) {
                disagreements += 1;
                if disagreements <= 5 {
                    findings.problems.push(format!("round {round}: slot {slot} page {page} reported by {} only, no allowance explains it", against.label()));
                }
            }
        }
    }
    if a.rounds.len() != b.rounds.len() {
        findings.problems.push(format!(
            "{} harvests under {}, {} under {}",
            a.rounds.len(),
            spec.tracker.label(),
            b.rounds.len(),
            against.label()
        ));
    }
    findings.evidence.push(format!(
        "{} rounds compared with {}; {disagreements} unexplained differences",
        a.rounds.len().min(b.rounds.len()),
        against.label()
    ));
    Ok(findings)
}
