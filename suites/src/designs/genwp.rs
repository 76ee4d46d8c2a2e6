//! (e) "Fast write protect": a generation number makes write-protect-all O(1), and
//! GET_DIRTY_LOG runs without write protect (seed 004).
//!
//! The seed: "it just simply updates the generation number to ask all vCPUs to reload its root
//! page table ... During reloading its root page table, the vCPU checks root page table's
//! generation number with current global number, if it is not matched, it makes all the
//! entries in the shadow page readonly ... If the page fault is triggered by write operation,
//! KVM moves the write protection from the upper level to the lower level page - by making all
//! the entries in the lower page readonly first then make the upper level writable".
//! Paolo's protocol: "1) KVM_GET_DIRTY_LOG without write protect 2) KVM_WRITE_PROTECT_ALL_MEM
//! <only look now at the dirty log snapshot>. Writes may happen between 1 and 2; they are not
//! represented in the live dirty bitmap but it's okay because they are in the snapshot".
//!
//! Model: the root has one entry per block; write-protect-all bumps the generation, kicks every
//! vCPU (the request waits for each to leave the guest, which flushes its TLB) and asks for a
//! root reload; the first vCPU to reload (under `mmu_lock`) makes every root entry read-only;
//! a write fault under a read-only root entry makes the block's leaves read-only and the root
//! entry writable, then handles the fault as the baseline does (log, make writable). GET
//! exchanges the bitmap with zero. The round is GET, write-protect-all, copy; logging is
//! enabled by a write-protect-all.
//!
//! Mutants: steps 1 and 2 swapped (write-protect-all, then GET); write-protect-all without
//! the kick (no TLB flush, no wait).

use super::baseline::log_and_unprotect;
use super::mmu::{Mmu, WalkKind};
use super::world::{Costs, Design, HostOp};

/// Known-bad variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// Write-protect-all first, then GET (Paolo's steps 1 and 2 swapped).
    WpAllBeforeGet,
    /// Write-protect-all bumps the generation but does not kick the vCPUs.
    WpAllWithoutKick,
}

/// The generation-number design.
#[derive(Clone, Copy, Debug, Default)]
pub struct GenWp {
    /// A known-bad variant, or `None`.
    pub mutant: Option<Mutant>,
}

impl GenWp {
    /// Every mutant.
    pub const MUTANTS: [Mutant; 2] = [Mutant::WpAllBeforeGet, Mutant::WpAllWithoutKick];

    fn wp_all(&self) -> HostOp {
        if self.mutant == Some(Mutant::WpAllWithoutKick) {
            HostOp::WpAllNoKick
        } else {
            HostOp::WpAll
        }
    }
}

impl Design for GenWp {
    fn name(&self) -> String {
        match self.mutant {
            None => "gen-wp".into(),
            Some(m) => format!("gen-wp/{m:?}"),
        }
    }

    fn walk_kind(&self) -> WalkKind {
        WalkKind::X86 { pml: false }
    }

    fn enable(&self) -> Vec<HostOp> {
        vec![self.wp_all()]
    }

    fn round(&self) -> Vec<HostOp> {
        let get = [
            HostOp::GetBegin,
            HostOp::Get { clear: true },
            HostOp::GetEnd,
        ];
        let mut ops = Vec::new();
        if self.mutant == Some(Mutant::WpAllBeforeGet) {
            ops.push(self.wp_all());
            ops.extend(get);
        } else {
            ops.extend(get);
            ops.push(self.wp_all());
        }
        ops.push(HostOp::Copy);
        ops
    }

    fn enable_page(&self, _m: &mut Mmu, _page: usize, _c: &mut Costs) {}

    fn reload(&self, m: &mut Mmu, _vcpu: usize, c: &mut Costs) {
        if m.root_gen != m.generation {
            m.root_gen = m.generation;
            let blocks = m.geo.blocks();
            m.root_ro = if blocks == 64 {
                u64::MAX
            } else {
                (1u64 << blocks) - 1
            };
            c.root_entries += blocks as u64;
        }
    }

    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, c: &mut Costs) {
        let b = m.geo.block_of(page);
        if m.root_ro & (1u64 << b) != 0 {
            m.split(page);
            for p in m.geo.block_pages(b) {
                if m.leaf[p].w {
                    m.leaf[p].w = false;
                    c.pushed_down += 1;
                }
            }
            m.root_ro &= !(1u64 << b);
        }
        log_and_unprotect(m, page);
    }

    fn clear_page(&self, _m: &mut Mmu, _page: usize, _c: &mut Costs) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::designs::scenarios::{cost_setup, stepped};

    #[test]
    fn four_neighbouring_pages_written_over_three_rounds_are_all_reported() {
        let w = stepped(&GenWp::default(), &cost_setup(4, true)).expect("no loss");
        let r = w.ledger.report();
        assert!(r.lost.is_empty());
        assert_eq!((r.written, r.rounds), (12, 3), "{r:?}");
        let c = w.costs;
        // No entry is write-protected by the host; one write-protect-all per round (enable,
        // 2 rounds, final) and the protection pushed down on the faults.
        assert_eq!((c.protect_entries, c.protect_steps, c.faults), (0, 4, 12));
        assert!(c.pushed_down > 0 && c.root_entries > 0);
    }
}
