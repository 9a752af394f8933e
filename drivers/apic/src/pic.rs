//! The legacy 8259A pair: remapped away from the exception vectors and fully masked, so a
//! stray legacy interrupt can never look like an exception.

/// Master command / data ports.
pub const MASTER: (u16, u16) = (0x20, 0x21);
/// Slave command / data ports.
pub const SLAVE: (u16, u16) = (0xa0, 0xa1);

/// The port writes that remap the master to `base` and the slave to `base + 8` and then mask
/// every line (ICW1–ICW4, then OCW1 = 0xff on both).
pub fn disable_sequence(base: u8) -> [(u16, u8); 10] {
    [
        (MASTER.0, 0x11), // ICW1: edge, cascade, ICW4 needed
        (SLAVE.0, 0x11),
        (MASTER.1, base), // ICW2: vector base
        (SLAVE.1, base.wrapping_add(8)),
        (MASTER.1, 0x04), // ICW3: slave on IR2
        (SLAVE.1, 0x02),  // ICW3: cascade identity 2
        (MASTER.1, 0x01), // ICW4: 8086 mode
        (SLAVE.1, 0x01),
        (MASTER.1, 0xff), // OCW1: mask all
        (SLAVE.1, 0xff),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_fully_masked() {
        let seq = disable_sequence(0x20);
        assert_eq!(seq[2], (0x21, 0x20));
        assert_eq!(seq[3], (0xa1, 0x28));
        assert_eq!(&seq[8..], &[(0x21, 0xff), (0xa1, 0xff)]);
    }
}
