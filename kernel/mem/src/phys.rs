//! The narrow trait through which pure parsers read physical memory: the kernel implements it
//! over its identity map (checking the range is mapped first), host tests over a sparse fake.

/// A read outside what the reader can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PhysReadError {
    /// First byte asked for.
    pub paddr: u64,
    /// Bytes asked for.
    pub len: usize,
}

/// Reads physical memory. Implementations return an error rather than fault for addresses
/// they cannot reach.
pub trait PhysRead {
    /// Fills `buf` from `paddr`.
    fn read_bytes(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError>;

    /// Little-endian u8.
    fn read_u8(&self, paddr: u64) -> Result<u8, PhysReadError> {
        let mut b = [0u8; 1];
        self.read_bytes(paddr, &mut b)?;
        Ok(b[0])
    }

    /// Little-endian u16.
    fn read_u16(&self, paddr: u64) -> Result<u16, PhysReadError> {
        let mut b = [0u8; 2];
        self.read_bytes(paddr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Little-endian u32.
    fn read_u32(&self, paddr: u64) -> Result<u32, PhysReadError> {
        let mut b = [0u8; 4];
        self.read_bytes(paddr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Little-endian u64.
    fn read_u64(&self, paddr: u64) -> Result<u64, PhysReadError> {
        let mut b = [0u8; 8];
        self.read_bytes(paddr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// Sparse physical memory for host tests: byte blocks placed at addresses; everything else
/// is unreadable.
#[cfg(any(test, feature = "fake"))]
#[derive(Debug, Default, Clone)]
pub struct FakePhys {
    blocks: std::collections::BTreeMap<u64, std::vec::Vec<u8>>,
}

#[cfg(any(test, feature = "fake"))]
impl FakePhys {
    /// Empty memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `bytes` at `paddr` (replacing any block starting there).
    pub fn place(&mut self, paddr: u64, bytes: &[u8]) -> &mut Self {
        self.blocks.insert(paddr, bytes.to_vec());
        self
    }
}

#[cfg(any(test, feature = "fake"))]
impl PhysRead for FakePhys {
    fn read_bytes(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let err = PhysReadError { paddr, len: buf.len() };
        let (&start, block) = self.blocks.range(..=paddr).next_back().ok_or(err)?;
        let off = usize::try_from(paddr - start).map_err(|_| err)?;
        let end = off.checked_add(buf.len()).ok_or(err)?;
        let src = block.get(off..end).ok_or(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_reads_inside_blocks_only() {
        let mut m = FakePhys::new();
        m.place(0x1000, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(m.read_u32(0x1000), Ok(0x0403_0201));
        assert_eq!(m.read_u64(0x1000), Ok(0x0807_0605_0403_0201));
        assert!(m.read_u32(0x1006).is_err());
        assert!(m.read_u8(0xfff).is_err());
    }
}
