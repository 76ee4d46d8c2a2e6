use std::collections::BTreeMap;

use trackcheck_harness::oracle::LostPage;
use trackcheck_harness::track::TrackerSpec;
use trackcheck_harness::{Backing, ExecutionMode};

use super::*;
use crate::spec::{Scenario, TrialSpec};
use crate::trial::Verdict;

fn lp(vcpu: usize, seq: u64) -> LostPage {
    LostPage {
        slot: 2,
        page: seq % 512,
        gpa: 0,
        vcpu,
        seq,
        round: 3,
        block_reported: None,
        ring_full: None,
        reported_at: None,
        stalled_writer: None,
    }
}

fn failing(pages: Vec<LostPage>, hazards: &[&str]) -> TrialResult {
    let spec = TrialSpec {
        tracker: TrackerSpec::DirtyRing {
            bytes: 4096,
            with_bitmap: false,
        },
        scenario: Scenario::Stepped,
        backing: Backing::Anon,
        mode: ExecutionMode::Emulated,
        inject: None,
    };
    let mut r = TrialResult::new(&spec, 1);
    r.verdict = Verdict::Fail;
    r.fail_kind = Some(if pages.is_empty() {
        FailKind::Hazard
    } else {
        FailKind::Lost
    });
    r.reason = Some("x".into());
    r.lost = pages;
    r.hazards = hazards.iter().map(ToString::to_string).collect();
    r
}

const STUCK_1: &str = "vCPU 1 stuck on KVM_EXIT_DIRTY_RING_FULL for 2s although the host kept collecting and resetting the rings (progress 2037)";
const STUCK_ALL: &str = "vCPUs stuck on KVM_EXIT_DIRTY_RING_FULL: 1000 runs in a row without progress although the rings were collected and reset (progress [526, 1800])";

#[test]
fn ring_full_writer_needs_the_recorded_fact() {
    let none = BTreeMap::new();
    let p = PagePredicate::RingFullWriter;
    let mut l = lp(0, 5);
    assert!(!p.holds(&l, &none), "unknown is not true");
    l.ring_full = Some(false);
    assert!(!p.holds(&l, &none));
    l.ring_full = Some(true);
    assert!(p.holds(&l, &none));
}

#[test]
fn block_reported_needs_a_reported_neighbour() {
    let none = BTreeMap::new();
    let p = PagePredicate::BlockReported;
    let mut l = lp(0, 5);
    assert!(!p.holds(&l, &none), "unknown is not true");
    l.block_reported = Some(0);
    assert!(!p.holds(&l, &none));
    l.block_reported = Some(1);
    assert!(p.holds(&l, &none));
}

#[test]
fn in_flight_fault_needs_the_report_and_the_stalled_writer() {
    let none = BTreeMap::new();
    let p = PagePredicate::InFlightFault;
    let mut l = lp(0, 5);
    assert!(
        !p.holds(&l, &none),
        "unknown (the final comparison) is not late"
    );
    l.reported_at = Some(4);
    assert!(
        !p.holds(&l, &none),
        "reported again, but no vCPU held in a fault on it"
    );
    l.stalled_writer = Some(1);
    assert!(p.holds(&l, &none));
    l.reported_at = None;
    assert!(!p.holds(&l, &none), "never reported again");
    assert_eq!(
        PagePredicate::parse("in-flight-fault"),
        Some(PagePredicate::InFlightFault)
    );
}

/// A trial recorded as `lost(in-flight-fault)` fails as new when one of its pages is no late
/// report.
#[test]
fn a_lasting_loss_is_outside_a_late_report_signature() {
    let mut late = lp(0, 5);
    late.reported_at = Some(4);
    late.stalled_writer = Some(1);
    let sig = Signature::derive(&[&failing(vec![late.clone()], &[])]);
    assert_eq!(sig.to_string(), "lost(in-flight-fault+guest-write)");
    assert!(sig.outside(&failing(vec![late.clone()], &[])).is_empty());
    let mut again = lp(1, 9);
    again.reported_at = Some(4);
    assert_eq!(sig.outside(&failing(vec![late, again], &[])).len(), 1);
    assert_eq!(
        sig.outside(&failing(vec![lp(1, 9)], &[])).len(),
        1,
        "a final-comparison loss"
    );
}

#[test]
fn write_classes_partition_the_lost_writes() {
    let none = BTreeMap::new();
    let all = [
        PagePredicate::GuestWrite,
        PagePredicate::KvmWrite,
        PagePredicate::TableChange,
    ];
    for (seq, which) in [
        (7, PagePredicate::GuestWrite),
        (LostPage::KVM_WRITE, PagePredicate::KvmWrite),
        (LostPage::TABLE_CHANGE, PagePredicate::TableChange),
    ] {
        let holding: Vec<&PagePredicate> =
            all.iter().filter(|p| p.holds(&lp(0, seq), &none)).collect();
        assert_eq!(holding, vec![&which]);
    }
}

#[test]
fn stuck_writer_tail_reads_both_drivers_hazards() {
    let stuck = stuck_vcpus(&[STUCK_1.into(), "vCPU 0 shut down".into()]);
    assert_eq!(stuck, BTreeMap::from([(1, 2037)]));
    let stuck_all = stuck_vcpus(&[STUCK_ALL.into()]);
    assert_eq!(stuck_all, BTreeMap::from([(0, 526), (1, 1800)]));
    let p = PagePredicate::StuckWriterTail(512);
    assert!(p.holds(&lp(1, 1584), &stuck), "453 writes before it stuck");
    assert!(!p.holds(&lp(1, 1000), &stuck), "1037 writes before");
    assert!(!p.holds(&lp(0, 2030), &stuck), "vCPU 0 was not stuck");
    assert!(
        !p.holds(&lp(1, 2040), &stuck),
        "after its progress: no tail"
    );
    assert!(!p.holds(&lp(1, LostPage::KVM_WRITE), &stuck));
    assert!(p.holds(&lp(0, 20), &stuck_all));
}

#[test]
fn derive_picks_every_predicate_all_failures_satisfy() {
    let mut a = lp(1, 1584);
    a.ring_full = Some(true);
    a.block_reported = Some(0);
    let mut b = lp(1, 2000);
    b.ring_full = Some(true);
    let fails = [
        failing(vec![a.clone()], &[STUCK_1]),
        failing(vec![b], &[STUCK_1]),
    ];
    let refs: Vec<&TrialResult> = fails.iter().collect();
    let sig = Signature::derive(&refs);
    assert_eq!(
        sig.to_string(),
        "hazard(ring-full-stuck)|lost(ring-full-writer+stuck-writer-tail:512+guest-write)"
    );
    // One failure without the facts: only what holds for all stays.
    let fails = [failing(vec![a], &[STUCK_1]), failing(vec![lp(0, 3)], &[])];
    let refs: Vec<&TrialResult> = fails.iter().collect();
    assert_eq!(
        Signature::derive(&refs).to_string(),
        "hazard(ring-full-stuck)|lost(guest-write)"
    );
    // Mixed write classes and no facts: any lost page.
    let fails = [failing(vec![lp(0, 3), lp(0, LostPage::KVM_WRITE)], &[])];
    let refs: Vec<&TrialResult> = fails.iter().collect();
    assert_eq!(Signature::derive(&refs).to_string(), "lost(any)");
    // A hazard-only failure: the hazard's class, no lost clause.
    let warn = "kernel: WARNING: CPU: 0 PID: 1 at virt/kvm/kvm_main.c:3000 f+0x0/0x1";
    let fails = [failing(Vec::new(), &[warn])];
    let refs: Vec<&TrialResult> = fails.iter().collect();
    assert_eq!(
        Signature::derive(&refs).to_string(),
        "hazard(warn@virt/kvm/kvm_main.c:3000)"
    );
}

#[test]
fn widening_intersects_predicates_and_unites_classes() {
    let s = |t: &str| Signature::parse(t).expect(t);
    let old = s("hazard(ring-full-stuck)|lost(block-reported+stuck-writer-tail:256)");
    assert_eq!(old.widen(&old), old);
    assert_eq!(
        old.widen(&s(
            "lost(block-reported+stuck-writer-tail:1024+guest-write)"
        ))
        .to_string(),
        "hazard(ring-full-stuck)|lost(block-reported+stuck-writer-tail:1024)"
    );
    assert_eq!(
        old.widen(&s("hazard(oops)|lost(guest-write)")).to_string(),
        "hazard(ring-full-stuck,oops)|lost(any)"
    );
    assert_eq!(
        old.widen(&s("problem(any)")).to_string(),
        "hazard(ring-full-stuck)|lost(block-reported+stuck-writer-tail:256)|problem(any)"
    );
    assert_eq!(
        s("hazard(any)").widen(&s("hazard(oops)")).to_string(),
        "hazard(any)"
    );
}

#[test]
fn outside_names_each_unexplained_finding() {
    let sig = Signature::parse("hazard(ring-full-stuck)|lost(stuck-writer-tail:512)").expect("sig");
    assert!(
        sig.outside(&failing(vec![lp(1, 1600)], &[STUCK_1]))
            .is_empty()
    );
    let why = sig.outside(&failing(vec![lp(1, 1600), lp(1, 10)], &[STUCK_1]));
    assert_eq!(why.len(), 1);
    assert!(
        why[0].starts_with("1 of 2 lost page(s) outside it"),
        "{why:?}"
    );
    let mut r = failing(vec![lp(1, 1600)], &[STUCK_1, "kernel: BUG: x"]);
    r.problems.push("CLEAR accepted an unaligned range".into());
    let why = sig.outside(&r);
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why[0].contains("class oops") && why[1].contains("a problem"));
}
