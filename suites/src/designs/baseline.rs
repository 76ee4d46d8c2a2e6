//! (a) Upstream write-protect dirty logging with manual protect: the baseline.
//!
//! What it follows (KERNEL-FACTS, and kvm_main.c's `kvm_clear_dirty_log_protect`):
//! enabling logging write-protects every entry (huge ones too) and flushes the TLBs; a write
//! fault under `mmu_lock` splits a huge mapping, marks the page in the memslot bitmap and
//! makes the entry writable (and dirty). With KVM_DIRTY_LOG_MANUAL_PROTECT, GET_DIRTY_LOG
//! only copies the bitmap; CLEAR_DIRTY_LOG, under `mmu_lock`, clears each given bit with an
//! atomic fetch-and-not and write-protects exactly the pages whose bits it cleared, drops the
//! lock and then flushes the TLBs; userspace copies the pages after CLEAR returns.
//!
//! Mutants (each must be caught): the copy made before CLEAR; CLEAR without the TLB flush;
//! enabling logging without the TLB flush (hot pages stay writable in the TLB).

use super::mmu::{Mmu, WalkKind, bit};
use super::world::{Costs, Design, HostOp};

/// Known-bad variants of the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// Userspace copies the reported pages before CLEAR_DIRTY_LOG.
    CopyBeforeClear,
    /// CLEAR_DIRTY_LOG write-protects but never flushes the TLBs.
    ClearWithoutFlush,
    /// Enabling logging write-protects but never flushes the TLBs.
    EnableWithoutFlush,
}

/// The baseline design.
#[derive(Clone, Copy, Debug, Default)]
pub struct Baseline {
    /// A known-bad variant, or `None` for the design as upstream has it.
    pub mutant: Option<Mutant>,
}

impl Baseline {
    /// Every mutant.
    pub const MUTANTS: [Mutant; 3] = [
        Mutant::CopyBeforeClear,
        Mutant::ClearWithoutFlush,
        Mutant::EnableWithoutFlush,
    ];
}

/// Handle a write fault as upstream does while logging: split, log, make writable.
pub fn log_and_unprotect(m: &mut Mmu, page: usize) {
    m.split(page);
    let e = &mut m.leaf[page];
    if !e.w {
        e.w = true;
        e.d = true;
        m.bitmap |= bit(page);
    }
}

/// Write-protect the entry mapping `page` (a huge one stays huge until a write splits it).
pub fn write_protect(m: &mut Mmu, page: usize, c: &mut Costs) {
    let e = m.entry_mut(page);
    if e.w {
        e.w = false;
        c.protect_entries += 1;
    }
}

/// CLEAR_DIRTY_LOG for one page: clear the bit; write-protect only if it was set.
pub fn clear_and_protect(m: &mut Mmu, page: usize, c: &mut Costs) {
    if m.bitmap & bit(page) != 0 {
        m.bitmap &= !bit(page);
        write_protect(m, page, c);
    }
}

impl Design for Baseline {
    fn name(&self) -> String {
        match self.mutant {
            None => "wp-manual".into(),
            Some(m) => format!("wp-manual/{m:?}"),
        }
    }

    fn walk_kind(&self) -> WalkKind {
        WalkKind::X86 { pml: false }
    }

    fn enable(&self) -> Vec<HostOp> {
        let mut ops = vec![HostOp::Lock, HostOp::EnableNext, HostOp::Unlock];
        if self.mutant != Some(Mutant::EnableWithoutFlush) {
            ops.push(HostOp::FlushTlbs);
        }
        ops
    }

    fn round(&self) -> Vec<HostOp> {
        let get = [
            HostOp::GetBegin,
            HostOp::Get { clear: false },
            HostOp::GetEnd,
        ];
        let mut clear = vec![HostOp::Lock, HostOp::ClearNext, HostOp::Unlock];
        if self.mutant != Some(Mutant::ClearWithoutFlush) {
            clear.push(HostOp::FlushTlbs);
        }
        let mut ops = get.to_vec();
        if self.mutant == Some(Mutant::CopyBeforeClear) {
            ops.push(HostOp::Copy);
            ops.extend(clear);
        } else {
            ops.extend(clear);
            ops.push(HostOp::Copy);
        }
        ops
    }

    fn enable_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        write_protect(m, page, c);
    }

    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, _c: &mut Costs) {
        log_and_unprotect(m, page);
    }

    fn clear_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        clear_and_protect(m, page, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::designs::scenarios::{cost_setup, stepped};

    #[test]
    fn four_neighbouring_pages_written_over_three_rounds_are_all_reported() {
        let w = stepped(&Baseline::default(), &cost_setup(4, true)).expect("no loss");
        let r = w.ledger.report();
        assert!(r.lost.is_empty());
        assert_eq!((r.written, r.rounds), (12, 3), "{r:?}");
        let c = w.costs;
        // Every write of a round faults once (write-protected at enable, then by CLEAR), and
        // every fault's page is reported: 4 pages x 3 rounds.
        assert_eq!((c.faults, c.hw_logged), (12, 0));
    }
}
