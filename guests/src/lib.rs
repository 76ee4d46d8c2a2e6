//! Guest programs for trackcheck: the pattern IR ([`program`]), the guest-physical layout every
//! architecture shares ([`layout`]), a reference interpreter that says which write each vCPU made
//! and in what order ([`sim`]), and compilers from the IR to machine code.
//!
//! This crate is pure code generation: it builds and tests on any host, with or without KVM.
#![forbid(unsafe_code)]

pub mod aarch64;
pub mod compiled;
pub mod layout;
pub mod program;
pub mod sim;
pub mod x86_64;

pub use layout::{GuestPageSize, PAGE_SIZE};
pub use program::{Access, Misbehaviour, Op, PageSeq, Program, ProgramError, Repeat, Thread};
pub use sim::{Event, stamp, stamp_seq, stamp_vcpu};

/// The compiler for the architecture this crate is built for (what a harness on this host
/// runs).
#[cfg(target_arch = "aarch64")]
pub use aarch64 as native;
/// The compiler for the architecture this crate is built for (what a harness on this host
/// runs).
#[cfg(target_arch = "x86_64")]
pub use x86_64 as native;
