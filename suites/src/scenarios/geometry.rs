//! CLEAR geometry: a slot of 1 GiB + 16 pages. Containment over writes at both ends and across
//! 64-page boundaries (every granularity clears ranges that end at the slot's end), then the
//! range rules of KVM_CLEAR_DIRTY_LOG: `first_page` a multiple of 64, `num_pages` a multiple of
//! 64 unless the range ends at the slot's end, nothing past the end.

use trackcheck_harness::machine::DATA_SLOT;
use trackcheck_harness::sys::dirty::clear_dirty_log;

use super::{Findings, TrialError, TrialTracker};
use crate::programs;
use crate::spec::TrialSpec;

/// 1 GiB + 16 pages.
pub(super) const SLOT_PAGES: u64 = (1 << 30) / 4096 + 16;

pub(super) fn run(spec: &TrialSpec, tracker: &mut TrialTracker) -> Result<Findings, TrialError> {
    if !matches!(
        spec.tracker,
        trackcheck_harness::track::TrackerSpec::ClearLog { .. }
    ) {
        return Err(TrialError::Skip(
            "clear geometry applies to KVM_CLEAR_DIRTY_LOG only".into(),
        ));
    }
    let program = programs::clear_geometry(SLOT_PAGES);
    let mut m = super::machine(spec, None)?;
    let run = super::stepped::drive(&mut m, &program, tracker.get(), false)?;
    let mut findings = run.findings;
    // Range rules, checked while manual protect is still on. Masks are empty: no page changes.
    let last_chunk = SLOT_PAGES / 64 * 64;
    let cases: [(u64, u32, bool, &str); 7] = [
        (1, 64, false, "first_page not a multiple of 64"),
        (
            0,
            63,
            false,
            "num_pages not a multiple of 64, range not at the slot's end",
        ),
        (last_chunk, 64, false, "range past the slot's end"),
        (SLOT_PAGES + 64, 64, false, "first_page past the slot's end"),
        (
            last_chunk,
            16,
            true,
            "short last chunk ending at the slot's end",
        ),
        (
            last_chunk - 64,
            80,
            true,
            "80 pages ending at the slot's end",
        ),
        (
            0,
            u32::try_from(SLOT_PAGES).unwrap_or(u32::MAX),
            true,
            "the whole slot",
        ),
    ];
    let zeros = vec![0u64; usize::try_from(SLOT_PAGES.div_ceil(64)).unwrap_or(0)];
    for (first, num, valid, what) in cases {
        let result = clear_dirty_log(m.vm().fd(), DATA_SLOT, first, num, &zeros);
        let line = format!(
            "KVM_CLEAR_DIRTY_LOG slot {DATA_SLOT} pages {first}..{} ({what})",
            first + u64::from(num)
        );
        match (valid, result) {
            (true, Ok(())) | (false, Err(libc::EINVAL)) => findings.evidence.push(format!(
                "{line}: {}",
                if valid { "accepted" } else { "EINVAL" }
            )),
            (true, Err(e)) => findings.problems.push(format!(
                "{line}: valid range rejected: {}",
                std::io::Error::from_raw_os_error(e)
            )),
            (false, Ok(())) => findings
                .problems
                .push(format!("{line}: accepted, expected EINVAL")),
            (false, Err(e)) => findings.problems.push(format!(
                "{line}: expected EINVAL, got {}",
                std::io::Error::from_raw_os_error(e)
            )),
        }
    }
    m.detach(tracker.get())?;
    Ok(findings)
}
