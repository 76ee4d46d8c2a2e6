//! userfaultfd write-protect: `uffd-wp-async` (PAGEMAP_SCAN) and `uffd-wp-sync` (a handler
//! thread).
//!
//! These track the host mapping behind a memslot rather than KVM's own log: KVM writes guest
//! memory through the host page tables, so a write-protected host page makes KVM fault.
//! Write-protecting a range makes the kernel drop KVM's mappings of it (MMU notifiers), so every
//! later guest write faults again.
//!
//! - async: with UFFD_FEATURE_WP_ASYNC the kernel resolves write faults itself and marks the page
//!   written. Collect is PAGEMAP_SCAN with PAGE_IS_WRITTEN and PM_SCAN_WP_MATCHING, which reports
//!   and re-protects in one walk: collect and rearm are one step.
//! - sync: write faults are delivered to a handler thread that records the page and un-protects
//!   it (waking the vCPU). Collect takes the recorded set; rearm write-protects it again; the copy
//!   comes after the rearm.
//!
//! hugetlb memory is protected and reported per huge page (allowance `huge-granularity`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::{Allowance, KernelTime, PageSet, RearmKind, TrackCtx, TrackError, Tracker};
use crate::memory::Backing;
use crate::sys::pagemap::PagemapScanner;
use crate::sys::uffd;
use crate::vm::Vm;

/// One registered host range backing a slot.
#[derive(Debug, Clone, Copy)]
struct Range {
    slot: u32,
    start: u64,
    /// Bytes registered (the whole mapping).
    len: u64,
    /// 4 KiB pages of the slot.
    pages: u64,
    /// Protection unit in bytes (the huge page for hugetlb, else 4 KiB).
    unit: u64,
}

impl Range {
    fn slot_page(&self, addr: u64) -> Option<u64> {
        let page = addr.checked_sub(self.start)? / 4096;
        (page < self.pages).then_some(page)
    }
}

fn host(call: &'static str) -> impl FnOnce(std::io::Error) -> TrackError {
    move |source| TrackError::Host { call, source }
}

fn unit_of(backing: Backing) -> u64 {
    match backing {
        Backing::Hugetlb2M | Backing::Hugetlb1G | Backing::MemfdHugetlb2M => backing.page_bytes(),
        _ => 4096,
    }
}

/// Open a userfaultfd, handshake `features`, register and write-protect every slot's memory.
fn setup(vm: &Vm, slots: &[u32], features: u64) -> Result<(File, Vec<Range>), TrackError> {
    let fd = uffd::open().map_err(host("userfaultfd"))?;
    let api = uffd::api(&fd, features).map_err(host("UFFDIO_API"))?;
    if api.features & features != features {
        let missing = uffd::feature_names(features & !api.features);
        return Err(TrackError::Unsupported(format!(
            "userfaultfd lacks {}",
            missing.join(", ")
        )));
    }
    let mut ranges = Vec::new();
    for &slot in slots {
        let s = vm.slot(slot)?;
        let range = Range {
            slot,
            start: s.host_addr(),
            len: s.host_len(),
            pages: s.pages(),
            unit: unit_of(s.memory.backing()),
        };
        uffd::register(&fd, range.start, range.len, uffd::REGISTER_MODE_WP)
            .map_err(host("UFFDIO_REGISTER"))?;
        uffd::writeprotect(&fd, range.start, range.len, true)
            .map_err(host("UFFDIO_WRITEPROTECT"))?;
        ranges.push(range);
    }
    Ok((fd, ranges))
}

fn teardown(fd: &File, ranges: &[Range]) -> Result<(), TrackError> {
    for r in ranges {
        uffd::unregister(fd, r.start, r.len).map_err(host("UFFDIO_UNREGISTER"))?;
    }
    Ok(())
}

/// Features uffd-wp-sync asks for: write-protect, on shmem/hugetlb too, unpopulated pages
/// included (so pages never touched before tracking are protected as well).
pub const SYNC_FEATURES: u64 =
    uffd::FEATURE_WP | uffd::FEATURE_WP_HUGETLBFS_SHMEM | uffd::FEATURE_WP_UNPOPULATED;

/// Features uffd-wp-async asks for: those of the sync tracker plus `WP_ASYNC`.
pub const ASYNC_FEATURES: u64 = SYNC_FEATURES | uffd::FEATURE_WP_ASYNC;

/// userfaultfd async write-protect collected with PAGEMAP_SCAN.
#[derive(Debug, Default)]
pub struct UffdWpAsync {
    fd: Option<File>,
    ranges: Vec<Range>,
    scanner: Option<PagemapScanner>,
    time: KernelTime,
}

impl Tracker for UffdWpAsync {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        let (fd, ranges) = setup(vm, slots, ASYNC_FEATURES)?;
        self.scanner = Some(PagemapScanner::open(4096).map_err(host("open /proc/self/pagemap"))?);
        self.fd = Some(fd);
        self.ranges = ranges;
        Ok(())
    }

    fn collect(&mut self, _ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        let scanner = self
            .scanner
            .as_mut()
            .ok_or_else(|| TrackError::Setup("uffd-wp-async is not attached".into()))?;
        for r in &self.ranges {
            scanner
                .scan_written(r.start, r.start + r.len, true, |region| {
                    let mut addr = region.start;
                    while addr < region.end {
                        if let Some(page) = r.slot_page(addr) {
                            out.insert(r.slot, page);
                        }
                        addr += 4096;
                    }
                })
                .map_err(host("PAGEMAP_SCAN"))?;
        }
        Ok(())
    }

    fn rearm(&mut self, _ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        Ok(()) // PM_SCAN_WP_MATCHING re-protected during the collect.
    }

    fn detach(&mut self, _vm: &mut Vm) -> Result<(), TrackError> {
        if let Some(fd) = self.fd.take() {
            teardown(&fd, &self.ranges)?;
        }
        self.ranges.clear();
        self.scanner = None;
        Ok(())
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Atomic
    }

    fn allowances(&self) -> &'static [Allowance] {
        &[Allowance::HugeGranularity, Allowance::WrittenBeforeCopy]
    }

    fn reports_huge_units(&self) -> bool {
        true
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        let mut t = std::mem::take(&mut self.time);
        if let Some(scanner) = self.scanner.as_mut() {
            t.collect += scanner.take_kernel_time();
        }
        t
    }
}

/// State shared with the fault-handler thread.
#[derive(Debug, Default)]
struct Shared {
    dirty: Mutex<PageSet>,
    faults: AtomicU64,
    /// Why the handler stopped, when it failed.
    failed: Mutex<Option<String>>,
    stopping: AtomicBool,
    /// The handler unregistered every range after failing (nothing left to unregister).
    released: AtomicBool,
}

impl Shared {
    /// Record why the handler failed (the first reason stays; more detail is appended).
    fn fail(&self, why: &str) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match failed.as_mut() {
            Some(text) => {
                text.push_str("; ");
                text.push_str(why);
            }
            None => *failed = Some(why.to_string()),
        }
    }

    /// The handler's failure as an error. Every harvest checks it first: a handler that
    /// stopped resolves no more faults and records no more pages, so nothing collected after
    /// it can be trusted.
    fn check(&self) -> Result<(), TrackError> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match failed {
            None => Ok(()),
            Some(why) => Err(TrackError::Setup(format!(
                "uffd-wp-sync fault handler thread failed: {why} (tracking stopped: the writes it did not record are unaccounted for, so this trial has no verdict)"
            ))),
        }
    }

    /// Move the pages the handler recorded into `out`. A poisoned lock means the handler
    /// panicked while it held the set: an error, never "nothing dirty".
    fn take_dirty(&self, out: &mut PageSet) -> Result<(), TrackError> {
        let mut dirty = self.dirty.lock().map_err(|_| {
            TrackError::Setup(
                "uffd-wp-sync: the fault handler thread panicked while it held the set of faulted pages (lock poisoned); the pages it recorded are lost to this harvest".into(),
            )
        })?;
        out.union_with(&dirty);
        dirty.clear();
        Ok(())
    }
}

/// The handler thread's body: resolve faults until stopped. If it fails (an error or a
/// panic), a vCPU whose fault it did not resolve would stay blocked in the kernel until the
/// watchdog gave up and called that a kernel hazard. So the failure is recorded first (the
/// next collect, rearm or detach returns it as the harness error it is), then every range is
/// un-protected, unregistered and woken, so the blocked vCPUs' writes proceed unrecorded.
/// Where even that fails, the watchdog still bounds the wait, and the failure recorded here
/// says why.
fn handler_main(fd: &File, stop: &EventFd, ranges: &[Range], shared: &Shared) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        handle_faults(fd, stop, ranges, shared)
    }));
    let why = match result {
        Ok(Ok(())) => return,
        Ok(Err(why)) => why,
        Err(panic) => format!(
            "the handler thread panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into())
        ),
    };
    shared.fail(&why);
    let mut released = true;
    for r in ranges {
        // Un-protect (which wakes the waiters), unregister, and wake whoever is left: a woken
        // vCPU retries its write on a page no longer protected. The first call fails when
        // un-protecting is what broke; the unregister still lifts the protection.
        let _ = uffd::writeprotect(fd, r.start, r.len, false);
        let steps = uffd::unregister(fd, r.start, r.len)
            .map_err(|e| format!("UFFDIO_UNREGISTER: {e}"))
            .and_then(|()| uffd::wake(fd, r.start, r.len).map_err(|e| format!("UFFDIO_WAKE: {e}")));
        if let Err(e) = steps {
            released = false;
            shared.fail(&format!(
                "releasing the blocked vCPUs failed ({e} on {:#x}+{:#x}): a vCPU may stay blocked until the watchdog stops it",
                r.start, r.len
            ));
        }
    }
    if released {
        shared.released.store(true, Ordering::Release);
        shared.fail("every range was unregistered and its waiters woken to release the vCPUs");
    }
}

/// Start the handler thread for `ranges` on `fd`; returns its thread id with it.
fn spawn_handler(
    fd: &Arc<File>,
    ranges: &Arc<Vec<Range>>,
    shared: &Arc<Shared>,
    stop: &EventFd,
) -> Result<(JoinHandle<()>, Option<i32>), TrackError> {
    let stop_thread = stop.try_clone().map_err(|e| host("eventfd dup")(e))?;
    let (t_fd, t_ranges, t_shared) = (Arc::clone(fd), Arc::clone(ranges), Arc::clone(shared));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("uffd-wp-handler".into())
        .spawn(move || {
            let tid = crate::sys::kick::current_tid();
            crate::vcpu::register_tid(tid);
            let _ = tid_tx.send(tid);
            handler_main(&t_fd, &stop_thread, &t_ranges, &t_shared);
        })
        .map_err(host("spawn uffd handler"))?;
    Ok((thread, tid_rx.recv().ok()))
}

/// userfaultfd write-protect with a handler thread resolving each fault.
#[derive(Debug, Default)]
pub struct UffdWpSync {
    fd: Option<Arc<File>>,
    ranges: Arc<Vec<Range>>,
    shared: Arc<Shared>,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
    collected: PageSet,
    time: KernelTime,
}

/// The handler: wait for faults or the stop event; record each faulting page (its whole
/// protection unit) and un-protect it, which wakes the faulting vCPU.
fn handle_faults(
    fd: &File,
    stop: &EventFd,
    ranges: &[Range],
    shared: &Shared,
) -> Result<(), String> {
    let mut faults = Vec::new();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs and its length is passed with it.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll: {e}"));
        }
        if fds[1].revents != 0 || shared.stopping.load(Ordering::Acquire) {
            return Ok(());
        }
        faults.clear();
        uffd::read_faults(fd, &mut faults).map_err(|e| format!("read userfaultfd: {e}"))?;
        for f in &faults {
            let Some(r) = ranges
                .iter()
                .find(|r| f.address >= r.start && f.address < r.start + r.len)
            else {
                return Err(format!(
                    "fault at {:#x} outside every registered range",
                    f.address
                ));
            };
            if f.flags & uffd::PAGEFAULT_FLAG_WP == 0 {
                return Err(format!(
                    "fault at {:#x} is not a write-protect fault (flags {:#x})",
                    f.address, f.flags
                ));
            }
            // Record and un-protect under the lock collect takes, so no collect falls between
            // them. Recording after un-protecting would let the woken vCPU run on to its next
            // sync point before the record (a stepped collect misses the page); recording
            // before un-protecting without the lock would let a whole harvest (collect,
            // re-protect, copy) run before the vCPU's write lands, leaving the page writable
            // with that write in neither the copy nor the log.
            let unit_start = f.address & !(r.unit - 1);
            let mut dirty = shared
                .dirty
                .lock()
                .map_err(|_| {
                    format!(
                        "recording the fault at {:#x}: the set of faulted pages is poisoned (a panic while it was held)",
                        f.address
                    )
                })?;
            let mut addr = unit_start;
            while addr < unit_start + r.unit {
                if let Some(page) = r.slot_page(addr) {
                    dirty.insert(r.slot, page);
                }
                addr += 4096;
            }
            uffd::writeprotect(fd, unit_start, r.unit, false)
                .map_err(|e| format!("UFFDIO_WRITEPROTECT (unprotect {unit_start:#x}): {e}"))?;
            drop(dirty);
            shared.faults.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Tracker for UffdWpSync {
    fn attach(&mut self, vm: &mut Vm, slots: &[u32]) -> Result<(), TrackError> {
        let (fd, ranges) = setup(vm, slots, SYNC_FEATURES)?;
        let fd = Arc::new(fd);
        let ranges = Arc::new(ranges);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| host("eventfd")(e))?;
        let shared = Arc::new(Shared::default());
        let (thread, tid) = spawn_handler(&fd, &ranges, &shared, &stop)?;
        // The handler's kernel log lines (it resolves the faults) belong to this trial.
        if let Some(tid) = tid {
            crate::vcpu::note_tids([tid]);
        }
        self.fd = Some(fd);
        self.ranges = ranges;
        self.shared = shared;
        self.stop = Some(stop);
        self.thread = Some(thread);
        Ok(())
    }

    fn collect(&mut self, _ctx: &TrackCtx<'_>, out: &mut PageSet) -> Result<(), TrackError> {
        self.shared.check()?;
        self.collected.clear();
        self.shared.take_dirty(&mut self.collected)?;
        out.union_with(&self.collected);
        Ok(())
    }

    fn rearm(&mut self, _ctx: &TrackCtx<'_>) -> Result<(), TrackError> {
        self.shared.check()?;
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| TrackError::Setup("uffd-wp-sync is not attached".into()))?;
        // Re-protect runs of collected units with one call each; every call is kernel time.
        let mut calls: Vec<(u64, u64)> = Vec::new();
        for r in self.ranges.iter() {
            let units = r.unit / 4096;
            let mut run: Option<(u64, u64)> = None;
            let mut unit = 0;
            while unit * units < r.pages {
                let hit = (0..units).any(|i| self.collected.contains(r.slot, unit * units + i));
                match (hit, run) {
                    (true, None) => run = Some((unit, unit + 1)),
                    (true, Some((s, _))) => run = Some((s, unit + 1)),
                    (false, Some((s, e))) => {
                        calls.push((r.start + s * r.unit, (e - s) * r.unit));
                        run = None;
                    }
                    (false, None) => {}
                }
                unit += 1;
            }
            if let Some((s, e)) = run {
                calls.push((r.start + s * r.unit, (e - s) * r.unit));
            }
        }
        for (start, len) in calls {
            self.time
                .rearm(|| uffd::writeprotect(fd.as_ref(), start, len, true))
                .map_err(host("UFFDIO_WRITEPROTECT"))?;
        }
        Ok(())
    }

    fn detach(&mut self, _vm: &mut Vm) -> Result<(), TrackError> {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            self.shared
                .fail("the handler thread panicked outside its fault loop");
        }
        if let Some(fd) = self.fd.take()
            && !self.shared.released.load(Ordering::Acquire)
        {
            teardown(&fd, &self.ranges)?;
        }
        // A failure after the last collect still voids the trial.
        self.shared.check()
    }

    fn rearm_kind(&self) -> RearmKind {
        RearmKind::Separate { skip_loses: true }
    }

    fn allowances(&self) -> &'static [Allowance] {
        &[Allowance::HugeGranularity, Allowance::WrittenBeforeCopy]
    }

    fn failure(&self) -> Option<String> {
        self.shared.check().err().map(|e| e.to_string())
    }

    fn evidence(&self) -> Vec<String> {
        vec![format!(
            "{} write-protect faults resolved by the handler thread",
            self.shared.faults.load(Ordering::Relaxed)
        )]
    }

    fn reports_huge_units(&self) -> bool {
        true
    }

    fn take_kernel_time(&mut self) -> KernelTime {
        std::mem::take(&mut self.time)
    }
}

impl Drop for UffdWpSync {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(stop) = self.stop.take() {
            let _ = stop.write(1);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests;
