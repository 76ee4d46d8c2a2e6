//! Whether a mechanism, backing or execution mode can run on this host, and why not.
//!
//! Decided from a [`HostProfile`] at run time, never at build time (the build host is not the
//! host under test). A "no" always carries the reason, which reports and skipped trials show.

use serde::{Deserialize, Serialize};

use crate::host::HostProfile;
use crate::memory::Backing;
use crate::mode::{self, ExecutionMode};
use crate::sys::uffd;

/// Can it run here?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "supported")]
pub enum Support {
    /// Yes.
    Yes,
    /// No, because `reason`.
    No {
        /// What is missing, in words a user can act on.
        reason: String,
    },
}

impl Support {
    /// `No` with `reason`.
    pub fn no(reason: impl Into<String>) -> Self {
        Self::No {
            reason: reason.into(),
        }
    }

    /// True for `Yes`.
    #[must_use]
    pub fn is_yes(&self) -> bool {
        matches!(self, Self::Yes)
    }

    /// The reason, for `No`.
    #[must_use]
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Yes => None,
            Self::No { reason } => Some(reason),
        }
    }
}

/// A tracking mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Mechanism {
    /// KVM_GET_DIRTY_LOG: get clears and write-protects.
    #[serde(rename = "dirty-log")]
    DirtyLog,
    /// KVM_CLEAR_DIRTY_LOG with manual protect.
    #[serde(rename = "clear-log")]
    ClearLog,
    /// KVM_CLEAR_DIRTY_LOG with manual protect and INITIALLY_SET.
    #[serde(rename = "clear-log-initially-set")]
    ClearLogInitiallySet,
    /// The per-vCPU dirty ring.
    #[serde(rename = "dirty-ring")]
    DirtyRing,
    /// The dirty ring with its backup bitmap.
    #[serde(rename = "dirty-ring-with-bitmap")]
    DirtyRingWithBitmap,
    /// userfaultfd asynchronous write-protect, collected with PAGEMAP_SCAN.
    #[serde(rename = "uffd-wp-async")]
    UffdWpAsync,
    /// userfaultfd write-protect with a fault-handler thread.
    #[serde(rename = "uffd-wp-sync")]
    UffdWpSync,
    /// Accessed/dirty bits in the guest's own page tables.
    #[serde(rename = "guest-ad-bits")]
    GuestAdBits,
    /// /sys/kernel/mm/page_idle/bitmap.
    #[serde(rename = "page-idle")]
    PageIdle,
    /// DAMON access monitoring.
    #[serde(rename = "damon")]
    Damon,
    /// Multi-gen LRU aging, forced through debugfs (`lru_gen`) on a memory cgroup of the
    /// suite's own.
    #[serde(rename = "mglru")]
    Mglru,
}

impl Mechanism {
    /// Every mechanism, in report order.
    pub const ALL: [Self; 11] = [
        Self::DirtyLog,
        Self::ClearLog,
        Self::ClearLogInitiallySet,
        Self::DirtyRing,
        Self::DirtyRingWithBitmap,
        Self::UffdWpAsync,
        Self::UffdWpSync,
        Self::GuestAdBits,
        Self::PageIdle,
        Self::Damon,
        Self::Mglru,
    ];

    /// Name used in trial names, reports and `TRACKCHECK_REQUIRE`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::DirtyLog => "dirty-log",
            Self::ClearLog => "clear-log",
            Self::ClearLogInitiallySet => "clear-log-initially-set",
            Self::DirtyRing => "dirty-ring",
            Self::DirtyRingWithBitmap => "dirty-ring-with-bitmap",
            Self::UffdWpAsync => "uffd-wp-async",
            Self::UffdWpSync => "uffd-wp-sync",
            Self::GuestAdBits => "guest-ad-bits",
            Self::PageIdle => "page-idle",
            Self::Damon => "damon",
            Self::Mglru => "mglru",
        }
    }

    /// Whether this host can run the mechanism.
    #[must_use]
    pub fn support(self, host: &HostProfile) -> Support {
        let kvm = match host.kvm() {
            Ok(k) => k,
            Err(e) if self.needs_kvm() => return Support::no(format!("KVM unavailable: {e}")),
            Err(_) => return self.support_without_kvm(host),
        };
        match self {
            Self::DirtyLog => Support::Yes,
            Self::ClearLog | Self::ClearLogInitiallySet => {
                let v = kvm.cap("MANUAL_DIRTY_LOG_PROTECT2");
                let want = if self == Self::ClearLog { 1 } else { 3 };
                if v & want == want {
                    Support::Yes
                } else if v == 0 {
                    Support::no(
                        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is absent (kernel older than 5.8?)",
                    )
                } else {
                    Support::no(format!(
                        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {v:#x} lacks KVM_DIRTY_LOG_INITIALLY_SET"
                    ))
                }
            }
            Self::DirtyRing => {
                if kvm.cap("DIRTY_LOG_RING_ACQ_REL") > 0
                    || (host.kernel.arch == "x86_64" && kvm.cap("DIRTY_LOG_RING") > 0)
                {
                    Support::Yes
                } else {
                    Support::no(
                        "neither KVM_CAP_DIRTY_LOG_RING_ACQ_REL nor (on x86) KVM_CAP_DIRTY_LOG_RING",
                    )
                }
            }
            Self::DirtyRingWithBitmap => {
                if kvm.cap("DIRTY_LOG_RING_WITH_BITMAP") > 0 {
                    Support::Yes
                } else {
                    Support::no(
                        "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP is absent (x86 KVM does not offer \
                         it; arm64 has it from 6.4 for ITS table saves)",
                    )
                }
            }
            Self::UffdWpAsync | Self::UffdWpSync | Self::PageIdle | Self::Damon | Self::Mglru => {
                self.support_without_kvm(host)
            }
            Self::GuestAdBits => {
                if host.kernel.arch == "x86_64" {
                    Support::Yes
                } else {
                    Support::no("guest A/D bit scenarios are written for x86_64 page tables so far")
                }
            }
        }
    }

    fn needs_kvm(self) -> bool {
        !matches!(
            self,
            Self::UffdWpAsync | Self::UffdWpSync | Self::PageIdle | Self::Damon | Self::Mglru
        )
    }

    /// Support of the mechanisms that do not go through KVM's own interfaces (KVM still runs
    /// the guest, so a trial needs it too; this says whether the mechanism itself exists).
    fn support_without_kvm(self, host: &HostProfile) -> Support {
        let u = &host.userfaultfd;
        match self {
            Self::UffdWpAsync | Self::UffdWpSync => {
                if let Some(e) = &u.error {
                    return Support::no(format!(
                        "{e} (root, or vm.unprivileged_userfaultfd=1, or access to /dev/userfaultfd)"
                    ));
                }
                let need = if self == Self::UffdWpSync {
                    crate::track::uffd::SYNC_FEATURES
                } else {
                    crate::track::uffd::ASYNC_FEATURES
                };
                let missing = uffd::feature_names(need & !u.feature_bits);
                if !missing.is_empty() {
                    return Support::no(format!("userfaultfd lacks {}", missing.join(", ")));
                }
                if self == Self::UffdWpAsync && !u.pagemap_scan {
                    return Support::no(
                        u.pagemap_scan_error
                            .clone()
                            .unwrap_or_else(|| "PAGEMAP_SCAN is absent (Linux 6.7+)".into()),
                    );
                }
                Support::Yes
            }
            Self::PageIdle => {
                if host.access.page_idle {
                    Support::Yes
                } else {
                    Support::no(
                        "/sys/kernel/mm/page_idle/bitmap is absent (CONFIG_IDLE_PAGE_TRACKING=n)",
                    )
                }
            }
            Self::Damon => {
                let a = &host.access;
                if !a.damon_sysfs {
                    return Support::no("DAMON sysfs interface is absent (CONFIG_DAMON_SYSFS=n)");
                }
                if let Some(k) = a.kdamonds.first() {
                    return Support::no(format!(
                        "kdamond {} already exists (state {}, operations {}) and belongs to the \
                         machine; the suite never reconfigures a kdamond it did not create, and \
                         adding one would rewrite nr_kdamonds",
                        k.index,
                        k.state,
                        if k.operations.is_empty() {
                            "none".into()
                        } else {
                            k.operations.join(",")
                        }
                    ));
                }
                if !a.damon_operations.is_empty()
                    && !a.damon_operations.iter().any(|o| o == "vaddr")
                {
                    return Support::no(format!(
                        "DAMON offers only {} here; guest memory needs vaddr",
                        a.damon_operations.join(",")
                    ));
                }
                Support::Yes
            }
            Self::Mglru => mglru_support(&host.access),
            _ => Support::no("KVM unavailable"),
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for Mechanism {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown mechanism {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Whether MGLRU aging can be forced here and reach KVM's mappings (as far as the host's facts
/// say; whether the suite may change them is the scenario's question).
fn mglru_support(a: &crate::host::AccessFacts) -> Support {
    let Some(enabled) = a.lru_gen_enabled else {
        return Support::no(
            "/sys/kernel/mm/lru_gen is absent (CONFIG_LRU_GEN=n): no multi-gen LRU",
        );
    };
    if !a.debugfs {
        return Support::no(
            "debugfs is not mounted at /sys/kernel/debug (or not readable): MGLRU aging is \
             forced through its lru_gen file",
        );
    }
    if !a.lru_gen_debugfs {
        return Support::no("debugfs has no lru_gen file: MGLRU aging cannot be forced");
    }
    if enabled & 1 == 1 && enabled & 2 == 0 {
        return Support::no(format!(
            "lru_gen/enabled is {enabled:#06x}: without 0x2 MGLRU aging never walks page tables \
             (no hardware accessed bit: arm64 without FEAT_HAFDBS; or the machine cleared it), \
             so it never reaches KVM's mappings"
        ));
    }
    match &a.cgroup2 {
        None => Support::no(
            "cgroup2 is not mounted: MGLRU aging is forced on a memory cgroup of the suite's own",
        ),
        Some(m) if !a.cgroup2_controllers.iter().any(|c| c == "memory") => Support::no(format!(
            "cgroup2 at {m} does not offer the memory controller (cgroup v1 holds it): the \
             suite cannot make a memory cgroup of its own to age"
        )),
        Some(_) => Support::Yes,
    }
}

/// Whether this host can back guest memory with `backing`.
#[must_use]
pub fn backing_support(host: &HostProfile, backing: Backing) -> Support {
    match backing {
        Backing::Anon | Backing::Memfd | Backing::Shmem => Support::Yes,
        // Probed now (the directory can change between runs; it is not a host fact).
        Backing::File => match crate::memory::file_refusal() {
            None => Support::Yes,
            Some(reason) => Support::no(reason),
        },
        Backing::Thp => match host.memory.thp_enabled.as_deref() {
            Some("always" | "madvise") => Support::Yes,
            Some(other) => Support::no(format!(
                "transparent_hugepage/enabled is '{other}'; the suite does not change it"
            )),
            None => Support::no("no transparent hugepage support (CONFIG_TRANSPARENT_HUGEPAGE=n)"),
        },
        Backing::Hugetlb2M | Backing::Hugetlb1G | Backing::MemfdHugetlb2M => {
            let kib = backing.hugetlb_kib().unwrap_or(0);
            if host.hugetlb_pool(kib).is_some() {
                Support::Yes
            } else {
                Support::no(format!(
                    "no {kib} KiB hugetlb pool in /sys/kernel/mm/hugepages"
                ))
            }
        }
    }
}

/// Whether this host can run guests in `mode`.
#[must_use]
pub fn mode_support(host: &HostProfile, mode: ExecutionMode) -> Support {
    match host.kvm() {
        Err(e) => Support::no(format!("KVM unavailable: {e}")),
        Ok(kvm) => match mode::plan(mode, kvm.backend.kind) {
            Ok(_) => Support::Yes,
            Err(reason) => Support::no(reason),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Mechanism::ALL {
            assert_eq!(m.name().parse::<Mechanism>(), Ok(m));
            assert_eq!(
                serde_json::to_string(&m).ok(),
                Some(format!("\"{}\"", m.name()))
            );
        }
    }

    #[test]
    fn every_no_has_a_reason() {
        let host = HostProfile::probe();
        for m in Mechanism::ALL {
            if let Support::No { reason } = m.support(&host) {
                assert!(!reason.is_empty(), "{m}");
            }
        }
    }

    #[test]
    fn without_kvm_everything_kvm_based_says_so() {
        let mut host = HostProfile::probe();
        host.kvm = None;
        host.kvm_unavailable = Some("/dev/kvm: no such device".into());
        let s = Mechanism::DirtyRing.support(&host);
        assert!(
            s.reason().is_some_and(|r| r.contains("no such device")),
            "{s:?}"
        );
        assert!(!mode_support(&host, ExecutionMode::Native).is_yes());
    }
}
