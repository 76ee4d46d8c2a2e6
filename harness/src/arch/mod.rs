//! Architecture-specific pieces behind the same names on every architecture: guest CPU facts,
//! vCPU entry setup, guest page tables.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;

#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "trackcheck-harness supports x86_64 hosts so far; the aarch64 backend is tracked as its own issue"
);
