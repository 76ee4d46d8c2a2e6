//! Huge pages (family 6): KVM's 2 MiB mappings split by tracking, recovered when tracking
//! stops, and split again; rearms racing the splitting writes; guest and host page sizes that
//! differ.
//!
//! Every trial first writes the whole data region with tracking off, so KVM maps what it can
//! with huge mappings; then it tracks a program that writes one 4 KiB page in every 2 MiB
//! region (not only the first: a huge mapping made writable by its first 4 KiB once dirtied
//! only that page). The oracle is the stepped one (or, for the race, the concurrent shadow).
//! KVM's binary stats (pages_4k / pages_2m, read before and after) prove the path was taken;
//! when they do not (the guest ran in KVM's emulator, which maps nothing; the host did not
//! give huge pages; the stats are missing), the trial says "not exercised" instead of PASS.

use std::fmt;

use trackcheck_guests::{GuestPageSize, Program, Thread};
use trackcheck_harness::machine::Machine;
use trackcheck_harness::memory::thp_bytes_in;
use trackcheck_harness::{Backing, ExecutionMode};

use super::{Findings, TrialError, TrialTracker, concurrent, stepped};
use crate::programs::{self, REGION_PAGES};
use crate::spec::{HugePath, Pattern, TrialSpec};

/// Data pages of the stepped paths: 8 regions of 2 MiB.
const PAGES: u64 = 8 * REGION_PAGES;
/// Data pages of the race: 16 regions.
const RACE_PAGES: u64 = 16 * REGION_PAGES;
/// vCPUs of the stepped paths.
const VCPUS: usize = 2;
/// Seq bases of the successive programs on one machine (stamps must stay unique).
const SEQ_STEP: u64 = 1 << 32;

/// KVM's mappings of the whole VM by size, from its binary stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Mappings {
    k4: u64,
    m2: u64,
    g1: u64,
}

impl Mappings {
    /// KVM's mappings of the whole VM now.
    fn read_vm(m: &Machine) -> Option<Self> {
        let s = m.vm_stats();
        Some(Self {
            k4: s.get("pages_4k")?,
            m2: s.get("pages_2m")?,
            g1: s.get("pages_1g").unwrap_or(0),
        })
    }

    /// KVM's mappings of the data region now: the VM's, less those the machine had before the
    /// guest touched data (its code, stacks, control pages: see [`baseline`]).
    fn read(m: &Machine, base: Option<Self>) -> Option<Self> {
        let (now, base) = (Self::read_vm(m)?, base?);
        Some(Self {
            k4: now.k4.saturating_sub(base.k4),
            m2: now.m2.saturating_sub(base.m2),
            g1: now.g1.saturating_sub(base.g1),
        })
    }
}

/// Run a program that touches no data page (every vCPU's code, stack and control page get
/// mapped), and read the VM's mappings: what is not the data region's.
fn baseline(m: &mut Machine) -> Result<Option<Mappings>, TrialError> {
    let vcpus = m.config().vcpus;
    m.load(&Program::new(1, vec![Thread::new(Vec::new()); vcpus]))?;
    m.run_to_completion()?;
    Ok(Mappings::read_vm(m))
}

impl fmt::Display for Mappings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x2M + {}x4K", self.m2, self.k4)?;
        if self.g1 > 0 {
            write!(f, " + {}x1G", self.g1)?;
        }
        Ok(())
    }
}

/// The guest page size and the data pages of `path`.
pub(super) const fn shape(path: HugePath) -> (GuestPageSize, u64) {
    match path {
        HugePath::GuestSmallHostHuge => (GuestPageSize::Size4K, PAGES),
        HugePath::Race { .. } => (GuestPageSize::Size2M, RACE_PAGES),
        _ => (GuestPageSize::Size2M, PAGES),
    }
}

fn machine(spec: &TrialSpec, path: HugePath, vcpus: usize) -> Result<Machine, TrialError> {
    let (guest_page_size, pages) = shape(path);
    let mut config = super::machine_config(spec, pages, vcpus, spec.tracker.ring_bytes());
    config.guest_page_size = guest_page_size;
    if let HugePath::EagerSplit { chunk_kib } = path {
        config.eager_split_chunk = Some(u64::from(chunk_kib) * 1024);
    }
    Ok(Machine::new(config)?)
}

/// The state before tracking: KVM's mappings of the data region, and why KVM cannot have
/// mapped huge pages (if it cannot).
#[derive(Clone, Debug)]
struct Before {
    maps: Option<Mappings>,
    no_huge: Option<String>,
}

/// Write every data page once with tracking off (KVM maps the region as it can), with seq base
/// `base`; the state after.
fn prefill(
    spec: &TrialSpec,
    m: &mut Machine,
    seq_base: u64,
    base: Option<Mappings>,
) -> Result<Before, TrialError> {
    let vcpus = m.config().vcpus;
    let pages = m.config().data_pages;
    m.load(&programs::write_once(vcpus, pages).with_seq_base(seq_base))?;
    m.run_to_completion()?;
    Ok(Before {
        maps: Mappings::read(m, base),
        no_huge: no_huge_reason(spec, m),
    })
}

/// Why the guest cannot have made huge mappings right now, if it cannot.
fn no_huge_reason(spec: &TrialSpec, m: &Machine) -> Option<String> {
    if spec.mode == ExecutionMode::Emulated {
        return Some(
            "the guest's writes ran in KVM's instruction emulator (the whole guest on PVM, each \
             store behind the forced-emulation prefix on SVM/VMX), which writes guest memory \
             without mapping it: there are no 2 MiB mappings to split"
                .into(),
        );
    }
    let data = m.data();
    if spec.backing == Backing::Thp && thp_bytes_in(data.host_addr(), data.len()) == 0 {
        return Some(
            "the host had no transparent huge page in the data region (AnonHugePages 0)".into(),
        );
    }
    None
}

/// Proof that tracking took away KVM's huge mappings of the data region: they existed before
/// it and fewer remained after the tracked writes (`after`).
fn split_proof(before: &Before, after: Option<Mappings>, phase: &str) -> Result<String, String> {
    let (Some(maps), Some(after)) = (before.maps, after) else {
        return Err(NO_STATS.into());
    };
    if maps.m2 == 0 {
        let why = before
            .no_huge
            .clone()
            .unwrap_or_else(|| "KVM did not map the data region with 2 MiB pages".into());
        return Err(format!("{phase}: {why} (mappings before tracking: {maps})"));
    }
    if after.m2 >= maps.m2 {
        return Err(format!(
            "{phase}: the 2 MiB mappings were neither split nor dropped while tracking (before: {maps}; after the tracked writes: {after})"
        ));
    }
    Ok(format!(
        "{phase}: KVM mapped the data region with {maps} before tracking; after the tracked writes {after}: {} huge mapping(s) split or dropped",
        maps.m2 - after.m2
    ))
}

const NO_STATS: &str = "KVM's binary stats have no pages_4k / pages_2m here: cannot show how KVM mapped the data region";

pub(super) fn run(
    spec: &TrialSpec,
    path: HugePath,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    match path {
        HugePath::Enable
        | HugePath::GuestHugeHostSmall
        | HugePath::GuestSmallHostHuge
        | HugePath::EagerSplit { .. } => once(spec, path, seed, tracker),
        HugePath::Recover => recover(spec, seed, tracker),
        HugePath::Race { vcpus } => race(spec, usize::from(vcpus), seed, tracker),
    }
}

/// Prefill, then one tracked split program; the proof depends on the path.
fn once(
    spec: &TrialSpec,
    path: HugePath,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let mut m = machine(spec, path, VCPUS)?;
    let base = baseline(&mut m)?;
    let before = prefill(spec, &mut m, 0, base)?;
    let program = programs::huge_split(seed, VCPUS, m.config().data_pages).with_seq_base(SEQ_STEP);
    m.load(&program)?;
    let run = stepped::drive_loaded(&mut m, &program, tracker.get(), false)?;
    let after = Mappings::read(&m, base);
    m.detach(tracker.get())?;
    let mut findings = run.findings;
    let proof = match path {
        HugePath::GuestHugeHostSmall => small_under_guest_huge(spec, &before, after),
        HugePath::GuestSmallHostHuge => guest_small_over_huge(spec, &before, after),
        _ => split_proof(&before, after, "tracked writes"),
    };
    conclude(&mut findings, proof);
    Ok(findings)
}

/// Guest 2 MiB pages over 4 KiB host pages: KVM can only map 4 KiB under them.
fn small_under_guest_huge(
    spec: &TrialSpec,
    before: &Before,
    after: Option<Mappings>,
) -> Result<String, String> {
    let (Some(maps), Some(after)) = (before.maps, after) else {
        return Err(NO_STATS.into());
    };
    if spec.mode == ExecutionMode::Emulated {
        return Err(before.no_huge.clone().unwrap_or_default());
    }
    if maps.m2 > 0 {
        return Err(format!(
            "the host gave the data region huge pages after all (mappings {maps}; THP enabled=always?): this is not guest-huge over host-small"
        ));
    }
    if maps.k4 < PAGES {
        return Err(format!(
            "KVM mapped fewer 4 KiB pages than the guest wrote ({maps} for {PAGES} pages)"
        ));
    }
    Ok(format!(
        "the guest mapped the data region with 2 MiB pages; KVM mapped it with 4 KiB (before tracking {maps}, after {after})"
    ))
}

/// Guest 4 KiB pages over huge host pages: the host memory must really be huge.
fn guest_small_over_huge(
    spec: &TrialSpec,
    before: &Before,
    after: Option<Mappings>,
) -> Result<String, String> {
    if let Some(why) = &before.no_huge {
        return Err(why.clone());
    }
    let (Some(maps), Some(after)) = (before.maps, after) else {
        return Err(NO_STATS.into());
    };
    if maps.k4 + maps.m2 * REGION_PAGES < PAGES {
        return Err(format!(
            "KVM's mappings do not cover what the guest wrote ({maps} for {PAGES} pages)"
        ));
    }
    let huge = match spec.backing {
        Backing::Thp => "transparent huge pages".to_string(),
        b => format!("{b} host pages"),
    };
    let how = if maps.m2 > 0 {
        "KVM mapped 2 MiB under the guest's 4 KiB pages (a two-dimensional MMU)"
    } else {
        "KVM mapped 4 KiB: the guest's 4 KiB pages limit a shadow MMU"
    };
    Ok(format!(
        "guest 4 KiB pages over {huge}: {how} (before tracking {maps}, after {after})"
    ))
}

/// Split, recover with tracking off, split again.
fn recover(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let mut m = machine(spec, HugePath::Recover, VCPUS)?;
    let pages = m.config().data_pages;
    let base = baseline(&mut m)?;
    let before = prefill(spec, &mut m, 0, base)?;
    let first = programs::huge_split(seed, VCPUS, pages).with_seq_base(SEQ_STEP);
    m.load(&first)?;
    let a = stepped::drive_loaded(&mut m, &first, tracker.get(), false)?;
    let split = Mappings::read(&m, base);
    m.detach(tracker.get())?;
    let recovered = prefill(spec, &mut m, 2 * SEQ_STEP, base)?;
    let second = programs::huge_split(seed ^ 1, VCPUS, pages).with_seq_base(3 * SEQ_STEP);
    m.load(&second)?;
    let b = stepped::drive_loaded(&mut m, &second, tracker.get(), false)?;
    let again = Mappings::read(&m, base);
    m.detach(tracker.get())?;
    let mut findings = a.findings;
    findings.report.absorb(&b.findings.report);
    findings.hazards.extend(b.findings.hazards);
    findings.problems.extend(b.findings.problems);
    findings.evidence.extend(b.findings.evidence);
    let proof = split_proof(&before, split, "first tracking").and_then(|one| {
        let came_back = matches!((recovered.maps, split), (Some(r), Some(s)) if r.m2 > s.m2);
        if before.no_huge.is_none() && !came_back {
            return Err(format!(
                "the huge mappings did not come back while tracking was off ({}){}",
                recovered.maps.map_or_else(String::new, |r| r.to_string()),
                recovered
                    .no_huge
                    .as_ref()
                    .map_or_else(String::new, |why| format!(
                        ": after the first tracking {why}"
                    ))
            ));
        }
        split_proof(&recovered, again, "tracking off (recovered), then on again")
            .map(|two| format!("{one}; {two}"))
    });
    conclude(&mut findings, proof);
    Ok(findings)
}

/// Prefill, then vCPUs write random pages of the whole region while the host harvests.
fn race(
    spec: &TrialSpec,
    vcpus: usize,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let path = HugePath::Race {
        vcpus: u8::try_from(vcpus).unwrap_or(u8::MAX),
    };
    let mut m = machine(spec, path, vcpus)?;
    let pages = m.config().data_pages;
    let base = baseline(&mut m)?;
    let before = prefill(spec, &mut m, 0, base)?;
    // A self-test runs the same program: the oracle checks containment at every harvest.
    let program = programs::concurrent(seed, Pattern::Random, vcpus, pages).with_seq_base(SEQ_STEP);
    let mut findings = concurrent::drive_program(&mut m, &program, tracker.get())?;
    let after = Mappings::read(&m, base);
    m.detach(tracker.get())?;
    let proof = split_proof(&before, after, "racing writers");
    conclude(&mut findings, proof);
    Ok(findings)
}

fn conclude(findings: &mut Findings, proof: Result<String, String>) {
    match proof {
        Ok(evidence) => findings.evidence.push(evidence),
        Err(why) => findings.not_exercised = Some(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn before(m2: u64, no_huge: Option<&str>) -> Before {
        Before {
            maps: Some(Mappings { k4: 2, m2, g1: 0 }),
            no_huge: no_huge.map(String::from),
        }
    }

    #[test]
    fn a_split_is_proven_only_by_fewer_huge_mappings_after_than_before() {
        let after = |m2| Some(Mappings { k4: 140, m2, g1: 0 });
        assert!(split_proof(&before(8, None), after(0), "p").is_ok());
        let none = split_proof(&before(0, Some("emulated")), after(0), "p").unwrap_err();
        assert!(none.contains("emulated"), "{none}");
        let kept = split_proof(&before(8, None), after(8), "p").unwrap_err();
        assert!(kept.contains("neither split nor dropped"), "{kept}");
        let no_stats = Before {
            maps: None,
            no_huge: None,
        };
        assert!(
            split_proof(&no_stats, after(0), "p")
                .unwrap_err()
                .contains("binary stats")
        );
    }
}
