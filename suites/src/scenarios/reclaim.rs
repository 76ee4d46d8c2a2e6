//! Reclaim racing dirty tracking (issue 11): the data region is a regular file mapped shared
//! (the `file` backing, as QEMU's memory-backend-file) and a host agent thread writes it back
//! and pages it out in a loop while the vCPUs write and the host harvests, through the
//! concurrent driver and its per-harvest check (see `concurrent`).
//!
//! Each agent cycle: write back every dirty page (`msync(MS_SYNC)` and `sync_file_range`
//! alternately: `folio_mkclean` write-protects the host's mappings and KVM zaps its own), read
//! residency with `mincore`, `MADV_PAGEOUT` the whole mapping (clean pages are unmapped, KVM
//! zaps again, and they leave the page cache), read residency again. The guest's next access to
//! an evicted page faults through KVM into the filesystem with logging on.
//!
//! Judgement: the concurrent driver's oracles (every write published before a collect is in
//! the shadow after that harvest's copy; the final shadow equals memory). Proof the path was
//! taken, or the verdict is not-exercised: pages evicted (resident before a pageout and not
//! after, by `mincore`), and KVM's own count of its 4 KiB mappings (`pages_4k`) dropping across
//! writebacks and pageouts and growing again between cycles. Both are lower bounds: the vCPUs
//! fault pages back in while the agent samples.
//!
//! What this cannot see: which zap a given lost write followed (the agent and the harvests
//! are not in lockstep); and where the file's directory is on tmpfs or ramfs (the lanes'
//! initramfs) the backing is refused, so the trial skips with that reason.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trackcheck_harness::machine::RunView;
use trackcheck_harness::memory::Writeback;
use trackcheck_harness::oracle::Shadow;
use trackcheck_harness::sys::stats::StatsFd;
use trackcheck_harness::track::TrackerSpec;
use trackcheck_harness::{Backing, GuestMemory};

use super::concurrent::drive_program_with;
use super::{Findings, TrialError, TrialTracker};
use crate::programs;
use crate::spec::{Pattern, TrialSpec};

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

/// What the agent did and saw.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    cycles: u64,
    msyncs: u64,
    sync_file_ranges: u64,
    /// Pages resident before a pageout and not after (summed over cycles).
    evicted: u64,
    /// Pages evicted in one cycle and resident again at the next one's start.
    back: u64,
    /// Whether KVM's VM stats have `pages_4k`.
    stats: bool,
    /// Drops of `pages_4k` across writebacks.
    zapped_writeback: u64,
    /// Drops of `pages_4k` across pageouts.
    zapped_pageout: u64,
    /// Growth of `pages_4k` from one cycle's pageout to the next cycle's start.
    remapped: u64,
}

impl Tally {
    fn summary(&self) -> String {
        let kvm = if self.stats {
            format!(
                "KVM pages_4k: {} mappings dropped across writebacks, {} across pageouts, {} made again between cycles",
                self.zapped_writeback, self.zapped_pageout, self.remapped
            )
        } else {
            "KVM's VM stats have no pages_4k".to_string()
        };
        format!(
            "reclaim agent: {} cycles ({} msync(MS_SYNC), {} sync_file_range, each then MADV_PAGEOUT); mincore: {} page evictions, {} of them back in the page cache by the next cycle; {kvm} (lower bounds: the vCPUs fault concurrently)",
            self.cycles, self.msyncs, self.sync_file_ranges, self.evicted, self.back
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
        if !self.stats {
            return Some(
                "KVM's binary stats have no pages_4k: cannot show KVM's mappings were zapped and made again"
                    .into(),
            );
        }
        if self.zapped_writeback + self.zapped_pageout == 0 || self.remapped == 0 {
            return Some(format!(
                "KVM's pages_4k does not show zaps and re-faults ({} dropped, {} made again)",
                self.zapped_writeback + self.zapped_pageout,
                self.remapped
            ));
        }
        None
    }
}

/// The agent thread; stopped and joined when dropped (also on error or panic).
struct Agent {
    stop: Arc<AtomicBool>,
    cycles: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<Tally, String>>>,
}

impl Agent {
    fn start(memory: Arc<GuestMemory>, stats: Option<StatsFd>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let cycles = Arc::new(AtomicU64::new(0));
        let (s, c) = (Arc::clone(&stop), Arc::clone(&cycles));
        let handle = std::thread::Builder::new()
            .name("reclaim-agent".into())
            .spawn(move || agent(&memory, stats.as_ref(), &s, &c))
            .ok();
        Self {
            stop,
            cycles,
            handle,
        }
    }

    /// Wait up to `most` for `cycles` cycles to be done.
    fn wait_for(&self, cycles: u64, most: Duration) {
        let start = Instant::now();
        while self.cycles.load(Ordering::Acquire) < cycles
            && start.elapsed() < most
            && self.handle.as_ref().is_some_and(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn finish(mut self) -> Result<Tally, String> {
        self.stop.store(true, Ordering::Release);
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
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The agent's loop (see the module doc).
fn agent(
    memory: &GuestMemory,
    stats: Option<&StatsFd>,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<Tally, String> {
    let k4 = || {
        stats
            .and_then(|s| s.snapshot().ok())
            .and_then(|s| s.get("pages_4k"))
    };
    let mut t = Tally {
        stats: k4().is_some(),
        ..Tally::default()
    };
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let mut evicted_last: Vec<bool> = Vec::new();
    let mut last_after: Option<u64> = None;
    while !stop.load(Ordering::Acquire) {
        let how = if t.cycles.is_multiple_of(2) {
            t.msyncs += 1;
            Writeback::Msync
        } else {
            t.sync_file_ranges += 1;
            Writeback::SyncFileRange
        };
        let p0 = k4();
        if let (Some(p0), Some(prev)) = (p0, last_after) {
            t.remapped += p0.saturating_sub(prev);
        }
        memory.writeback(how).map_err(|e| e.to_string())?;
        let p1 = k4();
        memory.resident(&mut before).map_err(|e| e.to_string())?;
        t.back += evicted_last
            .iter()
            .zip(&before)
            .filter(|&(&e, &r)| e && r != 0)
            .count() as u64;
        memory.page_out().map_err(|e| e.to_string())?;
        let p2 = k4();
        memory.resident(&mut after).map_err(|e| e.to_string())?;
        evicted_last.clear();
        evicted_last.extend(before.iter().zip(&after).map(|(&b, &a)| b != 0 && a == 0));
        t.evicted += evicted_last.iter().filter(|&&e| e).count() as u64;
        if let (Some(p0), Some(p1), Some(p2)) = (p0, p1, p2) {
            t.zapped_writeback += p0.saturating_sub(p1);
            t.zapped_pageout += p1.saturating_sub(p2);
        }
        last_after = p2;
        t.cycles += 1;
        done.store(t.cycles, Ordering::Release);
        std::thread::sleep(PAUSE);
    }
    Ok(t)
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
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    // A stats fd of its own, read from the agent's thread (KVM keeps the VM's stats alive as
    // long as the fd is open).
    let stats = StatsFd::open(m.vm().fd(), "VM").ok();
    let agent = Agent::start(m.data_shared(), stats);
    let mut pace = |_: &RunView<'_>, _: u32, _: &[u64], _: &mut Shadow| {
        agent.wait_for(MIN_CYCLES, CYCLE_WAIT);
        Ok(())
    };
    let driven = drive_program_with(&mut m, &program, tracker.get(), &mut pace);
    let tally = agent.finish();
    let mut findings = driven?;
    let tally = tally.map_err(|e| TrialError::Error(format!("reclaim agent: {e}")))?;
    m.detach(tracker.get())?;
    findings.evidence.push(tally.summary());
    findings.not_exercised = tally.not_exercised();
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::Tally;

    /// No eviction, no stats, or no zap or re-fault seen: not exercised, saying which.
    #[test]
    fn proof_needs_evictions_zaps_and_refaults() {
        let proven = Tally {
            cycles: 3,
            evicted: 10,
            stats: true,
            zapped_pageout: 5,
            remapped: 4,
            ..Tally::default()
        };
        assert_eq!(proven.not_exercised(), None);
        let none = Tally {
            evicted: 0,
            ..proven
        };
        assert!(none.not_exercised().is_some_and(|w| w.contains("mincore")));
        let blind = Tally {
            stats: false,
            ..proven
        };
        assert!(
            blind
                .not_exercised()
                .is_some_and(|w| w.contains("pages_4k"))
        );
        let no_refault = Tally {
            remapped: 0,
            ..proven
        };
        assert!(no_refault.not_exercised().is_some());
    }
}
