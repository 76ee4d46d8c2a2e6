//! Reclaim racing dirty tracking (issue 11): the data region is a regular file mapped shared
//! (the `file` backing, as QEMU's memory-backend-file) and a host agent thread writes it back
//! and pages it out in a loop while the vCPUs write and the host harvests, through the
//! concurrent driver and its per-harvest check (see `concurrent`).
//!
//! Each agent cycle (every other one starting with `msync(MS_SYNC)` of the whole mapping) walks
//! the mapping in chunks of [`CHUNK_PAGES`] pages: write the chunk back (`sync_file_range`:
//! `folio_mkclean` write-protects the host's mappings and KVM zaps its own), then at once
//! `MADV_PAGEOUT` the same chunk (clean
//! pages are unmapped, KVM zaps again, and they leave the page cache), with `mincore` just
//! before and after the pageout. Chunk by chunk, a page the guest wrote is still clean when its
//! pageout comes, even on a fast guest. The guest's next access to an evicted page faults
//! through KVM with logging on.
//!
//! Judgement: the concurrent driver's oracles (every write published before a collect is in
//! the shadow after that harvest's copy; the final shadow equals memory). Proof the path was
//! taken, or the verdict is not-exercised: evicted pages (resident before their pageout and
//! not after, by `mincore`) that the guest wrote again afterwards. After each harvest the host
//! takes the pages evicted so far, then reads each vCPU's progress; at the end, a page whose
//! last stamp (each vCPU writes its own word) has a seq above that progress was written after
//! its eviction, and that write faulted KVM's mapping back (the eviction had zapped it). KVM's
//! count of its 4 KiB mappings (`pages_4k`, x86 only) is shown too: dropping across cycles,
//! growing between them.
//!
//! What this cannot see: which zap a given lost write followed (the agent and the harvests
//! are not in lockstep); and where the file's directory is on tmpfs or ramfs the backing is
//! refused, so the trial skips with that reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trackcheck_harness::machine::RunView;
use trackcheck_harness::memory::Writeback;
use trackcheck_harness::oracle::Shadow;
use trackcheck_harness::sys::stats::StatsFd;
use trackcheck_harness::track::TrackerSpec;
use trackcheck_harness::track::dirty_ring::host_page_bytes;
use trackcheck_harness::{Backing, GuestMemory};

use super::concurrent::drive_program_with;
use super::{Findings, TrialError, TrialTracker, kvmtrace};
use crate::programs;
use crate::spec::{Pattern, TrialSpec};
use trackcheck_guests::program::Op;
use trackcheck_guests::sim::{stamp_seq, stamp_vcpu};

/// Bytes of a data page.
const PAGE_BYTES: u64 = 4096;

/// Data pages.
pub(super) const PAGES: u64 = 2048;
/// vCPUs writing (hot-cold: hot pages are dirty at every writeback, cold ones are evicted and
/// now and then written again).
const VCPUS: usize = 2;
/// Agent cycles the trial waits for (the harvester waits up to [`CYCLE_WAIT`] per harvest
/// until this many are done, so a short run still races some).
const MIN_CYCLES: u64 = 3;
/// Longest wait for the agent in one harvest: far below the ring-full patience, so a vCPU
/// waiting on a full ring is never taken for stuck.
const CYCLE_WAIT: Duration = Duration::from_millis(100);
/// Pause between agent cycles (the vCPUs get the CPUs, and fault evicted pages back).
const PAUSE: Duration = Duration::from_millis(5);
/// Pages written back and paged out together (one `msync`/`sync_file_range` and one
/// `MADV_PAGEOUT` per chunk).
const CHUNK_PAGES: u64 = 64;

/// What the agent did and saw.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    cycles: u64,
    /// Cycles that began with msync(MS_SYNC) of the whole mapping.
    msyncs: u64,
    /// Chunks written back by sync_file_range (each then paged out).
    sync_file_ranges: u64,
    /// Pages resident before their chunk's pageout and not after (summed over cycles).
    evicted: u64,
    /// Distinct pages evicted before a harvest's progress read and written by the guest
    /// after it (filled in after the run).
    refaulted: u64,
    /// Distinct pages evicted before a harvest's progress read.
    watched: u64,
    /// Whether KVM's VM stats have `pages_4k`.
    stats: bool,
    /// Drops of `pages_4k` across cycles.
    zapped: u64,
    /// Growth of `pages_4k` from one cycle's end to the next one's start.
    remapped: u64,
}

impl Tally {
    fn summary(&self) -> String {
        let kvm = if self.stats {
            format!(
                "KVM pages_4k: {} mappings dropped across cycles, {} made again between them (lower bounds: the vCPUs fault concurrently)",
                self.zapped, self.remapped
            )
        } else {
            "KVM's VM stats have no pages_4k".to_string()
        };
        format!(
            "reclaim agent: {} cycles ({} starting with msync(MS_SYNC) of the whole mapping; then each chunk of {CHUNK_PAGES} pages written back by sync_file_range and at once paged out: {} chunks); mincore: {} page evictions; {} distinct evicted pages watched, {} of them written by the guest after their eviction (each such write faulted KVM's mapping back); {kvm}",
            self.cycles,
            self.msyncs,
            self.sync_file_ranges,
            self.evicted,
            self.watched,
            self.refaulted
        )
    }

    /// Why the run does not prove its zaps and re-faults, if it does not.
    fn not_exercised(&self) -> Option<String> {
        if self.evicted == 0 {
            return Some(format!(
                "no page left the page cache in {} reclaim cycles (mincore): nothing was zapped by pageout",
                self.cycles
            ));
        }
        if self.refaulted == 0 {
            return Some(format!(
                "the guest wrote none of the {} evicted pages watched after its eviction: no write faulted an evicted page back through KVM",
                self.watched
            ));
        }
        None
    }
}

/// The agent thread; stopped and joined when dropped (also on error or panic).
struct Agent {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<Result<Tally, String>>>,
}

/// What the agent thread shares with the host.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Cycles done.
    done: AtomicU64,
    /// Data pages evicted since the host last took them.
    evicted: Mutex<Vec<u64>>,
}

impl Agent {
    fn start(memory: Arc<GuestMemory>, stats: Option<StatsFd>) -> Self {
        let shared = Arc::new(Shared::default());
        let theirs = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("reclaim-agent".into())
            .spawn(move || agent(&memory, stats.as_ref(), &theirs))
            .ok();
        Self { shared, handle }
    }

    /// Wait up to `most` for `cycles` cycles to be done.
    fn wait_for(&self, cycles: u64, most: Duration) {
        let start = Instant::now();
        while self.shared.done.load(Ordering::Acquire) < cycles
            && start.elapsed() < most
            && self.handle.as_ref().is_some_and(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The data pages evicted since the last call.
    fn take_evicted(&self) -> Vec<u64> {
        self.shared
            .evicted
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn finish(mut self) -> Result<Tally, String> {
        self.shared.stop.store(true, Ordering::Release);
        match self.handle.take() {
            None => Err("could not start the reclaim agent thread".into()),
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err("the reclaim agent thread panicked".into())),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The agent's loop (see the module doc).
fn agent(memory: &GuestMemory, stats: Option<&StatsFd>, shared: &Shared) -> Result<Tally, String> {
    let k4 = || {
        stats
            .and_then(|s| s.snapshot().ok())
            .and_then(|s| s.get("pages_4k"))
    };
    let mut t = Tally {
        stats: k4().is_some(),
        ..Tally::default()
    };
    let host_page = host_page_bytes();
    // A chunk is whole host pages (a 16 KiB or 64 KiB host page holds several data pages).
    let chunk = (CHUNK_PAGES * PAGE_BYTES).next_multiple_of(host_page);
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut out: Vec<u64> = Vec::new();
    let mut last_end: Option<u64> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let p0 = k4();
        if let (Some(p0), Some(prev)) = (p0, last_end) {
            t.remapped += p0.saturating_sub(prev);
        }
        // Every other cycle starts with msync(MS_SYNC) of the whole mapping: an fsync of the
        // range, which commits the filesystem's journal, too slow to make per chunk.
        if t.cycles.is_multiple_of(2) {
            t.msyncs += 1;
            memory
                .writeback(Writeback::Msync)
                .map_err(|e| e.to_string())?;
        }
        let mut offset = 0;
        while offset < memory.len() {
            let len = chunk.min(memory.len() - offset);
            t.sync_file_ranges += 1;
            memory
                .writeback_range(Writeback::SyncFileRange, offset, len)
                .map_err(|e| e.to_string())?;
            memory
                .resident_range(offset, len, &mut before)
                .map_err(|e| e.to_string())?;
            memory
                .page_out_range(offset, len)
                .map_err(|e| e.to_string())?;
            memory
                .resident_range(offset, len, &mut after)
                .map_err(|e| e.to_string())?;
            for (i, _) in before
                .iter()
                .zip(&after)
                .enumerate()
                .filter(|&(_, (&b, &a))| b != 0 && a == 0)
            {
                let first = (offset + i as u64 * host_page) / PAGE_BYTES;
                out.extend(first..first + (host_page / PAGE_BYTES).max(1));
            }
            // Published per chunk: a pass over a slow guest's memory can outlast a harvest.
            t.evicted += out.len() as u64;
            if let Ok(mut v) = shared.evicted.lock() {
                v.append(&mut out);
            }
            out.clear();
            offset += len;
        }
        let p2 = k4();
        if let (Some(p0), Some(p2)) = (p0, p2) {
            t.zapped += p0.saturating_sub(p2);
        }
        last_end = p2;
        t.cycles += 1;
        shared.done.store(t.cycles, Ordering::Release);
        std::thread::sleep(PAUSE);
    }
    Ok(t)
}

/// Evicted pages and each vCPU's progress read after the host took them: a later stamp on
/// such a page is a write after its eviction.
#[derive(Default)]
struct Watch {
    /// Data page -> progress of every vCPU read after its first eviction was taken.
    first: BTreeMap<u64, Vec<u64>>,
}

impl Watch {
    /// Take the agent's evictions, then read progress (in that order: every write above the
    /// progress read comes after those evictions).
    fn take(&mut self, agent: &Agent, view: &RunView<'_>, vcpus: usize) {
        let pages = agent.take_evicted();
        if pages.is_empty() {
            return;
        }
        let progress: Vec<u64> = (0..vcpus).map(|v| view.progress(v)).collect();
        for p in pages {
            self.first.entry(p).or_insert_with(|| progress.clone());
        }
    }

    /// How many watched pages carry a stamp, in memory after the run, of a write after their
    /// eviction; `words[v]` is the byte offset of vCPU `v`'s word in every page.
    fn refaulted(&self, memory: &GuestMemory, words: &[u16]) -> u64 {
        self.first
            .iter()
            .filter(|(page, progress)| {
                words
                    .iter()
                    .zip(progress.iter())
                    .enumerate()
                    .any(|(v, (&w, &seen))| {
                        let stamp = memory.read_u64(**page * PAGE_BYTES + u64::from(w));
                        // seen + 1 may have landed before its progress store (a vCPU publishes
                        // progress after the data store): only a later one surely came after.
                        stamp_vcpu(stamp) == v && stamp_seq(stamp) > seen + 1
                    })
            })
            .count() as u64
    }
}

/// Whether `spec` can run at all; the reason if not.
pub(super) fn precheck(spec: &TrialSpec) -> Result<(), String> {
    if spec.backing != Backing::File {
        return Err(format!(
            "reclaim-file writes back and pages out a file: it needs the {} backing, not {}",
            Backing::File,
            spec.backing
        ));
    }
    if spec.tracker == TrackerSpec::UffdWpSync {
        return Err(
            "userfaultfd write-protect without WP_ASYNC registers only anonymous, shmem and \
             hugetlbfs memory (vma_can_userfault: UFFDIO_REGISTER gives EINVAL on a regular \
             file); uffd-wp-async covers file memory"
                .into(),
        );
    }
    Ok(())
}

pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let program = programs::concurrent(seed, Pattern::HotCold, VCPUS, PAGES);
    // Each vCPU's word (the concurrent programs give every vCPU its own offset).
    let words: Vec<u16> = program
        .vcpus
        .iter()
        .map(|t| match t.ops.first() {
            Some(Op::Loop { offset, .. }) => *offset,
            _ => 0,
        })
        .collect();
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    // A stats fd of its own, read from the agent's thread (KVM keeps the VM's stats alive as
    // long as the fd is open).
    let stats = StatsFd::open(m.vm().fd(), "VM").ok();
    // Start from a clean, evicted file: the agent's first pass then handles only what the
    // guest touches, not every page the harness populated (each page KVM maps costs a zap).
    let cold = m
        .data()
        .writeback(Writeback::Msync)
        .and_then(|()| m.data().page_out());
    cold.map_err(|e| TrialError::Error(format!("reclaim: cleaning the file first: {e}")))?;
    // KVM's zaps of guest memory (evidence: the proof is writes after eviction).
    let (addr, len) = (m.data().host_addr(), m.data().mapped_len());
    let zaps = kvmtrace::KvmTrace::event(kvmtrace::UNMAP, addr, addr + len);
    let agent = Agent::start(m.data_shared(), stats);
    let mut watch = Watch::default();
    let mut pace = |view: &RunView<'_>, _: u32, _: &[u64], _: &mut Shadow| {
        agent.wait_for(MIN_CYCLES, CYCLE_WAIT);
        watch.take(&agent, view, VCPUS);
        Ok(())
    };
    let driven = drive_program_with(&mut m, &program, tracker.get(), &mut pace);
    let tally = agent.finish();
    let zaps = zaps.and_then(|t| t.count());
    let mut findings = driven?;
    let mut tally = tally.map_err(|e| TrialError::Error(format!("reclaim agent: {e}")))?;
    tally.watched = watch.first.len() as u64;
    tally.refaulted = watch.refaulted(m.data(), &words);
    m.detach(tracker.get())?;
    findings.evidence.push(tally.summary());
    findings
        .evidence
        .push(kvmtrace::summary_of(kvmtrace::UNMAP, &zaps));
    findings.not_exercised = tally.not_exercised();
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::Tally;

    /// No eviction, or no evicted page written again: not exercised, saying which; KVM's
    /// pages_4k is evidence only (arm64 has none).
    #[test]
    fn proof_needs_evictions_and_writes_after_them() {
        let proven = Tally {
            cycles: 3,
            evicted: 10,
            watched: 8,
            refaulted: 4,
            ..Tally::default()
        };
        assert_eq!(proven.not_exercised(), None);
        let none = Tally {
            evicted: 0,
            ..proven
        };
        assert!(none.not_exercised().is_some_and(|w| w.contains("mincore")));
        let no_refault = Tally {
            refaulted: 0,
            ..proven
        };
        assert!(
            no_refault
                .not_exercised()
                .is_some_and(|w| w.contains("8 evicted pages"))
        );
    }

    /// A page counts as written after its eviction only where a vCPU's own word holds a stamp
    /// of that vCPU at least two writes past the progress read after the eviction (the next
    /// write may have landed before its progress store).
    #[test]
    fn written_after_eviction_needs_a_later_stamp() {
        use super::{PAGE_BYTES, Watch};
        use trackcheck_guests::sim::stamp;
        use trackcheck_harness::{Backing, GuestMemory};
        let mem = GuestMemory::new(Backing::Anon, 8 * PAGE_BYTES).expect("maps");
        let words = [8u16, 16];
        let mut watch = Watch::default();
        for page in 0..4 {
            watch.first.insert(page, vec![100, 200]);
        }
        mem.write_u64(8, stamp(0, 102)); // page 0: vCPU 0, two past its progress
        mem.write_u64(PAGE_BYTES + 8, stamp(0, 101)); // page 1: the next write only
        mem.write_u64(2 * PAGE_BYTES + 16, stamp(0, 500)); // page 2: vCPU 1's word, wrong writer
        mem.write_u64(3 * PAGE_BYTES + 16, stamp(1, 250)); // page 3: vCPU 1, after
        mem.write_u64(5 * PAGE_BYTES + 8, stamp(0, 900)); // page 5: never evicted
        assert_eq!(watch.refaulted(&mem, &words), 2);
    }
}
