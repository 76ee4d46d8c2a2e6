//! The guest programs and geometries the models run: small ones explored exhaustively, and a
//! sweep over memory size for the cost claims.

use trackcheck_guests::{Access, Op, PageSeq, Program, Repeat, Thread};

use super::Design;
use super::mmu::Geometry;
use super::world::{Actor, Costs, HostOp, Setup, World, host_program};

/// A named scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name in trial paths.
    pub name: &'static str,
    /// What it runs.
    pub setup: Setup,
}

fn w(page: u64) -> Op {
    Op::Write { page, offset: 0 }
}

/// Small geometry: `pages` pages in blocks and DBM sections of 2, a one-entry PML buffer.
#[must_use]
pub const fn small(pages: usize, vcpus: usize) -> Geometry {
    Geometry {
        pages,
        block: 2,
        vcpus,
        pml_slots: 1,
        section: 2,
    }
}

/// The exhaustively explored scenarios (the bound of each is its program and round count).
#[must_use]
pub fn exhaustive() -> Vec<Scenario> {
    // vCPU 0 writes the page vCPU 1 also writes, then revisits its first page; vCPU 1 writes
    // across a block boundary: same-page races, a write-after-report and TLB reuse.
    let two = Program::new(
        4,
        vec![
            Thread::new(vec![w(0), w(1), w(0)]),
            Thread::new(vec![w(2), w(1)]),
        ],
    );
    let one_hot = Program::new(
        4,
        vec![Thread::new(vec![
            w(1),
            Op::Read { page: 3, offset: 0 },
            w(1),
            w(2),
            w(1),
        ])],
    );
    let long = Program::new(
        4,
        vec![
            Thread::new(vec![w(0), w(1), w(0), w(3)]),
            Thread::new(vec![w(2), w(1), w(2)]),
        ],
    );
    vec![
        Scenario {
            name: "2v4p",
            setup: Setup::new(&two, small(4, 2), false, 1),
        },
        Scenario {
            name: "2v4p-huge",
            setup: Setup::new(&two, small(4, 2), true, 1),
        },
        Scenario {
            name: "2v4p-huge-long-2rounds",
            setup: Setup::new(&long, small(4, 2), true, 2),
        },
        Scenario {
            name: "1v4p-hot-2rounds",
            setup: Setup::new(&one_hot, small(4, 1), false, 2),
        },
    ]
}

/// One cost measurement: `pages` of memory, one vCPU writing 4 pages 3 times over (one pass
/// per round), `dense`: pages 0..4 (one DBM section), else spread evenly over memory.
#[must_use]
pub fn cost_setup(pages: usize, dense: bool) -> Setup {
    let stride = if dense { 1 } else { (pages as u64 / 4).max(1) };
    let program = Program::new(
        pages as u64,
        vec![Thread::new(vec![Op::Loop {
            pages: PageSeq::Strided {
                start: 0,
                count: 4,
                stride,
            },
            access: Access::Write,
            offset: 0,
            repeat: Repeat::Times(3),
        }])],
    );
    let geo = Geometry {
        pages,
        block: 4,
        vcpus: 1,
        pml_slots: 2,
        section: 4,
    };
    Setup::new(&program, geo, false, 2)
}

/// Run `setup` in the stepped way the cost figures use: the host enables logging and copies;
/// then each vCPU makes its share of accesses (an equal share per round), then the host runs a
/// round, and so on; the final round after the vCPUs finish. `Err` if a write was lost.
pub fn stepped(design: &dyn Design, setup: &Setup) -> Result<World, String> {
    let program = host_program(design, setup.rounds);
    let mut w = World::new(setup);
    let phases = setup.rounds + 1;
    let share: Vec<usize> = setup
        .accesses
        .iter()
        .map(|a| a.len().div_ceil(phases))
        .collect();
    let mut phase = 0;
    let mut logging = false;
    loop {
        // Access misses are counted (`World::access`), not a reason to stop.
        if !w.ledger.report().lost.is_empty() {
            let l = w.ledger.report().lost.first().map(ToString::to_string);
            return Err(format!("lost: {}", l.unwrap_or_default()));
        }
        let actors = w.enabled(setup, &program);
        if actors.is_empty() {
            return w.finished(setup, &program).map(|_| w);
        }
        let at_get = matches!(
            program.get(w.host.0),
            Some(HostOp::GetBegin | HostOp::ScanBegin)
        );
        let vcpu = actors.iter().copied().find(|a| match *a {
            Actor::Vcpu(v) => logging && w.vcpus[v].0 < share[v] * (phase + 1),
            Actor::Host => false,
        });
        let actor = match vcpu {
            Some(v) if at_get || !actors.contains(&Actor::Host) => v,
            _ if actors.contains(&Actor::Host) => {
                logging |= program.get(w.host.0) == Some(&HostOp::CopyAll);
                if at_get && logging && w.host.1 == 0 {
                    phase += 1;
                }
                Actor::Host
            }
            _ => actors[0],
        };
        w.step(design, setup, &program, actor);
    }
}

/// Costs of `design` on [`cost_setup`]`(pages, dense)`, run [`stepped`]; `Err` if it lost.
pub fn costs(design: &dyn Design, pages: usize, dense: bool) -> Result<Costs, String> {
    stepped(design, &cost_setup(pages, dense)).map(|w| w.costs)
}
