//! `trackcheck bench --harness`: what the harness itself costs — a fresh machine, a reused one,
//! property-test throughput (cases per second for a 16-page stepped program on a reused
//! machine, oracle included), where one such case's time goes, and the raw-ioctl floor of the
//! same case (the same kernel calls, bare, on the same VM) so the harness's overhead is a ratio
//! from one run.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trackcheck_guests::native::compile_for;
use trackcheck_guests::{Op, Program, Thread};
use trackcheck_harness::ExecutionMode;
use trackcheck_harness::machine::{FloorCase, Machine, MachineConfig};
use trackcheck_harness::track::{Tracker, TrackerSpec};

use super::Stat;
use crate::scenarios::phase::{self, PHASES, Phase};
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
    /// One stepped case by phase (median over the breakdown cases), microseconds.
    #[serde(default)]
    pub breakdown: Vec<PhaseCost>,
    /// The same case's raw-ioctl floor by step (median), microseconds.
    #[serde(default)]
    pub floor: Vec<PhaseCost>,
    /// Median time of a whole case with phase marks on, microseconds.
    #[serde(default)]
    pub case_us: f64,
    /// Median time of a whole floor case, microseconds.
    #[serde(default)]
    pub floor_us: f64,
    /// `case_us / floor_us`.
    #[serde(default)]
    pub ratio_to_floor: f64,
}

/// Median and mean of one phase or floor step, microseconds per case.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PhaseCost {
    /// Phase or step name.
    pub name: String,
    /// Median over cases.
    pub median_us: f64,
    /// Mean over cases.
    pub mean_us: f64,
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

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn cost(name: &str, samples: &mut [f64]) -> PhaseCost {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    PhaseCost {
        name: name.into(),
        median_us: samples.get(samples.len() / 2).copied().unwrap_or(0.0),
        mean_us: mean,
    }
}

/// One stepped case as the property runs do it: reset, load, the stepped driver, detach.
fn case(m: &mut Machine, tracker: &mut dyn Tracker, i: u32) -> Result<(), String> {
    let program = sixteen_pages(u64::from(i)).with_seq_base(u64::from(i) * 100);
    m.load(&program).map_err(|e| e.to_string())?;
    phase::mark(Phase::Load);
    m.reset().map_err(|e| e.to_string())?;
    phase::mark(Phase::Reset);
    let run = drive_loaded(m, &program, tracker, false).map_err(|e| format!("case {i}: {e:?}"))?;
    if !run.findings.report.lost.is_empty() {
        return Err(format!(
            "case {i} lost pages: {:?}",
            run.findings.report.lost
        ));
    }
    phase::mark(Phase::Oracle);
    m.detach(tracker).map_err(|e| e.to_string())?;
    phase::mark(Phase::Detach);
    Ok(())
}

/// Compile `program` for every vCPU at the bases of the loaded code (what `load` compiles).
fn compile_time(m: &Machine, program: &Program) -> Result<Duration, String> {
    let t = Instant::now();
    for (v, c) in m.compiled().iter().enumerate().take(program.vcpu_count()) {
        compile_for(program, v, c.base, None, m.store_form()).map_err(|e| e.to_string())?;
    }
    Ok(t.elapsed())
}

/// Measure the harness's costs in `mode` (`rounds` fresh machines, `cases` stepped cases, as
/// many again for the breakdown and for the floor).
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
    for i in 0..cases.min(20) {
        let t = Instant::now();
        let program = sixteen_pages(u64::from(i)).with_seq_base(u64::from(i) * 100);
        m.load(&program).map_err(|e| e.to_string())?;
        m.reset().map_err(|e| e.to_string())?;
        reuse.push(t.elapsed());
        // Run it, so the next load restarts vCPUs that ran (as in a real case).
        m.run_to_completion().map_err(|e| e.to_string())?;
    }
    // Throughput: nothing timed inside.
    let start = Instant::now();
    for i in 0..cases {
        case(&mut m, tracker.as_mut(), i)?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Breakdown: the same cases with phase marks on, compile timed on its own.
    let mut per_phase: Vec<Vec<f64>> = vec![Vec::new(); PHASES.len()];
    let mut totals = Vec::new();
    for i in 0..cases {
        let program = sixteen_pages(u64::from(i)).with_seq_base(u64::from(i) * 100);
        let compile = compile_time(&m, &program)?;
        phase::start();
        let t = Instant::now();
        case(&mut m, tracker.as_mut(), i)?;
        let total = t.elapsed();
        phase::move_time(compile, Phase::Load, Phase::Compile);
        for (p, d) in phase::stop().iter().enumerate() {
            per_phase[p].push(us(*d));
        }
        totals.push(us(total));
    }
    // Floor: the same calls, bare.
    let mut floor: Vec<FloorCase> = Vec::new();
    for i in 0..cases {
        let program = sixteen_pages(u64::from(i)).with_seq_base(u64::from(i) * 100);
        m.load(&program).map_err(|e| e.to_string())?;
        floor.push(m.floor_case(1).map_err(|e| e.to_string())?);
    }
    let breakdown = PHASES
        .iter()
        .zip(&mut per_phase)
        .map(|(p, s)| cost(p.name(), s))
        .collect();
    let step = |name: &str, f: fn(&FloorCase) -> Duration| {
        cost(
            name,
            &mut floor.iter().map(|c| us(f(c))).collect::<Vec<_>>(),
        )
    };
    let floor_steps = vec![
        step("memory", |c| c.memory),
        step("restart", |c| c.restart),
        step("statistics", |c| c.stats),
        step("attach+detach", |c| c.attach),
        step("run", |c| c.run),
        step("collect", |c| c.collect),
    ];
    let case_us = cost("case", &mut totals).median_us;
    let floor_us = step("floor", FloorCase::total).median_us;
    Ok(HarnessCost {
        mode,
        fresh_machine: Stat::of(&fresh),
        reuse: Stat::of(&reuse),
        cases_per_second: f64::from(cases) / elapsed,
        cases,
        breakdown,
        floor: floor_steps,
        case_us,
        floor_us,
        ratio_to_floor: if floor_us > 0.0 {
            case_us / floor_us
        } else {
            0.0
        },
    })
}

impl HarnessCost {
    /// The text report (after the host line).
    #[must_use]
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{} mode, ms as min/median/max", self.mode);
        let stat = |s: &mut String, name: &str, t: &Stat| {
            let _ = writeln!(
                s,
                "{name:<22} {:>8.3} {:>8.3} {:>8.3}",
                t.min_ms, t.median_ms, t.max_ms
            );
        };
        stat(&mut s, "fresh machine + load", &self.fresh_machine);
        stat(&mut s, "reuse: load + reset", &self.reuse);
        let _ = writeln!(
            s,
            "stepped 16-page cases  {:.0} cases/s over {} cases (machine reused, oracle on)",
            self.cases_per_second, self.cases
        );
        let _ = writeln!(
            s,
            "one case by phase, us as median/mean over {} cases (phase marks on):",
            self.cases
        );
        for p in &self.breakdown {
            let _ = writeln!(
                s,
                "  {:<14} {:>8.1} {:>8.1}",
                p.name, p.median_us, p.mean_us
            );
        }
        let _ = writeln!(s, "  {:<14} {:>8.1}", "whole case", self.case_us);
        let _ = writeln!(
            s,
            "raw-ioctl floor of the same case (same calls, bare, one thread), us median/mean:"
        );
        for p in &self.floor {
            let _ = writeln!(
                s,
                "  {:<14} {:>8.1} {:>8.1}",
                p.name, p.median_us, p.mean_us
            );
        }
        let _ = writeln!(s, "  {:<14} {:>8.1}", "whole floor", self.floor_us);
        let _ = writeln!(
            s,
            "case / floor           {:.2}x (target <= 2x); the floor alone allows at most {:.0} cases/s",
            self.ratio_to_floor,
            if self.floor_us > 0.0 {
                1e6 / self.floor_us
            } else {
                0.0
            }
        );
        s
    }
}
