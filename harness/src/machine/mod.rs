//! A [`Machine`]: one VM laid out as `trackcheck_guests::layout` describes, with vCPUs that run
//! compiled [`Program`]s segment by segment (sync point to sync point).
//!
//! Memslots: [`SYSTEM_SLOT`] (code, stacks, page tables), [`CONTROL_SLOT`] (one control page per
//! vCPU), [`DATA_SLOT`] (the tracked data region). None is logged until a tracker turns logging
//! on.
//!
//! Reuse: [`Machine::load`] puts a new program in place and restarts the vCPUs without touching
//! data; [`Machine::reset`] also zeroes the data region. Both are far cheaper than a new VM
//! (no KVM_CREATE_VM, no memslot setup, no first-touch faults on host memory).
//!
//! Rooms: this file holds the [`Machine`] itself, its construction and plain accessors;
//! `config` and `error` say what a machine is built from and how building or running it fails;
//! `caps` enables the VM-wide tracking capabilities; `layout` places the system region and
//! builds the guest page tables; `slots` makes the memslots and changes data slots; `run` loads
//! programs and runs the vCPUs; `x86_64` (x86 hosts only) sets MSRs and the VM clock.

mod caps;
mod config;
mod error;
mod floor;
mod layout;
mod run;
mod slots;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use config::MachineConfig;
pub use error::MachineError;
pub use floor::FloorCase;
pub use layout::SystemLayout;
pub use run::{RunView, VcpuState};
pub use slots::{CONTROL_SLOT, DATA_SLOT, MAX_DATA_SLOTS, SYSTEM_SLOT};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use trackcheck_guests::compiled::Compiled;
use trackcheck_guests::layout::{MAX_DATA_PAGES, MAX_VCPUS};
use trackcheck_guests::{GuestPageSize, Program};

use crate::arch;
use crate::host::{self, BackendKind};
use crate::memory::GuestMemory;
use crate::mode::{self, ModeEvidence, ModePlan};
use crate::sys::dirty::DirtyRing;
use crate::sys::stats::StatsSnapshot;
use crate::track::{TrackCtx, TrackError, TrackSource, Tracker};
use crate::vcpu::{RunLimits, Vcpu, VcpuThreads};
use crate::vm::{Memslot, Vm};

use layout::LeafTables;

/// The backend facts a machine uses (which backend, whether PML is on), probed once per
/// process: they are fixed while the KVM module is loaded (which module it is, and its
/// read-only `enable_pml`), and probing reads some forty files under /sys and /proc.
fn backend_facts() -> &'static host::Backend {
    static FACTS: std::sync::OnceLock<host::Backend> = std::sync::OnceLock::new();
    FACTS.get_or_init(host::probe_backend)
}

/// `insn_emulation` and `exits` of each vCPU at one moment (see [`Machine::mode_counters`]).
#[derive(Clone, Copy, Debug)]
pub struct ModeCounters([[Option<u64>; 2]; MAX_VCPUS]);

/// A VM with the trackcheck guest layout.
#[derive(Debug)]
pub struct Machine {
    /// The vCPU threads: joined first when the machine is dropped.
    threads: VcpuThreads,
    config: MachineConfig,
    plan: ModePlan,
    backend: BackendKind,
    layout: SystemLayout,
    root: u64,
    // Rings, then vCPUs, then the VM: unmapped and closed in that order.
    rings: Vec<DirtyRing>,
    vcpus: Vec<Vcpu>,
    vm: Vm,
    /// Each vCPU's [`Vcpu::ring_full_counter`], readable while the vCPUs run (through
    /// [`RunView::ring_full_exits`]).
    ring_full: Vec<Arc<AtomicU64>>,
    /// The data region's host memory (all data slots are parts of it).
    data: Arc<GuestMemory>,
    /// With `tables_in_data`: where the guest's leaf entries for the data region are, and the
    /// tables' bytes as built (offset in the data region, bytes), restored by `reset`.
    leaf: Option<LeafTables>,
    /// Data slots deleted by [`Machine::delete_data_slot`], to be restored.
    removed: BTreeMap<u32, Memslot>,
    compiled: Vec<Compiled>,
    program: Option<Program>,
    states: Vec<VcpuState>,
}

impl TrackSource for Machine {
    fn track_ctx(&self) -> TrackCtx<'_> {
        TrackCtx {
            vm: &self.vm,
            rings: &self.rings,
        }
    }
}

impl Machine {
    /// Build a machine: VM, memslots, page tables, vCPUs. No program is loaded.
    pub fn new(config: MachineConfig) -> Result<Self, MachineError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(MachineError::Config(format!(
                "{} vCPUs; 1..={MAX_VCPUS} supported",
                config.vcpus
            )));
        }
        if config.data_pages == 0 || config.data_pages > MAX_DATA_PAGES {
            return Err(MachineError::Config(format!(
                "{} data pages; 1..={MAX_DATA_PAGES} supported",
                config.data_pages
            )));
        }
        let backend_facts = backend_facts();
        let backend = backend_facts.kind;
        let plan =
            mode::plan(config.mode, backend).map_err(|reason| MachineError::Unsupported {
                what: format!("{} execution", config.mode),
                reason,
            })?;
        let mut vm = Vm::new()?;
        caps::enable_tracking_caps(&vm, &config, backend_facts)?;
        if config.guest_page_size == GuestPageSize::Size1G {
            let facts = arch::guest_cpu_facts(vm.kvm()).map_err(MachineError::Config)?;
            if !facts.pages_1g {
                return Err(MachineError::Unsupported {
                    what: "1 GiB guest pages".into(),
                    reason: "KVM does not offer pdpe1gb in the guest CPUID".into(),
                });
            }
        }
        let planned = layout::plan(&config)?;
        let (data, leaf) = slots::add_slots(&mut vm, &config, &planned)?;

        let mut vcpus = Vec::with_capacity(config.vcpus);
        let mut rings = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm.create_vcpu_fd(id)?;
            arch::init_vcpu(&vm, &fd, id).map_err(|text| MachineError::Vcpu { vcpu: id, text })?;
            if let Some(bytes) = config.dirty_ring {
                let ring = DirtyRing::map(&fd, bytes as usize).map_err(|e| MachineError::Vcpu {
                    vcpu: id,
                    text: format!("mmap of its {bytes}-byte dirty ring: {e}"),
                })?;
                rings.push(ring);
            }
            vcpus.push(Vcpu::new(id, fd, backend));
        }
        let ring_full = vcpus.iter().map(Vcpu::ring_full_counter).collect();
        let states = vec![VcpuState::Idle; config.vcpus];
        Ok(Self {
            threads: VcpuThreads::new(config.vcpus),
            config,
            plan,
            backend,
            layout: planned.layout,
            root: planned.tables.root,
            rings,
            vcpus,
            vm,
            ring_full,
            data,
            leaf,
            removed: BTreeMap::new(),
            compiled: Vec::new(),
            program: None,
            states,
        })
    }

    /// The KVM file of vCPU `vcpu` (for vCPU ioctls a scenario makes itself: MSRs, registers,
    /// KVM_KVMCLOCK_CTRL). None if there is no such vCPU.
    #[must_use]
    pub fn vcpu_fd(&self, vcpu: usize) -> Option<&kvm_ioctls::VcpuFd> {
        self.vcpus.get(vcpu).map(Vcpu::fd)
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &MachineConfig {
        &self.config
    }

    /// How the requested execution mode is obtained here.
    #[must_use]
    pub fn plan(&self) -> &ModePlan {
        &self.plan
    }

    /// The KVM backend.
    #[must_use]
    pub fn backend(&self) -> BackendKind {
        self.backend
    }

    /// The system region layout.
    #[must_use]
    pub fn layout(&self) -> SystemLayout {
        self.layout
    }

    /// The guest page-table root (CR3).
    #[must_use]
    pub fn page_table_root(&self) -> u64 {
        self.root
    }

    /// The VM (trackers attach to it).
    #[must_use]
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM, mutably (memslot operations).
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Start `tracker` on the data slots.
    pub fn attach(&mut self, tracker: &mut dyn Tracker) -> Result<(), TrackError> {
        let slots = self.data_slots();
        tracker.attach(&mut self.vm, &slots)
    }

    /// Stop `tracker`.
    pub fn detach(&mut self, tracker: &mut dyn Tracker) -> Result<(), TrackError> {
        tracker.detach(&mut self.vm)
    }

    /// Total KVM_EXIT_DIRTY_RING_FULL exits waited out by the vCPUs (with
    /// `RunLimits::ring_full_wait`) since the machine was made.
    #[must_use]
    pub fn ring_full_exits(&self) -> u64 {
        self.vcpus.iter().map(Vcpu::ring_full_exits).sum()
    }

    /// KVM_EXIT_DIRTY_RING_FULL exits vCPU `vcpu` waited out (with `RunLimits::ring_full_wait`)
    /// since the machine was made. An exit that ended a run segment is a [`crate::Stop::RingFull`]
    /// stop instead and not counted. While the vCPUs run, read [`RunView::ring_full_exits`].
    ///
    /// # Panics
    /// If the machine has no vCPU `vcpu`.
    #[must_use]
    pub fn vcpu_ring_full_exits(&self, vcpu: usize) -> u64 {
        self.vcpus[vcpu].ring_full_exits()
    }

    /// The data region's memory (every data slot is a part of it).
    #[must_use]
    pub fn data(&self) -> &GuestMemory {
        &self.data
    }

    /// The data region's memory, shared: for a host agent that works on it from its own
    /// thread while the vCPUs run (writeback and reclaim of a file backing).
    #[must_use]
    pub fn data_shared(&self) -> Arc<GuestMemory> {
        Arc::clone(&self.data)
    }

    /// Binary stats of every vCPU now.
    #[must_use]
    pub fn vcpu_stats(&self) -> Vec<StatsSnapshot> {
        self.vcpus.iter().map(Vcpu::stats).collect()
    }

    /// Binary stats of the VM now.
    #[must_use]
    pub fn vm_stats(&self) -> StatsSnapshot {
        self.vm.stats()
    }

    /// The counters [`Machine::mode_evidence_between`] needs (`insn_emulation`, `exits` of
    /// every vCPU), read without allocating: what a stepped case reads instead of two full
    /// [`Machine::vcpu_stats`] snapshots.
    #[must_use]
    pub fn mode_counters(&self) -> ModeCounters {
        let mut c = ModeCounters([[None; 2]; MAX_VCPUS]);
        for (slot, v) in c.0.iter_mut().zip(&self.vcpus) {
            *slot = v.mode_counters();
        }
        c
    }

    /// [`Machine::mode_evidence`] from two [`Machine::mode_counters`] readings: the same
    /// totals (per vCPU the saturating difference where both readings have the counter; None
    /// where no vCPU has it).
    #[must_use]
    pub fn mode_evidence_between(
        &self,
        before: &ModeCounters,
        after: &ModeCounters,
        writes: u64,
    ) -> ModeEvidence {
        let total = |k: usize| {
            before
                .0
                .iter()
                .zip(&after.0)
                .take(self.vcpus.len())
                .filter_map(|(b, a)| Some(a[k]?.saturating_sub(b[k]?)))
                .reduce(|x, y| x + y)
        };
        ModeEvidence::new(self.config.mode, writes, total(0), total(1))
    }

    /// Evidence of the execution mode between two `vcpu_stats()` snapshots, for `writes`
    /// completed writes.
    #[must_use]
    pub fn mode_evidence(
        &self,
        before: &[StatsSnapshot],
        after: &[StatsSnapshot],
        writes: u64,
    ) -> ModeEvidence {
        let mut total = StatsSnapshot::default();
        for (b, a) in before.iter().zip(after) {
            total.accumulate(&a.delta(b));
        }
        ModeEvidence::new(
            self.config.mode,
            writes,
            total.get("insn_emulation"),
            total.get("exits"),
        )
    }

    /// The watchdog and livelock limits.
    #[must_use]
    pub fn limits(&self) -> RunLimits {
        self.config.limits
    }

    /// Replace the run limits (watchdog, livelock bound, ring-full policy).
    pub fn set_limits(&mut self, limits: RunLimits) {
        self.config.limits = limits;
    }

    /// Change the watchdog deadline (e.g. shorter for tests of misbehaving guests).
    pub fn set_watchdog(&mut self, watchdog: Duration) {
        self.config.limits.watchdog = watchdog;
    }
}
