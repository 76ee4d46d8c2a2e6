//! (d) arm64 SW/HW combined dirty log (seed 002).
//!
//! The seed: "we do not enable hardware dirty at start (do not add DBM bit). When a arbitrary
//! PT occurs fault, we execute soft tracking for this PT and enable hardware tracking for its
//! *nearby* PTs (e.g. Add DBM bit for nearby 16PTs). Then when sync dirty log, we have known
//! all PTs with hardware dirty enabled, so we do not need to scan all PTs."
//!
//! Model: enabling logging write-protects every entry, without DBM, and flushes the TLBs. A
//! write fault (under `mmu_lock`) splits a huge mapping, logs the page in the bitmap, makes it
//! writable, sets DBM on the other entries of its section (`Geometry::section` pages) and
//! records the section. A write to a read-only entry with DBM makes it writable in hardware
//! (no exit). GET first syncs, under `mmu_lock`, every entry of the recorded sections: an
//! entry writable with DBM set is hardware-dirty, so the page is logged and the entry made
//! read-only again (DBM stays); then it reads the bitmap. CLEAR (manual protect) write-protects
//! the reported pages; the TLBs are flushed after it, before the copy. Sections stay recorded
//! as long as any of their entries may carry DBM.
//!
//! Cost claim: entries scanned at sync (recorded sections only) against a full scan.
//!
//! Mutants: a section forgotten after its first sync (its DBM entries are never scanned
//! again); the flush after CLEAR left out.

use super::baseline::{clear_and_protect, write_protect};
use super::mmu::{Mmu, WalkKind, bit};
use super::world::{Costs, Design, HostOp};

/// Known-bad variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutant {
    /// The sync drops a section from the recorded set once scanned (not rescanned later).
    SectionNotRescanned,
    /// No TLB flush after CLEAR and the sync's write-protects.
    NoFlush,
}

/// The SW/HW combined design.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dbm {
    /// A known-bad variant, or `None`.
    pub mutant: Option<Mutant>,
}

impl Dbm {
    /// Every mutant.
    pub const MUTANTS: [Mutant; 2] = [Mutant::SectionNotRescanned, Mutant::NoFlush];
}

impl Design for Dbm {
    fn name(&self) -> String {
        match self.mutant {
            None => "dbm".into(),
            Some(m) => format!("dbm/{m:?}"),
        }
    }

    fn walk_kind(&self) -> WalkKind {
        WalkKind::ArmDbm
    }

    fn round(&self) -> Vec<HostOp> {
        let mut ops = vec![
            HostOp::GetBegin,
            HostOp::Lock,
            HostOp::SyncNext,
            HostOp::Unlock,
            HostOp::Get { clear: false },
            HostOp::GetEnd,
            HostOp::Lock,
            HostOp::ClearNext,
            HostOp::Unlock,
        ];
        if self.mutant != Some(Mutant::NoFlush) {
            ops.push(HostOp::FlushTlbs);
        }
        ops.push(HostOp::Copy);
        ops
    }

    fn enable_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        write_protect(m, page, c);
    }

    fn fault(&self, m: &mut Mmu, _vcpu: usize, page: usize, _c: &mut Costs) {
        m.split(page);
        if !m.leaf[page].w {
            m.leaf[page].w = true;
            m.bitmap |= bit(page);
        }
        for p in m.geo.section_pages(page) {
            if p != page {
                m.split(p);
                m.leaf[p].dbm = true;
            }
        }
        m.dbm_sections |= bit(page / m.geo.section);
    }

    fn sync_set(&self, m: &Mmu) -> u64 {
        let mut mask = 0;
        for p in 0..m.geo.pages {
            if m.dbm_sections & bit(p / m.geo.section) != 0 {
                mask |= bit(p);
            }
        }
        mask
    }

    fn sync_page(&self, m: &mut Mmu, page: usize, c: &mut Costs) {
        let e = m.entry_mut(page);
        if e.w && e.dbm {
            e.w = false;
            m.bitmap |= bit(page);
            c.protect_entries += 1;
        }
        let section = m.geo.section_pages(page);
        if self.mutant == Some(Mutant::SectionNotRescanned) && page + 1 == section.end {
            m.dbm_sections &= !bit(page / m.geo.section);
        }
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
        let w = stepped(&Dbm::default(), &cost_setup(4, true)).expect("no loss");
        let r = w.ledger.report();
        assert!(r.lost.is_empty());
        assert_eq!((r.written, r.rounds), (12, 3), "{r:?}");
        let c = w.costs;
        // The first fault of a section turns on DBM for its neighbours: later writes to them
        // are logged by hardware and found by the sync, which scans only the known section.
        assert!(c.faults < 12 && c.hw_logged > 0, "{c:?}");
        assert_eq!(c.sync_scanned, 12, "one section of 4 pages, 3 syncs");
    }
}
