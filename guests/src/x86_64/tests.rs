use super::*;
use crate::layout::SYSTEM_GPA;
use crate::program::Thread;

fn snapshot(name: &str, listing: &str) {
    insta::with_settings!({
        snapshot_path => "../../../golden/guests",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!(name, listing);
    });
}

fn listing_of(program: &Program) -> String {
    let mut out = String::new();
    for vcpu in 0..program.vcpu_count() {
        let compiled = compile(program, vcpu, SYSTEM_GPA + vcpu as u64 * 0x1000).expect("compiles");
        out.push_str(&format!("=== vCPU {vcpu}\n{}", compiled.listing()));
    }
    out
}

#[test]
fn straight_line_program() {
    let program = Program::new(
        1 << 20,
        vec![
            Thread::new(vec![
                Op::Write { page: 0, offset: 0 },
                Op::Write {
                    page: 7,
                    offset: 0x18,
                },
                Op::Read {
                    page: 7,
                    offset: 0x18,
                },
                Op::Sync(1),
                // beyond a 2 GiB displacement: takes the absolute-address form
                Op::Write {
                    page: (1 << 19) + 1,
                    offset: 8,
                },
            ]),
            Thread::new(vec![
                Op::Write { page: 3, offset: 0 },
                Op::Sync(1),
                Op::Done,
            ]),
        ],
    );
    snapshot("x86_64_straight_line", &listing_of(&program));
}

#[test]
fn loop_program() {
    let program = Program::new(
        64,
        vec![Thread::new(vec![
            Op::Loop {
                pages: PageSeq::Range {
                    start: 2,
                    count: 10,
                },
                access: Access::Write,
                offset: 0,
                repeat: Repeat::Times(3),
            },
            Op::Loop {
                pages: PageSeq::Strided {
                    start: 1,
                    count: 5,
                    stride: 4,
                },
                access: Access::Read,
                offset: 16,
                repeat: Repeat::Times(1),
            },
            Op::Loop {
                pages: PageSeq::Shuffled {
                    start: 40,
                    count: 6,
                    seed: 9,
                },
                access: Access::Write,
                offset: 8,
                repeat: Repeat::UntilStopped,
            },
            Op::Sync(5),
        ])],
    );
    snapshot("x86_64_loops", &listing_of(&program));
}

#[test]
fn misbehaving_programs() {
    let program = Program::new(
        1,
        vec![
            Thread::new(vec![Op::Misbehave(Misbehaviour::Hang)]),
            Thread::new(vec![Op::Misbehave(Misbehaviour::TripleFault)]),
            Thread::new(vec![Op::Misbehave(Misbehaviour::ExitStorm)]),
        ],
    );
    snapshot("x86_64_misbehaviour", &listing_of(&program));
}

#[test]
fn op_addresses_are_ordered_and_map_back() {
    let program = Program::new(
        16,
        vec![Thread::new(vec![
            Op::Write { page: 1, offset: 0 },
            Op::Loop {
                pages: PageSeq::List(vec![3, 3, 9]),
                access: Access::Write,
                offset: 0,
                repeat: Repeat::Times(2),
            },
            Op::Sync(1),
        ])],
    );
    let c = compile(&program, 0, 0x40_0000).expect("compiles");
    assert_eq!(c.op_addrs.len(), 4, "three ops and the appended done");
    assert_eq!(c.op_names[3], "done");
    assert!(c.op_addrs.windows(2).all(|w| w[0] < w[1]));
    for (i, addr) in c.op_addrs.iter().enumerate() {
        assert_eq!(c.op_at(*addr), Some(i));
    }
    assert_eq!(c.op_at(c.base - 1), None);
    assert_eq!(
        c.op_at(c.base + c.code_len as u64),
        None,
        "tables are not code"
    );
    // The table holds the list, little-endian u32s, right after the code.
    let table: Vec<u32> = c.bytes[c.code_len..]
        .chunks(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(table, vec![3, 3, 9]);
    assert!(c.describe_rip(c.op_addrs[2]).starts_with("op 2 (sync 1)"));
}

#[test]
fn every_write_op_stores_exactly_once_and_publishes() {
    // Count stores in straight-line code: each Write is one store to data (via r12 or rdx)
    // plus one progress store to [r14].
    let writes: usize = 37;
    let ops: Vec<Op> = (0..writes)
        .map(|p| Op::Write {
            page: p as u64,
            offset: 0,
        })
        .collect();
    let program = Program::new(64, vec![Thread::new(ops)]);
    let c = compile(&program, 0, 0x40_0000).expect("compiles");
    let lines = disassemble(&c.bytes[..c.code_len], c.base);
    let data_stores = lines
        .iter()
        .filter(|l| l.text.starts_with("mov     [r12"))
        .count();
    let progress_stores = lines
        .iter()
        .filter(|l| l.text.starts_with("mov     [r14],r15"))
        .count();
    assert_eq!(data_stores, writes);
    assert_eq!(progress_stores, writes);
}

#[test]
fn invalid_programs_do_not_compile() {
    let program = Program::new(4, vec![Thread::new(vec![Op::Write { page: 4, offset: 0 }])]);
    assert!(matches!(
        compile(&program, 0, 0),
        Err(CompileError::Program(_))
    ));
    assert!(matches!(
        compile(&program, 1, 0),
        Err(CompileError::Program(_))
    ));
    let ok = Program::new(4, vec![Thread::default()]);
    assert!(matches!(compile(&ok, 1, 0), Err(CompileError::NoThread(1))));
}

#[test]
fn decode_one_reports_invalid_bytes() {
    assert!(decode_one(&[0x0f, 0x0b], 0x1000).is_some_and(|l| l.text == "ud2"));
    assert!(
        decode_one(&[0x06], 0x1000).is_none(),
        "push es is invalid in 64-bit mode"
    );
}

#[test]
fn seq_base_starts_the_counter() {
    let program = Program::new(4, vec![Thread::new(vec![Op::Write { page: 1, offset: 0 }])])
        .with_seq_base(1000);
    let c = compile(&program, 0, 0x40_0000).expect("compiles");
    let first = disassemble(&c.bytes[..c.code_len], c.base)
        .into_iter()
        .next()
        .expect("an instruction");
    assert_eq!(first.text, "mov     r15,0x3E8");
    let events: Vec<_> = crate::sim::ThreadEvents::with_seq_base(&program.vcpus[0], 1000).collect();
    assert_eq!(
        events[0],
        crate::Event::Write {
            page: 1,
            offset: 0,
            seq: 1001
        }
    );
}

#[test]
fn page_table_ops_need_the_tables_in_reach() {
    let program = Program::new(
        64,
        vec![Thread::new(vec![
            Op::ClearAd { page: 5 },
            Op::Remap { page: 3, to: 9 },
            Op::Sync(1),
        ])],
    );
    let refused = compile(&program, 0, SYSTEM_GPA).expect_err("no tables");
    assert!(
        refused.to_string().contains("out of its reach"),
        "{refused}"
    );
    let leaf = crate::layout::LeafEntries {
        gva: crate::layout::DATA_GPA + 62 * 4096,
        page: crate::GuestPageSize::Size4K,
    };
    let compiled = compile_with(&program, 0, SYSTEM_GPA, Some(leaf)).expect("compiles");
    let listing = compiled.listing();
    // The entries of pages 5 and 3, at 8 bytes each from the leaf base.
    assert!(
        listing.contains(&format!("0x{:X}", leaf.gva + 5 * 8)),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("0x{:X}", leaf.gva + 3 * 8)),
        "{listing}"
    );
    let huge = crate::layout::LeafEntries {
        page: crate::GuestPageSize::Size2M,
        ..leaf
    };
    let remap_2m = compile_with(&program, 0, SYSTEM_GPA, Some(huge)).expect_err("remap on 2M");
    assert!(remap_2m.to_string().contains("4 KiB"), "{remap_2m}");
}
