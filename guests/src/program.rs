//! The pattern IR: what each vCPU writes and reads, in what order, and where it meets the host.
//!
//! A [`Program`] is one [`Thread`] per vCPU. Every write stores a **stamp**
//! `(vcpu << 48) | seq` (see [`crate::sim::stamp`]) with `seq` counting up from 1 on each vCPU,
//! so every write changes its page and a page's content names its last writer. After each write
//! the guest publishes `seq` in its control page with release order.
//!
//! Programs are plain data (serde), validated by [`Program::validate`] before compilation.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::layout::{MAX_DATA_PAGES, MAX_VCPUS, PAGE_SIZE};

/// Largest table a `Shuffled` or `List` sequence may compile to (entries).
pub const MAX_TABLE_ENTRIES: u64 = 1 << 20;

/// A guest program: one thread of ops per vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    /// Number of 4 KiB pages in the data region; every page index is below this.
    pub data_pages: u64,
    /// `vcpus[v]` runs on vCPU `v`.
    pub vcpus: Vec<Thread>,
    /// Sequence numbers start after this (0: the first write is seq 1). Several programs run
    /// one after another on the same memory use disjoint ranges, so every write still changes
    /// its page.
    #[serde(default)]
    pub seq_base: u64,
}

/// The ops one vCPU runs, in order. A thread that does not end in [`Op::Done`] (or a
/// [`Op::Misbehave`]) gets a `Done` appended by the compiler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thread {
    /// The ops, run in order.
    pub ops: Vec<Op>,
}

/// One step of a guest thread.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Store the next stamp (8 bytes) at `offset` in data page `page`, then publish its seq.
    Write {
        /// Data page index.
        page: u64,
        /// Byte offset in the page; a multiple of 8, at most 4088.
        offset: u16,
    },
    /// Load 8 bytes at `offset` in data page `page` and count the read in the control page.
    Read {
        /// Data page index.
        page: u64,
        /// Byte offset in the page; a multiple of 8, at most 4088.
        offset: u16,
    },
    /// Visit `pages` in order, doing `access` at `offset` in each, `repeat` times over.
    Loop {
        /// Which pages, in which order.
        pages: PageSeq,
        /// What to do on each page.
        access: Access,
        /// Byte offset in each page; a multiple of 8, at most 4088.
        offset: u16,
        /// How many passes.
        repeat: Repeat,
    },
    /// Publish `n` as the last sync point reached, ring the SYNC doorbell and wait there until
    /// the host runs the vCPU again. `n` is at least 1 and strictly increases along a thread.
    Sync(u32),
    /// Ring the DONE doorbell; the thread ends here.
    Done,
    /// Misbehave on purpose (watchdog tests); the thread never gets past this op.
    Misbehave(Misbehaviour),
    /// Clear the accessed and dirty bits of the guest's own leaf page-table entry that maps
    /// data page `page` (a 2 MiB entry covers its whole region). Needs a machine that puts the
    /// data region's page tables where the guest can write them. A `Sync` must follow before
    /// the thread touches data again: the host flushes the guest's TLB there.
    ClearAd {
        /// Data page whose mapping is changed.
        page: u64,
    },
    /// Point the guest's 4 KiB mapping of data page `page` at the physical page of data page
    /// `to`, with its accessed and dirty bits clear: later accesses to `page` land in `to`. Single-vCPU programs only (the page tables
    /// are shared by every vCPU); a `Sync` must follow before the next data access, as for
    /// [`Op::ClearAd`].
    Remap {
        /// Data page whose mapping is changed.
        page: u64,
        /// Data page whose physical page it maps from now on.
        to: u64,
    },
}

/// What a loop does on each page it visits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A stamped write (one seq per page visited).
    Write,
    /// A read.
    Read,
}

/// How many passes a loop makes over its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Repeat {
    /// Exactly this many passes (at least 1).
    Times(u32),
    /// Until the host sets the control page's STOP field; checked before every page, so the
    /// loop ends at any page, mid-pass. Used by concurrent runs.
    UntilStopped,
}

/// Deliberate guest misbehaviour, to prove the harness never hangs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misbehaviour {
    /// Spin forever without an exit: never reaches the next sync point.
    Hang,
    /// Touch an unmapped address with no exception handler: the vCPU shuts down.
    TripleFault,
    /// Write to a non-doorbell MMIO address forever: an endless stream of exits, no progress.
    ExitStorm,
}

/// A sequence of data pages a loop visits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageSeq {
    /// `start, start + 1, ..., start + count - 1`.
    Range {
        /// First page.
        start: u64,
        /// Number of pages.
        count: u64,
    },
    /// `start, start + stride, ..., start + (count - 1) * stride`.
    Strided {
        /// First page.
        start: u64,
        /// Number of pages visited.
        count: u64,
        /// Distance between visited pages (at least 1).
        stride: u64,
    },
    /// A permutation of `start..start + count` drawn from `seed` (see [`shuffle`]).
    Shuffled {
        /// First page of the range.
        start: u64,
        /// Number of pages.
        count: u64,
        /// Permutation seed.
        seed: u64,
    },
    /// An explicit list; pages may repeat (hot/cold patterns).
    List(Vec<u64>),
}

impl PageSeq {
    /// Number of pages one pass visits.
    #[must_use]
    pub fn len(&self) -> u64 {
        match self {
            Self::Range { count, .. }
            | Self::Strided { count, .. }
            | Self::Shuffled { count, .. } => *count,
            Self::List(pages) => pages.len() as u64,
        }
    }

    /// True when a pass visits no page.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Highest page index visited, or `None` for an empty sequence.
    #[must_use]
    pub fn max_page(&self) -> Option<u64> {
        match self {
            Self::Range { start, count } | Self::Shuffled { start, count, .. } => {
                count.checked_sub(1).and_then(|c| start.checked_add(c))
            }
            Self::Strided {
                start,
                count,
                stride,
            } => count
                .checked_sub(1)
                .and_then(|c| c.checked_mul(*stride))
                .and_then(|d| start.checked_add(d)),
            Self::List(pages) => pages.iter().copied().max(),
        }
    }

    /// The pages of one pass, in visiting order. Materialises shuffles: call on validated
    /// sequences only (their length is bounded by [`MAX_TABLE_ENTRIES`]).
    #[must_use]
    pub fn pages(&self) -> Vec<u64> {
        match self {
            Self::Range { start, count } => (*start..*start + *count).collect(),
            Self::Strided {
                start,
                count,
                stride,
            } => (0..*count).map(|i| *start + i * *stride).collect(),
            Self::Shuffled { start, count, seed } => shuffle(*start, *count, *seed),
            Self::List(pages) => pages.clone(),
        }
    }

    /// The page visited at position `i` of a pass (`i < len()`).
    #[must_use]
    pub fn page_at(&self, i: u64) -> u64 {
        match self {
            Self::Range { start, .. } => start + i,
            Self::Strided { start, stride, .. } => start + i * stride,
            Self::Shuffled { .. } => self.pages()[usize::try_from(i).unwrap_or(usize::MAX)],
            Self::List(pages) => pages[usize::try_from(i).unwrap_or(usize::MAX)],
        }
    }

    /// True when the compiled loop reads its pages from a table rather than computing them.
    #[must_use]
    pub fn needs_table(&self) -> bool {
        matches!(self, Self::Shuffled { .. } | Self::List(_))
    }
}

/// A permutation of `start..start + count`: Fisher-Yates driven by splitmix64 from `seed`.
/// Defined here, not by a library, so the compiled table and the reference interpreter can
/// never disagree across crate versions.
#[must_use]
pub fn shuffle(start: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut pages: Vec<u64> = (start..start + count).collect();
    let mut state = seed;
    for i in (1..pages.len()).rev() {
        let j = splitmix64(&mut state) % (i as u64 + 1);
        pages.swap(i, usize::try_from(j).unwrap_or(i));
    }
    pages
}

/// One step of the splitmix64 generator.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why a program cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// No thread at all.
    #[error("program has no vCPU threads")]
    NoVcpus,
    /// More threads than the layout has control pages.
    #[error("program has {0} vCPU threads; at most {MAX_VCPUS} are supported")]
    TooManyVcpus(usize),
    /// Data region of zero pages or beyond the layout.
    #[error("data region of {0} pages is out of range (1..={MAX_DATA_PAGES})")]
    DataPages(u64),
    /// A page index outside the data region.
    #[error("vCPU {vcpu} op {op}: page {page} is outside the data region of {data_pages} pages")]
    PageOutOfRange {
        /// Thread.
        vcpu: usize,
        /// Op index in the thread.
        op: usize,
        /// Offending page (the highest one for loops).
        page: u64,
        /// Size of the data region.
        data_pages: u64,
    },
    /// Offset not 8-aligned or past the page.
    #[error("vCPU {vcpu} op {op}: offset {offset} must be a multiple of 8 below {PAGE_SIZE}")]
    BadOffset {
        /// Thread.
        vcpu: usize,
        /// Op index in the thread.
        op: usize,
        /// Offending offset.
        offset: u16,
    },
    /// A loop that visits nothing, has stride 0, or repeats 0 times.
    #[error("vCPU {vcpu} op {op}: {what}")]
    BadLoop {
        /// Thread.
        vcpu: usize,
        /// Op index in the thread.
        op: usize,
        /// What is wrong.
        what: String,
    },
    /// Sync numbers must start at 1 and strictly increase along a thread.
    #[error("vCPU {vcpu} op {op}: Sync({n}) must be greater than the previous sync ({previous})")]
    SyncOrder {
        /// Thread.
        vcpu: usize,
        /// Op index in the thread.
        op: usize,
        /// This sync's number.
        n: u32,
        /// Previous sync's number (0 if none).
        previous: u32,
    },
    /// A page-table op must be followed by a `Sync` before the next data access.
    #[error(
        "vCPU {vcpu} op {op}: the page-table change at op {pte_op} needs a Sync before this data access (the host flushes the guest's TLB there)"
    )]
    UnflushedPageTable {
        /// Thread.
        vcpu: usize,
        /// The data access.
        op: usize,
        /// The page-table op.
        pte_op: usize,
    },
    /// `Remap` in a program with more than one thread.
    #[error("vCPU {vcpu} op {op}: remap needs a single-vCPU program (page tables are shared)")]
    SharedRemap {
        /// Thread.
        vcpu: usize,
        /// Op index in the thread.
        op: usize,
    },
    /// Ops after `Done` or a misbehaviour can never run.
    #[error("vCPU {vcpu} op {op}: unreachable, the thread ends at op {end}")]
    Unreachable {
        /// Thread.
        vcpu: usize,
        /// First unreachable op.
        op: usize,
        /// The op that ends the thread.
        end: usize,
    },
}

impl Program {
    /// A program over `data_pages` data pages with the given threads.
    #[must_use]
    pub fn new(data_pages: u64, vcpus: Vec<Thread>) -> Self {
        Self {
            data_pages,
            vcpus,
            seq_base: 0,
        }
    }

    /// The same program with sequence numbers starting after `seq_base`.
    #[must_use]
    pub fn with_seq_base(mut self, seq_base: u64) -> Self {
        self.seq_base = seq_base;
        self
    }

    /// Check every rule the compilers rely on. Errors name the vCPU and the op.
    pub fn validate(&self) -> Result<(), ProgramError> {
        if self.vcpus.is_empty() {
            return Err(ProgramError::NoVcpus);
        }
        if self.vcpus.len() > MAX_VCPUS {
            return Err(ProgramError::TooManyVcpus(self.vcpus.len()));
        }
        if self.data_pages == 0 || self.data_pages > MAX_DATA_PAGES {
            return Err(ProgramError::DataPages(self.data_pages));
        }
        for (vcpu, thread) in self.vcpus.iter().enumerate() {
            self.validate_thread(vcpu, thread)?;
        }
        Ok(())
    }

    fn validate_thread(&self, vcpu: usize, thread: &Thread) -> Result<(), ProgramError> {
        let mut last_sync = 0;
        let mut end: Option<usize> = None;
        // The last page-table op not yet followed by a sync.
        let mut unflushed: Option<usize> = None;
        for (op_index, op) in thread.ops.iter().enumerate() {
            if let Some(end) = end {
                return Err(ProgramError::Unreachable {
                    vcpu,
                    op: op_index,
                    end,
                });
            }
            let page_check = |page: u64| {
                if page < self.data_pages {
                    Ok(())
                } else {
                    Err(ProgramError::PageOutOfRange {
                        vcpu,
                        op: op_index,
                        page,
                        data_pages: self.data_pages,
                    })
                }
            };
            let offset_check = |offset: u16| {
                if offset.is_multiple_of(8) && u64::from(offset) + 8 <= PAGE_SIZE {
                    Ok(())
                } else {
                    Err(ProgramError::BadOffset {
                        vcpu,
                        op: op_index,
                        offset,
                    })
                }
            };
            let bad_loop = |what: String| {
                Err(ProgramError::BadLoop {
                    vcpu,
                    op: op_index,
                    what,
                })
            };
            let flushed = |unflushed: Option<usize>| match unflushed {
                Some(pte_op) => Err(ProgramError::UnflushedPageTable {
                    vcpu,
                    op: op_index,
                    pte_op,
                }),
                None => Ok(()),
            };
            match op {
                Op::Write { page, offset } | Op::Read { page, offset } => {
                    flushed(unflushed)?;
                    page_check(*page)?;
                    offset_check(*offset)?;
                }
                Op::ClearAd { page } => {
                    page_check(*page)?;
                    unflushed = Some(op_index);
                }
                Op::Remap { page, to } => {
                    if self.vcpus.len() > 1 {
                        return Err(ProgramError::SharedRemap { vcpu, op: op_index });
                    }
                    page_check(*page)?;
                    page_check(*to)?;
                    unflushed = Some(op_index);
                }
                Op::Loop {
                    pages,
                    offset,
                    repeat,
                    ..
                } => {
                    flushed(unflushed)?;
                    offset_check(*offset)?;
                    if pages.is_empty() {
                        return bad_loop("loop visits no page".into());
                    }
                    if let PageSeq::Strided { stride: 0, .. } = pages {
                        return bad_loop("strided loop has stride 0".into());
                    }
                    if pages.needs_table() && pages.len() > MAX_TABLE_ENTRIES {
                        return bad_loop(format!(
                            "{} table entries; at most {MAX_TABLE_ENTRIES}",
                            pages.len()
                        ));
                    }
                    if *repeat == Repeat::Times(0) {
                        return bad_loop("loop repeats 0 times".into());
                    }
                    match pages.max_page() {
                        Some(page) => page_check(page)?,
                        None => return bad_loop("page arithmetic overflows".into()),
                    }
                }
                Op::Sync(n) => {
                    if *n <= last_sync {
                        return Err(ProgramError::SyncOrder {
                            vcpu,
                            op: op_index,
                            n: *n,
                            previous: last_sync,
                        });
                    }
                    last_sync = *n;
                    unflushed = None;
                }
                Op::Done | Op::Misbehave(_) => {
                    flushed(unflushed)?;
                    end = Some(op_index);
                }
            }
        }
        Ok(())
    }

    /// Number of vCPUs.
    #[must_use]
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }
}

impl Thread {
    /// A thread running `ops`.
    #[must_use]
    pub fn new(ops: Vec<Op>) -> Self {
        Self { ops }
    }

    /// True when the thread ends itself (Done or a misbehaviour), so no Done is appended.
    #[must_use]
    pub fn ends_itself(&self) -> bool {
        matches!(self.ops.last(), Some(Op::Done | Op::Misbehave(_)))
    }
}

impl fmt::Display for PageSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Range { start, count } => write!(f, "pages {start}..{}", start + count),
            Self::Strided {
                start,
                count,
                stride,
            } => {
                write!(f, "{count} pages from {start} stride {stride}")
            }
            Self::Shuffled { start, count, seed } => {
                write!(
                    f,
                    "pages {start}..{} shuffled (seed {seed:#x})",
                    start + count
                )
            }
            Self::List(pages) => write!(f, "list of {} pages", pages.len()),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Write { page, offset } => write!(f, "write page {page} +{offset:#x}"),
            Self::Read { page, offset } => write!(f, "read page {page} +{offset:#x}"),
            Self::Loop {
                pages,
                access,
                offset,
                repeat,
            } => {
                let access = match access {
                    Access::Write => "write",
                    Access::Read => "read",
                };
                let repeat = match repeat {
                    Repeat::Times(n) => format!("x{n}"),
                    Repeat::UntilStopped => "until stopped".to_string(),
                };
                write!(f, "loop {access} +{offset:#x} over {pages}, {repeat}")
            }
            Self::Sync(n) => write!(f, "sync {n}"),
            Self::Done => f.write_str("done"),
            Self::Misbehave(m) => write!(f, "misbehave: {m:?}"),
            Self::ClearAd { page } => write!(f, "clear A/D of page {page}'s mapping"),
            Self::Remap { page, to } => write!(f, "remap page {page} to page {to}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(ops: Vec<Op>) -> Program {
        Program::new(16, vec![Thread::new(ops)])
    }

    #[test]
    fn shuffle_is_a_permutation_and_depends_on_the_seed() {
        let a = shuffle(10, 100, 1);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (10..110).collect::<Vec<_>>());
        assert_ne!(a, shuffle(10, 100, 2));
        assert_eq!(a, shuffle(10, 100, 1));
    }

    #[test]
    fn page_table_ops_need_a_sync_before_the_next_access_and_remap_one_vcpu() {
        assert!(
            one(vec![
                Op::Remap { page: 1, to: 9 },
                Op::ClearAd { page: 2 },
                Op::Sync(1),
                Op::Write { page: 1, offset: 0 },
            ])
            .validate()
            .is_ok()
        );
        assert!(matches!(
            one(vec![
                Op::ClearAd { page: 2 },
                Op::Read { page: 2, offset: 0 }
            ])
            .validate(),
            Err(ProgramError::UnflushedPageTable {
                op: 1,
                pte_op: 0,
                ..
            })
        ));
        assert!(matches!(
            one(vec![Op::Remap { page: 1, to: 16 }, Op::Sync(1)]).validate(),
            Err(ProgramError::PageOutOfRange { page: 16, .. })
        ));
        let two = Program::new(
            16,
            vec![
                Thread::new(vec![Op::Remap { page: 1, to: 2 }, Op::Sync(1)]),
                Thread::new(vec![]),
            ],
        );
        assert!(matches!(
            two.validate(),
            Err(ProgramError::SharedRemap { vcpu: 0, op: 0 })
        ));
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            Program::new(16, vec![]).validate(),
            Err(ProgramError::NoVcpus)
        );
        assert!(matches!(
            one(vec![Op::Write {
                page: 16,
                offset: 0
            }])
            .validate(),
            Err(ProgramError::PageOutOfRange {
                vcpu: 0,
                op: 0,
                page: 16,
                data_pages: 16
            })
        ));
        assert!(matches!(
            one(vec![Op::Write { page: 1, offset: 4 }]).validate(),
            Err(ProgramError::BadOffset { offset: 4, .. })
        ));
        assert!(matches!(
            one(vec![Op::Read {
                page: 1,
                offset: 4096
            }])
            .validate(),
            Err(ProgramError::BadOffset { offset: 4096, .. })
        ));
        assert!(matches!(
            one(vec![Op::Sync(2), Op::Sync(2)]).validate(),
            Err(ProgramError::SyncOrder {
                op: 1,
                n: 2,
                previous: 2,
                ..
            })
        ));
        assert!(matches!(
            one(vec![Op::Done, Op::Sync(1)]).validate(),
            Err(ProgramError::Unreachable { op: 1, end: 0, .. })
        ));
        let strided = Op::Loop {
            pages: PageSeq::Strided {
                start: 0,
                count: 4,
                stride: 5,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(1),
        };
        assert_eq!(one(vec![strided]).validate(), Ok(()));
        let too_far = Op::Loop {
            pages: PageSeq::Strided {
                start: 1,
                count: 4,
                stride: 5,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(1),
        };
        assert!(matches!(
            one(vec![too_far]).validate(),
            Err(ProgramError::PageOutOfRange { page: 16, .. })
        ));
        let zero = Op::Loop {
            pages: PageSeq::Range { start: 0, count: 0 },
            access: Access::Read,
            offset: 0,
            repeat: Repeat::Times(1),
        };
        assert!(matches!(
            one(vec![zero]).validate(),
            Err(ProgramError::BadLoop { .. })
        ));
    }

    #[test]
    fn page_at_agrees_with_pages() {
        let seqs = [
            PageSeq::Range { start: 3, count: 5 },
            PageSeq::Strided {
                start: 1,
                count: 4,
                stride: 3,
            },
            PageSeq::Shuffled {
                start: 0,
                count: 9,
                seed: 7,
            },
            PageSeq::List(vec![4, 4, 1]),
        ];
        for seq in seqs {
            let pages = seq.pages();
            assert_eq!(pages.len() as u64, seq.len());
            for (i, page) in pages.iter().enumerate() {
                assert_eq!(seq.page_at(i as u64), *page, "{seq}");
            }
            assert_eq!(pages.iter().copied().max(), seq.max_page());
        }
    }
}
