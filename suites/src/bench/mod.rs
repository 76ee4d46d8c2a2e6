//! `trackcheck bench`: the cost of each tracking path, phase by phase.
//!
//! Phases follow the kernel's tools/testing/selftests/kvm/dirty_log_perf_test so figures compare
//! one to one: **populate** (the guest's first pass over its memory), **enable** (turning
//! tracking on), per iteration **dirty** (a guest pass writing its pages with tracking on),
//! **harvest** (collect) and **rearm**, then **disable**. Harvest and rearm are also reported
//! as the time inside kernel calls (`-kernel`): the difference is the harness's own overhead
//! (bitmap to page list, ring walk). Host memory is pre-faulted before anything is timed, and
//! an untracked guest pass gives the write cost without tracking, so the write-fault overhead
//! per page is tracked minus untracked. Every figure is min / median / max over iterations.

mod compare;
mod harness_cost;
mod plot;

pub use compare::{compare, load_report};
pub use harness_cost::{HarnessCost, harness_cost};
pub use plot::plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trackcheck_guests::program::shuffle;
use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};
use trackcheck_harness::machine::{Machine, MachineConfig, VcpuState};
use trackcheck_harness::track::{PageSet, Step, TrackError, Tracker, TrackerSpec, harvest};
use trackcheck_harness::vcpu::RunLimits;
use trackcheck_harness::{Backing, ExecutionMode, HostProfile, Stop};

use crate::spec::{Scenario, TrialSpec};

/// How writers walk their pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AccessOrder {
    /// In address order.
    Sequential,
    /// A seeded permutation.
    Random,
}

/// What to sweep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Sweep {
    /// Guest memory size: 1/8, 1/4, 1/2, 1 and 2 times `--mem`.
    Mem,
    /// vCPUs: 1, 2, 4.
    Vcpus,
    /// Percentage of pages written per pass: 1, 10, 25, 50, 100.
    DirtyRatio,
}

/// One benchmark configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchConfig {
    /// Tracker configurations.
    pub mechanisms: Vec<TrackerSpec>,
    /// Guest memory, bytes (all vCPUs together).
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: usize,
    /// Tracked iterations.
    pub iterations: u32,
    /// Host backing.
    pub backing: Backing,
    /// Execution mode.
    pub mode: ExecutionMode,
    /// Percentage of each vCPU's pages written per pass.
    pub write_percent: u32,
    /// Walk order.
    pub access: AccessOrder,
}

/// min / median / max of a phase, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// Fastest sample.
    pub min_ms: f64,
    /// Median sample.
    pub median_ms: f64,
    /// Slowest sample.
    pub max_ms: f64,
    /// Samples.
    pub samples: usize,
}

impl Stat {
    /// Statistics of `samples` (empty: all zero).
    #[must_use]
    pub fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(&min), Some(&max)) => Self {
                min_ms: min,
                median_ms: v[v.len() / 2],
                max_ms: max,
                samples: v.len(),
            },
            _ => Self::default(),
        }
    }
}

/// Results of one mechanism under one configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MechResult {
    /// Mechanism with parameters.
    pub mechanism: String,
    /// Why it did not run, if it did not.
    pub skipped: Option<String>,
    /// Phase statistics by name: populate, untracked-pass, enable, dirty, harvest,
    /// harvest-kernel, rearm, rearm-kernel, disable.
    pub phases: BTreeMap<String, Stat>,
    /// Pages each tracked pass writes (all vCPUs).
    pub pages_per_pass: u64,
    /// Pages the median harvest reported.
    pub reported_per_harvest: u64,
    /// Guest write cost per page without tracking, ns.
    pub untracked_ns_per_page: f64,
    /// Guest write cost per page with tracking, ns (median pass). Each page is written once
    /// per pass, right after its rearm, so this is the first-write-after-rearm latency.
    pub tracked_ns_per_page: f64,
    /// Tracked minus untracked: the write-fault overhead per page, ns.
    pub fault_overhead_ns_per_page: f64,
    /// KVM_EXIT_DIRTY_RING_FULL exits during the tracked passes.
    pub ring_full_exits: u64,
    /// The same per GiB written.
    pub ring_full_exits_per_gib: f64,
}

/// A whole benchmark run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchReport {
    /// Host profile key.
    pub host_key: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// KVM backend and MMU.
    pub backend: String,
    /// trackcheck's git revision.
    pub revision: String,
    /// The configuration (for a sweep: the base one).
    pub config: BenchConfig,
    /// Results at the configuration.
    pub results: Vec<MechResult>,
    /// Sweep, if asked: the swept variable and, per value, the results.
    pub sweep: Option<SweepResult>,
}

/// Results of a sweep.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SweepResult {
    /// What was swept.
    pub variable: Sweep,
    /// Axis label (`MiB`, `vCPUs`, `% pages written`).
    pub unit: String,
    /// (value, results at that value).
    pub points: Vec<(f64, Vec<MechResult>)>,
}

/// The mechanisms this host supports, as the matrix configures them.
#[must_use]
pub fn default_mechanisms() -> Vec<TrackerSpec> {
    crate::matrix::trackers()
}

fn program(config: &BenchConfig, pages: u64) -> Program {
    let vcpus = config.vcpus as u64;
    let share = pages / vcpus;
    let count = (share * u64::from(config.write_percent) / 100).max(1);
    let passes = 2 + config.iterations;
    let threads = (0..vcpus)
        .map(|v| {
            let seq = match config.access {
                AccessOrder::Sequential => PageSeq::Range {
                    start: v * share,
                    count,
                },
                AccessOrder::Random => PageSeq::List(
                    shuffle(v * share, share, 0xBE4C ^ v)
                        .into_iter()
                        .take(usize::try_from(count).unwrap_or(0))
                        .collect(),
                ),
            };
            let mut ops = Vec::new();
            for pass in 1..=passes {
                ops.push(Op::Loop {
                    pages: seq.clone(),
                    access: Access::Write,
                    offset: 0,
                    repeat: Repeat::Times(1),
                });
                ops.push(Op::Sync(pass));
            }
            Thread::new(ops)
        })
        .collect();
    Program::new(pages, threads)
}

/// One harvest in the tracker's own step order (`track::harvest`; the bench copies nothing),
/// timing its collect and its rearm.
fn timed_harvest(
    tracker: &mut dyn Tracker,
    m: &mut Machine,
    out: &mut PageSet,
) -> Result<(Duration, Duration), String> {
    let (mut collect, mut rearm) = (Duration::ZERO, Duration::ZERO);
    let mut since = Instant::now();
    harvest(tracker, m, out, |step, _, _| -> Result<(), TrackError> {
        let now = Instant::now();
        match step {
            Step::Collect => collect += now - since,
            Step::Rearm => rearm += now - since,
            Step::Copy => {}
        }
        since = now;
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok((collect, rearm))
}

/// Run every vCPU through its next pass; with a full dirty ring, collect and rearm (untimed
/// separately: it is part of the pass, as the kernel test's collector thread is) and go on.
fn pass(
    m: &mut Machine,
    pass: u32,
    tracker: Option<&mut dyn Tracker>,
    ring_full: &mut u64,
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut tracker = tracker;
    let mut scratch = PageSet::new();
    let mut stalls = 0;
    loop {
        let behind: Vec<usize> = m
            .states()
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, VcpuState::Ready(n) if n.unwrap_or(0) < pass))
            .map(|(i, _)| i)
            .collect();
        if behind.is_empty() {
            return Ok(start.elapsed());
        }
        let stops = m.run_vcpus(&behind).map_err(|e| e.to_string())?;
        if stops.iter().any(|(_, s)| *s == Stop::RingFull) {
            *ring_full += stops.iter().filter(|(_, s)| *s == Stop::RingFull).count() as u64;
            let t = tracker
                .as_deref_mut()
                .ok_or("ring full without a tracker")?;
            scratch.clear();
            timed_harvest(t, m, &mut scratch)?;
            stalls += 1;
            if stalls > 100_000 {
                return Err("vCPUs stuck on KVM_EXIT_DIRTY_RING_FULL".into());
            }
        }
    }
}

/// Benchmark one mechanism under `config`.
pub fn bench_one(spec: TrackerSpec, config: &BenchConfig, host: &HostProfile) -> MechResult {
    let mut result = MechResult {
        mechanism: spec.label(),
        ..MechResult::default()
    };
    let trial = TrialSpec {
        tracker: spec,
        scenario: Scenario::Stepped,
        backing: config.backing,
        mode: config.mode,
        inject: None,
    };
    if let Err(reason) = crate::scenarios::precheck(&trial, host) {
        result.skipped = Some(reason);
        return result;
    }
    match measure(spec, config, &mut result) {
        Ok(()) => result,
        Err(e) => {
            result.skipped = Some(format!("could not run: {e}"));
            result
        }
    }
}

fn measure(spec: TrackerSpec, config: &BenchConfig, result: &mut MechResult) -> Result<(), String> {
    let pages = config.mem_bytes / 4096;
    let machine_config = MachineConfig {
        vcpus: config.vcpus,
        data_pages: pages,
        backing: config.backing,
        mode: config.mode,
        dirty_ring: spec.ring_bytes(),
        populate: true,
        limits: RunLimits {
            watchdog: Duration::from_secs(600),
            ..RunLimits::default()
        },
        ..MachineConfig::default()
    };
    let mut m = Machine::new(machine_config).map_err(|e| e.to_string())?;
    let program = program(config, pages);
    m.load(&program).map_err(|e| e.to_string())?;
    let mut ring_full = 0;
    let populate = pass(&mut m, 1, None, &mut ring_full)?;
    let untracked = pass(&mut m, 2, None, &mut ring_full)?;
    let mut tracker = spec.build();
    let t0 = Instant::now();
    m.attach(tracker.as_mut()).map_err(|e| e.to_string())?;
    let enable = t0.elapsed();
    let mut out = PageSet::new();
    // Settle the initial state (INITIALLY_SET reports everything) outside the timed phases.
    timed_harvest(tracker.as_mut(), &mut m, &mut out)?;
    let _ = tracker.take_kernel_time();
    let (mut dirty, mut harvest, mut harvest_k, mut rearm, mut rearm_k, mut reported) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    ring_full = 0;
    for i in 0..config.iterations {
        dirty.push(pass(&mut m, 3 + i, Some(tracker.as_mut()), &mut ring_full)?);
        let _ = tracker.take_kernel_time();
        out.clear();
        let (collect_time, rearm_time) = timed_harvest(tracker.as_mut(), &mut m, &mut out)?;
        harvest.push(collect_time);
        rearm.push(rearm_time);
        let k = tracker.take_kernel_time();
        harvest_k.push(k.collect);
        rearm_k.push(k.rearm);
        reported.push(out.len());
    }
    let t = Instant::now();
    m.detach(tracker.as_mut()).map_err(|e| e.to_string())?;
    let disable = t.elapsed();
    let per_pass = (pages / config.vcpus as u64 * u64::from(config.write_percent) / 100).max(1)
        * config.vcpus as u64;
    let phases = &mut result.phases;
    for (name, samples) in [
        ("populate", vec![populate]),
        ("untracked-pass", vec![untracked]),
        ("enable", vec![enable]),
        ("dirty", dirty.clone()),
        ("harvest", harvest),
        ("harvest-kernel", harvest_k),
        ("rearm", rearm),
        ("rearm-kernel", rearm_k),
        ("disable", vec![disable]),
    ] {
        phases.insert(name.to_string(), Stat::of(&samples));
    }
    reported.sort_unstable();
    result.pages_per_pass = per_pass;
    result.reported_per_harvest = reported.get(reported.len() / 2).copied().unwrap_or(0);
    // The populate and untracked passes write every page; tracked passes write `per_pass`.
    let untracked_pages = (per_pass).max(1) as f64;
    result.untracked_ns_per_page = untracked.as_secs_f64() * 1e9 / untracked_pages;
    result.tracked_ns_per_page = phases["dirty"].median_ms * 1e6 / per_pass as f64;
    result.fault_overhead_ns_per_page = result.tracked_ns_per_page - result.untracked_ns_per_page;
    result.ring_full_exits = ring_full;
    let gib_written =
        (per_pass * u64::from(config.iterations) * 4096) as f64 / f64::from(1u32 << 30);
    result.ring_full_exits_per_gib = if gib_written > 0.0 {
        ring_full as f64 / gib_written
    } else {
        0.0
    };
    Ok(())
}

/// Run `config` for every mechanism.
pub fn run(config: &BenchConfig, host: &HostProfile, progress: &dyn Fn(&str)) -> Vec<MechResult> {
    config
        .mechanisms
        .iter()
        .map(|spec| {
            progress(&spec.label());
            bench_one(*spec, config, host)
        })
        .collect()
}

/// Run a sweep of `variable` around `config`.
pub fn sweep(
    config: &BenchConfig,
    variable: Sweep,
    host: &HostProfile,
    progress: &dyn Fn(&str),
) -> SweepResult {
    const MIB: u64 = 1 << 20;
    // (value on the axis, configuration at that value).
    let points: Vec<(u64, BenchConfig)> = match variable {
        Sweep::Mem => [
            config.mem_bytes / 8,
            config.mem_bytes / 4,
            config.mem_bytes / 2,
            config.mem_bytes,
            config.mem_bytes * 2,
        ]
        .into_iter()
        .map(|bytes| {
            // At least 2 MiB a vCPU, in whole 2 MiB units.
            let bytes = (bytes / (2 * MIB) * (2 * MIB)).max(2 * MIB * config.vcpus as u64);
            (
                bytes / MIB,
                BenchConfig {
                    mem_bytes: bytes,
                    ..config.clone()
                },
            )
        })
        .collect(),
        Sweep::Vcpus => [1usize, 2, 4]
            .into_iter()
            .map(|v| {
                (
                    v as u64,
                    BenchConfig {
                        vcpus: v,
                        ..config.clone()
                    },
                )
            })
            .collect(),
        Sweep::DirtyRatio => [1u32, 10, 25, 50, 100]
            .into_iter()
            .map(|p| {
                (
                    u64::from(p),
                    BenchConfig {
                        write_percent: p,
                        ..config.clone()
                    },
                )
            })
            .collect(),
    };
    let unit = match variable {
        Sweep::Mem => "MiB",
        Sweep::Vcpus => "vCPUs",
        Sweep::DirtyRatio => "% pages written",
    };
    let points = points
        .into_iter()
        .map(|(value, c)| {
            progress(&format!("{value} {unit}"));
            (value as f64, run(&c, host, progress))
        })
        .collect();
    SweepResult {
        variable,
        unit: unit.into(),
        points,
    }
}

impl BenchReport {
    /// Assemble a report with the host's facts.
    #[must_use]
    pub fn new(
        host: &HostProfile,
        config: BenchConfig,
        results: Vec<MechResult>,
        sweep: Option<SweepResult>,
    ) -> Self {
        Self {
            host_key: host.key(),
            kernel: host.kernel.release.clone(),
            cpu: host.kernel.cpu_model.clone(),
            backend: host.kvm.as_ref().map_or_else(
                || "no KVM".into(),
                |k| format!("{} ({})", k.backend.kind.name(), k.backend.mmu),
            ),
            revision: option_env!("TRACKCHECK_GIT_REV")
                .unwrap_or("unknown revision")
                .into(),
            config,
            results,
            sweep,
        }
    }

    /// The phase table.
    #[must_use]
    pub fn text(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "host {} | kernel {} | {} | backend {} | rev {}",
            self.host_key, self.kernel, self.cpu, self.backend, self.revision
        );
        let _ = writeln!(
            out,
            "{} MiB on {} vCPUs, {} iterations, {} backing, {} mode, {}% of pages written per pass, {:?} order; ms as min/median/max",
            c.mem_bytes >> 20,
            c.vcpus,
            c.iterations,
            c.backing,
            c.mode,
            c.write_percent,
            c.access
        );
        table(&mut out, &self.results);
        if let Some(s) = &self.sweep {
            let _ = writeln!(out, "\nsweep over {} (median ms)", s.unit);
            let _ = writeln!(
                out,
                "{:>10} {:<30} {:>10} {:>10} {:>10} {:>12}",
                s.unit.split(' ').next().unwrap_or(""),
                "mechanism",
                "dirty",
                "harvest",
                "rearm",
                "fault ns/pg"
            );
            for (value, results) in &s.points {
                for r in results {
                    if r.skipped.is_some() {
                        continue;
                    }
                    let p = |n: &str| r.phases.get(n).map_or(0.0, |s| s.median_ms);
                    let _ = writeln!(
                        out,
                        "{value:>10} {:<30} {:>10.3} {:>10.3} {:>10.3} {:>12.0}",
                        r.mechanism,
                        p("dirty"),
                        p("harvest"),
                        p("rearm"),
                        r.fault_overhead_ns_per_page
                    );
                }
            }
        }
        out
    }
}

fn table(out: &mut String, results: &[MechResult]) {
    const PHASES: [&str; 9] = [
        "populate",
        "untracked-pass",
        "enable",
        "dirty",
        "harvest",
        "harvest-kernel",
        "rearm",
        "rearm-kernel",
        "disable",
    ];
    let _ = writeln!(
        out,
        "\n{:<30} {:<15} {:>10} {:>10} {:>10}",
        "mechanism", "phase", "min", "median", "max"
    );
    for r in results {
        if let Some(why) = &r.skipped {
            let _ = writeln!(out, "{:<30} skipped: {why}", r.mechanism);
            continue;
        }
        for name in PHASES {
            if let Some(s) = r.phases.get(name) {
                let _ = writeln!(
                    out,
                    "{:<30} {:<15} {:>10.3} {:>10.3} {:>10.3}",
                    r.mechanism, name, s.min_ms, s.median_ms, s.max_ms
                );
            }
        }
        let overhead = r
            .phases
            .get("harvest")
            .zip(r.phases.get("harvest-kernel"))
            .map_or(0.0, |(a, b)| a.median_ms - b.median_ms)
            + r.phases
                .get("rearm")
                .zip(r.phases.get("rearm-kernel"))
                .map_or(0.0, |(a, b)| a.median_ms - b.median_ms);
        let _ = writeln!(
            out,
            "{:<30} write cost {:.0} ns/page untracked, {:.0} tracked = first write after rearm (+{:.0} fault overhead); {} pages/pass, {} reported/harvest; user-space time {:.3} ms/harvest+rearm; {} ring-full exits ({:.1}/GiB)",
            r.mechanism,
            r.untracked_ns_per_page,
            r.tracked_ns_per_page,
            r.fault_overhead_ns_per_page,
            r.pages_per_pass,
            r.reported_per_harvest,
            overhead,
            r.ring_full_exits,
            r.ring_full_exits_per_gib
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_min_median_max() {
        let ms = |v: u64| Duration::from_millis(v);
        let s = Stat::of(&[ms(5), ms(1), ms(3)]);
        assert_eq!(
            (s.min_ms, s.median_ms, s.max_ms, s.samples),
            (1.0, 3.0, 5.0, 3)
        );
        assert_eq!(Stat::of(&[]), Stat::default());
    }

    #[test]
    fn programs_write_the_requested_share() {
        let config = BenchConfig {
            mechanisms: vec![],
            mem_bytes: 8 << 20,
            vcpus: 2,
            iterations: 2,
            backing: Backing::Anon,
            mode: ExecutionMode::Native,
            write_percent: 25,
            access: AccessOrder::Random,
        };
        let p = program(&config, 2048);
        p.validate().expect("valid");
        let segs = trackcheck_guests::sim::segments(&p.vcpus[1]).expect("finite");
        assert_eq!(
            segs.len(),
            5,
            "populate, untracked, two tracked passes, done"
        );
        assert_eq!(segs[0].writes.len(), 256, "25% of 1024 pages");
        assert!(
            segs[0]
                .writes
                .iter()
                .all(|(page, _, _)| (1024..2048).contains(page))
        );
    }
}
