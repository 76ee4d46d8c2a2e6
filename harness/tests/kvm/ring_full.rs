//! The host reads each vCPU's KVM_EXIT_DIRTY_RING_FULL count while the vCPUs run
//! ([`RunView::ring_full_exits`]), and the same count after the run
//! ([`Machine::vcpu_ring_full_exits`], [`Machine::ring_full_exits`]).

use std::time::{Duration, Instant};

use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};
use trackcheck_harness::machine::RunView;
use trackcheck_harness::track::{PageSet, TrackSource, Tracker, TrackerSpec};
use trackcheck_harness::{ExecutionMode, Machine, MachineConfig, RunLimits, Stop};

use super::{Check, ensure};

/// Ring bytes: 256 entries, so the soft limit (entries - 64) is reached after 192 pages.
const RING_BYTES: u32 = 4096;
/// Pages the guest loops over: far more than the ring holds.
const PAGES: u64 = 1024;

/// Collect and reset the ring while the vCPU runs, so it can go on.
fn harvest(tracker: &mut dyn Tracker, view: &RunView<'_>) -> Result<(), String> {
    let mut out = PageSet::new();
    let ctx = view.track_ctx();
    tracker
        .collect(&ctx, &mut out)
        .and_then(|()| tracker.rearm(&ctx))
        .map_err(|e| format!("harvest while running: {e}"))
}

/// What the host saw during the run.
struct Seen {
    /// The count the first time it was non-zero, read while the vCPU ran.
    first: u64,
    /// Whether the vCPU was still running after that read.
    running_at_first: bool,
    /// The last count read during the run.
    last: u64,
}

/// A native guest loops over more pages than a 4 KiB ring holds; the host does not harvest
/// until it reads a non-zero ring-full count for the vCPU (which can only come from the running
/// vCPU thread), then harvests until the loop has run on and ended. The counts read after the
/// run must be at least what the host read during it, and the total is the vCPU's count.
pub fn counted_while_running(mode: ExecutionMode) -> Check {
    let program = Program::new(
        PAGES,
        vec![Thread::new(vec![Op::Loop {
            pages: PageSeq::Range {
                start: 0,
                count: PAGES,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::UntilStopped,
        }])],
    );
    let mut m = Machine::new(MachineConfig {
        data_pages: PAGES,
        mode,
        dirty_ring: Some(RING_BYTES),
        limits: RunLimits {
            ring_full_wait: Some(Duration::from_secs(10)),
            ..RunLimits::default()
        },
        ..MachineConfig::default()
    })?;
    let mut tracker = TrackerSpec::DirtyRing {
        bytes: RING_BYTES,
        with_bitmap: false,
    }
    .build();
    m.attach(tracker.as_mut())?;
    m.load(&program)?;
    let (seen, result) = m.run_with(|view| -> Result<Seen, String> {
        let start = Instant::now();
        let mut first = view.ring_full_exits(0);
        while first == 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
            first = view.ring_full_exits(0);
        }
        let running_at_first = view.running() == 1;
        if first == 0 {
            view.request_stop(0);
        }
        // Let the loop run on past the full ring, then end it; keep harvesting until it has.
        let progress = view.progress(0);
        while view.running() > 0 && start.elapsed() < Duration::from_secs(15) {
            harvest(tracker.as_mut(), view)?;
            if view.progress(0) > progress + 2 * PAGES {
                view.request_stop(0);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let last = view.ring_full_exits(0);
        view.request_stop(0);
        Ok(Seen {
            first,
            running_at_first,
            last,
        })
    });
    let seen = seen?;
    let stops = result?;
    ensure(seen.first > 0, || {
        "no ring-full exit was counted in 5 s of writes to 1024 pages with a 256-entry ring".into()
    })?;
    ensure(seen.running_at_first, || {
        format!(
            "the count {} was read only after the vCPU came back; it must be readable while it runs",
            seen.first
        )
    })?;
    ensure(matches!(stops.as_slice(), [(0, Stop::Done { .. })]), || {
        format!("stops {stops:?}: the loop should have ended at the stop flag")
    })?;
    let after = m.vcpu_ring_full_exits(0);
    ensure(after >= seen.last && seen.last >= seen.first, || {
        format!(
            "counts went backwards: {} then {} during the run, {after} after it",
            seen.first, seen.last
        )
    })?;
    ensure(m.ring_full_exits() == after, || {
        format!(
            "total {} is not the only vCPU's count {after}",
            m.ring_full_exits()
        )
    })
}
