//! Guest memory larger than the host or the memory cgroup can give is refused with a clear
//! error before a page is touched, not OOM-killed (exit 137, no message).
//!
//! The cgroup test makes a fresh memory cgroup with a 1 GiB limit (cgroup v2 `memory.max`, or
//! v1 `memory.limit_in_bytes` where the memory controller is on v1), runs `trackcheck bench
//! --mem 2G` inside it and removes the cgroup afterwards. It is skipped, with the reason, where
//! no memory cgroup can be made (not root, no memory controller delegated).
#![forbid(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A memory cgroup this test made; removed when dropped.
struct TestCgroup {
    dir: PathBuf,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The child has exited; the kernel may take a moment to let the group go.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove test cgroup {}", self.dir.display());
    }
}

/// Mount points of the cgroup2 hierarchy and of the v1 memory controller.
fn mounts() -> (Option<PathBuf>, Option<PathBuf>) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let (mut v2, mut v1) = (None, None);
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).map(PathBuf::from);
        let right: Vec<&str> = right.split(' ').collect();
        match (right.first(), right.get(2)) {
            (Some(&"cgroup2"), _) => v2 = v2.or(point),
            (Some(&"cgroup"), Some(opts)) if opts.split(',').any(|o| o == "memory") => {
                v1 = v1.or(point);
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// Make a fresh memory cgroup limited to `limit` bytes, or say why none can be made here.
fn make_cgroup(limit: u64) -> Result<(TestCgroup, &'static str), String> {
    let name = format!("trackcheck-memtest-{}", std::process::id());
    let (v2, v1) = mounts();
    let mut why = Vec::new();
    if let Some(root) = v2 {
        let controls = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
        if controls.split_whitespace().any(|c| c == "memory") {
            let dir = root.join(&name);
            match fs::create_dir(&dir) {
                Ok(()) => {
                    let cg = TestCgroup { dir };
                    fs::write(cg.dir.join("memory.max"), limit.to_string())
                        .map_err(|e| format!("cgroup v2 memory.max: {e}"))?;
                    return Ok((cg, "v2"));
                }
                Err(e) => why.push(format!("cgroup v2 at {}: {e}", root.display())),
            }
        } else {
            why.push(format!(
                "cgroup v2 at {} does not delegate the memory controller",
                root.display()
            ));
        }
    } else {
        why.push("no cgroup2 mount".into());
    }
    if let Some(root) = v1 {
        let dir = root.join(&name);
        match fs::create_dir(&dir) {
            Ok(()) => {
                let cg = TestCgroup { dir };
                fs::write(cg.dir.join("memory.limit_in_bytes"), limit.to_string())
                    .map_err(|e| format!("cgroup v1 memory.limit_in_bytes: {e}"))?;
                return Ok((cg, "v1"));
            }
            Err(e) => why.push(format!("cgroup v1 memory at {}: {e}", root.display())),
        }
    }
    Err(why.join("; "))
}

/// `trackcheck args...` run inside the cgroup at `dir` (the shell moves itself in, then execs).
fn trackcheck_in(dir: &Path, args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(dir)
        .arg(env!("CARGO_BIN_EXE_trackcheck"))
        .args(args)
        .output()
        .expect("sh runs")
}

#[test]
fn bench_over_the_cgroup_limit_is_refused_not_oom_killed() {
    let (cg, version) = match make_cgroup(1 << 30) {
        Ok(made) => made,
        Err(why) => {
            eprintln!("skip: no memory cgroup can be made here: {why}");
            return;
        }
    };
    let out = trackcheck_in(
        &cg.dir,
        &[
            "bench",
            "--mem",
            "2G",
            "--mechanism",
            "dirty-log",
            "--iterations",
            "1",
        ],
    );
    let all = text(&out);
    assert!(
        out.status.code().is_some(),
        "trackcheck was killed by a signal ({:?}) in a 1 GiB cgroup {version}: {all}",
        out.status
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "2G in a 1 GiB cgroup ran: {all}"
    );
    assert!(
        all.contains("2048 MiB of guest memory plus a 128 MiB margin does not fit")
            && all.contains("memory cgroup")
            && all.contains("limit 1024 MiB"),
        "the refusal names the figures (cgroup {version}): {all}"
    );
    assert!(all.contains("raise the cgroup's memory.max"), "{all}");
    drop(cg);
}

#[test]
fn bench_over_the_host_memory_is_refused() {
    let avail = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemAvailable:")
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .unwrap_or(0)
        * 1024;
    if avail == 0 || avail >= 60 << 30 {
        eprintln!("skip: needs a host with less than 60 GiB available (has {avail} bytes)");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_trackcheck"))
        .args(["bench", "--mem", "64G", "--mechanism", "dirty-log"])
        .output()
        .expect("trackcheck runs");
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    assert!(
        all.contains("65536 MiB of guest memory plus a 4096 MiB margin does not fit")
            && all.contains("available (MemAvailable)"),
        "{all}"
    );
}
