//! Counting KVM's MMU-notifier events over the guest memory's host virtual addresses,
//! through a private tracefs instance the suite makes (`instances/trackcheck-<pid>-<n>`) and
//! removes again when dropped: the machine's own tracing (the top-level buffer, other
//! instances) is left alone. Two events, both with `start`/`end` fields
//! (include/trace/events/kvm.h):
//!
//! `kvm_unmap_hva_range` fires in `kvm_mmu_notifier_invalidate_range_start` for every
//! invalidation of a range holding guest memory (writeback's `page_mkclean`, pageout's unmap,
//! a write-protect of the host's PTEs): each one makes KVM zap its mappings of the range.
//!
//! `kvm_age_hva` fires in `kvm_mmu_notifier_clear_young` (virt/kvm/kvm_main.c), once per MMU
//! notifier call that asks KVM to clear the young state of `[start, end)`, before KVM looks at
//! its own mappings: a count over the guest's range proves an aging agent's clears reached
//! KVM's notifier for guest memory, not that any of KVM's entries was young. The instance's
//! filter keeps events that overlap `[lo, hi)`; the count is the sum over CPUs of the ring
//! buffer's `entries` and `overrun` (events overwritten when the buffer wrapped), so a
//! buffer that wraps still counts every event.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// tracefs mount points, the usual one first.
const ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// An event under an instance: clears of the young state.
pub(super) const AGE: &str = "kvm_age_hva";
/// An event under an instance: invalidations (zaps).
pub(super) const UNMAP: &str = "kvm_unmap_hva_range";

/// Instances made by this process so far (names stay unique).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// A tracefs instance counting one KVM event over a range; removed when dropped.
#[derive(Debug)]
pub(super) struct KvmTrace {
    dir: PathBuf,
    event: &'static str,
}

impl KvmTrace {
    /// [`Self::event`] for `kvm_age_hva`.
    pub(super) fn age(lo: u64, hi: u64) -> Result<Self, String> {
        Self::event(AGE, lo, hi)
    }

    /// Make the instance and enable `kvm:<event>`, filtered to calls overlapping `[lo, hi)`;
    /// the reason the count cannot be taken if it cannot (no tracefs, no KVM events, no
    /// rights).
    pub(super) fn event(event: &'static str, lo: u64, hi: u64) -> Result<Self, String> {
        let root = ROOTS
            .iter()
            .map(Path::new)
            .find(|r| r.join("instances").is_dir())
            .ok_or("tracefs is not mounted (no /sys/kernel/tracing/instances)")?;
        let name = format!(
            "trackcheck-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = root.join("instances").join(name);
        std::fs::create_dir(&dir)
            .map_err(|e| format!("cannot make tracefs instance {}: {e}", dir.display()))?;
        // From here on, Drop removes it.
        let t = Self { dir, event };
        let event = t.dir.join("events/kvm").join(event);
        if !event.is_dir() {
            return Err(format!(
                "tracefs has no kvm:{} event ({} is absent)",
                t.event,
                event.display()
            ));
        }
        let write = |file: &str, value: &str| {
            std::fs::write(event.join(file), value)
                .map_err(|e| format!("write {value:?} to {}/{file}: {e}", event.display()))
        };
        write("filter", &format!("start < {hi} && end > {lo}"))?;
        write("enable", "1")?;
        Ok(t)
    }

    /// Events recorded so far (every CPU's entries plus those overwritten).
    pub(super) fn count(&self) -> Result<u64, String> {
        let per_cpu = self.dir.join("per_cpu");
        let cpus =
            std::fs::read_dir(&per_cpu).map_err(|e| format!("read {}: {e}", per_cpu.display()))?;
        let mut sum = 0;
        for cpu in cpus.flatten() {
            let stats = cpu.path().join("stats");
            let text = std::fs::read_to_string(&stats)
                .map_err(|e| format!("read {}: {e}", stats.display()))?;
            sum += events_in_stats(&text)
                .ok_or_else(|| format!("{} has no entries/overrun lines", stats.display()))?;
        }
        Ok(sum)
    }
}

impl Drop for KvmTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.dir.join("events/kvm").join(self.event).join("enable"),
            "0",
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `entries` + `overrun` of a per-CPU `stats` file; `None` if neither line is there.
fn events_in_stats(text: &str) -> Option<u64> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
    };
    match (field("entries"), field("overrun")) {
        (None, None) => None,
        (e, o) => Some(e.unwrap_or(0) + o.unwrap_or(0)),
    }
}

/// The evidence line for a `kvm_age_hva` count taken (or not) over the guest memory.
pub(super) fn summary(count: &Result<u64, String>) -> String {
    summary_of(AGE, count)
}

/// The evidence line for a count of `kvm:<event>` taken (or not) over the guest memory.
pub(super) fn summary_of(event: &str, count: &Result<u64, String>) -> String {
    match count {
        Ok(n) => format!(
            "kvm:{event} over the guest memory's host virtual range: {n} events (a private tracefs instance)"
        ),
        Err(why) => format!("kvm:{event} not counted: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::events_in_stats;

    /// A per-CPU stats file as kernel/trace/trace.c prints it (tracing_stats_read).
    #[test]
    fn stats_give_entries_plus_overrun() {
        let wrapped = "entries: 31\noverrun: 1200\ncommit overrun: 0\nbytes: 2040\n\
                       oldest event ts:  1163.424375\nnow ts:  1163.961152\n\
                       dropped events: 0\nread events: 0\n";
        assert_eq!(events_in_stats(wrapped), Some(1231));
        assert_eq!(events_in_stats("entries: 0\noverrun: 0\n"), Some(0));
        // `commit overrun` is not `overrun`.
        assert_eq!(events_in_stats("entries: 4\ncommit overrun: 9\n"), Some(4));
        assert_eq!(events_in_stats("bytes: 0\n"), None);
    }
}
