//! Decoder for the x86-64 instructions a guest uses to access emulated MMIO.
//!
//! When a guest touches a guest-physical page that Conduit emulates (a virtual device register,
//! the MSI-X table of a passed-through device, a doorbell page), the nested page walk fails and
//! the vCPU exits with a nested page fault. The exit gives the faulting guest-physical address
//! and whether it was a read or a write, but not the access width, the register or immediate
//! involved, nor the length of the instruction: SVM only supplies the instruction bytes with
//! *decode assists*, and the target platform has none. So the hypervisor fetches the bytes at
//! the guest's RIP itself and hands them to [`decode`], which answers with an [`Instruction`]:
//! how many bytes it occupies (to advance RIP), how many bytes it moves, and whether it is a
//! [`Op::Load`] into a register or an [`Op::Store`] of a register or an immediate. The
//! hypervisor then performs the access on the emulated device and, for a load, completes it
//! with [`Instruction::complete_load`], which applies x86 register-write semantics.
//!
//! Drivers access MMIO with plain `mov`s (Linux `readl`/`writel`, Rust `read_volatile`), so
//! only those forms are decoded, for a guest in 64-bit mode (CS.L = 1):
//!
//! | opcode         | instruction                     | direction |
//! |----------------|---------------------------------|-----------|
//! | `88 /r`        | `mov r/m8, r8`                  | store     |
//! | `89 /r`        | `mov r/m16/32/64, r16/32/64`    | store     |
//! | `8A /r`        | `mov r8, r/m8`                  | load      |
//! | `8B /r`        | `mov r16/32/64, r/m16/32/64`    | load      |
//! | `C6 /0 ib`     | `mov r/m8, imm8`                | store     |
//! | `C7 /0 iw/id`  | `mov r/m16/32/64, imm16/32`     | store     |
//! | `A0`–`A3`      | `mov AL/eAX/rAX` ↔ `moffs`      | both      |
//! | `0F B6`/`0F B7`| `movzx r16/32/64, r/m8/16`      | load      |
//! | `0F BE`/`0F BF`| `movsx r16/32/64, r/m8/16`      | load      |
//! | `REX.W 63 /r`  | `movsxd r64, r/m32`             | load      |
//!
//! Accepted prefixes: `66` (16-bit operand size), `67` (32-bit address size: it only shortens a
//! `moffs` to 4 bytes; ModRM, SIB and displacements keep their sizes in 64-bit mode), the segment
//! overrides `26 2E 36 3E 64 65` (ignored: the fault already gives the physical address) and REX
//! `40`–`4F`. As the SDM says (Vol. 2A §2.2.1), a REX prefix counts only when it immediately
//! precedes the opcode: one followed by another prefix is ignored. `LOCK` (`F0`) and `F2`/`F3`
//! are rejected, as is every other opcode, and every ModRM with `mod = 11` (a register operand
//! cannot fault on MMIO). The decoder is strict: whatever it does not know, it rejects.
//!
//! [`decode`] is pure and allocation-free, reads nothing past the slice it is given (which may
//! stop early, at a page boundary: [`DecodeError::Truncated`]) and never panics, on any input.
//! It is cross-checked against iced-x86 by property tests and fuzzed with cargo-fuzz.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use core::fmt;

/// Architectural limit on the length of one instruction (SDM Vol. 2A §2.1: "The maximum length
/// of an Intel 64 and IA-32 instruction remains 15 bytes"); a longer one raises #GP.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// A general-purpose register, numbered as the hardware encodes it (ModRM.reg plus REX.R).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Gpr {
    /// Register 0 (`AL`/`AX`/`EAX`/`RAX`; `AH` is its bits 15:8).
    Rax = 0,
    /// Register 1 (`CL`/`CX`/`ECX`/`RCX`; `CH` is its bits 15:8).
    Rcx = 1,
    /// Register 2 (`DL`/`DX`/`EDX`/`RDX`; `DH` is its bits 15:8).
    Rdx = 2,
    /// Register 3 (`BL`/`BX`/`EBX`/`RBX`; `BH` is its bits 15:8).
    Rbx = 3,
    /// Register 4 (`SPL`/`SP`/`ESP`/`RSP`).
    Rsp = 4,
    /// Register 5 (`BPL`/`BP`/`EBP`/`RBP`).
    Rbp = 5,
    /// Register 6 (`SIL`/`SI`/`ESI`/`RSI`).
    Rsi = 6,
    /// Register 7 (`DIL`/`DI`/`EDI`/`RDI`).
    Rdi = 7,
    /// Register 8.
    R8 = 8,
    /// Register 9.
    R9 = 9,
    /// Register 10.
    R10 = 10,
    /// Register 11.
    R11 = 11,
    /// Register 12.
    R12 = 12,
    /// Register 13.
    R13 = 13,
    /// Register 14.
    R14 = 14,
    /// Register 15.
    R15 = 15,
}

impl Gpr {
    /// Every register, indexed by its hardware number.
    pub const ALL: [Self; 16] = [
        Self::Rax,
        Self::Rcx,
        Self::Rdx,
        Self::Rbx,
        Self::Rsp,
        Self::Rbp,
        Self::Rsi,
        Self::Rdi,
        Self::R8,
        Self::R9,
        Self::R10,
        Self::R11,
        Self::R12,
        Self::R13,
        Self::R14,
        Self::R15,
    ];

    /// The register with hardware number `number`, or `None` above 15.
    pub const fn from_number(number: u8) -> Option<Self> {
        if number < 16 { Some(Self::ALL[number as usize]) } else { None }
    }

    /// The hardware number, 0–15.
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// The register numbered by the low four bits of `bits`.
    const fn low4(bits: u8) -> Self {
        Self::ALL[(bits & 0xf) as usize]
    }
}

/// The guest's general-purpose registers, as the caller stores them (VMCB for RAX/RSP, a save
/// area for the rest on SVM). Values are always the full 64 bits.
pub trait Registers {
    /// The full 64-bit value of `reg`.
    fn get(&self, reg: Gpr) -> u64;
    /// Sets the full 64-bit value of `reg`.
    fn set(&mut self, reg: Gpr, value: u64);
}

/// A width in bytes: of a memory access or of a register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Size {
    /// 1 byte.
    B1 = 1,
    /// 2 bytes.
    B2 = 2,
    /// 4 bytes.
    B4 = 4,
    /// 8 bytes.
    B8 = 8,
}

impl Size {
    /// The width in bytes.
    pub const fn bytes(self) -> u8 {
        self as u8
    }

    /// A mask of the low `self.bytes()` bytes.
    pub const fn mask(self) -> u64 {
        match self {
            Self::B1 => 0xff,
            Self::B2 => 0xffff,
            Self::B4 => 0xffff_ffff,
            Self::B8 => u64::MAX,
        }
    }

    /// `value` (low `self.bytes()` bytes) sign-extended to 64 bits.
    pub const fn sign_extend(self, value: u64) -> u64 {
        // The `as` casts reinterpret and truncate on purpose: this is what sign extension is.
        match self {
            Self::B1 => value as u8 as i8 as i64 as u64,
            Self::B2 => value as u16 as i16 as i64 as u64,
            Self::B4 => value as u32 as i32 as i64 as u64,
            Self::B8 => value,
        }
    }
}

/// A register operand of an instruction: which register, which part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RegOperand {
    /// The register.
    pub reg: Gpr,
    /// How many of its bytes the instruction uses.
    pub width: Size,
    /// With `width == B1`: bits 15:8 (`AH`, `CH`, `DH`, `BH`, encodable only without REX)
    /// instead of bits 7:0. Always false for wider operands.
    pub high_byte: bool,
}

impl RegOperand {
    /// The operand's value, zero-extended to 64 bits.
    pub fn read(&self, regs: &impl Registers) -> u64 {
        let full = regs.get(self.reg);
        if self.high_byte && self.width == Size::B1 { (full >> 8) & 0xff } else { full & self.width.mask() }
    }

    /// Writes the low `width` bytes of `value` to the operand as an x86 `mov` to a register
    /// does: 8- and 16-bit writes merge into the register (AH..BH into bits 15:8), a 32-bit
    /// write zero-extends to 64 bits, a 64-bit write replaces the register.
    pub fn write(&self, regs: &mut impl Registers, value: u64) {
        let new = match self.width {
            Size::B1 if self.high_byte => (regs.get(self.reg) & !0xff00) | ((value & 0xff) << 8),
            Size::B1 | Size::B2 => (regs.get(self.reg) & !self.width.mask()) | (value & self.width.mask()),
            Size::B4 => value & Size::B4.mask(),
            Size::B8 => value,
        };
        regs.set(self.reg, new);
    }
}

/// How a load widens the value read from memory into its destination register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Extend {
    /// `mov`: the destination is as wide as the access.
    None,
    /// `movzx`: zero-extended to the destination width.
    Zero,
    /// `movsx`, `movsxd`: sign-extended to the destination width.
    Sign,
}

/// What a store writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Source {
    /// A register (as wide as the access).
    Reg(RegOperand),
    /// An immediate, already extended to the access size as the CPU stores it (the `imm32` of
    /// `REX.W C7` is sign-extended to 64 bits); bits above the access size are zero.
    Imm(u64),
}

/// The operation: a load from or a store to the faulting address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Op {
    /// Memory is read into `dst`, widened as `extend` says.
    Load {
        /// The destination register.
        dst: RegOperand,
        /// How the value read widens to `dst.width`.
        extend: Extend,
    },
    /// Memory is written with `src`.
    Store {
        /// The value written.
        src: Source,
    },
}

/// A decoded MMIO access instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Instruction {
    /// Length in bytes, prefixes included (1–15): add it to RIP once the access is emulated.
    pub len: u8,
    /// How many bytes move to or from memory.
    pub size: Size,
    /// Load or store, and the register or immediate involved.
    pub op: Op,
}

impl Instruction {
    /// Whether the instruction writes memory.
    pub const fn is_store(&self) -> bool {
        matches!(self.op, Op::Store { .. })
    }

    /// The value a store writes to memory (the low `size` bytes; the rest are zero), read from
    /// `regs` for a register source. `None` for a load.
    pub fn store_value(&self, regs: &impl Registers) -> Option<u64> {
        match self.op {
            Op::Store { src: Source::Reg(src) } => Some(src.read(regs) & self.size.mask()),
            Op::Store { src: Source::Imm(imm) } => Some(imm & self.size.mask()),
            Op::Load { .. } => None,
        }
    }

    /// Completes a load: `value` is what memory returned (its low `size` bytes count). Writes
    /// the destination register with x86 semantics: the value is zero- or sign-extended as the
    /// instruction says, then written as [`RegOperand::write`] does (8/16-bit destinations
    /// merge, 32-bit destinations zero-extend to 64 bits). Does nothing for a store.
    pub fn complete_load(&self, regs: &mut impl Registers, value: u64) {
        if let Op::Load { dst, extend } = self.op {
            let value = match extend {
                Extend::None | Extend::Zero => value & self.size.mask(),
                Extend::Sign => self.size.sign_extend(value),
            };
            dst.write(regs, value);
        }
    }
}

/// Why bytes did not decode to a supported instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    /// The bytes end before the instruction does (the fetch stopped at a page boundary, or
    /// nothing was fetched): fetch more and decode again. Only returned for inputs shorter
    /// than [`MAX_INSTRUCTION_LEN`].
    Truncated,
    /// The instruction would be longer than [`MAX_INSTRUCTION_LEN`] bytes (the CPU raises #GP).
    TooLong,
    /// A prefix that is not accepted: `F0` (LOCK), `F2` or `F3`.
    UnsupportedPrefix(u8),
    /// An opcode that is not decoded, or a supported opcode with an unsupported ModRM.reg
    /// extension (`C6`/`C7` other than `/0`), or `63` without REX.W. One-byte opcodes are
    /// given as `0x00XX`, two-byte ones (after the `0F` escape) as `0x0FXX`.
    Unsupported(u16),
    /// ModRM selects a register (`mod = 11`), not memory: this cannot have faulted on MMIO.
    RegisterOperand,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated => f.write_str("instruction bytes end early"),
            Self::TooLong => f.write_str("instruction longer than 15 bytes"),
            Self::UnsupportedPrefix(p) => write!(f, "unsupported prefix {p:#04x}"),
            Self::Unsupported(op) if *op > 0xff => write!(f, "unsupported opcode 0f {:02x}", op & 0xff),
            Self::Unsupported(op) => write!(f, "unsupported opcode {op:02x}"),
            Self::RegisterOperand => f.write_str("register operand where memory was expected"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Reads instruction bytes in order, enforcing the 15-byte limit before the slice's end.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    /// Consumes `n` bytes and returns them as a little-endian integer (`n <= 8`).
    fn take(&mut self, n: usize) -> Result<u64, DecodeError> {
        debug_assert!(n <= 8);
        let end = self.pos + n;
        if end > MAX_INSTRUCTION_LEN {
            return Err(DecodeError::TooLong);
        }
        let taken = self.bytes.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(taken.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b)))
    }

    /// Consumes one byte.
    fn byte(&mut self) -> Result<u8, DecodeError> {
        // One byte taken: the value fits in a u8.
        self.take(1).map(|b| b as u8)
    }
}

/// The prefix state that reaches the opcode.
#[derive(Clone, Copy)]
struct Prefixes {
    /// `66` seen.
    operand16: bool,
    /// `67` seen.
    address32: bool,
    /// The REX byte immediately before the opcode, if any.
    rex: Option<u8>,
}

impl Prefixes {
    const fn w(self) -> bool {
        matches!(self.rex, Some(r) if r & 0x8 != 0)
    }

    const fn r(self) -> u8 {
        match self.rex {
            Some(r) => (r & 0x4) << 1,
            None => 0,
        }
    }

    /// Operand size of the non-byte forms: REX.W beats `66` (SDM Vol. 2A §2.2.1.2).
    const fn operand_size(self) -> Size {
        if self.w() {
            Size::B8
        } else if self.operand16 {
            Size::B2
        } else {
            Size::B4
        }
    }

    /// The register selected by ModRM.reg (extended by REX.R) at `width`. For byte operands
    /// without any REX prefix, 4–7 are AH, CH, DH, BH; with one, SPL, BPL, SIL, DIL.
    const fn reg(self, modrm: u8, width: Size) -> RegOperand {
        let field = (modrm >> 3) & 7;
        if matches!(width, Size::B1) && self.rex.is_none() && field >= 4 {
            RegOperand { reg: Gpr::low4(field - 4), width, high_byte: true }
        } else {
            RegOperand { reg: Gpr::low4(field | self.r()), width, high_byte: false }
        }
    }
}

/// Consumes the memory operand's SIB byte and displacement after `modrm`, if any.
fn skip_address(cur: &mut Cursor<'_>, modrm: u8) -> Result<(), DecodeError> {
    let mode = modrm >> 6;
    let rm = modrm & 7;
    if mode == 0b11 {
        return Err(DecodeError::RegisterOperand);
    }
    // SDM Vol. 2A Table 2-2 (32/64-bit ModRM) and Table 2-3 (SIB). REX.B and REX.X do not
    // change these rules: r12 as rm needs a SIB, r13 as base with mod 00 means disp32.
    let base = if rm == 0b100 { cur.byte()? & 7 } else { rm };
    let disp = match mode {
        0b01 => 1,
        0b10 => 4,
        // mod 00: rm 101 is RIP-relative disp32, SIB base 101 is disp32 without a base.
        _ if base == 0b101 => 4,
        _ => 0,
    };
    cur.take(disp).map(drop)
}

/// Decodes the instruction at the start of `bytes` (fetched at the guest's RIP, 64-bit mode).
///
/// `bytes` may be longer than the instruction (the rest is ignored) or shorter (→
/// [`DecodeError::Truncated`]). Never reads past `bytes` or past [`MAX_INSTRUCTION_LEN`], and
/// never panics. A result other than `Truncated` depends only on the instruction's own bytes,
/// so it does not change when more bytes are supplied.
pub fn decode(bytes: &[u8]) -> Result<Instruction, DecodeError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let mut p = Prefixes { operand16: false, address32: false, rex: None };
    let opcode = loop {
        let b = cur.byte()?;
        match b {
            0x66 => p.operand16 = true,
            0x67 => p.address32 = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0xf0 | 0xf2 | 0xf3 => return Err(DecodeError::UnsupportedPrefix(b)),
            0x40..=0x4f => {
                p.rex = Some(b);
                continue;
            }
            _ => break b,
        }
        // A legacy prefix after REX makes that REX ignored (SDM Vol. 2A §2.2.1).
        p.rex = None;
    };

    let wide = p.operand_size();
    let (size, op) = match opcode {
        0x88..=0x8b => {
            let width = if opcode & 1 == 0 { Size::B1 } else { wide };
            let modrm = cur.byte()?;
            skip_address(&mut cur, modrm)?;
            let reg = p.reg(modrm, width);
            let op = if opcode & 2 == 0 {
                Op::Store { src: Source::Reg(reg) }
            } else {
                Op::Load { dst: reg, extend: Extend::None }
            };
            (width, op)
        }
        0xc6 | 0xc7 => {
            let modrm = cur.byte()?;
            if modrm & 0x38 != 0 {
                return Err(DecodeError::Unsupported(opcode.into()));
            }
            skip_address(&mut cur, modrm)?;
            let (size, imm) = match (opcode, wide) {
                (0xc6, _) => (Size::B1, cur.take(1)?),
                (_, Size::B2) => (Size::B2, cur.take(2)?),
                (_, Size::B8) => (Size::B8, Size::B4.sign_extend(cur.take(4)?)),
                _ => (Size::B4, cur.take(4)?),
            };
            (size, Op::Store { src: Source::Imm(imm) })
        }
        0xa0..=0xa3 => {
            cur.take(if p.address32 { 4 } else { 8 })?;
            let width = if opcode & 1 == 0 { Size::B1 } else { wide };
            let reg = RegOperand { reg: Gpr::Rax, width, high_byte: false };
            let op = if opcode & 2 == 0 {
                Op::Load { dst: reg, extend: Extend::None }
            } else {
                Op::Store { src: Source::Reg(reg) }
            };
            (width, op)
        }
        0x63 if p.w() => {
            let modrm = cur.byte()?;
            skip_address(&mut cur, modrm)?;
            (Size::B4, Op::Load { dst: p.reg(modrm, Size::B8), extend: Extend::Sign })
        }
        0x0f => {
            let opcode2 = cur.byte()?;
            let (size, extend) = match opcode2 {
                0xb6 => (Size::B1, Extend::Zero),
                0xb7 => (Size::B2, Extend::Zero),
                0xbe => (Size::B1, Extend::Sign),
                0xbf => (Size::B2, Extend::Sign),
                _ => return Err(DecodeError::Unsupported(0x0f00 | u16::from(opcode2))),
            };
            let modrm = cur.byte()?;
            skip_address(&mut cur, modrm)?;
            (size, Op::Load { dst: p.reg(modrm, wide), extend })
        }
        _ => return Err(DecodeError::Unsupported(opcode.into())),
    };
    // The cursor never passes MAX_INSTRUCTION_LEN, so the length fits in a u8.
    Ok(Instruction { len: cur.pos as u8, size, op })
}

#[cfg(test)]
mod tests;
