//! The baseline model held against real KVM: `model::wp-manual::anchor-stepped`.
//!
//! The same deterministic stepped programs run twice: on the baseline model ([`Baseline`],
//! write-protect dirty logging with manual-protect CLEAR) and on this host's KVM with
//! `clear-log` (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG, without and with INITIALLY_SET), in
//! both execution modes. Both follow the stepped schedule of the matrix's `stepped` trials:
//! a baseline harvest before the guest runs, then every vCPU runs to its next `Sync` and the
//! host harvests (GET, CLEAR, copy), and a final harvest after every vCPU is done. Per harvest
//! the two reported page sets are compared.
//!
//! The programs are the matrix's (`programs::stepped`, seeded) with the sizes the model holds:
//! 64 data pages (the model's page masks are one `u64`) and 8 random writes per vCPU and round
//! instead of 40, so that a round writes about half the pages, not nearly all of them.
//!
//! Allowances, exactly:
//! - KVM may report a page the model does not only where KVM's own oracle explains it by one
//!   of the tracker's documented allowances in that harvest (`initially-set`: the first GET
//!   after enabling with KVM_DIRTY_LOG_INITIALLY_SET reports every page). Any other page KVM
//!   reports beyond the model (a huge-page artefact included: the data region is 4 KiB anon
//!   memory mapped by 4 KiB guest pages, so none is expected) is a disagreement.
//! - The model may never report a page KVM does not: that is KVM losing a write (its own
//!   oracle names it too) or the model reporting a page no write explains.
//! - The model must never require a page KVM cannot know about: per harvest it requires
//!   exactly the pages the program wrote since the previous one (its oracle's total must
//!   equal KVM's oracle's total), and it reports no page beyond them (its oracle counts none
//!   unexplained).
//! - The number of harvests must be equal.
//!
//! What it cannot see: concurrency (the guest is stopped at every harvest, as in the stepped
//! trials; the exhaustive trials cover interleavings on the model side only), huge mappings,
//! and anything KVM does outside the data slot but for pages it reports there.

use std::collections::BTreeMap;

use trackcheck_guests::Program;
use trackcheck_guests::sim::{Event, ThreadEvents};
use trackcheck_harness::machine::DATA_SLOT;
use trackcheck_harness::oracle::{ExtraRecord, OracleReport};
use trackcheck_harness::track::{ClearGranularity, PageSet, TrackerSpec};
use trackcheck_harness::{Backing, ExecutionMode, HostProfile};

use super::baseline::Baseline;
use super::mmu::{bit, bits};
use super::scenarios::small;
use super::world::{Actor, Design, HostOp, Setup, VState, World};
use crate::scenarios::{self, TrialError};
use crate::spec::{Scenario, TrialSpec};
use crate::trial::FailKind;

/// Data pages of the anchor programs (the model's limit).
pub const PAGES: u64 = 64;
/// vCPUs of the anchor programs.
pub const VCPUS: usize = 2;
/// Programs per (tracker, mode): seeds `seed..seed + SEEDS`.
pub const SEEDS: u64 = 4;
/// The first seed.
pub const SEED: u64 = 0x0a4c_4012;

/// The stepped program of `seed`: the matrix's generator at the model's size.
#[must_use]
pub fn program(seed: u64) -> Program {
    crate::programs::stepped(seed, VCPUS, PAGES, 6, 8)
}

/// The real side: the trackers and modes the model is held against.
#[must_use]
pub fn specs() -> Vec<TrialSpec> {
    let mut out = Vec::new();
    for initially_set in [false, true] {
        for mode in [ExecutionMode::Native, ExecutionMode::Emulated] {
            out.push(TrialSpec {
                tracker: TrackerSpec::ClearLog {
                    initially_set,
                    granularity: ClearGranularity::Whole,
                },
                scenario: Scenario::Stepped,
                backing: Backing::Anon,
                mode,
                inject: None,
            });
        }
    }
    out
}

/// What the model reported, harvest by harvest.
#[derive(Clone, Debug)]
pub struct ModelRun {
    /// Pages each harvest reported (bit per page).
    pub rounds: Vec<u64>,
    /// Pages each harvest had to report: written since the previous one.
    pub required: Vec<u64>,
    /// The model's oracle.
    pub report: OracleReport,
}

/// Per vCPU, the access count at the end of each segment (up to each `Sync`, then the tail).
fn segment_ends(program: &Program) -> Vec<Vec<usize>> {
    program
        .vcpus
        .iter()
        .map(|t| {
            let mut n = 0;
            let mut ends = Vec::new();
            for e in ThreadEvents::with_seq_base(t, program.seq_base) {
                match e {
                    Event::Write { .. } | Event::Read { .. } => n += 1,
                    Event::Sync(_) => ends.push(n),
                    Event::Done { .. } | Event::Misbehave(_) => break,
                }
            }
            ends.push(n);
            ends
        })
        .collect()
}

/// Step `actor` while `more(world)`, failing if it cannot move.
fn step_while(
    w: &mut World,
    design: &dyn Design,
    setup: &Setup,
    ops: &[HostOp],
    actor: Actor,
    more: impl Fn(&World) -> bool,
) -> Result<(), String> {
    for _ in 0..100_000 {
        if !more(w) {
            return Ok(());
        }
        if !w.enabled(setup, ops).contains(&actor) {
            return Err(format!(
                "the model is stuck: {actor:?} cannot move (host at {:?}, vCPUs {:?})",
                ops.get(w.host.0),
                w.vcpus
            ));
        }
        w.step(design, setup, ops, actor);
    }
    Err(format!("the model did not finish {actor:?}'s steps"))
}

/// Run `program` on `design` in the stepped schedule (see the module doc).
pub fn run_model(design: &dyn Design, program: &Program) -> Result<ModelRun, String> {
    let pages = usize::try_from(program.data_pages).unwrap_or(usize::MAX);
    let setup = Setup::new(program, small(pages, program.vcpu_count()), false, 0);
    let ends = segment_ends(program);
    let segments = ends.iter().map(Vec::len).max().unwrap_or(0);
    let mut ops = design.enable();
    ops.push(HostOp::CopyAll);
    let enable = ops.len();
    let round = design.round();
    for _ in 0..segments + 2 {
        ops.extend(round.iter().copied());
    }
    let mut w = World::new(&setup);
    let mut out = ModelRun {
        rounds: Vec::new(),
        required: Vec::new(),
        report: OracleReport::default(),
    };
    let harvest = |w: &mut World, out: &mut ModelRun, required: u64| {
        let to = w.host.0 + round.len();
        step_while(w, design, &setup, &ops, Actor::Host, |w| w.host.0 < to)?;
        out.rounds.push(w.reported);
        out.required.push(required);
        Ok::<(), String>(())
    };
    step_while(&mut w, design, &setup, &ops, Actor::Host, |w| {
        w.host.0 < enable
    })?;
    harvest(&mut w, &mut out, 0)?;
    for s in 0..segments {
        let mut written = 0;
        for (v, e) in ends.iter().enumerate() {
            let (from, to) = (w.vcpus[v].0, e.get(s).copied().unwrap_or(w.vcpus[v].0));
            for &(page, write) in &setup.accesses[v][from..to] {
                if write {
                    written |= bit(page);
                }
            }
            step_while(&mut w, design, &setup, &ops, Actor::Vcpu(v), |w| {
                w.vcpus[v].0 < to || w.vcpus[v].1 != VState::Run
            })?;
        }
        harvest(&mut w, &mut out, written)?;
    }
    harvest(&mut w, &mut out, 0)?;
    out.report = w.ledger.report().clone();
    Ok(out)
}

/// How one program's harvests compared.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Harvests compared.
    pub rounds: usize,
    /// Harvests with equal sets.
    pub equal: usize,
    /// Pages the model reported, summed over harvests.
    pub model_pages: u64,
    /// Pages KVM reported, summed over harvests.
    pub kvm_pages: u64,
    /// Pages KVM reported beyond the model, by the allowance that explains them.
    pub allowed: BTreeMap<String, u64>,
    /// Everything that breaks the allowances (the first few named).
    pub differences: Vec<String>,
    /// Differences in all.
    pub different: usize,
}

impl Comparison {
    fn differ(&mut self, what: String) {
        self.different += 1;
        if self.differences.len() < 5 {
            self.differences.push(what);
        }
    }
}

/// Compare the model's harvests with KVM's (`kvm`: each harvest's reported set; `extras`: KVM's
/// oracle's classification of the pages it reported beyond what was written; `kvm_written`:
/// KVM's oracle's count of pages that had to be reported).
#[must_use]
pub fn compare(
    model: &ModelRun,
    kvm: &[PageSet],
    extras: &[ExtraRecord],
    kvm_written: u64,
) -> Comparison {
    let mut c = Comparison::default();
    if model.rounds.len() != kvm.len() {
        c.differ(format!(
            "{} harvests in the model, {} on KVM",
            model.rounds.len(),
            kvm.len()
        ));
    }
    if model.report.written != kvm_written {
        c.differ(format!(
            "the model required {} page reports, KVM's oracle {kvm_written}",
            model.report.written
        ));
    }
    if model.report.unexplained != 0 || !model.report.lost.is_empty() {
        c.differ(format!(
            "the model's own oracle: {} unexplained extra page(s), {} lost",
            model.report.unexplained,
            model.report.lost.len()
        ));
    }
    for (i, (&m, k)) in model.rounds.iter().zip(kvm).enumerate() {
        let round = u32::try_from(i + 1).unwrap_or(u32::MAX);
        c.rounds += 1;
        c.model_pages += u64::from(m.count_ones());
        c.kvm_pages += k.len();
        let mut equal = true;
        for (slot, page) in k.iter() {
            let in_model = slot == DATA_SLOT && page < 64 && m & (1u64 << page) != 0;
            if in_model {
                continue;
            }
            equal = false;
            let why = extras
                .iter()
                .find(|e| (e.round, e.slot, e.page) == (round, slot, page))
                .and_then(|e| e.allowance);
            match why {
                Some(a) => *c.allowed.entry(a.name().to_string()).or_default() += 1,
                None => c.differ(format!(
                    "harvest {round}: KVM reported slot {slot} page {page}, the model did not, and no allowance explains it"
                )),
            }
        }
        for p in bits(m, 64).filter(|&p| !k.contains(DATA_SLOT, p as u64)) {
            equal = false;
            let req = if model.required.get(i).is_some_and(|r| r & bit(p) != 0) {
                "written in that round: KVM lost it"
            } else {
                "not written in that round"
            };
            c.differ(format!(
                "harvest {round}: the model reported page {p}, KVM did not ({req})"
            ));
        }
        if equal {
            c.equal += 1;
        }
    }
    c
}

/// What the anchor trial found.
#[derive(Debug, Default)]
pub struct Anchor {
    /// Why it failed, with the kind.
    pub failure: Option<(FailKind, String)>,
    /// Why it skipped (nothing could run here).
    pub skip: Option<String>,
    /// Why the harness could not run it.
    pub error: Option<String>,
    /// Figures and per-run lines.
    pub evidence: Vec<String>,
    /// Totals over every run.
    pub total: Comparison,
    /// Page reports the model required, summed.
    pub written: u64,
}

/// Run the anchor on this host: every (tracker, mode) of [`specs`] with [`SEEDS`] programs.
#[must_use]
pub fn run() -> Anchor {
    let mut a = Anchor::default();
    let host = HostProfile::probe();
    if let Some(why) = &host.kvm_unavailable {
        a.skip = Some(format!("needs KVM to hold the model against: {why}"));
        return a;
    }
    let design = Baseline::default();
    let mut ran = 0;
    let mut skipped = Vec::new();
    let mut lost = Vec::new();
    for spec in specs() {
        let label = format!("{} {}", spec.tracker.label(), spec.mode);
        if let Err(why) = scenarios::precheck(&spec, &host) {
            skipped.push(format!("{label}: {why}"));
            continue;
        }
        for seed in SEED..SEED + SEEDS {
            let program = program(seed);
            let model = match run_model(&design, &program) {
                Ok(m) => m,
                Err(e) => {
                    a.error = Some(format!("the model could not run seed {seed}: {e}"));
                    return a;
                }
            };
            let kvm = match kvm_run(&spec, &program) {
                Ok(k) => k,
                Err(TrialError::Skip(why)) => {
                    skipped.push(format!("{label}: {why}"));
                    break;
                }
                Err(TrialError::Error(why)) => {
                    a.error = Some(format!("{label} seed {seed}: {why}"));
                    return a;
                }
                Err(TrialError::Hazard(why)) => {
                    a.failure = Some((FailKind::Hazard, format!("{label} seed {seed}: {why}")));
                    return a;
                }
            };
            ran += 1;
            if let Some(h) = kvm.findings.hazards.first() {
                a.failure = Some((FailKind::Hazard, format!("{label} seed {seed}: {h}")));
                return a;
            }
            let r = &kvm.findings.report;
            lost.extend(r.lost.iter().map(|l| format!("{label} seed {seed}: {l}")));
            let c = compare(&model, &kvm.rounds, &kvm.extras, r.written);
            a.evidence.push(format!(
                "{label} seed {seed:#x}: {}/{} harvests equal; model {} pages, KVM {} ({:?} allowed); {} difference(s){}",
                c.equal,
                c.rounds,
                c.model_pages,
                c.kvm_pages,
                c.allowed,
                c.different,
                c.differences.first().map(|d| format!(", first: {d}")).unwrap_or_default()
            ));
            a.written += model.report.written;
            add(&mut a.total, c);
        }
    }
    a.evidence
        .extend(skipped.iter().map(|s| format!("not run: {s}")));
    let t = &a.total;
    a.evidence.insert(
        0,
        format!(
            "{ran} programs (programs::stepped, {VCPUS} vCPUs, {PAGES} pages, seeds {SEED:#x}..+{SEEDS}): {} harvests compared, {} equal; pages reported: model {}, KVM {}; KVM beyond the model by allowance: {:?}; {} difference(s) no allowance explains",
            t.rounds, t.equal, t.model_pages, t.kvm_pages, t.allowed, t.different
        ),
    );
    if ran == 0 {
        a.skip = Some(format!(
            "no anchor run possible here: {}",
            skipped.join("; ")
        ));
    } else if !lost.is_empty() {
        let why = format!("KVM lost {} write(s): {}", lost.len(), lost[0]);
        a.failure = Some((FailKind::Lost, why));
    } else if t.different > 0 {
        let why = format!(
            "the model and KVM disagree {} time(s): {}",
            t.different,
            t.differences.join("; ")
        );
        a.failure = Some((FailKind::Problem, why));
    }
    a
}

fn add(total: &mut Comparison, c: Comparison) {
    total.rounds += c.rounds;
    total.equal += c.equal;
    total.model_pages += c.model_pages;
    total.kvm_pages += c.kvm_pages;
    for (k, v) in c.allowed {
        *total.allowed.entry(k).or_default() += v;
    }
    total.different += c.different;
    for d in c.differences {
        if total.differences.len() < 5 {
            total.differences.push(d);
        }
    }
}

fn kvm_run(
    spec: &TrialSpec,
    program: &Program,
) -> Result<crate::scenarios::stepped::SteppedRun, TrialError> {
    let mut m = scenarios::machine_with(spec, PAGES, VCPUS, None)?;
    let mut tracker = spec.tracker.build();
    m.load(program)?;
    let run = scenarios::stepped::drive_loaded(&mut m, program, tracker.as_mut(), false)?;
    m.detach(tracker.as_mut())?;
    Ok(run)
}
