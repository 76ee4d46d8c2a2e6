//! The conformance matrix: which trials a full run has, and the self-tests.
//!
//! The matrix is the same on every host (so golden files line up and a missing mechanism shows
//! up as skipped trials, never as absent ones); what cannot run here is skipped with the reason.

use trackcheck_harness::track::inject::Fault;
use trackcheck_harness::track::{ClearGranularity, TrackerSpec};
use trackcheck_harness::{Backing, ExecutionMode};

use crate::spec::{
    AccessKind, HugePath, IdleAgent, Pattern, Scenario, SlotOp, TablesCase, TrialSpec,
};

/// Ring sizes tried: the smallest (constant ring-full exits) and 1 MiB.
pub const RING_SIZES: [u32; 2] = [4096, 1 << 20];

/// Every tracker configuration the matrix covers.
#[must_use]
pub fn trackers() -> Vec<TrackerSpec> {
    let mut out = vec![TrackerSpec::DirtyLog];
    for granularity in ClearGranularity::ALL {
        out.push(TrackerSpec::ClearLog {
            initially_set: false,
            granularity,
        });
    }
    out.push(TrackerSpec::ClearLog {
        initially_set: true,
        granularity: ClearGranularity::Whole,
    });
    for with_bitmap in [false, true] {
        for bytes in RING_SIZES {
            out.push(TrackerSpec::DirtyRing { bytes, with_bitmap });
        }
    }
    out.push(TrackerSpec::UffdWpAsync);
    out.push(TrackerSpec::UffdWpSync);
    out
}

fn spec(
    tracker: TrackerSpec,
    scenario: Scenario,
    backing: Backing,
    mode: ExecutionMode,
) -> TrialSpec {
    TrialSpec {
        tracker,
        scenario,
        backing,
        mode,
        inject: None,
    }
}

/// The trackers the aging agents race (issue 11): each mechanism once (the ring sizes and
/// CLEAR granularities are the concurrent families' business), native only.
const IDLE_TRACKERS: [TrackerSpec; 7] = [
    TrackerSpec::DirtyLog,
    TrackerSpec::ClearLog {
        initially_set: false,
        granularity: ClearGranularity::Chunk64,
    },
    TrackerSpec::ClearLog {
        initially_set: true,
        granularity: ClearGranularity::Whole,
    },
    TrackerSpec::DirtyRing {
        bytes: 1 << 20,
        with_bitmap: false,
    },
    TrackerSpec::DirtyRing {
        bytes: 1 << 20,
        with_bitmap: true,
    },
    TrackerSpec::UffdWpAsync,
    TrackerSpec::UffdWpSync,
];

/// The huge-page paths (family 6) and the backings each runs on.
fn huge_paths() -> [(HugePath, &'static [Backing]); 7] {
    [
        (
            HugePath::Enable,
            &[
                Backing::Thp,
                Backing::Hugetlb2M,
                Backing::MemfdHugetlb2M,
                Backing::Hugetlb1G,
            ],
        ),
        (HugePath::Recover, &[Backing::Thp, Backing::Hugetlb2M]),
        (
            HugePath::Race { vcpus: 3 },
            &[Backing::Thp, Backing::Hugetlb2M],
        ),
        (HugePath::GuestHugeHostSmall, &[Backing::Anon]),
        (HugePath::GuestSmallHostHuge, &[Backing::Thp]),
        (HugePath::EagerSplit { chunk_kib: 0 }, &[Backing::Thp]),
        (HugePath::EagerSplit { chunk_kib: 2048 }, &[Backing::Thp]),
    ]
}

/// The full conformance matrix.
#[must_use]
pub fn matrix() -> Vec<TrialSpec> {
    let stepped_backings = [
        Backing::Anon,
        Backing::Thp,
        Backing::Hugetlb2M,
        Backing::Memfd,
        Backing::MemfdHugetlb2M,
        Backing::Shmem,
    ];
    let wide = [
        Backing::Anon,
        Backing::Thp,
        Backing::Hugetlb2M,
        Backing::Memfd,
    ];
    let narrow = [Backing::Anon, Backing::Thp];
    let mut out = Vec::new();
    for mode in ExecutionMode::ALL {
        for tracker in trackers() {
            for b in stepped_backings {
                out.push(spec(tracker, Scenario::Stepped, b, mode));
            }
            for b in narrow {
                out.push(spec(tracker, Scenario::Race, b, mode));
            }
            for ((pattern, vcpus), backings) in
                CONCURRENT
                    .into_iter()
                    .zip([&wide[..], &wide[..], &narrow[..], &narrow[..]])
            {
                for &b in backings {
                    out.push(spec(
                        tracker,
                        Scenario::Concurrent { pattern, vcpus },
                        b,
                        mode,
                    ));
                }
            }
            if matches!(tracker, TrackerSpec::DirtyRing { bytes: 4096, .. }) {
                for vcpus in [2, 3] {
                    out.push(spec(
                        tracker,
                        Scenario::RingFull { vcpus },
                        Backing::Anon,
                        mode,
                    ));
                }
            }
            if matches!(tracker, TrackerSpec::ClearLog { .. }) {
                out.push(spec(tracker, Scenario::ClearGeometry, Backing::Anon, mode));
            }
            if tracker != TrackerSpec::DirtyLog {
                out.push(spec(
                    tracker,
                    Scenario::CrossCheck {
                        against: TrackerSpec::DirtyLog,
                    },
                    Backing::Anon,
                    mode,
                ));
            }
            out.push(spec(tracker, Scenario::PropPrograms, Backing::Anon, mode));
            out.push(spec(
                tracker,
                Scenario::PropInterleavings,
                Backing::Anon,
                mode,
            ));
            out.push(spec(tracker, Scenario::KvmWrites, Backing::Anon, mode));
            for case in [
                TablesCase::Ad4K,
                TablesCase::Ad2M,
                TablesCase::Remap,
                TablesCase::Guest1G,
            ] {
                out.push(spec(
                    tracker,
                    Scenario::GuestTables { case },
                    Backing::Anon,
                    mode,
                ));
            }
            for kind in [AccessKind::GuestAd, AccessKind::GuestAdNoFlush] {
                out.push(spec(
                    tracker,
                    Scenario::Access { kind },
                    Backing::Anon,
                    mode,
                ));
            }
            if mode == ExecutionMode::Native {
                // Issue 11: reclaim of a file backing racing every tracker (native only: an
                // emulated guest faults the same way, and each lane runs the matrix emulated).
                out.push(spec(tracker, Scenario::ReclaimFile, Backing::File, mode));
            }
            if mode == ExecutionMode::Native && IDLE_TRACKERS.contains(&tracker) {
                for agent in [IdleAgent::DamonVaddr, IdleAgent::DamonPaddr] {
                    out.push(spec(tracker, Scenario::Idle { agent }, Backing::Anon, mode));
                }
                // MGLRU walks 4 KiB PTEs (anon) and THP PMDs; it never ages hugetlb.
                // page_idle tracks LRU folios: hugetlb's never are.
                for agent in [IdleAgent::Mglru, IdleAgent::PageIdle] {
                    for b in [Backing::Anon, Backing::Thp] {
                        out.push(spec(tracker, Scenario::Idle { agent }, b, mode));
                    }
                }
            }
            for op in [
                SlotOp::Toggle,
                SlotOp::Move,
                SlotOp::Delete,
                SlotOp::Many,
                SlotOp::ManyConcurrent,
            ] {
                out.push(spec(tracker, Scenario::Memslot { op }, Backing::Anon, mode));
            }
            for (path, backings) in huge_paths() {
                for &b in backings {
                    // Emulated guests make no mappings to split: one trial says so.
                    if mode == ExecutionMode::Native
                        || (path == HugePath::Enable && b == Backing::Thp)
                    {
                        out.push(spec(tracker, Scenario::Huge { path }, b, mode));
                    }
                }
            }
        }
    }
    out
}

/// The oracle's self-tests: every tracker with every fault, in the scenarios where the fault
/// The concurrent families: (pattern, vCPUs), in the matrix and in the self-tests alike.
const CONCURRENT: [(Pattern, u8); 4] = [
    (Pattern::Sequential, 1),
    (Pattern::Random, 2),
    (Pattern::Strided, 3),
    (Pattern::HotCold, 4),
];

/// can lose a write (copy-before-rearm needs a write between the copy and the rearm: race).
#[must_use]
pub fn selftests() -> Vec<TrialSpec> {
    let mut out = Vec::new();
    for tracker in trackers() {
        // The concurrent families as the matrix runs them (same patterns, vCPUs and programs).
        let concurrent = CONCURRENT
            .map(|(pattern, vcpus)| (Scenario::Concurrent { pattern, vcpus }, Backing::Anon));
        let scenarios = concurrent.into_iter().chain([
            (Scenario::Stepped, Backing::Anon),
            (Scenario::Race, Backing::Anon),
            (
                Scenario::Huge {
                    path: HugePath::Enable,
                },
                Backing::Thp,
            ),
            (Scenario::KvmWrites, Backing::Anon),
            (
                Scenario::GuestTables {
                    case: TablesCase::Remap,
                },
                Backing::Anon,
            ),
            (
                Scenario::GuestTables {
                    case: TablesCase::Ad4K,
                },
                Backing::Anon,
            ),
            (
                Scenario::Access {
                    kind: AccessKind::GuestAdNoFlush,
                },
                Backing::Anon,
            ),
            (
                Scenario::Access {
                    kind: AccessKind::GuestAd,
                },
                Backing::Anon,
            ),
            (Scenario::Memslot { op: SlotOp::Delete }, Backing::Anon),
            (Scenario::Memslot { op: SlotOp::Move }, Backing::Anon),
            (Scenario::Memslot { op: SlotOp::Toggle }, Backing::Anon),
            (
                Scenario::Memslot {
                    op: SlotOp::ManyConcurrent,
                },
                Backing::Anon,
            ),
            (
                Scenario::Huge {
                    path: HugePath::Race { vcpus: 3 },
                },
                Backing::Thp,
            ),
            (Scenario::ReclaimFile, Backing::File),
            (
                Scenario::Idle {
                    agent: IdleAgent::DamonVaddr,
                },
                Backing::Anon,
            ),
            (
                Scenario::Idle {
                    agent: IdleAgent::Mglru,
                },
                Backing::Anon,
            ),
            (
                Scenario::Idle {
                    agent: IdleAgent::PageIdle,
                },
                Backing::Anon,
            ),
        ]);
        for (scenario, backing) in scenarios {
            for fault in Fault::ALL {
                if scenario.loses_under(fault).is_ok() {
                    out.push(TrialSpec {
                        tracker,
                        scenario,
                        backing,
                        mode: ExecutionMode::Native,
                        inject: Some(fault),
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn names_are_unique() {
        let all: Vec<String> = matrix()
            .iter()
            .chain(selftests().iter())
            .map(TrialSpec::name)
            .collect();
        let unique: BTreeSet<&String> = all.iter().collect();
        assert_eq!(all.len(), unique.len());
    }
}
