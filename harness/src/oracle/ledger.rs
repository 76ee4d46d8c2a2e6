//! The stepped containment oracle.
//!
//! The host calls [`Ledger::observe`] every time all vCPUs are stopped (a "point"), then the
//! harvest steps: [`Ledger::collected`] at the collect, [`Ledger::copied`] at the copy. Writes
//! pulled at point `k` happened before anything the host does at point `k`.
//!
//! Per data page the ledger keeps the earliest write its content does not yet reflect
//! (`unsynced`: written after the page's last copy). The rule, checked at each collect:
//! **a page with an unsynced write made before this collect must be reported.** A copy after a
//! collect that reported the page makes it synced again. This is exactly what a live migration
//! needs — every write either reaches a copy or is reported again — and it holds for every
//! mechanism and for writes landing between the harvest steps: a write after the collect but
//! before the copy is in the copy; one after the copy must be reported next time.

use trackcheck_guests::Program;
use trackcheck_guests::sim::{ThreadEvents, landed_ahead, writes_through};

use super::{DataLayout, LostPage, OracleReport};
use crate::track::{Allowance, PageSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WriteAt {
    vcpu: usize,
    seq: u64,
    point: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct PageState {
    unsynced: Option<WriteAt>,
    /// Collected, its copy still to come: a later collect need not report it again.
    pending: bool,
    last: Option<WriteAt>,
    last_collect: Option<u32>,
    last_copy: Option<u32>,
}

/// How the next collect's extra pages may be explained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectContext {
    /// The mechanism may report every page this time (INITIALLY_SET, first collect).
    pub everything: bool,
    /// The mechanism reports huge pages as a unit of this many 4 KiB pages (1: no).
    pub huge_unit_pages: u64,
}

/// The stepped oracle's state for one run of one program.
#[derive(Clone, Debug)]
pub struct Ledger<'p> {
    layout: DataLayout,
    cursors: Vec<ThreadEvents<'p>>,
    accounted: Vec<u64>,
    point: u32,
    pages: Vec<PageState>,
    report: OracleReport,
    allowances: Vec<Allowance>,
    /// First few unexplained extras, for the report.
    pub unexplained_examples: Vec<(u32, u64)>,
    /// The previous collect's report (for `LostPage::block_reported`).
    previous: PageSet,
    /// Every extra page with its class, per round, when recording is on (cross-checks).
    pub extras_log: Option<Vec<ExtraRecord>>,
}

/// One reported page no write explained, and the allowance that did (if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtraRecord {
    /// Collect round (1-based).
    pub round: u32,
    /// Memslot.
    pub slot: u32,
    /// Page in the slot.
    pub page: u64,
    /// The allowance that explains it, or `None` (unexplained).
    pub allowance: Option<Allowance>,
}

impl<'p> Ledger<'p> {
    /// A ledger for `program` on a data region laid out as `layout`, for a tracker whose
    /// documented false positives are `allowances`. [`Ledger::observe`] pulls the program's
    /// writes from the reference interpreter as the vCPUs publish progress.
    #[must_use]
    pub fn new(program: &'p Program, layout: DataLayout, allowances: &[Allowance]) -> Self {
        let mut ledger = Self::without_program(layout, allowances);
        ledger.cursors = program
            .vcpus
            .iter()
            .map(|t| ThreadEvents::with_seq_base(t, program.seq_base))
            .collect();
        ledger.accounted = vec![program.seq_base; program.vcpus.len()];
        ledger
    }

    /// A ledger fed with writes by [`Ledger::record_write`] (several programs in turn).
    #[must_use]
    pub fn without_program(layout: DataLayout, allowances: &[Allowance]) -> Self {
        let pages = usize::try_from(layout.pages()).unwrap_or(0);
        Self {
            cursors: Vec::new(),
            accounted: Vec::new(),
            point: 0,
            pages: vec![PageState::default(); pages],
            report: OracleReport::default(),
            allowances: allowances.to_vec(),
            unexplained_examples: Vec::new(),
            previous: PageSet::new(),
            extras_log: None,
            layout,
        }
    }

    /// Start a new point: everything recorded from now on happened after what the host did so
    /// far. (`observe` does this itself.)
    pub fn advance(&mut self) {
        self.point += 1;
    }

    /// Record that `vcpu` wrote `data_page` with sequence number `seq`, before the current point.
    pub fn record_write(&mut self, data_page: u64, vcpu: usize, seq: u64) -> Result<(), String> {
        let at = WriteAt {
            vcpu,
            seq,
            point: self.point,
        };
        let state = self
            .pages
            .get_mut(usize::try_from(data_page).unwrap_or(usize::MAX))
            .ok_or_else(|| format!("vCPU {vcpu} wrote page {data_page} outside the data region"))?;
        state.unsynced.get_or_insert(at);
        state.last = Some(at);
        Ok(())
    }

    /// Every page's content is copied anew (a fresh migration round after logging was turned
    /// off and on): nothing is unsynced.
    pub fn rebaseline(&mut self) {
        let point = self.point;
        for state in &mut self.pages {
            state.unsynced = None;
            state.pending = false;
            state.last_copy = Some(point);
        }
    }

    /// The host stopped every vCPU; `progress[v]` is vCPU v's published progress. Pulls the
    /// writes made since the last point from the reference interpreter, plus, per vCPU, a write
    /// whose data store landed before its progress store (see `sim::landed_ahead`):
    /// `word(page, offset)` reads the data word of a data page. Without that, a write reported
    /// and copied at this point would be recorded later, after its copy, and required again.
    pub fn observe(
        &mut self,
        progress: &[u64],
        word: impl Fn(u64, u16) -> u64,
    ) -> Result<(), String> {
        self.advance();
        for (vcpu, &target) in progress.iter().enumerate().take(self.cursors.len()) {
            let writes = writes_through(&mut self.cursors[vcpu], target).map_err(|had| {
                format!(
                    "vCPU {vcpu} published progress {target}, but its program has only {had} writes"
                )
            })?;
            for (page, _, seq) in writes {
                self.accounted[vcpu] = seq;
                self.record_write(page, vcpu, seq)?;
            }
            if let Some((page, _, seq)) = landed_ahead(&self.cursors[vcpu], vcpu, &word) {
                // Consume it: the cursor stands right after it, as if progress named it.
                let _ = writes_through(&mut self.cursors[vcpu], seq);
                self.accounted[vcpu] = seq;
                self.record_write(page, vcpu, seq)?;
            }
        }
        Ok(())
    }

    /// Record every extra page with its class from now on (see `extras_log`).
    pub fn record_extras(&mut self) {
        self.extras_log.get_or_insert_with(Vec::new);
    }

    /// A collect reported `reported`. Checks containment and classifies extras.
    pub fn collected(&mut self, reported: &PageSet, ctx: CollectContext) {
        self.report.rounds += 1;
        let round = self.report.rounds;
        let point = self.point;
        // Containment: every page with an unsynced write must be in `reported`.
        let mut required = 0;
        for (data_page, state) in self.pages.iter().enumerate() {
            let Some(w) = state.unsynced.filter(|_| !state.pending) else {
                continue;
            };
            required += 1;
            let data_page = data_page as u64;
            let (slot, page) = self
                .layout
                .locate(data_page)
                .unwrap_or((u32::MAX, data_page));
            if !reported.contains(slot, page) {
                let mut lost = LostPage::at(&self.layout, data_page, w.vcpu, w.seq, round);
                lost.block_reported = Some(super::block_reported(
                    &self.layout,
                    lost.gpa,
                    reported,
                    &self.previous,
                ));
                self.report.add_lost(lost);
            }
        }
        self.report.written += required;
        // Extras, classified.
        for (slot, page) in reported.iter() {
            self.report.reported += 1;
            let Some(data_page) = self.layout.data_page(slot, page) else {
                self.count_unexplained(slot, page);
                continue;
            };
            let idx = usize::try_from(data_page).unwrap_or(usize::MAX);
            let Some(state) = self.pages.get(idx).copied() else {
                continue;
            };
            if state.unsynced.is_none() {
                let class = self.classify(idx, state, ctx, reported, slot, page);
                if let Some(log) = self.extras_log.as_mut() {
                    log.push(ExtraRecord {
                        round,
                        slot,
                        page,
                        allowance: class,
                    });
                }
                match class {
                    Some(a) => *self.report.allowed.entry(a.name().to_string()).or_default() += 1,
                    None => self.count_unexplained(slot, page),
                }
            }
        }
        for (slot, page) in reported.iter() {
            if let Some(state) = self.state_mut(slot, page) {
                state.last_collect = Some(point);
                state.pending = true;
            }
        }
        self.previous.clone_from(reported);
    }

    fn count_unexplained(&mut self, slot: u32, page: u64) {
        self.report.unexplained += 1;
        if self.unexplained_examples.len() < 8 {
            self.unexplained_examples.push((slot, page));
        }
    }

    fn classify(
        &self,
        idx: usize,
        state: PageState,
        ctx: CollectContext,
        reported: &PageSet,
        slot: u32,
        page: u64,
    ) -> Option<Allowance> {
        let allowed = |a: Allowance| self.allowances.contains(&a);
        if ctx.everything && allowed(Allowance::InitiallySet) {
            return Some(Allowance::InitiallySet);
        }
        if allowed(Allowance::WrittenBeforeCopy)
            && let (Some(w), Some(collect), Some(copy)) =
                (state.last, state.last_collect, state.last_copy)
            && w.point > collect
            && w.point <= copy
        {
            return Some(Allowance::WrittenBeforeCopy);
        }
        if ctx.huge_unit_pages > 1 && allowed(Allowance::HugeGranularity) {
            let unit = ctx.huge_unit_pages;
            let first = page - page % unit;
            let base = idx as u64 - page % unit;
            let mate_written = (0..unit).any(|i| {
                first + i != page
                    && reported.contains(slot, first + i)
                    && self
                        .pages
                        .get(usize::try_from(base + i).unwrap_or(usize::MAX))
                        .is_some_and(|s| {
                            s.unsynced.is_some()
                                || s.last.is_some_and(|w| Some(w.point) > s.last_collect)
                        })
            });
            if mate_written {
                return Some(Allowance::HugeGranularity);
            }
        }
        None
    }

    /// The copy step read `pages`: their content is synced as of this point.
    pub fn copied(&mut self, pages: &PageSet) {
        let point = self.point;
        for (slot, page) in pages.iter() {
            if let Some(state) = self.state_mut(slot, page) {
                state.unsynced = None;
                state.pending = false;
                state.last_copy = Some(point);
            }
        }
    }

    fn state_mut(&mut self, slot: u32, page: u64) -> Option<&mut PageState> {
        let idx = usize::try_from(self.layout.data_page(slot, page)?).ok()?;
        self.pages.get_mut(idx)
    }

    /// Writes accounted so far per vCPU.
    #[must_use]
    pub fn accounted(&self) -> &[u64] {
        &self.accounted
    }

    /// Pages the next collect must report: an unsynced write, no collect awaiting its copy
    /// (a fault injector drops one of these, so every injected drop loses a write).
    #[must_use]
    pub fn at_stake(&self) -> PageSet {
        let mut out = PageSet::new();
        for (data_page, state) in self.pages.iter().enumerate() {
            if state.unsynced.is_some()
                && !state.pending
                && let Some((slot, page)) = self.layout.locate(data_page as u64)
            {
                out.insert(slot, page);
            }
        }
        out
    }

    /// Data pages that were written at least once.
    #[must_use]
    pub fn pages_written(&self) -> u64 {
        self.pages.iter().filter(|s| s.last.is_some()).count() as u64
    }

    /// The report so far.
    #[must_use]
    pub fn report(&self) -> &OracleReport {
        &self.report
    }

    /// The report, mutably (to add shadow findings).
    pub fn report_mut(&mut self) -> &mut OracleReport {
        &mut self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trackcheck_guests::{Op, Thread};

    fn program() -> Program {
        Program::new(
            8,
            vec![Thread::new(vec![
                Op::Write { page: 1, offset: 0 },
                Op::Write { page: 2, offset: 0 },
                Op::Sync(1),
                Op::Write { page: 2, offset: 8 },
                Op::Write { page: 5, offset: 0 },
            ])],
        )
    }

    fn set(pages: &[u64]) -> PageSet {
        let mut s = PageSet::new();
        for p in pages {
            s.insert(7, *p);
        }
        s
    }

    #[test]
    fn a_complete_report_passes_and_a_missing_page_is_named() {
        let p = program();
        let mut ok = Ledger::new(&p, DataLayout::single(7, 8), &[]);
        ok.observe(&[2], |_, _| 0).expect("observe");
        ok.collected(&set(&[1, 2]), CollectContext::default());
        ok.copied(&set(&[1, 2]));
        ok.observe(&[4], |_, _| 0).expect("observe");
        ok.collected(&set(&[2, 5]), CollectContext::default());
        ok.copied(&set(&[2, 5]));
        assert!(ok.report().lost.is_empty());
        assert_eq!(
            (
                ok.report().written,
                ok.report().reported,
                ok.report().unexplained
            ),
            (4, 4, 0)
        );

        let mut bad = Ledger::new(&p, DataLayout::single(7, 8), &[]);
        bad.observe(&[2], |_, _| 0).expect("observe");
        bad.collected(&set(&[1]), CollectContext::default());
        bad.copied(&set(&[1]));
        let lost = &bad.report().lost;
        assert_eq!(lost.len(), 1);
        assert_eq!(
            (
                lost[0].slot,
                lost[0].page,
                lost[0].vcpu,
                lost[0].seq,
                lost[0].round
            ),
            (7, 2, 0, 2, 1)
        );
    }

    #[test]
    fn a_write_after_the_copy_must_be_reported_next_time() {
        let p = program();
        // collect at point 1, guest runs (writes 3, 4), copy at point 2 — writes before the copy
        // are in it, so page 2 is synced; page 5 was not collected: it must come next round.
        let mut l = Ledger::new(
            &p,
            DataLayout::single(7, 8),
            &[Allowance::WrittenBeforeCopy],
        );
        l.observe(&[2], |_, _| 0).expect("observe");
        l.collected(&set(&[1, 2]), CollectContext::default());
        l.observe(&[4], |_, _| 0).expect("observe");
        l.copied(&set(&[1, 2]));
        l.observe(&[4], |_, _| 0).expect("observe");
        l.collected(&set(&[2]), CollectContext::default());
        assert_eq!(l.report().lost.len(), 1, "{:?}", l.report());
        assert_eq!(l.report().lost[0].page, 5);
        assert_eq!(
            l.report().allowed.get("written-before-copy"),
            Some(&1),
            "page 2 was logged again"
        );
    }

    #[test]
    fn unexplained_extras_are_counted_and_initially_set_is_allowed() {
        let p = program();
        let mut l = Ledger::new(&p, DataLayout::single(7, 8), &[Allowance::InitiallySet]);
        l.observe(&[0], |_, _| 0).expect("observe");
        l.collected(
            &set(&[0, 1, 2, 3, 4, 5, 6, 7]),
            CollectContext {
                everything: true,
                huge_unit_pages: 1,
            },
        );
        l.copied(&set(&[0, 1, 2, 3, 4, 5, 6, 7]));
        assert_eq!(l.report().allowed.get("initially-set"), Some(&8));
        l.observe(&[2], |_, _| 0).expect("observe");
        l.collected(&set(&[1, 2, 6]), CollectContext::default());
        assert_eq!(l.report().unexplained, 1);
        assert_eq!(l.unexplained_examples, vec![(7, 6)]);
    }

    #[test]
    fn a_page_awaiting_its_copy_is_not_required_again() {
        let mut l = Ledger::without_program(DataLayout::single(7, 8), &[]);
        l.advance();
        l.record_write(3, 0, 1).expect("in range");
        l.collected(&set(&[3]), CollectContext::default());
        // A second collect before the first one's copy (a ring filled up): page 3 is pending.
        l.advance();
        l.record_write(4, 0, 2).expect("in range");
        l.collected(&set(&[4]), CollectContext::default());
        assert!(l.report().lost.is_empty(), "{:?}", l.report());
        l.copied(&set(&[3]));
        l.copied(&set(&[4]));
        // After its copy, a page written again must be reported again.
        l.advance();
        l.record_write(3, 0, 3).expect("in range");
        l.collected(&set(&[]), CollectContext::default());
        assert_eq!(l.report().lost.len(), 1);
        assert_eq!((l.report().lost[0].page, l.report().lost[0].seq), (3, 3));
        assert!(l.record_write(8, 0, 4).is_err(), "outside the data region");
    }

    #[test]
    fn rebaseline_syncs_everything() {
        let mut l = Ledger::without_program(DataLayout::single(7, 8), &[]);
        l.advance();
        l.record_write(1, 0, 1).expect("in range");
        l.rebaseline();
        l.collected(&set(&[]), CollectContext::default());
        assert!(l.report().lost.is_empty());
    }

    #[test]
    fn a_write_ahead_of_progress_is_not_required_again() {
        let p = program();
        let mut l = Ledger::new(&p, DataLayout::single(7, 8), &[]);
        // Stopped after write 2's data store, before its progress store: memory shows it.
        let memory = |page: u64, offset: u16| {
            if (page, offset) == (2, 0) {
                trackcheck_guests::stamp(0, 2)
            } else {
                0
            }
        };
        l.observe(&[1], memory).expect("observe");
        l.collected(&set(&[1, 2]), CollectContext::default());
        l.copied(&set(&[1, 2]));
        assert_eq!(l.report().unexplained, 0, "page 2 was written");
        // Progress catches up: write 2 is not new, nothing is required.
        l.observe(&[2], |_, _| 0).expect("observe");
        l.collected(&set(&[]), CollectContext::default());
        assert!(l.report().lost.is_empty(), "{:?}", l.report().lost);
    }

    #[test]
    fn progress_beyond_the_program_is_an_error() {
        let p = program();
        let mut l = Ledger::new(&p, DataLayout::single(7, 8), &[]);
        assert!(
            l.observe(&[5], |_, _| 0)
                .unwrap_err()
                .contains("only 4 writes")
        );
    }
}
