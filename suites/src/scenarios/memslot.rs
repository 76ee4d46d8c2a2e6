//! Memslot operations while tracking (family 7): log-flag toggles while vCPUs run, slots moved
//! and deleted between harvests, many small slots of unaligned sizes.
//!
//! The stepped operations use the content oracle (every page that changed since its last copy
//! must be reported at each collect). A deleted slot's pages are not required any more — to a
//! VMM that memory is gone — and a restored slot is copied whole, as new memory is; a slot that
//! moved keeps its id and its pages, and the writes made before the move must still be
//! reported after it. The dirty ring is harvested (collected and reset) before every memslot
//! change, as its contract demands; the bitmap and userfaultfd trackers are not, so their
//! unharvested state must survive the change. Toggling runs under the concurrent shadow
//! oracle: turning logging on again is followed by a full copy of the slot, as a VMM must
//! (the bitmap of the pages dirtied while logging was off is gone).

use std::time::Duration;

use trackcheck_guests::layout::{DATA_GPA, MAX_DATA_PAGES, PAGE_SIZE};
use trackcheck_harness::machine::{DATA_SLOT, Machine, RunView, VcpuState};
use trackcheck_harness::oracle::{LostPage, Shadow};
use trackcheck_harness::track::{PageSet, TrackerSpec};

use super::content::ContentOracle;
use super::{Findings, TrialError, TrialTracker, check_mode, concurrent};
use crate::programs;
use crate::spec::{Pattern, SlotOp, TrialSpec};

/// Four slots of 1 MiB for toggle, move and delete.
const FOUR: [u64; 4] = [256; 4];
/// Many small slots of unaligned sizes: 1 page, around 64-page bitmap words, around 2 MiB.
const MANY: [u64; 24] = [
    1, 2, 3, 7, 8, 9, 15, 17, 31, 33, 63, 64, 65, 127, 129, 200, 255, 257, 300, 511, 513, 1, 700, 5,
];
/// The slot the operations act on (third of four).
const ACTED: usize = 2;
/// Stepped rounds.
const ROUNDS: u32 = 5;
/// vCPUs.
pub(super) const VCPUS: usize = 2;

/// The slot sizes of `op`.
pub(super) const fn slot_pages(op: SlotOp) -> &'static [u64] {
    match op {
        SlotOp::Many | SlotOp::ManyConcurrent => &MANY,
        SlotOp::Toggle | SlotOp::Move | SlotOp::Delete => &FOUR,
    }
}

/// Data pages of `op`.
pub(super) const fn data_pages(op: SlotOp) -> u64 {
    let pages = slot_pages(op);
    let mut sum = 0;
    let mut i = 0;
    while i < pages.len() {
        sum += pages[i];
        i += 1;
    }
    sum
}

fn slot_id(index: usize) -> u32 {
    DATA_SLOT + u32::try_from(index).unwrap_or(u32::MAX)
}

fn machine(spec: &TrialSpec, op: SlotOp) -> Result<Machine, TrialError> {
    let mut config = super::machine_config(spec, data_pages(op), VCPUS, spec.tracker.ring_bytes());
    config.data_slot_pages = slot_pages(op).to_vec();
    Ok(Machine::new(config)?)
}

pub(super) fn run(
    spec: &TrialSpec,
    op: SlotOp,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    match op {
        SlotOp::Toggle => toggle(spec, seed, tracker),
        SlotOp::ManyConcurrent => many_concurrent(spec, seed, tracker),
        SlotOp::Move | SlotOp::Delete | SlotOp::Many => stepped(spec, op, seed, tracker),
    }
}

/// Whether the tracker's contract demands a harvest before a memslot change (the dirty ring:
/// entries name slots, so they are collected and the rings reset first).
const fn harvest_before_change(tracker: TrackerSpec) -> bool {
    matches!(tracker, TrackerSpec::DirtyRing { .. })
}

fn stepped(
    spec: &TrialSpec,
    op: SlotOp,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let mut m = machine(spec, op)?;
    let tracker = tracker.get();
    let acted = slot_id(ACTED);
    // Delete: the slot is gone during round 3 (deleted after round 2, restored before round 4).
    let program = programs::slot_rounds(seed, VCPUS, slot_pages(op), ROUNDS, 24, |round, i| {
        !(op == SlotOp::Delete && round == 3 && i == ACTED)
    });
    m.load(&program)?;
    let stats_before = m.vcpu_stats();
    m.attach(tracker)?;
    let mut oracle = ContentOracle::new(&m, Vec::new());
    oracle.harvest(&mut m, tracker)?; // baseline
    let moved_to = DATA_GPA + MAX_DATA_PAGES * PAGE_SIZE;
    let mut notes = Vec::new();
    let mut idle = Vec::new();
    let mut round = 0;
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        m.run()?;
        round += 1;
        match (op, round) {
            (SlotOp::Move, 2 | 4) => {
                if harvest_before_change(spec.tracker) {
                    oracle.harvest(&mut m, tracker)?;
                }
                let home = DATA_GPA + FOUR[..ACTED].iter().sum::<u64>() * PAGE_SIZE;
                let to = if m.vm().slot(acted)?.gpa == home {
                    moved_to
                } else {
                    home
                };
                let pending = oracle.pending(&m, acted);
                if pending == 0 && !harvest_before_change(spec.tracker) {
                    idle.push(format!("the move after round {round}"));
                }
                m.move_data_slot(acted, to)?;
                notes.push(format!(
                    "slot {acted} moved to gpa {to:#x} after round {round} with {pending} written pages unharvested (guest mappings rewritten, MMU reset)"
                ));
            }
            (SlotOp::Delete, 2) => {
                if harvest_before_change(spec.tracker) {
                    oracle.harvest(&mut m, tracker)?;
                }
                let pending = oracle.pending(&m, acted);
                if pending == 0 && !harvest_before_change(spec.tracker) {
                    idle.push(format!("the delete after round {round}"));
                }
                m.delete_data_slot(acted)?;
                oracle.forget_slot(acted);
                notes.push(format!(
                    "slot {acted} deleted after round {round}{}",
                    if harvest_before_change(spec.tracker) {
                        " (rings harvested and reset first)".to_string()
                    } else {
                        format!(" with {pending} written pages unharvested (not required any more)")
                    }
                ));
            }
            (SlotOp::Delete, 3) => {
                oracle.harvest(&mut m, tracker)?;
                let flags = m.restore_data_slot(acted)?;
                oracle.restore_slot(&m, acted);
                notes.push(format!(
                    "slot {acted} restored after round {round} with flags {flags:#x} and copied whole"
                ));
                continue;
            }
            _ => {}
        }
        let changed = oracle.harvest(&mut m, tracker)?;
        if matches!((op, round), (SlotOp::Move, 3 | 5) | (SlotOp::Delete, 4)) {
            let layout = m.data_layout();
            let n = changed
                .iter()
                .filter(|&&p| layout.locate(p).is_some_and(|(s, _)| s == acted))
                .count();
            notes.push(format!(
                "round {round}: {n} pages of slot {acted} written and reported after the operation"
            ));
        }
    }
    m.detach(tracker)?;
    let stats_after = m.vcpu_stats();
    let mut findings = oracle.findings;
    findings.evidence.extend(notes);
    if !idle.is_empty() {
        findings.not_exercised = Some(format!(
            "no write to slot {acted} was unharvested at {}: the tracker's state had nothing to carry across the change",
            idle.join(", ")
        ));
    }
    findings.evidence.push(format!(
        "{} data slots of {:?} pages; {} writes over {} harvests",
        slot_pages(op).len(),
        slot_pages(op),
        m.writes_done(),
        findings.report.rounds
    ));
    findings.evidence.extend(tracker.evidence());
    let mode = m.mode_evidence(&stats_before, &stats_after, m.writes_done());
    findings.evidence.push(mode.summary());
    check_mode(&mode)?;
    findings.mode = Some(mode);
    Ok(findings)
}

/// Concurrent writers over four slots; every fifth harvest turns logging of one slot off for a
/// moment and on again, then copies that slot whole.
fn toggle(spec: &TrialSpec, seed: u64, tracker: &mut TrialTracker) -> Result<Findings, TrialError> {
    let op = SlotOp::Toggle;
    let mut m = machine(spec, op)?;
    let pages = data_pages(op);
    // A self-test runs the same program: the oracle checks containment at every harvest.
    let program = programs::concurrent(seed, Pattern::Random, VCPUS, pages);
    let acted = slot_id(ACTED);
    let mut whole = PageSet::new();
    for page in 0..FOUR[ACTED] {
        whole.insert(acted, page);
    }
    let first: u64 = FOUR[..ACTED].iter().sum();
    let layout = m.data_layout();
    let mut toggles = 0u32;
    let mut hidden: Vec<LostPage> = Vec::new();
    let mut between = |view: &RunView<'_>,
                       harvest: u32,
                       progress: &[u64],
                       shadow: &mut Shadow|
     -> Result<(), TrialError> {
        if !harvest.is_multiple_of(5) {
            return Ok(());
        }
        // The whole-slot copy below would hide a write the harvest just taken lost: first,
        // every word of the slot whose write finished before that collect (seq within the
        // progress snapshot) must be in the shadow already.
        for page in first..first + FOUR[ACTED] {
            for mm in shadow.differing_words(view.data(), page) {
                let (vcpu, seq) = (mm.vcpu(), mm.seq());
                if progress.get(vcpu).is_some_and(|&p| seq <= p) && seq > 0 {
                    hidden.push(LostPage::at(&layout, page, vcpu, seq, harvest + 1));
                    break;
                }
            }
        }
        view.set_dirty_logging(acted, false)?;
        std::thread::sleep(Duration::from_millis(1));
        view.set_dirty_logging(acted, true)?;
        // The pages written while logging was off are in no log: copy the slot whole.
        shadow.copy(view.data(), &whole);
        toggles += 1;
        Ok(())
    };
    let mut findings =
        concurrent::drive_program_with(&mut m, &program, tracker.get(), &mut between)?;
    m.detach(tracker.get())?;
    for lost in hidden {
        findings.report.add_lost(lost);
    }
    findings.evidence.push(format!(
        "KVM_MEM_LOG_DIRTY_PAGES of slot {acted} turned off for 1 ms and on again {toggles} times while the vCPUs wrote; before each, the slot was checked against the shadow"
    ));
    if toggles == 0 {
        findings.not_exercised = Some("the run ended before the first toggle".into());
    }
    Ok(findings)
}

fn many_concurrent(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let op = SlotOp::ManyConcurrent;
    let mut m = machine(spec, op)?;
    let pages = data_pages(op);
    // A self-test runs the same program: the oracle checks containment at every harvest.
    let program = programs::concurrent(seed, Pattern::Random, VCPUS, pages);
    let mut findings = concurrent::drive_program(&mut m, &program, tracker.get())?;
    m.detach(tracker.get())?;
    findings
        .evidence
        .push(format!("{} data slots of {:?} pages", MANY.len(), MANY));
    Ok(findings)
}
