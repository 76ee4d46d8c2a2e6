//! Probing what userfaultfd and access tracking (page_idle, DAMON) offer on this host.

use std::path::Path;

use super::{AccessFacts, Kdamond, UffdFacts, read_trim};
use crate::sys;

pub(super) fn probe_uffd() -> UffdFacts {
    let mut facts = UffdFacts::default();
    match sys::uffd::probe_features() {
        Ok(bits) => {
            facts.feature_bits = bits;
            facts.features = sys::uffd::feature_names(bits);
        }
        Err(e) => facts.error = Some(format!("userfaultfd: {e}")),
    }
    match sys::pagemap::probe() {
        Ok(has) => facts.pagemap_scan = has,
        Err(e) => facts.pagemap_scan_error = Some(format!("PAGEMAP_SCAN probe: {e}")),
    }
    facts
}

pub(super) fn probe_access() -> AccessFacts {
    let admin = Path::new("/sys/kernel/mm/damon/admin/kdamonds");
    let mut kdamonds = Vec::new();
    let mut operations = Vec::new();
    let count: usize = read_trim(admin.join("nr_kdamonds"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for index in 0..count {
        let dir = admin.join(index.to_string());
        let contexts: usize = read_trim(dir.join("contexts/nr_contexts"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut ops = Vec::new();
        for c in 0..contexts {
            let ctx = dir.join(format!("contexts/{c}"));
            if let Some(op) = read_trim(ctx.join("operations")) {
                ops.push(op);
            }
            if let Some(avail) = read_trim(ctx.join("avail_operations")) {
                operations.extend(avail.split_whitespace().map(String::from));
            }
        }
        kdamonds.push(Kdamond {
            index,
            state: read_trim(dir.join("state")).unwrap_or_else(|| "unknown".into()),
            operations: ops,
        });
    }
    operations.sort();
    operations.dedup();
    let cgroup2 = super::cgroup2_mount();
    let cgroup2_controllers = cgroup2
        .as_ref()
        .and_then(|m| read_trim(Path::new(m).join("cgroup.controllers")))
        .map(|c| c.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    AccessFacts {
        page_idle: Path::new("/sys/kernel/mm/page_idle/bitmap").exists(),
        damon_sysfs: admin.exists(),
        kdamonds,
        damon_operations: operations,
        lru_gen_enabled: read_trim("/sys/kernel/mm/lru_gen/enabled")
            .and_then(|v| parse_lru_gen_enabled(&v)),
        debugfs: Path::new("/sys/kernel/debug")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        lru_gen_debugfs: Path::new("/sys/kernel/debug/lru_gen").exists(),
        cgroup2,
        cgroup2_controllers,
    }
}

/// `0x0007` (what lru_gen/enabled shows) as a number.
fn parse_lru_gen_enabled(text: &str) -> Option<u32> {
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// The mount point of the first cgroup2 mount in `mountinfo` (/proc/self/mountinfo's text)
/// whose root is the hierarchy's root.
pub(super) fn cgroup2_mount(mountinfo: &str) -> Option<String> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split_whitespace().collect();
        let fstype = right.split_whitespace().next()?;
        (fstype == "cgroup2" && fields.get(3) == Some(&"/"))
            .then(|| fields.get(4).map(|m| (*m).to_string()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::{cgroup2_mount, parse_lru_gen_enabled};

    #[test]
    fn lru_gen_enabled_and_the_cgroup2_mount_parse() {
        assert_eq!(parse_lru_gen_enabled("0x0007\n"), Some(7));
        assert_eq!(parse_lru_gen_enabled("0x0005"), Some(5));
        assert_eq!(parse_lru_gen_enabled("junk"), None);
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid).as_deref(),
            Some("/sys/fs/cgroup/unified")
        );
        let unified = "25 22 0:22 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(unified).as_deref(), Some("/sys/fs/cgroup"));
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda rw\n"), None);
    }
}
