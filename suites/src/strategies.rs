//! proptest strategies over guest programs: page sets, visiting orders, vCPUs, write offsets.
//! Each is a named function returning a `Strategy` (STYLE.md §6); proptest shrinks a failing
//! program towards fewer vCPUs, segments and ops, and smaller loops.

use proptest::prelude::*;
use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};

/// A byte offset for an 8-byte stamp.
pub fn offset() -> impl Strategy<Value = u16> {
    (0u16..512).prop_map(|w| w * 8)
}

/// The pages one loop visits, in order: sequential, strided, shuffled, or an explicit list
/// (with repeats), up to 300 pages (past a small dirty ring's soft limit).
pub fn page_seq(data_pages: u64) -> impl Strategy<Value = PageSeq> {
    prop_oneof![
        (0..data_pages, 1u64..=300).prop_map(move |(start, count)| PageSeq::Range {
            start,
            count: count.min(data_pages - start)
        }),
        (0..data_pages, 1u64..=64, 1u64..=16).prop_map(move |(start, count, stride)| {
            let count = count.min((data_pages - 1 - start) / stride + 1);
            PageSeq::Strided {
                start,
                count,
                stride,
            }
        }),
        (0..data_pages, 1u64..=300, any::<u64>()).prop_map(move |(start, count, seed)| {
            PageSeq::Shuffled {
                start,
                count: count.min(data_pages - start),
                seed,
            }
        }),
        prop::collection::vec(0..data_pages, 1..64).prop_map(PageSeq::List),
    ]
}

/// One op of a segment: mostly single writes, some reads, some loops.
pub fn op(data_pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..data_pages, offset()).prop_map(|(page, offset)| Op::Write { page, offset }),
        1 => (0..data_pages, offset()).prop_map(|(page, offset)| Op::Read { page, offset }),
        2 => (page_seq(data_pages), offset(), 1u32..=2, prop::bool::weighted(0.9)).prop_map(|(pages, offset, times, write)| Op::Loop {
            pages,
            access: if write { Access::Write } else { Access::Read },
            offset,
            repeat: Repeat::Times(times),
        }),
    ]
}

/// A thread: 1 to 4 segments of up to 24 ops, each followed by a sync point.
pub fn thread(data_pages: u64) -> impl Strategy<Value = Thread> {
    prop::collection::vec(prop::collection::vec(op(data_pages), 0..24), 1..=4).prop_map(
        |segments| {
            let mut ops = Vec::new();
            for (i, segment) in segments.into_iter().enumerate() {
                ops.extend(segment);
                ops.push(Op::Sync(u32::try_from(i + 1).unwrap_or(u32::MAX)));
            }
            Thread::new(ops)
        },
    )
}

/// A program of 1 to `max_vcpus` threads over `data_pages` pages.
pub fn program(max_vcpus: usize, data_pages: u64) -> impl Strategy<Value = Program> {
    prop::collection::vec(thread(data_pages), 1..=max_vcpus)
        .prop_map(move |threads| Program::new(data_pages, threads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::test_runner::TestRunner;

    #[test]
    fn generated_programs_are_valid() {
        let mut runner = TestRunner::deterministic();
        runner
            .run(&program(3, 256), |p| {
                p.validate()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                Ok(())
            })
            .expect("every generated program validates");
    }
}
