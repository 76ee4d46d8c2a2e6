//! The trackcheck harness: KVM VMs, memslots, vCPUs, guest memory backings, binary stats,
//! host profiling, tracking mechanisms and the oracle.
//!
//! This is the only crate of the workspace with `unsafe` code; every block carries a
//! `// SAFETY:` comment naming the check that makes it sound.

pub mod arch;
pub mod host;
pub mod machine;
pub mod memory;
pub mod mode;
pub mod oracle;
pub mod support;
pub mod sys;
pub mod track;
pub mod vcpu;
pub mod vm;

pub use host::HostProfile;
pub use machine::{Machine, MachineConfig, MachineError};
pub use memory::{Backing, GuestMemory};
pub use mode::{ExecutionMode, ModeEvidence, ObservedMode};
pub use support::{Mechanism, Support};
pub use vcpu::{RunFailure, RunLimits, Stop};
pub use vm::Vm;
