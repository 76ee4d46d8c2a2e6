//! IR -> x86_64 machine code, with iced-x86's code assembler.
//!
//! The same code runs at CPL0 (KVM's instruction emulator on PVM, natively on VMX/SVM) and at
//! CPL3 (natively on PVM): it uses no privileged instruction and talks to the host only through
//! the MMIO doorbell.
//!
//! Register conventions, set up by the prologue and never changed by the body:
//!
//! | reg | holds |
//! |-----|-------|
//! | r15 | seq of the last completed write (0 before the first) |
//! | r14 | this vCPU's control page |
//! | r13 | the doorbell page |
//! | r12 | the data region base |
//! | r11 | `vcpu << 48` (stamp = r11 + r15) |
//!
//! A stamped write is `inc r15; lea rax, [r11 + r15]; mov [page + offset], rax;
//! mov [r14 + PROGRESS], r15`. x86 stores become visible in program order (TSO), so the progress
//! store is a release of the stamp store, on the CPU and in KVM's emulator alike.
//!
//! With [`StoreForm::ForcedEmulation`] every store to tracked memory (the stamp store, and the
//! page-table stores of `ClearAd` and `Remap`) is preceded by KVM's forced-emulation prefix
//! [`FEP`], so that on a host whose kvm.ko has `force_emulation_prefix` set KVM's emulator makes
//! exactly those stores while the rest of the code runs on the CPU. The emulator handles each
//! form used: `mov r/m64, r64` (0x89) and `and r/m64, r64` (0x21), with SIB and disp32
//! addressing, as the KVM selftests' `vcpu_arch_put_guest` does for its forced `mov`. Stores
//! to the control page and the doorbell are never prefixed. Labels are set before the prefix,
//! so a branch to a prefixed store lands on its prefix.

mod disasm;

pub use disasm::{FEP_TEXT, decode_one, disassemble};

pub use crate::compiled::{CompileError, Compiled, FEP, Isa, Line, StoreForm};

use iced_x86::BlockEncoderOptions;
use iced_x86::code_asm::{
    AsmMemoryOperand, CodeAssembler, CodeLabel, IcedError, dword_ptr, eax, ebx, ecx, edx, ptr,
    qword_ptr, r11, r12, r13, r14, r15, rax, rcx, rdi, rdx, rsi,
};

use crate::layout::{
    DATA_GPA, DOORBELL_GPA, GuestPageSize, LeafEntries, PAGE_SIZE, UNMAPPED_GVA, control,
    control_page,
};
use crate::program::{Access, Misbehaviour, Op, PageSeq, Program, Repeat};
use crate::sim::stamp;

impl From<IcedError> for CompileError {
    fn from(e: IcedError) -> Self {
        Self::Assembler(e.to_string())
    }
}

/// Compile `vcpu`'s thread of `program`, linked at guest address `base`, for a machine whose
/// page tables the guest cannot reach (page-table ops are refused).
pub fn compile(program: &Program, vcpu: usize, base: u64) -> Result<Compiled, CompileError> {
    compile_with(program, vcpu, base, None)
}

/// [`compile`] for a machine whose data-region leaf entries are at `leaf` (page-table ops
/// write there).
pub fn compile_with(
    program: &Program,
    vcpu: usize,
    base: u64,
    leaf: Option<LeafEntries>,
) -> Result<Compiled, CompileError> {
    compile_for(program, vcpu, base, leaf, StoreForm::Plain)
}

/// [`compile_with`], emitting the stores to tracked memory in form `stores`.
pub fn compile_for(
    program: &Program,
    vcpu: usize,
    base: u64,
    leaf: Option<LeafEntries>,
    stores: StoreForm,
) -> Result<Compiled, CompileError> {
    let ops = crate::compiled::thread_ops(program, vcpu)?;
    let mut cg = Gen::new(vcpu, program.seq_base, leaf, stores)?;
    let mut op_labels: Vec<CodeLabel> = ops.iter().map(|_| cg.a.create_label()).collect();
    cg.prologue()?;
    for (i, op) in ops.iter().enumerate() {
        cg.op_index = i;
        cg.a.set_label(&mut op_labels[i])?;
        let next = op_labels.get(i + 1).copied();
        cg.op(op, op_labels[i], next)?;
    }
    let code_marker = cg.tables_start()?;
    let result =
        cg.a.assemble_options(base, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let code_len = match code_marker {
        Some(label) => usize::try_from(result.label_ip(&label)? - base)
            .map_err(|e| CompileError::Assembler(e.to_string()))?,
        None => result.inner.code_buffer.len(),
    };
    let op_addrs = op_labels
        .iter()
        .map(|l| result.label_ip(l))
        .collect::<Result<Vec<u64>, IcedError>>()?;
    Ok(Compiled {
        isa: Isa::X86_64,
        vcpu,
        base,
        bytes: result.inner.code_buffer,
        code_len,
        op_addrs,
        op_names: ops.iter().map(ToString::to_string).collect(),
    })
}

/// Code generator state for one thread.
struct Gen {
    a: CodeAssembler,
    vcpu: usize,
    seq_base: u64,
    /// Tables to emit after the code: (label, u32 page indices).
    tables: Vec<(CodeLabel, Vec<u32>)>,
    /// Where the data region's leaf page-table entries are, if the guest may write them.
    leaf: Option<LeafEntries>,
    /// Index of the op being compiled (for errors).
    op_index: usize,
    /// How stores to tracked memory are emitted.
    stores: StoreForm,
}

/// The accessed and dirty bits of an x86 page-table entry.
const PTE_AD: u64 = (1 << 5) | (1 << 6);
/// The physical-address bits of an x86 page-table entry.
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

impl Gen {
    fn new(
        vcpu: usize,
        seq_base: u64,
        leaf: Option<LeafEntries>,
        stores: StoreForm,
    ) -> Result<Self, CompileError> {
        Ok(Self {
            a: CodeAssembler::new(64)?,
            vcpu,
            seq_base,
            tables: Vec::new(),
            leaf,
            op_index: 0,
            stores,
        })
    }

    /// Put what goes before a store to tracked memory: nothing, or KVM's forced-emulation
    /// prefix.
    fn tracked_store(&mut self) -> Result<(), CompileError> {
        match self.stores {
            StoreForm::Plain => {}
            StoreForm::ForcedEmulation => {
                self.a.ud2()?;
                self.a.db(&FEP[2..])?;
            }
        }
        Ok(())
    }

    /// rax = address of the leaf entry mapping data page `page`.
    fn leaf_entry(&mut self, op: &Op, page: u64, need_4k: bool) -> Result<(), CompileError> {
        let refuse = |why: &str| CompileError::PageTables {
            op: self.op_index,
            what: op.to_string(),
            why: why.into(),
        };
        let leaf = self
            .leaf
            .ok_or_else(|| refuse("this machine keeps the guest's page tables out of its reach"))?;
        if need_4k && leaf.page != GuestPageSize::Size4K {
            return Err(refuse("remapping needs 4 KiB guest pages"));
        }
        self.a.mov(rax, leaf.of(page))?;
        Ok(())
    }

    fn prologue(&mut self) -> Result<(), CompileError> {
        let a = &mut self.a;
        if self.seq_base == 0 {
            a.xor(r15, r15)?;
        } else {
            a.mov(r15, self.seq_base)?;
        }
        a.mov(r11, stamp(self.vcpu, 0))?;
        a.mov(r14, control_page(self.vcpu))?;
        a.mov(r13, DOORBELL_GPA)?;
        a.mov(r12, DATA_GPA)?;
        Ok(())
    }

    /// Memory operand for `offset` bytes into data page `page`.
    fn data_operand(&mut self, page: u64, offset: u16) -> Result<AsmMemoryOperand, CompileError> {
        let displacement = page * PAGE_SIZE + u64::from(offset);
        Ok(match i32::try_from(displacement) {
            Ok(d) => qword_ptr(r12 + d),
            Err(_) => {
                self.a.mov(rdx, DATA_GPA + displacement)?;
                qword_ptr(rdx)
            }
        })
    }

    /// The stamped write: bump seq, store the stamp at `target`, publish seq.
    fn stamped_write(&mut self, target: AsmMemoryOperand) -> Result<(), CompileError> {
        self.a.inc(r15)?;
        self.a.lea(rax, qword_ptr(r11 + r15))?;
        self.tracked_store()?;
        self.a.mov(target, rax)?;
        self.a
            .mov(qword_ptr(r14 + i32_of(control::PROGRESS)), r15)?;
        Ok(())
    }

    fn counted_read(&mut self, source: AsmMemoryOperand) -> Result<(), CompileError> {
        self.a.mov(rax, source)?;
        self.a.inc(qword_ptr(r14 + i32_of(control::READS)))?;
        Ok(())
    }

    fn op(
        &mut self,
        op: &Op,
        this: CodeLabel,
        next: Option<CodeLabel>,
    ) -> Result<(), CompileError> {
        match op {
            Op::Write { page, offset } => {
                let target = self.data_operand(*page, *offset)?;
                self.stamped_write(target)
            }
            Op::Read { page, offset } => {
                let source = self.data_operand(*page, *offset)?;
                self.counted_read(source)
            }
            Op::Loop {
                pages,
                access,
                offset,
                repeat,
            } => self.looped(pages, *access, *offset, *repeat, next),
            Op::Sync(n) => {
                let a = &mut self.a;
                a.mov(eax, *n)?;
                a.mov(qword_ptr(r14 + i32_of(control::SYNC)), rax)?;
                a.mov(qword_ptr(r13 + i32_of(crate::layout::doorbell::SYNC)), rax)?;
                Ok(())
            }
            // Both loop back to their own first instruction (labels: one per instruction).
            Op::Done => {
                let a = &mut self.a;
                a.mov(qword_ptr(r13 + i32_of(crate::layout::doorbell::DONE)), r15)?;
                a.jmp(this)?;
                Ok(())
            }
            Op::Misbehave(m) => self.misbehave(*m, this),
            // and qword [entry], ~(A|D)
            Op::ClearAd { page } => {
                self.leaf_entry(op, *page, false)?;
                self.a.mov(rcx, !PTE_AD)?;
                self.tracked_store()?;
                self.a.and(qword_ptr(rax), rcx)?;
                Ok(())
            }
            // entry = entry & !(ADDR | A | D) | gpa(to): a fresh mapping, never used yet
            Op::Remap { page, to } => {
                self.leaf_entry(op, *page, true)?;
                let a = &mut self.a;
                a.mov(rdx, qword_ptr(rax))?;
                a.mov(rcx, !(PTE_ADDR | PTE_AD))?;
                a.and(rdx, rcx)?;
                a.mov(rcx, DATA_GPA + to * PAGE_SIZE)?;
                a.or(rdx, rcx)?;
                self.tracked_store()?;
                self.a.mov(qword_ptr(rax), rdx)?;
                Ok(())
            }
        }
    }

    fn misbehave(&mut self, m: Misbehaviour, this: CodeLabel) -> Result<(), CompileError> {
        let a = &mut self.a;
        match m {
            Misbehaviour::Hang => {}
            Misbehaviour::TripleFault => {
                a.mov(rax, UNMAPPED_GVA)?;
                a.mov(qword_ptr(rax), r15)?;
            }
            Misbehaviour::ExitStorm => {
                a.mov(qword_ptr(r13 + i32_of(crate::layout::doorbell::STORM)), r15)?;
            }
        }
        a.jmp(this)?;
        Ok(())
    }

    /// ```text
    ///     mov rdi, count          ; pages per pass
    ///     mov ebx, times          ; (Times) passes left
    ///     lea rsi, [rip + table]  ; (tables)
    /// outer:
    ///     xor ecx, ecx
    /// inner:
    ///     cmp qword [r14 + STOP], 0 ; jne next_op   (UntilStopped)
    ///     <rdx = page at position rcx>
    ///     shl rdx, 12
    ///     <write or read at [r12 + rdx + offset]>
    ///     inc rcx ; cmp rcx, rdi ; jb inner
    ///     inc qword [r14 + PASSES]
    ///     dec rbx ; jnz outer     (Times)   |   jmp outer   (UntilStopped)
    /// ```
    fn looped(
        &mut self,
        pages: &PageSeq,
        access: Access,
        offset: u16,
        repeat: Repeat,
        next: Option<CodeLabel>,
    ) -> Result<(), CompileError> {
        let mut outer = self.a.create_label();
        let mut inner = self.a.create_label();
        self.a.mov(rdi, pages.len())?;
        if let Repeat::Times(n) = repeat {
            self.a.mov(ebx, n)?;
        }
        if pages.needs_table() {
            let table: Vec<u32> = pages
                .pages()
                .into_iter()
                .map(|p| u32::try_from(p).map_err(|e| CompileError::Assembler(e.to_string())))
                .collect::<Result<_, _>>()?;
            let label = self.a.create_label();
            self.a.lea(rsi, ptr(label))?;
            self.tables.push((label, table));
        }
        self.a.set_label(&mut outer)?;
        self.a.xor(ecx, ecx)?;
        self.a.set_label(&mut inner)?;
        if repeat == Repeat::UntilStopped {
            let next = next.ok_or_else(|| {
                CompileError::Assembler("UntilStopped loop without a following op".into())
            })?;
            self.a.cmp(qword_ptr(r14 + i32_of(control::STOP)), 0)?;
            self.a.jne(next)?;
        }
        match pages {
            PageSeq::Range { start, .. } => self.add_start(*start)?,
            PageSeq::Strided { start, stride, .. } => {
                match i32::try_from(*stride) {
                    Ok(s) => self.a.imul_3(rdx, rcx, s)?,
                    Err(_) => {
                        self.a.mov(rdx, *stride)?;
                        self.a.imul_2(rdx, rcx)?;
                    }
                }
                self.add_to_rdx(*start)?;
            }
            PageSeq::Shuffled { .. } | PageSeq::List(_) => {
                self.a.mov(edx, dword_ptr(rsi + rcx * 4))?;
            }
        }
        self.a.shl(rdx, 12)?;
        let operand = qword_ptr(r12 + rdx + i32::from(offset));
        match access {
            Access::Write => self.stamped_write(operand)?,
            Access::Read => self.counted_read(operand)?,
        }
        let a = &mut self.a;
        a.inc(rcx)?;
        a.cmp(rcx, rdi)?;
        a.jb(inner)?;
        a.inc(qword_ptr(r14 + i32_of(control::PASSES)))?;
        match repeat {
            Repeat::Times(_) => {
                a.dec(ebx)?;
                a.jnz(outer)?;
            }
            Repeat::UntilStopped => a.jmp(outer)?,
        }
        Ok(())
    }

    /// rdx = rcx + start
    fn add_start(&mut self, start: u64) -> Result<(), CompileError> {
        match i32::try_from(start) {
            Ok(s) => self.a.lea(rdx, qword_ptr(rcx + s))?,
            Err(_) => {
                self.a.mov(rdx, start)?;
                self.a.add(rdx, rcx)?;
            }
        }
        Ok(())
    }

    /// rdx += value
    fn add_to_rdx(&mut self, value: u64) -> Result<(), CompileError> {
        if value == 0 {
            return Ok(());
        }
        match i32::try_from(value) {
            Ok(v) => self.a.add(rdx, v)?,
            Err(_) => {
                self.a.mov(rax, value)?;
                self.a.add(rdx, rax)?;
            }
        }
        Ok(())
    }

    /// Emit the tables after the code; returns the label of the first table byte.
    fn tables_start(&mut self) -> Result<Option<CodeLabel>, CompileError> {
        let tables = std::mem::take(&mut self.tables);
        let mut first = None;
        for (mut label, entries) in tables {
            self.a.set_label(&mut label)?;
            first.get_or_insert(label);
            let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            self.a.db(&bytes)?;
        }
        Ok(first)
    }
}

/// A control-page or doorbell field offset as an instruction displacement.
fn i32_of(offset: u64) -> i32 {
    i32::try_from(offset).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod fep_tests;
#[cfg(test)]
mod tests;
