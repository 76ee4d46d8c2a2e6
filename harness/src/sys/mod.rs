//! Raw kernel interfaces that kvm-ioctls lacks, one level below meaning: each call returns the
//! errno and the layer above says what it means (STYLE.md §2).
//!
//! - [`stats`]: KVM binary statistics (`KVM_GET_STATS_FD`) on VM and vCPU fds.
//! - [`uffd`]: userfaultfd feature probe.
//! - [`pagemap`]: `PAGEMAP_SCAN` probe on `/proc/self/pagemap`.
//! - [`kick`]: the signal that kicks a vCPU thread out of `KVM_RUN`.

pub mod dirty;
pub mod kick;
pub mod pagemap;
pub mod stats;
pub mod uffd;

use kvm_ioctls::{Kvm, VmFd};
use std::io;
use std::path::{Path, PathBuf};

/// Environment variable naming the KVM device to open instead of `/dev/kvm` (tests use it to
/// check the hints for a missing or unreadable device).
pub const KVM_DEVICE_ENV: &str = "TRACKCHECK_KVM_DEVICE";

/// Why KVM cannot be used; the message says what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
pub enum KvmUnavailable {
    /// The device node does not exist.
    #[error(
        "{path}: no such device: KVM is not available on this host (is the kvm module and a \
         backend such as kvm_intel, kvm_amd or kvm_pvm loaded? inside a VM, is nested \
         virtualization enabled?)"
    )]
    Missing {
        /// Device path tried.
        path: PathBuf,
    },
    /// Permission denied.
    #[error(
        "{path}: permission denied: run as root, or add your user to the group that owns \
         {path} (usually 'kvm') and log in again"
    )]
    Denied {
        /// Device path tried.
        path: PathBuf,
    },
    /// Anything else, with the errno text.
    #[error("{path}: {error}")]
    Other {
        /// Device path tried.
        path: PathBuf,
        /// The error.
        error: String,
    },
}

impl KvmUnavailable {
    /// Classify an open error for `path`.
    #[must_use]
    pub fn from_io(path: &Path, error: &io::Error) -> Self {
        let path = path.to_path_buf();
        match error.kind() {
            io::ErrorKind::NotFound => Self::Missing { path },
            io::ErrorKind::PermissionDenied => Self::Denied { path },
            _ => Self::Other {
                path,
                error: error.to_string(),
            },
        }
    }
}

/// The KVM device path: `$TRACKCHECK_KVM_DEVICE` or `/dev/kvm`.
#[must_use]
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV).map_or_else(|| PathBuf::from("/dev/kvm"), PathBuf::from)
}

/// Open KVM, with an actionable error when it cannot be opened.
pub fn open_kvm() -> Result<Kvm, KvmUnavailable> {
    let path = kvm_device_path();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        KvmUnavailable::Other {
            path: path.clone(),
            error: "path contains a NUL byte".into(),
        }
    })?;
    Kvm::new_with_path(&c_path)
        .map_err(|e| KvmUnavailable::from_io(&path, &io::Error::from_raw_os_error(e.errno())))
}

/// Guest-physical address bits a guest can use: the arm64 guests' stage 1 outputs 40-bit IPAs
/// (TCR_EL1.IPS in `arch/aarch64.rs`), and every layout (`guests::layout`) stays below 1 TiB.
pub const GUEST_IPA_BITS: u32 = 40;

/// KVM_CREATE_VM with the guest-physical address space the guests need.
///
/// On arm64, kvm-ioctls' `create_vm` asks for the host's IPA limit (52 bits where the CPU has
/// LPA2). That costs nothing while the VM lives, but with "KVM: arm64: Split
/// kvm_pgtable_stage2_destroy()" (2025; in Debian 7.2, not in 6.12) KVM destroys stage 2 in
/// 1 GiB steps over the whole IPA space, rescheduling between them: 2^22 walks for a 52-bit VM,
/// measured at about 2 s of kernel time per VM in the emulated arm64 host on 7.2 (6.12:
/// milliseconds). A 40-bit stage 2 (KVM's default size) is what the
/// guests can address anyway; where the host's limit is lower, the limit is used.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, kvm_ioctls::Error> {
    #[cfg(target_arch = "aarch64")]
    {
        let limit = kvm.get_host_ipa_limit();
        if let Ok(limit) = u32::try_from(limit)
            && limit > 0
        {
            return kvm.create_vm_with_ipa_size(limit.min(GUEST_IPA_BITS));
        }
        kvm.create_vm_with_type(0)
    }
    #[cfg(not(target_arch = "aarch64"))]
    kvm.create_vm()
}

/// Text for an errno returned by a KVM ioctl, with the EIO hint from STYLE.md: KVM answers EIO
/// when it has marked the VM dead (a KVM_BUG_ON or an internal error).
#[must_use]
pub fn errno_text(errno: i32) -> String {
    let base = io::Error::from_raw_os_error(errno).to_string();
    if errno == libc::EIO {
        format!("{base} (KVM marked the VM dead: see dmesg for a KVM_BUG_ON or WARN)")
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_give_hints() {
        let p = Path::new("/dev/kvm");
        let missing = KvmUnavailable::from_io(p, &io::Error::from_raw_os_error(libc::ENOENT));
        assert!(missing.to_string().contains("kvm module"));
        let denied = KvmUnavailable::from_io(p, &io::Error::from_raw_os_error(libc::EACCES));
        assert!(denied.to_string().contains("run as root"));
        assert!(errno_text(libc::EIO).contains("dmesg"));
    }
}
