//! The anchor's model side and its comparison, each shown to catch what it must.

use trackcheck_harness::machine::DATA_SLOT;
use trackcheck_harness::oracle::ExtraRecord;
use trackcheck_harness::track::{Allowance, PageSet};

use super::anchor::{self, ModelRun, compare, run_model};
use super::baseline::{self, Baseline};
use super::mmu::{Mmu, WalkKind, bits};
use super::world::{Costs, Design, HostOp};

fn kvm_like(model: &ModelRun) -> Vec<PageSet> {
    model
        .rounds
        .iter()
        .map(|&m| {
            let mut s = PageSet::new();
            for p in bits(m, 64) {
                s.insert(DATA_SLOT, p as u64);
            }
            s
        })
        .collect()
}

fn model(seed: u64) -> ModelRun {
    run_model(&Baseline::default(), &anchor::program(seed)).expect("the model runs")
}

#[test]
fn the_model_reports_exactly_what_each_segment_wrote() {
    for seed in anchor::SEED..anchor::SEED + anchor::SEEDS {
        let m = model(seed);
        // Baseline harvest, 6 segments up to each Sync, the tail after Sync(6), the final one.
        assert_eq!(m.rounds.len(), 9, "seed {seed}");
        assert_eq!(m.rounds, m.required, "seed {seed}");
        assert_eq!((m.rounds[0], m.rounds[7], m.rounds[8]), (0, 0, 0));
        assert!(m.rounds[1..7].iter().all(|&r| r.count_ones() > 8));
        assert!(m.report.lost.is_empty() && m.report.unexplained == 0);
        let sum: u64 = m.required.iter().map(|r| u64::from(r.count_ones())).sum();
        assert_eq!(m.report.written, sum);
    }
}

#[test]
fn equal_sets_agree_in_every_harvest() {
    let m = model(anchor::SEED);
    let c = compare(&m, &kvm_like(&m), &[], m.report.written);
    assert_eq!((c.rounds, c.equal, c.different), (9, 9, 0), "{c:?}");
    assert_eq!(c.model_pages, c.kvm_pages);
}

#[test]
fn a_page_kvm_did_not_report_is_a_difference_named_as_a_loss() {
    let m = model(anchor::SEED);
    let mut kvm = kvm_like(&m);
    let page = bits(m.rounds[2], 64).next().expect("round 2 wrote pages") as u64;
    let mut dropped = PageSet::new();
    for (s, p) in kvm[2].iter().filter(|&(_, p)| p != page) {
        dropped.insert(s, p);
    }
    kvm[2] = dropped;
    let c = compare(&m, &kvm, &[], m.report.written);
    assert_eq!((c.equal, c.different), (8, 1), "{c:?}");
    let why = &c.differences[0];
    assert!(
        why.contains(&format!("harvest 3: the model reported page {page}")),
        "{why}"
    );
    assert!(why.contains("KVM lost it"), "{why}");
}

#[test]
fn a_page_only_kvm_reported_needs_an_allowance_of_that_harvest() {
    let m = model(anchor::SEED);
    let mut kvm = kvm_like(&m);
    kvm[0].insert(DATA_SLOT, 5);
    let extra = |allowance| ExtraRecord {
        round: 1,
        slot: DATA_SLOT,
        page: 5,
        allowance,
    };
    let c = compare(
        &m,
        &kvm,
        &[extra(Some(Allowance::InitiallySet))],
        m.report.written,
    );
    assert_eq!(c.different, 0, "{c:?}");
    assert_eq!(c.allowed.get("initially-set"), Some(&1));
    assert_eq!(
        c.equal, 8,
        "an allowed extra still makes the harvest unequal"
    );
    for extras in [vec![extra(None)], vec![]] {
        let c = compare(&m, &kvm, &extras, m.report.written);
        assert_eq!(c.different, 1, "{c:?}");
        assert!(c.differences[0].contains("no allowance explains it"));
    }
    // An allowance of another harvest does not explain it.
    let mut other = extra(Some(Allowance::InitiallySet));
    other.round = 2;
    assert_eq!(compare(&m, &kvm, &[other], m.report.written).different, 1);
}

#[test]
fn harvest_counts_and_required_totals_must_match() {
    let m = model(anchor::SEED);
    let kvm = kvm_like(&m);
    let c = compare(&m, &kvm[..8], &[], m.report.written);
    assert!(c.differences[0].contains("9 harvests in the model, 8 on KVM"));
    let c = compare(&m, &kvm, &[], m.report.written + 1);
    assert_eq!(c.different, 1);
    assert!(c.differences[0].contains("the model required"));
}

/// The baseline with a fault handler that makes the page writable without logging it.
#[derive(Debug)]
struct Forgetful;

impl Design for Forgetful {
    fn name(&self) -> String {
        "forgetful".into()
    }
    fn walk_kind(&self) -> WalkKind {
        Baseline::default().walk_kind()
    }
    fn round(&self) -> Vec<HostOp> {
        Baseline::default().round()
    }
    fn enable_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        baseline::write_protect(m, page, c);
    }
    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, _c: &mut Costs) {
        m.split(page);
        m.leaf[page].w = true;
    }
    fn clear_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        baseline::clear_and_protect(m, page, c);
    }
}

#[test]
fn a_model_that_loses_writes_disagrees_with_a_kvm_that_does_not() {
    let good = model(anchor::SEED);
    let bad = run_model(&Forgetful, &anchor::program(anchor::SEED)).expect("runs to the end");
    assert!(!bad.report.lost.is_empty());
    let c = compare(&bad, &kvm_like(&good), &[], good.report.written);
    assert!(c.different > 1, "{c:?}");
    let named = |what: &str| c.differences.iter().any(|d| d.contains(what));
    assert!(named("the model's own oracle"), "{c:?}");
    assert!(named("the model did not"), "{c:?}");
}

/// On a host with KVM: the baseline agrees with it on every harvest (modulo the allowances).
#[test]
fn the_baseline_agrees_with_kvm_here() {
    let a = anchor::run();
    if let Some(why) = &a.skip {
        eprintln!("skip: {why}");
        return;
    }
    for e in &a.evidence {
        println!("{e}");
    }
    assert_eq!(a.error, None);
    assert!(a.failure.is_none(), "{:?}", a.failure);
    assert!(
        a.total.rounds > 0 && a.total.different == 0,
        "{:?}",
        a.total
    );
}
