//! MGLRU aging racing dirty tracking (issue 11, `idle-mglru`): the suite's memory cgroup (see
//! `mglru`) holds the guest memory, and a thread forces MGLRU aging of it through debugfs
//! every few milliseconds while two vCPUs write random pages and the host harvests, through
//! the concurrent driver and its per-harvest check (see `concurrent`), as `idle-damon` does
//! with a kdamond. Each aging pass walks this process's page tables and, per present page of
//! the memcg, calls KVM's `clear_young` over it: KVM clears the accessed bit of its mapping
//! with no TLB flush, or (no accessed bits in KVM's entries) makes the entry access-tracked,
//! which the fast page-fault path restores with write access. 6.12 does this under KVM's
//! mmu_lock; 7.x x86 does it locklessly.
//!
//! Judgement: the concurrent driver's oracles (no written page lost). Proof the aging reached
//! KVM, or the verdict is not-exercised, checked in this order: max_seq rose (the aging ran);
//! the memcg's generations held the guest data's pages at one reading at least, less what CPUs'
//! LRU batches can hold (the guest memory was charged to it, so the walk looked at it); `kvm:kvm_age_hva` events over the guest's host virtual range, counted in
//! a private tracefs instance (see `kvmtrace`), are not zero; where tracefs cannot count, the
//! mm walk found young leaves (`lru_gen_full`'s running totals). The evidence also gives the
//! walk's young and total leaf deltas where readable.
//!
//! What this cannot see: which of KVM's entries each call found young, nor which clear
//! preceded a lost write. Hugetlb memory is never aged (MGLRU skips hugetlb VMAs), so only the
//! anon and THP backings are in the matrix.

use std::path::Path;
use std::time::Duration;

use trackcheck_harness::machine::RunView;
use trackcheck_harness::oracle::Shadow;
use trackcheck_harness::{Backing, HostProfile, Mechanism};

use super::concurrent::drive_program_with;
use super::damon::SetupError;
use super::idle::{PAGES, VCPUS};
use super::mglru::{self, Ager, Tally};
use super::{Findings, TrialError, TrialTracker, kvmtrace};
use crate::programs;
use crate::spec::{Pattern, TrialSpec};

/// Rises of max_seq the trial waits for (each harvest waits up to [`BUMP_WAIT`] until this
/// many are done, so a short run still races some aging).
const MIN_BUMPS: u64 = 4;
/// Longest wait for the aging thread in one harvest.
const BUMP_WAIT: Duration = Duration::from_millis(100);
/// Folios a CPU's LRU batch holds before it adds them to the lists (`PAGEVEC_SIZE`): charged
/// to the memcg but on no generation yet, like folios a walk has isolated at the moment of a
/// reading, so `lru_gen` can show a few pages fewer than are charged.
const LRU_BATCH: u64 = 31;

/// Anon pages the memcg must show at least once: the guest data less what CPUs' LRU batches
/// can hold.
fn charged_enough() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    PAGES.saturating_sub(LRU_BATCH * cpus as u64)
}

/// Whether the host can run the trial; the reason if not.
pub(super) fn precheck(spec: &TrialSpec, host: &HostProfile) -> Result<(), String> {
    let mech = Mechanism::Mglru;
    if let Some(why) = mech.support(host).reason() {
        return Err(format!("{mech}: {why}"));
    }
    if spec.backing.hugetlb_kib().is_some() {
        return Err(format!(
            "{mech}: MGLRU never ages hugetlb memory (should_skip_vma skips hugetlb VMAs): the {} backing cannot be aged",
            spec.backing
        ));
    }
    if !matches!(spec.backing, Backing::Anon | Backing::Thp) {
        return Err(format!(
            "{mech}: the trial ages anonymous memory ({} backing: shared memory is aged only with swap)",
            spec.backing
        ));
    }
    if !mglru::host_is_owned() {
        return Err(format!("{mech}: {}", mglru::not_owned()));
    }
    Ok(())
}

fn setup(e: SetupError) -> TrialError {
    match e {
        SetupError::Unsupported(why) => TrialError::Skip(format!("mglru: {why}")),
        SetupError::Failed(why) => TrialError::Error(format!("MGLRU setup: {why}")),
    }
}

/// What the trial saw, for the evidence and the verdict.
#[derive(Debug)]
struct Proof {
    tally: Tally,
    /// The most anon pages the memcg's generations held at one reading (during or after the
    /// run).
    anon: u64,
    /// The least that proves the guest memory was charged to it (see [`charged_enough`]).
    least: u64,
    /// Young and total leaf deltas of the mm walk, where running totals were readable.
    walk: Option<(u64, u64)>,
    /// `kvm_age_hva` events over guest memory, or why not counted.
    traced: Result<u64, String>,
}

impl Proof {
    /// Why the run does not prove aging reached KVM over guest memory, if it does not.
    fn not_exercised(&self) -> Option<String> {
        let t = &self.tally;
        if t.bumps == 0 {
            return Some(format!(
                "MGLRU never aged: max_seq never rose in {} aging commands",
                t.writes
            ));
        }
        if self.anon < self.least {
            return Some(format!(
                "guest memory not charged to the aged memcg: its generations held at most {} anon pages, fewer than {} (the guest's {PAGES} data pages less what CPUs' LRU batches hold)",
                self.anon, self.least
            ));
        }
        match (&self.traced, self.walk) {
            (Ok(0), _) => Some(format!(
                "aging never reached KVM's clear_young over guest memory: 0 kvm:kvm_age_hva events over its host virtual range in {} max_seq rises",
                t.bumps
            )),
            (Ok(_), _) | (Err(_), Some((1.., _))) => None,
            (Err(why), Some((0, _))) => Some(format!(
                "the walk found nothing young (lru_gen_full: 0 young leaves), and {why}"
            )),
            (Err(why), None) => Some(format!(
                "no proof aging reached KVM: {why}, and lru_gen_full shows no running totals of the walk"
            )),
        }
    }

    fn summary(&self, ager: &Ager) -> String {
        let t = &self.tally;
        format!(
            "MGLRU aging forced by the suite on its memcg {} (id {}, nodes {:?}; lru_gen/enabled {:#06x}), \
             removed after: {} passes over {:.1} s, {} aging commands (`+ ID NID MAX_SEQ 1 1`) taken, {} EEXIST, {} refused{}; \
             max_seq {} -> {} ({} rises, {} commands without one); {}; memcg anon pages at most {} (guest data {PAGES}); {}",
            ager.name,
            ager.id,
            ager.nodes,
            ager.enabled,
            t.passes,
            t.elapsed.as_secs_f64(),
            t.writes,
            t.busy,
            t.errors,
            t.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
            t.first_seq,
            t.last_seq,
            t.bumps,
            t.missed,
            match self.walk {
                Some((y, total)) =>
                    format!("lru_gen_full mm walk: {y} young of {total} leaves walked"),
                None => "lru_gen_full shows no running totals of the mm walk".into(),
            },
            self.anon,
            kvmtrace::summary(&self.traced),
        )
    }
}

pub(super) fn run(
    spec: &TrialSpec,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let program = programs::concurrent(seed, Pattern::Random, VCPUS, PAGES);
    let cgroup2 = trackcheck_harness::host::cgroup2_mount()
        .ok_or_else(|| TrialError::Skip("mglru: cgroup2 is not mounted".into()))?;
    // Before the machine: its memory must be charged to the aged memcg.
    let ager = Ager::start(Path::new(&cgroup2)).map_err(setup)?;
    let mut m = super::machine(spec, spec.tracker.ring_bytes())?;
    let (addr, len) = (m.data().host_addr(), m.data().mapped_len());
    let trace = kvmtrace::KvmTrace::age(addr, addr + len);
    let before = ager.snapshot().map_err(setup)?;
    let aging = ager.aging();
    let mut pace = |_: &RunView<'_>, _: u32, _: &[u64], _: &mut Shadow| {
        aging.wait_for(MIN_BUMPS, BUMP_WAIT);
        Ok(())
    };
    let driven = drive_program_with(&mut m, &program, tracker.get(), &mut pace);
    let tally = aging.finish();
    let traced = trace.and_then(|t| t.count());
    let after = ager.snapshot();
    let mut findings = driven?;
    let tally = tally.map_err(|e| TrialError::Error(format!("MGLRU aging: {e}")))?;
    let after = after.map_err(setup)?;
    if tally.writes == 0 {
        return Err(TrialError::Error(format!(
            "MGLRU aging: the kernel took no aging command ({})",
            tally.first_error.as_deref().unwrap_or("no error recorded")
        )));
    }
    m.detach(tracker.get())?;
    let proof = Proof {
        anon: tally.max_anon.max(after.anon()),
        least: charged_enough(),
        walk: mglru::walk_delta(before.walk(), after.walk()),
        traced,
        tally,
    };
    findings.evidence.push(proof.summary(&ager));
    findings.not_exercised = proof.not_exercised();
    ager.close().map_err(|e| {
        TrialError::Error(format!(
            "MGLRU: host settings not restored after the run: {e}"
        ))
    })?;
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::{PAGES, Proof};
    use crate::scenarios::mglru::Tally;

    /// Rises, charge, then the trace (or, untraced, the walk's young leaves), in that order.
    #[test]
    fn proof_needs_rises_the_charge_and_kvm_calls() {
        let proven = || Proof {
            tally: Tally {
                writes: 10,
                bumps: 9,
                ..Tally::default()
            },
            anon: PAGES + 5,
            least: PAGES - 62,
            walk: Some((100, 4000)),
            traced: Ok(12),
        };
        assert_eq!(proven().not_exercised(), None);
        let mut p = proven();
        p.tally.bumps = 0;
        assert!(p.not_exercised().is_some_and(|w| w.contains("never aged")));
        let mut p = proven();
        p.anon = 10;
        assert!(p.not_exercised().is_some_and(|w| w.contains("not charged")));
        let mut p = proven();
        p.traced = Ok(0);
        assert!(p.not_exercised().is_some_and(|w| w.contains("clear_young")));
        let mut p = proven();
        p.traced = Err("tracefs is not mounted".into());
        assert_eq!(p.not_exercised(), None);
        p.walk = Some((0, 4000));
        assert!(
            p.not_exercised()
                .is_some_and(|w| w.contains("nothing young"))
        );
        p.walk = None;
        assert!(p.not_exercised().is_some_and(|w| w.contains("no proof")));
    }
}
