//! KVM-backed tests of the harness foundation: machines run generated guests in both execution
//! modes, the guest's memory matches the reference interpreter, the KVM stats prove the mode,
//! the watchdog ends misbehaving guests in bounded time, machines are reusable, every backing
//! works. Trials that cannot run here are ignored with the reason on stderr.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use trackcheck_guests::GuestPageSize;
use trackcheck_guests::layout::PAGE_SIZE;
use trackcheck_guests::sim::{ThreadEvents, segments};
use trackcheck_guests::{Access, Event, Misbehaviour, Op, PageSeq, Program, Repeat, Thread, stamp};
use trackcheck_harness::machine::VcpuState;
use trackcheck_harness::memory::{
    HugetlbReservation, PoolFigures, PoolLock, hugetlb_pool_file, state_dir, thp_bytes_in,
};
use trackcheck_harness::support::{backing_support, mode_support};
use trackcheck_harness::vcpu::FailureKind;
use trackcheck_harness::vm::VmError;
use trackcheck_harness::{
    Backing, ExecutionMode, GuestMemory, HostProfile, Machine, MachineConfig, MachineError,
    Mechanism, Stop, Vm,
};

#[path = "kvm/budget.rs"]
mod budget;
#[path = "kvm/fep.rs"]
mod fep;
#[path = "kvm/leak.rs"]
mod leak;
#[path = "kvm/memory.rs"]
mod memory;
#[path = "kvm/process.rs"]
mod process;
#[path = "kvm/ring_full.rs"]
mod ring_full;

use memory::{data_slots, guest_2m_pages, guest_page_tables, memslot_operations};
use process::{free_pages_are_used_first, killed_process_returns_hugepages, no_fd_leak};

/// Trials that change a hugetlb pool run one at a time in this process (and, under nextest, in
/// the `hugetlb` test group with one thread): they compare pool sizes before and after.
static HUGETLB: Mutex<()> = Mutex::new(());

/// Environment variable that makes this binary act as a child process for a trial.
const CHILD: &str = "TRACKCHECK_TEST_CHILD";

/// How many 2 MiB pages the `hold-hugepage` child makes available (default 1).
const HOLD_PAGES: &str = "TRACKCHECK_TEST_HOLD_PAGES";

type Check = Result<(), Failed>;

fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Check {
    if cond { Ok(()) } else { Err(msg().into()) }
}

/// Expected content of every 8-byte slot the program writes, after it ran to completion.
/// Programs used here give each vCPU its own pages, so the last writer is well defined.
fn expected_memory(program: &Program) -> Vec<(u64, u16, u64)> {
    let mut last = std::collections::BTreeMap::new();
    for (vcpu, thread) in program.vcpus.iter().enumerate() {
        for e in ThreadEvents::with_seq_base(thread, program.seq_base) {
            match e {
                Event::Write { page, offset, seq } => {
                    last.insert((page, offset), stamp(vcpu, seq));
                }
                Event::Done { .. } | Event::Misbehave(_) => break,
                _ => {}
            }
        }
    }
    last.into_iter().map(|((p, o), s)| (p, o, s)).collect()
}

fn check_memory(machine: &Machine, program: &Program) -> Check {
    let expected = expected_memory(program);
    let data = machine.data();
    for &(page, offset, want) in &expected {
        let got = data.read_u64(page * PAGE_SIZE + u64::from(offset));
        ensure(got == want, || {
            format!(
                "page {page} +{offset:#x}: memory holds {got:#x}, the program's last write was {want:#x}"
            )
        })?;
    }
    // Nothing else was written: count non-zero words over the data region.
    let mut nonzero = 0u64;
    let mut page = vec![0u8; 4096];
    for p in 0..program.data_pages {
        data.read(p * PAGE_SIZE, &mut page);
        nonzero += page
            .chunks_exact(8)
            .filter(|w| w.iter().any(|b| *b != 0))
            .count() as u64;
    }
    ensure(nonzero == expected.len() as u64, || {
        format!(
            "{nonzero} words written, the program wrote {}",
            expected.len()
        )
    })
}

/// 2 vCPUs, `pages` pages each (disjoint halves), written in three segments: a sequential
/// loop, a shuffled loop, straight-line writes with reads in between.
fn two_vcpu_program(pages: u64) -> Program {
    let threads = (0..2u64)
        .map(|v| {
            let start = v * pages;
            Thread::new(vec![
                Op::Loop {
                    pages: PageSeq::Range {
                        start,
                        count: pages / 2,
                    },
                    access: Access::Write,
                    offset: 0,
                    repeat: Repeat::Times(1),
                },
                Op::Sync(1),
                Op::Loop {
                    pages: PageSeq::Shuffled {
                        start: start + pages / 2,
                        count: pages - pages / 2,
                        seed: 7 + v,
                    },
                    access: Access::Write,
                    offset: 8,
                    repeat: Repeat::Times(1),
                },
                Op::Sync(2),
                Op::Read {
                    page: start,
                    offset: 0,
                },
                Op::Write {
                    page: start + 1,
                    offset: 16,
                },
                Op::Loop {
                    pages: PageSeq::Strided {
                        start,
                        count: 10,
                        stride: 3,
                    },
                    access: Access::Read,
                    offset: 0,
                    repeat: Repeat::Times(2),
                },
            ])
        })
        .collect();
    Program::new(2 * pages, threads)
}

fn run_big(mode: ExecutionMode) -> Check {
    let pages = 10_000;
    let program = two_vcpu_program(pages / 2 * 2 / 2);
    let config = MachineConfig {
        vcpus: 2,
        data_pages: program.data_pages,
        mode,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(config)?;
    m.load(&program)?;
    let before = m.vcpu_stats();
    let start = Instant::now();
    let mut syncs = Vec::new();
    while m.states().iter().any(|s| matches!(s, VcpuState::Ready(_))) {
        for (vcpu, stop) in m.run()? {
            syncs.push((vcpu, stop));
        }
    }
    let elapsed = start.elapsed();
    let after = m.vcpu_stats();
    // Each vCPU stopped at Sync(1), Sync(2), then Done with the right last seq.
    for v in 0..2 {
        let mine: Vec<Stop> = syncs
            .iter()
            .filter(|(i, _)| *i == v)
            .map(|(_, s)| *s)
            .collect();
        let segs = segments(&program.vcpus[v]).ok_or("finite program")?;
        let writes: u64 = segs.iter().map(|s| s.writes.len() as u64).sum();
        ensure(
            mine == vec![
                Stop::Sync(1),
                Stop::Sync(2),
                Stop::Done { last_seq: writes },
            ],
            || format!("vCPU {v} stops {mine:?}"),
        )?;
        ensure(m.progress(v) == writes, || {
            format!("vCPU {v} progress {} != {writes}", m.progress(v))
        })?;
    }
    check_memory(&m, &program)?;
    let writes = m.total_progress();
    let evidence = m.mode_evidence(&before, &after, writes);
    eprintln!(
        "{mode}: {writes} writes in {:.3}s ({:.0} pages/s); {}",
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64(),
        evidence.summary()
    );
    ensure(evidence.matches(), || {
        format!("mode not proven: {}", evidence.summary())
    })
}

/// With `beside_host`, the segment runs under a host closure that itself waits for the vCPUs
/// (as a concurrent harvest loop does): only the watchdog beside the closure can end a hang.
fn misbehave(mode: ExecutionMode, what: Misbehaviour, beside_host: bool) -> Check {
    let program = Program::new(
        4,
        vec![
            Thread::new(vec![Op::Write { page: 0, offset: 0 }, Op::Misbehave(what)]),
            // A well-behaved vCPU in the same group must still finish normally.
            Thread::new(vec![Op::Write { page: 1, offset: 0 }]),
        ],
    );
    let config = MachineConfig {
        vcpus: 2,
        data_pages: 4,
        mode,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(config)?;
    m.set_watchdog(Duration::from_millis(700));
    m.load(&program)?;
    let start = Instant::now();
    let result = if beside_host {
        // Gives up after 5 s, so a missing watchdog fails the time bound below, not hangs.
        m.run_with(|view| {
            while view.running() > 0 && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .1
    } else {
        m.run()
    };
    let elapsed = start.elapsed();
    let bound = Duration::from_secs(if beside_host { 5 } else { 10 });
    ensure(elapsed < bound, || format!("run took {elapsed:?}"))?;
    let Err(MachineError::Run(failures)) = result else {
        return Err(format!("a misbehaving guest was not reported: {result:?}").into());
    };
    ensure(failures.len() == 1 && failures[0].vcpu == 0, || {
        format!("failures {failures:?}")
    })?;
    let f = &failures[0];
    let kind_ok = match what {
        Misbehaviour::Hang => matches!(f.kind, FailureKind::Watchdog { .. }),
        Misbehaviour::ExitStorm => matches!(
            f.kind,
            FailureKind::ExitStorm { .. } | FailureKind::Watchdog { .. }
        ),
        Misbehaviour::TripleFault => matches!(
            f.kind,
            FailureKind::Shutdown | FailureKind::InternalError { .. }
        ),
    };
    let text = f.to_string();
    eprintln!("{mode} {what:?}: {text} (after {elapsed:?})");
    ensure(kind_ok, || format!("wrong failure kind: {text}"))?;
    ensure(text.contains("vCPU 0") && text.contains("pc 0x"), || {
        format!("failure does not name vCPU and pc: {text}")
    })?;
    ensure(text.contains("op 1 (misbehave"), || {
        format!("failure does not name the op: {text}")
    })?;
    ensure(text.contains("instruction `"), || {
        format!("failure has no instruction: {text}")
    })?;
    ensure(m.states()[1] == VcpuState::Done { last_seq: 1 }, || {
        format!("the healthy vCPU did not finish: {:?}", m.states())
    })?;
    // The machine is still usable after a failure.
    let ok = Program::new(4, vec![Thread::new(vec![Op::Write { page: 2, offset: 0 }])]);
    m.load(&ok)?;
    m.run_to_completion()?;
    ensure(m.progress(0) == 1, || {
        "machine unusable after a watchdog failure".into()
    })
}

fn reuse(mode: ExecutionMode) -> Check {
    let config = MachineConfig {
        vcpus: 2,
        data_pages: 256,
        mode,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(config)?;
    for round in 0..5u64 {
        let program = Program::new(
            256,
            (0..2u64)
                .map(|v| {
                    Thread::new(vec![
                        Op::Loop {
                            pages: PageSeq::Shuffled {
                                start: v * 128,
                                count: 128,
                                seed: round * 2 + v,
                            },
                            access: Access::Write,
                            offset: 0,
                            repeat: Repeat::Times(1),
                        },
                        Op::Sync(1),
                        Op::Write {
                            page: v * 128 + round,
                            offset: 8,
                        },
                    ])
                })
                .collect(),
        );
        m.load(&program.clone().with_seq_base(round * 10_000))?;
        m.reset()?;
        m.run_to_completion()?;
        check_memory(&m, &program.clone().with_seq_base(round * 10_000))
            .map_err(|e| format!("round {round}: {}", e.message().unwrap_or_default()))?;
    }
    Ok(())
}

/// An `UntilStopped` loop runs while the host watches its progress, then ends at the STOP flag
/// and the thread goes on to its next op.
fn until_stopped(mode: ExecutionMode) -> Check {
    let program = Program::new(
        64,
        vec![Thread::new(vec![
            Op::Loop {
                pages: PageSeq::Range {
                    start: 0,
                    count: 64,
                },
                access: Access::Write,
                offset: 0,
                repeat: Repeat::UntilStopped,
            },
            Op::Write { page: 0, offset: 8 },
        ])],
    );
    let mut m = Machine::new(MachineConfig {
        data_pages: 64,
        mode,
        ..MachineConfig::default()
    })?;
    m.load(&program)?;
    let target = 2000;
    let (seen, result) = m.run_with(|view| {
        let start = Instant::now();
        let mut seen = view.progress(0);
        while seen < target && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
            seen = view.progress(0);
        }
        view.request_stop(0);
        seen
    });
    let stops = result?;
    ensure(seen >= target, || {
        format!("progress reached only {seen} in 5 s")
    })?;
    let last = m.progress(0);
    ensure(stops == vec![(0, Stop::Done { last_seq: last })], || {
        format!("stops {stops:?}, progress {last}")
    })?;
    // Memory: the final write after the loop is `last`; every loop page holds a stamp from
    // the last pass that reached it.
    let data = m.data();
    ensure(data.read_u64(8) == stamp(0, last), || {
        format!("post-loop write holds {:#x}", data.read_u64(8))
    })?;
    for page in 0..64u64 {
        let v = data.read_u64(page * PAGE_SIZE);
        let seq = v & ((1 << 48) - 1);
        ensure(v >> 48 == 0 && seq >= 1 && (seq - 1) % 64 == page, || {
            format!("page {page} holds {v:#x}, not one of the loop's writes to it")
        })?;
        ensure(seq + 64 >= last, || {
            format!("page {page} holds seq {seq}, stale by more than a pass (last {last})")
        })?;
    }
    Ok(())
}

fn backing_trial(backing: Backing) -> Check {
    let program = Program::new(
        1024,
        vec![Thread::new(vec![Op::Loop {
            pages: PageSeq::Strided {
                start: 1,
                count: 2,
                stride: 511,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(1),
        }])],
    );
    let mut m = Machine::new(MachineConfig {
        data_pages: 1024,
        backing,
        ..MachineConfig::default()
    })?;
    m.load(&program)?;
    m.run_to_completion()?;
    check_memory(&m, &program)
}

fn kvm_trials(host: &HostProfile) -> Vec<Trial> {
    let mut trials = Vec::new();
    let mut add = |name: String, skip: Option<String>, f: Box<dyn FnOnce() -> Check + Send>| {
        let ignored = skip.is_some();
        if let Some(reason) = skip {
            skips_push(&name, &reason);
        }
        trials.push(Trial::test(name, f).with_ignored_flag(ignored));
    };
    for mode in ExecutionMode::ALL {
        let skip = mode_support(host, mode).reason().map(str::to_string);
        add(
            format!("machine::two_vcpus_10000_pages::{mode}"),
            skip.clone(),
            Box::new(move || run_big(mode)),
        );
        add(
            format!("machine::reuse::{mode}"),
            skip.clone(),
            Box::new(move || reuse(mode)),
        );
        add(
            format!("machine::until_stopped::{mode}"),
            skip.clone(),
            Box::new(move || until_stopped(mode)),
        );
        add(
            format!("machine::data_slots::{mode}"),
            skip.clone(),
            Box::new(move || data_slots(mode)),
        );
        add(
            format!("machine::guest_page_tables::{mode}"),
            skip.clone(),
            Box::new(move || guest_page_tables(mode)),
        );
        for what in [
            Misbehaviour::Hang,
            Misbehaviour::TripleFault,
            Misbehaviour::ExitStorm,
        ] {
            let name = format!("watchdog::{}::{mode}", format!("{what:?}").to_lowercase());
            add(
                name,
                skip.clone(),
                Box::new(move || misbehave(mode, what, false)),
            );
        }
        add(
            format!("watchdog::hang_beside_host::{mode}"),
            skip.clone(),
            Box::new(move || misbehave(mode, Misbehaviour::Hang, true)),
        );
    }
    let native = mode_support(host, ExecutionMode::Native)
        .reason()
        .map(str::to_string);
    for backing in Backing::ALL {
        let skip = native
            .clone()
            .or_else(|| backing_support(host, backing).reason().map(str::to_string));
        let serial = backing.hugetlb_kib().is_some();
        add(
            format!("backing::{backing}"),
            skip,
            Box::new(move || {
                let _serial = serial.then(|| {
                    HUGETLB
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
                backing_trial(backing)
            }),
        );
    }
    for backing in [Backing::Anon, Backing::Thp] {
        let skip = native
            .clone()
            .or_else(|| backing_support(host, backing).reason().map(str::to_string));
        add(
            format!("machine::guest_2m_pages::{backing}"),
            skip,
            Box::new(move || guest_2m_pages(backing)),
        );
    }
    let ring_skip = native.clone().or_else(|| {
        Mechanism::DirtyRing
            .support(host)
            .reason()
            .map(str::to_string)
    });
    add(
        "machine::ring_full_counted_while_running::native".into(),
        ring_skip,
        Box::new(|| ring_full::counted_while_running(ExecutionMode::Native)),
    );
    let kvm_skip = host.kvm().err().map(|e| format!("KVM unavailable: {e}"));
    add(
        "vm::memslot_operations".into(),
        kvm_skip.clone(),
        Box::new(memslot_operations),
    );
    let fep_skip = native.clone().or_else(|| {
        (!cfg!(target_arch = "x86_64"))
            .then(|| "KVM's forced-emulation prefix exists on x86 only".to_string())
    });
    add(
        "machine::forced_emulation_prefix".into(),
        fep_skip,
        Box::new(fep::prefixed_stores),
    );
    add(
        "machine::no_fd_leak".into(),
        native.clone(),
        Box::new(no_fd_leak),
    );
    add(
        "machine::no_leak_over_many_cases".into(),
        native.clone(),
        Box::new(leak::no_leak_over_many_cases),
    );
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let hugetlb_skip = if !is_root {
        Some(
            "needs root to change /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
                .to_string(),
        )
    } else {
        backing_support(host, Backing::Hugetlb2M)
            .reason()
            .map(str::to_string)
    };
    add(
        "hugetlb::killed_process_returns_pages".into(),
        hugetlb_skip.clone(),
        Box::new(killed_process_returns_hugepages),
    );
    add(
        "memory::populate_over_the_cgroup_limit_is_refused".into(),
        budget::cgroup_skip(),
        Box::new(budget::populate_over_the_cgroup_limit_is_refused),
    );
    add(
        "hugetlb::free_pages_are_used_first".into(),
        hugetlb_skip,
        Box::new(free_pages_are_used_first),
    );
    trials
}

fn skips_push(name: &str, reason: &str) {
    if !std::env::args().any(|a| a == "--list") {
        eprintln!("skip {name}: {reason}");
    }
}

fn main() {
    if let Ok(role) = std::env::var(CHILD) {
        if let Err(e) = process::child_main(&role) {
            eprintln!("child {role}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let args = Arguments::from_args();
    let host = HostProfile::probe();
    let trials = kvm_trials(&host);
    libtest_mimic::run(&args, trials).exit();
}
