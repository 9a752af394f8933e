//! defmt decoding on the host: the string table and source locations come from the kernel
//! ELF's `.defmt` section and debug info; COM2's byte stream is cut into rzCOBS frames.

use defmt_decoder::{DecodeError, Frame, Locations, StreamDecoder, Table};
use std::fmt;
use std::io::Read;

/// The kernel's defmt table plus source locations.
pub struct LogTable {
    table: Table,
    locations: Option<Locations>,
}

impl fmt::Debug for LogTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogTable").field("locations", &self.locations.as_ref().map(|l| l.len())).finish()
    }
}

/// Checks that `elf` carries a non-empty `.defmt` section (leaving `INCLUDE defmt.x` out of the
/// linker script links silently and breaks every frame). Returns the section's size.
pub fn check_defmt_section(elf: &[u8]) -> Result<u64, String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).map_err(|e| format!("not an ELF file: {e}"))?;
    let section =
        file.section_by_name(".defmt").ok_or("the ELF has no .defmt section (is `INCLUDE defmt.x` in linker.ld?)")?;
    if section.size() == 0 {
        return Err("the .defmt section is empty".into());
    }
    Ok(section.size())
}

impl LogTable {
    /// Reads the table from the kernel ELF.
    pub fn from_elf(elf: &[u8]) -> Result<Self, String> {
        check_defmt_section(elf)?;
        let table =
            Table::parse(elf).map_err(|e| format!("defmt table: {e}"))?.ok_or("the ELF carries no defmt table")?;
        let locations = table.get_locations(elf).ok().filter(|l| !l.is_empty());
        Ok(Self { table, locations })
    }

    /// Decodes a whole byte stream, calling `sink` with each line (or `None` for a malformed
    /// frame) as soon as it is complete. Returns when `reader` ends.
    pub fn decode_stream(&self, mut reader: impl Read, mut sink: impl FnMut(Option<LogLine>)) {
        let mut decoder = self.table.new_stream_decoder();
        let mut buf = [0u8; 4096];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            decoder.received(&buf[..n]);
            self.drain(decoder.as_mut(), &mut sink);
        }
        self.drain(decoder.as_mut(), &mut sink);
    }

    fn drain(&self, decoder: &mut dyn StreamDecoder, sink: &mut impl FnMut(Option<LogLine>)) {
        loop {
            match decoder.decode() {
                Ok(frame) => sink(Some(self.line(&frame))),
                Err(DecodeError::UnexpectedEof) => break,
                Err(DecodeError::Malformed) => sink(None),
            }
        }
    }

    fn line(&self, frame: &Frame<'_>) -> LogLine {
        let location = self
            .locations
            .as_ref()
            .and_then(|l| l.get(&frame.index()))
            .map(|l| format!("{}:{}", l.file.display(), l.line));
        LogLine {
            level: frame.level().map(|l| l.as_str().to_string()),
            timestamp: frame.display_timestamp().map(|t| t.to_string()),
            message: frame.display_message().to_string(),
            location,
        }
    }
}

/// One decoded log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// trace / debug / info / warn / error.
    pub level: Option<String>,
    /// Seconds since boot, as the kernel's timestamp formats it.
    pub timestamp: Option<String>,
    /// The formatted message.
    pub message: String,
    /// `file:line` of the log statement.
    pub location: Option<String>,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ts = self.timestamp.as_deref().unwrap_or("-");
        let level = self.level.as_deref().unwrap_or("print").to_uppercase();
        write!(f, "{ts:>12} {level:<5} {}", self.message)?;
        if let Some(loc) = &self.location {
            let short = loc.rsplit_once("/src/").map_or(loc.as_str(), |(_, s)| s);
            write!(f, "  ({short})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_and_missing_section_are_errors() {
        assert!(check_defmt_section(b"not an elf").is_err());
        // This test binary is an ELF without a .defmt section.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_defmt_section(&me).unwrap_err().contains("no .defmt section"));
        assert!(LogTable::from_elf(&me).is_err());
    }

    #[test]
    fn display_shortens_paths() {
        let l = LogLine {
            level: Some("info".into()),
            timestamp: Some("0.000123".into()),
            message: "hello".into(),
            location: Some("/work/main/kernel/src/main.rs:10".into()),
        };
        assert_eq!(l.to_string(), "    0.000123 INFO  hello  (main.rs:10)");
    }
}
