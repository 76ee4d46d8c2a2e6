//! The one harvest driver every oracle goes through.
//!
//! A harvest is the tracker's three steps in the tracker's order ([`harvest`]); an oracle
//! hears about them through a small interface: which pages the collect must report (where it
//! knows, so a fault injector loses only real writes), what the collect reported, and what the
//! copy read. What the guest did in between is the caller's: `between` runs after each step
//! (race runs let the guest write there and tell the oracle), and the caller checks or reads
//! progress around the harvest. The stepped ledger, the content oracle and the concurrent
//! per-harvest check are three implementations; scenarios only say what differs.

use trackcheck_harness::GuestMemory;
use trackcheck_harness::machine::{Machine, RunView};
use trackcheck_harness::oracle::{CollectContext, Ledger, Shadow};
use trackcheck_harness::track::{PageSet, Step, TrackError, TrackSource, Tracker, harvest};

use super::phase::{self, Phase};

/// What an oracle learns from one harvest.
pub(super) trait HarvestOracle {
    /// Pages the next collect must report, where the oracle knows them (asked before it).
    fn at_stake(&self) -> Option<PageSet> {
        None
    }

    /// The collect reported `set`; guest memory is `data`.
    fn collected(&mut self, data: &GuestMemory, set: &PageSet);

    /// The copy step read `set` from `data` (the oracle copies it into its shadow).
    fn copied(&mut self, data: &GuestMemory, set: &PageSet);
}

/// A harvest source whose guest memory the driver can read at the copy step.
pub(super) trait DataSource: TrackSource {
    /// The data region.
    fn data_region(&self) -> &GuestMemory;
}

impl DataSource for Machine {
    fn data_region(&self) -> &GuestMemory {
        self.data()
    }
}

impl DataSource for &RunView<'_> {
    fn data_region(&self) -> &GuestMemory {
        self.data()
    }
}

/// One harvest of `tracker` from `src` into `out` (cleared first), reported to `oracle`;
/// `between(step, src, oracle)` runs after each step.
pub(super) fn harvest_with<S, O, E>(
    tracker: &mut dyn Tracker,
    src: &mut S,
    out: &mut PageSet,
    oracle: &mut O,
    mut between: impl FnMut(Step, &mut S, &mut O) -> Result<(), E>,
) -> Result<(), E>
where
    S: DataSource,
    O: HarvestOracle + ?Sized,
    E: From<TrackError>,
{
    out.clear();
    if let Some(stake) = oracle.at_stake() {
        tracker.note_at_stake(&stake);
    }
    phase::mark(Phase::Oracle);
    harvest(tracker, src, out, |step, src, set| {
        match step {
            Step::Collect => {
                phase::mark(Phase::Collect);
                oracle.collected(src.data_region(), set);
            }
            Step::Copy => oracle.copied(src.data_region(), set),
            Step::Rearm => phase::mark(Phase::Rearm),
        }
        phase::mark(Phase::Oracle);
        between(step, src, oracle)
    })
}

/// [`harvest_with`] with nothing between the steps.
pub(super) fn harvest_plain<S, O>(
    tracker: &mut dyn Tracker,
    src: &mut S,
    out: &mut PageSet,
    oracle: &mut O,
) -> Result<(), TrackError>
where
    S: DataSource,
    O: HarvestOracle + ?Sized,
{
    harvest_with(
        tracker,
        src,
        out,
        oracle,
        |_, _, _| Ok::<(), TrackError>(()),
    )
}

/// The stepped oracle: the ledger's containment check and a shadow copy (stepped, race and
/// ring-full runs, and the property runs' forced harvests).
#[derive(Debug)]
pub(super) struct LedgerOracle<'p> {
    /// Containment at each collect.
    pub ledger: Ledger<'p>,
    /// The migration destination's copy.
    pub shadow: Shadow,
    /// How the next collect's extra pages may be explained.
    pub ctx: CollectContext,
    /// Each collect's reported set, in order, where kept.
    pub rounds: Option<Vec<PageSet>>,
}

impl HarvestOracle for LedgerOracle<'_> {
    fn at_stake(&self) -> Option<PageSet> {
        Some(self.ledger.at_stake())
    }

    fn collected(&mut self, _data: &GuestMemory, set: &PageSet) {
        self.ledger.collected(set, self.ctx);
        if let Some(rounds) = self.rounds.as_mut() {
            rounds.push(set.clone());
        }
    }

    fn copied(&mut self, data: &GuestMemory, set: &PageSet) {
        self.shadow.copy(data, set);
        self.ledger.copied(set);
    }
}

/// The concurrent runs' oracle: the shadow, with the per-harvest check naming what the
/// collect had to report (the check itself runs after the harvest).
#[derive(Debug)]
pub(super) struct RunningOracle<'p> {
    /// The migration destination's copy.
    pub shadow: Shadow,
    /// Containment at every harvest.
    pub check: trackcheck_harness::oracle::RunningCheck<'p>,
}

impl HarvestOracle for RunningOracle<'_> {
    fn at_stake(&self) -> Option<PageSet> {
        Some(self.check.at_stake(&self.shadow))
    }

    fn collected(&mut self, _data: &GuestMemory, _set: &PageSet) {}

    fn copied(&mut self, data: &GuestMemory, set: &PageSet) {
        self.shadow.copy(data, set);
    }
}
