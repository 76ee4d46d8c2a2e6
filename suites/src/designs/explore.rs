//! Exploring interleavings: exhaustively (every schedule within the scenario's bound) and by
//! proptest (random schedules that shrink), with readable counterexamples.
//!
//! The bound of an exhaustive run is the scenario itself: its vCPU programs are finite and the
//! host runs a fixed number of rounds, so every schedule ends; [`Bound`] states it. States are
//! merged by a 128-bit fingerprint of everything that decides the future (see
//! [`World::fingerprint`]); a collision would merge two different states, with odds near
//! 2^-128 per pair. Schedules are counted exactly (paths through the state graph, memoised).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use super::world::{Actor, Design, HostOp, Setup, World, host_program};

/// What bounds an exhaustive run, for the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// vCPUs.
    pub vcpus: usize,
    /// Pages.
    pub pages: usize,
    /// Guest accesses, over all vCPUs.
    pub accesses: usize,
    /// Host ops (a `Next` op counts once).
    pub host_ops: usize,
    /// Concurrent rounds before the final one.
    pub rounds: usize,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vCPUs, {} pages, {} guest accesses, {} host ops ({} concurrent rounds + final)",
            self.vcpus, self.pages, self.accesses, self.host_ops, self.rounds
        )
    }
}

/// A schedule that loses a write (or gets stuck), with its readable steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counterexample {
    /// Actors in order.
    pub schedule: Vec<Actor>,
    /// One line per step.
    pub lines: Vec<String>,
    /// What the oracle said.
    pub verdict: String,
}

impl Counterexample {
    /// The oracle found a loss (a lost write or an access reported idle), not a deadlock.
    #[must_use]
    pub fn is_loss(&self) -> bool {
        self.verdict.starts_with("lost") || self.verdict.starts_with("missed access")
    }
}

impl fmt::Display for Counterexample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in self.lines.iter().enumerate() {
            writeln!(f, "  {:>3}. {l}", i + 1)?;
        }
        write!(f, "  => {}", self.verdict)
    }
}

/// Result of an exhaustive run.
#[derive(Clone, Debug)]
pub struct Exhaustive {
    /// The bound.
    pub bound: Bound,
    /// Distinct states visited.
    pub states: u64,
    /// Complete schedules (saturating at `u128::MAX`).
    pub schedules: u128,
    /// Seconds taken.
    pub seconds: f64,
    /// A losing schedule, if any (the shortest, found by breadth-first search).
    pub counterexample: Option<Counterexample>,
}

fn bound(setup: &Setup, program: &[HostOp]) -> Bound {
    Bound {
        vcpus: setup.geo.vcpus,
        pages: setup.geo.pages,
        accesses: setup.accesses.iter().map(Vec::len).sum(),
        host_ops: program.len(),
        rounds: setup.rounds,
    }
}

/// Replay `schedule` from the start, naming every step.
#[must_use]
pub fn replay(design: &dyn Design, setup: &Setup, schedule: &[Actor]) -> Counterexample {
    let program = host_program(design, setup.rounds);
    let mut w = World::new(setup);
    let mut lines = Vec::new();
    for &a in schedule {
        lines.push(w.step(design, setup, &program, a));
    }
    let verdict = match (w.ledger.report().lost.first(), w.finished(setup, &program)) {
        (Some(l), _) => format!("lost: {l}"),
        (None, _) if w.access.first_miss.is_some() => {
            format!(
                "missed access: {}",
                w.access.first_miss.clone().unwrap_or_default()
            )
        }
        (None, Err(e)) => e,
        (None, Ok(true)) => "no loss".to_string(),
        (None, Ok(false)) => "unfinished, no loss yet".to_string(),
    };
    Counterexample {
        schedule: schedule.to_vec(),
        lines,
        verdict,
    }
}

/// Every interleaving of `setup` under `design`: counts states and schedules, and returns the
/// shortest losing or stuck schedule if there is one.
#[must_use]
pub fn exhaustive(design: &dyn Design, setup: &Setup) -> Exhaustive {
    let start = Instant::now();
    let program = host_program(design, setup.rounds);
    let mut memo: HashMap<u128, u128> = HashMap::new();
    let mut on_path: HashSet<u128> = HashSet::new();
    let mut bad = false;
    let schedules = count(
        design,
        setup,
        &program,
        World::new(setup),
        &mut memo,
        &mut on_path,
        &mut bad,
    );
    let counterexample = bad.then(|| shortest_bad(design, setup, &program));
    Exhaustive {
        bound: bound(setup, &program),
        states: memo.len() as u64,
        schedules,
        seconds: start.elapsed().as_secs_f64(),
        counterexample,
    }
}

fn count(
    design: &dyn Design,
    setup: &Setup,
    program: &[HostOp],
    w: World,
    memo: &mut HashMap<u128, u128>,
    on_path: &mut HashSet<u128>,
    bad: &mut bool,
) -> u128 {
    let key = w.fingerprint();
    if let Some(&n) = memo.get(&key) {
        return n;
    }
    if !on_path.insert(key) {
        // A cycle: some step undid itself (a livelock); the BFS names it as stuck.
        *bad = true;
        return 0;
    }
    let actors = w.enabled(setup, program);
    let n = if w.lost() || (actors.is_empty() && w.finished(setup, program).is_err()) {
        *bad = true;
        1
    } else if actors.is_empty() {
        1
    } else {
        let mut n: u128 = 0;
        for a in actors {
            let mut next = w.clone();
            next.step(design, setup, program, a);
            n = n.saturating_add(count(design, setup, program, next, memo, on_path, bad));
        }
        n
    };
    on_path.remove(&key);
    memo.insert(key, n);
    n
}

fn shortest_bad(design: &dyn Design, setup: &Setup, program: &[HostOp]) -> Counterexample {
    let root = World::new(setup);
    let mut seen: HashMap<u128, (usize, Actor)> = HashMap::new();
    let mut nodes: Vec<(u128, Option<(usize, Actor)>)> = vec![(root.fingerprint(), None)];
    seen.insert(root.fingerprint(), (0, Actor::Host));
    let mut queue = VecDeque::from([(0usize, root)]);
    while let Some((id, w)) = queue.pop_front() {
        let actors = w.enabled(setup, program);
        let stuck = actors.is_empty() && w.finished(setup, program).is_err();
        if w.lost() || stuck {
            let mut schedule = Vec::new();
            let mut at = id;
            while let Some((parent, a)) = nodes[at].1 {
                schedule.push(a);
                at = parent;
            }
            schedule.reverse();
            return replay(design, setup, &schedule);
        }
        for a in actors {
            let mut next = w.clone();
            next.step(design, setup, program, a);
            let key = next.fingerprint();
            if let Some(&(_, _)) = seen.get(&key) {
                continue;
            }
            nodes.push((key, Some((id, a))));
            seen.insert(key, (nodes.len() - 1, a));
            queue.push_back((nodes.len() - 1, next));
        }
    }
    // The DFS saw a cycle the BFS cannot name as a final state.
    Counterexample {
        schedule: Vec::new(),
        lines: Vec::new(),
        verdict: "a schedule repeats a state (livelock)".to_string(),
    }
}

/// Run one schedule chosen by `choices` (each picks among the actors enabled then, modulo
/// their number; past its end the first enabled actor moves). `Err` is the counterexample.
pub fn run_choices(
    design: &dyn Design,
    setup: &Setup,
    choices: &[u8],
) -> Result<World, Counterexample> {
    let program = host_program(design, setup.rounds);
    let mut w = World::new(setup);
    let mut schedule = Vec::new();
    for i in 0.. {
        if w.lost() {
            return Err(replay(design, setup, &schedule));
        }
        let actors = w.enabled(setup, &program);
        if actors.is_empty() {
            return match w.finished(setup, &program) {
                Ok(_) => Ok(w),
                Err(_) => Err(replay(design, setup, &schedule)),
            };
        }
        if i > 100_000 {
            return Err(replay(design, setup, &schedule));
        }
        let pick = choices.get(i).map_or(0, |&c| usize::from(c) % actors.len());
        schedule.push(actors[pick]);
        w.step(design, setup, &program, actors[pick]);
    }
    unreachable!("the loop returns")
}

/// Schedules as choice lists of up to `len` entries; proptest shrinks them toward shorter
/// lists of smaller choices (so toward "run the first enabled actor").
pub fn schedules(len: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..len)
}

/// Random schedules by proptest; the minimal (shrunk) losing one if any is found.
#[must_use]
pub fn sample(design: &dyn Design, setup: &Setup, cases: u32) -> Option<Counterexample> {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let result = runner.run(&schedules(200), |choices| {
        run_choices(design, setup, &choices)
            .map(|_| ())
            .map_err(|c| TestCaseError::fail(c.verdict))
    });
    match result {
        Ok(()) => None,
        Err(TestError::Fail(_, choices)) => run_choices(design, setup, &choices).err(),
        Err(TestError::Abort(why)) => Some(Counterexample {
            schedule: Vec::new(),
            lines: Vec::new(),
            verdict: format!("proptest aborted: {why}"),
        }),
    }
}
