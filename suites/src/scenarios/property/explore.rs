//! How property trials drive proptest: what it may shrink, what it may save, and what ends a
//! trial at once.
//!
//! - A case the kernel fails (lost pages, a hazard) is a proptest failure: proptest shrinks
//!   it, and its seed is saved where this run was asked to save regressions.
//! - A harness error or a skip says nothing about the case: it ends the trial at once with
//!   that error. proptest never sees it as a failure (so it neither shrinks nor saves it);
//!   every later case proptest asks for is passed over without touching the machine.
//! - A harness error while a finding is being shrunk stops the shrinking there: the trial
//!   fails with the smallest case that did fail (kept here, not taken from proptest, whose
//!   last value may be one that was passed over) and says why shrinking stopped.
//!
//! The cases come from an RNG seeded with the trial's seed (`--seed`, printed in the replay
//! command), so another seed explores other cases and the same seed the same ones.
//! Regression files: the project's committed ones (`golden/proptest-regressions/`) are always
//! replayed first; new failing seeds are written only to the directory a caller asked for
//! ([`save_regressions_in`]: `trackcheck run --out DIR`, the conformance tests), never as a
//! side effect of a run, and a seed already on file is not written again.

use std::any::Any;
use std::cell::RefCell;
use std::fmt::Debug;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config, FailurePersistence, PersistedSeed, RngAlgorithm, TestCaseError, TestError, TestRng,
    TestRunner,
};

use super::super::TrialError;

/// Where new failing seeds go (None: nowhere).
static SAVE_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Save new failing seeds of property trials in `dir` (one file per trial), or nowhere (None,
/// the default). `trackcheck run --out DIR` passes `DIR/proptest-regressions`; the
/// conformance tests pass [`committed_dir`].
pub fn save_regressions_in(dir: Option<PathBuf>) {
    *SAVE_DIR.lock().unwrap_or_else(PoisonError::into_inner) = dir;
}

fn save_dir() -> Option<PathBuf> {
    SAVE_DIR
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The project's committed regression files, replayed by every run: `golden/proptest-regressions`
/// beside the golden matrices.
#[must_use]
pub fn committed_dir() -> PathBuf {
    crate::golden::default_dir().join("../proptest-regressions")
}

/// The regression file name of a trial.
fn file_name(trial: &str) -> String {
    format!("{}.txt", trial.replace("::", "__"))
}

/// What one case did.
#[derive(Debug)]
pub(crate) enum Outcome<F> {
    /// The oracle found nothing.
    Pass,
    /// The kernel failed the case (`reason` is proptest's one-line failure message).
    Finding {
        /// What was found (lost pages, hazards).
        finding: F,
        /// One line for proptest.
        reason: String,
    },
    /// The harness could not run the case (or the host cannot: a skip).
    Harness(TrialError),
}

/// What a property run came to.
#[derive(Debug)]
pub(crate) struct Explored<F> {
    /// The smallest failing case's finding and the case itself (its `Debug` text).
    pub(crate) failure: Option<(F, String)>,
    /// proptest's reason for the failure.
    pub(crate) reason: String,
    /// The harness error that stopped shrinking early, if one did.
    pub(crate) shrinking_stopped: Option<TrialError>,
    /// The regression file the failing seed was written to (None: not asked to save, or the
    /// seed was on file already).
    pub(crate) saved: Option<PathBuf>,
    /// Where a save was asked for.
    pub(crate) save_dir: Option<PathBuf>,
    /// Whether the failing case is one replayed from a regression file (not a new one).
    pub(crate) replayed: bool,
}

/// Regression files of one trial: replayed from `replay`, new seeds appended to `save`.
#[derive(Clone, Debug)]
struct Store {
    replay: Vec<PathBuf>,
    save: Option<PathBuf>,
    saved: Arc<Mutex<Option<PathBuf>>>,
}

/// The seeds in a regression file (proptest's format: `cc <seed> # comment`).
fn read_seeds(path: &Path) -> Vec<PersistedSeed> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                return None;
            }
            let seed = line.parse::<PersistedSeed>().ok();
            if seed.is_none() {
                eprintln!(
                    "trackcheck: {}: unparsable regression line {line:?}, ignored",
                    path.display()
                );
            }
            seed
        })
        .collect()
}

const HEADER: &str = "\
# Seeds for failure cases proptest has generated in the past. It is
# automatically read and these particular cases re-run before any
# novel cases are generated.
#
# It is recommended to check this file in to source control so that
# everyone who runs the test benefits from these saved cases.
";

impl Store {
    fn files(&self) -> impl Iterator<Item = &PathBuf> {
        self.replay.iter().chain(self.save.iter())
    }

    fn append(path: &Path, seed: &PersistedSeed, value: &dyn Debug) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut text = String::new();
        if !path.is_file() {
            text.push_str(HEADER);
        }
        let shown = format!("{value:?}").replace(['\n', '\r'], " ");
        text.push_str(&format!("{seed} # shrinks to {shown}\n"));
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)?
            .write_all(text.as_bytes())
    }
}

impl FailurePersistence for Store {
    fn load_persisted_failures2(&self, _source: Option<&'static str>) -> Vec<PersistedSeed> {
        let mut seeds: Vec<PersistedSeed> = Vec::new();
        for path in self.files() {
            for seed in read_seeds(path) {
                if !seeds.contains(&seed) {
                    seeds.push(seed);
                }
            }
        }
        seeds
    }

    fn save_persisted_failure2(
        &mut self,
        _source: Option<&'static str>,
        seed: PersistedSeed,
        value: &dyn Debug,
    ) {
        let Some(path) = &self.save else { return };
        if self.files().any(|f| read_seeds(f).contains(&seed)) {
            return;
        }
        match Self::append(path, &seed, value) {
            Ok(()) => {
                *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(path.clone());
            }
            Err(e) => eprintln!(
                "trackcheck: cannot save the failing case to {}: {e}",
                path.display()
            ),
        }
    }

    fn box_clone(&self) -> Box<dyn FailurePersistence> {
        Box::new(self.clone())
    }

    fn eq(&self, other: &dyn FailurePersistence) -> bool {
        other
            .as_any()
            .downcast_ref::<Self>()
            .is_some_and(|o| o.replay == self.replay && o.save == self.save)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// How to run one property trial.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The trial's seed.
    pub(crate) seed: u64,
    /// New cases to try.
    pub(crate) cases: u32,
    /// Regression files to replay first.
    pub(crate) replay: Vec<PathBuf>,
    /// Where to save a new failing seed (None: nowhere).
    pub(crate) save: Option<PathBuf>,
}

impl Plan {
    /// The plan for trial `name` with `seed`: replays the committed file and the one in the
    /// directory [`save_regressions_in`] set, and saves there. (A self-test's trial name
    /// carries its fault, so its cases go to a file of their own.)
    pub(crate) fn for_trial(name: &str, seed: u64, cases: u32) -> Self {
        let file = file_name(name);
        let committed = committed_dir().join(&file);
        let save = save_dir().map(|d| d.join(&file));
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => a == b,
        };
        let mut replay = vec![committed];
        if let Some(s) = &save
            && !same(s, &replay[0])
        {
            replay.push(s.clone());
        }
        Self {
            seed,
            cases,
            replay,
            save,
        }
    }

    /// The proptest runner: its RNG seeded from the trial's seed.
    fn runner(&self, saved: &Arc<Mutex<Option<PathBuf>>>) -> TestRunner {
        let config = Config {
            cases: self.cases,
            max_shrink_iters: 256,
            max_shrink_time: 30_000,
            failure_persistence: Some(Box::new(Store {
                replay: self.replay.clone(),
                save: self.save.clone(),
                saved: Arc::clone(saved),
            })),
            ..Config::default()
        };
        TestRunner::new_with_rng(config, rng(self.seed))
    }
}

/// The proptest RNG for a trial seed (ChaCha keyed with the seed): each case's own seed,
/// the one a regression file keeps, is drawn from it.
fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Run `case` on the values of `strategy` under `plan`, following the rules of this module.
/// `Err` only for a harness error or skip with no finding, or proptest giving up.
pub(crate) fn explore<S, F>(
    plan: &Plan,
    strategy: &S,
    case: impl Fn(S::Value) -> Outcome<F>,
) -> Result<Explored<F>, TrialError>
where
    S: Strategy,
    S::Value: Debug,
{
    let saved = Arc::new(Mutex::new(None));
    let mut runner = plan.runner(&saved);
    // proptest replays the files' seeds before any new case, and shrinks only after a
    // failure: a first failure within that many calls is a replayed case.
    let on_file = runner
        .config()
        .failure_persistence
        .as_ref()
        .map_or(0, |p| p.load_persisted_failures2(None).len());
    let calls = std::cell::Cell::new(0usize);
    let first_failure_call = std::cell::Cell::new(None);
    let failure: RefCell<Option<(F, String)>> = RefCell::new(None);
    let harness: RefCell<Option<TrialError>> = RefCell::new(None);
    let result = runner.run(strategy, |value| {
        if harness.borrow().is_some() {
            // Passed over: the trial already ends on a harness error.
            return Ok(());
        }
        calls.set(calls.get() + 1);
        let shown = format!("{value:?}");
        match case(value) {
            Outcome::Pass => Ok(()),
            Outcome::Finding { finding, reason } => {
                if first_failure_call.get().is_none() {
                    first_failure_call.set(Some(calls.get()));
                }
                *failure.borrow_mut() = Some((finding, shown));
                Err(TestCaseError::fail(reason))
            }
            Outcome::Harness(e) => {
                *harness.borrow_mut() = Some(e);
                Ok(())
            }
        }
    });
    let failure = failure.into_inner();
    let harness = harness.into_inner();
    let saved = saved.lock().unwrap_or_else(PoisonError::into_inner).take();
    match (result, failure) {
        (Err(TestError::Fail(reason, _)), Some(failure)) => Ok(Explored {
            failure: Some(failure),
            reason: reason.to_string(),
            shrinking_stopped: harness,
            saved,
            save_dir: plan
                .save
                .as_ref()
                .and_then(|p| p.parent())
                .map(Path::to_path_buf),
            replayed: first_failure_call.get().is_some_and(|c| c <= on_file),
        }),
        (Err(TestError::Fail(reason, value)), None) => Err(TrialError::Error(format!(
            "proptest failed a case no finding was recorded for ({reason}): {value:?}"
        ))),
        (Err(TestError::Abort(reason)), _) => {
            Err(TrialError::Error(format!("proptest aborted: {reason}")))
        }
        (Ok(()), _) => match harness {
            Some(e) => Err(e),
            None => Ok(Explored {
                failure: None,
                reason: String::new(),
                shrinking_stopped: None,
                saved: None,
                save_dir: None,
                replayed: false,
            }),
        },
    }
}

/// A trial error as one line of evidence.
pub(crate) fn trial_error_text(e: &TrialError) -> String {
    match e {
        TrialError::Skip(s) => format!("skip: {s}"),
        TrialError::Error(s) => s.clone(),
        TrialError::Hazard(s) => format!("hazard: {s}"),
    }
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests;
