//! Scenario drivers: each builds a machine and a tracker for a [`TrialSpec`], runs its
//! programs, and returns what the oracle found.

mod access;
mod concurrent;
mod content;
mod crosscheck;
mod damon;
mod driver;
mod geometry;
mod huge;
mod idle;
mod idle_mglru;
mod idle_page_idle;
#[cfg_attr(
    not(target_arch = "x86_64"),
    expect(
        dead_code,
        unused_imports,
        reason = "the family's x86 driver is the only user of its helpers and imports"
    )
)]
mod kvm_writes;
mod kvmtrace;
mod lru_gen;
mod memslot;
mod mglru;
mod page_idle;
pub(crate) mod phase;
mod property;
mod reclaim;
pub(crate) mod stepped;
mod tables;

pub use property::{cases, committed_regressions_dir, save_regressions_in, set_cases};

use std::time::Duration;

use trackcheck_harness::HostProfile;
use trackcheck_harness::machine::{Machine, MachineConfig, MachineError};
use trackcheck_harness::oracle::OracleReport;
use trackcheck_harness::track::inject::{Fault, Injected, applicability};
use trackcheck_harness::track::{PageSet, RearmKind, TrackError, Tracker, dirty_ring};
use trackcheck_harness::vcpu::RunLimits;
use trackcheck_harness::{ModeEvidence, ObservedMode, support};

use crate::spec::{Scenario, TrialSpec};

/// Why a trial ended without the oracle's verdict.
#[derive(Debug)]
pub enum TrialError {
    /// The host cannot run it (skip with this reason).
    Skip(String),
    /// The harness could not run it.
    Error(String),
    /// The kernel hung a vCPU, stormed it with exits or shut it down mid-trial: a FAIL with
    /// the watchdog's evidence.
    Hazard(String),
}

impl From<MachineError> for TrialError {
    fn from(e: MachineError) -> Self {
        match e {
            MachineError::Run(_) => Self::Hazard(e.to_string()),
            e if e.is_unsupported() => Self::Skip(e.to_string()),
            e => Self::Error(e.to_string()),
        }
    }
}

impl From<TrackError> for TrialError {
    fn from(e: TrackError) -> Self {
        match e {
            TrackError::Unsupported(why) => Self::Skip(why),
            e => Self::Error(e.to_string()),
        }
    }
}

impl From<trackcheck_harness::vm::VmError> for TrialError {
    fn from(e: trackcheck_harness::vm::VmError) -> Self {
        Self::Error(e.to_string())
    }
}

impl From<String> for TrialError {
    fn from(e: String) -> Self {
        Self::Error(e)
    }
}

/// What a scenario found.
#[derive(Debug, Default)]
pub struct Findings {
    /// The oracle's report (lost pages, counts).
    pub report: OracleReport,
    /// Problems that are not lost pages (API misbehaviour, cross-check disagreement).
    pub problems: Vec<String>,
    /// Kernel hazards met on the way (a vCPU KVM never lets run again); the oracle still
    /// checked everything the guest wrote before.
    pub hazards: Vec<String>,
    /// Supporting facts (mode evidence, stats, ring-full exits).
    pub evidence: Vec<String>,
    /// Pages an injected fault touched.
    pub affected: Option<PageSet>,
    /// `drop-page` with the oracle's pages at stake known: the dropped pages, each a lost write
    /// the oracle must name.
    pub lost_for_sure: Option<PageSet>,
    /// The execution mode, as proven by KVM's stats.
    pub mode: Option<ModeEvidence>,
    /// Why the trial could not prove it exercised its path (None: proven, or nothing to prove).
    pub not_exercised: Option<String>,
}

/// Whether `fault` deterministically loses a write in the trial `spec` on a mechanism whose
/// rearm is `kind` (the scenario's and the mechanism's conditions); the skip reason if not.
pub fn inject_applicability(spec: &TrialSpec, fault: Fault, kind: RearmKind) -> Result<(), String> {
    spec.scenario.loses_under(fault).map_err(|why| {
        format!(
            "{fault} cannot lose writes in {}: {why}",
            spec.scenario.name()
        )
    })?;
    applicability(fault, kind).map_err(|why| {
        format!(
            "{fault} cannot lose writes on {}: {why}",
            spec.tracker.label()
        )
    })
}

/// The tracker of a trial, with its injected fault if any.
#[derive(Debug)]
pub enum TrialTracker {
    /// The mechanism as it is.
    Plain(Box<dyn Tracker>),
    /// The mechanism with a deliberate loss.
    Injected(Injected),
}

impl TrialTracker {
    /// Build the tracker `spec` asks for; a fault that cannot lose writes on this mechanism is
    /// a skip with the reason.
    pub fn new(spec: &TrialSpec) -> Result<Self, TrialError> {
        let inner = spec.tracker.build();
        match spec.inject {
            None => Ok(Self::Plain(inner)),
            Some(fault) => {
                inject_applicability(spec, fault, inner.rearm_kind()).map_err(TrialError::Skip)?;
                Ok(Self::Injected(Injected::new(inner, fault)))
            }
        }
    }

    /// The tracker to drive.
    pub fn get(&mut self) -> &mut dyn Tracker {
        match self {
            Self::Plain(t) => t.as_mut(),
            Self::Injected(i) => i,
        }
    }

    /// Pages the injected fault touched.
    #[must_use]
    pub fn affected(&self) -> Option<PageSet> {
        match self {
            Self::Plain(_) => None,
            Self::Injected(i) => Some(i.affected().clone()),
        }
    }

    /// `drop-page`: the dropped pages that each lost a write (see `Injected::lost_for_sure`).
    #[must_use]
    pub fn lost_for_sure(&self) -> Option<PageSet> {
        match self {
            Self::Plain(_) => None,
            Self::Injected(i) => i.lost_for_sure().cloned(),
        }
    }
}

/// Data pages per scenario.
#[must_use]
pub fn data_pages(scenario: &Scenario) -> u64 {
    match scenario {
        Scenario::Stepped | Scenario::CrossCheck { .. } => 1024,
        Scenario::Race => 256,
        Scenario::Concurrent { .. } => 2048,
        Scenario::RingFull { .. } => 4096,
        Scenario::ClearGeometry => geometry::SLOT_PAGES,
        Scenario::PropPrograms | Scenario::PropInterleavings => property::PAGES,
        Scenario::Huge { path } => huge::shape(*path).1,
        Scenario::KvmWrites => kvm_writes::PAGES,
        Scenario::Memslot { op } => memslot::data_pages(*op),
        Scenario::GuestTables { case } => tables::data_pages(*case),
        Scenario::Access { .. } => access::PAGES,
        Scenario::ReclaimFile => reclaim::PAGES,
        Scenario::Idle { .. } => idle::PAGES,
    }
}

/// vCPUs per scenario.
#[must_use]
pub fn vcpus(scenario: &Scenario) -> usize {
    match scenario {
        Scenario::Concurrent { vcpus, .. }
        | Scenario::RingFull { vcpus }
        | Scenario::Huge {
            path: crate::spec::HugePath::Race { vcpus },
        } => usize::from(*vcpus),
        Scenario::ClearGeometry => 1,
        Scenario::GuestTables { case } => tables::vcpus(*case),
        _ => 2,
    }
}

/// Build the machine for `spec`.
pub fn machine(spec: &TrialSpec, tracker_ring: Option<u32>) -> Result<Machine, TrialError> {
    machine_with(
        spec,
        data_pages(&spec.scenario),
        vcpus(&spec.scenario),
        tracker_ring,
    )
}

/// Build a machine for `spec` with `data_pages` pages and `vcpus` vCPUs.
pub fn machine_with(
    spec: &TrialSpec,
    data_pages: u64,
    vcpus: usize,
    tracker_ring: Option<u32>,
) -> Result<Machine, TrialError> {
    Ok(Machine::new(machine_config(
        spec,
        data_pages,
        vcpus,
        tracker_ring,
    ))?)
}

/// The machine configuration [`machine_with`] builds.
#[must_use]
pub fn machine_config(
    spec: &TrialSpec,
    data_pages: u64,
    vcpus: usize,
    tracker_ring: Option<u32>,
) -> MachineConfig {
    MachineConfig {
        vcpus,
        data_pages,
        backing: spec.backing,
        mode: spec.mode,
        dirty_ring: tracker_ring,
        dirty_ring_with_bitmap: tracker_ring.is_some() && spec.tracker.ring_with_bitmap(),
        populate: spec.scenario != Scenario::ClearGeometry,
        limits: RunLimits {
            watchdog: Duration::from_secs(30),
            ..RunLimits::default()
        },
        ..MachineConfig::default()
    }
}

/// Check the host can run `spec` at all; the reason if not.
pub fn precheck(spec: &TrialSpec, host: &HostProfile) -> Result<(), String> {
    let mech = spec.tracker.mechanism();
    if let Some(r) = mech.support(host).reason() {
        return Err(format!("{mech}: {r}"));
    }
    if let Some(r) = support::mode_support(host, spec.mode).reason() {
        return Err(format!("{} execution: {r}", spec.mode));
    }
    if let Some(r) = support::backing_support(host, spec.backing).reason() {
        return Err(format!("{} backing: {r}", spec.backing));
    }
    if let Scenario::Access { kind } = spec.scenario {
        access::precheck(kind, host)?;
    }
    if spec.scenario == Scenario::ReclaimFile {
        reclaim::precheck(spec)?;
    }
    if let Scenario::Idle { agent } = spec.scenario {
        idle::precheck(agent, spec, host)?;
    }
    if let Scenario::GuestTables { case } = spec.scenario
        && host.kernel.arch != "x86_64"
    {
        return Err(format!(
            "{}: guest page tables in tracked memory are written for x86_64 so far (arm64 stage-1 tables, where the CPU's hardware access/dirty flag management would update them, are not)",
            case.name()
        ));
    }
    if let (Some(bytes), Ok(kvm)) = (spec.tracker.ring_bytes(), host.kvm()) {
        let max = kvm
            .cap("DIRTY_LOG_RING_ACQ_REL")
            .max(kvm.cap("DIRTY_LOG_RING"));
        if i64::from(bytes) > max {
            return Err(format!(
                "a {bytes}-byte dirty ring exceeds this host's maximum of {max} bytes"
            ));
        }
        // The size KVM refuses (EINVAL) given the CPU's dirty log (PML) and the page size.
        let cpu_log = dirty_ring::cpu_dirty_log_entries(&kvm.backend);
        dirty_ring::ring_size_rule(bytes, cpu_log, dirty_ring::host_page_bytes())
            .map_err(|why| format!("a {bytes}-byte dirty ring: {why}"))?;
    }
    Ok(())
}

/// Run the scenario of `spec`.
pub fn run(spec: &TrialSpec, seed: u64) -> Result<Findings, TrialError> {
    let mut tracker = TrialTracker::new(spec)?;
    let outcome = match spec.scenario {
        Scenario::Stepped | Scenario::Race | Scenario::RingFull { .. } => {
            stepped::run(spec, seed, &mut tracker)
        }
        Scenario::Concurrent { .. } => concurrent::run(spec, seed, &mut tracker),
        Scenario::ClearGeometry => geometry::run(spec, &mut tracker),
        Scenario::CrossCheck { against } => crosscheck::run(spec, against, seed, &mut tracker),
        Scenario::PropPrograms => property::programs(spec, seed, &mut tracker),
        Scenario::PropInterleavings => property::interleavings(spec, seed),
        Scenario::Huge { path } => huge::run(spec, path, seed, &mut tracker),
        Scenario::KvmWrites => kvm_writes::run(spec, seed, &mut tracker),
        Scenario::Memslot { op } => memslot::run(spec, op, seed, &mut tracker),
        Scenario::GuestTables { case } => tables::run(spec, case, seed, &mut tracker),
        Scenario::Access { kind } => access::run(spec, kind, seed, &mut tracker),
        Scenario::ReclaimFile => reclaim::run(spec, seed, &mut tracker),
        Scenario::Idle { agent } => idle::run(spec, agent, seed, &mut tracker),
    };
    let mut findings = match (outcome, tracker.get().failure()) {
        // A vCPU blocked because the tracker's own machinery failed (a uffd handler thread
        // that stopped): the harness's error, naming what failed, not a kernel hazard.
        (Err(TrialError::Hazard(h)), Some(why)) => {
            return Err(TrialError::Error(format!("{why}; then: {h}")));
        }
        (outcome, _) => outcome?,
    };
    findings.affected = tracker.affected();
    // A property run reports only its minimal failing case, not every case the drops hit:
    // there, the oracle is held to naming only pages the fault touched.
    if spec.scenario != Scenario::PropPrograms {
        findings.lost_for_sure = tracker.lost_for_sure();
    }
    findings.problems.extend(tracker.get().problems());
    Ok(findings)
}

/// The mode the stats prove, as evidence; an error when they prove the opposite of what was
/// asked (the trial would not test what its name says).
fn check_mode(evidence: &ModeEvidence) -> Result<(), TrialError> {
    let contradicts = matches!(
        (evidence.requested, evidence.observed),
        (
            trackcheck_harness::ExecutionMode::Native,
            ObservedMode::Emulated
        ) | (
            trackcheck_harness::ExecutionMode::Emulated,
            ObservedMode::Native
        )
    );
    if contradicts {
        Err(TrialError::Error(format!(
            "execution mode not obtained: {}",
            evidence.summary()
        )))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod precheck_tests {
    use trackcheck_harness::track::TrackerSpec;
    use trackcheck_harness::{Backing, HostProfile};

    use super::precheck;
    use crate::spec::TrialSpec;

    /// With PML on, a 4 KiB ring is a skip naming the rule; 16 KiB passes the ring check.
    #[test]
    fn a_ring_smaller_than_the_pml_reserve_is_a_skip_with_the_rule() {
        let mut host = HostProfile::probe();
        let Some(kvm) = host.kvm.as_mut() else {
            eprintln!("skip: KVM unavailable, precheck stops before the ring");
            return;
        };
        kvm.backend.pml = Some(true);
        kvm.caps.insert("DIRTY_LOG_RING".into(), 1 << 20);
        let ring = |bytes| TrialSpec {
            tracker: TrackerSpec::DirtyRing {
                bytes,
                with_bitmap: false,
            },
            ..TrialSpec::example(Backing::Anon)
        };
        let why = precheck(&ring(4096), &host).expect_err("4 KiB ring refused with PML");
        assert!(why.contains("a 4096-byte dirty ring"), "{why}");
        assert!(why.contains("do not exceed the 576 KVM reserves"), "{why}");
        // Other facts of this host may still refuse it, but not the ring size.
        let bigger = precheck(&ring(16384), &host);
        assert!(
            bigger
                .as_ref()
                .err()
                .is_none_or(|w| !w.contains("reserves")),
            "{bigger:?}"
        );
    }
}
