//! The `trackcheck` binary as a user meets it: output, exit codes and hints.
#![forbid(unsafe_code)]

use std::process::{Command, Output};

fn trackcheck(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trackcheck"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("trackcheck runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn env_json_is_a_complete_profile() {
    let out = trackcheck(&["env", "--json"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["host"]["kernel"]["arch"], std::env::consts::ARCH);
    for m in trackcheck_harness::Mechanism::ALL {
        let entry = &v["mechanisms"][m.name()];
        match entry["supported"].as_str() {
            Some("yes") => {}
            Some("no") => assert!(
                entry["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{m}: {entry}"
            ),
            other => panic!("{m}: supported = {other:?}"),
        }
    }
    for mode in ["native", "emulated"] {
        assert!(v["modes"][mode]["supported"].is_string(), "{mode}");
    }
    // KVM facts or the reason there are none: never both, never neither.
    assert_ne!(
        v["host"]["kvm"].is_null(),
        v["host"]["kvm_unavailable"].is_null()
    );
}

#[test]
fn env_text_lists_every_mechanism() {
    let out = trackcheck(&["env"], &[]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    for m in trackcheck_harness::Mechanism::ALL {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(m.name())),
            "{m} missing:\n{stdout}"
        );
    }
}

#[test]
fn unknown_flags_and_values_are_usage_errors() {
    let out = trackcheck(&["env", "--bogus"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unexpected argument '--bogus'"),
        "{}",
        text(&out.stderr)
    );
    let out = trackcheck(&["frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = trackcheck(&[], &[]);
    assert_eq!(out.status.code(), Some(2), "no subcommand is a usage error");
}

#[test]
fn missing_kvm_device_gives_a_hint() {
    let out = trackcheck(&["env"], &[("TRACKCHECK_KVM_DEVICE", "/nonexistent/kvm")]);
    assert!(out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("no such device") && stdout.contains("kvm module"),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("dirty-ring") && l.contains("KVM unavailable")),
        "{stdout}"
    );
    assert!(text(&out.stderr).contains("no trial can run here"));
}

/// As root, drop to `nobody` with setpriv: opening /dev/kvm then fails with EACCES.
#[test]
fn unreadable_kvm_device_gives_a_hint() {
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let dev = std::fs::metadata("/dev/kvm");
    if !is_root || !setpriv.exists() || dev.is_err() {
        eprintln!("skip: needs root, /usr/bin/setpriv and /dev/kvm to provoke EACCES");
        return;
    }
    let out = Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_trackcheck"),
            "env",
        ])
        .output()
        .expect("setpriv runs");
    let stdout = text(&out.stdout);
    if stdout.is_empty() {
        eprintln!(
            "skip: nobody cannot run the binary here: {}",
            text(&out.stderr)
        );
        return;
    }
    assert!(
        stdout.contains("permission denied") && stdout.contains("run as root"),
        "{stdout}"
    );
}

fn kvm_usable() -> bool {
    trackcheck_harness::sys::open_kvm().is_ok()
}

#[test]
fn list_names_trials_as_paths_and_rejects_unknown_filters() {
    let out = trackcheck(&["list", "dirty-log::stepped::anon"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with(&format!(
            "{}::dirty-log::stepped::anon::native",
            std::env::consts::ARCH
        ))),
        "{stdout}"
    );
    let out = trackcheck(&["list", "no-such-trial"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no trial matches"));
}

#[test]
fn bad_run_input_is_a_usage_error() {
    for args in [
        &["run", "no-such-trial"][..],
        &["run", "--format", "xml"],
        &["run", "--inject-loss", "melt"],
        &["run", "--cases", "0"],
        &["run", "--bless", "--selftest"],
        &["replay", "/nonexistent/replay.json"],
    ] {
        let out = trackcheck(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!text(&out.stderr).is_empty(), "{args:?} says nothing");
    }
    let dir = std::env::temp_dir().join(format!("trackcheck-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bogus = dir.join("bogus.json");
    std::fs::write(&bogus, "{\"not\": \"a replay\"}").expect("write");
    let out = trackcheck(&["replay", bogus.to_str().expect("utf-8")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not a trackcheck replay file"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A passing trial: exit 0, JSON with the documented fields.
#[test]
fn run_json_has_the_documented_fields() {
    if !kvm_usable() {
        eprintln!("skip: needs a usable /dev/kvm");
        return;
    }
    let dir = std::env::temp_dir().join(format!("trackcheck-json-{}", std::process::id()));
    let name = format!(
        "{}::dirty-log::stepped::anon::native",
        std::env::consts::ARCH
    );
    let out = trackcheck(
        &[
            "run",
            "--exact",
            &name,
            "--format",
            "json",
            "--out",
            dir.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["host"]["kernel"]["release"].is_string());
    let t = &v["trials"][0];
    for field in [
        "name",
        "mechanism",
        "scenario",
        "mode",
        "backing",
        "verdict",
        "reason",
        "seed",
        "replay",
        "written",
        "reported",
        "extra",
        "lost",
    ] {
        assert!(t.get(field).is_some(), "missing {field}: {t}");
    }
    assert_eq!(t["verdict"], "pass");
    assert!(
        t["written"].as_u64().is_some_and(|w| w > 0),
        "the trial wrote nothing: {t}"
    );
    for f in ["report.json", "report.txt", "report.ktap"] {
        assert!(dir.join(f).exists(), "{f} not written");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A model trial (no KVM needed) is a trial of the run: in KTAP, in report.json (no spec) and
/// with its evidence in model-report.txt.
#[test]
fn model_trials_are_in_the_run_reports() {
    let dir = std::env::temp_dir().join(format!("trackcheck-model-{}", std::process::id()));
    let name = "model::wp-manual::costs";
    let args = ["run", "--exact", name, "--format", "ktap", "--out"];
    let out = trackcheck(
        &[args.as_slice(), &[dir.to_str().expect("utf-8")]].concat(),
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let ktap = text(&out.stdout);
    assert!(ktap.contains(&format!("1..1\nok 1 {name}\n")), "{ktap}");
    let json = std::fs::read(dir.join("report.json")).expect("report.json");
    let v: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    let t = &v["trials"][0];
    assert_eq!((&t["name"], &t["verdict"]), (&name.into(), &"pass".into()));
    assert!(t["spec"].is_null() && t["evidence"][0].is_string(), "{t}");
    let models = std::fs::read_to_string(dir.join("model-report.txt")).expect("model report");
    assert!(models.contains("12 writes over 3 rounds"), "{models}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// An injected loss fails the trial naming the page and writes a replay file; the run exits 0
/// because the loss was caught (a missed one would exit 1); replaying reproduces the same page.
#[test]
fn a_failure_writes_a_replay_file_that_reproduces_it() {
    if !kvm_usable() {
        eprintln!("skip: needs a usable /dev/kvm");
        return;
    }
    let dir = std::env::temp_dir().join(format!("trackcheck-replay-{}", std::process::id()));
    let name = format!(
        "{}::dirty-log::stepped::anon::native",
        std::env::consts::ARCH
    );
    let out = trackcheck(
        &[
            "run",
            "--exact",
            &name,
            "--inject-loss",
            "drop-page",
            "--format",
            "json",
            "--out",
            dir.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let t = &v["trials"][0];
    assert_eq!(t["verdict"], "fail");
    let lost = t["lost"][0].clone();
    assert!(
        lost["gpa"].as_u64().is_some()
            && lost["vcpu"].as_u64().is_some()
            && lost["seq"].as_u64().is_some(),
        "{lost}"
    );
    let replay = t["replay"].as_str().expect("replay command").to_string();
    let file = replay
        .strip_prefix("trackcheck replay ")
        .expect("a replay file command");
    let again = trackcheck(&["replay", file, "--format", "json"], &[]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).expect("JSON");
    assert_eq!(
        w["trials"][0]["lost"][0], lost,
        "the replay lost a different page"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn bench_rejects_bad_input() {
    for args in [
        &["bench", "--mem", "1K"][..],
        &["bench", "--mem", "12Q"],
        &["bench", "--plot", "x.svg"],
        &["bench", "--mechanism", "no-such-mechanism"],
        &["bench", "--write-percent", "0"],
        &[
            "bench",
            "--compare",
            "/nonexistent/a.json",
            "/nonexistent/b.json",
        ],
    ] {
        let out = trackcheck(args, &[]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// A small bench: every phase reported, JSON readable by --compare, a sweep plotted.
#[test]
fn bench_reports_phases_compares_and_plots() {
    if !kvm_usable() {
        eprintln!("skip: needs a usable /dev/kvm");
        return;
    }
    let dir = std::env::temp_dir().join(format!("trackcheck-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("a.json");
    let svg = dir.join("sweep.svg");
    let out = trackcheck(
        &[
            "bench",
            "--mechanism",
            "dirty-log",
            "--mem",
            "8M",
            "--iterations",
            "2",
            "--sweep",
            "vcpus",
            "--json",
            json.to_str().expect("utf-8"),
            "--plot",
            svg.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for phase in ["populate", "enable", "dirty", "harvest", "rearm", "disable"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("dirty-log") && l.contains(&format!(" {phase} "))),
            "no {phase}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("host ") && stdout.contains("rev "),
        "host facts missing:\n{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("JSON");
    assert!(
        v["results"][0]["phases"]["dirty"]["median_ms"]
            .as_f64()
            .is_some_and(|ms| ms > 0.0),
        "{v}"
    );
    assert_eq!(
        v["sweep"]["points"].as_array().map(Vec::len),
        Some(3),
        "1, 2 and 4 vCPUs"
    );
    assert!(
        std::fs::read_to_string(&svg)
            .expect("plot written")
            .starts_with("<svg")
    );
    let cmp = trackcheck(
        &[
            "bench",
            "--compare",
            json.to_str().expect("utf-8"),
            json.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(cmp.status.success());
    assert!(
        text(&cmp.stdout).lines().any(|l| l.contains("dirty-log")
            && l.contains(" dirty ")
            && l.trim_end().ends_with("1.00")),
        "{}",
        text(&cmp.stdout)
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
