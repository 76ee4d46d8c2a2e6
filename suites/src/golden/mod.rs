//! The golden conformance matrix of a host profile: the expected verdict of every trial.
//!
//! Kept per host profile and kernel series, since a verdict belongs to both: an insta snapshot
//! `golden/matrix/<host-key>@<series>.snap` (`x86_64-pvm-shadow@6.18.snap`, the key is
//! `HostProfile::golden_key`), one trial per line:
//! `name  expected  evidence`, where expected is `pass`, `skip`, `not-exercised`, `error`,
//! `fail:<signature>` (fails every run, within the signature) or `intermittent:<signature>`
//! (fails some runs — a finding too, since trials are never retried). The signature
//! ([`signature`]) names the fail kinds and, per kind, a predicate a reviewer can read:
//! `fail:lost(block-reported+guest-write)`, `intermittent:lost(stuck-writer-tail:512)|hazard(ring-full-stuck)`.
//! Written by `trackcheck run --bless` (with `--repeat N` to tell steady failures from
//! intermittent ones), which derives the signature from the failures it saw, and reviewed like
//! any snapshot; `cargo insta review` shows the `.snap.new` that a mismatching run leaves.
//!
//! Applying it: a trial that fails within its entry's signature is a *known failure* (the run
//! still succeeds, the failure stays in every report); one that fails outside it is a new
//! failure (the reason says which finding the signature does not explain); an entry that says
//! `fail` but passed is an *unexpected pass* (the run fails until the file is reviewed); a
//! trial recorded as passing that now skips or does not exercise its path fails; everything
//! else keeps its raw verdict. A self-test (an injected loss) on a trial with a recorded loss
//! is judged on the lost pages the signature does not explain ([`Golden::unexplained_losses`]).
//! Kernel-wide entries ([`kernel_rule`]: pages reported one harvest late) are applied first.

mod bless;
pub mod kernel_rule;
pub mod signature;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use trackcheck_harness::oracle::LostPage;
use trackcheck_harness::track::inject::Fault;

pub use bless::bless;
pub use signature::Signature;

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
    /// Fails every run, within this signature.
    Fail(Signature),
    /// Fails some runs, within this signature.
    Intermittent(Signature),
}

impl Expected {
    /// The token in the golden file.
    #[must_use]
    pub fn token(&self) -> String {
        match self {
            Self::Pass => "pass".into(),
            Self::Skip => "skip".into(),
            Self::NotExercised => "not-exercised".into(),
            Self::Error => "error".into(),
            Self::Fail(s) => format!("fail:{s}"),
            Self::Intermittent(s) => format!("intermittent:{s}"),
        }
    }

    /// Parse a token; the error says what is wrong with it.
    pub fn parse(token: &str) -> Result<Self, String> {
        match token.split_once(':') {
            None => match token {
                "pass" => Ok(Self::Pass),
                "skip" => Ok(Self::Skip),
                "not-exercised" => Ok(Self::NotExercised),
                "error" => Ok(Self::Error),
                _ => Err(format!("unknown verdict {token:?}")),
            },
            Some(("fail", s)) => Signature::parse(s).map(Self::Fail),
            Some(("intermittent", s)) => Signature::parse(s).map(Self::Intermittent),
            Some(_) => Err(format!("unknown verdict {token:?}")),
        }
    }

    /// The signature of a recorded failure.
    #[must_use]
    pub const fn signature(&self) -> Option<&Signature> {
        match self {
            Self::Fail(s) | Self::Intermittent(s) => Some(s),
            _ => None,
        }
    }
}

/// A golden matrix.
#[derive(Clone, Debug, Default)]
pub struct Golden {
    /// Golden key: host profile `@` kernel series (`x86_64-pvm-shadow@6.18`).
    pub host_key: String,
    /// Where it was read from (or will be written to).
    pub path: PathBuf,
    /// Expected verdict and evidence per trial name.
    pub entries: BTreeMap<String, (Expected, String)>,
    /// Whether a file existed.
    pub found: bool,
    /// The other golden files of the same host profile in the directory, by key
    /// (`x86_64-pvm-shadow@6.12`; a file named after the profile alone, from before golden
    /// files were kept per kernel series, is listed as the bare profile key), sorted.
    pub others: Vec<String>,
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

/// How [`Golden::apply`] starts the reason of a trial the golden file says passed here but
/// that did not exercise its path this time (blessing counts it as not exercised).
const NO_LONGER_EXERCISED: &str = "path no longer exercised: ";

/// How [`Golden::apply`] starts the reason of a trial the golden file says passed here but
/// that skipped this time (blessing counts it as a skip).
const NO_LONGER_RUNS: &str = "no longer runs: ";

/// How [`Golden::apply`] starts the evidence line of a known failure, before the golden token
/// (`fail:<signature>`) it was judged within.
const WITHIN_SIGNATURE: &str = "within the golden signature ";

/// The golden token (`fail:<signature>` or `intermittent:<signature>`) a known failure was
/// judged within, read back from its evidence (as a report's JSON keeps it).
#[must_use]
pub fn recorded_token(evidence: &[String]) -> Option<&str> {
    evidence.iter().find_map(|e| {
        let rest = e.strip_prefix(WITHIN_SIGNATURE)?;
        Some(rest.rsplit_once(" of ").map_or(rest, |(token, _)| token))
    })
}

/// The verdict a result had before [`Golden::apply`] turned a lost path into a failure.
fn raw_verdict(r: &TrialResult) -> Verdict {
    let why = r.reason.as_deref().unwrap_or("");
    match r.verdict {
        Verdict::Fail if why.starts_with(NO_LONGER_EXERCISED) => Verdict::NotExercised,
        Verdict::Fail if why.starts_with(NO_LONGER_RUNS) => Verdict::Skip,
        v => v,
    }
}

impl Golden {
    /// Read the golden file of `key` (`HostProfile::golden_key`: profile `@` kernel series)
    /// from `dir` (empty if there is none), and note which other series of the same profile
    /// the directory holds ([`Golden::others`]).
    pub fn load(dir: &Path, key: &str) -> Result<Self, String> {
        let path = dir.join(format!("{key}.snap"));
        let mut golden = Self {
            host_key: key.into(),
            path: path.clone(),
            others: other_series(dir, key),
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
            let expected = Expected::parse(token)
                .map_err(|e| format!("{}: line {}: {e}", path.display(), i + 1))?;
            golden.entries.insert(name.to_string(), (expected, rest));
        }
        Ok(golden)
    }

    /// For a host with no golden file: which file was looked for, which other kernel series of
    /// this host profile have one, and what that means. `None` when the file was found.
    #[must_use]
    pub fn missing_note(&self) -> Option<String> {
        if self.found {
            return None;
        }
        let profile = profile_of(&self.host_key);
        let have: Vec<String> = self
            .others
            .iter()
            .map(|k| match k.strip_prefix(profile) {
                Some(series) if series.starts_with('@') => series.to_string(),
                _ => format!(
                    "{k}.snap, named without a kernel series: rename it to {k}@<series>.snap"
                ),
            })
            .collect();
        let have = if have.is_empty() {
            "none for this host profile".to_string()
        } else {
            have.join(", ")
        };
        Some(format!(
            "no golden file for {} (have: {have}); every trial is judged on its own; trackcheck run --bless writes one ({})",
            self.host_key,
            self.path.display()
        ))
    }

    /// What a report says about this file; `unmatched` entries had no trial in the run.
    #[must_use]
    pub fn info(&self, unmatched: usize) -> crate::report::GoldenInfo {
        crate::report::GoldenInfo {
            key: self.host_key.clone(),
            path: self.path.display().to_string(),
            found: self.found,
            unmatched,
            missing: self.missing_note(),
        }
    }

    /// What the file expects of `name`.
    #[must_use]
    pub fn expected(&self, name: &str) -> Option<&Expected> {
        self.entries.get(name).map(|(e, _)| e)
    }

    /// The lost pages of `result` that the golden file does not explain: for a trial whose
    /// entry (for a self-test: the entry of the same trial without the fault) records a
    /// failure with a `lost` clause, the pages outside that clause; otherwise all of them.
    /// A self-test is judged on these: they must be exactly the injected losses.
    #[must_use]
    pub fn unexplained_losses(&self, result: &TrialResult) -> Vec<LostPage> {
        match self
            .expected(&base_name(result))
            .and_then(Expected::signature)
        {
            Some(sig) => sig.split_losses(result).1,
            None => result.lost.clone(),
        }
    }

    /// Apply the expectations to a raw result: known failures, unexpected passes.
    pub fn apply(&self, result: &mut TrialResult) {
        if kernel_rule::apply_late_rule(self, result) {
            return;
        }
        if result.inject().is_some() {
            self.judge_selftest_on_a_losing_kernel(result);
            return;
        }
        let Some(expected) = self.expected(&result.name) else {
            return;
        };
        match (expected, result.verdict) {
            (Expected::Fail(sig) | Expected::Intermittent(sig), Verdict::Fail) => {
                let outside = sig.outside(result);
                if outside.is_empty() {
                    result.verdict = Verdict::KnownFailure;
                    result.evidence.push(format!(
                        "{WITHIN_SIGNATURE}{} of {}",
                        expected.token(),
                        self.path.display()
                    ));
                } else {
                    let note = format!(
                        " (a NEW failure: the golden file expects {}, but {})",
                        expected.token(),
                        outside.join("; ")
                    );
                    result
                        .reason
                        .get_or_insert_with(String::new)
                        .push_str(&note);
                }
            }
            (Expected::Fail(_), Verdict::Pass) => {
                result.verdict = Verdict::UnexpectedPass;
                result.reason = Some(format!(
                    "the golden file records a failure on this host ({}); it passed: review {} (trackcheck run --bless)",
                    self.entries
                        .get(&result.name)
                        .map_or("", |(_, ev)| ev.as_str()),
                    self.path.display()
                ));
            }
            (Expected::Intermittent(_), Verdict::Pass) => {
                result.evidence.push(
                    "known intermittent failure on this host; it did not occur this run".into(),
                );
            }
            // The host used to exercise this path: losing that is a regression of coverage,
            // never a quiet skip.
            (Expected::Pass, Verdict::NotExercised | Verdict::Skip) => {
                let (prefix, what) = if result.verdict == Verdict::Skip {
                    (NO_LONGER_RUNS, "ran")
                } else {
                    (NO_LONGER_EXERCISED, "exercised")
                };
                result.verdict = Verdict::Fail;
                result.fail_kind = Some(FailKind::Problem);
                result.reason = Some(format!(
                    "{prefix}{} (the golden file {} records that this host {what} it; review, and re-bless if the host changed)",
                    result.reason.as_deref().unwrap_or("no reason"),
                    self.path.display()
                ));
            }
            _ => {}
        }
    }

    /// A self-test (a trial with an injected loss) must name exactly the pages the fault lost.
    /// Where the golden file records that the same trial without the fault loses pages by
    /// itself on this host, the lost pages its signature explains are the kernel's: they move
    /// from `lost` to the evidence, and the self-test is judged on the rest. If the signature
    /// explains a page the fault touched, the kernel's loss and the injected one cannot be
    /// told apart there: those pages are not judged, and where that is every page the fault
    /// touched the self-test becomes a skip saying so (never a pass).
    ///
    /// The fault changes what a lost page's context says: a page the fault withheld (or left
    /// unprotected) was still reported by the kernel. So a lost page the fault did not touch,
    /// in a 2 MiB block (of its slot) holding a page the fault touched, counts as a neighbour of
    /// a reported page (`block_reported` at least 1) when the signature is applied.
    fn judge_selftest_on_a_losing_kernel(&self, result: &mut TrialResult) {
        let base = base_name(result);
        let Some(sig) = self.expected(&base).and_then(Expected::signature) else {
            return;
        };
        let (explained, unexplained) = sig.split_losses(&with_withheld_neighbours(result));
        if explained.is_empty() {
            return;
        }
        // Injected pages the signature explains cannot be told from the kernel's own loss:
        // they are not judged. The rest must be named as a new failure.
        let inside: std::collections::BTreeSet<(u32, u64)> =
            explained.iter().map(|l| (l.slot, l.page)).collect();
        let touched: Vec<(u32, u64)> = result.injected_pages.iter().flatten().copied().collect();
        let (blurred, outside): (Vec<_>, Vec<_>) =
            touched.into_iter().partition(|p| inside.contains(p));
        if outside.is_empty() {
            result.verdict = Verdict::Skip;
            result.fail_kind = None;
            result.reason = Some(format!(
                "self-test inapplicable: the golden signature of {base} ({sig}) explains every page the fault touched ({} page(s)), so the kernel's recorded loss and the injected one cannot be told apart",
                blurred.len()
            ));
            return;
        }
        if !blurred.is_empty() {
            result.evidence.push(format!(
                "{} page(s) the fault touched fall inside the recorded signature ({sig}) and are not judged: {:?}",
                blurred.len(),
                blurred.iter().take(4).collect::<Vec<_>>()
            ));
            result.injected_pages = Some(outside);
            if let Some(must) = result.injected_lost.as_mut() {
                must.retain(|p| !inside.contains(p));
            }
        }
        let first: Vec<String> = explained.iter().take(3).map(ToString::to_string).collect();
        result.evidence.push(format!(
            "{} lost page(s) are the kernel's recorded failure ({sig} of {base}), not judged: {}",
            explained.len(),
            first.join("; ")
        ));
        result.lost = unexplained;
        if result.lost.is_empty()
            && result.fail_kind == Some(FailKind::Lost)
            && result.injected_lost.is_none()
            && result.inject() != Some(Fault::DropPage)
        {
            // A fault that does not know which writes it lost (skip-rearm, copy-before-rearm
            // lose a write only where its page is written again): every loss the oracle found
            // is the kernel's, so this run could not show the fault's own.
            result.verdict = Verdict::NotExercised;
            result.fail_kind = None;
            result.reason = Some(format!(
                "self-test inconclusive: every lost page is the recorded failure of {base} ({sig}), and the {} page(s) the fault touched outside it lost no write this run (the fault loses one only where its page is written again)",
                result.injected_pages.iter().flatten().count()
            ));
        } else if result.lost.is_empty() && result.fail_kind == Some(FailKind::Lost) {
            result.reason = Some(format!(
                "every lost page is explained by the recorded failure of {base} ({sig}): the injected loss was not named"
            ));
        } else if !result.lost.is_empty() {
            let first = crate::trial::first_lost(&result.lost);
            result.reason = Some(format!(
                "a NEW failure outside the recorded signature of {base} ({sig}): lost {} page(s): {first}",
                result.lost.len()
            ));
        }
    }
}

/// The host profile part of a golden key (`x86_64-pvm-shadow@6.18` -> `x86_64-pvm-shadow`).
fn profile_of(key: &str) -> &str {
    key.split_once('@').map_or(key, |(profile, _)| profile)
}

/// The keys of the golden files in `dir` of the same host profile as `key`, other than `key`
/// itself: `<profile>@<series>.snap`, and `<profile>.snap` from before the series was part of
/// the key. An unreadable directory has none.
fn other_series(dir: &Path, key: &str) -> Vec<String> {
    let profile = profile_of(key);
    let Ok(files) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut keys: Vec<String> = files
        .filter_map(|f| {
            let name = f.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".snap")?.to_string();
            let same = stem == profile
                || stem
                    .strip_prefix(profile)
                    .is_some_and(|s| s.starts_with('@'));
            (same && stem != key).then_some(stem)
        })
        .collect();
    keys.sort();
    keys
}

/// `result` with the lost pages that share a 2 MiB block of their slot with a page the fault
/// touched (and are not such a page) marked as neighbours of a reported page.
fn with_withheld_neighbours(result: &TrialResult) -> TrialResult {
    const BLOCK_PAGES: u64 = 512;
    let touched: std::collections::BTreeSet<(u32, u64)> =
        result.injected_pages.iter().flatten().copied().collect();
    let blocks: std::collections::BTreeSet<(u32, u64)> = touched
        .iter()
        .map(|&(slot, page)| (slot, page / BLOCK_PAGES))
        .collect();
    let mut adjusted = result.clone();
    for l in &mut adjusted.lost {
        if !touched.contains(&(l.slot, l.page)) && blocks.contains(&(l.slot, l.page / BLOCK_PAGES))
        {
            l.block_reported = Some(l.block_reported.unwrap_or(0).max(1));
        }
    }
    adjusted
}

/// The name of `result`'s trial without an injected fault (a model trial's own name).
fn base_name(result: &TrialResult) -> String {
    result.spec.map_or_else(
        || result.name.clone(),
        |spec| {
            crate::spec::TrialSpec {
                inject: None,
                ..spec
            }
            .name()
        },
    )
}

#[cfg(test)]
mod tests;
