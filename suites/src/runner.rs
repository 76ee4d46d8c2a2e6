//! Selecting and running trials on worker threads, and replay files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use trackcheck_harness::HostProfile;
use trackcheck_harness::track::inject::Fault;

use crate::golden::Golden;
use crate::matrix;
use crate::spec::TrialSpec;
use crate::trial::{TrialResult, Verdict, run_trial};

/// Which trials to run.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Substrings of trial names (any matches); empty selects all.
    pub filters: Vec<String>,
    /// Filters are whole names.
    pub exact: bool,
    /// The oracle self-tests instead of the conformance matrix.
    pub selftest: bool,
    /// Wrap every tracker with this fault.
    pub inject: Option<Fault>,
}

impl Selection {
    /// The trials selected, in matrix order.
    #[must_use]
    pub fn specs(&self) -> Vec<TrialSpec> {
        let base = if self.selftest {
            matrix::selftests()
        } else {
            matrix::matrix()
        };
        // Filters match the names as listed (before --inject-loss adds its suffix).
        let matches = |s: &TrialSpec| {
            let name = s.name();
            self.filters.is_empty()
                || self.filters.iter().any(|f| {
                    if self.exact {
                        name == *f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        };
        base.into_iter()
            .filter(matches)
            .map(|mut s| {
                if self.inject.is_some() {
                    s.inject = self.inject;
                }
                s
            })
            .collect()
    }
}

/// Run `specs` on `jobs` threads with `seed` (or each trial's default seed), applying `golden`.
/// `progress(done, total, result)` is called as each trial finishes.
pub fn run_all(
    specs: &[TrialSpec],
    seed: Option<u64>,
    host: &HostProfile,
    golden: &Golden,
    jobs: usize,
    progress: &(dyn Fn(usize, usize, &TrialResult) + Sync),
) -> Vec<TrialResult> {
    let required = crate::trial::required_mechanisms();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<TrialResult>>> = Mutex::new(vec![None; specs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(spec) = specs.get(i) else { return };
                    let mut result = run_trial(
                        spec,
                        seed.unwrap_or_else(|| spec.default_seed()),
                        host,
                        &required,
                    );
                    golden.apply(&mut result);
                    let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                    progress(finished, specs.len(), &result);
                    if let Ok(mut s) = slots.lock() {
                        s[i] = Some(result);
                    }
                }
            });
        }
    });
    slots
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// What a replay file holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplayFile {
    /// Format version.
    pub trackcheck_replay: u32,
    /// The trial.
    pub spec: TrialSpec,
    /// Its seed.
    pub seed: u64,
    /// Its name when written.
    pub name: String,
    /// Host profile key it failed on.
    pub host_key: String,
    /// What happened.
    pub verdict: Verdict,
    /// Why.
    pub reason: Option<String>,
}

/// Write a replay file for every failing result into `dir/replay/`, and point the results'
/// `replay` at it.
pub fn write_replays(
    dir: &Path,
    host_key: &str,
    results: &mut [TrialResult],
) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    let replay_dir = dir.join("replay");
    for r in results.iter_mut().filter(|r| {
        matches!(
            r.verdict,
            Verdict::Fail | Verdict::KnownFailure | Verdict::UnexpectedPass | Verdict::Error
        )
    }) {
        std::fs::create_dir_all(&replay_dir)
            .map_err(|e| format!("{}: {e}", replay_dir.display()))?;
        let file = replay_dir.join(format!("{}.json", r.name.replace("::", "__")));
        let content = ReplayFile {
            trackcheck_replay: 1,
            spec: r.spec,
            seed: r.seed,
            name: r.name.clone(),
            host_key: host_key.into(),
            verdict: r.verdict,
            reason: r.reason.clone(),
        };
        let json = serde_json::to_string_pretty(&content).map_err(|e| e.to_string())?;
        std::fs::write(&file, json).map_err(|e| format!("{}: {e}", file.display()))?;
        r.replay = format!("trackcheck replay {}", file.display());
        written.push(file);
    }
    Ok(written)
}

/// Read a replay file.
pub fn read_replay(path: &Path) -> Result<ReplayFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file: ReplayFile = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a trackcheck replay file: {e}", path.display()))?;
    if file.trackcheck_replay != 1 {
        return Err(format!(
            "{}: replay format {} is not supported (1 is)",
            path.display(),
            file.trackcheck_replay
        ));
    }
    Ok(file)
}
