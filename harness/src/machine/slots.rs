//! Memslots: the fixed system and control slots, the data region's slots (one, or several
//! with `data_slot_pages`) over one shared host mapping, and the operations scenarios make on
//! data slots while tracking (delete, restore, move).

use std::sync::Arc;

use trackcheck_guests::layout::{CONTROL_GPA, DATA_GPA, LeafEntries, PAGE_SIZE, SYSTEM_GPA};

use crate::arch;
use crate::memory::{Backing, GuestMemory};
use crate::vm::Vm;

use super::layout::{LeafTables, Planned};
use super::{Machine, MachineConfig, MachineError};

/// Memslot of the system region.
pub const SYSTEM_SLOT: u32 = 0;
/// Memslot of the control pages.
pub const CONTROL_SLOT: u32 = 1;
/// Memslot of the data region.
pub const DATA_SLOT: u32 = 2;

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

/// The memory of one of the machine's fixed slots, which exist from `Machine::new` on and are
/// never deleted by the machine.
pub(super) fn fixed_slot(vm: &Vm, slot: u32) -> &GuestMemory {
    match vm.slot(slot) {
        Ok(s) => &s.memory,
        Err(e) => panic!("machine slot {slot} missing: {e}"),
    }
}

/// Field `offset` (see `layout::control`) of `vcpu`'s control page, acquire-loaded.
pub(super) fn control_field(vm: &Vm, vcpu: usize, offset: u64) -> u64 {
    fixed_slot(vm, CONTROL_SLOT).load_acquire(vcpu as u64 * PAGE_SIZE + offset)
}

/// Make the system, control and data slots of a machine laid out as `planned`: write the
/// page tables (those in the data region go there), fault in the control pages (and the data
/// region with `populate`). Returns the data region's memory and, with `tables_in_data`, where
/// its leaf entries are and the table bytes as built.
pub(super) fn add_slots(
    vm: &mut Vm,
    config: &MachineConfig,
    planned: &Planned,
) -> Result<(Arc<GuestMemory>, Option<LeafTables>), MachineError> {
    let Planned {
        layout,
        tables: pt,
        leaf_area,
    } = planned;
    let vcpus_bytes = config.vcpus as u64 * PAGE_SIZE;
    let system = GuestMemory::new(Backing::Anon, layout.bytes)?;
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
    for (i, (first, pages)) in data_extents(config)?.into_iter().enumerate() {
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
    Ok((data, leaf))
}

impl Machine {
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
}
