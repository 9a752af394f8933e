//! Queued invalidation (VT-d spec §6.5.2): 128-bit descriptors in a ring the unit consumes from
//! IQH to IQT. The ring arithmetic and descriptor encodings live here; the driver writes them
//! to memory and the tail register.

/// Descriptors per 4 KiB queue page.
pub const DESCRIPTORS_PER_PAGE: u64 = 256;
/// Bytes per descriptor.
pub const DESCRIPTOR_BYTES: u64 = 16;

/// Descriptor type of an IOTLB invalidation (bits 3:0).
pub const TYPE_IOTLB: u64 = 0x2;
/// IOTLB invalidation: drain writes (DW, bit 6; only with CAP.DWD).
pub const IOTLB_DRAIN_WRITES: u64 = 1 << 6;
/// IOTLB invalidation: drain reads (DR, bit 7; only with CAP.DRD).
pub const IOTLB_DRAIN_READS: u64 = 1 << 7;

/// Context-cache invalidation, global granularity (§6.5.2.1).
pub const fn context_global() -> (u64, u64) {
    (0x1 | 1 << 4, 0)
}

/// Context-cache invalidation for one device (granularity 11b) in `domain`.
pub const fn context_device(domain: u16, source_id: u16) -> (u64, u64) {
    (0x1 | 3 << 4 | (domain as u64) << 16 | (source_id as u64) << 32, 0)
}

/// IOTLB invalidation, global (§6.5.2.2), draining reads and writes (the unit drops the
/// drain bits its CAP does not offer before submitting).
pub const fn iotlb_global() -> (u64, u64) {
    (TYPE_IOTLB | 1 << 4 | IOTLB_DRAIN_WRITES | IOTLB_DRAIN_READS, 0)
}

/// IOTLB invalidation of one domain, draining reads and writes (as `iotlb_global`).
pub const fn iotlb_domain(domain: u16) -> (u64, u64) {
    (TYPE_IOTLB | 2 << 4 | IOTLB_DRAIN_WRITES | IOTLB_DRAIN_READS | (domain as u64) << 16, 0)
}

/// Interrupt entry cache invalidation, global (§6.5.2.7).
pub const fn iec_global() -> (u64, u64) {
    (0x4, 0)
}

/// Interrupt entry cache invalidation of one entry.
pub const fn iec_index(index: u16) -> (u64, u64) {
    (0x4 | 1 << 4 | (index as u64) << 32, 0)
}

/// Invalidation wait (§6.5.2.8) with status write: once every earlier descriptor completed,
/// the unit writes `data` to `status_addr` (4-byte aligned). Fence set: later descriptors wait.
pub const fn wait(status_addr: u64, data: u32) -> (u64, u64) {
    (0x5 | 1 << 5 | 1 << 6 | (data as u64) << 32, status_addr & !0x3)
}

/// The software side of the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ring {
    /// Entries (256 per page).
    pub entries: u64,
    /// Next slot to fill.
    pub tail: u64,
}

impl Ring {
    /// A ring of `pages` 4 KiB pages (a power of two, 1–128).
    pub const fn new(pages: u64) -> Self {
        Self { entries: pages * DESCRIPTORS_PER_PAGE, tail: 0 }
    }

    /// Free slots given the unit's head (one slot always stays empty: head == tail is empty).
    pub const fn free(&self, head: u64) -> u64 {
        (head + self.entries - self.tail - 1) % self.entries
    }

    /// Byte offset of the current tail slot, then advances the tail.
    pub fn push(&mut self) -> u64 {
        let at = self.tail * DESCRIPTOR_BYTES;
        self.tail = (self.tail + 1) % self.entries;
        at
    }

    /// The IQT register value for the current tail (bits 18:4).
    pub const fn tail_register(&self) -> u64 {
        self.tail * DESCRIPTOR_BYTES
    }

    /// The ring index from an IQH value.
    pub const fn head_index(iqh: u64) -> u64 {
        (iqh >> 4) & 0x7fff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_encodings() {
        assert_eq!(context_global(), (0x11, 0));
        assert_eq!(context_device(3, 0x0010), (0x1 | 0x30 | 3 << 16 | 0x10 << 32, 0));
        assert_eq!(iotlb_global(), (0xd2, 0));
        assert_eq!(iotlb_domain(5).0 >> 16 & 0xffff, 5);
        assert_eq!(iec_global(), (0x4, 0));
        assert_eq!(iec_index(9), (0x14 | 9 << 32, 0));
        assert_eq!(wait(0x1003, 7), (0x65 | 7 << 32, 0x1000));
    }

    #[test]
    fn ring_wraps_and_keeps_one_slot_free() {
        let mut r = Ring::new(1);
        assert_eq!(r.free(0), 255);
        for i in 0..255 {
            assert_eq!(r.push(), i * 16);
        }
        assert_eq!(r.free(0), 0, "full: one slot stays empty");
        assert_eq!(r.free(10), 10);
        assert_eq!(r.push(), 255 * 16);
        assert_eq!(r.tail, 0, "wrapped");
        assert_eq!(r.tail_register(), 0);
        assert_eq!(Ring::head_index(0x10 * 17), 17);
    }
}
