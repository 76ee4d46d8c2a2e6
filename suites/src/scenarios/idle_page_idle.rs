//! page_idle racing dirty tracking (issue 11, `idle-page-idle`): on kernels built with
//! CONFIG_IDLE_PAGE_TRACKING=y, a thread marks the guest memory's host frames idle through
//! /sys/kernel/mm/page_idle/bitmap (frame numbers from /proc/self/pagemap) every half
//! millisecond while two vCPUs write random pages and the host harvests, through the
//! concurrent driver and its per-harvest check (see `concurrent`). Each mark walks the frame's
//! mappings and calls `ptep_clear_young_notify` on each: the host PTE's young bit and, through
//! the MMU notifier, KVM's `clear_young` over it (no TLB flush), then sets the folio's idle
//! flag. A read of the bitmap tests the same again (`page_idle_clear_pte_refs`) and reports a
//! frame idle only if nothing found it young.
//!
//! Judgement, dirty side: the concurrent driver's oracles (no written page lost).
//!
//! Access side, a lower bound: every [`CYCLE_EVERY`] harvests the host stops the thread and
//! runs a check cycle over two harvests. After harvest k it marks every guest frame idle.
//! Harvest k+1 then write-protects, with a TLB flush, every page written since harvest k (the
//! others were protected before and not written since) and copies them; the host reads the
//! vCPUs' progress (P_h), lets them write on (up to [`WAIT`]), reads progress (P_r) and then the
//! bitmap, before any further copy. A write with seq in (P_h + 1, P_r] (one past a progress read
//! may have landed before it: a vCPU publishes progress after its store) came after that
//! protect, so its page's first such write faulted into KVM, whose new or restored mapping the
//! CPU walked afresh and marked accessed after the mark: the page must not read idle. One that
//! does is a problem of the trial, unless the dirty oracle named the same page lost or late
//! (its protect was missed, and that is already the failure). Not judged: pages written after
//! the snapshot before harvest k's collect and up to P_h + 1, and every page sharing a folio
//! with one, because the host may have copied them since the mark, reading them through its
//! own mapping and so making them young whatever KVM did. For the same reason the no-flush case
//! (a write after the mark through a cached TLB entry) cannot be measured here: every such page
//! is copied before the reading.
//!
//! Proof the aging ran, or the verdict is not-exercised: frames were marked; where tracefs
//! can count them, `kvm:kvm_age_hva` events over the guest's host virtual range (see
//! `kvmtrace`) are not zero; pages that no write touched read idle (the marks took; on THP,
//! whose untouched pages share folios with written ones, only where nothing was counted); and
//! on 4 KiB folios the lower bound judged at least one page.
//!
//! page_idle tracks LRU folios only, so hugetlb memory is out; the matrix runs anon and THP
//! (a THP folio has one idle flag: a write to one of its pages makes all 512 read young, so
//! on THP the bound is judged only on folios the host has not copied since the mark).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use trackcheck_guests::sim::{ThreadEvents, writes_through};
use trackcheck_harness::machine::RunView;
use trackcheck_harness::oracle::Shadow;
use trackcheck_harness::track::dirty_ring::host_page_bytes;
use trackcheck_harness::{Backing, HostProfile, Mechanism};

use super::concurrent::drive_program_with;
use super::idle::{PAGES, VCPUS};
use super::page_idle::{Bitmap, page_frames};
use super::{Findings, TrialError, TrialTracker, kvmtrace};
use crate::programs;
use crate::spec::{Pattern, TrialSpec};

/// Harvests from one check cycle's start to the next (a cycle takes two; the thread races
/// the harvests in between).
const CYCLE_EVERY: u32 = 4;
/// The marking thread's pause between passes.
const PAUSE: Duration = Duration::from_micros(500);
/// Writes each vCPU makes past the protect before the host reads the bitmap, waited for up
/// to [`WAIT`].
const WAIT_WRITES: u64 = 32;
const WAIT: Duration = Duration::from_millis(50);

/// Whether the host can run the trial; the reason if not.
pub(super) fn precheck(spec: &TrialSpec, host: &HostProfile) -> Result<(), String> {
    let mech = Mechanism::PageIdle;
    if let Some(why) = mech.support(host).reason() {
        return Err(format!("{mech}: {why}"));
    }
    if !matches!(spec.backing, Backing::Anon | Backing::Thp) {
        return Err(format!(
            "{mech}: page_idle tracks LRU folios; the trial ages anonymous memory (anon, thp), not {}",
            spec.backing
        ));
    }
    Ok(())
}

/// What the marking thread and the check cycles share.
#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    /// Held by a pass of the thread, and by the host through a check cycle.
    window: Mutex<()>,
    /// The host wants `window`: the thread takes no new pass meanwhile (a thread that retakes
    /// the lock at once could starve the host, and with it the harvests).
    wanted: AtomicBool,
    passes: AtomicU64,
    /// Bitmap words written (by the thread and the cycles).
    words: AtomicU64,
    /// Frames marked, summed over passes.
    frames: AtomicU64,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The host's hold on `window`, once the thread's pass in progress (if any) is done.
    fn hold(&self) -> MutexGuard<'_, ()> {
        self.wanted.store(true, Ordering::Release);
        self.lock()
    }

    /// Give the thread its passes back (after dropping the guard [`Self::hold`] gave).
    fn release(&self) {
        self.wanted.store(false, Ordering::Release);
    }

    /// One pass: the frames now behind the guest data, marked idle.
    fn mark(&self, bitmap: &Bitmap, addr: u64) -> Result<(), String> {
        let frames: Vec<u64> = page_frames(addr, PAGES)?.into_iter().flatten().collect();
        let words = bitmap.mark(frames.iter().copied())?;
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.words.fetch_add(words, Ordering::Relaxed);
        self.frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The marking thread; stopped and joined when dropped.
struct Marker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Marker {
    fn start(bitmap: Arc<Bitmap>, addr: u64) -> Self {
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                if s.wanted.load(Ordering::Acquire) {
                    std::thread::sleep(PAUSE);
                    continue;
                }
                let pass = {
                    let _window = s.lock();
                    s.mark(&bitmap, addr)
                };
                if let Err(e) = pass {
                    *s.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                    return;
                }
                std::thread::sleep(PAUSE);
            }
        });
        Self {
            shared,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One check cycle's writes, by data page.
#[derive(Debug, Default, PartialEq, Eq)]
struct Window {
    /// Written after the protect that followed the mark: must read young (first such write).
    due: BTreeMap<u64, (usize, u64)>,
    /// Written after the snapshot before the marking harvest's collect, up to the protect:
    /// the host may have copied them (read them through its own mapping, making them young)
    /// after the mark, so neither they nor their folios are judged.
    copied: BTreeSet<u64>,
}

/// The lower bound's tallies over all cycles.
#[derive(Debug, Default)]
struct Tally {
    cycles: u32,
    /// Pages due young and judged.
    due: u64,
    violations: Vec<Violation>,
    /// Pages due young whose folio the host may have read after the mark (not judged).
    masked: u64,
    /// Pages no write touched after the marking harvest's snapshot, and those that read idle.
    untouched: u64,
    untouched_idle: u64,
    /// Data pages without a frame at the reading (not judged).
    unmapped: u64,
}

/// A page written after the mark and a protect that read idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Violation {
    cycle: u32,
    page: u64,
    vcpu: usize,
    seq: u64,
}

impl Tally {
    /// Judge one cycle: `frames[p]` is data page p's frame at the reading, `idle` the frames
    /// that read idle, `folio_shift` the log2 of frames per folio (0 for 4 KiB folios; THP's
    /// idle flag is its folio's).
    fn judge(
        &mut self,
        window: &Window,
        frames: &[Option<u64>],
        idle: &BTreeSet<u64>,
        folio_shift: u32,
    ) {
        self.cycles += 1;
        let masked: BTreeSet<u64> = (0u64..)
            .zip(frames)
            .filter(|(page, _)| window.copied.contains(page))
            .filter_map(|(_, f)| f.map(|f| f >> folio_shift))
            .collect();
        for (page, frame) in (0u64..).zip(frames) {
            let Some(frame) = frame else {
                self.unmapped += 1;
                continue;
            };
            let is_idle = idle.contains(frame);
            if let Some(&(vcpu, seq)) = window.due.get(&page) {
                if masked.contains(&(frame >> folio_shift)) {
                    self.masked += 1;
                    continue;
                }
                self.due += 1;
                if is_idle {
                    self.violations.push(Violation {
                        cycle: self.cycles,
                        page,
                        vcpu,
                        seq,
                    });
                }
            } else if !window.copied.contains(&page) {
                self.untouched += 1;
                self.untouched_idle += u64::from(is_idle);
            }
        }
    }
}

/// Where a check cycle is.
#[derive(Debug)]
enum Stage {
    Free,
    /// Marked; the progress snapshot taken before the marking harvest's collect.
    Marked(Vec<u64>),
}

/// The host's check cycles (run between harvests, see the module doc).
struct Cycles<'a> {
    shared: &'a Shared,
    bitmap: &'a Bitmap,
    addr: u64,
    folio_shift: u32,
    stage: Stage,
    window: Option<MutexGuard<'a, ()>>,
    events: Vec<ThreadEvents<'a>>,
    tally: Tally,
}

impl Cycles<'_> {
    /// After harvest `harvest`, whose collect followed the progress snapshot `before`.
    fn step(&mut self, view: &RunView<'_>, harvest: u32, before: &[u64]) -> Result<(), TrialError> {
        let n = self.events.len();
        let progress = || -> Vec<u64> { (0..n).map(|v| view.progress(v)).collect() };
        let err = |e: String| TrialError::Error(format!("page_idle: {e}"));
        match std::mem::replace(&mut self.stage, Stage::Free) {
            Stage::Free if harvest % CYCLE_EVERY == 1 => {
                self.window = Some(self.shared.hold());
                self.shared.mark(self.bitmap, self.addr).map_err(err)?;
                self.stage = Stage::Marked(before.to_vec());
            }
            Stage::Free => {}
            Stage::Marked(k) => {
                // This harvest protected every page written since the marking one; the
                // vCPUs write on, and the bitmap is read before the next copy.
                let h = progress();
                let waited = std::time::Instant::now();
                while waited.elapsed() < WAIT
                    && (0..n).any(|v| view.progress(v) < h[v] + 1 + WAIT_WRITES)
                {
                    std::thread::sleep(Duration::from_micros(200));
                }
                let r = progress();
                let window = self.window_of(&k, &h, &r)?;
                let frames = page_frames(self.addr, PAGES).map_err(err)?;
                let idle = self
                    .bitmap
                    .idle(frames.iter().flatten().copied())
                    .map_err(err)?;
                self.tally.judge(&window, &frames, &idle, self.folio_shift);
                self.window = None;
                self.shared.release();
            }
        }
        Ok(())
    }

    /// The writes of the cycle with snapshot `k` before the marking harvest's collect,
    /// progress `h` after the protecting harvest and `r` before the reading.
    fn window_of(&mut self, k: &[u64], h: &[u64], r: &[u64]) -> Result<Window, TrialError> {
        let mut w = Window::default();
        for (v, events) in self.events.iter_mut().enumerate() {
            let mut through = |to: u64| {
                writes_through(events, to).map_err(|had| {
                    TrialError::Error(format!(
                        "vCPU {v} published progress {to}, but its program has only {had} writes"
                    ))
                })
            };
            through(k[v])?;
            let copied = through(h[v] + 1)?;
            let due = through(r[v])?;
            w.copied.extend(copied.iter().map(|&(page, _, _)| page));
            for (page, _, seq) in due {
                w.due.entry(page).or_insert((v, seq));
            }
        }
        Ok(w)
    }
}

/// Frames per folio, as a shift: THP's (the PMD size) or a 4 KiB page's.
fn folio_shift(backing: Backing) -> u32 {
    if backing != Backing::Thp {
        return 0;
    }
    let pmd = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(2 << 20);
    (pmd / host_page_bytes()).max(1).trailing_zeros()
}

pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let program = programs::concurrent(seed, Pattern::Random, VCPUS, PAGES);
    let bitmap = Arc::new(Bitmap::open()?);
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    let addr = m.data().host_addr();
    let len = m.data().mapped_len();
    let trace = kvmtrace::KvmTrace::age(addr, addr + len);
    let zaps = kvmtrace::KvmTrace::event(kvmtrace::UNMAP, addr, addr + len);
    let mut marker = Marker::start(Arc::clone(&bitmap), addr);
    let shared = Arc::clone(&marker.shared);
    let mut cycles = Cycles {
        shared: &shared,
        bitmap: &bitmap,
        addr,
        folio_shift: folio_shift(spec.backing),
        stage: Stage::Free,
        window: None,
        events: program
            .vcpus
            .iter()
            .map(|t| ThreadEvents::with_seq_base(t, program.seq_base))
            .collect(),
        tally: Tally::default(),
    };
    let mut check = |view: &RunView<'_>, harvest: u32, before: &[u64], _: &mut Shadow| {
        cycles.step(view, harvest, before)
    };
    let driven = drive_program_with(&mut m, &program, tracker.get(), &mut check);
    let tally = std::mem::take(&mut cycles.tally);
    drop(cycles);
    marker.stop();
    let traced = trace.and_then(|t| t.count());
    let zaps = zaps.and_then(|t| t.count());
    let mut findings = driven?;
    if let Some(e) = shared
        .error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        return Err(TrialError::Error(format!("page_idle marking thread: {e}")));
    }
    let layout = m.data_layout();
    m.detach(tracker.get())?;
    let named: BTreeSet<u64> = findings.report.lost.iter().map(|l| l.gpa).collect();
    let (explained, unexplained): (Vec<Violation>, Vec<Violation>) = tally
        .violations
        .iter()
        .partition(|v| named.contains(&layout.gpa(v.page)));
    let list = |vs: &[Violation]| {
        vs.iter()
            .take(5)
            .map(|v| {
                format!(
                    "cycle {} page {} (vCPU {} write {})",
                    v.cycle, v.page, v.vcpu, v.seq
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if !unexplained.is_empty() {
        findings.problems.push(format!(
            "{} page(s) written after page_idle marked them and a harvest write-protected them read idle: {}{}",
            unexplained.len(),
            list(&unexplained),
            if unexplained.len() > 5 { " ..." } else { "" }
        ));
    }
    if !explained.is_empty() {
        findings.evidence.push(format!(
            "{} page(s) read idle after a write past the protect, each a page the dirty oracle named lost or late (its protect was missed): {}",
            explained.len(),
            list(&explained)
        ));
    }
    let passes = shared.passes.load(Ordering::Relaxed);
    let frames = shared.frames.load(Ordering::Relaxed);
    findings.evidence.push(format!(
        "page_idle: {passes} marking passes ({} bitmap words, {frames} frames of the guest's {PAGES} data pages); \
         {} check cycles: {} pages written after the mark and a protect judged, {} of them read idle (asserted: none may), \
         {} more not judged (their folio was written before the protect, so the host may have copied it since the mark); \
         {} pages untouched since the marking harvest, {} of them read idle; {} without a frame",
        shared.words.load(Ordering::Relaxed),
        tally.cycles,
        tally.due,
        tally.violations.len(),
        tally.masked,
        tally.untouched,
        tally.untouched_idle,
        tally.unmapped,
    ));
    findings.evidence.push(kvmtrace::summary(&traced));
    findings
        .evidence
        .push(kvmtrace::summary_of(kvmtrace::UNMAP, &zaps));
    findings.not_exercised = not_exercised(spec.backing, frames, &tally, &traced);
    Ok(findings)
}

/// Why the run does not prove the marks reached KVM (and, on 4 KiB folios, that the bound
/// was judged), if it does not. On THP every folio the guest writes is also one the host
/// copies, so the bound is judged only where a folio escapes that, and marks are shown to
/// take only by KVM's clears (untouched pages share folios with written ones).
fn not_exercised(
    backing: Backing,
    frames: u64,
    tally: &Tally,
    traced: &Result<u64, String>,
) -> Option<String> {
    let small = backing != Backing::Thp;
    if frames == 0 {
        return Some("no guest frame was marked idle (pagemap showed none)".into());
    }
    if let Ok(0) = traced {
        return Some(
            "the marks never reached KVM's clear_young over the guest memory: 0 kvm:kvm_age_hva \
             events over its host virtual range"
                .into(),
        );
    }
    if tally.untouched_idle == 0 && (small || traced.is_err()) {
        return Some(format!(
            "no page read idle in {} check cycles ({} untouched pages): the marks are not shown to have taken",
            tally.cycles, tally.untouched
        ));
    }
    if tally.due == 0 && small {
        return Some(format!(
            "the lower bound judged no page: in {} check cycles no write came after a mark and a protect to a page the host had not copied since",
            tally.cycles
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use trackcheck_harness::Backing;

    use super::{Tally, Violation, Window, not_exercised};

    fn window() -> Window {
        Window {
            due: BTreeMap::from([(0, (0, 120)), (1, (1, 90)), (4, (0, 130))]),
            copied: BTreeSet::from([2, 4]),
        }
    }

    /// The lower bound's self-test: a page due young that reads idle (an injected miss) is
    /// named with its write; pages the host may have copied since the mark, and due pages in
    /// their folios, are not judged.
    #[test]
    fn an_idle_page_written_after_the_protect_is_named() {
        let frames = [Some(100), Some(101), Some(102), Some(103), Some(104), None];
        let mut t = Tally::default();
        t.judge(&window(), &frames, &BTreeSet::from([102, 103, 104]), 0);
        assert!(t.violations.is_empty());
        assert_eq!((t.due, t.masked), (2, 1));
        assert_eq!((t.untouched, t.untouched_idle, t.unmapped), (1, 1, 1));
        // Injected: page 1's frame reads idle although vCPU 1's write 90 came after the protect.
        t.judge(&window(), &frames, &BTreeSet::from([101, 103]), 0);
        assert_eq!(
            t.violations,
            vec![Violation {
                cycle: 2,
                page: 1,
                vcpu: 1,
                seq: 90
            }]
        );
        // One 8-frame folio holding them all: page 2 was copied, so nothing is judged.
        let mut t = Tally::default();
        t.judge(&window(), &frames, &BTreeSet::from([101]), 3);
        assert_eq!((t.due, t.masked, t.violations.len()), (0, 3, 0));
    }

    #[test]
    fn proof_needs_marks_kvm_calls_idle_readings_and_a_judged_page() {
        let proven = || Tally {
            cycles: 3,
            due: 40,
            untouched: 1000,
            untouched_idle: 900,
            ..Tally::default()
        };
        let (anon, thp) = (Backing::Anon, Backing::Thp);
        assert_eq!(not_exercised(anon, 2048, &proven(), &Ok(5)), None);
        let no_trace = Err("no tracefs".to_string());
        assert_eq!(not_exercised(anon, 2048, &proven(), &no_trace), None);
        let none = not_exercised(anon, 0, &proven(), &Ok(5));
        assert!(none.is_some_and(|w| w.contains("no guest frame")));
        let zero = not_exercised(anon, 2048, &proven(), &Ok(0));
        assert!(zero.is_some_and(|w| w.contains("clear_young")));
        let mut t = proven();
        t.untouched_idle = 0;
        assert!(not_exercised(anon, 2048, &t, &Ok(5)).is_some_and(|w| w.contains("taken")));
        // THP: KVM's clears prove the marks; without a count, idle readings must.
        assert_eq!(not_exercised(thp, 2048, &t, &Ok(5)), None);
        assert!(not_exercised(thp, 2048, &t, &no_trace).is_some_and(|w| w.contains("taken")));
        let mut t = proven();
        t.due = 0;
        let unjudged = not_exercised(anon, 2048, &t, &Ok(5));
        assert!(unjudged.is_some_and(|w| w.contains("judged no page")));
        assert_eq!(not_exercised(thp, 2048, &t, &Ok(5)), None);
    }
}
