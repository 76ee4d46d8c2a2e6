//! The guest's own page tables in tracked memory (family 8).
//!
//! The machine puts the leaf tables that map the data region in the data region's last pages:
//! tracked, writable by the guest, entries starting with accessed and dirty clear. When KVM
//! sets those bits (walking the guest's tables for a shadow MMU, or emulating an access) the
//! table pages change and must be reported; they are counted as the `guest-page-table`
//! allowance. `gpt-remap` has the guest rewrite its entries, pointing pages at other physical
//! pages and back; it cannot flush its own TLB at CPL3, so the host resets the vCPU's MMU at
//! every sync point (KVM_SET_SREGS toggling CR4.PGE). On a shadow MMU the guest's entry writes
//! go through KVM (`mmu_pte_write`, or `mmu_unsync` and a resync at the flush): the stats show
//! it. The content oracle judges every round.

use trackcheck_guests::program::splitmix64;
use trackcheck_guests::{GuestPageSize, Op, Program, Thread};
use trackcheck_harness::host::BackendKind;
use trackcheck_harness::machine::{Machine, VcpuState};

use super::content::ContentOracle;
use super::{Findings, TrialError, TrialTracker, check_mode, stepped};
use crate::programs;
use crate::spec::{TablesCase, TrialSpec};

/// Data pages per case (tables included).
pub(super) const fn data_pages(case: TablesCase) -> u64 {
    match case {
        TablesCase::Ad4K | TablesCase::Remap => 1024,
        TablesCase::Ad2M => 8 * 512,
        TablesCase::Guest1G => 1 << 18,
    }
}

/// vCPUs per case.
pub(super) const fn vcpus(case: TablesCase) -> usize {
    match case {
        TablesCase::Remap => 1,
        _ => 2,
    }
}

pub(super) fn run(
    spec: &TrialSpec,
    case: TablesCase,
    seed: u64,
    tracker: &mut TrialTracker,
) -> Result<Findings, TrialError> {
    let mut config = super::machine_config(
        spec,
        data_pages(case),
        vcpus(case),
        spec.tracker.ring_bytes(),
    );
    config.guest_page_size = match case {
        TablesCase::Ad2M => GuestPageSize::Size2M,
        TablesCase::Guest1G => GuestPageSize::Size1G,
        TablesCase::Ad4K | TablesCase::Remap => GuestPageSize::Size4K,
    };
    if case == TablesCase::Guest1G {
        // 1 GiB guest pages: the stepped scenario's own oracle, tables where they always are.
        let mut m = Machine::new(config)?;
        let program = programs::stepped(seed, 2, data_pages(case), 6, 40);
        let run = stepped::drive(&mut m, &program, tracker.get(), false)?;
        m.detach(tracker.get())?;
        return Ok(run.findings);
    }
    config.tables_in_data = true;
    let mut m = Machine::new(config)?;
    let pages = m.program_pages();
    let program = match case {
        TablesCase::Remap => remap_program(seed, pages),
        _ => programs::stepped(seed, 2, pages, 6, 40),
    };
    drive(&mut m, &program, tracker, case)
}

/// Pages the remap program writes through: their mappings move between three places.
const MOVED: u64 = 16;
/// Where the moved pages' mappings point in turn (data pages).
const FRAMES: [u64; 2] = [600, 700];

/// Write pages 0..16 and a hot set; then, three times: write them again through their current
/// mappings (so KVM shadows the table that maps them), remap pages 0..16 (to 600.., to 700..,
/// back to themselves), sync (the host flushes), write them and the hot set through the new
/// mappings, sync; finally clear their accessed/dirty bits, sync and write them once more.
fn remap_program(seed: u64, pages: u64) -> Program {
    let mut rng = seed ^ 0x0E3A_0000;
    let hot: Vec<u64> = (0..8).map(|_| 100 + splitmix64(&mut rng) % 200).collect();
    let mut ops = Vec::new();
    let mut sync = 0;
    let writes = |ops: &mut Vec<Op>, offset: u16| {
        for page in 0..MOVED {
            ops.push(Op::Write { page, offset });
        }
        for &page in &hot {
            ops.push(Op::Write { page, offset });
        }
    };
    writes(&mut ops, 0);
    sync += 1;
    ops.push(Op::Sync(sync));
    for (round, targets) in [Some(FRAMES[0]), Some(FRAMES[1]), None]
        .into_iter()
        .enumerate()
    {
        let round = u16::try_from(round).unwrap_or(0);
        writes(&mut ops, 512 + 8 * round);
        for page in 0..MOVED {
            ops.push(Op::Remap {
                page,
                to: targets.map_or(page, |base| base + page),
            });
        }
        sync += 1;
        ops.push(Op::Sync(sync));
        writes(&mut ops, 8 * (round + 1));
        sync += 1;
        ops.push(Op::Sync(sync));
    }
    writes(&mut ops, 1024);
    for page in 0..MOVED {
        ops.push(Op::ClearAd { page });
    }
    sync += 1;
    ops.push(Op::Sync(sync));
    writes(&mut ops, 64);
    Program::new(pages, vec![Thread::new(ops)])
}

fn drive(
    m: &mut Machine,
    program: &Program,
    tracker: &mut TrialTracker,
    case: TablesCase,
) -> Result<Findings, TrialError> {
    let tracker = tracker.get();
    m.load(program)?;
    let vcpu_before = m.vcpu_stats();
    let vm_before = m.vm_stats();
    m.attach(tracker)?;
    let mut oracle = ContentOracle::new(m, Vec::new());
    oracle.harvest(m, tracker)?; // baseline
    // `mmu_unsync` counts the shadow pages unsync right now (a gauge): sum what each segment
    // added (the host's flush at the sync point syncs them again).
    let unsync = |m: &Machine| m.vm_stats().get("mmu_unsync").unwrap_or(0);
    let mut unsynced = 0;
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        let before = unsync(m);
        m.run()?;
        unsynced += unsync(m).saturating_sub(before);
        // The guest cannot flush its TLB at CPL3: the host does, at every sync point.
        m.reset_guest_mmu()?;
        oracle.harvest(m, tracker)?;
    }
    m.detach(tracker)?;
    let vcpu_after = m.vcpu_stats();
    let mmu = m.vm_stats().delta(&vm_before);
    let table_changes = oracle.table_changes;
    let mut findings = oracle.findings;
    let table_pages = findings
        .report
        .allowed
        .get("guest-page-table")
        .copied()
        .unwrap_or(0);
    let stat = |name: &str| mmu.get(name).unwrap_or(0);
    findings.evidence.push(format!(
        "{} writes; guest page-table pages changed {table_changes} times after the baseline and reported {table_pages} times; shadow MMU: mmu_pte_write +{}, pages made unsync {unsynced}, mmu_shadow_zapped +{}",
        m.writes_done(),
        stat("mmu_pte_write"),
        stat("mmu_shadow_zapped"),
    ));
    findings.evidence.extend(tracker.evidence());
    // Without page-table ops in the program, a change to a table page after the baseline is
    // KVM setting accessed/dirty bits.
    if case != TablesCase::Remap && table_changes == 0 {
        findings.not_exercised = Some(
            "KVM set no accessed/dirty bit in the tracked page tables while the guest ran".into(),
        );
    }
    if case == TablesCase::Remap {
        // Remap round i wrote at offset 8 * (i + 1) through the new mappings.
        let moved = FRAMES
            .iter()
            .zip(1u64..)
            .all(|(&f, i)| (0..MOVED).all(|p| m.data().read_u64((f + p) * 4096 + 8 * i) != 0));
        if !moved {
            findings
                .problems
                .push("the writes after a remap did not land in the pages the guest mapped".into());
        }
        // A shadow MMU must have seen the guest's entry writes.
        if m.backend() == BackendKind::Pvm && stat("mmu_pte_write") + unsynced == 0 {
            findings.not_exercised = Some(
                "the shadow MMU saw none of the guest's page-table writes (mmu_pte_write unchanged, no page made unsync)"
                    .into(),
            );
        }
    }
    let mode = m.mode_evidence(&vcpu_before, &vcpu_after, m.writes_done());
    findings.evidence.push(mode.summary());
    check_mode(&mode)?;
    findings.mode = Some(mode);
    Ok(findings)
}
