//! vCPU threads that live as long as their machine: one per vCPU, started on its first run,
//! parked on a condition variable between run segments, joined when the machine is dropped.
//!
//! A run hands each selected worker a pointer to its [`Vcpu`] and waits, in every case (a
//! panic in the host's closure included), until each has reported back; only then does the
//! borrow end. The watchdog is the waiting thread itself: past the deadline it sets
//! `immediate_exit` for each vCPU still running and sends its thread the kick signal, every few
//! milliseconds until the thread reports back. While a host closure runs alongside the vCPUs
//! (concurrent harvests), a scoped watchdog thread does the same until the closure returns.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys::kick;

use super::{FailureKind, Kick, RunFailure, RunLimits, Stop, Vcpu, note_tids, register_tid};

const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// A vCPU handed to a worker for one run.
struct VcpuPtr(*mut Vcpu);

// SAFETY: `Vcpu` is `Send` (it owns its fd and plain data); the pointer is dereferenced only by
// the one worker it was handed to, while the run that handed it holds the `&mut Vcpu` and waits
// for that worker to report back (see `VcpuThreads::run_with`).
unsafe impl Send for VcpuPtr {}

enum Job {
    Idle,
    Run(VcpuPtr, RunLimits),
    Quit,
}

struct Shared {
    job: Mutex<Job>,
    wake: Condvar,
    kick: Kick,
}

/// Where a worker is in the current run.
#[derive(Debug, Default)]
enum Slot {
    /// Not part of this run.
    #[default]
    Idle,
    /// Handed a vCPU; has not reported back.
    Running,
    /// Reported back; the worker no longer touches the vCPU.
    Done(Result<Stop, RunFailure>),
}

#[derive(Debug, Default)]
struct GroupInner {
    slots: Vec<Slot>,
    /// The host closure of the current run has returned (ends the scoped watchdog).
    host_done: bool,
}

/// The run state every worker reports into.
#[derive(Debug, Default)]
pub(super) struct Group {
    inner: Mutex<GroupInner>,
    changed: Condvar,
}

impl Group {
    fn lock(&self) -> MutexGuard<'_, GroupInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the host closure of a run can see while the vCPUs run.
#[derive(Debug)]
pub struct GroupMonitor<'a> {
    group: &'a Group,
}

impl GroupMonitor<'_> {
    /// How many vCPUs have not reported back yet.
    #[must_use]
    pub fn running(&self) -> usize {
        self.group
            .lock()
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Running))
            .count()
    }
}

struct Worker {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("tid", &self.shared.kick.tid.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The persistent vCPU threads of one machine (see the module docs).
#[derive(Debug)]
pub struct VcpuThreads {
    workers: Vec<Option<Worker>>,
    group: Arc<Group>,
    /// Worker indices of the current run (kept to avoid an allocation per run).
    which: Vec<usize>,
}

impl VcpuThreads {
    /// Room for `vcpus` workers (vCPU ids `0..vcpus`); none is started yet.
    #[must_use]
    pub fn new(vcpus: usize) -> Self {
        let group = Group::default();
        group.lock().slots.resize_with(vcpus, Slot::default);
        Self {
            workers: (0..vcpus).map(|_| None).collect(),
            group: Arc::new(group),
            which: Vec::with_capacity(vcpus),
        }
    }

    /// Kernel thread ids of the started workers.
    pub fn tids(&self) -> impl Iterator<Item = i32> + '_ {
        self.workers
            .iter()
            .flatten()
            .map(|w| w.shared.kick.tid.load(Ordering::Acquire))
            .filter(|&t| t != 0)
    }

    fn start(&mut self, index: usize) -> Result<(), String> {
        if self.workers.len() <= index {
            self.workers.resize_with(index + 1, || None);
            self.group
                .lock()
                .slots
                .resize_with(index + 1, Slot::default);
        }
        if self.workers[index].is_none() {
            let shared = Arc::new(Shared {
                job: Mutex::new(Job::Idle),
                wake: Condvar::new(),
                kick: Kick::default(),
            });
            let (s, group) = (Arc::clone(&shared), Arc::clone(&self.group));
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || worker_main(&s, &group, index))
                .map_err(|e| format!("starting the vCPU thread: {e}"))?;
            self.workers[index] = Some(Worker {
                shared,
                handle: Some(handle),
            });
        }
        Ok(())
    }

    /// Hand each vCPU to its worker; the vCPUs whose worker could not be started, with why.
    fn dispatch(&mut self, vcpus: &mut [&mut Vcpu], limits: RunLimits) -> Vec<(usize, RunFailure)> {
        let mut early = Vec::new();
        self.which.clear();
        for (pos, vcpu) in vcpus.iter_mut().enumerate() {
            let index = vcpu.id;
            if let Err(text) = self.start(index) {
                early.push((pos, thread_failure(vcpu, text)));
                continue;
            }
            let Some(worker) = self.workers[index].as_ref() else {
                continue;
            };
            worker.shared.kick.requested.store(false, Ordering::Release);
            self.group.lock().slots[index] = Slot::Running;
            let mut job = worker
                .shared
                .job
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *job = Job::Run(VcpuPtr(std::ptr::from_mut(&mut **vcpu)), limits);
            drop(job);
            worker.shared.wake.notify_one();
            self.which.push(index);
        }
        early
    }

    /// Run every vCPU in `vcpus` until it rings a doorbell or fails, each on its own worker,
    /// while `host` runs on the calling thread (use it to harvest concurrently). Returns
    /// `host`'s result and one result per vCPU, in order.
    pub fn run_with<R>(
        &mut self,
        vcpus: &mut [&mut Vcpu],
        limits: RunLimits,
        host: impl FnOnce(&GroupMonitor<'_>) -> R,
    ) -> (R, Vec<Result<Stop, RunFailure>>) {
        let early = self.dispatch(vcpus, limits);
        self.group.lock().host_done = false;
        let deadline = Instant::now() + limits.watchdog;
        // From here every handed-out vCPU is waited for, even if `host` panics.
        let waiter = Waiter {
            threads: self,
            deadline,
        };
        let monitor = GroupMonitor {
            group: &waiter.threads.group,
        };
        let r = std::thread::scope(|scope| {
            let threads = &*waiter.threads;
            scope.spawn(move || threads.watch(deadline, true));
            let _done = HostDone(&threads.group);
            host(&monitor)
        });
        drop(waiter);
        let mut results = self.collect(vcpus);
        for (pos, failure) in early {
            results[pos] = Err(failure);
        }
        (r, results)
    }

    /// [`VcpuThreads::run_with`] with nothing running alongside: the calling thread is the
    /// watchdog, no other thread is started.
    pub fn run(
        &mut self,
        vcpus: &mut [&mut Vcpu],
        limits: RunLimits,
    ) -> Vec<Result<Stop, RunFailure>> {
        let early = self.dispatch(vcpus, limits);
        drop(Waiter {
            threads: self,
            deadline: Instant::now() + limits.watchdog,
        });
        let mut results = self.collect(vcpus);
        for (pos, failure) in early {
            results[pos] = Err(failure);
        }
        results
    }

    /// Take each vCPU's result (every worker has reported back).
    fn collect(&self, vcpus: &[&mut Vcpu]) -> Vec<Result<Stop, RunFailure>> {
        let mut g = self.group.lock();
        let results = vcpus
            .iter()
            .map(|v| match std::mem::take(&mut g.slots[v.id]) {
                Slot::Done(r) => r,
                Slot::Idle | Slot::Running => {
                    Err(thread_failure(v, "vCPU thread did not report".into()))
                }
            })
            .collect();
        drop(g);
        note_tids(
            self.which
                .iter()
                .filter_map(|&i| self.workers.get(i).and_then(Option::as_ref))
                .map(|w| w.shared.kick.tid.load(Ordering::Acquire))
                .filter(|&t| t != 0),
        );
        results
    }

    /// Wait until every worker of this run reported back (or, with `until_host`, the host
    /// closure returned), kicking the ones still running once `deadline` has passed.
    fn watch(&self, deadline: Instant, until_host: bool) {
        let signal_ok = kick::signal().is_ok();
        let mut g = self.group.lock();
        loop {
            if self
                .which
                .iter()
                .all(|&i| !matches!(g.slots[i], Slot::Running))
                || (until_host && g.host_done)
            {
                return;
            }
            let now = Instant::now();
            let wait = if now < deadline {
                deadline - now
            } else {
                for &i in &self.which {
                    let Some(w) = self.workers.get(i).and_then(Option::as_ref) else {
                        continue;
                    };
                    if matches!(g.slots[i], Slot::Running) {
                        let k = &w.shared.kick;
                        k.requested.store(true, Ordering::Release);
                        if signal_ok && k.started.load(Ordering::Acquire) {
                            // SAFETY: the worker stored its own id before setting `started`,
                            // and it is joined only when `self` is dropped, which cannot
                            // happen while `self` is borrowed here.
                            let _ = unsafe { kick::kick(k.thread.load(Ordering::Acquire)) };
                        }
                    }
                }
                KICK_INTERVAL
            };
            g = match self.group.changed.wait_timeout(g, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Waits (as the watchdog) for every worker of the run when dropped, also while unwinding.
struct Waiter<'a> {
    threads: &'a mut VcpuThreads,
    deadline: Instant,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.threads.watch(self.deadline, false);
    }
}

/// Marks the host closure done when dropped (also while unwinding), ending the scoped watchdog.
struct HostDone<'a>(&'a Group);

impl Drop for HostDone<'_> {
    fn drop(&mut self) {
        self.0.lock().host_done = true;
        self.0.changed.notify_all();
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        for w in self.workers.iter_mut().flatten() {
            *w.shared
                .job
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Job::Quit;
            w.shared.wake.notify_one();
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

fn thread_failure(vcpu: &Vcpu, text: String) -> RunFailure {
    RunFailure {
        vcpu: vcpu.id,
        kind: FailureKind::Ioctl { text },
        backend: vcpu.backend,
        pc: None,
        cpl: None,
        last_exit: "none".into(),
        exits: 0,
        elapsed: Duration::ZERO,
        context: String::new(),
    }
}

fn worker_main(shared: &Shared, group: &Group, index: usize) {
    let k = &shared.kick;
    k.thread.store(kick::current_thread(), Ordering::Release);
    let tid = kick::current_tid();
    register_tid(tid);
    k.tid.store(tid, Ordering::Release);
    k.started.store(true, Ordering::Release);
    loop {
        let job = {
            let mut job = shared
                .job
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while matches!(*job, Job::Idle) {
                job = shared
                    .wake
                    .wait(job)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            std::mem::replace(&mut *job, Job::Idle)
        };
        let (ptr, limits) = match job {
            Job::Run(ptr, limits) => (ptr, limits),
            Job::Idle | Job::Quit => return,
        };
        // SAFETY: the run that handed out `ptr` holds the `&mut Vcpu` it came from and does not
        // return (nor unwind past its `Waiter`) before this worker stores its result below;
        // nothing else uses the vCPU meanwhile, and this worker does not touch it afterwards.
        let vcpu = unsafe { &mut *ptr.0 };
        let result = catch_unwind(AssertUnwindSafe(|| vcpu.run_to_stop(limits, k)))
            .unwrap_or_else(|_| Err(thread_failure(vcpu, "vCPU thread panicked".into())));
        let mut g = group.lock();
        g.slots[index] = Slot::Done(result);
        // Waiters wait for the whole group (or a deadline): wake them for the last one only.
        let last = !g.slots.iter().any(|s| matches!(s, Slot::Running));
        drop(g);
        if last {
            group.changed.notify_all();
        }
    }
}
