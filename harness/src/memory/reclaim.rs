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
        self.writeback_range(how, 0, self.mapped)
    }

    /// [`GuestMemory::writeback`] of `len` bytes from `offset` (both multiples of the host's
    /// page size, inside the mapping).
    pub fn writeback_range(
        &self,
        how: Writeback,
        offset: u64,
        len: u64,
    ) -> Result<(), MemoryError> {
        if self.backing != Backing::File {
            return Err(self.not_file("writeback"));
        }
        let (start, bytes) = self.host_range(offset, len)?;
        let ret = match how {
            // SAFETY: host_range checked that start..start+bytes lies inside the mapping this
            // value owns, page-aligned; msync reads the page tables and writes the file, it
            // changes no byte of the mapping.
            Writeback::Msync => unsafe {
                libc::msync(
                    self.ptr.as_ptr().wrapping_add(start).cast(),
                    bytes,
                    libc::MS_SYNC,
                )
            },
            Writeback::SyncFileRange => {
                let Some(fd) = self.fd.as_ref() else {
                    return Err(self.not_file("sync_file_range"));
                };
                let off = libc::off64_t::try_from(offset).unwrap_or(libc::off64_t::MAX);
                let n = libc::off64_t::try_from(bytes).unwrap_or(libc::off64_t::MAX);
                let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER;
                // SAFETY: a plain call on the file descriptor this value owns; it touches no
                // memory of this process.
                unsafe { libc::sync_file_range(fd.as_raw_fd(), off, n, flags) }
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
        self.page_out_range(0, self.mapped)
    }

    /// [`GuestMemory::page_out`] of `len` bytes from `offset` (multiples of the host's page
    /// size, inside the mapping).
    pub fn page_out_range(&self, offset: u64, len: u64) -> Result<(), MemoryError> {
        if self.backing != Backing::File {
            return Err(self.not_file("pageout"));
        }
        let (start, bytes) = self.host_range(offset, len)?;
        // SAFETY: host_range checked that start..start+bytes lies inside the mapping this
        // value owns, page-aligned; MADV_PAGEOUT only drops clean pages, which the file keeps.
        let ret = unsafe {
            libc::madvise(
                self.ptr.as_ptr().wrapping_add(start).cast(),
                bytes,
                libc::MADV_PAGEOUT,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(self.sys_error("madvise(MADV_PAGEOUT)"))
        }
    }

    /// Residency of each host page of the mapping now (`mincore`: in the page cache or not),
    /// into `out` (resized to the count of host pages, of the host's page size); the number
    /// resident.
    pub fn resident(&self, out: &mut Vec<u8>) -> Result<u64, MemoryError> {
        self.resident_range(0, self.mapped, out)
    }

    /// [`GuestMemory::resident`] of `len` bytes from `offset` (multiples of the host's page
    /// size, inside the mapping): `out[i]` is the host page at `offset` plus `i` pages.
    pub fn resident_range(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64, MemoryError> {
        let (start, bytes) = self.host_range(offset, len)?;
        let page = usize::try_from(crate::track::dirty_ring::host_page_bytes()).unwrap_or(4096);
        out.clear();
        out.resize(bytes.div_ceil(page), 0);
        // SAFETY: host_range checked that start..start+bytes lies inside the mapping this
        // value owns; `out` was just sized to one byte per host page of it, and mincore writes
        // only those bytes and reads no guest memory.
        let ret = unsafe {
            libc::mincore(
                self.ptr.as_ptr().wrapping_add(start).cast(),
                bytes,
                out.as_mut_ptr(),
            )
        };
        if ret != 0 {
            return Err(self.sys_error("mincore"));
        }
        for b in out.iter_mut() {
            *b &= 1;
        }
        Ok(out.iter().map(|&b| u64::from(b)).sum())
    }

    /// `offset..offset+len` as a byte range of the mapping, checked: inside it, aligned to the
    /// host's page size (the last range may end at the mapping's end).
    fn host_range(&self, offset: u64, len: u64) -> Result<(usize, usize), MemoryError> {
        let page = crate::track::dirty_ring::host_page_bytes();
        let end = offset.checked_add(len).filter(|&e| e <= self.mapped);
        if end.is_none() || !offset.is_multiple_of(page) || len == 0 {
            return Err(MemoryError::Unsupported {
                backing: self.backing,
                reason: format!(
                    "range {offset:#x}+{len:#x} is not a page-aligned, non-empty part of the {:#x}-byte mapping",
                    self.mapped
                ),
            });
        }
        Ok((
            usize::try_from(offset).unwrap_or(usize::MAX),
            usize::try_from(len).unwrap_or(usize::MAX),
        ))
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

    /// A range is written back and paged out alone: the pages outside it stay resident; a
    /// range outside the mapping or not page-aligned is refused, naming it.
    #[test]
    fn ranges_touch_only_their_pages() {
        if let Some(why) = crate::memory::file_refusal() {
            eprintln!("skip: {why}");
            return;
        }
        let page = crate::track::dirty_ring::host_page_bytes();
        let mem = GuestMemory::new(Backing::File, 64 * page).expect("maps a file");
        mem.populate().expect("populates");
        for p in 0..64 {
            mem.write_u64(p * page, 0xC4A0_0000 + p);
        }
        mem.writeback_range(Writeback::Msync, 16 * page, 16 * page)
            .expect("writes back");
        mem.page_out_range(16 * page, 16 * page).expect("pages out");
        let mut resident = Vec::new();
        mem.resident_range(0, 16 * page, &mut resident)
            .expect("mincore");
        assert_eq!(resident.len(), 16);
        assert!(
            resident.iter().all(|&r| r == 1),
            "pages before the range were evicted"
        );
        mem.resident_range(16 * page, 16 * page, &mut resident)
            .expect("mincore");
        assert!(
            resident.contains(&0),
            "pageout of the written-back range evicted nothing"
        );
        for p in 0..64 {
            assert_eq!(mem.read_u64(p * page), 0xC4A0_0000 + p, "page {p}");
        }
        let err = mem.page_out_range(7, page).expect_err("misaligned");
        assert!(err.to_string().contains("page-aligned"), "{err}");
        assert!(
            mem.writeback_range(Writeback::Msync, 60 * page, 8 * page)
                .is_err()
        );
    }
}
