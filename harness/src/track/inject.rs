//! Fault injection: a tracker wrapper that loses pages on purpose, to prove the oracle catches
//! every kind of loss and names the right page.
//!
//! - `drop-page`: every collect that reports something drops its lowest page from the result,
//!   after the mechanism collected (and will rearm) it — the page is re-protected but never
//!   reported, as if the kernel had lost its dirty bit.
//! - `skip-rearm`: the first rearm after a collect that reported pages is skipped: those pages
//!   stay writable, so later writes to them are never logged.
//! - `copy-before-rearm`: the copy step runs before the rearm: a write landing between them is
//!   in neither the copy nor the log.
//!
//! A fault only loses data where the mechanism makes it lossy ([`applicability`]); the wrapper
//! records every page it affected so a test can check that each lost page the oracle names is
//! one of them.

use serde::{Deserialize, Serialize};

use super::{Allowance, KernelTime, PageSet, RearmKind, Step, TrackCtx, TrackError, Tracker};
use crate::vm::Vm;

/// A deliberate loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Drop one reported page per collect.
    DropPage,
    /// Skip one rearm.
    SkipRearm,
    /// Copy before rearming.
    CopyBeforeRearm,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Self; 3] = [Self::DropPage, Self::SkipRearm, Self::CopyBeforeRearm];

    /// Name on the command line and in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::DropPage => "drop-page",
            Self::SkipRearm => "skip-rearm",
            Self::CopyBeforeRearm => "copy-before-rearm",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!("unknown fault {s:?}: expected drop-page, skip-rearm or copy-before-rearm")
            })
    }
}

/// Whether `fault` can lose a write on a mechanism whose rearm is `kind`; the error says why
/// not.
pub fn applicability(fault: Fault, kind: RearmKind) -> Result<(), &'static str> {
    match (fault, kind) {
        (Fault::DropPage, _) => Ok(()),
        (Fault::SkipRearm | Fault::CopyBeforeRearm, RearmKind::Atomic) => Err(
            "collect re-protects in the same call (KVM_GET_DIRTY_LOG, or PAGEMAP_SCAN with \
             PM_SCAN_WP_MATCHING): there is no separate rearm to skip or to copy before",
        ),
        (Fault::SkipRearm, RearmKind::Separate { skip_loses: false }) => Err(
            "skipping KVM_CLEAR_DIRTY_LOG leaves the pages' dirty bits set, so the next \
             collect reports them again: nothing can be lost",
        ),
        (Fault::SkipRearm | Fault::CopyBeforeRearm, RearmKind::Separate { .. }) => Ok(()),
    }
}

/// A tracker with a fault injected.
#[derive(Debug)]
pub struct Injected {
    inner: Box<dyn Tracker>,
    fault: Fault,
    affected: PageSet,
    scratch: PageSet,
    last_collected: PageSet,
    skipped: bool,
}

impl Injected {
    /// Wrap `inner` with `fault`.
    #[must_use]
    pub fn new(inner: Box<dyn Tracker>, fault: Fault) -> Self {
        Self {
            inner,
            fault,
            affected: PageSet::new(),
            scratch: PageSet::new(),
            last_collected: PageSet::new(),
            skipped: false,
        }
    }

    /// The fault.
    #[must_use]
    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// Pages the fault touched: dropped, left unprotected, or copied before their rearm.
    #[must_use]
    pub fn affected(&self) -> &PageSet {
        &self.affected
    }
}

impl Tracker for Injected {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        self.inner.attach(vm, slots)
    }

    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        self.scratch.clear();
        self.inner.collect(ctx, &mut self.scratch)?;
        match self.fault {
            Fault::DropPage => {
                let first = self.scratch.iter().next();
                if let Some((slot, page)) = first {
                    self.scratch.remove(slot, page);
                    self.affected.insert(slot, page);
                }
            }
            Fault::SkipRearm => {
                self.last_collected.clear();
                self.last_collected.union_with(&self.scratch);
            }
            Fault::CopyBeforeRearm => self.affected.union_with(&self.scratch),
        }
        out.union_with(&self.scratch);
        Ok(())
    }

    fn rearm(&mut self, ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        if self.fault == Fault::SkipRearm && !self.skipped && !self.last_collected.is_empty() {
            self.skipped = true;
            self.affected.union_with(&self.last_collected);
            return Ok(());
        }
        self.inner.rearm(ctx)
    }

    fn detach(&mut self, vm: &mut Vm) -> Result<(), TrackError> {
        self.inner.detach(vm)
    }

    fn order(&self) -> [Step; 3] {
        if self.fault == Fault::CopyBeforeRearm {
            [Step::Collect, Step::Copy, Step::Rearm]
        } else {
            self.inner.order()
        }
    }

    fn rearm_kind(&self) -> RearmKind {
        self.inner.rearm_kind()
    }

    fn allowances(&self) -> &'static [Allowance] {
        self.inner.allowances()
    }

    fn reports_everything_next(&self) -> bool {
        self.inner.reports_everything_next()
    }

    fn reports_huge_units(&self) -> bool {
        self.inner.reports_huge_units()
    }

    fn evidence(&self) -> Vec<String> {
        self.inner.evidence()
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        self.inner.take_kernel_time()
    }

    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applicability_follows_the_rearm_kind() {
        assert!(applicability(Fault::DropPage, RearmKind::Atomic).is_ok());
        assert!(applicability(Fault::SkipRearm, RearmKind::Atomic).is_err());
        assert!(
            applicability(Fault::SkipRearm, RearmKind::Separate { skip_loses: false }).is_err()
        );
        assert!(applicability(Fault::SkipRearm, RearmKind::Separate { skip_loses: true }).is_ok());
        assert!(
            applicability(
                Fault::CopyBeforeRearm,
                RearmKind::Separate { skip_loses: false }
            )
            .is_ok()
        );
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
    }
}
