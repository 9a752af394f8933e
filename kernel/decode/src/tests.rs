//! Table-driven tests of every decoded form, prefix combination and length rule, and of the
//! register semantics of loads and stores. The cross-check against iced-x86 is in
//! `tests/iced.rs`.

use super::*;
use proptest::prelude::*;

use DecodeError::{RegisterOperand, TooLong, Truncated, Unsupported, UnsupportedPrefix};
use Gpr::*;
use Size::{B1, B2, B4, B8};

/// What `decode` should return.
type Expected = Result<Instruction, DecodeError>;

/// A register file backed by an array, for `store_value`/`complete_load`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FakeRegs([u64; 16]);

impl FakeRegs {
    /// Every register holds a distinct, recognizable value.
    fn new() -> Self {
        Self(core::array::from_fn(|i| 0x1122_3344_5566_7788 ^ ((i as u64) << 56)))
    }
}

impl Registers for FakeRegs {
    fn get(&self, reg: Gpr) -> u64 {
        self.0[usize::from(reg.number())]
    }
    fn set(&mut self, reg: Gpr, value: u64) {
        self.0[usize::from(reg.number())] = value;
    }
}

const fn r(reg: Gpr, width: Size) -> RegOperand {
    RegOperand { reg, width, high_byte: false }
}

const fn hi(reg: Gpr) -> RegOperand {
    RegOperand { reg, width: B1, high_byte: true }
}

const fn load(len: u8, size: Size, dst: RegOperand, extend: Extend) -> Expected {
    Ok(Instruction { len, size, op: Op::Load { dst, extend } })
}

const fn mov_load(len: u8, dst: RegOperand) -> Expected {
    load(len, dst.width, dst, Extend::None)
}

const fn store(len: u8, src: RegOperand) -> Expected {
    Ok(Instruction { len, size: src.width, op: Op::Store { src: Source::Reg(src) } })
}

const fn store_imm(len: u8, size: Size, imm: u64) -> Expected {
    Ok(Instruction { len, size, op: Op::Store { src: Source::Imm(imm) } })
}

/// Runs a table of (bytes, expected result), naming the failing row.
fn check_table(table: &[(&[u8], Expected)]) {
    for (bytes, expected) in table {
        assert_eq!(decode(bytes), *expected, "bytes {bytes:02x?}");
    }
}

#[test]
fn mov_register_forms() {
    check_table(&[
        // 88 /r: mov r/m8, r8. Without REX, reg 4-7 are AH, CH, DH, BH.
        (&[0x88, 0x00], store(2, r(Rax, B1))),
        (&[0x88, 0x08], store(2, r(Rcx, B1))),
        (&[0x88, 0x18], store(2, r(Rbx, B1))),
        (&[0x88, 0x20], store(2, hi(Rax))),
        (&[0x88, 0x28], store(2, hi(Rcx))),
        (&[0x88, 0x30], store(2, hi(Rdx))),
        (&[0x88, 0x38], store(2, hi(Rbx))),
        // With any REX (even 40), they are SPL, BPL, SIL, DIL.
        (&[0x40, 0x88, 0x20], store(3, r(Rsp, B1))),
        (&[0x40, 0x88, 0x28], store(3, r(Rbp, B1))),
        (&[0x41, 0x88, 0x30], store(3, r(Rsi, B1))),
        (&[0x48, 0x88, 0x38], store(3, r(Rdi, B1))),
        (&[0x44, 0x88, 0x20], store(3, r(R12, B1))),
        (&[0x44, 0x88, 0x00], store(3, r(R8, B1))),
        (&[0x4c, 0x88, 0x38], store(3, r(R15, B1))),
        // 66 and REX.W do not change a byte operation.
        (&[0x66, 0x88, 0x20], store(3, hi(Rax))),
        (&[0x48, 0x88, 0x00], store(3, r(Rax, B1))),
        // 89 /r: mov r/m16/32/64, r.
        (&[0x89, 0x00], store(2, r(Rax, B4))),
        (&[0x89, 0x20], store(2, r(Rsp, B4))),
        (&[0x89, 0x38], store(2, r(Rdi, B4))),
        (&[0x66, 0x89, 0x00], store(3, r(Rax, B2))),
        (&[0x48, 0x89, 0x00], store(3, r(Rax, B8))),
        (&[0x4c, 0x89, 0x08], store(3, r(R9, B8))),
        (&[0x44, 0x89, 0x38], store(3, r(R15, B4))),
        (&[0x66, 0x44, 0x89, 0x10], store(4, r(R10, B2))),
        // REX.B and REX.X only extend the address registers.
        (&[0x41, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x42, 0x89, 0x04, 0x00], store(4, r(Rax, B4))),
        // REX.W beats 66.
        (&[0x66, 0x48, 0x89, 0x00], store(4, r(Rax, B8))),
        // 8A /r, 8B /r: the loads.
        (&[0x8a, 0x00], mov_load(2, r(Rax, B1))),
        (&[0x8a, 0x20], mov_load(2, hi(Rax))),
        (&[0x8a, 0x38], mov_load(2, hi(Rbx))),
        (&[0x40, 0x8a, 0x38], mov_load(3, r(Rdi, B1))),
        (&[0x45, 0x8a, 0x18], mov_load(3, r(R11, B1))),
        (&[0x8b, 0x00], mov_load(2, r(Rax, B4))),
        (&[0x8b, 0x18], mov_load(2, r(Rbx, B4))),
        (&[0x66, 0x8b, 0x08], mov_load(3, r(Rcx, B2))),
        (&[0x48, 0x8b, 0x10], mov_load(3, r(Rdx, B8))),
        (&[0x4d, 0x8b, 0x30], mov_load(3, r(R14, B8))),
        (&[0x66, 0x4f, 0x8b, 0x30], mov_load(4, r(R14, B8))),
    ]);
}

#[test]
fn mov_immediate_forms() {
    check_table(&[
        // C6 /0 ib.
        (&[0xc6, 0x00, 0xab], store_imm(3, B1, 0xab)),
        (&[0xc6, 0x40, 0x08, 0x80], store_imm(4, B1, 0x80)),
        (&[0x66, 0x48, 0xc6, 0x00, 0xff], store_imm(5, B1, 0xff)),
        // C7 /0 id; 66 → iw; REX.W → id sign-extended to 64 bits.
        (&[0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], store_imm(6, B4, 0x1234_5678)),
        (&[0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], store_imm(6, B4, 0xffff_ffff)),
        (&[0x66, 0xc7, 0x00, 0x34, 0x12], store_imm(5, B2, 0x1234)),
        (&[0x66, 0xc7, 0x00, 0x00, 0x80], store_imm(5, B2, 0x8000)),
        (&[0x48, 0xc7, 0x00, 0x78, 0x56, 0x34, 0x12], store_imm(7, B8, 0x1234_5678)),
        (&[0x48, 0xc7, 0x00, 0xff, 0xff, 0xff, 0xff], store_imm(7, B8, u64::MAX)),
        (&[0x48, 0xc7, 0x00, 0x00, 0x00, 0x00, 0x80], store_imm(7, B8, 0xffff_ffff_8000_0000)),
        (&[0x66, 0x48, 0xc7, 0x00, 0x01, 0x00, 0x00, 0x00], store_imm(8, B8, 1)),
        // REX.R is ignored (the reg field is the /0 extension).
        (&[0x4c, 0xc7, 0x00, 0x01, 0x00, 0x00, 0x00], store_imm(7, B8, 1)),
        // RIP-relative disp32 + imm32, SIB + disp32 + imm32.
        (&[0xc7, 0x05, 0x10, 0, 0, 0, 0x2a, 0, 0, 0], store_imm(10, B4, 42)),
        (&[0xc7, 0x84, 0x24, 0x10, 0, 0, 0, 0x2a, 0, 0, 0], store_imm(11, B4, 42)),
        (&[0x66, 0xc7, 0x44, 0x24, 0x08, 0xcd, 0xab], store_imm(7, B2, 0xabcd)),
        // Extensions other than /0: XABORT, XBEGIN (register forms) and #UD.
        (&[0xc6, 0x08, 0x00], Err(Unsupported(0xc6))),
        (&[0xc6, 0xf8, 0x00], Err(Unsupported(0xc6))),
        (&[0xc7, 0xf8, 0, 0, 0, 0], Err(Unsupported(0xc7))),
        (&[0xc7, 0x38, 0, 0, 0, 0], Err(Unsupported(0xc7))),
        (&[0xc7, 0xc0, 0, 0, 0, 0], Err(RegisterOperand)),
    ]);
}

#[test]
fn moffs_forms() {
    const A: [u8; 8] = [0x00, 0x10, 0x00, 0xfe, 0xff, 0xff, 0xff, 0xff];
    let with = |prefix: &[u8], opcode: u8, addr: &[u8]| {
        let mut v = prefix.to_vec();
        v.push(opcode);
        v.extend_from_slice(addr);
        v
    };
    let cases: &[(&[u8], u8, &[u8], Expected)] = &[
        (&[], 0xa0, &A, mov_load(9, r(Rax, B1))),
        (&[], 0xa1, &A, mov_load(9, r(Rax, B4))),
        (&[], 0xa2, &A, store(9, r(Rax, B1))),
        (&[], 0xa3, &A, store(9, r(Rax, B4))),
        (&[0x66], 0xa1, &A, mov_load(10, r(Rax, B2))),
        (&[0x48], 0xa1, &A, mov_load(10, r(Rax, B8))),
        (&[0x48], 0xa3, &A, store(10, r(Rax, B8))),
        (&[0x66, 0x48], 0xa3, &A, store(11, r(Rax, B8))),
        // REX.B/R do not change the accumulator; a byte form stays AL.
        (&[0x41], 0xa1, &A, mov_load(10, r(Rax, B4))),
        (&[0x4c], 0xa0, &A, mov_load(10, r(Rax, B1))),
        // 67: 4-byte moffs.
        (&[0x67], 0xa0, &A[..4], mov_load(6, r(Rax, B1))),
        (&[0x67], 0xa3, &A[..4], store(6, r(Rax, B4))),
        (&[0x67, 0x48], 0xa1, &A[..4], mov_load(7, r(Rax, B8))),
        (&[0x67, 0x66], 0xa3, &A[..4], store(7, r(Rax, B2))),
        // Short address: truncated.
        (&[], 0xa1, &A[..7], Err(Truncated)),
        (&[0x67], 0xa1, &A[..3], Err(Truncated)),
    ];
    for (prefix, opcode, addr, expected) in cases {
        let bytes = with(prefix, *opcode, addr);
        assert_eq!(decode(&bytes), *expected, "bytes {bytes:02x?}");
    }
}

#[test]
fn movzx_movsx_movsxd() {
    let zx = Extend::Zero;
    let sx = Extend::Sign;
    check_table(&[
        (&[0x0f, 0xb6, 0x00], load(3, B1, r(Rax, B4), zx)),
        (&[0x48, 0x0f, 0xb6, 0x00], load(4, B1, r(Rax, B8), zx)),
        (&[0x66, 0x0f, 0xb6, 0x00], load(4, B1, r(Rax, B2), zx)),
        // The destination is never a byte register: reg 4 is ESP, not AH.
        (&[0x0f, 0xb6, 0x20], load(3, B1, r(Rsp, B4), zx)),
        (&[0x0f, 0xb7, 0x08], load(3, B2, r(Rcx, B4), zx)),
        (&[0x66, 0x0f, 0xb7, 0x08], load(4, B2, r(Rcx, B2), zx)),
        (&[0x4c, 0x0f, 0xb7, 0x08], load(4, B2, r(R9, B8), zx)),
        (&[0x0f, 0xbe, 0x10], load(3, B1, r(Rdx, B4), sx)),
        (&[0x66, 0x0f, 0xbe, 0x10], load(4, B1, r(Rdx, B2), sx)),
        (&[0x48, 0x0f, 0xbe, 0x10], load(4, B1, r(Rdx, B8), sx)),
        (&[0x0f, 0xbf, 0x18], load(3, B2, r(Rbx, B4), sx)),
        (&[0x48, 0x0f, 0xbf, 0x18], load(4, B2, r(Rbx, B8), sx)),
        (&[0x0f, 0xb6, 0x05, 1, 2, 3, 4], load(7, B1, r(Rax, B4), zx)),
        // movsxd needs REX.W (without it, 63 is a plain 32/16-bit move and is rejected).
        (&[0x48, 0x63, 0x00], load(3, B4, r(Rax, B8), sx)),
        (&[0x4c, 0x63, 0x38], load(3, B4, r(R15, B8), sx)),
        (&[0x66, 0x48, 0x63, 0x00], load(4, B4, r(Rax, B8), sx)),
        (&[0x48, 0x63, 0x44, 0x24, 0x08], load(5, B4, r(Rax, B8), sx)),
        (&[0x63, 0x00], Err(Unsupported(0x63))),
        (&[0x66, 0x63, 0x00], Err(Unsupported(0x63))),
        (&[0x44, 0x63, 0x00], Err(Unsupported(0x63))),
        // Other 0F opcodes.
        (&[0x0f, 0x0b], Err(Unsupported(0x0f0b))),
        (&[0x0f, 0xb8, 0x00], Err(Unsupported(0x0fb8))),
        (&[0x0f, 0x1f, 0x00], Err(Unsupported(0x0f1f))),
        (&[0x0f, 0x6f, 0x00], Err(Unsupported(0x0f6f))),
        (&[0x0f], Err(Truncated)),
        (&[0x48, 0x0f, 0xb6], Err(Truncated)),
    ]);
}

#[test]
fn addressing_lengths() {
    let eax = r(Rax, B4);
    check_table(&[
        // mod 00.
        (&[0x8b, 0x00], mov_load(2, eax)),
        (&[0x8b, 0x05, 1, 2, 3, 4], mov_load(6, eax)), // RIP-relative disp32
        (&[0x8b, 0x04, 0x24], mov_load(3, eax)),       // SIB [rsp]
        (&[0x8b, 0x04, 0x25, 1, 2, 3, 4], mov_load(7, eax)), // SIB base 101: disp32, no base
        (&[0x8b, 0x04, 0xc5, 1, 2, 3, 4], mov_load(7, eax)), // [rax*8 + disp32]
        (&[0x8b, 0x04, 0x88], mov_load(3, eax)),       // [rax + rcx*4]
        // mod 01: disp8.
        (&[0x8b, 0x40, 0x10], mov_load(3, eax)),
        (&[0x8b, 0x45, 0x00], mov_load(3, eax)), // [rbp + 0]
        (&[0x8b, 0x44, 0x24, 0x08], mov_load(4, eax)),
        (&[0x8b, 0x44, 0x25, 0x08], mov_load(4, eax)), // base 101 with mod 01 is rbp + disp8
        // mod 10: disp32.
        (&[0x8b, 0x80, 1, 2, 3, 4], mov_load(6, eax)),
        (&[0x8b, 0x85, 1, 2, 3, 4], mov_load(6, eax)),
        (&[0x8b, 0x84, 0x24, 1, 2, 3, 4], mov_load(7, eax)),
        (&[0x8b, 0x84, 0x25, 1, 2, 3, 4], mov_load(7, eax)),
        // REX.B does not change the rules: r12 needs SIB, r13 with mod 00 means disp32,
        // rm 101 with mod 00 stays RIP-relative.
        (&[0x41, 0x8b, 0x04, 0x24], mov_load(4, eax)),
        (&[0x41, 0x8b, 0x45, 0x00], mov_load(4, eax)),
        (&[0x41, 0x8b, 0x05, 1, 2, 3, 4], mov_load(7, eax)),
        (&[0x43, 0x8b, 0x04, 0x2d, 1, 2, 3, 4], mov_load(8, eax)),
        // 67 keeps every ModRM/SIB/displacement size.
        (&[0x67, 0x8b, 0x00], mov_load(3, eax)),
        (&[0x67, 0x8b, 0x05, 1, 2, 3, 4], mov_load(7, eax)),
        (&[0x67, 0x8b, 0x04, 0x25, 1, 2, 3, 4], mov_load(8, eax)),
        (&[0x67, 0x8b, 0x44, 0x24, 0x08], mov_load(5, eax)),
        // Trailing bytes are not part of the instruction.
        (&[0x8b, 0x00, 0x90, 0x90, 0x90], mov_load(2, eax)),
        // Register operands cannot fault on MMIO.
        (&[0x8b, 0xc0], Err(RegisterOperand)),
        (&[0x89, 0xd8], Err(RegisterOperand)),
        (&[0x88, 0xe0], Err(RegisterOperand)),
        (&[0xc6, 0xc0, 0x01], Err(RegisterOperand)),
        (&[0x0f, 0xb6, 0xc0], Err(RegisterOperand)),
        (&[0x48, 0x63, 0xc0], Err(RegisterOperand)),
        // Truncated at every point.
        (&[], Err(Truncated)),
        (&[0x8b], Err(Truncated)),
        (&[0x8b, 0x04], Err(Truncated)),
        (&[0x8b, 0x05, 1, 2, 3], Err(Truncated)),
        (&[0x8b, 0x04, 0x25, 1, 2, 3], Err(Truncated)),
        (&[0x8b, 0x40], Err(Truncated)),
        (&[0x8b, 0x84, 0x24, 1, 2, 3], Err(Truncated)),
        (&[0xc7, 0x00, 1, 2, 3], Err(Truncated)),
        (&[0x66, 0xc7, 0x00, 1], Err(Truncated)),
        (&[0xc6, 0x00], Err(Truncated)),
    ]);
}

#[test]
fn prefixes() {
    check_table(&[
        // Segment overrides are ignored, wherever they stand among the legacy prefixes.
        (&[0x2e, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x36, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x3e, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x26, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x64, 0x89, 0x00], store(3, r(Rax, B4))),
        (&[0x65, 0x48, 0x89, 0x00], store(4, r(Rax, B8))),
        (&[0x64, 0x66, 0x65, 0x89, 0x00], store(5, r(Rax, B2))),
        // Repeated prefixes are allowed.
        (&[0x66, 0x66, 0x89, 0x00], store(4, r(Rax, B2))),
        // A REX followed by a legacy prefix is ignored: 16-bit, not 64-bit; AH, not SPL.
        (&[0x48, 0x66, 0x89, 0x00], store(4, r(Rax, B2))),
        (&[0x48, 0x65, 0x89, 0x00], store(4, r(Rax, B4))),
        (&[0x4c, 0x67, 0x89, 0x00], store(4, r(Rax, B4))),
        (&[0x40, 0x2e, 0x88, 0x20], store(4, hi(Rax))),
        (&[0x48, 0x66, 0x0f, 0xb6, 0x00], load(5, B1, r(Rax, B2), Extend::Zero)),
        (&[0x48, 0x2e, 0x63, 0x00], Err(Unsupported(0x63))),
        // Of two REX prefixes, the one before the opcode counts.
        (&[0x48, 0x44, 0x89, 0x00], store(4, r(R8, B4))),
        (&[0x44, 0x48, 0x89, 0x00], store(4, r(Rax, B8))),
        (&[0x4f, 0x40, 0x88, 0x20], store(4, r(Rsp, B1))),
        // LOCK, REPNE/XACQUIRE, REP/XRELEASE are rejected wherever they are.
        (&[0xf0, 0x89, 0x00], Err(UnsupportedPrefix(0xf0))),
        (&[0xf2, 0x89, 0x00], Err(UnsupportedPrefix(0xf2))),
        (&[0xf3, 0x89, 0x00], Err(UnsupportedPrefix(0xf3))),
        (&[0xf3, 0xc7, 0x00, 0, 0, 0, 0], Err(UnsupportedPrefix(0xf3))),
        (&[0x66, 0x2e, 0xf3, 0x88, 0x00], Err(UnsupportedPrefix(0xf3))),
        (&[0xf3, 0x0f, 0xb6, 0x00], Err(UnsupportedPrefix(0xf3))),
        (&[0xf0], Err(UnsupportedPrefix(0xf0))),
        // Other opcodes, including VEX/EVEX/XOP escapes, moves to/from segment registers and
        // string moves.
        (&[0x90], Err(Unsupported(0x90))),
        (&[0x8c, 0x00], Err(Unsupported(0x8c))),
        (&[0x8e, 0x00], Err(Unsupported(0x8e))),
        (&[0xa4], Err(Unsupported(0xa4))),
        (&[0xa5], Err(Unsupported(0xa5))),
        (&[0xc4, 0xe1, 0x79, 0x6f, 0x00], Err(Unsupported(0xc4))),
        (&[0xc5, 0xf9, 0x6f, 0x00], Err(Unsupported(0xc5))),
        (&[0x62, 0xf1, 0x7c, 0x48, 0x10, 0x00], Err(Unsupported(0x62))),
        (&[0x8f, 0x00], Err(Unsupported(0x8f))),
        (&[0x01, 0x00], Err(Unsupported(0x01))),
        (&[0x48, 0x66], Err(Truncated)),
        (&[0x66, 0x67, 0x2e, 0x48], Err(Truncated)),
    ]);
}

#[test]
fn fifteen_byte_limit() {
    // 4 prefixes + REX + C7 84 24 disp32 imm32 = 15 bytes: the longest legal form.
    let mut ok = vec![0x2e, 0x66, 0x2e, 0x48, 0xc7, 0x84, 0x24, 1, 2, 3, 4, 0xff, 0xff, 0xff, 0xff];
    assert_eq!(decode(&ok), store_imm(15, B8, u64::MAX));
    // Input longer than 15 bytes is fine while the instruction is not.
    ok.push(0x90);
    assert_eq!(decode(&ok), store_imm(15, B8, u64::MAX));
    ok.insert(0, 0x3e);
    assert_eq!(decode(&ok), Err(TooLong));
    // The limit applies before the end of the slice: 15 prefixes can never be an instruction.
    assert_eq!(decode(&[0x66; 15]), Err(TooLong));
    assert_eq!(decode(&[0x66; 40]), Err(TooLong));
    assert_eq!(decode(&[0x66; 14]), Err(Truncated));
    let mut v = vec![0x66; 14];
    v.push(0x89);
    assert_eq!(decode(&v), Err(TooLong), "ModRM would be byte 16");
    let mut v = vec![0x2e; 9];
    v.extend_from_slice(&[0x8b, 0x04, 0x25, 1, 2, 3, 4]);
    assert_eq!(decode(&v), Err(TooLong), "disp32 ends at byte 16");
    v.remove(0);
    assert_eq!(decode(&v), mov_load(15, r(Rax, B4)));
    let mut v = vec![0x2e; 6];
    v.extend_from_slice(&[0xa1, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(decode(&v), mov_load(15, r(Rax, B4)));
    v.insert(0, 0x2e);
    assert_eq!(decode(&v), Err(TooLong), "moffs64 ends at byte 16");
    // A short slice ending before the limit is Truncated, even if it will be too long.
    assert_eq!(decode(&[0x2e; 13]), Err(Truncated));
}

/// A register file where every register's bytes are distinct, before and after one load.
fn after_load(bytes: &[u8], value: u64) -> (FakeRegs, FakeRegs) {
    let insn = decode(bytes).expect("decodes");
    let before = FakeRegs::new();
    let mut after = before;
    insn.complete_load(&mut after, value);
    let Op::Load { dst, .. } = insn.op else { panic!("not a load") };
    for reg in Gpr::ALL {
        if reg != dst.reg {
            assert_eq!(after.get(reg), before.get(reg), "{reg:?} changed by {bytes:02x?}");
        }
    }
    (before, after)
}

#[test]
fn load_register_semantics() {
    const RAX0: u64 = 0x1122_3344_5566_7788;
    const RBX0: u64 = 0x1122_3344_5566_7788 ^ (3 << 56);
    let cases: &[(&[u8], u64, Gpr, u64)] = &[
        // 8-bit: merge, AH..BH into bits 15:8.
        (&[0x8a, 0x00], 0xab, Rax, 0x1122_3344_5566_77ab),
        (&[0x8a, 0x20], 0xab, Rax, 0x1122_3344_5566_ab88),
        (&[0x8a, 0x38], 0xab, Rbx, (RBX0 & !0xff00) | 0xab00),
        (&[0x40, 0x8a, 0x20], 0xab, Rsp, (FakeRegs::new().0[4] & !0xff) | 0xab),
        (&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0], 0xcd, Rax, 0x1122_3344_5566_77cd),
        // Bytes of `value` above the access size are ignored.
        (&[0x8a, 0x00], 0xffff_ffff_ffff_ff01, Rax, 0x1122_3344_5566_7701),
        // 16-bit: merge.
        (&[0x66, 0x8b, 0x00], 0xbeef, Rax, 0x1122_3344_5566_beef),
        (&[0x66, 0xa1, 0, 0, 0, 0, 0, 0, 0, 0], 0x1_beef, Rax, 0x1122_3344_5566_beef),
        // 32-bit: zero-extends to 64.
        (&[0x8b, 0x00], 0xdead_beef, Rax, 0xdead_beef),
        (&[0x8b, 0x00], 0xffff_ffff_dead_beef, Rax, 0xdead_beef),
        (&[0x44, 0x8b, 0x00], 0x8000_0000, R8, 0x8000_0000),
        // 64-bit: replaces.
        (&[0x48, 0x8b, 0x00], 0xfedc_ba98_7654_3210, Rax, 0xfedc_ba98_7654_3210),
        // movzx.
        (&[0x0f, 0xb6, 0x00], 0xff, Rax, 0xff),
        (&[0x0f, 0xb6, 0x00], 0x1234, Rax, 0x34),
        (&[0x48, 0x0f, 0xb6, 0x00], 0x80, Rax, 0x80),
        (&[0x66, 0x0f, 0xb6, 0x00], 0x80, Rax, (RAX0 & !0xffff) | 0x0080),
        (&[0x0f, 0xb7, 0x00], 0xffff, Rax, 0xffff),
        (&[0x48, 0x0f, 0xb7, 0x00], 0x8000, Rax, 0x8000),
        // movsx: to 16 (merges), to 32 (then zero-extends to 64), to 64.
        (&[0x66, 0x0f, 0xbe, 0x00], 0x80, Rax, (RAX0 & !0xffff) | 0xff80),
        (&[0x0f, 0xbe, 0x00], 0x80, Rax, 0xffff_ff80),
        (&[0x0f, 0xbe, 0x00], 0x7f, Rax, 0x7f),
        (&[0x48, 0x0f, 0xbe, 0x00], 0x80, Rax, 0xffff_ffff_ffff_ff80),
        (&[0x0f, 0xbf, 0x00], 0x8000, Rax, 0xffff_8000),
        (&[0x48, 0x0f, 0xbf, 0x00], 0x8000, Rax, 0xffff_ffff_ffff_8000),
        (&[0x66, 0x0f, 0xbf, 0x00], 0x8001, Rax, (RAX0 & !0xffff) | 0x8001),
        // movsxd.
        (&[0x48, 0x63, 0x00], 0x8000_0000, Rax, 0xffff_ffff_8000_0000),
        (&[0x48, 0x63, 0x00], 0x7fff_ffff, Rax, 0x7fff_ffff),
        (&[0x48, 0x63, 0x00], 0x1_7fff_ffff, Rax, 0x7fff_ffff),
    ];
    for (bytes, value, reg, expected) in cases {
        let (_, after) = after_load(bytes, *value);
        assert_eq!(after.get(*reg), *expected, "{bytes:02x?} with {value:#x}");
    }
}

#[test]
fn store_values() {
    let regs = FakeRegs::new();
    let rax = regs.0[0];
    let rbx = regs.0[3];
    let cases: &[(&[u8], u64)] = &[
        (&[0x88, 0x00], rax & 0xff),
        (&[0x88, 0x20], (rax >> 8) & 0xff),
        (&[0x88, 0x38], (rbx >> 8) & 0xff),
        (&[0x40, 0x88, 0x38], regs.0[7] & 0xff),
        (&[0x44, 0x88, 0x38], regs.0[15] & 0xff),
        (&[0x66, 0x89, 0x18], rbx & 0xffff),
        (&[0x89, 0x18], rbx & 0xffff_ffff),
        (&[0x48, 0x89, 0x18], rbx),
        (&[0x48, 0xa3, 0, 0, 0, 0, 0, 0, 0, 0], rax),
        (&[0xa2, 0, 0, 0, 0, 0, 0, 0, 0], rax & 0xff),
        (&[0xc6, 0x00, 0x80], 0x80),
        (&[0x66, 0xc7, 0x00, 0x00, 0x80], 0x8000),
        (&[0xc7, 0x00, 0x00, 0x00, 0x00, 0x80], 0x8000_0000),
        (&[0x48, 0xc7, 0x00, 0x00, 0x00, 0x00, 0x80], 0xffff_ffff_8000_0000),
    ];
    for (bytes, expected) in cases {
        let insn = decode(bytes).expect("decodes");
        assert!(insn.is_store());
        assert_eq!(insn.store_value(&regs), Some(*expected), "{bytes:02x?}");
        // complete_load does nothing for a store.
        let mut after = regs;
        insn.complete_load(&mut after, u64::MAX);
        assert_eq!(after, regs);
    }
    let insn = decode(&[0x8b, 0x00]).expect("decodes");
    assert!(!insn.is_store());
    assert_eq!(insn.store_value(&regs), None);
}

#[test]
fn reg_operand_round_trip() {
    for reg in Gpr::ALL {
        for width in [B1, B2, B4, B8] {
            for high_byte in [false, true] {
                if high_byte && (width != B1 || reg.number() >= 4) {
                    continue;
                }
                let op = RegOperand { reg, width, high_byte };
                let mut regs = FakeRegs::new();
                op.write(&mut regs, 0xa5a5_a5a5_a5a5_a5a5);
                assert_eq!(op.read(&regs), 0xa5a5_a5a5_a5a5_a5a5 & width.mask(), "{op:?}");
            }
        }
    }
}

#[test]
fn gpr_and_size_helpers() {
    for (i, reg) in Gpr::ALL.iter().enumerate() {
        assert_eq!(usize::from(reg.number()), i);
        assert_eq!(Gpr::from_number(i as u8), Some(*reg));
    }
    assert_eq!(Gpr::from_number(16), None);
    assert_eq!([B1, B2, B4, B8].map(Size::bytes), [1, 2, 4, 8]);
    assert_eq!(B2.sign_extend(0x1_8000), 0xffff_ffff_ffff_8000);
    assert_eq!(B4.sign_extend(0x7fff_ffff), 0x7fff_ffff);
    assert_eq!(B8.sign_extend(0x8000_0000_0000_0000), 0x8000_0000_0000_0000);
}

#[test]
fn errors_display() {
    assert_eq!(Unsupported(0x0fb8).to_string(), "unsupported opcode 0f b8");
    assert_eq!(Unsupported(0x90).to_string(), "unsupported opcode 90");
    assert_eq!(UnsupportedPrefix(0xf0).to_string(), "unsupported prefix 0xf0");
}

/// Prefixes and opcode bytes the biased property test draws from.
const BIASED: &[u8] = &[
    0x66, 0x67, 0x2e, 0x65, 0x40, 0x48, 0x44, 0x41, 0x0f, 0x88, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa0, 0xa1, 0x63, 0xb6,
    0xbf,
];

proptest! {
    /// Never panics; a result depends only on the bytes it consumed: a prefix of the input
    /// either decodes the same or says Truncated, and Truncated only for short inputs.
    #[test]
    fn prefix_stable(bytes in proptest::collection::vec(any::<u8>(), 0..20), cut in 0usize..20) {
        let full = decode(&bytes);
        if let Ok(insn) = full {
            prop_assert!(usize::from(insn.len) <= bytes.len().min(MAX_INSTRUCTION_LEN));
            prop_assert!(insn.len >= 1);
        }
        if full == Err(Truncated) {
            prop_assert!(bytes.len() < MAX_INSTRUCTION_LEN);
        }
        let short = decode(&bytes[..cut.min(bytes.len())]);
        prop_assert!(short == full || short == Err(Truncated), "{short:?} vs {full:?}");
    }

    /// The same for inputs made mostly of prefixes and supported opcodes.
    #[test]
    fn prefix_stable_biased(
        head in proptest::collection::vec(prop::sample::select(BIASED), 0..16),
        tail in proptest::collection::vec(any::<u8>(), 0..12),
        cut in 0usize..28,
    ) {
        let bytes = [head, tail].concat();
        let full = decode(&bytes);
        if let Ok(insn) = full {
            prop_assert!(usize::from(insn.len) <= bytes.len().min(MAX_INSTRUCTION_LEN));
        }
        let short = decode(&bytes[..cut.min(bytes.len())]);
        prop_assert!(short == full || short == Err(Truncated), "{short:?} vs {full:?}");
    }
}
