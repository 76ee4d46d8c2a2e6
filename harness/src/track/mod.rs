//! Tracking mechanisms: one [`Tracker`] per mechanism, each with its kernel contract.
//!
//! A harvest is three steps: **collect** (read what the mechanism reports), **rearm** (make
//! the reported pages trackable again: re-protect, clear, reset) and **copy** (read the pages'
//! contents, which a migration would send). The order is part of each mechanism's contract and
//! the tracker owns it ([`Tracker::order`]): for every mechanism here the copy must come after
//! the rearm, or a write landing between copy and rearm is lost for good. [`harvest`] runs the
//! steps in the tracker's order; race scenarios pass a callback that runs the guest between
//! steps, and the fault injector ([`inject`]) reorders or corrupts them to prove the oracle
//! catches it.

mod clear_log;
mod dirty_log;
pub mod dirty_ring;
pub mod inject;
mod pageset;
pub(crate) mod uffd;

pub use clear_log::{ClearGranularity, ClearLog};
pub use dirty_log::DirtyLog;
pub use dirty_ring::DirtyRingTracker;
pub use pageset::PageSet;
pub use uffd::{UffdWpAsync, UffdWpSync};

use serde::{Deserialize, Serialize};

use crate::support::Mechanism;
use crate::sys::dirty::DirtyRing;
use crate::vm::{Vm, VmError};

/// What a tracker may touch while harvesting: the VM and the vCPUs' dirty rings.
#[derive(Debug, Clone, Copy)]
pub struct TrackCtx<'a> {
    /// The VM.
    pub vm: &'a Vm,
    /// One ring per vCPU when the machine was built with a dirty ring, else empty.
    pub rings: &'a [DirtyRing],
}

/// Time spent inside kernel calls (ioctls) by a tracker, apart from its own processing
/// (bitmap to page list, ring walk), so a benchmark can report the harness's overhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelTime {
    /// In collect's kernel calls.
    pub collect: std::time::Duration,
    /// In rearm's kernel calls.
    pub rearm: std::time::Duration,
}

impl KernelTime {
    /// Time `f` and add it to the collect total.
    pub fn collect<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let r = f();
        self.collect += start.elapsed();
        r
    }

    /// Time `f` and add it to the rearm total.
    pub fn rearm<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        let r = f();
        self.rearm += start.elapsed();
        r
    }
}

/// One step of a harvest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Read what the mechanism reports.
    Collect,
    /// Make the collected pages trackable again.
    Rearm,
    /// Read the collected pages' contents.
    Copy,
}

/// How collect and rearm relate in a mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RearmKind {
    /// One call collects and re-protects (KVM_GET_DIRTY_LOG without manual protect,
    /// PAGEMAP_SCAN with PM_SCAN_WP_MATCHING): nothing can come between them.
    Atomic,
    /// A separate call rearms. `skip_loses`: whether skipping it can lose a write (false when
    /// the reported state simply stays set, as KVM's bitmap does without KVM_CLEAR_DIRTY_LOG).
    Separate {
        /// Whether skipping the rearm loses writes.
        skip_loses: bool,
    },
}

/// A documented class of false positives: pages a mechanism may report although the guest did
/// not write them since they were last reported. Reports count how often each class was used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Allowance {
    /// With `KVM_DIRTY_LOG_INITIALLY_SET`, the first KVM_GET_DIRTY_LOG after logging is enabled
    /// reports every page of the slot: the bitmap starts all ones and nothing is
    /// write-protected until the first KVM_CLEAR_DIRTY_LOG (api.rst, "4.118
    /// KVM_CLEAR_DIRTY_LOG" and KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    InitiallySet,
    /// userfaultfd write-protect tracks huge pages as a unit: a write to one 4 KiB page of a
    /// hugetlb page (or a PMD-mapped THP) reports the whole 2 MiB range.
    HugeGranularity,
    /// The page was written after it was collected but before its copy completed (between
    /// collect and copy of the previous harvest); the copy already holds the write, and the
    /// mechanism logged it again: re-protection at rearm makes the next write fault and log,
    /// and KVM's emulator logs every write it emulates even to pages that are writable.
    WrittenBeforeCopy,
}

impl Allowance {
    /// Every class, in report order.
    pub const ALL: [Self; 3] = [
        Self::InitiallySet,
        Self::HugeGranularity,
        Self::WrittenBeforeCopy,
    ];

    /// Name in reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::InitiallySet => "initially-set",
            Self::HugeGranularity => "huge-granularity",
            Self::WrittenBeforeCopy => "written-before-copy",
        }
    }
}

/// Errors from trackers; messages name the call, the slot and the errno.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// A KVM ioctl failed.
    #[error("{call} slot {slot}{range}: {text}")]
    Kvm {
        /// The ioctl.
        call: &'static str,
        /// Memslot.
        slot: u32,
        /// Page range, if relevant (" pages 64..128").
        range: String,
        /// errno text.
        text: String,
        /// errno.
        errno: i32,
    },
    /// A memslot operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A userfaultfd or pagemap call failed.
    #[error("{call}: {source}")]
    Host {
        /// The call.
        call: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The machine lacks what the tracker needs (e.g. no dirty ring configured).
    #[error("{0}")]
    Setup(String),
    /// The host kernel lacks a feature the tracker needs: a reason to skip, not an error.
    #[error("{0}")]
    Unsupported(String),
}

impl TrackError {
    pub(crate) fn kvm(call: &'static str, slot: u32, range: String, errno: i32) -> Self {
        Self::Kvm {
            call,
            slot,
            range,
            text: crate::sys::errno_text(errno),
            errno,
        }
    }
}

/// A tracking mechanism driven from the host.
pub trait Tracker: Send + std::fmt::Debug {
    /// Start tracking `slots` (the machine's vCPUs are stopped). After attach every page counts
    /// as clean except where an allowance says otherwise (INITIALLY_SET).
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError>;

    /// Add every page the mechanism reports to `out`. Remembers what it collected for
    /// [`Tracker::rearm`]. A slot the VM no longer has (deleted while tracked) is skipped; put
    /// back under the same id, it is tracked again.
    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError>;

    /// Make the pages of the last collect trackable again.
    fn rearm(&mut self, ctx: &TrackCtx<'_>) -> Result<(), TrackError>;

    /// Rearm only the pages of the last collect in `[first, first + count)` of `slot`
    /// (KVM_CLEAR_DIRTY_LOG over part of a slot). `first` and `count` are multiples of 64,
    /// or the range ends at the slot's end. Mechanisms that can only rearm as a whole do that.
    fn rearm_part(
        &mut self,
        ctx: &TrackCtx<'_>,
        slot: u32,
        first: u64,
        count: u64,
    ) -> Result<(), TrackError> {
        let _ = (slot, first, count);
        self.rearm(ctx)
    }

    /// Stop tracking.
    fn detach(&mut self, vm: &mut Vm) -> Result<(), TrackError>;

    /// The contract's order of the steps.
    fn order(&self) -> [Step; 3] {
        [Step::Collect, Step::Rearm, Step::Copy]
    }

    /// How collect and rearm relate.
    fn rearm_kind(&self) -> RearmKind;

    /// The false-positive classes this mechanism may produce.
    fn allowances(&self) -> &'static [Allowance];

    /// True while the next collect may report every page (INITIALLY_SET before its first
    /// collect).
    fn reports_everything_next(&self) -> bool {
        false
    }

    /// True when the mechanism reports huge pages as a unit on huge-page backings.
    fn reports_huge_units(&self) -> bool {
        false
    }

    /// What the mechanism saw besides the pages it reported (entries it could not place,
    /// faults it resolved), for a trial's evidence.
    fn evidence(&self) -> Vec<String> {
        Vec::new()
    }

    /// Kernel time since the last call, reset to zero.
    fn take_kernel_time(&mut self) -> KernelTime;

    /// The oracle's pages with a write the next collect must report. Mechanisms ignore it; the
    /// fault injector ([`inject`]) drops only such a page, so each injected drop loses a write
    /// and the self-test can demand that the oracle names exactly the dropped pages. Drivers
    /// that cannot tell call nothing (the injector then drops the lowest reported page).
    fn note_at_stake(&mut self, pages: &PageSet) {
        let _ = pages;
    }

    /// Findings about what the mechanism reported that are not losses but are wrong for this
    /// host's guests (e.g. pages only a ring's backup bitmap reported): each a sentence.
    fn problems(&self) -> Vec<String> {
        Vec::new()
    }

    /// A failure of the tracker's own machinery outside any call (a fault-handler thread that
    /// stopped). While one is recorded, a blocked or stalled vCPU is its consequence, not a
    /// kernel hazard: scenarios report the trial as this harness error instead.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Something a tracker can work on: a stopped machine, or the view of a running one.
pub trait TrackSource {
    /// The VM and rings.
    fn track_ctx(&self) -> TrackCtx<'_>;
}

impl<T: TrackSource + ?Sized> TrackSource for &T {
    fn track_ctx(&self) -> TrackCtx<'_> {
        (**self).track_ctx()
    }
}

/// Run one harvest in `tracker`'s order: collect into `out`, rearm, and let `after(step, src,
/// out)` act after every step. The copy step does nothing itself: `after` performs the copy
/// when it sees [`Step::Copy`] (race scenarios also run the guest from `after` between steps,
/// which is why it gets `src` mutably).
pub fn harvest<S: TrackSource, E: From<TrackError>>(
    tracker: &mut dyn Tracker,
    src: &mut S,
    out: &mut PageSet,
    mut after: impl FnMut(Step, &mut S, &PageSet) -> Result<(), E>,
) -> Result<(), E> {
    for step in tracker.order() {
        match step {
            Step::Collect => tracker.collect(&src.track_ctx(), out)?,
            Step::Rearm => tracker.rearm(&src.track_ctx())?,
            Step::Copy => {}
        }
        after(step, src, out)?;
    }
    Ok(())
}

/// How to build a tracker: the mechanism and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mechanism")]
pub enum TrackerSpec {
    /// KVM_GET_DIRTY_LOG.
    DirtyLog,
    /// KVM_CLEAR_DIRTY_LOG with manual protect.
    ClearLog {
        /// With KVM_DIRTY_LOG_INITIALLY_SET.
        initially_set: bool,
        /// How CLEAR calls cover the collected pages.
        granularity: ClearGranularity,
    },
    /// The dirty ring.
    DirtyRing {
        /// Ring size in bytes (a power of two, 4 KiB up to the cap's value).
        bytes: u32,
        /// With KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: the slots also keep the backup bitmap
        /// (for writes made without a vCPU), read with KVM_GET_DIRTY_LOG at every collect.
        #[serde(default)]
        with_bitmap: bool,
    },
    /// userfaultfd async write-protect + PAGEMAP_SCAN.
    UffdWpAsync,
    /// userfaultfd write-protect with a fault-handler thread.
    UffdWpSync,
}

impl TrackerSpec {
    /// The mechanism.
    #[must_use]
    pub fn mechanism(self) -> Mechanism {
        match self {
            Self::DirtyLog => Mechanism::DirtyLog,
            Self::ClearLog {
                initially_set: false,
                ..
            } => Mechanism::ClearLog,
            Self::ClearLog {
                initially_set: true,
                ..
            } => Mechanism::ClearLogInitiallySet,
            Self::DirtyRing {
                with_bitmap: false, ..
            } => Mechanism::DirtyRing,
            Self::DirtyRing {
                with_bitmap: true, ..
            } => Mechanism::DirtyRingWithBitmap,
            Self::UffdWpAsync => Mechanism::UffdWpAsync,
            Self::UffdWpSync => Mechanism::UffdWpSync,
        }
    }

    /// Label with parameters (also a trial-name component).
    #[must_use]
    pub fn label(self) -> String {
        match self {
            Self::ClearLog {
                initially_set,
                granularity,
            } => format!(
                "{}/{}",
                if initially_set {
                    "clear-log-initially-set"
                } else {
                    "clear-log"
                },
                granularity.name()
            ),
            Self::DirtyRing { bytes, with_bitmap } => {
                let name = if with_bitmap {
                    "dirty-ring-with-bitmap"
                } else {
                    "dirty-ring"
                };
                if bytes >= 1 << 20 {
                    format!("{name}/{}m", bytes >> 20)
                } else {
                    format!("{name}/{}k", bytes >> 10)
                }
            }
            other => other.mechanism().name().to_string(),
        }
    }

    /// Ring bytes the machine must be created with, for ring trackers.
    #[must_use]
    pub fn ring_bytes(self) -> Option<u32> {
        match self {
            Self::DirtyRing { bytes, .. } => Some(bytes),
            _ => None,
        }
    }

    /// Whether the machine's ring must come with the backup bitmap
    /// (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP).
    #[must_use]
    pub fn ring_with_bitmap(self) -> bool {
        matches!(
            self,
            Self::DirtyRing {
                with_bitmap: true,
                ..
            }
        )
    }

    /// Build the tracker.
    #[must_use]
    pub fn build(self) -> Box<dyn Tracker> {
        match self {
            Self::DirtyLog => Box::new(DirtyLog::default()),
            Self::ClearLog {
                initially_set,
                granularity,
            } => Box::new(ClearLog::new(initially_set, granularity)),
            Self::DirtyRing { with_bitmap, .. } => Box::new(DirtyRingTracker::new(with_bitmap)),
            Self::UffdWpAsync => Box::new(UffdWpAsync::default()),
            Self::UffdWpSync => Box::new(UffdWpSync::default()),
        }
    }
}

/// The unit, in 4 KiB pages, in which `tracker` reports `slot` (the HugeGranularity
/// allowance): the backing's page size where the mechanism reports huge pages whole, else 1.
#[must_use]
pub fn huge_unit_pages(tracker: &dyn Tracker, vm: &Vm, slot: u32) -> u64 {
    if !tracker.reports_huge_units() {
        return 1;
    }
    vm.slot(slot)
        .map_or(1, |s| s.memory.backing().page_bytes() / 4096)
}
