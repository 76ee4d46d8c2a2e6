//! Phase marks: where a stepped case's time goes, for `trackcheck bench --harness`.
//!
//! Off unless a bench turns them on for the current thread ([`start`]); then each
//! [`mark`]`(p)` adds the time since the previous mark to phase `p`. Off, a mark is one
//! thread-local check. The marks see only the thread they run on: time a vCPU thread spends
//! while the host waits for it is the host's `Run` phase.

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// A phase of a stepped case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Compiling the program to guest code.
    Compile,
    /// Writing the code and restarting the vCPUs (its compile is counted under `Compile`).
    Load,
    /// Zeroing the data region and restarting the vCPUs.
    Reset,
    /// Reading the vCPUs' binary stats (the mode evidence).
    Stats,
    /// Attaching the tracker (logging on).
    Attach,
    /// vCPUs running to their next sync point, threads included.
    Run,
    /// The tracker's collect.
    Collect,
    /// The tracker's rearm.
    Rearm,
    /// The oracle: ledger, shadow copy and comparison, findings.
    Oracle,
    /// Detaching the tracker (logging off).
    Detach,
}

/// Every phase, in report order.
pub const PHASES: [Phase; 10] = [
    Phase::Compile,
    Phase::Load,
    Phase::Reset,
    Phase::Stats,
    Phase::Attach,
    Phase::Run,
    Phase::Collect,
    Phase::Rearm,
    Phase::Oracle,
    Phase::Detach,
];

impl Phase {
    /// Lowercase name for reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Compile => "compile",
            Self::Load => "load",
            Self::Reset => "reset",
            Self::Stats => "statistics",
            Self::Attach => "attach",
            Self::Run => "run",
            Self::Collect => "collect",
            Self::Rearm => "rearm",
            Self::Oracle => "oracle",
            Self::Detach => "detach",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

struct Clock {
    last: Instant,
    spent: [Duration; PHASES.len()],
}

thread_local! {
    static CLOCK: RefCell<Option<Clock>> = const { RefCell::new(None) };
}

/// Start timing phases on this thread (from zero).
pub fn start() {
    CLOCK.with(|c| {
        *c.borrow_mut() = Some(Clock {
            last: Instant::now(),
            spent: [Duration::ZERO; PHASES.len()],
        });
    });
}

/// Stop timing; the time per phase (indexed like [`PHASES`]) since [`start`].
pub fn stop() -> [Duration; PHASES.len()] {
    CLOCK
        .with(|c| c.borrow_mut().take())
        .map_or([Duration::ZERO; PHASES.len()], |c| c.spent)
}

/// Add the time since the previous mark to `phase` (nothing when timing is off).
pub fn mark(phase: Phase) {
    CLOCK.with(|c| {
        if let Some(clock) = c.borrow_mut().as_mut() {
            let now = Instant::now();
            clock.spent[phase.index()] += now - clock.last;
            clock.last = now;
        }
    });
}

/// Add `d` to `phase` and take it from `from` (a phase measured on its own inside another).
pub fn move_time(d: Duration, from: Phase, phase: Phase) {
    CLOCK.with(|c| {
        if let Some(clock) = c.borrow_mut().as_mut() {
            let d = d.min(clock.spent[from.index()]);
            clock.spent[from.index()] -= d;
            clock.spent[phase.index()] += d;
        }
    });
}
