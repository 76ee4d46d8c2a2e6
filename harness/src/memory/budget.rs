//! Refuse guest memory the host cannot give, before a page is touched.
//!
//! Guest memory is mapped with `MAP_NORESERVE` and faulted in later (populate, or the guest's
//! first writes), so an oversized request is not refused by mmap: the process is OOM-killed
//! halfway (exit 137, no message), or the whole host swaps. So every non-hugetlb
//! [`super::GuestMemory`] is checked when it is populated, before a page is touched (a mapping
//! never populated is sparse by intent and is not checked): the request plus a margin
//! ([`margin`]: page tables, the harness's own buffers, the kernel's per-page costs) must fit
//! both in `MemAvailable` (/proc/meminfo: the host's, or the lane VM's RAM) and in the room
//! left by every memory cgroup this process is in, up to the hierarchy's root (cgroup v2
//! `memory.max` minus `memory.current`, v1 `memory.limit_in_bytes` minus
//! `memory.usage_in_bytes`; reclaimable page cache, `file` minus `shmem`, counts as room).
//!
//! What it cannot see: memory the caller allocates beside the guest memory (an oracle's shadow
//! copy of the same size is its own allocation and is not counted here: call [`ensure_fits`]
//! for it), other processes that start using memory after the check, and memory only swap could
//! provide (not counted, so a host relying on swap is refused early). hugetlb backings are not
//! checked here: their pages come from the hugetlb pool (see `hugetlb`), which refuses with its
//! own error.

use std::fs;
use std::path::{Path, PathBuf};

use super::MemoryError;

/// Headroom asked for beyond the request: 1/16 of it, at least 64 MiB.
#[must_use]
pub fn margin(bytes: u64) -> u64 {
    (bytes / 16).max(64 << 20)
}

/// Room in one memory cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoom {
    /// The cgroup's directory.
    pub path: PathBuf,
    /// Its limit (`memory.max` / `memory.limit_in_bytes`).
    pub limit: u64,
    /// Its usage (`memory.current` / `memory.usage_in_bytes`).
    pub usage: u64,
    /// Reclaimable page cache in that usage (`file - shmem` / `total_cache - total_shmem`).
    pub reclaimable: u64,
}

impl CgroupRoom {
    /// Bytes the cgroup can still take.
    #[must_use]
    pub fn room(&self) -> u64 {
        self.limit
            .saturating_sub(self.usage.saturating_sub(self.reclaimable))
    }
}

/// What the host and the process's cgroups can give, as read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryBudget {
    /// `MemAvailable` in bytes, if /proc/meminfo has it.
    pub mem_available: Option<u64>,
    /// The tightest limited memory cgroup on the path from this process's cgroup to the root.
    pub cgroup: Option<CgroupRoom>,
}

impl MemoryBudget {
    /// Read /proc/meminfo and the memory cgroups of this process.
    #[must_use]
    pub fn probe() -> Self {
        let mem_available = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| meminfo_field(&m, "MemAvailable:"));
        Self {
            mem_available,
            cgroup: tightest_cgroup(),
        }
    }

    /// `Ok` when `bytes` plus [`margin`] fits everywhere; otherwise why not, with the figures
    /// and what to do.
    pub fn decide(&self, bytes: u64) -> Result<(), String> {
        let need = bytes.saturating_add(margin(bytes));
        let mut short = Vec::new();
        if let Some(avail) = self.mem_available
            && need > avail
        {
            short.push(format!(
                "the host has {} available (MemAvailable)",
                mib(avail)
            ));
        }
        if let Some(cg) = &self.cgroup
            && need > cg.room()
        {
            short.push(format!(
                "memory cgroup {} has {} of room (limit {}, in use {}, of which {} reclaimable \
                 page cache)",
                cg.path.display(),
                mib(cg.room()),
                mib(cg.limit),
                mib(cg.usage),
                mib(cg.reclaimable)
            ));
        }
        if short.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} of guest memory plus a {} margin does not fit: {}; ask for less (a smaller \
             --mem), or give this process more memory (raise the cgroup's memory.max, give the \
             lane VM more RAM, free host memory)",
            mib(bytes),
            mib(margin(bytes)),
            short.join("; ")
        ))
    }
}

/// Refuse `bytes` of guest memory (named `what` in the error) when the host or this process's
/// memory cgroup cannot give it (see the module docs).
pub fn ensure_fits(what: &str, bytes: u64) -> Result<(), MemoryError> {
    MemoryBudget::probe()
        .decide(bytes)
        .map_err(|reason| MemoryError::TooLarge {
            what: what.into(),
            bytes,
            reason,
        })
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    })
}

/// A cgroup v1 limit this large means "no limit" (`PAGE_COUNTER_MAX` pages, rounded).
const V1_UNLIMITED: u64 = 1 << 62;

/// One memory cgroup hierarchy this process is in: the mount point, the mount's root and the
/// process's path in it, and whether it is v2.
struct Hierarchy {
    mount: PathBuf,
    path: String,
    v2: bool,
}

/// The memory hierarchies of this process (v2 unified, and a v1 `memory` controller).
fn hierarchies() -> Vec<Hierarchy> {
    let (Ok(cgroups), Ok(mountinfo)) = (
        fs::read_to_string("/proc/self/cgroup"),
        fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let v2 = controllers.is_empty();
        if !v2 && !controllers.split(',').any(|c| c == "memory") {
            continue;
        }
        // mountinfo: id parent major:minor root mount-point options ... - fstype source super
        for m in mountinfo.lines() {
            let Some((left, right)) = m.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(root), Some(point), Some(fstype), Some(opts)) =
                (fields.get(3), fields.get(4), right.first(), right.get(2))
            else {
                continue;
            };
            let matches = if v2 {
                *fstype == "cgroup2"
            } else {
                *fstype == "cgroup" && opts.split(',').any(|o| o == "memory")
            };
            if !matches {
                continue;
            }
            // A mount of a sub-tree (containers): the path is relative to the mount's root.
            let rel = if *root == "/" {
                path
            } else {
                path.strip_prefix(root).unwrap_or(path)
            };
            out.push(Hierarchy {
                mount: PathBuf::from(point),
                path: rel.trim_start_matches('/').to_string(),
                v2,
            });
            break;
        }
    }
    out
}

/// The limited cgroup with the least room on the way from this process's cgroups to the roots.
fn tightest_cgroup() -> Option<CgroupRoom> {
    let mut best: Option<CgroupRoom> = None;
    for h in hierarchies() {
        let mut dir = h.mount.join(&h.path);
        loop {
            if let Some(room) = read_room(&dir, h.v2)
                && best.as_ref().is_none_or(|b| room.room() < b.room())
            {
                best = Some(room);
            }
            if dir == h.mount || !dir.pop() || !dir.starts_with(&h.mount) {
                break;
            }
        }
    }
    best
}

/// The room of the cgroup at `dir`, if it has a limit.
fn read_room(dir: &Path, v2: bool) -> Option<CgroupRoom> {
    let number = |file: &str| -> Option<u64> {
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    };
    let stat = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let stat_field = |name: &str| -> u64 {
        stat.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    };
    let (limit, usage, reclaimable) = if v2 {
        // "max" (no limit) does not parse: no room figure.
        let limit = number("memory.max")?;
        let usage = number("memory.current")?;
        (
            limit,
            usage,
            stat_field("file").saturating_sub(stat_field("shmem")),
        )
    } else {
        let limit = number("memory.limit_in_bytes").filter(|&l| l < V1_UNLIMITED)?;
        let usage = number("memory.usage_in_bytes")?;
        (
            limit,
            usage,
            stat_field("total_cache").saturating_sub(stat_field("total_shmem")),
        )
    };
    Some(CgroupRoom {
        path: dir.to_path_buf(),
        limit,
        usage,
        reclaimable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn cgroup(limit: u64, usage: u64, reclaimable: u64) -> Option<CgroupRoom> {
        Some(CgroupRoom {
            path: "/sys/fs/cgroup/test".into(),
            limit,
            usage,
            reclaimable,
        })
    }

    #[test]
    fn two_gib_does_not_fit_a_one_gib_cgroup() {
        let budget = MemoryBudget {
            mem_available: Some(24 * GIB),
            cgroup: cgroup(GIB, 10 << 20, 0),
        };
        let why = budget.decide(2 * GIB).unwrap_err();
        assert!(
            why.starts_with("2048 MiB of guest memory plus a 128 MiB margin does not fit"),
            "{why}"
        );
        assert!(
            why.contains("memory cgroup /sys/fs/cgroup/test has 1014 MiB of room (limit 1024 MiB, in use 10 MiB"),
            "{why}"
        );
        assert!(
            why.contains("a smaller --mem") && why.contains("memory.max"),
            "{why}"
        );
        assert!(!why.contains("MemAvailable"), "the host had room: {why}");
        // 512 MiB + 64 MiB margin fits in 1014 MiB.
        assert_eq!(budget.decide(512 << 20), Ok(()));
    }

    #[test]
    fn more_than_the_host_has_is_refused_with_the_figure() {
        let budget = MemoryBudget {
            mem_available: Some(23 * GIB),
            cgroup: None,
        };
        let why = budget.decide(64 * GIB).unwrap_err();
        assert!(
            why.contains("the host has 23552 MiB available (MemAvailable)"),
            "{why}"
        );
        assert_eq!(budget.decide(20 * GIB), Ok(()));
        // The margin counts: 23 GiB - 64 MiB fits the bytes but not bytes + margin.
        assert!(budget.decide(23 * GIB - (64 << 20)).is_err());
    }

    #[test]
    fn reclaimable_page_cache_counts_as_room_and_unknown_figures_do_not_refuse() {
        let full_of_cache = MemoryBudget {
            mem_available: None,
            cgroup: cgroup(GIB, GIB, 900 << 20),
        };
        assert_eq!(full_of_cache.decide(512 << 20), Ok(()));
        assert!(full_of_cache.decide(900 << 20).is_err());
        assert_eq!(MemoryBudget::default().decide(u64::MAX / 2), Ok(()));
    }

    #[test]
    fn this_process_can_be_probed() {
        let budget = MemoryBudget::probe();
        assert!(budget.mem_available.is_some_and(|a| a > 0), "{budget:?}");
        if let Some(cg) = &budget.cgroup {
            assert!(cg.limit > 0, "{cg:?}");
        }
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n";
        assert_eq!(meminfo_field(text, "MemAvailable:"), Some(1_024_000));
        assert_eq!(meminfo_field(text, "Nope:"), None);
    }
}
