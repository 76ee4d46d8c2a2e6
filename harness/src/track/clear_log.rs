//! `clear-log`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG.
//!
//! Contract: with manual protect, GET only reads the bitmap; CLEAR clears the given bits and
//! write-protects exactly those pages. A write landing between GET and CLEAR on a page that is
//! already writable is not logged again, so the page must be copied *after* the CLEAR: the copy
//! then holds the write. `first_page` of a CLEAR must be a multiple of 64, and `num_pages` too
//! unless the range ends at the slot's end (EINVAL otherwise). With INITIALLY_SET the bitmap
//! starts all ones and nothing is write-protected until the first CLEAR.

use serde::{Deserialize, Serialize};

use super::{Allowance, KernelTime, PageSet, RearmKind, TrackCtx, TrackError, Tracker};
use crate::sys::dirty::{bitmap_words, clear_dirty_log, get_dirty_log};
use crate::vm::Vm;

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
const MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_DIRTY_LOG_INITIALLY_SET`.
const INITIALLY_SET: u64 = 2;
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
const CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 = 168;

/// How the CLEAR calls cover the collected pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClearGranularity {
    /// One CLEAR over the whole slot with the collected bitmap as mask.
    Whole,
    /// One CLEAR per 64-page chunk that has a collected page (the last chunk may be short and
    /// end at the slot's end).
    Chunk64,
    /// One CLEAR per collected page: its 64-page chunk with a single-bit mask.
    PerPage,
}

impl ClearGranularity {
    /// Every granularity.
    pub const ALL: [Self; 3] = [Self::Whole, Self::Chunk64, Self::PerPage];

    /// Name in labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Whole => "whole",
            Self::Chunk64 => "chunk64",
            Self::PerPage => "per-page",
        }
    }
}

/// KVM_CLEAR_DIRTY_LOG with manual protect.
#[derive(Debug)]
pub struct ClearLog {
    initially_set: bool,
    granularity: ClearGranularity,
    /// (slot, pages, bitmap of the last collect).
    slots: Vec<(u32, u64, Vec<u64>)>,
    first_collect_pending: bool,
    time: KernelTime,
}

impl ClearLog {
    /// A clear-log tracker.
    #[must_use]
    pub fn new(initially_set: bool, granularity: ClearGranularity) -> Self {
        Self {
            initially_set,
            granularity,
            slots: Vec::new(),
            first_collect_pending: false,
            time: KernelTime::default(),
        }
    }

    /// CLEAR the pages of `mask` (which covers pages `first..end` of `slot`, word 0 = page
    /// `first`, `first` a multiple of 64) the way `granularity` says.
    fn clear_masked(
        time: &mut KernelTime,
        vm: &Vm,
        granularity: ClearGranularity,
        slot: u32,
        first: u64,
        end: u64,
        mask: &[u64],
    ) -> Result<(), TrackError> {
        match granularity {
            ClearGranularity::Whole => Self::clear(time, vm, slot, first, end - first, mask),
            ClearGranularity::Chunk64 => {
                for (i, &word) in mask.iter().enumerate().filter(|(_, w)| **w != 0) {
                    let chunk = first + i as u64 * 64;
                    Self::clear(time, vm, slot, chunk, (end - chunk).min(64), &[word])?;
                }
                Ok(())
            }
            ClearGranularity::PerPage => {
                for (i, &word) in mask.iter().enumerate() {
                    let chunk = first + i as u64 * 64;
                    let mut w = word;
                    while w != 0 {
                        let bit = w & w.wrapping_neg();
                        Self::clear(time, vm, slot, chunk, (end - chunk).min(64), &[bit])?;
                        w &= w - 1;
                    }
                }
                Ok(())
            }
        }
    }

    fn clear(
        time: &mut KernelTime,
        vm: &Vm,
        slot: u32,
        first: u64,
        num: u64,
        mask: &[u64],
    ) -> Result<(), TrackError> {
        let num32 = u32::try_from(num)
            .map_err(|_| TrackError::Setup(format!("slot {slot}: {num} pages")))?;
        time.rearm(|| clear_dirty_log(vm.fd(), slot, first, num32, mask))
            .map_err(|e| {
                TrackError::kvm(
                    "KVM_CLEAR_DIRTY_LOG",
                    slot,
                    format!(" pages {first}..{}", first + num),
                    e,
                )
            })
    }
}

/// Enable or disable manual protect (with `flags`) on the VM.
pub(crate) fn set_manual_protect(vm: &Vm, flags: u64) -> Result<(), TrackError> {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [flags, 0, 0, 0],
        ..Default::default()
    };
    vm.fd().enable_cap(&cap).map_err(|e| {
        TrackError::kvm(
            "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
            0,
            String::new(),
            e.errno(),
        )
    })
}

impl Tracker for ClearLog {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        let flags = MANUAL_PROTECT_ENABLE | if self.initially_set { INITIALLY_SET } else { 0 };
        set_manual_protect(vm, flags)?;
        self.slots.clear();
        for &slot in slots {
            vm.set_dirty_logging(slot, true)?;
            let pages = vm.slot(slot)?.pages();
            self.slots.push((slot, pages, vec![0; bitmap_words(pages)]));
        }
        self.first_collect_pending = self.initially_set;
        Ok(())
    }

    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        for (slot, _, bitmap) in &mut self.slots {
            bitmap.fill(0);
            if ctx.vm.slot(*slot).is_err() {
                continue; // deleted while tracked: nothing to collect, nothing to CLEAR
            }
            self.time
                .collect(|| get_dirty_log(ctx.vm.fd(), *slot, bitmap))
                .map_err(|e| TrackError::kvm("KVM_GET_DIRTY_LOG", *slot, String::new(), e))?;
            out.or_bitmap(*slot, bitmap);
        }
        self.first_collect_pending = false;
        Ok(())
    }

    fn rearm(&mut self, ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        for (slot, pages, bitmap) in &self.slots {
            if ctx.vm.slot(*slot).is_err() {
                continue;
            }
            Self::clear_masked(
                &mut self.time,
                ctx.vm,
                self.granularity,
                *slot,
                0,
                *pages,
                bitmap,
            )?;
        }
        Ok(())
    }

    fn rearm_part(
        &mut self,
        ctx: &TrackCtx<'_>,
        slot: u32,
        first: u64,
        count: u64,
    ) -> Result<(), TrackError> {
        let Self {
            slots,
            time,
            granularity,
            ..
        } = self;
        let Some((_, pages, bitmap)) = slots.iter().find(|(s, _, _)| *s == slot) else {
            return Err(TrackError::Setup(format!("slot {slot} is not tracked")));
        };
        let end = first.saturating_add(count).min(*pages);
        let words = |p: u64| usize::try_from(p.div_ceil(64)).unwrap_or(usize::MAX);
        let (lo, hi) = (
            usize::try_from(first / 64).unwrap_or(usize::MAX),
            words(end).min(bitmap.len()),
        );
        if lo >= hi {
            return Ok(());
        }
        Self::clear_masked(
            time,
            ctx.vm,
            *granularity,
            slot,
            first - first % 64,
            end,
            &bitmap[lo..hi],
        )
    }

    fn detach(&mut self, vm: &mut Vm) -> Result<(), TrackError> {
        for (slot, _, _) in &self.slots {
            if vm.slot(*slot).is_ok() {
                vm.set_dirty_logging(*slot, false)?;
            }
        }
        self.slots.clear();
        set_manual_protect(vm, 0)
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Separate { skip_loses: false }
    }

    fn allowances(&self) -> &'static [Allowance] {
        if self.initially_set {
            &[Allowance::InitiallySet, Allowance::WrittenBeforeCopy]
        } else {
            &[Allowance::WrittenBeforeCopy]
        }
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        std::mem::take(&mut self.time)
    }

    fn reports_everything_next(&self) -> bool {
        self.first_collect_pending
    }
}
