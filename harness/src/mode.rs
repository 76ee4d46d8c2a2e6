//! Execution modes: how the guest's writes reach memory, and the proof of which one ran.
//!
//! Two paths track writes differently, so both are scenarios:
//! - `native`: the guest's stores run on the CPU and fault into KVM's MMU only when a page is
//!   write-protected. On PVM that takes CPL3 code (PVM executes CPL0 in its emulator); on
//!   VMX/SVM/arm64 it is ordinary kernel-mode code.
//! - `emulated`: every instruction goes through KVM's x86 emulator, whose writes are marked
//!   dirty by a different path (`kvm_write_guest`-style). On PVM a CPL0 guest is emulated.
//!
//! What was asked for is not proof: [`ModeEvidence`] compares KVM's own `insn_emulation`
//! counter with the writes the guest completed and says what actually happened.

use serde::{Deserialize, Serialize};

use crate::host::BackendKind;

/// How the guest should execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Stores run on the CPU.
    Native,
    /// Every instruction runs in KVM's instruction emulator.
    Emulated,
}

impl ExecutionMode {
    /// Both modes, in report order.
    pub const ALL: [Self; 2] = [Self::Native, Self::Emulated];

    /// Name for trial names and reports.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Emulated => "emulated",
        }
    }
}

impl std::fmt::Display for ExecutionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

impl std::str::FromStr for ExecutionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "emulated" => Ok(Self::Emulated),
            other => Err(format!(
                "unknown execution mode {other:?}: expected native or emulated"
            )),
        }
    }
}

/// How a mode is obtained on a backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModePlan {
    /// The mode.
    pub mode: ExecutionMode,
    /// Privilege level the guest runs at.
    pub cpl: u8,
    /// Why this privilege level gives this mode here.
    pub why: String,
}

/// How to get `mode` on `backend`, or why it cannot be had.
pub fn plan(mode: ExecutionMode, backend: BackendKind) -> Result<ModePlan, String> {
    match (mode, backend) {
        (ExecutionMode::Native, BackendKind::Pvm) => Ok(ModePlan {
            mode,
            cpl: 3,
            why: "PVM runs CPL3 guest code on the CPU under shadow paging".into(),
        }),
        (ExecutionMode::Emulated, BackendKind::Pvm) => Ok(ModePlan {
            mode,
            cpl: 0,
            why: "PVM runs CPL0 guest code in KVM's instruction emulator".into(),
        }),
        (ExecutionMode::Native, BackendKind::Vmx | BackendKind::Svm | BackendKind::Unknown) => {
            Ok(ModePlan {
                mode,
                cpl: 0,
                why: "hardware virtualisation runs CPL0 guest code natively".into(),
            })
        }
        (ExecutionMode::Native, BackendKind::Arm64) => Ok(ModePlan {
            mode,
            cpl: 1,
            why: "arm64 KVM runs EL1 guest code natively".into(),
        }),
        (ExecutionMode::Emulated, other) => Err(format!(
            "the {} backend runs guest code natively at every privilege level; only PVM \
             (CPL0 guests) offers a whole-guest emulated path",
            other.name()
        )),
    }
}

/// What the stats say actually ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservedMode {
    /// Few emulated instructions relative to writes: stores ran on the CPU.
    Native,
    /// At least one emulated instruction per write (the writes themselves were emulated).
    Emulated,
    /// In between, or too few writes to tell.
    Inconclusive,
    /// The kernel offers no `insn_emulation` statistic.
    Unknown,
}

/// The evidence for one run: emulated instructions, exits and completed writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeEvidence {
    /// What was asked for.
    pub requested: ExecutionMode,
    /// Stamped writes the guest completed (from its published progress).
    pub writes: u64,
    /// `insn_emulation` summed over vCPUs, if the kernel has that statistic.
    pub insn_emulation: Option<u64>,
    /// `exits` summed over vCPUs.
    pub exits: Option<u64>,
    /// The verdict.
    pub observed: ObservedMode,
}

/// Fewest writes a run needs before its mode can be told apart.
pub const MIN_WRITES_FOR_EVIDENCE: u64 = 64;

impl ModeEvidence {
    /// Classify: emulated when the emulator ran at least one instruction per write (each
    /// stamped write takes four instructions, so a guest run by the emulator scores about 4x
    /// or more); native when it ran fewer than one per 16 writes (only doorbells and a few
    /// faults are emulated); inconclusive in between or with fewer than
    /// [`MIN_WRITES_FOR_EVIDENCE`] writes.
    #[must_use]
    pub fn new(
        requested: ExecutionMode,
        writes: u64,
        insn_emulation: Option<u64>,
        exits: Option<u64>,
    ) -> Self {
        let observed = match insn_emulation {
            None => ObservedMode::Unknown,
            Some(_) if writes < MIN_WRITES_FOR_EVIDENCE => ObservedMode::Inconclusive,
            Some(e) if e >= writes => ObservedMode::Emulated,
            Some(e) if e.saturating_mul(16) < writes => ObservedMode::Native,
            Some(_) => ObservedMode::Inconclusive,
        };
        Self {
            requested,
            writes,
            insn_emulation,
            exits,
            observed,
        }
    }

    /// True when the run provably got the mode it asked for.
    #[must_use]
    pub fn matches(&self) -> bool {
        matches!(
            (self.requested, self.observed),
            (ExecutionMode::Native, ObservedMode::Native)
                | (ExecutionMode::Emulated, ObservedMode::Emulated)
        )
    }

    /// One line for reports: "asked native, got native (12 emulated instructions for 20000
    /// writes)".
    #[must_use]
    pub fn summary(&self) -> String {
        let got = match self.observed {
            ObservedMode::Native => "native",
            ObservedMode::Emulated => "emulated",
            ObservedMode::Inconclusive => "inconclusive",
            ObservedMode::Unknown => "unknown (no insn_emulation statistic)",
        };
        let counts = self.insn_emulation.map_or_else(String::new, |e| {
            format!(" ({e} emulated instructions for {} writes)", self.writes)
        });
        format!("asked {}, got {got}{counts}", self.requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_the_backend() {
        assert_eq!(
            plan(ExecutionMode::Native, BackendKind::Pvm).map(|p| p.cpl),
            Ok(3)
        );
        assert_eq!(
            plan(ExecutionMode::Emulated, BackendKind::Pvm).map(|p| p.cpl),
            Ok(0)
        );
        assert_eq!(
            plan(ExecutionMode::Native, BackendKind::Vmx).map(|p| p.cpl),
            Ok(0)
        );
        assert!(
            plan(ExecutionMode::Emulated, BackendKind::Svm)
                .unwrap_err()
                .contains("PVM")
        );
    }

    #[test]
    fn evidence_classifies_by_emulations_per_write() {
        let e = |w, i| ModeEvidence::new(ExecutionMode::Native, w, Some(i), None).observed;
        assert_eq!(e(10_000, 12), ObservedMode::Native);
        assert_eq!(e(10_000, 40_000), ObservedMode::Emulated);
        assert_eq!(e(10_000, 5_000), ObservedMode::Inconclusive);
        assert_eq!(
            e(10, 0),
            ObservedMode::Inconclusive,
            "too few writes to tell"
        );
        assert_eq!(
            ModeEvidence::new(ExecutionMode::Native, 100, None, None).observed,
            ObservedMode::Unknown
        );
        assert!(ModeEvidence::new(ExecutionMode::Emulated, 100, Some(400), None).matches());
        assert!(!ModeEvidence::new(ExecutionMode::Native, 100, Some(400), None).matches());
    }
}
