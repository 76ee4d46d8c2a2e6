//! x86 host-side registers of a machine: the MSRs and the VM clock a VMM sets for its guest
//! (kvmclock, steal time), which a CPL3 guest cannot set itself. Built on x86_64 hosts only.

use super::{Machine, MachineError};

impl Machine {
    /// Set model-specific registers of vCPU `vcpu` (KVM_SET_MSRS, as a VMM does: the
    /// kvmclock and steal-time MSRs a CPL3 guest cannot write itself). Returns how many KVM
    /// accepted, in order. x86 only.
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
}
