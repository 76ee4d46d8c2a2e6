//! VM capabilities a machine enables right after KVM_CREATE_VM: the dirty ring (plain or
//! ACQ_REL), its backup bitmap, and arm64's eager split chunk size. KVM takes these only while
//! the VM has no vCPU (the ring) or no memslot (the others), so [`enable_tracking_caps`] runs
//! before anything else is made. `EINVAL` from KVM_ENABLE_CAP is a skip with a reason, any other
//! errno an error.

use crate::host::Backend;
use crate::track::dirty_ring::{cpu_dirty_log_entries, host_page_bytes, ring_size_rule};
use crate::vm::Vm;

use super::{MachineConfig, MachineError};

/// KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or DIRTY_LOG_RING on x86, which orders strongly anyway)
/// with `bytes` per vCPU; must run before any vCPU exists. A size KVM refuses on this host
/// ([`ring_size_rule`], from the backend's PML setting and the page size) is a skip with the
/// rule as the reason, found before the ioctl. An EINVAL from a size the rule allows is an
/// error naming the rule: this kernel's rule differs from the one the suite knows.
fn enable_dirty_ring(vm: &Vm, bytes: u32, backend: &Backend) -> Result<(), MachineError> {
    const ACQ_REL: u32 = 223;
    const PLAIN: u32 = 192;
    let what = format!("a {bytes}-byte dirty ring");
    let unsupported = |reason: String| MachineError::Unsupported {
        what: what.clone(),
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
    if bytes > max {
        return Err(unsupported(format!(
            "the most KVM takes here is {max} bytes (the capability's value)"
        )));
    }
    let cpu_log = cpu_dirty_log_entries(backend);
    ring_size_rule(bytes, cpu_log, host_page_bytes()).map_err(unsupported)?;
    let arg = kvm_bindings::kvm_enable_cap {
        cap,
        args: [u64::from(bytes), 0, 0, 0],
        ..Default::default()
    };
    vm.fd().enable_cap(&arg).map_err(|e| {
        let text = crate::sys::errno_text(e.errno());
        let pml = match backend.pml {
            Some(on) => format!("PML {}", if on { "on" } else { "off" }),
            None => "no PML parameter".into(),
        };
        let rule = if e.errno() == libc::EINVAL {
            format!(
                ": the suite's rule (KVM_DIRTY_RING_RSVD_ENTRIES 64 + {cpu_log} CPU dirty-log \
                 entries, {pml}, page size {}, from kvm_vm_ioctl_enable_dirty_log_ring) allowed \
                 it, so this kernel's rule differs: read its kvm_dirty_ring_get_rsvd_entries() \
                 and kvm_cpu_dirty_log_size(), or pick a larger ring",
                host_page_bytes()
            )
        } else {
            String::new()
        };
        MachineError::Vcpu {
            vcpu: 0,
            text: format!("KVM_ENABLE_CAP({what}): {text}{rule}"),
        }
    })
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
pub(super) fn enable_tracking_caps(
    vm: &Vm,
    config: &MachineConfig,
    backend: &Backend,
) -> Result<(), MachineError> {
    if let Some(bytes) = config.dirty_ring {
        enable_dirty_ring(vm, bytes, backend)?;
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
