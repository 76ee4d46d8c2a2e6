//! Stepped runs: guest and host alternate, so the oracle knows exactly which pages were
//! written before each collect (stepped, race, ring-full; the clear-geometry and cross-check
//! scenarios reuse the driver).

use trackcheck_guests::Program;
use trackcheck_harness::Stop;
use trackcheck_harness::machine::{DATA_SLOT, Machine, VcpuState};
use trackcheck_harness::oracle::Ledger;
use trackcheck_harness::oracle::{CollectContext, ExtraRecord, LostPage, Shadow};
use trackcheck_harness::track::{PageSet, Tracker, huge_unit_pages};

use super::driver::{LedgerOracle, harvest_with};
use super::phase::{self, Phase};
use super::{Findings, TrialError, TrialTracker, check_mode};
use crate::programs;
use crate::spec::{Scenario, TrialSpec};

/// Stepped, race and ring-full scenarios.
pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let pages = super::data_pages(&spec.scenario);
    let vcpus = super::vcpus(&spec.scenario);
    let program = match spec.scenario {
        Scenario::Race => programs::race(seed, vcpus, pages, 6),
        Scenario::RingFull { .. } => programs::ring_full(seed, vcpus, pages, 600, 3),
        _ => programs::stepped(seed, vcpus, pages, 6, 40),
    };
    let mut machine = super::machine(spec, spec.tracker.ring_bytes())?;
    let race = spec.scenario == Scenario::Race;
    let run = drive(&mut machine, &program, tracker.get(), race)?;
    machine.detach(tracker.get())?;
    Ok(run.findings)
}

/// What a stepped run produced.
#[derive(Debug, Default)]
pub(crate) struct SteppedRun {
    /// The findings.
    pub findings: Findings,
    /// Each collect's reported set, in order.
    pub rounds: Vec<PageSet>,
    /// Every extra page with its class.
    pub extras: Vec<ExtraRecord>,
}

fn progress(m: &Machine, vcpus: usize) -> Vec<u64> {
    (0..vcpus).map(|v| m.progress(v)).collect()
}

/// Reads the 8-byte word at `offset` of data page `page` (for the ledger's landed-ahead check).
fn word(m: &Machine) -> impl Fn(u64, u16) -> u64 + '_ {
    |page, offset| m.data().read_u64(page * 4096 + u64::from(offset))
}

fn any_ready(m: &Machine) -> bool {
    m.states().iter().any(|s| matches!(s, VcpuState::Ready(_)))
}

/// Runs in a row that may end on a full ring without progress before the vCPUs count as stuck.
const STALL_LIMIT: u32 = 1000;

/// Run every ready vCPU to its next stop. A vCPU that only ever reports a full dirty ring
/// without progress is stuck: after [`STALL_LIMIT`] such runs in a row, segments stop running.
/// `full[v]` is set when vCPU v stopped on a full dirty ring.
fn segment(m: &mut Machine, stalls: &mut u32, full: &mut [bool]) -> Result<(), TrialError> {
    if *stalls >= STALL_LIMIT {
        return Ok(());
    }
    let before = m.total_progress();
    phase::mark(Phase::Oracle);
    let stops = m.run()?;
    phase::mark(Phase::Run);
    for (v, stop) in &stops {
        if *stop == Stop::RingFull
            && let Some(f) = full.get_mut(*v)
        {
            *f = true;
        }
    }
    let ring_only = !stops.is_empty() && stops.iter().all(|(_, s)| *s == Stop::RingFull);
    if ring_only && m.total_progress() == before {
        *stalls += 1;
    } else {
        *stalls = 0;
    }
    Ok(())
}

struct Stepper<'p> {
    oracle: LedgerOracle<'p>,
    out: PageSet,
    huge: u64,
    vcpus: usize,
    stalls: u32,
    /// Which vCPUs stopped on a full dirty ring since the last collect.
    full: Vec<bool>,
    /// That, per harvest round (index = round - 1), for the lost pages' context.
    full_by_round: Vec<Vec<bool>>,
}

impl Stepper<'_> {
    /// One harvest at a point where every vCPU is stopped. With `race`, the guest runs a
    /// segment after every step but the last.
    fn harvest(
        &mut self,
        m: &mut Machine,
        tracker: &mut dyn Tracker,
        race: bool,
    ) -> Result<(), TrialError> {
        self.oracle
            .ledger
            .observe(&progress(m, self.vcpus), word(m))?;
        let full = std::mem::replace(&mut self.full, vec![false; self.vcpus]);
        self.full_by_round.push(full);
        self.oracle.ctx = CollectContext {
            everything: tracker.reports_everything_next(),
            huge_unit_pages: self.huge,
        };
        let last = tracker.order()[2];
        let Self {
            oracle,
            out,
            vcpus,
            stalls,
            full,
            ..
        } = self;
        harvest_with(
            tracker,
            m,
            out,
            oracle,
            |step, m: &mut Machine, oracle: &mut LedgerOracle<'_>| -> Result<(), TrialError> {
                if race && step != last && any_ready(m) {
                    segment(m, stalls, full)?;
                    oracle.ledger.observe(&progress(m, *vcpus), word(m))?;
                }
                Ok(())
            },
        )
    }
}

/// Load `program`, attach `tracker`, and alternate guest segments and harvests until every
/// vCPU is done; then a final harvest and the shadow comparison. The tracker stays attached.
pub(super) fn drive(
    m: &mut Machine,
    program: &Program,
    tracker: &mut dyn Tracker,
    race: bool,
) -> Result<SteppedRun, TrialError> {
    m.load(program)?;
    drive_loaded(m, program, tracker, race)
}

/// [`drive`] on a machine `program` is already loaded into.
pub(crate) fn drive_loaded(
    m: &mut Machine,
    program: &Program,
    tracker: &mut dyn Tracker,
    race: bool,
) -> Result<SteppedRun, TrialError> {
    phase::mark(Phase::Oracle);
    let before = m.mode_counters();
    phase::mark(Phase::Stats);
    m.attach(tracker)?;
    phase::mark(Phase::Attach);
    let layout = m.data_layout();
    let huge = huge_unit_pages(tracker, m.vm(), DATA_SLOT);
    let mut ledger = Ledger::new(program, layout.clone(), tracker.allowances());
    ledger.record_extras();
    let mut st = Stepper {
        oracle: LedgerOracle {
            ledger,
            shadow: Shadow::new(layout.clone(), m.data()),
            ctx: CollectContext::default(),
            rounds: Some(Vec::new()),
        },
        out: PageSet::new(),
        huge,
        vcpus: program.vcpu_count(),
        stalls: 0,
        full: vec![false; program.vcpu_count()],
        full_by_round: Vec::new(),
    };
    st.harvest(m, tracker, false)?; // baseline: everything before the guest runs
    while any_ready(m) && st.stalls < STALL_LIMIT {
        segment(m, &mut st.stalls, &mut st.full)?;
        st.harvest(m, tracker, race)?;
    }
    st.harvest(m, tracker, false)?; // final: every vCPU is done (or stuck)
    phase::mark(Phase::Oracle);
    let after = m.mode_counters();
    phase::mark(Phase::Stats);
    let rounds = st.oracle.ledger.report().rounds;
    let mut findings = Findings::default();
    if st.stalls >= STALL_LIMIT {
        findings.hazards.push(format!(
            "vCPUs stuck on KVM_EXIT_DIRTY_RING_FULL: {STALL_LIMIT} runs in a row without progress although the rings were collected and reset (progress {:?})",
            progress(m, st.vcpus)
        ));
    }
    // Memory must now equal the shadow; a difference the containment check did not name is
    // still a lost write, named by the stamp in memory.
    for mm in st.oracle.shadow.compare(m.data()) {
        st.oracle.ledger.report_mut().add_lost(LostPage::at(
            &layout,
            mm.data_page,
            mm.vcpu(),
            mm.seq(),
            rounds,
        ));
    }
    let evidence = m.mode_evidence_between(&before, &after, m.writes_done());
    findings.evidence.push(evidence.summary());
    findings.evidence.push(format!(
        "{} writes to {} distinct pages over {} harvests",
        m.writes_done(),
        st.oracle.ledger.pages_written(),
        rounds
    ));
    if !st.oracle.ledger.unexplained_examples.is_empty() {
        findings.evidence.push(format!(
            "unexplained extra pages (slot, page): {:?}",
            st.oracle.ledger.unexplained_examples
        ));
    }
    findings.evidence.extend(tracker.evidence());
    check_mode(&evidence)?;
    findings.mode = Some(evidence);
    findings.report = st.oracle.ledger.report().clone();
    for lost in &mut findings.report.lost {
        let round = usize::try_from(lost.round).unwrap_or(usize::MAX);
        lost.ring_full = round
            .checked_sub(1)
            .and_then(|r| st.full_by_round.get(r))
            .and_then(|f| f.get(lost.vcpu).copied());
    }
    phase::mark(Phase::Oracle);
    Ok(SteppedRun {
        extras: st.oracle.ledger.extras_log.take().unwrap_or_default(),
        findings,
        rounds: st.oracle.rounds.take().unwrap_or_default(),
    })
}
