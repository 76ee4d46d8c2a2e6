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

/// A program using every form the compiler emits.
fn everything() -> Program {
    Program::new(
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
                Op::Write {
                    page: (1 << 19) + 1,
                    offset: 8,
                },
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
            ]),
            Thread::new(vec![Op::Misbehave(Misbehaviour::TripleFault)]),
            Thread::new(vec![Op::Misbehave(Misbehaviour::ExitStorm)]),
            Thread::new(vec![Op::Misbehave(Misbehaviour::Hang)]),
        ],
    )
    .with_seq_base(0x1_0000_0000)
}

#[test]
fn listings() {
    snapshot("aarch64_everything", &listing_of(&everything()));
}

/// Our decoder's text for every word of every thread must be what binutils' objdump says
/// (whitespace and objdump's comments aside): the encodings are the ones we think they are.
#[test]
fn encodings_match_objdump() {
    let objdump = "aarch64-linux-gnu-objdump";
    if std::process::Command::new(objdump)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "skipped: {objdump} is absent (Debian: apt-get install binutils-aarch64-linux-gnu)"
        );
        return;
    }
    let program = everything();
    let dir = std::env::temp_dir().join(format!("trackcheck-a64-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for vcpu in 0..program.vcpu_count() {
        let base = SYSTEM_GPA + vcpu as u64 * 0x1000;
        let c = compile(&program, vcpu, base).expect("compiles");
        let path = dir.join(format!("v{vcpu}.bin"));
        std::fs::write(&path, &c.bytes[..c.code_len]).expect("write");
        let out = std::process::Command::new(objdump)
            .args(["-D", "-b", "binary", "-m", "aarch64"])
            .arg(format!("--adjust-vma={base:#x}"))
            .arg(&path)
            .output()
            .expect("objdump runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let theirs: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once(":\t")?;
                let (_, insn) = rest.split_once(" \t")?;
                let insn = insn.split("//").next().unwrap_or("");
                Some(insn.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .collect();
        let ours: Vec<String> = c
            .disassemble()
            .iter()
            .map(|l| l.text.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(ours.len(), theirs.len(), "vCPU {vcpu}: {text}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a, b, "vCPU {vcpu} instruction {i}");
        }
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn op_addresses_and_tables() {
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
    assert_eq!(c.isa, Isa::Aarch64);
    assert_eq!(c.op_addrs.len(), 4, "three ops and the appended done");
    assert!(c.op_addrs.windows(2).all(|w| w[0] < w[1]));
    for (i, addr) in c.op_addrs.iter().enumerate() {
        assert_eq!(c.op_at(*addr), Some(i));
    }
    let table: Vec<u32> = c.bytes[c.code_len..]
        .chunks(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(table, vec![3, 3, 9]);
    // The adrp/add pair points at the table.
    let lines = c.disassemble();
    let adrp = lines
        .iter()
        .position(|l| l.text.starts_with("adrp x6"))
        .expect("adrp");
    let page =
        u64::from_str_radix(lines[adrp].text.trim_start_matches("adrp x6, 0x"), 16).expect("page");
    let low = u64::from_str_radix(
        lines[adrp + 1].text.trim_start_matches("add x6, x6, #0x"),
        16,
    )
    .expect("low");
    assert_eq!(page + low, c.base + c.code_len as u64);
    let at = c.instruction_at(c.op_addrs[3]).expect("decodes");
    assert!(at.text.starts_with("str x15, [x13, #8]"), "{}", at.text);
    assert_eq!(
        decode_one(&0xdead_beefu32.to_le_bytes(), 0).map(|l| l.text),
        Some(".inst 0xdeadbeef".into())
    );
}

#[test]
fn every_write_stores_its_stamp_then_releases_progress() {
    let ops: Vec<Op> = (0..37)
        .map(|p| Op::Write {
            page: p as u64,
            offset: 0,
        })
        .collect();
    let c = compile(&Program::new(64, vec![Thread::new(ops)]), 0, 0x40_0000).expect("compiles");
    let lines = c.disassemble();
    let stores: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.text == "str x0, [x2]")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(stores.len(), 37);
    for i in stores {
        assert_eq!(
            lines[i + 1].text,
            "stlr x15, [x14]",
            "release right after the stamp"
        );
    }
}
