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
//!
//! With the backup bitmap (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, enabled by the machine after the
//! ring and before any memslot): KVM logs writes made in vCPU context to the ring and writes
//! made without one (arm64: vgic/ITS table saves) to the slot's bitmap. Collect takes the ring
//! first, then KVM_GET_DIRTY_LOG of every slot (which clears and write-protects what it
//! returns), the bitmap last as the API asks. Pages only the bitmap reported are a problem
//! ([`Tracker::problems`]): the generated guests write only from vCPU context and nothing here
//! makes KVM write guest memory without a vCPU (no vgic/ITS table saves), so each such page is
//! a write the ring lost and the bitmap happened to cover. A slot with the bitmap also counts as "logging" to arm64's fault path
//! (`memslot_is_logging()` tests `dirty_bitmap`), so huge mappings are split on write.

use super::{Allowance, KernelTime, PageSet, RearmKind, TrackCtx, TrackError, Tracker};
use crate::sys::dirty::{bitmap_words, get_dirty_log, reset_dirty_rings};
use crate::vm::Vm;

/// The dirty ring tracker. The rings themselves belong to the machine (they must exist before
/// the vCPUs run); the tracker reads them through [`TrackCtx::rings`].
#[derive(Debug, Default)]
pub struct DirtyRingTracker {
    slots: Vec<u32>,
    /// Also read the backup bitmap (KVM_GET_DIRTY_LOG) at every collect.
    with_bitmap: bool,
    /// Pages of each tracked slot (bitmap sizes).
    slot_pages: Vec<u64>,
    bitmap: Vec<u64>,
    /// Pages the backup bitmap reported that the ring did not, and bitmap reads made.
    bitmap_only: u64,
    /// The first few of them, with the bitmap read (1-based) that found each.
    bitmap_only_examples: Vec<(u32, u64, u64)>,
    bitmap_reads: u64,
    /// Entries naming a slot this tracker does not track, or address space 1 (SMM): counted
    /// and named in the evidence, never silently dropped.
    foreign_entries: u64,
    time: KernelTime,
}

impl DirtyRingTracker {
    /// A ring tracker; `with_bitmap` also reads the backup bitmap (the machine must have been
    /// built with `dirty_ring_with_bitmap`).
    #[must_use]
    pub fn new(with_bitmap: bool) -> Self {
        Self {
            with_bitmap,
            ..Self::default()
        }
    }

    fn collect_bitmaps(&mut self, ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        for (i, &slot) in self.slots.iter().enumerate() {
            if ctx.vm.slot(slot).is_err() {
                continue; // deleted while tracked
            }
            self.bitmap.clear();
            self.bitmap.resize(bitmap_words(self.slot_pages[i]), 0);
            let bitmap = &mut self.bitmap;
            self.time
                .collect(|| get_dirty_log(ctx.vm.fd(), slot, bitmap))
                .map_err(|e| {
                    TrackError::kvm(
                        "KVM_GET_DIRTY_LOG (dirty ring's backup bitmap)",
                        slot,
                        String::new(),
                        e,
                    )
                })?;
            self.bitmap_reads += 1;
            for (w, &word) in self.bitmap.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if out.insert(slot, page) {
                        self.bitmap_only += 1;
                        if self.bitmap_only_examples.len() < 4 {
                            self.bitmap_only_examples
                                .push((slot, page, self.bitmap_reads));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Tracker for DirtyRingTracker {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        self.slots = slots.to_vec();
        self.slot_pages.clear();
        for &slot in slots {
            vm.set_dirty_logging(slot, true)?;
            self.slot_pages.push(vm.slot(slot)?.pages());
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
        if self.with_bitmap {
            self.collect_bitmaps(ctx, out)?;
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
        self.slot_pages.clear();
        Ok(())
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Separate { skip_loses: true }
    }

    fn allowances(&self) -> &'static [Allowance] {
        &[Allowance::WrittenBeforeCopy]
    }

    fn evidence(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.foreign_entries > 0 {
            out.push(format!(
                "{} dirty ring entries named a slot not tracked or address space 1",
                self.foreign_entries
            ));
        }
        if self.with_bitmap {
            out.push(format!(
                "backup bitmap read {} times (KVM_GET_DIRTY_LOG after each ring collect): {} page(s) reported by the bitmap and not the ring",
                self.bitmap_reads, self.bitmap_only
            ));
        }
        out
    }

    fn problems(&self) -> Vec<String> {
        if self.bitmap_only == 0 {
            return Vec::new();
        }
        let examples: Vec<String> = self
            .bitmap_only_examples
            .iter()
            .map(|(slot, page, read)| format!("slot {slot} page {page} at bitmap read {read}"))
            .collect();
        vec![format!(
            "{} page(s) reported only by the backup bitmap, not the dirty ring ({}): these guests write only from vCPU context, so each is a write the ring lost",
            self.bitmap_only,
            examples.join(", ")
        )]
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        std::mem::take(&mut self.time)
    }
}
