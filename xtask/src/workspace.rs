//! Cargo invocations and what the workspace says about its members: which build for the
//! bare-metal target (`[package.metadata.conduit] target = true`) and which build only there
//! (`host = false`, the kernel image).

use crate::Result;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where release builds for the bare-metal target land.
pub fn target_dir() -> PathBuf {
    root().join("target").join(crate::TARGET).join("release")
}

/// The image `build` produces.
pub fn image_path() -> PathBuf {
    target_dir().join("conduit")
}

/// The guest bundle `build` produces (boot module for scenarios that run guests).
pub fn bundle_path() -> PathBuf {
    target_dir().join("conduit-guests.bundle")
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs cargo with `args` at the root, output shown; an error names the command.
pub fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo {}` failed ({status})", args.join(" "))) }
}

/// Runs cargo with `args` at the root with extra environment variables, output shown.
pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .envs(env.iter().copied())
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo {}` failed ({status})", args.join(" "))) }
}

/// Crates with loom models (tests named `loom_*`, built with `--cfg loom`).
pub const LOOM_CRATES: &[&str] = &["conduit-vm", "conduit-irq", "conduit-doorbell"];

/// Runs cargo with `args` in `dir` (relative to the root), output shown.
pub fn cargo_in(dir: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(root().join(dir))
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`cargo {}` in {dir} failed ({status})", args.join(" "))) }
}

/// Fuzz targets: (crate directory, target, runs for the smoke run in `test`).
pub const FUZZ_TARGETS: &[(&str, &str, u32)] =
    &[("drivers/pci/fuzz", "vconfig", 20_000), ("kernel/decode/fuzz", "decode", 20_000)];

/// Workspace members by role.
#[derive(Debug, Default)]
pub struct Members {
    /// Build for x86_64-unknown-none (clippy runs there for them).
    pub bare_metal: Vec<String>,
    /// Build only for x86_64-unknown-none (excluded from host tests and host clippy).
    pub target_only: Vec<String>,
    /// Test-guest packages (`guests = true`) and their binaries: each binary is one guest
    /// image in the bundle.
    pub guests: Vec<(String, Vec<String>)>,
}

impl Members {
    /// Reads `cargo metadata`.
    pub fn load() -> Result<Self> {
        let out = Command::new(cargo_bin())
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .current_dir(root())
            .output()
            .map_err(|e| format!("could not start cargo metadata: {e}"))?;
        if !out.status.success() {
            return Err(format!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata output: {e}"))?;
        let mut m = Members::default();
        for p in v["packages"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default().to_string();
            let conduit = &p["metadata"]["conduit"];
            if conduit["target"].as_bool() == Some(true) {
                m.bare_metal.push(name.clone());
            }
            if conduit["host"].as_bool() == Some(false) {
                m.target_only.push(name.clone());
            }
            if conduit["guests"].as_bool() == Some(true) {
                let bins = p["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin")))
                    .filter_map(|t| t["name"].as_str().map(str::to_string))
                    .collect();
                m.guests.push((name, bins));
            }
        }
        if m.bare_metal.is_empty() {
            return Err("no workspace member is marked `[package.metadata.conduit] target = true`".into());
        }
        Ok(m)
    }
}
