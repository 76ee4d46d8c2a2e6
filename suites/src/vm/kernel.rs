//! Which kernel a lane boots: a Debian kernel downloaded into a cache (never installed), or a
//! user's own image.
//!
//! Debian's packages come through the package registry this machine's apt already uses (the
//! URI is taken from its sources), with a private sources list, lists directory and archive
//! cache under the cache directory: the machine's apt configuration is never changed.
//! 6.1 is in bookworm, 6.12 in bookworm-security, 7.x in unstable, where the image is split
//! into `linux-binary-*` (vmlinuz) and `linux-modules-*`.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Arch, VmError};

/// A kernel request as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSpec {
    /// `debian:SERIES[/FLAVOUR]`, e.g. `debian:6.12`, `debian:7.2/arm64-16k`.
    Debian {
        /// `6.1`, `6.12`, `7.2`.
        series: String,
        /// Debian's flavour; the architecture's generic one by default.
        flavour: Option<String>,
    },
    /// A kernel image on disk (bzImage, arm64 Image or its gzip'd vmlinuz).
    Path(PathBuf),
}

impl std::str::FromStr for KernelSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("debian:") {
            let (series, flavour) = match rest.split_once('/') {
                Some((s, f)) => (s, Some(f.to_string())),
                None => (rest, None),
            };
            let ok = series.split('.').count() == 2
                && series
                    .split('.')
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
            if !ok {
                return Err(format!(
                    "{s:?}: a Debian kernel is debian:MAJOR.MINOR, e.g. debian:6.1, debian:6.12, debian:7.2"
                ));
            }
            return Ok(Self::Debian {
                series: series.into(),
                flavour,
            });
        }
        if s.is_empty() {
            return Err("--kernel needs debian:SERIES or the path of a kernel image".into());
        }
        Ok(Self::Path(PathBuf::from(s)))
    }
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// What to show: `debian linux-image-6.12.118+deb12-amd64-unsigned`, or the path.
    pub label: String,
    /// The image qemu boots.
    pub image: PathBuf,
    /// `lib/modules/<release>` (or any directory of `.ko` files), when the kernel has modules.
    pub modules: Option<PathBuf>,
    /// The kernel release, when it could be read from the image or the package.
    pub release: Option<String>,
}

/// The release a kernel image says it is: an x86 bzImage's header points at its version
/// string; an arm64 Image (gzip'd or not) holds "Linux version X ...".
#[must_use]
pub fn image_release(bytes: &[u8]) -> Option<String> {
    // bzImage: "HdrS" at 0x202, kernel_version (u16) at 0x20e is an offset from 0x200.
    if bytes.get(0x202..0x206) == Some(b"HdrS") {
        let off = u16::from_le_bytes([*bytes.get(0x20e)?, *bytes.get(0x20f)?]);
        let at = 0x200 + usize::from(off);
        let s = bytes.get(at..at.checked_add(256)?.min(bytes.len()))?;
        let text = String::from_utf8_lossy(s.split(|&b| b == 0).next()?).to_string();
        return text.split_whitespace().next().map(str::to_string);
    }
    let decompressed;
    let data = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out).ok()?;
        decompressed = out;
        &decompressed[..]
    } else {
        bytes
    };
    let needle = b"Linux version ";
    let at = data.windows(needle.len()).position(|w| w == needle)? + needle.len();
    let rest = data.get(at..at + 128)?;
    let word = rest.split(|&b| b == b' ' || b == 0).next()?;
    std::str::from_utf8(word).ok().map(str::to_string)
}

/// Resolve a path request: `image` plus an optional modules directory.
pub fn from_path(image: &Path, modules: Option<&Path>) -> Result<Kernel, VmError> {
    let bytes = std::fs::read(image).map_err(|e| VmError::Io {
        what: format!("reading the kernel image {}", image.display()),
        source: e,
    })?;
    if let Some(m) = modules
        && !m.is_dir()
    {
        return Err(VmError::Usage(format!(
            "--modules {}: not a directory (give lib/modules/<release> of the build, or a directory of .ko files)",
            m.display()
        )));
    }
    Ok(Kernel {
        label: image.display().to_string(),
        image: image.to_path_buf(),
        modules: modules.map(Path::to_path_buf),
        release: image_release(&bytes),
    })
}

/// The private apt setup under the cache.
#[derive(Debug)]
pub struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// Set up (once) and refresh (when older than a day) the private lists.
    pub fn new(cache: &Path, progress: &dyn Fn(&str)) -> Result<Self, VmError> {
        for tool in ["apt-get", "apt-cache", "dpkg-deb"] {
            if which(tool).is_none() {
                return Err(VmError::Missing {
                    what: tool.into(),
                    hint: "debian: kernels are fetched with apt on a Debian-like host; elsewhere give --kernel PATH".into(),
                });
            }
        }
        let dir = cache.join("apt");
        for d in ["lists/partial", "cache/archives/partial", "etc"] {
            mkdir(&dir.join(d))?;
        }
        let (main, security) = mirrors();
        let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let signed = if Path::new(key).is_file() {
            format!("[signed-by={key}] ")
        } else {
            String::new()
        };
        let list = format!(
            "deb {signed}{main} bookworm main\ndeb {signed}{security} bookworm-security main\ndeb {signed}{main} unstable main\n"
        );
        let list_path = dir.join("etc/sources.list");
        let fresh = std::fs::read_to_string(&list_path).ok().as_deref() == Some(list.as_str())
            && std::fs::metadata(dir.join("lists"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age.as_secs() < 86_400);
        std::fs::write(&list_path, &list).map_err(|e| VmError::Io {
            what: format!("writing {}", list_path.display()),
            source: e,
        })?;
        let apt = Self { dir };
        if !fresh {
            progress(&format!(
                "download: refreshing the package lists ({main}, {security}) into {}",
                apt.dir.display()
            ));
            apt.run("apt-get", &["-q", "update"], None)?;
            let lists = apt.dir.join("lists");
            let _ = std::fs::File::open(&lists)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
        Ok(apt)
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/etc/sources.list"),
            format!("-oDir::Etc::SourceParts={d}/etc/none"),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}/cache"),
            "-oAPT::Architectures::=amd64".into(),
            "-oAPT::Architectures::=arm64".into(),
            "-oAcquire::Languages=none".into(),
            "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn run(&self, tool: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, VmError> {
        let mut cmd = Command::new(tool);
        cmd.args(self.options()).args(args);
        if let Some(c) = cwd {
            cmd.current_dir(c);
        }
        let out = cmd.output().map_err(|e| VmError::Io {
            what: format!("running {tool}"),
            source: e,
        })?;
        if !out.status.success() {
            return Err(VmError::Download(format!(
                "{tool} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Package names matching a regular expression.
    fn search(&self, pattern: &str) -> Result<Vec<String>, VmError> {
        let out = self.run("apt-cache", &["search", "--names-only", pattern], None)?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    }

    /// Download `pkg:arch` and unpack it into `into`.
    fn fetch(&self, pkg: &str, arch: &str, into: &Path) -> Result<(), VmError> {
        let tmp = into.with_extension("download");
        let _ = std::fs::remove_dir_all(&tmp);
        mkdir(&tmp)?;
        self.run(
            "apt-get",
            &["-q", "download", &format!("{pkg}:{arch}")],
            Some(&tmp),
        )?;
        let deb = std::fs::read_dir(&tmp)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
            .ok_or_else(|| VmError::Download(format!("apt-get download {pkg} left no file")))?;
        let out = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(into)
            .output()
            .map_err(|e| VmError::Io {
                what: "running dpkg-deb".into(),
                source: e,
            })?;
        let _ = std::fs::remove_dir_all(&tmp);
        if !out.status.success() {
            return Err(VmError::Download(format!(
                "dpkg-deb -x {} failed: {}",
                deb.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// The Debian archive and security URIs this machine's apt uses (deb.debian.org if none).
fn mirrors() -> (String, String) {
    let mut texts: Vec<String> =
        vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(d) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in d.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list") {
                texts.push(std::fs::read_to_string(p).unwrap_or_default());
            }
        }
    }
    let mut main = None;
    let mut security = None;
    for text in &texts {
        for line in text.lines() {
            let line = line.trim();
            let uris: Vec<&str> = if let Some(u) = line.strip_prefix("URIs:") {
                u.split_whitespace().collect()
            } else if line.starts_with("deb ") {
                line.split_whitespace()
                    .filter(|w| w.starts_with("http"))
                    .take(1)
                    .collect()
            } else {
                Vec::new()
            };
            for u in uris {
                let u = u.trim_end_matches('/');
                if u.ends_with("/debian-security") {
                    security.get_or_insert_with(|| u.to_string());
                } else if u.ends_with("/debian") {
                    main.get_or_insert_with(|| u.to_string());
                }
            }
        }
    }
    (
        main.unwrap_or_else(|| "http://deb.debian.org/debian".into()),
        security.unwrap_or_else(|| "http://deb.debian.org/debian-security".into()),
    )
}

/// Order package names by the numbers in them (6.12.9 < 6.12.118).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Fetch (or find in the cache) the newest Debian kernel of `series` for `arch`.
pub fn debian(
    cache: &Path,
    arch: Arch,
    series: &str,
    flavour: Option<&str>,
    progress: &dyn Fn(&str),
) -> Result<Kernel, VmError> {
    let flavour = flavour.unwrap_or(arch.debian_arch());
    let deb_arch = arch.debian_arch();
    let apt = Apt::new(cache, progress)?;
    let esc = series.replace('.', "\\.");
    // 6.x: one linux-image-*-unsigned package; 7.x: linux-binary-* + linux-modules-*.
    // `6\.1(\.[0-9]+)*` so that 6.1 is linux-image-6.1.0-37-*, never 6.12.118+deb12-*.
    let image =
        format!("^linux-image-{esc}(\\.[0-9]+)*(-[0-9]+)?(\\+deb[0-9]+)?-{flavour}-unsigned$");
    let binary = format!("^linux-binary-{esc}(\\.[0-9]+)*(-[0-9]+)?(\\+deb[0-9]+)?-{flavour}$");
    let mut found = apt.search(&image)?;
    let split = found.is_empty();
    if split {
        found = apt.search(&binary)?;
    }
    found.sort_by_key(|n| version_key(n));
    let pkg = found.pop().ok_or_else(|| {
        VmError::Download(format!(
            "no Debian kernel package for series {series}, flavour {flavour} ({image} or {binary}) in bookworm, bookworm-security or unstable"
        ))
    })?;
    let dir = cache.join("kernels").join(&pkg);
    if !dir.join("complete").is_file() {
        progress(&format!("download: {pkg} ({deb_arch})"));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        apt.fetch(&pkg, deb_arch, &root)?;
        if split {
            let modules = pkg.replacen("linux-binary-", "linux-modules-", 1);
            progress(&format!("download: {modules} ({deb_arch})"));
            apt.fetch(&modules, deb_arch, &root)?;
        }
        std::fs::write(dir.join("complete"), &pkg).map_err(|e| VmError::Io {
            what: format!("writing {}", dir.display()),
            source: e,
        })?;
    } else {
        progress(&format!("download: {pkg} (cached in {})", dir.display()));
    }
    let root = dir.join("root");
    let mut release = None;
    let mut image_path = None;
    let mut modules = None;
    for base in ["usr/lib/modules", "lib/modules"] {
        if let Ok(d) = std::fs::read_dir(root.join(base)) {
            for e in d.flatten() {
                let p = e.path();
                if p.join("kernel").is_dir() {
                    modules = Some(p.clone());
                    release = Some(e.file_name().to_string_lossy().to_string());
                }
                if p.join("vmlinuz").is_file() {
                    image_path = Some(p.join("vmlinuz"));
                }
            }
        }
    }
    if image_path.is_none()
        && let Ok(d) = std::fs::read_dir(root.join("boot"))
    {
        image_path = d.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        });
    }
    if let Some(r) = &release
        && trackcheck_harness::host::kernel_series(r).as_deref() != Some(series)
    {
        return Err(VmError::Download(format!(
            "{pkg} is kernel {r}, not series {series}: a package-name pattern is wrong (report it)"
        )));
    }
    let image = image_path.ok_or_else(|| {
        VmError::Download(format!(
            "{pkg} holds no vmlinuz (looked in boot/ and lib/modules/*/)"
        ))
    })?;
    Ok(Kernel {
        label: format!("debian {pkg}"),
        image,
        modules,
        release,
    })
}

/// A static busybox for `arch` (Debian's busybox-static), from the cache.
pub fn busybox(cache: &Path, arch: Arch, progress: &dyn Fn(&str)) -> Result<PathBuf, VmError> {
    let dir = cache.join(format!("busybox-{}", arch.debian_arch()));
    let bin = dir.join("root/bin/busybox");
    let usr = dir.join("root/usr/bin/busybox");
    for b in [&bin, &usr] {
        if b.is_file() {
            return Ok(b.clone());
        }
    }
    progress(&format!(
        "download: busybox-static ({})",
        arch.debian_arch()
    ));
    let apt = Apt::new(cache, progress)?;
    apt.fetch("busybox-static", arch.debian_arch(), &dir.join("root"))?;
    [bin, usr]
        .into_iter()
        .find(|b| b.is_file())
        .ok_or_else(|| VmError::Download("busybox-static holds no busybox".into()))
}

fn mkdir(d: &Path) -> Result<(), VmError> {
    std::fs::create_dir_all(d).map_err(|e| VmError::Io {
        what: format!("creating {}", d.display()),
        source: e,
    })
}

/// A program on `$PATH`.
#[must_use]
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_specs_parse_and_bad_ones_say_the_form() {
        assert_eq!(
            "debian:6.12".parse::<KernelSpec>(),
            Ok(KernelSpec::Debian {
                series: "6.12".into(),
                flavour: None
            })
        );
        assert_eq!(
            "debian:7.2/arm64-16k".parse::<KernelSpec>(),
            Ok(KernelSpec::Debian {
                series: "7.2".into(),
                flavour: Some("arm64-16k".into())
            })
        );
        let e = "debian:bookworm".parse::<KernelSpec>().expect_err("bad");
        assert!(e.contains("debian:MAJOR.MINOR"), "{e}");
        assert_eq!(
            "/boot/vmlinuz".parse::<KernelSpec>(),
            Ok(KernelSpec::Path("/boot/vmlinuz".into()))
        );
    }

    #[test]
    fn newest_package_by_numbers() {
        let mut v = [
            "linux-image-6.12.9+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.41+deb12-amd64-unsigned",
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v[2], "linux-image-6.12.118+deb12-amd64-unsigned");
    }

    #[test]
    fn bzimage_header_gives_the_release() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        let v = b"7.2.13+deb14-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        img[0x500..0x500 + v.len()].copy_from_slice(v);
        assert_eq!(image_release(&img).as_deref(), Some("7.2.13+deb14-amd64"));
        let arm = b"....Linux version 6.12.118+deb12-arm64 (debian-kernel@...) #1 SMP".to_vec();
        let mut padded = arm.clone();
        padded.extend(vec![0u8; 200]);
        assert_eq!(
            image_release(&padded).as_deref(),
            Some("6.12.118+deb12-arm64")
        );
        assert_eq!(image_release(b"nothing here"), None);
    }
}
