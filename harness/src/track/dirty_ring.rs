//! `dirty-ring`: per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, or DIRTY_LOG_RING).
//!
//! Contract: the ring is enabled on the VM before any vCPU exists (the machine does that) and
//! mapped from each vCPU fd. Collect: acquire-load each entry's flags, take entries with DIRTY,
//! release-store RESET. Rearm: KVM_RESET_DIRTY_RINGS re-protects the collected pages and
//! recycles the entries. The copy comes after the reset: a write landing on a collected page
//! before the reset is not logged again (the page is still writable), so only a copy made after
//! the reset holds it. A vCPU whose ring passes its soft limit exits with
//! KVM_EXIT_DIRTY_RING_FULL and cannot run again until a reset. Entries may repeat (ring-full
//! exits and emulated writes add duplicates); the page set de-duplicates them.

use super::{Allowance, KernelTime, PageSet, RearmKind, TrackCtx, TrackError, Tracker};
use crate::sys::dirty::reset_dirty_rings;
use crate::vm::Vm;

/// The dirty ring tracker. The rings themselves belong to the machine (they must exist before
/// the vCPUs run); the tracker reads them through [`TrackCtx::rings`].
#[derive(Debug, Default)]
pub struct DirtyRingTracker {
    slots: Vec<u32>,
    /// Entries naming a slot this tracker does not track, or address space 1 (SMM): counted
    /// and named in the evidence, never silently dropped.
    foreign_entries: u64,
    time: KernelTime,
}

impl Tracker for DirtyRingTracker {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        self.slots = slots.to_vec();
        for &slot in slots {
            vm.set_dirty_logging(slot, true)?;
        }
        Ok(())
    }

    fn collect(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        if ctx.rings.is_empty() {
            return Err(TrackError::Setup(
                "the machine has no dirty rings: build it with MachineConfig::dirty_ring".into(),
            ));
        }
        for ring in ctx.rings {
            ring.collect(|field, offset| {
                let (as_id, slot) = (field >> 16, field & 0xffff);
                if as_id == 0 && self.slots.contains(&slot) {
                    out.insert(slot, offset);
                } else {
                    self.foreign_entries += 1;
                }
            });
        }
        Ok(())
    }

    fn rearm(&mut self, ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        self.time
            .rearm(|| reset_dirty_rings(ctx.vm.fd()))
            .map(|_| ())
            .map_err(|e| TrackError::kvm("KVM_RESET_DIRTY_RINGS", 0, String::new(), e))
    }

    fn detach(&mut self, vm: &mut Vm) -> Result<(), TrackError> {
        for &slot in &self.slots {
            if vm.slot(slot).is_ok() {
                vm.set_dirty_logging(slot, false)?;
            }
        }
        self.slots.clear();
        Ok(())
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Separate { skip_loses: true }
    }

    fn allowances(&self) -> &'static [Allowance] {
        &[Allowance::WrittenBeforeCopy]
    }

    fn evidence(&self) -> Vec<String> {
        if self.foreign_entries == 0 {
            return Vec::new();
        }
        vec![format!(
            "{} dirty ring entries named a slot not tracked or address space 1",
            self.foreign_entries
        )]
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        std::mem::take(&mut self.time)
    }
}
