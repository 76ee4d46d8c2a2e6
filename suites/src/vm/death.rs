//! A trackcheck run inside a lane that died by a signal.
//!
//! A run that dies takes its report with it, so no trial's golden entry can explain it. Where
//! the kernel is known to make the VMM die — on Debian's arm64 7.2 under QEMU, KVM's
//! `KVM_BUG_ON(SYSREGS_ON_CPU)` in `kvm_vcpu_load_debug()` fires (a vCPU loaded twice without
//! a put, so the guest's EL0 thread pointer can reach the VMM's thread, which then faults) —
//! the lane's golden file records it as the pseudo-trial `<arch>::lane::process-death` with a
//! `hazard(warn@FILE:LINE)` signature. A death is then a known failure only when the same boot's
//! kernel log has a WARN and every WARN is at a location the signature lists; any other death
//! (no WARN, or a WARN elsewhere) is a failure. Either way the lane names the dead run, the
//! signal, the trials it was running (from its trace) and the WARN lines, in every report.

use std::path::Path;

use crate::golden::signature::{Clause, HazardClass};
use crate::golden::{Expected, Golden};

/// The golden pseudo-trial that records how a lane's runs are known to die.
#[must_use]
pub fn entry_name(arch: &str) -> String {
    format!("{arch}::lane::process-death")
}

/// What a run's death is.
#[derive(Debug, PartialEq, Eq)]
pub enum Death {
    /// The golden file records it; the string says with what evidence it matched.
    Known(String),
    /// Not recorded (or not within the record): why.
    Unknown(String),
}

/// The kernel's WARN lines in a boot's log.
fn warns(dmesg: &str) -> Vec<&str> {
    dmesg.lines().filter(|l| l.contains("WARNING:")).collect()
}

/// Judge a run that died by `signal`, given the boot's kernel log and the lane's golden file.
#[must_use]
pub fn judge(arch: &str, signal: i32, dmesg: &str, golden: &Golden) -> Death {
    let lines = warns(dmesg);
    let name = entry_name(arch);
    let Some(expected) = golden.expected(&name) else {
        return Death::Unknown(format!(
            "died by signal {signal}; {} has no {name} entry{}",
            golden.path.display(),
            if lines.is_empty() {
                String::new()
            } else {
                format!(" (the kernel logged: {})", lines.join(" | "))
            }
        ));
    };
    let classes = match expected {
        Expected::Fail(sig) | Expected::Intermittent(sig) => sig.0.iter().find_map(|c| match c {
            Clause::Hazard(classes) => Some(classes.clone()),
            _ => None,
        }),
        _ => None,
    };
    let Some(classes) = classes else {
        return Death::Unknown(format!(
            "died by signal {signal}; {name} in {} records no hazard clause",
            golden.path.display()
        ));
    };
    if lines.is_empty() {
        return Death::Unknown(format!(
            "died by signal {signal} with no kernel WARN in this boot: not the recorded {} ({})",
            expected.token(),
            golden.path.display()
        ));
    }
    let outside: Vec<&&str> = lines
        .iter()
        .filter(|l| classes.is_empty() || !classes.contains(&HazardClass::of(l)))
        .collect();
    if classes.is_empty() || !outside.is_empty() {
        return Death::Unknown(format!(
            "died by signal {signal}; the kernel logged a WARN outside the recorded {}: {}",
            expected.token(),
            outside
                .iter()
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    Death::Known(format!(
        "died by signal {signal} with the kernel's {} — the known failure {} of {}",
        lines
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" | "),
        expected.token(),
        golden.path.display()
    ))
}

/// The lane's golden file, from its `env.json` (host key and kernel release).
pub fn lane_golden(out: &Path, dir: &Path) -> Option<Golden> {
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("env.json")).ok()?).ok()?;
    let key = env.get("host_key")?.as_str()?;
    let release = env.get("host")?.get("kernel")?.get("release")?.as_str()?;
    let series = trackcheck_harness::host::kernel_series(release)?;
    Golden::load(dir, &format!("{key}@{series}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(token: &str) -> Golden {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("trackcheck-death-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("k@7.2.snap"),
            format!(
                "---\nsource: x\n---\n{}  {token}  evidence\n",
                entry_name("aarch64")
            ),
        )
        .expect("write");
        let g = Golden::load(&dir, "k@7.2").expect("loads");
        let _ = std::fs::remove_dir_all(&dir);
        g
    }

    const WARN: &str = "[  245.4] WARNING: arch/arm64/kvm/debug.c:157 at kvm_vcpu_load_debug+0x190/0x230, CPU#1: trackcheck/2632";

    #[test]
    fn a_recorded_death_with_its_warn_is_known() {
        let g = golden("intermittent:hazard(warn@arch/arm64/kvm/debug.c:157)");
        let d = judge("aarch64", 11, WARN, &g);
        assert!(matches!(d, Death::Known(_)), "{d:?}");
    }

    #[test]
    fn a_death_without_the_warn_or_with_another_is_not() {
        let g = golden("intermittent:hazard(warn@arch/arm64/kvm/debug.c:157)");
        assert!(matches!(
            judge("aarch64", 11, "quiet boot", &g),
            Death::Unknown(_)
        ));
        let other = format!("{WARN}\nWARNING: mm/gup.c:1 at f+0x1/0x2, CPU#0: trackcheck/1");
        let Death::Unknown(why) = judge("aarch64", 11, &other, &g) else {
            panic!("a WARN elsewhere is not the recorded death");
        };
        assert!(why.contains("mm/gup.c:1"), "{why}");
        // hazard(any) would accept every death with a WARN: a golden file must name places.
        let any = golden("intermittent:hazard(any)");
        assert!(matches!(
            judge("aarch64", 11, WARN, &any),
            Death::Unknown(_)
        ));
    }

    #[test]
    fn an_unrecorded_death_is_not_known() {
        let g = Golden::default();
        let Death::Unknown(why) = judge("aarch64", 11, WARN, &g) else {
            panic!("nothing recorded");
        };
        assert!(
            why.contains("process-death") && why.contains("debug.c:157"),
            "{why}"
        );
    }
}
