//! (c) The EPT A-bit idle walk (seed 001, "kvm-ept-idle: EPT page table walk for A bits").
//!
//! The seed: "read() also clears the accessed bit btw, in order to avoid one more page table
//! walk for write()", and "Dave Hansen raised the concern that hottest pages may be cached in
//! TLB and don't frequently set the accessed bits. The solution would be to invalidate TLB for
//! the mm being walked, when finished one round of scan."
//!
//! Model: no dirty logging; each round the host scans every stage-2 entry, reporting a page
//! accessed if A is set and clearing A as it reads (a huge entry is reported for every page
//! of its block and cleared at the block's last page), then flushes the TLBs ("when finished
//! one round of scan") and ends the scan. Judged by the access lower bound
//! ([`super::access`]): every page accessed after the previous scan ended must be reported
//! accessed.
//!
//! Mutant: the scan as first posted, without the TLB flush (Dave Hansen's objection: a hot
//! page whose translation stays cached never sets A again and reads as idle).

use super::mmu::{Mmu, WalkKind};
use super::world::{Costs, Design, HostOp};

/// Known-bad variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// No TLB flush after a scan.
    NoTlbFlush,
}

/// The idle-walk design.
#[derive(Clone, Copy, Debug, Default)]
pub struct Idle {
    /// A known-bad variant, or `None` (the scan with the flush Dave Hansen asked for).
    pub mutant: Option<Mutant>,
}

impl Idle {
    /// Every mutant.
    pub const MUTANTS: [Mutant; 1] = [Mutant::NoTlbFlush];
}

impl Design for Idle {
    fn name(&self) -> String {
        match self.mutant {
            None => "idle-walk".into(),
            Some(m) => format!("idle-walk/{m:?}"),
        }
    }

    fn walk_kind(&self) -> WalkKind {
        WalkKind::X86 { pml: false }
    }

    fn enable(&self) -> Vec<HostOp> {
        Vec::new()
    }

    fn round(&self) -> Vec<HostOp> {
        let mut ops = vec![HostOp::ScanBegin, HostOp::ScanNext];
        if self.mutant != Some(Mutant::NoTlbFlush) {
            ops.push(HostOp::FlushTlbs);
        }
        ops.push(HostOp::ScanEnd);
        ops
    }

    fn enable_page(&self, _m: &mut Mmu, _page: usize, _c: &mut Costs) {}

    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, _c: &mut Costs) {
        // Nothing is write-protected here; a fault can only be spurious.
        m.entry_mut(page).w = true;
    }

    fn clear_page(&self, _m: &mut Mmu, _page: usize, _c: &mut Costs) {}

    fn scan_page(&self, m: &mut Mmu, page: usize) -> bool {
        let last_of_block = m.geo.block_pages(m.geo.block_of(page)).end == page + 1;
        let accessed = m.entry(page).a;
        if last_of_block || !m.is_huge(page) {
            m.entry_mut(page).a = false;
        }
        accessed
    }
}
