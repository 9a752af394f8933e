//! Decoding a guest's MSI message (address, data) into the guest vector and destination it
//! asks for. Conduit accepts only what maps onto one vCPU: physical destination mode, no
//! redirection hint, fixed or lowest-priority delivery, edge-triggered, a vector ≥ 16.
//! Anything else decodes to `None`, which leaves the vector unbound (its signals are
//! spurious) — a guest that writes nonsense only silences its own interrupt.
//!
//! Field positions: Intel SDM Vol. 3A, "Message Signalled Interrupts": "Message Address
//! Register Format" and "Message Data Register Format" (AMD APM Vol. 2 has the same layout).

/// Message Address fields.
pub mod address {
    /// Bits 31:20 must hold `BASE >> 20` (0xFEE).
    pub const BASE_MASK: u64 = 0xfff0_0000;
    /// The interrupt address window.
    pub const BASE: u64 = 0xfee0_0000;
    /// Destination ID, bits 19:12.
    pub const DEST_SHIFT: u32 = 12;
    /// Redirection hint, bit 3.
    pub const REDIRECTION_HINT: u64 = 1 << 3;
    /// Destination mode, bit 2 (1 = logical).
    pub const DEST_LOGICAL: u64 = 1 << 2;
    /// Bits 63:32: must be zero (the window is below 4 GiB).
    pub const HIGH_MASK: u64 = 0xffff_ffff_0000_0000;
}

/// Message Data fields.
pub mod data {
    /// Vector, bits 7:0.
    pub const VECTOR_MASK: u32 = 0xff;
    /// Delivery mode, bits 10:8.
    pub const DELIVERY_SHIFT: u32 = 8;
    /// Delivery mode field (after the shift).
    pub const DELIVERY_MASK: u32 = 0b111;
    /// Delivery mode: fixed.
    pub const DELIVERY_FIXED: u32 = 0b000;
    /// Delivery mode: lowest priority (delivered to the named vCPU: Conduit does not
    /// arbitrate).
    pub const DELIVERY_LOWEST: u32 = 0b001;
    /// Level for level-triggered messages, bit 14 (ignored for edge).
    pub const LEVEL_ASSERT: u32 = 1 << 14;
    /// Trigger mode, bit 15 (1 = level).
    pub const TRIGGER_LEVEL: u32 = 1 << 15;
}

/// First vector a message may name (0–15 are illegal on the local APIC).
pub const FIRST_VECTOR: u8 = 16;

/// A decoded guest message: deliver `vector` to the vCPU whose APIC ID is `dest_apic` (in a
/// Conduit partition, the vCPU index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GuestMsi {
    /// Destination APIC ID.
    pub dest_apic: u8,
    /// Guest vector.
    pub vector: u8,
}

/// Decodes a message; `None` for anything Conduit does not deliver.
pub const fn decode(addr: u64, msg_data: u32) -> Option<GuestMsi> {
    if addr & address::HIGH_MASK != 0
        || addr & address::BASE_MASK != address::BASE
        || addr & (address::REDIRECTION_HINT | address::DEST_LOGICAL) != 0
    {
        return None;
    }
    let mode = (msg_data >> data::DELIVERY_SHIFT) & data::DELIVERY_MASK;
    if (mode != data::DELIVERY_FIXED && mode != data::DELIVERY_LOWEST) || msg_data & data::TRIGGER_LEVEL != 0 {
        return None;
    }
    let vector = (msg_data & data::VECTOR_MASK) as u8;
    if vector < FIRST_VECTOR {
        return None;
    }
    Some(GuestMsi { dest_apic: (addr >> address::DEST_SHIFT) as u8, vector })
}

/// The message a driver writes for `msi` (physical, fixed, edge): `(address, data)`.
pub const fn encode(msi: GuestMsi) -> (u64, u32) {
    (address::BASE | (msi.dest_apic as u64) << address::DEST_SHIFT, msi.vector as u32)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The constants against the SDM's figures (bit positions as printed there).
    #[test]
    fn constants_match_the_sdm() {
        assert_eq!(address::BASE >> 20, 0xfee, "address bits 31:20 = 0FEEH");
        assert_eq!(address::DEST_SHIFT, 12, "destination ID at 19:12");
        assert_eq!(address::REDIRECTION_HINT.trailing_zeros(), 3, "RH at bit 3");
        assert_eq!(address::DEST_LOGICAL.trailing_zeros(), 2, "DM at bit 2");
        assert_eq!(data::DELIVERY_SHIFT, 8, "delivery mode at 10:8");
        assert_eq!(data::LEVEL_ASSERT.trailing_zeros(), 14, "level at bit 14");
        assert_eq!(data::TRIGGER_LEVEL.trailing_zeros(), 15, "trigger mode at bit 15");
    }

    #[test]
    fn accepts_and_rejects() {
        let ok = GuestMsi { dest_apic: 3, vector: 0x51 };
        let (a, d) = encode(ok);
        assert_eq!((a, d), (0xfee0_3000, 0x51));
        assert_eq!(decode(a, d), Some(ok));
        assert_eq!(decode(a, d | 1 << 8), Some(ok), "lowest priority");
        assert_eq!(decode(a, d | data::LEVEL_ASSERT), Some(ok), "level bit ignored for edge");
        assert_eq!(decode(a | 0b11, d), Some(ok), "reserved low bits ignored");
        for bad_mode in 2..8u32 {
            assert_eq!(decode(a, d | bad_mode << 8), None, "mode {bad_mode}");
        }
        assert_eq!(decode(a, d | data::TRIGGER_LEVEL), None, "level-triggered");
        assert_eq!(decode(a | address::DEST_LOGICAL, d), None, "logical destination");
        assert_eq!(decode(a | address::REDIRECTION_HINT, d), None, "redirection hint");
        assert_eq!(decode(0xfed0_3000, d), None, "outside the window");
        assert_eq!(decode(a | 1 << 32, d), None, "high address");
        assert_eq!(decode(a, 15), None, "reserved vector");
        assert_eq!(decode(a, 16).map(|m| m.vector), Some(16));
        assert_eq!(decode(0, 0), None, "a zeroed entry");
    }

    proptest! {
        /// Never panics; whatever decodes re-encodes to an equivalent message.
        #[test]
        fn roundtrip(a in any::<u64>(), d in any::<u32>()) {
            if let Some(m) = decode(a, d) {
                prop_assert!(m.vector >= FIRST_VECTOR);
                let (a2, d2) = encode(m);
                prop_assert_eq!(decode(a2, d2), Some(m));
            }
        }
    }
}
