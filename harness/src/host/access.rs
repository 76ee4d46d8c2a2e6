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
    AccessFacts {
        page_idle: Path::new("/sys/kernel/mm/page_idle/bitmap").exists(),
        damon_sysfs: admin.exists(),
        kdamonds,
        damon_operations: operations,
    }
}
