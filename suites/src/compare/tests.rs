use std::path::{Path, PathBuf};

use trackcheck_harness::{Backing, HostProfile};

use super::*;
use crate::report::{GoldenInfo, RunReport};
use crate::spec::TrialSpec;
use crate::trial::TrialResult;

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("trackcheck-compare-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

/// A trial named `name` with `verdict` (a failure loses pages; a known failure carries the
/// golden evidence line `Golden::apply` writes).
fn trial(name: &str, verdict: Verdict, token: Option<&str>) -> TrialResult {
    let mut r = TrialResult::new(&TrialSpec::example(Backing::Anon), 1);
    r.name = name.into();
    r.verdict = verdict;
    if matches!(verdict, Verdict::Fail | Verdict::KnownFailure) {
        r.fail_kind = Some(FailKind::Lost);
        r.reason = Some("lost 1 page(s)".into());
    }
    if let Some(token) = token {
        // As `Golden::apply` writes it.
        r.evidence.push(format!(
            "within the golden signature {token} of golden/matrix/k@6.18.snap"
        ));
    }
    r
}

/// Write a real run report (as `trackcheck run` serialises it) for a host running `release`.
fn write_report(dir: &Path, arch: &str, release: &str, trials: Vec<TrialResult>) -> PathBuf {
    let mut host = HostProfile::probe();
    host.kernel.release = release.into();
    host.kernel.arch = arch.into();
    let info = GoldenInfo {
        key: String::new(),
        path: "g".into(),
        found: true,
        unmatched: 0,
        missing: None,
    };
    let mut report = RunReport::new(host, info, trials, 1.0);
    report.host_key = format!("{arch}-pvm-shadow");
    std::fs::create_dir_all(dir).expect("mkdir");
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    path
}

const SIG: &str = "fail:lost(block-reported)";

#[test]
fn a_trial_that_passes_on_one_kernel_and_fails_on_another_shows_up_and_identical_ones_do_not() {
    let dir = scratch("two");
    let old = write_report(
        &dir.join("old"),
        "x86_64",
        "6.18.44-fc-v1098",
        vec![
            trial("x86_64::a::same", Verdict::Pass, None),
            trial("x86_64::b::regressed", Verdict::Pass, None),
            trial("x86_64::c::known", Verdict::KnownFailure, Some(SIG)),
            trial("x86_64::d::resigned", Verdict::KnownFailure, Some(SIG)),
            trial("x86_64::e::skipped", Verdict::Skip, None),
            trial("x86_64::f::gone", Verdict::Pass, None),
        ],
    );
    write_report(
        &dir.join("new"),
        "x86_64",
        "6.19.0-rc3+",
        vec![
            trial("x86_64::a::same", Verdict::Pass, None),
            trial("x86_64::b::regressed", Verdict::Fail, None),
            trial("x86_64::c::known", Verdict::KnownFailure, Some(SIG)),
            trial(
                "x86_64::d::resigned",
                Verdict::KnownFailure,
                Some("intermittent:lost(any)"),
            ),
            trial("x86_64::e::skipped", Verdict::Skip, None),
        ],
    );
    // One argument is the file, the other the directory holding it.
    let c = load(&[old, dir.join("new")], false).expect("compares");
    assert_eq!(
        c.columns[0].label,
        "x86_64-pvm-shadow@6.18 (6.18.44-fc-v1098)"
    );
    assert_eq!(c.columns[1].label, "x86_64-pvm-shadow@6.19 (6.19.0-rc3+)");
    let differing: Vec<&str> = c
        .rows
        .iter()
        .filter(|r| r.differs)
        .map(|r| r.trial.as_str())
        .collect();
    assert_eq!(
        differing,
        [
            "x86_64::b::regressed",
            "x86_64::d::resigned",
            "x86_64::f::gone"
        ]
    );
    let row = |name: &str| c.rows.iter().find(|r| r.trial == name).expect("row");
    assert_eq!(
        row("x86_64::b::regressed").cells,
        [
            Cell::Verdict("pass".into()),
            Cell::Verdict("fail:lost".into())
        ]
    );
    assert_eq!(
        row("x86_64::c::known").cells[0],
        Cell::Verdict(format!("known-failure {SIG}"))
    );
    assert_eq!(row("x86_64::f::gone").cells[1], Cell::Absent);

    let text = c.text(false);
    assert!(
        text.contains("[1] x86_64-pvm-shadow@6.18 (6.18.44-fc-v1098)"),
        "{text}"
    );
    assert!(text.contains("6 trial(s) compared, 3 differ"), "{text}");
    assert!(
        text.contains("[2] 1 absent, 1 fail, 2 known-failure, 1 pass, 1 skip"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("x86_64::b::regressed"))
        .expect("the regressed row is shown");
    assert!(
        line.contains("pass") && line.ends_with("fail:lost"),
        "{line}"
    );
    for same in ["x86_64::a::same", "x86_64::c::known", "x86_64::e::skipped"] {
        assert!(!text.lines().any(|l| l.starts_with(same)), "{same}: {text}");
        assert!(
            c.text(true).lines().any(|l| l.starts_with(same)),
            "--all shows {same}"
        );
    }

    let json = dir.join("table.json");
    c.write_json(&json).expect("writes");
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read")).expect("json");
    assert_eq!(back["rows"].as_array().map(Vec::len), Some(6));
    assert_eq!(back["rows"][1]["cells"][1]["verdict"], "fail:lost");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn reports_of_two_architectures_share_no_rows_unless_compared_by_scenario() {
    let dir = scratch("arches");
    let x86 = write_report(
        &dir.join("x86"),
        "x86_64",
        "6.18.44-fc-v1098",
        vec![
            trial("x86_64::ring::s", Verdict::Pass, None),
            trial("x86_64::log::s", Verdict::Pass, None),
        ],
    );
    let arm = write_report(
        &dir.join("arm"),
        "aarch64",
        "6.12.118+deb12-arm64",
        vec![
            trial("aarch64::ring::s", Verdict::KnownFailure, Some(SIG)),
            trial("aarch64::log::s", Verdict::Pass, None),
        ],
    );
    let by_name = load(&[x86.clone(), arm.clone()], false).expect("compares");
    assert_eq!(by_name.rows.len(), 4);
    assert!(by_name.rows.iter().all(|r| !r.differs));
    assert!(by_name.rows[0].cells[1] == Cell::NotApplicable);
    assert!(by_name.text(false).contains("--by-scenario lines them up"));
    let by_scenario = load(&[x86, arm], true).expect("compares");
    let differing: Vec<&str> = by_scenario
        .rows
        .iter()
        .filter(|r| r.differs)
        .map(|r| r.trial.as_str())
        .collect();
    assert_eq!(by_scenario.rows.len(), 2);
    assert_eq!(differing, ["ring::s"]);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn bad_input_is_an_error_naming_the_file() {
    let dir = scratch("bad");
    let missing = dir.join("nothing.json");
    let e = load(std::slice::from_ref(&missing), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("cannot read {}", missing.display())),
        "{e}"
    );

    let env = dir.join("env.json");
    std::fs::write(&env, r#"{"host_key": "x86_64-pvm-shadow", "host": {}}"#).expect("write");
    let e = load(std::slice::from_ref(&env), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{} is not a trackcheck run report", env.display())),
        "{e}"
    );
    let text = dir.join("report.txt");
    std::fs::write(&text, "trial verdict\n").expect("write");
    assert!(matches!(
        load(&[text], false),
        Err(CompareError::NotAReport { .. })
    ));

    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("sub")).expect("mkdir");
    let e = load(std::slice::from_ref(&empty), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("no report.json in {}", empty.display())),
        "{e}"
    );
    // A directory of run directories says which ones hold a report.
    write_report(&empty.join("sub"), "x86_64", "6.18.1", vec![]);
    let e = load(std::slice::from_ref(&empty), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("these subdirectories hold one") && e.contains("sub"),
        "{e}"
    );
    // A lane's output directory is read from its matrix run.
    write_report(&empty.join("matrix"), "x86_64", "6.18.1", vec![]);
    assert!(load(&[empty], false).is_ok());
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
