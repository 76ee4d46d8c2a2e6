//! What a fresh machine costs against reusing one, and how fast guests write in each mode.
//!
//! `cargo run --release -p trackcheck-harness --example machine_cost [-- PAGES VCPUS ROUNDS]`
//!
//! Each round runs the same program: every vCPU writes its share of PAGES data pages once.
//! "fresh" builds a new machine per round (KVM_CREATE_VM, memslots, page tables, vCPUs, host
//! memory populated, code loaded) and runs it; "reuse" zeroes the data region, reloads the
//! program and restarts the vCPUs on one machine. Figures are min / median / max over rounds.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};
use trackcheck_harness::{ExecutionMode, HostProfile, Machine, MachineConfig, support};

fn program(pages: u64, vcpus: u64) -> Program {
    let share = pages / vcpus;
    Program::new(
        pages,
        (0..vcpus)
            .map(|v| {
                Thread::new(vec![Op::Loop {
                    pages: PageSeq::Range {
                        start: v * share,
                        count: share,
                    },
                    access: Access::Write,
                    offset: 0,
                    repeat: Repeat::Times(1),
                }])
            })
            .collect(),
    )
}

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{:8.3} {:8.3} {:8.3}",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let pages = args.first().copied().unwrap_or(10_000);
    let vcpus = args.get(1).copied().unwrap_or(2);
    let rounds = args.get(2).copied().unwrap_or(10).max(1);
    let host = HostProfile::probe();
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "host {} | kernel {} | {} | rev {git} | {pages} pages on {vcpus} vCPUs, {rounds} rounds",
        host.key(),
        host.kernel.release,
        host.kernel.cpu_model
    );
    println!(
        "{:<9} {:<34} {:>8} {:>8} {:>8}  (ms: min median max)",
        "mode", "phase", "min", "median", "max"
    );
    let program = program(pages, vcpus);
    for mode in ExecutionMode::ALL {
        if let Some(reason) = support::mode_support(&host, mode).reason() {
            println!("{mode:<9} skipped: {reason}");
            continue;
        }
        let config = MachineConfig {
            vcpus: usize::try_from(vcpus)?,
            data_pages: pages,
            mode,
            ..MachineConfig::default()
        };
        let (mut create, mut fresh_total, mut fresh_run) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            let mut m = Machine::new(config.clone())?;
            m.load(&program)?;
            let created = t.elapsed();
            let r = Instant::now();
            m.run_to_completion()?;
            fresh_run.push(r.elapsed());
            create.push(created);
            fresh_total.push(t.elapsed());
        }
        let mut m = Machine::new(config.clone())?;
        m.load(&program)?;
        m.run_to_completion()?;
        let (mut reset, mut reuse_total, mut reuse_run) = (Vec::new(), Vec::new(), Vec::new());
        let mut writes = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            m.load(&program)?;
            m.reset()?;
            let ready = t.elapsed();
            let r = Instant::now();
            m.run_to_completion()?;
            reuse_run.push(r.elapsed());
            reset.push(ready);
            reuse_total.push(t.elapsed());
            writes = m.total_progress();
        }
        println!(
            "{mode:<9} {:<34} {}",
            "fresh: create + load",
            stats(create.clone())
        );
        println!("{mode:<9} {:<34} {}", "fresh: run", stats(fresh_run));
        println!(
            "{mode:<9} {:<34} {}",
            "fresh: total",
            stats(fresh_total.clone())
        );
        println!(
            "{mode:<9} {:<34} {}",
            "reuse: load + reset",
            stats(reset.clone())
        );
        println!(
            "{mode:<9} {:<34} {}",
            "reuse: run",
            stats(reuse_run.clone())
        );
        println!(
            "{mode:<9} {:<34} {}",
            "reuse: total",
            stats(reuse_total.clone())
        );
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let run = median(reuse_run);
        println!(
            "{mode:<9} guest writes: {writes} in {:.3} ms = {:.0} pages/s; setup: fresh {:.2} ms vs reuse {:.2} ms ({:.0}x)",
            run.as_secs_f64() * 1e3,
            writes as f64 / run.as_secs_f64(),
            median(create.clone()).as_secs_f64() * 1e3,
            median(reset.clone()).as_secs_f64() * 1e3,
            median(create).as_secs_f64() / median(reset).as_secs_f64()
        );
    }
    Ok(())
}
