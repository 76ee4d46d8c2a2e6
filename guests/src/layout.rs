//! The guest-physical address map every generated guest uses, on every architecture.
//!
//! Guest-virtual addresses equal guest-physical ones (identity map), so one number names a
//! location for the guest, the host and the reports. The regions:
//!
//! | region   | GPA                  | memslot                | tracked |
//! |----------|----------------------|------------------------|---------|
//! | system   | [`SYSTEM_GPA`]..     | yes                    | never   |
//! | control  | [`CONTROL_GPA`]..    | yes (one page a vCPU)  | never   |
//! | doorbell | [`DOORBELL_GPA`]     | **none**: writes exit as MMIO | -  |
//! | data     | [`DATA_GPA`]..       | one or more            | yes     |
//!
//! The system region holds each vCPU's code and read-only tables, the stacks and the guest page
//! tables. The control region holds one page per vCPU through which the guest publishes its
//! progress (see [`control`]). The data region is where every tracked write lands; programs name
//! data pages by index (page `i` is at `DATA_GPA + i * PAGE_SIZE`).

use serde::{Deserialize, Serialize};

/// The base page size of the tracking mechanisms: one dirty bit, ring entry or pagemap entry
/// per 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a 2 MiB huge page / block.
pub const HUGE_2M: u64 = 2 << 20;
/// Size of a 1 GiB huge page / block.
pub const HUGE_1G: u64 = 1 << 30;

/// Start of the system region (code, tables, stacks, page tables); 2 MiB aligned.
pub const SYSTEM_GPA: u64 = 0x0020_0000;
/// Start of the control region: page `v` belongs to vCPU `v`.
pub const CONTROL_GPA: u64 = 0xC000_0000;
/// The doorbell page. No memslot covers it, so every guest write there is a KVM_EXIT_MMIO.
pub const DOORBELL_GPA: u64 = 0xD000_0000;
/// Start of the tracked data region; 1 GiB aligned so every guest page size can map it.
pub const DATA_GPA: u64 = 0x1_0000_0000;
/// An address no generated guest maps: touching it faults (used to provoke a triple fault).
pub const UNMAPPED_GVA: u64 = 0x7F00_0000_0000;

/// Most vCPUs a generated guest may have (the control region is this many pages).
pub const MAX_VCPUS: usize = 64;
/// Largest system region: it must end below [`CONTROL_GPA`].
pub const MAX_SYSTEM_BYTES: u64 = CONTROL_GPA - SYSTEM_GPA;
/// Largest data region a generated guest may address (64 GiB).
pub const MAX_DATA_PAGES: u64 = (64 << 30) / PAGE_SIZE;

/// Byte offsets of the fields of a vCPU's control page.
///
/// Guest-to-host fields are written by the guest with release order after the data they
/// describe; the host reads them with acquire order. Host-to-guest fields are written by the host
/// and polled by the guest.
pub mod control {
    /// guest -> host: sequence number of the last completed stamped write (0: none yet).
    pub const PROGRESS: u64 = 0x00;
    /// guest -> host: `n` of the last `Sync(n)` reached.
    pub const SYNC: u64 = 0x08;
    /// guest -> host: number of reads completed.
    pub const READS: u64 = 0x10;
    /// guest -> host: number of loop passes completed.
    pub const PASSES: u64 = 0x18;
    /// host -> guest: non-zero ends every `Repeat::UntilStopped` loop at its next page.
    pub const STOP: u64 = 0x40;
}

/// Byte offsets of the doorbell registers, relative to [`DOORBELL_GPA`].
pub mod doorbell {
    /// The guest reached `Sync(n)`; the value written is `n`.
    pub const SYNC: u64 = 0x00;
    /// The guest finished its program; the value written is the last sequence number used.
    pub const DONE: u64 = 0x08;
    /// Not a doorbell register: a write here is an unexplained MMIO exit (exit-storm tests).
    pub const STORM: u64 = 0x800;
}

/// GPA of vCPU `vcpu`'s control page.
#[must_use]
pub const fn control_page(vcpu: usize) -> u64 {
    CONTROL_GPA + (vcpu as u64) * PAGE_SIZE
}

/// GPA of data page `page`.
#[must_use]
pub const fn data_page(page: u64) -> u64 {
    DATA_GPA + page * PAGE_SIZE
}

/// The page size the guest's own page tables use to map the data region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GuestPageSize {
    /// 4 KiB mappings.
    #[serde(rename = "4k")]
    Size4K,
    /// 2 MiB mappings (the data region's tail that is not a whole 2 MiB uses 4 KiB).
    #[serde(rename = "2m")]
    Size2M,
    /// 1 GiB mappings (needs the guest CPU to offer them, e.g. x86 `pdpe1gb`).
    #[serde(rename = "1g")]
    Size1G,
}

impl GuestPageSize {
    /// Bytes one mapping covers.
    #[must_use]
    pub const fn bytes(self) -> u64 {
        match self {
            Self::Size4K => PAGE_SIZE,
            Self::Size2M => HUGE_2M,
            Self::Size1G => HUGE_1G,
        }
    }

    /// Short name used in trial names and reports: `4k`, `2m`, `1g`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Size4K => "4k",
            Self::Size2M => "2m",
            Self::Size1G => "1g",
        }
    }
}

impl std::fmt::Display for GuestPageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for GuestPageSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "4k" => Ok(Self::Size4K),
            "2m" => Ok(Self::Size2M),
            "1g" => Ok(Self::Size1G),
            other => Err(format!(
                "unknown guest page size {other:?}: expected 4k, 2m or 1g"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The layout is checked at compile time.
    const _: () = {
        assert!(SYSTEM_GPA + MAX_SYSTEM_BYTES <= CONTROL_GPA);
        assert!(control_page(MAX_VCPUS) <= DOORBELL_GPA);
        assert!(DOORBELL_GPA + PAGE_SIZE <= DATA_GPA);
        assert!(DATA_GPA.is_multiple_of(HUGE_1G));
        assert!(SYSTEM_GPA.is_multiple_of(HUGE_2M));
        assert!(data_page(MAX_DATA_PAGES) <= UNMAPPED_GVA);
    };

    #[test]
    fn page_size_names_round_trip() {
        for size in [
            GuestPageSize::Size4K,
            GuestPageSize::Size2M,
            GuestPageSize::Size1G,
        ] {
            assert_eq!(size.name().parse::<GuestPageSize>(), Ok(size));
        }
        assert!("3k".parse::<GuestPageSize>().is_err());
    }
}

/// Where the guest's leaf page-table entries for the data region are, when the machine puts
/// them where the guest can write them (page-table ops need this): contiguous 8-byte entries
/// from `gva` on, one per `page`-sized mapping of the data region, in data-page order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeafEntries {
    /// Guest-virtual address of the entry mapping data page 0.
    pub gva: u64,
    /// Size each entry maps.
    pub page: GuestPageSize,
}

impl LeafEntries {
    /// Guest-virtual address of the entry that maps data page `page`.
    #[must_use]
    pub const fn of(&self, page: u64) -> u64 {
        self.gva + page / (self.page.bytes() / PAGE_SIZE) * 8
    }
}
