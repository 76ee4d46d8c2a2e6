//! The oracle's self-test: every tracker wrapped with each deliberate loss. A trial passes when
//! the oracle fails the run, every lost page it names is one the fault touched, and it names
//! every page the fault surely lost (`report::judge_selftest`). Faults that cannot lose writes in a scenario or on a mechanism (its
//! rearm is atomic, or skipping it keeps the pages dirty) are ignored with that reason.
#![forbid(unsafe_code)]

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
                report::judge_selftest(&r)
                    .map(|()| Completion::Completed)
                    .map_err(Failed::from)
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    // Kernel hazard lines no trial's threads logged are charged to no test: shown once, and
    // they fail the binary.
    if trackcheck_suites::kernel_log::report_unattributed() {
        std::process::exit(101);
    }
    conclusion.exit();
}
