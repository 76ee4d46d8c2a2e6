//! Reference interpreter: the exact sequence of events each vCPU's thread produces.
//!
//! This is the ground truth the oracles build on, kept deliberately naive so it is obviously
//! right. The compilers must make the guest do exactly these writes, in this order, with these
//! stamps; a KVM-backed test runs compiled programs and compares guest memory with what this
//! interpreter predicts.

use crate::program::{Access, Misbehaviour, Op, PageSeq, Program, Repeat, Thread};
use serde::{Deserialize, Serialize};

/// Bits of a stamp that hold the sequence number.
pub const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

/// The value write number `seq` of vCPU `vcpu` stores: `(vcpu << 48) | seq`.
#[must_use]
pub const fn stamp(vcpu: usize, seq: u64) -> u64 {
    ((vcpu as u64) << SEQ_BITS) | (seq & SEQ_MASK)
}

/// The vCPU that wrote `stamp`.
#[must_use]
pub fn stamp_vcpu(stamp: u64) -> usize {
    usize::try_from(stamp >> SEQ_BITS).unwrap_or(usize::MAX)
}

/// The per-vCPU sequence number in `stamp` (1 for a vCPU's first write; 0 means never written).
#[must_use]
pub const fn stamp_seq(stamp: u64) -> u64 {
    stamp & SEQ_MASK
}

/// One observable thing a guest thread does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Event {
    /// Stamped write number `seq` at `offset` in data page `page`.
    Write {
        /// Data page index.
        page: u64,
        /// Byte offset in the page.
        offset: u16,
        /// Sequence number (the stamp is `stamp(vcpu, seq)`).
        seq: u64,
    },
    /// A read of 8 bytes at `offset` in data page `page`.
    Read {
        /// Data page index.
        page: u64,
        /// Byte offset in the page.
        offset: u16,
    },
    /// The thread reached `Sync(n)` and waits for the host.
    Sync(u32),
    /// The thread finished; `last_seq` is its last write's sequence number (0 if none).
    Done {
        /// Last sequence number used.
        last_seq: u64,
    },
    /// The thread misbehaves from here on.
    Misbehave(Misbehaviour),
}

/// Iterator over the events of one thread. Infinite when the thread has a
/// `Repeat::UntilStopped` loop (the host decides how much of it ran) or misbehaves.
/// Page-table ops produce no event; after `Remap`, events name the data page an access really
/// lands in.
#[derive(Debug, Clone)]
pub struct ThreadEvents<'a> {
    ops: &'a [Op],
    op: usize,
    /// Remapped data pages: page -> the data page it maps now.
    remapped: std::collections::BTreeMap<u64, u64>,
    /// Position inside the current loop: (pass, page index within the pass).
    in_loop: Option<(u64, u64)>,
    /// Materialised table of the current loop (shuffles), to avoid recomputing per page.
    table: Option<Vec<u64>>,
    seq: u64,
    finished: bool,
}

impl<'a> ThreadEvents<'a> {
    /// Events of `thread`, with sequence numbers starting after 0.
    #[must_use]
    pub fn new(thread: &'a Thread) -> Self {
        Self::with_seq_base(thread, 0)
    }

    /// Events of `thread` whose first write is `seq_base + 1` (see `Program::seq_base`).
    #[must_use]
    pub fn with_seq_base(thread: &'a Thread, seq_base: u64) -> Self {
        Self {
            ops: &thread.ops,
            op: 0,
            remapped: std::collections::BTreeMap::new(),
            in_loop: None,
            table: None,
            seq: seq_base,
            finished: false,
        }
    }

    fn write_or_read(&mut self, access: Access, page: u64, offset: u16) -> Event {
        let page = self.remapped.get(&page).copied().unwrap_or(page);
        match access {
            Access::Write => {
                self.seq += 1;
                Event::Write {
                    page,
                    offset,
                    seq: self.seq,
                }
            }
            Access::Read => Event::Read { page, offset },
        }
    }
}

impl ThreadEvents<'_> {
    /// Seq of the last write produced so far (the seq base before the first).
    #[must_use]
    pub const fn last_seq(&self) -> u64 {
        self.seq
    }
}

impl Iterator for ThreadEvents<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let Some(op) = self.ops.get(self.op) else {
            // The compiler appends Done to a thread that does not end itself.
            self.finished = true;
            return Some(Event::Done { last_seq: self.seq });
        };
        match op {
            Op::ClearAd { .. } => {
                self.op += 1;
                self.next()
            }
            Op::Remap { page, to } => {
                self.op += 1;
                if page == to {
                    self.remapped.remove(page);
                } else {
                    self.remapped.insert(*page, *to);
                }
                self.next()
            }
            Op::Write { page, offset } => {
                self.op += 1;
                Some(self.write_or_read(Access::Write, *page, *offset))
            }
            Op::Read { page, offset } => {
                self.op += 1;
                Some(self.write_or_read(Access::Read, *page, *offset))
            }
            Op::Sync(n) => {
                self.op += 1;
                Some(Event::Sync(*n))
            }
            Op::Done => {
                self.finished = true;
                Some(Event::Done { last_seq: self.seq })
            }
            Op::Misbehave(m) => {
                self.finished = true;
                Some(Event::Misbehave(*m))
            }
            Op::Loop {
                pages,
                access,
                offset,
                repeat,
            } => {
                let (pass, i) = self.in_loop.unwrap_or((0, 0));
                if self.table.is_none() && pages.needs_table() {
                    self.table = Some(pages.pages());
                }
                let page = match (&self.table, pages) {
                    (Some(table), _) => table[usize::try_from(i).unwrap_or(usize::MAX)],
                    (None, seq) => seq.page_at(i),
                };
                let event = self.write_or_read(*access, page, *offset);
                let (mut pass, mut i) = (pass, i + 1);
                if i == pages.len() {
                    (pass, i) = (pass + 1, 0);
                }
                let done = match repeat {
                    Repeat::Times(n) => pass == u64::from(*n),
                    Repeat::UntilStopped => false,
                };
                if done {
                    self.op += 1;
                    self.in_loop = None;
                    self.table = None;
                } else {
                    self.in_loop = Some((pass, i));
                }
                Some(event)
            }
        }
    }
}

/// Advances `events` through write `progress` (a vCPU's published progress: the seq of its last
/// completed write) and returns the writes passed as (page, offset, seq); it stops right after
/// that write. If the thread ends first, the error is the seq of its last write.
pub fn writes_through(
    events: &mut ThreadEvents<'_>,
    progress: u64,
) -> Result<Vec<(u64, u16, u64)>, u64> {
    let mut out = Vec::new();
    while events.last_seq() < progress {
        match events.next() {
            Some(Event::Write { page, offset, seq }) => out.push((page, offset, seq)),
            Some(Event::Read { .. } | Event::Sync(_)) => {}
            Some(Event::Done { .. } | Event::Misbehave(_)) | None => {
                return Err(events.last_seq());
            }
        }
    }
    Ok(out)
}

/// The first write after the ones `events` already produced, if its data store has landed:
/// `word(page, offset)` reads guest memory and must return the write's stamp. A vCPU publishes
/// progress after the data store, and KVM can stop it between the two (its emulator, on a full
/// dirty ring), so memory may be one write ahead of progress — never more: the next data store
/// comes after the progress store. Reads in between are skipped; a sync point or the end of the
/// program in between means nothing is ahead.
pub fn landed_ahead(
    events: &ThreadEvents<'_>,
    vcpu: usize,
    word: impl Fn(u64, u16) -> u64,
) -> Option<(u64, u16, u64)> {
    let mut look = events.clone();
    loop {
        match look.next()? {
            Event::Write { page, offset, seq } => {
                return (word(page, offset) == stamp(vcpu, seq)).then_some((page, offset, seq));
            }
            Event::Read { .. } => {}
            Event::Sync(_) | Event::Done { .. } | Event::Misbehave(_) => return None,
        }
    }
}

/// What a thread does between two stops (sync points, done, or a misbehaviour).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Writes in order: (page, offset, seq).
    pub writes: Vec<(u64, u16, u64)>,
    /// Reads in order: (page, offset).
    pub reads: Vec<(u64, u16)>,
    /// The event that ends the segment (`Sync`, `Done` or `Misbehave`).
    pub end: Option<Event>,
}

/// Split a thread into segments ending at each stop. `None` for threads that never end by
/// themselves (`UntilStopped` loops), whose extent the host decides at run time.
#[must_use]
pub fn segments(thread: &Thread) -> Option<Vec<Segment>> {
    if thread.ops.iter().any(|op| {
        matches!(
            op,
            Op::Loop {
                repeat: Repeat::UntilStopped,
                ..
            }
        )
    }) {
        return None;
    }
    let mut out = Vec::new();
    let mut current = Segment::default();
    for event in ThreadEvents::new(thread) {
        match event {
            Event::Write { page, offset, seq } => current.writes.push((page, offset, seq)),
            Event::Read { page, offset } => current.reads.push((page, offset)),
            Event::Sync(_) | Event::Done { .. } | Event::Misbehave(_) => {
                current.end = Some(event);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    Some(out)
}

/// Total stamped writes a finite program makes, over all vCPUs (`None` if a thread is infinite).
#[must_use]
pub fn total_writes(program: &Program) -> Option<u64> {
    program
        .vcpus
        .iter()
        .map(|t| segments(t).map(|s| s.iter().map(|seg| seg.writes.len() as u64).sum::<u64>()))
        .sum()
}

/// Pages one pass of `seq` touches, deduplicated and sorted.
#[must_use]
pub fn distinct_pages(seq: &PageSeq) -> Vec<u64> {
    let mut pages = seq.pages();
    pages.sort_unstable();
    pages.dedup();
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::{PageSeq, Thread};

    #[test]
    fn stamps_round_trip() {
        let s = stamp(3, 12345);
        assert_eq!(stamp_vcpu(s), 3);
        assert_eq!(stamp_seq(s), 12345);
        assert_ne!(stamp(0, 1), 0, "the first write changes a zeroed page");
    }

    #[test]
    fn events_follow_the_ops() {
        let thread = Thread::new(vec![
            Op::Write { page: 2, offset: 8 },
            Op::Sync(1),
            Op::Loop {
                pages: PageSeq::Strided {
                    start: 0,
                    count: 2,
                    stride: 3,
                },
                access: Access::Write,
                offset: 0,
                repeat: Repeat::Times(2),
            },
            Op::Read { page: 1, offset: 0 },
        ]);
        let events: Vec<Event> = ThreadEvents::new(&thread).collect();
        assert_eq!(
            events,
            vec![
                Event::Write {
                    page: 2,
                    offset: 8,
                    seq: 1
                },
                Event::Sync(1),
                Event::Write {
                    page: 0,
                    offset: 0,
                    seq: 2
                },
                Event::Write {
                    page: 3,
                    offset: 0,
                    seq: 3
                },
                Event::Write {
                    page: 0,
                    offset: 0,
                    seq: 4
                },
                Event::Write {
                    page: 3,
                    offset: 0,
                    seq: 5
                },
                Event::Read { page: 1, offset: 0 },
                Event::Done { last_seq: 5 },
            ]
        );
        let segs = segments(&thread).expect("finite");
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].writes, vec![(2, 8, 1)]);
        assert_eq!(segs[1].writes.len(), 4);
        assert_eq!(segs[1].end, Some(Event::Done { last_seq: 5 }));
    }

    #[test]
    fn a_landed_write_ahead_of_progress_is_found() {
        let thread = Thread::new(vec![
            Op::Write { page: 1, offset: 0 },
            Op::Read { page: 0, offset: 0 },
            Op::Write { page: 2, offset: 8 },
            Op::Sync(1),
            Op::Write { page: 3, offset: 0 },
        ]);
        let mut events = ThreadEvents::with_seq_base(&thread, 10);
        assert!(matches!(events.next(), Some(Event::Write { seq: 11, .. })));
        // Memory holds write 12's stamp at page 2 +8: it landed before its progress store.
        let memory = |page, offset| {
            if (page, offset) == (2, 8) {
                stamp(4, 12)
            } else {
                0
            }
        };
        assert_eq!(landed_ahead(&events, 4, memory), Some((2, 8, 12)));
        assert_eq!(landed_ahead(&events, 4, |_, _| 0), None, "not landed");
        assert_eq!(
            landed_ahead(&events, 5, memory),
            None,
            "another vCPU's stamp"
        );
        let _ = (events.next(), events.next());
        assert_eq!(
            landed_ahead(&events, 4, |_, _| stamp(4, 13)),
            None,
            "a sync point comes first"
        );
    }

    #[test]
    fn writes_through_stops_right_after_the_progress_write() {
        let thread = Thread::new(vec![
            Op::Write { page: 1, offset: 0 },
            Op::Read { page: 0, offset: 0 },
            Op::Sync(1),
            Op::Write { page: 2, offset: 8 },
            Op::Sync(2),
            Op::Write { page: 3, offset: 0 },
        ]);
        let mut events = ThreadEvents::with_seq_base(&thread, 10);
        assert_eq!(writes_through(&mut events, 10), Ok(vec![]));
        assert_eq!(
            writes_through(&mut events, 12),
            Ok(vec![(1, 0, 11), (2, 8, 12)])
        );
        assert_eq!(
            events.next(),
            Some(Event::Sync(2)),
            "stopped right after write 12"
        );
        assert_eq!(writes_through(&mut events, 15), Err(13));
    }

    #[test]
    fn writes_after_a_remap_land_in_the_page_it_maps() {
        let thread = Thread::new(vec![
            Op::Write { page: 1, offset: 0 },
            Op::Remap { page: 1, to: 7 },
            Op::ClearAd { page: 3 },
            Op::Sync(1),
            Op::Write { page: 1, offset: 8 },
            Op::Remap { page: 1, to: 1 },
            Op::Sync(2),
            Op::Write {
                page: 1,
                offset: 16,
            },
        ]);
        let writes: Vec<(u64, u16)> = ThreadEvents::new(&thread)
            .filter_map(|e| match e {
                Event::Write { page, offset, .. } => Some((page, offset)),
                _ => None,
            })
            .collect();
        assert_eq!(writes, vec![(1, 0), (7, 8), (1, 16)]);
    }

    #[test]
    fn until_stopped_is_infinite() {
        let thread = Thread::new(vec![Op::Loop {
            pages: PageSeq::Range { start: 0, count: 3 },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::UntilStopped,
        }]);
        assert!(segments(&thread).is_none());
        let seqs: Vec<u64> = ThreadEvents::new(&thread)
            .take(7)
            .map(|e| match e {
                Event::Write { page, seq, .. } => {
                    assert_eq!(page, (seq - 1) % 3);
                    seq
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    }
}
