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
use crate::host::Backend;
use crate::sys::dirty::{GFN_BYTES, bitmap_words, get_dirty_log, reset_dirty_rings};
use crate::vm::Vm;

/// `KVM_DIRTY_RING_RSVD_ENTRIES` (include/linux/kvm_dirty_ring.h in 6.1, 6.12 and 7.x): ring
/// entries KVM keeps free beyond the soft limit, for writes it must log after a vCPU has been
/// told the ring is full.
pub const KVM_RING_RESERVED_ENTRIES: u64 = 64;

/// The VMX PML buffer's entries: `PML_ENTITY_NUM` (arch/x86/kvm/vmx/vmx.h, 6.1 and 6.12),
/// renamed `PML_LOG_NR_ENTRIES` later (7.x; AMD's PML in 7.x uses the same constant). A full
/// PML buffer is drained into the ring in one go, so KVM reserves room for all of it.
pub const PML_ENTRIES: u64 = 512;

/// Entries the CPU's own dirty log may push at once on this backend: `kvm_cpu_dirty_log_size()`.
/// That is the PML buffer where the vendor module has PML on (`kvm_intel.pml`, or `kvm_amd.pml`
/// on kernels with AMD PML; the module parameter is the effective value: KVM clears it when the
/// CPU or EPT A/D bits cannot do PML), else 0 (the `__weak` default in virt/kvm/dirty_ring.c:
/// no hardware log on PVM, shadow paging, SVM without PML or arm64).
#[must_use]
pub fn cpu_dirty_log_entries(backend: &Backend) -> u64 {
    if backend.pml == Some(true) {
        PML_ENTRIES
    } else {
        0
    }
}

/// Whether KVM takes a dirty ring of `bytes` bytes per vCPU, and leaves it usable, given the
/// CPU dirty log's entries and the host page size; `Err` says why not.
///
/// The kernel's rule, the same in 6.1, 6.12 and 7.x (virt/kvm/kvm_main.c,
/// `kvm_vm_ioctl_enable_dirty_log_ring`): EINVAL unless `bytes` is a power of two, at least
/// `PAGE_SIZE`, and at least `kvm_dirty_ring_get_rsvd_entries() * sizeof(struct kvm_dirty_gfn)`
/// where (virt/kvm/dirty_ring.c) `kvm_dirty_ring_get_rsvd_entries() =
/// KVM_DIRTY_RING_RSVD_ENTRIES + kvm_cpu_dirty_log_size()` (7.x passes the VM: the per-VM size,
/// the same figure for an ordinary VM); E2BIG above the cap's maximum. `kvm_dirty_ring_alloc`
/// then sets the soft limit to entries minus the reserve, so a ring of exactly the reserve would
/// be taken but be "full" before its first entry: this also refuses that (entries must exceed
/// the reserve). So with PML on (512 + 64 = 576 entries of 16 bytes = 9216 bytes) 4 KiB and
/// 8 KiB rings are refused and 16 KiB is the smallest; without PML 4 KiB works on 4 KiB-page
/// hosts, and a 16 KiB-page arm64 host needs 16 KiB.
///
/// What it cannot see: a kernel whose rule differs (the EINVAL from KVM_ENABLE_CAP is then
/// reported naming this rule, so the difference shows).
pub fn ring_size_rule(bytes: u32, cpu_log_entries: u64, page_bytes: u64) -> Result<(), String> {
    let entry = GFN_BYTES as u64;
    let reserved = KVM_RING_RESERVED_ENTRIES + cpu_log_entries;
    let bytes = u64::from(bytes);
    let entries = bytes / entry;
    let why = if !bytes.is_power_of_two() {
        format!("{bytes} bytes is not a power of two")
    } else if bytes < page_bytes {
        format!("{bytes} bytes is less than the host page size ({page_bytes})")
    } else if entries <= reserved {
        format!(
            "its {entries} entries of {entry} bytes do not exceed the {reserved} KVM reserves \
             ({KVM_RING_RESERVED_ENTRIES} plus {cpu_log_entries} for the CPU's dirty log{})",
            if cpu_log_entries > 0 {
                ": the PML buffer"
            } else {
                ""
            }
        )
    } else {
        return Ok(());
    };
    Err(format!(
        "KVM takes a dirty ring only of a power-of-two size, at least the page size and more \
         than (64 + CPU dirty-log entries) x 16 bytes = {} bytes here \
         (kvm_vm_ioctl_enable_dirty_log_ring, kvm_dirty_ring_get_rsvd_entries): {why}",
        reserved * entry
    ))
}

/// The host's page size in bytes.
#[must_use]
pub fn host_page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions and touches no memory of ours.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).unwrap_or(4096)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pml_needs_a_ring_above_576_entries() {
        // 576 reserved entries x 16 bytes = 9216: 4 KiB and 8 KiB are refused, 16 KiB is not.
        for bytes in [4096, 8192] {
            let why = ring_size_rule(bytes, PML_ENTRIES, 4096).unwrap_err();
            assert!(why.contains("do not exceed the 576 KVM reserves"), "{why}");
            assert!(why.contains("the PML buffer"), "{why}");
            assert!(why.contains("= 9216 bytes here"), "{why}");
        }
        assert_eq!(ring_size_rule(16384, PML_ENTRIES, 4096), Ok(()));
        assert_eq!(ring_size_rule(1 << 20, PML_ENTRIES, 4096), Ok(()));
    }

    #[test]
    fn without_pml_a_page_sized_ring_is_enough() {
        assert_eq!(ring_size_rule(4096, 0, 4096), Ok(()));
        let why = ring_size_rule(2048, 0, 4096).unwrap_err();
        assert!(why.contains("less than the host page size (4096)"), "{why}");
        // A 16 KiB-page arm64 host refuses 4 KiB and 8 KiB rings.
        assert!(ring_size_rule(8192, 0, 16384).is_err());
        assert_eq!(ring_size_rule(16384, 0, 16384), Ok(()));
    }

    #[test]
    fn a_ring_of_exactly_the_reserve_is_refused_and_sizes_must_be_powers_of_two() {
        // 64 entries = 1024 bytes: KVM's own check would take it on a 1 KiB-page host, but its
        // soft limit would be 0.
        let why = ring_size_rule(1024, 0, 1024).unwrap_err();
        assert!(
            why.contains("64 entries of 16 bytes do not exceed the 64"),
            "{why}"
        );
        let why = ring_size_rule(12288, 0, 4096).unwrap_err();
        assert!(why.contains("not a power of two"), "{why}");
    }

    #[test]
    fn pml_counts_only_when_the_module_says_it_is_on() {
        let mut backend = crate::host::probe_backend();
        backend.pml = Some(true);
        assert_eq!(cpu_dirty_log_entries(&backend), 512);
        backend.pml = Some(false);
        assert_eq!(cpu_dirty_log_entries(&backend), 0);
        backend.pml = None;
        assert_eq!(cpu_dirty_log_entries(&backend), 0);
    }
}
