//! Kernel-wide golden entries: a kernel behaviour recorded once per golden file, because it can
//! show in any trial of a family rather than in the trials that happened to show it so far.
//!
//! The one rule so far is the **late report**, `<arch>::kernel::late-report`, recorded as
//! `intermittent:lost(in-flight-fault+guest-write)` with its evidence: a page a vCPU wrote (and
//! published) before a collect that missed it, reported by a later harvest, while another vCPU
//! whose next write went to that page made no progress in between — it was inside a write
//! fault on the page. KVM makes a faulting page's mapping writable before it marks the page
//! dirty (x86 `fast_pf_fix_direct_spte`: the cmpxchg, then `mark_page_dirty_in_slot`; arm64
//! `user_mem_abort`: after `kvm_fault_unlock`), so the other vCPU's write through the new
//! mapping can be published before the dirty bit is set; a preemptible kernel, where the
//! faulting thread can lose its CPU in between, widens the window. The content is right once
//! the page is reported; the collect still broke its contract ("pages dirtied since the last
//! call"), so such trials are *known failures* (listed in every report, with the pages), never
//! passes.
//!
//! What the rule cannot hide: a page no later harvest reported, one the final comparison finds,
//! or one reported again with no vCPU held in a fault on it is judged as before, and the
//! trial's own entry applies to it. In a self-test, late pages the fault touched stay judged —
//! every injected drop must still be named — and only late pages the fault did not touch move
//! to the evidence.

use trackcheck_harness::oracle::LostPage;

use super::Golden;
use crate::trial::{FailKind, TrialResult, Verdict};

/// How a known failure's evidence starts when the late-report rule explained it.
pub const WITHIN_LATE_RULE: &str = "within the kernel-wide golden entry ";

/// The entry name of the late-report rule for the architecture of trial `name`.
#[must_use]
pub fn late_report_entry(name: &str) -> String {
    let arch = name.split("::").next().unwrap_or(name);
    format!("{arch}::kernel::late-report")
}

/// Whether `r` is a known failure the late-report rule explained (blessing records no entry of
/// its own for it).
#[must_use]
pub fn explained_by_late_rule(r: &TrialResult) -> bool {
    r.verdict == Verdict::KnownFailure && r.evidence.iter().any(|e| e.starts_with(WITHIN_LATE_RULE))
}

/// Apply the late-report rule of `golden` (if it has one) to `result`. Returns whether the
/// result is fully judged (a known failure by the rule); otherwise the caller judges what is
/// left as usual.
pub(super) fn apply_late_rule(golden: &Golden, result: &mut TrialResult) -> bool {
    let name = late_report_entry(&result.name);
    let Some((expected, _)) = golden.entries.get(&name) else {
        return false;
    };
    let Some(sig) = expected.signature() else {
        return false;
    };
    if result.lost.is_empty() {
        return false;
    }
    let (late, rest) = sig.split_losses(result);
    let touched: std::collections::BTreeSet<(u32, u64)> =
        result.injected_pages.iter().flatten().copied().collect();
    // A self-test keeps every late page its fault touched: those must be named.
    let (late, kept): (Vec<LostPage>, Vec<LostPage>) = late
        .into_iter()
        .partition(|l| !touched.contains(&(l.slot, l.page)));
    if late.is_empty() {
        return false;
    }
    let token = expected.token();
    let first = crate::trial::first_lost(&late);
    let mut rest: Vec<LostPage> = rest;
    rest.extend(kept);
    let only_lost = result.hazards.is_empty()
        && result.problems.is_empty()
        && result.fail_kind == Some(FailKind::Lost);
    if rest.is_empty() && only_lost && result.inject().is_none() {
        result.verdict = Verdict::KnownFailure;
        result.evidence.push(format!(
            "{WITHIN_LATE_RULE}{name} ({token}) of {}: {} page(s) reported late behind a write fault in flight",
            golden.path.display(),
            late.len()
        ));
        return true;
    }
    result.evidence.push(format!(
        "{} page(s) reported late behind a write fault in flight, the kernel's recorded behaviour ({name}, {token}), not judged: {first}",
        late.len()
    ));
    result.lost = rest;
    if result.lost.is_empty() {
        if result.fail_kind == Some(FailKind::Lost) {
            // A self-test whose every lost page was the kernel's late report: its fault went
            // unnamed, which the self-test judge reports.
            result.reason = Some(format!(
                "every lost page was reported late behind a write fault in flight, the kernel's recorded behaviour ({name}): the injected loss was not named"
            ));
        }
    } else if result.fail_kind == Some(FailKind::Lost) {
        result.reason = Some(format!(
            "lost {} page(s): {}",
            result.lost.len(),
            crate::trial::first_lost(&result.lost)
        ));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::Expected;
    use crate::spec::TrialSpec;
    use trackcheck_harness::Backing;
    use trackcheck_harness::oracle::DataLayout;
    use trackcheck_harness::track::inject::Fault;

    fn golden() -> Golden {
        let mut g = Golden::default();
        g.entries.insert(
            "x86_64::kernel::late-report".into(),
            (
                Expected::parse("intermittent:lost(in-flight-fault+guest-write)").expect("token"),
                "evidence".into(),
            ),
        );
        g
    }

    fn page(page: u64, late: Option<bool>) -> LostPage {
        let mut l = LostPage::at(&DataLayout::single(2, 64), page, 1, 40 + page, 3);
        if let Some(late) = late {
            l.reported_at = Some(5);
            l.stalled_writer = late.then_some(2);
        }
        l
    }

    fn failed(pages: Vec<LostPage>, inject: Option<Fault>) -> TrialResult {
        let mut spec = TrialSpec::example(Backing::Anon);
        spec.inject = inject;
        let mut r = TrialResult::new(&spec, 1);
        r.name = "x86_64::dirty-log::concurrent-hot-cold-v4::anon::native".into();
        r.verdict = Verdict::Fail;
        r.fail_kind = Some(FailKind::Lost);
        r.reason = Some("lost".into());
        r.lost = pages;
        r
    }

    #[test]
    fn a_trial_whose_only_losses_are_late_is_a_known_failure() {
        let mut r = failed(vec![page(1, Some(true)), page(2, Some(true))], None);
        assert!(apply_late_rule(&golden(), &mut r));
        assert_eq!(r.verdict, Verdict::KnownFailure);
        assert_eq!(r.lost.len(), 2, "the pages stay in the report");
        assert!(explained_by_late_rule(&r));
    }

    #[test]
    fn a_lasting_loss_beside_late_pages_stays_a_failure() {
        for other in [Some(false), None] {
            let mut r = failed(vec![page(1, Some(true)), page(2, other)], None);
            assert!(!apply_late_rule(&golden(), &mut r));
            assert_eq!(r.verdict, Verdict::Fail);
            assert_eq!(r.lost.len(), 1);
            assert_eq!(r.lost[0].page, 2);
            assert!(
                r.reason.as_deref().unwrap_or("").contains("page 2"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn without_the_entry_nothing_changes() {
        let mut r = failed(vec![page(1, Some(true))], None);
        assert!(!apply_late_rule(&Golden::default(), &mut r));
        assert_eq!(r.verdict, Verdict::Fail);
        assert_eq!(r.lost.len(), 1);
    }

    /// In a self-test, a late page the fault touched must still be named; one it did not
    /// touch is the kernel's and moves to the evidence.
    #[test]
    fn a_self_test_keeps_the_late_pages_its_fault_touched() {
        let mut r = failed(
            vec![page(1, Some(true)), page(7, Some(true))],
            Some(Fault::DropPage),
        );
        r.injected_pages = Some(vec![(2, 1)]);
        assert!(!apply_late_rule(&golden(), &mut r));
        assert_eq!(r.verdict, Verdict::Fail);
        let named: Vec<u64> = r.lost.iter().map(|l| l.page).collect();
        assert_eq!(named, vec![1]);
        assert!(r.evidence.iter().any(|e| e.contains("not judged")));
    }
}
