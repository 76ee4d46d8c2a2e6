//! [`MachineError`]: what can go wrong building or running a machine, and which of it is a
//! skip (the host lacks something) rather than a failure.

use trackcheck_guests::compiled::CompileError;

use crate::arch::PageTableError;
use crate::memory::MemoryError;
use crate::vcpu::RunFailure;
use crate::vm::VmError;

/// Errors building or running a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The configuration cannot work anywhere.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// This host cannot provide what the configuration asks for (a skip, not a failure).
    #[error("{what} is not supported on this host: {reason}")]
    Unsupported {
        /// What was asked for.
        what: String,
        /// Why it cannot be had.
        reason: String,
    },
    /// A VM operation failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The program does not compile.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// Page tables could not be built.
    #[error("guest page tables: {0}")]
    PageTables(#[from] PageTableError),
    /// Setting up a vCPU failed.
    #[error("vCPU {vcpu}: {text}")]
    Vcpu {
        /// vCPU index.
        vcpu: usize,
        /// What failed.
        text: String,
    },
    /// The program does not fit this machine.
    #[error("program does not fit the machine: {0}")]
    Program(String),
    /// One or more vCPUs failed a run segment.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Run(Vec<RunFailure>),
}

impl MachineError {
    /// True when the host lacks something (the trial should be skipped with this reason).
    #[must_use]
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            Self::Unsupported { .. }
                | Self::Memory(MemoryError::Unsupported { .. } | MemoryError::NoHugepages { .. })
                | Self::Vm(VmError::Kvm(_))
        )
    }
}
