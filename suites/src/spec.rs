//! What one trial is: mechanism x scenario x backing x execution mode (+ an injected fault),
//! and its name, which is a path so filters select families (`cargo test dirty-ring`).

use std::fmt;

use serde::{Deserialize, Serialize};
use trackcheck_harness::track::TrackerSpec;
use trackcheck_harness::track::inject::Fault;
use trackcheck_harness::{Backing, ExecutionMode};

/// How concurrent writers walk their pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pattern {
    /// Each vCPU sweeps its own pages in order.
    Sequential,
    /// Every vCPU visits a seeded permutation of the whole region (pages shared).
    Random,
    /// Each vCPU visits every 8th page of its own pages.
    Strided,
    /// 90% of writes to a small shared hot set, 10% anywhere.
    HotCold,
}

impl Pattern {
    /// Every pattern.
    pub const ALL: [Self; 4] = [Self::Sequential, Self::Random, Self::Strided, Self::HotCold];

    /// Name in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sequential => "sequential",
            Self::Random => "random",
            Self::Strided => "strided",
            Self::HotCold => "hot-cold",
        }
    }
}

/// Which huge-page path a [`Scenario::Huge`] trial provokes (family 6). Each writes the data
/// region once with logging off first, so KVM maps what it can with huge mappings, then
/// tracks a program that writes one 4 KiB page in every 2 MiB region (the first, the last and
/// pages in between), rewrites them and writes their neighbours. KVM's binary stats
/// (pages_4k / pages_2m) prove the path was taken, or the trial says it was not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "path")]
pub enum HugePath {
    /// Guest 2 MiB mappings over huge host memory: the tracked writes split KVM's 2 MiB
    /// mappings (or enabling tracking already did).
    Enable,
    /// Enable, write, disable tracking (the huge mappings come back), write again, enable
    /// again, write, check.
    Recover,
    /// Several vCPUs write random pages across the huge regions while the host harvests in a
    /// loop: collects, CLEARs and ring resets race the first writes that split.
    Race {
        /// vCPUs writing.
        vcpus: u8,
    },
    /// Guest 2 MiB mappings over 4 KiB host pages (KVM must map 4 KiB under a guest 2 MiB
    /// page).
    GuestHugeHostSmall,
    /// Guest 4 KiB mappings over huge host pages.
    GuestSmallHostHuge,
    /// Enable with KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE set (arm64): KVM splits the huge
    /// mappings in chunks of this many KiB when logging starts (or at CLEAR with manual
    /// protect and INITIALLY_SET) instead of on each faulting write; 0 sets it off explicitly.
    EagerSplit {
        /// Chunk size in KiB (0: off).
        chunk_kib: u32,
    },
}

impl HugePath {
    /// Name in trial names.
    #[must_use]
    pub fn name(self) -> String {
        match self {
            Self::Enable => "huge-enable".into(),
            Self::Recover => "huge-recover".into(),
            Self::Race { vcpus } => format!("huge-race-v{vcpus}"),
            Self::GuestHugeHostSmall => "huge-guest2m-host4k".into(),
            Self::GuestSmallHostHuge => "huge-guest4k-host2m".into(),
            Self::EagerSplit { chunk_kib: 0 } => "huge-eager-split-off".into(),
            Self::EagerSplit { chunk_kib } if chunk_kib.is_multiple_of(1024) => {
                format!("huge-eager-split-{}m", chunk_kib / 1024)
            }
            Self::EagerSplit { chunk_kib } => format!("huge-eager-split-{chunk_kib}k"),
        }
    }
}

/// Which memslot operation a [`Scenario::Memslot`] trial makes while tracking (family 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum SlotOp {
    /// vCPUs write four slots while the host harvests in a loop and, every few harvests,
    /// turns KVM_MEM_LOG_DIRTY_PAGES of one slot off and on again (then copies that slot
    /// whole, as a VMM must).
    Toggle,
    /// Stepped rounds over four slots; one slot moves to another guest-physical address
    /// between rounds (with writes still unharvested) and back later.
    Move,
    /// Stepped rounds over four slots; one slot is deleted with writes still unharvested
    /// (they are not required any more), restored later and written again.
    Delete,
    /// Stepped rounds over many small slots of unaligned sizes (1 page, 63, 65, 257, ...).
    Many,
    /// Concurrent writers over the same many small slots.
    ManyConcurrent,
}

impl SlotOp {
    /// Name in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Toggle => "memslot-toggle",
            Self::Move => "memslot-move",
            Self::Delete => "memslot-delete",
            Self::Many => "memslot-many",
            Self::ManyConcurrent => "memslot-many-concurrent",
        }
    }
}

/// What a [`Scenario::GuestTables`] trial does with the guest's own page tables (family 8).
/// The tables that map the data region live in tracked memory the guest can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "case")]
pub enum TablesCase {
    /// Stepped rounds over 4 KiB guest pages: KVM sets the entries' accessed and dirty bits,
    /// so the page-table pages change and must be reported.
    Ad4K,
    /// The same over 2 MiB guest pages.
    Ad2M,
    /// One vCPU rewrites its own entries, pointing data pages at other physical pages and
    /// back between rounds, then writes through them (on a shadow MMU: the unsync/sync path).
    Remap,
    /// Stepped rounds over 1 GiB guest pages (where the guest CPU offers them).
    Guest1G,
}

impl TablesCase {
    /// Name in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ad4K => "gpt-ad-4k",
            Self::Ad2M => "gpt-ad-2m",
            Self::Remap => "gpt-remap",
            Self::Guest1G => "gpt-guest-1g",
        }
    }
}

/// Which access-tracking path a [`Scenario::Access`] trial checks (family 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum AccessKind {
    /// The guest clears the accessed/dirty bits of its entries, the host flushes its TLB (the
    /// guest cannot), the guest reads and writes pages: every page accessed must have A set,
    /// every page written D, while the dirty tracker harvests in between.
    GuestAd,
    /// The same without the host's flush: misses are measured, not asserted.
    GuestAdNoFlush,
}

impl AccessKind {
    /// Name in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::GuestAd => "access-guest-ad",
            Self::GuestAdNoFlush => "access-guest-ad-noflush",
        }
    }
}

/// Which aging agent a [`Scenario::Idle`] trial runs beside the dirty tracker (issue 11).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "agent")]
pub enum IdleAgent {
    /// A kdamond the suite creates with DAMON's vaddr operations over this process.
    DamonVaddr,
    /// A kdamond the suite creates with DAMON's paddr operations over the guest memory's
    /// physical frames.
    DamonPaddr,
    /// MGLRU aging forced through debugfs on a memory cgroup the suite makes for the guest
    /// memory.
    Mglru,
    /// /sys/kernel/mm/page_idle/bitmap writes over the guest memory's frames (kernels with
    /// CONFIG_IDLE_PAGE_TRACKING=y), with the access side checked as a lower bound.
    PageIdle,
}

impl IdleAgent {
    /// Name in trial names.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::DamonVaddr => "idle-damon-vaddr",
            Self::DamonPaddr => "idle-damon-paddr",
            Self::Mglru => "idle-mglru",
            Self::PageIdle => "idle-page-idle",
        }
    }
}

/// A scenario family and its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "family")]
pub enum Scenario {
    /// Rounds of seeded random page sets on two vCPUs; harvest between rounds.
    Stepped,
    /// Like stepped, but the guest runs a segment between collect and rearm and between rearm
    /// and copy: writes land inside the harvest.
    Race,
    /// vCPUs write continuously while the host harvests in a loop; shadow-copy oracle.
    Concurrent {
        /// Walk.
        pattern: Pattern,
        /// vCPUs writing.
        vcpus: u8,
    },
    /// Segments far larger than the dirty ring's soft limit: KVM_EXIT_DIRTY_RING_FULL, harvest,
    /// resume, on several vCPUs.
    RingFull {
        /// vCPUs writing.
        vcpus: u8,
    },
    /// A slot of 1 GiB + 16 pages: writes at both ends, CLEAR ranges that end at the slot's end,
    /// and invalid ranges that must get EINVAL.
    ClearGeometry,
    /// The stepped program under this mechanism and under `against`: per round, the reported
    /// sets must agree except for pages an allowance explains.
    CrossCheck {
        /// The reference mechanism.
        against: TrackerSpec,
    },
    /// proptest over guest programs (page sets, orders, vCPUs, offsets), stepped oracle on each.
    PropPrograms,
    /// Writes KVM makes itself (family 9): kvmclock and steal time in tracked memory, and
    /// nothing written after the vCPUs are paused.
    KvmWrites,
    /// The guest's own page tables in tracked memory (family 8).
    GuestTables {
        /// What is done with them.
        case: TablesCase,
    },
    /// Access tracking (family 10).
    Access {
        /// Which path.
        kind: AccessKind,
    },
    /// Memslot operations while tracking (family 7).
    Memslot {
        /// Which operation.
        op: SlotOp,
    },
    /// Huge-page splits and recoveries (family 6).
    Huge {
        /// Which path.
        path: HugePath,
    },
    /// proptest-state-machine over host/guest interleavings (writes, collect, rearm ranges,
    /// copy, log-flag toggles).
    PropInterleavings,
    /// Writeback and pageout of a file backing race the tracker while vCPUs write and the
    /// host harvests: KVM's mappings are zapped and faulted again while logging is on.
    ReclaimFile,
    /// An aging agent clears the young state of KVM's mappings while vCPUs write and the host
    /// harvests.
    Idle {
        /// Which agent.
        agent: IdleAgent,
    },
}

impl Scenario {
    /// Name in trial names.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::Stepped => "stepped".into(),
            Self::Race => "race".into(),
            Self::Concurrent { pattern, vcpus } => {
                format!("concurrent-{}-v{vcpus}", pattern.name())
            }
            Self::RingFull { vcpus } => format!("ring-full-v{vcpus}"),
            Self::ClearGeometry => "clear-geometry".into(),
            Self::CrossCheck { against } => format!("crosscheck-{}", path_part(&against.label())),
            Self::PropPrograms => "proptest-programs".into(),
            Self::Huge { path } => path.name(),
            Self::KvmWrites => "kvm-writes".into(),
            Self::Memslot { op } => op.name().into(),
            Self::GuestTables { case } => case.name().into(),
            Self::Access { kind } => kind.name().into(),
            Self::PropInterleavings => "proptest-interleavings".into(),
            Self::ReclaimFile => "reclaim-file".into(),
            Self::Idle { agent } => agent.name().into(),
        }
    }

    /// The family alone (`stepped`, `concurrent`, ...), for JSON.
    #[must_use]
    pub const fn family(&self) -> &'static str {
        match self {
            Self::Stepped => "stepped",
            Self::Race => "race",
            Self::Concurrent { .. } => "concurrent",
            Self::RingFull { .. } => "ring-full",
            Self::ClearGeometry => "clear-geometry",
            Self::CrossCheck { .. } => "crosscheck",
            Self::PropPrograms | Self::PropInterleavings => "proptest",
            Self::Huge { .. } => "huge",
            Self::KvmWrites => "kvm-writes",
            Self::Memslot { .. } => "memslot",
            Self::GuestTables { .. } => "guest-tables",
            Self::Access { .. } => "access",
            Self::ReclaimFile => "reclaim",
            Self::Idle { .. } => "idle",
        }
    }

    /// Whether `fault` deterministically loses a write in this scenario (mechanism aside, see
    /// `inject::applicability`); the error says why not. A self-test must lose a write every
    /// time, or a pass would say nothing about the oracle.
    pub const fn loses_under(&self, fault: Fault) -> Result<(), &'static str> {
        match (self, fault) {
            (Self::PropInterleavings, _) => Err(
                "the interleavings build a tracker per case and drive it step by step; inject \
                 into proptest-programs instead",
            ),
            (Self::Race, _) | (_, Fault::DropPage) => Ok(()),
            (
                Self::Concurrent { .. }
                | Self::Huge {
                    path: HugePath::Race { .. },
                }
                | Self::Memslot {
                    op: SlotOp::Toggle | SlotOp::ManyConcurrent,
                }
                | Self::ReclaimFile
                | Self::Idle { .. },
                _,
            ) => Err(
                "the guest writes while the host harvests: whether a page left writable is \
                 written again before the run ends, or a write lands between copy and rearm, is \
                 timing (the race scenario loses these deterministically; drop-page runs here)",
            ),
            (Self::KvmWrites, Fault::SkipRearm) => Err(
                "KVM sets the dirty state of its own writes directly, not through a \
                 write-protect fault, and the guest's pages are random: a skipped rearm need \
                 not lose anything",
            ),
            (Self::PropPrograms, Fault::SkipRearm) => {
                Err("a random program need not write a page again after the skipped rearm")
            }
            (_, Fault::CopyBeforeRearm) => Err(
                "the guest is stopped from collect to copy here, so a copy before the rearm \
                 sees every write (the race scenario runs the guest in between)",
            ),
            (
                Self::Stepped
                | Self::RingFull { .. }
                | Self::CrossCheck { .. }
                | Self::ClearGeometry
                | Self::Huge { .. }
                | Self::Memslot { .. }
                | Self::GuestTables { .. }
                | Self::Access {
                    kind: AccessKind::GuestAdNoFlush,
                },
                Fault::SkipRearm,
            ) => Ok(()),
            (
                Self::Access {
                    kind: AccessKind::GuestAd,
                },
                Fault::SkipRearm,
            ) => Err(
                "each round the guest clears the dirty bits of its entries and the host flushes \
                 its TLB, so its next write to a page faults in KVM's MMU and is logged again: \
                 a skipped rearm need not lose anything",
            ),
        }
    }
}

/// `clear-log/whole` -> `clear-log-whole`: labels become one path component.
#[must_use]
pub fn path_part(label: &str) -> String {
    label.replace('/', "-")
}

/// One trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TrialSpec {
    /// Mechanism and parameters.
    pub tracker: TrackerSpec,
    /// Scenario.
    pub scenario: Scenario,
    /// Host backing of the data region.
    pub backing: Backing,
    /// Execution mode.
    pub mode: ExecutionMode,
    /// A deliberate loss (self-test), if any.
    pub inject: Option<Fault>,
}

#[cfg(test)]
impl TrialSpec {
    /// A plain trial for unit tests: `dirty-log`, stepped, native, on `backing`.
    pub(crate) fn example(backing: trackcheck_harness::Backing) -> Self {
        Self {
            tracker: trackcheck_harness::track::TrackerSpec::DirtyLog,
            scenario: Scenario::Stepped,
            backing,
            mode: trackcheck_harness::ExecutionMode::Native,
            inject: None,
        }
    }
}

impl TrialSpec {
    /// `arch::mechanism::scenario::backing::mode[::inject-fault]`.
    #[must_use]
    pub fn name(&self) -> String {
        let mut name = format!(
            "{}::{}::{}::{}::{}",
            std::env::consts::ARCH,
            path_part(&self.tracker.label()),
            self.scenario.name(),
            self.backing,
            self.mode
        );
        if let Some(fault) = self.inject {
            name.push_str("::inject-");
            name.push_str(fault.name());
        }
        name
    }

    /// The default seed: a stable hash of the name, so every run of a trial uses the same
    /// programs unless a seed is given.
    #[must_use]
    pub fn default_seed(&self) -> u64 {
        // FNV-1a: stable across Rust versions, unlike DefaultHasher.
        self.name().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

impl fmt::Display for TrialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trackcheck_harness::track::ClearGranularity;

    #[test]
    fn names_are_paths_and_seeds_are_stable() {
        let spec = TrialSpec {
            tracker: TrackerSpec::ClearLog {
                initially_set: false,
                granularity: ClearGranularity::Chunk64,
            },
            scenario: Scenario::Concurrent {
                pattern: Pattern::HotCold,
                vcpus: 4,
            },
            backing: Backing::Thp,
            mode: ExecutionMode::Native,
            inject: Some(Fault::DropPage),
        };
        assert_eq!(
            spec.name(),
            format!(
                "{}::clear-log-chunk64::concurrent-hot-cold-v4::thp::native::inject-drop-page",
                std::env::consts::ARCH
            )
        );
        assert_eq!(spec.default_seed(), spec.default_seed());
        let json = serde_json::to_string(&spec).expect("serialises");
        assert_eq!(
            serde_json::from_str::<TrialSpec>(&json).expect("parses"),
            spec
        );
    }
}
