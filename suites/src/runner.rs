//! Selecting and running trials on worker threads, and replay files.

use std::collections::BTreeMap;
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
        // Filters match the names as listed, or as --inject-loss makes them (with its suffix).
        let matches = |s: &TrialSpec| {
            let listed = s.name();
            let injected = self.inject.map(|fault| {
                TrialSpec {
                    inject: Some(fault),
                    ..*s
                }
                .name()
            });
            let names = std::iter::once(listed).chain(injected);
            self.filters.is_empty()
                || names.into_iter().any(|name| {
                    self.filters.iter().any(|f| {
                        if self.exact {
                            name == *f
                        } else {
                            name.contains(f.as_str())
                        }
                    })
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
    let trace = Trace::from_env();
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(spec) = specs.get(i) else { return };
                    trace.line("start", &spec.name());
                    let mut result = run_trial(
                        spec,
                        seed.unwrap_or_else(|| spec.default_seed()),
                        host,
                        &required,
                    );
                    trace.line(result.verdict.name(), &spec.name());
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

/// `$TRACKCHECK_TRACE=FILE`: a line per trial start and end, written as it happens, so a run
/// that dies (a signal, the OOM killer, a kernel oops) leaves the trials it was running on
/// record: those started and not ended. Lanes set it (`trackcheck vm` reads it back).
#[derive(Debug)]
struct Trace(Option<Mutex<std::fs::File>>);

impl Trace {
    fn from_env() -> Self {
        let file = std::env::var_os("TRACKCHECK_TRACE").and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        Self(file.map(Mutex::new))
    }

    fn line(&self, what: &str, name: &str) {
        if let Some(f) = &self.0
            && let Ok(mut f) = f.lock()
        {
            let _ = std::io::Write::write_all(&mut *f, format!("{what} {name}\n").as_bytes());
        }
    }
}

/// Trials a trace file shows started and not ended.
#[must_use]
pub fn in_flight(trace: &str) -> Vec<String> {
    let mut open: Vec<String> = Vec::new();
    for line in trace.lines() {
        let Some((what, name)) = line.split_once(' ') else {
            continue;
        };
        if what == "start" {
            open.push(name.to_string());
        } else {
            open.retain(|n| n != name);
        }
    }
    open
}

/// How much a verdict matters when runs of one trial disagree (higher shows).
const fn severity(v: Verdict) -> u8 {
    match v {
        Verdict::Fail => 6,
        Verdict::Error => 5,
        Verdict::UnexpectedPass => 4,
        Verdict::KnownFailure => 3,
        Verdict::NotExercised => 2,
        Verdict::Skip => 1,
        Verdict::Pass => 0,
    }
}

/// One result per trial from `runs` (each a full `run_all` over the same specs): the first run
/// with the most severe verdict, so a failure in any run decides the report and the exit
/// status. With more than one run, its reason and evidence say how every run went.
#[must_use]
pub fn fold_runs(runs: Vec<Vec<TrialResult>>) -> Vec<TrialResult> {
    let total = runs.len();
    let mut folded: Vec<(TrialResult, BTreeMap<&'static str, usize>)> = Vec::new();
    for run in runs {
        for (i, r) in run.into_iter().enumerate() {
            if let Some((kept, counts)) = folded.get_mut(i) {
                *counts.entry(r.verdict.name()).or_default() += 1;
                if severity(r.verdict) > severity(kept.verdict) {
                    *kept = r;
                }
            } else {
                let counts = BTreeMap::from([(r.verdict.name(), 1)]);
                folded.push((r, counts));
            }
        }
    }
    folded
        .into_iter()
        .map(|(mut r, counts)| {
            if total > 1 {
                let summary = format!(
                    "{total} runs: {}",
                    counts
                        .iter()
                        .map(|(v, n)| format!("{n} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if r.verdict != Verdict::Pass {
                    r.reason = Some(match r.reason.take() {
                        Some(why) => format!("{why} [{summary}; shown: the first of these]"),
                        None => format!("[{summary}]"),
                    });
                }
                r.evidence.push(summary);
            }
            r
        })
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
        // A model trial has no spec: its `replay` (trackcheck run --exact NAME) stays.
        let Some(spec) = r.spec else { continue };
        std::fs::create_dir_all(&replay_dir)
            .map_err(|e| format!("{}: {e}", replay_dir.display()))?;
        let file = replay_dir.join(format!("{}.json", r.name.replace("::", "__")));
        let content = ReplayFile {
            trackcheck_replay: 1,
            spec,
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_trace_shows_the_trials_in_flight() {
        let t = "start a\nstart b\npass a\nstart c\nfail c\nstart d\n";
        assert_eq!(super::in_flight(t), ["b", "d"]);
    }

    use super::*;
    use crate::spec::TrialSpec;

    use trackcheck_harness::Backing;

    fn result(verdict: Verdict, seed: u64) -> TrialResult {
        let spec = TrialSpec::example(Backing::Anon);
        let mut r = TrialResult::new(&spec, seed);
        r.verdict = verdict;
        if verdict != Verdict::Pass {
            r.reason = Some(format!("run {seed}"));
        }
        r
    }

    /// The selection a replay command (`trackcheck run [--selftest] --exact NAME
    /// [--inject-loss F] --seed N`) makes.
    fn selection_of(command: &str) -> Selection {
        let words: Vec<&str> = command.split(' ').collect();
        let after = |flag: &str| {
            let i = words.iter().position(|w| *w == flag)?;
            Some(words[i + 1].trim_matches('\''))
        };
        Selection {
            filters: after("--exact").map(String::from).into_iter().collect(),
            exact: true,
            selftest: words.contains(&"--selftest"),
            inject: after("--inject-loss").map(|f| f.parse().expect("fault")),
        }
    }

    #[test]
    fn every_replay_command_selects_exactly_its_trial() {
        let selftest = crate::matrix::selftests()[0];
        let plain = crate::matrix::matrix()[0];
        let injected = TrialSpec {
            inject: Some(trackcheck_harness::track::inject::Fault::DropPage),
            ..plain
        };
        for spec in [selftest, plain, injected] {
            let command = crate::trial::replay_command(&spec, 42);
            assert!(command.ends_with("--seed 42"), "{command}");
            assert_eq!(selection_of(&command).specs(), vec![spec], "{command}");
        }
        // The suffixed name of a CLI-injected trial selects it too.
        let by_full_name = Selection {
            filters: vec![injected.name()],
            exact: true,
            selftest: false,
            inject: injected.inject,
        };
        assert_eq!(by_full_name.specs(), vec![injected]);
    }

    #[test]
    fn a_failure_in_any_run_is_what_the_report_shows() {
        let runs = vec![
            vec![result(Verdict::Pass, 1), result(Verdict::KnownFailure, 1)],
            vec![result(Verdict::Fail, 2), result(Verdict::Pass, 2)],
            vec![result(Verdict::Fail, 3), result(Verdict::KnownFailure, 3)],
        ];
        let folded = fold_runs(runs);
        assert_eq!(folded[0].verdict, Verdict::Fail);
        assert_eq!(folded[0].seed, 2, "the first failing run is shown");
        assert_eq!(
            folded[0].reason.as_deref(),
            Some("run 2 [3 runs: 2 fail, 1 pass; shown: the first of these]")
        );
        assert_eq!(folded[1].verdict, Verdict::KnownFailure);
        assert_eq!(folded[1].seed, 1);
        let single = fold_runs(vec![vec![result(Verdict::Pass, 1)]]);
        assert!(single[0].evidence.is_empty() && single[0].reason.is_none());
    }
}
