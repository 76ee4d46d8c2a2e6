//! Dirty-log ioctls: GET and CLEAR into caller-owned (reused) bitmaps, the dirty ring's mmap,
//! collection and reset.
//!
//! kvm-ioctls 0.25 has no KVM_CLEAR_DIRTY_LOG, ring mmap or KVM_RESET_DIRTY_RINGS, and its
//! `get_dirty_log` allocates a new bitmap per call; harvest paths here reuse their buffers so a
//! timed harvest measures the kernel, not the allocator.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{KVMIO, kvm_clear_dirty_log, kvm_dirty_gfn, kvm_dirty_log};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// `KVM_DIRTY_GFN_F_DIRTY`: the entry holds a dirty page not yet collected.
pub const GFN_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry; KVM_RESET_DIRTY_RINGS may recycle it.
pub const GFN_RESET: u32 = 2;
/// Page offset of the ring in the vCPU fd's mmap space (`KVM_DIRTY_LOG_PAGE_OFFSET`).
pub const RING_PAGE_OFFSET: u64 = 64;
/// Bytes of one ring entry.
pub const GFN_BYTES: usize = std::mem::size_of::<kvm_dirty_gfn>();

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Words a bitmap for `pages` pages needs (one bit per page, u64 words as KVM lays them out).
#[must_use]
pub fn bitmap_words(pages: u64) -> usize {
    usize::try_from(pages.div_ceil(64)).unwrap_or(usize::MAX)
}

/// KVM_GET_DIRTY_LOG for `slot` into `bitmap` (sized with [`bitmap_words`] for the slot).
pub fn get_dirty_log(vm: &impl AsRawFd, slot: u32, bitmap: &mut [u64]) -> Result<(), i32> {
    let mut arg = kvm_dirty_log {
        slot,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: the kernel writes one bit per page of `slot` to `dirty_bitmap`; the caller sized
    // `bitmap` from the slot's page count (bitmap_words), and it lives across the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &arg) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

/// KVM_CLEAR_DIRTY_LOG: clear and re-protect the pages `first_page + i` of `slot` for every bit
/// `i` set in `bitmap` (which covers `num_pages` pages). `first_page` must be a multiple of 64,
/// and `num_pages` too unless the range ends at the slot's end, or KVM answers EINVAL.
pub fn clear_dirty_log(
    vm: &impl AsRawFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), i32> {
    if bitmap.len() < bitmap_words(u64::from(num_pages)) {
        return Err(libc::EINVAL);
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: the kernel reads ceil(num_pages / 64) words from `dirty_bitmap`; the check above
    // makes `bitmap` at least that long, and KVM only reads it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

/// KVM_RESET_DIRTY_RINGS: re-protect every collected entry's page and recycle the entries.
/// Returns how many entries were reset.
pub fn reset_dirty_rings(vm: &impl AsRawFd) -> Result<u32, i32> {
    // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm` is a live VM fd.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        Err(last_errno())
    } else {
        u32::try_from(ret).map_err(|_| libc::EOVERFLOW)
    }
}

/// One vCPU's dirty ring, mapped from its fd.
///
/// Harvest contract (Documentation/virt/kvm/api.rst, "dirty ring"): read each entry's flags
/// with acquire order and stop at the first one without DIRTY; read slot and offset; store
/// RESET with release order; advance the fetch index. Then KVM_RESET_DIRTY_RINGS, and only then
/// read the pages' contents.
#[derive(Debug)]
pub struct DirtyRing {
    entries: NonNull<kvm_dirty_gfn>,
    count: u32,
    bytes: usize,
    /// Next entry userspace will look at (free-running; index = fetch % count).
    fetch: AtomicU32,
}

// SAFETY: the ring is a shared mapping owned by this value; entries are read and written only
// through atomics (flags) and volatile reads (slot, offset), never through Rust references.
unsafe impl Send for DirtyRing {}
// SAFETY: as above; the fetch index is atomic.
unsafe impl Sync for DirtyRing {}

impl DirtyRing {
    /// Map the ring of `bytes` bytes of vCPU fd `vcpu`.
    pub fn map(vcpu: &impl AsRawFd, bytes: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = libc::off_t::try_from(RING_PAGE_OFFSET)
            .ok()
            .and_then(|o| o.checked_mul(page as libc::off_t))
            .ok_or_else(|| io::Error::other("ring offset overflows"))?;
        let count = u32::try_from(bytes / GFN_BYTES).map_err(io::Error::other)?;
        if count == 0 || !count.is_power_of_two() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: a fresh shared mapping of the vCPU fd at the ring offset, at a kernel-chosen
        // address; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let entries =
            NonNull::new(ptr.cast()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self {
            entries,
            count,
            bytes,
            fetch: AtomicU32::new(0),
        })
    }

    /// Entries in the ring.
    #[must_use]
    pub fn entries(&self) -> u32 {
        self.count
    }

    /// Collect every dirty entry in order, calling `each(slot, offset)` for each and marking it
    /// RESET. Returns how many were collected. Call KVM_RESET_DIRTY_RINGS afterwards.
    pub fn collect(&self, mut each: impl FnMut(u32, u64)) -> u32 {
        let mut taken = 0;
        loop {
            let fetch = self.fetch.load(Ordering::Relaxed);
            let index = fetch & (self.count - 1);
            // SAFETY: index < count, and the mapping holds `count` entries.
            let entry = unsafe { self.entries.as_ptr().add(index as usize) };
            // SAFETY: `entry` points into the live shared mapping (index < count above).
            let flags_ptr = unsafe { &raw mut (*entry).flags };
            // SAFETY: `flags_ptr` is in the live mapping and 4-byte aligned (entries are 16-byte
            // aligned); KVM writes the same word concurrently, which is why it is atomic.
            let flags = unsafe { AtomicU32::from_ptr(flags_ptr) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return taken;
            }
            // SAFETY: the acquire load above saw DIRTY, so KVM finished writing the entry before
            // it (it stores slot and offset, then release-sets DIRTY); the read is volatile because
            // the memory is shared with the kernel, and `entry` is in the live mapping.
            let whole = unsafe { std::ptr::read_volatile(entry) };
            let (slot, offset) = (whole.slot, whole.offset);
            each(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch.store(fetch.wrapping_add(1), Ordering::Relaxed);
            taken += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: entries/bytes describe the mapping created in `map`, unmapped exactly once.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), self.bytes);
        }
    }
}
