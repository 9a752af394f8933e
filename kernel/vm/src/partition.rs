//! Partition descriptions: what each guest is given (image, memory, pinned CPUs, PCI devices,
//! doorbells, console), parsed from the kernel command line by [`parse`] and checked against
//! the machine, and against each other, by [`validate`].
//!
//! One partition is one command-line token, without spaces:
//!
//! ```text
//! NAME:guest=IMAGE,memory=SIZE,cpus=A+B+...[,devices=BDF+BDF...][,doorbell=BDF/BAR/OFFSET/WIDTH[/MATCH]]...[,console=serial|log|none][,arg=N]
//! ```
//!
//! - `NAME`: 1 to 15 of `[a-z0-9_-]`; `IMAGE`: a guest-bundle entry name (1 to 31 of the same).
//! - Numbers are decimal or `0x`-hex. `SIZE` is a number of bytes, or a decimal number with a
//!   `K`, `M` or `G` suffix (binary units).
//! - `cpus`: vCPU `i` is pinned to physical CPU `cpus[i]` (CPU indices as the kernel numbers
//!   them). At most [`MAX_VCPUS`].
//! - `BDF`: hex `bb:dd.f` or `ssss:bb:dd.f` (segment 0 when omitted).
//! - `doorbell` may be repeated; a write of `WIDTH` bytes at `OFFSET` in BAR `BAR` of the device
//!   (matching `MATCH`, when given) is the doorbell.
//! - `console`: where the guest's console output goes; `serial` when omitted. `arg`: the
//!   `BootInfo::argument` of the guest; 0 when omitted.
//!
//! `guest`, `memory` and `cpus` are required; other keys at most once, except `doorbell`.
//! [`Spec`]'s `Display` writes this syntax back (parsing it gives the same `Spec`).

use crate::bundle;
use core::fmt;

/// Most vCPUs of one partition.
pub const MAX_VCPUS: usize = 8;
/// Most PCI functions assigned to one partition.
pub const MAX_DEVICES: usize = 8;
/// Most doorbells of one partition.
pub const MAX_DOORBELLS: usize = 16;
/// Longest partition name.
pub const NAME_MAX: usize = 15;
/// Least guest memory.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Most guest memory: the guest's identity map covers 4 GiB, and the top GiB is left for its
/// local APIC and device windows.
pub const MAX_MEMORY: u64 = 3 << 30;
/// Guest memory is a whole number of these (it is mapped with 2 MiB pages).
pub const MEMORY_GRANULE: u64 = 2 << 20;
/// Highest BAR index of a PCI function.
pub const MAX_BAR: u8 = 5;

/// A partition name: 1 to [`NAME_MAX`] of `[a-z0-9_-]`.
pub type Name = heapless::String<NAME_MAX>;
/// A guest-bundle entry name: 1 to `bundle::NAME_MAX` of `[a-z0-9_-]`.
pub type ImageName = heapless::String<{ bundle::NAME_MAX }>;

/// Whether `name` is a valid partition name.
pub fn is_valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len()) && bundle::is_valid_name(name)
}

/// Where a guest's console output (hypercall `CONSOLE_WRITE`, port `0xe9`) goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Console {
    /// To the serial port (`serial`).
    #[default]
    Serial,
    /// Into the hypervisor's log (`log`).
    Log,
    /// Nowhere (`none`).
    Discard,
}

impl Console {
    /// The keyword of the command-line syntax.
    pub const fn keyword(self) -> &'static str {
        match self {
            Self::Serial => "serial",
            Self::Log => "log",
            Self::Discard => "none",
        }
    }

    fn from_keyword(word: &str) -> Option<Self> {
        [Self::Serial, Self::Log, Self::Discard].into_iter().find(|c| c.keyword() == word)
    }
}

/// A PCI function address. Displays as `ssss:bb:dd.f` (`0000:00:02.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Bdf {
    /// PCI segment group.
    pub segment: u16,
    /// Bus.
    pub bus: u8,
    /// Device, 0 to 31.
    pub device: u8,
    /// Function, 0 to 7.
    pub function: u8,
}

impl Bdf {
    /// A segment-0 address.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self { segment: 0, bus, device, function }
    }

    /// Parses hex `bb:dd.f` or `ssss:bb:dd.f` (1 to 4, 2, 2 and 1 digits; device ≤ 0x1f,
    /// function ≤ 7).
    pub fn parse(text: &str) -> Option<Self> {
        let (head, function) = text.rsplit_once('.')?;
        let mut parts = head.split(':');
        let (segment, bus, device) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(bus), Some(device), None, None) => (0, hex(bus, 2)?, hex(device, 2)?),
            (Some(segment), Some(bus), Some(device), None) => (hex(segment, 4)?, hex(bus, 2)?, hex(device, 2)?),
            _ => return None,
        };
        let function = hex(function, 1)?;
        let bdf = Self {
            segment: u16::try_from(segment).ok()?,
            bus: u8::try_from(bus).ok()?,
            device: u8::try_from(device).ok().filter(|&d| d <= 0x1f)?,
            function: u8::try_from(function).ok().filter(|&f| f <= 7)?,
        };
        Some(bdf)
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.segment, self.bus, self.device, self.function)
    }
}

/// A doorbell: a guest write of `width` bytes at `offset` in BAR `bar` of `device` (whose value
/// equals `matches`, when given), which the hypervisor turns into the same write to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Doorbell {
    /// The device, one of the partition's.
    pub device: Bdf,
    /// BAR index, 0 to 5.
    pub bar: u8,
    /// Offset in the BAR, a multiple of `width`.
    pub offset: u64,
    /// Access width in bytes: 1, 2, 4 or 8.
    pub width: u8,
    /// Only writes of this value are the doorbell (any value when `None`).
    pub matches: Option<u64>,
}

/// One partition, as described on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Partition name.
    pub name: Name,
    /// Guest-bundle entry holding the guest's ELF image.
    pub guest: ImageName,
    /// Guest RAM: `[0, memory_bytes)`.
    pub memory_bytes: u64,
    /// vCPU `i` runs on physical CPU `cpus[i]`.
    pub cpus: heapless::Vec<u8, MAX_VCPUS>,
    /// PCI functions given to the guest.
    pub devices: heapless::Vec<Bdf, MAX_DEVICES>,
    /// Doorbells on those functions.
    pub doorbells: heapless::Vec<Doorbell, MAX_DOORBELLS>,
    /// Where console output goes.
    pub console: Console,
    /// `BootInfo::argument`.
    pub argument: u64,
    /// Emulated PCI functions, placed on the guest's bus after `devices`.
    pub vdevs: heapless::Vec<VirtualDevice, MAX_VDEVS>,
}

/// Most emulated devices of one partition.
pub const MAX_VDEVS: usize = 4;

/// An emulated PCI function the hypervisor offers (`docs/devices.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum VirtualDevice {
    /// `notify`: software-signalled MSI-X (`conduit_abi::vdev`).
    Notify,
}

impl VirtualDevice {
    /// The keyword of the command-line syntax.
    pub const fn keyword(self) -> &'static str {
        match self {
            Self::Notify => "notify",
        }
    }

    fn from_keyword(word: &str) -> Option<Self> {
        [Self::Notify].into_iter().find(|d| d.keyword() == word)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Spec {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(
            f,
            "Spec {{ name: {=str}, guest: {=str}, memory_bytes: {=u64:#x}, cpus: {=[u8]}, devices: {=[?]}, doorbells: {=[?]}, vdevs: {=[?]}, console: {}, argument: {=u64:#x} }}",
            self.name.as_str(),
            self.guest.as_str(),
            self.memory_bytes,
            self.cpus.as_slice(),
            self.devices.as_slice(),
            self.doorbells.as_slice(),
            self.vdevs.as_slice(),
            self.console,
            self.argument
        );
    }
}

/// The command-line syntax; [`parse`] of it gives back an equal `Spec`.
impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:guest={},memory={},cpus=", self.name, self.guest, Size(self.memory_bytes))?;
        for (i, cpu) in self.cpus.iter().enumerate() {
            write!(f, "{}{cpu}", if i == 0 { "" } else { "+" })?;
        }
        for (i, device) in self.devices.iter().enumerate() {
            write!(f, "{}{device}", if i == 0 { ",devices=" } else { "+" })?;
        }
        for d in &self.doorbells {
            write!(f, ",doorbell={}/{}/{:#x}/{}", d.device, d.bar, d.offset, d.width)?;
            if let Some(value) = d.matches {
                write!(f, "/{value:#x}")?;
            }
        }
        for (i, vdev) in self.vdevs.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { ",vdevs=" } else { "+" }, vdev.keyword())?;
        }
        write!(f, ",console={}", self.console.keyword())?;
        if self.argument != 0 {
            write!(f, ",arg={:#x}", self.argument)?;
        }
        Ok(())
    }
}

/// A byte count in the command-line syntax: the largest exact binary unit (`16M`, `3G`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match [(30, "G"), (20, "M"), (10, "K")].into_iter().find(|&(shift, _)| n != 0 && n.trailing_zeros() >= shift) {
            Some((shift, unit)) => write!(f, "{}{unit}", n >> shift),
            None => write!(f, "{n}"),
        }
    }
}

/// Bytes of an [`Excerpt`].
pub const EXCERPT_MAX: usize = 32;

/// The first bytes (at most [`EXCERPT_MAX`], cut at a character boundary) of a piece of the
/// command line, kept in an error. Displays quoted and escaped, with `...` when cut.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Excerpt {
    bytes: [u8; EXCERPT_MAX],
    len: u8,
    truncated: bool,
}

impl Excerpt {
    /// An excerpt of `text`.
    pub fn new(text: &str) -> Self {
        let mut len = text.len().min(EXCERPT_MAX);
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; EXCERPT_MAX];
        if let (Some(dst), Some(src)) = (bytes.get_mut(..len), text.as_bytes().get(..len)) {
            dst.copy_from_slice(src);
        }
        Self { bytes, len: u8::try_from(len).unwrap_or(0), truncated: len < text.len() }
    }

    /// The kept text.
    pub fn as_str(&self) -> &str {
        self.bytes.get(..usize::from(self.len)).and_then(|b| core::str::from_utf8(b).ok()).unwrap_or("")
    }

    /// Whether the text was longer than what is kept.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Display for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}{}\"", self.as_str().escape_debug(), if self.truncated { "..." } else { "" })
    }
}

impl fmt::Debug for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Excerpt {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "\"{=str}{=str}\"", self.as_str(), if self.truncated { "..." } else { "" });
    }
}

/// The part of a partition description an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Field {
    /// The token as a whole (its shape, or a key that is not one).
    Token,
    /// The partition name.
    Name,
    /// `guest=`.
    Guest,
    /// `memory=`.
    Memory,
    /// `cpus=`.
    Cpus,
    /// `devices=`.
    Devices,
    /// `doorbell=`.
    Doorbell,
    /// `console=`.
    Console,
    /// `arg=`.
    Arg,
    /// `vdevs=`.
    Vdevs,
}

impl Field {
    /// How the field is written (`name` for the partition name, empty for the token).
    pub const fn keyword(self) -> &'static str {
        match self {
            Self::Token => "",
            Self::Name => "name",
            Self::Guest => "guest",
            Self::Memory => "memory",
            Self::Cpus => "cpus",
            Self::Devices => "devices",
            Self::Doorbell => "doorbell",
            Self::Console => "console",
            Self::Arg => "arg",
            Self::Vdevs => "vdevs",
        }
    }

    fn from_key(key: &str) -> Option<Self> {
        let keys = [
            Self::Guest,
            Self::Memory,
            Self::Cpus,
            Self::Devices,
            Self::Doorbell,
            Self::Console,
            Self::Arg,
            Self::Vdevs,
        ];
        keys.into_iter().find(|k| k.keyword() == key)
    }

    /// Bit in the set of keys seen.
    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// What is wrong in a partition description; the `value` of the [`ParseError`] is the
/// offending text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Reason {
    /// The token has no `:` after the name.
    NoColon,
    /// The partition name is empty, too long or has a character outside `[a-z0-9_-]`.
    BadName,
    /// An empty item (two commas in a row, or a comma at either end).
    EmptyItem,
    /// An item without `=`.
    NoEquals,
    /// A key that is not one of the known ones.
    UnknownKey,
    /// A key other than `doorbell` given twice.
    Repeated,
    /// A required key is missing.
    Missing,
    /// Not a decimal or `0x`-hex number.
    NotANumber,
    /// Not a size (number with an optional `K`, `M` or `G`).
    NotASize,
    /// A number too large for its field.
    OutOfRange,
    /// More entries than the field holds.
    TooMany,
    /// Not a PCI address.
    NotABdf,
    /// A doorbell with fewer than 4 or more than 5 `/`-separated parts.
    BadDoorbell,
    /// Not `serial`, `log` or `none`.
    BadConsole,
    /// A `vdevs=` entry is not an emulated device's name.
    BadVdev,
    /// Not a guest-bundle entry name.
    BadImageName,
}

/// Why a partition description could not be parsed: in which partition (the name as written,
/// or the whole token when there is no name), in which field, why, and the text at fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ParseError {
    /// The partition's name as written.
    pub partition: Excerpt,
    /// The field at fault.
    pub field: Field,
    /// What is wrong.
    pub reason: Reason,
    /// The text at fault (empty when the reason says it all).
    pub value: Excerpt,
}

/// One line, e.g. `partition "hello": memory: "16Q" is not a size`.
impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "partition {}: ", self.partition)?;
        if self.field != Field::Token {
            write!(f, "{}: ", self.field.keyword())?;
        }
        let v = &self.value;
        match self.reason {
            Reason::NoColon => write!(f, "expected NAME:key=value,..."),
            Reason::BadName => write!(f, "{v} is not a name (1 to {NAME_MAX} of a-z 0-9 _ -)"),
            Reason::EmptyItem => write!(f, "empty item (extra comma)"),
            Reason::NoEquals => write!(f, "{v}: expected key=value"),
            Reason::UnknownKey => write!(f, "{v}: unknown key"),
            Reason::Repeated => write!(f, "given twice"),
            Reason::Missing => write!(f, "missing"),
            Reason::NotANumber => write!(f, "{v} is not a number"),
            Reason::NotASize => write!(f, "{v} is not a size"),
            Reason::OutOfRange => write!(f, "{v} is out of range"),
            Reason::TooMany => write!(f, "more than {}", limit(self.field)),
            Reason::NotABdf => write!(f, "{v} is not a PCI address (bb:dd.f or ssss:bb:dd.f)"),
            Reason::BadDoorbell => write!(f, "{v} is not BDF/BAR/OFFSET/WIDTH[/MATCH]"),
            Reason::BadConsole => write!(f, "{v} is not serial, log or none"),
            Reason::BadVdev => write!(f, "{v} is not an emulated device (notify)"),
            Reason::BadImageName => write!(f, "{v} is not an image name (1 to {} of a-z 0-9 _ -)", bundle::NAME_MAX),
        }
    }
}

/// Most entries of a list field.
fn limit(field: Field) -> usize {
    match field {
        Field::Cpus => MAX_VCPUS,
        Field::Devices => MAX_DEVICES,
        Field::Doorbell => MAX_DOORBELLS,
        _ => 1,
    }
}

/// Builds the errors of one token.
struct Context<'a> {
    partition: &'a str,
}

impl Context<'_> {
    fn error(&self, field: Field, reason: Reason, value: &str) -> ParseError {
        ParseError { partition: Excerpt::new(self.partition), field, reason, value: Excerpt::new(value) }
    }
}

/// Parses one partition description (see the module documentation for the syntax). Checks
/// the syntax and each value's range for its type; [`validate`] checks the rest.
pub fn parse(text: &str) -> Result<Spec, ParseError> {
    let Some((name, items)) = text.split_once(':') else {
        return Err(Context { partition: text }.error(Field::Token, Reason::NoColon, ""));
    };
    let cx = Context { partition: name };
    if !is_valid_name(name) {
        return Err(cx.error(Field::Name, Reason::BadName, name));
    }
    let mut spec = Spec {
        name: to_string(name).ok_or_else(|| cx.error(Field::Name, Reason::BadName, name))?,
        guest: ImageName::new(),
        memory_bytes: 0,
        cpus: heapless::Vec::new(),
        devices: heapless::Vec::new(),
        doorbells: heapless::Vec::new(),
        console: Console::default(),
        argument: 0,
        vdevs: heapless::Vec::new(),
    };
    let mut seen = 0u16;
    for item in items.split(',') {
        if item.is_empty() {
            return Err(cx.error(Field::Token, Reason::EmptyItem, ""));
        }
        let (key, value) = item.split_once('=').ok_or_else(|| cx.error(Field::Token, Reason::NoEquals, item))?;
        let field = Field::from_key(key).ok_or_else(|| cx.error(Field::Token, Reason::UnknownKey, key))?;
        if seen & field.bit() != 0 && field != Field::Doorbell {
            return Err(cx.error(field, Reason::Repeated, ""));
        }
        seen |= field.bit();
        let err = |reason, text: &str| cx.error(field, reason, text);
        match field {
            Field::Guest => {
                spec.guest = to_string(value)
                    .filter(|g: &ImageName| bundle::is_valid_name(g))
                    .ok_or_else(|| err(Reason::BadImageName, value))?;
            }
            Field::Memory => spec.memory_bytes = size(value).map_err(|r| err(r, value))?,
            Field::Cpus => {
                for cpu in value.split('+') {
                    let cpu = number(cpu).and_then(narrow).map_err(|r| err(r, cpu))?;
                    spec.cpus.push(cpu).map_err(|_| err(Reason::TooMany, ""))?;
                }
            }
            Field::Devices => {
                for device in value.split('+') {
                    let bdf = Bdf::parse(device).ok_or_else(|| err(Reason::NotABdf, device))?;
                    spec.devices.push(bdf).map_err(|_| err(Reason::TooMany, ""))?;
                }
            }
            Field::Doorbell => {
                let doorbell = doorbell(value).map_err(|(r, text)| err(r, text))?;
                spec.doorbells.push(doorbell).map_err(|_| err(Reason::TooMany, ""))?;
            }
            Field::Console => {
                spec.console = Console::from_keyword(value).ok_or_else(|| err(Reason::BadConsole, value))?
            }
            Field::Arg => spec.argument = number(value).map_err(|r| err(r, value))?,
            Field::Vdevs => {
                for vdev in value.split('+') {
                    let kind = VirtualDevice::from_keyword(vdev).ok_or_else(|| err(Reason::BadVdev, vdev))?;
                    spec.vdevs.push(kind).map_err(|_| err(Reason::TooMany, ""))?;
                }
            }
            Field::Token | Field::Name => return Err(cx.error(Field::Token, Reason::UnknownKey, key)),
        }
    }
    for required in [Field::Guest, Field::Memory, Field::Cpus] {
        if seen & required.bit() == 0 {
            return Err(cx.error(required, Reason::Missing, ""));
        }
    }
    Ok(spec)
}

/// `BDF/BAR/OFFSET/WIDTH[/MATCH]`; on error, the reason and the part at fault.
fn doorbell(text: &str) -> Result<Doorbell, (Reason, &str)> {
    let mut parts = text.split('/');
    let (Some(device), Some(bar), Some(offset), Some(width), matches, None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((Reason::BadDoorbell, text));
    };
    Ok(Doorbell {
        device: Bdf::parse(device).ok_or((Reason::NotABdf, device))?,
        bar: number(bar).and_then(narrow).map_err(|r| (r, bar))?,
        offset: number(offset).map_err(|r| (r, offset))?,
        width: number(width).and_then(narrow).map_err(|r| (r, width))?,
        matches: matches.map(|m| number(m).map_err(|r| (r, m))).transpose()?,
    })
}

/// A decimal or `0x`-hex number.
fn number(text: &str) -> Result<u64, Reason> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(digits) => digits_value(digits, 16).ok_or(Reason::NotANumber)?.ok_or(Reason::OutOfRange),
        None => digits_value(text, 10).ok_or(Reason::NotANumber)?.ok_or(Reason::OutOfRange),
    }
}

/// A `0x`-hex number of bytes, or a decimal one with an optional `K`, `M` or `G`.
fn size(text: &str) -> Result<u64, Reason> {
    if text.starts_with("0x") || text.starts_with("0X") {
        return number(text).map_err(|r| if r == Reason::NotANumber { Reason::NotASize } else { r });
    }
    let (digits, shift) = [('K', 10), ('M', 20), ('G', 30)]
        .into_iter()
        .find_map(|(unit, shift)| Some((text.strip_suffix(unit)?, shift)))
        .unwrap_or((text, 0));
    let value = digits_value(digits, 10).ok_or(Reason::NotASize)?.ok_or(Reason::OutOfRange)?;
    value.checked_mul(1 << shift).ok_or(Reason::OutOfRange)
}

/// The value of 1 or more digits in `radix`: `None` if not digits, `Some(None)` on overflow.
fn digits_value(digits: &str, radix: u32) -> Option<Option<u64>> {
    if digits.is_empty() {
        return None;
    }
    let mut value = Some(0u64);
    for c in digits.chars() {
        let digit = c.to_digit(radix)?;
        value = value.and_then(|v| v.checked_mul(u64::from(radix))?.checked_add(u64::from(digit)));
    }
    Some(value)
}

/// A hex number of 1 to `max_digits` digits.
fn hex(text: &str, max_digits: usize) -> Option<u64> {
    if text.len() > max_digits {
        return None;
    }
    digits_value(text, 16)?
}

/// A number that must fit in a `u8`.
fn narrow(value: u64) -> Result<u8, Reason> {
    u8::try_from(value).map_err(|_| Reason::OutOfRange)
}

fn to_string<const N: usize>(text: &str) -> Option<heapless::String<N>> {
    let mut s = heapless::String::new();
    s.push_str(text).ok()?;
    Some(s)
}

/// What the partitions are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Machine<'a> {
    /// CPU indices guests may be pinned to.
    pub cpus_online: &'a [u8],
    /// Memory available for all guests together.
    pub memory_free_bytes: u64,
    /// PCI functions present that may be assigned (not bridges).
    pub devices: &'a [Bdf],
    /// Whether an IOMMU can isolate assigned devices.
    pub iommu: bool,
}

/// Why the set of partitions cannot run on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ValidationErrorKind {
    /// No partition was described.
    NoPartitions,
    /// The name is not 1 to [`NAME_MAX`] of `[a-z0-9_-]`.
    BadName,
    /// The guest image name is not a valid bundle entry name.
    BadImageName,
    /// An earlier partition (index given) has the same name.
    DuplicateName {
        /// Index of the earlier partition.
        first: usize,
    },
    /// Memory (given) below [`MIN_MEMORY`].
    MemoryTooSmall(u64),
    /// Memory (given) above [`MAX_MEMORY`].
    MemoryTooLarge(u64),
    /// Memory (given) not a multiple of [`MEMORY_GRANULE`] (2 MiB).
    MemoryUnaligned(u64),
    /// The partitions up to this one need more memory than is free.
    MemoryExhausted {
        /// Memory of the partitions so far.
        needed: u64,
        /// `Machine::memory_free_bytes`.
        free: u64,
    },
    /// No CPU listed.
    NoCpus,
    /// A CPU listed twice in this partition.
    CpuRepeated(u8),
    /// A CPU that is not online.
    CpuOffline(u8),
    /// A CPU an earlier partition already uses (each physical CPU runs one vCPU).
    CpuShared {
        /// The CPU.
        cpu: u8,
        /// Index of the earlier partition.
        other: usize,
    },
    /// Devices listed, but there is no IOMMU to isolate them.
    NoIommu,
    /// A device that is not present or may not be assigned.
    DeviceAbsent(Bdf),
    /// A device listed twice in this partition.
    DeviceRepeated(Bdf),
    /// A device an earlier partition already has.
    DeviceShared {
        /// The device.
        device: Bdf,
        /// Index of the earlier partition.
        other: usize,
    },
    /// A doorbell (index given) on a device this partition does not have.
    DoorbellDevice {
        /// Index of the doorbell in the partition.
        doorbell: usize,
        /// Its device.
        device: Bdf,
    },
    /// A doorbell's BAR index is above 5.
    DoorbellBar {
        /// Index of the doorbell.
        doorbell: usize,
        /// The BAR index given.
        bar: u8,
    },
    /// A doorbell's width is not 1, 2, 4 or 8.
    DoorbellWidth {
        /// Index of the doorbell.
        doorbell: usize,
        /// The width given.
        width: u8,
    },
    /// A doorbell's offset is not a multiple of its width.
    DoorbellUnaligned {
        /// Index of the doorbell.
        doorbell: usize,
        /// The offset given.
        offset: u64,
        /// The width given.
        width: u8,
    },
    /// A doorbell's match value does not fit in its width.
    DoorbellMatchTooWide {
        /// Index of the doorbell.
        doorbell: usize,
        /// The match value given.
        value: u64,
        /// The width given.
        width: u8,
    },
    /// A doorbell on the same device, BAR and offset as an earlier one.
    DoorbellDuplicate {
        /// Index of the doorbell.
        doorbell: usize,
        /// Index of the earlier doorbell.
        first: usize,
    },
}

impl fmt::Display for ValidationErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoPartitions => write!(f, "no partitions"),
            Self::BadName => write!(f, "name is not 1 to {NAME_MAX} of a-z 0-9 _ -"),
            Self::BadImageName => write!(f, "guest: not an image name (1 to {} of a-z 0-9 _ -)", bundle::NAME_MAX),
            Self::DuplicateName { first } => write!(f, "name already used by partition {first}"),
            Self::MemoryTooSmall(m) => write!(f, "memory {} is below the minimum {}", Size(m), Size(MIN_MEMORY)),
            Self::MemoryTooLarge(m) => write!(f, "memory {} is above the maximum {}", Size(m), Size(MAX_MEMORY)),
            Self::MemoryUnaligned(m) => write!(f, "memory {} is not a multiple of {}", Size(m), Size(MEMORY_GRANULE)),
            Self::MemoryExhausted { needed, free } => {
                write!(f, "partitions need {} of memory in all, only {} is free", Size(needed), Size(free))
            }
            Self::NoCpus => write!(f, "no CPUs"),
            Self::CpuRepeated(cpu) => write!(f, "CPU {cpu} listed twice"),
            Self::CpuOffline(cpu) => write!(f, "CPU {cpu} is not online"),
            Self::CpuShared { cpu, other } => write!(f, "CPU {cpu} is already used by partition {other}"),
            Self::NoIommu => write!(f, "refusing to assign devices without an IOMMU"),
            Self::DeviceAbsent(d) => write!(f, "device {d} is not present or cannot be assigned"),
            Self::DeviceRepeated(d) => write!(f, "device {d} listed twice"),
            Self::DeviceShared { device, other } => {
                write!(f, "device {device} is already assigned to partition {other}")
            }
            Self::DoorbellDevice { doorbell, device } => {
                write!(f, "doorbell {doorbell}: device {device} is not assigned to this partition")
            }
            Self::DoorbellBar { doorbell, bar } => write!(f, "doorbell {doorbell}: BAR {bar} does not exist (0 to 5)"),
            Self::DoorbellWidth { doorbell, width } => {
                write!(f, "doorbell {doorbell}: width {width} is not 1, 2, 4 or 8")
            }
            Self::DoorbellUnaligned { doorbell, offset, width } => {
                write!(f, "doorbell {doorbell}: offset {offset:#x} is not a multiple of the width {width}")
            }
            Self::DoorbellMatchTooWide { doorbell, value, width } => {
                write!(f, "doorbell {doorbell}: match value {value:#x} does not fit in {width} bytes")
            }
            Self::DoorbellDuplicate { doorbell, first } => {
                write!(f, "doorbell {doorbell}: same device, BAR and offset as doorbell {first}")
            }
        }
    }
}

/// Why [`validate`] refused the partitions: the first problem found, in the partition at
/// index `partition` (0 and an empty name for `NoPartitions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// Index of the partition.
    pub partition: usize,
    /// Its name.
    pub name: Name,
    /// What is wrong.
    pub kind: ValidationErrorKind,
}

/// One line, e.g. `partition "hello": CPU 3 is not online`.
impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == ValidationErrorKind::NoPartitions {
            return write!(f, "{}", self.kind);
        }
        write!(f, "partition {}: {}", Excerpt::new(&self.name), self.kind)
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for ValidationError {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "partition {=usize} \"{=str}\": {}", self.partition, self.name.as_str(), self.kind);
    }
}

/// Checks the partitions against each other and against `machine`, in order, and reports the
/// first problem. Per partition: name valid and unique, guest name valid; memory within
/// [`MIN_MEMORY`]..=[`MAX_MEMORY`], a multiple of 2 MiB, and with the earlier partitions' not
/// above the free memory; at least one CPU, none listed twice, each online and not used by an
/// earlier partition; devices only with an IOMMU, each present, listed once and not given to
/// an earlier partition; each doorbell on one of the partition's devices, BAR ≤ 5, width 1, 2,
/// 4 or 8, offset a multiple of the width, match value fitting the width, and no two with the
/// same device, BAR and offset. Whether a doorbell lies inside its BAR and outside the MSI-X
/// table and PBA is checked later, against the device's BARs.
pub fn validate(specs: &[Spec], machine: &Machine<'_>) -> Result<(), ValidationError> {
    if specs.is_empty() {
        return Err(ValidationError { partition: 0, name: Name::new(), kind: ValidationErrorKind::NoPartitions });
    }
    let mut memory_total = 0u64;
    for (index, spec) in specs.iter().enumerate() {
        let earlier = specs.get(..index).unwrap_or(&[]);
        memory_total = memory_total.saturating_add(spec.memory_bytes);
        validate_one(spec, earlier, memory_total, machine).map_err(|kind| ValidationError {
            partition: index,
            name: spec.name.clone(),
            kind,
        })?;
    }
    Ok(())
}

fn validate_one(
    spec: &Spec,
    earlier: &[Spec],
    memory_total: u64,
    machine: &Machine<'_>,
) -> Result<(), ValidationErrorKind> {
    use ValidationErrorKind as K;
    if !is_valid_name(&spec.name) {
        return Err(K::BadName);
    }
    if let Some(first) = earlier.iter().position(|s| s.name == spec.name) {
        return Err(K::DuplicateName { first });
    }
    if !bundle::is_valid_name(&spec.guest) {
        return Err(K::BadImageName);
    }

    let memory = spec.memory_bytes;
    if memory < MIN_MEMORY {
        return Err(K::MemoryTooSmall(memory));
    }
    if memory > MAX_MEMORY {
        return Err(K::MemoryTooLarge(memory));
    }
    if !memory.is_multiple_of(MEMORY_GRANULE) {
        return Err(K::MemoryUnaligned(memory));
    }
    if memory_total > machine.memory_free_bytes {
        return Err(K::MemoryExhausted { needed: memory_total, free: machine.memory_free_bytes });
    }

    if spec.cpus.is_empty() {
        return Err(K::NoCpus);
    }
    for (k, &cpu) in spec.cpus.iter().enumerate() {
        if spec.cpus.get(..k).unwrap_or(&[]).contains(&cpu) {
            return Err(K::CpuRepeated(cpu));
        }
        if !machine.cpus_online.contains(&cpu) {
            return Err(K::CpuOffline(cpu));
        }
        if let Some(other) = earlier.iter().position(|s| s.cpus.contains(&cpu)) {
            return Err(K::CpuShared { cpu, other });
        }
    }

    if !spec.devices.is_empty() && !machine.iommu {
        return Err(K::NoIommu);
    }
    for (k, &device) in spec.devices.iter().enumerate() {
        if spec.devices.get(..k).unwrap_or(&[]).contains(&device) {
            return Err(K::DeviceRepeated(device));
        }
        if !machine.devices.contains(&device) {
            return Err(K::DeviceAbsent(device));
        }
        if let Some(other) = earlier.iter().position(|s| s.devices.contains(&device)) {
            return Err(K::DeviceShared { device, other });
        }
    }

    for (doorbell, d) in spec.doorbells.iter().enumerate() {
        if !spec.devices.contains(&d.device) {
            return Err(K::DoorbellDevice { doorbell, device: d.device });
        }
        if d.bar > MAX_BAR {
            return Err(K::DoorbellBar { doorbell, bar: d.bar });
        }
        if !matches!(d.width, 1 | 2 | 4 | 8) {
            return Err(K::DoorbellWidth { doorbell, width: d.width });
        }
        if !d.offset.is_multiple_of(u64::from(d.width)) {
            return Err(K::DoorbellUnaligned { doorbell, offset: d.offset, width: d.width });
        }
        if let Some(value) = d.matches {
            let bits = u32::from(d.width) * 8;
            if bits < 64 && value >> bits != 0 {
                return Err(K::DoorbellMatchTooWide { doorbell, value, width: d.width });
            }
        }
        let same = |e: &Doorbell| e.device == d.device && e.bar == d.bar && e.offset == d.offset;
        if let Some(first) = spec.doorbells.get(..doorbell).unwrap_or(&[]).iter().position(same) {
            return Err(K::DoorbellDuplicate { doorbell, first });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(text: &str) -> Spec {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_full_example() {
        let s = spec(
            "net0:guest=e1000-test,memory=64M,cpus=1+2,devices=00:03.0+0001:02:1f.7,\
             doorbell=00:03.0/0/0x3818/4,doorbell=0001:02:1f.7/2/64/2/0xbeef,console=log,arg=0x10",
        );
        let d3 = Bdf::new(0, 3, 0);
        let other = Bdf { segment: 1, bus: 2, device: 0x1f, function: 7 };
        assert_eq!(
            spec_eq_fields(&s),
            ("net0", "e1000-test", 64 << 20, &[1u8, 2][..], &[d3, other][..], Console::Log, 0x10)
        );
        assert_eq!(
            s.doorbells.as_slice(),
            &[
                Doorbell { device: d3, bar: 0, offset: 0x3818, width: 4, matches: None },
                Doorbell { device: other, bar: 2, offset: 64, width: 2, matches: Some(0xbeef) },
            ]
        );
        assert_eq!(
            s.to_string(),
            "net0:guest=e1000-test,memory=64M,cpus=1+2,devices=0000:00:03.0+0001:02:1f.7,\
             doorbell=0000:00:03.0/0/0x3818/4,doorbell=0001:02:1f.7/2/0x40/2/0xbeef,console=log,arg=0x10"
        );
        assert_eq!(parse(&s.to_string()), Ok(s));
    }

    fn spec_eq_fields(s: &Spec) -> (&str, &str, u64, &[u8], &[Bdf], Console, u64) {
        (
            s.name.as_str(),
            s.guest.as_str(),
            s.memory_bytes,
            s.cpus.as_slice(),
            s.devices.as_slice(),
            s.console,
            s.argument,
        )
    }

    #[test]
    fn parses_minimal_example_with_defaults() {
        let s = spec("hello:guest=hello,memory=0x400000,cpus=0");
        assert_eq!(spec_eq_fields(&s), ("hello", "hello", 4 << 20, &[0u8][..], &[][..], Console::Serial, 0));
        assert!(s.doorbells.is_empty());
        assert_eq!(s.to_string(), "hello:guest=hello,memory=4M,cpus=0,console=serial");
        // Keys in any order.
        assert_eq!(spec("hello:cpus=0,console=serial,memory=4096K,guest=hello"), s);
    }

    #[test]
    fn sizes_and_numbers() {
        let memory = |v: &str| spec(&format!("a:guest=g,cpus=0,memory={v}")).memory_bytes;
        assert_eq!(memory("3G"), 3 << 30);
        assert_eq!(memory("12345"), 12345);
        assert_eq!(memory("0X10"), 16);
        assert_eq!(memory("0xffffffffffffffff"), u64::MAX);
        assert_eq!(memory("17179869183G"), 17_179_869_183 << 30);
        let arg = |v: &str| spec(&format!("a:guest=g,cpus=0,memory=4M,arg={v}")).argument;
        assert_eq!(arg("18446744073709551615"), u64::MAX);
        assert_eq!(arg("0x0"), 0);
        assert_eq!(arg("007"), 7);
        assert_eq!(Size(0).to_string(), "0");
        assert_eq!(Size(1536).to_string(), "1536");
        assert_eq!(Size(3 << 29).to_string(), "1536M");
        assert_eq!(Size(1025).to_string(), "1025");
    }

    #[test]
    fn bdf_syntax() {
        assert_eq!(Bdf::parse("00:02.0"), Some(Bdf::new(0, 2, 0)));
        assert_eq!(Bdf::parse("ff:1F.7"), Some(Bdf::new(0xff, 0x1f, 7)));
        assert_eq!(Bdf::parse("ffff:0:0.0"), Some(Bdf { segment: 0xffff, ..Bdf::new(0, 0, 0) }));
        for bad in [
            "",
            "00:20.0",
            "00:02.8",
            "100:02.0",
            "1:2:3:4.0",
            "10000:00:00.0",
            "00:02",
            "00.02.0",
            "0:+2.0",
            "00:02.00",
            ":.",
            "00:02.0.1",
        ] {
            assert_eq!(Bdf::parse(bad), None, "{bad}");
        }
        assert_eq!(Bdf::new(0, 2, 0).to_string(), "0000:00:02.0");
        assert_eq!(Bdf { segment: 0xabc, bus: 0xde, device: 0x1f, function: 7 }.to_string(), "0abc:de:1f.7");
    }

    #[test]
    fn parse_errors() {
        let long = "y".repeat(40);
        let cases: Vec<(String, &str)> = vec![
            ("hello".into(), r#"partition "hello": expected NAME:key=value,..."#),
            ("".into(), r#"partition "": expected NAME:key=value,..."#),
            (":guest=g".into(), r#"partition "": name: "" is not a name (1 to 15 of a-z 0-9 _ -)"#),
            ("Hello:guest=g".into(), r#"partition "Hello": name: "Hello" is not a name (1 to 15 of a-z 0-9 _ -)"#),
            (
                "abcdefghijklmnop:guest=g".into(),
                r#"partition "abcdefghijklmnop": name: "abcdefghijklmnop" is not a name (1 to 15 of a-z 0-9 _ -)"#,
            ),
            ("hello:".into(), r#"partition "hello": empty item (extra comma)"#),
            ("hello:guest=g,,memory=4M".into(), r#"partition "hello": empty item (extra comma)"#),
            ("hello:guest=g,".into(), r#"partition "hello": empty item (extra comma)"#),
            ("hello:guest".into(), r#"partition "hello": "guest": expected key=value"#),
            ("hello:colour=red".into(), r#"partition "hello": "colour": unknown key"#),
            ("hello:Guest=g".into(), r#"partition "hello": "Guest": unknown key"#),
            ("hello: guest=g".into(), r#"partition "hello": " guest": unknown key"#),
            ("hello:name=x".into(), r#"partition "hello": "name": unknown key"#),
            ("hello:guest=g,guest=h".into(), r#"partition "hello": guest: given twice"#),
            ("hello:memory=4M,memory=4M".into(), r#"partition "hello": memory: given twice"#),
            ("hello:arg=1,arg=1".into(), r#"partition "hello": arg: given twice"#),
            ("hello:console=log,console=log".into(), r#"partition "hello": console: given twice"#),
            ("hello:cpus=1,cpus=2".into(), r#"partition "hello": cpus: given twice"#),
            ("hello:devices=0:1.0,devices=0:2.0".into(), r#"partition "hello": devices: given twice"#),
            ("hello:memory=4M,cpus=0".into(), r#"partition "hello": guest: missing"#),
            ("hello:guest=g,cpus=0".into(), r#"partition "hello": memory: missing"#),
            ("hello:guest=g,memory=4M".into(), r#"partition "hello": cpus: missing"#),
            ("hello:guest=G".into(), r#"partition "hello": guest: "G" is not an image name (1 to 31 of a-z 0-9 _ -)"#),
            ("hello:guest=".into(), r#"partition "hello": guest: "" is not an image name (1 to 31 of a-z 0-9 _ -)"#),
            ("hello:memory=16Q".into(), r#"partition "hello": memory: "16Q" is not a size"#),
            ("hello:memory=".into(), r#"partition "hello": memory: "" is not a size"#),
            ("hello:memory=M".into(), r#"partition "hello": memory: "M" is not a size"#),
            ("hello:memory=0x10M".into(), r#"partition "hello": memory: "0x10M" is not a size"#),
            ("hello:memory=0x".into(), r#"partition "hello": memory: "0x" is not a size"#),
            ("hello:memory=-4M".into(), r#"partition "hello": memory: "-4M" is not a size"#),
            ("hello:memory=+4M".into(), r#"partition "hello": memory: "+4M" is not a size"#),
            ("hello:memory=4m".into(), r#"partition "hello": memory: "4m" is not a size"#),
            ("hello:memory=4MM".into(), r#"partition "hello": memory: "4MM" is not a size"#),
            ("hello:memory=17179869184G".into(), r#"partition "hello": memory: "17179869184G" is out of range"#),
            (
                "hello:memory=18446744073709551616".into(),
                r#"partition "hello": memory: "18446744073709551616" is out of range"#,
            ),
            (
                "hello:memory=0x10000000000000000".into(),
                r#"partition "hello": memory: "0x10000000000000000" is out of range"#,
            ),
            ("hello:cpus=".into(), r#"partition "hello": cpus: "" is not a number"#),
            ("hello:cpus=1+".into(), r#"partition "hello": cpus: "" is not a number"#),
            ("hello:cpus=1,2".into(), r#"partition "hello": "2": expected key=value"#),
            ("hello:cpus=one".into(), r#"partition "hello": cpus: "one" is not a number"#),
            ("hello:cpus=256".into(), r#"partition "hello": cpus: "256" is out of range"#),
            ("hello:cpus=0+1+2+3+4+5+6+7+8".into(), r#"partition "hello": cpus: more than 8"#),
            (
                "hello:devices=".into(),
                r#"partition "hello": devices: "" is not a PCI address (bb:dd.f or ssss:bb:dd.f)"#,
            ),
            (
                "hello:devices=00:20.0".into(),
                r#"partition "hello": devices: "00:20.0" is not a PCI address (bb:dd.f or ssss:bb:dd.f)"#,
            ),
            (
                "hello:devices=0:1.0+0:2.0+0:3.0+0:4.0+0:5.0+0:6.0+0:7.0+0:8.0+0:9.0".into(),
                r#"partition "hello": devices: more than 8"#,
            ),
            (
                "hello:doorbell=00:02.0/0/0".into(),
                r#"partition "hello": doorbell: "00:02.0/0/0" is not BDF/BAR/OFFSET/WIDTH[/MATCH]"#,
            ),
            (
                "hello:doorbell=00:02.0/0/0/4/1/2".into(),
                r#"partition "hello": doorbell: "00:02.0/0/0/4/1/2" is not BDF/BAR/OFFSET/WIDTH[/MATCH]"#,
            ),
            ("hello:doorbell=".into(), r#"partition "hello": doorbell: "" is not BDF/BAR/OFFSET/WIDTH[/MATCH]"#),
            (
                "hello:doorbell=00:02/0/0/4".into(),
                r#"partition "hello": doorbell: "00:02" is not a PCI address (bb:dd.f or ssss:bb:dd.f)"#,
            ),
            ("hello:doorbell=00:02.0/x/0/4".into(), r#"partition "hello": doorbell: "x" is not a number"#),
            ("hello:doorbell=00:02.0/256/0/4".into(), r#"partition "hello": doorbell: "256" is out of range"#),
            ("hello:doorbell=00:02.0/0/0x1g/4".into(), r#"partition "hello": doorbell: "0x1g" is not a number"#),
            ("hello:doorbell=00:02.0/0/0/".into(), r#"partition "hello": doorbell: "" is not a number"#),
            ("hello:doorbell=00:02.0/0/0/0x100".into(), r#"partition "hello": doorbell: "0x100" is out of range"#),
            ("hello:doorbell=00:02.0/0/0/4/".into(), r#"partition "hello": doorbell: "" is not a number"#),
            ("hello:doorbell=00:02.0/0/0/4/1K".into(), r#"partition "hello": doorbell: "1K" is not a number"#),
            (
                format!("hello:{}", ["doorbell=00:02.0/0/0/4"; 17].join(",")),
                r#"partition "hello": doorbell: more than 16"#,
            ),
            ("hello:console=vga".into(), r#"partition "hello": console: "vga" is not serial, log or none"#),
            ("hello:console=Serial".into(), r#"partition "hello": console: "Serial" is not serial, log or none"#),
            ("hello:vdevs=notify+gpu".into(), r#"partition "hello": vdevs: "gpu" is not an emulated device (notify)"#),
            ("hello:vdevs=notify,vdevs=notify".into(), r#"partition "hello": vdevs: given twice"#),
            ("hello:arg=".into(), r#"partition "hello": arg: "" is not a number"#),
            ("hello:arg=1.5".into(), r#"partition "hello": arg: "1.5" is not a number"#),
            ("hello:arg=0x".into(), r#"partition "hello": arg: "0x" is not a number"#),
            ("hello:arg=٣".into(), r#"partition "hello": arg: "٣" is not a number"#),
            (
                "hello:arg=18446744073709551616".into(),
                r#"partition "hello": arg: "18446744073709551616" is out of range"#,
            ),
            ("hello:arg=\"\n".into(), r#"partition "hello": arg: "\"\n" is not a number"#),
        ];
        for (text, want) in cases {
            let got = parse(&text).map(|s| s.to_string());
            assert_eq!(got.as_ref().map_err(|e| e.to_string()), Err(want.to_string()), "{text:?}");
        }
        // Long text is cut to 32 bytes, at a character boundary.
        let (y32, y31) = (&long[..32], &long[..31]);
        let message = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(
            message(&format!("hello:guest={long}")),
            format!(r#"partition "hello": guest: "{y32}..." is not an image name (1 to 31 of a-z 0-9 _ -)"#)
        );
        assert_eq!(message(&format!("{long}é")), format!(r#"partition "{y32}...": expected NAME:key=value,..."#));
        assert_eq!(
            message(&format!("{y31}é:")),
            format!(r#"partition "{y31}...": name: "{y31}..." is not a name (1 to 15 of a-z 0-9 _ -)"#)
        );
    }

    #[test]
    fn parse_error_fields() {
        let e = parse("hello:memory=16Q").unwrap_err();
        assert_eq!(e.partition.as_str(), "hello");
        assert_eq!(e.field, Field::Memory);
        assert_eq!(e.reason, Reason::NotASize);
        assert_eq!(e.value.as_str(), "16Q");
        assert!(!e.value.is_truncated());
    }

    #[test]
    fn excerpt_cuts_at_char_boundary() {
        let text = format!("{}ééé", "a".repeat(31));
        let e = Excerpt::new(&text);
        assert_eq!(e.as_str(), "a".repeat(31));
        assert!(e.is_truncated());
        assert_eq!(Excerpt::new("exact").to_string(), "\"exact\"");
    }

    const ONLINE: [u8; 4] = [0, 1, 2, 3];
    const DEVICES: [Bdf; 3] = [Bdf::new(0, 2, 0), Bdf::new(0, 3, 0), Bdf::new(0, 4, 0)];

    fn machine() -> Machine<'static> {
        Machine { cpus_online: &ONLINE, memory_free_bytes: 256 << 20, devices: &DEVICES, iommu: true }
    }

    fn check(texts: &[&str], machine: &Machine) -> Result<(), String> {
        let specs: Vec<Spec> = texts.iter().map(|t| spec(t)).collect();
        validate(&specs, machine).map_err(|e| e.to_string())
    }

    #[test]
    fn validates_good_set() {
        // Doorbells at the same offset of different BARs are distinct; a match value may use
        // the whole width.
        let a = "a:guest=g,memory=64M,cpus=0+1,devices=00:02.0,doorbell=00:02.0/0/0x10/4/0xffffffff,\
                 doorbell=00:02.0/1/0x10/4/0,doorbell=00:02.0/5/8/8/0xffffffffffffffff";
        let b = "b:guest=g,memory=192M,cpus=2,devices=00:03.0+00:04.0,doorbell=00:03.0/1/1/1/0xff";
        assert_eq!(check(&[a, b], &machine()), Ok(()));
        assert_eq!(
            check(&["x:guest=g,memory=3G,cpus=3"], &Machine { memory_free_bytes: 3 << 30, ..machine() }),
            Ok(())
        );
    }

    #[test]
    fn validation_errors() {
        let no_iommu = Machine { iommu: false, ..machine() };
        let cases: Vec<(Vec<&str>, Machine, &str)> = vec![
            (vec![], machine(), "no partitions"),
            (
                vec!["a:guest=g,memory=4M,cpus=0", "a:guest=g,memory=4M,cpus=1"],
                machine(),
                r#"partition "a": name already used by partition 0"#,
            ),
            (vec!["a:guest=g,memory=2M,cpus=0"], machine(), r#"partition "a": memory 2M is below the minimum 4M"#),
            (vec!["a:guest=g,memory=0,cpus=0"], machine(), r#"partition "a": memory 0 is below the minimum 4M"#),
            (
                vec!["a:guest=g,memory=3074M,cpus=0"],
                machine(),
                r#"partition "a": memory 3074M is above the maximum 3G"#,
            ),
            (vec!["a:guest=g,memory=5M,cpus=0"], machine(), r#"partition "a": memory 5M is not a multiple of 2M"#),
            (
                vec!["a:guest=g,memory=0x400001,cpus=0"],
                machine(),
                r#"partition "a": memory 4194305 is not a multiple of 2M"#,
            ),
            (
                vec!["a:guest=g,memory=128M,cpus=0", "b:guest=g,memory=130M,cpus=1"],
                machine(),
                r#"partition "b": partitions need 258M of memory in all, only 256M is free"#,
            ),
            (vec!["a:guest=g,memory=4M,cpus=0+1+0"], machine(), r#"partition "a": CPU 0 listed twice"#),
            (vec!["a:guest=g,memory=4M,cpus=4"], machine(), r#"partition "a": CPU 4 is not online"#),
            (
                vec!["a:guest=g,memory=4M,cpus=0", "b:guest=g,memory=4M,cpus=1", "c:guest=g,memory=4M,cpus=2+1"],
                machine(),
                r#"partition "c": CPU 1 is already used by partition 1"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0"],
                no_iommu,
                r#"partition "a": refusing to assign devices without an IOMMU"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:05.0"],
                machine(),
                r#"partition "a": device 0000:00:05.0 is not present or cannot be assigned"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=1:02.0"],
                machine(),
                r#"partition "a": device 0000:01:02.0 is not present or cannot be assigned"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0+0000:00:02.0"],
                machine(),
                r#"partition "a": device 0000:00:02.0 listed twice"#,
            ),
            (
                vec![
                    "a:guest=g,memory=4M,cpus=0,devices=00:02.0",
                    "b:guest=g,memory=4M,cpus=1,devices=00:03.0+00:02.0",
                ],
                machine(),
                r#"partition "b": device 0000:00:02.0 is already assigned to partition 0"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:03.0/0/0/4"],
                machine(),
                r#"partition "a": doorbell 0: device 0000:00:03.0 is not assigned to this partition"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,doorbell=00:03.0/0/0/4"],
                machine(),
                r#"partition "a": doorbell 0: device 0000:00:03.0 is not assigned to this partition"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/0/4,doorbell=00:02.0/6/0/4"],
                machine(),
                r#"partition "a": doorbell 1: BAR 6 does not exist (0 to 5)"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/0/3"],
                machine(),
                r#"partition "a": doorbell 0: width 3 is not 1, 2, 4 or 8"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/0/0"],
                machine(),
                r#"partition "a": doorbell 0: width 0 is not 1, 2, 4 or 8"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/0x42/4"],
                machine(),
                r#"partition "a": doorbell 0: offset 0x42 is not a multiple of the width 4"#,
            ),
            (
                vec!["a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/0x42/2/0x10000"],
                machine(),
                r#"partition "a": doorbell 0: match value 0x10000 does not fit in 2 bytes"#,
            ),
            (
                vec![
                    "a:guest=g,memory=4M,cpus=0,devices=00:02.0,doorbell=00:02.0/0/8/4,doorbell=00:02.0/0/4/4,doorbell=00:02.0/0/8/8/1",
                ],
                machine(),
                r#"partition "a": doorbell 2: same device, BAR and offset as doorbell 0"#,
            ),
        ];
        for (texts, machine, want) in cases {
            assert_eq!(check(&texts, &machine), Err(want.to_string()), "{texts:?}");
        }
    }

    #[test]
    fn validation_error_fields_and_programmatic_specs() {
        let mut s = spec("ok:guest=g,memory=4M,cpus=0");
        s.cpus.clear();
        let e = validate(&[spec("first:guest=g,memory=4M,cpus=1"), s.clone()], &machine()).unwrap_err();
        assert_eq!((e.partition, e.name.as_str(), e.kind), (1, "ok", ValidationErrorKind::NoCpus));
        assert_eq!(e.to_string(), r#"partition "ok": no CPUs"#);

        s.name = Name::try_from("Bad").unwrap();
        assert_eq!(
            validate(&[s.clone()], &machine()).unwrap_err().to_string(),
            r#"partition "Bad": name is not 1 to 15 of a-z 0-9 _ -"#
        );
        let mut s = spec("ok:guest=g,memory=4M,cpus=0");
        s.guest = ImageName::try_from("a b").unwrap();
        assert_eq!(validate(&[s], &machine()).unwrap_err().kind, ValidationErrorKind::BadImageName);
        let mut s = spec("ok:guest=g,memory=4M,cpus=0");
        s.memory_bytes = u64::MAX;
        let big = Machine { memory_free_bytes: u64::MAX, ..machine() };
        assert_eq!(validate(&[s], &big).unwrap_err().kind, ValidationErrorKind::MemoryTooLarge(u64::MAX));
        // Totals saturate rather than overflow.
        let specs: Vec<Spec> = (0..4).map(|i| spec(&format!("p{i}:guest=g,memory=3G,cpus={i}"))).collect();
        assert_eq!(validate(&specs, &Machine { memory_free_bytes: 12 << 30, ..machine() }), Ok(()));
        assert_eq!(
            validate(&specs, &Machine { memory_free_bytes: (12 << 30) - 1, ..machine() }).unwrap_err().kind,
            ValidationErrorKind::MemoryExhausted { needed: 12 << 30, free: (12 << 30) - 1 }
        );
    }

    fn bdf_strategy() -> impl Strategy<Value = Bdf> {
        (any::<u16>(), any::<u8>(), 0u8..32, 0u8..8).prop_map(|(segment, bus, device, function)| Bdf {
            segment,
            bus,
            device,
            function,
        })
    }

    fn spec_strategy() -> impl Strategy<Value = Spec> {
        let memory = prop_oneof![any::<u64>(), (0u64..4096).prop_map(|m| m << 20), (0u64..16).prop_map(|g| g << 30)];
        let doorbell = (bdf_strategy(), any::<u8>(), any::<u64>(), any::<u8>(), proptest::option::of(any::<u64>()))
            .prop_map(|(device, bar, offset, width, matches)| Doorbell { device, bar, offset, width, matches });
        let console = prop_oneof![Just(Console::Serial), Just(Console::Log), Just(Console::Discard)];
        (
            "[a-z0-9_-]{1,15}",
            "[a-z0-9_-]{1,31}",
            memory,
            proptest::collection::vec(any::<u8>(), 1..=MAX_VCPUS),
            proptest::collection::vec(bdf_strategy(), 0..=MAX_DEVICES),
            proptest::collection::vec(doorbell, 0..=MAX_DOORBELLS),
            console,
            any::<u64>(),
            proptest::collection::vec(Just(VirtualDevice::Notify), 0..=MAX_VDEVS),
        )
            .prop_map(|(name, guest, memory_bytes, cpus, devices, doorbells, console, argument, vdevs)| Spec {
                name: Name::try_from(name.as_str()).unwrap(),
                guest: ImageName::try_from(guest.as_str()).unwrap(),
                memory_bytes,
                cpus: heapless::Vec::from_slice(&cpus).unwrap(),
                devices: heapless::Vec::from_slice(&devices).unwrap(),
                doorbells: heapless::Vec::from_slice(&doorbells).unwrap(),
                console,
                argument,
                vdevs: heapless::Vec::from_slice(&vdevs).unwrap(),
            })
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in any::<String>()) {
            if let Err(e) = parse(&text) {
                let _ = e.to_string();
            }
        }

        #[test]
        fn parse_never_panics_on_near_syntax(text in "[a-z0-9:=,+./xKMG_-]{0,120}") {
            if let Ok(s) = parse(&text) {
                prop_assert_eq!(parse(&s.to_string()), Ok(s));
            }
        }

        #[test]
        fn display_round_trips(s in spec_strategy()) {
            let text = s.to_string();
            prop_assert!(!text.contains(' '));
            prop_assert_eq!(parse(&text), Ok(s));
        }

        #[test]
        fn mutated_descriptions_never_panic(
            s in spec_strategy(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = s.to_string().into_bytes();
            for (at, value) in edits {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            let text = String::from_utf8_lossy(&bytes);
            match parse(&text) {
                Ok(parsed) => {
                    let online: Vec<u8> = (0..=255).collect();
                    let machine = Machine { cpus_online: &online, memory_free_bytes: u64::MAX, devices: &parsed.devices, iommu: true };
                    let _ = validate(core::slice::from_ref(&parsed), &machine).map_err(|e| e.to_string());
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
    }
}
