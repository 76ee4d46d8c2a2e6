//! Containment at every harvest for runs where the vCPUs keep writing while the host harvests
//! (the concurrent families).
//!
//! The host cannot stop the guest at a harvest, so it learns what was written from the vCPUs'
//! published progress: a snapshot taken **before** a collect names writes that certainly
//! happened before it (a write publishes its seq after its data store). Every such write must
//! have reached the shadow by the end of that harvest's copy: either this collect reported its
//! page (the copy comes after the collect and the rearm, so it reads the write or a later one),
//! or an earlier collect after the write did. So after each copy, for every word the guest
//! wrote up to the snapshot, the shadow must hold that write's stamp or a later one.
//!
//! What this sees that the final comparison alone cannot: a lost report of a page written
//! again (and reported) later — the final shadow equals memory, but at the harvest after the
//! lost write the shadow still held older content. What it cannot see: a page whose only
//! writes before a collect came after that collect's progress snapshot (microseconds) and which
//! was then written and reported again — no oracle can tell such a write from one made just
//! after the rearm, and the migrated content is right.
//!
//! Words: stamps name their writer, so a word only one vCPU writes is checked exactly (the
//! shadow must hold that vCPU's stamp with a seq at least the required one). A word several
//! vCPUs write is checked as far as stamps allow: the shadow must hold a stamp of one of its
//! writers, and never an older stamp of a writer than that writer's required write.

use std::collections::{BTreeMap, BTreeSet};

use trackcheck_guests::sim::{ThreadEvents, stamp_seq, stamp_vcpu, writes_through};
use trackcheck_guests::{Access, Op, Program, Repeat, Thread};

use super::{DataLayout, LostPage, Shadow};
use crate::track::PageSet;

/// One word's requirement: per writing vCPU, the seq of its latest write the shadow must hold.
#[derive(Clone, Debug, Default)]
struct Word {
    writers: Vec<(usize, u64)>,
}

impl Word {
    fn require(&mut self, vcpu: usize, seq: u64) {
        match self.writers.iter_mut().find(|(v, _)| *v == vcpu) {
            Some(w) => w.1 = w.1.max(seq),
            None => self.writers.push((vcpu, seq)),
        }
    }

    /// The write the shadow word `held` misses, if any.
    fn missing(&self, held: u64) -> Option<(usize, u64)> {
        let (vcpu, seq) = (stamp_vcpu(held), stamp_seq(held));
        if let Some(&(v, need)) = self.writers.iter().find(|(v, _)| *v == vcpu) {
            return (seq < need).then_some((v, need));
        }
        // The shadow holds nothing any writer of this word wrote: content from before them.
        self.writers.first().copied()
    }
}

/// A thread that is one endless write loop: write `j` (1-based after the seq base) goes to
/// `table[(j - 1) % len]` at `offset`, so the latest write of every word up to any progress has
/// a closed form — a fast vCPU makes millions of writes between two harvests, too many to
/// replay one by one.
#[derive(Clone, Debug)]
struct EndlessLoop {
    table: Vec<u64>,
    offset: u16,
    /// Writes accounted so far (after the seq base).
    done: u64,
}

impl EndlessLoop {
    fn of(thread: &Thread) -> Option<Self> {
        match thread.ops.as_slice() {
            [
                Op::Loop {
                    pages,
                    access: Access::Write,
                    offset,
                    repeat: Repeat::UntilStopped,
                },
            ] => {
                let table = pages.pages();
                (!table.is_empty()).then_some(Self {
                    table,
                    offset: *offset,
                    done: 0,
                })
            }
            _ => None,
        }
    }

    /// The latest write of each word among writes `done + 1 ..= now`, as (page, offset, j).
    fn latest(&mut self, now: u64) -> Vec<(u64, u16, u64)> {
        let len = self.table.len() as u64;
        let from = self.done;
        self.done = self.done.max(now);
        if now <= from {
            return Vec::new();
        }
        let first = if now - from >= len {
            now - len + 1
        } else {
            from + 1
        };
        (first..=now)
            .map(|j| {
                let idx = usize::try_from((j - 1) % len).unwrap_or(0);
                (self.table[idx], self.offset, j)
            })
            .collect()
    }
}

/// How the check learns a vCPU's writes.
#[derive(Debug)]
enum Writes<'p> {
    /// Replay through the reference interpreter.
    Replay(ThreadEvents<'p>),
    /// The closed form of an endless write loop.
    Endless(EndlessLoop, u64),
}

impl Writes<'_> {
    /// The data page of the next write after the ones accounted so far.
    fn next_page(&self) -> Option<u64> {
        match self {
            Writes::Replay(events) => {
                let mut look = events.clone();
                loop {
                    match look.next()? {
                        trackcheck_guests::sim::Event::Write { page, .. } => return Some(page),
                        trackcheck_guests::sim::Event::Read { .. } => {}
                        _ => return None,
                    }
                }
            }
            Writes::Endless(l, _) => {
                let len = l.table.len() as u64;
                usize::try_from(l.done % len)
                    .ok()
                    .and_then(|i| l.table.get(i).copied())
            }
        }
    }
}

/// The per-harvest containment check of one run (see the module doc).
#[derive(Debug)]
pub struct RunningCheck<'p> {
    layout: DataLayout,
    cursors: Vec<Writes<'p>>,
    words: BTreeMap<(u64, u16), Word>,
    /// Words whose requirement grew since the last check.
    fresh: BTreeSet<(u64, u16)>,
    /// Words checked, summed over harvests.
    checked: u64,
    /// The previous harvest's report (for [`LostPage::block_reported`]).
    previous: PageSet,
    /// Progress at the last [`RunningCheck::advance`].
    progress: Vec<u64>,
    /// Per checked round: each vCPU's progress at its snapshot, and the data page of its next
    /// write (`None`: none before a sync point or the end).
    rounds: BTreeMap<u32, (Vec<u64>, Vec<Option<u64>>)>,
    /// Pages named and not reported since: (round, slot, page) -> data page.
    pending: BTreeMap<(u32, u32, u64), u64>,
    /// Pages named and reported since: (round, slot, page) -> (reporting round, stalled vCPU).
    resolved: BTreeMap<(u32, u32, u64), (u32, Option<usize>)>,
}

impl<'p> RunningCheck<'p> {
    /// A check for `program` on a data region laid out as `layout`.
    #[must_use]
    pub fn new(program: &'p Program, layout: DataLayout) -> Self {
        Self {
            layout,
            cursors: program
                .vcpus
                .iter()
                .map(|t| match EndlessLoop::of(t) {
                    Some(l) => Writes::Endless(l, program.seq_base),
                    None => Writes::Replay(ThreadEvents::with_seq_base(t, program.seq_base)),
                })
                .collect(),
            words: BTreeMap::new(),
            fresh: BTreeSet::new(),
            checked: 0,
            previous: PageSet::new(),
            progress: Vec::new(),
            rounds: BTreeMap::new(),
            pending: BTreeMap::new(),
            resolved: BTreeMap::new(),
        }
    }

    /// The host read `progress` (one entry per vCPU, acquire) before a collect: every write up
    /// to it happened before that collect.
    pub fn advance(&mut self, progress: &[u64]) -> Result<(), String> {
        self.progress = progress.to_vec();
        for (vcpu, &target) in progress.iter().enumerate().take(self.cursors.len()) {
            let writes = match &mut self.cursors[vcpu] {
                Writes::Replay(events) => writes_through(events, target).map_err(|had| {
                    format!(
                        "vCPU {vcpu} published progress {target}, but its program has only {had} writes"
                    )
                })?,
                Writes::Endless(l, base) => {
                    let base = *base;
                    l.latest(target.saturating_sub(base))
                        .into_iter()
                        .map(|(page, offset, j)| (page, offset, base + j))
                        .collect()
                }
            };
            for (page, offset, seq) in writes {
                if page >= self.layout.pages() {
                    return Err(format!(
                        "vCPU {vcpu} wrote page {page} outside the data region"
                    ));
                }
                self.words
                    .entry((page, offset))
                    .or_default()
                    .require(vcpu, seq);
                self.fresh.insert((page, offset));
            }
        }
        Ok(())
    }

    /// Pages with a write the shadow does not hold yet: the next collect must report them
    /// (a fault injector drops one of these, so every injected drop loses a write).
    #[must_use]
    pub fn at_stake(&self, shadow: &Shadow) -> PageSet {
        let mut out = PageSet::new();
        for &(page, offset) in &self.fresh {
            if self.words[&(page, offset)]
                .missing(shadow.word(page, offset))
                .is_some()
                && let Some((slot, p)) = self.layout.locate(page)
            {
                out.insert(slot, p);
            }
        }
        out
    }

    /// After the copy of harvest `round`, whose collect reported `reported`: every write up to
    /// the last [`RunningCheck::advance`] must be in `shadow`. Returns the first missing write
    /// of each page that lacks one. `ring_full[v]` says whether vCPU v took a ring-full exit in
    /// this round, where known.
    pub fn check(
        &mut self,
        shadow: &Shadow,
        round: u32,
        reported: &PageSet,
        ring_full: Option<&[bool]>,
    ) -> Vec<LostPage> {
        let mut lost: Vec<LostPage> = Vec::new();
        let fresh = std::mem::take(&mut self.fresh);
        self.checked += fresh.len() as u64;
        for (page, offset) in fresh {
            let Some((vcpu, seq)) = self.words[&(page, offset)].missing(shadow.word(page, offset))
            else {
                continue;
            };
            if lost
                .last()
                .is_some_and(|l| self.layout.data_page(l.slot, l.page) == Some(page))
            {
                continue;
            }
            let mut l = LostPage::at(&self.layout, page, vcpu, seq, round);
            l.block_reported = Some(super::block_reported(
                &self.layout,
                l.gpa,
                reported,
                &self.previous,
            ));
            l.ring_full = ring_full.and_then(|r| r.get(vcpu).copied());
            lost.push(l);
        }
        self.previous.clone_from(reported);
        self.note_round(round, reported);
        for l in &lost {
            if let Some(page) = self.layout.data_page(l.slot, l.page) {
                self.pending.insert((l.round, l.slot, l.page), page);
            }
        }
        lost
    }

    /// Record round `round`'s snapshot and settle the pages named earlier that its collect
    /// (`reported`) reported: a late report behind a write fault in flight when some vCPU's
    /// next write at the losing round went to the page and its progress stood still at every
    /// snapshot from then until this one (exclusive: by this snapshot the fault may have
    /// completed and the vCPU published that write).
    fn note_round(&mut self, round: u32, reported: &PageSet) {
        let next: Vec<Option<u64>> = self.cursors.iter().map(Writes::next_page).collect();
        self.rounds.insert(round, (self.progress.clone(), next));
        let settled: Vec<((u32, u32, u64), u64)> = self
            .pending
            .iter()
            .filter(|((named, slot, page), _)| *named < round && reported.contains(*slot, *page))
            .map(|(k, v)| (*k, *v))
            .collect();
        for ((named, slot, page), data_page) in settled {
            self.pending.remove(&(named, slot, page));
            let stalled = self.rounds.get(&named).and_then(|(at, next)| {
                (0..at.len()).find(|&v| {
                    next.get(v).copied().flatten() == Some(data_page)
                        && self
                            .rounds
                            .range(named..round)
                            .all(|(_, (p, _))| p.get(v) == at.get(v))
                })
            });
            self.resolved.insert((named, slot, page), (round, stalled));
        }
    }

    /// Fill [`LostPage::reported_at`] and [`LostPage::stalled_writer`] for the pages this check
    /// named and a later harvest reported. Call after the last harvest's check; pages other
    /// checks found are left alone.
    pub fn annotate(&self, lost: &mut [LostPage]) {
        for l in lost {
            if let Some(&(at, stalled)) = self.resolved.get(&(l.round, l.slot, l.page)) {
                l.reported_at = Some(at);
                l.stalled_writer = stalled;
            }
        }
    }

    /// Words checked so far, summed over harvests.
    #[must_use]
    pub fn words_checked(&self) -> u64 {
        self.checked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{Backing, GuestMemory};
    use trackcheck_guests::layout::PAGE_SIZE;
    use trackcheck_guests::{Access, Op, PageSeq, Repeat, Thread, stamp};

    /// Two vCPUs writing pages 0..4 (vCPU 0 at offset 0, vCPU 1 at offset 8) in an endless loop.
    fn program() -> Program {
        let writer = |offset| {
            Thread::new(vec![Op::Loop {
                pages: PageSeq::Range { start: 0, count: 4 },
                access: Access::Write,
                offset,
                repeat: Repeat::UntilStopped,
            }])
        };
        Program::new(4, vec![writer(0), writer(8)])
    }

    fn set(pages: &[u64]) -> PageSet {
        let mut s = PageSet::new();
        for &p in pages {
            s.insert(2, p);
        }
        s
    }

    /// Play the guest: vCPU `v`'s writes `from..=to` (write n goes to page (n-1) % 4).
    fn guest(mem: &GuestMemory, v: usize, from: u64, to: u64) {
        for seq in from..=to {
            mem.write_u64(((seq - 1) % 4) * PAGE_SIZE + v as u64 * 8, stamp(v, seq));
        }
    }

    #[test]
    fn a_lost_report_hidden_by_a_later_write_is_named_at_its_harvest() {
        let p = program();
        let mem = GuestMemory::new(Backing::Anon, 4 * PAGE_SIZE).expect("maps");
        let layout = DataLayout::single(2, 4);
        let mut shadow = Shadow::new(layout.clone(), &mem);
        let mut check = RunningCheck::new(&p, layout);
        // Round 2: vCPU 0 wrote 1..=2 (pages 0, 1), vCPU 1 wrote 1 (page 0).
        guest(&mem, 0, 1, 2);
        guest(&mem, 1, 1, 1);
        check.advance(&[2, 1]).expect("advance");
        assert_eq!(check.at_stake(&shadow), set(&[0, 1]));
        // The mechanism "loses" page 1.
        shadow.copy(&mem, &set(&[0]));
        let lost = check.check(&shadow, 2, &set(&[0]), Some(&[false, true]));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(
            (lost[0].page, lost[0].vcpu, lost[0].seq, lost[0].round),
            (1, 0, 2, 2)
        );
        assert_eq!(
            lost[0].block_reported,
            Some(1),
            "page 0 of its block was reported"
        );
        assert_eq!(lost[0].ring_full, Some(false));
        // Round 3: page 1 written again and reported: the final shadow equals memory, and
        // nothing new is missing — the loss was only visible at its own harvest.
        guest(&mem, 0, 3, 6);
        check.advance(&[6, 1]).expect("advance");
        shadow.copy(&mem, &set(&[0, 1, 2, 3]));
        assert!(
            check
                .check(&shadow, 3, &set(&[0, 1, 2, 3]), None)
                .is_empty()
        );
        assert!(
            shadow.compare(&mem).is_empty(),
            "the final comparison sees nothing"
        );
        // Round 3 reported page 1, and vCPU 1, whose next write (2) goes to page 1, stood still
        // from round 2 on: what a write fault in flight on page 1 looks like.
        let mut lost = lost;
        check.annotate(&mut lost);
        assert_eq!(
            (lost[0].reported_at, lost[0].stalled_writer),
            (Some(3), Some(1))
        );
        assert!(lost[0].late());
        assert!(
            lost[0].to_string().contains("reported by round 3; vCPU 1"),
            "{}",
            lost[0]
        );
    }

    /// A page reported again later with no vCPU held in a fault on it is an ordinary loss; a
    /// page never reported again is one too; pages other checks found are left alone.
    #[test]
    fn a_loss_without_a_stalled_writer_is_no_late_report() {
        let p = program();
        let mem = GuestMemory::new(Backing::Anon, 4 * PAGE_SIZE).expect("maps");
        let layout = DataLayout::single(2, 4);
        let mut shadow = Shadow::new(layout.clone(), &mem);
        let mut check = RunningCheck::new(&p, layout.clone());
        // Round 2: both vCPUs wrote pages 0 and 1; both write page 2 next.
        guest(&mem, 0, 1, 2);
        guest(&mem, 1, 1, 2);
        check.advance(&[2, 2]).expect("advance");
        shadow.copy(&mem, &set(&[0]));
        let mut lost = check.check(&shadow, 2, &set(&[0]), None);
        assert_eq!(lost.len(), 1, "page 1 lost: {lost:?}");
        // Round 3: nothing new; page 1 not reported.
        check.advance(&[2, 2]).expect("advance");
        assert!(check.check(&shadow, 3, &set(&[]), None).is_empty());
        // Round 4: page 1 written again and reported.
        guest(&mem, 0, 3, 6);
        check.advance(&[6, 2]).expect("advance");
        shadow.copy(&mem, &set(&[0, 1, 2, 3]));
        assert!(
            check
                .check(&shadow, 4, &set(&[0, 1, 2, 3]), None)
                .is_empty()
        );
        lost.push(LostPage::at(&layout, 3, 1, 9, 2));
        check.annotate(&mut lost);
        assert_eq!(
            (lost[0].reported_at, lost[0].stalled_writer),
            (Some(4), None)
        );
        assert!(!lost[0].late());
        assert!(
            lost[0]
                .to_string()
                .ends_with("(reported again by round 4, no vCPU held in a fault on it)"),
            "{}",
            lost[0]
        );
        assert_eq!(lost[1].reported_at, None, "not named by this check");
    }

    /// A page never reported again carries no report round.
    #[test]
    fn a_page_never_reported_again_is_no_late_report() {
        let p = program();
        let mem = GuestMemory::new(Backing::Anon, 4 * PAGE_SIZE).expect("maps");
        let layout = DataLayout::single(2, 4);
        let mut shadow = Shadow::new(layout.clone(), &mem);
        let mut check = RunningCheck::new(&p, layout);
        guest(&mem, 0, 1, 2);
        check.advance(&[2, 0]).expect("advance");
        shadow.copy(&mem, &set(&[0]));
        let mut lost = check.check(&shadow, 2, &set(&[0]), None);
        check.advance(&[2, 0]).expect("advance");
        assert!(check.check(&shadow, 3, &set(&[]), None).is_empty());
        check.annotate(&mut lost);
        assert_eq!((lost[0].reported_at, lost[0].stalled_writer), (None, None));
        assert!(!lost[0].late());
    }

    #[test]
    fn a_write_after_the_snapshot_is_not_required_yet() {
        let p = program();
        let mem = GuestMemory::new(Backing::Anon, 4 * PAGE_SIZE).expect("maps");
        let layout = DataLayout::single(2, 4);
        let mut shadow = Shadow::new(layout.clone(), &mem);
        let mut check = RunningCheck::new(&p, layout);
        guest(&mem, 0, 1, 1);
        check.advance(&[1, 0]).expect("advance");
        // Write 2 lands after the snapshot and before the collect; the collect reports only
        // page 0 (write 2 comes next round).
        guest(&mem, 0, 2, 2);
        shadow.copy(&mem, &set(&[0]));
        assert!(check.check(&shadow, 2, &set(&[0]), None).is_empty());
        // Next round it is required, and a newer stamp in the shadow satisfies it.
        check.advance(&[2, 0]).expect("advance");
        guest(&mem, 0, 3, 6);
        shadow.copy(&mem, &set(&[1]));
        assert!(check.check(&shadow, 3, &set(&[1]), None).is_empty());
    }

    #[test]
    fn the_closed_form_of_an_endless_loop_matches_the_interpreter() {
        let p = program();
        for steps in [[1, 3, 4, 11, 30], [2, 2, 9, 10, 13]] {
            let mut fast = EndlessLoop::of(&p.vcpus[0]).expect("an endless loop");
            let mut slow = ThreadEvents::new(&p.vcpus[0]);
            for now in steps {
                let mut want = BTreeMap::new();
                for (page, offset, seq) in writes_through(&mut slow, now).expect("endless") {
                    want.insert((page, offset), seq);
                }
                let mut got = BTreeMap::new();
                for (page, offset, j) in fast.latest(now) {
                    got.insert((page, offset), j);
                }
                assert_eq!(got, want, "through write {now}");
            }
        }
    }

    #[test]
    fn shared_words_accept_any_writer_but_never_stale_content() {
        let mut w = Word::default();
        w.require(0, 5);
        w.require(1, 3);
        assert_eq!(w.missing(stamp(0, 5)), None);
        assert_eq!(w.missing(stamp(1, 9)), None, "vCPU 1 may have written last");
        assert_eq!(
            w.missing(stamp(1, 2)),
            Some((1, 3)),
            "older than vCPU 1's write"
        );
        assert_eq!(w.missing(0), Some((0, 5)), "content from before any write");
        assert_eq!(
            w.missing(stamp(2, 100)),
            Some((0, 5)),
            "not a writer of this word"
        );
    }

    #[test]
    fn progress_beyond_the_program_is_an_error() {
        let p = Program::new(4, vec![Thread::new(vec![Op::Write { page: 1, offset: 0 }])]);
        let mut check = RunningCheck::new(&p, DataLayout::single(2, 4));
        assert!(check.advance(&[2]).unwrap_err().contains("only 1 writes"));
    }
}
