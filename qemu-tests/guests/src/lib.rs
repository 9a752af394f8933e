//! Code shared by the test guests in `src/bin/`: a pseudo-random stream, a checksum, a data
//! pattern and a short list of interrupt vectors. Pure code (no `unsafe`); the guests' hardware access goes through
//! `conduit-guest-rt`.
#![no_std]
#![forbid(unsafe_code)]

use core::fmt;

/// Marsaglia's xorshift64 (shifts 13, 7, 17): a cheap, reproducible 64-bit stream.
#[derive(Clone, Copy, Debug)]
pub struct XorShift64 {
    state: u64,
}

impl XorShift64 {
    /// A stream from `seed` (0, which would stay 0, is replaced by a fixed odd constant).
    pub const fn new(seed: u64) -> Self {
        Self { state: if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed } }
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3), fed word by word
/// in little-endian byte order.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a64 {
    hash: u64,
}

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// An empty hash.
    pub const fn new() -> Self {
        Self { hash: Self::OFFSET_BASIS }
    }

    /// Hashes the 8 bytes of `word`, lowest first.
    pub fn write_u64(&mut self, word: u64) {
        for byte in word.to_le_bytes() {
            self.hash ^= u64::from(byte);
            self.hash = self.hash.wrapping_mul(Self::PRIME);
        }
    }

    /// The hash so far.
    pub const fn finish(&self) -> u64 {
        self.hash
    }
}

impl Default for Fnv1a64 {
    fn default() -> Self {
        Self::new()
    }
}

/// Byte `i` of the test pattern named `seed`: distinct seeds give different blocks, and no
/// byte depends only on `i` (so a block read from the wrong place shows).
pub fn pattern_byte(seed: u64, i: u64) -> u8 {
    let x = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xff51_afd7_ed55_8ccd)).rotate_left(29);
    (x ^ x >> 32 ^ x >> 16) as u8
}

/// Up to `VectorList::CAPACITY` interrupt vectors in arrival order; displays as
/// `0x74 0x73 0x62` (`-` when empty, `...` when more arrived than fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorList {
    vectors: [u8; VectorList::CAPACITY],
    len: usize,
    dropped: usize,
}

impl VectorList {
    /// Most vectors kept.
    pub const CAPACITY: usize = 16;

    /// An empty list.
    pub const fn new() -> Self {
        Self { vectors: [0; Self::CAPACITY], len: 0, dropped: 0 }
    }

    /// Appends `vector` (counted but not kept when full).
    pub fn push(&mut self, vector: u8) {
        if self.len < Self::CAPACITY {
            self.vectors[self.len] = vector;
            self.len += 1;
        } else {
            self.dropped += 1;
        }
    }

    /// The vectors kept.
    pub fn as_slice(&self) -> &[u8] {
        &self.vectors[..self.len]
    }

    /// Vectors pushed, kept or not.
    pub fn total(&self) -> usize {
        self.len + self.dropped
    }

    /// Whether exactly `expected` was pushed.
    pub fn is(&self, expected: &[u8]) -> bool {
        self.dropped == 0 && self.as_slice() == expected
    }
}

impl Default for VectorList {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for VectorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.total() == 0 {
            return f.write_str("-");
        }
        for (i, v) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{v:#04x}")?;
        }
        if self.dropped > 0 {
            write!(f, " ... ({} more)", self.dropped)?;
        }
        Ok(())
    }
}
