//! Architecture-specific pieces behind the same names on every architecture: guest CPU facts,
//! vCPU setup and entry, registers for reports, the MMU reset, page-table entry formats. The
//! page-table builder itself is shared ([`tables`]).

mod tables;

pub use tables::{Format, LeafArea, Mapping, PageTableError, PageTables, Walk, walk};

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use self::aarch64::*;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("trackcheck-harness supports x86_64 and aarch64 hosts");
