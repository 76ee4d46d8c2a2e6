//! Userspace bitmap processing of a harvest (`cargo bench -p trackcheck-harness`): KVM bitmap
//! to page set (union), page set to page list, set difference — in GB/s of bitmap processed —
//! next to this machine's memory read bandwidth measured in the same run. The target is at
//! least half the memory bandwidth for the word-wise operations; the page list costs per page
//! found, so its figure depends on the density and is reported for 1% and 50%.
#![forbid(unsafe_code)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use trackcheck_harness::track::PageSet;

/// A bitmap of `pages` pages with roughly `percent`% of them set (deterministic).
fn bitmap(pages: u64, percent: u64) -> Vec<u64> {
    let mut state = 0x5EED_u64;
    (0..pages.div_ceil(64))
        .map(|_| {
            let mut w = 0u64;
            for bit in 0..64 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                if (state >> 33) % 100 < percent {
                    w |= 1 << bit;
                }
            }
            w
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    // 64 GiB of guest memory: a 2 MiB bitmap (past the L2 cache); 1 TiB: 32 MiB (past the L3).
    for (label, pages) in [
        ("64GiB", (64u64 << 30) / 4096),
        ("1TiB", (1u64 << 40) / 4096),
    ] {
        let bytes = pages / 8;
        let mut g = c.benchmark_group(format!("bitmap-{label}"));
        g.throughput(Throughput::Bytes(bytes));
        g.sample_size(10)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        let dense = bitmap(pages, 50);
        let mut set = PageSet::new();
        g.bench_function("union (KVM bitmap into page set)", |b| {
            b.iter(|| {
                set.clear();
                set.or_bitmap(2, black_box(&dense));
            });
        });
        let mut other = PageSet::new();
        other.or_bitmap(2, &bitmap(pages, 10));
        g.bench_function("difference", |b| {
            b.iter_batched_ref(
                || set.clone(),
                |s| s.remove_all(black_box(&other)),
                BatchSize::LargeInput,
            );
        });
        for percent in [1, 50] {
            let mut s = PageSet::new();
            s.or_bitmap(2, &bitmap(pages, percent));
            g.bench_function(format!("page list ({percent}% dirty)"), |b| {
                b.iter(|| black_box(s.iter().fold(0u64, |a, (_, p)| a ^ p)))
            });
        }
        g.finish();
    }
    // Memory read bandwidth: sum a 512 MiB buffer of u64.
    let words = (512usize << 20) / 8;
    let buffer: Vec<u64> = (0..words as u64).collect();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Bytes((words * 8) as u64));
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("read bandwidth (sum of 512 MiB)", |b| {
        b.iter(|| black_box(buffer.iter().fold(0u64, |a, w| a.wrapping_add(*w))))
    });
    g.finish();
}

criterion_group!(bitmap_benches, benches);
criterion_main!(bitmap_benches);
