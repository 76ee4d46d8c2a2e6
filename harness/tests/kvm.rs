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
use trackcheck_harness::memory::{HugetlbReservation, hugetlb_pool_file, state_dir, thp_bytes_in};
use trackcheck_harness::support::{backing_support, mode_support};
use trackcheck_harness::vcpu::FailureKind;
use trackcheck_harness::vm::VmError;
use trackcheck_harness::{
    Backing, ExecutionMode, GuestMemory, HostProfile, Machine, MachineConfig, MachineError,
    Mechanism, Stop, Vm,
};

#[path = "kvm/ring_full.rs"]
mod ring_full;

/// Trials that change a hugetlb pool run one at a time in this process (and, under nextest, in
/// the `hugetlb` test group with one thread): they compare pool sizes before and after.
static HUGETLB: Mutex<()> = Mutex::new(());

/// Environment variable that makes this binary act as a child process for a trial.
const CHILD: &str = "TRACKCHECK_TEST_CHILD";

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

fn misbehave(mode: ExecutionMode, what: Misbehaviour) -> Check {
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
    let result = m.run();
    let elapsed = start.elapsed();
    ensure(elapsed < Duration::from_secs(10), || {
        format!("run took {elapsed:?}")
    })?;
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

fn memslot_operations() -> Check {
    let mut vm = Vm::new()?;
    let pages = 64u64;
    let mem = GuestMemory::new(Backing::Anon, pages * PAGE_SIZE)?;
    mem.populate()?;
    let size = usize::try_from(pages * PAGE_SIZE)?;
    vm.add_slot(5, 0x1000_0000, mem, None, 0)?;
    ensure(vm.fd().get_dirty_log(5, size).is_err(), || {
        "KVM_GET_DIRTY_LOG succeeded on a slot without logging".into()
    })?;
    vm.set_dirty_logging(5, true)?;
    ensure(vm.slot(5)?.logging(), || "logging flag not recorded".into())?;
    let bitmap = vm.fd().get_dirty_log(5, size)?;
    ensure(bitmap.len() == 1 && bitmap[0] == 0, || {
        format!("fresh slot reports dirty pages: {bitmap:x?}")
    })?;
    vm.move_slot(5, 0x2000_0000)?;
    ensure(
        vm.slot_at(0x2000_0000).is_some_and(|s| s.id == 5) && vm.slot_at(0x1000_0000).is_none(),
        || "move not recorded".into(),
    )?;
    vm.set_dirty_logging(5, false)?;
    ensure(!vm.slot(5)?.logging(), || {
        "logging still recorded as on".into()
    })?;
    let slot = vm.delete_slot(5)?;
    ensure(vm.slot(5).is_err(), || "deleted slot still listed".into())?;
    vm.add_slot_shared(5, 0x1000_0000, slot.memory, slot.offset, slot.size, 0)?;
    let dup = GuestMemory::new(Backing::Anon, PAGE_SIZE)?;
    ensure(
        matches!(
            vm.add_slot(5, 0x3000_0000, dup, None, 0),
            Err(VmError::Slot { slot: 5, .. })
        ),
        || "duplicate slot id accepted".into(),
    )?;
    let overlap = GuestMemory::new(Backing::Anon, PAGE_SIZE)?;
    let err = vm
        .add_slot(6, 0x1000_0000, overlap, None, 0)
        .err()
        .ok_or("overlapping slot accepted")?;
    let text = err.to_string();
    ensure(
        text.contains("KVM_SET_USER_MEMORY_REGION slot 6") && text.contains("gpa 0x10000000"),
        || format!("error does not name the ioctl and slot: {text}"),
    )?;
    let stats = vm.stats();
    ensure(stats.get("pages_4k").is_some(), || {
        format!(
            "VM stats lack pages_4k: {:?}",
            stats.0.keys().collect::<Vec<_>>()
        )
    })
}

/// Guest 2 MiB mappings of the data region, writing pages that are not the first 4 KiB of
/// their 2 MiB. With THP backing KVM can map 2 MiB itself; the VM's pages_2m statistic shows
/// whether it did.
fn guest_2m_pages(backing: Backing) -> Check {
    let regions = 8u64;
    let data_pages = regions * 512;
    let mut ops = Vec::new();
    for r in 0..regions {
        ops.push(Op::Write {
            page: r * 512 + 7,
            offset: 0,
        });
    }
    ops.push(Op::Sync(1));
    for r in 0..regions {
        ops.push(Op::Write {
            page: r * 512 + 300 + r,
            offset: 8,
        });
    }
    let program = Program::new(data_pages, vec![Thread::new(ops)]);
    let config = MachineConfig {
        data_pages,
        backing,
        guest_page_size: GuestPageSize::Size2M,
        ..MachineConfig::default()
    };
    let mut m = Machine::new(config)?;
    m.load(&program)?;
    m.run_to_completion()?;
    check_memory(&m, &program)?;
    let stats = m.vm_stats();
    let thp = thp_bytes_in(m.data().host_addr(), m.data().mapped_len());
    eprintln!(
        "{backing} + guest 2M: host THP {} MiB, KVM pages_2m {:?} pages_4k {:?}",
        thp >> 20,
        stats.get("pages_2m"),
        stats.get("pages_4k")
    );
    if backing == Backing::Thp && thp >= 2 << 20 {
        ensure(stats.get("pages_2m").is_some_and(|n| n > 0), || {
            format!(
                "THP-backed memory mapped 2 MiB by the guest, but KVM installed no 2 MiB mapping: {stats:?}"
            )
        })?;
    }
    Ok(())
}

/// A data region split into slots of unaligned sizes: the guest writes every page; one slot is
/// deleted (touching it then would be MMIO) and restored, another moved (the guest's mappings
/// follow it); the memory stays one contiguous host view throughout.
fn data_slots(mode: ExecutionMode) -> Check {
    use trackcheck_harness::machine::DATA_SLOT;
    let sizes = vec![1u64, 63, 65, 127];
    let pages: u64 = sizes.iter().sum();
    let mut m = Machine::new(MachineConfig {
        vcpus: 1,
        data_pages: pages,
        mode,
        data_slot_pages: sizes.clone(),
        ..MachineConfig::default()
    })?;
    let layout = m.data_layout();
    ensure(
        layout.extents.iter().map(|e| e.pages).collect::<Vec<_>>() == sizes
            && layout.locate(64) == Some((DATA_SLOT + 2, 0)),
        || format!("layout {layout:?}"),
    )?;
    ensure(m.data_slots() == vec![2, 3, 4, 5], || {
        format!("slots {:?}", m.data_slots())
    })?;
    let all = Program::new(
        pages,
        vec![Thread::new(vec![Op::Loop {
            pages: PageSeq::Range {
                start: 0,
                count: pages,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(1),
        }])],
    );
    m.load(&all)?;
    m.run_to_completion()?;
    check_memory(&m, &all)?;
    m.delete_data_slot(DATA_SLOT + 1)?;
    ensure(m.data_slots() == vec![2, 4, 5], || {
        format!("after delete: {:?}", m.data_slots())
    })?;
    m.restore_data_slot(DATA_SLOT + 1)?;
    let to = 0x20_0000_0000;
    m.move_data_slot(DATA_SLOT + 3, to)?;
    ensure(
        m.data_layout().gpa(pages - 1) == to + 126 * PAGE_SIZE,
        || format!("moved layout {:?}", m.data_layout()),
    )?;
    let again = all.clone().with_seq_base(1000);
    m.load(&again)?;
    m.run_to_completion()?;
    check_memory(&m, &again)
}

/// The data region's page tables in the data region: the guest clears A/D bits and remaps a
/// page; after the host's flush its accesses use the new entries and set their bits; `reset`
/// rebuilds the tables.
fn guest_page_tables(mode: ExecutionMode) -> Check {
    use trackcheck_harness::arch::pte;
    let mut m = Machine::new(MachineConfig {
        vcpus: 1,
        data_pages: 1024,
        mode,
        tables_in_data: true,
        ..MachineConfig::default()
    })?;
    ensure(m.program_pages() == 1022, || {
        format!("{} program pages", m.program_pages())
    })?;
    let fresh = m.leaf_entry(3).ok_or("no leaf entries")?;
    ensure(fresh & (pte::A | pte::D) == 0, || {
        format!("entries start with A/D set: {fresh:#x}")
    })?;
    let program = Program::new(
        m.program_pages(),
        vec![Thread::new(vec![
            Op::Write { page: 3, offset: 0 },
            Op::Write { page: 5, offset: 0 },
            Op::Sync(1),
            Op::ClearAd { page: 3 },
            Op::Remap { page: 5, to: 900 },
            Op::Sync(2),
            Op::Read { page: 3, offset: 0 },
            Op::Write { page: 5, offset: 8 },
        ])],
    );
    m.load(&program)?;
    m.run()?;
    let written = m.leaf_entry(3).unwrap_or(0);
    ensure(written & (pte::A | pte::D) == pte::A | pte::D, || {
        format!("a written page's entry lacks A/D: {written:#x}")
    })?;
    m.run()?;
    m.reset_guest_mmu()?;
    m.run_to_completion()?;
    let read = m.leaf_entry(3).unwrap_or(0);
    ensure(read & (pte::A | pte::D) == pte::A, || {
        format!("a read page's entry after the clear: {read:#x}")
    })?;
    ensure(
        m.data().read_u64(900 * PAGE_SIZE + 8) != 0 && m.data().read_u64(5 * PAGE_SIZE + 8) == 0,
        || "the write after the remap did not land in page 900".into(),
    )?;
    m.reset()?;
    ensure(m.leaf_entry(5) == Some(fresh + 2 * PAGE_SIZE), || {
        format!("reset left entry {:#x?}", m.leaf_entry(5))
    })
}

fn read_pool(kib: u64) -> Result<u64, Failed> {
    let path = hugetlb_pool_file(kib, "nr_hugepages");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim().parse()?)
}

/// A process killed while it holds hugepages leaks them until the next reservation, which
/// finds its ledger, sees the pid is gone and returns its pages.
fn killed_process_returns_hugepages() -> Check {
    let _serial = HUGETLB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = read_pool(2048)?;
    let mut child = Command::new(std::env::current_exe()?)
        .env(CHILD, "hold-hugepage")
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
fn no_fd_leak() -> Check {
    let out = Command::new(std::env::current_exe()?)
        .env(CHILD, "fd-leak")
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure(out.status.success(), || {
        format!("fd leak check failed: {text}")
    })
}

fn child_main(role: &str) -> Result<(), Box<dyn std::error::Error>> {
    match role {
        "hold-hugepage" => {
            let _held = HugetlbReservation::acquire(2048, 1)?;
            println!("held {}", std::process::id());
            std::thread::sleep(Duration::from_secs(120));
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
        other => Err(format!("unknown child role {other}").into()),
    }
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
            add(name, skip.clone(), Box::new(move || misbehave(mode, what)));
        }
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
    add(
        "machine::no_fd_leak".into(),
        native.clone(),
        Box::new(no_fd_leak),
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
        hugetlb_skip,
        Box::new(killed_process_returns_hugepages),
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
        if let Err(e) = child_main(&role) {
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
