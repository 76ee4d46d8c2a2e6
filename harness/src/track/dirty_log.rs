//! `dirty-log`: KVM_GET_DIRTY_LOG without manual protect.
//!
//! Contract: GET returns the slot's bitmap, clears it, and write-protects the reported pages in
//! the same call, so collect and rearm are one step; the copy comes after it.

use super::{Allowance, KernelTime, PageSet, RearmKind, TrackCtx, TrackError, Tracker};
use crate::sys::dirty::{bitmap_words, get_dirty_log};
use crate::vm::Vm;

/// KVM_GET_DIRTY_LOG.
#[derive(Debug, Default)]
pub struct DirtyLog {
    slots: Vec<(u32, u64)>,
    bitmap: Vec<u64>,
    time: KernelTime,
}

impl Tracker for DirtyLog {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        self.slots.clear();
        for &slot in slots {
            vm.set_dirty_logging(slot, true)?;
            self.slots.push((slot, vm.slot(slot)?.pages()));
        }
        Ok(())
    }

    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        for &(slot, pages) in &self.slots {
            if ctx.vm.slot(slot).is_err() {
                continue; // deleted while tracked
            }
            self.bitmap.clear();
            self.bitmap.resize(bitmap_words(pages), 0);
            let bitmap = &mut self.bitmap;
            self.time
                .collect(|| get_dirty_log(ctx.vm.fd(), slot, bitmap))
                .map_err(|e| TrackError::kvm("KVM_GET_DIRTY_LOG", slot, String::new(), e))?;
            out.or_bitmap(slot, &self.bitmap);
        }
        Ok(())
    }

    fn rearm(&mut self, _ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        Ok(()) // GET already write-protected what it reported.
    }

    fn detach(&mut self, vm: &mut Vm) -> Result<(), TrackError> {
        for &(slot, _) in &self.slots {
            if vm.slot(slot).is_ok() {
                vm.set_dirty_logging(slot, false)?;
            }
        }
        self.slots.clear();
        Ok(())
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Atomic
    }

    fn allowances(&self) -> &'static [Allowance] {
        &[Allowance::WrittenBeforeCopy]
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        std::mem::take(&mut self.time)
    }
}
