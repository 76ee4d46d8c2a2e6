//! A kdamond the suite creates over guest memory through DAMON's sysfs interface
//! (/sys/kernel/mm/damon/admin), and removes again: on success, on error and on panic (the
//! guard's `Drop`). Only where no kdamond exists that the suite did not create: DAMON has one
//! `nr_kdamonds` for the whole machine, and writing it rebuilds every kdamond directory, so the
//! suite never touches a machine's own. Trials of this process take turns (one lock); a
//! process killed while its kdamond runs leaves it behind, and the next run then skips as it
//! would for anyone else's.
//!
//! What DAMON does that matters here: every sampling interval it clears the accessed state of
//! one address per region (`ptep_clear_young_notify`: through the MMU notifier KVM clears the
//! young state of its own mapping, with no TLB flush) and later tests it (KVM's
//! `test_young`). The kdamond runs one `stat` scheme over every region, so its stats (regions
//! tried) and tried regions (each with `nr_accesses`, the samples that found it young in the
//! last aggregation) prove the monitoring ran over the guest's memory.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// DAMON's sysfs root.
const ADMIN: &str = "/sys/kernel/mm/damon/admin/kdamonds";

/// Sampling interval. The kernel accepts any `sample_us <= aggr_us` (it checks nothing else);
/// 100 us keeps kdamond from taking a whole CPU of the lanes' two from the vCPUs.
pub(super) const SAMPLE_US: u64 = 100;
/// Aggregation interval: 20 samples per aggregation.
pub(super) const AGGR_US: u64 = 2_000;
/// Regions update interval (vaddr re-reads the process's mappings this often).
pub(super) const UPDATE_US: u64 = 20_000;
/// Most initial regions for paddr (contiguous runs of the guest's frames, closest merged).
pub(super) const MAX_PADDR_REGIONS: usize = 32;

/// Only one kdamond of this process at a time.
static LOCK: Mutex<()> = Mutex::new(());

/// DAMON's operation set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ops {
    /// This process's virtual address space, over fixed ranges (`fvaddr`: the vaddr
    /// operations without the periodic re-read of the process's mappings) where DAMON offers
    /// it, else over the whole process (`vaddr`).
    Vaddr,
    /// Physical address ranges (the guest memory's frames).
    Paddr,
}

impl Ops {
    pub(super) const fn name(self) -> &'static str {
        match self {
            Self::Vaddr => "vaddr",
            Self::Paddr => "paddr",
        }
    }
}

/// Why a kdamond could not be set up.
#[derive(Debug)]
pub(super) enum SetupError {
    /// The host cannot (skip with this reason).
    Unsupported(String),
    /// A sysfs access failed.
    Failed(String),
}

/// One region DAMON tried in its last aggregation.
#[derive(Clone, Copy, Debug)]
pub(super) struct TriedRegion {
    pub start: u64,
    pub end: u64,
    pub nr_accesses: u64,
}

/// A `stat` scheme's counters.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SchemeStats {
    pub nr_tried: u64,
    pub sz_tried: u64,
}

/// The suite's kdamond (index 0, the only one); stopped and removed when dropped.
#[derive(Debug)]
pub(super) struct Kdamond {
    dir: PathBuf,
    /// Monitored ranges (empty: DAMON picks the process's mappings, plain vaddr).
    pub ranges: Vec<(u64, u64)>,
    /// The operation set in use (`vaddr`, `fvaddr`, `paddr`).
    pub ops_name: &'static str,
    _turn: MutexGuard<'static, ()>,
}

fn write(path: &Path, value: &str) -> Result<(), SetupError> {
    std::fs::write(path, value)
        .map_err(|e| SetupError::Failed(format!("write {value:?} to {}: {e}", path.display())))
}

fn read(path: &Path) -> Result<String, SetupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| SetupError::Failed(format!("read {}: {e}", path.display())))
}

fn read_u64(path: &Path) -> Result<u64, SetupError> {
    let s = read(path)?;
    s.parse()
        .map_err(|_| SetupError::Failed(format!("{}: {s:?} is not a number", path.display())))
}

/// Contiguous runs of the sorted `frames` (byte addresses of 4 KiB pages) as `[start, end)`,
/// the closest runs merged until at most `most` remain.
pub(super) fn ranges_of(frames: &[u64], page: u64, most: usize) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &f in frames {
        match runs.last_mut() {
            Some((_, end)) if *end == f => *end += page,
            Some((_, end)) if *end > f => {}
            _ => runs.push((f, f + page)),
        }
    }
    while runs.len() > most.max(1) {
        let i = (1..runs.len())
            .min_by_key(|&i| runs[i].0 - runs[i - 1].1)
            .unwrap_or(1);
        runs[i - 1].1 = runs[i].1;
        runs.remove(i);
    }
    runs
}

impl Kdamond {
    /// Create and start a kdamond with `ops` over `ranges` (`[start, end)` in bytes, sorted,
    /// disjoint): virtual ones of this process (fvaddr; plain vaddr ignores them) or physical
    /// ones (paddr). Two `stat` schemes: 0 matches every region, 1 those found young at least
    /// once in an aggregation (so its counters add up the young regions over the whole run).
    pub(super) fn start(ops: Ops, ranges: &[(u64, u64)]) -> Result<Self, SetupError> {
        let turn = LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let admin = Path::new(ADMIN);
        let nr = admin.join("nr_kdamonds");
        let existing = read_u64(&nr)
            .map_err(|_| SetupError::Unsupported("DAMON sysfs interface is absent".into()))?;
        if existing != 0 {
            return Err(SetupError::Unsupported(format!(
                "{existing} kdamond(s) exist that this run did not create; the suite never \
                 reconfigures a kdamond it did not create, and adding one would rewrite nr_kdamonds"
            )));
        }
        write(&nr, "1")?;
        // From here on, Drop removes what was made.
        let mut k = Self {
            dir: admin.join("0"),
            ranges: Vec::new(),
            ops_name: ops.name(),
            _turn: turn,
        };
        let ctx = k.dir.join("contexts/0");
        write(&k.dir.join("contexts/nr_contexts"), "1")?;
        let avail = read(&ctx.join("avail_operations")).unwrap_or_default();
        let offered = |o: &str| avail.split_whitespace().any(|a| a == o);
        if ops == Ops::Vaddr && offered("fvaddr") {
            k.ops_name = "fvaddr";
        }
        if !offered(ops.name()) {
            return Err(SetupError::Unsupported(format!(
                "DAMON offers {} here; {} is absent",
                if avail.is_empty() {
                    "no operations"
                } else {
                    &avail
                },
                ops.name()
            )));
        }
        write(&ctx.join("operations"), k.ops_name)?;
        let attrs = ctx.join("monitoring_attrs");
        write(&attrs.join("intervals/aggr_us"), &AGGR_US.to_string())?;
        write(&attrs.join("intervals/sample_us"), &SAMPLE_US.to_string())?;
        write(&attrs.join("intervals/update_us"), &UPDATE_US.to_string())?;
        write(&ctx.join("targets/nr_targets"), "1")?;
        let target = ctx.join("targets/0");
        if ops == Ops::Vaddr {
            write(&target.join("pid_target"), &std::process::id().to_string())?;
        }
        if k.ops_name != "vaddr" {
            {
                k.ranges = ranges.to_vec();
                if k.ranges.is_empty() {
                    return Err(SetupError::Failed(
                        "no range of the guest memory is known (pagemap gave no PFN)".into(),
                    ));
                }
                write(
                    &target.join("regions/nr_regions"),
                    &k.ranges.len().to_string(),
                )?;
                for (i, (start, end)) in k.ranges.iter().enumerate() {
                    let r = target.join(format!("regions/{i}"));
                    // end first: start may not pass the old end of an empty region.
                    write(&r.join("end"), &end.to_string())?;
                    write(&r.join("start"), &start.to_string())?;
                }
            }
        }
        write(&ctx.join("schemes/nr_schemes"), "2")?;
        for (i, least_accesses) in [(0, "0"), (1, "1")] {
            let scheme = ctx.join(format!("schemes/{i}"));
            write(&scheme.join("action"), "stat")?;
            let pattern = scheme.join("access_pattern");
            for (what, max, min) in [
                ("sz", u64::MAX, "0"),
                ("nr_accesses", u64::from(u32::MAX), least_accesses),
                ("age", u64::from(u32::MAX), "0"),
            ] {
                write(&pattern.join(format!("{what}/max")), &max.to_string())?;
                write(&pattern.join(format!("{what}/min")), min)?;
            }
        }
        let state = k.dir.join("state");
        if let Err(e) = std::fs::write(&state, "on") {
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(SetupError::Unsupported(
                    "DAMON refuses to start another kdamond (EBUSY): an exclusive one the suite \
                     did not create runs (a DAMON_STAT, DAMON_RECLAIM or DAMON_LRU_SORT module; \
                     damon_stat.enabled=N on the kernel command line frees DAMON_STAT's), and \
                     the suite never stops a kdamond it did not create"
                        .into(),
                ));
            }
            return Err(SetupError::Failed(format!(
                "write \"on\" to {}: {e}",
                state.display()
            )));
        }
        Ok(k)
    }

    /// kdamond's pid.
    pub(super) fn pid(&self) -> Option<u64> {
        read_u64(&self.dir.join("pid")).ok()
    }

    fn scheme(&self, i: usize) -> PathBuf {
        self.dir.join(format!("contexts/0/schemes/{i}"))
    }

    /// The two schemes' counters now, every region's and the young ones' (asks kdamond to
    /// update them first).
    pub(super) fn stats(&self) -> Result<[SchemeStats; 2], SetupError> {
        write(&self.dir.join("state"), "update_schemes_stats")?;
        let one = |i| -> Result<SchemeStats, SetupError> {
            let s = self.scheme(i).join("stats");
            Ok(SchemeStats {
                nr_tried: read_u64(&s.join("nr_tried"))?,
                sz_tried: read_u64(&s.join("sz_tried"))?,
            })
        };
        Ok([one(0)?, one(1)?])
    }

    /// The regions of kdamond's last aggregation that overlap `[lo, hi)` ranges in `within`,
    /// with their `nr_accesses` (asks kdamond to update them first).
    pub(super) fn tried_regions(
        &self,
        within: &[(u64, u64)],
    ) -> Result<Vec<TriedRegion>, SetupError> {
        write(&self.dir.join("state"), "update_schemes_tried_regions")?;
        let dir = self.scheme(0).join("tried_regions");
        let mut out = Vec::new();
        for i in 0.. {
            let r = dir.join(i.to_string());
            if !r.is_dir() {
                break;
            }
            let (start, end) = (read_u64(&r.join("start"))?, read_u64(&r.join("end"))?);
            if within.iter().any(|&(lo, hi)| start < hi && lo < end) {
                out.push(TriedRegion {
                    start,
                    end,
                    nr_accesses: read_u64(&r.join("nr_accesses"))?,
                });
            }
        }
        Ok(out)
    }
}

impl Drop for Kdamond {
    fn drop(&mut self) {
        // Stop it (synchronous), then remove every kdamond directory (there is only ours).
        let _ = std::fs::write(self.dir.join("state"), "off");
        let _ = std::fs::write(Path::new(ADMIN).join("nr_kdamonds"), "0");
    }
}

#[cfg(test)]
mod tests {
    use super::ranges_of;

    #[test]
    fn frames_become_runs_and_the_closest_merge() {
        let p = 4096;
        let frames = [0, p, 2 * p, 10 * p, 11 * p, 100 * p];
        assert_eq!(
            ranges_of(&frames, p, 8),
            vec![(0, 3 * p), (10 * p, 12 * p), (100 * p, 101 * p)]
        );
        assert_eq!(
            ranges_of(&frames, p, 2),
            vec![(0, 12 * p), (100 * p, 101 * p)]
        );
        assert!(ranges_of(&[], p, 2).is_empty());
    }
}
