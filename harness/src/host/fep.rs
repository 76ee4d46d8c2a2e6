//! kvm.ko's `force_emulation_prefix` parameter: whether KVM honours its forced-emulation prefix
//! (`ud2; .ascii "kvm"`, intercepted as a `#UD`) by running the next guest instruction in its
//! instruction emulator (`handle_ud` in arch/x86/kvm/x86.c).
//!
//! Older kernels have it as a bool (`Y`/`N`, read-only); since 6.1 it is an int whose bit 1
//! also clears RFLAGS.RF (any nonzero value enables the prefix, as the KVM selftests'
//! `kvm_is_forced_emulation_enabled` reads it), and recent kernels make it writable at run
//! time (`READ_ONCE` in `handle_ud`). The suite only reads it.

use std::path::Path;

use super::Backend;

/// Where the running kernel exposes the parameter.
pub const FORCE_EMULATION_PREFIX: &str = "/sys/module/kvm/parameters/force_emulation_prefix";

/// The state of `kvm.force_emulation_prefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForceEmulationPrefix {
    /// Set (a nonzero int, or `Y`): KVM emulates the instruction after the prefix.
    On {
        /// The value as read.
        value: String,
    },
    /// Off (`0` or `N`): the prefix's `ud2` reaches the guest as a `#UD`.
    Off {
        /// The value as read.
        value: String,
    },
    /// No such parameter: kvm.ko is not loaded, or not x86.
    Absent,
    /// A value this suite cannot read (treated as off).
    Unreadable {
        /// The value as read.
        value: String,
    },
}

impl ForceEmulationPrefix {
    /// Classify a raw parameter value (`None`: there is no such parameter).
    #[must_use]
    pub fn parse(raw: Option<&str>) -> Self {
        let Some(raw) = raw else { return Self::Absent };
        let value = raw.trim().to_string();
        match value.as_str() {
            "Y" | "y" => Self::On { value },
            "N" | "n" => Self::Off { value },
            v => match v.parse::<i64>() {
                Ok(0) => Self::Off { value },
                Ok(_) => Self::On { value },
                Err(_) => Self::Unreadable { value },
            },
        }
    }

    /// Read the running kernel's parameter.
    #[must_use]
    pub fn probe() -> Self {
        Self::read_from(Path::new(FORCE_EMULATION_PREFIX))
    }

    /// Read the parameter from `path` (a missing file is [`Self::Absent`]).
    #[must_use]
    pub fn read_from(path: &Path) -> Self {
        Self::parse(std::fs::read_to_string(path).ok().as_deref())
    }

    /// True when KVM honours the prefix.
    #[must_use]
    pub const fn is_on(&self) -> bool {
        matches!(self, Self::On { .. })
    }
}

impl Backend {
    /// `kvm.force_emulation_prefix` as it was when this backend was probed (from
    /// [`Backend::module_params`]; also right for a profile read back from a report).
    #[must_use]
    pub fn force_emulation_prefix(&self) -> ForceEmulationPrefix {
        ForceEmulationPrefix::parse(
            self.module_params
                .get("kvm")
                .and_then(|p| p.get("force_emulation_prefix"))
                .map(String::as_str),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bool_and_int_kernels_both_read() {
        let p = |s| ForceEmulationPrefix::parse(Some(s));
        assert!(p("Y\n").is_on(), "bool kernels (before 6.1)");
        assert!(p("1\n").is_on());
        assert!(p("3").is_on(), "bit 1 (clear RFLAGS.RF) with the prefix on");
        assert!(p("2").is_on(), "any nonzero value enables it");
        assert_eq!(p("0\n"), ForceEmulationPrefix::Off { value: "0".into() });
        assert_eq!(p("N"), ForceEmulationPrefix::Off { value: "N".into() });
        assert!(matches!(
            p("maybe"),
            ForceEmulationPrefix::Unreadable { .. }
        ));
        assert_eq!(
            ForceEmulationPrefix::parse(None),
            ForceEmulationPrefix::Absent
        );
    }

    #[test]
    fn a_missing_file_is_absent() {
        assert_eq!(
            ForceEmulationPrefix::read_from(Path::new("/nonexistent/force_emulation_prefix")),
            ForceEmulationPrefix::Absent
        );
    }

    #[test]
    fn the_backend_reads_its_module_params() {
        let mut backend = crate::host::probe_backend();
        backend
            .module_params
            .entry("kvm".into())
            .or_default()
            .insert("force_emulation_prefix".into(), "1".into());
        assert!(backend.force_emulation_prefix().is_on());
        backend.module_params.remove("kvm");
        assert_eq!(
            backend.force_emulation_prefix(),
            ForceEmulationPrefix::Absent
        );
    }
}
