//! Where things are in guest memory: the system region (stacks, code, page tables), the guest's
//! mappings of the data region (the biggest pages that fit), and, with `tables_in_data`, the
//! leaf tables kept in the data region's last pages.

use trackcheck_guests::GuestPageSize;
use trackcheck_guests::layout::{
    CONTROL_GPA, DATA_GPA, DOORBELL_GPA, HUGE_2M, LeafEntries, MAX_SYSTEM_BYTES, PAGE_SIZE,
    SYSTEM_GPA,
};

use crate::arch::{LeafArea, Mapping, PageTables};

use super::{Machine, MachineConfig, MachineError};

/// Where things are in the system region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SystemLayout {
    /// First stack page (one page per vCPU; stack of vCPU v tops at `stacks + (v + 1) * 4K`).
    pub stacks: u64,
    /// Start of the code area.
    pub code: u64,
    /// Bytes of code area.
    pub code_capacity: u64,
    /// Start of the page-table area.
    pub tables: u64,
    /// Pages in the page-table area.
    pub table_pages: u64,
    /// Total bytes of the system region.
    pub bytes: u64,
}

/// Page-table pages kept in the data region: (byte offset in the region, bytes as built).
pub(super) type TableBytes = Vec<(u64, Vec<u8>)>;

/// With `tables_in_data`: where the guest's leaf entries for the data region are, and the
/// tables' bytes as built (restored by [`Machine::reset`]).
pub(super) type LeafTables = (LeafEntries, TableBytes);

/// The system region's layout and the guest's page tables for a configuration, built in host
/// memory but not yet written into the guest.
pub(super) struct Planned {
    /// The system region.
    pub(super) layout: SystemLayout,
    /// Every table page; those at or above `DATA_GPA` belong in the data region.
    pub(super) tables: PageTables,
    /// With `tables_in_data`: where the data region's leaf tables are.
    pub(super) leaf_area: Option<LeafArea>,
}

/// Lay out the system region for `config` and build the guest page tables that map it, the
/// control pages, the doorbell and the data region.
pub(super) fn plan(config: &MachineConfig) -> Result<Planned, MachineError> {
    let vcpus_bytes = config.vcpus as u64 * PAGE_SIZE;
    let code_capacity = config.code_capacity.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let stacks = SYSTEM_GPA;
    let code = stacks + vcpus_bytes;
    let mut mappings = vec![
        rw(stacks, vcpus_bytes),
        Mapping {
            gva: code,
            gpa: code,
            len: code_capacity,
            page: GuestPageSize::Size4K,
            writable: false,
            executable: true,
        },
        rw(CONTROL_GPA, vcpus_bytes),
        rw(DOORBELL_GPA, PAGE_SIZE),
    ];
    let data_maps = data_mappings(config.data_pages, config.guest_page_size);
    let leaf_area = if config.tables_in_data {
        let [data_map] = data_maps.as_slice() else {
            return Err(MachineError::Config(format!(
                "page tables in the data region need {} data pages in whole {} guest pages",
                config.data_pages,
                config.guest_page_size.name()
            )));
        };
        let pages = LeafArea::pages(data_map);
        if pages >= config.data_pages {
            return Err(MachineError::Config(format!(
                "{} data pages leave no room for data next to their {pages} table pages",
                config.data_pages
            )));
        }
        Some(LeafArea {
            mapping: mappings.len(),
            gpa: DATA_GPA + (config.data_pages - pages) * PAGE_SIZE,
            preset_ad: false,
        })
    } else {
        None
    };
    mappings.extend(data_maps);
    let table_pages = PageTables::pages_needed(&mappings);
    let tables = code + code_capacity;
    let bytes = (tables + table_pages * PAGE_SIZE - SYSTEM_GPA).div_ceil(HUGE_2M) * HUGE_2M;
    if bytes > MAX_SYSTEM_BYTES {
        return Err(MachineError::Config(format!(
            "system region of {bytes:#x} bytes exceeds {MAX_SYSTEM_BYTES:#x}: less code capacity or data"
        )));
    }
    let layout = SystemLayout {
        stacks,
        code,
        code_capacity,
        tables,
        table_pages,
        bytes,
    };
    let pt = PageTables::build_with(&mappings, tables, table_pages, true, leaf_area)?;
    Ok(Planned {
        layout,
        tables: pt,
        leaf_area,
    })
}

/// The guest's identity mappings of the data region: the biggest pages up to `page` that fit,
/// the rest in smaller ones.
fn data_mappings(data_pages: u64, page: GuestPageSize) -> Vec<Mapping> {
    let bytes = data_pages * PAGE_SIZE;
    let mut out = Vec::new();
    let mut mapped = 0;
    for size in [
        GuestPageSize::Size1G,
        GuestPageSize::Size2M,
        GuestPageSize::Size4K,
    ] {
        if size.bytes() > page.bytes() {
            continue;
        }
        let len = (bytes - mapped) / size.bytes() * size.bytes();
        if len > 0 {
            out.push(Mapping {
                gva: DATA_GPA + mapped,
                gpa: DATA_GPA + mapped,
                len,
                page: size,
                writable: true,
                executable: false,
            });
            mapped += len;
        }
    }
    out
}

/// A writable, non-executable identity mapping in 4 KiB pages.
fn rw(gpa: u64, len: u64) -> Mapping {
    Mapping {
        gva: gpa,
        gpa,
        len,
        page: GuestPageSize::Size4K,
        writable: true,
        executable: false,
    }
}

impl Machine {
    /// Data pages a program may use: all of them, or those before the page tables when they
    /// live in the data region.
    #[must_use]
    pub fn program_pages(&self) -> u64 {
        self.leaf.as_ref().map_or(self.config.data_pages, |(l, _)| {
            (l.gva - DATA_GPA) / PAGE_SIZE
        })
    }

    /// The guest's leaf entry that maps data page `page` now (with the tables in the data
    /// region; None otherwise).
    #[must_use]
    pub fn leaf_entry(&self, page: u64) -> Option<u64> {
        let (l, _) = self.leaf.as_ref()?;
        Some(self.data.read_u64(l.of(page) - DATA_GPA))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_mappings_use_the_biggest_pages_that_fit() {
        let m = data_mappings(512 * 3 + 5, GuestPageSize::Size2M);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].page, m[0].len), (GuestPageSize::Size2M, 3 * HUGE_2M));
        assert_eq!(
            (m[1].page, m[1].len, m[1].gpa),
            (GuestPageSize::Size4K, 5 * PAGE_SIZE, DATA_GPA + 3 * HUGE_2M)
        );
        let m = data_mappings(7, GuestPageSize::Size4K);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].len, 7 * PAGE_SIZE);
    }
}
