//! Writes KVM makes itself (family 9): the kvmclock area (MSR_KVM_SYSTEM_TIME_NEW) and the
//! steal-time record (MSR_KVM_STEAL_TIME) of every vCPU live in the tracked data region, and
//! must be reported like the guest's own writes; then, with every vCPU paused and the final
//! harvest taken, vCPU ioctls must not write guest memory any more.
//!
//! The host enables both areas through KVM_SET_MSRS (a CPL3 guest cannot `wrmsr`) after the
//! baseline harvest, and calls KVM_SET_CLOCK mid-run so KVM updates every kvmclock area again.
//! The oracle judges by content: at every collect (the vCPUs are stopped, so neither the guest
//! nor KVM writes) each page that differs from the shadow copy must be reported; the shadow
//! then copies what was reported. Emulated mode adds KVM's instruction emulator writing for
//! the guest. PV EOI is not tried: KVM writes it only when it injects an interrupt, and the
//! generated guests take none.

use trackcheck_guests::layout::data_page;
use trackcheck_guests::program::splitmix64;
use trackcheck_guests::{Op, Program, Thread};
use trackcheck_harness::machine::{Machine, VcpuState};

use super::content::{ContentOracle, KvmPage};
use super::{Findings, TrialError, TrialTracker, check_mode};
use crate::spec::TrialSpec;

/// `MSR_KVM_SYSTEM_TIME_NEW`: the kvmclock area's GPA | enable.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `MSR_KVM_STEAL_TIME`: the steal-time record's GPA (64-byte aligned) | enable.
const MSR_KVM_STEAL_TIME: u32 = 0x4b56_4d03;

/// Data pages; the first `2 * VCPUS` hold the KVM-written areas (first, so the self-test's
/// drop-page fault, which drops the lowest reported page, drops KVM's writes).
pub(super) const PAGES: u64 = 64;
/// vCPUs.
pub(super) const VCPUS: usize = 2;
/// Rounds of guest writes.
const ROUNDS: u32 = 4;

/// What KVM writes into a data page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Area {
    Clock(usize),
    Steal(usize),
}

impl Area {
    const fn page(self) -> u64 {
        match self {
            Self::Clock(v) => 2 * v as u64,
            Self::Steal(v) => 2 * v as u64 + 1,
        }
    }

    /// Byte offset of the area's version field (bumped by every update).
    const fn version_offset(self) -> u64 {
        match self {
            Self::Clock(_) => 0,
            Self::Steal(_) => 8,
        }
    }

    const fn vcpu(self) -> usize {
        match self {
            Self::Clock(v) | Self::Steal(v) => v,
        }
    }

    fn name(self) -> String {
        match self {
            Self::Clock(v) => format!("kvmclock area of vCPU {v}"),
            Self::Steal(v) => format!("steal-time record of vCPU {v}"),
        }
    }
}

fn areas() -> Vec<Area> {
    (0..VCPUS)
        .flat_map(|v| [Area::Clock(v), Area::Steal(v)])
        .collect()
}

fn version(m: &Machine, area: Area) -> u32 {
    let word = m
        .data()
        .read_u64(area.page() * 4096 + area.version_offset());
    u32::try_from(word & 0xffff_ffff).unwrap_or(0)
}

/// Guest program: every round each vCPU writes 32 seeded pages above the KVM areas.
fn program(seed: u64) -> Program {
    let first = 2 * VCPUS as u64;
    let guest_pages = PAGES - first;
    let threads = (0..VCPUS as u64)
        .map(|v| {
            let mut rng = seed ^ 0x4B56_0000 ^ v;
            let mut ops = Vec::new();
            for round in 1..=ROUNDS {
                for _ in 0..32 {
                    ops.push(Op::Write {
                        page: first + splitmix64(&mut rng) % guest_pages,
                        offset: 8 * u16::try_from(v).unwrap_or(0),
                    });
                }
                ops.push(Op::Sync(round));
            }
            Thread::new(ops)
        })
        .collect();
    Program::new(PAGES, threads)
}

/// A vCPU ioctl of the pause check ran, or the harness error naming it.
#[cfg(target_arch = "x86_64")]
fn ran<T, E: std::fmt::Display>(
    result: Result<T, E>,
    call: &str,
    vcpu: usize,
) -> Result<T, TrialError> {
    result.map_err(|e| TrialError::Error(format!("pause check: {call} on vCPU {vcpu} failed: {e}")))
}

/// arm64 KVM has no kvmclock or steal-time MSRs; its PV stolen time
/// (KVM_ARM_VCPU_PVTIME_CTRL) is not driven by this family yet.
#[cfg(not(target_arch = "x86_64"))]
pub(super) fn run(
    _spec: &TrialSpec,
    _seed: u64,
    _tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    Err(TrialError::Skip(
        "KVM's own writes are driven through x86's kvmclock and steal-time MSRs; arm64 PV stolen time (KVM_ARM_VCPU_PVTIME_CTRL) is not implemented in this family".into(),
    ))
}

#[cfg(target_arch = "x86_64")]
pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    let tracker = tracker.get();
    let program = program(seed);
    m.load(&program)?;
    let stats_before = m.vcpu_stats();
    m.attach(tracker)?;
    let kvm_pages = areas()
        .into_iter()
        .map(|a| KvmPage {
            page: a.page(),
            name: a.name(),
            vcpu: a.vcpu(),
        })
        .collect();
    let mut checker = ContentOracle::new(&m, kvm_pages);
    checker.harvest(&mut m, tracker)?; // baseline
    for v in 0..VCPUS {
        let set = m.set_msrs(
            v,
            &[
                (
                    MSR_KVM_SYSTEM_TIME_NEW,
                    data_page(Area::Clock(v).page()) | 1,
                ),
                (MSR_KVM_STEAL_TIME, data_page(Area::Steal(v).page()) | 1),
            ],
        )?;
        if set < 2 {
            return Err(TrialError::Skip(format!(
                "KVM refused the kvmclock / steal-time MSRs on vCPU {v} ({set} of 2 set)"
            )));
        }
    }
    let mut segment = 0;
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        m.run()?;
        segment += 1;
        if segment == 2 {
            // Every vCPU updates its kvmclock area at its next entry.
            m.advance_clock(1_000_000)?;
        }
        checker.harvest(&mut m, tracker)?;
    }
    let final_round = checker.round;
    let versions: Vec<(Area, u32)> = areas().into_iter().map(|a| (a, version(&m, a))).collect();
    // Paused: every vCPU is done and the final harvest is taken. vCPU ioctls a VMM makes
    // while migrating must not write guest memory now. Each loads and puts the vCPU, which is
    // where KVM once wrote the steal-time "preempted" flag unconditionally (after the VMM's
    // final harvest); a correct kernel writes nothing here, so this is a regression check.
    // Each call must have run, or "wrote nothing" below would be a claim about calls that
    // never happened: a failure is the harness's error, naming the ioctl and the vCPU.
    for v in 0..VCPUS {
        let fd = m.vcpu_fd(v).ok_or_else(|| {
            TrialError::Error(format!(
                "pause check: vCPU {v} has no KVM file (the machine has {} vCPUs)",
                m.states().len()
            ))
        })?;
        ran(fd.get_regs(), "KVM_GET_REGS", v)?;
        ran(fd.get_sregs(), "KVM_GET_SREGS", v)?;
        ran(fd.kvmclock_ctrl(), "KVM_KVMCLOCK_CTRL", v)?;
    }
    m.vm()
        .fd()
        .get_clock()
        .map_err(|e| TrialError::Error(format!("pause check: KVM_GET_CLOCK failed: {e}")))?;
    let after_pause = checker.harvest(&mut m, tracker)?;
    m.detach(tracker)?;
    let stats_after = m.vcpu_stats();
    let mut findings = checker.findings;
    if !after_pause.is_empty() {
        let named: Vec<String> = after_pause
            .iter()
            .map(|&p| {
                areas()
                    .into_iter()
                    .find(|a| a.page() == p)
                    .map_or_else(|| format!("data page {p}"), Area::name)
            })
            .collect();
        findings.problems.push(format!(
            "KVM wrote guest memory after every vCPU was paused and the final harvest (round {final_round}) was taken, during KVM_GET_REGS / KVM_GET_SREGS / KVM_KVMCLOCK_CTRL / KVM_GET_CLOCK: {}",
            named.join(", ")
        ));
    } else {
        findings.evidence.push(format!(
            "after the pause and the final harvest (round {final_round}), KVM_GET_REGS, KVM_GET_SREGS, KVM_KVMCLOCK_CTRL and KVM_GET_CLOCK (each a vCPU load and put) wrote nothing"
        ));
    }
    let mode = m.mode_evidence(&stats_before, &stats_after, m.writes_done());
    findings.evidence.push(mode.summary());
    let updates: Vec<String> = versions
        .iter()
        .map(|(a, v)| format!("{}: version {v}", a.name()))
        .collect();
    findings.evidence.push(format!(
        "KVM's writes while tracked ({} rounds, KVM_SET_CLOCK after segment 2): {}",
        final_round,
        updates.join("; ")
    ));
    findings.evidence.extend(tracker.evidence());
    // Each update bumps the version by 2: two updates at least (the first entry and the one
    // KVM_SET_CLOCK asked for) prove KVM kept writing while the pages were tracked.
    let idle: Vec<String> = versions
        .iter()
        .filter(|(_, v)| *v < 4)
        .map(|(a, v)| format!("{} (version {v})", a.name()))
        .collect();
    if !idle.is_empty() {
        findings.not_exercised = Some(format!(
            "KVM updated these areas fewer than twice while tracked: {}",
            idle.join(", ")
        ));
    }
    check_mode(&mode)?;
    findings.mode = Some(mode);
    Ok(findings)
}
