//! Cross-checks `conduit_decode::decode` against iced-x86, a complete x86 decoder, in both
//! directions:
//!
//! - whenever ours decodes, iced decodes one of the supported forms with a memory operand, and
//!   agrees on the length, the memory access size, the direction, the register (including
//!   AH..BH versus SPL..DIL), the immediate and the extension;
//! - whenever iced decodes one of the supported forms with a memory operand and none of the
//!   rejected prefixes (F0, F2, F3), ours decodes too;
//! - when ours says `Truncated`, iced ran out of bytes too; when ours says `TooLong`, iced
//!   rejects the bytes as well.
//!
//! Inputs are exhaustive over the opcode, ModRM and SIB bytes of the supported forms, and random
//! (biased toward the supported opcodes with random prefixes, ModRM, SIB and displacements, and
//! fully arbitrary) in the property tests.

use conduit_decode::{
    DecodeError, Extend, Gpr, Instruction, MAX_INSTRUCTION_LEN, Op, RegOperand, Size, Source, decode,
};
use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Mnemonic, OpKind, Register};
use proptest::prelude::*;

/// The iced codes of the forms `decode` supports.
const SUPPORTED: &[Code] = &[
    Code::Mov_rm8_r8,
    Code::Mov_rm16_r16,
    Code::Mov_rm32_r32,
    Code::Mov_rm64_r64,
    Code::Mov_r8_rm8,
    Code::Mov_r16_rm16,
    Code::Mov_r32_rm32,
    Code::Mov_r64_rm64,
    Code::Mov_rm8_imm8,
    Code::Mov_rm16_imm16,
    Code::Mov_rm32_imm32,
    Code::Mov_rm64_imm32,
    Code::Mov_AL_moffs8,
    Code::Mov_AX_moffs16,
    Code::Mov_EAX_moffs32,
    Code::Mov_RAX_moffs64,
    Code::Mov_moffs8_AL,
    Code::Mov_moffs16_AX,
    Code::Mov_moffs32_EAX,
    Code::Mov_moffs64_RAX,
    Code::Movzx_r16_rm8,
    Code::Movzx_r32_rm8,
    Code::Movzx_r64_rm8,
    Code::Movzx_r16_rm16,
    Code::Movzx_r32_rm16,
    Code::Movzx_r64_rm16,
    Code::Movsx_r16_rm8,
    Code::Movsx_r32_rm8,
    Code::Movsx_r64_rm8,
    Code::Movsx_r16_rm16,
    Code::Movsx_r32_rm16,
    Code::Movsx_r64_rm16,
    Code::Movsxd_r64_rm32,
];

/// Whether the prefix bytes before the opcode contain one that `decode` rejects.
fn has_rejected_prefix(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .take(MAX_INSTRUCTION_LEN)
        .take_while(|b| {
            matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0x40..=0x4f | 0xf0 | 0xf2 | 0xf3)
        })
        .any(|b| matches!(b, 0xf0 | 0xf2 | 0xf3))
}

fn size(bytes: usize) -> Size {
    match bytes {
        1 => Size::B1,
        2 => Size::B2,
        4 => Size::B4,
        8 => Size::B8,
        _ => panic!("unexpected size {bytes}"),
    }
}

/// An iced general-purpose register as our operand.
fn reg_operand(reg: Register) -> RegOperand {
    assert!(reg.is_gpr(), "{reg:?} is not a GPR");
    let high_byte = matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH);
    let number = u8::try_from(reg.full_register().number()).expect("register number");
    RegOperand { reg: Gpr::from_number(number).expect("GPR"), width: size(reg.size()), high_byte }
}

/// Checks that our decoder and iced agree on `bytes` (see the module doc); panics otherwise.
fn cross_check(bytes: &[u8]) {
    let ours = decode(bytes);
    let mut decoder = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
    let theirs = decoder.decode();
    let error = decoder.last_error();
    let mem_operand = (0..theirs.op_count()).find(|&i| theirs.op_kind(i) == OpKind::Memory);
    let iced_supported = error == DecoderError::None
        && SUPPORTED.contains(&theirs.code())
        && mem_operand.is_some()
        && !has_rejected_prefix(bytes);
    // Built only when an assertion fails (millions of inputs pass through here).
    let ctx =
        || format!("bytes {bytes:02x?}: ours {ours:?}, iced {:?} len {} ({error:?})", theirs.code(), theirs.len());
    match ours {
        Ok(insn) => {
            assert!(iced_supported, "{}", ctx());
            compare(&insn, &theirs, ctx);
        }
        Err(e) => {
            assert!(!iced_supported, "{}", ctx());
            match e {
                DecodeError::Truncated => assert_eq!(error, DecoderError::NoMoreBytes, "{}", ctx()),
                DecodeError::TooLong => assert_ne!(error, DecoderError::None, "{}", ctx()),
                _ => {}
            }
        }
    }
}

fn compare(insn: &Instruction, theirs: &iced_x86::Instruction, ctx: impl Fn() -> String) {
    assert_eq!(usize::from(insn.len), theirs.len(), "length: {}", ctx());
    assert_eq!(insn.size, size(theirs.memory_size().size()), "size: {}", ctx());
    match insn.op {
        Op::Load { dst, extend } => {
            assert_eq!(theirs.op_count(), 2, "{}", ctx());
            assert_eq!(theirs.op_kind(0), OpKind::Register, "{}", ctx());
            assert_eq!(theirs.op_kind(1), OpKind::Memory, "{}", ctx());
            assert_eq!(dst, reg_operand(theirs.op_register(0)), "destination: {}", ctx());
            let expected = match theirs.mnemonic() {
                Mnemonic::Mov => Extend::None,
                Mnemonic::Movzx => Extend::Zero,
                Mnemonic::Movsx | Mnemonic::Movsxd => Extend::Sign,
                m => panic!("mnemonic {m:?}: {}", ctx()),
            };
            assert_eq!(extend, expected, "extension: {}", ctx());
        }
        Op::Store { src } => {
            assert_eq!(theirs.mnemonic(), Mnemonic::Mov, "{}", ctx());
            assert_eq!(theirs.op_count(), 2, "{}", ctx());
            assert_eq!(theirs.op_kind(0), OpKind::Memory, "{}", ctx());
            match src {
                Source::Reg(reg) => {
                    assert_eq!(theirs.op_kind(1), OpKind::Register, "{}", ctx());
                    assert_eq!(reg, reg_operand(theirs.op_register(1)), "source: {}", ctx());
                }
                Source::Imm(imm) => {
                    assert!(
                        matches!(
                            theirs.op_kind(1),
                            OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64
                        ),
                        "{}",
                        ctx()
                    );
                    assert_eq!(imm, theirs.immediate(1), "immediate: {}", ctx());
                }
            }
        }
    }
}

/// Filler after the opcode/ModRM/SIB: distinct bytes so a length error shows up as a
/// different displacement or immediate.
const FILLER: [u8; 12] = [0x81, 0x92, 0xa3, 0xb4, 0xc5, 0xd6, 0xe7, 0xf8, 0x09, 0x1a, 0x2b, 0x3c];

/// Prefix sequences the exhaustive tests put in front of every form.
const PREFIXES: &[&[u8]] = &[
    &[],
    &[0x66],
    &[0x67],
    &[0x40],
    &[0x41],
    &[0x44],
    &[0x48],
    &[0x4c],
    &[0x4f],
    &[0x66, 0x48],
    &[0x48, 0x66],
    &[0x2e, 0x4d],
    &[0x4d, 0x64],
    &[0x44, 0x48],
    &[0x67, 0x66, 0x45],
    &[0xf0],
    &[0xf3],
    &[0xf2, 0x48],
];

fn bytes_of(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Every opcode of the supported forms with every ModRM byte and the SIB bytes that change the
/// length (base 101 or not), behind every prefix sequence, complete and cut short.
#[test]
fn exhaustive_modrm() {
    let opcodes: &[&[u8]] = &[
        &[0x88],
        &[0x89],
        &[0x8a],
        &[0x8b],
        &[0xc6],
        &[0xc7],
        &[0x63],
        &[0x0f, 0xb6],
        &[0x0f, 0xb7],
        &[0x0f, 0xbe],
        &[0x0f, 0xbf],
    ];
    let mut accepted = 0;
    for prefix in PREFIXES {
        for opcode in opcodes {
            for modrm in 0..=255u8 {
                for sib in [0x00u8, 0x24, 0x25, 0x65, 0xe5, 0x2d] {
                    let bytes = bytes_of(&[prefix, opcode, &[modrm, sib], &FILLER]);
                    cross_check(&bytes);
                    accepted += usize::from(decode(&bytes).is_ok());
                    // Cut inside the instruction (or its filler).
                    for cut in prefix.len() + opcode.len()..bytes.len().min(MAX_INSTRUCTION_LEN) {
                        cross_check(&bytes[..cut]);
                    }
                }
            }
        }
    }
    assert!(accepted > 50_000, "only {accepted} accepted");
}

/// Every SIB byte for each ModRM mode that uses one.
#[test]
fn exhaustive_sib() {
    for prefix in [&[][..], &[0x43], &[0x67]] {
        for modrm in [0x04u8, 0x44, 0x84, 0x3c, 0x7c, 0xbc] {
            for sib in 0..=255u8 {
                cross_check(&bytes_of(&[prefix, &[0x8b, modrm, sib], &FILLER]));
                cross_check(&bytes_of(&[prefix, &[0xc7, modrm & 0xc7, sib], &FILLER]));
            }
        }
    }
}

/// The moffs forms behind every prefix sequence, complete and cut short.
#[test]
fn exhaustive_moffs() {
    for prefix in PREFIXES {
        for opcode in 0xa0..=0xa3u8 {
            let bytes = bytes_of(&[prefix, &[opcode], &FILLER]);
            cross_check(&bytes);
            for cut in 0..bytes.len() {
                cross_check(&bytes[..cut]);
            }
        }
    }
}

/// Every one- and two-byte opcode followed by every second byte: nothing outside the supported
/// forms is accepted, nothing inside them is missed.
#[test]
fn exhaustive_opcodes() {
    for prefix in [&[][..], &[0x48], &[0x66], &[0x40]] {
        for escape in [&[][..], &[0x0f]] {
            for opcode in 0..=255u8 {
                for next in 0..=255u8 {
                    cross_check(&bytes_of(&[prefix, escape, &[opcode, next], &FILLER]));
                }
            }
        }
    }
}

/// Long prefix runs around the 15-byte limit.
#[test]
fn length_limit() {
    for count in 0..=15 {
        for tail in
            [&[0x8b, 0x04, 0x25, 1, 2, 3, 4][..], &[0xa1, 1, 2, 3, 4, 5, 6, 7, 8], &[0x48, 0xc7, 0x00, 1, 2, 3, 4]]
        {
            let bytes = bytes_of(&[&vec![0x2e; count], tail]);
            cross_check(&bytes);
            cross_check(&bytes_of(&[&bytes, &FILLER]));
        }
    }
}

fn prefix_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(&[0x66u8, 0x67, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65][..]),
        3 => 0x40u8..=0x4f,
        1 => prop::sample::select(&[0xf0u8, 0xf2, 0xf3][..]),
    ]
}

fn opcode_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::sample::select(&[0x88u8, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0xa0, 0xa1, 0xa2, 0xa3, 0x63][..])
            .prop_map(|b| vec![b]),
        3 => prop::sample::select(&[0xb6u8, 0xb7, 0xbe, 0xbf][..]).prop_map(|b| vec![0x0f, b]),
        1 => any::<u8>().prop_map(|b| vec![b]),
        1 => any::<u8>().prop_map(|b| vec![0x0f, b]),
    ]
}

/// ModRM biased toward memory operands with SIB (rm 100) or RIP-relative/disp32 (rm 101).
fn modrm_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        2 => any::<u8>(),
        1 => (0u8..3, 0u8..8, prop::sample::select(&[4u8, 5][..])).prop_map(|(m, reg, rm)| (m << 6) | (reg << 3) | rm),
    ]
}

/// SIB biased toward base 101.
fn sib_byte() -> impl Strategy<Value = u8> {
    prop_oneof![1 => any::<u8>(), 1 => any::<u8>().prop_map(|b| (b & !7) | 5)]
}

fn biased_input() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(prefix_byte(), 0..6),
        opcode_bytes(),
        modrm_byte(),
        sib_byte(),
        prop::collection::vec(any::<u8>(), 0..12),
        prop::option::weighted(0.3, 0usize..16),
    )
        .prop_map(|(prefixes, opcode, modrm, sib, tail, cut)| {
            let mut bytes = [prefixes, opcode, vec![modrm, sib], tail].concat();
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn agrees_with_iced_biased(bytes in biased_input()) {
        cross_check(&bytes);
    }

    #[test]
    fn agrees_with_iced_arbitrary(bytes in prop::collection::vec(any::<u8>(), 0..20)) {
        cross_check(&bytes);
    }
}
