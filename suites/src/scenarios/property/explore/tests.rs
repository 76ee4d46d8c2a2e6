//! The rules of [`super::explore`], on a plain integer strategy (no KVM needed).

use std::cell::Cell;
use std::path::PathBuf;

use proptest::strategy::{Strategy, ValueTree};

use super::*;

/// A fresh, empty directory under the system's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("trackcheck-explore-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

fn plan(dir: &Path, seed: u64, save: bool) -> Plan {
    Plan {
        seed,
        cases: 64,
        replay: vec![dir.join("committed.txt")],
        save: save.then(|| dir.join("saved").join("trial.txt")),
    }
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| l.starts_with("cc ")).count())
        .unwrap_or(0)
}

#[test]
fn a_harness_error_ends_the_run_at_once_unshrunk_and_unsaved() {
    let dir = scratch("harness");
    let plan = plan(&dir, 7, true);
    let calls = Cell::new(0);
    let result = explore(&plan, &(0u32..1000), |_| -> Outcome<u32> {
        calls.set(calls.get() + 1);
        Outcome::Harness(TrialError::Error("KVM_CREATE_VM: no memory".into()))
    });
    match result {
        Err(TrialError::Error(e)) => assert_eq!(e, "KVM_CREATE_VM: no memory"),
        other => panic!("expected the harness error, got {other:?}"),
    }
    assert_eq!(calls.get(), 1, "no case ran after the harness error");
    assert!(
        !dir.join("saved").exists(),
        "nothing saved for a harness error"
    );
}

#[test]
fn a_skip_ends_the_run_as_a_skip() {
    let dir = scratch("skip");
    let calls = Cell::new(0);
    let result = explore(&plan(&dir, 7, true), &(0u32..1000), |v| {
        calls.set(calls.get() + 1);
        if calls.get() == 3 {
            Outcome::Harness(TrialError::Skip("no hugetlb pages".into()))
        } else {
            Outcome::<u32>::Pass.or_finding(v, false)
        }
    });
    assert!(matches!(result, Err(TrialError::Skip(ref s)) if s == "no hugetlb pages"));
    assert_eq!(calls.get(), 3);
    assert!(!dir.join("saved").exists());
}

impl<F> Outcome<F> {
    /// A finding of `f` when `fails`, else `self`.
    fn or_finding(self, f: F, fails: bool) -> Self {
        if fails {
            Outcome::Finding {
                finding: f,
                reason: "lost".into(),
            }
        } else {
            self
        }
    }
}

#[test]
fn a_finding_is_shrunk_to_its_minimal_case_and_saved_once() {
    let dir = scratch("finding");
    let plan = plan(&dir, 11, true);
    let run = || {
        explore(&plan, &(0u32..1000), |v| {
            Outcome::Pass.or_finding(v, v >= 100)
        })
        .expect("a finding is not an error")
    };
    let first = run();
    let (found, case) = first.failure.expect("found");
    assert_eq!(
        (found, case.as_str()),
        (100, "100"),
        "shrunk to the boundary"
    );
    let saved = plan.save.clone().expect("asked to save");
    assert_eq!(first.saved.as_deref(), Some(saved.as_path()));
    assert_eq!(lines(&saved), 1);
    // Run again: the saved seed is replayed first and fails again; it is not saved twice.
    let again = run();
    assert_eq!(again.failure.map(|f| f.0), Some(100));
    assert_eq!(again.saved, None);
    assert_eq!(lines(&saved), 1);
    assert!(
        !dir.join("committed.txt").exists(),
        "the replayed file is never written"
    );
}

#[test]
fn nothing_is_saved_unless_asked() {
    let dir = scratch("unasked");
    let r = explore(&plan(&dir, 11, false), &(0u32..1000), |v| {
        Outcome::Pass.or_finding(v, v >= 100)
    })
    .expect("finding");
    assert!(r.failure.is_some());
    assert_eq!(r.saved, None);
    let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").collect();
    assert!(left.is_empty(), "wrote {left:?}");
}

#[test]
fn a_harness_error_while_shrinking_keeps_the_smallest_failure() {
    let dir = scratch("shrinking");
    let calls = Cell::new(0);
    let after_error = Cell::new(0);
    let errored = Cell::new(false);
    let failed_before = Cell::new(false);
    let r = explore(&plan(&dir, 3, false), &(0u32..1000), |v| {
        calls.set(calls.get() + 1);
        if errored.get() {
            after_error.set(after_error.get() + 1);
        }
        // A failing case and a few shrinking steps run; then the harness breaks.
        if v >= 100 && failed_before.get() && calls.get() > 4 && !errored.get() {
            errored.set(true);
            return Outcome::Harness(TrialError::Error("machine lost".into()));
        }
        failed_before.set(failed_before.get() || v >= 100);
        Outcome::Pass.or_finding(v, v >= 100)
    })
    .expect("a loss found is a failure, not an error");
    let (found, case) = r.failure.expect("the finding stays");
    assert!(found >= 100, "{found}");
    assert_eq!(
        case,
        found.to_string(),
        "the case shown is the one that failed"
    );
    assert!(matches!(r.shrinking_stopped, Some(TrialError::Error(ref e)) if e == "machine lost"));
    assert_eq!(after_error.get(), 0, "no case ran after the harness error");
}

#[test]
fn the_seed_decides_the_cases() {
    let first = |seed: u64| {
        let mut runner = TestRunner::new_with_rng(Config::default(), rng(seed));
        (0..4)
            .map(|_| {
                (0u64..u64::MAX)
                    .new_tree(&mut runner)
                    .expect("tree")
                    .current()
            })
            .collect::<Vec<u64>>()
    };
    assert_eq!(first(42), first(42), "a replay reproduces");
    assert_ne!(first(42), first(43), "another seed explores other cases");
}

#[test]
fn different_seeds_save_different_cases() {
    let dir = scratch("distinct");
    let mut seeds = Vec::new();
    for seed in [1u64, 2] {
        let mut p = plan(&dir, seed, true);
        p.save = Some(dir.join(format!("saved-{seed}.txt")));
        let r = explore(&p, &(0u32..1_000_000), |v| {
            Outcome::Pass.or_finding(v, v % 7 == 3)
        })
        .expect("finding");
        assert!(r.saved.is_some());
        let text = std::fs::read_to_string(dir.join(format!("saved-{seed}.txt"))).expect("saved");
        let line = text.lines().find(|l| l.starts_with("cc ")).expect("a seed");
        seeds.push(line.split('#').next().unwrap_or("").trim().to_string());
    }
    assert_ne!(seeds[0], seeds[1]);
}

#[test]
fn committed_cases_are_replayed_first() {
    let dir = scratch("committed");
    let mut p = plan(&dir, 5, true);
    let first_failing = Cell::new(None);
    explore(&p, &(0u32..1_000_000), |v| {
        if first_failing.get().is_none() && v >= 1000 {
            first_failing.set(Some(v));
        }
        Outcome::Pass.or_finding(v, v >= 1000)
    })
    .expect("finding");
    let original = first_failing.get().expect("a case failed");
    // That seed becomes the committed file; another seed, another save directory.
    std::fs::rename(p.save.as_ref().expect("saved"), &p.replay[0]).expect("move");
    p.seed = 6;
    p.save = Some(dir.join("other.txt"));
    let r = explore(&p, &(0u32..1_000_000), |v| {
        Outcome::Pass.or_finding(v, v == original)
    })
    .expect("the committed case fails again");
    assert_eq!(r.failure.map(|f| f.0), Some(original));
    assert_eq!(r.saved, None, "a replayed seed is not saved again");
    assert_eq!(lines(&p.replay[0]), 1, "the committed file is not written");
}

#[test]
fn a_failure_says_whether_it_was_replayed_from_a_file() {
    let dir = scratch("replayed");
    let p = plan(&dir, 9, true);
    let fails = |v: u32| Outcome::Pass.or_finding(v, v >= 100);
    let first = explore(&p, &(0u32..1000), fails).expect("finding");
    assert!(!first.replayed, "a new case");
    let again = explore(&p, &(0u32..1000), fails).expect("finding");
    assert!(again.replayed, "the saved case, replayed");
}

/// What the trial reports when a harness error stopped the shrinking of a kernel finding: the
/// finding (a failure, not an error), the case, the replay command, why shrinking stopped.
#[test]
fn a_finding_whose_shrinking_stopped_is_still_the_trials_failure() {
    let spec = crate::matrix::matrix()
        .into_iter()
        .find(|s| s.scenario == crate::spec::Scenario::PropPrograms)
        .expect("a proptest-programs trial");
    let explored = Explored {
        failure: Some((
            super::super::Failure {
                lost: Vec::new(),
                hazards: vec!["vCPU stuck on KVM_EXIT_DIRTY_RING_FULL".into()],
            },
            "Program { .. }".into(),
        )),
        reason: "hazard".into(),
        shrinking_stopped: Some(TrialError::Error("KVM_CREATE_VM: no memory".into())),
        saved: None,
        save_dir: None,
        replayed: false,
    };
    let f = super::super::conclude(explored, &spec, "programs", 42);
    assert_eq!(f.hazards, ["vCPU stuck on KVM_EXIT_DIRTY_RING_FULL"]);
    let evidence = f.evidence.join("\n");
    for needle in [
        "minimal failing programs (seed 42; replay: trackcheck run --exact",
        "Program { .. }",
        "shrinking stopped early",
        "KVM_CREATE_VM: no memory",
        "not saved",
    ] {
        assert!(
            evidence.contains(needle),
            "{needle:?} missing in {evidence}"
        );
    }
}

/// The project's committed regression file is replayed by every run, from where it lies.
#[test]
fn the_committed_regression_file_is_on_every_plan() {
    let name = "x86_64::dirty-ring-4k::proptest-programs::anon::emulated";
    let p = Plan::for_trial(name, 1, 4);
    let committed = &p.replay[0];
    assert!(committed.is_file(), "{} is missing", committed.display());
    let committed = &committed.canonicalize().expect("canonical path");
    assert!(
        committed.ends_with("golden/proptest-regressions/x86_64__dirty-ring-4k__proptest-programs__anon__emulated.txt"),
        "{}",
        committed.display()
    );
    assert!(!read_seeds(committed).is_empty(), "its seeds parse");
}
