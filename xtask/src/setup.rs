//! What a fresh machine may lack, installed or named in one line: the bare-metal Rust target
//! (`rustup target add`, since RUSTUP_AUTO_INSTALL=0 here), clippy/rustfmt, and QEMU (through
//! apt when running as root).

use crate::{Result, TARGET};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn output(cmd: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new(cmd).args(args).stdin(Stdio::null()).output().ok()
}

/// Makes sure the `x86_64-unknown-none` standard library is installed.
pub fn ensure_target() -> Result<()> {
    let installed = output("rustup", &["target", "list", "--installed"])
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET));
    match installed {
        Some(true) => return Ok(()),
        None => {
            return Err(format!(
                "rustup is not available to check for the {TARGET} target; install rustup, then run `rustup target add {TARGET}`"
            ));
        }
        Some(false) => {}
    }
    eprintln!("xtask: installing the Rust target {TARGET} (rustup target add {TARGET})");
    match output("rustup", &["target", "add", TARGET]) {
        Some(o) if o.status.success() => Ok(()),
        Some(o) => Err(format!(
            "`rustup target add {TARGET}` failed: {}; run it by hand once the cause is fixed",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        None => Err(format!("could not run rustup; run `rustup target add {TARGET}`")),
    }
}

/// Makes sure clippy and rustfmt are there.
pub fn ensure_components() -> Result<()> {
    let have = |tool: &str| output("cargo", &[tool, "--version"]).is_some_and(|o| o.status.success());
    if have("clippy") && have("fmt") {
        return Ok(());
    }
    eprintln!("xtask: installing clippy and rustfmt (rustup component add clippy rustfmt)");
    match output("rustup", &["component", "add", "clippy", "rustfmt"]) {
        Some(o) if o.status.success() => Ok(()),
        _ => Err("clippy/rustfmt are missing: run `rustup component add clippy rustfmt`".into()),
    }
}

fn find_qemu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONDUIT_QEMU") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("qemu-system-x86_64")).find(|p| p.is_file())
}

fn is_root() -> bool {
    output("id", &["-u"]).is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Finds `qemu-system-x86_64` (or `$CONDUIT_QEMU`); as root on Debian, installs it.
pub fn find_or_install_qemu() -> Result<PathBuf> {
    if let Some(q) = find_qemu() {
        return Ok(q);
    }
    let hint = "QEMU is missing: run `sudo apt-get update && sudo apt-get install -y qemu-system-x86`";
    if !is_root() || output("apt-get", &["--version"]).is_none() {
        return Err(hint.into());
    }
    eprintln!("xtask: installing QEMU (apt-get update && apt-get install -y qemu-system-x86)");
    for args in [&["update"][..], &["install", "-y", "qemu-system-x86"][..]] {
        let ok = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("`apt-get {}` failed; {hint}", args.join(" ")));
        }
    }
    find_qemu().ok_or_else(|| hint.into())
}

/// Makes sure `cargo fuzz` is available (`cargo install cargo-fuzz --locked` when missing).
pub fn ensure_cargo_fuzz() -> Result<()> {
    if output("cargo", &["fuzz", "--version"]).is_some_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let ok = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok { Ok(()) } else { Err("cargo-fuzz is missing: run `cargo install cargo-fuzz --locked`".into()) }
}
