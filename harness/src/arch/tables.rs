//! Guest page tables: 4 levels of 512 eight-byte entries (x86_64 4-level paging, arm64 with the
//! 4 KiB granule and 48-bit addresses), built on the host and copied into guest memory. The
//! entry formats differ; each architecture describes its own in a [`Format`].

use std::collections::BTreeMap;

use trackcheck_guests::GuestPageSize;

use super::FORMAT;

/// How an architecture encodes page-table entries.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    /// The entry of a table pointing at the next-level table at `child`.
    pub table: fn(u64) -> u64,
    /// The attribute bits of a leaf entry at `level` (1: 4 KiB page, 2: 2 MiB, 3: 1 GiB) for a
    /// writable / executable mapping, with the accessed (and, where the format has one, dirty)
    /// state preset when `preset_ad`.
    pub leaf: fn(level: u32, writable: bool, executable: bool, preset_ad: bool) -> u64,
    /// Whether an entry is valid.
    pub present: fn(u64) -> bool,
    /// Whether a valid entry at `level` (above 1) maps a block instead of pointing to a table.
    pub block: fn(u64, u32) -> bool,
    /// The output-address bits of an entry.
    pub addr: u64,
}

/// One region to map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Guest-virtual start (aligned to `page`).
    pub gva: u64,
    /// Guest-physical start (aligned to `page`).
    pub gpa: u64,
    /// Bytes (a multiple of `page`).
    pub len: u64,
    /// Mapping size.
    pub page: GuestPageSize,
    /// Writable.
    pub writable: bool,
    /// Executable.
    pub executable: bool,
}

/// Errors building page tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageTableError {
    /// A mapping is not aligned to its page size.
    #[error("mapping {gva:#x}->{gpa:#x} len {len:#x} is not aligned to its {page} pages")]
    Unaligned {
        /// gva
        gva: u64,
        /// gpa
        gpa: u64,
        /// len
        len: u64,
        /// page size
        page: GuestPageSize,
    },
    /// Two mappings overlap.
    #[error("mapping of {gva:#x} overlaps an earlier mapping")]
    Overlap {
        /// gva
        gva: u64,
    },
    /// The table area is full.
    #[error("page-table area of {capacity} pages is full")]
    Full {
        /// capacity in pages
        capacity: u64,
    },
}

/// Where the leaf tables of one mapping go instead of the table area: contiguous pages from
/// `gpa` on, in address order, so entry `i` of the mapping is at `gpa + 8 * i` (a guest that
/// maps them can find and write its own entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafArea {
    /// Index of the mapping in the list given to [`PageTables::build_with`].
    pub mapping: usize,
    /// Guest-physical address of the first leaf table.
    pub gpa: u64,
    /// Whether the mapping's leaf entries start with A and D set.
    pub preset_ad: bool,
}

impl LeafArea {
    /// Table pages the leaf tables of `m` take.
    #[must_use]
    pub fn pages(m: &Mapping) -> u64 {
        m.len.div_ceil(m.page.bytes() * 512)
    }
}

/// Guest page tables, built on the host and copied into guest memory.
#[derive(Debug, Clone)]
pub struct PageTables {
    /// GPA of the PML4 (CR3).
    pub root: u64,
    /// Table pages by GPA.
    pub tables: BTreeMap<u64, Vec<u64>>,
    next: u64,
    limit: u64,
}

impl PageTables {
    /// Pages an area must have to map `mappings` (an upper bound).
    #[must_use]
    pub fn pages_needed(mappings: &[Mapping]) -> u64 {
        let mut pages = 1;
        for m in mappings {
            let spans = |unit: u64| m.len.div_ceil(unit) + 1;
            pages += spans(1 << 39); // PDPTs
            pages += spans(1 << 30); // PDs
            if m.page == GuestPageSize::Size4K {
                pages += spans(1 << 21); // PTs
            }
        }
        pages
    }

    /// Build tables for `mappings` in the area `[area, area + pages * 4096)`. With `preset_ad`,
    /// leaf entries start with A and D set, so the CPU (or KVM's emulation of it) never writes
    /// the tables during a run.
    pub fn build(
        mappings: &[Mapping],
        area: u64,
        pages: u64,
        preset_ad: bool,
    ) -> Result<Self, PageTableError> {
        Self::build_with(mappings, area, pages, preset_ad, None)
    }

    /// [`PageTables::build`], with the leaf tables of one mapping placed at `leaf`.
    pub fn build_with(
        mappings: &[Mapping],
        area: u64,
        pages: u64,
        preset_ad: bool,
        leaf: Option<LeafArea>,
    ) -> Result<Self, PageTableError> {
        let mut pt = Self {
            root: area,
            tables: BTreeMap::new(),
            next: area,
            limit: area + pages * 4096,
        };
        pt.root = pt.alloc()?;
        for (index, m) in mappings.iter().enumerate() {
            let leaf_area = leaf.filter(|l| l.mapping == index);
            let size = m.page.bytes();
            if m.gva % size != 0 || m.gpa % size != 0 || m.len % size != 0 {
                return Err(PageTableError::Unaligned {
                    gva: m.gva,
                    gpa: m.gpa,
                    len: m.len,
                    page: m.page,
                });
            }
            let leaf_level = match m.page {
                GuestPageSize::Size4K => 1,
                GuestPageSize::Size2M => 2,
                GuestPageSize::Size1G => 3,
            };
            let flags = (FORMAT.leaf)(
                leaf_level,
                m.writable,
                m.executable,
                leaf_area.map_or(preset_ad, |l| l.preset_ad),
            );
            let mut offset = 0;
            while offset < m.len {
                // The leaf table holding this entry, where the mapping's leaf tables go apart.
                let placed = leaf_area.map(|l| l.gpa + offset / (size * 512) * 4096);
                pt.map_one(m.gva + offset, m.gpa + offset, leaf_level, flags, placed)?;
                offset += size;
            }
        }
        Ok(pt)
    }

    fn alloc(&mut self) -> Result<u64, PageTableError> {
        if self.next >= self.limit {
            return Err(PageTableError::Full {
                capacity: (self.limit - self.root) / 4096,
            });
        }
        let gpa = self.next;
        self.next += 4096;
        self.tables.insert(gpa, vec![0; 512]);
        Ok(gpa)
    }

    fn map_one(
        &mut self,
        gva: u64,
        gpa: u64,
        leaf_level: u32,
        flags: u64,
        leaf_table: Option<u64>,
    ) -> Result<(), PageTableError> {
        let mut table = self.root;
        for level in (leaf_level..=4).rev() {
            let index = usize::try_from((gva >> (12 + 9 * (level - 1))) & 511).unwrap_or(0);
            let entry = self.tables[&table][index];
            if level == leaf_level {
                if (FORMAT.present)(entry) {
                    return Err(PageTableError::Overlap { gva });
                }
                if let Some(t) = self.tables.get_mut(&table) {
                    t[index] = gpa | flags;
                }
                return Ok(());
            }
            if !(FORMAT.present)(entry) {
                let child = match leaf_table {
                    Some(at) if level == leaf_level + 1 => {
                        self.tables.insert(at, vec![0; 512]);
                        at
                    }
                    _ => self.alloc()?,
                };
                if let Some(t) = self.tables.get_mut(&table) {
                    t[index] = (FORMAT.table)(child);
                }
                table = child;
            } else if (FORMAT.block)(entry, level) {
                return Err(PageTableError::Overlap { gva });
            } else {
                table = entry & FORMAT.addr;
            }
        }
        Ok(())
    }

    /// Table pages used.
    #[must_use]
    pub fn used_pages(&self) -> u64 {
        self.tables.len() as u64
    }
}

/// Result of walking the guest page tables for one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Translated guest-physical address.
    pub gpa: u64,
    /// GPA of the leaf entry (where A/D bits live).
    pub leaf_entry_gpa: u64,
    /// The leaf entry's value.
    pub leaf_entry: u64,
    /// Size the leaf maps.
    pub page: GuestPageSize,
}

/// Walk 4-level tables at `root` for `gva`, reading 8-byte entries with `read(gpa)`.
pub fn walk(root: u64, gva: u64, read: impl Fn(u64) -> Option<u64>) -> Option<Walk> {
    let mut table = root & FORMAT.addr;
    for level in (1..=4u32).rev() {
        let index = (gva >> (12 + 9 * (level - 1))) & 511;
        let entry_gpa = table + index * 8;
        let entry = read(entry_gpa)?;
        if !(FORMAT.present)(entry) {
            return None;
        }
        let leaf = level == 1 || (level <= 3 && (FORMAT.block)(entry, level));
        if leaf {
            let (page, size) = match level {
                1 => (GuestPageSize::Size4K, 1u64 << 12),
                2 => (GuestPageSize::Size2M, 1 << 21),
                _ => (GuestPageSize::Size1G, 1 << 30),
            };
            let base = entry & FORMAT.addr & !(size - 1);
            return Some(Walk {
                gpa: base + (gva & (size - 1)),
                leaf_entry_gpa: entry_gpa,
                leaf_entry: entry,
                page,
            });
        }
        table = entry & FORMAT.addr;
    }
    None
}
