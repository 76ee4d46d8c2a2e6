//! `PAGEMAP_SCAN` (Linux 6.7) on /proc/self/pagemap. Debian's 6.1 headers lack it, so the
//! argument struct is defined here from include/uapi/linux/fs.h.

use std::fs::File;
use std::io;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(PAGEMAP_SCAN, u32::from(b'f'), 16, PmScanArg);

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Start of the range (page aligned).
    pub start: u64,
    /// End of the range.
    pub end: u64,
    /// Out: where the walk ended.
    pub walk_end: u64,
    /// Output `struct page_region` array.
    pub vec: u64,
    /// Entries in `vec`.
    pub vec_len: u64,
    /// Most pages to report (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// Categories that must all match.
    pub category_mask: u64,
    /// Categories of which one must match.
    pub category_anyof_mask: u64,
    /// Categories to report.
    pub return_mask: u64,
}

/// Whether the running kernel has PAGEMAP_SCAN: a deliberately malformed call (size 0) is
/// answered EINVAL by a kernel that has it and ENOTTY by one that does not.
pub fn probe() -> io::Result<bool> {
    let file = File::open("/proc/self/pagemap")?;
    let mut arg = PmScanArg::default();
    // SAFETY: PAGEMAP_SCAN reads one `struct pm_scan_arg`, which `arg` is (repr(C), 12 u64);
    // with size 0 the kernel rejects it before touching any user buffer.
    let ret = unsafe { ioctl_with_mut_ref(&file, PAGEMAP_SCAN(), &mut arg) };
    if ret >= 0 {
        return Ok(true);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EINVAL) => Ok(true),
        Some(libc::ENOTTY) => Ok(false),
        _ => Err(io::Error::last_os_error()),
    }
}
