//! Running programs: loading compiled code and putting vCPUs at their entry points, run
//! segments (every ready vCPU to its next stop, with the host's work alongside through a
//! [`RunView`]), the state of each vCPU in its program, and its published progress.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use trackcheck_guests::Program;
use trackcheck_guests::compiled::{Compiled, StoreForm};
use trackcheck_guests::layout::{PAGE_SIZE, SYSTEM_GPA, control};
use trackcheck_guests::native::compile_for;

use crate::arch::{self, Entry};
use crate::memory::GuestMemory;
use crate::mode;
use crate::sys::dirty::DirtyRing;
use crate::track::{TrackCtx, TrackSource};
use crate::vcpu::{GroupMonitor, RunFailure, Stop, Vcpu};
use crate::vm::{Vm, VmError};

use super::slots::{CONTROL_SLOT, SYSTEM_SLOT, control_field, fixed_slot};
use super::{Machine, MachineError};

/// Where a vCPU is in its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// No program for this vCPU.
    Idle,
    /// Runnable: at its entry point, or stopped at `Sync(n)` (`Some(n)`).
    Ready(Option<u32>),
    /// Finished its program.
    Done {
        /// Last sequence number used.
        last_seq: u64,
    },
    /// Failed a run segment; needs a restart.
    Failed,
}

/// What the host sees while vCPUs run (see [`Machine::run_with`]).
#[derive(Debug)]
pub struct RunView<'a> {
    vm: &'a Vm,
    data: &'a GuestMemory,
    rings: &'a [DirtyRing],
    ring_full: &'a [Arc<AtomicU64>],
    monitor: &'a GroupMonitor<'a>,
}

impl TrackSource for RunView<'_> {
    fn track_ctx(&self) -> TrackCtx<'_> {
        TrackCtx {
            vm: self.vm,
            rings: self.rings,
        }
    }
}

impl RunView<'_> {
    /// The VM (for harvesting while the vCPUs run).
    #[must_use]
    pub fn vm(&self) -> &Vm {
        self.vm
    }

    /// The data region's memory.
    #[must_use]
    pub fn data(&self) -> &GuestMemory {
        self.data
    }

    /// Turn dirty logging of data slot `slot` on or off while the vCPUs run.
    pub fn set_dirty_logging(&self, slot: u32, on: bool) -> Result<(), VmError> {
        self.vm.set_dirty_logging(slot, on)
    }

    /// Sequence number of `vcpu`'s last completed write (acquire).
    #[must_use]
    pub fn progress(&self, vcpu: usize) -> u64 {
        control_field(self.vm, vcpu, control::PROGRESS)
    }

    /// Ask every `UntilStopped` loop of `vcpu` to end at its next page.
    pub fn request_stop(&self, vcpu: usize) {
        fixed_slot(self.vm, CONTROL_SLOT).store_release(vcpu as u64 * PAGE_SIZE + control::STOP, 1);
    }

    /// KVM_EXIT_DIRTY_RING_FULL exits vCPU `vcpu` (the machine's index) has waited out so far,
    /// read while it runs: since the machine was made, this run's included (the same count as
    /// [`Machine::vcpu_ring_full_exits`]). Only exits waited out with
    /// `RunLimits::ring_full_wait` count; one that ends the segment comes back as
    /// [`Stop::RingFull`]. The vCPU thread adds each exit just after taking it, so the value
    /// may lag the latest exit by a moment but never runs ahead: a host that sees it grow knows
    /// the vCPU hit a full ring since its previous read.
    ///
    /// # Panics
    /// If the machine has no vCPU `vcpu`.
    #[must_use]
    pub fn ring_full_exits(&self, vcpu: usize) -> u64 {
        self.ring_full[vcpu].load(Ordering::Relaxed)
    }

    /// vCPUs that have not come back from this run yet.
    #[must_use]
    pub fn running(&self) -> usize {
        self.monitor.running()
    }
}

impl Machine {
    /// Make every vCPU drop its cached translations (KVM_SET_SREGS toggling CR4.PGE and back,
    /// which resets KVM's MMU for the vCPU): what a guest that cannot flush its own TLB needs
    /// after its page tables changed. The vCPUs must be stopped.
    pub fn reset_guest_mmu(&self) -> Result<(), MachineError> {
        for (v, vcpu) in self.vcpus.iter().enumerate() {
            arch::reset_mmu(vcpu.fd()).map_err(|text| MachineError::Vcpu { vcpu: v, text })?;
        }
        Ok(())
    }

    /// The loaded program.
    #[must_use]
    pub fn program(&self) -> Option<&Program> {
        self.program.as_ref()
    }

    /// Compiled code per vCPU of the loaded program.
    #[must_use]
    pub fn compiled(&self) -> &[Compiled] {
        &self.compiled
    }

    /// State of every vCPU.
    #[must_use]
    pub fn states(&self) -> &[VcpuState] {
        &self.states
    }

    /// The control page of `vcpu`: field `offset` (see `layout::control`), acquire-loaded.
    #[must_use]
    pub fn control(&self, vcpu: usize, offset: u64) -> u64 {
        control_field(&self.vm, vcpu, offset)
    }

    /// Sequence number of `vcpu`'s last completed write.
    #[must_use]
    pub fn progress(&self, vcpu: usize) -> u64 {
        self.control(vcpu, control::PROGRESS)
    }

    /// How the guest's stores to tracked memory are emitted: as
    /// [`MachineConfig::stores`](super::MachineConfig::stores) says, else as the mode plan
    /// needs.
    #[must_use]
    pub fn store_form(&self) -> StoreForm {
        self.config.stores.unwrap_or_else(|| self.plan.store_form())
    }

    /// Compile `program` for this machine, write its code, and restart every vCPU at its entry.
    /// Data memory is left as it is (see [`Machine::reset`]).
    pub fn load(&mut self, program: &Program) -> Result<(), MachineError> {
        if program.vcpu_count() > self.config.vcpus {
            return Err(MachineError::Program(format!(
                "{} threads for {} vCPUs",
                program.vcpu_count(),
                self.config.vcpus
            )));
        }
        if program.data_pages > self.program_pages() {
            return Err(MachineError::Program(format!(
                "{} data pages for a {}-page data region ({} of them for programs)",
                program.data_pages,
                self.config.data_pages,
                self.program_pages()
            )));
        }
        let mut compiled = Vec::with_capacity(program.vcpu_count());
        let mut at = self.layout.code;
        let end = self.layout.code + self.layout.code_capacity;
        for vcpu in 0..program.vcpu_count() {
            let leaf = self.leaf.as_ref().map(|(l, _)| *l);
            let c = compile_for(program, vcpu, at, leaf, self.store_form())?;
            let next = (at + c.bytes.len() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
            if next > end {
                return Err(MachineError::Program(format!(
                    "code of vCPUs 0..={vcpu} needs {:#x} bytes; the code area has {:#x} \
                     (raise MachineConfig::code_capacity)",
                    next - self.layout.code,
                    self.layout.code_capacity
                )));
            }
            compiled.push(c);
            at = next;
        }
        let system = fixed_slot(&self.vm, SYSTEM_SLOT);
        for c in &compiled {
            system.write(c.base - SYSTEM_GPA, &c.bytes);
            // arm64 fetches instructions through its own caches: clean and invalidate the new
            // code to the point of unification (nothing to do on x86).
            system.sync_icache(c.base - SYSTEM_GPA, c.bytes.len() as u64);
        }
        self.compiled = compiled;
        self.program = Some(program.clone());
        self.restart()
    }

    /// Zero the control pages and put every vCPU with a thread back at its entry point.
    pub fn restart(&mut self) -> Result<(), MachineError> {
        let control_mem = fixed_slot(&self.vm, CONTROL_SLOT);
        control_mem.zero(0, self.config.vcpus as u64 * PAGE_SIZE);
        let threads = self.compiled.len();
        for (i, vcpu) in self.vcpus.iter_mut().enumerate() {
            if i >= threads {
                vcpu.settle();
                self.states[i] = VcpuState::Idle;
                continue;
            }
            let entry = Entry {
                cpl: self.plan.cpl,
                pc: self.compiled[i].base,
                stack_top: self.layout.stacks + (i as u64 + 1) * PAGE_SIZE,
                page_table_root: self.root,
            };
            vcpu.restart_at(entry)
                .map_err(|text| MachineError::Vcpu { vcpu: i, text })?;
            self.states[i] = VcpuState::Ready(None);
        }
        Ok(())
    }

    /// Zero the data region (page tables kept there are rebuilt) and restart (the program
    /// stays loaded).
    pub fn reset(&mut self) -> Result<(), MachineError> {
        let data = self.data();
        data.zero(0, data.len());
        if let Some((_, tables)) = &self.leaf {
            for (offset, raw) in tables {
                data.write(*offset, raw);
            }
            self.reset_guest_mmu()?;
        }
        self.restart()
    }

    /// Run every ready vCPU to its next stop. Returns (vCPU, stop) for each that ran; if any
    /// failed, every failure (with its program context) is the error.
    pub fn run(&mut self) -> Result<Vec<(usize, Stop)>, MachineError> {
        self.run_plain()
    }

    /// Like [`Machine::run`], with `host` running on this thread while the vCPUs run; it sees
    /// the VM, progress and the stop flags through a [`RunView`].
    pub fn run_with<R>(
        &mut self,
        host: impl FnOnce(&RunView<'_>) -> R,
    ) -> (R, Result<Vec<(usize, Stop)>, MachineError>) {
        self.run_some(|_| true, host)
    }

    /// Run only the ready vCPUs in `which` to their next stop (keeps vCPUs in lockstep when
    /// some stopped early, e.g. on a full dirty ring).
    pub fn run_vcpus(&mut self, which: &[usize]) -> Result<Vec<(usize, Stop)>, MachineError> {
        self.run_some(|i| which.contains(&i), |_| ()).1
    }

    fn run_some<R>(
        &mut self,
        pick: impl Fn(usize) -> bool,
        host: impl FnOnce(&RunView<'_>) -> R,
    ) -> (R, Result<Vec<(usize, Stop)>, MachineError>) {
        let ready: Vec<usize> = (0..self.vcpus.len())
            .filter(|&i| matches!(self.states[i], VcpuState::Ready(_)) && pick(i))
            .collect();
        let limits = self.config.limits;
        let (vm, rings, data) = (&self.vm, self.rings.as_slice(), self.data.as_ref());
        let ring_full = self.ring_full.as_slice();
        let mut selected: Vec<&mut Vcpu> = self
            .vcpus
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| ready.contains(i))
            .map(|(_, v)| v)
            .collect();
        let (r, results) = self.threads.run_with(&mut selected, limits, |monitor| {
            host(&RunView {
                vm,
                data,
                rings,
                ring_full,
                monitor,
            })
        });
        drop(selected);
        (r, self.settle_results(&ready, results))
    }

    /// [`Machine::run`]: the ready vCPUs to their next stop, nothing running alongside (the
    /// calling thread is the watchdog; no thread is started).
    fn run_plain(&mut self) -> Result<Vec<(usize, Stop)>, MachineError> {
        let ready: Vec<usize> = (0..self.vcpus.len())
            .filter(|&i| matches!(self.states[i], VcpuState::Ready(_)))
            .collect();
        let limits = self.config.limits;
        let mut selected: Vec<&mut Vcpu> = self
            .vcpus
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| ready.contains(i))
            .map(|(_, v)| v)
            .collect();
        let results = self.threads.run(&mut selected, limits);
        drop(selected);
        self.settle_results(&ready, results)
    }

    /// Update each vCPU's state from its result.
    fn settle_results(
        &mut self,
        ready: &[usize],
        results: Vec<Result<Stop, RunFailure>>,
    ) -> Result<Vec<(usize, Stop)>, MachineError> {
        if ready.is_empty() {
            return Err(MachineError::Program(
                "no vCPU is ready to run (load a program, or restart)".into(),
            ));
        }
        let mut stops = Vec::new();
        let mut failures = Vec::new();
        for (&i, result) in ready.iter().zip(results) {
            match result {
                Ok(stop) => {
                    self.states[i] = match stop {
                        Stop::Sync(n) => VcpuState::Ready(Some(n)),
                        Stop::Done { last_seq } => VcpuState::Done { last_seq },
                        Stop::RingFull => self.states[i],
                    };
                    stops.push((i, stop));
                }
                Err(mut failure) => {
                    self.states[i] = VcpuState::Failed;
                    // After a reset the PC names no place in the program (see RunFailure).
                    if !failure.pc_is_reset_state() {
                        failure.context = self.context_at(i, failure.pc);
                    }
                    if let Some(hint) = mode::failure_hint(self.store_form(), &failure.kind) {
                        failure.context = [std::mem::take(&mut failure.context), hint]
                            .into_iter()
                            .filter(|s| !s.is_empty())
                            .collect::<Vec<_>>()
                            .join("; ");
                    }
                    failures.push(failure);
                }
            }
        }
        if failures.is_empty() {
            Ok(stops)
        } else {
            Err(MachineError::Run(failures))
        }
    }

    /// Run until every vCPU is done; returns the number of run segments.
    pub fn run_to_completion(&mut self) -> Result<u64, MachineError> {
        let mut segments = 0;
        while self.states.iter().any(|s| matches!(s, VcpuState::Ready(_))) {
            self.run()?;
            segments += 1;
        }
        Ok(segments)
    }

    /// "op 3 (write page 5 +0x0), instruction `mov [r12],rax`" for `vcpu` at `pc`.
    fn context_at(&self, vcpu: usize, pc: Option<u64>) -> String {
        let Some(pc) = pc else { return String::new() };
        let Some(c) = self.compiled.get(vcpu) else {
            return String::new();
        };
        let where_ = c.describe_rip(pc);
        let insn = c.instruction_at(pc).map_or_else(
            || "no decodable instruction there".to_string(),
            |l| format!("instruction `{}`", l.text),
        );
        format!("{where_}, {insn}")
    }

    /// Sum of every vCPU's progress (completed stamped writes).
    #[must_use]
    pub fn total_progress(&self) -> u64 {
        (0..self.compiled.len()).map(|v| self.progress(v)).sum()
    }

    /// Writes the loaded program made so far, all vCPUs together (progress counts from the
    /// program's seq base).
    #[must_use]
    pub fn writes_done(&self) -> u64 {
        let base = self.program.as_ref().map_or(0, |p| p.seq_base);
        (0..self.compiled.len())
            .map(|v| self.progress(v).saturating_sub(base))
            .sum()
    }
}
