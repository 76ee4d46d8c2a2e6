//! `trackcheck env`: the host profile and what can run here, as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use trackcheck_harness::support::{backing_support, mode_support};
use trackcheck_harness::{Backing, ExecutionMode, HostProfile, Mechanism, Support, mode};

/// The profile plus a support verdict for every mode, backing and mechanism.
#[derive(Debug, Serialize)]
pub struct EnvReport {
    /// The probed host.
    pub host: HostProfile,
    /// Key naming this host profile (golden files are per key).
    pub host_key: String,
    /// Execution modes.
    pub modes: BTreeMap<String, ModeLine>,
    /// Memory backings.
    pub backings: BTreeMap<String, Support>,
    /// Tracking mechanisms.
    pub mechanisms: BTreeMap<String, Support>,
}

/// One execution mode: whether it runs here and how.
#[derive(Debug, Serialize)]
pub struct ModeLine {
    /// Whether it can run.
    #[serde(flatten)]
    pub support: Support,
    /// Privilege level used, when supported.
    pub cpl: Option<u8>,
    /// How the backend gives this mode.
    pub how: Option<String>,
}

impl EnvReport {
    /// Probe the host and judge everything against it.
    #[must_use]
    pub fn probe() -> Self {
        let host = HostProfile::probe();
        let mut modes = BTreeMap::new();
        for m in ExecutionMode::ALL {
            let support = mode_support(&host, m);
            let plan = host
                .kvm
                .as_ref()
                .and_then(|k| mode::plan(m, k.backend.kind).ok());
            modes.insert(
                m.name().to_string(),
                ModeLine {
                    support,
                    cpl: plan.as_ref().map(|p| p.cpl),
                    how: plan.map(|p| p.why),
                },
            );
        }
        let backings = Backing::ALL
            .iter()
            .map(|b| (b.name().to_string(), backing_support(&host, *b)))
            .collect();
        let mechanisms = Mechanism::ALL
            .iter()
            .map(|m| (m.name().to_string(), m.support(&host)))
            .collect();
        Self {
            host_key: host.key(),
            host,
            modes,
            backings,
            mechanisms,
        }
    }

    /// Human-readable text.
    #[must_use]
    pub fn text(&self) -> String {
        let h = &self.host;
        let mut out = String::new();
        let k = &h.kernel;
        let _ = writeln!(out, "host profile: {}", self.host_key);
        let _ = writeln!(
            out,
            "  kernel     {} ({}), {}, {} CPUs, {:.1} GiB",
            k.release,
            k.arch,
            k.cpu_model,
            k.cpus,
            k.memory_bytes as f64 / f64::from(1u32 << 30)
        );
        match &h.kvm {
            None => {
                let _ = writeln!(
                    out,
                    "  kvm        unavailable: {}",
                    h.kvm_unavailable.as_deref().unwrap_or("not probed")
                );
            }
            Some(kvm) => {
                let b = &kvm.backend;
                let flag = |v: Option<bool>| v.map_or("?", |v| if v { "Y" } else { "N" });
                let _ = writeln!(
                    out,
                    "  kvm        {} (API {}), backend {} [{}], mmu {}, tdp_mmu={} pml={} eager_page_split={}",
                    kvm.device,
                    kvm.api_version,
                    b.kind.name(),
                    b.detected_by,
                    b.mmu,
                    flag(b.tdp_mmu),
                    flag(b.pml),
                    flag(b.eager_page_split)
                );
                let caps: Vec<String> = kvm
                    .caps
                    .iter()
                    .filter(|(_, v)| **v != 0)
                    .map(|(n, v)| format!("{n}={v}"))
                    .collect();
                let absent: Vec<&str> = kvm
                    .caps
                    .iter()
                    .filter(|(_, v)| **v == 0)
                    .map(|(n, _)| n.as_str())
                    .collect();
                let _ = writeln!(out, "  caps       {}", caps.join(" "));
                let _ = writeln!(out, "  caps (no)  {}", absent.join(" "));
                let _ = writeln!(
                    out,
                    "  guest cpu  1 GiB pages: {}; pv features: {}",
                    if kvm.guest_cpu.pages_1g { "yes" } else { "no" },
                    if kvm.guest_cpu.pv_features.is_empty() {
                        "none".into()
                    } else {
                        kvm.guest_cpu.pv_features.join(", ")
                    }
                );
                let _ = writeln!(
                    out,
                    "  stats      VM: {} ({} total); vCPU: {} total, insn_emulation {}",
                    ["pages_4k", "pages_2m", "pages_1g"]
                        .iter()
                        .map(|s| format!(
                            "{s} {}",
                            if kvm.vm_stats.iter().any(|n| n == s) {
                                "yes"
                            } else {
                                "no"
                            }
                        ))
                        .collect::<Vec<_>>()
                        .join(", "),
                    kvm.vm_stats.len(),
                    kvm.vcpu_stats.len(),
                    if kvm.vcpu_stats.iter().any(|n| n == "insn_emulation") {
                        "yes"
                    } else {
                        "no"
                    }
                );
                for e in &kvm.probe_errors {
                    let _ = writeln!(out, "  probe      {e}");
                }
            }
        }
        let m = &h.memory;
        let pools: Vec<String> = m
            .hugetlb
            .iter()
            .map(|p| {
                format!(
                    "{} KiB: nr {} free {} reserved {} surplus {}",
                    p.kib, p.nr, p.free, p.reserved, p.surplus
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  thp        enabled={} defrag={} shmem_enabled={}",
            m.thp_enabled.as_deref().unwrap_or("absent"),
            m.thp_defrag.as_deref().unwrap_or("absent"),
            m.thp_shmem_enabled.as_deref().unwrap_or("absent")
        );
        let _ = writeln!(
            out,
            "  hugetlb    {}",
            if pools.is_empty() {
                "no pools".into()
            } else {
                pools.join("; ")
            }
        );
        let u = &h.userfaultfd;
        let _ = writeln!(
            out,
            "  uffd       {}; PAGEMAP_SCAN {}",
            u.error.clone().unwrap_or_else(|| u.features.join(" ")),
            if u.pagemap_scan {
                "yes".to_string()
            } else {
                u.pagemap_scan_error.clone().unwrap_or_else(|| "no".into())
            }
        );
        let a = &h.access;
        let kd: Vec<String> = a
            .kdamonds
            .iter()
            .map(|k| {
                format!(
                    "kdamond {} {} ({})",
                    k.index,
                    k.state,
                    k.operations.join(",")
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "  access     page_idle {}; DAMON sysfs {}; {}; operations {}",
            if a.page_idle { "yes" } else { "no" },
            if a.damon_sysfs { "yes" } else { "no" },
            if kd.is_empty() {
                "no kdamond".into()
            } else {
                kd.join(", ")
            },
            if a.damon_operations.is_empty() {
                "unknown".into()
            } else {
                a.damon_operations.join(",")
            }
        );
        let verdict = |s: &Support| match s {
            Support::Yes => "yes".to_string(),
            Support::No { reason } => format!("no   {reason}"),
        };
        let _ = writeln!(out, "\nexecution modes");
        for mode in ExecutionMode::ALL {
            let (name, Some(line)) = (mode.name(), self.modes.get(mode.name())) else {
                continue;
            };
            let how = match (&line.support, line.cpl, &line.how) {
                (Support::Yes, Some(cpl), Some(how)) => format!("yes  CPL{cpl}: {how}"),
                (s, _, _) => verdict(s),
            };
            let _ = writeln!(out, "  {name:<24} {how}");
        }
        let _ = writeln!(out, "\nbackings");
        for backing in Backing::ALL {
            if let Some(s) = self.backings.get(backing.name()) {
                let _ = writeln!(out, "  {:<24} {}", backing.name(), verdict(s));
            }
        }
        let _ = writeln!(out, "\nmechanisms");
        for m in Mechanism::ALL {
            if let Some(s) = self.mechanisms.get(m.name()) {
                let _ = writeln!(out, "  {:<24} {}", m.name(), verdict(s));
            }
        }
        out
    }
}
