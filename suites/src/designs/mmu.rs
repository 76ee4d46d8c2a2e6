//! A small software MMU: guest-physical pages, one stage-2 (EPT / arm64 stage-2) table, per-vCPU
//! TLBs, KVM's `mmu_lock`, and the hardware's actions as explicit atomic steps.
//!
//! What it models, and what it leaves out:
//! - **Pages** are the data pages of a guest program (at most 64, one bit each in the masks).
//!   A **block** of `Geometry::block` consecutive pages stands for a 2 MiB mapping (512 pages
//!   in a real table; a handful here keeps exploration small). A block is mapped by one huge
//!   entry until something splits it into per-page leaves that inherit its bits.
//! - **Entries** carry W (writable), A (accessed), D (dirty) and DBM (arm64 dirty-bit
//!   modifier: hardware may make a read-only entry writable on a write, which is how it
//!   records "dirty"). Every page is present: faults are permission faults only.
//! - **Root entries**, one per block, can be made read-only as a whole (the generation-number
//!   write-protect of seed 004 pushes that protection down on a write fault).
//! - **TLBs** cache, per vCPU and page, whether the translation allows writes and whether D
//!   was already set. A write through a cached writable, dirty translation touches no entry:
//!   it neither faults nor sets A or D again. That is the whole reason for TLB flushes, and
//!   the model keeps it. A walk of a huge entry fills the TLB for every page of its block.
//! - **Hardware steps** ([`Mmu::walk`]) are atomic: one walk reads an entry, sets A (and D,
//!   appending to the vCPU's PML buffer or raising a PML-full exit, or sets W through DBM)
//!   and fills the TLB. The store that follows is a separate step: the host can change
//!   entries between the two, but a TLB flush (an IPI) waits for the instruction to retire.
//! - **mmu_lock** is a single owner (host or one vCPU); fault handling runs under it in one
//!   step; host operations hold it across many steps, while the other vCPUs' hardware keeps
//!   walking and storing, which is where the races live.
//!
//! Not modelled: memory ordering beyond sequential consistency of steps (x86-TSO and arm64
//! barriers are out of scope), intermediate page-table levels other than the root entries,
//! page-table pages themselves (they are never dirty-logged here), nested guests.

use std::fmt;

/// Sizes of a modelled machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Data pages (1..=64).
    pub pages: usize,
    /// Pages per huge mapping / per root entry (divides `pages`).
    pub block: usize,
    /// vCPUs.
    pub vcpus: usize,
    /// Entries a PML buffer holds before a PML-full exit (512 in hardware).
    pub pml_slots: usize,
    /// Pages per DBM section (16 or 64 in seed 002).
    pub section: usize,
}

impl Geometry {
    /// Block (huge mapping / root entry) holding `page`.
    #[must_use]
    pub const fn block_of(&self, page: usize) -> usize {
        page / self.block
    }

    /// Pages of block `b`.
    pub fn block_pages(&self, b: usize) -> std::ops::Range<usize> {
        b * self.block..((b + 1) * self.block).min(self.pages)
    }

    /// Number of blocks.
    #[must_use]
    pub const fn blocks(&self) -> usize {
        self.pages.div_ceil(self.block)
    }

    /// Pages of the DBM section holding `page`.
    pub fn section_pages(&self, page: usize) -> std::ops::Range<usize> {
        let s = page / self.section;
        s * self.section..((s + 1) * self.section).min(self.pages)
    }
}

/// One stage-2 entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Spte {
    /// Writable.
    pub w: bool,
    /// Accessed.
    pub a: bool,
    /// Dirty (x86 EPT D bit).
    pub d: bool,
    /// arm64 DBM: hardware may set W on a write (hardware dirty state).
    pub dbm: bool,
}

impl Spte {
    /// A populated, writable, accessed, dirty entry (memory the guest used before logging).
    pub const HOT: Self = Self {
        w: true,
        a: true,
        d: true,
        dbm: false,
    };
}

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TlbEntry {
    /// Writes allowed without a walk.
    pub w: bool,
    /// D already set: a write needs no walk to set it.
    pub d: bool,
}

/// Who holds `mmu_lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Holder {
    /// The host thread (an ioctl).
    Host,
    /// A vCPU handling a fault.
    Vcpu(usize),
}

/// How the hardware walks on a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WalkKind {
    /// x86 EPT with A/D bits; `pml`: setting D appends the page to the vCPU's PML buffer.
    X86 {
        /// Page-modification logging on.
        pml: bool,
    },
    /// arm64 stage 2 with hardware dirty state: a write to a read-only entry with DBM set
    /// makes it writable instead of faulting.
    ArmDbm,
}

/// What a walk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Translation cached; the access can complete. The flags say what the walk changed.
    Filled {
        /// A was clear and is now set.
        set_a: bool,
        /// D was clear and is now set.
        set_d: bool,
        /// The page was appended to the PML buffer.
        pml: bool,
        /// DBM made the entry writable (hardware dirty).
        hw_dirty: bool,
    },
    /// Permission fault: KVM must handle it (under `mmu_lock`).
    Fault,
    /// D had to be set but the PML buffer is full: PML-full VM exit before the access.
    PmlFull,
}

impl fmt::Display for Walk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Filled {
                set_a,
                set_d,
                pml,
                hw_dirty,
            } => {
                let mut parts = Vec::new();
                if set_a {
                    parts.push("sets A");
                }
                if set_d {
                    parts.push("sets D");
                }
                if pml {
                    parts.push("PML append");
                }
                if hw_dirty {
                    parts.push("DBM makes it writable");
                }
                if parts.is_empty() {
                    write!(f, "fills the TLB")
                } else {
                    write!(f, "fills the TLB, {}", parts.join(", "))
                }
            }
            Self::Fault => write!(f, "faults"),
            Self::PmlFull => write!(f, "PML buffer full: exit"),
        }
    }
}

/// The modelled MMU state. Everything here is part of the explored state (hashed).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mmu {
    /// Sizes.
    pub geo: Geometry,
    /// Per-page leaf entries (meaningful where the block is not mapped huge).
    pub leaf: Vec<Spte>,
    /// Per-block huge entries (`Some`: the block is one 2 MiB mapping).
    pub huge: Vec<Option<Spte>>,
    /// Per-block root entries made read-only by a write-protect-all (seed 004).
    pub root_ro: u64,
    /// Per vCPU, per page: cached translation.
    pub tlb: Vec<Vec<Option<TlbEntry>>>,
    /// Per vCPU: PML buffer (pages, in order).
    pub pml: Vec<Vec<usize>>,
    /// KVM's memslot dirty bitmap (bit per page).
    pub bitmap: u64,
    /// `mmu_lock`.
    pub lock: Option<Holder>,
    /// Generation of write-protect-all (seed 004) and the generation the shared root has.
    pub generation: u8,
    /// Generation the shared root was last reloaded at.
    pub root_gen: u8,
    /// vCPUs with a pending root reload request (bit per vCPU).
    pub reload: u64,
    /// DBM sections KVM knows have DBM set (bit per section, seed 002).
    pub dbm_sections: u64,
}

/// Bit of `i` in a mask.
#[must_use]
pub const fn bit(i: usize) -> u64 {
    1u64 << i
}

/// Indices of the set bits of `mask` below `n`.
pub fn bits(mask: u64, n: usize) -> impl Iterator<Item = usize> {
    (0..n).filter(move |&i| mask & bit(i) != 0)
}

impl Mmu {
    /// Every page populated, writable, accessed and dirty, mapped huge where `huge` says so;
    /// every vCPU's TLB warm with writable, dirty translations of every page (the guest ran
    /// before logging was enabled: hot pages sit in the TLB).
    #[must_use]
    pub fn new(geo: Geometry, huge: bool) -> Self {
        assert!(
            (1..=64).contains(&geo.pages) && geo.block >= 1 && geo.section >= 1,
            "geometry out of range: {geo:?}"
        );
        let warm = Some(TlbEntry { w: true, d: true });
        Self {
            geo,
            leaf: vec![Spte::HOT; geo.pages],
            huge: vec![huge.then_some(Spte::HOT); geo.blocks()],
            root_ro: 0,
            tlb: vec![vec![warm; geo.pages]; geo.vcpus],
            pml: vec![Vec::new(); geo.vcpus],
            bitmap: 0,
            lock: None,
            generation: 0,
            root_gen: 0,
            reload: 0,
            dbm_sections: 0,
        }
    }

    /// The entry that translates `page` now (the huge one if the block is mapped huge).
    #[must_use]
    pub fn entry(&self, page: usize) -> Spte {
        self.huge[self.geo.block_of(page)].unwrap_or(self.leaf[page])
    }

    /// The entry that translates `page`, for changing it.
    pub fn entry_mut(&mut self, page: usize) -> &mut Spte {
        let b = self.geo.block_of(page);
        match &mut self.huge[b] {
            Some(h) => h,
            None => &mut self.leaf[page],
        }
    }

    /// Whether `page` is mapped by a huge entry.
    #[must_use]
    pub fn is_huge(&self, page: usize) -> bool {
        self.huge[self.geo.block_of(page)].is_some()
    }

    /// Split the huge mapping holding `page` (if any) into leaves that inherit its bits.
    /// Returns whether a split happened. TLB entries of the block stay as they were (a split
    /// keeps permissions, so no flush is needed for correctness).
    pub fn split(&mut self, page: usize) -> bool {
        let b = self.geo.block_of(page);
        let Some(h) = self.huge[b].take() else {
            return false;
        };
        for p in self.geo.block_pages(b) {
            self.leaf[p] = h;
        }
        true
    }

    /// The cached translation of `page` on `vcpu`.
    #[must_use]
    pub fn tlb(&self, vcpu: usize, page: usize) -> Option<TlbEntry> {
        self.tlb[vcpu][page]
    }

    /// Whether a write by `vcpu` to `page` completes from the TLB alone.
    #[must_use]
    pub fn write_hits(&self, vcpu: usize, page: usize) -> bool {
        self.tlb[vcpu][page].is_some_and(|e| e.w && e.d)
    }

    /// One hardware walk by `vcpu` for an access to `page` (atomic).
    pub fn walk(&mut self, kind: WalkKind, vcpu: usize, page: usize, write: bool) -> Walk {
        let root_ro = self.root_ro & bit(self.geo.block_of(page)) != 0;
        let pml_full = self.pml[vcpu].len() >= self.geo.pml_slots;
        let e = self.entry(page);
        let mut set_d = false;
        let mut pml = false;
        let mut hw_dirty = false;
        if write {
            match kind {
                WalkKind::X86 { pml: on } => {
                    if !e.w || root_ro {
                        self.tlb[vcpu][page] = None;
                        return Walk::Fault;
                    }
                    if !e.d {
                        if on && pml_full {
                            return Walk::PmlFull;
                        }
                        set_d = true;
                        pml = on;
                    }
                }
                WalkKind::ArmDbm => {
                    if root_ro || (!e.w && !e.dbm) {
                        self.tlb[vcpu][page] = None;
                        return Walk::Fault;
                    }
                    hw_dirty = !e.w;
                }
            }
        }
        let set_a = !e.a;
        let huge = self.is_huge(page);
        let ent = self.entry_mut(page);
        ent.a = true;
        ent.d |= set_d;
        ent.w |= hw_dirty;
        let cached = TlbEntry {
            w: ent.w && !root_ro,
            d: ent.d || kind == WalkKind::ArmDbm,
        };
        if pml {
            self.pml[vcpu].push(page);
        }
        if huge {
            let b = self.geo.block_of(page);
            for p in self.geo.block_pages(b) {
                self.tlb[vcpu][p] = Some(cached);
            }
        } else {
            self.tlb[vcpu][page] = Some(cached);
        }
        Walk::Filled {
            set_a,
            set_d,
            pml,
            hw_dirty,
        }
    }

    /// Drop every cached translation of every vCPU (the caller checks that no vCPU is in the
    /// middle of an instruction: the IPI waits for it).
    pub fn flush_all(&mut self) {
        for t in &mut self.tlb {
            t.iter_mut().for_each(|e| *e = None);
        }
    }

    /// Move `vcpu`'s PML buffer into the dirty bitmap (what KVM does at every VM exit).
    /// Returns the entries moved.
    pub fn drain_pml(&mut self, vcpu: usize) -> usize {
        let n = self.pml[vcpu].len();
        for p in std::mem::take(&mut self.pml[vcpu]) {
            self.bitmap |= bit(p);
        }
        n
    }

    /// Take `mmu_lock` for `who`; false if someone holds it.
    pub fn try_lock(&mut self, who: Holder) -> bool {
        if self.lock.is_some() {
            return false;
        }
        self.lock = Some(who);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            pages: 4,
            block: 2,
            vcpus: 2,
            pml_slots: 1,
            section: 2,
        }
    }

    #[test]
    fn a_cached_writable_translation_neither_faults_nor_sets_d_again() {
        let mut m = Mmu::new(geo(), false);
        m.flush_all();
        let x86 = WalkKind::X86 { pml: true };
        m.leaf[1].d = false;
        let w = m.walk(x86, 0, 1, true);
        assert_eq!(
            w,
            Walk::Filled {
                set_a: false,
                set_d: true,
                pml: true,
                hw_dirty: false
            }
        );
        assert_eq!(m.pml[0], vec![1]);
        // The host clears D (and A) but does not flush: the TLB still lets writes through.
        m.leaf[1].d = false;
        m.leaf[1].a = false;
        assert!(
            m.write_hits(0, 1),
            "a write through the TLB touches no entry"
        );
        assert!(!m.leaf[1].d && !m.leaf[1].a);
        m.flush_all();
        assert!(!m.write_hits(0, 1));
    }

    #[test]
    fn pml_full_exits_before_setting_d_and_write_protect_faults() {
        let mut m = Mmu::new(geo(), false);
        m.flush_all();
        let x86 = WalkKind::X86 { pml: true };
        m.leaf[0].d = false;
        m.leaf[1].d = false;
        assert!(matches!(m.walk(x86, 0, 0, true), Walk::Filled { .. }));
        assert_eq!(m.walk(x86, 0, 1, true), Walk::PmlFull);
        assert!(!m.leaf[1].d, "nothing set before the exit");
        assert_eq!(m.drain_pml(0), 1);
        assert_eq!(m.bitmap, bit(0));
        m.leaf[2].w = false;
        assert_eq!(m.walk(x86, 1, 2, true), Walk::Fault);
        assert!(matches!(m.walk(x86, 1, 2, false), Walk::Filled { .. }));
    }

    #[test]
    fn dbm_makes_a_read_only_entry_writable_and_huge_walks_fill_the_block() {
        let mut m = Mmu::new(geo(), true);
        m.flush_all();
        m.huge[1] = Some(Spte {
            w: false,
            a: false,
            d: false,
            dbm: true,
        });
        let w = m.walk(WalkKind::ArmDbm, 0, 3, true);
        assert!(matches!(w, Walk::Filled { hw_dirty: true, .. }));
        assert!(m.entry(2).w, "the huge entry is writable now");
        assert!(m.write_hits(0, 2), "a huge walk caches the whole block");
        assert!(m.split(2));
        assert_eq!(m.leaf[2], m.leaf[3]);
        assert!(!m.is_huge(2));
        m.root_ro = bit(0);
        assert_eq!(
            m.walk(WalkKind::X86 { pml: false }, 1, 0, true),
            Walk::Fault
        );
    }
}
