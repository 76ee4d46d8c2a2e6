//! Forced-emulation code: KVM's prefix before every store to tracked memory and nowhere else,
//! and the code around it unchanged (branches, op addresses and tables land where they did).

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use super::*;
use crate::layout::SYSTEM_GPA;
use crate::program::Thread;

/// One thread with every op that compiles to a store, in each addressing form, plus the ops
/// around them (reads, syncs, loops of each page sequence, page-table ops, done).
fn every_store_program() -> Program {
    Program::new(
        1 << 20,
        vec![Thread::new(vec![
            Op::Write { page: 0, offset: 0 },
            Op::Read { page: 0, offset: 0 },
            // beyond a 2 GiB displacement: the absolute-address form through rdx
            Op::Write {
                page: (1 << 19) + 1,
                offset: 8,
            },
            Op::Loop {
                pages: PageSeq::Range { start: 2, count: 3 },
                access: Access::Write,
                offset: 0,
                repeat: Repeat::Times(2),
            },
            Op::Loop {
                pages: PageSeq::Strided {
                    start: 1,
                    count: 3,
                    stride: 5,
                },
                access: Access::Read,
                offset: 16,
                repeat: Repeat::Times(1),
            },
            Op::Loop {
                pages: PageSeq::List(vec![9, 4, 9]),
                access: Access::Write,
                offset: 24,
                repeat: Repeat::UntilStopped,
            },
            Op::Sync(1),
            Op::ClearAd { page: 5 },
            Op::Remap { page: 3, to: 7 },
            Op::Sync(2),
            Op::Write { page: 3, offset: 0 },
        ])],
    )
}

/// Stores the program above makes to tracked memory, counted in the code (one per write op,
/// one per write loop, one per page-table op).
const TRACKED_STORE_SITES: usize = 3 + 2 + 2;

fn leaf() -> LeafEntries {
    LeafEntries {
        gva: DATA_GPA + 0x40_0000,
        page: GuestPageSize::Size4K,
    }
}

fn compiled(stores: StoreForm) -> Compiled {
    compile_for(&every_store_program(), 0, SYSTEM_GPA, Some(leaf()), stores).expect("compiles")
}

fn decode(line: &Line) -> Instruction {
    Decoder::with_ip(64, &line.bytes, line.addr, DecoderOptions::NONE).decode()
}

/// A store: an instruction whose first operand is memory (every `cmp` here only reads).
fn is_store(i: &Instruction) -> bool {
    i.op0_kind() == OpKind::Memory && i.mnemonic() != Mnemonic::Cmp
}

/// Stores to the control page (r14) and the doorbell (r13) are untracked; every other store
/// of this code goes to the data region or its page tables.
fn is_tracked(i: &Instruction) -> bool {
    !matches!(i.memory_base(), Register::R14 | Register::R13)
}

fn is_fep(line: &Line) -> bool {
    line.bytes == FEP && line.text == FEP_TEXT
}

/// Check that every tracked store of `c` has exactly one prefix right before it (in the raw
/// bytes and in the disassembly), that no other instruction has one, and that no bare `ud2`
/// is left; returns how many tracked stores there are.
fn check_prefixes(c: &Compiled) -> Result<usize, String> {
    let lines = c.disassemble();
    let mut tracked = 0;
    let mut untracked = 0;
    for (n, line) in lines.iter().enumerate() {
        if is_fep(line) {
            let next = lines.get(n + 1).map(decode);
            if !next.is_some_and(|i| is_store(&i) && is_tracked(&i)) {
                return Err(format!(
                    "prefix at {:#x} is not followed by a tracked store",
                    line.addr
                ));
            }
            continue;
        }
        let i = decode(line);
        if i.mnemonic() == Mnemonic::Ud2 {
            return Err(format!("a bare ud2 at {:#x}", line.addr));
        }
        if !is_store(&i) {
            continue;
        }
        let before = |k: usize| n.checked_sub(k).and_then(|m| lines.get(m));
        // The raw bytes, not only the decoded lines: exactly 0f 0b 6b 76 6d right before.
        let off = usize::try_from(line.addr - c.base).map_err(|e| e.to_string())?;
        let prefixed = off >= FEP.len() && c.bytes[off - FEP.len()..off] == FEP;
        let what = format!("store `{}` at {:#x}", line.text, line.addr);
        if is_tracked(&i) {
            tracked += 1;
            if !prefixed || !before(1).is_some_and(is_fep) {
                return Err(format!("tracked {what} has no prefix"));
            }
            if before(2).is_some_and(is_fep) {
                return Err(format!("tracked {what} has two prefixes"));
            }
        } else {
            untracked += 1;
            if prefixed {
                return Err(format!("untracked {what} is prefixed"));
            }
        }
    }
    if untracked == 0 {
        return Err("no progress or doorbell store seen".into());
    }
    Ok(tracked)
}

#[test]
fn every_tracked_store_has_exactly_one_prefix_and_nothing_else_has_one() {
    let c = compiled(StoreForm::ForcedEmulation);
    assert_eq!(
        check_prefixes(&c),
        Ok(TRACKED_STORE_SITES),
        "{}",
        c.listing()
    );
    let prefixes = c.disassemble().iter().filter(|l| is_fep(l)).count();
    assert_eq!(prefixes, TRACKED_STORE_SITES);
}

#[test]
fn the_prefix_check_catches_a_dropped_prefix() {
    let c = compiled(StoreForm::ForcedEmulation);
    // Overwrite the third prefix (the first loop's store) with nops: that store now runs on
    // the CPU, and the check must name it.
    let mut dropped = c.clone();
    let at = c
        .disassemble()
        .iter()
        .filter(|l| is_fep(l))
        .nth(2)
        .map(|l| usize::try_from(l.addr - c.base).expect("in code"))
        .expect("a third prefix");
    dropped.bytes[at..at + FEP.len()].fill(0x90);
    let err = check_prefixes(&dropped).expect_err("a store without its prefix");
    assert!(
        err.contains(&format!("{:#x} has no prefix", c.base + at as u64 + 5)),
        "{err}"
    );
    let plain = compiled(StoreForm::Plain);
    let err = check_prefixes(&plain).expect_err("plain code has no prefix");
    assert!(err.contains("has no prefix"), "{err}");
}

#[test]
fn plain_code_has_no_prefix() {
    let c = compiled(StoreForm::Plain);
    let plain = compile_with(&every_store_program(), 0, SYSTEM_GPA, Some(leaf())).expect("ok");
    assert_eq!(c, plain, "Plain is what compile_with emits");
    let lines = c.disassemble();
    assert!(
        lines
            .iter()
            .all(|l| !is_fep(l) && !l.text.starts_with("ud2"))
    );
    let stores = lines
        .iter()
        .map(decode)
        .filter(|i| is_store(i) && is_tracked(i))
        .count();
    assert_eq!(stores, TRACKED_STORE_SITES);
}

/// The code as units: an instruction with the prefix before it, if any. Returns each unit's
/// start address and its (unprefixed) instruction.
fn units(c: &Compiled) -> Vec<(u64, Instruction)> {
    let mut out = Vec::new();
    let mut start = None;
    for line in c.disassemble() {
        if is_fep(&line) {
            assert!(start.is_none(), "two prefixes in a row at {:#x}", line.addr);
            start = Some(line.addr);
            continue;
        }
        out.push((start.take().unwrap_or(line.addr), decode(&line)));
    }
    assert!(start.is_none(), "the code ends in a prefix");
    out
}

/// Index of the unit starting at `addr`.
fn unit_at(units: &[(u64, Instruction)], addr: u64) -> usize {
    units
        .iter()
        .position(|(a, _)| *a == addr)
        .unwrap_or_else(|| panic!("{addr:#x} is not the start of an instruction"))
}

#[test]
fn branches_ops_and_tables_land_where_they_did() {
    let plain = compiled(StoreForm::Plain);
    let fep = compiled(StoreForm::ForcedEmulation);
    let (pu, fu) = (units(&plain), units(&fep));
    assert_eq!(pu.len(), fu.len(), "the same instructions, prefixes aside");
    for (k, ((pa, p), (fa, f))) in pu.iter().zip(&fu).enumerate() {
        assert_eq!(p.code(), f.code(), "instruction {k}: {pa:#x} vs {fa:#x}");
        if p.is_jcc_short_or_near() || p.is_jmp_short_or_near() {
            assert_eq!(
                unit_at(&pu, p.near_branch_target()),
                unit_at(&fu, f.near_branch_target()),
                "branch {k} at {fa:#x} lands elsewhere"
            );
        } else if p.is_ip_rel_memory_operand() {
            // lea rsi, [table]: the first table byte, right after the code, in both.
            assert_eq!(
                p.ip_rel_memory_address(),
                plain.base + plain.code_len as u64
            );
            assert_eq!(f.ip_rel_memory_address(), fep.base + fep.code_len as u64);
        } else {
            assert_eq!(format!("{p}"), format!("{f}"), "instruction {k}");
        }
    }
    assert!(
        pu.iter().any(|(_, i)| i.is_ip_rel_memory_operand()),
        "the program has a table"
    );
    let op_units = |c: &Compiled, u: &[(u64, Instruction)]| -> Vec<usize> {
        c.op_addrs.iter().map(|a| unit_at(u, *a)).collect()
    };
    assert_eq!(op_units(&plain, &pu), op_units(&fep, &fu));
    assert_eq!(plain.bytes[plain.code_len..], fep.bytes[fep.code_len..]);
    assert_eq!(plain.op_names, fep.op_names);
}

#[test]
fn a_prefix_is_one_instruction_for_reports() {
    let c = compiled(StoreForm::ForcedEmulation);
    let first = c.disassemble().into_iter().find(is_fep).expect("a prefix");
    let at = c.instruction_at(first.addr).expect("decodes");
    assert_eq!(at.text, FEP_TEXT);
    assert!(c.describe_rip(first.addr).starts_with("op 0 "));
    let store = c
        .instruction_at(first.addr + FEP.len() as u64)
        .expect("decodes");
    assert!(store.text.starts_with("mov     [r12"), "{}", store.text);
}

#[test]
fn arm64_refuses_the_prefix() {
    let program = Program::new(4, vec![Thread::new(vec![Op::Write { page: 1, offset: 0 }])]);
    let refused = crate::aarch64::compile_for(&program, 0, 0, None, StoreForm::ForcedEmulation)
        .expect_err("x86 only");
    assert!(
        matches!(refused, CompileError::StoreForm { .. }),
        "{refused}"
    );
    assert!(crate::aarch64::compile_for(&program, 0, 0, None, StoreForm::Plain).is_ok());
}

#[test]
fn forced_emulation_listing() {
    let c = compiled(StoreForm::ForcedEmulation);
    insta::with_settings!({
        snapshot_path => "../../../golden/guests",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!("x86_64_forced_emulation", c.listing());
    });
}
