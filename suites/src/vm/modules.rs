//! Kernel modules for a lane: which `.ko` files KVM needs, in the order `insmod` must load
//! them, refusing a module built for another kernel.
//!
//! A lane's init has no `modprobe` and no `modules.dep` (Debian's 7.x `linux-modules-*` package
//! ships none, and a user's build directory may not either), so the order comes from each
//! module's own `.modinfo` section, read with goblin: `name=`, `depends=` and `vermagic=`.
//! Modules may be compressed (`.ko.xz` as Debian ships them, `.ko.zst`, `.ko.gz`); they are
//! decompressed here, because busybox `insmod` hands the file to `init_module` as it is.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::VmError;

/// What a module's `.modinfo` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=`: the module's name (underscores).
    pub name: String,
    /// `depends=`: modules that must be loaded first.
    pub depends: Vec<String>,
    /// `vermagic=`: the kernel release (first word) and build options it was built for.
    pub vermagic: String,
}

impl ModInfo {
    /// The kernel release the module was built for (the first word of `vermagic`).
    #[must_use]
    pub fn release(&self) -> &str {
        self.vermagic.split_whitespace().next().unwrap_or("")
    }
}

/// One module, decompressed.
#[derive(Clone, Debug)]
pub struct Module {
    /// Where it was found.
    pub path: PathBuf,
    /// Its `.modinfo`.
    pub info: ModInfo,
    /// The ELF object `insmod` loads.
    pub object: Vec<u8>,
}

/// `kvm-amd` and `kvm_amd` are the same module.
#[must_use]
pub fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name a file would have: `kvm-amd.ko.xz` -> `kvm_amd`.
fn file_module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(normalise(stem))
}

/// Decompress a module file by its suffix.
pub fn decompress(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, VmError> {
    let bad = |e: String| VmError::Module {
        path: path.to_path_buf(),
        why: format!("cannot decompress: {e}"),
    };
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &bytes[..], &mut out).map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else if name.ends_with(".zst") {
        let mut out = Vec::new();
        ruzstd::decoding::StreamingDecoder::new(bytes)
            .map_err(|e| bad(e.to_string()))?
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else if name.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| bad(e.to_string()))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Read the `.modinfo` section of a (decompressed) module with goblin.
pub fn modinfo(path: &Path, object: &[u8]) -> Result<ModInfo, VmError> {
    let bad = |why: String| VmError::Module {
        path: path.to_path_buf(),
        why,
    };
    let elf = goblin::elf::Elf::parse(object)
        .map_err(|e| bad(format!("not a kernel module (ELF): {e}")))?;
    let section = elf
        .section_headers
        .iter()
        .find(|s| elf.shdr_strtab.get_at(s.sh_name) == Some(".modinfo"))
        .ok_or_else(|| bad("no .modinfo section: not a kernel module".into()))?;
    let range = section
        .file_range()
        .ok_or_else(|| bad(".modinfo has no contents".into()))?;
    let data = object
        .get(range)
        .ok_or_else(|| bad(".modinfo lies outside the file (truncated?)".into()))?;
    let mut fields: BTreeMap<&str, String> = BTreeMap::new();
    for entry in data.split(|&b| b == 0) {
        let Ok(text) = std::str::from_utf8(entry) else {
            continue;
        };
        if let Some((k, v)) = text.split_once('=') {
            fields.entry(k).or_insert_with(|| v.to_string());
        }
    }
    let name = fields
        .get("name")
        .cloned()
        .or_else(|| file_module_name(path))
        .ok_or_else(|| bad(".modinfo has no name=".into()))?;
    let vermagic = fields.get("vermagic").cloned().ok_or_else(|| {
        bad(".modinfo has no vermagic=: cannot tell which kernel it is for".into())
    })?;
    let depends = fields
        .get("depends")
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(normalise)
                .collect()
        })
        .unwrap_or_default();
    Ok(ModInfo {
        name: normalise(&name),
        depends,
        vermagic,
    })
}

/// The module files under `dir` (recursively), by module name.
pub fn index(dir: &Path) -> Result<BTreeMap<String, PathBuf>, VmError> {
    let mut found = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|e| VmError::Io {
            what: format!("reading the modules directory {}", d.display()),
            source: e,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = file_module_name(&path) {
                found.entry(name).or_insert(path);
            }
        }
    }
    Ok(found)
}

/// `wanted` and everything it depends on, dependencies first, each checked against
/// `release` (the booted kernel's, when known).
pub fn load_order(
    index: &BTreeMap<String, PathBuf>,
    wanted: &[&str],
    release: Option<&str>,
) -> Result<Vec<Module>, VmError> {
    let mut order: Vec<Module> = Vec::new();
    for w in wanted {
        visit(index, &normalise(w), release, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

fn visit(
    index: &BTreeMap<String, PathBuf>,
    name: &str,
    release: Option<&str>,
    order: &mut Vec<Module>,
    path: &mut Vec<String>,
) -> Result<(), VmError> {
    if order.iter().any(|m| m.info.name == name) {
        return Ok(());
    }
    if path.iter().any(|p| p == name) {
        return Err(VmError::ModuleMissing {
            name: name.into(),
            why: format!(
                "modules depend on each other in a cycle: {}",
                path.join(" -> ")
            ),
        });
    }
    let file = index.get(name).ok_or_else(|| VmError::ModuleMissing {
        name: name.into(),
        why: if path.is_empty() {
            "not among the modules given".into()
        } else {
            format!(
                "needed by {} but not among the modules given",
                path.join(" <- ")
            )
        },
    })?;
    let bytes = std::fs::read(file).map_err(|e| VmError::Io {
        what: format!("reading {}", file.display()),
        source: e,
    })?;
    let object = decompress(file, &bytes)?;
    let info = modinfo(file, &object)?;
    if let Some(release) = release
        && info.release() != release
    {
        return Err(VmError::Module {
            path: file.clone(),
            why: format!(
                "built for kernel {} (vermagic \"{}\"), but the kernel is {release}: give the modules of that build",
                info.release(),
                info.vermagic.trim()
            ),
        });
    }
    path.push(name.to_string());
    for dep in &info.depends {
        visit(index, dep, release, order, path)?;
    }
    path.pop();
    order.push(Module {
        path: file.clone(),
        info,
        object,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal relocatable ELF with a `.modinfo` section, as the kernel's modpost writes it.
    pub(crate) fn fake_module(fields: &[&str]) -> Vec<u8> {
        let mut modinfo: Vec<u8> = Vec::new();
        for f in fields {
            modinfo.extend_from_slice(f.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let ehsize = 64usize;
        let modinfo_off = ehsize;
        let shstr_off = modinfo_off + modinfo.len();
        let sh_off = (shstr_off + shstrtab.len()).next_multiple_of(8);
        let mut f = vec![0u8; sh_off];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1; // version
        f[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[40..48].copy_from_slice(&(sh_off as u64).to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[58..60].copy_from_slice(&64u16.to_le_bytes()); // shentsize
        f[60..62].copy_from_slice(&3u16.to_le_bytes()); // shnum
        f[62..64].copy_from_slice(&2u16.to_le_bytes()); // shstrndx
        f[modinfo_off..shstr_off].copy_from_slice(&modinfo);
        f[shstr_off..shstr_off + shstrtab.len()].copy_from_slice(shstrtab);
        let section = |name: u32, ty: u32, off: usize, size: usize| {
            let mut s = vec![0u8; 64];
            s[0..4].copy_from_slice(&name.to_le_bytes());
            s[4..8].copy_from_slice(&ty.to_le_bytes());
            s[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            s[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            s[48..56].copy_from_slice(&1u64.to_le_bytes());
            s
        };
        f.extend(vec![0u8; 64]);
        f.extend(section(1, 1, modinfo_off, modinfo.len()));
        f.extend(section(10, 3, shstr_off, shstrtab.len()));
        f
    }

    fn tree(modules: &[(&str, &[&str])]) -> (tempdir::Dir, BTreeMap<String, PathBuf>) {
        let dir = tempdir::Dir::new();
        for (file, fields) in modules {
            let path = dir.0.join(file);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, fake_module(fields)).expect("write");
        }
        let idx = index(&dir.0).expect("index");
        (dir, idx)
    }

    mod tempdir {
        /// A directory removed on drop.
        #[derive(Debug)]
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("trackcheck-modules-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).expect("mkdir");
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const V: &str = "vermagic=7.2.13+deb14-amd64 SMP preempt mod_unload ";

    #[test]
    fn dependencies_load_first_and_once() {
        let (_d, idx) = tree(&[
            (
                "arch/x86/kvm/kvm-amd.ko",
                &["name=kvm_amd", "depends=kvm,ccp", V],
            ),
            ("arch/x86/kvm/kvm.ko", &["depends=irqbypass", "name=kvm", V]),
            ("virt/lib/irqbypass.ko", &["depends=", "name=irqbypass", V]),
            ("drivers/crypto/ccp/ccp.ko", &["name=ccp", "depends=", V]),
        ]);
        let order = load_order(&idx, &["kvm-amd"], Some("7.2.13+deb14-amd64")).expect("order");
        let names: Vec<&str> = order.iter().map(|m| m.info.name.as_str()).collect();
        assert_eq!(names, ["irqbypass", "kvm", "ccp", "kvm_amd"]);
        assert_eq!(order[3].info.release(), "7.2.13+deb14-amd64");
    }

    #[test]
    fn a_module_for_another_kernel_is_refused_by_name() {
        let (_d, idx) = tree(&[(
            "kvm.ko",
            &[
                "name=kvm",
                "depends=",
                "vermagic=6.12.118+deb12-amd64 SMP mod_unload ",
            ],
        )]);
        let e = load_order(&idx, &["kvm"], Some("7.2.13+deb14-amd64"))
            .expect_err("vermagic differs")
            .to_string();
        assert!(
            e.contains("kvm.ko") && e.contains("6.12.118+deb12-amd64"),
            "{e}"
        );
        assert!(e.contains("7.2.13+deb14-amd64"), "{e}");
    }

    #[test]
    fn a_missing_dependency_is_named_with_who_needs_it() {
        let (_d, idx) = tree(&[("kvm.ko", &["name=kvm", "depends=irqbypass", V])]);
        let e = load_order(&idx, &["kvm"], None)
            .expect_err("missing")
            .to_string();
        assert!(
            e.contains("irqbypass") && e.contains("needed by kvm"),
            "{e}"
        );
    }

    #[test]
    fn compressed_modules_are_read() {
        let dir = tempdir::Dir::new();
        let plain = fake_module(&["name=kvm", "depends=", V]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).expect("gzip");
        std::fs::write(dir.0.join("kvm.ko.gz"), gz.finish().expect("gzip")).expect("write");
        let mut xz = Vec::new();
        let irq = fake_module(&["name=irqbypass", "depends=", V]);
        lzma_rs::xz_compress(&mut &irq[..], &mut xz).expect("xz");
        std::fs::write(dir.0.join("irqbypass.ko.xz"), xz).expect("write");
        let idx = index(&dir.0).expect("index");
        let order = load_order(&idx, &["kvm", "irqbypass"], None).expect("gz and xz");
        assert_eq!(order[0].object, plain);
        assert_eq!(order[1].object, irq);
    }

    #[test]
    fn not_a_module_is_said() {
        let dir = tempdir::Dir::new();
        std::fs::write(dir.0.join("kvm.ko"), b"hello").expect("write");
        let idx = index(&dir.0).expect("index");
        let e = load_order(&idx, &["kvm"], None)
            .expect_err("bad")
            .to_string();
        assert!(e.contains("not a kernel module"), "{e}");
    }
}
