//! Running the hypervisor under QEMU: the command line every scenario shares, COM1 captured
//! from QEMU's stdout, COM2 (defmt) from a Unix socket QEMU connects to, a wall-clock timeout,
//! and each line handed to the caller as it arrives.

use crate::decode::{LogLine, LogTable};
use crate::scenarios::Scenario;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// One line of output, as it arrives.
#[derive(Clone, Debug)]
pub enum Line {
    /// COM1 text.
    Console(String),
    /// A decoded defmt line from COM2.
    Log(LogLine),
    /// A COM2 frame that did not decode.
    Malformed,
    /// QEMU's own stderr.
    Qemu(String),
}

/// What a run produced.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// QEMU's exit status (`None` when killed).
    pub status: Option<i32>,
    /// True when the timeout killed QEMU.
    pub timed_out: bool,
    /// COM1 lines.
    pub console: Vec<String>,
    /// Decoded defmt lines.
    pub log: Vec<LogLine>,
    /// COM2 frames that did not decode.
    pub malformed_frames: usize,
    /// QEMU's stderr.
    pub stderr: Vec<String>,
    /// Wall-clock time.
    pub elapsed: Duration,
}

/// Options beyond the scenario.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Appended to QEMU's arguments.
    pub extra_args: Vec<String>,
    /// Start QEMU's gdb stub on :1234 and wait for the debugger (`-s -S`); no timeout.
    pub gdb: bool,
    /// Extra `-icount` etc. arguments placed before the scenario's devices.
    pub accel_args: Vec<String>,
    /// The guest bundle (boot module) for scenarios that run guests.
    pub bundle: Option<PathBuf>,
    /// Appended to the kernel command line after the scenario's own words.
    pub kernel_args: Vec<String>,
}

/// Arguments every run uses: q35 under TCG, no display/monitor/network, reset ends QEMU,
/// isa-debug-exit for the verdict, COM1 on stdio and COM2 on the `log` chardev.
pub fn common_args(socket: &Path) -> Vec<String> {
    let exit = format!("isa-debug-exit,iobase={:#x},iosize=0x04", conduit_boot::verdict::DEBUG_EXIT_PORT);
    [
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "qemu64,+svm,+npt",
        "-display",
        "none",
        "-monitor",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-device",
        &exit,
        "-serial",
        "stdio",
        "-chardev",
        &format!("socket,id=log,path={}", socket.display()),
        "-serial",
        "chardev:log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The whole QEMU argument list for `scenario` booting `kernel`; disk images live in `dir`.
pub fn command_line(scenario: &Scenario, kernel: &Path, socket: &Path, dir: &Path, opts: &RunOptions) -> Vec<String> {
    let mut args = common_args(socket);
    for d in scenario.disks {
        args.push("-drive".into());
        args.push(format!("file={},if=none,id={},format=raw", dir.join(format!("{}.img", d.id)).display(), d.id));
    }
    args.extend(opts.accel_args.iter().cloned());
    args.extend(["-cpu".into(), scenario.cpu.into()]);
    args.extend(["-m".into(), format!("{}M", scenario.memory_mib), "-smp".into(), scenario.smp.to_string()]);
    args.extend(["-kernel".into(), kernel.display().to_string()]);
    let mut append = format!("conduit.scenario={}", scenario.sequence());
    for a in scenario.kernel_args.iter().copied().chain(opts.kernel_args.iter().map(String::as_str)) {
        append.push(' ');
        append.push_str(a);
    }
    args.extend(["-append".into(), append]);
    if let (true, Some(b)) = (scenario.guests, &opts.bundle) {
        args.extend(["-initrd".into(), b.display().to_string()]);
    }
    args.extend(scenario.qemu_args.iter().map(|s| s.to_string()));
    if opts.gdb {
        args.extend(["-s".into(), "-S".into()]);
    }
    args.extend(opts.extra_args.iter().cloned());
    args
}

static RUN_ID: AtomicU32 = AtomicU32::new(0);

fn socket_path() -> std::io::Result<(PathBuf, PathBuf)> {
    let dir =
        std::env::temp_dir().join(format!("conduit-{}-{}", std::process::id(), RUN_ID.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&dir)?;
    Ok((dir.join("log.sock"), dir))
}

/// Boots `kernel` under `qemu` for `scenario`, calling `on_line` for each line as it arrives,
/// until QEMU exits or the timeout kills it.
pub fn run(
    qemu: &Path,
    kernel: &Path,
    table: Arc<LogTable>,
    scenario: &Scenario,
    opts: &RunOptions,
    mut on_line: impl FnMut(&Line),
) -> std::io::Result<Outcome> {
    if scenario.guests && opts.bundle.is_none() {
        return Err(std::io::Error::other(format!(
            "scenario {} runs guests but no guest bundle was built",
            scenario.name
        )));
    }
    let (socket, dir) = socket_path()?;
    let listener = UnixListener::bind(&socket)?;
    listener.set_nonblocking(true)?;
    for d in scenario.disks {
        std::fs::File::create(dir.join(format!("{}.img", d.id)))?.set_len(d.bytes)?;
    }
    let args = command_line(scenario, kernel, &socket, &dir, opts);
    let start = Instant::now();
    let mut child =
        Command::new(qemu).args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let (tx, rx) = mpsc::channel::<Line>();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_lines(out, tx.clone(), Line::Console));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_lines(err, tx.clone(), Line::Qemu));
    }
    let mut outcome = Outcome::default();
    let mut accepted = false;
    let timeout = if opts.gdb { None } else { Some(scenario.timeout) };
    // QEMU connects to the socket at start-up; a run that ends before the connection is
    // accepted still leaves it (and its buffered bytes) in the backlog, so the last accept
    // happens after exit.
    let accept_log = |readers: &mut Vec<thread::JoinHandle<()>>| -> std::io::Result<bool> {
        let Ok((stream, _)) = listener.accept() else { return Ok(false) };
        stream.set_nonblocking(false)?;
        let (tx, table) = (tx.clone(), table.clone());
        readers.push(thread::spawn(move || {
            table.decode_stream(stream, |l| {
                let _ = tx.send(l.map_or(Line::Malformed, Line::Log));
            })
        }));
        Ok(true)
    };
    let status = loop {
        if !accepted {
            accepted = accept_log(&mut readers)?;
        }
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(20)) {
            record(&mut outcome, &line, &mut on_line);
        }
        if let Some(st) = child.try_wait()? {
            break st.code();
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            outcome.timed_out = true;
            kill(&mut child);
            break None;
        }
    };
    if !accepted {
        accept_log(&mut readers)?;
    }
    drop(tx);
    for r in readers {
        let _ = r.join();
    }
    while let Ok(line) = rx.try_recv() {
        record(&mut outcome, &line, &mut on_line);
    }
    outcome.status = status;
    outcome.elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(dir);
    Ok(outcome)
}

fn record(outcome: &mut Outcome, line: &Line, on_line: &mut impl FnMut(&Line)) {
    on_line(line);
    match line {
        Line::Console(s) => outcome.console.push(s.clone()),
        Line::Log(l) => outcome.log.push(l.clone()),
        Line::Malformed => outcome.malformed_frames += 1,
        Line::Qemu(s) => outcome.stderr.push(s.clone()),
    }
}

fn spawn_lines(
    reader: impl Read + Send + 'static,
    tx: mpsc::Sender<Line>,
    wrap: fn(String) -> Line,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(bytes) = line else { break };
            let text = String::from_utf8_lossy(&bytes).trim_end_matches('\r').to_string();
            if tx.send(wrap(text)).is_err() {
                break;
            }
        }
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenarios::find;

    #[test]
    fn command_line_has_what_every_run_needs() {
        let s = find("smp_two_cpus").unwrap();
        let args = command_line(s, Path::new("/k"), Path::new("/s.sock"), Path::new("/d"), &RunOptions::default());
        let joined = args.join(" ");
        for needle in [
            "-machine q35",
            "-accel tcg",
            "-no-reboot",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-serial stdio",
            "socket,id=log,path=/s.sock",
            "-serial chardev:log",
            "-smp 2",
            "-kernel /k",
            "-append conduit.scenario=smp_two_cpus",
        ] {
            assert!(joined.contains(needle), "missing {needle:?} in {joined}");
        }
        let gdb = command_line(
            s,
            Path::new("/k"),
            Path::new("/s"),
            Path::new("/d"),
            &RunOptions { gdb: true, ..Default::default() },
        );
        assert!(gdb.ends_with(&["-s".to_string(), "-S".to_string()]));
    }
}
