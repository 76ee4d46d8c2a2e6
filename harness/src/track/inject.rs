//! Fault injection: a tracker wrapper that loses pages on purpose, to prove the oracle catches
//! every kind of loss and names the right page.
//!
//! - `drop-page`: every collect drops one page from the result, after the mechanism collected
//!   (and will rearm) it — the page is re-protected but never reported, as if the kernel had
//!   lost its dirty bit. Where the driver told it which pages have a write this collect must
//!   report ([`Tracker::note_at_stake`]), it drops the lowest of those the collect reported that
//!   it has not dropped before, so every drop loses a write of its own and the oracle must name
//!   exactly the dropped pages
//!   ([`Injected::lost_for_sure`]); otherwise the lowest reported page.
//! - `skip-rearm`: the first rearm after a collect that reported pages is skipped: those pages
//!   stay writable, so later writes to them are never logged.
//! - `copy-before-rearm`: the copy step runs before the rearm: a write landing between them is
//!   in neither the copy nor the log. Pages at risk are the collected pages whose content
//!   changed between the collect and the end of the rearm (read back from guest memory).
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
    /// Pages the driver says the next collect must report (consumed by that collect).
    at_stake: Option<PageSet>,
    /// Drops of pages at stake: each lost a write.
    lost_for_sure: PageSet,
    /// Drops made without knowing what was at stake.
    blind_drops: u64,
    /// copy-before-rearm: a fingerprint of each collected page's content at the collect.
    fingerprints: Vec<(u32, u64, u64)>,
}

/// A fingerprint of page `page` of memslot `slot` (None when the slot is gone).
fn fingerprint(ctx: &TrackCtx<'_>, slot: u32, page: u64) -> Option<u64> {
    let s = ctx.vm.slot(slot).ok()?;
    let mut buf = [0u8; 4096];
    s.memory.read(s.offset + page * 4096, &mut buf);
    // FNV-1a over the words: any change of a stamp changes it.
    Some(buf.chunks_exact(8).fold(0xcbf2_9ce4_8422_2325_u64, |h, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        (h ^ u64::from_le_bytes(b)).wrapping_mul(0x0100_0000_01b3)
    }))
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
            at_stake: None,
            lost_for_sure: PageSet::new(),
            blind_drops: 0,
            fingerprints: Vec::new(),
        }
    }

    /// The fault.
    #[must_use]
    pub fn fault(&self) -> Fault {
        self.fault
    }

    /// Pages the fault touched: dropped, left unprotected, or copied before their rearm and
    /// written before the rearm ended.
    #[must_use]
    pub fn affected(&self) -> &PageSet {
        &self.affected
    }

    /// `drop-page`: the dropped pages that had a write the collect had to report — each a
    /// loss the oracle must name. `None` when some drop was made without that knowledge.
    #[must_use]
    pub fn lost_for_sure(&self) -> Option<&PageSet> {
        (self.fault == Fault::DropPage && self.blind_drops == 0).then_some(&self.lost_for_sure)
    }
}

impl Tracker for Injected {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        self.inner.attach(vm, slots)
    }

    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        self.scratch.clear();
        self.inner.collect(ctx, &mut self.scratch)?;
        let at_stake = self.at_stake.take();
        match self.fault {
            Fault::DropPage => {
                let victim = match &at_stake {
                    // Each page at most once, so every drop is a loss of its own to name.
                    Some(stake) => self
                        .scratch
                        .iter()
                        .find(|&(s, p)| stake.contains(s, p) && !self.lost_for_sure.contains(s, p)),
                    None => self.scratch.iter().next(),
                };
                if let Some((slot, page)) = victim {
                    self.scratch.remove(slot, page);
                    self.affected.insert(slot, page);
                    if at_stake.is_some() {
                        self.lost_for_sure.insert(slot, page);
                    } else {
                        self.blind_drops += 1;
                    }
                }
            }
            Fault::SkipRearm => {
                self.last_collected.clear();
                self.last_collected.union_with(&self.scratch);
            }
            Fault::CopyBeforeRearm => {
                self.fingerprints.clear();
                for (slot, page) in self.scratch.iter() {
                    if let Some(f) = fingerprint(ctx, slot, page) {
                        self.fingerprints.push((slot, page, f));
                    }
                }
            }
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
        self.inner.rearm(ctx)?;
        if self.fault == Fault::CopyBeforeRearm {
            // The copy ran before this rearm: a page written since the collect may have
            // changed after its copy, in no log.
            for &(slot, page, f) in &self.fingerprints {
                if fingerprint(ctx, slot, page) != Some(f) {
                    self.affected.insert(slot, page);
                }
            }
            self.fingerprints.clear();
        }
        Ok(())
    }

    fn note_at_stake(&mut self, pages: &PageSet) {
        self.at_stake = Some(pages.clone());
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

    fn problems(&self) -> Vec<String> {
        self.inner.problems()
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
