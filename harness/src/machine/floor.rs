//! The raw-ioctl floor of a stepped case (`trackcheck bench --harness`): the same kernel calls a
//! stepped 16-page case makes, issued bare on this machine's VM from the calling thread: no
//! vCPU threads, no watchdog, no oracle, no allocation. What a case costs above this is the
//! harness's own.
//!
//! It can see only the calls it makes; it proves nothing about tracking (the bitmaps it reads
//! are thrown away) and must not be used as a check.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use trackcheck_guests::layout::{DOORBELL_GPA, PAGE_SIZE, SYSTEM_GPA, doorbell};

use crate::arch::{self, Entry};
use crate::sys::dirty::{bitmap_words, get_dirty_log};
use crate::sys::errno_text;

use super::slots::{CONTROL_SLOT, DATA_SLOT, SYSTEM_SLOT, fixed_slot};
use super::{Machine, MachineError};

/// Time per step of one floor case.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FloorCase {
    /// Writing the code and zeroing control and data pages (memory only).
    pub memory: Duration,
    /// Per vCPU and restart: KVM_RUN with `immediate_exit`, KVM_GET_SREGS, KVM_SET_SREGS,
    /// KVM_SET_REGS.
    pub restart: Duration,
    /// pread of each vCPU's binary stats, before and after.
    pub stats: Duration,
    /// KVM_SET_USER_MEMORY_REGION turning logging on and off.
    pub attach: Duration,
    /// KVM_RUN of every ready vCPU to its next doorbell, serially, segment by segment.
    pub run: Duration,
    /// KVM_GET_DIRTY_LOG: baseline, after each segment, final.
    pub collect: Duration,
}

impl FloorCase {
    /// Sum of every step.
    #[must_use]
    pub fn total(&self) -> Duration {
        self.memory + self.restart + self.stats + self.attach + self.run + self.collect
    }
}

/// Exits a floor vCPU may take to one doorbell before the floor gives up (the loaded program
/// misbehaves: measure it with the harness instead).
const MAX_EXITS: u32 = 1000;

impl Machine {
    /// One floor case for the loaded program: `restarts` restarts (a stepped property case
    /// loads and resets; the vCPUs are restarted once, the second restart finds them still at
    /// their entry), then the stepped case's calls.
    /// Logging is left off. The program must only ring SYNC and DONE doorbells.
    pub fn floor_case(&mut self, restarts: u32) -> Result<FloorCase, MachineError> {
        let mut out = FloorCase::default();
        let threads = self.compiled.len();
        if threads == 0 {
            return Err(MachineError::Program(
                "floor case: no program loaded".into(),
            ));
        }
        let mut clock = Instant::now();
        let mut lap = |d: &mut Duration| {
            let now = Instant::now();
            *d += now - clock;
            clock = now;
        };
        let system = fixed_slot(&self.vm, SYSTEM_SLOT);
        for c in &self.compiled {
            system.write(c.base - SYSTEM_GPA, &c.bytes);
        }
        fixed_slot(&self.vm, CONTROL_SLOT).zero(0, self.config.vcpus as u64 * PAGE_SIZE);
        self.data.zero(0, self.data.len());
        lap(&mut out.memory);
        for _ in 0..restarts {
            for (i, vcpu) in self.vcpus.iter_mut().take(threads).enumerate() {
                vcpu.settle();
                let entry = Entry {
                    cpl: self.plan.cpl,
                    pc: self.compiled[i].base,
                    stack_top: self.layout.stacks + (i as u64 + 1) * PAGE_SIZE,
                    page_table_root: self.root,
                };
                arch::set_entry(vcpu.fd(), entry)
                    .map_err(|text| MachineError::Vcpu { vcpu: i, text })?;
            }
        }
        lap(&mut out.restart);
        let mut raw = [0u8; 4096];
        for vcpu in &self.vcpus {
            vcpu.read_stats_raw(&mut raw);
        }
        lap(&mut out.stats);
        self.vm.set_dirty_logging(DATA_SLOT, true)?;
        lap(&mut out.attach);
        let pages = self.vm.slot(DATA_SLOT)?.pages();
        let mut bitmap = [0u64; 64];
        let words = bitmap_words(pages).min(bitmap.len());
        let mut collect = |out: &mut FloorCase, lap: &mut dyn FnMut(&mut Duration)| {
            let r = get_dirty_log(self.vm.fd(), DATA_SLOT, &mut bitmap[..words]);
            lap(&mut out.collect);
            r.map_err(|e| {
                MachineError::Program(format!("floor KVM_GET_DIRTY_LOG: {}", errno_text(e)))
            })
        };
        collect(&mut out, &mut lap)?;
        let mut done = [false; 64];
        while done.iter().take(threads).any(|d| !d) {
            for (i, vcpu) in self.vcpus.iter_mut().take(threads).enumerate() {
                if done[i] {
                    continue;
                }
                let mut exits = 0;
                loop {
                    exits += 1;
                    if exits > MAX_EXITS {
                        return Err(MachineError::Program(format!(
                            "floor: vCPU {i} took {MAX_EXITS} exits without a doorbell"
                        )));
                    }
                    match vcpu.fd_mut().run() {
                        Ok(VcpuExit::MmioWrite(addr, _))
                            if addr == DOORBELL_GPA + doorbell::SYNC =>
                        {
                            break;
                        }
                        Ok(VcpuExit::MmioWrite(addr, _))
                            if addr == DOORBELL_GPA + doorbell::DONE =>
                        {
                            done[i] = true;
                            break;
                        }
                        Ok(_) => {}
                        Err(e) if e.errno() == libc::EINTR => {}
                        Err(e) => {
                            return Err(MachineError::Vcpu {
                                vcpu: i,
                                text: format!("floor KVM_RUN: {}", errno_text(e.errno())),
                            });
                        }
                    }
                }
            }
            lap(&mut out.run);
            collect(&mut out, &mut lap)?;
        }
        collect(&mut out, &mut lap)?;
        for vcpu in &self.vcpus {
            vcpu.read_stats_raw(&mut raw);
        }
        lap(&mut out.stats);
        self.vm.set_dirty_logging(DATA_SLOT, false)?;
        lap(&mut out.attach);
        Ok(out)
    }
}
