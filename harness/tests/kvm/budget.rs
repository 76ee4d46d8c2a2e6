//! Guest memory a memory cgroup cannot give is refused when populated, with the figures, before
//! a page is touched: a child populates 2 GiB inside a fresh 1 GiB memory cgroup (cgroup v2
//! `memory.max`, or v1 `memory.limit_in_bytes` where the memory controller is on v1).

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::*;

/// A memory cgroup this test made; removed when dropped (after its child exited).
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove test cgroup {}", self.0.display());
    }
}

/// Why no memory cgroup can be made here, if none can (checked when trials are listed).
pub(super) fn cgroup_skip() -> Option<String> {
    memory_mount().err()
}

/// The directory to make a memory cgroup in, and the limit file's name.
fn memory_mount() -> Result<(PathBuf, &'static str), String> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let (mut v2, mut v1) = (None, None);
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split(' ').nth(4).map(PathBuf::from);
        let right: Vec<&str> = right.split(' ').collect();
        match (right.first(), right.get(2)) {
            (Some(&"cgroup2"), _) => v2 = v2.or(point),
            (Some(&"cgroup"), Some(o)) if o.split(',').any(|o| o == "memory") => v1 = v1.or(point),
            _ => {}
        }
    }
    // Whether a cgroup can be made there: try it (and remove it at once).
    let writable = |p: &PathBuf| {
        let probe = p.join(format!("trackcheck-probe-{}", std::process::id()));
        let made = fs::create_dir(&probe).is_ok();
        made && fs::remove_dir(&probe).is_ok()
    };
    if let Some(root) = v2.clone().filter(writable) {
        let controls = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
        if controls.split_whitespace().any(|c| c == "memory") {
            return Ok((root, "memory.max"));
        }
    }
    if let Some(root) = v1.clone().filter(writable) {
        return Ok((root, "memory.limit_in_bytes"));
    }
    Err(format!(
        "no memory cgroup can be made here (cgroup2 at {v2:?} without the memory controller \
         delegated or not writable; v1 memory at {v1:?} not writable): needs root and a memory \
         controller"
    ))
}

pub(super) fn populate_over_the_cgroup_limit_is_refused() -> Check {
    let (root, limit_file) = memory_mount()?;
    let cg = TestCgroup(root.join(format!("trackcheck-budget-{}", std::process::id())));
    fs::create_dir(&cg.0)?;
    fs::write(cg.0.join(limit_file), (1u64 << 30).to_string())?;
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(&cg.0)
        .arg(std::env::current_exe()?)
        .env(CHILD, "populate-2g")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    drop(cg);
    ensure(out.status.code() == Some(1), || {
        format!(
            "child in a 1 GiB cgroup ended with {:?} (137 = OOM-killed): {text}",
            out.status
        )
    })?;
    ensure(
        text.contains("anon guest memory of 2147483648 bytes refused")
            && text.contains("memory cgroup")
            && text.contains("limit 1024 MiB"),
        || format!("the refusal does not name the figures: {text}"),
    )
}
