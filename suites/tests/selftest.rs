//! The oracle's self-test: every tracker wrapped with each deliberate loss. A trial passes when
//! the oracle fails the run and every lost page it names is one the fault touched
//! (`report::caught`). Faults that cannot lose writes in a scenario or on a mechanism (its
//! rearm is atomic, or skipping it keeps the pages dirty) are ignored with that reason.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::sync::Arc;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use trackcheck_harness::HostProfile;
use trackcheck_suites::trial::{Verdict, run_trial};
use trackcheck_suites::{matrix, report, scenarios};

fn main() {
    let args = Arguments::from_args();
    let listing = args.list;
    let host = Arc::new(HostProfile::probe());
    let trials = matrix::selftests()
        .into_iter()
        .map(|spec| {
            let fault = spec
                .inject
                .unwrap_or(trackcheck_harness::track::inject::Fault::DropPage);
            let skip = scenarios::precheck(&spec, &host).err().or_else(|| {
                scenarios::inject_applicability(&spec, fault, spec.tracker.build().rearm_kind())
                    .err()
            });
            if let (Some(reason), false) = (&skip, listing) {
                eprintln!("skip {}: {reason}", spec.name());
            }
            let host = host.clone();
            Trial::ignorable_test(spec.name(), move || {
                let r = run_trial(&spec, spec.default_seed(), &host, &[]);
                if r.verdict == Verdict::Skip {
                    return Ok(Completion::ignored_with(r.reason.unwrap_or_default()));
                }
                if report::caught(&r) {
                    return Ok(Completion::Completed);
                }
                let affected: BTreeSet<(u32, u64)> =
                    r.injected_pages.iter().flatten().copied().collect();
                let lost: BTreeSet<(u32, u64)> = r.lost.iter().map(|l| (l.slot, l.page)).collect();
                let wrong: Vec<&(u32, u64)> = lost.difference(&affected).collect();
                Err(Failed::from(if lost.is_empty() || r.verdict != Verdict::Fail {
                    format!(
                        "{fault} was not caught: verdict {} ({}); the fault touched {} pages; seed {}",
                        r.verdict.name(),
                        r.reason.unwrap_or_default(),
                        affected.len(),
                        r.seed
                    )
                } else {
                    format!(
                        "the oracle named pages the fault did not touch: {wrong:?} (lost {lost:?}, affected {affected:?}); seed {}",
                        r.seed
                    )
                }))
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Kernel hazard lines no trial's threads logged are charged to no test: shown once, and
    // they fail the binary.
    let unattributed = trackcheck_suites::kernel_log::take_unattributed();
    if !unattributed.is_empty() {
        eprintln!("kernel hazards no trial's threads logged (unattributed; they fail the run):");
        for line in &unattributed {
            eprintln!("  {line}");
        }
        std::process::exit(101);
    }
    conclusion.exit();
}
