//! Guest memory and its host backings.
//!
//! A [`GuestMemory`] is one host mapping that backs one memslot. Backings differ in what the
//! host MMU gives KVM to map (4 KiB pages, transparent or hugetlb 2 MiB / 1 GiB pages, shared
//! shmem pages), which is what decides whether KVM can install huge mappings that dirty logging
//! must later split.
//!
//! Host settings: hugetlb backings need free hugepages. A [`HugetlbReservation`] uses the pool's
//! really free pages first (boot-time `hugepages=` reservations included) and raises
//! `nr_hugepages` only by the shortfall, lowering it by exactly that when the memory is dropped;
//! a process killed before it could do so is cleaned up after by the next one (see `hugetlb`):
//! host hugepages never leak and host settings are left as they were.
//!
//! Size: every other backing is checked against `MemAvailable` and this process's memory cgroup
//! before [`GuestMemory::populate`] touches it (see `budget`), so an oversized request is a clear
//! error, not an OOM kill.
//!
//! Concurrency: the guest writes this memory while the host reads it, so the host never forms
//! Rust references into it; every access is a volatile or atomic access through a raw pointer.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

mod budget;
mod hugetlb;
mod map;
mod reclaim;

pub use budget::{CgroupRoom, MemoryBudget, ensure_fits, margin};
pub use hugetlb::{HugetlbReservation, PoolFigures, PoolLock, hugetlb_pool_file, state_dir};
pub use map::{FILE_DIR_ENV, file_dir, file_refusal};
pub use reclaim::Writeback;

const KIB: u64 = 1024;
const HUGE_2M: u64 = 2 << 20;
const HUGE_1G: u64 = 1 << 30;

/// How guest memory is backed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Backing {
    /// Private anonymous memory with `MADV_NOHUGEPAGE`: 4 KiB host pages, always.
    #[serde(rename = "anon")]
    Anon,
    /// Private anonymous memory, 2 MiB aligned, with `MADV_HUGEPAGE` (transparent huge pages).
    #[serde(rename = "thp")]
    Thp,
    /// `MAP_HUGETLB | MAP_HUGE_2MB`.
    #[serde(rename = "hugetlb-2m")]
    Hugetlb2M,
    /// `MAP_HUGETLB | MAP_HUGE_1GB`.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
    /// A `memfd_create` file mapped shared (shmem, 4 KiB pages).
    #[serde(rename = "memfd")]
    Memfd,
    /// A `memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)` file mapped shared.
    #[serde(rename = "memfd-hugetlb-2m")]
    MemfdHugetlb2M,
    /// `MAP_SHARED | MAP_ANONYMOUS` (shmem without a file name).
    #[serde(rename = "shmem")]
    Shmem,
    /// A regular file on a disk filesystem mapped `MAP_SHARED`, as QEMU's
    /// memory-backend-file: its pages are page cache that writeback cleans (`page_mkclean`
    /// write-protects the host's mappings) and reclaim evicts (unmapping them), so KVM's
    /// mappings are zapped and faulted again while it tracks. The file is made in
    /// `TRACKCHECK_FILE_DIR` (default `/var/tmp`) and unlinked at once, so nothing is left
    /// behind even if the process dies; tmpfs and ramfs are refused (no writeback there).
    #[serde(rename = "file")]
    File,
}

impl Backing {
    /// Every backing, in report order.
    pub const ALL: [Self; 8] = [
        Self::Anon,
        Self::Thp,
        Self::Hugetlb2M,
        Self::Hugetlb1G,
        Self::Memfd,
        Self::MemfdHugetlb2M,
        Self::Shmem,
        Self::File,
    ];

    /// Name used in trial names, reports and on the command line.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Anon => "anon",
            Self::Thp => "thp",
            Self::Hugetlb2M => "hugetlb-2m",
            Self::Hugetlb1G => "hugetlb-1g",
            Self::Memfd => "memfd",
            Self::MemfdHugetlb2M => "memfd-hugetlb-2m",
            Self::Shmem => "shmem",
            Self::File => "file",
        }
    }

    /// Host page size of the backing (mapping lengths are rounded up to it).
    #[must_use]
    pub const fn page_bytes(self) -> u64 {
        match self {
            Self::Anon | Self::Memfd | Self::Shmem | Self::File => 4 * KIB,
            Self::Thp | Self::Hugetlb2M | Self::MemfdHugetlb2M => HUGE_2M,
            Self::Hugetlb1G => HUGE_1G,
        }
    }

    /// The hugetlb pool this backing draws from, in KiB (`hugepages-<N>kB`), if any.
    #[must_use]
    pub const fn hugetlb_kib(self) -> Option<u64> {
        match self {
            Self::Hugetlb2M | Self::MemfdHugetlb2M => Some(HUGE_2M / KIB),
            Self::Hugetlb1G => Some(HUGE_1G / KIB),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Backing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|b| b.name()).collect();
                format!(
                    "unknown backing {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Errors creating or using guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host cannot provide this backing; the reason says what is missing.
    #[error("{backing} backing is unavailable on this host: {reason}")]
    Unsupported {
        /// The backing asked for.
        backing: Backing,
        /// What is missing.
        reason: String,
    },
    /// A system call failed.
    #[error("{call} for {bytes} bytes of {backing} memory: {source}")]
    Sys {
        /// The call (mmap, madvise, memfd_create, ...).
        call: &'static str,
        /// The backing.
        backing: Backing,
        /// Size asked for.
        bytes: u64,
        /// The error.
        source: io::Error,
    },
    /// Not enough hugepages could be reserved.
    #[error(
        "could not reserve {wanted} hugepages of {kib} KiB ({free} were free, and the pool grew \
         by only {got}): host memory is short or fragmented; free memory, or reserve them at \
         boot (hugepagesz= hugepages=)"
    )]
    NoHugepages {
        /// Pool size in KiB.
        kib: u64,
        /// Pages wanted.
        wanted: u64,
        /// Pages that were free and not reserved by other mappings.
        free: u64,
        /// Pages the kernel managed to add.
        got: u64,
    },
    /// More memory than the host or this process's memory cgroup can give (checked before
    /// anything is mapped or touched).
    #[error("{what} of {bytes} bytes refused: {reason}")]
    TooLarge {
        /// What the memory is for (the backing, or a buffer's name).
        what: String,
        /// Bytes asked for.
        bytes: u64,
        /// The figures and what to do.
        reason: String,
    },
    /// Reading or writing the hugetlb pool or its ledger failed.
    #[error("hugetlb pool {path}: {source}")]
    Pool {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// One host mapping backing one memslot.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: NonNull<u8>,
    /// Bytes usable (what was asked for).
    len: u64,
    /// Bytes mapped (rounded up to the backing's page size).
    mapped: u64,
    backing: Backing,
    /// Keeps a memfd or the backing file alive for the mapping's lifetime.
    fd: Option<OwnedFd>,
    /// Dropped after the mapping (field order), returning the hugepages.
    _reservation: Option<HugetlbReservation>,
}

// SAFETY: GuestMemory owns its mapping exclusively; it hands out no references into it, only
// volatile/atomic accesses through raw pointers, which are sound from any thread.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; all shared accesses are volatile or atomic, never `&`/`&mut` to the bytes.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Map `bytes` of `backing` memory (rounded up to the backing's page size). Nothing is
    /// populated yet; see [`GuestMemory::populate`].
    pub fn new(backing: Backing, bytes: u64) -> Result<Self, MemoryError> {
        let mapped = bytes.div_ceil(backing.page_bytes()) * backing.page_bytes();
        let len_usize = usize::try_from(mapped).map_err(|_| MemoryError::Unsupported {
            backing,
            reason: format!("{mapped} bytes do not fit the address space"),
        })?;
        let map = || map::map_backing(backing, mapped, len_usize);
        let (reservation, (ptr, fd)) = match backing.hugetlb_kib() {
            // The mapping is made under the pool lock and reserves its pages (no NORESERVE).
            Some(kib) => {
                let (r, m) = HugetlbReservation::acquire_for(kib, mapped / (kib * KIB), map)?;
                (Some(r), m)
            }
            None => (None, map()?),
        };
        let sys = |call: &'static str| {
            move |source: io::Error| MemoryError::Sys {
                call,
                backing,
                bytes: mapped,
                source,
            }
        };
        let memory = Self {
            ptr,
            len: bytes,
            mapped,
            backing,
            fd,
            _reservation: reservation,
        };
        match backing {
            Backing::Anon => memory
                .advise(libc::MADV_NOHUGEPAGE)
                .map_err(sys("madvise"))?,
            Backing::Thp => memory.advise(libc::MADV_HUGEPAGE).map_err(sys("madvise"))?,
            _ => {}
        }
        Ok(memory)
    }

    fn advise(&self, advice: libc::c_int) -> io::Result<()> {
        let len = usize::try_from(self.mapped).map_err(io::Error::other)?;
        // SAFETY: ptr..ptr+mapped is exactly the mapping this value owns (mapped in `new`).
        let ret = unsafe { libc::madvise(self.ptr.as_ptr().cast(), len, advice) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Fault in every page for writing (`MADV_POPULATE_WRITE`, touching each page where the
    /// kernel lacks it), so first-touch cost never lands in a timed phase or a guest run.
    ///
    /// First, memory that the host or this process's memory cgroup cannot give is refused
    /// ([`MemoryError::TooLarge`], see `budget`) before a page is touched. The check is here
    /// rather than in [`GuestMemory::new`] because a mapping that is never populated is sparse
    /// by intent (a clear-geometry slot maps 1 GiB and the guest touches a few pages of it);
    /// hugetlb memory was already reserved from its pool when it was mapped.
    pub fn populate(&self) -> Result<(), MemoryError> {
        if self.backing.hugetlb_kib().is_none() {
            ensure_fits(&format!("{} guest memory", self.backing), self.mapped)?;
        }
        if self.advise(libc::MADV_POPULATE_WRITE).is_ok() {
            return Ok(());
        }
        let step = self.backing.page_bytes();
        let mut offset = 0;
        while offset < self.mapped {
            let value = self.read_u64(offset);
            self.write_u64(offset, value);
            offset += step;
        }
        Ok(())
    }

    /// Host address of the first byte (for KVM_SET_USER_MEMORY_REGION).
    #[must_use]
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Usable bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-byte mapping.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes mapped (len rounded up to the backing's page size).
    #[must_use]
    pub fn mapped_len(&self) -> u64 {
        self.mapped
    }

    /// The backing.
    #[must_use]
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Pointer to `offset`, after checking `offset + len` is inside the mapping.
    fn at(&self, offset: u64, len: u64) -> *mut u8 {
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.mapped),
            "guest memory access {offset:#x}+{len:#x} outside a {:#x}-byte mapping",
            self.mapped
        );
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        // SAFETY: the assert above keeps offset..offset+len inside the mapping, so the
        // resulting pointer stays within (or one past) the same allocation.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    fn atomic(&self, offset: u64) -> &AtomicU64 {
        assert_eq!(
            offset % 8,
            0,
            "atomic guest memory access at unaligned offset {offset:#x}"
        );
        let ptr = self.at(offset, 8).cast::<u64>();
        // SAFETY: `at` checked the 8 bytes are inside the mapping, the assert checked 8-byte
        // alignment (the mapping is page aligned), and the mapping outlives `&self`. Concurrent
        // guest accesses are plain machine loads/stores, which atomics tolerate.
        unsafe { AtomicU64::from_ptr(ptr) }
    }

    /// Read 8 bytes at `offset` (volatile).
    #[must_use]
    pub fn read_u64(&self, offset: u64) -> u64 {
        self.atomic(offset).load(Ordering::Relaxed)
    }

    /// Write 8 bytes at `offset` (volatile).
    pub fn write_u64(&self, offset: u64, value: u64) {
        self.atomic(offset).store(value, Ordering::Relaxed);
    }

    /// Acquire-load 8 bytes at `offset`: pairs with the guest's release store of progress.
    #[must_use]
    pub fn load_acquire(&self, offset: u64) -> u64 {
        self.atomic(offset).load(Ordering::Acquire)
    }

    /// Release-store 8 bytes at `offset`: what the guest reads after it is seen.
    pub fn store_release(&self, offset: u64, value: u64) {
        self.atomic(offset).store(value, Ordering::Release);
    }

    /// Copy `buf.len()` bytes from `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        let src = self.at(offset, buf.len() as u64);
        // SAFETY: `at` checked the source range; `buf` is a distinct host buffer, so the ranges
        // cannot overlap. The guest may write the source concurrently: the copy then holds
        // either value for each byte, which is what a tracking oracle must cope with anyway.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy `bytes` into guest memory at `offset`.
    pub fn write(&self, offset: u64, bytes: &[u8]) {
        let dst = self.at(offset, bytes.len() as u64);
        // SAFETY: `at` checked the destination range; `bytes` is a host buffer distinct from
        // the mapping, so the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) }
    }

    /// Make code just written at `offset..offset + len` visible to instruction fetch: on arm64
    /// clean the data cache and invalidate the instruction cache to the point of unification
    /// for every cache line (`dc cvau`, `ic ivau`, with the barriers around them), which covers
    /// the guest's view of the same physical memory; x86 keeps instruction fetch coherent, so
    /// nothing is done there.
    pub fn sync_icache(&self, offset: u64, len: u64) {
        let start = self.at(offset, len) as usize;
        #[cfg(target_arch = "aarch64")]
        {
            let ctr: u64;
            // SAFETY: reading CTR_EL0 (cache type) has no side effect; Linux lets user space
            // read it (or emulates the read).
            unsafe { core::arch::asm!("mrs {0}, ctr_el0", out(reg) ctr, options(nomem, nostack)) };
            // DminLine (bits 19:16) and IminLine (3:0) are log2 of the line sizes in words.
            let dline = 4usize << ((ctr >> 16) & 15);
            let iline = 4usize << (ctr & 15);
            let end = start + usize::try_from(len).unwrap_or(0);
            let mut at = start & !(dline - 1);
            while at < end {
                // SAFETY: `at` lies in the range `self.at` checked to be inside this mapping;
                // cache maintenance by address reads no memory and changes no data, it only
                // writes back and invalidates cache lines.
                unsafe { core::arch::asm!("dc cvau, {0}", in(reg) at, options(nostack)) };
                at += dline;
            }
            // SAFETY: barriers only order the maintenance above; they access no memory.
            unsafe { core::arch::asm!("dsb ish", options(nostack)) };
            let mut at = start & !(iline - 1);
            while at < end {
                // SAFETY: as for `dc cvau` above.
                unsafe { core::arch::asm!("ic ivau, {0}", in(reg) at, options(nostack)) };
                at += iline;
            }
            // SAFETY: as above.
            unsafe { core::arch::asm!("dsb ish", "isb", options(nostack)) };
        }
        #[cfg(not(target_arch = "aarch64"))]
        let _ = start;
    }

    /// Zero `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) {
        let dst = self.at(offset, len);
        let len = usize::try_from(len).unwrap_or(0);
        // SAFETY: `at` checked offset..offset+len lies inside the mapping.
        unsafe { std::ptr::write_bytes(dst, 0, len) }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        let len = usize::try_from(self.mapped).unwrap_or(0);
        // SAFETY: ptr/mapped describe the mapping created in `new`, unmapped exactly once here;
        // no reference into it can outlive `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), len);
        }
    }
}

/// Total bytes of `[host_addr, host_addr + len)` that this process has mapped with transparent
/// huge pages right now (`AnonHugePages` in /proc/self/smaps), to prove a THP backing really got
/// huge pages.
#[must_use]
pub fn thp_bytes_in(host_addr: u64, len: u64) -> u64 {
    let Ok(smaps) = fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let end = host_addr + len;
    let mut in_range = false;
    let mut total = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((lo, hi)) = range.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            in_range = lo < end && hi > host_addr;
            continue;
        }
        if in_range && let Some(kb) = line.strip_prefix("AnonHugePages:") {
            total += kb
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * KIB;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Backing::ALL {
            assert_eq!(b.name().parse::<Backing>(), Ok(b));
        }
        assert!("huge".parse::<Backing>().unwrap_err().contains("anon, thp"));
    }

    #[test]
    fn anon_memory_reads_back_what_was_written() {
        let mem = GuestMemory::new(Backing::Anon, 3 * 4096 + 100).expect("maps");
        assert_eq!(mem.mapped_len(), 4 * 4096);
        mem.populate().expect("populates");
        mem.write_u64(8, 0xdead_beef);
        mem.store_release(16, 7);
        assert_eq!(mem.read_u64(8), 0xdead_beef);
        assert_eq!(mem.load_acquire(16), 7);
        mem.write(4096, b"hello");
        let mut buf = [0u8; 5];
        mem.read(4096, &mut buf);
        assert_eq!(&buf, b"hello");
        mem.zero(4096, 4096);
        mem.read(4096, &mut buf);
        assert_eq!(buf, [0; 5]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn out_of_bounds_access_is_caught() {
        let mem = GuestMemory::new(Backing::Anon, 4096).expect("maps");
        let _ = mem.read_u64(4096);
    }

    #[test]
    fn thp_and_memfd_map_aligned() {
        let thp = GuestMemory::new(Backing::Thp, 4 << 20).expect("maps");
        assert_eq!(thp.host_addr() % HUGE_2M, 0);
        let memfd = GuestMemory::new(Backing::Memfd, 8192).expect("maps");
        memfd.write_u64(4096, 1);
        assert_eq!(memfd.read_u64(4096), 1);
    }
}
