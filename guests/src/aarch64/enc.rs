//! A64 instruction words for the forms the compiler emits, and their text.
//!
//! Only 64-bit general-purpose forms: `movz`/`movk`, `add` (immediate and register), `subs`
//! immediate, `cmp` register, `mul`, `lsl` immediate, `str`/`ldr` (unsigned offset and register
//! offset), `ldr w` scaled register offset, `stlr`, `cbnz`, `b`, `b.cond`, `adrp`, `hvc`, `nop`.
//! [`decode`] turns exactly these words back into text (objdump's syntax, checked against
//! binutils in the tests); anything else shows as `.inst`.

/// A general-purpose register number, 0..=30 (31 is xzr or sp, depending on the form).
pub type Reg = u32;

/// The zero register (in the forms where register 31 means xzr).
pub const XZR: Reg = 31;

/// Condition code: not equal.
pub const NE: u32 = 1;
/// Condition code: unsigned lower (carry clear).
pub const LO: u32 = 3;

/// `movz xd, #imm16, lsl #shift` (`shift` 0, 16, 32 or 48).
#[must_use]
pub const fn movz(rd: Reg, imm16: u32, shift: u32) -> u32 {
    0xD280_0000 | ((shift / 16) << 21) | ((imm16 & 0xffff) << 5) | rd
}

/// `movk xd, #imm16, lsl #shift`.
#[must_use]
pub const fn movk(rd: Reg, imm16: u32, shift: u32) -> u32 {
    0xF280_0000 | ((shift / 16) << 21) | ((imm16 & 0xffff) << 5) | rd
}

/// `add xd, xn, #imm12`.
#[must_use]
pub const fn add_imm(rd: Reg, rn: Reg, imm12: u32) -> u32 {
    0x9100_0000 | ((imm12 & 0xfff) << 10) | (rn << 5) | rd
}

/// `add xd, xn, xm`.
#[must_use]
pub const fn add_reg(rd: Reg, rn: Reg, rm: Reg) -> u32 {
    0x8B00_0000 | (rm << 16) | (rn << 5) | rd
}

/// `subs xd, xn, #imm12`.
#[must_use]
pub const fn subs_imm(rd: Reg, rn: Reg, imm12: u32) -> u32 {
    0xF100_0000 | ((imm12 & 0xfff) << 10) | (rn << 5) | rd
}

/// `cmp xn, xm` (`subs xzr, xn, xm`).
#[must_use]
pub const fn cmp_reg(rn: Reg, rm: Reg) -> u32 {
    0xEB00_0000 | (rm << 16) | (rn << 5) | XZR
}

/// `mul xd, xn, xm` (`madd xd, xn, xm, xzr`).
#[must_use]
pub const fn mul(rd: Reg, rn: Reg, rm: Reg) -> u32 {
    0x9B00_7C00 | (rm << 16) | (rn << 5) | rd
}

/// `lsl xd, xn, #shift` (`ubfm xd, xn, #(-shift mod 64), #(63 - shift)`), `shift` 1..=63.
#[must_use]
pub const fn lsl(rd: Reg, rn: Reg, shift: u32) -> u32 {
    0xD340_0000 | (((64 - shift) % 64) << 16) | ((63 - shift) << 10) | (rn << 5) | rd
}

/// `str xt, [xn, #offset]` (`offset` a multiple of 8 below 32768).
#[must_use]
pub const fn str_imm(rt: Reg, rn: Reg, offset: u32) -> u32 {
    0xF900_0000 | ((offset / 8) << 10) | (rn << 5) | rt
}

/// `ldr xt, [xn, #offset]`.
#[must_use]
pub const fn ldr_imm(rt: Reg, rn: Reg, offset: u32) -> u32 {
    0xF940_0000 | ((offset / 8) << 10) | (rn << 5) | rt
}

/// `str xt, [xn, xm]`.
#[must_use]
pub const fn str_reg(rt: Reg, rn: Reg, rm: Reg) -> u32 {
    0xF820_6800 | (rm << 16) | (rn << 5) | rt
}

/// `ldr xt, [xn, xm]`.
#[must_use]
pub const fn ldr_reg(rt: Reg, rn: Reg, rm: Reg) -> u32 {
    0xF860_6800 | (rm << 16) | (rn << 5) | rt
}

/// `ldr wt, [xn, xm, lsl #2]`.
#[must_use]
pub const fn ldr_w_scaled(rt: Reg, rn: Reg, rm: Reg) -> u32 {
    0xB860_7800 | (rm << 16) | (rn << 5) | rt
}

/// `stlr xt, [xn]`: a store-release.
#[must_use]
pub const fn stlr(rt: Reg, rn: Reg) -> u32 {
    0xC89F_FC00 | (rn << 5) | rt
}

/// `cbnz xt, pc + 4 * imm19`.
#[must_use]
pub const fn cbnz(rt: Reg, imm19: i32) -> u32 {
    0xB500_0000 | (((imm19 as u32) & 0x7_ffff) << 5) | rt
}

/// `b pc + 4 * imm26`.
#[must_use]
pub const fn b(imm26: i32) -> u32 {
    0x1400_0000 | ((imm26 as u32) & 0x3ff_ffff)
}

/// `b.cond pc + 4 * imm19`.
#[must_use]
pub const fn b_cond(cond: u32, imm19: i32) -> u32 {
    0x5400_0000 | (((imm19 as u32) & 0x7_ffff) << 5) | cond
}

/// `adrp xd, (pc & !0xfff) + 4096 * pages`.
#[must_use]
pub const fn adrp(rd: Reg, pages: i32) -> u32 {
    let p = pages as u32;
    0x9000_0000 | ((p & 3) << 29) | (((p >> 2) & 0x7_ffff) << 5) | rd
}

/// `hvc #0`.
pub const HVC0: u32 = 0xD400_0002;
/// `nop`.
pub const NOP: u32 = 0xD503_201F;

fn x(r: u32) -> String {
    if r == XZR {
        "xzr".into()
    } else {
        format!("x{r}")
    }
}

fn sign_extend(value: u32, bits: u32) -> i64 {
    let shift = 64 - bits;
    (i64::from(value) << shift) >> shift
}

/// The text of `word` at `addr`, in objdump's syntax; `None` if it is not one of the forms
/// this module emits.
#[must_use]
pub fn decode(word: u32, addr: u64) -> Option<String> {
    let rd = word & 31;
    let rn = (word >> 5) & 31;
    let rm = (word >> 16) & 31;
    let imm12 = (word >> 10) & 0xfff;
    let target = |offset: i64| addr.wrapping_add_signed(offset * 4);
    let text = match word {
        w if w & 0xFF80_0000 == 0xD280_0000 => {
            let hw = (w >> 21) & 3;
            let value = u64::from((w >> 5) & 0xffff) << (16 * hw);
            format!("mov {}, #{value:#x}", x(rd))
        }
        w if w & 0xFF80_0000 == 0xF280_0000 => {
            let hw = (w >> 21) & 3;
            let imm = (w >> 5) & 0xffff;
            if hw == 0 {
                format!("movk {}, #{imm:#x}", x(rd))
            } else {
                format!("movk {}, #{imm:#x}, lsl #{}", x(rd), 16 * hw)
            }
        }
        w if w & 0xFFC0_0000 == 0x9100_0000 => {
            format!("add {}, {}, #{imm12:#x}", x(rd), x(rn))
        }
        w if w & 0xFFC0_0000 == 0xF100_0000 && rd == XZR => format!("cmp {}, #{imm12:#x}", x(rn)),
        w if w & 0xFFC0_0000 == 0xF100_0000 => {
            format!("subs {}, {}, #{imm12:#x}", x(rd), x(rn))
        }
        w if w & 0xFFE0_FC1F == 0xEB00_001F => format!("cmp {}, {}", x(rn), x(rm)),
        w if w & 0xFFE0_FC00 == 0x8B00_0000 => format!("add {}, {}, {}", x(rd), x(rn), x(rm)),
        w if w & 0xFFE0_FC00 == 0x9B00_7C00 => format!("mul {}, {}, {}", x(rd), x(rn), x(rm)),
        w if w & 0xFFC0_0000 == 0xD340_0000 => {
            let (immr, imms) = ((w >> 16) & 63, (w >> 10) & 63);
            if imms == 63 || (imms + 1) % 64 != immr {
                return None;
            }
            format!("lsl {}, {}, #{}", x(rd), x(rn), 63 - imms)
        }
        w if w & 0xFFC0_0000 == 0xF900_0000 || w & 0xFFC0_0000 == 0xF940_0000 => {
            let op = if w & 0x0040_0000 == 0 { "str" } else { "ldr" };
            if imm12 == 0 {
                format!("{op} {}, [{}]", x(rd), x(rn))
            } else {
                format!("{op} {}, [{}, #{}]", x(rd), x(rn), imm12 * 8)
            }
        }
        w if w & 0xFFE0_FC00 == 0xF820_6800 => {
            format!("str {}, [{}, {}]", x(rd), x(rn), x(rm))
        }
        w if w & 0xFFE0_FC00 == 0xF860_6800 => {
            format!("ldr {}, [{}, {}]", x(rd), x(rn), x(rm))
        }
        w if w & 0xFFE0_FC00 == 0xB860_7800 => {
            format!("ldr w{rd}, [{}, {}, lsl #2]", x(rn), x(rm))
        }
        w if w & 0xFFFF_FC00 == 0xC89F_FC00 => format!("stlr {}, [{}]", x(rd), x(rn)),
        w if w & 0xFF00_0000 == 0xB500_0000 => {
            let off = sign_extend((w >> 5) & 0x7_ffff, 19);
            format!("cbnz {}, {:#x}", x(rd), target(off))
        }
        w if w & 0xFC00_0000 == 0x1400_0000 => {
            format!("b {:#x}", target(sign_extend(w & 0x3ff_ffff, 26)))
        }
        w if w & 0xFF00_0010 == 0x5400_0000 => {
            let cond = match w & 15 {
                NE => "ne",
                LO => "cc",
                _ => return None,
            };
            let off = sign_extend((w >> 5) & 0x7_ffff, 19);
            format!("b.{cond} {:#x}", target(off))
        }
        w if w & 0x9F00_0000 == 0x9000_0000 => {
            let pages = sign_extend(((w >> 5) & 0x7_ffff) << 2 | ((w >> 29) & 3), 21);
            let base = addr & !0xfff;
            format!(
                "adrp {}, {:#x}",
                x(rd),
                base.wrapping_add_signed(pages * 4096)
            )
        }
        w if w & 0xFFE0_001F == 0xD400_0002 => format!("hvc #{:#x}", (w >> 5) & 0xffff),
        NOP => "nop".into(),
        _ => return None,
    };
    Some(text)
}
