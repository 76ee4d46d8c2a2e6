//! Making the host mappings behind guest memory: anonymous, THP-aligned, hugetlb, memfd, and
//! a regular file on a disk filesystem.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

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
        Backing::File => {
            let fd = backing_file(mapped)?;
            let ptr = mmap(len, libc::MAP_SHARED, Some(&fd)).map_err(sys("mmap"))?;
            (ptr, Some(fd))
        }
    })
}

/// The environment variable naming the directory of [`Backing::File`]'s file.
pub const FILE_DIR_ENV: &str = "TRACKCHECK_FILE_DIR";

/// The directory [`Backing::File`] makes its file in: `TRACKCHECK_FILE_DIR`, else `/var/tmp`.
#[must_use]
pub fn file_dir() -> PathBuf {
    std::env::var_os(FILE_DIR_ENV).map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

/// Why [`Backing::File`] cannot be used here, if it cannot: [`file_dir`] is missing, or its
/// filesystem keeps pages in memory only (tmpfs, ramfs, hugetlbfs): there writeback cleans
/// nothing and pageout cannot evict, so the backing would not be what it claims.
#[must_use]
pub fn file_refusal() -> Option<String> {
    let dir = file_dir();
    if !dir.is_dir() {
        return Some(format!(
            "{} is not a directory; point {FILE_DIR_ENV} at a directory on a disk filesystem",
            dir.display()
        ));
    }
    let magic = match fs_magic(&dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("statfs {}: {e}", dir.display())),
    };
    // statfs f_type values (linux/magic.h).
    let memory_only: [(i64, &str); 3] = [
        (0x0102_1994, "tmpfs"),
        (0x8584_58f6, "ramfs"),
        (0x9584_58f6, "hugetlbfs"),
    ];
    memory_only
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, fs)| {
            format!(
                "{} is on {fs}, which keeps file pages in memory only (no writeback to clean \
                 them, no pageout to evict them); point {FILE_DIR_ENV} at a directory on a disk \
                 filesystem",
                dir.display()
            )
        })
}

/// A `bytes`-long regular file in [`file_dir`], already unlinked (so it vanishes with its last
/// mapping, even if the process is killed). Refused, as unsupported, for [`file_refusal`]'s
/// reasons.
fn backing_file(bytes: u64) -> Result<OwnedFd, MemoryError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    if let Some(reason) = file_refusal() {
        return Err(MemoryError::Unsupported {
            backing: Backing::File,
            reason,
        });
    }
    let path = file_dir().join(format!(
        "trackcheck-guest-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let sys = |call: &'static str| {
        move |source: io::Error| MemoryError::Sys {
            call,
            backing: Backing::File,
            bytes,
            source,
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(sys("open (TRACKCHECK_FILE_DIR)"))?;
    std::fs::remove_file(&path).map_err(sys("unlink"))?;
    file.set_len(bytes).map_err(sys("ftruncate"))?;
    Ok(OwnedFd::from(file))
}

/// The filesystem type (`f_type` of statfs) of `path`.
fn fs_magic(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string and `st` a writable statfs-sized buffer; the
    // result is checked before the buffer is read.
    if unsafe { libc::statfs(c_path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled the buffer (it was zeroed before, too).
    let st = unsafe { st.assume_init() };
    Ok(st.f_type)
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
