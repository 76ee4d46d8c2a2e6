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
    for t in super::trials::all()
        .into_iter()
        .filter(|t| !matches!(t.check, super::trials::Check::Exhaustive(2)))
    {
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
