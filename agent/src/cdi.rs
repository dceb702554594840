//! Devices in the CLI: the global `--cdi-spec-dir DIR` option, `caisson devices`, and the
//! `run --device` hook (CDI devices and plain host devices, with the GPUs among them counted
//! by the GPU allocator).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use clap::Args;
use containerizer::cdi::{self, Registry};
use containerizer::launch::TaskSpec;

/// Where CDI specs are read from.
#[derive(Args, Clone, Debug, Default)]
pub struct CdiArgs {
    /// A directory of CDI spec files (repeatable; replaces the defaults /etc/cdi and
    /// /var/run/cdi; later ones override earlier ones).
    #[arg(
        long = "cdi-spec-dir",
        global = true,
        env = "CAISSON_CDI_SPEC_DIRS",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    dirs: Vec<PathBuf>,
}

static CONFIG: OnceLock<CdiArgs> = OnceLock::new();

/// Records the global options for the commands that need them.
pub fn configure(a: &CdiArgs) {
    let _ = CONFIG.set(a.clone());
}

fn registry() -> Registry {
    let cfg = CONFIG.get().cloned().unwrap_or_default();
    if cfg.dirs.is_empty() {
        Registry::load(cdi::DEFAULT_DIRS)
    } else {
        Registry::load(&cfg.dirs)
    }
}

#[derive(Args, Debug)]
pub struct DevicesArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `caisson devices`: the CDI devices of the spec directories (invalid spec files are
/// reported on stderr, and in the JSON's `errors`).
pub fn list(a: DevicesArgs) -> Result<std::process::ExitCode> {
    let r = registry();
    let devices = r.devices();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({ "devices": devices, "errors": r.errors });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    for e in &r.errors {
        eprintln!(
            "Warning: invalid CDI spec {}: {}",
            e.path.display(),
            e.message
        );
    }
    writeln!(out, "{:<48}  {:<8}  SPEC", "DEVICE", "VERSION")?;
    for d in &devices {
        let spec = if d.conflicts.is_empty() {
            d.spec.display().to_string()
        } else {
            let others: Vec<String> = d
                .conflicts
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            format!(
                "{} (conflicts with {})",
                d.spec.display(),
                others.join(", ")
            )
        };
        writeln!(out, "{:<48}  {:<8}  {spec}", d.name, d.cdi_version)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `run --device ... --gpus ...`: applies the CDI devices' edits and the host devices to
/// `spec`, then allocates GPUs (`--gpus`, and the NVIDIA GPUs among the CDI devices). Returns
/// whether GPUs were allocated (the caller releases them).
pub fn attach(
    root: &Path,
    gpus: Option<&str>,
    devices: &[String],
    spec: &mut TaskSpec,
) -> Result<bool> {
    let (host, named): (Vec<&String>, Vec<&String>) =
        devices.iter().partition(|d| d.starts_with('/'));
    let mut minors = vec![];
    if !named.is_empty() {
        let names: Vec<String> = named.into_iter().cloned().collect();
        let inj = registry().resolve(&names)?;
        inj.apply(spec)?;
        minors = inj.nvidia_gpu_minors();
    }
    for d in host {
        cdi::add_host_device(d, spec)?;
    }
    crate::gpus::attach(root, gpus, &minors, spec)
}
