//! The content oracle, for stepped runs where writes come from more than the guest program
//! (KVM's own writes) or memslots change under the tracker (deleted and restored slots).
//!
//! At every collect the vCPUs are stopped, so nothing writes: each data page whose content
//! differs from the shadow copy must be in the collected set, or the write that changed it is
//! lost (named by the stamp in memory, or as a write KVM made). The copy step copies what was
//! reported. Pages of a deleted slot are not judged (to a VMM that memory is gone); a restored
//! slot is copied whole, as the VMM copies new memory, and judged again from then on. Where the
//! machine keeps the guest's page tables in the data region, those pages change when KVM sets
//! accessed/dirty bits or the guest rewrites an entry: they must be reported like any other,
//! and reported table pages are counted as the `guest-page-table` allowance class.

use std::collections::BTreeSet;
use std::ops::Range;

use trackcheck_harness::GuestMemory;
use trackcheck_harness::machine::Machine;
use trackcheck_harness::oracle::{DataLayout, LostPage, Shadow};
use trackcheck_harness::track::{PageSet, Tracker};

use super::driver::{HarvestOracle, harvest_plain};
use super::{Findings, TrialError};

/// A data page KVM writes itself, for naming a lost write there.
#[derive(Clone, Debug)]
pub(super) struct KvmPage {
    /// Data page.
    pub page: u64,
    /// What it holds ("kvmclock area of vCPU 0").
    pub name: String,
    /// The vCPU KVM writes it for.
    pub vcpu: usize,
}

/// See the module documentation.
pub(super) struct ContentOracle {
    shadow: Shadow,
    out: PageSet,
    /// Harvests so far (the baseline is round 1).
    pub round: u32,
    /// What was found.
    pub findings: Findings,
    /// Deleted slots: not judged.
    gone: BTreeSet<u32>,
    kvm_pages: Vec<KvmPage>,
    /// Data pages that hold the guest's page tables.
    tables: Range<u64>,
    /// Page-table pages found changed at a collect after the baseline (accessed/dirty bits set
    /// by KVM, or the guest's own entry writes), summed over collects.
    pub table_changes: u64,
    /// The data layout at the current harvest.
    layout: DataLayout,
    /// What the current harvest's collect found changed: data pages, and page-table pages.
    changed: Vec<u64>,
    changed_tables: u64,
}

impl ContentOracle {
    /// Start from the data region as it is now.
    pub fn new(m: &Machine, kvm_pages: Vec<KvmPage>) -> Self {
        Self {
            shadow: Shadow::new(m.data_layout(), m.data()),
            out: PageSet::new(),
            round: 0,
            findings: Findings::default(),
            gone: BTreeSet::new(),
            kvm_pages,
            tables: m.program_pages()..m.config().data_pages,
            table_changes: 0,
            layout: m.data_layout(),
            changed: Vec::new(),
            changed_tables: 0,
        }
    }

    /// Pages of `slot` that changed since their last copy.
    pub fn pending(&self, m: &Machine, slot: u32) -> usize {
        let layout = m.data_layout();
        self.shadow
            .compare(m.data())
            .iter()
            .filter(|mm| layout.locate(mm.data_page).is_some_and(|(s, _)| s == slot))
            .count()
    }

    /// Stop judging `slot` (deleted).
    pub fn forget_slot(&mut self, slot: u32) {
        self.gone.insert(slot);
    }

    /// `slot` is back: copy it whole and judge it again.
    pub fn restore_slot(&mut self, m: &Machine, slot: u32) {
        self.gone.remove(&slot);
        let layout = m.data_layout();
        let mut all = PageSet::new();
        for e in layout.extents.iter().filter(|e| e.slot == slot) {
            for page in 0..e.pages {
                all.insert(slot, page);
            }
        }
        self.shadow.copy(m.data(), &all);
    }

    /// One harvest in the tracker's order; returns the data pages that had changed since the
    /// last copy.
    pub fn harvest(
        &mut self,
        m: &mut Machine,
        tracker: &mut dyn Tracker,
    ) -> Result<Vec<u64>, TrialError> {
        self.round += 1;
        self.layout = m.data_layout();
        let mut out = std::mem::take(&mut self.out);
        let steps = harvest_plain(tracker, m, &mut out, self);
        self.out = out;
        steps?;
        self.findings.report.rounds = self.round;
        if self.round > 1 {
            self.table_changes += self.changed_tables;
        }
        Ok(std::mem::take(&mut self.changed))
    }
}

impl HarvestOracle for ContentOracle {
    fn collected(&mut self, data: &GuestMemory, set: &PageSet) {
        let known = Known {
            gone: &self.gone,
            kvm_pages: &self.kvm_pages,
            tables: self.tables.clone(),
        };
        (self.changed, self.changed_tables) = judge(
            &self.layout,
            &self.shadow,
            data,
            set,
            &known,
            self.round,
            &mut self.findings,
        );
    }

    fn copied(&mut self, data: &GuestMemory, set: &PageSet) {
        self.shadow.copy(data, set);
    }
}

/// What the oracle knows about particular pages.
struct Known<'a> {
    gone: &'a BTreeSet<u32>,
    kvm_pages: &'a [KvmPage],
    tables: Range<u64>,
}

/// Judge one collect: every changed page of a live slot must be in `out`. Returns the changed
/// data pages (page-table pages aside) and how many page-table pages changed.
fn judge(
    layout: &DataLayout,
    shadow: &Shadow,
    data: &GuestMemory,
    out: &PageSet,
    known: &Known<'_>,
    round: u32,
    findings: &mut Findings,
) -> (Vec<u64>, u64) {
    let mut changed = Vec::new();
    let mut tables_changed = 0;
    let mut changed_reported = 0u64;
    for mm in shadow.compare(data) {
        let Some((slot, page)) = layout.locate(mm.data_page) else {
            continue;
        };
        if known.gone.contains(&slot) {
            continue;
        }
        if known.tables.contains(&mm.data_page) {
            tables_changed += 1;
            if !out.contains(slot, page) {
                let per = known.tables.end - known.tables.start;
                findings.problems.push(format!(
                    "guest page-table page {} (data page {} of {per}) changed (accessed/dirty bits set by KVM, or the guest's own entry writes) but was not reported by round {round}",
                    mm.data_page - known.tables.start,
                    mm.data_page
                ));
                findings.report.add_lost(LostPage::at(
                    layout,
                    mm.data_page,
                    0,
                    LostPage::TABLE_CHANGE,
                    round,
                ));
            }
            continue;
        }
        changed.push(mm.data_page);
        if out.contains(slot, page) {
            changed_reported += 1;
            continue;
        }
        if let Some(k) = known.kvm_pages.iter().find(|k| k.page == mm.data_page) {
            findings.problems.push(format!(
                "{} (data page {}) changed by KVM but not reported by round {round}",
                k.name, mm.data_page
            ));
            findings.report.add_lost(LostPage::at(
                layout,
                mm.data_page,
                k.vcpu,
                LostPage::KVM_WRITE,
                round,
            ));
        } else {
            findings.report.add_lost(LostPage::at(
                layout,
                mm.data_page,
                mm.vcpu(),
                mm.seq(),
                round,
            ));
        }
    }
    let reported = out.len();
    let tables_reported = out
        .iter()
        .filter(|&(slot, page)| {
            layout
                .data_page(slot, page)
                .is_some_and(|p| known.tables.contains(&p))
        })
        .count() as u64;
    if tables_reported > 0 {
        *findings
            .report
            .allowed
            .entry("guest-page-table".into())
            .or_default() += tables_reported;
    }
    findings.report.reported += reported;
    findings.report.written += changed.len() as u64;
    let unchanged = reported.saturating_sub(changed_reported + tables_reported);
    if unchanged > 0 {
        *findings
            .report
            .allowed
            .entry("unchanged-content".into())
            .or_default() += unchanged;
    }
    (changed, tables_changed)
}
