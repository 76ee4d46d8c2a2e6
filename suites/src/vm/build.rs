//! Building a lane's initramfs: what goes in (see [`super::initramfs`]) and the command list
//! its `/init` runs.

use std::path::{Path, PathBuf};

use super::initramfs::{self, Initramfs};
use super::kernel::Kernel;
use super::modules;
use super::{Arch, VmConfig, VmError, io};

/// Modules for reclaim-file's disk in the lane: a RAM block device (`brd`) that `/init`
/// formats ext2 (busybox `mke2fs`) and mounts at `/var/tmp` with the ext4 driver. Its pages
/// are written back through the block layer as on any disk (`folio_mkclean` write-protects the
/// mappings, KVM zaps its own), only faster; tmpfs, the lane's other filesystem, has no
/// writeback and is refused by the `file` backing. Up to 6.x ext4 asks the crypto API for
/// crc32c at every mount, a soft dependency `.modinfo` names only as an alias; from 7.x it is
/// a library function and `crc32c_generic` is gone.
const DISK_MODULES: &[&str] = &["brd", "crc32c_generic", "ext4"];
/// One 256 MiB RAM disk (`rd_size` is in KiB; its pages are allocated as written).
const BRD_PARAMS: &str = " rd_nr=1 rd_size=262144";
/// The same for a kernel with brd built in (parameters from the command line; a modular brd
/// ignores them there and takes [`BRD_PARAMS`] from `insmod`).
pub const BRD_CMDLINE: [&str; 2] = ["brd.rd_nr=1", "brd.rd_size=262144"];

/// Build the initramfs; returns its path.
pub fn build_initramfs(
    config: &VmConfig,
    kernel: &Kernel,
    binary: &Path,
    busybox: &Path,
    progress: &dyn Fn(&str),
) -> Result<PathBuf, VmError> {
    let mut fs = Initramfs::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        // reclaim-file's backing directory: init mounts an ext2 RAM disk there (see
        // DISK_MODULES); without one it stays on the initramfs and those trials skip.
        "var/tmp",
        "run",
        "lane/out",
        "lane/modules",
    ] {
        fs.dir(d);
    }
    fs.file(
        "/bin/busybox",
        std::fs::read(busybox).map_err(|e| io(busybox, e))?,
        true,
    );
    let needs = initramfs::add_binary(&mut fs, binary, config.arch, &config.sysroot)?;
    // Modules: KVM's, dependencies first, refused if built for another kernel.
    let mut list = String::new();
    if let Some(dir) = &kernel.modules {
        let index = modules::index(dir)?;
        let wanted: Vec<&str> = config
            .arch
            .kvm_modules()
            .iter()
            .copied()
            .filter(|m| index.contains_key(*m))
            .collect();
        if wanted.is_empty() {
            progress("modules: no KVM module among them: KVM must be built in");
        }
        let mut order = modules::load_order(&index, &wanted, kernel.release.as_deref())?;
        // The disk reclaim-file's backing needs, where modular (built in, or absent or not
        // loadable: then /var/tmp stays on the initramfs and those trials skip naming it).
        let disk: Vec<&str> = DISK_MODULES
            .iter()
            .copied()
            .filter(|m| index.contains_key(*m))
            .collect();
        match modules::load_order(&index, &disk, kernel.release.as_deref()) {
            Ok(extra) => {
                for m in extra {
                    if !order.iter().any(|o| o.info.name == m.info.name) {
                        order.push(m);
                    }
                }
            }
            Err(e) => progress(&format!("modules: reclaim-file's disk left out: {e}")),
        }
        for m in &order {
            let file = format!("{}.ko", m.info.name);
            fs.file(&format!("/lane/modules/{file}"), m.object.clone(), false);
            let params = match m.info.name.as_str() {
                "kvm" if config.arch == Arch::X86_64 => " force_emulation_prefix=1",
                "brd" => BRD_PARAMS,
                _ => "",
            };
            list.push_str(&format!("{file}{params}\n"));
        }
        progress(&format!(
            "modules: {}",
            if order.is_empty() {
                "none".to_string()
            } else {
                order
                    .iter()
                    .map(|m| m.info.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" -> ")
            }
        ));
    }
    fs.file("/lane/modules.list", list.into_bytes(), false);
    if config.golden.is_dir() {
        fs.tree(&config.golden, "/lane/golden/matrix")?;
    } else {
        fs.dir("/lane/golden/matrix");
    }
    let regressions = config.golden.join("../proptest-regressions");
    if regressions.is_dir() {
        fs.tree(&regressions, "/lane/golden/proptest-regressions")?;
    }
    for (host, inside) in &config.files {
        fs.file(inside, std::fs::read(host).map_err(|e| io(host, e))?, false);
    }
    fs.file("/lane/commands", commands(config).into_bytes(), false);
    let ld_path = if needs.interpreter.is_some() {
        format!("/lib/{}", config.arch.multiarch())
    } else {
        String::new()
    };
    fs.file(
        "/lane/settings",
        format!(
            "BLESS={}\nLD_LIBRARY_PATH={ld_path}\n",
            if config.bless { "1" } else { "" }
        )
        .into_bytes(),
        false,
    );
    fs.file("/init", include_bytes!("init.sh").to_vec(), true);
    let (entries, bytes) = fs.size();
    let dir = config.cache.join("initramfs");
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let path = dir.join(format!(
        "{}-{}.cpio",
        config.arch.name(),
        std::process::id()
    ));
    let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
    fs.write(std::io::BufWriter::new(file))
        .map_err(|e| io(&path, e))?;
    progress(&format!(
        "build: initramfs {} ({entries} entries, {:.1} MiB; trackcheck {}{})",
        path.display(),
        bytes as f64 / f64::from(1u32 << 20),
        if needs.interpreter.is_some() {
            "dynamic, with "
        } else {
            "static"
        },
        if needs.interpreter.is_some() {
            needs
                .libraries
                .iter()
                .map(|(l, _)| l.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            String::new()
        }
    ));
    Ok(path)
}

/// Quote one argument for the init's shell.
fn quote(a: &str) -> String {
    format!("'{}'", a.replace('\'', "'\\''"))
}

/// The init's command list.
fn commands(config: &VmConfig) -> String {
    if config.commands.is_empty() {
        let bless = if config.bless { " --bless" } else { "" };
        return format!(
            "trackcheck env --json > /lane/out/env.json\n\
             run env trackcheck env\n\
             run matrix trackcheck run --no-models --golden /lane/golden/matrix --out /lane/out/matrix --format text{bless}\n\
             run selftest trackcheck run --selftest --golden /lane/golden/matrix --out /lane/out/selftest --format text\n"
        );
    }
    let mut s = String::from("trackcheck env --json > /lane/out/env.json\n");
    for (i, c) in config.commands.iter().enumerate() {
        let name = format!("command{}", i + 1);
        s.push_str(&format!("run {name} trackcheck"));
        let mut c = c.clone();
        if c.first().is_some_and(|a| a == "run") {
            // Reports of a run come back under its name; --bless records a matrix run.
            if !c.iter().any(|a| a == "--out" || a.starts_with("--out=")) {
                c.extend(["--out".to_string(), format!("/lane/out/{name}")]);
            }
            if config.bless && !c.iter().any(|a| a == "--selftest" || a == "--bless") {
                c.push("--bless".into());
            }
            // The model trials are the same on every host: the host that boots the lane runs
            // them, unless the command names them.
            if !c.iter().any(|a| a.contains("model::")) && !c.iter().any(|a| a == "--no-models") {
                c.push("--no-models".into());
            }
        }
        for a in &c {
            s.push(' ');
            s.push_str(&quote(a));
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_commands_are_quoted() {
        let config = VmConfig {
            arch: Arch::X86_64,
            kernel: "debian:7.2".parse().expect("spec"),
            modules: None,
            binary: None,
            sysroot: "/".into(),
            cache: "/tmp".into(),
            out: "/tmp".into(),
            golden: "/tmp".into(),
            bless: false,
            smp: 2,
            mem_mib: 4096,
            hugepages_1g: 0,
            append: Vec::new(),
            timeout_s: 10,
            boot_timeout_s: 10,
            commands: vec![vec!["run".into(), "it's".into()]],
            files: Vec::new(),
        };
        let text = commands(&config);
        assert!(
            text.contains("run command1 trackcheck 'run' 'it'\\''s' '--out' '/lane/out/command1'"),
            "{text}"
        );
    }
}
