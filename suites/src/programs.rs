//! Guest programs for each scenario, built deterministically from a seed.

use trackcheck_guests::program::splitmix64;
use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};

use crate::spec::Pattern;

/// A random 8-aligned offset in a page.
fn offset(rng: &mut u64) -> u16 {
    u16::try_from((splitmix64(rng) % 512) * 8).unwrap_or(0)
}

/// `rounds` rounds on `vcpus` vCPUs over `data_pages` pages. Each round, every vCPU writes
/// its hot set (8 pages of its own, rewritten every round, so a page left writable after a
/// harvest is written again) and `random` pages drawn from the whole region (shared with the
/// other vCPUs), then syncs.
#[must_use]
pub fn stepped(seed: u64, vcpus: usize, data_pages: u64, rounds: u32, random: u32) -> Program {
    let threads = (0..vcpus)
        .map(|v| {
            let mut rng = seed ^ (v as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let share = data_pages / vcpus as u64;
            let hot: Vec<u64> = (0..8)
                .map(|_| v as u64 * share + splitmix64(&mut rng) % share)
                .collect();
            let mut ops = Vec::new();
            for round in 1..=rounds {
                for &page in &hot {
                    ops.push(Op::Write {
                        page,
                        offset: offset(&mut rng),
                    });
                }
                for _ in 0..random {
                    ops.push(Op::Write {
                        page: splitmix64(&mut rng) % data_pages,
                        offset: offset(&mut rng),
                    });
                }
                ops.push(Op::Sync(round));
            }
            Thread::new(ops)
        })
        .collect();
    Program::new(data_pages, threads)
}

/// Segments that each rewrite the vCPU's hot set (16 pages) and 4 random pages: with the guest
/// running between harvest steps, every step sees writes to pages the collect just reported.
#[must_use]
pub fn race(seed: u64, vcpus: usize, data_pages: u64, segments: u32) -> Program {
    let threads = (0..vcpus)
        .map(|v| {
            let mut rng = seed ^ 0x5EED_0000 ^ v as u64;
            let share = data_pages / vcpus as u64;
            let mut ops = Vec::new();
            for s in 1..=segments {
                ops.push(Op::Loop {
                    pages: PageSeq::Range {
                        start: v as u64 * share,
                        count: 16.min(share),
                    },
                    access: Access::Write,
                    offset: offset(&mut rng),
                    repeat: Repeat::Times(1),
                });
                for _ in 0..4 {
                    ops.push(Op::Write {
                        page: splitmix64(&mut rng) % data_pages,
                        offset: offset(&mut rng),
                    });
                }
                ops.push(Op::Sync(s));
            }
            Thread::new(ops)
        })
        .collect();
    Program::new(data_pages, threads)
}

/// A random 8-aligned offset in a page that no other of `vcpus` vCPUs gets: word index
/// `k * vcpus + v`.
fn own_offset(rng: &mut u64, v: usize, vcpus: usize) -> u16 {
    let vcpus = vcpus.clamp(1, 512) as u64;
    let word = (splitmix64(rng) % (512 / vcpus)) * vcpus + v as u64 % vcpus;
    u16::try_from(word * 8).unwrap_or(0)
}

/// Endless writers for the concurrent scenario (they stop at the host's STOP flag). Each vCPU
/// writes its own word of a page (offsets differ by vCPU), so every word has one writer and
/// the per-harvest containment check is exact even where vCPUs share pages.
#[must_use]
pub fn concurrent(seed: u64, pattern: Pattern, vcpus: usize, data_pages: u64) -> Program {
    let share = data_pages / vcpus as u64;
    let threads = (0..vcpus)
        .map(|v| {
            let mut rng = seed ^ 0xC0C0 ^ v as u64;
            let start = v as u64 * share;
            let pages = match pattern {
                Pattern::Sequential => PageSeq::Range {
                    start,
                    count: share,
                },
                Pattern::Random => PageSeq::Shuffled {
                    start: 0,
                    count: data_pages,
                    seed: splitmix64(&mut rng),
                },
                Pattern::Strided => PageSeq::Strided {
                    start,
                    count: share / 8,
                    stride: 8,
                },
                Pattern::HotCold => {
                    let hot: Vec<u64> = (0..16).map(|i| i * 37 % data_pages).collect();
                    PageSeq::List(
                        (0..2048)
                            .map(|i| {
                                if i % 10 == 0 {
                                    splitmix64(&mut rng) % data_pages
                                } else {
                                    hot[usize::try_from(splitmix64(&mut rng) % 16).unwrap_or(0)]
                                }
                            })
                            .collect(),
                    )
                }
            };
            Thread::new(vec![Op::Loop {
                pages,
                access: Access::Write,
                offset: own_offset(&mut rng, v, vcpus),
                repeat: Repeat::UntilStopped,
            }])
        })
        .collect();
    Program::new(data_pages, threads)
}

/// Pages in a 2 MiB region.
pub const REGION_PAGES: u64 = 512;

/// The tracked program of the huge-page scenarios over `data_pages` pages (whole 2 MiB
/// regions), on `vcpus` vCPUs; region `r` belongs to vCPU `r % vcpus`. Round 1 writes one 4 KiB
/// page in every region: the first page of region 0, the last of the last region, a seeded page
/// that is neither elsewhere (the first write to a region splits KVM's huge mapping of it).
/// Round 2 writes each round-1 page's neighbour and 16 seeded pages of the same region (pages
/// of an already split region) and rewrites the round-1 page at another offset. Round 3 writes
/// the round-1 pages again (a rearm must have re-protected them). Every round ends with a sync.
#[must_use]
pub fn huge_split(seed: u64, vcpus: usize, data_pages: u64) -> Program {
    let regions = data_pages / REGION_PAGES;
    let mut rng = seed ^ 0x0B16_0000;
    let first: Vec<u64> = (0..regions)
        .map(|r| {
            let in_region = if r == 0 {
                0
            } else if r + 1 == regions {
                REGION_PAGES - 1
            } else {
                1 + splitmix64(&mut rng) % (REGION_PAGES - 2)
            };
            r * REGION_PAGES + in_region
        })
        .collect();
    let neighbour = |page: u64| {
        let base = page / REGION_PAGES * REGION_PAGES;
        base + (page - base + 1) % REGION_PAGES
    };
    let threads = (0..vcpus as u64)
        .map(|v| {
            let mine: Vec<u64> = first
                .iter()
                .copied()
                .filter(|p| p / REGION_PAGES % vcpus as u64 == v)
                .collect();
            let mut ops = Vec::new();
            ops.extend(mine.iter().map(|&page| Op::Write { page, offset: 0 }));
            ops.push(Op::Sync(1));
            let mut rng = seed ^ 0x0B16_0001 ^ v;
            for &page in &mine {
                ops.push(Op::Write {
                    page: neighbour(page),
                    offset: 0,
                });
                let base = page / REGION_PAGES * REGION_PAGES;
                for _ in 0..16 {
                    ops.push(Op::Write {
                        page: base + splitmix64(&mut rng) % REGION_PAGES,
                        offset: 24,
                    });
                }
                ops.push(Op::Write { page, offset: 8 });
            }
            ops.push(Op::Sync(2));
            ops.extend(mine.iter().map(|&page| Op::Write { page, offset: 16 }));
            ops.push(Op::Sync(3));
            Thread::new(ops)
        })
        .collect();
    Program::new(data_pages, threads)
}

/// Stepped rounds over data slots of `slot_pages` pages: in round `r` (1-based) each of `vcpus`
/// vCPUs writes the first and the last page of every slot `allowed(r, slot)` permits (slot
/// ends, in the same bitmap word as the next slot's start where sizes are unaligned) and
/// `random` seeded pages of those slots, then syncs.
#[must_use]
pub fn slot_rounds(
    seed: u64,
    vcpus: usize,
    slot_pages: &[u64],
    rounds: u32,
    random: u32,
    allowed: impl Fn(u32, usize) -> bool,
) -> Program {
    let starts: Vec<u64> = slot_pages
        .iter()
        .scan(0, |first, &pages| {
            let start = *first;
            *first += pages;
            Some(start)
        })
        .collect();
    let data_pages = slot_pages.iter().sum();
    let threads = (0..vcpus as u64)
        .map(|v| {
            let mut rng = seed ^ 0x5107_0000 ^ v;
            let mut ops = Vec::new();
            for round in 1..=rounds {
                let slots: Vec<usize> = (0..slot_pages.len())
                    .filter(|&i| allowed(round, i))
                    .collect();
                let offset = 8 * u16::try_from(v).unwrap_or(0);
                for &i in &slots {
                    ops.push(Op::Write {
                        page: starts[i],
                        offset,
                    });
                    ops.push(Op::Write {
                        page: starts[i] + slot_pages[i] - 1,
                        offset,
                    });
                }
                if !slots.is_empty() {
                    for _ in 0..random {
                        let i =
                            slots[usize::try_from(splitmix64(&mut rng)).unwrap_or(0) % slots.len()];
                        ops.push(Op::Write {
                            page: starts[i] + splitmix64(&mut rng) % slot_pages[i],
                            offset: offset + 64,
                        });
                    }
                }
                ops.push(Op::Sync(round));
            }
            Thread::new(ops)
        })
        .collect();
    Program::new(data_pages, threads)
}

/// Each vCPU writes each page of its share exactly once, in order (prefilling memory).
#[must_use]
pub fn write_once(vcpus: usize, data_pages: u64) -> Program {
    let share = data_pages / vcpus as u64;
    Program::new(
        data_pages,
        (0..vcpus as u64)
            .map(|v| {
                Thread::new(vec![Op::Loop {
                    pages: PageSeq::Range {
                        start: v * share,
                        count: share,
                    },
                    access: Access::Write,
                    offset: 0,
                    repeat: Repeat::Times(1),
                }])
            })
            .collect(),
    )
}

/// Segments of `per_segment` distinct pages per vCPU (far past a small ring's soft limit).
#[must_use]
pub fn ring_full(
    seed: u64,
    vcpus: usize,
    data_pages: u64,
    per_segment: u64,
    segments: u32,
) -> Program {
    let share = data_pages / vcpus as u64;
    Program::new(
        data_pages,
        (0..vcpus as u64)
            .map(|v| {
                let mut ops = Vec::new();
                for s in 1..=segments {
                    ops.push(Op::Loop {
                        pages: PageSeq::Shuffled {
                            start: v * share,
                            count: per_segment.min(share),
                            seed: seed ^ u64::from(s) ^ v,
                        },
                        access: Access::Write,
                        offset: 0,
                        repeat: Repeat::Times(1),
                    });
                    ops.push(Op::Sync(s));
                }
                Thread::new(ops)
            })
            .collect(),
    )
}

/// Writes at both ends of a `slot_pages`-page slot, across 64-page boundaries, and in the
/// short last chunk.
#[must_use]
pub fn clear_geometry(slot_pages: u64) -> Program {
    let last_chunk = slot_pages / 64 * 64;
    let first_round = [
        0,
        1,
        63,
        64,
        65,
        slot_pages / 2,
        last_chunk - 1,
        last_chunk,
        last_chunk + 7,
        slot_pages - 1,
    ];
    let second_round = [slot_pages - 1, last_chunk, 0, slot_pages / 3];
    let mut ops: Vec<Op> = first_round
        .iter()
        .map(|&page| Op::Write { page, offset: 0 })
        .collect();
    ops.push(Op::Sync(1));
    ops.extend(
        second_round
            .iter()
            .map(|&page| Op::Write { page, offset: 8 }),
    );
    ops.push(Op::Sync(2));
    Program::new(slot_pages, vec![Thread::new(ops)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_is_valid() {
        for p in [
            stepped(1, 2, 1024, 6, 40),
            race(2, 2, 256, 6),
            write_once(3, 300),
            ring_full(3, 2, 4096, 600, 3),
            clear_geometry(262_160),
            huge_split(4, 3, 4096),
            slot_rounds(5, 2, &[1, 63, 65, 300], 4, 20, |r, i| r != 3 || i != 1),
            huge_split(4, 1, 1024),
        ] {
            p.validate().expect("valid");
        }
        for pattern in Pattern::ALL {
            for vcpus in 1..=4 {
                let p = concurrent(5, pattern, vcpus, 2048);
                p.validate().expect("valid");
                // Each vCPU writes its own word, so the per-harvest check is exact.
                let offsets: std::collections::BTreeSet<u16> = p
                    .vcpus
                    .iter()
                    .map(|t| match t.ops.as_slice() {
                        [Op::Loop { offset, .. }] => *offset,
                        other => panic!("not one endless loop: {other:?}"),
                    })
                    .collect();
                assert_eq!(offsets.len(), vcpus, "{pattern:?} on {vcpus} vCPUs");
            }
        }
        assert_eq!(
            stepped(9, 2, 1024, 3, 10),
            stepped(9, 2, 1024, 3, 10),
            "deterministic"
        );
    }

    #[test]
    fn huge_split_writes_first_last_and_inner_pages_of_every_region() {
        let p = huge_split(7, 2, 4096);
        let first_round: Vec<u64> = p
            .vcpus
            .iter()
            .flat_map(|t| {
                t.ops
                    .iter()
                    .take_while(|op| !matches!(op, Op::Sync(_)))
                    .filter_map(|op| match op {
                        Op::Write { page, .. } => Some(*page),
                        _ => None,
                    })
            })
            .collect();
        let mut regions: Vec<u64> = first_round.iter().map(|p| p / REGION_PAGES).collect();
        regions.sort_unstable();
        assert_eq!(regions, (0..8).collect::<Vec<_>>(), "one page per region");
        assert!(first_round.contains(&0) && first_round.contains(&4095));
        let inner = first_round
            .iter()
            .filter(|p| !matches!(*p % REGION_PAGES, 0 | 511))
            .count();
        assert_eq!(inner, 6, "the others are neither first nor last");
    }
}
