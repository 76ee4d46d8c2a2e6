//! Idle-bit clears racing dirty tracking (issue 11): an aging agent clears the young state of
//! KVM's mappings of guest memory through the MMU notifiers while the vCPUs write and the host
//! harvests, through the concurrent driver and its per-harvest check (see `concurrent`).
//!
//! Agents: a kdamond the suite creates (see `damon`) over the guest memory's virtual range
//! (`idle-damon-vaddr`: DAMON's fvaddr operations, or vaddr over the whole process where
//! fvaddr is not offered) or over its physical frames, read from /proc/self/pagemap
//! (`idle-damon-paddr`). Two `stat` schemes count the regions tried and those found young. On hosts whose KVM mappings lack accessed bits,
//! aging turns KVM's entries into access-tracked ones that the fast page-fault path restores
//! (with write access): the path that has lost dirty state before.
//!
//! Judgement: the concurrent driver's oracles (no written page lost). Proof the aging ran over
//! guest memory, or the verdict is not-exercised: regions found young by the second scheme
//! where DAMON watched only the guest memory (fvaddr, paddr: its frames, the closest runs
//! merged), or regions over the guest memory with `nr_accesses` > 0 in snapshots of kdamond's
//! tried regions taken while the vCPUs run (samples that found a page young again after
//! kdamond cleared it). Where tracefs is mounted the evidence also counts `kvm:kvm_age_hva`
//! events over the guest memory's host virtual range (see `kvmtrace`): the clears that reached
//! KVM's MMU notifier; counted and zero is not-exercised too (every lane counts tens of
//! thousands per trial). What this cannot see: which clear preceded a lost write.

use std::sync::{PoisonError, RwLock};

use trackcheck_harness::HostProfile;
use trackcheck_harness::machine::RunView;
use trackcheck_harness::oracle::Shadow;
use trackcheck_harness::track::dirty_ring::host_page_bytes;

use super::concurrent::drive_program_with;
use super::damon::{
    AGGR_US, Kdamond, MAX_PADDR_REGIONS, Ops, SAMPLE_US, SetupError, UPDATE_US, ranges_of,
};
use super::kvmtrace::{self, KvmTrace};
use super::{Findings, TrialError, TrialTracker};
use crate::programs;
use crate::spec::{IdleAgent, Pattern, TrialSpec};

/// Data pages.
pub(super) const PAGES: u64 = 2048;
/// vCPUs writing (random: every page is written again and again, so aging finds it young).
pub(super) const VCPUS: usize = 2;
/// Tried-region snapshots while the vCPUs run (every [`EVERY`] harvests), besides the last.
const SNAPSHOTS: u32 = 4;
/// Harvests between snapshots.
const EVERY: u32 = 3;

/// DAMON's operations for `agent`, or the room of its own that runs it instead.
enum Room {
    Damon(Ops),
    Mglru,
    PageIdle,
}

const fn room(agent: IdleAgent) -> Room {
    match agent {
        IdleAgent::DamonVaddr => Room::Damon(Ops::Vaddr),
        IdleAgent::DamonPaddr => Room::Damon(Ops::Paddr),
        IdleAgent::Mglru => Room::Mglru,
        IdleAgent::PageIdle => Room::PageIdle,
    }
}

/// Whether the host can run `agent`; the reason if not (as the machine's DAMON support says:
/// no sysfs interface, or a kdamond the suite did not create).
pub(super) fn precheck(
    agent: IdleAgent,
    spec: &TrialSpec,
    host: &HostProfile,
) -> Result<(), String> {
    let ops = match room(agent) {
        Room::Damon(ops) => ops,
        Room::Mglru => return super::idle_mglru::precheck(spec, host),
        Room::PageIdle => return super::idle_page_idle::precheck(spec, host),
    };
    let a = &host.access;
    let mech = trackcheck_harness::Mechanism::Damon;
    if !a.damon_sysfs || !a.kdamonds.is_empty() {
        return Err(format!(
            "{mech}: {}",
            mech.support(host).reason().unwrap_or("unsupported")
        ));
    }
    let op = ops.name();
    if !a.damon_operations.is_empty() && !a.damon_operations.iter().any(|o| o == op) {
        return Err(format!(
            "{mech}: DAMON offers only {} here; {op} is absent",
            a.damon_operations.join(",")
        ));
    }
    Ok(())
}

/// Byte addresses of the host frames behind `[addr, addr + len)`, sorted (from
/// /proc/self/pagemap; root sees the frame numbers).
fn frames(addr: u64, len: u64) -> Result<Vec<u64>, TrialError> {
    let page = host_page_bytes();
    let mut out: Vec<u64> = super::page_idle::host_frames(addr, len)
        .map_err(|e| TrialError::Error(format!("read /proc/self/pagemap: {e}")))?
        .into_iter()
        .flatten()
        .map(|pfn| pfn * page)
        .collect();
    if out.is_empty() {
        return Err(TrialError::Skip(
            "/proc/self/pagemap shows no frame numbers of the guest memory (they need \
             CAP_SYS_ADMIN): paddr cannot be pointed at it"
                .into(),
        ));
    }
    out.sort_unstable();
    Ok(out)
}

/// What the snapshots saw.
#[derive(Debug, Default)]
struct Seen {
    snapshots: u32,
    /// Regions over guest memory, summed over snapshots.
    regions: u64,
    /// Their bytes, summed over snapshots.
    bytes: u64,
    /// Of those, regions found young at least once in their aggregation.
    young: u64,
    /// Sum and maximum of their nr_accesses.
    accesses: u64,
    max: u64,
}

impl Seen {
    fn take(&mut self, kd: &Kdamond, within: &[(u64, u64)]) -> Result<(), TrialError> {
        let regions = kd.tried_regions(within).map_err(setup)?;
        self.snapshots += 1;
        self.regions += regions.len() as u64;
        for r in &regions {
            self.bytes += r.end - r.start;
            self.young += u64::from(r.nr_accesses > 0);
            self.accesses += r.nr_accesses;
            self.max = self.max.max(r.nr_accesses);
        }
        Ok(())
    }
}

fn setup(e: SetupError) -> TrialError {
    match e {
        SetupError::Unsupported(why) => TrialError::Skip(format!("damon: {why}")),
        SetupError::Failed(why) => TrialError::Error(format!("DAMON sysfs: {why}")),
    }
}

/// `idle-page-idle` runs alone among the idle trials (it takes this for writing; the others
/// share it). An aging agent reaches beyond its own trial's memory (MGLRU walks the whole
/// process, which it moved into its memcg; DAMON's paddr regions are merged runs of frames and
/// vaddr without fvaddr watches the process), and another trial's clear between a write and
/// the reading would make `idle-page-idle`'s access bound fail for nothing. Foreign clears
/// cannot cost a dirty page, so the other idle trials may overlap one another.
static AGING: RwLock<()> = RwLock::new(());

pub(super) fn run(
    spec: &TrialSpec,
    agent: IdleAgent,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let room = room(agent);
    // idle-page-idle alone, the others side by side (see AGING); held to the end of the run.
    let _turn = match room {
        Room::PageIdle => (
            Some(AGING.write().unwrap_or_else(PoisonError::into_inner)),
            None,
        ),
        Room::Damon(_) | Room::Mglru => (
            None,
            Some(AGING.read().unwrap_or_else(PoisonError::into_inner)),
        ),
    };
    let ops = match room {
        Room::Damon(ops) => ops,
        Room::Mglru => return super::idle_mglru::run(spec, seed, tracker),
        Room::PageIdle => return super::idle_page_idle::run(spec, seed, tracker),
    };
    let program = programs::concurrent(seed, Pattern::Random, VCPUS, PAGES);
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    let (addr, len) = (m.data().host_addr(), m.data().mapped_len());
    // KVM's clear_young calls over guest memory, where tracefs can count them.
    let trace = KvmTrace::age(addr, addr + len);
    // Where guest memory is, in DAMON's addresses; paddr monitors the closest-merged runs.
    let (within, ranges) = match ops {
        Ops::Vaddr => (vec![(addr, addr + len)], vec![(addr, addr + len)]),
        Ops::Paddr => {
            let f = frames(addr, len)?;
            let page = host_page_bytes();
            (
                ranges_of(&f, page, usize::MAX),
                ranges_of(&f, page, MAX_PADDR_REGIONS),
            )
        }
    };
    let kd = Kdamond::start(ops, &ranges).map_err(setup)?;
    let pid = kd.pid();
    let (ops_name, kd_ranges_empty) = (kd.ops_name, kd.ranges.is_empty());
    let mut seen = Seen::default();
    let mut sample = |_: &RunView<'_>, harvest: u32, _: &[u64], _: &mut Shadow| {
        if harvest.is_multiple_of(EVERY) && seen.snapshots < SNAPSHOTS {
            seen.take(&kd, &within)?;
        }
        Ok(())
    };
    let driven = drive_program_with(&mut m, &program, tracker.get(), &mut sample);
    // The last snapshot and the counters, with kdamond still on; then it goes.
    let last = seen
        .take(&kd, &within)
        .and_then(|()| kd.stats().map_err(setup));
    drop(kd);
    let traced = trace.and_then(|t| t.count());
    let mut findings = driven?;
    let [all, young] = last?;
    // Scheme 1's young regions are the guest's where DAMON watched only guest memory.
    let confined = !kd_ranges_empty;
    m.detach(tracker.get())?;
    findings.evidence.push(format!(
        "DAMON {ops_name} kdamond{} made by the suite (sample {SAMPLE_US} us, aggregation {AGGR_US} us, update {UPDATE_US} us; {}), removed after; stat schemes: {} regions tried ({} bytes), {} of them found young ({} bytes){}; {} tried-region snapshots: {} regions ({} bytes) over the guest memory, {} of them found young (nr_accesses sum {}, max {} of {} samples per aggregation)",
        pid.map(|p| format!(" pid {p}")).unwrap_or_default(),
        match (ops, confined) {
            (Ops::Paddr, _) => format!("{} physical ranges holding the guest memory", ranges.len()),
            (Ops::Vaddr, true) => "the guest memory's virtual range".to_string(),
            (Ops::Vaddr, false) => "the whole process: fvaddr is not offered".to_string(),
        },
        all.nr_tried,
        all.sz_tried,
        young.nr_tried,
        young.sz_tried,
        if confined { "" } else { " anywhere in the process" },
        seen.snapshots,
        seen.regions,
        seen.bytes,
        seen.young,
        seen.accesses,
        seen.max,
        AGGR_US / SAMPLE_US
    ));
    findings.evidence.push(kvmtrace::summary(&traced));
    findings.not_exercised = if all.nr_tried == 0 {
        Some("DAMON's stat scheme tried no region: kdamond never aggregated".into())
    } else if seen.young == 0 && !(confined && young.nr_tried > 0) {
        Some(format!(
            "DAMON never found the guest memory young ({} young regions{}, none in {} snapshots over the guest memory): the aging is not shown to have reached the guest's pages",
            young.nr_tried,
            if confined {
                ""
            } else {
                " anywhere in the process"
            },
            seen.snapshots
        ))
    } else if let Ok(0) = traced {
        Some(
            "kdamond's clears never reached KVM's clear_young over the guest memory: 0 \
             kvm:kvm_age_hva events over its host virtual range"
                .into(),
        )
    } else {
        None
    };
    Ok(findings)
}
