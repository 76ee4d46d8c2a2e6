//! (b) EPT D-bit dirty logging with PML (seed 000, "x86, ept: Track dirty page w/o page fault").
//!
//! The seed's flow, which this model follows step for step:
//! > Case 1: Enable VM dirty page track w/ PML: a. write protect guest memory ...
//! > (`vmx_slot_enable_log_dirty` -> `kvm_mmu_slot_leaf_clear_dirty` + `largepage_remove_write_access`)
//! > b. Update VM dirty_bitmap in page fault path for huge page
//! > c. Qemu query VM dirty_bitmap by KVM_GET_DIRTY_LOG ioctl
//! >    c1. Kick VM, sync dirty_bitmap with PML buffer in VM_EXIT
//! >    c2. D bit will be cleared for 4K page
//! >    c3. For huge page, write protect spte
//!
//! So: enabling logging clears D on 4 KiB entries and write-protects huge ones; the hardware
//! appends a page to the vCPU's PML buffer when it sets D, with a PML-full exit when the buffer
//! is full; every exit (fault, PML-full, kick) moves the buffer into the bitmap. GET kicks the
//! vCPUs first, then reads the bitmap; the rearm (CLEAR, manual protect as in the baseline)
//! clears D on the reported 4 KiB pages and flushes the TLBs. Disabling (case 2: set D so
//! PML-full exits stop) is not modelled: nothing is judged after logging ends.
//!
//! Mutants: GET without flushing the PML buffers first (no kick); CLEAR that clears D without
//! the TLB flush (a TLB entry that cached D=1 lets writes through without setting D again).

use super::baseline::{log_and_unprotect, write_protect};
use super::mmu::{Mmu, WalkKind, bit};
use super::world::{Costs, Design, HostOp};

/// Known-bad variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// GET reads the bitmap without kicking the vCPUs to flush their PML buffers.
    NoPmlFlushBeforeGet,
    /// CLEAR clears D without flushing the TLBs.
    ClearDWithoutFlush,
}

/// The PML design.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pml {
    /// A known-bad variant, or `None`.
    pub mutant: Option<Mutant>,
}

impl Pml {
    /// Every mutant.
    pub const MUTANTS: [Mutant; 2] = [Mutant::NoPmlFlushBeforeGet, Mutant::ClearDWithoutFlush];
}

fn clear_dirty(m: &mut Mmu, page: usize, c: &mut Costs) {
    if m.is_huge(page) {
        write_protect(m, page, c);
    } else if m.leaf[page].d {
        m.leaf[page].d = false;
        c.protect_entries += 1;
    }
}

impl Design for Pml {
    fn name(&self) -> String {
        match self.mutant {
            None => "pml".into(),
            Some(m) => format!("pml/{m:?}"),
        }
    }

    fn walk_kind(&self) -> WalkKind {
        WalkKind::X86 { pml: true }
    }

    fn round(&self) -> Vec<HostOp> {
        let mut ops = vec![HostOp::GetBegin];
        if self.mutant != Some(Mutant::NoPmlFlushBeforeGet) {
            ops.push(HostOp::KickPml);
        }
        ops.extend([
            HostOp::Get { clear: false },
            HostOp::GetEnd,
            HostOp::Lock,
            HostOp::ClearNext,
            HostOp::Unlock,
        ]);
        if self.mutant != Some(Mutant::ClearDWithoutFlush) {
            ops.push(HostOp::FlushTlbs);
        }
        ops.push(HostOp::Copy);
        ops
    }

    fn enable_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        clear_dirty(m, page, c);
    }

    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, _c: &mut Costs) {
        // Only write-protected (huge) mappings fault: split, log, map writable and dirty.
        log_and_unprotect(m, page);
    }

    fn clear_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        if m.bitmap & bit(page) != 0 {
            m.bitmap &= !bit(page);
            clear_dirty(m, page, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::designs::scenarios::{cost_setup, stepped};

    #[test]
    fn four_neighbouring_pages_written_over_three_rounds_are_all_reported() {
        let w = stepped(&Pml::default(), &cost_setup(4, true)).expect("no loss");
        let r = w.ledger.report();
        assert!(r.lost.is_empty());
        assert_eq!((r.written, r.rounds), (12, 3), "{r:?}");
        let c = w.costs;
        // No write faults: the hardware logs every first write of a round (D cleared by CLEAR);
        // a PML buffer of 2 fills once per round of 4 writes.
        assert_eq!((c.faults, c.hw_logged, c.pml_full_exits), (0, 12, 3));
    }
}
