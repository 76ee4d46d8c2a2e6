//! arm64: vCPU init (the preferred target, PSCI 0.2), registers through KVM_{GET,SET}_ONE_REG,
//! the guest's stage-1 translation (4 KiB granule, 48-bit addresses, identity-mapped by the
//! harness's tables, normal write-back memory) so guest accesses are cacheable and coherent with
//! the host's, and the page-table entry format.

use kvm_bindings::kvm_vcpu_init;
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::vm::Vm;

/// What the guest CPU may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCpuFacts {
    /// 1 GiB blocks (level-1 block descriptors, always there with the 4 KiB granule).
    pub pages_1g: bool,
    /// Paravirtual features (none are probed on arm64).
    pub pv_features: Vec<String>,
}

/// Guest CPU facts: the 4 KiB granule always has 1 GiB blocks.
pub fn guest_cpu_facts(_kvm: &kvm_ioctls::Kvm) -> Result<GuestCpuFacts, String> {
    Ok(GuestCpuFacts {
        pages_1g: true,
        pv_features: Vec::new(),
    })
}

/// `KVM_ARM_VCPU_PSCI_0_2`: the vCPU speaks PSCI 0.2 (SYSTEM_OFF ends it cleanly).
const VCPU_PSCI_0_2: u32 = 2;

/// Make `fd` (vCPU `id` of `vm`) an arm64 vCPU of the host's preferred target with PSCI 0.2.
pub fn init_vcpu(vm: &Vm, fd: &VcpuFd, id: usize) -> Result<(), String> {
    let mut kvi = kvm_vcpu_init::default();
    vm.fd().get_preferred_target(&mut kvi).map_err(|e| {
        format!(
            "KVM_ARM_PREFERRED_TARGET: {}",
            crate::sys::errno_text(e.errno())
        )
    })?;
    kvi.features[0] |= 1 << VCPU_PSCI_0_2;
    fd.vcpu_init(&kvi).map_err(|e| {
        format!(
            "KVM_ARM_VCPU_INIT vCPU {id}: {}",
            crate::sys::errno_text(e.errno())
        )
    })
}

/// Where a vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Exception level: 1.
    pub cpl: u8,
    /// First instruction.
    pub pc: u64,
    /// Initial stack pointer (SP_EL1).
    pub stack_top: u64,
    /// Stage-1 translation table root (TTBR0_EL1).
    pub page_table_root: u64,
}

const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// ONE_REG id of the core register at byte `offset` of `struct kvm_regs`.
const fn core(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / 4)
}

/// ONE_REG id of system register (op0, op1, CRn, CRm, op2).
const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

/// `kvm_regs.regs.pc` (after x0..x30 and sp).
const PC: u64 = core(32 * 8);
/// `kvm_regs.regs.pstate`.
const PSTATE: u64 = core(33 * 8);
/// `kvm_regs.sp_el1`.
const SP_EL1: u64 = core(34 * 8);
const SCTLR_EL1: u64 = sysreg(3, 0, 1, 0, 0);
const TTBR0_EL1: u64 = sysreg(3, 0, 2, 0, 0);
const TCR_EL1: u64 = sysreg(3, 0, 2, 0, 2);
const MAIR_EL1: u64 = sysreg(3, 0, 10, 2, 0);

/// EL1 with SP_EL1 (EL1h), every interrupt masked (DAIF).
const PSTATE_EL1H_MASKED: u64 = 0x3c5;
/// MAIR_EL1: attribute 0 normal write-back read/write-allocate, attribute 1 device.
const MAIR: u64 = 0xff;
/// TCR_EL1: 48-bit VA (T0SZ 16), write-back walks (IRGN0/ORGN0 01), inner shareable (SH0 11),
/// 4 KiB granule (TG0 00), no TTBR1 walks (EPD1), 40-bit IPA (IPS 010).
const TCR: u64 = 16 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32);
/// SCTLR_EL1: MMU on (M), data and instruction caches on (C, I).
const SCTLR_M_C_I: u64 = 1 | (1 << 2) | (1 << 12);

fn set(fd: &VcpuFd, id: u64, what: &str, value: u64) -> Result<(), String> {
    fd.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| {
            format!(
                "KVM_SET_ONE_REG {what}: {}",
                crate::sys::errno_text(e.errno())
            )
        })
}

fn get(fd: &VcpuFd, id: u64, what: &str) -> Result<u64, String> {
    let mut bytes = [0u8; 8];
    fd.get_one_reg(id, &mut bytes).map_err(|e| {
        format!(
            "KVM_GET_ONE_REG {what}: {}",
            crate::sys::errno_text(e.errno())
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// Put vCPU `fd` at EL1 with its MMU on over `entry.page_table_root`, ready to run `entry.pc`.
pub fn set_entry(fd: &VcpuFd, entry: Entry) -> Result<(), String> {
    set(fd, MAIR_EL1, "MAIR_EL1", MAIR)?;
    set(fd, TCR_EL1, "TCR_EL1", TCR)?;
    set(fd, TTBR0_EL1, "TTBR0_EL1", entry.page_table_root)?;
    let sctlr = get(fd, SCTLR_EL1, "SCTLR_EL1")?;
    set(fd, SCTLR_EL1, "SCTLR_EL1", sctlr | SCTLR_M_C_I)?;
    set(fd, SP_EL1, "SP_EL1", entry.stack_top)?;
    set(fd, PSTATE, "PSTATE", PSTATE_EL1H_MASKED)?;
    set(fd, PC, "PC", entry.pc)
}

/// The vCPU's program counter and exception level, for reports.
#[must_use]
pub fn pc_and_cpl(fd: &VcpuFd) -> Option<(u64, u8)> {
    let pc = get(fd, PC, "PC").ok()?;
    let pstate = get(fd, PSTATE, "PSTATE").ok()?;
    Some((pc, u8::try_from((pstate >> 2) & 3).unwrap_or(0)))
}

/// Nothing to do: KVM invalidates the VM's combined stage-1/stage-2 TLB entries whenever a
/// memslot changes (the only time the host rewrites these tables), and guest page-table ops
/// are not written for arm64.
pub fn reset_mmu(_fd: &VcpuFd) -> Result<(), String> {
    Ok(())
}

/// Translation-table descriptor bits (VMSAv8-64, 4 KiB granule).
pub mod pte {
    /// Valid.
    pub const VALID: u64 = 1 << 0;
    /// At levels 0-2: a table descriptor (clear: a block); at level 3: a page (must be set).
    pub const TABLE: u64 = 1 << 1;
    /// AP[2]: read-only.
    pub const RDONLY: u64 = 1 << 7;
    /// Inner shareable.
    pub const SH_INNER: u64 = 3 << 8;
    /// Access flag.
    pub const AF: u64 = 1 << 10;
    /// Dirty bit modifier (hardware dirty state).
    pub const DBM: u64 = 1 << 51;
    /// Privileged execute-never.
    pub const PXN: u64 = 1 << 53;
    /// Unprivileged execute-never.
    pub const UXN: u64 = 1 << 54;
    /// Accessed, under the name the architecture-neutral code uses.
    pub const A: u64 = AF;
    /// The bit architecture-neutral code calls dirty: DBM (the guest A/D scenarios are written
    /// for x86 page tables only).
    pub const D: u64 = DBM;
    /// Output-address bits.
    pub const ADDR: u64 = 0x0000_ffff_ffff_f000;
}

/// arm64 descriptors: tables at levels 0-2, blocks at 1-2 (1 GiB, 2 MiB), pages at level 3;
/// leaves are normal memory (MAIR attribute 0), inner shareable, accessed (the access flag is
/// always set: no access-flag faults), read-only unless writable, execute-never unless
/// executable.
pub const FORMAT: super::tables::Format = super::tables::Format {
    table: |child| child | pte::VALID | pte::TABLE,
    leaf: |level, writable, executable, _preset_ad| {
        let mut flags = pte::VALID | pte::SH_INNER | pte::AF;
        if level == 1 {
            flags |= pte::TABLE;
        }
        if !writable {
            flags |= pte::RDONLY;
        }
        if !executable {
            flags |= pte::PXN | pte::UXN;
        }
        flags
    },
    present: |e| e & pte::VALID != 0,
    block: |e, level| level > 1 && e & pte::TABLE == 0,
    addr: pte::ADDR,
};
