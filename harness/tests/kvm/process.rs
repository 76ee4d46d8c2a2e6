//! Process hygiene: hugetlb pools are used as found and left as found (a killed process's
//! growth is undone), no fd leaks.

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
    // One page more than is free, so the child must grow the pool by exactly one.
    let pages = PoolFigures::read(2048)?.available() + 1;
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD, "hold-hugepage")
        .env(HOLD_PAGES, pages.to_string())
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

/// Pages "reserved at boot" for a trial: added to the pool by hand (as `hugepages=` on the
/// kernel command line would), taken away again when dropped, under the pool lock both times.
struct BootPages {
    kib: u64,
    pages: u64,
}

impl BootPages {
    fn add(kib: u64, pages: u64) -> Result<Self, Failed> {
        let _lock = PoolLock::take(&state_dir())?;
        let nr = read_pool(kib)?;
        let path = hugetlb_pool_file(kib, "nr_hugepages");
        std::fs::write(&path, format!("{}\n", nr + pages))?;
        let now = read_pool(kib)?;
        if now != nr + pages {
            std::fs::write(&path, format!("{nr}\n"))?;
            return Err(format!("the {kib} KiB pool grew to {now}, not {}", nr + pages).into());
        }
        Ok(Self { kib, pages })
    }
}

impl Drop for BootPages {
    fn drop(&mut self) {
        if let Ok(_lock) = PoolLock::take(&state_dir())
            && let Ok(nr) = read_pool(self.kib)
        {
            let path = hugetlb_pool_file(self.kib, "nr_hugepages");
            let _ = std::fs::write(path, format!("{}\n", nr.saturating_sub(self.pages)));
        }
    }
}

/// Pages already in the pool (reserved at boot) are used before the pool grows; the pool grows
/// only by the shortfall and shrinks back by exactly that, so the boot pages stay and the host
/// is left as found. Mappings reserve their pages at mmap (`resv_hugepages`), so the next
/// reservation does not count them as free.
pub(super) fn free_pages_are_used_first() -> Check {
    const KIB: u64 = 2048;
    const HUGE: u64 = KIB * 1024;
    let _serial = HUGETLB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let base = read_pool(KIB)?;
    let boot = BootPages::add(KIB, 2)?;
    let start = PoolFigures::read(KIB)?;
    let free = start.available();
    ensure(free >= 2, || {
        format!("2 boot pages added, but only {free} free: {start:?}")
    })?;
    {
        let mem = GuestMemory::new(Backing::Hugetlb2M, free * HUGE)?;
        let now = PoolFigures::read(KIB)?;
        ensure(now.nr == start.nr && now.available() == 0, || {
            format!(
                "a mapping of the {free} free pages: pool {start:?} -> {now:?} (grown, or not reserved)"
            )
        })?;
        mem.populate()?;
        mem.write_u64(HUGE, 7);
        ensure(mem.read_u64(HUGE) == 7, || {
            "hugetlb memory reads back".into()
        })?;
    }
    let after_fit = PoolFigures::read(KIB)?;
    ensure(after_fit == start, || {
        format!("after the mapping within the free pages: {start:?} -> {after_fit:?}")
    })?;
    {
        let mem = GuestMemory::new(Backing::Hugetlb2M, (free + 1) * HUGE)?;
        let now = PoolFigures::read(KIB)?;
        ensure(now.nr == start.nr + 1, || {
            format!("one page more than is free must grow the pool by one: {start:?} -> {now:?}")
        })?;
        mem.populate()?;
    }
    let after_grow = PoolFigures::read(KIB)?;
    ensure(after_grow == start, || {
        format!("the growth was not given back exactly: {start:?} -> {after_grow:?}")
    })?;
    drop(boot);
    let end = read_pool(KIB)?;
    ensure(end == base, || {
        format!("nr_hugepages {base} before the test, {end} after: host setting changed")
    })
}

/// What a re-executed child process does, by role (the process trials spawn these).
pub(super) fn child_main(role: &str) -> Result<(), Box<dyn std::error::Error>> {
    match role {
        "hold-hugepage" => {
            let pages = std::env::var(HOLD_PAGES).map_or(Ok(1), |p| p.parse())?;
            let _held = HugetlbReservation::acquire(2048, pages)?;
            println!("held {}", std::process::id());
            std::thread::sleep(Duration::from_secs(120));
            Ok(())
        }
        "populate-2g" => {
            let mem = GuestMemory::new(Backing::Anon, 2 << 30)?;
            mem.populate()?;
            println!("populated 2 GiB");
            Ok(())
        }
        "fd-leak" => {
            let count = || {
                std::fs::read_dir("/proc/self/fd")
                    .map(Iterator::count)
                    .unwrap_or(0)
            };
            let program = Program::new(
                16,
                vec![Thread::new(vec![Op::Write { page: 3, offset: 0 }]); 2],
            );
            let cycle = |backing| -> Result<(), Box<dyn std::error::Error>> {
                let mut m = Machine::new(MachineConfig {
                    vcpus: 2,
                    data_pages: 16,
                    backing,
                    ..MachineConfig::default()
                })?;
                m.load(&program)?;
                m.run_to_completion()?;
                Ok(())
            };
            cycle(Backing::Memfd)?; // warm up once-per-process state (signal handler, ...)
            let before = count();
            for backing in [Backing::Anon, Backing::Memfd, Backing::Shmem] {
                cycle(backing)?;
            }
            let after = count();
            if before == after {
                println!("fds: {before} before, {after} after");
                Ok(())
            } else {
                Err(format!("fds: {before} before, {after} after three machines").into())
            }
        }
        "many-cases" => super::leak::child(),
        other => Err(format!("unknown child role {other}").into()),
    }
}
