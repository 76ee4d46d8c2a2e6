//! `trackcheck bench --harness`: what the harness itself costs — a fresh machine, a reused one,
//! and property-test throughput (cases per second for a 16-page stepped program on a reused
//! machine, oracle included).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trackcheck_guests::{Op, Program, Thread};
use trackcheck_harness::ExecutionMode;
use trackcheck_harness::machine::{Machine, MachineConfig};
use trackcheck_harness::track::TrackerSpec;

use super::Stat;
use crate::scenarios::stepped::drive_loaded;

/// The harness's own costs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HarnessCost {
    /// Execution mode measured.
    pub mode: ExecutionMode,
    /// A new machine (VM, memslots, page tables, vCPUs) plus loading a program.
    pub fresh_machine: Stat,
    /// Loading a program into a used machine and resetting it.
    pub reuse: Stat,
    /// Stepped cases per second: load, attach, run, harvest with the oracle, detach.
    pub cases_per_second: f64,
    /// Cases measured.
    pub cases: u32,
}

fn sixteen_pages(i: u64) -> Program {
    let ops = (0..16)
        .map(|p| Op::Write {
            page: (p * 7 + i) % 16,
            offset: 8 * ((i % 64) as u16),
        })
        .collect();
    Program::new(16, vec![Thread::new(vec![Op::Sync(1)]), Thread::new(ops)])
}

/// Measure the harness's costs in `mode` (`rounds` fresh machines, `cases` stepped cases).
pub fn harness_cost(mode: ExecutionMode, rounds: u32, cases: u32) -> Result<HarnessCost, String> {
    let config = MachineConfig {
        vcpus: 2,
        data_pages: 16,
        mode,
        ..MachineConfig::default()
    };
    let mut fresh = Vec::new();
    for i in 0..rounds {
        let t = Instant::now();
        let mut m = Machine::new(config.clone()).map_err(|e| e.to_string())?;
        m.load(&sixteen_pages(u64::from(i)))
            .map_err(|e| e.to_string())?;
        fresh.push(t.elapsed());
    }
    let mut m = Machine::new(config).map_err(|e| e.to_string())?;
    let mut reuse: Vec<Duration> = Vec::new();
    let mut tracker = TrackerSpec::DirtyLog.build();
    let start = Instant::now();
    for i in 0..cases {
        let program = sixteen_pages(u64::from(i)).with_seq_base(u64::from(i) * 100);
        let t = Instant::now();
        m.load(&program).map_err(|e| e.to_string())?;
        m.reset().map_err(|e| e.to_string())?;
        reuse.push(t.elapsed());
        // The stepped scenario's own loop: attach, segments and harvests with the oracle.
        let run = drive_loaded(&mut m, &program, tracker.as_mut(), false)
            .map_err(|e| format!("case {i}: {e:?}"))?;
        if !run.findings.report.lost.is_empty() {
            return Err(format!(
                "case {i} lost pages: {:?}",
                run.findings.report.lost
            ));
        }
        m.detach(tracker.as_mut()).map_err(|e| e.to_string())?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(HarnessCost {
        mode,
        fresh_machine: Stat::of(&fresh),
        reuse: Stat::of(&reuse),
        cases_per_second: f64::from(cases) / elapsed,
        cases,
    })
}
