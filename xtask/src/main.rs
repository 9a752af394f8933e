//! `cargo xtask`: the only entry point.
//!
//! - `build` — the hypervisor image and the test guests, packed into the guest bundle that
//!   scenarios running guests pass to QEMU as a boot module (`-initrd`).
//! - `run [--scenario NAME] [--gdb] [--kernel-arg WORD]… [-- QEMU ARGS…]` — build, boot in
//!   QEMU, stream COM1 and the decoded defmt log, exit with the hypervisor's verdict (default
//!   scenario: `guest_hello`, the default partition). `--kernel-arg` adds kernel command-line
//!   words (e.g. `conduit.partition=…`).
//! - `test [NAME…]` — formatting, host tests, clippy (host and target, `-D warnings`), the loom
//!   models, the fuzz targets (built, then a short seeded run), the image and its `.defmt` check, then every QEMU
//!   scenario; with names, only the image, the check and those scenarios. One line per step,
//!   then `N passed, N failed`.
//!
//! - `bench [--qemu-only | --host-only]` — the benchmarks: every `bench_*` scenario under
//!   `-icount shift=0,align=off` (the TSC counts instructions; their `bench:` lines are the
//!   figures), then the criterion benches of the pure crates (`cargo bench`). Results go in
//!   BENCHMARKS.md by hand, with this command.
//!
//! On a fresh machine it installs what is missing (the bare-metal Rust target; QEMU through
//! apt when running as root) or says in one line what to run.

mod setup;
mod workspace;

use conduit_qemu_tests::{Line, LogTable, RunOptions, judge, qemu, scenarios};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The image's target.
pub const TARGET: &str = "x86_64-unknown-none";

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("build") => build().map(|b| {
            println!("xtask: image {}", b.image.display());
            println!("xtask: guest bundle {}", b.bundle.display());
            ExitCode::SUCCESS
        }),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(&args[1..]),
        None | Some("help" | "-h" | "--help") => {
            println!("{}", USAGE);
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo xtask build
       cargo xtask run [--scenario NAME] [--gdb] [--kernel-arg WORD]... [-- EXTRA QEMU ARGS]
       cargo xtask test [SCENARIO...]
       cargo xtask bench [--qemu-only | --host-only]";

/// What `build` produced.
struct Built {
    image: PathBuf,
    bundle: PathBuf,
}

/// Builds the image and the test guests, and packs the guests into the bundle.
fn build() -> Result<Built> {
    setup::ensure_target()?;
    let meta = workspace::Members::load()?;
    let mut args = vec!["build", "--release", "--target", TARGET, "-p", "conduit-kernel"];
    for (pkg, _) in &meta.guests {
        args.extend(["-p", pkg.as_str()]);
    }
    workspace::cargo(&args)?;
    let mut images: Vec<(String, Vec<u8>)> = Vec::new();
    for (_, bins) in &meta.guests {
        for bin in bins {
            let path = workspace::target_dir().join(bin);
            let bytes = std::fs::read(&path).map_err(|e| format!("reading guest {}: {e}", path.display()))?;
            images.push((bin.clone(), bytes));
        }
    }
    let refs: Vec<(&str, &[u8])> = images.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let len = conduit_vm::bundle::encoded_len(&refs).map_err(|e| format!("guest bundle: {e}"))?;
    let mut out = vec![0u8; len];
    conduit_vm::bundle::encode(&refs, &mut out).map_err(|e| format!("guest bundle: {e}"))?;
    let bundle = workspace::bundle_path();
    std::fs::write(&bundle, &out).map_err(|e| format!("writing {}: {e}", bundle.display()))?;
    Ok(Built { image: workspace::image_path(), bundle })
}

fn load_table(image: &Path) -> Result<Arc<LogTable>> {
    let elf = std::fs::read(image).map_err(|e| format!("reading {}: {e}", image.display()))?;
    LogTable::from_elf(&elf).map(Arc::new)
}

fn run(args: &[String]) -> Result<ExitCode> {
    let mut name = scenarios::DEFAULT.to_string();
    let mut opts = RunOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scenario" => name = it.next().ok_or("--scenario needs a name")?.clone(),
            "--gdb" => opts.gdb = true,
            "--kernel-arg" => opts.kernel_args.push(it.next().ok_or("--kernel-arg needs a value")?.clone()),
            "--" => opts.extra_args.extend(it.by_ref().cloned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let scenario = scenarios::find(&name).ok_or_else(|| format!("no scenario named {name:?}; known: {}", names()))?;
    let built = build()?;
    opts.bundle = Some(built.bundle.clone());
    let image = built.image;
    let qemu_bin = setup::find_or_install_qemu()?;
    let table = load_table(&image)?;
    if opts.gdb {
        println!("xtask: QEMU waits for gdb on :1234 — gdb {} -ex 'target remote :1234'", image.display());
    }
    println!("xtask: booting scenario {} ({})", scenario.name, scenario.about);
    let outcome = qemu::run(&qemu_bin, &image, table, scenario, &opts, |line| match line {
        Line::Console(s) => println!("[com1] {s}"),
        Line::Log(l) => println!("[log]  {l}"),
        Line::Malformed => println!("[log]  <malformed defmt frame>"),
        Line::Qemu(s) => eprintln!("[qemu] {s}"),
    })
    .map_err(|e| format!("running QEMU: {e}"))?;
    let success = conduit_qemu_tests::Expect::Success.qemu_status();
    match outcome.status {
        Some(s) if s == success => {
            println!("xtask: verdict success ({:.2} s)", outcome.elapsed.as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let why = if outcome.timed_out { "timed out".to_string() } else { format!("QEMU status {other:?}") };
            println!("xtask: verdict failure ({why})");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Crates with criterion benches.
const BENCH_CRATES: &[&str] = &["conduit-irq", "conduit-doorbell"];

fn bench(args: &[String]) -> Result<ExitCode> {
    let (qemu, host) = match args.first().map(String::as_str) {
        None => (true, true),
        Some("--qemu-only") => (true, false),
        Some("--host-only") => (false, true),
        Some(other) => return Err(format!("unknown argument {other:?}\n{USAGE}")),
    };
    let mut failed = false;
    if qemu {
        let built = build()?;
        let qemu_bin = setup::find_or_install_qemu()?;
        let table = load_table(&built.image)?;
        let opts = RunOptions { bundle: Some(built.bundle.clone()), ..RunOptions::default() };
        for s in scenarios::SCENARIOS.iter().filter(|s| s.name.starts_with("bench_")) {
            println!("xtask: bench {} ({})", s.name, s.about);
            let outcome = qemu::run(&qemu_bin, &built.image, table.clone(), s, &opts, |_| {})
                .map_err(|e| format!("running QEMU: {e}"))?;
            for l in outcome.console.iter().filter(|l| l.starts_with("bench:")) {
                println!("    {l}");
            }
            if let Err(problems) = judge(s, &outcome) {
                failed = true;
                println!("xtask: bench {} FAILED:\n{}", s.name, indent(&problems.join("\n")));
            }
        }
    }
    if host {
        for c in BENCH_CRATES {
            if let Err(e) = workspace::cargo(&["bench", "-p", c]) {
                failed = true;
                println!("xtask: {e}");
            }
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn names() -> String {
    scenarios::SCENARIOS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// One step of `test`.
struct Step {
    name: String,
    result: Result<()>,
    elapsed: Duration,
}

fn step(results: &mut Vec<Step>, name: &str, f: impl FnOnce() -> Result<()>) -> bool {
    println!("xtask: running {name}");
    let start = Instant::now();
    let result = f();
    let elapsed = start.elapsed();
    match &result {
        Ok(()) => println!("xtask: {name} ... ok ({:.1} s)", elapsed.as_secs_f64()),
        Err(e) => println!("xtask: {name} ... FAILED ({:.1} s)\n{}", elapsed.as_secs_f64(), indent(e)),
    }
    let ok = result.is_ok();
    results.push(Step { name: name.to_string(), result, elapsed });
    ok
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

fn test(names_given: &[String]) -> Result<ExitCode> {
    let selected: Vec<&scenarios::Scenario> = if names_given.is_empty() {
        scenarios::SCENARIOS.iter().collect()
    } else {
        names_given
            .iter()
            .map(|n| scenarios::find(n).ok_or_else(|| format!("no scenario named {n:?}; known: {}", names())))
            .collect::<Result<_>>()?
    };
    setup::ensure_target()?;
    let mut results = Vec::new();
    if names_given.is_empty() {
        setup::ensure_components()?;
        let meta = workspace::Members::load()?;
        step(&mut results, "fmt", || workspace::cargo(&["fmt", "--all", "--check"]));
        step(&mut results, "host-tests", || {
            let mut a = vec!["test", "--workspace"];
            for p in &meta.target_only {
                a.extend(["--exclude", p.as_str()]);
            }
            workspace::cargo(&a)
        });
        step(&mut results, "clippy-host", || {
            let mut a = vec!["clippy", "--workspace", "--all-targets"];
            for p in &meta.target_only {
                a.extend(["--exclude", p.as_str()]);
            }
            a.extend(["--", "-D", "warnings"]);
            workspace::cargo(&a)
        });
        step(&mut results, "clippy-target", || {
            let mut a = vec!["clippy", "--release", "--target", TARGET];
            for p in &meta.bare_metal {
                a.extend(["-p", p.as_str()]);
            }
            a.extend(["--", "-D", "warnings"]);
            workspace::cargo(&a)
        });
        step(&mut results, "loom", || {
            // Own target directory: `--cfg loom` rebuilds everything and must not evict the
            // normal host build.
            let mut a = vec!["test", "--release", "--lib", "--target-dir", "target/loom"];
            for c in workspace::LOOM_CRATES {
                a.extend(["-p", c]);
            }
            a.push("loom");
            // The models gain nothing from the image's whole-program optimization; skipping it
            // keeps this build short.
            workspace::cargo_env(
                &a,
                &[
                    ("RUSTFLAGS", "--cfg loom"),
                    ("CARGO_PROFILE_RELEASE_LTO", "false"),
                    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16"),
                ],
            )
        });
        for &(dir, target, runs) in workspace::FUZZ_TARGETS {
            step(&mut results, &format!("fuzz {target}"), || {
                setup::ensure_cargo_fuzz()?;
                workspace::cargo_in(dir, &["fuzz", "build", "-s", "none", target])?;
                // A short, seeded run: the target asserts its invariants, not just "no panic".
                let runs = format!("-runs={runs}");
                workspace::cargo_in(dir, &["fuzz", "run", "-s", "none", target, "--", &runs, "-seed=1"])
            });
        }
    }
    let mut image = None;
    let mut run_opts = RunOptions::default();
    let built = step(&mut results, "build-image", || {
        let b = build()?;
        image = Some(b.image);
        run_opts.bundle = Some(b.bundle);
        Ok(())
    });
    let mut table = None;
    if let (true, Some(img)) = (built, image.as_ref()) {
        step(&mut results, "defmt-section", || {
            let elf = std::fs::read(img).map_err(|e| format!("reading {}: {e}", img.display()))?;
            let size = conduit_qemu_tests::decode::check_defmt_section(&elf)?;
            println!("    .defmt section: {size} bytes");
            table = Some(LogTable::from_elf(&elf).map(Arc::new)?);
            Ok(())
        });
    }
    let qemu_bin = setup::find_or_install_qemu();
    for s in selected {
        let name = format!("scenario {}", s.name);
        step(&mut results, &name, || {
            let qemu_bin = qemu_bin.as_ref().map_err(Clone::clone)?;
            let (Some(img), Some(table)) = (image.as_ref(), table.as_ref()) else {
                return Err("no image to boot (build or .defmt check failed)".into());
            };
            let outcome = qemu::run(qemu_bin, img, table.clone(), s, &run_opts, |_| {})
                .map_err(|e| format!("running QEMU: {e}"))?;
            judge(s, &outcome).map_err(|problems| {
                let mut msg = problems.join("\n");
                msg.push_str("\n--- COM1 (last 40 lines)");
                for l in outcome.console.iter().rev().take(40).rev() {
                    msg.push_str(&format!("\n{l}"));
                }
                msg.push_str("\n--- defmt log (last 20 lines)");
                for l in outcome.log.iter().rev().take(20).rev() {
                    msg.push_str(&format!("\n{l}"));
                }
                for l in &outcome.stderr {
                    msg.push_str(&format!("\n[qemu] {l}"));
                }
                msg
            })
        });
    }
    let failed = results.iter().filter(|r| r.result.is_err()).count();
    let passed = results.len() - failed;
    let total: Duration = results.iter().map(|r| r.elapsed).sum();
    println!();
    for r in results.iter().filter(|r| r.result.is_err()) {
        println!("failed: {}", r.name);
    }
    println!("{passed} passed, {failed} failed ({:.1} s)", total.as_secs_f64());
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
