//! The golden conformance matrix of a host profile: the expected verdict of every trial.
//!
//! Stored as an insta snapshot (`golden/matrix/<host-key>.snap`), one trial per line:
//! `name  expected  evidence`, where expected is `pass`, `skip`, `error`, `fail:<kinds>` (fails
//! every run, the way named: `lost`, `hazard`, `problem`) or `intermittent:<kinds>` (fails some
//! runs — a finding too, since trials are never retried). Written by `trackcheck run --bless`
//! (with `--repeat N` to tell steady failures from intermittent ones) and reviewed like any
//! snapshot; `cargo insta review` shows the `.snap.new` that a mismatching run leaves.
//!
//! Applying it: a trial that fails the way its entry says is a *known failure* (the run still
//! succeeds, the failure stays in every report); an entry that says `fail` but passed is an
//! *unexpected pass* (the run fails until the file is reviewed); everything else keeps its raw
//! verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::trial::{FailKind, TrialResult, Verdict};

/// What the golden file expects of one trial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Passes.
    Pass,
    /// Skipped on this host.
    Skip,
    /// Runs, but this host cannot exercise its path.
    NotExercised,
    /// The harness cannot run it here.
    Error,
    /// Fails every run, one of these ways.
    Fail(Vec<FailKind>),
    /// Fails some runs, one of these ways.
    Intermittent(Vec<FailKind>),
}

impl Expected {
    fn token(&self) -> String {
        let kinds = |k: &[FailKind]| k.iter().map(|k| k.name()).collect::<Vec<_>>().join("|");
        match self {
            Self::Pass => "pass".into(),
            Self::Skip => "skip".into(),
            Self::NotExercised => "not-exercised".into(),
            Self::Error => "error".into(),
            Self::Fail(k) => format!("fail:{}", kinds(k)),
            Self::Intermittent(k) => format!("intermittent:{}", kinds(k)),
        }
    }

    fn parse(token: &str) -> Option<Self> {
        let kinds = |s: &str| -> Option<Vec<FailKind>> {
            s.split('|')
                .map(|k| match k {
                    "lost" => Some(FailKind::Lost),
                    "hazard" => Some(FailKind::Hazard),
                    "problem" => Some(FailKind::Problem),
                    "required" => Some(FailKind::Required),
                    _ => None,
                })
                .collect()
        };
        match token.split_once(':') {
            None => match token {
                "pass" => Some(Self::Pass),
                "skip" => Some(Self::Skip),
                "not-exercised" => Some(Self::NotExercised),
                "error" => Some(Self::Error),
                _ => None,
            },
            Some(("fail", k)) => kinds(k).map(Self::Fail),
            Some(("intermittent", k)) => kinds(k).map(Self::Intermittent),
            Some(_) => None,
        }
    }
}

/// A golden matrix.
#[derive(Clone, Debug, Default)]
pub struct Golden {
    /// Host profile key.
    pub host_key: String,
    /// Where it was read from (or will be written to).
    pub path: PathBuf,
    /// Expected verdict and evidence per trial name.
    pub entries: BTreeMap<String, (Expected, String)>,
    /// Whether a file existed.
    pub found: bool,
}

/// The golden directory: `$TRACKCHECK_GOLDEN`, else the checkout this binary was built from,
/// else `./golden/matrix`.
#[must_use]
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRACKCHECK_GOLDEN") {
        return PathBuf::from(dir);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../golden/matrix");
    if built.is_dir() {
        return built;
    }
    PathBuf::from("golden/matrix")
}

const HEADER_SOURCE: &str = "suites/src/golden.rs";

/// How [`Golden::apply`] starts the reason of a trial the golden file says passed here but
/// that did not exercise its path this time (blessing counts it as not exercised).
const NO_LONGER_EXERCISED: &str = "path no longer exercised: ";

/// The verdict a result had before [`Golden::apply`] turned a lost path into a failure.
fn raw_verdict(r: &TrialResult) -> Verdict {
    let lost_path = r.verdict == Verdict::Fail
        && r.reason
            .as_deref()
            .is_some_and(|why| why.starts_with(NO_LONGER_EXERCISED));
    if lost_path {
        Verdict::NotExercised
    } else {
        r.verdict
    }
}

impl Golden {
    /// Read the golden file of `host_key` from `dir` (empty if there is none).
    pub fn load(dir: &Path, host_key: &str) -> Result<Self, String> {
        let path = dir.join(format!("{host_key}.snap"));
        let mut golden = Self {
            host_key: host_key.into(),
            path: path.clone(),
            ..Self::default()
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(golden),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        golden.found = true;
        // insta layout: "---", header lines, "---", body.
        let body = text.splitn(3, "---\n").nth(2).unwrap_or(&text);
        for (i, line) in body.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.trim_start();
            let mut parts = line.split_whitespace();
            let (Some(name), Some(token)) = (parts.next(), parts.next()) else {
                return Err(format!(
                    "{}: line {}: expected `trial verdict [evidence]`",
                    path.display(),
                    i + 1
                ));
            };
            let after_name = line[name.len()..].trim_start();
            let rest = after_name[token.len()..].trim().to_string();
            let expected = Expected::parse(token).ok_or_else(|| {
                format!(
                    "{}: line {}: unknown verdict {token:?}",
                    path.display(),
                    i + 1
                )
            })?;
            golden.entries.insert(name.to_string(), (expected, rest));
        }
        Ok(golden)
    }

    /// What the file expects of `name`.
    #[must_use]
    pub fn expected(&self, name: &str) -> Option<&Expected> {
        self.entries.get(name).map(|(e, _)| e)
    }

    /// Apply the expectations to a raw result: known failures, unexpected passes.
    pub fn apply(&self, result: &mut TrialResult) {
        self.excuse_selftest_on_a_losing_kernel(result);
        let Some(expected) = self.expected(&result.name) else {
            return;
        };
        match (expected, result.verdict, result.fail_kind) {
            (Expected::Fail(kinds) | Expected::Intermittent(kinds), Verdict::Fail, Some(kind))
                if same_way(kinds, kind) =>
            {
                result.verdict = Verdict::KnownFailure;
            }
            (Expected::Fail(kinds) | Expected::Intermittent(kinds), Verdict::Fail, _) => {
                let note = format!(
                    " (the golden file expects it to fail as {})",
                    Expected::Fail(kinds.clone()).token()
                );
                if let Some(r) = result.reason.as_mut() {
                    r.push_str(&note);
                }
            }
            (Expected::Fail(_), Verdict::Pass, _) => {
                result.verdict = Verdict::UnexpectedPass;
                result.reason = Some(format!(
                    "the golden file records a failure on this host ({}); it passed: review {} (trackcheck run --bless)",
                    self.entries
                        .get(&result.name)
                        .map_or("", |(_, ev)| ev.as_str()),
                    self.path.display()
                ));
            }
            (Expected::Intermittent(_), Verdict::Pass, _) => {
                result.evidence.push(
                    "known intermittent failure on this host; it did not occur this run".into(),
                );
            }
            // The host used to exercise this path: losing that is a regression of coverage,
            // never a quiet skip.
            (Expected::Pass, Verdict::NotExercised, _) => {
                result.verdict = Verdict::Fail;
                result.fail_kind = Some(FailKind::Problem);
                result.reason = Some(format!(
                    "{NO_LONGER_EXERCISED}{} (the golden file {} records that this host exercised it; review, and re-bless if the host changed)",
                    result.reason.as_deref().unwrap_or("no reason"),
                    self.path.display()
                ));
            }
            _ => {}
        }
    }
}

impl Golden {
    /// A self-test (a trial with an injected loss) must fail naming only pages the fault
    /// touched. Where the golden file records that the same trial without the fault loses
    /// pages by itself on this host (a kernel failure), extra lost pages are the kernel's and
    /// cannot be told apart from a miss: such a self-test that was not cleanly caught becomes
    /// a skip naming the recorded failure (never a pass, never silently dropped).
    fn excuse_selftest_on_a_losing_kernel(&self, result: &mut TrialResult) {
        if result.spec.inject.is_none()
            || result.verdict != Verdict::Fail
            || crate::report::caught(result)
        {
            return;
        }
        let base = crate::spec::TrialSpec {
            inject: None,
            ..result.spec
        }
        .name();
        let kernel_loses = matches!(
            self.expected(&base),
            Some(Expected::Fail(kinds) | Expected::Intermittent(kinds))
                if kinds.iter().any(|k| matches!(k, FailKind::Lost | FailKind::Hazard))
        );
        if kernel_loses {
            let lost = result.lost.len();
            result.verdict = Verdict::Skip;
            result.fail_kind = None;
            result.reason = Some(format!(
                "self-test inapplicable: the golden file records {base} losing pages by itself on this host (a kernel failure), so the {lost} page(s) lost here cannot be told apart from the injected loss"
            ));
        }
    }
}

/// Whether failing as `kind` is failing the way `kinds` records. Lost writes and kernel
/// hazards are two faces of the kernel breaking the property (an overflowed dirty ring either
/// loses entries or never lets its vCPU run again, depending on timing), so they match each
/// other; interface problems and missing required mechanisms match only themselves.
fn same_way(kinds: &[FailKind], kind: FailKind) -> bool {
    let kernel = |k: &FailKind| matches!(k, FailKind::Lost | FailKind::Hazard);
    kinds.contains(&kind) || (kernel(&kind) && kinds.iter().any(kernel))
}

/// A new classification merged with the previous entry of the same trial.
fn merge(
    previous: Option<&(Expected, String)>,
    new: Expected,
    evidence: String,
) -> (Expected, String) {
    let Some((old, old_evidence)) = previous else {
        return (new, evidence);
    };
    let old_kinds = match old {
        Expected::Fail(k) | Expected::Intermittent(k) => k.clone(),
        _ => return (new, evidence),
    };
    let union = |mut k: Vec<FailKind>| {
        k.extend(old_kinds.iter().copied());
        k.sort_by_key(|k| k.name());
        k.dedup();
        k
    };
    match new {
        Expected::Fail(k) if matches!(old, Expected::Fail(_)) => {
            (Expected::Fail(union(k)), evidence)
        }
        Expected::Fail(k) | Expected::Intermittent(k) => {
            (Expected::Intermittent(union(k)), evidence)
        }
        Expected::Pass => {
            let earlier: String = old_evidence.chars().take(160).collect();
            (
                Expected::Intermittent(old_kinds),
                format!("did not fail in these runs; earlier: {earlier}"),
            )
        }
        other => (other, evidence),
    }
}

/// A lost write as (slot, page, vCPU, seq).
type LostKey = (u32, u64, usize, u64);

/// What identifies a failure: its kind, and the lost pages or the reason.
fn signature(r: &TrialResult) -> (Option<FailKind>, Vec<LostKey>, String) {
    let lost = r
        .lost
        .iter()
        .map(|l| (l.slot, l.page, l.vcpu, l.seq))
        .collect();
    let reason = if r.lost.is_empty() {
        r.reason.clone().unwrap_or_default()
    } else {
        String::new()
    };
    (r.fail_kind, lost, reason)
}

/// Build a golden matrix from `runs` (each a full set of results of the same trials), merged
/// with `previous`: a failure seen before is never forgotten by blessing (a trial that failed
/// earlier and passed in these runs stays intermittent, and failure kinds accumulate). To
/// drop a known failure after a kernel fix, delete its line and bless again.
#[must_use]
pub fn bless(host_key: &str, kernel: &str, runs: &[Vec<TrialResult>], previous: &Golden) -> String {
    let mut by_name: BTreeMap<&str, Vec<&TrialResult>> = BTreeMap::new();
    for run in runs {
        for r in run {
            by_name.entry(r.name.as_str()).or_default().push(r);
        }
    }
    // Entries of trials these runs did not cover are kept as they are.
    let kept: Vec<(&str, &(Expected, String))> = previous
        .entries
        .iter()
        .filter(|(name, _)| !by_name.contains_key(name.as_str()))
        .map(|(name, entry)| (name.as_str(), entry))
        .collect();
    let width = by_name
        .keys()
        .copied()
        .chain(kept.iter().map(|(n, _)| *n))
        .map(str::len)
        .max()
        .unwrap_or(40);
    let mut lines: BTreeMap<&str, String> = kept
        .into_iter()
        .map(|(name, (e, ev))| (name, format!("{name:<width$} {:<22} {ev}", e.token())))
        .collect();
    let mut body = String::new();
    let _ = writeln!(
        body,
        "# trackcheck conformance matrix, host profile {host_key}"
    );
    let _ = writeln!(
        body,
        "# kernel {kernel}; {} run(s) per trial; regenerate: trackcheck run --bless --repeat {}",
        runs.len(),
        runs.len()
    );
    let _ = writeln!(
        body,
        "# {:<w$} {:<22} evidence",
        "trial",
        "expected",
        w = width.saturating_sub(2)
    );
    for (name, results) in &by_name {
        let fails: Vec<&&TrialResult> = results
            .iter()
            .filter(|r| {
                r.fail_kind.is_some()
                    && matches!(raw_verdict(r), Verdict::Fail | Verdict::KnownFailure)
            })
            .collect();
        let mut kinds: Vec<FailKind> = fails.iter().filter_map(|r| r.fail_kind).collect();
        kinds.sort_by_key(|k| k.name());
        kinds.dedup();
        let passes = results
            .iter()
            .filter(|r| matches!(r.verdict, Verdict::Pass | Verdict::UnexpectedPass))
            .count();
        let (expected, evidence) = if !fails.is_empty() {
            let first = fails[0].reason.as_deref().unwrap_or("");
            let first: String = first.chars().take(160).collect();
            let ev = format!(
                "{}/{} runs failed; first: {first}",
                fails.len(),
                results.len()
            );
            // `fail` means fails every run the same way; a failure whose details (the lost
            // pages, the problem) change between runs depends on timing and may not show at
            // all next time: intermittent.
            let same = fails.iter().all(|r| signature(r) == signature(fails[0]));
            if passes == 0 && same {
                (Expected::Fail(kinds), ev)
            } else {
                (Expected::Intermittent(kinds), ev)
            }
        } else if results.iter().all(|r| r.verdict == Verdict::Skip) {
            (
                Expected::Skip,
                results[0].reason.clone().unwrap_or_default(),
            )
        } else if let Some(first) = results
            .iter()
            .find(|r| raw_verdict(r) == Verdict::NotExercised)
        {
            // Some runs (or all) could not exercise the path: the golden file accepts both.
            let n = results
                .iter()
                .filter(|r| raw_verdict(r) == Verdict::NotExercised)
                .count();
            (
                Expected::NotExercised,
                format!(
                    "{n}/{} runs not exercised: {}",
                    results.len(),
                    first.reason.as_deref().unwrap_or("")
                ),
            )
        } else if results.iter().any(|r| r.verdict == Verdict::Error) {
            (
                Expected::Error,
                results
                    .iter()
                    .find(|r| r.verdict == Verdict::Error)
                    .and_then(|r| r.reason.clone())
                    .unwrap_or_default(),
            )
        } else {
            (Expected::Pass, String::new())
        };
        let (expected, evidence) = merge(previous.entries.get(*name), expected, evidence);
        lines.insert(
            *name,
            format!("{name:<width$} {:<22} {evidence}", expected.token()),
        );
    }
    for line in lines.values() {
        let _ = writeln!(body, "{}", line.trim_end());
    }
    format!(
        "---\nsource: {HEADER_SOURCE}\nexpression: conformance matrix of {host_key}\n---\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for e in [
            Expected::Pass,
            Expected::Skip,
            Expected::NotExercised,
            Expected::Error,
            Expected::Fail(vec![FailKind::Hazard, FailKind::Lost]),
            Expected::Intermittent(vec![FailKind::Lost]),
        ] {
            assert_eq!(Expected::parse(&e.token()), Some(e));
        }
        assert_eq!(Expected::parse("fail:melted"), None);
    }

    #[test]
    fn blessing_never_forgets_a_failure() {
        let lost = || vec![FailKind::Lost];
        let (e, ev) = merge(
            Some(&(Expected::Intermittent(lost()), "3/20 runs failed".into())),
            Expected::Pass,
            String::new(),
        );
        assert_eq!(e, Expected::Intermittent(lost()));
        assert!(ev.contains("earlier: 3/20"));
        let (e, _) = merge(
            Some(&(Expected::Fail(lost()), String::new())),
            Expected::Intermittent(vec![FailKind::Hazard]),
            String::new(),
        );
        assert_eq!(
            e,
            Expected::Intermittent(vec![FailKind::Hazard, FailKind::Lost])
        );
        let (e, _) = merge(
            Some(&(Expected::Pass, String::new())),
            Expected::Fail(lost()),
            String::new(),
        );
        assert_eq!(e, Expected::Fail(lost()));
        let (e, _) = merge(None, Expected::Pass, String::new());
        assert_eq!(e, Expected::Pass);
    }

    #[test]
    fn a_selftest_is_excused_only_where_the_kernel_loses_by_itself() {
        use trackcheck_harness::oracle::LostPage;
        let base = crate::spec::TrialSpec {
            tracker: trackcheck_harness::track::TrackerSpec::DirtyLog,
            scenario: crate::spec::Scenario::Stepped,
            backing: trackcheck_harness::Backing::Thp,
            mode: trackcheck_harness::ExecutionMode::Native,
            inject: None,
        };
        let injected = crate::spec::TrialSpec {
            inject: Some(trackcheck_harness::track::inject::Fault::DropPage),
            ..base
        };
        let lost = |page| LostPage {
            slot: 2,
            page,
            gpa: 0,
            vcpu: 0,
            seq: 1,
            round: 2,
            block_reported: None,
            ring_full: None,
        };
        // Lost the injected page 0 and the kernel's page 7.
        let result = || {
            let mut r = TrialResult::new(&injected, 1);
            r.verdict = Verdict::Fail;
            r.fail_kind = Some(FailKind::Lost);
            r.injected_pages = Some(vec![(2, 0)]);
            r.lost = vec![lost(0), lost(7)];
            r
        };
        let mut golden = Golden::default();
        // No record of the base trial failing: a miss stays a miss.
        let mut r = result();
        golden.apply(&mut r);
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(!crate::report::caught(&r));
        // The base trial is a recorded kernel loss: skipped, naming it.
        golden.entries.insert(
            base.name(),
            (Expected::Intermittent(vec![FailKind::Lost]), String::new()),
        );
        let mut r = result();
        golden.apply(&mut r);
        assert_eq!(r.verdict, Verdict::Skip);
        assert!(
            r.reason
                .as_deref()
                .is_some_and(|w| w.contains(&base.name()))
        );
        // A cleanly caught self-test stays caught there too.
        let mut r = result();
        r.lost = vec![lost(0)];
        golden.apply(&mut r);
        assert!(crate::report::caught(&r));
        // A missed loss (the trial passed) is never excused.
        let mut r = result();
        r.verdict = Verdict::Pass;
        r.lost.clear();
        golden.apply(&mut r);
        assert_eq!(r.verdict, Verdict::Pass);
    }

    #[test]
    fn blessing_keeps_the_entries_of_trials_it_did_not_run() {
        let spec = crate::spec::TrialSpec {
            tracker: trackcheck_harness::track::TrackerSpec::DirtyLog,
            scenario: crate::spec::Scenario::Stepped,
            backing: trackcheck_harness::Backing::Anon,
            mode: trackcheck_harness::ExecutionMode::Native,
            inject: None,
        };
        let ran = TrialResult::new(&spec, 1);
        let mut previous = Golden::default();
        previous.entries.insert(
            "a::zz::old".into(),
            (
                Expected::Intermittent(vec![FailKind::Lost]),
                "1/20 runs failed".into(),
            ),
        );
        previous
            .entries
            .insert("zzz::kept".into(), (Expected::Skip, "no pool".into()));
        let text = bless("k", "6.x", &[vec![ran]], &previous);
        let body: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(['#', '-', 's', 'e']))
            .collect();
        assert_eq!(body.len(), 3, "{text}");
        assert!(body[0].starts_with("a::zz::old ") && body[0].ends_with("1/20 runs failed"));
        assert!(body[1].starts_with(&spec.name()) && body[1].contains(" pass"));
        assert!(body[2].starts_with("zzz::kept ") && body[2].contains(" skip "));
        let column = |l: &str| {
            l.find(|c: char| c.is_whitespace())
                .map(|i| i + l[i..].find(|c: char| !c.is_whitespace()).unwrap_or(0))
        };
        assert!(
            body.iter().all(|l| column(l) == column(body[0])),
            "aligned: {text}"
        );
    }

    #[test]
    fn a_path_no_longer_exercised_fails_and_mixed_runs_bless_as_not_exercised() {
        let spec = crate::spec::TrialSpec {
            tracker: trackcheck_harness::track::TrackerSpec::DirtyLog,
            scenario: crate::spec::Scenario::Stepped,
            backing: trackcheck_harness::Backing::Anon,
            mode: trackcheck_harness::ExecutionMode::Native,
            inject: None,
        };
        let mut golden = Golden::default();
        golden
            .entries
            .insert(spec.name(), (Expected::Pass, String::new()));
        let mut idle = TrialResult::new(&spec, 1);
        idle.verdict = Verdict::NotExercised;
        idle.reason = Some("no 2 MiB mapping".into());
        golden.apply(&mut idle);
        assert_eq!(idle.verdict, Verdict::Fail);
        assert!(idle.verdict.is_unexpected());
        assert!(
            idle.reason
                .as_deref()
                .is_some_and(|r| r.starts_with(NO_LONGER_EXERCISED) && r.contains("no 2 MiB"))
        );
        let pass = TrialResult::new(&spec, 1);
        let text = bless("k", "6.x", &[vec![pass], vec![idle]], &Golden::default());
        let line = text
            .lines()
            .find(|l| l.starts_with(&spec.name()))
            .expect("line");
        assert!(
            line.contains(" not-exercised ") && line.contains("1/2 runs not exercised"),
            "{line}"
        );
    }

    #[test]
    fn load_reads_what_bless_writes() {
        let dir = std::env::temp_dir().join(format!("trackcheck-golden-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let text = "---\nsource: x\nexpression: y\n---\n# comment\na::b      pass\nc::d   fail:lost|hazard   lost 3 pages\ne::f skip no pool\n";
        std::fs::write(dir.join("k.snap"), text).expect("write");
        let g = Golden::load(&dir, "k").expect("loads");
        assert!(g.found);
        assert_eq!(g.expected("a::b"), Some(&Expected::Pass));
        assert_eq!(
            g.entries.get("c::d").map(|e| e.1.as_str()),
            Some("lost 3 pages")
        );
        assert_eq!(g.expected("e::f"), Some(&Expected::Skip));
        assert!(Golden::load(&dir, "missing").is_ok_and(|g| !g.found));
        std::fs::write(dir.join("bad.snap"), "---\na\n---\nx::y maybe\n").expect("write");
        assert!(
            Golden::load(&dir, "bad")
                .unwrap_err()
                .contains("unknown verdict")
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
