//! Process hygiene: a killed process returns its hugepages, no fd leaks.

use super::*;

fn read_pool(kib: u64) -> Result<u64, Failed> {
    let path = hugetlb_pool_file(kib, "nr_hugepages");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// A process killed while it holds hugepages leaks them until the next reservation, which
/// finds its ledger, sees the pid is gone and returns its pages.
pub(super) fn killed_process_returns_hugepages() -> Check {
    let _serial = HUGETLB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = read_pool(2048)?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD, "hold-hugepage")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no child stdout")?).read_line(&mut line)?;
    let pid = child.id();
    ensure(line.trim() == format!("held {pid}"), || {
        format!("child said {line:?}")
    })?;
    let held = read_pool(2048)?;
    child.kill()?;
    child.wait()?;
    let ledger = state_dir().join(format!("hugetlb-2048-{pid}-0.resv"));
    let after_kill = read_pool(2048)?;
    ensure(held == before + 1 && after_kill == held, || {
        format!("pool {before} -> {held} held -> {after_kill} after SIGKILL")
    })?;
    ensure(ledger.exists(), || {
        format!("no ledger {}", ledger.display())
    })?;
    drop(HugetlbReservation::acquire(2048, 1)?);
    let after = read_pool(2048)?;
    ensure(after == before, || {
        format!("pool is {after} after reclaim, was {before}: the dead process's page leaked")
    })?;
    ensure(!ledger.exists(), || {
        "ledger of the dead process left behind".into()
    })
}

/// Machines open and close fds (VM, vCPUs, stats, memfd); none may outlive them. Runs in a fresh
/// single-threaded child so no other trial opens fds meanwhile.
pub(super) fn no_fd_leak() -> Check {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD, "fd-leak")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure(out.status.success(), || {
        format!("fd leak check failed: {text}")
    })
}
