//! Execution modes: how the guest's writes reach memory, and the proof of which one ran.
//!
//! Two paths track writes differently, so both are scenarios:
//! - `native`: the guest's stores run on the CPU and fault into KVM's MMU only when a page is
//!   write-protected. On PVM that takes CPL3 code (PVM executes CPL0 in its emulator); on
//!   VMX/SVM/arm64 it is ordinary kernel-mode code.
//! - `emulated`: the guest's writes go through KVM's x86 emulator, whose writes are marked
//!   dirty by a different path (`kvm_write_guest`-style). On PVM a CPL0 guest is emulated
//!   whole. On VMX/SVM the guest runs natively at CPL0 and every store to tracked memory carries
//!   KVM's forced-emulation prefix (`ud2; .ascii "kvm"`), which KVM honours only where kvm.ko's
//!   `force_emulation_prefix` parameter is set: there the emulator makes exactly those stores
//!   (the stamp stores and the page-table stores), and everything else (progress, doorbells,
//!   reads, loop control) runs on the CPU. Where it is not set, the mode is unsupported.
//!
//! What was asked for is not proof: [`ModeEvidence`] compares KVM's own `insn_emulation`
//! counter with the writes the guest completed and says what actually happened.

use serde::{Deserialize, Serialize};

use trackcheck_guests::compiled::StoreForm;

use crate::host::{BackendKind, FORCE_EMULATION_PREFIX, ForceEmulationPrefix};
use crate::vcpu::FailureKind;

/// How the guest should execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionMode {
    /// Stores run on the CPU.
    Native,
    /// The guest's writes run in KVM's instruction emulator: on PVM every instruction of a
    /// CPL0 guest; on VMX/SVM each store to tracked memory, through the forced-emulation prefix.
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
    /// The guest's stores to tracked memory carry KVM's forced-emulation prefix (emulated mode
    /// on VMX/SVM).
    #[serde(default)]
    pub forced_emulation: bool,
}

impl ModePlan {
    /// How the compiler must emit the guest's stores to tracked memory.
    #[must_use]
    pub const fn store_form(&self) -> StoreForm {
        if self.forced_emulation {
            StoreForm::ForcedEmulation
        } else {
            StoreForm::Plain
        }
    }
}

/// What a run failure of `kind` most likely means for a guest whose stores were emitted as
/// `stores`, when that form explains a failure of that kind (a forced-emulation prefix KVM did
/// not honour); `None` otherwise.
#[must_use]
pub fn failure_hint(stores: StoreForm, kind: &FailureKind) -> Option<String> {
    if stores != StoreForm::ForcedEmulation {
        return None;
    }
    let now = ForceEmulationPrefix::probe();
    match kind {
        FailureKind::Shutdown => Some(format!(
            "the guest's stores carry KVM's forced-emulation prefix (ud2; \"kvm\"): unless \
                 the program faults on purpose, this shutdown is a #UD that reached the guest \
                 (it has no IDT) because KVM did not honour the prefix ({FORCE_EMULATION_PREFIX} \
                 is {} now) or its emulator could not decode the store after it; on SVM the pc \
                 above is the reset vector, not where the guest stopped",
            describe(&now)
        )),
        FailureKind::InternalError { suberror: 1 } => Some(
            "suberror 1 is KVM_INTERNAL_ERROR_EMULATION: KVM's emulator failed on a store \
                 the forced-emulation prefix sent it (see dmesg)"
                .into(),
        ),
        _ => None,
    }
}

/// "1 (on)", "0 (off)", "absent".
fn describe(p: &ForceEmulationPrefix) -> String {
    match p {
        ForceEmulationPrefix::On { value } => format!("{value} (on)"),
        ForceEmulationPrefix::Off { value } => format!("{value} (off)"),
        ForceEmulationPrefix::Absent => "absent".into(),
        ForceEmulationPrefix::Unreadable { value } => format!("{value:?} (unreadable)"),
    }
}

/// How to get `mode` on `backend`, or why it cannot be had, with kvm.ko's
/// `force_emulation_prefix` read from the running kernel (see [`plan_with`]).
pub fn plan(mode: ExecutionMode, backend: BackendKind) -> Result<ModePlan, String> {
    plan_with(mode, backend, &ForceEmulationPrefix::probe())
}

/// How to get `mode` on `backend` when kvm.ko's `force_emulation_prefix` is `fep` (only
/// emulated mode on VMX/SVM depends on it).
pub fn plan_with(
    mode: ExecutionMode,
    backend: BackendKind,
    fep: &ForceEmulationPrefix,
) -> Result<ModePlan, String> {
    match (mode, backend) {
        (ExecutionMode::Native, BackendKind::Pvm) => Ok(ModePlan {
            mode,
            cpl: 3,
            why: "PVM runs CPL3 guest code on the CPU under shadow paging".into(),
            forced_emulation: false,
        }),
        (ExecutionMode::Emulated, BackendKind::Pvm) => Ok(ModePlan {
            mode,
            cpl: 0,
            why: "PVM runs CPL0 guest code in KVM's instruction emulator".into(),
            forced_emulation: false,
        }),
        (ExecutionMode::Native, BackendKind::Vmx | BackendKind::Svm | BackendKind::Unknown) => {
            Ok(ModePlan {
                mode,
                cpl: 0,
                why: "hardware virtualisation runs CPL0 guest code natively".into(),
                forced_emulation: false,
            })
        }
        (ExecutionMode::Native, BackendKind::Arm64) => Ok(ModePlan {
            mode,
            cpl: 1,
            why: "arm64 KVM runs EL1 guest code natively".into(),
            forced_emulation: false,
        }),
        (ExecutionMode::Emulated, BackendKind::Vmx | BackendKind::Svm) => match fep {
            ForceEmulationPrefix::On { value } => Ok(ModePlan {
                mode,
                cpl: 0,
                why: format!(
                    "kvm's force_emulation_prefix is {value}: the guest runs natively at CPL0 \
                     and every store to tracked memory carries the forced-emulation prefix \
                     (ud2; \"kvm\"), so KVM's instruction emulator makes each of them"
                ),
                forced_emulation: true,
            }),
            ForceEmulationPrefix::Off { .. } => Err(
                "kvm's force_emulation_prefix module parameter is off: load kvm with \
                 force_emulation_prefix=1"
                    .into(),
            ),
            ForceEmulationPrefix::Absent => Err(format!(
                "kvm's force_emulation_prefix module parameter is absent ({FORCE_EMULATION_PREFIX} \
                 does not exist): load kvm with force_emulation_prefix=1"
            )),
            ForceEmulationPrefix::Unreadable { value } => Err(format!(
                "kvm's force_emulation_prefix module parameter reads {value:?}, neither a number \
                 nor Y/N: load kvm with force_emulation_prefix=1"
            )),
        },
        // Worded as before the prefix was supported: the arm64 golden matrix records it.
        (ExecutionMode::Emulated, other @ (BackendKind::Arm64 | BackendKind::Unknown)) => {
            Err(format!(
                "the {} backend runs guest code natively at every privilege level; only PVM \
                 (CPL0 guests) offers a whole-guest emulated path",
                other.name()
            ))
        }
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
    /// stamped write takes four instructions, so a guest run whole by the emulator scores about
    /// 4x or more; with the forced-emulation prefix only the stamp store of each write is
    /// emulated, which scores one per write plus the doorbells and page-table stores: the bar
    /// still holds. The count cannot tell an emulated store from an emulated doorbell; that
    /// every stamped store carries the prefix is the compiler's tested promise, and a prefixed
    /// store cannot run on the CPU instead: its `ud2` would fault); native when it ran fewer than one per 16 writes (only doorbells and a few
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

    const BACKENDS: [BackendKind; 5] = [
        BackendKind::Pvm,
        BackendKind::Vmx,
        BackendKind::Svm,
        BackendKind::Arm64,
        BackendKind::Unknown,
    ];

    fn on() -> ForceEmulationPrefix {
        ForceEmulationPrefix::On { value: "1".into() }
    }

    fn off() -> ForceEmulationPrefix {
        ForceEmulationPrefix::Off { value: "0".into() }
    }

    /// Every parameter state a host can show.
    fn every_fep() -> [ForceEmulationPrefix; 4] {
        [
            on(),
            off(),
            ForceEmulationPrefix::Absent,
            ForceEmulationPrefix::Unreadable { value: "?".into() },
        ]
    }

    #[test]
    fn plans_follow_the_backend() {
        for fep in every_fep() {
            let cpl = |m, b| plan_with(m, b, &fep).map(|p| (p.cpl, p.forced_emulation));
            assert_eq!(cpl(ExecutionMode::Native, BackendKind::Pvm), Ok((3, false)));
            assert_eq!(
                cpl(ExecutionMode::Emulated, BackendKind::Pvm),
                Ok((0, false))
            );
            assert_eq!(cpl(ExecutionMode::Native, BackendKind::Vmx), Ok((0, false)));
            assert_eq!(cpl(ExecutionMode::Native, BackendKind::Svm), Ok((0, false)));
            assert_eq!(
                cpl(ExecutionMode::Native, BackendKind::Arm64),
                Ok((1, false))
            );
            assert!(
                cpl(ExecutionMode::Emulated, BackendKind::Arm64)
                    .is_err_and(|e| e.contains("only PVM")),
                "the arm64 golden matrix records this reason"
            );
            assert!(cpl(ExecutionMode::Emulated, BackendKind::Unknown).is_err());
        }
    }

    #[test]
    fn pvm_plans_do_not_depend_on_the_prefix() {
        for mode in ExecutionMode::ALL {
            let plans: Vec<_> = every_fep()
                .iter()
                .map(|fep| plan_with(mode, BackendKind::Pvm, fep))
                .collect();
            assert!(plans.windows(2).all(|w| w[0] == w[1]), "{mode}: {plans:?}");
            assert_eq!(
                plans[0].as_ref().map(ModePlan::store_form),
                Ok(StoreForm::Plain)
            );
        }
    }

    #[test]
    fn emulated_on_vmx_and_svm_needs_the_prefix_parameter() {
        for backend in [BackendKind::Vmx, BackendKind::Svm] {
            let p = plan_with(ExecutionMode::Emulated, backend, &on()).expect("prefix on");
            assert_eq!((p.cpl, p.store_form()), (0, StoreForm::ForcedEmulation));
            assert!(p.why.contains("forced-emulation prefix"), "{}", p.why);
            let refused = plan_with(ExecutionMode::Emulated, backend, &off()).unwrap_err();
            assert_eq!(
                refused,
                "kvm's force_emulation_prefix module parameter is off: load kvm with \
                 force_emulation_prefix=1"
            );
            for fep in [
                ForceEmulationPrefix::Absent,
                ForceEmulationPrefix::Unreadable { value: "?".into() },
            ] {
                let refused = plan_with(ExecutionMode::Emulated, backend, &fep).unwrap_err();
                assert!(
                    refused.contains("force_emulation_prefix=1"),
                    "{fep:?}: {refused}"
                );
            }
        }
        // Only those two backends: nothing else gets the prefix.
        for backend in BACKENDS {
            for mode in ExecutionMode::ALL {
                let forced = plan_with(mode, backend, &on()).is_ok_and(|p| p.forced_emulation);
                let expect = mode == ExecutionMode::Emulated
                    && matches!(backend, BackendKind::Vmx | BackendKind::Svm);
                assert_eq!(forced, expect, "{mode} on {}", backend.name());
            }
        }
    }

    #[test]
    fn the_live_plan_reads_the_running_kernel() {
        let live = ForceEmulationPrefix::probe();
        assert_eq!(
            plan(ExecutionMode::Emulated, BackendKind::Svm),
            plan_with(ExecutionMode::Emulated, BackendKind::Svm, &live)
        );
    }

    #[test]
    fn a_shutdown_under_the_prefix_says_why() {
        let fep = plan_with(ExecutionMode::Emulated, BackendKind::Svm, &on())
            .expect("on")
            .store_form();
        let hint = failure_hint(fep, &FailureKind::Shutdown).expect("a hint");
        assert!(hint.contains("did not honour the prefix"), "{hint}");
        assert!(hint.contains(FORCE_EMULATION_PREFIX), "{hint}");
        assert!(
            failure_hint(fep, &FailureKind::InternalError { suberror: 1 })
                .is_some_and(|h| h.contains("emulator"))
        );
        assert_eq!(failure_hint(fep, &FailureKind::Unexpected), None);
        let pvm = plan_with(ExecutionMode::Emulated, BackendKind::Pvm, &on()).expect("pvm");
        assert_eq!(failure_hint(pvm.store_form(), &FailureKind::Shutdown), None);
    }

    #[test]
    fn an_old_plan_without_the_field_reads_back() {
        let json = r#"{"mode":"emulated","cpl":0,"why":"PVM"}"#;
        let p: ModePlan = serde_json::from_str(json).expect("reads");
        assert!(!p.forced_emulation);
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
        // Forced emulation: one emulated store per write, plus a doorbell.
        assert!(ModeEvidence::new(ExecutionMode::Emulated, 100, Some(101), None).matches());
        assert!(
            !ModeEvidence::new(ExecutionMode::Emulated, 100, Some(99), None).matches(),
            "a write short of one emulation per write is not proof"
        );
        assert!(!ModeEvidence::new(ExecutionMode::Native, 100, Some(400), None).matches());
    }
}
