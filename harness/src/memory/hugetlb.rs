//! hugetlb pools: use the free pages first, grow `nr_hugepages` only by the shortfall, give
//! back exactly what was grown, never leak.
//!
//! A [`HugetlbReservation`] serves a mapping of `pages` hugepages. Under one lock shared by
//! every trackcheck process it reads what the pool really has free (`free_hugepages` minus
//! `resv_hugepages`: free pages that existing mappings have already reserved are not free), grows
//! `nr_hugepages` only by the shortfall, and then makes the mapping while still holding the lock.
//! The mapping is made without `MAP_NORESERVE`, so the kernel reserves its pages at mmap time
//! (`resv_hugepages` rises): the next process, even a non-trackcheck one, sees them taken. Pages
//! reserved at boot (`hugepagesz=1G hugepages=N`) or by the administrator are thus used as they
//! are, and the pool is grown only when they are not enough.
//!
//! When the memory is dropped the mapping goes first (its reservation with it), then the pool
//! shrinks by exactly what this reservation grew it: pages that were there before stay. Each
//! growth is written to a ledger file named after the process, so a process killed before it
//! could shrink the pool is found by the next one (its pid is gone) and its growth is undone
//! then. A reservation that grew nothing writes no ledger and changes no host setting.
//!
//! What this cannot see: a process outside trackcheck that allocates hugepages between our read
//! and our mmap (the mmap then fails with ENOMEM, reported as [`MemoryError::NoHugepages`]), and
//! a kernel that cannot shrink the pool because someone else holds the pages (they become
//! surplus pages and are freed when released: still no leak).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backing, HUGE_1G, KIB, MemoryError};

/// Hugepages a mapping was given: the pool's free pages first, then growth.
#[derive(Debug)]
pub struct HugetlbReservation {
    kib: u64,
    pages: u64,
    /// Pages this reservation added to `nr_hugepages` (and takes away when dropped).
    grown: u64,
    /// The ledger recording `grown`, when it is not zero.
    ledger: Option<PathBuf>,
}

/// The pool's figures as read under the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolFigures {
    /// `nr_hugepages`.
    pub nr: u64,
    /// `free_hugepages`.
    pub free: u64,
    /// `resv_hugepages`: free pages already promised to mappings.
    pub reserved: u64,
}

impl PoolFigures {
    /// Pages a new mapping can really have without growing the pool.
    #[must_use]
    pub fn available(self) -> u64 {
        self.free.saturating_sub(self.reserved)
    }

    /// How much the pool must grow for `pages` more pages: only the shortfall.
    #[must_use]
    pub fn growth_for(self, pages: u64) -> u64 {
        pages.saturating_sub(self.available())
    }

    /// Read the `kib` pool.
    pub fn read(kib: u64) -> Result<Self, MemoryError> {
        Ok(Self {
            nr: read_number(&hugetlb_pool_file(kib, "nr_hugepages"))?,
            free: read_number(&hugetlb_pool_file(kib, "free_hugepages"))?,
            reserved: read_number(&hugetlb_pool_file(kib, "resv_hugepages"))?,
        })
    }
}

/// Where reservation ledgers and their lock live: `/run/trackcheck`, or the temp dir when that
/// is not writable. One place for every process, so one lock serialises all pool changes.
#[must_use]
pub fn state_dir() -> PathBuf {
    let run = PathBuf::from("/run/trackcheck");
    if fs::create_dir_all(&run).is_ok() {
        return run;
    }
    std::env::temp_dir().join("trackcheck-state")
}

/// `/sys/kernel/mm/hugepages/hugepages-<kib>kB/<file>`.
#[must_use]
pub fn hugetlb_pool_file(kib: u64, file: &str) -> PathBuf {
    PathBuf::from(format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB/{file}"))
}

fn read_number(path: &Path) -> Result<u64, MemoryError> {
    let text = fs::read_to_string(path).map_err(|source| MemoryError::Pool {
        path: path.into(),
        source,
    })?;
    text.trim().parse().map_err(|e| MemoryError::Pool {
        path: path.into(),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("{text:?}: {e}")),
    })
}

fn write_number(path: &Path, value: u64) -> Result<(), MemoryError> {
    fs::write(path, format!("{value}\n")).map_err(|source| MemoryError::Pool {
        path: path.into(),
        source,
    })
}

/// Exclusive lock over every process's pool changes (flock on `hugetlb.lock` in the state
/// dir); tests that change a pool by hand take it too.
#[derive(Debug)]
pub struct PoolLock(File);

impl PoolLock {
    /// Take the lock in `dir` (created if missing), waiting for other holders.
    pub fn take(dir: &Path) -> Result<Self, MemoryError> {
        let pool_err = |source| MemoryError::Pool {
            path: dir.into(),
            source,
        };
        fs::create_dir_all(dir).map_err(pool_err)?;
        let path = dir.join("hugetlb.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| MemoryError::Pool {
                path: path.clone(),
                source,
            })?;
        file.lock()
            .map_err(|source| MemoryError::Pool { path, source })?;
        Ok(Self(file))
    }
}

impl Drop for PoolLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl HugetlbReservation {
    /// Make `pages` pages of the `kib` pool available without mapping them (the pages are not
    /// held: only a mapping made by [`HugetlbReservation::acquire_for`] holds them). Grows the
    /// pool only by the shortfall.
    pub fn acquire(kib: u64, pages: u64) -> Result<Self, MemoryError> {
        Self::acquire_for(kib, pages, || Ok(())).map(|(r, ())| r)
    }

    /// Make `pages` pages of the `kib` pool available (free pages first, growth for the rest)
    /// and call `map` while still holding the pool lock; `map` must reserve them (an mmap
    /// without `MAP_NORESERVE`). If `map` fails, the growth is undone.
    pub fn acquire_for<T>(
        kib: u64,
        pages: u64,
        map: impl FnOnce() -> Result<T, MemoryError>,
    ) -> Result<(Self, T), MemoryError> {
        let nr_path = hugetlb_pool_file(kib, "nr_hugepages");
        if !nr_path.exists() {
            let backing = if kib == HUGE_1G / KIB {
                Backing::Hugetlb1G
            } else {
                Backing::Hugetlb2M
            };
            return Err(MemoryError::Unsupported {
                backing,
                reason: format!("no {kib} KiB hugetlb pool ({} missing)", nr_path.display()),
            });
        }
        let dir = state_dir();
        let _lock = PoolLock::take(&dir)?;
        reclaim_dead(&dir)?;
        let figures = PoolFigures::read(kib)?;
        let grow = figures.growth_for(pages);
        let mut this = Self {
            kib,
            pages,
            grown: 0,
            ledger: None,
        };
        if grow > 0 {
            write_number(&nr_path, figures.nr + grow)?;
            let after = read_number(&nr_path)?;
            if after < figures.nr + grow {
                write_number(&nr_path, figures.nr)?;
                return Err(MemoryError::NoHugepages {
                    kib,
                    wanted: pages,
                    free: figures.available(),
                    got: after.saturating_sub(figures.nr),
                });
            }
            this.grown = grow;
            let ledger = dir.join(format!(
                "hugetlb-{kib}-{}-{}.resv",
                std::process::id(),
                next_ledger_id()
            ));
            if let Err(source) = fs::write(&ledger, format!("{kib} {grow}\n")) {
                write_number(&nr_path, figures.nr)?;
                return Err(MemoryError::Pool {
                    path: ledger,
                    source,
                });
            }
            this.ledger = Some(ledger);
        }
        // The mapping reserves the pages while the lock is held; on failure the growth is
        // undone under the same lock. ENOMEM means the pages went elsewhere meanwhile.
        let mapped = map().map_err(|e| match e {
            MemoryError::Sys { source, .. } if source.raw_os_error() == Some(libc::ENOMEM) => {
                MemoryError::NoHugepages {
                    kib,
                    wanted: pages,
                    free: figures.available(),
                    got: grow,
                }
            }
            other => other,
        });
        match mapped {
            Ok(value) => Ok((this, value)),
            Err(e) => {
                this.give_back_locked();
                Err(e)
            }
        }
    }

    /// Pages this reservation serves.
    #[must_use]
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages it added to the pool (0 when the free pages were enough).
    #[must_use]
    pub fn grown(&self) -> u64 {
        self.grown
    }

    /// Undo the growth (call with the pool lock held).
    fn give_back_locked(&mut self) {
        if self.grown > 0 {
            give_back(self.kib, self.grown);
            self.grown = 0;
        }
        if let Some(ledger) = self.ledger.take() {
            let _ = fs::remove_file(ledger);
        }
    }
}

impl Drop for HugetlbReservation {
    fn drop(&mut self) {
        let Some(ledger) = &self.ledger else {
            return; // grew nothing: nothing to give back
        };
        let dir = ledger
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(state_dir);
        let Ok(_lock) = PoolLock::take(&dir) else {
            return; // the ledger stays, so the next process gives the pages back
        };
        self.give_back_locked();
    }
}

fn give_back(kib: u64, pages: u64) {
    let nr_path = hugetlb_pool_file(kib, "nr_hugepages");
    if let Ok(now) = read_number(&nr_path) {
        let _ = write_number(&nr_path, now.saturating_sub(pages));
    }
}

fn next_ledger_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Undo the growth of reservations whose process no longer exists. Call with the lock held.
pub(super) fn reclaim_dead(dir: &Path) -> Result<(), MemoryError> {
    let entries = fs::read_dir(dir).map_err(|source| MemoryError::Pool {
        path: dir.into(),
        source,
    })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix("hugetlb-")
            .and_then(|r| r.strip_suffix(".resv"))
        else {
            continue;
        };
        let mut parts = rest.split('-');
        let (Some(kib), Some(pid)) = (parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(kib), Ok(pid)) = (kib.parse::<u64>(), pid.parse::<u32>()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let pages = fs::read_to_string(entry.path())
            .ok()
            .and_then(|t| {
                t.split_whitespace()
                    .nth(1)
                    .and_then(|p| p.parse::<u64>().ok())
            })
            .unwrap_or(0);
        give_back(kib, pages);
        let _ = fs::remove_file(entry.path());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_only_the_shortfall_of_really_free_pages() {
        let boot = PoolFigures {
            nr: 4,
            free: 4,
            reserved: 0,
        };
        assert_eq!(boot.growth_for(3), 0, "boot-reserved pages are used first");
        assert_eq!(boot.growth_for(6), 2);
        // Free pages that mappings have reserved are not free.
        let promised = PoolFigures {
            nr: 4,
            free: 4,
            reserved: 3,
        };
        assert_eq!(promised.available(), 1);
        assert_eq!(promised.growth_for(2), 1);
        let odd = PoolFigures {
            nr: 0,
            free: 0,
            reserved: 2,
        };
        assert_eq!(odd.growth_for(1), 1);
    }

    #[test]
    fn dead_reservations_are_reclaimed_and_garbage_is_ignored() {
        let dir = std::env::temp_dir().join(format!("trackcheck-ledger-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        // pid 0x7fffffff never exists; kib 3 has no pool, so give_back is a no-op read failure.
        let stale = dir.join("hugetlb-3-2147483647-0.resv");
        fs::write(&stale, "3 5\n").expect("write");
        let garbage = dir.join("hugetlb-x.resv");
        fs::write(&garbage, "?").expect("write");
        reclaim_dead(&dir).expect("reclaims");
        assert!(!stale.exists(), "a dead process's ledger is removed");
        assert!(garbage.exists(), "unparseable names are left alone");
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
