//! A modelled VM: the MMU, vCPUs running guest programs, and a host thread running a design's
//! harvest protocol, advanced one atomic step at a time and judged by the stepped oracle
//! ([`Ledger`]) that judges real KVM.
//!
//! vCPUs execute the events of the reference interpreter (`trackcheck_guests::sim`), so a
//! model runs exactly the writes a compiled guest makes. `Sync` points are not barriers here:
//! every interleaving of host and vCPU steps is allowed, which includes the stepped one.
//!
//! The oracle's collect point is the *start* of GET_DIRTY_LOG: writes that land while the
//! ioctl runs are not required in its report (they are recorded right after it), exactly as
//! the running check on real KVM takes its progress snapshot before the ioctl. Copying the
//! reported pages is one atomic step: a copy does not change the MMU, so copying page by page
//! only moves a write to the other side of one page's copy, which the interleavings cover.

use std::hash::{Hash, Hasher};

use trackcheck_guests::Program;
use trackcheck_guests::sim::{Event, ThreadEvents};
use trackcheck_harness::oracle::{CollectContext, DataLayout, Ledger};
use trackcheck_harness::track::PageSet;

use super::access::AccessOracle;
use super::mmu::{Geometry, Holder, Mmu, Walk, WalkKind, bit, bits};
pub use super::ops::{Costs, HostOp};

/// A tracking design: what KVM does at each point the hardware or the host hands it.
pub trait Design: std::fmt::Debug + Send + Sync {
    /// `design` or `design/mutant`.
    fn name(&self) -> String;
    /// How the hardware walks.
    fn walk_kind(&self) -> WalkKind;
    /// Host ops that enable logging (before the first full copy).
    fn enable(&self) -> Vec<HostOp> {
        vec![
            HostOp::Lock,
            HostOp::EnableNext,
            HostOp::Unlock,
            HostOp::FlushTlbs,
        ]
    }
    /// Host ops of one harvest round, GET to copy.
    fn round(&self) -> Vec<HostOp>;
    /// Enable logging on `page` (host holds `mmu_lock`).
    fn enable_page(&self, m: &mut Mmu, page: usize, c: &mut Costs);
    /// Handle a write fault of `vcpu` on `page` (under `mmu_lock`).
    fn fault(&self, m: &mut Mmu, vcpu: usize, page: usize, c: &mut Costs);
    /// CLEAR_DIRTY_LOG for reported `page` (host holds `mmu_lock`).
    fn clear_page(&self, m: &mut Mmu, page: usize, c: &mut Costs);
    /// Pages the next `SyncNext` scans (DBM); none by default.
    fn sync_set(&self, _m: &Mmu) -> u64 {
        0
    }
    /// Sync hardware dirty state of `page` (host holds `mmu_lock`).
    fn sync_page(&self, _m: &mut Mmu, _page: usize, _c: &mut Costs) {}
    /// Root reload on `vcpu` after a write-protect-all request (under `mmu_lock`).
    fn reload(&self, _m: &mut Mmu, _vcpu: usize, _c: &mut Costs) {}
    /// An idle-page scan reads `page`: whether it was accessed (the design may clear A).
    fn scan_page(&self, _m: &mut Mmu, _page: usize) -> bool {
        false
    }
}

/// Where a vCPU stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VState {
    /// At an instruction boundary.
    Run,
    /// Walked for the current write; the store is next (no IPI can intervene).
    Mid,
    /// Took a write fault; KVM handles it next (needs `mmu_lock`).
    Fault,
    /// PML-full exit; KVM drains the buffer next.
    PmlFull,
}

/// Who moves next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    /// vCPU `i`.
    Vcpu(usize),
    /// The host thread.
    Host,
}

/// A scenario: guest program, geometry, rounds.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Sizes (`vcpus` must equal the program's thread count).
    pub geo: Geometry,
    /// Map blocks huge at the start.
    pub huge: bool,
    /// Concurrent harvest rounds before the final one.
    pub rounds: usize,
    /// Guest accesses per vCPU: (page, is write), from the reference interpreter.
    pub accesses: Vec<Vec<(usize, bool)>>,
}

impl Setup {
    /// A setup running `program` (finite threads only).
    ///
    /// # Panics
    /// If a thread never ends or touches a page outside `geo`.
    #[must_use]
    pub fn new(program: &Program, geo: Geometry, huge: bool, rounds: usize) -> Self {
        let accesses = program
            .vcpus
            .iter()
            .map(|t| {
                assert!(
                    trackcheck_guests::sim::segments(t).is_some(),
                    "a model runs finite threads only (no UntilStopped loop)"
                );
                ThreadEvents::with_seq_base(t, program.seq_base)
                    .filter_map(|e| match e {
                        Event::Write { page, .. } => Some((page, true)),
                        Event::Read { page, .. } => Some((page, false)),
                        _ => None,
                    })
                    .map(|(p, w)| (usize::try_from(p).unwrap_or(usize::MAX), w))
                    .inspect(|&(p, _)| assert!(p < geo.pages, "page {p} outside the model"))
                    .collect()
            })
            .collect();
        Self {
            geo,
            huge,
            rounds,
            accesses,
        }
    }
}

/// The explored state plus the oracle and counters.
#[derive(Clone, Debug)]
pub struct World {
    /// MMU.
    pub mmu: Mmu,
    /// Per vCPU: index of the next access, and state.
    pub vcpus: Vec<(usize, VState)>,
    /// Host: next op, page cursor of a `Next` op.
    pub host: (usize, usize),
    /// Pages the last GET reported.
    pub reported: u64,
    /// Inside GET_DIRTY_LOG: writes wait in `queued` to be recorded after the collect.
    pub in_get: bool,
    queued: Vec<(usize, usize, u64)>,
    seqs: Vec<u64>,
    /// Oracle mirror for state hashing: per page written since its last copy / collected and
    /// not yet copied (exactly the ledger's inputs to its containment rule).
    unsynced: u64,
    pending: u64,
    /// The stepped oracle.
    pub ledger: Ledger<'static>,
    /// The access lower bound (idle-page scans).
    pub access: AccessOracle,
    /// Counters.
    pub costs: Costs,
}

/// Host program of a design for `rounds` concurrent rounds and a final one.
#[must_use]
pub fn host_program(design: &dyn Design, rounds: usize) -> Vec<HostOp> {
    let mut ops = design.enable();
    ops.push(HostOp::CopyAll);
    for _ in 0..rounds {
        ops.extend(design.round());
    }
    ops.push(HostOp::WaitDone);
    ops.extend(design.round());
    ops
}

impl World {
    /// Start state of `setup`.
    #[must_use]
    pub fn new(setup: &Setup) -> Self {
        let geo = setup.geo;
        let pages = u64::try_from(geo.pages).unwrap_or(64);
        Self {
            mmu: Mmu::new(geo, setup.huge),
            vcpus: vec![(0, VState::Run); geo.vcpus],
            host: (0, 0),
            reported: 0,
            in_get: false,
            queued: Vec::new(),
            seqs: vec![0; geo.vcpus],
            unsynced: 0,
            pending: 0,
            ledger: Ledger::without_program(DataLayout::single(0, pages), &[]),
            access: AccessOracle::default(),
            costs: Costs::default(),
        }
    }

    /// A 128-bit fingerprint of everything that decides the future: MMU, threads, and the
    /// oracle's per-page state (the stamps' sequence numbers do not matter and are left out).
    #[must_use]
    pub fn fingerprint(&self) -> u128 {
        let mut a = std::collections::hash_map::DefaultHasher::new();
        let mut b = std::collections::hash_map::DefaultHasher::new();
        0x5eed_u64.hash(&mut b);
        for h in [&mut a, &mut b] {
            self.mmu.hash(h);
            self.vcpus.hash(h);
            self.host.hash(h);
            self.reported.hash(h);
            self.in_get.hash(h);
            self.unsynced.hash(h);
            self.pending.hash(h);
            self.access.hash(h);
            self.queued.iter().map(|q| q.1).collect::<Vec<_>>().hash(h);
        }
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }

    /// Whether the state-hashing mirror of the oracle agrees with the ledger: the pages the
    /// next collect must report are those written since their copy and not awaiting one.
    #[must_use]
    pub fn mirror_agrees(&self) -> bool {
        let at_stake = self.ledger.at_stake();
        (0..self.mmu.geo.pages).all(|p| {
            let mine = self.unsynced & !self.pending & bit(p) != 0;
            mine == at_stake.contains(0, p as u64)
        })
    }

    /// Whether a loss (a lost write, or an access reported idle) was found.
    #[must_use]
    pub fn lost(&self) -> bool {
        !self.ledger.report().lost.is_empty() || self.access.first_miss.is_some()
    }

    fn boundary(&self) -> bool {
        self.vcpus.iter().all(|v| v.1 != VState::Mid)
    }

    fn all_done(&self, setup: &Setup) -> bool {
        self.vcpus
            .iter()
            .zip(&setup.accesses)
            .all(|(v, a)| v.0 >= a.len() && v.1 == VState::Run)
    }

    /// Actors that can move now.
    #[must_use]
    pub fn enabled(&self, setup: &Setup, program: &[HostOp]) -> Vec<Actor> {
        let mut out = Vec::new();
        for (i, &(pc, st)) in self.vcpus.iter().enumerate() {
            let can = match st {
                VState::Mid | VState::PmlFull => true,
                VState::Fault => self.mmu.lock.is_none(),
                VState::Run if pc >= setup.accesses[i].len() => false,
                VState::Run if self.mmu.reload & bit(i) != 0 => self.mmu.lock.is_none(),
                VState::Run => true,
            };
            if can {
                out.push(Actor::Vcpu(i));
            }
        }
        if let Some(op) = program.get(self.host.0) {
            let can = match op {
                HostOp::Lock => self.mmu.lock.is_none(),
                HostOp::FlushTlbs | HostOp::KickPml | HostOp::WpAll => self.boundary(),
                HostOp::WaitDone => self.all_done(setup),
                _ => true,
            };
            if can {
                out.push(Actor::Host);
            }
        }
        out
    }

    /// Whether the run is over (nothing can move). `Err` names a vCPU or host op stuck.
    pub fn finished(&self, setup: &Setup, program: &[HostOp]) -> Result<bool, String> {
        if !self.enabled(setup, program).is_empty() {
            return Ok(false);
        }
        if self.host.0 < program.len() {
            return Err(format!(
                "deadlock: host waits at {:?}, vCPUs {:?}",
                program[self.host.0], self.vcpus
            ));
        }
        if !self.all_done(setup) {
            return Err(format!(
                "vCPUs {:?} cannot move after the host finished",
                self.vcpus
            ));
        }
        Ok(true)
    }

    fn record(&mut self, vcpu: usize, page: usize) {
        self.access.touch(page);
        self.seqs[vcpu] += 1;
        self.costs.writes += 1;
        let w = (vcpu, page, self.seqs[vcpu]);
        if self.in_get {
            self.queued.push(w);
        } else {
            self.commit(w);
        }
    }

    fn commit(&mut self, (vcpu, page, seq): (usize, usize, u64)) {
        self.unsynced |= bit(page);
        // The page is inside the ledger's layout (checked by `Setup::new`).
        let _ = self.ledger.record_write(page as u64, vcpu, seq);
    }

    fn pageset(&self, mask: u64) -> PageSet {
        let mut s = PageSet::new();
        for p in bits(mask, self.mmu.geo.pages) {
            s.insert(0, p as u64);
        }
        s
    }

    /// Move `actor` one step; returns a readable line for the schedule.
    pub fn step(
        &mut self,
        design: &dyn Design,
        setup: &Setup,
        program: &[HostOp],
        actor: Actor,
    ) -> String {
        match actor {
            Actor::Vcpu(v) => self.vcpu_step(design, setup, v),
            Actor::Host => self.host_step(design, program),
        }
    }

    fn vcpu_step(&mut self, design: &dyn Design, setup: &Setup, v: usize) -> String {
        let (pc, st) = self.vcpus[v];
        let kind = design.walk_kind();
        match st {
            VState::Mid => {
                let page = setup.accesses[v][pc].0;
                self.record(v, page);
                self.vcpus[v] = (pc + 1, VState::Run);
                format!("vCPU{v} stores to page {page}")
            }
            VState::PmlFull => {
                let n = self.mmu.drain_pml(v);
                self.vcpus[v].1 = VState::Run;
                format!("vCPU{v} PML-full exit: KVM moves {n} entries to the bitmap")
            }
            VState::Fault => {
                let page = setup.accesses[v][pc].0;
                self.mmu.lock = Some(Holder::Vcpu(v));
                self.costs.faults += 1;
                design.fault(&mut self.mmu, v, page, &mut self.costs);
                self.mmu.drain_pml(v);
                self.mmu.lock = None;
                self.vcpus[v].1 = VState::Run;
                format!("vCPU{v} KVM handles the write fault on page {page}")
            }
            VState::Run if self.mmu.reload & bit(v) != 0 => {
                self.mmu.reload &= !bit(v);
                self.mmu.lock = Some(Holder::Vcpu(v));
                design.reload(&mut self.mmu, v, &mut self.costs);
                self.mmu.lock = None;
                format!("vCPU{v} reloads its root")
            }
            VState::Run => {
                let (page, write) = setup.accesses[v][pc];
                if write && self.mmu.write_hits(v, page) {
                    self.record(v, page);
                    self.vcpus[v].0 += 1;
                    return format!("vCPU{v} writes page {page} (TLB hit)");
                }
                if !write && self.mmu.tlb(v, page).is_some() {
                    self.access.touch(page);
                    self.vcpus[v].0 += 1;
                    return format!("vCPU{v} reads page {page} (TLB hit)");
                }
                let walk = self.mmu.walk(kind, v, page, write);
                let verb = if write { "write" } else { "read" };
                match walk {
                    Walk::Filled { pml, hw_dirty, .. } => {
                        if pml || hw_dirty {
                            self.costs.hw_logged += 1;
                        }
                        if write {
                            self.vcpus[v].1 = VState::Mid;
                        } else {
                            self.access.touch(page);
                            self.vcpus[v].0 += 1;
                        }
                    }
                    Walk::Fault => self.vcpus[v].1 = VState::Fault,
                    Walk::PmlFull => {
                        self.costs.pml_full_exits += 1;
                        self.vcpus[v].1 = VState::PmlFull;
                    }
                }
                format!("vCPU{v} walks for a {verb} of page {page}: {walk}")
            }
        }
    }

    /// Next page at or after the cursor in `mask`; the op ends with the last page (or at once
    /// when none is left). The set cannot change under the op: it runs under `mmu_lock`, and
    /// only fault handling (which needs the lock) changes the sets it walks.
    fn next_page(&mut self, mask: u64) -> Option<usize> {
        let n = self.mmu.geo.pages;
        let page = (self.host.1..n).find(|&p| mask & bit(p) != 0);
        let more = page.is_some_and(|p| (p + 1..n).any(|q| mask & bit(q) != 0));
        match page {
            Some(p) if more => self.host.1 = p + 1,
            _ => self.host = (self.host.0 + 1, 0),
        }
        page
    }

    fn host_step(&mut self, design: &dyn Design, program: &[HostOp]) -> String {
        let op = program[self.host.0];
        let all = if self.mmu.geo.pages == 64 {
            u64::MAX
        } else {
            bit(self.mmu.geo.pages) - 1
        };
        let line = match op {
            HostOp::Lock => {
                self.mmu.lock = Some(Holder::Host);
                "host takes mmu_lock".to_string()
            }
            HostOp::Unlock => {
                self.mmu.lock = None;
                "host drops mmu_lock".to_string()
            }
            HostOp::FlushTlbs => {
                self.mmu.flush_all();
                "host flushes every TLB".to_string()
            }
            HostOp::CopyAll => {
                self.ledger.rebaseline();
                self.unsynced = 0;
                self.pending = 0;
                "host copies all memory".to_string()
            }
            HostOp::GetBegin => {
                self.ledger.advance();
                self.in_get = true;
                "host GET_DIRTY_LOG begins".to_string()
            }
            HostOp::KickPml => {
                let n: usize = (0..self.mmu.geo.vcpus).map(|v| self.mmu.drain_pml(v)).sum();
                self.costs.kick_exits += self.mmu.geo.vcpus as u64;
                format!("host kicks the vCPUs: {n} PML entries to the bitmap")
            }
            HostOp::Get { clear } => {
                self.reported = self.mmu.bitmap;
                if clear {
                    self.mmu.bitmap = 0;
                }
                format!("host reads the bitmap: {}", pages(self.reported, all))
            }
            HostOp::GetEnd => {
                let reported = self.pageset(self.reported);
                self.ledger.collected(&reported, CollectContext::default());
                self.pending |= self.reported;
                self.in_get = false;
                for w in std::mem::take(&mut self.queued) {
                    self.commit(w);
                }
                format!("host GET returns {}", pages(self.reported, all))
            }
            HostOp::Copy => {
                let set = self.pageset(self.reported);
                self.ledger.copied(&set);
                self.unsynced &= !self.reported;
                self.pending &= !self.reported;
                format!("host copies {}", pages(self.reported, all))
            }
            HostOp::WaitDone => "host waits for the vCPUs to stop".to_string(),
            HostOp::ScanBegin => {
                self.access.scan_begin();
                "host idle scan begins".to_string()
            }
            HostOp::ScanEnd => {
                self.access.scan_end();
                "host idle scan ends".to_string()
            }
            HostOp::WpAll | HostOp::WpAllNoKick => {
                self.mmu.generation = self.mmu.generation.wrapping_add(1);
                self.mmu.reload = bit(self.mmu.geo.vcpus) - 1;
                if op == HostOp::WpAll {
                    self.mmu.flush_all();
                    self.costs.kick_exits += self.mmu.geo.vcpus as u64;
                }
                self.costs.protect_steps += 1;
                "host write-protects all memory (generation bump)".to_string()
            }
            HostOp::EnableNext | HostOp::ClearNext | HostOp::SyncNext | HostOp::ScanNext => {
                let mask = match op {
                    HostOp::EnableNext | HostOp::ScanNext => all,
                    HostOp::ClearNext => self.reported,
                    _ => design.sync_set(&self.mmu),
                };
                let Some(p) = self.next_page(mask) else {
                    return format!("host {op:?}: no page to visit");
                };
                let c = &mut self.costs;
                match op {
                    HostOp::EnableNext => {
                        c.protect_steps += 1;
                        design.enable_page(&mut self.mmu, p, c);
                        format!("host enables logging on page {p}")
                    }
                    HostOp::ClearNext => {
                        c.protect_steps += 1;
                        design.clear_page(&mut self.mmu, p, c);
                        format!("host CLEARs page {p}")
                    }
                    HostOp::ScanNext => {
                        c.sync_scanned += 1;
                        let a = design.scan_page(&mut self.mmu, p);
                        self.access.scan_page(p, a);
                        let what = if a { "accessed" } else { "idle" };
                        format!("host scan reads page {p}: {what}")
                    }
                    _ => {
                        c.sync_scanned += 1;
                        design.sync_page(&mut self.mmu, p, c);
                        format!("host syncs hardware dirty state of page {p}")
                    }
                }
            }
        };
        if !matches!(
            op,
            HostOp::EnableNext | HostOp::ClearNext | HostOp::SyncNext | HostOp::ScanNext
        ) {
            self.host.0 += 1;
        }
        line
    }
}

/// `{1, 3}`, or `{}`, or `all`.
#[must_use]
pub fn pages(mask: u64, all: u64) -> String {
    if mask == all && all.count_ones() > 1 {
        return "all pages".to_string();
    }
    let v: Vec<String> = bits(mask, 64).map(|p| p.to_string()).collect();
    format!("{{{}}}", v.join(", "))
}
