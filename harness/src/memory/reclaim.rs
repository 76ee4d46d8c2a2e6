//! Writeback and reclaim of file-backed guest memory ([`Backing::File`]), and its page-cache
//! residency: what a host does to a VM's memory-backend-file while the VM runs.
//!
//! Writeback cleans dirty pages: the kernel's `folio_mkclean` write-protects every host
//! mapping of each page first, and the MMU notifier makes KVM drop (zap) its own mappings of
//! them. `MADV_PAGEOUT` evicts clean pages that only this process maps: they are unmapped
//! (KVM zaps again) and leave the page cache, so the guest's next access faults through KVM
//! into the filesystem. Dirty pages are not written back by pageout (only kswapd writes file
//! pages from reclaim), so a page the guest dirtied after the last writeback stays.
//!
//! These calls change no byte of guest memory; they only move it between the page cache and
//! the disk, which is exactly what a tracker must survive.

use std::io;
use std::os::fd::AsRawFd;

use super::{Backing, GuestMemory, MemoryError};

/// How dirty pages of a file backing are written back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writeback {
    /// `msync(MS_SYNC)` over the mapping (fsync of the range: data and metadata).
    Msync,
    /// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` over the file (data only).
    SyncFileRange,
}

impl Writeback {
    /// The call's name, for evidence and errors.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Msync => "msync(MS_SYNC)",
            Self::SyncFileRange => "sync_file_range",
        }
    }
}

impl GuestMemory {
    fn sys_error(&self, call: &'static str) -> MemoryError {
        MemoryError::Sys {
            call,
            backing: self.backing,
            bytes: self.mapped,
            source: io::Error::last_os_error(),
        }
    }

    fn not_file(&self, what: &str) -> MemoryError {
        MemoryError::Unsupported {
            backing: self.backing,
            reason: format!("{what} needs the {} backing", Backing::File),
        }
    }

    /// Write back every dirty page of a [`Backing::File`] mapping and wait for it.
    pub fn writeback(&self, how: Writeback) -> Result<(), MemoryError> {
        if self.backing != Backing::File {
            return Err(self.not_file("writeback"));
        }
        let len = usize::try_from(self.mapped).unwrap_or(usize::MAX);
        let ret = match how {
            // SAFETY: ptr..ptr+mapped is exactly the mapping this value owns; msync reads the
            // page tables and writes the file, it changes no byte of the mapping.
            Writeback::Msync => unsafe {
                libc::msync(self.ptr.as_ptr().cast(), len, libc::MS_SYNC)
            },
            Writeback::SyncFileRange => {
                let Some(fd) = self.fd.as_ref() else {
                    return Err(self.not_file("sync_file_range"));
                };
                let bytes = libc::off64_t::try_from(self.mapped).unwrap_or(libc::off64_t::MAX);
                let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                // SAFETY: a plain call on the file descriptor this value owns; it touches no
                // memory of this process.
                unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, bytes, flags) }
            }
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(self.sys_error(how.name()))
        }
    }

    /// `MADV_PAGEOUT` over a [`Backing::File`] mapping: evict its clean pages from the page
    /// cache (dirty ones stay).
    pub fn page_out(&self) -> Result<(), MemoryError> {
        if self.backing != Backing::File {
            return Err(self.not_file("pageout"));
        }
        self.advise(libc::MADV_PAGEOUT)
            .map_err(|source| MemoryError::Sys {
                call: "madvise(MADV_PAGEOUT)",
                backing: self.backing,
                bytes: self.mapped,
                source,
            })
    }

    /// Residency of each host page of the mapping now (`mincore`: in the page cache or not),
    /// into `out` (resized to the count of host pages, of the host's page size); the number
    /// resident.
    pub fn resident(&self, out: &mut Vec<u8>) -> Result<u64, MemoryError> {
        let page = crate::track::dirty_ring::host_page_bytes();
        let pages = usize::try_from(self.mapped.div_ceil(page)).unwrap_or(0);
        out.clear();
        out.resize(pages, 0);
        let len = usize::try_from(self.mapped).unwrap_or(usize::MAX);
        // SAFETY: `out` was just sized to one byte per 4 KiB page of ptr..ptr+mapped, the
        // mapping this value owns; mincore writes only those bytes and reads no guest memory.
        let ret = unsafe { libc::mincore(self.ptr.as_ptr().cast(), len, out.as_mut_ptr()) };
        if ret != 0 {
            return Err(self.sys_error("mincore"));
        }
        for b in out.iter_mut() {
            *b &= 1;
        }
        Ok(out.iter().map(|&b| u64::from(b)).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written pages survive writeback and pageout; pageout evicts clean pages (where the
    /// file's directory is on a disk filesystem, else the backing is refused, saying why).
    #[test]
    fn file_pages_survive_writeback_and_pageout() {
        if let Some(why) = crate::memory::file_refusal() {
            eprintln!("skip: {why}");
            return;
        }
        let mem = GuestMemory::new(Backing::File, 64 * 4096).expect("maps a file");
        mem.populate().expect("populates");
        for page in 0..64 {
            mem.write_u64(page * 4096, 0xF11E_0000 + page);
        }
        let mut resident = Vec::new();
        assert_eq!(mem.resident(&mut resident).expect("mincore"), 64);
        mem.writeback(Writeback::SyncFileRange)
            .expect("writes back");
        mem.writeback(Writeback::Msync).expect("writes back");
        mem.page_out().expect("pages out");
        let after = mem.resident(&mut resident).expect("mincore");
        assert!(after < 64, "pageout of clean pages evicted nothing");
        for page in 0..64 {
            assert_eq!(mem.read_u64(page * 4096), 0xF11E_0000 + page, "page {page}");
        }
        let anon = GuestMemory::new(Backing::Anon, 4096).expect("maps");
        assert!(anon.writeback(Writeback::Msync).is_err());
    }
}
