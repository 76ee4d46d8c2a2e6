//! Host operations and the cost counters of the modelled VM.

/// One step of the host thread. Ops ending in `Next` walk a page set one page per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostOp {
    /// Take `mmu_lock` (waits while a vCPU holds it).
    Lock,
    /// Release `mmu_lock`.
    Unlock,
    /// Enable logging on the next page (the design says how), one page per step.
    EnableNext,
    /// Flush every vCPU's TLB (waits for instructions in flight).
    FlushTlbs,
    /// The migration's first full copy: every page's content is synced.
    CopyAll,
    /// GET_DIRTY_LOG starts: the collect point.
    GetBegin,
    /// Kick every vCPU out of the guest; each flushes its PML buffer into the bitmap.
    KickPml,
    /// Sync hardware dirty state of the next page the design scans (DBM), one per step.
    SyncNext,
    /// Read the dirty bitmap; `clear`: and clear it (GET without manual protect or write
    /// protect: an atomic exchange).
    Get {
        /// Clear the bitmap while reading it.
        clear: bool,
    },
    /// GET_DIRTY_LOG returns: the oracle judges the report.
    GetEnd,
    /// CLEAR_DIRTY_LOG on the next reported page, one per step (under `mmu_lock`).
    ClearNext,
    /// Copy the reported pages' contents.
    Copy,
    /// Write-protect all memory at once (seed 004): bump the generation, kick every vCPU
    /// (waits for instructions in flight), flush TLBs, request root reloads.
    WpAll,
    /// As `WpAll` without the kick: no TLB flush, no wait (a mutant).
    WpAllNoKick,
    /// Wait until every vCPU finished (the final round runs with the guest paused).
    WaitDone,
    /// An idle-page scan starts (seed 001).
    ScanBegin,
    /// The scan reads (and clears) the accessed state of the next page, one per step.
    ScanNext,
    /// The scan ends (after its TLB flush, if the design flushes).
    ScanEnd,
}

/// Model step costs, counted over a run (not part of the explored state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Costs {
    /// Leaf or huge entries the host changed to write-protect or clear D (enable + rearm).
    pub protect_entries: u64,
    /// Host steps spent write-protecting (enable + rearm + write-protect-all).
    pub protect_steps: u64,
    /// Entries the host read while syncing hardware dirty state.
    pub sync_scanned: u64,
    /// Write faults the vCPUs took (each is a VM exit).
    pub faults: u64,
    /// PML-full exits.
    pub pml_full_exits: u64,
    /// Kicks the host sent to collect PML buffers (one exit per vCPU each).
    pub kick_exits: u64,
    /// Writes the hardware logged without an exit (PML appends, DBM hardware dirty).
    pub hw_logged: u64,
    /// Root entries made read-only at reload (seed 004).
    pub root_entries: u64,
    /// Leaf entries made read-only pushing a root's protection down (seed 004).
    pub pushed_down: u64,
    /// Stores the vCPUs made.
    pub writes: u64,
}
