//! vCPUs: the exit protocol and the watchdog.
//!
//! A guest talks to the host only through doorbell writes (KVM_EXIT_MMIO at
//! [`DOORBELL_GPA`]): `SYNC` ends a run segment at a sync point, `DONE` ends the program.
//! Everything else is unexplained; more than [`RunLimits::exit_storm`] unexplained exits in one
//! segment is a livelock.
//!
//! Every `KVM_RUN` is bounded. A group of vCPUs runs on the machine's persistent vCPU threads
//! (one per vCPU, parked between segments: see [`VcpuThreads`]) while a watchdog waits for them;
//! past the deadline it sets `immediate_exit` for each vCPU still running and sends it the kick
//! signal, every few milliseconds until the thread reports back (so a signal that lands just
//! before the thread re-enters `KVM_RUN` is not lost). A kicked vCPU returns a [`RunFailure`]
//! naming the vCPU, the last exit, the PC and how long it ran.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use trackcheck_guests::layout::{DOORBELL_GPA, doorbell};

use crate::arch;
use crate::host::BackendKind;
use crate::sys::stats::{StatsFd, StatsSnapshot};
use crate::sys::{errno_text, kick};

mod failure;
mod pool;
pub use failure::{FailureKind, RunFailure, X86_RESET_RIP, shutdown_text};
pub use pool::{GroupMonitor, VcpuThreads};

/// How a run segment ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest reached `Sync(n)`.
    Sync(u32),
    /// The guest finished; `last_seq` is its last write's sequence number.
    Done {
        /// Last sequence number used.
        last_seq: u64,
    },
    /// KVM_EXIT_DIRTY_RING_FULL: the vCPU's dirty ring passed its soft limit mid-segment; it
    /// cannot run again until the rings are collected and reset.
    RingFull,
}

/// Bounds on one run segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunLimits {
    /// Longest a segment may take before the watchdog kicks the vCPU out.
    pub watchdog: Duration,
    /// Most unexplained exits (not a doorbell) in one segment before it counts as a livelock.
    pub exit_storm: u64,
    /// On KVM_EXIT_DIRTY_RING_FULL, wait up to this long for the host to reset the rings and run
    /// on (concurrent runs, where the host harvests meanwhile) instead of returning
    /// [`Stop::RingFull`] at once. A vCPU still ring-full after the wait returns `RingFull`: KVM
    /// will not let it run although the host kept resetting.
    pub ring_full_wait: Option<Duration>,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self {
            watchdog: Duration::from_secs(20),
            exit_storm: 10_000,
            ring_full_wait: None,
        }
    }
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    id: usize,
    fd: VcpuFd,
    /// The backend it runs on (what a shutdown means, see [`RunFailure::pc_is_reset_state`]).
    backend: BackendKind,
    stats: Option<StatsFd>,
    /// Where `insn_emulation` and `exits` are in the stats (for [`Vcpu::mode_counters`]).
    mode_at: [Option<(u64, u16)>; 2],
    /// KVM_EXIT_DIRTY_RING_FULL exits waited out, shared with whoever holds
    /// [`Vcpu::ring_full_counter`] (the host reads it while this vCPU runs on its own thread).
    ring_full_exits: Arc<AtomicU64>,
    /// The entry point last set with [`Vcpu::restart_at`].
    entry: Option<arch::Entry>,
    /// The vCPU is still exactly as `restart_at(entry)` left it: it has not run and its fd has
    /// not been handed out since (anyone holding the fd may have changed its registers).
    at_entry: AtomicBool,
}

/// Per-vCPU state shared with the watchdog.
#[derive(Debug, Default)]
struct Kick {
    requested: AtomicBool,
    started: AtomicBool,
    thread: AtomicU64,
    tid: AtomicI32,
}

thread_local! {
    /// Kernel thread ids of the vCPU threads started from this thread, while collecting.
    static TID_SINK: RefCell<Option<Vec<i32>>> = const { RefCell::new(None) };
}

/// Run `f`, collecting the kernel thread ids of every vCPU thread it starts, plus this
/// thread's own: a kernel log line naming one of them (`PID: n`) belongs to `f`'s work.
pub fn collect_tids<R>(f: impl FnOnce() -> R) -> (R, Vec<i32>) {
    let me = kick::current_tid();
    register_tid(me);
    let outer = TID_SINK.with(|s| s.borrow_mut().replace(vec![me]));
    let r = f();
    let tids = TID_SINK
        .with(|s| std::mem::replace(&mut *s.borrow_mut(), outer))
        .unwrap_or_default();
    (r, tids)
}

/// Kernel thread ids of every thread the harness started or ran a trial on, in this process.
static HARNESS_TIDS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// Record `tid` as a harness thread (see [`is_harness_tid`]).
pub fn register_tid(tid: i32) {
    if let Ok(mut tids) = HARNESS_TIDS.lock() {
        tids.insert(tid);
    }
}

/// Whether `tid` is (or was) a thread of this harness: a kernel log line naming a harness
/// thread that is not a trial's own belongs to another trial; one naming any other task (a
/// kworker, another process) may belong to anyone.
#[must_use]
pub fn is_harness_tid(tid: i32) -> bool {
    HARNESS_TIDS.lock().is_ok_and(|tids| tids.contains(&tid))
}

/// Add `tids` (threads started for the current `collect_tids` call) to its collection.
pub(crate) fn note_tids(tids: impl IntoIterator<Item = i32>) {
    TID_SINK.with(|s| {
        if let Some(sink) = s.borrow_mut().as_mut() {
            sink.extend(tids);
        }
    });
}

/// What the vCPU thread saw on one exit, with the borrow of the run struct released.
enum Seen {
    Stop(Stop),
    Unexplained(String),
    Fail(FailureKind, String),
    Interrupted,
}

impl Vcpu {
    /// Wrap vCPU fd `fd` with index `id`, running on `backend`.
    #[must_use]
    pub fn new(id: usize, fd: VcpuFd, backend: BackendKind) -> Self {
        let stats = StatsFd::open(&fd, &format!("vCPU {id}")).ok();
        let locate = |name| stats.as_ref().and_then(|s| s.locate(name));
        let mode_at = [locate("insn_emulation"), locate("exits")];
        Self {
            id,
            fd,
            backend,
            stats,
            mode_at,
            ring_full_exits: Arc::new(AtomicU64::new(0)),
            entry: None,
            at_entry: AtomicBool::new(false),
        }
    }

    /// KVM_EXIT_DIRTY_RING_FULL exits waited out so far (with `ring_full_wait`), over every run
    /// segment since this vCPU was made. An exit that ends a segment as [`Stop::RingFull`] is
    /// returned as that stop, not counted here.
    #[must_use]
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits.load(Ordering::Relaxed)
    }

    /// The counter behind [`Vcpu::ring_full_exits`], to read from another thread while this
    /// vCPU runs. The vCPU thread adds one right after each exit it decides to wait out: a read
    /// may lag the latest such exit by a moment, never run ahead of it.
    #[must_use]
    pub fn ring_full_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.ring_full_exits)
    }

    /// Index.
    #[must_use]
    pub fn id(&self) -> usize {
        self.id
    }

    /// The fd, for register setup (the vCPU then no longer counts as at its entry point).
    #[must_use]
    pub fn fd(&self) -> &VcpuFd {
        self.at_entry.store(false, Ordering::Relaxed);
        &self.fd
    }

    /// The fd, mutably (KVM_RUN outside a run group: the raw-ioctl floor).
    pub(crate) fn fd_mut(&mut self) -> &mut VcpuFd {
        *self.at_entry.get_mut() = false;
        &mut self.fd
    }

    /// Settle the vCPU (see [`Vcpu::settle`]) and put it at `entry`. Nothing to do (no ioctl)
    /// when the vCPU is still as the previous `restart_at(entry)` with the same entry left it:
    /// it has not run since and nobody was given its fd, so KVM has changed none of its state.
    pub(crate) fn restart_at(&mut self, entry: arch::Entry) -> Result<(), String> {
        if *self.at_entry.get_mut() && self.entry == Some(entry) {
            return Ok(());
        }
        *self.at_entry.get_mut() = false;
        self.settle();
        arch::set_entry(&self.fd, entry)?;
        self.entry = Some(entry);
        *self.at_entry.get_mut() = true;
        Ok(())
    }

    /// One bare pread of the binary stats into `buf` (the raw-ioctl floor); false if there is
    /// no stats fd or the read failed.
    pub(crate) fn read_stats_raw(&self, buf: &mut [u8]) -> bool {
        self.stats.as_ref().is_some_and(|s| s.read_raw(buf))
    }

    /// `insn_emulation` and `exits` now (None where the kernel has no such statistic or the
    /// read failed): the two counters the execution-mode evidence needs, with one pread and no
    /// allocation.
    #[must_use]
    pub fn mode_counters(&self) -> [Option<u64>; 2] {
        let mut out = [None; 2];
        if let Some(s) = &self.stats {
            s.read_sums(&self.mode_at, &mut out);
        }
        out
    }

    /// Binary stats now (empty if the kernel has no stats fd).
    #[must_use]
    pub fn stats(&self) -> StatsSnapshot {
        self.stats
            .as_ref()
            .and_then(|s| s.snapshot().ok())
            .unwrap_or_default()
    }

    /// Enter KVM_RUN once with `immediate_exit` set, so any I/O the last exit left pending is
    /// completed before registers are replaced.
    pub fn settle(&mut self) {
        *self.at_entry.get_mut() = false;
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    fn see(&mut self) -> Seen {
        match self.fd.run() {
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let mut bytes = [0u8; 8];
                let n = data.len().min(8);
                bytes[..n].copy_from_slice(&data[..n]);
                let value = u64::from_le_bytes(bytes);
                if addr == DOORBELL_GPA + doorbell::SYNC {
                    Seen::Stop(Stop::Sync(u32::try_from(value).unwrap_or(u32::MAX)))
                } else if addr == DOORBELL_GPA + doorbell::DONE {
                    Seen::Stop(Stop::Done { last_seq: value })
                } else {
                    Seen::Unexplained(format!("MMIO write {addr:#x} value {value:#x}"))
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                data.fill(0);
                Seen::Unexplained(format!("MMIO read {addr:#x}"))
            }
            Ok(VcpuExit::IoOut(port, _)) => Seen::Unexplained(format!("port write {port:#x}")),
            Ok(VcpuExit::IoIn(port, data)) => {
                data.fill(0);
                Seen::Unexplained(format!("port read {port:#x}"))
            }
            Ok(VcpuExit::Intr) => Seen::Interrupted,
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                Seen::Stop(Stop::RingFull)
            }
            Ok(VcpuExit::Shutdown) => Seen::Fail(FailureKind::Shutdown, "SHUTDOWN".into()),
            // arm64: PSCI SYSTEM_OFF / SYSTEM_RESET (the guest's way to stop for good).
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                Seen::Fail(FailureKind::Shutdown, format!("SYSTEM_EVENT type {kind}"))
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
                // member the kernel filled in.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Seen::Fail(
                    FailureKind::InternalError { suberror },
                    "INTERNAL_ERROR".into(),
                )
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                Seen::Fail(FailureKind::FailEntry { reason }, "FAIL_ENTRY".into())
            }
            Ok(other) => {
                let name = format!("{other:?}");
                Seen::Fail(FailureKind::Unexpected, name)
            }
            Err(e) if e.errno() == libc::EINTR => Seen::Interrupted,
            Err(e) if e.errno() == libc::EAGAIN => Seen::Unexplained("EAGAIN".into()),
            Err(e) => Seen::Fail(
                FailureKind::Ioctl {
                    text: errno_text(e.errno()),
                },
                "KVM_RUN error".into(),
            ),
        }
    }

    fn run_to_stop(&mut self, limits: RunLimits, kick: &Kick) -> Result<Stop, RunFailure> {
        *self.at_entry.get_mut() = false;
        let start = Instant::now();
        let mut exits = 0u64;
        let mut unexplained = 0u64;
        let mut last_exit = String::from("none");
        let mut ring_full_since: Option<Instant> = None;
        loop {
            if kick.requested.load(Ordering::Acquire) {
                self.fd.set_kvm_immediate_exit(1);
            }
            let seen = self.see();
            exits += 1;
            if !matches!(seen, Seen::Stop(Stop::RingFull)) {
                ring_full_since = None;
            }
            let kind = match seen {
                Seen::Stop(Stop::RingFull)
                    if limits.ring_full_wait.is_some_and(|w| {
                        ring_full_since.get_or_insert_with(Instant::now).elapsed() < w
                    }) =>
                {
                    // The host resets the rings concurrently; KVM exits again at once while the
                    // ring is still full, so back off briefly instead of spinning.
                    self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                Seen::Stop(stop) => return Ok(stop),
                Seen::Unexplained(what) => {
                    last_exit = what;
                    unexplained += 1;
                    if unexplained < limits.exit_storm {
                        continue;
                    }
                    FailureKind::ExitStorm { count: unexplained }
                }
                Seen::Interrupted => {
                    if !kick.requested.load(Ordering::Acquire) {
                        continue; // a stray signal: run on
                    }
                    self.fd.set_kvm_immediate_exit(0);
                    FailureKind::Watchdog {
                        limit: limits.watchdog,
                    }
                }
                Seen::Fail(kind, what) => {
                    last_exit = what;
                    kind
                }
            };
            let (pc, cpl) = arch::pc_and_cpl(&self.fd).unzip();
            return Err(RunFailure {
                vcpu: self.id,
                kind,
                backend: self.backend,
                pc,
                cpl,
                last_exit,
                exits,
                elapsed: start.elapsed(),
                context: String::new(),
            });
        }
    }
}

/// Run every vCPU in `vcpus` until it rings a doorbell or fails, on `threads` (the machine's
/// persistent vCPU threads), while `host` runs on the calling thread (use it to harvest
/// concurrently). Returns `host`'s result and one result per vCPU, in order.
pub fn run_group<R>(
    threads: &mut VcpuThreads,
    vcpus: &mut [&mut Vcpu],
    limits: RunLimits,
    host: impl FnOnce(&GroupMonitor<'_>) -> R,
) -> (R, Vec<Result<Stop, RunFailure>>) {
    threads.run_with(vcpus, limits, host)
}
