//! GPUs in the CLI: the global `--gpus SEL` / `--nvml-lib PATH` options, `caisson gpus`, and
//! the `run --gpus N` hook (allocate before the launch, release when the task is done).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use clap::Args;
use containerizer::gpu::{self, Allocator, Gpu, Inventory, Selection};
use containerizer::launch::TaskSpec;

/// Which GPUs caisson manages and where NVML is.
#[derive(Args, Clone, Debug, Default)]
pub struct GpuArgs {
    /// GPUs caisson manages: all, none, or a list of indexes and UUIDs (0,2 or GPU-...).
    /// Give it before the subcommand (`run --gpus N` is the number a task gets).
    #[arg(long = "gpus", env = "CAISSON_GPUS", default_value = "all")]
    gpus: String,
    /// The NVML library to load instead of libnvidia-ml.so.1.
    #[arg(long = "nvml-lib", global = true, env = "CAISSON_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
}

static CONFIG: OnceLock<GpuArgs> = OnceLock::new();

/// Records the global options for the commands that need them (`run --gpus`, `gpus`).
pub fn configure(a: &GpuArgs) {
    let _ = CONFIG.set(a.clone());
}

/// The GPUs caisson manages on this host (none without NVML: one warning says why).
pub(crate) fn managed() -> Result<Inventory> {
    let cfg = CONFIG.get().cloned().unwrap_or_default();
    let selection: Selection = cfg.gpus.parse()?;
    if selection == Selection::None {
        return Ok(Inventory::default().select(&selection)?);
    }
    let lib = cfg.nvml_lib.as_deref();
    // A static musl build cannot load NVML (a glibc library): its glibc helper does.
    let inventory = match cfg!(target_env = "musl") {
        true => gpu::discover_with(
            &containerizer::launch::companion_program(None, "caisson-nvml"),
            lib,
        ),
        false => gpu::discover(lib),
    };
    Ok(inventory.select(&selection)?)
}

#[derive(Args, Debug)]
pub struct GpusArgs {
    /// JSON output.
    #[arg(long)]
    json: bool,
}

/// `caisson gpus`: the managed GPUs and the task holding each.
pub fn list(root: &Path, a: GpusArgs) -> Result<std::process::ExitCode> {
    let gpus = managed()?.gpus;
    let allocs = Allocator::new(root).allocations()?;
    let holder = |g: &Gpu| {
        allocs
            .iter()
            .find(|al| al.gpus.contains(&g.uuid))
            .map(|al| al.task.clone())
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let v: Vec<serde_json::Value> = gpus
            .iter()
            .map(|g| {
                let mut o = serde_json::to_value(g).expect("plain struct");
                o["task"] = holder(g).map_or(serde_json::Value::Null, Into::into);
                o
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<5}  {:<40}  {:<24}  {:>9}  {:>5}  {:<16}  TASK",
        "INDEX", "UUID", "NAME", "MEMORY", "MINOR", "PCI BUS ID"
    )?;
    for g in &gpus {
        let task = holder(g).map_or("-".to_string(), |t| t.chars().take(12).collect());
        writeln!(
            out,
            "{:<5}  {:<40}  {:<24}  {:>6} GiB  {:>5}  {:<16}  {task}",
            g.index,
            g.uuid,
            g.name,
            g.memory_bytes >> 30,
            g.minor,
            g.pci_bus_id
        )?;
        // MIG devices under their parent, as `<gpu>:<mig>` (nvidia-ctk's CDI naming).
        for m in &g.mig_devices {
            writeln!(
                out,
                "{:<5}  {:<40}  {:<24}  {:>6} GiB  {:>5}  {:<16}  -",
                format!("{}:{}", g.index, m.index),
                m.uuid,
                format!("MIG {}", m.profile),
                m.memory_bytes >> 30,
                "-",
                ""
            )?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// `run --gpus N|all`: allocates the GPUs to the task of `spec` and gives it their devices,
/// environment and the driver's files. Returns whether anything was allocated (the caller
/// releases on a failed launch and when the task is done).
///
/// `cdi_minors` are the GPUs (by minor number) that CDI devices already gave the task: those
/// known to NVML are allocated too, so that `--gpus` and `--device nvidia.com/gpu=N` never
/// hand out the same GPU twice.
pub fn attach(
    root: &Path,
    request: Option<&str>,
    cdi_minors: &[u32],
    spec: &mut TaskSpec,
) -> Result<bool> {
    let count = match request {
        None => Some(0),
        Some("all") => None,
        Some(n) => Some(n.parse::<usize>().map_err(|_| {
            anyhow::anyhow!("invalid --gpus {n:?}: expected a number of GPUs or all")
        })?),
    };
    if count == Some(0) && cdi_minors.is_empty() {
        return Ok(false);
    }
    let inv = managed()?;
    let required: Vec<Gpu> = inv
        .gpus
        .iter()
        .filter(|g| cdi_minors.contains(&g.minor))
        .cloned()
        .collect();
    let count = count.unwrap_or(inv.gpus.len().saturating_sub(required.len()));
    if count == 0 && required.is_empty() {
        // CDI GPUs that NVML does not know (or does not manage): nothing to account.
        return Ok(false);
    }
    gpu::attach_with(root, &inv, count, &required, spec)?;
    Ok(true)
}

/// Releases the GPUs of task `id` (best effort: a stale allocation is reclaimed anyway).
pub fn release(root: &Path, id: &str) {
    if let Err(e) = Allocator::new(root).release(id) {
        tracing::warn!("releasing the GPUs of {id}: {e}");
    }
}
