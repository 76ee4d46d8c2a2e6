//! IR -> A64 machine code, with a small encoder ([`enc`]).
//!
//! The code runs at EL1 with the guest's MMU on (identity-mapped by the harness) and talks to
//! the host only through the MMIO doorbell: single `str` instructions without writeback, which
//! KVM can decode (ISV set) and hand to userspace as KVM_EXIT_MMIO.
//!
//! Register conventions, set up by the prologue and never changed by the body:
//!
//! | reg | holds |
//! |-----|-------|
//! | x15 | seq of the last completed write (0 before the first) |
//! | x14 | this vCPU's control page |
//! | x13 | the doorbell page |
//! | x12 | the data region base |
//! | x11 | `vcpu << 48` (stamp = x11 + x15) |
//!
//! A stamped write is `add x15, x15, #1; add x0, x11, x15; str x0, [page + offset];
//! stlr x15, [x14]`: the progress store is a store-release, so the stamp is visible before the
//! progress that names it (arm64 is weakly ordered; the host reads progress with acquire).
//! Loops use x6 (table), x7 (pages per pass), x8 (passes left), x9 (index), x2 (page address).

pub mod enc;

use crate::compiled::{CompileError, Compiled, Isa, Line, StoreForm};
use crate::layout::{DATA_GPA, DOORBELL_GPA, LeafEntries, PAGE_SIZE, control, control_page};
use crate::program::{Access, Misbehaviour, Op, PageSeq, Program, Repeat};
use crate::sim::stamp;
use enc::Reg;

/// PSCI SYSTEM_OFF (function id, SMC32 calling convention): a vCPU that powers the machine off,
/// arm64's counterpart of x86's triple fault.
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;

/// Compile `vcpu`'s thread of `program`, linked at guest address `base`.
pub fn compile(program: &Program, vcpu: usize, base: u64) -> Result<Compiled, CompileError> {
    compile_with(program, vcpu, base, None)
}

/// [`compile_with`] with a store form: arm64 has only [`StoreForm::Plain`] (KVM's
/// forced-emulation prefix is x86's); any other form is refused.
pub fn compile_for(
    program: &Program,
    vcpu: usize,
    base: u64,
    leaf: Option<LeafEntries>,
    stores: StoreForm,
) -> Result<Compiled, CompileError> {
    match stores {
        StoreForm::Plain => compile_with(program, vcpu, base, leaf),
        form => Err(CompileError::StoreForm {
            isa: Isa::Aarch64,
            form,
        }),
    }
}

/// [`compile`]; page-table ops are not written for arm64 yet, so `leaf` only changes the error
/// they get.
pub fn compile_with(
    program: &Program,
    vcpu: usize,
    base: u64,
    leaf: Option<LeafEntries>,
) -> Result<Compiled, CompileError> {
    let ops = crate::compiled::thread_ops(program, vcpu)?;
    let mut g = Gen {
        a: Asm::new(base),
        vcpu,
        seq_base: program.seq_base,
        tables: Vec::new(),
    };
    let op_labels: Vec<Label> = ops.iter().map(|_| g.a.label()).collect();
    g.prologue();
    for (i, op) in ops.iter().enumerate() {
        g.a.bind(op_labels[i]);
        let next = op_labels.get(i + 1).copied();
        g.op(i, op, op_labels[i], next, leaf)?;
    }
    let code_len = g.a.len();
    for (label, entries) in std::mem::take(&mut g.tables) {
        g.a.align(4);
        g.a.bind(label);
        for e in entries {
            g.a.data32(e);
        }
    }
    let op_addrs = op_labels
        .iter()
        .map(|&l| g.a.address(l))
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| CompileError::Assembler("unbound op label".into()))?;
    let bytes = g.a.finish()?;
    Ok(Compiled {
        isa: Isa::Aarch64,
        vcpu,
        base,
        bytes,
        code_len,
        op_addrs,
        op_names: ops.iter().map(ToString::to_string).collect(),
    })
}

/// Every instruction of `code` linked at `base` (4-byte words).
#[must_use]
pub fn disassemble(code: &[u8], base: u64) -> Vec<Line> {
    code.chunks_exact(4)
        .zip((base..).step_by(4))
        .filter_map(|(w, addr)| decode_one(w, addr))
        .collect()
}

/// The instruction at the start of `code` (read from guest memory at `addr`): a form this
/// compiler emits, or `.inst 0x...` for any other word. `None` if fewer than 4 bytes.
#[must_use]
pub fn decode_one(code: &[u8], addr: u64) -> Option<Line> {
    let bytes: [u8; 4] = code.get(..4)?.try_into().ok()?;
    let word = u32::from_le_bytes(bytes);
    let text = enc::decode(word, addr).unwrap_or_else(|| format!(".inst {word:#010x}"));
    Some(Line {
        addr,
        bytes: bytes.to_vec(),
        text,
    })
}

/// A place in the code, bound once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

/// How a reference to a label is encoded.
#[derive(Clone, Copy, Debug)]
enum Fixup {
    /// `b`: imm26 words from the instruction.
    B,
    /// `cbnz` / `b.cond`: imm19 words from the instruction.
    Imm19,
    /// `adrp` (pages from the instruction's page) and the `add` after it (low 12 bits).
    AdrpAdd,
}

/// A tiny assembler: instruction words, data, labels and fixups.
struct Asm {
    base: u64,
    bytes: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label, Fixup)>,
}

impl Asm {
    fn new(base: u64) -> Self {
        Self {
            base,
            bytes: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.bytes.len()
    }

    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.bytes.len());
    }

    fn address(&self, l: Label) -> Option<u64> {
        self.labels[l.0].map(|off| self.base + off as u64)
    }

    fn emit(&mut self, word: u32) {
        self.bytes.extend_from_slice(&word.to_le_bytes());
    }

    fn data32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    fn align(&mut self, to: usize) {
        while !self.bytes.len().is_multiple_of(to) {
            self.bytes.push(0);
        }
    }

    fn refer(&mut self, word: u32, to: Label, how: Fixup) {
        self.fixups.push((self.bytes.len(), to, how));
        self.emit(word);
        if let Fixup::AdrpAdd = how {
            // The add that completes the address; its immediate is patched with the adrp.
            self.emit(0);
        }
    }

    /// `xd = value`: movz plus one movk per further non-zero half-word.
    fn mov_imm(&mut self, rd: Reg, value: u64) {
        let halves: Vec<(u32, u32)> = (0..4)
            .map(|i| {
                (
                    u32::try_from((value >> (16 * i)) & 0xffff).unwrap_or(0),
                    16 * i,
                )
            })
            .collect();
        let first = halves.iter().position(|(h, _)| *h != 0).unwrap_or(0);
        self.emit(enc::movz(rd, halves[first].0, halves[first].1));
        for &(h, shift) in halves.iter().skip(first + 1) {
            if h != 0 {
                self.emit(enc::movk(rd, h, shift));
            }
        }
    }

    fn finish(mut self) -> Result<Vec<u8>, CompileError> {
        for (at, label, how) in std::mem::take(&mut self.fixups) {
            let to = self.labels[label.0]
                .ok_or_else(|| CompileError::Assembler("branch to an unbound label".into()))?;
            let delta = i64::try_from(to).unwrap_or(0) - i64::try_from(at).unwrap_or(0);
            let read = |bytes: &[u8], at: usize| {
                u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
            };
            let word = read(&self.bytes, at);
            let patched: Vec<(usize, u32)> = match how {
                Fixup::B => {
                    let imm = i32::try_from(delta / 4)
                        .ok()
                        .filter(|i| (-(1 << 25)..(1 << 25)).contains(i))
                        .ok_or_else(|| CompileError::Assembler("b out of range".into()))?;
                    vec![(at, word | (imm as u32 & 0x3ff_ffff))]
                }
                Fixup::Imm19 => {
                    let imm = i32::try_from(delta / 4)
                        .ok()
                        .filter(|i| (-(1 << 18)..(1 << 18)).contains(i))
                        .ok_or_else(|| {
                            CompileError::Assembler("conditional branch out of range".into())
                        })?;
                    vec![(at, word | ((imm as u32 & 0x7_ffff) << 5))]
                }
                Fixup::AdrpAdd => {
                    let (pc, target) = (self.base + at as u64, self.base + to as u64);
                    let pages = i64::try_from(target >> 12).unwrap_or(0)
                        - i64::try_from(pc >> 12).unwrap_or(0);
                    let pages = i32::try_from(pages)
                        .map_err(|_| CompileError::Assembler("adrp out of range".into()))?;
                    let rd = word & 31;
                    vec![
                        (at, enc::adrp(rd, pages)),
                        (
                            at + 4,
                            enc::add_imm(rd, rd, u32::try_from(target & 0xfff).unwrap_or(0)),
                        ),
                    ]
                }
            };
            for (pos, w) in patched {
                self.bytes[pos..pos + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
        Ok(self.bytes)
    }
}

/// Code generator state for one thread.
struct Gen {
    a: Asm,
    vcpu: usize,
    seq_base: u64,
    /// Tables to emit after the code: (label, u32 page indices).
    tables: Vec<(Label, Vec<u32>)>,
}

/// Fixed registers (see the module documentation).
const SEQ: Reg = 15;
const CTRL: Reg = 14;
const BELL: Reg = 13;
const DATA: Reg = 12;
const STAMP: Reg = 11;

/// A control-page or doorbell offset as an instruction immediate.
fn off(o: u64) -> u32 {
    u32::try_from(o).unwrap_or(0)
}

impl Gen {
    fn prologue(&mut self) {
        self.a.mov_imm(SEQ, self.seq_base);
        self.a.mov_imm(STAMP, stamp(self.vcpu, 0));
        self.a.mov_imm(CTRL, control_page(self.vcpu));
        self.a.mov_imm(BELL, DOORBELL_GPA);
        self.a.mov_imm(DATA, DATA_GPA);
    }

    /// The stamped write to `[base + offset]`.
    fn stamped_write(&mut self, base: Reg, offset: u32) {
        let a = &mut self.a;
        a.emit(enc::add_imm(SEQ, SEQ, 1));
        a.emit(enc::add_reg(0, STAMP, SEQ));
        a.emit(enc::str_imm(0, base, offset));
        a.emit(enc::stlr(SEQ, CTRL));
    }

    fn counted_read(&mut self, base: Reg, offset: u32) {
        let a = &mut self.a;
        a.emit(enc::ldr_imm(0, base, offset));
        a.emit(enc::ldr_imm(4, CTRL, off(control::READS)));
        a.emit(enc::add_imm(4, 4, 1));
        a.emit(enc::str_imm(4, CTRL, off(control::READS)));
    }

    /// x2 = the address of data page `page` (its offset is applied by the access).
    fn page_address(&mut self, page: u64) {
        self.a.mov_imm(1, page * PAGE_SIZE);
        self.a.emit(enc::add_reg(2, DATA, 1));
    }

    fn op(
        &mut self,
        index: usize,
        op: &Op,
        this: Label,
        next: Option<Label>,
        leaf: Option<LeafEntries>,
    ) -> Result<(), CompileError> {
        match op {
            Op::Write { page, offset } => {
                self.page_address(*page);
                self.stamped_write(2, u32::from(*offset));
            }
            Op::Read { page, offset } => {
                self.page_address(*page);
                self.counted_read(2, u32::from(*offset));
            }
            Op::Loop {
                pages,
                access,
                offset,
                repeat,
            } => self.looped(pages, *access, u32::from(*offset), *repeat, next)?,
            Op::Sync(n) => {
                self.a.mov_imm(0, u64::from(*n));
                self.a.emit(enc::str_imm(0, CTRL, off(control::SYNC)));
                self.a
                    .emit(enc::str_imm(0, BELL, off(crate::layout::doorbell::SYNC)));
            }
            Op::Done => {
                self.a
                    .emit(enc::str_imm(SEQ, BELL, off(crate::layout::doorbell::DONE)));
                self.a.refer(enc::b(0), this, Fixup::B);
            }
            Op::Misbehave(m) => self.misbehave(*m, this),
            Op::ClearAd { .. } | Op::Remap { .. } => {
                return Err(CompileError::PageTables {
                    op: index,
                    what: op.to_string(),
                    why: if leaf.is_some() {
                        "page-table ops are not written for arm64 yet".into()
                    } else {
                        "this machine keeps the guest's page tables out of its reach".into()
                    },
                });
            }
        }
        Ok(())
    }

    fn misbehave(&mut self, m: Misbehaviour, this: Label) {
        match m {
            Misbehaviour::Hang => {}
            Misbehaviour::TripleFault => {
                // Touching an unmapped address would take an exception to a vector nobody
                // installed; PSCI SYSTEM_OFF ends the vCPU cleanly instead.
                self.a.mov_imm(0, PSCI_SYSTEM_OFF);
                self.a.emit(enc::HVC0);
            }
            Misbehaviour::ExitStorm => {
                self.a
                    .emit(enc::str_imm(SEQ, BELL, off(crate::layout::doorbell::STORM)));
            }
        }
        self.a.refer(enc::b(0), this, Fixup::B);
    }

    /// ```text
    ///     mov x7, count            ; pages per pass
    ///     mov x8, times            ; (Times) passes left
    ///     adrp x6, table; add x6.. ; (tables)
    /// outer:
    ///     mov x9, #0
    /// inner:
    ///     ldr x0, [x14, #STOP] ; cbnz x0, next   (UntilStopped)
    ///     <x2 = page at position x9>
    ///     lsl x2, x2, #12 ; add x2, x12, x2
    ///     <write or read at [x2 + offset]>
    ///     add x9, x9, #1 ; cmp x9, x7 ; b.lo inner
    ///     ldr x4, [x14, #PASSES] ; add x4, x4, #1 ; str x4, [x14, #PASSES]
    ///     subs x8, x8, #1 ; b.ne outer   (Times)   |   b outer   (UntilStopped)
    /// ```
    fn looped(
        &mut self,
        pages: &PageSeq,
        access: Access,
        offset: u32,
        repeat: Repeat,
        next: Option<Label>,
    ) -> Result<(), CompileError> {
        let (outer, inner) = (self.a.label(), self.a.label());
        self.a.mov_imm(7, pages.len());
        if let Repeat::Times(n) = repeat {
            self.a.mov_imm(8, u64::from(n));
        }
        if pages.needs_table() {
            let table: Vec<u32> = pages
                .pages()
                .into_iter()
                .map(|p| u32::try_from(p).map_err(|e| CompileError::Assembler(e.to_string())))
                .collect::<Result<_, _>>()?;
            let label = self.a.label();
            self.a.refer(enc::adrp(6, 0), label, Fixup::AdrpAdd);
            self.tables.push((label, table));
        }
        self.a.bind(outer);
        self.a.emit(enc::movz(9, 0, 0));
        self.a.bind(inner);
        if repeat == Repeat::UntilStopped {
            let next = next.ok_or_else(|| {
                CompileError::Assembler("UntilStopped loop without a following op".into())
            })?;
            self.a.emit(enc::ldr_imm(0, CTRL, off(control::STOP)));
            self.a.refer(enc::cbnz(0, 0), next, Fixup::Imm19);
        }
        match pages {
            PageSeq::Range { start, .. } => {
                self.a.mov_imm(3, *start);
                self.a.emit(enc::add_reg(2, 9, 3));
            }
            PageSeq::Strided { start, stride, .. } => {
                self.a.mov_imm(3, *stride);
                self.a.emit(enc::mul(2, 9, 3));
                self.a.mov_imm(3, *start);
                self.a.emit(enc::add_reg(2, 2, 3));
            }
            PageSeq::Shuffled { .. } | PageSeq::List(_) => {
                self.a.emit(enc::ldr_w_scaled(2, 6, 9));
            }
        }
        self.a.emit(enc::lsl(2, 2, 12));
        self.a.emit(enc::add_reg(2, DATA, 2));
        match access {
            Access::Write => self.stamped_write(2, offset),
            Access::Read => self.counted_read(2, offset),
        }
        let a = &mut self.a;
        a.emit(enc::add_imm(9, 9, 1));
        a.emit(enc::cmp_reg(9, 7));
        a.refer(enc::b_cond(enc::LO, 0), inner, Fixup::Imm19);
        a.emit(enc::ldr_imm(4, CTRL, off(control::PASSES)));
        a.emit(enc::add_imm(4, 4, 1));
        a.emit(enc::str_imm(4, CTRL, off(control::PASSES)));
        match repeat {
            Repeat::Times(_) => {
                a.emit(enc::subs_imm(8, 8, 1));
                a.refer(enc::b_cond(enc::NE, 0), outer, Fixup::Imm19);
            }
            Repeat::UntilStopped => a.refer(enc::b(0), outer, Fixup::B),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
