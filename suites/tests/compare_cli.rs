//! `trackcheck compare` as a user runs it: exit status 0 with a table, 2 with an error naming
//! the file for input that is missing or not a run report.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn trackcheck(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trackcheck"))
        .arg("compare")
        .args(args)
        .output()
        .expect("trackcheck runs")
}

/// A minimal report: the fields `compare` reads, as `trackcheck run` names them.
fn report(dir: &Path, name: &str, release: &str, verdict: &str) -> PathBuf {
    let path = dir.join(name);
    let json = format!(
        r#"{{"host_key": "x86_64-pvm-shadow", "host": {{"kernel": {{"release": "{release}", "arch": "x86_64"}}}},
            "trials": [{{"name": "x86_64::dirty-log::stepped::anon::native", "verdict": "pass"}},
                       {{"name": "x86_64::dirty-ring-4k::ring-full::anon::emulated", "verdict": "{verdict}", "fail_kind": "hazard"}}]}}"#
    );
    std::fs::write(&path, json).expect("write");
    path
}

#[test]
fn compare_prints_the_differing_trials_and_exits_2_on_bad_input() {
    let dir = std::env::temp_dir().join(format!("trackcheck-compare-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let a = report(&dir, "a.json", "6.18.44-fc-v1098", "pass");
    let b = report(&dir, "b.json", "6.19.2", "fail");
    let table = dir.join("table.json");
    let out = trackcheck(&[&a, &b, Path::new("--json"), &table]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("x86_64::dirty-ring-4k::ring-full::anon::emulated")
            && stdout.contains("fail:hazard")
            && !stdout.contains("x86_64::dirty-log::stepped")
            && stdout.contains("2 trial(s) compared, 1 differ"),
        "{stdout}"
    );
    assert!(table.is_file());

    let missing = dir.join("missing.json");
    let env = dir.join("env.json");
    std::fs::write(&env, r#"{"host_key": "x86_64-pvm-shadow"}"#).expect("write");
    for (bad, says) in [
        (&missing, "cannot read"),
        (&env, "is not a trackcheck run report"),
    ] {
        let out = trackcheck(&[&a, bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&bad.display().to_string()) && stderr.contains(says),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
