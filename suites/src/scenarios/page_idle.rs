//! page_idle's interface for `idle-page-idle`: /sys/kernel/mm/page_idle/bitmap (marking
//! frames idle, reading which still are) and the guest memory's frames from /proc/self/pagemap
//! (also `idle-damon-paddr`'s).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;

use trackcheck_harness::track::dirty_ring::host_page_bytes;

use super::TrialError;

/// The interface (mm/page_idle.c): bit `pfn % 64` of the u64 at byte `pfn / 64 * 8` is the
/// frame's idle state; reads and writes are whole, aligned u64s.
const BITMAP: &str = "/sys/kernel/mm/page_idle/bitmap";
/// Guest data page bytes.
const PAGE_BYTES: u64 = 4096;

/// The bitmap, open for reading and writing.
#[derive(Debug)]
pub(super) struct Bitmap(File);

impl Bitmap {
    pub(super) fn open() -> Result<Self, TrialError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(BITMAP)
            .map(Self)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    TrialError::Skip(format!("page-idle: {BITMAP} is absent"))
                }
                _ => {
                    TrialError::Error(format!("open {BITMAP}: {e} (it needs root: CAP_SYS_ADMIN)"))
                }
            })
    }

    /// Mark `frames` idle; how many words were written.
    pub(super) fn mark(&self, frames: impl IntoIterator<Item = u64>) -> Result<u64, String> {
        let words = words_of(frames);
        for (&word, &mask) in &words {
            self.0
                .write_all_at(&mask.to_ne_bytes(), word * 8)
                .map_err(|e| format!("write {BITMAP} at word {word}: {e}"))?;
        }
        Ok(words.len() as u64)
    }

    /// Which of `frames` read idle.
    pub(super) fn idle(
        &self,
        frames: impl IntoIterator<Item = u64>,
    ) -> Result<BTreeSet<u64>, String> {
        let words = words_of(frames);
        let mut out = BTreeSet::new();
        for (&word, &mask) in &words {
            let mut buf = [0u8; 8];
            self.0
                .read_exact_at(&mut buf, word * 8)
                .map_err(|e| format!("read {BITMAP} at word {word}: {e}"))?;
            let bits = u64::from_ne_bytes(buf) & mask;
            out.extend(
                (0..64)
                    .filter(|b| bits >> b & 1 == 1)
                    .map(|b| word * 64 + b),
            );
        }
        Ok(out)
    }
}

/// The bitmap's words covering `frames`, each with the bits of those frames only (other
/// processes' frames in the same word are left alone).
pub(super) fn words_of(frames: impl IntoIterator<Item = u64>) -> BTreeMap<u64, u64> {
    let mut words = BTreeMap::new();
    for pfn in frames {
        *words.entry(pfn / 64).or_insert(0) |= 1 << (pfn % 64);
    }
    words
}

/// The frame number behind each host page of `[addr, addr + len)` (`None`: not present, or
/// no frame numbers readable: they need CAP_SYS_ADMIN), from /proc/self/pagemap; the first
/// covers the host page holding `addr`.
pub(super) fn host_frames(addr: u64, len: u64) -> Result<Vec<Option<u64>>, std::io::Error> {
    let host = host_page_bytes();
    let first = addr / host;
    let count = usize::try_from((addr + len).div_ceil(host) - first).unwrap_or(0);
    let file = File::open("/proc/self/pagemap")?;
    let mut buf = vec![0u8; count * 8];
    file.read_exact_at(&mut buf, first * 8)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
            let pfn = e & ((1 << 55) - 1);
            (e >> 63 == 1 && pfn != 0).then_some(pfn)
        })
        .collect())
}

/// The host frame of each of `pages` data pages at host address `addr` (`None`: not present,
/// or no frame numbers readable).
pub(super) fn page_frames(addr: u64, pages: u64) -> Result<Vec<Option<u64>>, String> {
    let host = host_page_bytes();
    let frames = host_frames(addr, pages * PAGE_BYTES)
        .map_err(|e| format!("read /proc/self/pagemap: {e}"))?;
    Ok((0..pages)
        .map(|p| {
            let i = usize::try_from((addr + p * PAGE_BYTES) / host - addr / host).unwrap_or(0);
            frames.get(i).copied().flatten()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::words_of;

    #[test]
    fn words_hold_only_the_given_frames() {
        let w = words_of([1, 63, 64, 200]);
        assert_eq!(
            w,
            BTreeMap::from([(0, 1 << 1 | 1 << 63), (1, 1), (3, 1 << 8)])
        );
    }
}
