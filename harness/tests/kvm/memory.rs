//! Memory trials: memslot operations, guest 2 MiB pages, data slots, guest page tables.

use super::*;

pub(super) fn memslot_operations() -> Check {
    let mut vm = Vm::new()?;
    let pages = 64u64;
    let mem = GuestMemory::new(Backing::Anon, pages * PAGE_SIZE)?;
    mem.populate()?;
    let size = usize::try_from(pages * PAGE_SIZE)?;
    vm.add_slot(5, 0x1000_0000, mem, None, 0)?;
    ensure(vm.fd().get_dirty_log(5, size).is_err(), || {
        "KVM_GET_DIRTY_LOG succeeded on a slot without logging".into()
    })?;
    vm.set_dirty_logging(5, true)?;
    ensure(vm.slot(5)?.logging(), || "logging flag not recorded".into())?;
    let bitmap = vm.fd().get_dirty_log(5, size)?;
    ensure(bitmap.len() == 1 && bitmap[0] == 0, || {
        format!("fresh slot reports dirty pages: {bitmap:x?}")
    })?;
    vm.move_slot(5, 0x2000_0000)?;
    ensure(
        vm.slot_at(0x2000_0000).is_some_and(|s| s.id == 5) && vm.slot_at(0x1000_0000).is_none(),
        || "move not recorded".into(),
    )?;
    vm.set_dirty_logging(5, false)?;
    ensure(!vm.slot(5)?.logging(), || {
        "logging still recorded as on".into()
    })?;
    let slot = vm.delete_slot(5)?;
    ensure(vm.slot(5).is_err(), || "deleted slot still listed".into())?;
    vm.add_slot_shared(5, 0x1000_0000, slot.memory, slot.offset, slot.size, 0)?;
    let dup = GuestMemory::new(Backing::Anon, PAGE_SIZE)?;
    ensure(
        matches!(
            vm.add_slot(5, 0x3000_0000, dup, None, 0),
            Err(VmError::Slot { slot: 5, .. })
        ),
        || "duplicate slot id accepted".into(),
    )?;
    let overlap = GuestMemory::new(Backing::Anon, PAGE_SIZE)?;
    let err = vm
        .add_slot(6, 0x1000_0000, overlap, None, 0)
        .err()
        .ok_or("overlapping slot accepted")?;
    let text = err.to_string();
    ensure(
        text.contains("KVM_SET_USER_MEMORY_REGION slot 6") && text.contains("gpa 0x10000000"),
        || format!("error does not name the ioctl and slot: {text}"),
    )?;
    let stats = vm.stats();
    ensure(stats.get("pages_4k").is_some(), || {
        format!(
            "VM stats lack pages_4k: {:?}",
            stats.0.keys().collect::<Vec<_>>()
        )
    })
}

/// Guest 2 MiB mappings of the data region, writing pages that are not the first 4 KiB of
/// their 2 MiB. With THP backing KVM can map 2 MiB itself; the VM's pages_2m statistic shows
/// whether it did.
pub(super) fn guest_2m_pages(backing: Backing) -> Check {
    let regions = 8u64;
    let data_pages = regions * 512;
    let mut ops = Vec::new();
    for r in 0..regions {
        ops.push(Op::Write {
            page: r * 512 + 7,
            offset: 0,
        });
    }
    ops.push(Op::Sync(1));
    for r in 0..regions {
        ops.push(Op::Write {
            page: r * 512 + 300 + r,
            offset: 8,
        });
    }
    let program = Program::new(data_pages, vec![Thread::new(ops)]);
    let config = MachineConfig {
        data_pages,
        backing,
        guest_page_size: GuestPageSize::Size2M,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(config)?;
    m.load(&program)?;
    m.run_to_completion()?;
    check_memory(&m, &program)?;
    let stats = m.vm_stats();
    let thp = thp_bytes_in(m.data().host_addr(), m.data().mapped_len());
    eprintln!(
        "{backing} + guest 2M: host THP {} MiB, KVM pages_2m {:?} pages_4k {:?}",
        thp >> 20,
        stats.get("pages_2m"),
        stats.get("pages_4k")
    );
    if backing == Backing::Thp && thp >= 2 << 20 {
        ensure(stats.get("pages_2m").is_some_and(|n| n > 0), || {
            format!(
                "THP-backed memory mapped 2 MiB by the guest, but KVM installed no 2 MiB mapping: {stats:?}"
            )
        })?;
    }
    Ok(())
}

/// A data region split into slots of unaligned sizes: the guest writes every page; one slot is
/// deleted (touching it then would be MMIO) and restored, another moved (the guest's mappings
/// follow it); the memory stays one contiguous host view throughout.
pub(super) fn data_slots(mode: ExecutionMode) -> Check {
    use trackcheck_harness::machine::DATA_SLOT;
    let sizes = vec![1u64, 63, 65, 127];
    let pages: u64 = sizes.iter().sum();
    let mut m = Machine::new(MachineConfig {
        vcpus: 1,
        data_pages: pages,
        mode,
        data_slot_pages: sizes.clone(),
        ..MachineConfig::default()
    })?;
    let layout = m.data_layout();
    ensure(
        layout.extents.iter().map(|e| e.pages).collect::<Vec<_>>() == sizes
            && layout.locate(64) == Some((DATA_SLOT + 2, 0)),
        || format!("layout {layout:?}"),
    )?;
    ensure(m.data_slots() == vec![2, 3, 4, 5], || {
        format!("slots {:?}", m.data_slots())
    })?;
    let all = Program::new(
        pages,
        vec![Thread::new(vec![Op::Loop {
            pages: PageSeq::Range {
                start: 0,
                count: pages,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(1),
        }])],
    );
    m.load(&all)?;
    m.run_to_completion()?;
    check_memory(&m, &all)?;
    m.delete_data_slot(DATA_SLOT + 1)?;
    ensure(m.data_slots() == vec![2, 4, 5], || {
        format!("after delete: {:?}", m.data_slots())
    })?;
    m.restore_data_slot(DATA_SLOT + 1)?;
    let to = 0x20_0000_0000;
    m.move_data_slot(DATA_SLOT + 3, to)?;
    ensure(
        m.data_layout().gpa(pages - 1) == to + 126 * PAGE_SIZE,
        || format!("moved layout {:?}", m.data_layout()),
    )?;
    let again = all.clone().with_seq_base(1000);
    m.load(&again)?;
    m.run_to_completion()?;
    check_memory(&m, &again)
}

/// The data region's page tables in the data region: the guest clears A/D bits and remaps a
/// page; after the host's flush its accesses use the new entries and set their bits; `reset`
/// rebuilds the tables.
pub(super) fn guest_page_tables(mode: ExecutionMode) -> Check {
    use trackcheck_harness::arch::pte;
    let mut m = Machine::new(MachineConfig {
        vcpus: 1,
        data_pages: 1024,
        mode,
        tables_in_data: true,
        ..MachineConfig::default()
    })?;
    ensure(m.program_pages() == 1022, || {
        format!("{} program pages", m.program_pages())
    })?;
    let fresh = m.leaf_entry(3).ok_or("no leaf entries")?;
    ensure(fresh & (pte::A | pte::D) == 0, || {
        format!("entries start with A/D set: {fresh:#x}")
    })?;
    let program = Program::new(
        m.program_pages(),
        vec![Thread::new(vec![
            Op::Write { page: 3, offset: 0 },
            Op::Write { page: 5, offset: 0 },
            Op::Sync(1),
            Op::ClearAd { page: 3 },
            Op::Remap { page: 5, to: 900 },
            Op::Sync(2),
            Op::Read { page: 3, offset: 0 },
            Op::Write { page: 5, offset: 8 },
        ])],
    );
    m.load(&program)?;
    m.run()?;
    let written = m.leaf_entry(3).unwrap_or(0);
    ensure(written & (pte::A | pte::D) == pte::A | pte::D, || {
        format!("a written page's entry lacks A/D: {written:#x}")
    })?;
    m.run()?;
    m.reset_guest_mmu()?;
    m.run_to_completion()?;
    let read = m.leaf_entry(3).unwrap_or(0);
    ensure(read & (pte::A | pte::D) == pte::A, || {
        format!("a read page's entry after the clear: {read:#x}")
    })?;
    ensure(
        m.data().read_u64(900 * PAGE_SIZE + 8) != 0 && m.data().read_u64(5 * PAGE_SIZE + 8) == 0,
        || "the write after the remap did not land in page 900".into(),
    )?;
    m.reset()?;
    ensure(m.leaf_entry(5) == Some(fresh + 2 * PAGE_SIZE), || {
        format!("reset left entry {:#x?}", m.leaf_entry(5))
    })
}
