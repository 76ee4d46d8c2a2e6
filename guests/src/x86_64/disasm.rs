//! Disassembly of generated code, for golden snapshots and watchdog reports.

use crate::compiled::Line;
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

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
    let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut formatter = formatter();
    let mut instruction = Instruction::default();
    let mut out = Vec::new();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        let mut text = String::new();
        formatter.format(&instruction, &mut text);
        let start = usize::try_from(instruction.ip() - base).unwrap_or(0);
        out.push(Line {
            addr: instruction.ip(),
            bytes: code[start..start + instruction.len()].to_vec(),
            text,
        });
    }
    out
}

/// Decode the one instruction at the start of `code` (read from guest memory at `addr`);
/// `None` if the bytes are not a valid instruction.
#[must_use]
pub fn decode_one(code: &[u8], addr: u64) -> Option<Line> {
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
