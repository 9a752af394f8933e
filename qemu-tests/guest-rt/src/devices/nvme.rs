//! An NVMe controller driver (NVM Express Base Specification 1.4): controller disable/enable
//! with bounded `CSTS.RDY` waits, the doorbell stride from `CAP.DSTRD`, an admin queue pair and
//! I/O queue pairs in guest RAM (page-aligned [`DmaBuf`]s), Identify, Get Features, Create I/O
//! CQ (with interrupt vector and IEN) / SQ, and Read, Write, Flush of logical blocks with PRP1
//! (and PRP2 when the data crosses a page). A command is submitted by writing the SQ entry and
//! the SQ tail doorbell; its completion is found by the CQ phase bit and consumed with the CQ
//! head doorbell — by polling, or after the queue's interrupt vector fired ([`Wait`]).
//! Every wait is bounded and fails with an [`NvmeError`] saying what was waited for.
//!
//! Register accesses are 32-bit (64-bit registers as two halves, low first), which every
//! controller takes.

use core::fmt;

use conduit_abi::BootInfo;

use crate::memory::{self, DmaBuf, PAGE_BYTES};
use crate::mmio::Mmio;
use crate::msix::{MsiX, MsixError};
use crate::pci::{Bar, BarWindow, Ecam, Function, PciError, command};
use crate::{interrupts, time};

/// PCI vendor ID of QEMU's NVMe controller.
pub const VENDOR: u16 = 0x1b36;
/// PCI device ID of QEMU's NVMe controller.
pub const DEVICE: u16 = 0x0010;

/// Controller registers (NVMe 1.4 §3.1, Figure 78).
pub mod reg {
    /// Controller capabilities (64-bit).
    pub const CAP: u64 = 0x00;
    /// Version.
    pub const VS: u64 = 0x08;
    /// Controller configuration.
    pub const CC: u64 = 0x14;
    /// Controller status.
    pub const CSTS: u64 = 0x1c;
    /// Admin queue attributes.
    pub const AQA: u64 = 0x24;
    /// Admin submission queue base (64-bit).
    pub const ASQ: u64 = 0x28;
    /// Admin completion queue base (64-bit).
    pub const ACQ: u64 = 0x30;
    /// First doorbell (SQ 0 tail).
    pub const DOORBELLS: u64 = 0x1000;
}

/// CAP fields (NVMe 1.4 §3.1.1).
mod cap {
    /// Maximum queue entries supported, 0-based, bits 15:0.
    pub fn mqes(cap: u64) -> u32 {
        (cap & 0xffff) as u32
    }
    /// Timeout for CSTS.RDY changes, in 500 ms units, bits 31:24.
    pub fn to(cap: u64) -> u64 {
        (cap >> 24) & 0xff
    }
    /// Doorbell stride: 4 << DSTRD bytes, bits 35:32.
    pub fn dstrd(cap: u64) -> u32 {
        ((cap >> 32) & 0xf) as u32
    }
    /// Minimum memory page size 2^(12 + MPSMIN), bits 51:48.
    pub fn mpsmin(cap: u64) -> u32 {
        ((cap >> 48) & 0xf) as u32
    }
}

/// CC bits (NVMe 1.4 §3.1.5).
mod cc {
    /// Enable.
    pub const EN: u32 = 1 << 0;
    /// I/O submission queue entry size: 2^6 = 64 bytes (bits 19:16).
    pub const IOSQES_64: u32 = 6 << 16;
    /// I/O completion queue entry size: 2^4 = 16 bytes (bits 23:20).
    pub const IOCQES_16: u32 = 4 << 20;
    // CSS (6:4) = 0 NVM command set, MPS (10:7) = 0 4 KiB pages, AMS (13:11) = 0 round robin,
    // SHN (15:14) = 0: all zero.
}

/// CSTS bits (NVMe 1.4 §3.1.6).
mod csts {
    /// Ready.
    pub const RDY: u32 = 1 << 0;
    /// Controller fatal status.
    pub const CFS: u32 = 1 << 1;
}

/// Command opcodes (NVMe 1.4 Figure 139 admin, Figure 346 NVM).
pub mod opcode {
    /// Admin: Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Admin: Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Admin: Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Admin: Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// NVM: Flush.
    pub const FLUSH: u8 = 0x00;
    /// NVM: Write.
    pub const WRITE: u8 = 0x01;
    /// NVM: Read.
    pub const READ: u8 = 0x02;
}

/// Feature identifiers (NVMe 1.4 Figure 271).
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// Identify CNS values (NVMe 1.4 Figure 244).
mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
}

/// Bytes per submission queue entry.
pub const SQE_BYTES: u64 = 64;
/// Bytes per completion queue entry.
pub const CQE_BYTES: u64 = 16;
/// Queue IDs this driver manages: the admin queue (0) and I/O queues 1–7.
pub const MAX_QUEUES: usize = 8;
/// Default bound of one command.
pub const COMMAND_TIMEOUT_US: u64 = 1_000_000;
/// After a queue's interrupt, how long the completion entry may take to show.
const ENTRY_AFTER_INTERRUPT_US: u64 = 100_000;

/// How a command's completion is waited for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Poll the completion queue's phase bit.
    Poll,
    /// Wait for an interrupt at this vector (counted by `interrupts::count`), then take the
    /// completion. Interrupts must be enabled.
    Interrupt(u8),
}

/// A submission queue entry (NVMe 1.4 Figure 105), the fields this driver uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Namespace ID.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2.
    pub prp2: u64,
    /// Command dwords 10–15.
    pub cdw: [u32; 6],
}

/// A completion queue entry (NVMe 1.4 Figure 121), phase bit removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific (dword 0).
    pub result: u32,
    /// SQ head pointer.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Status field without the phase bit (bits 7:0 status code, 10:8 status code type, …);
    /// 0 is success.
    pub status: u16,
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeError {
    /// CAP.MPSMIN does not allow 4 KiB pages.
    PageSize(u32),
    /// CSTS.RDY did not reach `ready` within the CAP.TO bound.
    ReadyTimeout {
        /// The value waited for.
        ready: bool,
        /// Microseconds waited.
        waited_us: u64,
        /// CSTS at the end.
        csts: u32,
    },
    /// CSTS.CFS is set.
    Fatal {
        /// CSTS.
        csts: u32,
    },
    /// The free range has no room for a queue or buffer.
    NoMemory,
    /// Queue ID out of range, not created, or created twice.
    BadQueue(u16),
    /// Queue size outside 2..=CAP.MQES+1.
    BadQueueSize(u32),
    /// The submission queue is full.
    QueueFull(u16),
    /// The data buffer is outside the `DmaBuf` or spans more than two pages (no PRP lists).
    BadBuffer,
    /// No completion within the bound (with the interrupt's fate when one was waited for).
    Timeout {
        /// Queue.
        qid: u16,
        /// Command.
        cid: u16,
        /// Opcode.
        opcode: u8,
        /// Microseconds waited.
        waited_us: u64,
        /// The vector waited on, and whether it fired.
        interrupt: Option<(u8, bool)>,
        /// Whether the completion entry was there in the end.
        posted: bool,
    },
    /// A completion for a different command or queue.
    Mismatch {
        /// Queue polled.
        qid: u16,
        /// Command expected.
        cid: u16,
        /// What arrived.
        got: Completion,
    },
    /// The command completed with an error status.
    Failed {
        /// Queue.
        qid: u16,
        /// Opcode.
        opcode: u8,
        /// Status field (see `Completion::status`).
        status: u16,
    },
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::PageSize(m) => write!(f, "CAP.MPSMIN {m}: 4 KiB pages not supported"),
            Self::ReadyTimeout { ready, waited_us, csts } => {
                write!(f, "CSTS.RDY not {} after {waited_us} us (CSTS {csts:#x})", u8::from(ready))
            }
            Self::Fatal { csts } => write!(f, "controller fatal status (CSTS {csts:#x})"),
            Self::NoMemory => write!(f, "no free memory for a queue or buffer"),
            Self::BadQueue(q) => write!(f, "queue {q} is not usable here"),
            Self::BadQueueSize(n) => write!(f, "queue size {n} outside what CAP.MQES allows"),
            Self::QueueFull(q) => write!(f, "submission queue {q} full"),
            Self::BadBuffer => write!(f, "data buffer outside its DmaBuf or more than two pages"),
            Self::Timeout { qid, cid, opcode, waited_us, interrupt, posted } => {
                write!(f, "queue {qid} command {cid} (opcode {opcode:#04x}): ")?;
                match interrupt {
                    Some((v, true)) => write!(f, "interrupt {v:#04x} arrived but ")?,
                    Some((v, false)) => write!(f, "no interrupt at {v:#04x} and ")?,
                    None => {}
                }
                let entry = if posted { "completion posted" } else { "no completion" };
                write!(f, "{entry} after {waited_us} us")
            }
            Self::Mismatch { qid, cid, got } => write!(
                f,
                "queue {qid}: expected completion of command {cid}, got command {} of SQ {}",
                got.cid, got.sq_id
            ),
            Self::Failed { qid, opcode, status } => write!(
                f,
                "queue {qid} opcode {opcode:#04x} failed: status code type {}, status code {:#04x}",
                (status >> 8) & 0x7,
                status & 0xff
            ),
        }
    }
}

/// What Identify Controller returns that the tests look at (NVMe 1.4 Figure 247).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// Serial number (ASCII, space-padded).
    pub serial: [u8; 20],
    /// Model number (ASCII, space-padded).
    pub model: [u8; 40],
    /// Maximum data transfer size (2^MDTS pages; 0: no limit).
    pub mdts: u8,
    /// Number of namespaces.
    pub nn: u32,
}

impl IdentifyController {
    /// The model number without trailing spaces (`"?"` if it is not ASCII).
    pub fn model(&self) -> &str {
        trimmed(&self.model)
    }

    /// The serial number without trailing spaces.
    pub fn serial(&self) -> &str {
        trimmed(&self.serial)
    }
}

fn trimmed(bytes: &[u8]) -> &str {
    let s = core::str::from_utf8(bytes).unwrap_or("?");
    s.trim_end_matches([' ', '\0'])
}

/// What Identify Namespace returns that the tests look at (NVMe 1.4 Figure 245).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace size in logical blocks.
    pub blocks: u64,
    /// Bytes per logical block (of the format in use).
    pub block_bytes: u32,
}

/// One queue pair: SQ and CQ with the same ID.
#[derive(Debug)]
struct Queue {
    sq: DmaBuf,
    cq: DmaBuf,
    entries: u16,
    sq_tail: u16,
    sq_head: u16,
    cq_head: u16,
    phase: bool,
    next_cid: u16,
    /// Opcode of the last command submitted (for messages).
    last_opcode: u8,
}

impl Queue {
    fn new(entries: u16) -> Result<Self, NvmeError> {
        let pages = |bytes: u64| bytes.div_ceil(PAGE_BYTES);
        let sq = memory::alloc_pages(pages(u64::from(entries) * SQE_BYTES)).ok_or(NvmeError::NoMemory)?;
        let cq = memory::alloc_pages(pages(u64::from(entries) * CQE_BYTES)).ok_or(NvmeError::NoMemory)?;
        Ok(Self { sq, cq, entries, sq_tail: 0, sq_head: 0, cq_head: 0, phase: true, next_cid: 0, last_opcode: 0 })
    }
}

/// An NVMe controller.
#[derive(Debug)]
pub struct Controller {
    regs: Mmio,
    cap: u64,
    queues: [Option<Queue>; MAX_QUEUES],
    block_bytes: u32,
}

impl Controller {
    /// The controller whose BAR 0 registers are `regs` (at least the registers and the
    /// doorbells of `MAX_QUEUES` queue pairs). Reads CAP; touches nothing else. The driver
    /// points DMA only at [`DmaBuf`]s.
    pub fn new(regs: Mmio) -> Self {
        let mut c = Self { regs, cap: 0, queues: [const { None }; MAX_QUEUES], block_bytes: 512 };
        c.cap = c.read64(reg::CAP);
        c
    }

    fn read64(&self, offset: u64) -> u64 {
        let lo = self.regs.read32(offset);
        let hi = self.regs.read32(offset + 4);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn write64(&self, offset: u64, value: u64) {
        self.regs.write32(offset, value as u32);
        self.regs.write32(offset + 4, (value >> 32) as u32);
    }

    /// CAP.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The version register (major 31:16, minor 15:8).
    pub fn version(&self) -> u32 {
        self.regs.read32(reg::VS)
    }

    /// CSTS.
    pub fn csts(&self) -> u32 {
        self.regs.read32(reg::CSTS)
    }

    /// Bytes between doorbells (4 << CAP.DSTRD).
    pub fn doorbell_stride(&self) -> u64 {
        4 << cap::dstrd(self.cap)
    }

    /// Most entries a queue may have (CAP.MQES + 1).
    pub fn max_queue_entries(&self) -> u32 {
        cap::mqes(self.cap) + 1
    }

    /// The bound of a CSTS.RDY transition: CAP.TO × 500 ms (at least 500 ms).
    pub fn ready_timeout_us(&self) -> u64 {
        cap::to(self.cap).max(1) * 500_000
    }

    /// Bytes per logical block of namespace reads and writes (512 until
    /// [`Controller::identify_namespace`] says otherwise).
    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    fn sq_doorbell(&self, qid: u16) -> u64 {
        reg::DOORBELLS + 2 * u64::from(qid) * self.doorbell_stride()
    }

    fn cq_doorbell(&self, qid: u16) -> u64 {
        reg::DOORBELLS + (2 * u64::from(qid) + 1) * self.doorbell_stride()
    }

    fn wait_ready(&self, ready: bool) -> Result<(), NvmeError> {
        let start = time::uptime_us();
        let reached = time::wait_until(start.saturating_add(self.ready_timeout_us()), || {
            let csts = self.csts();
            (csts & csts::RDY != 0) == ready || csts & csts::CFS != 0
        });
        let csts = self.csts();
        if csts & csts::CFS != 0 && ready {
            return Err(NvmeError::Fatal { csts });
        }
        if !reached || (csts & csts::RDY != 0) != ready {
            return Err(NvmeError::ReadyTimeout { ready, waited_us: time::uptime_us() - start, csts });
        }
        Ok(())
    }

    /// Clears CC.EN (if set) and waits for CSTS.RDY = 0. Every queue is forgotten.
    pub fn disable(&mut self) -> Result<(), NvmeError> {
        let cc = self.regs.read32(reg::CC);
        if cc & cc::EN != 0 {
            self.regs.write32(reg::CC, cc & !cc::EN);
        }
        self.queues = [const { None }; MAX_QUEUES];
        self.wait_ready(false)
    }

    /// Disables the controller, sets up an admin queue pair of `admin_entries` entries,
    /// enables it (NVM command set, 4 KiB pages, 64/16-byte I/O entries) and waits for
    /// CSTS.RDY = 1.
    pub fn init(&mut self, admin_entries: u16) -> Result<(), NvmeError> {
        if cap::mpsmin(self.cap) != 0 {
            return Err(NvmeError::PageSize(cap::mpsmin(self.cap)));
        }
        self.disable()?;
        let entries = u32::from(admin_entries);
        if !(2..=self.max_queue_entries().min(4096)).contains(&entries) {
            return Err(NvmeError::BadQueueSize(entries));
        }
        let admin = Queue::new(admin_entries)?;
        let size = u32::from(admin_entries - 1);
        self.regs.write32(reg::AQA, size << 16 | size);
        self.write64(reg::ASQ, admin.sq.addr());
        self.write64(reg::ACQ, admin.cq.addr());
        self.queues[0] = Some(admin);
        self.regs.write32(reg::CC, cc::IOSQES_64 | cc::IOCQES_16 | cc::EN);
        self.wait_ready(true)
    }

    fn queue(&mut self, qid: u16) -> Result<&mut Queue, NvmeError> {
        self.queues.get_mut(usize::from(qid)).and_then(Option::as_mut).ok_or(NvmeError::BadQueue(qid))
    }

    /// Writes `cmd` at the tail of SQ `qid` and rings its doorbell; returns the command ID.
    pub fn submit(&mut self, qid: u16, cmd: &Command) -> Result<u16, NvmeError> {
        let q = self.queue(qid)?;
        let next_tail = (q.sq_tail + 1) % q.entries;
        if next_tail == q.sq_head {
            return Err(NvmeError::QueueFull(qid));
        }
        let cid = q.next_cid;
        q.next_cid = q.next_cid.wrapping_add(1);
        q.last_opcode = cmd.opcode;
        let at = u64::from(q.sq_tail) * SQE_BYTES;
        let sqe = &q.sq;
        sqe.write32(at, u32::from(cmd.opcode) | u32::from(cid) << 16);
        sqe.write32(at + 4, cmd.nsid);
        sqe.write64(at + 8, 0);
        sqe.write64(at + 16, 0);
        sqe.write64(at + 24, cmd.prp1);
        sqe.write64(at + 32, cmd.prp2);
        for (i, &dw) in cmd.cdw.iter().enumerate() {
            sqe.write32(at + 40 + 4 * i as u64, dw);
        }
        q.sq_tail = next_tail;
        // The entry's writes (write-back RAM) are ordered before the doorbell write (x86 keeps
        // stores in order; the asm of the MMIO write is a compiler barrier).
        let doorbell = self.sq_doorbell(qid);
        self.regs.write32(doorbell, u32::from(next_tail));
        Ok(cid)
    }

    /// Takes the next completion of CQ `qid` if its phase bit says it is new: advances the
    /// head (flipping the expected phase on wrap) and rings the CQ head doorbell.
    pub fn poll(&mut self, qid: u16) -> Result<Option<Completion>, NvmeError> {
        let q = self.queue(qid)?;
        let at = u64::from(q.cq_head) * CQE_BYTES;
        let dw3 = q.cq.read32(at + 12);
        if (dw3 & (1 << 16) != 0) != q.phase {
            return Ok(None);
        }
        let dw2 = q.cq.read32(at + 8);
        let completion = Completion {
            result: q.cq.read32(at),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 17) as u16,
        };
        q.cq_head += 1;
        if q.cq_head == q.entries {
            q.cq_head = 0;
            q.phase = !q.phase;
        }
        q.sq_head = completion.sq_head % q.entries;
        let head = q.cq_head;
        let doorbell = self.cq_doorbell(qid);
        self.regs.write32(doorbell, u32::from(head));
        Ok(Some(completion))
    }

    /// Whether CQ `qid` holds a completion not yet taken (looks at the phase bit only).
    pub fn completion_posted(&self, qid: u16) -> bool {
        let Some(Some(q)) = self.queues.get(usize::from(qid)) else { return false };
        let dw3 = q.cq.read32(u64::from(q.cq_head) * CQE_BYTES + 12);
        (dw3 & (1 << 16) != 0) == q.phase
    }

    /// Waits (bounded by `timeout_us`) for the completion of command `cid` on queue `qid`
    /// by polling, and checks it is that command's and successful.
    pub fn wait_poll(&mut self, qid: u16, cid: u16, timeout_us: u64) -> Result<Completion, NvmeError> {
        let start = time::uptime_us();
        let mut got = None;
        let mut error = None;
        time::wait_until(start.saturating_add(timeout_us), || match self.poll(qid) {
            Ok(Some(c)) => {
                got = Some(c);
                true
            }
            Ok(None) => false,
            Err(e) => {
                error = Some(e);
                true
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        match got {
            Some(c) => self.check(qid, cid, c),
            None => Err(NvmeError::Timeout {
                qid,
                cid,
                opcode: self.queue(qid).map(|q| q.last_opcode).unwrap_or(0),
                waited_us: time::uptime_us() - start,
                interrupt: None,
                posted: false,
            }),
        }
    }

    fn check(&mut self, qid: u16, cid: u16, c: Completion) -> Result<Completion, NvmeError> {
        if c.cid != cid || c.sq_id != qid {
            return Err(NvmeError::Mismatch { qid, cid, got: c });
        }
        if c.status != 0 {
            let opcode = self.queue(qid).map(|q| q.last_opcode).unwrap_or(0);
            return Err(NvmeError::Failed { qid, opcode, status: c.status });
        }
        Ok(c)
    }

    /// Submits `cmd` on queue `qid` and waits (bounded by `timeout_us`) for its completion as
    /// `wait` says. With [`Wait::Interrupt`], the vector's count must grow by at least one
    /// after the submission, and the completion must be posted by then.
    pub fn run(&mut self, qid: u16, cmd: &Command, wait: Wait, timeout_us: u64) -> Result<Completion, NvmeError> {
        let vector = match wait {
            Wait::Poll => None,
            Wait::Interrupt(v) => Some(v),
        };
        let before = vector.map(interrupts::count);
        let cid = self.submit(qid, cmd)?;
        let (Some(v), Some(before)) = (vector, before) else {
            return self.wait_poll(qid, cid, timeout_us);
        };
        let start = time::uptime_us();
        let fired = interrupts::wait_for_count(v, before + 1, timeout_us);
        if !fired {
            return Err(NvmeError::Timeout {
                qid,
                cid,
                opcode: cmd.opcode,
                waited_us: time::uptime_us() - start,
                interrupt: Some((v, false)),
                posted: self.completion_posted(qid),
            });
        }
        self.wait_poll(qid, cid, ENTRY_AFTER_INTERRUPT_US).map_err(|e| match e {
            NvmeError::Timeout { waited_us, .. } => NvmeError::Timeout {
                qid,
                cid,
                opcode: cmd.opcode,
                waited_us,
                interrupt: Some((v, true)),
                posted: false,
            },
            other => other,
        })
    }

    /// PRP1/PRP2 for `bytes` bytes at `offset` in `buf` (at most two pages, no PRP list).
    fn prps(buf: &DmaBuf, offset: u64, bytes: u64) -> Result<(u64, u64), NvmeError> {
        let end = offset.checked_add(bytes).ok_or(NvmeError::BadBuffer)?;
        if bytes == 0 || end > buf.bytes() || !offset.is_multiple_of(4) {
            return Err(NvmeError::BadBuffer);
        }
        let start = buf.addr() + offset;
        let first_page_bytes = PAGE_BYTES - start % PAGE_BYTES;
        if bytes <= first_page_bytes {
            Ok((start, 0))
        } else if bytes - first_page_bytes <= PAGE_BYTES {
            Ok((start, start - start % PAGE_BYTES + PAGE_BYTES))
        } else {
            Err(NvmeError::BadBuffer)
        }
    }

    /// Identify Controller into the first page of `buf`.
    pub fn identify_controller(&mut self, buf: &DmaBuf, wait: Wait) -> Result<IdentifyController, NvmeError> {
        let (prp1, prp2) = Self::prps(buf, 0, PAGE_BYTES)?;
        let cmd = Command {
            opcode: opcode::IDENTIFY,
            prp1,
            prp2,
            cdw: [cns::CONTROLLER, 0, 0, 0, 0, 0],
            ..Command::default()
        };
        self.run(0, &cmd, wait, COMMAND_TIMEOUT_US)?;
        let mut id = IdentifyController {
            vid: buf.read16(0),
            serial: [0; 20],
            model: [0; 40],
            mdts: buf.read8(77),
            nn: buf.read32(516),
        };
        buf.read_bytes(4, &mut id.serial);
        buf.read_bytes(24, &mut id.model);
        Ok(id)
    }

    /// Identify Namespace `nsid` into the first page of `buf`; remembers its block size for
    /// reads and writes.
    pub fn identify_namespace(&mut self, nsid: u32, buf: &DmaBuf, wait: Wait) -> Result<Namespace, NvmeError> {
        let (prp1, prp2) = Self::prps(buf, 0, PAGE_BYTES)?;
        let cmd = Command { opcode: opcode::IDENTIFY, nsid, prp1, prp2, cdw: [cns::NAMESPACE, 0, 0, 0, 0, 0] };
        self.run(0, &cmd, wait, COMMAND_TIMEOUT_US)?;
        // NSZE at 0; FLBAS at 26 (bits 3:0: the format in use); LBA formats from 128, 4 bytes
        // each, LBADS (log2 of the block size) in bits 23:16.
        let blocks = buf.read64(0);
        let format = u64::from(buf.read8(26) & 0xf);
        let lbads = (buf.read32(128 + 4 * format) >> 16) & 0xff;
        let block_bytes = if (9..=16).contains(&lbads) { 1 << lbads } else { 0 };
        if block_bytes != 0 {
            self.block_bytes = block_bytes;
        }
        Ok(Namespace { blocks, block_bytes })
    }

    /// Get Features `fid`: dword 0 of the completion.
    pub fn get_features(&mut self, fid: u8, wait: Wait) -> Result<u32, NvmeError> {
        let cmd = Command { opcode: opcode::GET_FEATURES, cdw: [u32::from(fid), 0, 0, 0, 0, 0], ..Command::default() };
        Ok(self.run(0, &cmd, wait, COMMAND_TIMEOUT_US)?.result)
    }

    /// Creates I/O queue pair `qid` (1–7) with `entries` entries: Create I/O Completion Queue
    /// (physically contiguous; with `vector` = `Some(iv)`: interrupts enabled at MSI-X entry
    /// `iv`), then Create I/O Submission Queue bound to it. Both admin commands are waited for
    /// as `wait` says.
    pub fn create_io_queue_pair(
        &mut self,
        qid: u16,
        entries: u16,
        vector: Option<u16>,
        wait: Wait,
    ) -> Result<(), NvmeError> {
        if qid == 0 || usize::from(qid) >= MAX_QUEUES || self.queues[usize::from(qid)].is_some() {
            return Err(NvmeError::BadQueue(qid));
        }
        if !(2..=self.max_queue_entries().min(4096)).contains(&u32::from(entries)) {
            return Err(NvmeError::BadQueueSize(u32::from(entries)));
        }
        let queue = Queue::new(entries)?;
        let size = u32::from(entries - 1) << 16;
        // CDW11: IV 31:16, IEN bit 1, PC bit 0.
        let (iv, ien) = match vector {
            Some(iv) => (u32::from(iv), 1 << 1),
            None => (0, 0),
        };
        let create_cq = Command {
            opcode: opcode::CREATE_IO_CQ,
            prp1: queue.cq.addr(),
            cdw: [size | u32::from(qid), iv << 16 | ien | 1, 0, 0, 0, 0],
            ..Command::default()
        };
        // CDW11: CQID 31:16, QPRIO 2:1 (0), PC bit 0.
        let create_sq = Command {
            opcode: opcode::CREATE_IO_SQ,
            prp1: queue.sq.addr(),
            cdw: [size | u32::from(qid), u32::from(qid) << 16 | 1, 0, 0, 0, 0],
            ..Command::default()
        };
        self.run(0, &create_cq, wait, COMMAND_TIMEOUT_US)?;
        self.run(0, &create_sq, wait, COMMAND_TIMEOUT_US)?;
        self.queues[usize::from(qid)] = Some(queue);
        Ok(())
    }

    /// A Read or Write of `blocks` blocks at `lba` of namespace `nsid`, data at `offset` in
    /// `buf`.
    pub fn io_command(
        &self,
        opcode: u8,
        nsid: u32,
        lba: u64,
        blocks: u16,
        buf: &DmaBuf,
        offset: u64,
    ) -> Result<Command, NvmeError> {
        if blocks == 0 {
            return Err(NvmeError::BadBuffer);
        }
        let bytes = u64::from(blocks) * u64::from(self.block_bytes);
        let (prp1, prp2) = Self::prps(buf, offset, bytes)?;
        // CDW10/11: starting LBA; CDW12: NLB (0-based) 15:0.
        Ok(Command { opcode, nsid, prp1, prp2, cdw: [lba as u32, (lba >> 32) as u32, u32::from(blocks - 1), 0, 0, 0] })
    }

    /// Reads `blocks` blocks at `lba` of namespace `nsid` into `buf` at `offset`, on queue
    /// `qid`.
    #[allow(clippy::too_many_arguments)]
    pub fn read(
        &mut self,
        qid: u16,
        nsid: u32,
        lba: u64,
        blocks: u16,
        buf: &DmaBuf,
        offset: u64,
        wait: Wait,
    ) -> Result<Completion, NvmeError> {
        let cmd = self.io_command(opcode::READ, nsid, lba, blocks, buf, offset)?;
        self.run(qid, &cmd, wait, COMMAND_TIMEOUT_US)
    }

    /// Writes `blocks` blocks at `lba` of namespace `nsid` from `buf` at `offset`, on queue
    /// `qid`.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        qid: u16,
        nsid: u32,
        lba: u64,
        blocks: u16,
        buf: &DmaBuf,
        offset: u64,
        wait: Wait,
    ) -> Result<Completion, NvmeError> {
        let cmd = self.io_command(opcode::WRITE, nsid, lba, blocks, buf, offset)?;
        self.run(qid, &cmd, wait, COMMAND_TIMEOUT_US)
    }

    /// A Flush of namespace `nsid`.
    pub fn flush_command(nsid: u32) -> Command {
        Command { opcode: opcode::FLUSH, nsid, ..Command::default() }
    }
}

/// Bytes of BAR 0 the driver uses: the registers and the doorbells (which end before the MSI-X
/// table of every controller this driver has met; QEMU's is at 0x2000).
pub const REGISTER_BYTES: u64 = 0x2000;

/// An NVMe function made ready for a driver: found on bus 0, BAR 0 placed in the BAR window,
/// memory decode and bus master on, MSI-X table and PBA located; the controller is untouched.
#[derive(Debug)]
pub struct NvmeFunction {
    /// The PCI function.
    pub function: Function,
    /// Its placed BAR 0.
    pub bar: Bar,
    /// Its MSI-X capability (disabled, as found).
    pub msix: MsiX,
    /// The controller's registers.
    pub controller: Controller,
}

/// Why an NVMe function could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Finding it, or placing BAR 0.
    Pci(PciError),
    /// Locating its MSI-X table and PBA.
    Msix(MsixError),
    /// BAR 0 is smaller than the register block.
    SmallBar(u64),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pci(e) => write!(f, "{e}"),
            Self::Msix(e) => write!(f, "{e}"),
            Self::SmallBar(size) => write!(f, "BAR 0 of {size:#x} bytes is smaller than the NVMe registers"),
        }
    }
}

/// Finds the first NVMe controller (`VENDOR`:`DEVICE`) on the guest's bus, places its BAR 0
/// in `window`, enables memory decode and bus master, and locates its MSI-X structures.
pub fn open(info: &BootInfo, window: &mut BarWindow) -> Result<NvmeFunction, OpenError> {
    let ecam = Ecam::from_boot_info(info).map_err(OpenError::Pci)?;
    let function = ecam.find(VENDOR, DEVICE).map_err(OpenError::Pci)?;
    let bar = function.place_bar(0, window).map_err(OpenError::Pci)?;
    function.enable(command::MEMORY | command::BUS_MASTER);
    let msix = MsiX::find(function, &[bar]).map_err(OpenError::Msix)?;
    // SAFETY:
    // 1. `bar` is the function's placed memory BAR 0; `Controller` points the device's DMA only
    //    at `DmaBuf`s.
    let regs = unsafe { bar.window(0, REGISTER_BYTES) }.ok_or(OpenError::SmallBar(bar.size))?;
    Ok(NvmeFunction { function, bar, msix, controller: Controller::new(regs) })
}
