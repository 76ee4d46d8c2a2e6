//! No fd or thread leaks over many stepped cases: a reused machine runs 10,000 short stepped
//! cases (load, reset, attach, segments with harvests, detach) in a fresh single-threaded
//! child, and the child's fds (/proc/self/fd) and threads (/proc/self/task) are counted before
//! and after. The persistent vCPU threads must stay as many as the machine's vCPUs while it
//! lives and all be gone when it is dropped. Every 100th case runs its first segment with a
//! host closure (the scoped-watchdog path).
//!
//! It sees leaks of fds and threads only (not memory), and only in the paths these cases take.

use trackcheck_harness::track::{PageSet, TrackError, TrackerSpec, harvest};

use super::*;

/// Cases the child runs: the 10,000 (about 3 to 10 s here, load permitting).
const CASES: u32 = 10_000;

pub(super) fn no_leak_over_many_cases() -> Check {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD, "many-cases")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure(out.status.success(), || {
        format!("leak check over {CASES} cases failed: {text}")
    })
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(Iterator::count).unwrap_or(0)
}

fn case(
    m: &mut Machine,
    tracker: &mut dyn trackcheck_harness::track::Tracker,
    out: &mut PageSet,
    seen: &mut PageSet,
    i: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let ops = (0..16u64)
        .map(|p| Op::Write {
            page: (p * 7 + u64::from(i)) % 16,
            offset: 0,
        })
        .collect();
    let program = Program::new(16, vec![Thread::new(vec![Op::Sync(1)]), Thread::new(ops)])
        .with_seq_base(u64::from(i) * 100);
    m.load(&program)?;
    m.reset()?;
    m.attach(tracker)?;
    seen.clear();
    let mut collect = |m: &mut Machine, seen: &mut PageSet| -> Result<(), TrackError> {
        out.clear();
        harvest(tracker, m, out, |_, _, _| Ok::<(), TrackError>(()))?;
        seen.union_with(out);
        Ok(())
    };
    collect(m, seen)?;
    let mut first = true;
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        if first && i.is_multiple_of(100) {
            m.run_with(|view| view.running()).1?;
        } else {
            m.run()?;
        }
        first = false;
        collect(m, seen)?;
    }
    m.detach(tracker)?;
    for page in 0..16 {
        if !seen.contains(trackcheck_harness::machine::DATA_SLOT, page) {
            return Err(format!("case {i}: page {page} was written and never reported").into());
        }
    }
    Ok(())
}

/// The child's side: the cases, then the counts.
pub(super) fn child() -> Result<(), Box<dyn std::error::Error>> {
    let config = MachineConfig {
        vcpus: 2,
        data_pages: 16,
        ..MachineConfig::default()
    };
    let mut tracker = TrackerSpec::DirtyLog.build();
    let (mut out, mut seen) = (PageSet::new(), PageSet::new());
    // Warm up once-per-process state (signal handler, stats, ...) with a machine of its own.
    {
        let mut m = Machine::new(config.clone())?;
        case(&mut m, tracker.as_mut(), &mut out, &mut seen, 0)?;
    }
    let (fds0, tasks0) = (count("/proc/self/fd"), count("/proc/self/task"));
    let mut m = Machine::new(config)?;
    case(&mut m, tracker.as_mut(), &mut out, &mut seen, 0)?;
    let (fds1, tasks1) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 1..CASES {
        case(&mut m, tracker.as_mut(), &mut out, &mut seen, i)?;
    }
    let (fds2, tasks2) = (count("/proc/self/fd"), count("/proc/self/task"));
    let names: Vec<String> = std::fs::read_dir("/proc/self/task")?
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    drop(m);
    let (fds3, tasks3) = (count("/proc/self/fd"), count("/proc/self/task"));
    let report = format!(
        "fds {fds0} before the machine, {fds1} after one case, {fds2} after {CASES}, {fds3} after \
         the drop; threads {tasks0}, {tasks1}, {tasks2}, {tasks3} (with the machine: {names:?})"
    );
    println!("{report}");
    // KVM adds a task of its own to the process per VM (kvm-nx-lpage-recovery on x86):
    // count the harness's vCPU threads by name.
    let vcpu_threads = names.iter().filter(|n| n.starts_with("vcpu")).count();
    if fds1 != fds2 || tasks1 != tasks2 || fds3 != fds0 || tasks3 != tasks0 || vcpu_threads != 2 {
        return Err(report.into());
    }
    Ok(())
}
