//! A KVM VM and its memslots.
//!
//! Memslot operations are the ones dirty tracking has to survive: add, toggle
//! `KVM_MEM_LOG_DIRTY_PAGES`, move, delete. Each slot holds a reference to its [`GuestMemory`]
//! (several slots may share one mapping); the memory stays mapped while KVM can reach it: the
//! VM fd is dropped before the slots (field order), and a deleted slot is removed from KVM
//! before its reference is handed back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::memory::GuestMemory;
use crate::sys::stats::{StatsFd, StatsSnapshot};
use crate::sys::{self, KvmUnavailable};

/// Errors from VM-level operations. Messages name the ioctl, the slot and the errno.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM cannot be opened.
    #[error(transparent)]
    Kvm(#[from] KvmUnavailable),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM: {0}")]
    Create(String),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error(
        "KVM_SET_USER_MEMORY_REGION slot {slot} ({what}) gpa {gpa:#x} size {size:#x} flags {flags:#x}: {text}"
    )]
    SetRegion {
        /// Slot id.
        slot: u32,
        /// add / set flags / move / delete.
        what: &'static str,
        /// Guest-physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// Flags.
        flags: u32,
        /// errno text.
        text: String,
    },
    /// The slot id is unknown or already used.
    #[error("memslot {slot}: {what}")]
    Slot {
        /// Slot id.
        slot: u32,
        /// What is wrong.
        what: String,
    },
    /// KVM_CREATE_VCPU failed.
    #[error("KVM_CREATE_VCPU {id}: {text}")]
    CreateVcpu {
        /// vCPU id.
        id: usize,
        /// errno text.
        text: String,
    },
}

/// One memslot: `size` bytes of `memory` from `offset` on, at `gpa`. Several slots may share
/// one host mapping (a data region split into many slots).
#[derive(Debug)]
pub struct Memslot {
    /// Slot id.
    pub id: u32,
    /// Guest-physical address.
    pub gpa: u64,
    /// Size KVM sees (may be less than the memory's mapped length).
    pub size: u64,
    /// KVM_MEM_* flags (atomic: logging may be toggled while vCPUs run).
    flags: AtomicU32,
    /// The host memory behind it.
    pub memory: Arc<GuestMemory>,
    /// Byte offset of the slot in `memory`.
    pub offset: u64,
}

impl Memslot {
    /// Number of 4 KiB pages in the slot.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(4096)
    }

    /// KVM_MEM_* flags.
    #[must_use]
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    /// True when dirty logging is on for this slot.
    #[must_use]
    pub fn logging(&self) -> bool {
        self.flags() & KVM_MEM_LOG_DIRTY_PAGES != 0
    }

    /// Host address of the slot's first byte.
    #[must_use]
    pub fn host_addr(&self) -> u64 {
        self.memory.host_addr() + self.offset
    }

    /// Bytes of host mapping behind the slot: its size, or up to the end of the mapping (which
    /// is rounded up to the backing's page size) when the slot ends where the memory does.
    #[must_use]
    pub fn host_len(&self) -> u64 {
        if self.offset + self.size >= self.memory.len() {
            self.memory.mapped_len() - self.offset
        } else {
            self.size
        }
    }

    /// Whether `gpa` falls inside the slot.
    #[must_use]
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.gpa + self.size
    }
}

/// A VM: the KVM handle, the VM fd and its memslots.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: the VM fd is closed before the slots' memory is unmapped.
    fd: VmFd,
    /// Held while a slot's flags change, so KVM and `Memslot::flags` agree.
    flags_lock: std::sync::Mutex<()>,
    stats: Option<StatsFd>,
    kvm: Kvm,
    slots: BTreeMap<u32, Memslot>,
}

impl Vm {
    /// Create a VM on the host's KVM device.
    pub fn new() -> Result<Self, VmError> {
        let kvm = sys::open_kvm()?;
        let fd = sys::create_vm(&kvm).map_err(|e| VmError::Create(sys::errno_text(e.errno())))?;
        let stats = StatsFd::open(&fd, "VM").ok();
        Ok(Self {
            fd,
            flags_lock: std::sync::Mutex::new(()),
            stats,
            kvm,
            slots: BTreeMap::new(),
        })
    }

    /// The KVM system handle.
    #[must_use]
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd (for ioctls this type does not wrap).
    #[must_use]
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// KVM_CHECK_EXTENSION on this VM.
    #[must_use]
    pub fn check_cap(&self, cap: u32) -> i32 {
        self.fd.check_extension_raw(cap.into())
    }

    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        flags: u32,
        host: u64,
        what: &'static str,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host..host+size` is inside a GuestMemory this Vm's slot table holds a
        // reference to (add_slot_shared checked offset + size against its mapped length; or,
        // for a delete, size is 0 and nothing is mapped). The memory stays mapped until the
        // slot is deleted from KVM or the VM fd is closed (field order above).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| VmError::SetRegion {
            slot,
            what,
            gpa,
            size,
            flags,
            text: sys::errno_text(e.errno()),
        })
    }

    /// Add slot `id` at `gpa`, exposing the first `size` bytes of `memory` (all of it if
    /// `None`).
    pub fn add_slot(
        &mut self,
        id: u32,
        gpa: u64,
        memory: GuestMemory,
        size: Option<u64>,
        flags: u32,
    ) -> Result<(), VmError> {
        let size = size.unwrap_or_else(|| memory.len());
        self.add_slot_shared(id, gpa, Arc::new(memory), 0, size, flags)
    }

    /// Add slot `id` at `gpa`, exposing `size` bytes of `memory` from byte `offset` on (a
    /// 4 KiB multiple); other slots may use other parts of the same memory.
    pub fn add_slot_shared(
        &mut self,
        id: u32,
        gpa: u64,
        memory: Arc<GuestMemory>,
        offset: u64,
        size: u64,
        flags: u32,
    ) -> Result<(), VmError> {
        if self.slots.contains_key(&id) {
            return Err(VmError::Slot {
                slot: id,
                what: "already exists".into(),
            });
        }
        if !offset.is_multiple_of(4096)
            || offset
                .checked_add(size)
                .is_none_or(|end| end > memory.mapped_len())
        {
            return Err(VmError::Slot {
                slot: id,
                what: format!(
                    "{size:#x} bytes at offset {offset:#x} do not fit its {:#x}-byte memory (or the offset is not page aligned)",
                    memory.mapped_len()
                ),
            });
        }
        self.set_region(id, gpa, size, flags, memory.host_addr() + offset, "add")?;
        self.slots.insert(
            id,
            Memslot {
                id,
                gpa,
                size,
                flags: AtomicU32::new(flags),
                memory,
                offset,
            },
        );
        Ok(())
    }

    fn slot_entry(&self, id: u32) -> Result<&Memslot, VmError> {
        self.slots.get(&id).ok_or_else(|| VmError::Slot {
            slot: id,
            what: "no such slot".into(),
        })
    }

    /// Slot `id`.
    pub fn slot(&self, id: u32) -> Result<&Memslot, VmError> {
        self.slot_entry(id)
    }

    /// All slots, by id.
    pub fn slots(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.values()
    }

    /// Replace slot `id`'s flags (e.g. turn `KVM_MEM_LOG_DIRTY_PAGES` on or off). KVM allows
    /// this while vCPUs run; changes are serialised so the recorded flags match KVM's.
    pub fn set_slot_flags(&self, id: u32, flags: u32) -> Result<(), VmError> {
        self.update_slot_flags(id, |_| flags)
    }

    /// Turn dirty logging on or off for slot `id`.
    pub fn set_dirty_logging(&self, id: u32, on: bool) -> Result<(), VmError> {
        self.update_slot_flags(id, |flags| {
            if on {
                flags | KVM_MEM_LOG_DIRTY_PAGES
            } else {
                flags & !KVM_MEM_LOG_DIRTY_PAGES
            }
        })
    }

    /// Set slot `id`'s flags to `f(current flags)`, one change at a time.
    fn update_slot_flags(&self, id: u32, f: impl FnOnce(u32) -> u32) -> Result<(), VmError> {
        let _one_at_a_time = self
            .flags_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = self.slot_entry(id)?;
        let flags = f(s.flags());
        self.set_region(id, s.gpa, s.size, flags, s.host_addr(), "set flags")?;
        s.flags.store(flags, Ordering::Release);
        Ok(())
    }

    /// Move slot `id` to `gpa` (KVM_MR_MOVE: same size and memory).
    pub fn move_slot(&mut self, id: u32, gpa: u64) -> Result<(), VmError> {
        let s = self.slot_entry(id)?;
        self.set_region(id, gpa, s.size, s.flags(), s.host_addr(), "move")?;
        if let Some(s) = self.slots.get_mut(&id) {
            s.gpa = gpa;
        }
        Ok(())
    }

    /// Delete slot `id` from KVM and hand its memory back.
    pub fn delete_slot(&mut self, id: u32) -> Result<Memslot, VmError> {
        let s = self.slot_entry(id)?;
        self.set_region(id, s.gpa, 0, 0, s.host_addr(), "delete")?;
        self.slots.remove(&id).ok_or_else(|| VmError::Slot {
            slot: id,
            what: "vanished".into(),
        })
    }

    /// The slot containing `gpa`, if any.
    #[must_use]
    pub fn slot_at(&self, gpa: u64) -> Option<&Memslot> {
        self.slots.values().find(|s| s.contains(gpa))
    }

    /// Create vCPU `id`.
    pub fn create_vcpu_fd(&self, id: usize) -> Result<kvm_ioctls::VcpuFd, VmError> {
        self.fd
            .create_vcpu(id as u64)
            .map_err(|e| VmError::CreateVcpu {
                id,
                text: sys::errno_text(e.errno()),
            })
    }

    /// The VM's binary stats now (empty if the kernel has no stats fd).
    #[must_use]
    pub fn stats(&self) -> StatsSnapshot {
        self.stats
            .as_ref()
            .and_then(|s| s.snapshot().ok())
            .unwrap_or_default()
    }
}
