//! Concurrent harvest: vCPUs write continuously while the host harvests in a loop, copying
//! reported pages to a shadow. Two checks:
//! - at every harvest ([`RunningCheck`]): after the copy, every write the vCPUs published before
//!   that collect (progress snapshot + reference interpreter) must be in the shadow — this sees
//!   a lost report of a page that is written and reported again later;
//! - after the vCPUs stop and a final harvest, the shadow must equal guest memory; a difference
//!   names the lost write by its stamp, and the round that should have reported it by the
//!   progress snapshots.
//!
//! A self-test runs the same endless program as the trial; the driver tells the fault injector
//! which pages each collect must report, so every injected drop loses a write the per-harvest
//! check must name.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use trackcheck_guests::sim::{ThreadEvents, writes_through};
use trackcheck_harness::Stop;
use trackcheck_harness::machine::{Machine, RunView, VcpuState};
use trackcheck_harness::oracle::{LostPage, RunningCheck, Shadow, attribute_round};
use trackcheck_harness::track::{PageSet, Tracker};

use super::driver::{RunningOracle, harvest_plain};
use super::{Findings, TrialError, TrialTracker, check_mode};
use crate::programs;
use crate::spec::{Scenario, TrialSpec};

/// Least time the host harvests while the guest writes.
const MIN_DURATION: Duration = Duration::from_millis(100);
/// Most time the host waits for the guest to do the minimum work (a fast host is done after
/// MIN_DURATION; an emulated one, such as the arm64 lane's, needs seconds for 10 harvests with
/// per-page CLEARs while four vCPUs share two CPUs).
const MAX_DURATION: Duration = Duration::from_secs(20);
/// Harvests during which the guest must have made progress.
const MIN_BUSY_ROUNDS: u32 = 10;
/// Writes each vCPU must make (or one pass over its pages, if shorter).
const MIN_WRITES: u64 = 512;
/// How long a vCPU may stay on KVM_EXIT_DIRTY_RING_FULL while the host keeps resetting.
const RING_FULL_PATIENCE: Duration = Duration::from_secs(2);

pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let Scenario::Concurrent { pattern, vcpus } = spec.scenario else {
        return Err(TrialError::Error("not a concurrent scenario".into()));
    };
    let vcpus = usize::from(vcpus);
    let pages = super::data_pages(&spec.scenario);
    let program = programs::concurrent(seed, pattern, vcpus, pages);
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    let findings = drive_program(&mut m, &program, tracker.get())?;
    m.detach(tracker.get())?;
    Ok(findings)
}

/// Run the endless `program` on `m` while harvesting with `tracker` in a loop; the findings of
/// the per-harvest and final checks. The tracker stays attached.
pub(super) fn drive_program(
    m: &mut Machine,
    program: &trackcheck_guests::Program,
    tracker: &mut dyn Tracker,
) -> Result<Findings, TrialError> {
    drive_program_with(m, program, tracker, &mut |_, _, _, _| Ok(()))
}

/// [`drive_program`] with `between` run after every harvest (and its check) while the vCPUs
/// run.
pub(super) fn drive_program_with(
    m: &mut Machine,
    program: &trackcheck_guests::Program,
    tracker: &mut dyn Tracker,
    between: Between<'_>,
) -> Result<Findings, TrialError> {
    let mut limits = m.limits();
    limits.ring_full_wait = Some(RING_FULL_PATIENCE);
    // The vCPUs run until the host stops them: longer than the host may wait for work plus
    // the ring-full patience, so only a real hang trips it.
    limits.watchdog = MAX_DURATION + 4 * RING_FULL_PATIENCE + Duration::from_secs(10);
    m.set_limits(limits);
    drive(m, program, tracker, &min_writes(program), between)
}

/// Writes each vCPU must make: [`MIN_WRITES`], or one pass over its pages if that is shorter.
fn min_writes(program: &trackcheck_guests::Program) -> Vec<u64> {
    program
        .vcpus
        .iter()
        .map(|t| match t.ops.first() {
            Some(trackcheck_guests::Op::Loop { pages, .. }) => pages.len().min(MIN_WRITES),
            _ => MIN_WRITES,
        })
        .collect()
}

/// Whether the run did the work a concurrent trial needs.
#[derive(Debug, Clone, Copy, Default)]
struct Work {
    busy_rounds: u32,
    enough: bool,
}

/// What a scenario does between the harvests of a concurrent run, with the vCPUs running:
/// `hook(view, harvest, progress, shadow)` may change memslots and copy pages into the shadow;
/// `progress` is each vCPU's progress snapshot taken before that harvest's collect (absolute
/// seqs: every write up to it had to be reported by that collect).
pub(super) type Between<'h> =
    &'h mut dyn FnMut(&RunView<'_>, u32, &[u64], &mut Shadow) -> Result<(), TrialError>;

fn drive(
    m: &mut Machine,
    program: &trackcheck_guests::Program,
    tracker: &mut dyn Tracker,
    min_writes: &[u64],
    between: Between<'_>,
) -> Result<Findings, TrialError> {
    let n = program.vcpu_count();
    m.load(program)?;
    let before = m.vcpu_stats();
    m.attach(tracker)?;
    let layout = m.data_layout();
    let mut oracle = RunningOracle {
        shadow: Shadow::new(layout.clone(), m.data()),
        check: RunningCheck::new(program, layout.clone()),
    };
    let mut lost: Vec<LostPage> = Vec::new();
    let mut ring_full_seen: Vec<u64> = (0..n).map(|i| m.vcpu_ring_full_exits(i)).collect();
    let mut out = PageSet::new();
    // Baseline harvest before the guest runs (INITIALLY_SET reports everything here).
    harvest_plain(tracker, m, &mut out, &mut oracle)?;
    let mut reported = out.len();
    let (host, run) = m.run_with(|view| {
        let mut snapshots: Vec<Vec<u64>> = Vec::new();
        let mut reported = 0;
        let mut work = Work::default();
        let start = Instant::now();
        let mut v: &RunView<'_> = view;
        let base = program.seq_base;
        let mut harvest_once =
            |snapshots: &mut Vec<Vec<u64>>, reported: &mut u64| -> Result<Vec<u64>, TrialError> {
                let now: Vec<u64> = (0..n).map(|i| view.progress(i)).collect();
                snapshots.push(now.clone());
                // Round 1 was the baseline harvest; this is round snapshots + 1.
                let round = u32::try_from(snapshots.len() + 1).unwrap_or(u32::MAX);
                oracle.check.advance(&now)?;
                harvest_plain(tracker, &mut v, &mut out, &mut oracle)?;
                *reported += out.len();
                // Which vCPUs waited out a full ring since the previous collect.
                let full: Vec<bool> = (0..n)
                    .map(|i| {
                        let now = view.ring_full_exits(i);
                        let was = std::mem::replace(&mut ring_full_seen[i], now);
                        now > was
                    })
                    .collect();
                lost.extend(oracle.check.check(&oracle.shadow, round, &out, Some(&full)));
                between(
                    view,
                    u32::try_from(snapshots.len()).unwrap_or(u32::MAX),
                    &now,
                    &mut oracle.shadow,
                )?;
                // Writes of this program so far (progress counts from its seq base).
                Ok(now.iter().map(|p| p.saturating_sub(base)).collect())
            };
        let result = (|| -> Result<(), TrialError> {
            let mut previous: Vec<u64> = vec![0; n];
            loop {
                let now = harvest_once(&mut snapshots, &mut reported)?;
                if now != previous {
                    work.busy_rounds += 1;
                }
                work.enough = now.iter().zip(min_writes).all(|(p, m)| p >= m)
                    && work.busy_rounds >= MIN_BUSY_ROUNDS;
                let elapsed = start.elapsed();
                let done = work.enough && elapsed >= MIN_DURATION;
                if done || elapsed >= MAX_DURATION {
                    return Ok(());
                }
                previous = now;
                // Leave the CPUs to the vCPUs (and a uffd handler) between harvests.
                std::thread::sleep(Duration::from_micros(200));
            }
        })();
        for i in 0..n {
            view.request_stop(i);
        }
        // Keep harvesting until every vCPU has finished: one waiting on a full dirty ring only
        // sees the stop flag once its ring is reset.
        let stopping = Instant::now();
        let result = result.and_then(|()| {
            while view.running() > 0 && stopping.elapsed() < RING_FULL_PATIENCE * 2 {
                harvest_once(&mut snapshots, &mut reported)?;
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        });
        result.map(|()| (snapshots, reported, work))
    });
    let (mut snapshots, during, work) = host?;
    let run_stops = run?;
    let mut hazards = Vec::new();
    for (i, state) in m.states().iter().take(n).enumerate() {
        if matches!(state, VcpuState::Done { .. }) {
            continue;
        }
        if run_stops
            .iter()
            .any(|(v, s)| *v == i && *s == Stop::RingFull)
        {
            hazards.push(format!(
                "vCPU {i} stuck on KVM_EXIT_DIRTY_RING_FULL for {}s although the host kept collecting and resetting the rings (progress {})",
                RING_FULL_PATIENCE.as_secs(),
                m.progress(i)
            ));
        } else {
            return Err(TrialError::Error(format!(
                "vCPU {i} did not finish after the stop flag: {state:?}"
            )));
        }
    }
    reported += during;
    if !work.enough && hazards.is_empty() {
        let progress: Vec<u64> = (0..n).map(|i| m.progress(i)).collect();
        return Err(TrialError::Error(format!(
            "not exercised: in {}s the vCPUs made {progress:?} writes (each needs {min_writes:?}) over {} busy harvests (needs {MIN_BUSY_ROUNDS})",
            MAX_DURATION.as_secs(),
            work.busy_rounds
        )));
    }
    let last: Vec<u64> = (0..n).map(|i| m.progress(i)).collect();
    snapshots.push(last.clone());
    let rounds = u32::try_from(snapshots.len()).unwrap_or(u32::MAX);
    oracle.check.advance(&last)?;
    harvest_plain(tracker, m, &mut out, &mut oracle)?;
    reported += out.len();
    let full: Vec<bool> = (0..n)
        .map(|i| m.vcpu_ring_full_exits(i) > ring_full_seen[i])
        .collect();
    lost.extend(
        oracle
            .check
            .check(&oracle.shadow, rounds + 1, &out, Some(&full)),
    );
    let after = m.vcpu_stats();
    let mut findings = Findings {
        hazards,
        ..Findings::default()
    };
    // Losses seen at their harvest first (they name the round), then the final comparison.
    oracle.check.annotate(&mut lost);
    let per_harvest = lost.len();
    let late = lost.iter().filter(|l| l.late()).count();
    for l in lost {
        findings.report.add_lost(l);
    }
    let at_end = oracle.shadow.compare(m.data());
    if per_harvest > 0 || !at_end.is_empty() {
        findings.evidence.push(format!(
            "the per-harvest check named {per_harvest} page(s), {late} of them reported late behind a write fault in flight (a later harvest reported the page; a vCPU whose next write went to it made no progress until then); the final comparison alone finds {}",
            at_end.len()
        ));
    }
    for mm in at_end {
        // Round 1 is the baseline harvest before the guest ran; the snapshots start at round 2.
        let round = attribute_round(&snapshots[..snapshots.len() - 1], mm.vcpu(), mm.seq())
            .saturating_add(1);
        findings.report.add_lost(LostPage::at(
            &layout,
            mm.data_page,
            mm.vcpu(),
            mm.seq(),
            round,
        ));
    }
    // Written: distinct pages the guest wrote, from the interpreter up to each vCPU's progress.
    let mut written = BTreeSet::new();
    for (v, thread) in program.vcpus.iter().enumerate() {
        let progress = m.progress(v);
        let mut events = ThreadEvents::with_seq_base(thread, program.seq_base);
        let writes = writes_through(&mut events, progress).map_err(|had| {
            TrialError::Error(format!(
                "vCPU {v} published progress {progress}, but its program has only {had} writes"
            ))
        })?;
        written.extend(writes.into_iter().map(|(page, _, _)| page));
    }
    findings.report.written = written.len() as u64;
    findings.report.reported = reported;
    findings.report.rounds = rounds + 1;
    let evidence = m.mode_evidence(&before, &after, m.writes_done());
    findings.evidence.push(evidence.summary());
    findings.evidence.push(format!(
        "{} writes by {n} vCPUs to {} distinct pages; {} harvests while running, {} of them after guest progress; containment checked after every harvest ({} word checks) and the final shadow compared with memory",
        m.writes_done(),
        written.len(),
        rounds - 1,
        work.busy_rounds,
        oracle.check.words_checked()
    ));
    if m.ring_full_exits() > 0 {
        findings.evidence.push(format!(
            "{} KVM_EXIT_DIRTY_RING_FULL exits waited out",
            m.ring_full_exits()
        ));
    }
    findings.evidence.extend(tracker.evidence());
    check_mode(&evidence)?;
    findings.mode = Some(evidence);
    Ok(findings)
}
