//! What a compiler produces, on every architecture: the code of one vCPU's thread, where each op
//! starts, and its disassembly.

use std::fmt;

use crate::program::ProgramError;

/// The instruction set of compiled code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86_64 (iced-x86 assembles and disassembles it).
    X86_64,
    /// A64 (a small encoder in [`crate::aarch64`], its own decoder for the forms it emits).
    Aarch64,
}

/// How a compiler emits the guest's stores to tracked memory (the stamped store of every write,
/// and the page-table stores of page-table ops). Nothing else changes between the forms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StoreForm {
    /// Plain stores: they run wherever the rest of the code runs.
    #[default]
    Plain,
    /// x86 only: each such store is preceded by KVM's forced-emulation prefix
    /// ([`FEP`]: `ud2; .ascii "kvm"`). Where kvm.ko's `force_emulation_prefix` parameter is set,
    /// KVM intercepts the `#UD`, skips the five bytes and runs the next instruction in its
    /// emulator; where it is not, the guest takes the `#UD` (it has no IDT: a triple fault).
    ForcedEmulation,
}

/// KVM's forced-emulation prefix (`__KVM_EMULATE_PREFIX`: `ud2` then the bytes of "kvm"), as
/// the KVM selftests spell it: `KVM_FEP "ud2; .byte 'k', 'v', 'm';"`.
pub const FEP: [u8; 5] = [0x0f, 0x0b, b'k', b'v', b'm'];

/// One decoded instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// Guest address.
    pub addr: u64,
    /// Encoded bytes.
    pub bytes: Vec<u8>,
    /// Assembly text.
    pub text: String,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex: String = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "{:#010x}  {hex:<24} {}", self.addr, self.text)
    }
}

/// A compiled thread, linked to run at `base`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    /// The instruction set it is for.
    pub isa: Isa,
    /// The vCPU this code is for (its id is baked into stamps and addresses).
    pub vcpu: usize,
    /// Guest address of the first byte; also the entry point.
    pub base: u64,
    /// Code followed by read-only tables.
    pub bytes: Vec<u8>,
    /// Bytes of code before the tables.
    pub code_len: usize,
    /// Address of the first instruction of each op, in op order; the last entry is the `Done`
    /// the compiler appended, if any.
    pub op_addrs: Vec<u64>,
    /// One description per entry of `op_addrs`.
    pub op_names: Vec<String>,
}

impl Compiled {
    /// Index of the op whose code contains `rip`, if `rip` is in this thread's code.
    #[must_use]
    pub fn op_at(&self, rip: u64) -> Option<usize> {
        if rip < self.base || rip >= self.base + self.code_len as u64 {
            return None;
        }
        self.op_addrs.iter().rposition(|&addr| addr <= rip)
    }

    /// "op 3 (write page 5 +0x8)" for the op containing `rip`, or a note that `rip` is elsewhere.
    #[must_use]
    pub fn describe_rip(&self, rip: u64) -> String {
        match self.op_at(rip) {
            Some(i) => format!("op {i} ({})", self.op_names[i]),
            None => format!("outside vCPU {}'s code", self.vcpu),
        }
    }

    /// Every instruction of the code.
    #[must_use]
    pub fn disassemble(&self) -> Vec<Line> {
        let code = &self.bytes[..self.code_len];
        match self.isa {
            Isa::X86_64 => crate::x86_64::disassemble(code, self.base),
            Isa::Aarch64 => crate::aarch64::disassemble(code, self.base),
        }
    }

    /// The instruction at `pc`, if `pc` is in this thread's code and decodes.
    #[must_use]
    pub fn instruction_at(&self, pc: u64) -> Option<Line> {
        let off = usize::try_from(pc.checked_sub(self.base)?).ok()?;
        let code = self.bytes.get(off..self.code_len)?;
        match self.isa {
            Isa::X86_64 => crate::x86_64::decode_one(code, pc),
            Isa::Aarch64 => crate::aarch64::decode_one(code, pc),
        }
    }

    /// Annotated disassembly of the code (tables are summarised, not decoded).
    #[must_use]
    pub fn listing(&self) -> String {
        let mut out = String::new();
        let lines = self.disassemble();
        let mut next_op = 0;
        for line in lines {
            while next_op < self.op_addrs.len() && self.op_addrs[next_op] <= line.addr {
                out.push_str(&format!("; op {next_op}: {}\n", self.op_names[next_op]));
                next_op += 1;
            }
            out.push_str(&line.to_string());
            out.push('\n');
        }
        let table_bytes = self.bytes.len() - self.code_len;
        if table_bytes > 0 {
            out.push_str(&format!(
                "; {table_bytes} bytes of page-index tables (u32 entries)\n"
            ));
        }
        out
    }
}

/// Why a program could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The program breaks a rule (see [`Program::validate`]).
    #[error("invalid program: {0}")]
    Program(#[from] ProgramError),
    /// No thread for this vCPU.
    #[error("program has no thread for vCPU {0}")]
    NoThread(usize),
    /// The assembler rejected an instruction (a compiler bug).
    #[error("assembler: {0}")]
    Assembler(String),
    /// The instruction set has no such store form.
    #[error("{form:?} stores cannot be emitted for {isa:?}")]
    StoreForm {
        /// The instruction set.
        isa: Isa,
        /// The form asked for.
        form: StoreForm,
    },
    /// A page-table op, but the machine keeps the guest's page tables out of its reach, or
    /// maps the data region with pages the op cannot handle.
    #[error("op {op} ({what}): {why}")]
    PageTables {
        /// Op index.
        op: usize,
        /// The op.
        what: String,
        /// Why it cannot be compiled.
        why: String,
    },
}

/// The ops of `vcpu`'s thread of a validated `program`, ending in `Done` where the thread does
/// not end itself: what every backend compiles.
pub(crate) fn thread_ops(
    program: &crate::Program,
    vcpu: usize,
) -> Result<Vec<crate::Op>, CompileError> {
    program.validate()?;
    let thread = program
        .vcpus
        .get(vcpu)
        .ok_or(CompileError::NoThread(vcpu))?;
    let mut ops = thread.ops.clone();
    if !thread.ends_itself() {
        ops.push(crate::Op::Done);
    }
    Ok(ops)
}
