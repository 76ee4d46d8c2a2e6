//! `trackcheck vm`'s bad-input errors, through the real binary. These fail before or at the
//! first instant of a boot, so they need no download; the one that starts QEMU skips where
//! QEMU is not installed.
#![forbid(unsafe_code)]

use std::process::Command;

fn vm(args: &[&str], path: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trackcheck"));
    // Default reports (trackcheck-out/vm-...) land in the temp dir, never in the checkout.
    cmd.arg("vm").args(args).current_dir(std::env::temp_dir());
    cmd.env(
        "TRACKCHECK_CACHE",
        std::env::temp_dir().join("trackcheck-vm-cli-cache"),
    );
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().expect("runs trackcheck");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trackcheck-vm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write");
    p
}

#[test]
fn no_qemu_names_the_package() {
    let img = scratch("img-noqemu", b"not a kernel");
    let (code, err) = vm(
        &["--arch", "x86_64", "--kernel", img.to_str().expect("utf-8")],
        Some("/nonexistent"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("qemu-system-x86_64 not found") && err.contains("qemu-system-x86"),
        "{err}"
    );
    let (_, err) = vm(
        &[
            "--arch",
            "aarch64",
            "--kernel",
            img.to_str().expect("utf-8"),
        ],
        Some("/nonexistent"),
    );
    assert!(err.contains("qemu-system-arm"), "{err}");
}

#[test]
fn bad_kernel_specs_and_paths_say_what_is_wrong() {
    let (code, err) = vm(&["--kernel", "debian:bookworm"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("debian:MAJOR.MINOR"), "{err}");
    let img = scratch("img-mods", b"x");
    let (code, err) = vm(
        &[
            "--kernel",
            img.to_str().expect("utf-8"),
            "--modules",
            "/nonexistent/mods",
        ],
        None,
    );
    if err.contains("not found: install") {
        return; // no QEMU here: checked first, see no_qemu_names_the_package
    }
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--modules /nonexistent/mods: not a directory"),
        "{err}"
    );
}

#[test]
fn a_binary_of_another_architecture_is_refused_before_any_download() {
    let me = std::env::current_exe().expect("this test binary");
    let other = if cfg!(target_arch = "x86_64") {
        "aarch64"
    } else {
        "x86_64"
    };
    let (code, err) = vm(
        &[
            "--arch",
            other,
            "--kernel",
            "debian:7.2",
            "--binary",
            me.to_str().expect("utf-8"),
        ],
        None,
    );
    if err.contains("not found: install") {
        return;
    }
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("executable, the lane is"), "{err}");
}

#[test]
fn an_image_that_does_not_boot_shows_why() {
    let img = scratch("img-garbage", &[0x55u8; 4096]);
    let (code, err) = vm(
        &[
            "--arch",
            "x86_64",
            "--kernel",
            img.to_str().expect("utf-8"),
            "--boot-timeout",
            "60",
            "--hugepages-1g",
            "0",
            "--mem",
            "512",
        ],
        None,
    );
    if err.contains("not found: install") {
        eprintln!("skipped: {err}");
        return;
    }
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the kernel did not boot"), "{err}");
    assert!(
        err.contains("qemu exited") || err.contains("no /init within"),
        "{err}"
    );
}

#[test]
fn more_memory_than_the_host_has_is_refused() {
    let img = scratch("img-mem", b"x");
    let (code, err) = vm(
        &[
            "--arch",
            "x86_64",
            "--kernel",
            img.to_str().expect("utf-8"),
            "--mem",
            "65536",
            "--hugepages-1g",
            "0",
        ],
        None,
    );
    if err.contains("not found: install") {
        return;
    }
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("more than this host has available"), "{err}");
}
