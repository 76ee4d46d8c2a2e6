//! [`HostProfile`]: what this host's kernel and KVM offer, probed at run time.
//!
//! Nothing here is assumed from the build host: every fact is read from the running kernel
//! (uname, sysfs, KVM_CHECK_EXTENSION on a probe VM, binary stats descriptors, userfaultfd and
//! PAGEMAP_SCAN handshakes). The profile is what mechanism support, execution modes and the
//! golden matrix are keyed on, and it is printed by `trackcheck env`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::arch;
use crate::sys::{self, KvmUnavailable};

mod access;
mod fep;
mod series;

use access::{probe_access, probe_uffd};

pub use fep::{FORCE_EMULATION_PREFIX, ForceEmulationPrefix};
pub use series::kernel_series;

/// Everything the suite needs to know about the host under test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostProfile {
    /// Kernel and CPU.
    pub kernel: KernelFacts,
    /// KVM facts, or why KVM cannot be used.
    pub kvm: Option<KvmFacts>,
    /// Why `kvm` is `None` (with a hint), else `None`.
    pub kvm_unavailable: Option<String>,
    /// THP and hugetlb.
    pub memory: MemoryFacts,
    /// userfaultfd and PAGEMAP_SCAN.
    pub userfaultfd: UffdFacts,
    /// page_idle and DAMON.
    pub access: AccessFacts,
}

/// Kernel and CPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KernelFacts {
    /// `uname -r`.
    pub release: String,
    /// `uname -v`.
    pub version: String,
    /// `uname -m` as Rust names it (`x86_64`, `aarch64`).
    pub arch: String,
    /// CPU model from /proc/cpuinfo.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// MemTotal in bytes.
    pub memory_bytes: u64,
}

/// Which KVM implementation runs guests here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// PVM (kvm_pvm): guests run in hardware ring 3 under shadow paging, CPL0 is emulated.
    Pvm,
    /// Intel VMX (kvm_intel).
    Vmx,
    /// AMD SVM (kvm_amd).
    Svm,
    /// arm64 KVM (stage 2).
    Arm64,
    /// A backend this suite does not know; treated like hardware virtualisation.
    Unknown,
}

impl BackendKind {
    /// Short name for reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pvm => "pvm",
            Self::Vmx => "vmx",
            Self::Svm => "svm",
            Self::Arm64 => "arm64",
            Self::Unknown => "unknown",
        }
    }
}

/// The KVM backend and the module parameters that change how dirty tracking works.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Backend {
    /// Which backend.
    pub kind: BackendKind,
    /// How `kind` was decided.
    pub detected_by: String,
    /// Guest-physical MMU: `shadow`, `tdp (ept)`, `tdp (npt)`, `stage2`, `unknown`.
    pub mmu: String,
    /// `kvm.tdp_mmu`.
    pub tdp_mmu: Option<bool>,
    /// `kvm_intel.pml`, or `kvm_amd.pml` on kernels with AMD PML (hardware dirty logging; the
    /// effective value: KVM clears it where the CPU cannot do PML).
    pub pml: Option<bool>,
    /// `kvm.eager_page_split`.
    pub eager_page_split: Option<bool>,
    /// Every parameter of every loaded KVM module: module -> parameter -> value.
    pub module_params: BTreeMap<String, BTreeMap<String, String>>,
}

/// KVM facts from the device and a probe VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmFacts {
    /// Device opened.
    pub device: String,
    /// KVM_GET_API_VERSION.
    pub api_version: i32,
    /// The backend.
    pub backend: Backend,
    /// KVM_CHECK_EXTENSION on a probe VM, by capability name (0 = absent).
    pub caps: BTreeMap<String, i64>,
    /// What the guest CPU may use (from KVM_GET_SUPPORTED_CPUID on x86).
    pub guest_cpu: arch::GuestCpuFacts,
    /// Names of the VM binary statistics.
    pub vm_stats: Vec<String>,
    /// Names of the vCPU binary statistics.
    pub vcpu_stats: Vec<String>,
    /// Errors met while probing (a missing stats fd, ...): facts missing, not fatal.
    pub probe_errors: Vec<String>,
}

impl KvmFacts {
    /// Value of capability `name` (0 when absent or not probed).
    #[must_use]
    pub fn cap(&self, name: &str) -> i64 {
        self.caps.get(name).copied().unwrap_or(0)
    }
}

/// THP and hugetlb.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemoryFacts {
    /// /sys/kernel/mm/transparent_hugepage/enabled (the selected value).
    pub thp_enabled: Option<String>,
    /// .../defrag.
    pub thp_defrag: Option<String>,
    /// .../shmem_enabled.
    pub thp_shmem_enabled: Option<String>,
    /// hugetlb pools.
    pub hugetlb: Vec<HugetlbPool>,
}

/// One hugetlb pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HugetlbPool {
    /// Page size in KiB.
    pub kib: u64,
    /// nr_hugepages.
    pub nr: u64,
    /// free_hugepages.
    pub free: u64,
    /// resv_hugepages.
    pub reserved: u64,
    /// surplus_hugepages.
    pub surplus: u64,
}

/// userfaultfd and PAGEMAP_SCAN.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UffdFacts {
    /// Feature names the kernel offers (empty if userfaultfd cannot be opened).
    pub features: Vec<String>,
    /// Raw feature mask.
    pub feature_bits: u64,
    /// Why userfaultfd could not be opened, if it could not.
    pub error: Option<String>,
    /// Whether PAGEMAP_SCAN exists.
    pub pagemap_scan: bool,
    /// Why PAGEMAP_SCAN could not be probed, if it could not.
    pub pagemap_scan_error: Option<String>,
}

/// Access-tracking interfaces.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AccessFacts {
    /// /sys/kernel/mm/page_idle/bitmap exists.
    pub page_idle: bool,
    /// DAMON sysfs interface present.
    pub damon_sysfs: bool,
    /// Existing kdamonds (index, state, operations): the suite never reconfigures these.
    pub kdamonds: Vec<Kdamond>,
    /// Operation sets DAMON offers here, if known.
    pub damon_operations: Vec<String>,
    /// /sys/kernel/mm/lru_gen/enabled (multi-gen LRU's feature bits: 0x1 on, 0x2 aging walks
    /// page tables, 0x4 non-leaf PMD young bits), if CONFIG_LRU_GEN is built in.
    #[serde(default)]
    pub lru_gen_enabled: Option<u32>,
    /// Whether debugfs is mounted at /sys/kernel/debug (readable by this process).
    #[serde(default)]
    pub debugfs: bool,
    /// Whether debugfs has MGLRU's `lru_gen` file (aging is forced through it).
    #[serde(default)]
    pub lru_gen_debugfs: bool,
    /// Where cgroup2 is mounted, if it is.
    #[serde(default)]
    pub cgroup2: Option<String>,
    /// Controllers cgroup2's root offers (`cgroup.controllers`): `memory` is absent where cgroup
    /// v1 holds it.
    #[serde(default)]
    pub cgroup2_controllers: Vec<String>,
}

/// One kdamond found at probe time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Kdamond {
    /// Index under /sys/kernel/mm/damon/admin/kdamonds.
    pub index: usize,
    /// `on` / `off`.
    pub state: String,
    /// Operations of its contexts (`paddr`, `vaddr`, `fvaddr`).
    pub operations: Vec<String>,
}

/// KVM capabilities reported, by name. Numbers from include/uapi/linux/kvm.h (the same on every
/// architecture).
pub const CAPS: &[(&str, u32)] = &[
    ("USER_MEMORY", 3),
    ("NR_VCPUS", 9),
    ("NR_MEMSLOTS", 10),
    ("SYNC_MMU", 16),
    ("MAX_VCPUS", 66),
    ("KVMCLOCK_CTRL", 76),
    ("READONLY_MEM", 81),
    ("IMMEDIATE_EXIT", 136),
    ("X86_DISABLE_EXITS", 143),
    ("MANUAL_DIRTY_LOG_PROTECT2", 168),
    ("DIRTY_LOG_RING", 192),
    ("BINARY_STATS_FD", 203),
    ("DIRTY_LOG_RING_ACQ_REL", 223),
    ("DIRTY_LOG_RING_WITH_BITMAP", 225),
    ("ARM_EAGER_SPLIT_CHUNK_SIZE", 228),
    ("USER_MEMORY2", 231),
];

impl HostProfile {
    /// Probe the running host. Never fails: what cannot be probed is recorded as missing.
    #[must_use]
    pub fn probe() -> Self {
        let (kvm, kvm_unavailable) = match probe_kvm() {
            Ok(facts) => (Some(facts), None),
            Err(e) => (None, Some(e.to_string())),
        };
        Self {
            kernel: probe_kernel(),
            kvm,
            kvm_unavailable,
            memory: probe_memory(),
            userfaultfd: probe_uffd(),
            access: probe_access(),
        }
    }

    /// The KVM facts, or why there are none.
    pub fn kvm(&self) -> Result<&KvmFacts, String> {
        self.kvm.as_ref().ok_or_else(|| {
            self.kvm_unavailable
                .clone()
                .unwrap_or_else(|| "KVM was not probed".into())
        })
    }

    /// The hugetlb pool of `kib` KiB pages, if the kernel has one.
    #[must_use]
    pub fn hugetlb_pool(&self, kib: u64) -> Option<&HugetlbPool> {
        self.memory.hugetlb.iter().find(|p| p.kib == kib)
    }

    /// A stable key naming this host for golden files: arch, backend, MMU and kernel release.
    #[must_use]
    pub fn key(&self) -> String {
        let backend = self.kvm.as_ref().map_or("nokvm".to_string(), |k| {
            format!(
                "{}-{}",
                k.backend.kind.name(),
                k.backend.mmu.replace([' ', '(', ')'], "")
            )
        });
        format!("{}-{}", self.kernel.arch, backend)
    }

    /// The key of this host's golden matrix: [`key`](Self::key) `@` the kernel series
    /// ([`kernel_series`]: `x86_64-pvm-shadow@6.18`), since a verdict belongs to a host
    /// profile and a kernel. A release without a `major.minor` prefix gives `@unknown`.
    #[must_use]
    pub fn golden_key(&self) -> String {
        let series = kernel_series(&self.kernel.release).unwrap_or_else(|| "unknown".into());
        format!("{}@{series}", self.key())
    }
}

/// Where cgroup2 is mounted now (its hierarchy's root), if it is.
#[must_use]
pub fn cgroup2_mount() -> Option<String> {
    access::cgroup2_mount(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default())
}

fn read_trim(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// The bracketed choice of a sysfs "a [b] c" file.
fn selected(text: &str) -> String {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or(text)
        .to_string()
}

fn probe_kernel() -> KernelFacts {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            let k = k.trim();
            (k == "model name" || k == "CPU part" || k == "cpu model").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let memory_bytes = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024;
    KernelFacts {
        release: read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
        version: read_trim("/proc/sys/kernel/version").unwrap_or_default(),
        arch: std::env::consts::ARCH.to_string(),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        memory_bytes,
    }
}

fn read_module_params(module: &str) -> Option<BTreeMap<String, String>> {
    let dir = Path::new("/sys/module").join(module);
    if !dir.exists() {
        return None;
    }
    let mut params = BTreeMap::new();
    if let Ok(entries) = fs::read_dir(dir.join("parameters")) {
        for e in entries.flatten() {
            if let Some(v) = read_trim(e.path()) {
                params.insert(e.file_name().to_string_lossy().into_owned(), v);
            }
        }
    }
    Some(params)
}

fn yes(v: Option<&String>) -> Option<bool> {
    v.map(|v| matches!(v.as_str(), "Y" | "y" | "1"))
}

/// Decide the backend from loaded modules and CPU flags.
#[must_use]
pub fn probe_backend() -> Backend {
    let mut module_params = BTreeMap::new();
    for m in ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm", "kvm_arm"] {
        if let Some(p) = read_module_params(m) {
            module_params.insert(m.to_string(), p);
        }
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.split_once(':'))
                .map(|(_, f)| f)
        })
        .map(|f| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |m: &str| module_params.contains_key(m);
    let kvm = module_params.get("kvm");
    let (kind, detected_by, mmu) = if std::env::consts::ARCH == "aarch64" {
        (
            BackendKind::Arm64,
            "architecture is aarch64".to_string(),
            "stage2".to_string(),
        )
    } else if has("kvm_pvm") && !flags.contains(&"vmx") && !flags.contains(&"svm") {
        (
            BackendKind::Pvm,
            "kvm_pvm loaded and the CPU offers neither vmx nor svm".into(),
            "shadow".into(),
        )
    } else if has("kvm_intel") {
        let ept = yes(module_params.get("kvm_intel").and_then(|p| p.get("ept")));
        let mmu = if ept == Some(false) {
            "shadow"
        } else {
            "tdp (ept)"
        };
        (BackendKind::Vmx, "kvm_intel loaded".into(), mmu.into())
    } else if has("kvm_amd") {
        let npt = yes(module_params.get("kvm_amd").and_then(|p| p.get("npt")));
        let mmu = if npt == Some(false) {
            "shadow"
        } else {
            "tdp (npt)"
        };
        (BackendKind::Svm, "kvm_amd loaded".into(), mmu.into())
    } else if has("kvm_pvm") {
        (BackendKind::Pvm, "kvm_pvm loaded".into(), "shadow".into())
    } else {
        (
            BackendKind::Unknown,
            "no known KVM vendor module in /sys/module".into(),
            "unknown".into(),
        )
    };
    Backend {
        kind,
        detected_by,
        mmu,
        tdp_mmu: yes(kvm.and_then(|p| p.get("tdp_mmu"))),
        pml: yes(["kvm_intel", "kvm_amd"]
            .iter()
            .find_map(|m| module_params.get(*m).and_then(|p| p.get("pml")))),
        eager_page_split: yes(kvm.and_then(|p| p.get("eager_page_split"))),
        module_params,
    }
}

fn probe_kvm() -> Result<KvmFacts, KvmUnavailable> {
    let kvm = sys::open_kvm()?;
    let device = sys::kvm_device_path().display().to_string();
    let mut probe_errors = Vec::new();
    let mut caps = BTreeMap::new();
    let vm = sys::create_vm(&kvm).map_err(|e| KvmUnavailable::Other {
        path: sys::kvm_device_path(),
        error: format!("KVM_CREATE_VM: {}", sys::errno_text(e.errno())),
    })?;
    for (name, number) in CAPS {
        caps.insert(
            (*name).to_string(),
            i64::from(vm.check_extension_raw((*number).into())),
        );
    }
    let vm_stats = match sys::stats::StatsFd::open(&vm, "VM") {
        Ok(s) => s.names(),
        Err(e) => {
            probe_errors.push(e.to_string());
            Vec::new()
        }
    };
    let vcpu_stats = match vm.create_vcpu(0) {
        Ok(vcpu) => match sys::stats::StatsFd::open(&vcpu, "vCPU 0") {
            Ok(s) => s.names(),
            Err(e) => {
                probe_errors.push(e.to_string());
                Vec::new()
            }
        },
        Err(e) => {
            probe_errors.push(format!("KVM_CREATE_VCPU: {}", sys::errno_text(e.errno())));
            Vec::new()
        }
    };
    let guest_cpu = arch::guest_cpu_facts(&kvm).unwrap_or_else(|e| {
        probe_errors.push(e);
        arch::GuestCpuFacts::default()
    });
    Ok(KvmFacts {
        device,
        api_version: kvm.get_api_version(),
        backend: probe_backend(),
        caps,
        guest_cpu,
        vm_stats,
        vcpu_stats,
        probe_errors,
    })
}

fn probe_memory() -> MemoryFacts {
    let thp = Path::new("/sys/kernel/mm/transparent_hugepage");
    let mut hugetlb = Vec::new();
    if let Ok(entries) = fs::read_dir("/sys/kernel/mm/hugepages") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(kib) = name
                .strip_prefix("hugepages-")
                .and_then(|n| n.strip_suffix("kB"))
                .and_then(|n| n.parse().ok())
            else {
                continue;
            };
            let num = |f: &str| {
                read_trim(e.path().join(f))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            hugetlb.push(HugetlbPool {
                kib,
                nr: num("nr_hugepages"),
                free: num("free_hugepages"),
                reserved: num("resv_hugepages"),
                surplus: num("surplus_hugepages"),
            });
        }
    }
    hugetlb.sort_by_key(|p| p.kib);
    MemoryFacts {
        thp_enabled: read_trim(thp.join("enabled")).map(|t| selected(&t)),
        thp_defrag: read_trim(thp.join("defrag")).map(|t| selected(&t)),
        thp_shmem_enabled: read_trim(thp.join("shmem_enabled")).map(|t| selected(&t)),
        hugetlb,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_value_is_the_bracketed_one() {
        assert_eq!(selected("always [madvise] never"), "madvise");
        assert_eq!(selected("plain"), "plain");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn cap_numbers_match_the_kernel_header() {
        use kvm_bindings as kb;
        let expect = [
            (
                "MANUAL_DIRTY_LOG_PROTECT2",
                kb::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            ),
            ("DIRTY_LOG_RING", kb::KVM_CAP_DIRTY_LOG_RING),
            ("DIRTY_LOG_RING_ACQ_REL", kb::KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
            (
                "DIRTY_LOG_RING_WITH_BITMAP",
                kb::KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
            ),
            ("BINARY_STATS_FD", kb::KVM_CAP_BINARY_STATS_FD),
            ("IMMEDIATE_EXIT", kb::KVM_CAP_IMMEDIATE_EXIT),
            (
                "ARM_EAGER_SPLIT_CHUNK_SIZE",
                kb::KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE,
            ),
            ("USER_MEMORY2", kb::KVM_CAP_USER_MEMORY2),
            ("X86_DISABLE_EXITS", kb::KVM_CAP_X86_DISABLE_EXITS),
        ];
        for (name, number) in expect {
            assert_eq!(
                CAPS.iter().find(|(n, _)| *n == name).map(|c| c.1),
                Some(number),
                "{name}"
            );
        }
    }

    #[test]
    fn probe_never_panics_and_names_the_arch() {
        let profile = HostProfile::probe();
        assert_eq!(profile.kernel.arch, std::env::consts::ARCH);
        assert!(profile.kvm.is_some() != profile.kvm_unavailable.is_some());
        let json = serde_json::to_string(&profile).expect("serialises");
        let back: HostProfile = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back.key(), profile.key());
        assert!(
            profile
                .golden_key()
                .starts_with(&format!("{}@", profile.key()))
        );
    }
}
