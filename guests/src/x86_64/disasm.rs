//! Disassembly of generated code, for golden snapshots and watchdog reports.
//!
//! KVM's forced-emulation prefix ([`FEP`]: `ud2` and the three bytes "kvm") is shown as one
//! line of its own: a plain decoder would read "kvm" as the start of an `imul` and swallow the
//! first byte of the store after it.

use crate::compiled::{FEP, Line};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

/// The text of a [`FEP`] line.
pub const FEP_TEXT: &str = "ud2     ; .ascii \"kvm\": KVM forced-emulation prefix";

fn formatter() -> IntelFormatter {
    let mut formatter = IntelFormatter::new();
    formatter.options_mut().set_first_operand_char_index(8);
    formatter.options_mut().set_hex_prefix("0x");
    formatter.options_mut().set_hex_suffix("");
    formatter.options_mut().set_branch_leading_zeros(false);
    formatter.options_mut().set_show_branch_size(false);
    formatter
}

/// Decode all of `code`, linked at `base`.
#[must_use]
pub fn disassemble(code: &[u8], base: u64) -> Vec<Line> {
    let mut formatter = formatter();
    let mut instruction = Instruction::default();
    let mut out = Vec::new();
    let mut at = 0;
    while at < code.len() {
        let addr = base + at as u64;
        if code[at..].starts_with(&FEP) {
            out.push(fep_line(addr));
            at += FEP.len();
            continue;
        }
        let mut decoder = Decoder::with_ip(64, &code[at..], addr, DecoderOptions::NONE);
        decoder.decode_out(&mut instruction);
        let mut text = String::new();
        formatter.format(&instruction, &mut text);
        // An invalid instruction still has a length (at least 1), so this always advances.
        let len = instruction.len().max(1);
        let end = (at + len).min(code.len());
        out.push(Line {
            addr,
            bytes: code[at..end].to_vec(),
            text,
        });
        at = end;
    }
    out
}

fn fep_line(addr: u64) -> Line {
    Line {
        addr,
        bytes: FEP.to_vec(),
        text: FEP_TEXT.into(),
    }
}

/// Decode the one instruction at the start of `code` (read from guest memory at `addr`);
/// `None` if the bytes are not a valid instruction. A forced-emulation prefix is one
/// instruction here (see the module doc).
#[must_use]
pub fn decode_one(code: &[u8], addr: u64) -> Option<Line> {
    if code.starts_with(&FEP) {
        return Some(fep_line(addr));
    }
    let mut decoder = Decoder::with_ip(64, code, addr, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() {
        return None;
    }
    let mut text = String::new();
    formatter().format(&instruction, &mut text);
    Some(Line {
        addr,
        bytes: code[..instruction.len()].to_vec(),
        text,
    })
}
