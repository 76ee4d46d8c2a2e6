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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use trackcheck_guests::compiled::{CompileError, Compiled};
use trackcheck_guests::layout::LeafEntries;
use trackcheck_guests::layout::{
    CONTROL_GPA, DATA_GPA, DOORBELL_GPA, HUGE_2M, MAX_DATA_PAGES, MAX_SYSTEM_BYTES, MAX_VCPUS,
    PAGE_SIZE, SYSTEM_GPA, control,
};
use trackcheck_guests::native::compile_with;
use trackcheck_guests::{GuestPageSize, Program};

use crate::arch::{self, Entry, LeafArea, Mapping, PageTableError, PageTables};
use crate::host::{self, BackendKind};
use crate::memory::{Backing, GuestMemory, MemoryError};
use crate::mode::{self, ExecutionMode, ModeEvidence, ModePlan};
use crate::sys::dirty::{DirtyRing, GFN_BYTES};
use crate::sys::stats::StatsSnapshot;
use crate::track::{TrackCtx, TrackError, TrackSource, Tracker};
use crate::vcpu::{GroupMonitor, RunFailure, RunLimits, Stop, Vcpu, run_group};
use crate::vm::{Memslot, Vm, VmError};

/// Memslot of the system region.
pub const SYSTEM_SLOT: u32 = 0;
/// Memslot of the control pages.
pub const CONTROL_SLOT: u32 = 1;
/// Memslot of the data region.
pub const DATA_SLOT: u32 = 2;

/// How to build a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// vCPUs (1..=64).
    pub vcpus: usize,
    /// 4 KiB pages in the data region.
    pub data_pages: u64,
    /// Host backing of the data region.
    pub backing: Backing,
    /// Page size of the guest's mappings of the data region.
    pub guest_page_size: GuestPageSize,
    /// Execution mode.
    pub mode: ExecutionMode,
    /// Watchdog and livelock bounds for every run segment.
    pub limits: RunLimits,
    /// Bytes reserved for compiled code, all vCPUs together.
    pub code_capacity: u64,
    /// Fault in the data region's host memory at creation.
    pub populate: bool,
    /// Enable the dirty ring with this many bytes per vCPU (before the vCPUs are created, as
    /// KVM requires), using KVM_CAP_DIRTY_LOG_RING_ACQ_REL where offered.
    pub dirty_ring: Option<u32>,
    /// With `dirty_ring`: also enable KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP (the slots keep a
    /// backup bitmap for writes made without a vCPU; arm64).
    pub dirty_ring_with_bitmap: bool,
    /// KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE in bytes (arm64): KVM splits huge stage-2 mappings
    /// in chunks of this size when logging starts (or at CLEAR with manual protect) instead
    /// of on the faulting write. `Some(0)` sets it off explicitly; `None` leaves KVM's default.
    pub eager_split_chunk: Option<u64>,
    /// Split the data region into memslots of these many pages (in order, summing to
    /// `data_pages`; ids `DATA_SLOT`, `DATA_SLOT + 1`, ...). Empty: one slot.
    pub data_slot_pages: Vec<u64>,
    /// Put the page tables that map the data region (its leaf tables) in the last pages of the
    /// data region itself: tracked memory the guest can write (page-table ops), with the
    /// entries' accessed and dirty bits starting clear, so KVM sets them. Programs then get the
    /// data pages before the tables (see [`Machine::program_pages`]).
    pub tables_in_data: bool,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            data_pages: 512,
            backing: Backing::Anon,
            guest_page_size: GuestPageSize::Size4K,
            mode: ExecutionMode::Native,
            limits: RunLimits::default(),
            code_capacity: 8 << 20,
            populate: true,
            dirty_ring: None,
            dirty_ring_with_bitmap: false,
            eager_split_chunk: None,
            data_slot_pages: Vec::new(),
            tables_in_data: false,
        }
    }
}

/// Errors building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The configuration cannot work anywhere.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// This host cannot provide what the configuration asks for (a skip, not a failure).
    #[error("{what} is not supported on this host: {reason}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be had.
        reason: String,
    },
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The program does not compile.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// Page tables could not be built.
    #[error("guest page tables: {0}")]
    PageTables(#[from] PageTableError),
    /// Setting up a vCPU failed.
    #[error("vCPU {vcpu}: {text}")]
    Vcpu {
        /// vCPU index.
        vcpu: usize,
        /// What failed.
        text: String,
    },
    /// The program does not fit this machine.
    #[error("program does not fit the machine: {0}")]
    Program(String),
    /// One or more vCPUs failed a run segment.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Run(Vec<RunFailure>),
}

impl MachineError {
    /// True when the host lacks something (the trial should be skipped with this reason).
    #[must_use]
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Self::Unsupported { .. }
                | Self::Memory(MemoryError::Unsupported { .. } | MemoryError::NoHugepages { .. })
                | Self::Vm(VmError::Kvm(_))
        )
    }
}

/// Where things are in the system region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemLayout {
    /// First stack page (one page per vCPU; stack of vCPU v tops at `stacks + (v + 1) * 4K`).
    pub stacks: u64,
    /// Start of the code area.
    pub code: u64,
    /// Bytes of code area.
    pub code_capacity: u64,
    /// Start of the page-table area.
    pub tables: u64,
    /// Pages in the page-table area.
    pub table_pages: u64,
    /// Total bytes of the system region.
    pub bytes: u64,
}

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

/// The memory of one of the machine's fixed slots, which exist from `Machine::new` on and are
/// never deleted by the machine.
fn fixed_slot(vm: &Vm, slot: u32) -> &GuestMemory {
    match vm.slot(slot) {
        Ok(s) => &s.memory,
        Err(e) => panic!("machine slot {slot} missing: {e}"),
    }
}

fn control_field(vm: &Vm, vcpu: usize, offset: u64) -> u64 {
    fixed_slot(vm, CONTROL_SLOT).load_acquire(vcpu as u64 * PAGE_SIZE + offset)
}

/// What the host sees while vCPUs run (see [`Machine::run_with`]).
#[derive(Debug)]
pub struct RunView<'a> {
    vm: &'a Vm,
    data: &'a GuestMemory,
    rings: &'a [DirtyRing],
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

impl TrackSource for Machine {
    fn track_ctx(&self) -> TrackCtx<'_> {
        TrackCtx {
            vm: &self.vm,
            rings: &self.rings,
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

    /// vCPUs that have not come back from this run yet.
    #[must_use]
    pub fn running(&self) -> usize {
        self.monitor.running()
    }
}

/// KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or DIRTY_LOG_RING on x86, which orders strongly anyway)
/// with `bytes` per vCPU; must run before any vCPU exists.
fn enable_dirty_ring(vm: &Vm, bytes: u32) -> Result<(), MachineError> {
    const ACQ_REL: u32 = 223;
    const PLAIN: u32 = 192;
    let unsupported = |reason: String| MachineError::Unsupported {
        what: format!("a {bytes}-byte dirty ring"),
        reason,
    };
    let (cap, max) = if vm.check_cap(ACQ_REL) > 0 {
        (ACQ_REL, vm.check_cap(ACQ_REL))
    } else if cfg!(target_arch = "x86_64") && vm.check_cap(PLAIN) > 0 {
        (PLAIN, vm.check_cap(PLAIN))
    } else {
        return Err(unsupported(
            "neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor KVM_CAP_DIRTY_LOG_RING".into(),
        ));
    };
    let max = u32::try_from(max).unwrap_or(0);
    if !bytes.is_power_of_two()
        || (bytes as usize) < 4096
        || bytes > max
        || !(bytes as usize).is_multiple_of(GFN_BYTES)
    {
        return Err(unsupported(format!(
            "ring sizes here are powers of two from 4096 to {max} bytes"
        )));
    }
    // KVM refuses rings smaller than its reserved entries (64 plus the PML buffer where PML
    // is on), which only the kernel knows.
    enable_vm_cap(
        vm,
        cap,
        u64::from(bytes),
        &format!("a {bytes}-byte dirty ring"),
        " (smaller than KVM's reserved entries?)",
    )
}

/// A VM capability through KVM_ENABLE_CAP; `what` names it in errors. `EINVAL` is a skip
/// (this kernel or configuration does not take it; `einval_hint` says why it may not), anything
/// else an error.
fn enable_vm_cap(
    vm: &Vm,
    cap: u32,
    arg: u64,
    what: &str,
    einval_hint: &str,
) -> Result<(), MachineError> {
    let arg = kvm_bindings::kvm_enable_cap {
        cap,
        args: [arg, 0, 0, 0],
        ..Default::default()
    };
    vm.fd().enable_cap(&arg).map_err(|e| {
        let text = crate::sys::errno_text(e.errno());
        if e.errno() == libc::EINVAL {
            MachineError::Unsupported {
                what: what.into(),
                reason: format!("KVM_ENABLE_CAP rejected it: {text}{einval_hint}"),
            }
        } else {
            MachineError::Vcpu {
                vcpu: 0,
                text: format!("KVM_ENABLE_CAP({what}): {text}"),
            }
        }
    })
}

/// `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`.
const CAP_RING_WITH_BITMAP: u32 = 225;
/// `KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE`.
const CAP_EAGER_SPLIT_CHUNK_SIZE: u32 = 228;
/// `KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES`: a bitmap of the stage-2 block sizes (arm64).
const CAP_SUPPORTED_BLOCK_SIZES: u32 = 229;

/// The VM-wide tracking settings KVM only takes while the VM has no memslot (ring with bitmap,
/// eager split chunk) or no vCPU (the ring): made right after the VM exists.
fn enable_tracking_caps(vm: &Vm, config: &MachineConfig) -> Result<(), MachineError> {
    if let Some(bytes) = config.dirty_ring {
        enable_dirty_ring(vm, bytes)?;
        if config.dirty_ring_with_bitmap {
            if vm.check_cap(CAP_RING_WITH_BITMAP) <= 0 {
                return Err(MachineError::Unsupported {
                    what: "a dirty ring with a backup bitmap".into(),
                    reason: "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is absent".into(),
                });
            }
            enable_vm_cap(
                vm,
                CAP_RING_WITH_BITMAP,
                0,
                "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP",
                "",
            )?;
        }
    } else if config.dirty_ring_with_bitmap {
        return Err(MachineError::Config(
            "dirty_ring_with_bitmap needs dirty_ring".into(),
        ));
    }
    if let Some(chunk) = config.eager_split_chunk {
        let sizes = u64::try_from(vm.check_cap(CAP_SUPPORTED_BLOCK_SIZES)).unwrap_or(0);
        if sizes == 0 {
            return Err(MachineError::Unsupported {
                what: "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE".into(),
                reason: "KVM_CAP_ARM_SUPPORTED_BLOCK_SIZES is absent (arm64 KVM from 6.5 has both)"
                    .into(),
            });
        }
        if chunk != 0 && sizes & chunk == 0 {
            return Err(MachineError::Unsupported {
                what: format!("an eager split chunk of {chunk:#x} bytes"),
                reason: format!("the supported block sizes here are {sizes:#x}"),
            });
        }
        enable_vm_cap(
            vm,
            CAP_EAGER_SPLIT_CHUNK_SIZE,
            chunk,
            "KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE",
            "",
        )?;
    }
    Ok(())
}

/// Page-table pages kept in the data region: (byte offset in the region, bytes as built).
type TableBytes = Vec<(u64, Vec<u8>)>;

/// A VM with the trackcheck guest layout.
#[derive(Debug)]
pub struct Machine {
    config: MachineConfig,
    plan: ModePlan,
    backend: BackendKind,
    layout: SystemLayout,
    root: u64,
    // Rings, then vCPUs, then the VM: unmapped and closed in that order.
    rings: Vec<DirtyRing>,
    vcpus: Vec<Vcpu>,
    vm: Vm,
    /// The data region's host memory (all data slots are parts of it).
    data: Arc<GuestMemory>,
    /// With `tables_in_data`: where the guest's leaf entries for the data region are, and the
    /// tables' bytes as built (offset in the data region, bytes), restored by `reset`.
    leaf: Option<(LeafEntries, TableBytes)>,
    /// Data slots deleted by [`Machine::delete_data_slot`], to be restored.
    removed: BTreeMap<u32, Memslot>,
    compiled: Vec<Compiled>,
    program: Option<Program>,
    states: Vec<VcpuState>,
}

fn data_mappings(data_pages: u64, page: GuestPageSize) -> Vec<Mapping> {
    let bytes = data_pages * PAGE_SIZE;
    let mut out = Vec::new();
    let mut mapped = 0;
    for size in [
        GuestPageSize::Size1G,
        GuestPageSize::Size2M,
        GuestPageSize::Size4K,
    ] {
        if size.bytes() > page.bytes() {
            continue;
        }
        let len = (bytes - mapped) / size.bytes() * size.bytes();
        if len > 0 {
            out.push(Mapping {
                gva: DATA_GPA + mapped,
                gpa: DATA_GPA + mapped,
                len,
                page: size,
                writable: true,
                executable: false,
            });
            mapped += len;
        }
    }
    out
}

/// Most data slots a machine makes.
pub const MAX_DATA_SLOTS: usize = 512;

/// (first page, pages) of every data slot of `config`.
fn data_extents(config: &MachineConfig) -> Result<Vec<(u64, u64)>, MachineError> {
    if config.data_slot_pages.is_empty() {
        return Ok(vec![(0, config.data_pages)]);
    }
    if config.data_slot_pages.len() > MAX_DATA_SLOTS
        || config.data_slot_pages.contains(&0)
        || config.data_slot_pages.iter().sum::<u64>() != config.data_pages
    {
        return Err(MachineError::Config(format!(
            "data slots of {:?} pages: 1..={MAX_DATA_SLOTS} non-empty slots summing to the {} data pages",
            config.data_slot_pages, config.data_pages
        )));
    }
    let mut first = 0;
    Ok(config
        .data_slot_pages
        .iter()
        .map(|&pages| {
            let extent = (first, pages);
            first += pages;
            extent
        })
        .collect())
}

fn rw(gpa: u64, len: u64) -> Mapping {
    Mapping {
        gva: gpa,
        gpa,
        len,
        page: GuestPageSize::Size4K,
        writable: true,
        executable: false,
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
        let backend = host::probe_backend().kind;
        let plan =
            mode::plan(config.mode, backend).map_err(|reason| MachineError::Unsupported {
                what: format!("{} execution", config.mode),
                reason,
            })?;
        let vm = Vm::new()?;
        enable_tracking_caps(&vm, &config)?;
        if config.guest_page_size == GuestPageSize::Size1G {
            let facts = arch::guest_cpu_facts(vm.kvm()).map_err(MachineError::Config)?;
            if !facts.pages_1g {
                return Err(MachineError::Unsupported {
                    what: "1 GiB guest pages".into(),
                    reason: "KVM does not offer pdpe1gb in the guest CPUID".into(),
                });
            }
        }
        let vcpus_bytes = config.vcpus as u64 * PAGE_SIZE;
        let code_capacity = config.code_capacity.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let stacks = SYSTEM_GPA;
        let code = stacks + vcpus_bytes;
        let mut mappings = vec![
            rw(stacks, vcpus_bytes),
            Mapping {
                gva: code,
                gpa: code,
                len: code_capacity,
                page: GuestPageSize::Size4K,
                writable: false,
                executable: true,
            },
            rw(CONTROL_GPA, vcpus_bytes),
            rw(DOORBELL_GPA, PAGE_SIZE),
        ];
        let data_maps = data_mappings(config.data_pages, config.guest_page_size);
        let leaf_area = if config.tables_in_data {
            let [data_map] = data_maps.as_slice() else {
                return Err(MachineError::Config(format!(
                    "page tables in the data region need {} data pages in whole {} guest pages",
                    config.data_pages,
                    config.guest_page_size.name()
                )));
            };
            let pages = LeafArea::pages(data_map);
            if pages >= config.data_pages {
                return Err(MachineError::Config(format!(
                    "{} data pages leave no room for data next to their {pages} table pages",
                    config.data_pages
                )));
            }
            Some(LeafArea {
                mapping: mappings.len(),
                gpa: DATA_GPA + (config.data_pages - pages) * PAGE_SIZE,
                preset_ad: false,
            })
        } else {
            None
        };
        mappings.extend(data_maps);
        let table_pages = PageTables::pages_needed(&mappings);
        let tables = code + code_capacity;
        let bytes = (tables + table_pages * PAGE_SIZE - SYSTEM_GPA).div_ceil(HUGE_2M) * HUGE_2M;
        if bytes > MAX_SYSTEM_BYTES {
            return Err(MachineError::Config(format!(
                "system region of {bytes:#x} bytes exceeds {MAX_SYSTEM_BYTES:#x}: less code capacity or data"
            )));
        }
        let layout = SystemLayout {
            stacks,
            code,
            code_capacity,
            tables,
            table_pages,
            bytes,
        };
        let pt = PageTables::build_with(&mappings, tables, table_pages, true, leaf_area)?;

        let mut vm = vm;
        let system = GuestMemory::new(Backing::Anon, bytes)?;
        let mut data_tables = Vec::new();
        for (gpa, entries) in &pt.tables {
            let raw: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            if *gpa >= DATA_GPA {
                data_tables.push((gpa - DATA_GPA, raw));
            } else {
                system.write(gpa - SYSTEM_GPA, &raw);
            }
        }
        vm.add_slot(SYSTEM_SLOT, SYSTEM_GPA, system, None, 0)?;
        let control_mem = GuestMemory::new(Backing::Anon, vcpus_bytes)?;
        control_mem.populate()?;
        vm.add_slot(CONTROL_SLOT, CONTROL_GPA, control_mem, None, 0)?;
        let data = Arc::new(GuestMemory::new(
            config.backing,
            config.data_pages * PAGE_SIZE,
        )?);
        if config.populate {
            data.populate()?;
        }
        for (offset, raw) in &data_tables {
            data.write(*offset, raw);
        }
        let leaf = leaf_area.map(|l| {
            (
                LeafEntries {
                    gva: l.gpa,
                    page: config.guest_page_size,
                },
                data_tables,
            )
        });
        for (i, (first, pages)) in data_extents(&config)?.into_iter().enumerate() {
            let id = DATA_SLOT + u32::try_from(i).unwrap_or(u32::MAX);
            vm.add_slot_shared(
                id,
                DATA_GPA + first * PAGE_SIZE,
                Arc::clone(&data),
                first * PAGE_SIZE,
                pages * PAGE_SIZE,
                0,
            )?;
        }

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
            vcpus.push(Vcpu::new(id, fd));
        }
        let states = vec![VcpuState::Idle; config.vcpus];
        Ok(Self {
            config,
            plan,
            backend,
            layout,
            root: pt.root,
            rings,
            vcpus,
            vm,
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

    /// Set model-specific registers of vCPU `vcpu` (KVM_SET_MSRS, as a VMM does: the
    /// kvmclock and steal-time MSRs a CPL3 guest cannot write itself). Returns how many KVM
    /// accepted, in order. x86 only.
    #[cfg(target_arch = "x86_64")]
    pub fn set_msrs(&self, vcpu: usize, msrs: &[(u32, u64)]) -> Result<usize, MachineError> {
        let fd = self.vcpu_fd(vcpu).ok_or_else(|| MachineError::Vcpu {
            vcpu,
            text: "no such vCPU".into(),
        })?;
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = kvm_bindings::Msrs::from_entries(&entries).map_err(|e| MachineError::Vcpu {
            vcpu,
            text: format!("MSR list: {e:?}"),
        })?;
        fd.set_msrs(&list).map_err(|e| MachineError::Vcpu {
            vcpu,
            text: format!("KVM_SET_MSRS: {e}"),
        })
    }

    /// Move the VM's kvmclock forward by `ns` (KVM_GET_CLOCK, KVM_SET_CLOCK): every vCPU
    /// rewrites its kvmclock area at its next entry. x86 only.
    #[cfg(target_arch = "x86_64")]
    pub fn advance_clock(&self, ns: u64) -> Result<(), MachineError> {
        let vm = self.vm.fd();
        let now = vm.get_clock().map_err(|e| MachineError::Vcpu {
            vcpu: 0,
            text: format!("KVM_GET_CLOCK: {e}"),
        })?;
        vm.set_clock(&kvm_bindings::kvm_clock_data {
            clock: now.clock + ns,
            ..Default::default()
        })
        .map_err(|e| MachineError::Vcpu {
            vcpu: 0,
            text: format!("KVM_SET_CLOCK: {e}"),
        })
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

    /// Where the data region's pages live: every data slot, deleted ones included, at its
    /// current guest-physical address.
    #[must_use]
    pub fn data_layout(&self) -> crate::oracle::DataLayout {
        let extents = data_extents(&self.config)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, (first, pages))| {
                let slot = DATA_SLOT + u32::try_from(i).unwrap_or(u32::MAX);
                let gpa = self
                    .vm
                    .slot(slot)
                    .ok()
                    .or_else(|| self.removed.get(&slot))
                    .map_or(DATA_GPA + first * PAGE_SIZE, |s| s.gpa);
                crate::oracle::Extent {
                    slot,
                    first_page: first,
                    pages,
                    gpa,
                }
            })
            .collect();
        crate::oracle::DataLayout { extents }
    }

    /// Replace the run limits (watchdog, livelock bound, ring-full policy).
    pub fn set_limits(&mut self, limits: RunLimits) {
        self.config.limits = limits;
    }

    /// The tracked data slots (those not deleted).
    #[must_use]
    pub fn data_slots(&self) -> Vec<u32> {
        self.data_layout()
            .extents
            .iter()
            .map(|e| e.slot)
            .filter(|s| !self.removed.contains_key(s))
            .collect()
    }

    /// Delete data slot `slot` from KVM (its memory stays; [`Machine::restore_data_slot`] puts
    /// it back). The guest must not touch its pages meanwhile: they would be MMIO.
    pub fn delete_data_slot(&mut self, slot: u32) -> Result<(), MachineError> {
        if !self.data_slots().contains(&slot) {
            return Err(MachineError::Config(format!(
                "slot {slot} is not a data slot in use"
            )));
        }
        let s = self.vm.delete_slot(slot)?;
        self.removed.insert(slot, s);
        Ok(())
    }

    /// Put a deleted data slot back where it was, with the flags it had (a tracker's
    /// KVM_MEM_LOG_DIRTY_PAGES included): to KVM it is a new slot. Returns the flags.
    pub fn restore_data_slot(&mut self, slot: u32) -> Result<u32, MachineError> {
        let s = self
            .removed
            .remove(&slot)
            .ok_or_else(|| MachineError::Config(format!("slot {slot} was not deleted")))?;
        let (gpa, offset, size, flags) = (s.gpa, s.offset, s.size, s.flags());
        self.vm
            .add_slot_shared(slot, gpa, s.memory, offset, size, flags)?;
        Ok(flags)
    }

    /// Move data slot `slot` to `gpa` (KVM_MR_MOVE), point the guest's mappings of its pages
    /// at the new place and reset every vCPU's MMU so the guest sees them there. The vCPUs must
    /// be stopped. Everything is checked before anything changes: the slot is a live data slot,
    /// the guest's tables are where the host can rewrite them (not in the data region), and
    /// every guest mapping of the slot is whole and stays aligned at the new address.
    pub fn move_data_slot(&mut self, slot: u32, gpa: u64) -> Result<(), MachineError> {
        if self.leaf.is_some() {
            return Err(MachineError::Config(
                "moving a data slot with the page tables in the data region is not supported"
                    .into(),
            ));
        }
        let (old, pages) = {
            let s = self.vm.slot(slot)?;
            (s.gpa, s.pages())
        };
        let extent = self
            .data_layout()
            .extents
            .into_iter()
            .find(|e| e.slot == slot)
            .ok_or_else(|| MachineError::Config(format!("slot {slot} is not a data slot")))?;
        let system = fixed_slot(&self.vm, SYSTEM_SLOT);
        let read = |at: u64| -> Option<u64> {
            let off = at.checked_sub(SYSTEM_GPA)?;
            (off + 8 <= system.len()).then(|| system.read_u64(off))
        };
        // (entry's offset in the system region, new entry)
        let mut rewrites = Vec::new();
        let mut page = 0;
        while page < pages {
            let gva = DATA_GPA + (extent.first_page + page) * PAGE_SIZE;
            let walk = arch::walk(self.root, gva, read).ok_or_else(|| {
                MachineError::Config(format!("guest page tables do not map {gva:#x}"))
            })?;
            let size = walk.page.bytes();
            let span = size / PAGE_SIZE;
            if !gva.is_multiple_of(size)
                || page + span > pages
                || !(gpa.abs_diff(old)).is_multiple_of(size)
            {
                return Err(MachineError::Config(format!(
                    "slot {slot} at {old:#x} -> {gpa:#x}: the guest maps it with {} pages that the move would cut or misalign (use 4 KiB guest pages)",
                    walk.page.name()
                )));
            }
            let target = walk.gpa - old + gpa;
            let entry = (walk.leaf_entry & !arch::pte::ADDR) | (target & arch::pte::ADDR);
            rewrites.push((walk.leaf_entry_gpa - SYSTEM_GPA, entry));
            page += span;
        }
        self.vm.move_slot(slot, gpa)?;
        let system = fixed_slot(&self.vm, SYSTEM_SLOT);
        for (offset, entry) in rewrites {
            system.write_u64(offset, entry);
        }
        self.reset_guest_mmu()
    }

    /// Make every vCPU drop its cached translations (KVM_SET_SREGS toggling CR4.PGE and back,
    /// which resets KVM's MMU for the vCPU): what a guest that cannot flush its own TLB needs
    /// after its page tables changed. The vCPUs must be stopped.
    pub fn reset_guest_mmu(&self) -> Result<(), MachineError> {
        for (v, vcpu) in self.vcpus.iter().enumerate() {
            arch::reset_mmu(vcpu.fd()).map_err(|text| MachineError::Vcpu { vcpu: v, text })?;
        }
        Ok(())
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

    /// Total KVM_EXIT_DIRTY_RING_FULL exits waited out by the vCPUs.
    #[must_use]
    pub fn ring_full_exits(&self) -> u64 {
        self.vcpus.iter().map(Vcpu::ring_full_exits).sum()
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

    /// The data region's memory (every data slot is a part of it).
    #[must_use]
    pub fn data(&self) -> &GuestMemory {
        &self.data
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
            let c = compile_with(program, vcpu, at, self.leaf.as_ref().map(|(l, _)| *l))?;
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
            vcpu.settle();
            if i >= threads {
                self.states[i] = VcpuState::Idle;
                continue;
            }
            let entry = Entry {
                cpl: self.plan.cpl,
                pc: self.compiled[i].base,
                stack_top: self.layout.stacks + (i as u64 + 1) * PAGE_SIZE,
                page_table_root: self.root,
            };
            arch::set_entry(vcpu.fd(), entry)
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

    /// Data pages a program may use: all of them, or those before the page tables when they
    /// live in the data region.
    #[must_use]
    pub fn program_pages(&self) -> u64 {
        self.leaf.as_ref().map_or(self.config.data_pages, |(l, _)| {
            (l.gva - DATA_GPA) / PAGE_SIZE
        })
    }

    /// The guest's leaf entry that maps data page `page` now (with the tables in the data
    /// region; None otherwise).
    #[must_use]
    pub fn leaf_entry(&self, page: u64) -> Option<u64> {
        let (l, _) = self.leaf.as_ref()?;
        Some(self.data.read_u64(l.of(page) - DATA_GPA))
    }

    /// Run every ready vCPU to its next stop. Returns (vCPU, stop) for each that ran; if any
    /// failed, every failure (with its program context) is the error.
    pub fn run(&mut self) -> Result<Vec<(usize, Stop)>, MachineError> {
        self.run_with(|_| ()).1
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
        let mut selected: Vec<&mut Vcpu> = self
            .vcpus
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| ready.contains(i))
            .map(|(_, v)| v)
            .collect();
        let (r, results) = run_group(&mut selected, limits, |monitor| {
            host(&RunView {
                vm,
                data,
                rings,
                monitor,
            })
        });
        if ready.is_empty() {
            return (
                r,
                Err(MachineError::Program(
                    "no vCPU is ready to run (load a program, or restart)".into(),
                )),
            );
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
                    failure.context = self.context_at(i, failure.pc);
                    failures.push(failure);
                }
            }
        }
        if failures.is_empty() {
            (r, Ok(stops))
        } else {
            (r, Err(MachineError::Run(failures)))
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

    /// The watchdog and livelock limits.
    #[must_use]
    pub fn limits(&self) -> RunLimits {
        self.config.limits
    }

    /// Change the watchdog deadline (e.g. shorter for tests of misbehaving guests).
    pub fn set_watchdog(&mut self, watchdog: Duration) {
        self.config.limits.watchdog = watchdog;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_mappings_use_the_biggest_pages_that_fit() {
        let m = data_mappings(512 * 3 + 5, GuestPageSize::Size2M);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].page, m[0].len), (GuestPageSize::Size2M, 3 * HUGE_2M));
        assert_eq!(
            (m[1].page, m[1].len, m[1].gpa),
            (GuestPageSize::Size4K, 5 * PAGE_SIZE, DATA_GPA + 3 * HUGE_2M)
        );
        let m = data_mappings(7, GuestPageSize::Size4K);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].len, 7 * PAGE_SIZE);
    }
}
