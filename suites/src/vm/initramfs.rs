//! The lane's initramfs: busybox, the trackcheck binary and the shared libraries its ELF asks
//! for, KVM's modules in load order, the golden files, and `/init`.
//!
//! What goes in is decided by reading the trackcheck binary with goblin: its machine must be
//! the lane's architecture, and a dynamically linked binary brings its interpreter
//! (`PT_INTERP`) and every `DT_NEEDED` library, found the way the dynamic linker would (its
//! `RUNPATH`, then the multiarch and standard directories), recursively. A static binary
//! brings nothing else.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{Arch, VmError};

/// Files of the initramfs, by path inside it.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

impl Initramfs {
    /// Add a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let mut at = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            at = if at.is_empty() {
                part.to_string()
            } else {
                format!("{at}/{part}")
            };
            self.entries.entry(at.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent(&mut self, path: &str) -> String {
        let path = path.trim_start_matches('/').to_string();
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        path
    }

    /// Add a file with its contents (mode 0755 when `exec`).
    pub fn file(&mut self, path: &str, data: Vec<u8>, exec: bool) {
        let path = self.parent(path);
        let mode = if exec { 0o755 } else { 0o644 };
        self.entries.insert(path, Entry::File { data, mode });
    }

    /// Add a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = self.parent(path);
        self.entries.insert(path, Entry::Symlink(target.into()));
    }

    /// Copy a directory tree from the host (regular files and directories).
    pub fn tree(&mut self, host: &Path, path: &str) -> Result<(), VmError> {
        self.dir(path);
        let entries = std::fs::read_dir(host).map_err(|e| VmError::Io {
            what: format!("reading {}", host.display()),
            source: e,
        })?;
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let inside = format!("{}/{name}", path.trim_end_matches('/'));
            if p.is_dir() {
                self.tree(&p, &inside)?;
            } else if p.is_file() {
                self.file(&inside, read(&p)?, false);
            }
        }
        Ok(())
    }

    /// Number of entries and bytes of file contents.
    #[must_use]
    pub fn size(&self) -> (usize, usize) {
        let bytes = self
            .entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum();
        (self.entries.len(), bytes)
    }

    /// Write it as an uncompressed newc cpio archive (the kernel unpacks it as the rootfs).
    pub fn write(&self, out: impl Write) -> std::io::Result<()> {
        let mut w = out;
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let builder = cpio::newc::Builder::new(path).ino(ino).nlink(1);
            let (builder, data): (_, &[u8]) = match entry {
                Entry::Dir => (builder.mode(0o040_755).nlink(2), &[]),
                Entry::File { data, mode } => (builder.mode(0o100_000 | mode), data),
                Entry::Symlink(t) => (builder.mode(0o120_777), t.as_bytes()),
            };
            let size = u32::try_from(data.len()).map_err(|_| {
                std::io::Error::other(format!("{path} is larger than a cpio entry can hold"))
            })?;
            let mut writer = builder.write(w, size);
            writer.write_all(data)?;
            w = writer.finish()?;
        }
        cpio::newc::trailer(w)?;
        Ok(())
    }
}

fn read(path: &Path) -> Result<Vec<u8>, VmError> {
    std::fs::read(path).map_err(|e| VmError::Io {
        what: format!("reading {}", path.display()),
        source: e,
    })
}

/// What an ELF executable needs in the initramfs besides itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ElfNeeds {
    /// The dynamic linker, if any (`PT_INTERP`).
    pub interpreter: Option<String>,
    /// Libraries (`DT_NEEDED`), with where they were found on this host.
    pub libraries: Vec<(String, PathBuf)>,
}

/// Check that `binary` is an executable for `arch` and find what it needs; `root` is where the
/// target's libraries live on this host (`/` for the host's own architecture, e.g.
/// `/usr/aarch64-linux-gnu` for a cross-built one).
pub fn elf_needs(binary: &Path, arch: Arch, root: &Path) -> Result<ElfNeeds, VmError> {
    let bytes = read(binary)?;
    let bad = |why: String| VmError::Binary {
        path: binary.to_path_buf(),
        why,
    };
    let elf = goblin::elf::Elf::parse(&bytes).map_err(|e| bad(format!("not an ELF file: {e}")))?;
    let machine = elf.header.e_machine;
    if machine != arch.elf_machine() {
        return Err(bad(format!(
            "it is a {} executable, the lane is {}: {}",
            goblin::elf::header::machine_to_str(machine),
            arch.name(),
            arch.binary_hint()
        )));
    }
    let mut needs = ElfNeeds {
        interpreter: elf.interpreter.map(str::to_string),
        libraries: Vec::new(),
    };
    let mut queue: Vec<(String, Vec<String>)> = elf
        .libraries
        .iter()
        .map(|l| {
            (
                l.to_string(),
                elf.runpaths.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect();
    while let Some((lib, runpaths)) = queue.pop() {
        if needs.libraries.iter().any(|(l, _)| *l == lib) {
            continue;
        }
        let found = library_dirs(arch, root, &runpaths)
            .into_iter()
            .map(|d| d.join(&lib))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                bad(format!(
                    "needs {lib}, which is not in {}: build it static (-C target-feature=+crt-static) or install the library",
                    library_dirs(arch, root, &runpaths)
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let lib_bytes = read(&found)?;
        if let Ok(l) = goblin::elf::Elf::parse(&lib_bytes) {
            for dep in &l.libraries {
                queue.push((
                    dep.to_string(),
                    l.runpaths.iter().map(|s| s.to_string()).collect(),
                ));
            }
        }
        needs.libraries.push((lib, found));
    }
    Ok(needs)
}

fn library_dirs(arch: Arch, root: &Path, runpaths: &[String]) -> Vec<PathBuf> {
    let rel = |p: &str| root.join(p.trim_start_matches('/'));
    let mut dirs: Vec<PathBuf> = runpaths.iter().map(|r| rel(r)).collect();
    let triple = arch.multiarch();
    for d in [
        format!("/lib/{triple}"),
        format!("/usr/lib/{triple}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
    ] {
        dirs.push(rel(&d));
    }
    dirs
}

/// Put `binary` at `/bin/trackcheck` with its interpreter and libraries.
pub fn add_binary(
    fs: &mut Initramfs,
    binary: &Path,
    arch: Arch,
    root: &Path,
) -> Result<ElfNeeds, VmError> {
    let needs = elf_needs(binary, arch, root)?;
    fs.file("/bin/trackcheck", read(binary)?, true);
    if let Some(interp) = &needs.interpreter {
        let host = root.join(interp.trim_start_matches('/'));
        fs.file(interp, read(&host)?, true);
    }
    for (lib, found) in &needs.libraries {
        // Every library directory the dynamic linker searches by default gets a copy's link.
        let inside = format!("/lib/{}/{lib}", arch.multiarch());
        fs.file(&inside, read(found)?, true);
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_needs_its_loader_and_libc_or_nothing() {
        let me = std::env::current_exe().expect("the test binary");
        let needs = elf_needs(&me, Arch::host(), Path::new("/")).expect("the host's own binary");
        if needs.interpreter.is_some() {
            assert!(
                needs
                    .libraries
                    .iter()
                    .any(|(l, _)| l.starts_with("libc.so")),
                "{needs:?}"
            );
        }
    }

    #[test]
    fn a_binary_of_the_other_arch_is_refused_with_what_to_do() {
        let me = std::env::current_exe().expect("the test binary");
        let other = match Arch::host() {
            Arch::X86_64 => Arch::Aarch64,
            Arch::Aarch64 => Arch::X86_64,
        };
        let e = elf_needs(&me, other, Path::new("/"))
            .expect_err("wrong machine")
            .to_string();
        assert!(e.contains(other.name()), "{e}");
    }

    #[test]
    fn cpio_lists_parents_before_children() {
        let mut fs = Initramfs::default();
        fs.file("/lane/golden/matrix/a.snap", b"x".to_vec(), false);
        fs.symlink("/bin/sh", "busybox");
        let mut out = Vec::new();
        fs.write(&mut out).expect("write");
        let text = String::from_utf8_lossy(&out);
        let lane = text.find("lane\0").expect("lane");
        let snap = text.find("lane/golden/matrix/a.snap").expect("file");
        assert!(lane < snap);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(fs.size().0, 6);
    }
}
