//! A guest's RAM as the hypervisor sees it: guest-physical `[0, size)` backed by a few
//! host-physical chunks, in guest order. Translation for the hypervisor's own accesses to
//! guest memory (hypercall buffers, instruction fetch, loading) and the list the nested page
//! tables are built from.

/// Most chunks one guest's RAM is made of.
pub const MAX_CHUNKS: usize = 64;
/// Chunks are multiples of this (so nested paging can use 2 MiB pages).
pub const CHUNK_ALIGN: u64 = 2 << 20;

/// A run of guest RAM backed by contiguous host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Chunk {
    /// Guest-physical start.
    pub gpa: u64,
    /// Host-physical start.
    pub hpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why a chunk was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ChunkError {
    /// Not aligned to `CHUNK_ALIGN` (address or length), or empty.
    Unaligned,
    /// It would go past the guest's size.
    BeyondSize,
    /// `MAX_CHUNKS` already.
    TooMany,
    /// It overlaps a chunk already added (host side).
    Overlap,
}

/// A guest's RAM map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestMemory {
    size: u64,
    chunks: heapless::Vec<Chunk, MAX_CHUNKS>,
}

impl GuestMemory {
    /// Empty map for `size` bytes of guest RAM.
    pub fn new(size: u64) -> Self {
        Self { size, chunks: heapless::Vec::new() }
    }

    /// Guest RAM size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes backed so far.
    pub fn backed(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum()
    }

    /// The chunks, in guest order.
    pub fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// Backs the next `len` bytes of guest RAM with host memory at `hpa`.
    pub fn push(&mut self, hpa: u64, len: u64) -> Result<Chunk, ChunkError> {
        if len == 0 || !len.is_multiple_of(CHUNK_ALIGN) || !hpa.is_multiple_of(CHUNK_ALIGN) {
            return Err(ChunkError::Unaligned);
        }
        let gpa = self.backed();
        if gpa.checked_add(len).is_none_or(|end| end > self.size) || hpa.checked_add(len).is_none() {
            return Err(ChunkError::BeyondSize);
        }
        if self.chunks.iter().any(|c| hpa < c.hpa + c.len && c.hpa < hpa + len) {
            return Err(ChunkError::Overlap);
        }
        let c = Chunk { gpa, hpa, len };
        self.chunks.push(c).map_err(|_| ChunkError::TooMany)?;
        Ok(c)
    }

    /// Host-physical address of guest byte `gpa` and how many bytes from there are contiguous
    /// in host memory; `None` outside backed RAM.
    pub fn translate(&self, gpa: u64) -> Option<(u64, u64)> {
        let c = self.chunks.iter().find(|c| gpa >= c.gpa && gpa - c.gpa < c.len)?;
        let off = gpa - c.gpa;
        Some((c.hpa + off, c.len - off))
    }

    /// Splits the guest range `[gpa, gpa + len)` into host pieces `(hpa, guest offset, len)`,
    /// calling `f` for each; false (and no call at all) when any byte is outside backed RAM.
    pub fn for_each_piece(&self, gpa: u64, len: u64, mut f: impl FnMut(u64, u64, u64)) -> bool {
        let Some(end) = gpa.checked_add(len) else { return false };
        if end > self.backed() {
            return false;
        }
        let mut at = gpa;
        while at < end {
            let Some((hpa, run)) = self.translate(at) else { return false };
            let n = run.min(end - at);
            f(hpa, at - gpa, n);
            at += n;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn chunks_and_translation() {
        let mut m = GuestMemory::new(8 * MIB);
        assert_eq!(m.push(0x4000_0000, 4 * MIB), Ok(Chunk { gpa: 0, hpa: 0x4000_0000, len: 4 * MIB }));
        assert_eq!(m.push(0x1000_0000, MIB), Err(ChunkError::Unaligned));
        assert_eq!(m.push(0x4020_0000, 2 * MIB), Err(ChunkError::Overlap));
        assert_eq!(m.push(0x1000_0000, 6 * MIB), Err(ChunkError::BeyondSize));
        m.push(0x1000_0000, 4 * MIB).unwrap();
        assert_eq!(m.backed(), 8 * MIB);
        assert_eq!(m.translate(0x10), Some((0x4000_0010, 4 * MIB - 0x10)));
        assert_eq!(m.translate(4 * MIB + 5), Some((0x1000_0005, 4 * MIB - 5)));
        assert_eq!(m.translate(8 * MIB), None);
        let mut pieces = Vec::new();
        assert!(m.for_each_piece(4 * MIB - 2, 4, |h, o, n| pieces.push((h, o, n))));
        assert_eq!(pieces, [(0x4000_0000 + 4 * MIB - 2, 0, 2), (0x1000_0000, 2, 2)]);
        assert!(!m.for_each_piece(8 * MIB - 2, 4, |_, _, _| panic!("no partial calls")));
        assert!(!m.for_each_piece(u64::MAX - 1, 4, |_, _, _| panic!("no partial calls")));
    }
}
