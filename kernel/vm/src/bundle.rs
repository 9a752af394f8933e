//! The guest bundle: one file of named guest ELF images, handed to the hypervisor as a boot
//! module (QEMU `-initrd`). [`Bundle::parse`] reads and checks it in place (no copy); the host
//! build tool writes it with [`encode`].
//!
//! Format, all integers little-endian:
//!
//! | offset          | size | field                                              |
//! |-----------------|------|----------------------------------------------------|
//! | 0               | 8    | magic `CNDTGB01` ([`MAGIC`])                       |
//! | 8               | 4    | `count`: images (at most [`MAX_IMAGES`])           |
//! | 12              | 4    | reserved, 0                                        |
//! | 16 + 48 i       | 32   | entry i: name, NUL-padded                          |
//! | 16 + 48 i + 32  | 8    | entry i: offset of the image in the file           |
//! | 16 + 48 i + 40  | 8    | entry i: length of the image in bytes              |
//!
//! A name is 1 to [`NAME_MAX`] bytes of `[a-z0-9_-]` followed by NULs to fill the 32 bytes
//! (so at least one NUL). Images start 8-byte aligned, after the entry table, end inside the
//! file and do not overlap each other; names are unique.

use core::fmt;

/// First eight bytes of a bundle.
pub const MAGIC: [u8; 8] = *b"CNDTGB01";
/// Most images in one bundle.
pub const MAX_IMAGES: usize = 16;
/// Longest image name (bytes).
pub const NAME_MAX: usize = 31;
/// Bytes of the header (magic, count, reserved).
pub const HEADER_BYTES: usize = 16;
/// Bytes of one entry of the table.
pub const ENTRY_BYTES: usize = 48;
/// Bytes of the name field of an entry.
const NAME_FIELD_BYTES: usize = 32;
/// Alignment of every image in the file.
pub const IMAGE_ALIGN: usize = 8;

/// Why a bundle was rejected (by [`Bundle::parse`]) or could not be written (by [`encode`]).
/// An `index` is the position of the entry in the table (or in the writer's input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BundleError {
    /// The file does not start with [`MAGIC`].
    BadMagic,
    /// The file ends inside the header or the entry table.
    Truncated,
    /// More than [`MAX_IMAGES`] images (the count given).
    TooMany(u32),
    /// The reserved header word is not 0.
    ReservedNonZero,
    /// The entry's name is empty, too long, has a character outside `[a-z0-9_-]` or
    /// something other than NULs after it.
    BadName(usize),
    /// The entry has the same name as an earlier one.
    Duplicate(usize),
    /// The entry's image offset is not a multiple of 8.
    Misaligned(usize),
    /// The entry's image starts inside the header or the entry table.
    InsideTable(usize),
    /// The entry's image ends beyond the end of the file (or its end overflows).
    OutOfBounds(usize),
    /// The entry's image overlaps an earlier entry's image.
    Overlap(usize),
    /// The output buffer is smaller than the bundle (bytes needed).
    BufferTooSmall(usize),
    /// The bundle would be larger than the address space (writer only).
    TooLarge,
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadMagic => write!(f, "not a guest bundle (bad magic)"),
            Self::Truncated => write!(f, "bundle truncated inside its header or entry table"),
            Self::TooMany(n) => write!(f, "{n} images, at most {MAX_IMAGES} allowed"),
            Self::ReservedNonZero => write!(f, "reserved header field is not 0"),
            Self::BadName(i) => write!(f, "image {i}: bad name (1 to {NAME_MAX} of a-z 0-9 _ -)"),
            Self::Duplicate(i) => write!(f, "image {i}: name already used by an earlier image"),
            Self::Misaligned(i) => write!(f, "image {i}: offset not a multiple of {IMAGE_ALIGN}"),
            Self::InsideTable(i) => write!(f, "image {i}: starts inside the entry table"),
            Self::OutOfBounds(i) => write!(f, "image {i}: extends beyond the end of the bundle"),
            Self::Overlap(i) => write!(f, "image {i}: overlaps an earlier image"),
            Self::BufferTooSmall(n) => write!(f, "output buffer too small ({n} bytes needed)"),
            Self::TooLarge => write!(f, "bundle too large"),
        }
    }
}

/// Whether `name` is a valid image name: 1 to [`NAME_MAX`] bytes of `[a-z0-9_-]`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A parsed, checked bundle borrowing the file's bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bundle<'a> {
    images: [(&'a str, &'a [u8]); MAX_IMAGES],
    len: usize,
}

/// Names and sizes, not the image bytes.
impl fmt::Debug for Bundle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter().map(|(name, data)| (name, data.len()))).finish()
    }
}

impl<'a> Bundle<'a> {
    /// Parses and checks a bundle: magic, reserved word, count, every name (valid, unique)
    /// and every image range (8-aligned, after the entry table, inside the file, disjoint).
    /// Bytes after the last image are allowed and ignored.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BundleError> {
        let header = bytes.get(..HEADER_BYTES).ok_or(BundleError::Truncated)?;
        if header.get(..8) != Some(&MAGIC[..]) {
            return Err(BundleError::BadMagic);
        }
        let count = read_u32(header, 8).ok_or(BundleError::Truncated)?;
        if read_u32(header, 12) != Some(0) {
            return Err(BundleError::ReservedNonZero);
        }
        let n = usize::try_from(count).map_err(|_| BundleError::TooMany(count))?;
        if n > MAX_IMAGES {
            return Err(BundleError::TooMany(count));
        }
        let table_end = table_end(n).ok_or(BundleError::TooMany(count))?;
        let table = bytes.get(HEADER_BYTES..table_end).ok_or(BundleError::Truncated)?;

        let mut bundle = Bundle { images: [("", &[]); MAX_IMAGES], len: 0 };
        // Image ranges accepted so far, for the overlap check.
        let mut ranges = [(0usize, 0usize); MAX_IMAGES];
        for (i, entry) in table.chunks_exact(ENTRY_BYTES).enumerate() {
            let name = entry.get(..NAME_FIELD_BYTES).and_then(parse_name).ok_or(BundleError::BadName(i))?;
            let earlier = bundle.images.get(..i).unwrap_or(&[]);
            if earlier.iter().any(|&(other, _)| other == name) {
                return Err(BundleError::Duplicate(i));
            }
            let offset = read_u64(entry, 32).ok_or(BundleError::Truncated)?;
            let len = read_u64(entry, 40).ok_or(BundleError::Truncated)?;
            if !offset.is_multiple_of(IMAGE_ALIGN as u64) {
                return Err(BundleError::Misaligned(i));
            }
            let start = usize::try_from(offset).map_err(|_| BundleError::OutOfBounds(i))?;
            if start < table_end {
                return Err(BundleError::InsideTable(i));
            }
            let end = usize::try_from(len)
                .ok()
                .and_then(|len| start.checked_add(len))
                .filter(|&end| end <= bytes.len())
                .ok_or(BundleError::OutOfBounds(i))?;
            let earlier = ranges.get(..i).unwrap_or(&[]);
            if earlier.iter().any(|&(s, e)| start < e && s < end) {
                return Err(BundleError::Overlap(i));
            }
            let data = bytes.get(start..end).ok_or(BundleError::OutOfBounds(i))?;
            let (Some(slot), Some(range)) = (bundle.images.get_mut(i), ranges.get_mut(i)) else {
                return Err(BundleError::TooMany(count));
            };
            *slot = (name, data);
            *range = (start, end);
            bundle.len = i + 1;
        }
        Ok(bundle)
    }

    /// The image called `name`.
    pub fn find(&self, name: &str) -> Option<&'a [u8]> {
        self.iter().find(|&(n, _)| n == name).map(|(_, data)| data)
    }

    /// The images, in table order, as (name, bytes).
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        self.images.get(..self.len).unwrap_or(&[]).iter().copied()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bundle holds no image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Bundle<'_> {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "Bundle {{ images: {=usize} }}", self.len);
    }
}

/// Bytes [`encode`] writes for `images` (header, table, each image padded to 8 bytes).
/// Checks the count, names and duplicates like [`encode`].
pub fn encoded_len(images: &[(&str, &[u8])]) -> Result<usize, BundleError> {
    let n = images.len();
    if n > MAX_IMAGES {
        return Err(BundleError::TooMany(u32::try_from(n).unwrap_or(u32::MAX)));
    }
    let mut total = table_end(n).ok_or(BundleError::TooLarge)?;
    for (i, &(name, data)) in images.iter().enumerate() {
        if !is_valid_name(name) {
            return Err(BundleError::BadName(i));
        }
        if images.get(..i).unwrap_or(&[]).iter().any(|&(other, _)| other == name) {
            return Err(BundleError::Duplicate(i));
        }
        total = align_up(data.len()).and_then(|len| total.checked_add(len)).ok_or(BundleError::TooLarge)?;
    }
    // Every offset must be representable in the 64-bit field.
    u64::try_from(total).map_err(|_| BundleError::TooLarge)?;
    Ok(total)
}

/// Writes a bundle of `images` (name, ELF bytes) at the start of `out`: header, entry table,
/// then each image in order at the next 8-byte boundary, gaps and the tail padded with zeros.
/// Returns the bytes written ([`encoded_len`]); `out` beyond them is untouched.
pub fn encode(images: &[(&str, &[u8])], out: &mut [u8]) -> Result<usize, BundleError> {
    let total = encoded_len(images)?;
    let out = out.get_mut(..total).ok_or(BundleError::BufferTooSmall(total))?;
    out.fill(0);
    out.get_mut(..8).ok_or(BundleError::TooLarge)?.copy_from_slice(&MAGIC);
    let count = u32::try_from(images.len()).map_err(|_| BundleError::TooLarge)?;
    write_bytes(out, 8, &count.to_le_bytes())?;

    let mut data_at = table_end(images.len()).ok_or(BundleError::TooLarge)?;
    for (i, &(name, data)) in images.iter().enumerate() {
        let entry =
            i.checked_mul(ENTRY_BYTES).and_then(|o| o.checked_add(HEADER_BYTES)).ok_or(BundleError::TooLarge)?;
        write_bytes(out, entry, name.as_bytes())?;
        let offset = u64::try_from(data_at).map_err(|_| BundleError::TooLarge)?;
        let len = u64::try_from(data.len()).map_err(|_| BundleError::TooLarge)?;
        write_bytes(out, entry.checked_add(32).ok_or(BundleError::TooLarge)?, &offset.to_le_bytes())?;
        write_bytes(out, entry.checked_add(40).ok_or(BundleError::TooLarge)?, &len.to_le_bytes())?;
        write_bytes(out, data_at, data)?;
        data_at = align_up(data.len()).and_then(|len| data_at.checked_add(len)).ok_or(BundleError::TooLarge)?;
    }
    debug_assert_eq!(data_at, total);
    Ok(total)
}

/// End of the entry table for `n` entries.
fn table_end(n: usize) -> Option<usize> {
    n.checked_mul(ENTRY_BYTES)?.checked_add(HEADER_BYTES)
}

/// `len` rounded up to [`IMAGE_ALIGN`].
fn align_up(len: usize) -> Option<usize> {
    Some(len.checked_add(IMAGE_ALIGN - 1)? & !(IMAGE_ALIGN - 1))
}

/// Copies `src` into `out` at `at` (the caller sized `out`, so failure is a bug reported as
/// `TooLarge` rather than a panic).
fn write_bytes(out: &mut [u8], at: usize, src: &[u8]) -> Result<(), BundleError> {
    let end = at.checked_add(src.len()).ok_or(BundleError::TooLarge)?;
    out.get_mut(at..end).ok_or(BundleError::TooLarge)?.copy_from_slice(src);
    Ok(())
}

/// The name in a 32-byte name field: valid characters, then only NULs (at least one).
fn parse_name(field: &[u8]) -> Option<&str> {
    let len = field.iter().position(|&b| b == 0)?;
    let (name, padding) = field.split_at_checked(len)?;
    if !padding.iter().all(|&b| b == 0) {
        return None;
    }
    let name = core::str::from_utf8(name).ok()?;
    is_valid_name(name).then_some(name)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(raw.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let raw = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(raw.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_vec(images: &[(&str, &[u8])]) -> Vec<u8> {
        let len = encoded_len(images).unwrap();
        let mut out = vec![0xaa; len + 5];
        assert_eq!(encode(images, &mut out).unwrap(), len);
        assert!(out[len..].iter().all(|&b| b == 0xaa), "wrote past the bundle");
        out.truncate(len);
        out
    }

    /// A hand-built bundle: header with `count`, then `entries` (name field, offset, len),
    /// then `tail` bytes.
    fn raw(count: u32, entries: &[(&[u8], u64, u64)], tail: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for &(name, offset, len) in entries {
            let mut field = [0u8; 32];
            field[..name.len()].copy_from_slice(name);
            b.extend_from_slice(&field);
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&len.to_le_bytes());
        }
        b.resize(b.len() + tail, 0x55);
        b
    }

    #[test]
    fn round_trip() {
        let images: [(&str, &[u8]); 3] =
            [("hello", b"\x7fELF hello"), ("a_b-9", b""), ("x", &[1, 2, 3, 4, 5, 6, 7, 8])];
        let bytes = encode_vec(&images);
        // Header + 3 entries, then 16 + 0 + 8 bytes of data.
        assert_eq!(bytes.len(), 16 + 3 * 48 + 16 + 8);
        assert_eq!(&bytes[..8], b"CNDTGB01");
        let bundle = Bundle::parse(&bytes).unwrap();
        assert_eq!(bundle.len(), 3);
        assert!(!bundle.is_empty());
        assert_eq!(bundle.iter().collect::<Vec<_>>(), images.to_vec());
        assert_eq!(bundle.find("hello"), Some(&b"\x7fELF hello"[..]));
        assert_eq!(bundle.find("a_b-9"), Some(&b""[..]));
        assert_eq!(bundle.find("nope"), None);
        // Padding after "\x7fELF hello" (10 bytes) is zero.
        let first = 16 + 3 * 48;
        assert_eq!(&bytes[first + 10..first + 16], &[0; 6]);
    }

    #[test]
    fn empty_bundle() {
        let bytes = encode_vec(&[]);
        assert_eq!(bytes.len(), 16);
        let bundle = Bundle::parse(&bytes).unwrap();
        assert!(bundle.is_empty());
        assert_eq!(bundle.iter().count(), 0);
    }

    #[test]
    fn longest_name_and_most_images() {
        let long = "a".repeat(31);
        let names: Vec<String> = (0..MAX_IMAGES).map(|i| format!("{long:.29}{i:02}")).collect();
        let images: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"data"[..])).collect();
        let bytes = encode_vec(&images);
        let bundle = Bundle::parse(&bytes).unwrap();
        assert_eq!(bundle.len(), MAX_IMAGES);
        assert_eq!(bundle.iter().map(|(n, _)| n.len()).max(), Some(31));
    }

    #[test]
    fn trailing_bytes_allowed() {
        let mut bytes = encode_vec(&[("g", b"abc")]);
        bytes.extend_from_slice(&[9; 100]);
        assert_eq!(Bundle::parse(&bytes).unwrap().find("g"), Some(&b"abc"[..]));
    }

    #[test]
    fn parse_rejections() {
        use BundleError::*;
        let ok = raw(1, &[(b"g", 64, 8)], 8);
        assert_eq!(Bundle::parse(&ok).map(|b| b.len()), Ok(1));

        let cases: Vec<(&str, Vec<u8>, BundleError)> = vec![
            ("empty file", vec![], Truncated),
            ("short header", ok[..15].to_vec(), Truncated),
            ("bad magic", [b"CNDTGB02".as_slice(), &ok[8..]].concat(), BadMagic),
            (
                "reserved",
                {
                    let mut b = ok.clone();
                    b[12] = 1;
                    b
                },
                ReservedNonZero,
            ),
            ("too many", raw(17, &[], 0), TooMany(17)),
            ("huge count", raw(u32::MAX, &[], 0), TooMany(u32::MAX)),
            ("table truncated", raw(2, &[(b"g", 112, 0)], 0), Truncated),
            ("table cut mid-entry", ok[..40].to_vec(), Truncated),
            ("empty name", raw(1, &[(b"", 64, 0)], 0), BadName(0)),
            ("upper case", raw(1, &[(b"Guest", 64, 0)], 0), BadName(0)),
            ("space", raw(1, &[(b"a b", 64, 0)], 0), BadName(0)),
            ("no NUL", raw(1, &[(&[b'a'; 32], 64, 0)], 0), BadName(0)),
            ("junk after NUL", raw(1, &[(b"ab\0c", 64, 0)], 0), BadName(0)),
            ("non-ASCII", raw(1, &[("é".as_bytes(), 64, 0)], 0), BadName(0)),
            ("duplicate", raw(2, &[(b"g", 112, 1), (b"g", 120, 1)], 16), Duplicate(1)),
            ("misaligned", raw(1, &[(b"g", 68, 1)], 8), Misaligned(0)),
            ("inside header", raw(1, &[(b"g", 8, 1)], 8), InsideTable(0)),
            ("inside table", raw(2, &[(b"g", 112, 1), (b"h", 64, 1)], 8), InsideTable(1)),
            ("past end", raw(1, &[(b"g", 64, 9)], 8), OutOfBounds(0)),
            ("start past end", raw(1, &[(b"g", 80, 0)], 8), OutOfBounds(0)),
            ("len overflow", raw(1, &[(b"g", 64, u64::MAX)], 8), OutOfBounds(0)),
            ("offset overflow", raw(1, &[(b"g", u64::MAX - 7, 8)], 8), OutOfBounds(0)),
            ("overlap", raw(2, &[(b"g", 112, 16), (b"h", 120, 8)], 16), Overlap(1)),
            ("overlap inside", raw(2, &[(b"g", 112, 16), (b"h", 112, 1)], 16), Overlap(1)),
        ];
        for (what, bytes, want) in cases {
            assert_eq!(Bundle::parse(&bytes), Err(want), "{what}");
        }
        // Touching images and an empty image inside another are fine.
        let touching = raw(3, &[(b"g", 160, 8), (b"h", 168, 8), (b"e", 160, 0)], 16);
        assert_eq!(Bundle::parse(&touching).map(|b| b.len()), Ok(3));
    }

    #[test]
    fn encode_rejections() {
        use BundleError::*;
        let too_many: Vec<(&str, &[u8])> = (0..17).map(|_| ("a", &b""[..])).collect();
        assert_eq!(encoded_len(&too_many), Err(TooMany(17)));
        assert_eq!(encoded_len(&[("ok", b""), ("Bad", b"")]), Err(BadName(1)));
        assert_eq!(encoded_len(&[("", b"")]), Err(BadName(0)));
        assert_eq!(encoded_len(&[(&"a".repeat(32), b"")]), Err(BadName(0)));
        assert_eq!(encoded_len(&[("a", b""), ("b", b""), ("a", b"")]), Err(Duplicate(2)));
        let mut small = [0u8; 71];
        assert_eq!(encode(&[("a", b"x")], &mut small), Err(BufferTooSmall(72)));
        assert_eq!(small, [0; 71], "nothing written on error");
    }

    #[test]
    fn errors_display() {
        assert_eq!(BundleError::Overlap(2).to_string(), "image 2: overlaps an earlier image");
        assert_eq!(BundleError::TooMany(20).to_string(), "20 images, at most 16 allowed");
    }

    fn image_name() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,31}"
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Bundle::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mutated(
            images in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..4),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let names = ["a", "b", "c", "d"];
            let input: Vec<(&str, &[u8])> = images.iter().enumerate().map(|(i, d)| (names[i], d.as_slice())).collect();
            let mut bytes = encode_vec(&input);
            for (at, value) in flips {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            let keep = cut.index(bytes.len() + 1);
            let _ = Bundle::parse(&bytes[..keep]);
            let _ = Bundle::parse(&bytes);
        }

        #[test]
        fn encode_parse_round_trip(
            images in proptest::collection::btree_map(image_name(), proptest::collection::vec(any::<u8>(), 0..64), 0..=MAX_IMAGES)
        ) {
            let input: Vec<(&str, &[u8])> = images.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            let bytes = encode_vec(&input);
            let bundle = Bundle::parse(&bytes).unwrap();
            prop_assert_eq!(bundle.iter().collect::<Vec<_>>(), input.clone());
            for (name, data) in input {
                prop_assert_eq!(bundle.find(name), Some(data));
            }
        }
    }
}
