//! What a machine is built from: [`MachineConfig`], with the defaults most trials start from.

use trackcheck_guests::GuestPageSize;
use trackcheck_guests::compiled::StoreForm;

use crate::memory::Backing;
use crate::mode::ExecutionMode;
use crate::vcpu::RunLimits;

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
    /// data pages before the tables (see [`Machine::program_pages`](super::Machine::program_pages)).
    pub tables_in_data: bool,
    /// Emit the guest's stores to tracked memory in this form instead of the one the mode plan
    /// picks ([`ModePlan::store_form`](crate::mode::ModePlan::store_form)). For self-tests
    /// only: a guest with KVM's forced-emulation prefix on a host that does not honour it must
    /// fail loudly and say why. `None`: as the plan says.
    pub stores: Option<StoreForm>,
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
            stores: None,
        }
    }
}
