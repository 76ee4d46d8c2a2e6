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

/// `PM_SCAN_WP_MATCHING`: write-protect the pages that match, atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail when a page is not under asynchronous write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// `PAGE_IS_WRITTEN`: written since it was last write-protected.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_HUGE`: THP or hugetlb backed.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `struct page_region`: `[start, end)` with `categories`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` bits.
    pub categories: u64,
}

/// An open /proc/self/pagemap with a reusable region buffer.
#[derive(Debug)]
pub struct PagemapScanner {
    file: File,
    regions: Vec<PageRegion>,
    /// Time spent in the ioctl since the last `take_kernel_time`.
    kernel: std::time::Duration,
}

impl PagemapScanner {
    /// Open /proc/self/pagemap; `capacity` regions are returned per ioctl.
    pub fn open(capacity: usize) -> io::Result<Self> {
        Ok(Self {
            file: File::open("/proc/self/pagemap")?,
            regions: vec![PageRegion::default(); capacity.max(1)],
            kernel: std::time::Duration::ZERO,
        })
    }

    /// Time spent in PAGEMAP_SCAN since the last call, reset to zero.
    pub fn take_kernel_time(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.kernel)
    }

    /// Report every written page in `[start, end)` as regions, calling `each(region)`, and with
    /// `write_protect` re-protect them in the same walk (`PM_SCAN_WP_MATCHING`).
    pub fn scan_written(
        &mut self,
        start: u64,
        end: u64,
        write_protect: bool,
        mut each: impl FnMut(&PageRegion),
    ) -> io::Result<()> {
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if write_protect {
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
                } else {
                    0
                },
                start: at,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN | PAGE_IS_HUGE,
                ..Default::default()
            };
            let start = std::time::Instant::now();
            // SAFETY: `arg` is a `struct pm_scan_arg` (repr(C), size set); `vec` points at
            // `vec_len` writable `struct page_region`s owned by self for the whole call, and
            // start..end is this process's own address range.
            let ret = unsafe { ioctl_with_mut_ref(&self.file, PAGEMAP_SCAN(), &mut arg) };
            self.kernel += start.elapsed();
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            let filled = usize::try_from(ret)
                .map_err(io::Error::other)?
                .min(self.regions.len());
            for region in &self.regions[..filled] {
                each(region);
            }
            if arg.walk_end <= at {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN made no progress at {at:#x}"
                )));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}
