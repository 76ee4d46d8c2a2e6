//! Access tracking (family 10).
//!
//! Guest-visible accessed/dirty bits: the guest's page tables live in tracked memory it can
//! write (see `tables`). Each round every vCPU clears the A and D bits of its entries for its
//! pages, syncs — the host flushes the guest's TLB there (a CPL3 guest cannot) — reads some
//! pages and writes others, and syncs again; the host then reads the entries. Every page
//! accessed must have A set and every page written D: the x86 architecture promises that once
//! the TLB was flushed, so a miss is a failure. Without the host's flush (`-noflush`) KVM may
//! keep using translations made before the clear, and misses are measured, not asserted. The
//! dirty tracker harvests at every sync meanwhile (write-protecting pages between the clears
//! and the accesses) and is judged by the content oracle, the page-table pages included.
//! Results: (accessed, reported, missed, miss rate) for A and for D.
//!
//! The page_idle trial is in the matrix so hosts that have it show it; its check is not
//! written yet, so where the host offers it it skips saying so. DAMON is the `idle` family.

use std::collections::BTreeSet;

use trackcheck_guests::program::splitmix64;
use trackcheck_guests::{Op, Program, Thread};
use trackcheck_harness::HostProfile;
use trackcheck_harness::arch::pte;
use trackcheck_harness::machine::{Machine, VcpuState};

use super::content::ContentOracle;
use super::{Findings, TrialError, TrialTracker, check_mode};
use crate::spec::{AccessKind, TrialSpec};

/// Data pages (two of them hold the page tables).
pub(super) const PAGES: u64 = 1024;
/// vCPUs.
const VCPUS: u64 = 2;
/// Pages each vCPU watches.
const WATCHED: u64 = 128;
/// Rounds of clear, flush, access, check.
const ROUNDS: u32 = 6;

/// The pages vCPU `v` watches.
fn watched(v: u64) -> std::ops::Range<u64> {
    v * 256..v * 256 + WATCHED
}

/// What one round does on one vCPU.
#[derive(Clone, Debug, Default)]
struct Round {
    reads: BTreeSet<u64>,
    writes: BTreeSet<u64>,
}

/// Per vCPU and round: clear A/D of the watched pages, sync, read 32 and write 64 of them (8
/// written every round), sync.
fn program(seed: u64) -> (Program, Vec<Vec<Round>>) {
    let mut plan = Vec::new();
    let threads = (0..VCPUS)
        .map(|v| {
            let mut rng = seed ^ 0xAD00_0000 ^ v;
            let pages = watched(v);
            let hot: Vec<u64> = (0..8).map(|i| pages.start + i * 13).collect();
            // The hot pages are written before the first clear too, so the first harvest
            // reports data pages (the self-test's skipped rearm must leave some writable).
            let mut ops: Vec<Op> = hot
                .iter()
                .map(|&page| Op::Write {
                    page,
                    offset: 8 * u16::try_from(v).unwrap_or(0),
                })
                .collect();
            let mut rounds = Vec::new();
            for r in 0..ROUNDS {
                for page in pages.clone() {
                    ops.push(Op::ClearAd { page });
                }
                ops.push(Op::Sync(2 * r + 1));
                let mut round = Round::default();
                let pick = |rng: &mut u64| pages.start + splitmix64(rng) % WATCHED;
                for _ in 0..32 {
                    let page = pick(&mut rng);
                    ops.push(Op::Read { page, offset: 0 });
                    round.reads.insert(page);
                }
                for page in hot.iter().copied().chain((0..56).map(|_| pick(&mut rng))) {
                    ops.push(Op::Write {
                        page,
                        offset: 8 * u16::try_from(v).unwrap_or(0),
                    });
                    round.writes.insert(page);
                }
                ops.push(Op::Sync(2 * r + 2));
                rounds.push(round);
            }
            plan.push(rounds);
            Thread::new(ops)
        })
        .collect();
    (Program::new(PAGES - 2, threads), plan)
}

/// Counts of one bit over a run.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// Pages that had to have the bit (accessed / written).
    due: u64,
    /// Of those, pages that had it.
    set: u64,
    /// Pages that had it without being due.
    extra: u64,
}

impl Tally {
    fn missed(self) -> u64 {
        self.due - self.set
    }

    fn summary(self, bit: &str, what: &str) -> String {
        let rate = if self.due == 0 {
            0.0
        } else {
            100.0 * self.missed() as f64 / self.due as f64
        };
        format!(
            "{bit}: {what} {}, reported {}, missed {} (miss rate {rate:.1}%), set without {what} {}",
            self.due,
            self.set,
            self.missed(),
            self.extra
        )
    }
}

/// Whether the host can run `kind` at all (guest-visible A/D bits: x86_64 so far).
pub(super) fn precheck(kind: AccessKind, host: &HostProfile) -> Result<(), String> {
    let mech = match kind {
        AccessKind::GuestAd | AccessKind::GuestAdNoFlush => {
            trackcheck_harness::Mechanism::GuestAdBits
        }
    };
    match mech.support(host).reason() {
        Some(r) => Err(format!("{mech}: {r}")),
        None => Ok(()),
    }
}

pub(super) fn run(
    spec: &TrialSpec,
    kind: AccessKind,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let flush = match kind {
        AccessKind::GuestAd => true,
        AccessKind::GuestAdNoFlush => false,
    };
    let mut config = super::machine_config(spec, PAGES, 2, spec.tracker.ring_bytes());
    config.tables_in_data = true;
    let mut m = Machine::new(config)?;
    let (program, plan) = program(seed);
    let tracker = tracker.get();
    m.load(&program)?;
    let stats_before = m.vcpu_stats();
    m.attach(tracker)?;
    let mut oracle = ContentOracle::new(&m, Vec::new());
    oracle.harvest(&mut m, tracker)?; // baseline
    let (mut a, mut d) = (Tally::default(), Tally::default());
    let mut misses: Vec<String> = Vec::new();
    let mut segment = 0u32;
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        m.run()?;
        segment += 1;
        if segment % 2 == 1 {
            // The clears are done: the host flushes for the guest (or, measuring, does not).
            if flush {
                m.reset_guest_mmu()?;
            }
        } else if segment <= 2 * ROUNDS {
            let r = usize::try_from(segment / 2 - 1).unwrap_or(0);
            check_round(
                |page| m.leaf_entry(page).unwrap_or(0),
                &plan,
                r,
                &mut a,
                &mut d,
                &mut misses,
            );
        }
        oracle.harvest(&mut m, tracker)?;
    }
    m.detach(tracker)?;
    let stats_after = m.vcpu_stats();
    let mut findings = oracle.findings;
    findings.evidence.push(a.summary("A", "accessed"));
    findings.evidence.push(d.summary("D", "written"));
    if flush {
        if !misses.is_empty() {
            findings.problems.push(format!(
                "{} accessed/dirty bits missing after the host flushed the guest's TLB: {}{}",
                misses.len(),
                misses
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; "),
                if misses.len() > 5 { " ..." } else { "" }
            ));
        }
    } else {
        findings.evidence.push(format!(
            "without a flush after the guest's clears, misses are measured, not asserted ({} pages)",
            misses.len()
        ));
    }
    findings.evidence.extend(tracker.evidence());
    let mode = m.mode_evidence(&stats_before, &stats_after, m.writes_done());
    findings.evidence.push(mode.summary());
    check_mode(&mode)?;
    findings.mode = Some(mode);
    Ok(findings)
}

/// Read the entries after round `r` (`entry(page)`: the guest's leaf entry mapping data page
/// `page`) and tally them against what the round did.
fn check_round(
    entry: impl Fn(u64) -> u64,
    plan: &[Vec<Round>],
    r: usize,
    a: &mut Tally,
    d: &mut Tally,
    misses: &mut Vec<String>,
) {
    for (v, rounds) in plan.iter().enumerate() {
        let Some(round) = rounds.get(r) else { continue };
        for page in watched(v as u64) {
            let entry = entry(page);
            let (accessed, written) = (
                round.reads.contains(&page) || round.writes.contains(&page),
                round.writes.contains(&page),
            );
            for (tally, due, bit, name) in [
                (&mut *a, accessed, pte::A, "A"),
                (&mut *d, written, pte::D, "D"),
            ] {
                let set = entry & bit != 0;
                match (due, set) {
                    (true, true) => {
                        tally.due += 1;
                        tally.set += 1;
                    }
                    (true, false) => {
                        tally.due += 1;
                        misses.push(format!(
                            "round {} vCPU {v} page {page}: {name} clear",
                            r + 1
                        ));
                    }
                    (false, true) => tally.extra += 1,
                    (false, false) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The A/D check catches a bit KVM failed to set (a miss injected into otherwise perfect
    /// entries), and counts bits set without an access.
    #[test]
    fn a_missing_accessed_or_dirty_bit_is_a_miss() {
        let (_, plan) = program(7);
        let round = &plan[0][0];
        let read_only = *round
            .reads
            .iter()
            .find(|p| !round.writes.contains(p))
            .expect("a page only read");
        let written = *round.writes.iter().next().expect("a written page");
        let perfect = |page: u64| {
            let v = usize::try_from(page / 256).unwrap_or(0);
            let r = &plan[v][0];
            let mut e = 0;
            if r.reads.contains(&page) || r.writes.contains(&page) {
                e |= pte::A;
            }
            if r.writes.contains(&page) {
                e |= pte::D;
            }
            e
        };
        let (mut a, mut d, mut misses) = (Tally::default(), Tally::default(), Vec::new());
        check_round(perfect, &plan, 0, &mut a, &mut d, &mut misses);
        assert!(misses.is_empty() && a.missed() == 0 && d.missed() == 0);
        let (mut a, mut d, mut misses) = (Tally::default(), Tally::default(), Vec::new());
        let broken = |page: u64| {
            if page == read_only {
                0
            } else if page == written {
                pte::A
            } else {
                perfect(page)
            }
        };
        check_round(broken, &plan, 0, &mut a, &mut d, &mut misses);
        assert_eq!((a.missed(), d.missed()), (1, 1), "{misses:?}");
        assert!(
            misses
                .iter()
                .any(|m| m.contains(&format!("page {read_only}: A clear")))
        );
        assert!(
            misses
                .iter()
                .any(|m| m.contains(&format!("page {written}: D clear")))
        );
        let (mut a, mut d, mut misses) = (Tally::default(), Tally::default(), Vec::new());
        check_round(
            |page| perfect(page) | pte::A,
            &plan,
            0,
            &mut a,
            &mut d,
            &mut misses,
        );
        assert!(a.extra > 0 && misses.is_empty());
    }
}
