//! Fuzzes the MMIO instruction decoder with arbitrary guest bytes: `decode` must not panic, and
//! whatever it accepts must be self-consistent: a length within the input and the 15-byte
//! limit, an access size of 1, 2, 4 or 8, the same answer from exactly the instruction's bytes
//! and `Truncated` from one byte fewer; `store_value` answers for stores only, within the access
//! size; `complete_load` leaves every register but the destination alone and writes the
//! destination with x86 semantics (merge for 8/16 bits, zero-extension for 32).
#![no_main]

use conduit_decode::{DecodeError, Gpr, MAX_INSTRUCTION_LEN, Op, Registers, Size, decode};
use libfuzzer_sys::fuzz_target;

/// A register file with a distinct value in every byte of every register.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FakeRegs([u64; 16]);

impl FakeRegs {
    fn new(seed: u64) -> Self {
        Self(core::array::from_fn(|i| seed.rotate_left(i as u32 * 4) ^ (0x0101_0101_0101_0101 * i as u64)))
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

fuzz_target!(|data: &[u8]| {
    let result = decode(data);
    let insn = match result {
        Ok(insn) => insn,
        Err(DecodeError::Truncated) => {
            assert!(data.len() < MAX_INSTRUCTION_LEN);
            return;
        }
        Err(_) => return,
    };
    let len = usize::from(insn.len);
    assert!((1..=MAX_INSTRUCTION_LEN).contains(&len) && len <= data.len(), "{insn:?}");
    assert!(matches!(insn.size.bytes(), 1 | 2 | 4 | 8));
    assert_eq!(decode(&data[..len]), result, "depends on bytes past the instruction");
    assert_eq!(decode(&data[..len - 1]), Err(DecodeError::Truncated), "complete one byte early");

    // The bytes after the instruction seed the registers and the value memory returns.
    let mut seed = [0u8; 8];
    for (i, b) in data[len..].iter().enumerate() {
        seed[i % 8] ^= b;
    }
    let seed = u64::from_le_bytes(seed);
    let before = FakeRegs::new(seed ^ 0x9e37_79b9_7f4a_7c15);
    let value = seed.rotate_left(29) ^ 0xa5a5_a5a5_a5a5_a5a5;
    let mut after = before;
    insn.complete_load(&mut after, value);
    match insn.op {
        Op::Store { .. } => {
            let stored = insn.store_value(&before).expect("a store has a value");
            assert_eq!(stored & !insn.size.mask(), 0, "value wider than the access");
            assert_eq!(after, before, "complete_load changed registers on a store");
        }
        Op::Load { dst, .. } => {
            assert_eq!(insn.store_value(&before), None);
            assert!(dst.width >= insn.size, "destination narrower than the access");
            assert!(!dst.high_byte || dst.width == Size::B1);
            for reg in Gpr::ALL {
                if reg != dst.reg {
                    assert_eq!(after.get(reg), before.get(reg), "{reg:?} changed by {insn:?}");
                }
            }
            let (old, new) = (before.get(dst.reg), after.get(dst.reg));
            let written = match (dst.width, dst.high_byte) {
                (Size::B1, true) => 0xff00,
                (Size::B4 | Size::B8, _) => u64::MAX,
                (width, false) => width.mask(),
                (_, true) => unreachable!(),
            };
            assert_eq!(new & !written, old & !written, "bits outside the destination changed");
            if dst.width == Size::B4 {
                assert_eq!(new >> 32, 0, "32-bit destination not zero-extended");
            }
            // What was read back through the operand is the loaded value, widened.
            let low = value & insn.size.mask();
            assert_eq!(dst.read(&after) & insn.size.mask(), low, "loaded value lost");
        }
    }
});
