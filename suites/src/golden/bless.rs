//! Writing a golden matrix from runs (`trackcheck run --bless`), merged with the previous one.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::signature::{LEGEND, Signature};
use super::{Expected, Golden, raw_verdict};
use crate::trial::{TrialResult, Verdict};

const HEADER_SOURCE: &str = "suites/src/golden/bless.rs";

/// A new classification merged with the previous entry of the same trial. A recorded
/// failure is never forgotten: its signature is widened to cover the new failures
/// ([`Signature::widen`]), and where that widens it the evidence says from what, so the
/// reviewer of the diff sees it.
pub(super) fn merge(
    previous: Option<&(Expected, String)>,
    new: Expected,
    evidence: String,
) -> (Expected, String) {
    let Some((old, old_evidence)) = previous else {
        return (new, evidence);
    };
    let Some(old_sig) = old.signature() else {
        return (new, evidence);
    };
    let widened = |sig: &Signature, evidence: String| {
        let merged = old_sig.widen(sig);
        if merged == *old_sig {
            (merged, evidence)
        } else {
            let note = format!("{evidence}; signature widened from {old_sig}");
            (merged, note)
        }
    };
    match new {
        Expected::Fail(sig) if matches!(old, Expected::Fail(_)) => {
            let (s, ev) = widened(&sig, evidence);
            (Expected::Fail(s), ev)
        }
        Expected::Fail(sig) | Expected::Intermittent(sig) => {
            let (s, ev) = widened(&sig, evidence);
            (Expected::Intermittent(s), ev)
        }
        // Passing, skipping or idling now forgets nothing: the failure stays, intermittent.
        other => {
            let earlier: String = old_evidence.chars().take(160).collect();
            let now = match other {
                Expected::Pass => String::new(),
                other => format!(" (they were {}: {evidence})", other.token()),
            };
            (
                Expected::Intermittent(old_sig.clone()),
                format!("did not fail in these runs{now}; earlier: {earlier}"),
            )
        }
    }
}

/// A lost write as (slot, page, vCPU, seq).
type LostKey = (u32, u64, usize, u64);

/// What identifies one failure for telling steady from intermittent: its kind, and the lost
/// pages or the reason.
fn identity(r: &TrialResult) -> (Option<&'static str>, Vec<LostKey>, String) {
    let lost = r
        .lost
        .iter()
        .map(|l| (l.slot, l.page, l.vcpu, l.seq))
        .collect();
    let reason = if r.lost.is_empty() {
        r.reason.clone().unwrap_or_default()
    } else {
        String::new()
    };
    (r.fail_kind.map(|k| k.name()), lost, reason)
}

/// Build the golden matrix of `key` (host profile `@` kernel series) from `runs` (each a full
/// set of results of the same trials), merged with `previous`: a failure seen before is never forgotten by blessing (a trial that failed
/// earlier and passed in these runs stays intermittent, and signatures only widen). Each
/// failing trial's signature is derived from its failures ([`Signature::derive`]). To drop a
/// known failure after a kernel fix, or to narrow a signature, delete its line and bless again.
#[must_use]
pub fn bless(key: &str, kernel: &str, runs: &[Vec<TrialResult>], previous: &Golden) -> String {
    let mut by_name: BTreeMap<&str, Vec<&TrialResult>> = BTreeMap::new();
    for run in runs {
        for r in run {
            by_name.entry(r.name.as_str()).or_default().push(r);
        }
    }
    let mut entries: BTreeMap<&str, (Expected, String)> = previous
        .entries
        .iter()
        .filter(|(name, _)| !by_name.contains_key(name.as_str()))
        .map(|(name, entry)| (name.as_str(), entry.clone()))
        .collect();
    for (name, results) in &by_name {
        let (expected, evidence) = classify(results);
        entries.insert(name, merge(previous.entries.get(*name), expected, evidence));
    }
    let width = entries.keys().map(|n| n.len()).max().unwrap_or(40);
    // Signatures longer than the column push their line's evidence right; the rest align.
    let token_width = 22;
    let mut body = String::new();
    let profile = match key.split_once('@') {
        Some((profile, series)) => format!("host profile {profile}, kernel series {series}"),
        None => format!("host profile {key}"),
    };
    let _ = writeln!(body, "# trackcheck conformance matrix, {profile}");
    let _ = writeln!(
        body,
        "# kernel {kernel}; {} run(s) per trial; regenerate: trackcheck run --bless --repeat {}",
        runs.len(),
        runs.len()
    );
    let _ = writeln!(
        body,
        "# blessing derives each failure's signature from the failures it saw and merges it with the entry before:"
    );
    let _ = writeln!(
        body,
        "# a recorded failure is never forgotten, and a signature only widens (the evidence then says from what): review the diff"
    );
    for line in LEGEND {
        let _ = writeln!(body, "# {line}");
    }
    let _ = writeln!(
        body,
        "# {:<w$} {:<token_width$} evidence",
        "trial",
        "expected",
        w = width.saturating_sub(2)
    );
    for (name, (e, ev)) in &entries {
        let line = format!("{name:<width$} {:<token_width$} {ev}", e.token());
        let _ = writeln!(body, "{}", line.trim_end());
    }
    format!("---\nsource: {HEADER_SOURCE}\nexpression: conformance matrix of {key}\n---\n{body}")
}

/// The expectation and evidence that the runs of one trial show.
fn classify(results: &[&TrialResult]) -> (Expected, String) {
    let fails: Vec<&TrialResult> = results
        .iter()
        .copied()
        .filter(|r| {
            r.fail_kind.is_some()
                && matches!(raw_verdict(r), Verdict::Fail | Verdict::KnownFailure)
                && !super::kernel_rule::explained_by_late_rule(r)
        })
        .collect();
    let passes = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Pass | Verdict::UnexpectedPass))
        .count();
    if !fails.is_empty() {
        let first = fails[0].reason.as_deref().unwrap_or("");
        let first: String = first.chars().take(160).collect();
        let ev = format!(
            "{}/{} runs failed; first: {first}",
            fails.len(),
            results.len()
        );
        let sig = Signature::derive(&fails);
        // `fail` means fails every run the same way; a failure whose details (the lost
        // pages, the problem) change between runs depends on timing and may not show at
        // all next time: intermittent.
        let same = fails.iter().all(|r| identity(r) == identity(fails[0]));
        return if passes == 0 && same && fails.len() == results.len() {
            (Expected::Fail(sig), ev)
        } else {
            (Expected::Intermittent(sig), ev)
        };
    }
    if results.iter().all(|r| raw_verdict(r) == Verdict::Skip) {
        return (
            Expected::Skip,
            results[0].reason.clone().unwrap_or_default(),
        );
    }
    if let Some(first) = results
        .iter()
        .find(|r| raw_verdict(r) == Verdict::NotExercised)
    {
        // Some runs (or all) could not exercise the path: the golden file accepts both.
        let n = results
            .iter()
            .filter(|r| raw_verdict(r) == Verdict::NotExercised)
            .count();
        return (
            Expected::NotExercised,
            format!(
                "{n}/{} runs not exercised: {}",
                results.len(),
                first.reason.as_deref().unwrap_or("")
            ),
        );
    }
    if let Some(e) = results.iter().find(|r| r.verdict == Verdict::Error) {
        return (Expected::Error, e.reason.clone().unwrap_or_default());
    }
    (Expected::Pass, String::new())
}
