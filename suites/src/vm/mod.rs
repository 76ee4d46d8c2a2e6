//! `trackcheck vm`: run the suite inside another kernel, booted under QEMU as an emulated host
//! whose `/dev/kvm` works (a *lane*): Debian 6.1, 6.12 or 7.2 (downloaded into a cache, never
//! installed) or a kernel image of your own, on x86_64 (AMD SVM with NPT, i.e. KVM's TDP MMU)
//! or arm64 (virtualization=on, stage-2).
//!
//! Steps, each timed: **download** (kernel package, busybox), **build** (the initramfs:
//! busybox, the trackcheck binary and what its ELF needs, KVM's modules in load order, the
//! golden files, `/init`), **boot** (kernel start to `/init`), **run** (the trackcheck commands
//! inside). The reports come back over the serial console and land in `--out`; the exit status
//! is that of the commands inside (0 only if all passed), 2 for bad input.

mod build;
pub mod cli;
pub mod death;
pub mod initramfs;
pub mod kernel;
pub mod modules;
mod qemu;

use std::path::{Path, PathBuf};

pub use kernel::KernelSpec;
pub use qemu::Outcome;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// A program the lane needs is not installed.
    #[error("{what} not found: {hint}")]
    Missing {
        /// The program.
        what: String,
        /// What to install.
        hint: String,
    },
    /// Reading or writing a file, or starting a program.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A kernel package could not be had.
    #[error("download: {0}")]
    Download(String),
    /// A module file is unusable.
    #[error("module {path}: {why}")]
    Module {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A module KVM needs is not there.
    #[error("module {name}: {why}")]
    ModuleMissing {
        /// The module.
        name: String,
        /// Why.
        why: String,
    },
    /// The trackcheck binary cannot run in the lane.
    #[error("binary {path}: {why}")]
    Binary {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The kernel did not reach `/init`.
    #[error("the kernel did not boot: {why}; the console's last lines:\n{tail}")]
    NoBoot {
        /// Why we think so.
        why: String,
        /// The console's last lines.
        tail: String,
    },
    /// The kernel booted but offers no KVM.
    #[error("the kernel booted but has no /dev/kvm: {why}")]
    NoKvm {
        /// Modules loaded and the kernel log's last lines.
        why: String,
    },
    /// The commands inside did not finish in time, or the reports did not come back.
    #[error("{0}")]
    Lane(String),
}

impl VmError {
    /// Exit status: 2 for bad input, 1 otherwise.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Binary { .. } | Self::Module { .. } => 2,
            _ => 1,
        }
    }
}

/// An I/O error on `path`.
fn io(path: &Path, e: std::io::Error) -> VmError {
    VmError::Io {
        what: path.display().to_string(),
        source: e,
    }
}

/// A lane's architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64 host with AMD SVM + NPT (KVM's TDP MMU).
    #[value(name = "x86_64")]
    X86_64,
    /// arm64 host with EL2 (stage-2 page tables).
    #[value(name = "aarch64", alias = "arm64")]
    Aarch64,
}

impl Arch {
    /// The architecture this binary was built for.
    #[must_use]
    pub const fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else {
            Self::X86_64
        }
    }

    /// As trial names spell it.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }

    /// Debian's architecture name.
    #[must_use]
    pub const fn debian_arch(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The multiarch library directory name.
    #[must_use]
    pub const fn multiarch(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu",
            Self::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// ELF `e_machine`.
    #[must_use]
    pub const fn elf_machine(self) -> u16 {
        match self {
            Self::X86_64 => goblin::elf::header::EM_X86_64,
            Self::Aarch64 => goblin::elf::header::EM_AARCH64,
        }
    }

    /// How to get a trackcheck binary for this architecture.
    #[must_use]
    pub const fn binary_hint(self) -> &'static str {
        match self {
            Self::X86_64 => "build trackcheck for x86_64 and pass it with --binary",
            Self::Aarch64 => {
                "cross-build it (ci/lane.sh aarch64 ... does it: cargo build --release --target aarch64-unknown-linux-gnu, static) and pass it with --binary"
            }
        }
    }

    /// Modules whose loading gives `/dev/kvm`, when KVM is modular.
    #[must_use]
    pub const fn kvm_modules(self) -> &'static [&'static str] {
        match self {
            // The lane's CPU is AMD (SVM): see qemu.rs.
            Self::X86_64 => &["kvm_amd"],
            Self::Aarch64 => &["kvm"],
        }
    }
}

/// Everything `trackcheck vm` was asked.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The lane's architecture.
    pub arch: Arch,
    /// The kernel.
    pub kernel: KernelSpec,
    /// Modules of a kernel given as a path.
    pub modules: Option<PathBuf>,
    /// The trackcheck binary for the lane (default: this one, where the architecture matches).
    pub binary: Option<PathBuf>,
    /// Where the target's shared libraries live on this host (`/` for the host's own).
    pub sysroot: PathBuf,
    /// Downloads.
    pub cache: PathBuf,
    /// Reports.
    pub out: PathBuf,
    /// Golden matrices to judge by (copied in) and, with `bless`, to write back.
    pub golden: PathBuf,
    /// Write the lane's golden matrix back.
    pub bless: bool,
    /// vCPUs and memory of the emulated host.
    pub smp: u32,
    /// MiB.
    pub mem_mib: u32,
    /// 1 GiB huge pages reserved at boot (so hugetlb-1g trials can run).
    pub hugepages_1g: u32,
    /// Extra kernel command line.
    pub append: Vec<String>,
    /// Seconds the whole boot and run may take.
    pub timeout_s: u64,
    /// Seconds the kernel has to reach `/init`.
    pub boot_timeout_s: u64,
    /// `trackcheck` commands to run inside (each a list of arguments); empty = env, the
    /// matrix, then the self-test.
    pub commands: Vec<Vec<String>>,
    /// Host files put into the initramfs (host path, path inside), e.g. a replay file.
    pub files: Vec<(PathBuf, String)>,
}

/// The default cache: `$TRACKCHECK_CACHE`, else `/var/cache/trackcheck` for root, else
/// `$XDG_CACHE_HOME/trackcheck` or `~/.cache/trackcheck`.
#[must_use]
pub fn default_cache() -> PathBuf {
    if let Some(d) = std::env::var_os("TRACKCHECK_CACHE") {
        return PathBuf::from(d);
    }
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    if root {
        return PathBuf::from("/var/cache/trackcheck");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("trackcheck")
}

/// Run a lane: download, build, boot, run, bring the reports back.
pub fn run(config: &VmConfig, progress: &dyn Fn(&str)) -> Result<Outcome, VmError> {
    let mut times = qemu::Times::default();
    let qemu = qemu::Qemu::find(config.arch)?;
    // QEMU's guest RAM is this host's memory: refuse what it cannot give before booting.
    if let Some(avail) = mem_available_mib()
        && u64::from(config.mem_mib) > avail
    {
        return Err(VmError::Usage(format!(
            "--mem {} MiB is more than this host has available ({avail} MiB, MemAvailable): give less --mem (or fewer --hugepages-1g)",
            config.mem_mib
        )));
    }
    let binary = match &config.binary {
        Some(b) => b.clone(),
        None if config.arch == Arch::host() => {
            std::env::current_exe().map_err(|e| VmError::Io {
                what: "finding this program's binary".into(),
                source: e,
            })?
        }
        None => {
            return Err(VmError::Usage(format!(
                "--arch {} needs a trackcheck binary built for it: {}",
                config.arch.name(),
                config.arch.binary_hint()
            )));
        }
    };
    // Check the binary before downloading anything.
    initramfs::elf_needs(&binary, config.arch, &config.sysroot)?;
    let kernel = match &config.kernel {
        KernelSpec::Debian { series, flavour } => {
            if config.modules.is_some() {
                return Err(VmError::Usage(
                    "--modules goes with a kernel given as a path; a Debian kernel brings its own"
                        .into(),
                ));
            }
            kernel::debian(
                &config.cache,
                config.arch,
                series,
                flavour.as_deref(),
                progress,
            )?
        }
        KernelSpec::Path(p) => kernel::from_path(p, config.modules.as_deref())?,
    };
    let busybox = kernel::busybox(&config.cache, config.arch, progress)?;
    times.lap("download");
    progress(&format!(
        "kernel: {} (release {})",
        kernel.label,
        kernel.release.as_deref().unwrap_or("unknown")
    ));
    let initrd = build::build_initramfs(config, &kernel, &binary, &busybox, progress)?;
    times.lap("build");
    let outcome = qemu.boot(config, &kernel, &initrd, &mut times, progress);
    let _ = std::fs::remove_file(&initrd);
    outcome
}

/// `MemAvailable` of this host, MiB.
fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
