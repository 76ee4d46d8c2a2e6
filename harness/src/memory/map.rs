//! Making the host mappings behind guest memory: anonymous, THP-aligned, hugetlb, memfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use super::{Backing, HUGE_2M, MemoryError};

/// Map `mapped` bytes of `backing` (not populated). hugetlb mappings are made without
/// `MAP_NORESERVE`, so the kernel reserves their pages now (see `hugetlb`).
pub(super) fn map_backing(
    backing: Backing,
    mapped: u64,
    len: usize,
) -> Result<(NonNull<u8>, Option<OwnedFd>), MemoryError> {
    let sys = |call: &'static str| {
        move |source: io::Error| MemoryError::Sys {
            call,
            backing,
            bytes: mapped,
            source,
        }
    };
    Ok(match backing {
        Backing::Anon | Backing::Shmem => {
            let mut flags = libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            flags |= if backing == Backing::Shmem {
                libc::MAP_SHARED
            } else {
                libc::MAP_PRIVATE
            };
            (mmap(len, flags, None).map_err(sys("mmap"))?, None)
        }
        Backing::Hugetlb2M | Backing::Hugetlb1G => {
            let size = if backing == Backing::Hugetlb2M {
                libc::MAP_HUGE_2MB
            } else {
                libc::MAP_HUGE_1GB
            };
            let flags = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_HUGETLB | size;
            (mmap(len, flags, None).map_err(sys("mmap"))?, None)
        }
        Backing::Thp => (mmap_aligned(len, HUGE_2M).map_err(sys("mmap"))?, None),
        Backing::Memfd | Backing::MemfdHugetlb2M => {
            let fd = memfd(backing, mapped).map_err(sys("memfd_create/ftruncate"))?;
            let ptr = mmap(len, libc::MAP_SHARED, Some(&fd)).map_err(sys("mmap"))?;
            (ptr, Some(fd))
        }
    })
}

fn mmap(len: usize, flags: libc::c_int, fd: Option<&OwnedFd>) -> io::Result<NonNull<u8>> {
    let raw_fd = fd.map_or(-1, AsRawFd::as_raw_fd);
    // SAFETY: a fresh mapping at a kernel-chosen address (no MAP_FIXED) cannot alias any
    // existing Rust object; the result is checked against MAP_FAILED below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            raw_fd,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))
    }
}

/// Anonymous private mapping of `len` bytes aligned to `align` (over-map, then trim).
fn mmap_aligned(len: usize, align: u64) -> io::Result<NonNull<u8>> {
    let align = usize::try_from(align).map_err(io::Error::other)?;
    let span = len
        .checked_add(align)
        .ok_or_else(|| io::Error::other("size overflows"))?;
    let base = mmap(
        span,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        None,
    )?;
    let start = base.as_ptr() as usize;
    let aligned = start.div_ceil(align) * align;
    let head = aligned - start;
    let tail = span - head - len;
    if head > 0 {
        // SAFETY: `base..base+head` is the start of the fresh `span`-byte mapping, before
        // `aligned`; nothing refers to it.
        unsafe { libc::munmap(base.as_ptr().cast(), head) };
    }
    if tail > 0 {
        // SAFETY: `head + len + tail == span`, so this pointer stays inside the fresh mapping.
        let tail_start = unsafe { base.as_ptr().add(head + len) };
        // SAFETY: `tail_start..+tail` is the end of the fresh mapping, after `aligned + len`;
        // nothing refers to it.
        unsafe { libc::munmap(tail_start.cast(), tail) };
    }
    NonNull::new(aligned as *mut u8).ok_or_else(|| io::Error::other("mmap returned NULL"))
}

fn memfd(backing: Backing, bytes: u64) -> io::Result<OwnedFd> {
    let mut flags = libc::MFD_CLOEXEC;
    if backing == Backing::MemfdHugetlb2M {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a valid NUL-terminated C string literal; the result is checked.
    let fd = unsafe { libc::memfd_create(c"trackcheck-guest".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create (checked non-negative) and is owned by
    // nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::off_t::try_from(bytes).map_err(io::Error::other)?;
    // SAFETY: ftruncate on the memfd we own; the result is checked.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
