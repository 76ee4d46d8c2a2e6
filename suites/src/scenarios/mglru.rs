//! MGLRU aging forced on a memory cgroup the suite makes, through debugfs: a guard that sets
//! things up and puts every one of them back when dropped (on success, on error and on panic),
//! and an aging thread.
//!
//! Setup, in this order (the guest memory must be faulted after it: cgroup v2 does not move
//! charges, and the walk ages only folios charged to the memcg it ages): turn MGLRU on
//! (`lru_gen/enabled` = `y`) where it is not, and require 0x2 (aging walks page tables, which
//! needs a hardware accessed bit); offer the memory controller to cgroup2's root's children;
//! make `trackcheck-mglru-<pid>-<n>` under the root; move this process into it (the whole
//! process: other trials' memory faulted meanwhile is charged there too, which is harmless);
//! find its memcg id and nodes in `lru_gen` by its path (6.12 prints the memcg's private id,
//! 7.x the cgroup's inode number). Drop moves the process back, removes the cgroup (a memcg
//! still holding pages lingers as a zombie the kernel frees later), withdraws the controller
//! if it offered it and restores `enabled`.
//!
//! This changes host settings, so it runs only on a host the suite owns: a lane's kernel
//! (`TRACKCHECK_OWN_HOST=1`, set by the lane's init), never a machine's. Trials of this process
//! take turns (one lock).
//!
//! Aging: `+ MEMCG_ID NODE_ID MAX_SEQ 1 1` written to `lru_gen` (synchronous: the walk runs in
//! the writer) ages every mm on the memcg's list (`force_scan` 1: no Bloom filter, every mm)
//! including anon memory (swappiness 1: without swap the default would skip anon VMAs). Per
//! present PTE (or THP PMD) of a folio of the memcg the walk clears the primary young bit and
//! calls `mmu_notifier_clear_young`: KVM's `kvm_age_hva`, which clears the accessed bit of its
//! own mapping with no TLB flush (x86 TDP MMU with A/D bits, arm64 stage-2 AF) or, where KVM's
//! entries have no accessed bit, makes them access-tracked (no permissions; the fast page-fault
//! path restores them).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::damon::SetupError;
use super::lru_gen::{self, Memcg, Walk};

/// MGLRU's switch.
const ENABLED: &str = "/sys/kernel/mm/lru_gen/enabled";
/// The aging interface (and a reading of the generations).
const LRU_GEN: &str = "/sys/kernel/debug/lru_gen";
/// The same, with tiers and the mm walk's counters.
const LRU_GEN_FULL: &str = "/sys/kernel/debug/lru_gen_full";
/// The environment variable that says the host is the suite's own (a lane's kernel).
pub(super) const OWN_HOST: &str = "TRACKCHECK_OWN_HOST";
/// Pause between aging passes (the vCPUs and the harvester get the CPUs).
const PAUSE: Duration = Duration::from_millis(2);

/// Only one memcg of this process aged at a time.
static LOCK: Mutex<()> = Mutex::new(());
/// Cgroups made by this process so far (names stay unique).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Whether the environment says this host is the suite's own.
pub(super) fn host_is_owned() -> bool {
    std::env::var(OWN_HOST).is_ok_and(|v| v == "1")
}

fn failed(what: &str, path: &Path, e: &std::io::Error) -> SetupError {
    SetupError::Failed(format!("{what} {}: {e}", path.display()))
}

fn read(path: &str) -> Result<String, SetupError> {
    std::fs::read_to_string(path).map_err(|e| failed("read", Path::new(path), &e))
}

fn enabled_bits() -> Result<u32, SetupError> {
    let text = read(ENABLED)?;
    let t = text.trim();
    u32::from_str_radix(t.trim_start_matches("0x"), 16)
        .map_err(|_| SetupError::Failed(format!("{ENABLED}: {t:?} is not a number")))
}

/// The memcg blocks `lru_gen` (or `lru_gen_full`) shows now.
fn memcgs(full: bool) -> Result<Vec<Memcg>, SetupError> {
    Ok(lru_gen::parse(&read(if full {
        LRU_GEN_FULL
    } else {
        LRU_GEN
    })?))
}

/// The suite's memory cgroup with MGLRU on; everything undone when dropped.
#[derive(Debug)]
pub(super) struct Ager {
    /// `enabled` as it was, where the suite changed it.
    enabled_before: Option<u32>,
    /// `enabled` while aging.
    pub enabled: u32,
    /// The root's `cgroup.subtree_control`, where the suite offered `memory` in it.
    offered: Option<PathBuf>,
    /// The cgroup made (removed at drop).
    dir: Option<PathBuf>,
    /// The cgroup the process came from, once moved (moved back at drop).
    home: Option<PathBuf>,
    /// The cgroup's name (the last part of its path).
    pub name: String,
    /// Its memcg id as `lru_gen` gives it.
    pub id: u64,
    /// Its nodes.
    pub nodes: Vec<u32>,
    _turn: MutexGuard<'static, ()>,
}

impl Ager {
    /// Set everything up (see the module doc); `cgroup2` is where cgroup2 is mounted.
    pub(super) fn start(cgroup2: &Path) -> Result<Self, SetupError> {
        let turn = LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !host_is_owned() {
            return Err(SetupError::Unsupported(not_owned()));
        }
        let before = enabled_bits().map_err(|_| {
            SetupError::Unsupported(format!("{ENABLED} is absent (CONFIG_LRU_GEN=n)"))
        })?;
        let mut a = Self {
            enabled_before: None,
            enabled: before,
            offered: None,
            dir: None,
            home: None,
            name: format!(
                "trackcheck-mglru-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            id: 0,
            nodes: Vec::new(),
            _turn: turn,
        };
        if before & 3 != 3 {
            std::fs::write(ENABLED, "y").map_err(|e| failed("write y to", ENABLED.as_ref(), &e))?;
            a.enabled_before = Some(before);
            a.enabled = enabled_bits()?;
        }
        if a.enabled & 2 == 0 {
            return Err(SetupError::Unsupported(format!(
                "lru_gen/enabled reads {:#06x} after writing y: without 0x2 MGLRU aging never \
                 walks page tables (no hardware accessed bit here), so it never reaches KVM's \
                 mappings",
                a.enabled
            )));
        }
        let control = cgroup2.join("cgroup.subtree_control");
        let offered =
            std::fs::read_to_string(&control).map_err(|e| failed("read", &control, &e))?;
        if !offered.split_whitespace().any(|c| c == "memory") {
            std::fs::write(&control, "+memory").map_err(|e| {
                SetupError::Unsupported(format!(
                    "cgroup2's root does not delegate the memory controller (write +memory to \
                     {}: {e})",
                    control.display()
                ))
            })?;
            a.offered = Some(control);
        }
        let dir = cgroup2.join(&a.name);
        std::fs::create_dir(&dir).map_err(|e| failed("mkdir", &dir, &e))?;
        a.dir = Some(dir.clone());
        let home = home_cgroup(cgroup2)?;
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|e| failed("move this process into", &procs, &e))?;
        a.home = Some(home);
        let ours = memcgs(false)?;
        let m = lru_gen::find(&ours, &a.name).ok_or_else(|| {
            SetupError::Failed(format!(
                "{LRU_GEN} lists no memcg for the cgroup {}",
                a.name
            ))
        })?;
        a.id = m.id;
        a.nodes = m.nodes.iter().map(|n| n.nid).collect();
        if a.nodes.is_empty() {
            return Err(SetupError::Failed(format!(
                "{LRU_GEN} shows no node of memcg {}",
                a.id
            )));
        }
        // One aging pass now: a refusal (lockdown, a command the kernel does not take) is a
        // setup failure, not something the run finds out later.
        let seqs: Vec<u64> = m.nodes.iter().map(|n| n.max_seq).collect();
        for (nid, seq) in a.nodes.iter().zip(&seqs) {
            match age(a.id, *nid, *seq) {
                Ok(()) | Err(Refusal::Busy) => {}
                Err(Refusal::Denied(why)) => return Err(SetupError::Unsupported(why)),
                Err(Refusal::Other(why)) => return Err(SetupError::Failed(why)),
            }
        }
        Ok(a)
    }

    /// Our memcg's block in `lru_gen_full` now (`lru_gen` where that cannot be read).
    pub(super) fn snapshot(&self) -> Result<Memcg, SetupError> {
        let all = memcgs(true).or_else(|_| memcgs(false))?;
        lru_gen::find(&all, &self.name)
            .cloned()
            .ok_or_else(|| SetupError::Failed(format!("{LRU_GEN} lost memcg {}", self.name)))
    }

    /// Start aging in a thread of its own.
    pub(super) fn aging(&self) -> Aging {
        let stop = Arc::new(AtomicBool::new(false));
        let bumps = Arc::new(AtomicU64::new(0));
        let (s, b, name, id, nodes) = (
            Arc::clone(&stop),
            Arc::clone(&bumps),
            self.name.clone(),
            self.id,
            self.nodes.clone(),
        );
        let handle = std::thread::Builder::new()
            .name("mglru-aging".into())
            .spawn(move || aging(&name, id, &nodes, &s, &b))
            .ok();
        Aging {
            stop,
            bumps,
            handle,
        }
    }
}

impl Ager {
    /// Put everything back (see the module doc); what was left as it should not be, if
    /// anything.
    fn restore(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(home) = self.home.take() {
            let procs = home.join("cgroup.procs");
            if let Err(e) = std::fs::write(&procs, std::process::id().to_string()) {
                left.push(format!("move back into {}: {e}", procs.display()));
            }
        }
        if let Some(dir) = self.dir.take() {
            // The move is synchronous, but a just-emptied cgroup can be busy for a moment.
            let mut last = None;
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(e) = last {
                left.push(format!("rmdir {}: {e}", dir.display()));
            }
        }
        if let Some(control) = self.offered.take()
            && let Err(e) = std::fs::write(&control, "-memory")
        {
            left.push(format!("write -memory to {}: {e}", control.display()));
        }
        if let Some(before) = self.enabled_before.take() {
            match std::fs::write(ENABLED, format!("{before:#x}")).map(|()| enabled_bits()) {
                Ok(Ok(now)) if now == before => {}
                Ok(Ok(now)) => left.push(format!(
                    "{ENABLED} reads {now:#06x} after restoring {before:#06x}"
                )),
                Ok(Err(e)) => left.push(format!("{e:?}")),
                Err(e) => left.push(format!("restore {ENABLED} to {before:#x}: {e}")),
            }
        }
        left
    }

    /// Put everything back now and check it: an error names what was left changed.
    pub(super) fn close(mut self) -> Result<(), String> {
        let left = self.restore();
        if left.is_empty() {
            Ok(())
        } else {
            Err(left.join("; "))
        }
    }
}

impl Drop for Ager {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// The skip reason on a host the suite does not own.
pub(super) fn not_owned() -> String {
    format!(
        "MGLRU aging needs lru_gen/enabled on, the memory controller offered at cgroup2's root \
         and this process moved into a cgroup of its own: the suite changes such host settings \
         only on a host it owns (a lane's kernel; {OWN_HOST}=1 says this host is one)"
    )
}

/// This process's cgroup2 directory (from /proc/self/cgroup's `0::` line).
fn home_cgroup(cgroup2: &Path) -> Result<PathBuf, SetupError> {
    let text = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| failed("read", "/proc/self/cgroup".as_ref(), &e))?;
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| SetupError::Failed("/proc/self/cgroup has no cgroup2 line".into()))?;
    Ok(cgroup2.join(path.trim().trim_start_matches('/')))
}

/// Why an aging write was refused.
#[derive(Debug)]
enum Refusal {
    /// EEXIST (7.x): another walker holds that sequence; the next pass tries again.
    Busy,
    /// EPERM or EACCES (debugfs locked down, no rights).
    Denied(String),
    /// Anything else.
    Other(String),
}

/// One aging command: generations of memcg `id` on node `nid` from `seq` (its max_seq), anon
/// included (swappiness 1), every mm walked (force_scan 1).
fn age(id: u64, nid: u32, seq: u64) -> Result<(), Refusal> {
    let cmd = format!("+ {id} {nid} {seq} 1 1");
    std::fs::write(LRU_GEN, &cmd).map_err(|e| {
        let why = format!("write {cmd:?} to {LRU_GEN}: {e}");
        match e.raw_os_error() {
            Some(libc::EEXIST) => Refusal::Busy,
            Some(libc::EPERM | libc::EACCES) => Refusal::Denied(why),
            _ => Refusal::Other(why),
        }
    })
}

/// What the aging thread did.
#[derive(Clone, Debug, Default)]
pub(super) struct Tally {
    /// Aging commands the kernel took.
    pub writes: u64,
    /// Rises of max_seq seen (summed over nodes).
    pub bumps: u64,
    /// Commands after which max_seq did not rise (6.12 takes a stale sequence silently).
    pub missed: u64,
    /// EEXIST answers.
    pub busy: u64,
    /// Other refusals, and the first one's text.
    pub errors: u64,
    pub first_error: Option<String>,
    /// max_seq of the first node before the first pass and after the last.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The most anon pages the memcg's generations held at one reading.
    pub max_anon: u64,
    /// Passes (one command per node, then a reading of `lru_gen`).
    pub passes: u64,
    /// How long the thread aged.
    pub elapsed: Duration,
}

/// The aging thread; stopped and joined when dropped (also on error or panic).
pub(super) struct Aging {
    stop: Arc<AtomicBool>,
    bumps: Arc<AtomicU64>,
    handle: Option<JoinHandle<Tally>>,
}

impl Aging {
    /// Wait up to `most` for `bumps` rises of max_seq.
    pub(super) fn wait_for(&self, bumps: u64, most: Duration) {
        let start = Instant::now();
        while self.bumps.load(Ordering::Acquire) < bumps
            && start.elapsed() < most
            && self.handle.as_ref().is_some_and(|h| !h.is_finished())
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stop and the tally.
    pub(super) fn finish(mut self) -> Result<Tally, String> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            None => Err("could not start the aging thread".into()),
            Some(h) => h.join().map_err(|_| "the aging thread panicked".into()),
        }
    }
}

impl Drop for Aging {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// max_seq per node of `nodes` for the cgroup `name`, and its anon pages, as `lru_gen` shows
/// them now.
fn reading(name: &str, nodes: &[u32]) -> Option<(Vec<u64>, u64)> {
    let all = memcgs(false).ok()?;
    let m = lru_gen::find(&all, name)?;
    let seqs = nodes
        .iter()
        .map(|nid| m.nodes.iter().find(|n| n.nid == *nid).map(|n| n.max_seq))
        .collect::<Option<Vec<u64>>>()?;
    Some((seqs, m.anon()))
}

/// The aging loop: per pass, one command per node at its max_seq, then max_seq read again.
fn aging(name: &str, id: u64, nodes: &[u32], stop: &AtomicBool, bumps: &AtomicU64) -> Tally {
    let start = Instant::now();
    let mut t = Tally::default();
    let Some((mut seqs, anon)) = reading(name, nodes) else {
        t.errors += 1;
        t.first_error = Some(format!("{LRU_GEN} lost memcg {name}"));
        return t;
    };
    t.max_anon = anon;
    t.first_seq = seqs.first().copied().unwrap_or(0);
    t.last_seq = t.first_seq;
    while !stop.load(Ordering::Acquire) {
        for (nid, seq) in nodes.iter().zip(&seqs) {
            match age(id, *nid, *seq) {
                Ok(()) => t.writes += 1,
                Err(Refusal::Busy) => t.busy += 1,
                Err(Refusal::Denied(why) | Refusal::Other(why)) => {
                    t.errors += 1;
                    t.first_error.get_or_insert(why);
                }
            }
        }
        if let Some((now, anon)) = reading(name, nodes) {
            t.max_anon = t.max_anon.max(anon);
            for (old, new) in seqs.iter().zip(&now) {
                if new > old {
                    t.bumps += new - old;
                } else {
                    t.missed += 1;
                }
            }
            seqs = now;
        }
        t.last_seq = seqs.first().copied().unwrap_or(t.last_seq);
        t.passes += 1;
        bumps.store(t.bumps, Ordering::Release);
        std::thread::sleep(PAUSE);
    }
    t.elapsed = start.elapsed();
    t
}

/// The mm walk's young and total leaf deltas between two readings, where both show running
/// totals (`None` otherwise: per-generation counts or no counters).
pub(super) fn walk_delta(before: Option<Walk>, after: Option<Walk>) -> Option<(u64, u64)> {
    match (before, after) {
        (Some(b), Some(a)) if b.cumulative && a.cumulative => Some((
            a.young.saturating_sub(b.young),
            a.total.saturating_sub(b.total),
        )),
        _ => None,
    }
}
