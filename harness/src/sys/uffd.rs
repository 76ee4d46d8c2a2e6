//! userfaultfd: open a descriptor and ask the kernel which features it offers.
//!
//! The Debian headers on some build hosts predate WP_ASYNC, so the feature bits and ioctl
//! numbers are spelled out here from include/uapi/linux/userfaultfd.h.

use std::fs::{File, OpenOptions};
use std::io;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// In: features wanted; out: features offered.
    pub features: u64,
    /// Out: ioctls offered.
    pub ioctls: u64,
}

/// Feature bits and their names, in bit order.
pub const FEATURES: &[(u64, &str)] = &[
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (1 << 5, "MISSING_SHMEM"),
    (1 << 6, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (1 << 10, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (1 << 12, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (1 << 14, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults.
pub const FEATURE_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;

/// Names of the bits set in `features`.
#[must_use]
pub fn feature_names(features: u64) -> Vec<String> {
    FEATURES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, n)| (*n).to_string())
        .collect()
}

/// Open a userfaultfd: the syscall first, then /dev/userfaultfd (which works where
/// vm.unprivileged_userfaultfd forbids the syscall).
pub fn open() -> io::Result<File> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1; checked below.
    let ret = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if ret >= 0 {
        let fd = i32::try_from(ret).map_err(io::Error::other)?;
        // SAFETY: `fd` is a fresh descriptor returned by the kernel (checked non-negative),
        // owned by nothing else.
        return Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    let syscall_error = io::Error::last_os_error();
    let Ok(dev) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    else {
        return Err(syscall_error);
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the open flags by value and returns a new fd or -1.
    let ret = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ret` is a fresh descriptor returned by the kernel (checked non-negative).
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(ret) }))
}

/// Handshake on `fd` asking for `features`; returns what the kernel offers.
pub fn api(fd: &impl AsRawFd, features: u64) -> io::Result<UffdioApi> {
    let mut arg = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `struct uffdio_api`, which `arg` is
    // (repr(C), three u64); `fd` is a live userfaultfd.
    let ret = unsafe { ioctl_with_mut_ref(fd, UFFDIO_API(), &mut arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(arg)
    }
}

/// The features this kernel offers (a throwaway descriptor is opened and handshaken).
pub fn probe_features() -> io::Result<u64> {
    let fd = open()?;
    Ok(api(&fd, 0)?.features)
}

ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    /// Start (page aligned).
    pub start: u64,
    /// Length (page multiple).
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    /// Range to register.
    pub range: UffdioRange,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: ioctls available on the range.
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    /// Range.
    pub range: UffdioRange,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `UFFDIO_REGISTER_MODE_WP`.
pub const REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect and wake the faulting thread).
pub const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// Bytes of a `struct uffd_msg`.
pub const MSG_BYTES: usize = 32;

/// UFFDIO_REGISTER `[start, start + len)` in `mode`.
pub fn register(fd: &impl AsRawFd, start: u64, len: u64, mode: u64) -> io::Result<()> {
    let mut arg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`, which `arg` is
    // (repr(C)); the range is only recorded by the kernel, not dereferenced by this call.
    let ret = unsafe { ioctl_with_mut_ref(fd, UFFDIO_REGISTER(), &mut arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// UFFDIO_UNREGISTER `[start, start + len)`.
pub fn unregister(fd: &impl AsRawFd, start: u64, len: u64) -> io::Result<()> {
    let arg = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`, which `arg` is (repr(C)).
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, UFFDIO_UNREGISTER(), &arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// UFFDIO_WAKE `[start, start + len)`: wake threads blocked on faults in the range (they retry
/// the access). UFFDIO_UNREGISTER wakes only missing-mode faults, not write-protect ones.
pub fn wake(fd: &impl AsRawFd, start: u64, len: u64) -> io::Result<()> {
    let arg = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`, which `arg` is (repr(C)); the
    // kernel only compares the range with its waiters' addresses.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, UFFDIO_WAKE(), &arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// UFFDIO_WRITEPROTECT `[start, start + len)`: protect (`protect`) or unprotect and wake.
pub fn writeprotect(fd: &impl AsRawFd, start: u64, len: u64, protect: bool) -> io::Result<()> {
    let mode = if protect { WRITEPROTECT_MODE_WP } else { 0 };
    let mut arg = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`, which `arg` is
    // (repr(C)); the range lies in memory registered on `fd`, which the kernel checks.
    let ret = unsafe { ioctl_with_mut_ref(fd, UFFDIO_WRITEPROTECT(), &mut arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A write-protect fault read from the descriptor: the faulting address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WpFault {
    /// Faulting host address.
    pub address: u64,
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
}

/// Read pending events (non-blocking descriptor); returns the page faults among them. Other
/// events are ignored (only page faults were asked for).
pub fn read_faults(mut fd: &File, out: &mut Vec<WpFault>) -> io::Result<()> {
    let mut buf = [0u8; MSG_BYTES * 64];
    let n = match fd.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
        Err(e) => return Err(e),
    };
    for msg in buf[..n].chunks_exact(MSG_BYTES) {
        if msg[0] != EVENT_PAGEFAULT {
            continue;
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&msg[at..at + 8]);
            u64::from_le_bytes(b)
        };
        out.push(WpFault {
            flags: word(8),
            address: word(16),
        });
    }
    Ok(())
}
