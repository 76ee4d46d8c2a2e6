//! The conformance matrix as tests: one trial per `arch::mechanism::scenario::backing::mode`,
//! judged against this host's golden matrix (known failures pass, with their evidence on
//! stderr; unexpected passes fail). Trials that cannot run here are ignored with the reason.
#![forbid(unsafe_code)]

use std::sync::Arc;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use trackcheck_harness::HostProfile;
use trackcheck_suites::golden::{self, Golden};
use trackcheck_suites::trial::{TrialResult, Verdict, is_demanded, required_mechanisms, run_trial};
use trackcheck_suites::{matrix, runner, scenarios};

fn main() {
    let args = Arguments::from_args();
    let listing = args.list;
    let host = Arc::new(HostProfile::probe());
    let golden = match Golden::load(&golden::default_dir(), &host.golden_key()) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            eprintln!("bad golden file: {e}");
            std::process::exit(2);
        }
    };
    if let Some(missing) = golden.missing_note().filter(|_| !listing) {
        eprintln!("{missing}");
    }
    // The project's own tests keep the project's regression files: a property trial's new
    // failing case is saved in golden/proptest-regressions/ (to be reviewed and committed).
    // `trackcheck run` saves nowhere unless given --out.
    scenarios::save_regressions_in(Some(scenarios::committed_regressions_dir()));
    let required = Arc::new(required_mechanisms());
    let out = Arc::new(std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("trackcheck"));
    let specs = matrix::matrix();
    let mut trials: Vec<Trial> = specs
        .iter()
        .map(|spec| {
            let spec = *spec;
            let precheck = scenarios::precheck(&spec, &host);
            let demanded = is_demanded(&spec, &required);
            let (host, golden, required, out) =
                (host.clone(), golden.clone(), required.clone(), out.clone());
            let ignored = precheck.is_err() && !demanded;
            if let (Err(reason), false, true) = (&precheck, listing, ignored) {
                eprintln!("skip {}: {reason}", spec.name());
            }
            Trial::ignorable_test(spec.name(), move || {
                let mut r = run_trial(&spec, spec.default_seed(), &host, &required);
                golden.apply(&mut r);
                let _ = runner::write_replays(&out, &host.key(), std::slice::from_mut(&mut r));
                judge(r)
            })
            .with_ignored_flag(ignored)
        })
        .collect();
    // Models of designs no host runs: judged like any trial, against the same golden file.
    let models = trackcheck_suites::designs::trials::all();
    for t in models.iter().copied() {
        let golden = golden.clone();
        trials.push(Trial::ignorable_test(t.name(), move || {
            let mut r = trackcheck_suites::designs::trials::run(t);
            golden.apply(&mut r);
            judge(r)
        }));
    }
    // Golden entries that name no trial of the matrix are stale: the file needs a review.
    let names: std::collections::BTreeSet<String> = specs
        .iter()
        .map(|s| s.name())
        .chain(models.iter().map(|t| t.name()))
        .collect();
    let stale: Vec<String> = golden
        .entries
        .keys()
        .filter(|k| !names.contains(*k))
        .cloned()
        .collect();
    let path = golden.path.display().to_string();
    trials.push(Trial::test("golden::no_stale_entries", move || {
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!("{} entries of {path} name no trial (first: {}): run trackcheck run --bless and review", stale.len(), stale[0]).into())
        }
    }));
    let conclusion = libtest_mimic::run(&args, trials);
    // Kernel hazard lines no trial's threads logged are charged to no test: shown once, and
    // they fail the binary.
    if trackcheck_suites::kernel_log::report_unattributed() {
        std::process::exit(101);
    }
    conclusion.exit();
}

/// A judged result as a test outcome: skips and paths not exercised are ignored with the
/// reason, known failures pass with their evidence on stderr, everything unexpected fails.
fn judge(r: TrialResult) -> Result<Completion, Failed> {
    let line = format!(
        "{}: {}",
        r.verdict.name(),
        r.reason.clone().unwrap_or_default()
    );
    match r.verdict {
        Verdict::Pass => Ok(Completion::Completed),
        Verdict::Skip => Ok(Completion::ignored_with(r.reason.unwrap_or_default())),
        Verdict::NotExercised => Ok(Completion::ignored_with(format!(
            "path not exercised: {}",
            r.reason.unwrap_or_default()
        ))),
        Verdict::KnownFailure => {
            eprintln!(
                "known failure {}: {}\n  seed {}; replay: {}",
                r.name,
                r.reason.unwrap_or_default(),
                r.seed,
                r.replay
            );
            Ok(Completion::Completed)
        }
        Verdict::Fail | Verdict::UnexpectedPass | Verdict::Error => Err(Failed::from(format!(
            "{line}\nevidence: {}\nseed {}; replay: {}",
            r.evidence.join(" | "),
            r.seed,
            r.replay
        ))),
    }
}
