//! x86_64: guest CPU facts, vCPU register setup for a privilege level, guest page tables.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_segment};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// What the guest CPU may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCpuFacts {
    /// 1 GiB guest pages (CPUID 0x80000001 EDX bit 26, `pdpe1gb`).
    pub pages_1g: bool,
    /// KVM paravirtual features offered (CPUID 0x40000001 EAX), by name.
    pub pv_features: Vec<String>,
}

const PV_FEATURES: &[(u32, &str)] = &[
    (0, "clocksource"),
    (1, "nop_io_delay"),
    (3, "clocksource2"),
    (4, "async_pf"),
    (5, "steal_time"),
    (6, "pv_eoi"),
    (7, "pv_unhalt"),
    (9, "pv_tlb_flush"),
    (10, "async_pf_vmexit"),
    (11, "pv_send_ipi"),
    (12, "poll_control"),
    (13, "pv_sched_yield"),
    (14, "async_pf_int"),
    (15, "msi_ext_dest_id"),
    (16, "hc_map_gpa_range"),
    (17, "migration_control"),
    (24, "clocksource_stable_bit"),
];

fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, String> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| {
        format!(
            "KVM_GET_SUPPORTED_CPUID: {}",
            crate::sys::errno_text(e.errno())
        )
    })
}

/// Guest CPU facts from KVM_GET_SUPPORTED_CPUID.
pub fn guest_cpu_facts(kvm: &Kvm) -> Result<GuestCpuFacts, String> {
    let cpuid = supported_cpuid(kvm)?;
    let leaf = |function: u32| {
        cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == 0)
    };
    let pages_1g = leaf(0x8000_0001).is_some_and(|e| e.edx & (1 << 26) != 0);
    let pv = leaf(0x4000_0001).map_or(0, |e| e.eax);
    Ok(GuestCpuFacts {
        pages_1g,
        pv_features: PV_FEATURES
            .iter()
            .filter(|(bit, _)| pv & (1 << bit) != 0)
            .map(|(_, n)| (*n).to_string())
            .collect(),
    })
}

/// Set vCPU `id` of `vm` up: the CPUID KVM supports, with its APIC ids set.
pub fn init_vcpu(vm: &crate::vm::Vm, fd: &VcpuFd, id: usize) -> Result<(), String> {
    set_cpuid(vm.kvm(), fd, id)
}

/// Give vCPU `id` the CPUID KVM supports, with its APIC ids set.
pub fn set_cpuid(kvm: &Kvm, vcpu: &VcpuFd, id: usize) -> Result<(), String> {
    let mut cpuid = supported_cpuid(kvm)?;
    let apic = u32::try_from(id).map_err(|e| e.to_string())?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (apic << 24),
            0xb | 0x1f => entry.edx = apic,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(|e| {
        format!(
            "KVM_SET_CPUID2 vCPU {id}: {}",
            crate::sys::errno_text(e.errno())
        )
    })
}

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: toggling it makes KVM drop its shadow MMU roots (a host-side TLB flush).
pub const CR4_PGE: u64 = 1 << 7;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Where a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Privilege level: 0 (kernel) or 3 (user).
    pub cpl: u8,
    /// First instruction.
    pub pc: u64,
    /// Initial stack pointer.
    pub stack_top: u64,
    /// Page-table root.
    pub page_table_root: u64,
}

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Put vCPU `fd` in 64-bit long mode at `entry.cpl`, ready to run `entry.pc`.
///
/// CPL0 uses the flat kernel selectors 0x08/0x10, CPL3 the user selectors 0x33/0x2b (what PVM
/// needs to run a guest natively). There is no GDT or IDT behind them: the code never reloads a
/// segment, and any exception is meant to end in a triple fault the watchdog reports.
pub fn set_entry(fd: &VcpuFd, entry: Entry) -> Result<(), String> {
    let err =
        |what: &str, e: kvm_ioctls::Error| format!("{what}: {}", crate::sys::errno_text(e.errno()));
    let mut sregs = fd.get_sregs().map_err(|e| err("KVM_GET_SREGS", e))?;
    let (code_sel, data_sel) = if entry.cpl == 3 {
        (0x33, 0x2b)
    } else {
        (0x08, 0x10)
    };
    sregs.cs = segment(code_sel, true, entry.cpl);
    let data = segment(data_sel, false, entry.cpl);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 11,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = entry.page_table_root;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
    fd.set_sregs(&sregs).map_err(|e| err("KVM_SET_SREGS", e))?;
    let regs = kvm_bindings::kvm_regs {
        rip: entry.pc,
        rsp: entry.stack_top,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(|e| err("KVM_SET_REGS", e))?;
    Ok(())
}

/// The vCPU's instruction pointer and privilege level (from CS.DPL), for reports.
#[must_use]
pub fn pc_and_cpl(fd: &VcpuFd) -> Option<(u64, u8)> {
    let regs = fd.get_regs().ok()?;
    let sregs = fd.get_sregs().ok()?;
    Some((regs.rip, sregs.cs.dpl))
}

/// Reset KVM's MMU for the vCPU: KVM_SET_SREGS with CR4.PGE toggled, then restored (a CR4.PGE
/// change flushes every translation, global ones included). For guests that cannot flush their
/// own TLB (CPL3 on PVM). The vCPU must not be running.
pub fn reset_mmu(fd: &VcpuFd) -> Result<(), String> {
    let mut sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let cr4 = sregs.cr4;
    sregs.cr4 = cr4 ^ CR4_PGE;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS (CR4.PGE toggled): {e}"))?;
    sregs.cr4 = cr4;
    fd.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS (CR4 restored): {e}"))
}

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User-accessible (needed at every level for CPL3 code).
    pub const US: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty (leaf only).
    pub const D: u64 = 1 << 6;
    /// Page size: this entry maps a 2 MiB / 1 GiB page.
    pub const PS: u64 = 1 << 7;
    /// No-execute.
    pub const NX: u64 = 1 << 63;
    /// Physical address bits of an entry.
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

/// x86_64 4-level paging entries. Every level is user-accessible (CPL3 guests) and writable;
/// leaves carry RW, NX, and A/D when preset; PS marks 2 MiB / 1 GiB leaves.
pub const FORMAT: super::tables::Format = super::tables::Format {
    table: |child| child | pte::P | pte::RW | pte::US | pte::A,
    leaf: |level, writable, executable, preset_ad| {
        let mut flags = pte::P | pte::US;
        if writable {
            flags |= pte::RW;
        }
        if !executable {
            flags |= pte::NX;
        }
        if preset_ad {
            flags |= pte::A | pte::D;
        }
        if level > 1 {
            flags |= pte::PS;
        }
        flags
    },
    present: |e| e & pte::P != 0,
    block: |e, _| e & pte::PS != 0,
    addr: pte::ADDR,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{Mapping, PageTableError, PageTables, walk};
    use trackcheck_guests::GuestPageSize;

    fn read_from(pt: &PageTables) -> impl Fn(u64) -> Option<u64> + '_ {
        |gpa| {
            let page = gpa & !0xfff;
            let index = usize::try_from((gpa & 0xfff) / 8).ok()?;
            pt.tables.get(&page).map(|t| t[index])
        }
    }

    #[test]
    fn builds_and_walks_every_page_size() {
        let maps = [
            Mapping {
                gva: 0x20_0000,
                gpa: 0x20_0000,
                len: 0x3000,
                page: GuestPageSize::Size4K,
                writable: false,
                executable: true,
            },
            Mapping {
                gva: 1 << 32,
                gpa: 1 << 32,
                len: 4 << 20,
                page: GuestPageSize::Size2M,
                writable: true,
                executable: false,
            },
            Mapping {
                gva: 8 << 30,
                gpa: 2 << 30,
                len: 1 << 30,
                page: GuestPageSize::Size1G,
                writable: true,
                executable: false,
            },
        ];
        let needed = PageTables::pages_needed(&maps);
        let pt = PageTables::build(&maps, 0x10_0000, needed, true).expect("builds");
        assert!(pt.used_pages() <= needed);
        let r = read_from(&pt);
        let w = walk(pt.root, 0x20_1008, &r).expect("mapped");
        assert_eq!((w.gpa, w.page), (0x20_1008, GuestPageSize::Size4K));
        assert_eq!(w.leaf_entry & (pte::RW | pte::NX | pte::US), pte::US);
        let w = walk(pt.root, (1 << 32) + (3 << 20) + 0x123, &r).expect("mapped");
        assert_eq!(
            (w.gpa, w.page),
            ((1 << 32) + (3 << 20) + 0x123, GuestPageSize::Size2M)
        );
        assert_eq!(
            w.leaf_entry & (pte::RW | pte::NX | pte::D | pte::A),
            pte::RW | pte::NX | pte::D | pte::A
        );
        let w = walk(pt.root, (8 << 30) + 0x5000, &r).expect("mapped");
        assert_eq!((w.gpa, w.page), ((2 << 30) + 0x5000, GuestPageSize::Size1G));
        assert_eq!(
            walk(pt.root, 0x20_3000, &r),
            None,
            "past the end is unmapped"
        );
        assert_eq!(walk(pt.root, 0, &r), None);
    }

    #[test]
    fn rejects_overlap_misalignment_and_overflow() {
        let m = Mapping {
            gva: 0,
            gpa: 0,
            len: 0x2000,
            page: GuestPageSize::Size4K,
            writable: true,
            executable: false,
        };
        assert!(matches!(
            PageTables::build(&[m, m], 0x10_0000, 16, false),
            Err(PageTableError::Overlap { .. })
        ));
        let bad = Mapping {
            gpa: 0x1000,
            page: GuestPageSize::Size2M,
            len: 2 << 20,
            ..m
        };
        assert!(matches!(
            PageTables::build(&[bad], 0x10_0000, 16, false),
            Err(PageTableError::Unaligned { .. })
        ));
        assert!(matches!(
            PageTables::build(&[m], 0x10_0000, 2, false),
            Err(PageTableError::Full { .. })
        ));
    }

    #[test]
    fn without_preset_ad_leaves_start_clean() {
        let m = Mapping {
            gva: 0,
            gpa: 0,
            len: 0x1000,
            page: GuestPageSize::Size4K,
            writable: true,
            executable: false,
        };
        let pt = PageTables::build(&[m], 0x10_0000, 8, false).expect("builds");
        let w = walk(pt.root, 0, read_from(&pt)).expect("mapped");
        assert_eq!(w.leaf_entry & (pte::A | pte::D), 0);
    }
}
