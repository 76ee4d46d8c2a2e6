//! [`RunFailure`]: a run segment that did not end at a doorbell, and how it reads per backend.
//!
//! What the PC means after a failure depends on the backend. On a shutdown (x86 triple fault)
//! SVM KVM INITs the vCPU before returning KVM_EXIT_SHUTDOWN (arch/x86/kvm/svm/svm.c,
//! `shutdown_interception`: "VMCB is undefined after a SHUTDOWN intercept", then
//! `kvm_vcpu_reset(vcpu, true)`), so the registers userspace reads afterwards are the reset
//! state (RIP 0xfff0 with CS base 0xffff0000), not where the guest failed. VMX
//! (`handle_triple_fault`) and PVM leave the registers as the fault left them. A failure says
//! which it is, so nobody hunts for a bug at 0xfff0.

use std::time::Duration;

use crate::host::BackendKind;

/// The x86 reset vector's RIP (CS base 0xffff0000): what an INIT leaves in RIP.
pub const X86_RESET_RIP: u64 = 0xfff0;

/// What went wrong in a run segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// No doorbell before the deadline.
    Watchdog {
        /// The deadline.
        limit: Duration,
    },
    /// Too many unexplained exits: a livelock.
    ExitStorm {
        /// Unexplained exits counted.
        count: u64,
    },
    /// KVM_EXIT_SHUTDOWN (x86: a triple fault, or on PVM an instruction it cannot deliver at
    /// CPL3) or arm64's PSCI SYSTEM_OFF / SYSTEM_RESET event.
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR.
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// KVM_EXIT_FAIL_ENTRY.
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit this protocol never produces.
    Unexpected,
    /// KVM_RUN itself failed.
    Ioctl {
        /// errno text.
        text: String,
    },
}

/// A run segment that did not end at a doorbell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFailure {
    /// vCPU index.
    pub vcpu: usize,
    /// What happened.
    pub kind: FailureKind,
    /// The KVM backend the vCPU ran on: it decides what a shutdown means and whether `pc` is
    /// where the guest stopped or the reset state KVM put the vCPU in.
    pub backend: BackendKind,
    /// Guest PC when it stopped, if the registers could be read.
    pub pc: Option<u64>,
    /// Guest privilege level when it stopped.
    pub cpl: Option<u8>,
    /// The last exit seen, described.
    pub last_exit: String,
    /// Exits in the segment.
    pub exits: u64,
    /// How long the segment ran.
    pub elapsed: Duration,
    /// Where the PC is, in program terms, and the instruction there (filled in by the
    /// machine, which knows the code; empty when [`RunFailure::pc_is_reset_state`]).
    pub context: String,
}

/// What a shutdown is on `backend`, for the failure text.
#[must_use]
pub fn shutdown_text(backend: BackendKind) -> &'static str {
    match backend {
        BackendKind::Pvm => {
            "shutdown (x86 triple fault, or an instruction PVM cannot deliver at CPL3: hlt, \
             invlpg, mov cr3, syscall)"
        }
        BackendKind::Svm => {
            "shutdown (x86 triple fault; SVM KVM resets the vCPU on a shutdown intercept, so the \
             registers read afterwards are the reset state, not where the guest failed)"
        }
        BackendKind::Vmx => "shutdown (x86 triple fault)",
        BackendKind::Arm64 => "shutdown (PSCI SYSTEM_OFF or SYSTEM_RESET)",
        BackendKind::Unknown => {
            "shutdown (x86 triple fault, or arm64 PSCI SYSTEM_OFF/RESET; some backends reset \
             the vCPU on it, so the PC may be the reset state)"
        }
    }
}

impl RunFailure {
    /// True when `pc` is the reset state KVM put the vCPU in on a shutdown, not where the guest
    /// failed: SVM always resets on a shutdown intercept; on VMX and unknown x86 backends a PC
    /// of exactly the reset vector can only be that state (guest code never lives there). PVM
    /// and arm64 never reset on shutdown.
    #[must_use]
    pub fn pc_is_reset_state(&self) -> bool {
        self.kind == FailureKind::Shutdown
            && match self.backend {
                BackendKind::Svm => true,
                BackendKind::Vmx | BackendKind::Unknown => {
                    cfg!(target_arch = "x86_64") && self.pc == Some(X86_RESET_RIP)
                }
                BackendKind::Pvm | BackendKind::Arm64 => false,
            }
    }
}

impl std::fmt::Display for RunFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.kind {
            FailureKind::Watchdog { limit } => {
                format!("no doorbell within {:.1}s (watchdog)", limit.as_secs_f64())
            }
            FailureKind::ExitStorm { count } => {
                format!("livelock: {count} exits without reaching a doorbell")
            }
            FailureKind::Shutdown => shutdown_text(self.backend).into(),
            FailureKind::InternalError { suberror } => {
                format!("KVM internal error, suberror {suberror}")
            }
            FailureKind::FailEntry { reason } => format!("VM entry failed, reason {reason:#x}"),
            FailureKind::Unexpected => "unexpected exit".into(),
            FailureKind::Ioctl { text } => format!("KVM_RUN failed: {text}"),
        };
        write!(
            f,
            "vCPU {}: {what}; last exit {}, {} exits in {:.3}s",
            self.vcpu,
            self.last_exit,
            self.exits,
            self.elapsed.as_secs_f64()
        )?;
        if self.pc_is_reset_state() {
            let pc = self.pc.map_or_else(String::new, |pc| format!(" {pc:#x}"));
            write!(
                f,
                ", pc{pc} is the reset state KVM ({}) put the vCPU in on the shutdown, not where \
                 the guest failed (KVM keeps no record of that; the vCPU's progress counter says \
                 which write it completed last)",
                self.backend.name()
            )?;
            return Ok(());
        }
        if let Some(pc) = self.pc {
            write!(f, ", pc {pc:#x}")?;
        }
        if let Some(cpl) = self.cpl {
            write!(f, " (CPL{cpl})")?;
        }
        if !self.context.is_empty() {
            write!(f, ", {}", self.context)?;
        }
        Ok(())
    }
}

impl std::error::Error for RunFailure {}

#[cfg(test)]
mod tests {
    use super::*;

    fn shutdown(backend: BackendKind, pc: u64) -> RunFailure {
        RunFailure {
            vcpu: 1,
            kind: FailureKind::Shutdown,
            backend,
            pc: Some(pc),
            cpl: Some(0),
            last_exit: "SHUTDOWN".into(),
            exits: 3,
            elapsed: Duration::from_millis(5),
            context: "outside vCPU 1's code, no decodable instruction there".into(),
        }
    }

    #[test]
    fn svm_shutdown_says_the_pc_is_the_reset_state() {
        let text = shutdown(BackendKind::Svm, X86_RESET_RIP).to_string();
        assert!(text.contains("SVM KVM resets the vCPU"), "{text}");
        assert!(
            text.contains("pc 0xfff0 is the reset state KVM (svm)"),
            "{text}"
        );
        assert!(!text.contains("outside vCPU"), "no program context: {text}");
        assert!(!text.contains("PVM"), "{text}");
    }

    #[test]
    fn vmx_shutdown_keeps_the_pc_unless_it_is_the_reset_vector() {
        let text = shutdown(BackendKind::Vmx, 0x40_1000).to_string();
        assert!(text.contains("shutdown (x86 triple fault)"), "{text}");
        assert!(
            text.contains("pc 0x401000 (CPL0), outside vCPU 1's code"),
            "{text}"
        );
        assert!(!text.contains("PVM") && !text.contains("reset"), "{text}");
        let at_reset = shutdown(BackendKind::Vmx, X86_RESET_RIP);
        assert_eq!(
            at_reset.pc_is_reset_state(),
            cfg!(target_arch = "x86_64"),
            "{at_reset}"
        );
    }

    #[test]
    fn pvm_shutdown_names_pvm_and_keeps_the_context() {
        let text = shutdown(BackendKind::Pvm, X86_RESET_RIP).to_string();
        assert!(text.contains("PVM cannot deliver at CPL3"), "{text}");
        assert!(
            text.contains("pc 0xfff0 (CPL0), outside vCPU 1's code"),
            "{text}"
        );
        assert!(!text.contains("reset state"), "{text}");
    }

    #[test]
    fn arm64_shutdown_is_a_psci_event() {
        let text = shutdown(BackendKind::Arm64, X86_RESET_RIP).to_string();
        assert!(text.contains("PSCI SYSTEM_OFF or SYSTEM_RESET"), "{text}");
        assert!(!text.contains("PVM") && !text.contains("triple"), "{text}");
        assert!(text.contains("outside vCPU 1's code"), "{text}");
    }

    #[test]
    fn other_failures_never_claim_a_reset() {
        let mut f = shutdown(BackendKind::Svm, X86_RESET_RIP);
        f.kind = FailureKind::Watchdog {
            limit: Duration::from_secs(1),
        };
        assert!(!f.pc_is_reset_state());
        assert!(f.to_string().contains("pc 0xfff0 (CPL0), outside"), "{f}");
    }
}
