//! Property trials and regression files, as a user of `trackcheck run` meets them: a plain run
//! writes nothing into the checkout (proptest's default would write into
//! golden/proptest-regressions/); `--out DIR` saves a failing case under DIR.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The checkout's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `git status --porcelain --untracked-files=all golden/`, or None without git.
fn golden_status() -> Option<String> {
    let out = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=all", "golden/"])
        .current_dir(root())
        .output()
        .ok()?;
    out.status.success().then(|| text(&out.stdout))
}

/// A fresh, empty temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trackcheck-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temporary directory");
    dir
}

/// Run trackcheck in `cwd` (so its default output directory lands there, not in the checkout).
fn trackcheck(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trackcheck"))
        .args(args)
        .current_dir(cwd)
        .env_remove("TRACKCHECK_GOLDEN")
        .output()
        .expect("trackcheck runs")
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// A property trial whose programs lose pages (an injected drop), run plainly and with
/// `--out`: the checkout's golden/ stays as it was; only the run given `--out` saves the
/// failing case, under that directory.
#[test]
fn property_failures_are_saved_only_under_out() {
    if trackcheck_harness::sys::open_kvm().is_err() {
        eprintln!("skip: needs a usable /dev/kvm");
        return;
    }
    let before = golden_status();
    let name = format!(
        "{}::dirty-log::proptest-programs::anon::native",
        std::env::consts::ARCH
    );
    let base = [
        "run",
        "--exact",
        name.as_str(),
        "--inject-loss",
        "drop-page",
        "--cases",
        "2",
        "--format",
        "json",
    ];
    // Plain: reports go to ./trackcheck-out of the working directory, regressions nowhere.
    let cwd = scratch("plain-run");
    let out = trackcheck(&cwd, &base);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let t = &v["trials"][0];
    assert_eq!(t["verdict"], "fail", "{t}");
    let evidence = t["evidence"].to_string();
    assert!(evidence.contains("not saved"), "{evidence}");
    assert!(evidence.contains("replay: trackcheck run"), "{evidence}");
    let regressions: Vec<PathBuf> = files_under(&cwd)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("proptest-regressions"))
        .collect();
    assert!(regressions.is_empty(), "a plain run saved {regressions:?}");
    assert_eq!(golden_status(), before, "a plain run changed golden/");

    // With --out: the failing case is saved there, once.
    let dir = scratch("out-run");
    let mut args = base.to_vec();
    let out_dir = dir.to_str().expect("utf-8").to_string();
    args.extend(["--out", out_dir.as_str()]);
    let out = trackcheck(&cwd, &args);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let file = dir.join("proptest-regressions").join(format!(
        "{}__inject-drop-page.txt",
        name.replace("::", "__")
    ));
    let saved = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}; wrote {:?}", file.display(), files_under(&dir)));
    assert_eq!(saved.lines().filter(|l| l.starts_with("cc ")).count(), 1);
    assert_eq!(golden_status(), before, "a run with --out changed golden/");
    let _ = std::fs::remove_dir_all(&cwd);
    let _ = std::fs::remove_dir_all(&dir);
}
