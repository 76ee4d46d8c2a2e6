//! Executable models of dirty-tracking designs no host here runs (the seeds): a software MMU
//! ([`mmu`]), a modelled VM stepping guest programs and a host protocol ([`world`]), the
//! designs ([`baseline`], [`pml`], [`genwp`], [`dbm`]) with their known-bad mutants, and the
//! explorers ([`explore`]). The stepped oracle that judges real KVM (`Ledger`) judges them, and
//! the baseline is held against real KVM on the same programs ([`anchor`]).
//!
//! Not to be confused with `crate::model`, the proptest state machine of host/guest
//! interleavings against real KVM.

pub mod access;
pub mod anchor;
pub mod baseline;
pub mod dbm;
pub mod explore;
pub mod genwp;
pub mod idle;
pub mod mmu;
pub mod ops;
pub mod pml;
pub mod scenarios;
pub mod trials;
pub mod world;

#[cfg(test)]
mod anchor_tests;
#[cfg(test)]
mod tests;

pub use world::Design;

/// Every design as proposed, in the order of priority.
#[must_use]
pub fn designs() -> Vec<Box<dyn Design>> {
    vec![
        Box::new(baseline::Baseline::default()),
        Box::new(pml::Pml::default()),
        Box::new(genwp::GenWp::default()),
        Box::new(dbm::Dbm::default()),
        Box::new(idle::Idle::default()),
    ]
}

/// Every known-bad variant of every design.
#[must_use]
pub fn mutants() -> Vec<Box<dyn Design>> {
    let mut out: Vec<Box<dyn Design>> = Vec::new();
    for m in baseline::Baseline::MUTANTS {
        out.push(Box::new(baseline::Baseline { mutant: Some(m) }));
    }
    for m in pml::Pml::MUTANTS {
        out.push(Box::new(pml::Pml { mutant: Some(m) }));
    }
    for m in genwp::GenWp::MUTANTS {
        out.push(Box::new(genwp::GenWp { mutant: Some(m) }));
    }
    for m in dbm::Dbm::MUTANTS {
        out.push(Box::new(dbm::Dbm { mutant: Some(m) }));
    }
    for m in idle::Idle::MUTANTS {
        out.push(Box::new(idle::Idle { mutant: Some(m) }));
    }
    out
}
