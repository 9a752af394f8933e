//! Fault records (VT-d spec §11.4.14) and fault reasons (Appendix A).

/// A decoded primary fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FaultRecord {
    /// Requester (source) ID.
    pub source_id: u16,
    /// Fault reason.
    pub reason: u8,
    /// Faulting page address (DMA faults) or, for interrupt-remapping faults, the interrupt
    /// index in bits 63:48.
    pub info: u64,
    /// The request was a read (else a write or atomic).
    pub read: bool,
}

impl FaultRecord {
    /// Decodes the two quadwords of a record (`None` when its F bit is clear).
    pub const fn decode(lo: u64, hi: u64) -> Option<Self> {
        if hi >> 63 == 0 {
            return None;
        }
        Some(Self { source_id: hi as u16, reason: (hi >> 32) as u8, info: lo & !0xfff, read: (hi >> 62) & 1 != 0 })
    }

    /// True for interrupt-remapping faults (reasons 20h–27h).
    pub const fn is_interrupt(&self) -> bool {
        self.reason >= 0x20 && self.reason <= 0x27
    }
}

/// A fault reason's name.
pub const fn reason_name(reason: u8) -> &'static str {
    match reason {
        0x01 => "root entry not present",
        0x02 => "context entry not present",
        0x03 => "invalid context entry",
        0x04 => "address beyond the address width",
        0x05 => "write without write permission",
        0x06 => "read without read permission",
        0x07 => "second-level table access error",
        0x08 => "root table access error",
        0x09 => "context table access error",
        0x0a => "root entry reserved bits",
        0x0b => "context entry reserved bits",
        0x0c => "second-level entry reserved bits",
        0x0d => "translation type blocked",
        0x20 => "interrupt request reserved fields",
        0x21 => "interrupt index beyond the table",
        0x22 => "interrupt entry not present",
        0x23 => "interrupt table access error",
        0x24 => "interrupt entry reserved fields",
        0x25 => "compatibility-format interrupt blocked",
        0x26 => "interrupt source-id mismatch",
        0x27 => "posted interrupt entry error",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_dma_write_fault() {
        // QEMU's edu (00:02.0, SID 0x10) writing an unmapped IOVA: reason 5.
        let hi = 1u64 << 63 | 5u64 << 32 | 0x10;
        let r = FaultRecord::decode(0x30_0123, hi).unwrap();
        assert_eq!(r, FaultRecord { source_id: 0x10, reason: 5, info: 0x30_0000, read: false });
        assert!(!r.is_interrupt());
        assert_eq!(reason_name(r.reason), "write without write permission");
        assert_eq!(FaultRecord::decode(0, hi & !(1 << 63)), None);
        let read = FaultRecord::decode(0, hi | 1 << 62).unwrap();
        assert!(read.read);
        assert!(FaultRecord::decode(0, 1 << 63 | 0x26u64 << 32).unwrap().is_interrupt());
    }
}
