//! Booting the lane under QEMU and bringing its reports back.
//!
//! x86_64: `-cpu max` under TCG offers AMD SVM with NPT, so KVM inside runs its TDP MMU as on
//! real AMD runners. TCG must be **single-threaded** (`-accel tcg,thread=single`): with QEMU's
//! default multi-threaded TCG (7.2 and 10.0 alike) nested SVM state is corrupted now and then
//! (a kvm tracepoint capture showed the nested guest resumed at an L1 kernel address, then a
//! triple fault, once an L1 panic); single-threaded, 2 full matrices and 88 repeats of the
//! affected trials ran clean. Intel VMX cannot be had: TCG has no VMX.
//! arm64: `virt,virtualization=on` gives EL2, so KVM runs with stage-2 tables; MTTCG is fine.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::kernel::{Kernel, which};
use super::{Arch, VmConfig, VmError, io};

/// Phase times of a lane.
#[derive(Debug)]
pub struct Times {
    start: Instant,
    last: Instant,
    /// (phase, seconds).
    pub phases: Vec<(String, f64)>,
}

impl Default for Times {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            phases: Vec::new(),
        }
    }
}

impl Times {
    /// End the current phase.
    pub fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.phases
            .push((name.into(), (now - self.last).as_secs_f64()));
        self.last = now;
    }

    /// One line per phase, then the total.
    #[must_use]
    pub fn text(&self) -> String {
        let mut s: String = self
            .phases
            .iter()
            .map(|(n, t)| format!("{n:<9}{t:>8.1} s\n"))
            .collect();
        s.push_str(&format!(
            "{:<9}{:>8.1} s\n",
            "total",
            self.start.elapsed().as_secs_f64()
        ));
        s
    }
}

/// What a lane produced.
#[derive(Debug)]
pub struct Outcome {
    /// Each command inside and its exit status.
    pub commands: Vec<(String, i32)>,
    /// Commands that died in a way the lane's golden file records (see `death.rs`), with the
    /// evidence: reported, not counted as failures.
    pub known_deaths: Vec<(String, String)>,
    /// Where the reports are.
    pub out: PathBuf,
    /// Phase times.
    pub times: Times,
}

impl Outcome {
    /// 0 when every command inside exited 0.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        let ok = |name: &str, rc: i32| rc == 0 || self.known_deaths.iter().any(|(n, _)| n == name);
        if self.commands.iter().all(|(n, rc)| ok(n, *rc)) && !self.commands.is_empty() {
            0
        } else {
            1
        }
    }
}

/// The QEMU system emulator for an architecture.
#[derive(Debug)]
pub struct Qemu {
    arch: Arch,
    path: PathBuf,
}

impl Qemu {
    /// Find it on `$PATH`, or say which package has it.
    pub fn find(arch: Arch) -> Result<Self, VmError> {
        let (bin, pkg) = match arch {
            Arch::X86_64 => ("qemu-system-x86_64", "qemu-system-x86"),
            Arch::Aarch64 => ("qemu-system-aarch64", "qemu-system-arm"),
        };
        let path = which(bin).ok_or_else(|| VmError::Missing {
            what: bin.into(),
            hint: format!("install the {pkg} package (apt-get install {pkg})"),
        })?;
        Ok(Self { arch, path })
    }

    fn args(&self, config: &VmConfig, kernel: &Kernel, initrd: &Path) -> Vec<String> {
        let mut append = vec![
            "rdinit=/init".to_string(),
            "panic=-1".into(),
            "quiet".into(),
            "transparent_hugepage=always".into(),
            // A process killed by a signal leaves its registers in the kernel log.
            "print-fatal-signals=1".into(),
            // From 7.x DAMON_STAT starts an exclusive kdamond at boot, and DAMON then refuses
            // every other one (EBUSY): the idle-damon trials need their own.
            "damon_stat.enabled=N".into(),
        ];
        append.extend(super::build::BRD_CMDLINE.map(String::from));
        if config.hugepages_1g > 0 {
            append.push("hugepagesz=1G".into());
            append.push(format!("hugepages={}", config.hugepages_1g));
        }
        let mut args: Vec<String> = match self.arch {
            Arch::X86_64 => {
                append.insert(0, "console=ttyS0".into());
                // Where kvm is built in, its parameter comes from the command line.
                append.push("kvm.force_emulation_prefix=1".into());
                [
                    "-machine",
                    "q35",
                    "-accel",
                    "tcg,thread=single",
                    "-cpu",
                    "max",
                ]
                .map(String::from)
                .to_vec()
            }
            Arch::Aarch64 => {
                append.insert(0, "console=ttyAMA0".into());
                [
                    "-M",
                    "virt,virtualization=on,gic-version=3",
                    "-cpu",
                    "max,pauth-impdef=on",
                ]
                .map(String::from)
                .to_vec()
            }
        };
        append.extend(config.append.iter().cloned());
        args.extend([
            "-smp".to_string(),
            config.smp.to_string(),
            "-m".into(),
            config.mem_mib.to_string(),
            "-nographic".into(),
            "-nodefaults".into(),
            "-serial".into(),
            "stdio".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            kernel.image.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            append.join(" "),
        ]);
        args
    }

    /// Boot, forward the console, enforce the time limits, unpack the reports.
    pub fn boot(
        &self,
        config: &VmConfig,
        kernel: &Kernel,
        initrd: &Path,
        times: &mut Times,
        progress: &dyn Fn(&str),
    ) -> Result<Outcome, VmError> {
        std::fs::create_dir_all(&config.out).map_err(|e| io(&config.out, e))?;
        let args = self.args(config, kernel, initrd);
        progress(&format!("boot: {} {}", self.path.display(), args.join(" ")));
        let mut child = Command::new(&self.path)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| VmError::Io {
                what: format!("starting {}", self.path.display()),
                source: e,
            })?;
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take();
        let out_tx = tx.clone();
        let reader = std::thread::spawn(move || {
            if let Some(s) = stdout {
                for line in BufReader::new(s).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).replace('\r', "");
                    if out_tx.send(line).is_err() {
                        break;
                    }
                }
            }
        });
        let mut stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        drop(tx);
        let console_path = config.out.join("console.log");
        let mut console = String::new();
        let start = Instant::now();
        let mut booted: Option<f64> = None;
        let mut in_block = false;
        let mut failure: Option<VmError> = None;
        loop {
            let elapsed = start.elapsed();
            let limit = if booted.is_some() {
                Duration::from_secs(config.timeout_s)
            } else {
                Duration::from_secs(config.boot_timeout_s.min(config.timeout_s))
            };
            if elapsed >= limit {
                let _ = child.kill();
                failure = Some(if booted.is_some() {
                    VmError::Lane(format!(
                        "the lane did not finish within {} s (--timeout); console log: {}",
                        config.timeout_s,
                        console_path.display()
                    ))
                } else {
                    VmError::NoBoot {
                        why: format!("no /init within {} s", limit.as_secs()),
                        tail: tail(&console, 25),
                    }
                });
                break;
            }
            match rx.recv_timeout(limit - elapsed) {
                Ok(line) => {
                    if line.starts_with("=== TRACKCHECK-OUT BEGIN") {
                        in_block = true;
                    }
                    if !in_block {
                        progress(&format!("  | {line}"));
                    }
                    if line.starts_with("=== TRACKCHECK-OUT END") {
                        in_block = false;
                    }
                    // The firmware's screen-clearing escapes may precede the first line.
                    if booted.is_none() && line.contains("=== lane: booted") {
                        let uptime = line
                            .rsplit_once("uptime ")
                            .and_then(|(_, u)| u.trim_end_matches(" s").parse::<f64>().ok())
                            .unwrap_or(0.0);
                        booted = Some(uptime);
                    }
                    console.push_str(&line);
                    console.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().map_err(|e| VmError::Io {
            what: "waiting for qemu".into(),
            source: e,
        })?;
        let _ = reader.join();
        let qemu_err = err_reader.join().unwrap_or_default();
        std::fs::write(&console_path, &console).map_err(|e| io(&console_path, e))?;
        // Boot is kernel start to /init (the guest's uptime); the rest of QEMU's time is the run.
        let qemu_s = (Instant::now() - start).as_secs_f64();
        let boot_s = booted.unwrap_or(qemu_s).min(qemu_s);
        times.phases.push(("boot".into(), boot_s));
        times.phases.push(("run".into(), qemu_s - boot_s));
        times.last = Instant::now();
        if let Some(f) = failure {
            return Err(f);
        }
        if booted.is_none() {
            return Err(VmError::NoBoot {
                why: format!(
                    "qemu exited ({status}) before /init ran{}",
                    if qemu_err.trim().is_empty() {
                        String::new()
                    } else {
                        format!("; qemu said: {}", qemu_err.trim())
                    }
                ),
                tail: tail(&console, 25),
            });
        }
        unpack(&console, &config.out)?;
        if console.contains("=== lane: no /dev/kvm") {
            let loaded: Vec<&str> = console
                .lines()
                .filter(|l| l.starts_with("=== lane: loaded") || l.contains("insmod"))
                .collect();
            let dmesg = std::fs::read_to_string(config.out.join("dmesg.txt")).unwrap_or_default();
            return Err(VmError::NoKvm {
                why: format!(
                    "{}; the kernel needs CONFIG_KVM (and kvm-amd / KVM on arm64) built in or as modules given with --modules; kernel log:\n{}",
                    if loaded.is_empty() {
                        "no modules were loaded".to_string()
                    } else {
                        loaded.join("; ")
                    },
                    tail(&dmesg, 15)
                ),
            });
        }
        let mut commands = Vec::new();
        let mut known_deaths = Vec::new();
        if let Ok(d) = std::fs::read_dir(&config.out) {
            let mut rcs: Vec<PathBuf> = d
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rc"))
                .collect();
            rcs.sort();
            for rc in rcs {
                let name = rc
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default();
                let code = std::fs::read_to_string(&rc)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(-1);
                if code != 0 {
                    let trace = std::fs::read_to_string(config.out.join(format!("{name}.trace")))
                        .unwrap_or_default();
                    let open = crate::runner::in_flight(&trace);
                    let signal =
                        (code > 128).then(|| format!(" (killed by signal {})", code - 128));
                    if code > 128 {
                        let dmesg = std::fs::read_to_string(config.out.join("dmesg.txt"))
                            .unwrap_or_default();
                        let golden = super::death::lane_golden(&config.out, &config.golden)
                            .unwrap_or_default();
                        match super::death::judge(self.arch.name(), code - 128, &dmesg, &golden) {
                            super::death::Death::Known(why) => {
                                progress(&format!("KNOWN FAILURE {name}: {why}"));
                                known_deaths.push((name.clone(), why));
                            }
                            super::death::Death::Unknown(why) => {
                                progress(&format!("FAIL {name}: {why}"));
                            }
                        }
                    }
                    if signal.is_some() || !open.is_empty() {
                        progress(&format!(
                            "{name}: exit {code}{}; trials running when it ended: {}",
                            signal.unwrap_or_default(),
                            if open.is_empty() {
                                "none".into()
                            } else {
                                open.join(", ")
                            }
                        ));
                    }
                }
                commands.push((name, code));
            }
        }
        if config.bless {
            bless_back(&config.out, &config.golden, self.arch, progress)?;
        }
        replay_hints(config, progress);
        if !known_deaths.is_empty() {
            let text: String = known_deaths
                .iter()
                .map(|(n, w)| format!("{n}: {w}\n"))
                .collect();
            let _ = std::fs::write(config.out.join("known-deaths.txt"), text);
        }
        Ok(Outcome {
            commands,
            known_deaths,
            out: config.out.clone(),
            times: std::mem::take(times),
        })
    }
}

/// For every replay file a run inside wrote (its failures), the command that replays it in
/// this same kernel from this host.
fn replay_hints(config: &VmConfig, progress: &dyn Fn(&str)) {
    let kernel = match &config.kernel {
        super::KernelSpec::Debian { series, flavour } => format!(
            "debian:{series}{}",
            flavour
                .as_ref()
                .map(|f| format!("/{f}"))
                .unwrap_or_default()
        ),
        super::KernelSpec::Path(p) => match &config.modules {
            Some(m) => format!("{} --modules {}", p.display(), m.display()),
            None => p.display().to_string(),
        },
    };
    let binary = config
        .binary
        .as_ref()
        .map(|b| format!(" --binary {}", b.display()))
        .unwrap_or_default();
    let Ok(runs) = std::fs::read_dir(&config.out) else {
        return;
    };
    for run in runs.flatten() {
        let Ok(files) = std::fs::read_dir(run.path().join("replay")) else {
            continue;
        };
        for f in files.flatten() {
            progress(&format!(
                "replay in this kernel: trackcheck vm --arch {} --kernel {kernel}{binary} --replay {}",
                config.arch.name(),
                f.path().display()
            ));
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The base64 tar.gz between the markers, unpacked into `out`.
fn unpack(console: &str, out: &Path) -> Result<(), VmError> {
    let Some(begin) = console.find("=== TRACKCHECK-OUT BEGIN\n") else {
        return Err(VmError::Lane(format!(
            "the lane ran but sent no reports back (no TRACKCHECK-OUT block); console log: {}",
            out.join("console.log").display()
        )));
    };
    let body = &console[begin + "=== TRACKCHECK-OUT BEGIN\n".len()..];
    let Some(end) = body.find("=== TRACKCHECK-OUT END") else {
        return Err(VmError::Lane(
            "the reports were cut off (the lane stopped while sending them)".into(),
        ));
    };
    let b64: String = body[..end].split_whitespace().collect();
    let tgz = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| VmError::Lane(format!("the reports arrived damaged (base64: {e})")))?;
    let staging = out.join(".unpack");
    let _ = std::fs::remove_dir_all(&staging);
    tar::Archive::new(flate2::read::GzDecoder::new(&tgz[..]))
        .unpack(&staging)
        .map_err(|e| VmError::Lane(format!("the reports arrived damaged (tar: {e})")))?;
    let inner = staging.join("out");
    if let Ok(d) = std::fs::read_dir(&inner) {
        for e in d.flatten() {
            let to = out.join(e.file_name());
            let _ = std::fs::remove_dir_all(&to);
            let _ = std::fs::remove_file(&to);
            std::fs::rename(e.path(), &to).map_err(|err| io(&to, err))?;
        }
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

/// Copy the lane's blessed golden files (its architecture's) back into the golden directory.
fn bless_back(
    out: &Path,
    golden: &Path,
    arch: Arch,
    progress: &dyn Fn(&str),
) -> Result<(), VmError> {
    let Ok(d) = std::fs::read_dir(out.join("golden")) else {
        return Ok(());
    };
    for e in d.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("{}-", arch.name())) && name.ends_with(".snap") {
            let to = golden.join(&name);
            // Only the lane's own file changed; the others went in and came back as they were.
            if std::fs::read(&to).ok() == std::fs::read(e.path()).ok() {
                continue;
            }
            std::fs::copy(e.path(), &to).map_err(|err| io(&to, err))?;
            progress(&format!("blessed: {}", to.display()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_come_back_from_the_console() {
        let dir = std::env::temp_dir().join(format!("trackcheck-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut tgz = Vec::new();
        {
            let gz = flate2::write::GzEncoder::new(&mut tgz, flate2::Compression::fast());
            let mut t = tar::Builder::new(gz);
            let data = b"0\n";
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, "out/matrix.rc", &data[..])
                .expect("tar");
            t.into_inner().expect("tar").finish().expect("gz");
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&tgz);
        let console = format!(
            "boot noise\n=== TRACKCHECK-OUT BEGIN\n{}\n{}\n=== TRACKCHECK-OUT END\n",
            &b64[..10],
            &b64[10..]
        );
        unpack(&console, &dir).expect("unpacks");
        assert_eq!(
            std::fs::read_to_string(dir.join("matrix.rc")).expect("rc"),
            "0\n"
        );
        let cut = console.replace("=== TRACKCHECK-OUT END\n", "");
        assert!(
            unpack(&cut, &dir)
                .unwrap_err()
                .to_string()
                .contains("cut off")
        );
        assert!(
            unpack("nothing", &dir)
                .unwrap_err()
                .to_string()
                .contains("no TRACKCHECK-OUT")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
