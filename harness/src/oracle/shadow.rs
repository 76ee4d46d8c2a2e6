//! The shadow copy: the host's copy of guest memory, updated only from reported pages.

use trackcheck_guests::layout::PAGE_SIZE;

/// Bytes of a page, as a length.
const PAGE: usize = 4096;
use trackcheck_guests::sim::{stamp_seq, stamp_vcpu};

use super::DataLayout;
use crate::memory::GuestMemory;
use crate::track::PageSet;

/// One 8-byte word where the shadow and guest memory differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// Data page.
    pub data_page: u64,
    /// Byte offset in the page.
    pub offset: u64,
    /// Word in the shadow.
    pub shadow: u64,
    /// Word in guest memory: the stamp of the lost write.
    pub memory: u64,
}

impl Mismatch {
    /// vCPU whose write is missing from the shadow.
    #[must_use]
    pub fn vcpu(&self) -> usize {
        stamp_vcpu(self.memory)
    }

    /// Sequence number of that write.
    #[must_use]
    pub fn seq(&self) -> u64 {
        stamp_seq(self.memory)
    }
}

/// A copy of the data region, as a migration destination would hold it.
#[derive(Debug)]
pub struct Shadow {
    layout: DataLayout,
    bytes: Vec<u8>,
}

impl Shadow {
    /// Copy the whole data region (`data` backs data pages 0.. of `layout`).
    #[must_use]
    pub fn new(layout: DataLayout, data: &GuestMemory) -> Self {
        let len = usize::try_from(layout.pages() * PAGE_SIZE).unwrap_or(0);
        let mut bytes = vec![0u8; len];
        data.read(0, &mut bytes);
        Self { layout, bytes }
    }

    /// Copy the reported pages from guest memory.
    pub fn copy(&mut self, data: &GuestMemory, pages: &PageSet) {
        for (slot, page) in pages.iter() {
            let Some(dp) = self.layout.data_page(slot, page) else {
                continue;
            };
            let at = usize::try_from(dp * PAGE_SIZE).unwrap_or(usize::MAX);
            if let Some(dst) = self.bytes.get_mut(at..at + PAGE) {
                data.read(dp * PAGE_SIZE, dst);
            }
        }
    }

    /// The shadow's word at byte `offset` of data page `data_page` (0 outside the region).
    #[must_use]
    pub fn word(&self, data_page: u64, offset: u16) -> u64 {
        let at = usize::try_from(data_page * PAGE_SIZE + u64::from(offset)).unwrap_or(usize::MAX);
        self.bytes.get(at..at.saturating_add(8)).map_or(0, |b| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        })
    }

    /// Every word of data page `data_page` where the shadow and guest memory differ.
    #[must_use]
    pub fn differing_words(&self, data: &GuestMemory, data_page: u64) -> Vec<Mismatch> {
        let at = usize::try_from(data_page * PAGE_SIZE).unwrap_or(usize::MAX);
        let Some(mine) = self.bytes.get(at..at + PAGE) else {
            return Vec::new();
        };
        let mut page = vec![0u8; PAGE];
        data.read(data_page * PAGE_SIZE, &mut page);
        let word = |b: &[u8], i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        (0..PAGE / 8)
            .filter(|&i| word(mine, i) != word(&page, i))
            .map(|i| Mismatch {
                data_page,
                offset: i as u64 * 8,
                shadow: word(mine, i),
                memory: word(&page, i),
            })
            .collect()
    }

    /// Compare with guest memory: the first differing word of every differing page.
    #[must_use]
    pub fn compare(&self, data: &GuestMemory) -> Vec<Mismatch> {
        let mut out = Vec::new();
        let mut page = vec![0u8; PAGE];
        for dp in 0..self.layout.pages() {
            let at = usize::try_from(dp * PAGE_SIZE).unwrap_or(usize::MAX);
            let Some(mine) = self.bytes.get(at..at + PAGE) else {
                break;
            };
            data.read(dp * PAGE_SIZE, &mut page);
            if mine == page.as_slice() {
                continue;
            }
            let word = |b: &[u8], i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            if let Some(i) = (0..PAGE / 8).find(|&i| word(mine, i) != word(&page, i)) {
                out.push(Mismatch {
                    data_page: dp,
                    offset: i as u64 * 8,
                    shadow: word(mine, i),
                    memory: word(&page, i),
                });
            }
        }
        out
    }
}

/// The harvest round (1-based) by which write `seq` of `vcpu` should have been reported:
/// the first round whose progress snapshot (taken before its collect) already included it.
/// Writes no snapshot saw belong to the final harvest, `snapshots.len() + 1`.
#[must_use]
pub fn attribute_round(snapshots: &[Vec<u64>], vcpu: usize, seq: u64) -> u32 {
    let round = snapshots
        .iter()
        .position(|s| s.get(vcpu).is_some_and(|&p| p >= seq))
        .unwrap_or(snapshots.len());
    u32::try_from(round + 1).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Backing;

    #[test]
    fn a_write_the_shadow_missed_is_named_by_its_stamp() {
        let mem = GuestMemory::new(Backing::Anon, 4 * PAGE_SIZE).expect("maps");
        let layout = DataLayout::single(2, 4);
        let mut shadow = Shadow::new(layout, &mem);
        mem.write_u64(PAGE_SIZE + 16, trackcheck_guests::stamp(1, 42));
        mem.write_u64(3 * PAGE_SIZE, trackcheck_guests::stamp(0, 7));
        let mut reported = PageSet::new();
        reported.insert(2, 3);
        shadow.copy(&mem, &reported);
        let m = shadow.compare(&mem);
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m[0].data_page, m[0].offset, m[0].vcpu(), m[0].seq()),
            (1, 16, 1, 42)
        );
        assert_eq!(attribute_round(&[vec![0, 10], vec![0, 50]], 1, 42), 2);
        assert_eq!(
            attribute_round(&[vec![0, 10]], 1, 42),
            2,
            "no snapshot saw it: the final round"
        );
    }
}
