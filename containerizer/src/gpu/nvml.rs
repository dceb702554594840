//! Inventory through NVML (`nvml-wrapper`, which loads `libnvidia-ml.so.1` at run time).
use std::path::Path;
use std::process::{Command, Stdio};

use nvml_wrapper::Nvml;

use super::{Gpu, Inventory, MigDevice};

/// Lists the GPUs NVML sees, loading `lib` (default: `libnvidia-ml.so.1` from the loader's
/// path). Never fails: without a library, a driver or GPUs the inventory is empty, with the
/// reason in [`Inventory::unavailable`] and one warning logged.
pub fn discover(lib: Option<&Path>) -> Inventory {
    let mut builder = Nvml::builder();
    if let Some(p) = lib {
        builder.lib_path(p.as_os_str());
    }
    let nvml = match builder.init() {
        Ok(n) => n,
        Err(e) => {
            let what = lib.map_or("libnvidia-ml.so.1".to_string(), |p| p.display().to_string());
            let reason = format!("NVML unavailable ({what}: {e}): no GPUs");
            tracing::warn!("{reason}");
            return Inventory {
                gpus: vec![],
                unavailable: Some(reason),
            };
        }
    };
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("NVML cannot count GPUs ({e}): no GPUs");
            tracing::warn!("{reason}");
            return Inventory {
                gpus: vec![],
                unavailable: Some(reason),
            };
        }
    };
    let mut gpus = vec![];
    for index in 0..count {
        let dev = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("GPU {index}: {e}; skipped");
                continue;
            }
        };
        // Without its UUID (identity) and minor (device node) a GPU cannot be handed out.
        let (uuid, minor) = match (dev.uuid(), dev.minor_number()) {
            (Ok(u), Ok(m)) => (u, m),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("GPU {index}: {e}; skipped");
                continue;
            }
        };
        // MIG: most GPUs answer NotSupported, which simply means no MIG.
        let mig_mode = dev.mig_mode().map(|m| m.current == 1).unwrap_or(false);
        let mig_devices = if mig_mode {
            mig_devices(&dev, index)
        } else {
            vec![]
        };
        gpus.push(Gpu {
            index,
            uuid,
            name: dev.name().unwrap_or_default(),
            memory_bytes: dev.memory_info().map(|m| m.total).unwrap_or(0),
            pci_bus_id: dev.pci_info().map(|p| p.bus_id).unwrap_or_default(),
            minor,
            mig_mode,
            mig_devices,
        });
    }
    Inventory {
        gpus,
        unavailable: None,
    }
}

/// [`discover`] in another process: runs `helper [LIB]` (the `caisson-nvml` program), which
/// prints the inventory as JSON; its warnings go to our stderr. A static (musl) build cannot
/// load NVML itself: the library is a glibc one, loaded at run time. Never fails either: a
/// missing or failing helper means zero GPUs, with the reason.
pub fn discover_with(helper: &Path, lib: Option<&Path>) -> Inventory {
    let mut cmd = Command::new(helper);
    if let Some(p) = lib {
        cmd.arg(p);
    }
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output();
    let parsed = match out {
        Ok(o) if o.status.success() => serde_json::from_slice::<Inventory>(&o.stdout)
            .map_err(|e| format!("its output is not an inventory: {e}")),
        Ok(o) => Err(format!("it failed ({})", o.status)),
        Err(e) => Err(e.to_string()),
    };
    parsed.unwrap_or_else(|e| {
        let reason = format!("NVML unavailable ({}: {e}): no GPUs", helper.display());
        tracing::warn!("{reason}");
        Inventory {
            gpus: vec![],
            unavailable: Some(reason),
        }
    })
}

/// The MIG devices of a GPU in MIG mode: NVML numbers them up to a maximum, with holes
/// (`NotFound`) where no instance is configured.
fn mig_devices(dev: &nvml_wrapper::Device<'_>, gpu: u32) -> Vec<MigDevice> {
    let max = match dev.mig_device_count() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("GPU {gpu}: MIG mode on, but NVML gives no MIG device count: {e}");
            return vec![];
        }
    };
    let mut out = vec![];
    for index in 0..max {
        let mig = match dev.mig_device_by_index(index) {
            Ok(m) => m,
            Err(nvml_wrapper::error::NvmlError::NotFound) => continue,
            Err(e) => {
                tracing::warn!("GPU {gpu}: MIG device {index}: {e}; skipped");
                continue;
            }
        };
        let Ok(uuid) = mig.uuid() else { continue };
        let name = mig.name().unwrap_or_default();
        out.push(MigDevice {
            index,
            uuid,
            profile: MigDevice::profile_of(&name),
            name,
            memory_bytes: mig.memory_info().map(|m| m.total).unwrap_or(0),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_failing_helper_means_no_gpus_with_the_reason() {
        let missing = discover_with(Path::new("/nonexistent/caisson-nvml"), None);
        assert!(missing.gpus.is_empty());
        let why = missing.unavailable.expect("a reason");
        assert!(why.contains("/nonexistent/caisson-nvml"), "{why}");

        let failed = discover_with(Path::new("/bin/false"), None);
        let why = failed.unavailable.expect("a reason");
        assert!(why.contains("failed"), "{why}");

        // (echo prints its argument: not JSON.)
        let garbage = discover_with(Path::new("/bin/echo"), Some(Path::new("x")));
        let why = garbage.unavailable.expect("a reason");
        assert!(why.contains("not an inventory"), "{why}");
    }

    #[test]
    fn the_helper_s_inventory_is_taken_as_printed() {
        let inv = Inventory {
            gpus: vec![],
            unavailable: Some("NVML unavailable (x): no GPUs".into()),
        };
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("helper");
        let json = serde_json::to_string(&inv).unwrap();
        std::fs::write(&helper, format!("#!/bin/sh\necho '{json}'\n")).unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        assert_eq!(discover_with(&helper, None), inv);
    }
}
