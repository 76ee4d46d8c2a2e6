//! The oracle: which writes the guest made, and whether every one was reported.
//!
//! Ground truth is the reference interpreter (`trackcheck_guests::sim`) advanced by each vCPU's
//! published progress: when the host reads progress `p` for vCPU `v` (acquire), every write of
//! `v` with seq <= p has reached memory. Two checks build on it:
//!
//! - [`Ledger`] (stepped runs: the host acts only while every vCPU is stopped): at each collect,
//!   every page written since its content was last copied must be reported (containment);
//!   reported pages with no such write are classified by the tracker's allowances, and what no
//!   allowance explains is counted.
//! - [`Shadow`] (every run): the host keeps a copy of guest memory, updated only with the pages
//!   the mechanism reported, at the copy step. After the vCPUs stop and a final harvest, the copy
//!   must equal guest memory; a difference is a lost write, named by the stamp in memory.
//!   Alone it cannot see a lost report of a page written and reported again later.
//! - [`RunningCheck`] (runs where the vCPUs keep writing while the host harvests): after every
//!   harvest's copy, every write published before that collect must be in the shadow —
//!   containment per harvest, which sees the losses the final comparison cannot.

mod ledger;
mod running;
mod shadow;

pub use ledger::{CollectContext, ExtraRecord, Ledger};
pub use running::RunningCheck;
pub use shadow::{Mismatch, Shadow, attribute_round};

use serde::{Deserialize, Serialize};
use trackcheck_guests::layout::{DATA_GPA, PAGE_SIZE};

/// Where the data region's pages live: data page index <-> (memslot, page in slot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataLayout {
    /// Slots in data-page order.
    pub extents: Vec<Extent>,
}

/// One memslot's share of the data region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Memslot id.
    pub slot: u32,
    /// Data page index of the slot's first page.
    pub first_page: u64,
    /// Pages in the slot.
    pub pages: u64,
    /// Guest-physical address of the slot's first page (it changes when the slot moves).
    pub gpa: u64,
}

impl DataLayout {
    /// One slot holding the whole data region.
    #[must_use]
    pub fn single(slot: u32, pages: u64) -> Self {
        Self {
            extents: vec![Extent {
                slot,
                first_page: 0,
                pages,
                gpa: DATA_GPA,
            }],
        }
    }

    /// Guest-physical address of data page `page` now.
    #[must_use]
    pub fn gpa(&self, page: u64) -> u64 {
        self.extents
            .iter()
            .find(|e| page >= e.first_page && page < e.first_page + e.pages)
            .map_or(DATA_GPA + page * PAGE_SIZE, |e| {
                e.gpa + (page - e.first_page) * PAGE_SIZE
            })
    }

    /// Total data pages.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| e.first_page + e.pages)
            .max()
            .unwrap_or(0)
    }

    /// (slot, page in slot) of data page `page`.
    #[must_use]
    pub fn locate(&self, page: u64) -> Option<(u32, u64)> {
        self.extents
            .iter()
            .find(|e| page >= e.first_page && page < e.first_page + e.pages)
            .map(|e| (e.slot, page - e.first_page))
    }

    /// Data page index of `(slot, page in slot)`.
    #[must_use]
    pub fn data_page(&self, slot: u32, page: u64) -> Option<u64> {
        self.extents
            .iter()
            .find(|e| e.slot == slot && page < e.pages)
            .map(|e| e.first_page + page)
    }
}

/// Pages of `gpa`'s 2 MiB-aligned guest-physical block that `reported` or `before` holds (see
/// [`LostPage::block_reported`]).
#[must_use]
pub fn block_reported(
    layout: &DataLayout,
    gpa: u64,
    reported: &crate::track::PageSet,
    before: &crate::track::PageSet,
) -> u32 {
    const BLOCK: u64 = 2 << 20;
    let n = reported
        .iter()
        .chain(before.iter().filter(|&(s, p)| !reported.contains(s, p)))
        .filter(|&(slot, page)| {
            layout
                .data_page(slot, page)
                .is_some_and(|dp| layout.gpa(dp) / BLOCK == gpa / BLOCK)
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A write that was never reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LostPage {
    /// Memslot.
    pub slot: u32,
    /// 4 KiB page index within the slot.
    pub page: u64,
    /// Guest-physical address of the page.
    pub gpa: u64,
    /// vCPU that made the lost write.
    pub vcpu: usize,
    /// Its sequence number (the stamp is `vcpu << 48 | seq`); [`LostPage::KVM_WRITE`] for a
    /// write KVM made itself on the vCPU's behalf (guest writes count from 1),
    /// [`LostPage::TABLE_CHANGE`] for a change to a guest page-table page.
    pub seq: u64,
    /// Harvest round (1-based) by which it should have been reported; rounds after the last
    /// one mean the final harvest.
    pub round: u32,
    /// Pages of the lost page's 2 MiB-aligned guest-physical block that the mechanism reported
    /// in the round the loss belongs to or the round before (a write landing between the
    /// previous collect and its rearm is required in this round, while the fault that made
    /// its block writable was reported in the previous one); `None` where the check did not see
    /// those reports. Lets a known-failure signature say "silent neighbours of a reported page".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_reported: Option<u32>,
    /// Whether the vCPU that made the lost write took a KVM_EXIT_DIRTY_RING_FULL exit in the
    /// round the loss belongs to (`None` where not known: no ring, or not recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_full: Option<bool>,
    /// The first later harvest that reported the page (`None`: none did, or not known — only
    /// the per-harvest check of concurrent runs, [`RunningCheck`], fills it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<u32>,
    /// With `reported_at`: a vCPU whose next write (after its progress at the collect that
    /// missed the page) went to this page, and whose progress stood still over every collect
    /// until the one that reported it — that vCPU was inside a write fault on the page all
    /// along. KVM makes a faulting page's mapping writable before it marks the page dirty (x86
    /// `fast_pf_fix_direct_spte`: the cmpxchg, then `mark_page_dirty_in_slot`; arm64
    /// `user_mem_abort`: after `kvm_fault_unlock`), so another vCPU can write through the new
    /// mapping and publish its write before the bit is set; a collect in between misses the
    /// page, and the next one after the fault completes reports it (a *late report*). A page
    /// missed with no such vCPU is an ordinary loss, however soon it was reported again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_writer: Option<usize>,
}

impl LostPage {
    /// `seq` of a write KVM made itself (kvmclock, steal time).
    pub const KVM_WRITE: u64 = 0;
    /// `seq` of a change to a guest page-table page (accessed/dirty bits KVM set, or the
    /// guest's own entry writes): no stamp names it.
    pub const TABLE_CHANGE: u64 = u64::MAX;

    /// Build for data page `data_page`.
    #[must_use]
    pub fn at(layout: &DataLayout, data_page: u64, vcpu: usize, seq: u64, round: u32) -> Self {
        let (slot, page) = layout.locate(data_page).unwrap_or((u32::MAX, data_page));
        Self {
            slot,
            page,
            gpa: layout.gpa(data_page),
            vcpu,
            seq,
            round,
            block_reported: None,
            ring_full: None,
            reported_at: None,
            stalled_writer: None,
        }
    }

    /// A late report behind a write fault in flight (see [`LostPage::stalled_writer`]).
    #[must_use]
    pub fn late(&self) -> bool {
        self.reported_at.is_some() && self.stalled_writer.is_some()
    }
}

impl std::fmt::Display for LostPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.seq {
            Self::KVM_WRITE => format!("a write KVM made for vCPU {}", self.vcpu),
            Self::TABLE_CHANGE => "a change to a guest page-table page".to_string(),
            seq => format!("write seq {seq} of vCPU {}", self.vcpu),
        };
        write!(
            f,
            "slot {} page {} (gpa {:#x}): {what} not reported by round {}",
            self.slot, self.page, self.gpa, self.round
        )?;
        match (self.reported_at, self.stalled_writer) {
            (Some(at), Some(v)) => write!(
                f,
                " (reported by round {at}; vCPU {v}, whose next write was to this page, made no progress meanwhile: a write fault in flight)"
            ),
            (Some(at), None) => write!(
                f,
                " (reported again by round {at}, no vCPU held in a fault on it)"
            ),
            _ => Ok(()),
        }
    }
}

/// What a run's oracle concluded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OracleReport {
    /// Lost writes (first lost write per page).
    pub lost: Vec<LostPage>,
    /// Pages that had to be reported, summed over rounds.
    pub written: u64,
    /// Pages reported, summed over rounds.
    pub reported: u64,
    /// Reported pages explained by an allowance, by allowance name.
    pub allowed: std::collections::BTreeMap<String, u64>,
    /// Reported pages no write and no allowance explains.
    pub unexplained: u64,
    /// Harvest rounds.
    pub rounds: u32,
}

impl OracleReport {
    /// Extra (not required) pages reported: allowed plus unexplained.
    #[must_use]
    pub fn extra(&self) -> u64 {
        self.allowed.values().sum::<u64>() + self.unexplained
    }

    /// Add `other`'s counts (not its lost pages) to these.
    pub fn add_counts(&mut self, other: &Self) {
        self.written += other.written;
        self.reported += other.reported;
        self.unexplained += other.unexplained;
        self.rounds += other.rounds;
        for (k, v) in &other.allowed {
            *self.allowed.entry(k.clone()).or_default() += v;
        }
    }

    /// Add `other`'s counts and lost pages to these (two runs of one trial).
    pub fn absorb(&mut self, other: &Self) {
        self.add_counts(other);
        for l in &other.lost {
            self.add_lost(l.clone());
        }
    }

    /// Merge a finding into the lost list, keeping one entry per page: the first found, except
    /// that a loss the next harvest did not make good replaces a late report of the same page
    /// (so a signature that accepts late reports never hides a lasting loss behind one).
    pub fn add_lost(&mut self, lost: LostPage) {
        match self
            .lost
            .iter_mut()
            .find(|l| l.slot == lost.slot && l.page == lost.page)
        {
            None => self.lost.push(lost),
            Some(l) if l.late() && !lost.late() => *l = lost,
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost(page: u64, round: u32, late: Option<bool>) -> LostPage {
        let mut l = LostPage::at(&DataLayout::single(2, 8), page, 0, 5, round);
        if let Some(late) = late {
            l.reported_at = Some(round + 1);
            l.stalled_writer = late.then_some(1);
        }
        l
    }

    /// One entry per page; a lasting loss replaces a late report of the same page, never the
    /// other way round.
    #[test]
    fn a_lasting_loss_is_never_hidden_behind_a_late_report() {
        let mut r = OracleReport::default();
        r.add_lost(lost(1, 2, Some(true)));
        r.add_lost(lost(1, 5, Some(false)));
        r.add_lost(lost(1, 6, Some(true)));
        r.add_lost(lost(3, 2, None));
        r.add_lost(lost(3, 4, Some(true)));
        let got: Vec<(u64, u32)> = r.lost.iter().map(|l| (l.page, l.round)).collect();
        assert_eq!(got, vec![(1, 5), (3, 2)]);
    }
}
