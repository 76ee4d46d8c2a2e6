//! `trackcheck vm`'s command line.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{Arch, KernelSpec, VmConfig, VmError};

/// Run trackcheck inside another kernel booted under QEMU (a lane).
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:
  trackcheck vm --arch x86_64 --kernel debian:7.2
  trackcheck vm --arch x86_64 --kernel ~/linux/arch/x86/boot/bzImage --modules /tmp/mods/lib/modules/7.3.0-rc1
  trackcheck vm --arch aarch64 --kernel debian:6.12 --binary target/aarch64-unknown-linux-gnu/release/trackcheck
  trackcheck vm --kernel debian:6.1 -- run dirty-ring --selftest")]
pub struct VmArgs {
    /// The emulated host: x86_64 (AMD SVM + NPT: KVM's TDP MMU) or aarch64 (stage-2).
    #[arg(long, value_enum, default_value_t = Arch::host())]
    arch: Arch,
    /// debian:SERIES[/FLAVOUR] (6.1, 6.12, 7.2; downloaded into the cache, never installed),
    /// or the path of a kernel image (bzImage, arm64 Image or vmlinuz).
    #[arg(long, value_name = "KERNEL")]
    kernel: KernelSpec,
    /// Modules of a kernel given as a path: its lib/modules/<release> (or any directory of
    /// .ko files); KVM's are loaded in dependency order. Not needed where KVM is built in.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// The trackcheck binary to run inside (default: this one, where --arch is this host's).
    #[arg(long, value_name = "FILE")]
    binary: Option<PathBuf>,
    /// Where the binary's shared libraries live on this host (for a dynamically linked
    /// cross-built binary, e.g. /usr/aarch64-linux-gnu).
    #[arg(long, value_name = "DIR", default_value = "/")]
    sysroot: PathBuf,
    /// Downloads [default: $TRACKCHECK_CACHE, /var/cache/trackcheck as root, else
    /// ~/.cache/trackcheck].
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Where the reports land [default: trackcheck-out/vm-<arch>-<kernel>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Golden matrices to judge by [default: as `run`].
    #[arg(long, value_name = "DIR")]
    golden: Option<PathBuf>,
    /// Write the lane's golden matrix back into the golden directory (review it!).
    #[arg(long)]
    bless: bool,
    /// vCPUs of the emulated host.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    smp: u32,
    /// Memory of the emulated host in MiB [default: 4096 + 1024 per reserved 1 GiB page].
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(512..=65_536))]
    mem: Option<u32>,
    /// 1 GiB huge pages reserved at boot, so the hugetlb-1g trials run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=16))]
    hugepages_1g: u32,
    /// Extra kernel command line (repeatable).
    #[arg(long, value_name = "ARG")]
    append: Vec<String>,
    /// Seconds the boot and the commands may take in all.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    /// Seconds the kernel has to reach /init.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// A trackcheck command to run inside instead of env + matrix + self-test, e.g.
    /// `-- run dirty-ring --selftest` (one command; `;` separates several).
    #[arg(last = true, value_name = "TRACKCHECK ARGS")]
    command: Vec<String>,
    /// Replay a failure a lane recorded (a replay file under the lane's --out, e.g.
    /// trackcheck-out/lanes/x86_64-7.2/matrix/replay/NAME.json) inside this kernel.
    #[arg(long, value_name = "FILE", conflicts_with = "command")]
    replay: Option<PathBuf>,
}

/// `trackcheck vm`.
#[must_use]
pub fn main(args: VmArgs, golden_default: PathBuf) -> ExitCode {
    let label = match &args.kernel {
        KernelSpec::Debian { series, flavour } => format!(
            "debian-{series}{}",
            flavour
                .as_ref()
                .map(|f| format!("-{f}"))
                .unwrap_or_default()
        ),
        KernelSpec::Path(p) => p
            .file_name()
            .map_or_else(|| "kernel".into(), |n| n.to_string_lossy().to_string()),
    };
    let mut files = Vec::new();
    let mut commands: Vec<Vec<String>> = args
        .command
        .split(|a| a == ";")
        .filter(|c| !c.is_empty())
        .map(<[String]>::to_vec)
        .collect();
    if let Some(file) = &args.replay {
        let name = file
            .file_name()
            .map_or_else(|| "replay.json".into(), |n| n.to_string_lossy().to_string());
        // Its reports land beside it: /lane/out/replay/.. is /lane/out.
        let inside = format!("/lane/out/replay/{name}");
        files.push((file.clone(), inside.clone()));
        commands.push(vec!["replay".into(), inside]);
    }
    let config = VmConfig {
        arch: args.arch,
        kernel: args.kernel,
        modules: args.modules,
        binary: args.binary,
        sysroot: args.sysroot,
        cache: args.cache.unwrap_or_else(super::default_cache),
        out: args.out.unwrap_or_else(|| {
            PathBuf::from(format!("trackcheck-out/vm-{}-{label}", args.arch.name()))
        }),
        golden: args.golden.unwrap_or(golden_default),
        bless: args.bless,
        smp: args.smp,
        mem_mib: args.mem.unwrap_or(4096 + 1024 * args.hugepages_1g),
        hugepages_1g: args.hugepages_1g,
        append: args.append,
        timeout_s: args.timeout,
        boot_timeout_s: args.boot_timeout,
        commands,
        files,
    };
    if config.hugepages_1g * 1024 + 512 > config.mem_mib {
        return fail(&VmError::Usage(format!(
            "--mem {} MiB cannot hold {} reserved 1 GiB pages and a kernel: give more --mem or fewer --hugepages-1g",
            config.mem_mib, config.hugepages_1g
        )));
    }
    let progress = |line: &str| eprintln!("trackcheck vm: {line}");
    match super::run(&config, &progress) {
        Ok(outcome) => {
            let times = outcome.times.text();
            let _ = std::fs::write(outcome.out.join("lane-times.txt"), &times);
            eprintln!("trackcheck vm: reports in {}", outcome.out.display());
            for (name, rc) in &outcome.commands {
                eprintln!("trackcheck vm: {name}: exit {rc}");
            }
            eprint!(
                "{}",
                times
                    .lines()
                    .map(|l| format!("trackcheck vm: time {l}\n"))
                    .collect::<String>()
            );
            ExitCode::from(outcome.exit_code())
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &VmError) -> ExitCode {
    eprintln!("trackcheck vm: {e}");
    ExitCode::from(e.exit_code())
}
