//! Exhaustive bounds, mutants and cost claims of every design.

use super::explore::{exhaustive, sample};
use super::scenarios;
use super::{designs, mutants};

#[test]
fn every_design_loses_nothing_within_the_exhaustive_bounds() {
    for d in designs() {
        for s in scenarios::exhaustive() {
            let r = exhaustive(d.as_ref(), &s.setup);
            println!(
                "{} {}: {} states, {} schedules in {:.2}s ({})",
                d.name(),
                s.name,
                r.states,
                r.schedules,
                r.seconds,
                r.bound
            );
            if let Some(c) = &r.counterexample {
                panic!("{} {} loses a write:\n{c}", d.name(), s.name);
            }
            assert!(r.schedules > 1 && r.states > 1);
        }
    }
}

#[test]
fn every_mutant_is_caught_with_a_minimal_schedule() {
    for m in mutants() {
        let caught = scenarios::exhaustive().into_iter().find_map(|s| {
            exhaustive(m.as_ref(), &s.setup)
                .counterexample
                .map(|c| (s.name, c))
        });
        let Some((scenario, c)) = caught else {
            panic!("mutant {} is not caught by any scenario", m.name());
        };
        println!("{} caught in {scenario}:\n{c}", m.name());
        assert!(c.is_loss(), "{}: {}", m.name(), c.verdict);
    }
}

#[test]
fn proptest_finds_and_shrinks_a_mutant_and_passes_the_designs() {
    let s = &scenarios::exhaustive()[0];
    for d in designs() {
        assert_eq!(sample(d.as_ref(), &s.setup, 64), None, "{}", d.name());
    }
    let m = &mutants()[0];
    let c = sample(m.as_ref(), &s.setup, 512).expect("proptest finds the mutant");
    println!("{} by proptest:\n{c}", m.name());
    assert!(c.is_loss());
}

#[test]
fn cost_figures() {
    use super::baseline::Baseline;
    use super::dbm::Dbm;
    use super::genwp::GenWp;
    use super::pml::Pml;
    for pages in [4, 16, 64] {
        for d in [
            &Baseline::default() as &dyn super::Design,
            &Pml::default(),
            &GenWp::default(),
            &Dbm::default(),
        ] {
            let c = scenarios::costs(d, pages, false).expect("no loss");
            println!("{pages:>3} pages {:<10} {c:?}", d.name());
        }
    }
}

#[test]
fn every_model_trial_passes_and_names_its_bound() {
    for t in super::trials::all().into_iter().filter(|t| {
        // The slow exhaustive scenario and the anchor (it needs KVM: anchor_tests) aside.
        !matches!(
            t.check,
            super::trials::Check::Exhaustive(2) | super::trials::Check::Anchor
        )
    }) {
        let r = super::trials::run(t);
        print!("{}", super::trials::text(std::slice::from_ref(&r)));
        assert_eq!(
            r.verdict,
            crate::trial::Verdict::Pass,
            "{}: {:?}",
            r.name,
            r.reason
        );
    }
}

#[test]
fn the_state_hash_mirror_agrees_with_the_ledger_on_every_step() {
    use super::world::{World, host_program};
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for d in designs() {
        for s in scenarios::exhaustive() {
            let program = host_program(d.as_ref(), s.setup.rounds);
            for _ in 0..32 {
                let choices = super::explore::schedules(200)
                    .new_tree(&mut runner)
                    .expect("strategy")
                    .current();
                let mut w = World::new(&s.setup);
                let mut i = 0;
                loop {
                    assert!(w.mirror_agrees(), "{} {} step {i}", d.name(), s.name);
                    let actors = w.enabled(&s.setup, &program);
                    if actors.is_empty() {
                        break;
                    }
                    let a = actors[choices.get(i).map_or(0, |&c| usize::from(c) % actors.len())];
                    w.step(d.as_ref(), &s.setup, &program, a);
                    i += 1;
                }
            }
        }
    }
}

#[test]
fn schedules_are_counted_exactly() {
    use super::idle::Idle;
    use super::world::Setup;
    use trackcheck_guests::{Op, Program, Thread};
    // One vCPU making `n` reads through its warm TLB (one step each) against a host whose
    // only step before waiting for the vCPU is the first copy: n + 1 interleavings.
    for n in 1..5u64 {
        let reads = (0..n).map(|p| Op::Read { page: p, offset: 0 }).collect();
        let program = Program::new(4, vec![Thread::new(reads)]);
        let setup = Setup::new(&program, scenarios::small(4, 1), false, 0);
        let r = exhaustive(&Idle::default(), &setup);
        assert_eq!(r.schedules, u128::from(n) + 1, "{n} reads");
        assert!(r.counterexample.is_none());
    }
}

/// A model trial's result goes through the golden file, the run's verdict, KTAP, JSON and
/// replay files like any trial: a failure stays a failure under a golden `pass`, and a model
/// trial gets no replay file (it has no spec) but keeps its `run --exact` replay.
#[test]
fn model_results_are_judged_and_reported_like_any_trial() {
    use crate::golden::Golden;
    use crate::report::{GoldenInfo, RunReport};
    use crate::trial::{FailKind, TrialResult, Verdict};
    let t = super::trials::all()
        .into_iter()
        .find(|t| t.check == super::trials::Check::Costs)
        .expect("a costs trial");
    let mut pass = super::trials::run(t);
    assert_eq!((pass.verdict, pass.spec), (Verdict::Pass, None));
    assert!(pass.evidence.iter().any(|e| e.contains("12 writes")));
    let mut fail = TrialResult::model("model::x::mutants", "x", "mutants");
    fail.verdict = Verdict::Fail;
    fail.fail_kind = Some(FailKind::Problem);
    fail.reason = Some("mutants not caught: x/Y".into());
    let dir = std::env::temp_dir().join(format!("trackcheck-model-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let snap = format!(
        "---\nsource: x\n---\n{} pass\nmodel::x::mutants pass\n",
        pass.name
    );
    std::fs::write(dir.join("k@1.snap"), snap).expect("golden file");
    let golden = Golden::load(&dir, "k@1").expect("loads");
    golden.apply(&mut pass);
    golden.apply(&mut fail);
    assert_eq!((pass.verdict, fail.verdict), (Verdict::Pass, Verdict::Fail));
    let mut results = vec![pass, fail];
    let written = crate::runner::write_replays(&dir, "k", &mut results).expect("replays");
    assert!(written.is_empty(), "{written:?}");
    assert_eq!(
        results[1].replay,
        "trackcheck run --exact 'model::x::mutants'"
    );
    super::trials::write_text(&results, &dir).expect("model report");
    let text = std::fs::read_to_string(dir.join("model-report.txt")).expect("written");
    assert!(text.contains("mutants not caught: x/Y") && text.contains("12 writes"));
    let info = GoldenInfo {
        key: "k@1".into(),
        path: "g".into(),
        found: true,
        unmatched: 0,
        missing: None,
    };
    let report = RunReport::new(trackcheck_harness::HostProfile::probe(), info, results, 1.0);
    assert!(report.has_unexpected());
    let ktap = report.ktap();
    assert!(
        ktap.contains(&format!("ok 1 {}\n", report.trials[0].name)),
        "{ktap}"
    );
    assert!(ktap.contains("not ok 2 model::x::mutants # mutants not caught: x/Y"));
    let json = serde_json::to_string(&report).expect("serialises");
    let back: RunReport = serde_json::from_str(&json).expect("reads back");
    assert_eq!(back.trials[1].spec, None);
    let _ = std::fs::remove_dir_all(&dir);
}
