//! NVIDIA GPUs as a task resource, as the Mesos `gpu/nvidia` isolator did: inventory through
//! NVML ([`discover`]), a selection of the GPUs caisson manages ([`Selection`]), whole-GPU
//! exclusive allocation recorded on disk ([`Allocator`]), and the isolation a task needs
//! ([`task_devices`]: device nodes in its /dev, device cgroup rules, `NVIDIA_VISIBLE_DEVICES`,
//! the driver's user-space files).
//!
//! No driver, no library or no GPU means zero GPUs (and one log line), never an error.
mod alloc;
mod nvml;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use alloc::{Allocation, Allocator};
pub use nvml::{discover, discover_with};

use crate::cgroups::devices::{DeviceNode, DeviceRule, DeviceType, Devices};
use crate::launch::{TaskSpec, Volume};

/// Major number of the NVIDIA character devices (`/dev/nvidiaN`, `nvidiactl`, `nvidia-modeset`).
pub const NVIDIA_MAJOR: u32 = 195;
/// Minor of `/dev/nvidiactl`.
pub const NVIDIACTL_MINOR: u32 = 255;

/// Errors of the GPU layer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("invalid GPU selection {0:?}: expected all, none, or a list of indexes and UUIDs")]
    BadSelection(String),
    #[error("GPU {0:?} is not present on this host ({1})")]
    NotPresent(String, String),
    #[error("cannot allocate {requested} GPU(s): {free} of {total} free{held}")]
    Exhausted {
        requested: usize,
        free: usize,
        total: usize,
        held: String,
    },
    #[error("cannot allocate GPUs: this host has no GPUs for caisson to manage ({0})")]
    NoGpus(String),
    #[error("GPU {index} ({uuid}) is held by task {task}")]
    Held {
        index: u32,
        uuid: String,
        task: String,
    },
    #[error("task {0} already holds GPUs")]
    AlreadyHolds(String),
    #[error("GPUs are not supported for Wasm tasks")]
    Wasm,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// One GPU, as NVML describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// `GPU-xxxxxxxx-...`: the stable identity allocations are recorded by.
    pub uuid: String,
    pub name: String,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// PCI bus id (`domain:bus:device.function`).
    pub pci_bus_id: String,
    /// Minor number of its `/dev/nvidiaN`.
    pub minor: u32,
    /// MIG mode is on (then its MIG devices are listed; caisson still allocates the GPU
    /// whole).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mig_mode: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mig_devices: Vec<MigDevice>,
}

/// A MIG (Multi-Instance GPU) device of a GPU in MIG mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigDevice {
    /// Its index among its parent's MIG devices.
    pub index: u32,
    /// `MIG-xxxxxxxx-...`.
    pub uuid: String,
    pub name: String,
    /// The GPU instance profile (`1g.10gb`), from the name NVML gives.
    pub profile: String,
    pub memory_bytes: u64,
}

impl MigDevice {
    /// The profile part of a MIG device name (`NVIDIA A100-SXM4-40GB MIG 1g.5gb`).
    pub fn profile_of(name: &str) -> String {
        name.rsplit_once("MIG ")
            .map(|(_, p)| p.trim().to_string())
            .unwrap_or_default()
    }
}

/// What NVML reported: the GPUs, or why there are none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    /// Why NVML could not be used (no library, no driver), when it could not.
    pub unavailable: Option<String>,
}

impl Inventory {
    /// Keeps the GPUs `selection` names (see [`Selection::apply`]).
    pub fn select(self, selection: &Selection) -> Result<Inventory, GpuError> {
        let gpus = selection.apply(&self.gpus)?;
        let unavailable = match (&self.unavailable, selection) {
            (Some(why), _) => Some(why.clone()),
            (None, Selection::None) => Some("--gpus none".into()),
            (None, _) if gpus.is_empty() => Some("NVML lists no GPU".into()),
            (None, _) => None,
        };
        Ok(Inventory { gpus, unavailable })
    }
}

/// Gives the task of `spec` `count` whole GPUs of `managed`, exclusively: allocates them to
/// `spec.id` (recorded under `root`), then adds their device nodes and cgroup rules,
/// `NVIDIA_VISIBLE_DEVICES`/`CUDA_VISIBLE_DEVICES` and the driver's files to the spec. The
/// caller releases ([`Allocator::release`]) if the launch fails, and when the task is removed.
pub fn attach_to_task(
    root: &Path,
    managed: &Inventory,
    count: usize,
    spec: &mut TaskSpec,
) -> Result<Vec<Gpu>, GpuError> {
    attach_with(root, managed, count, &[], spec)
}

/// Like [`attach_to_task`], also allocating `required` (GPUs a CDI device names, whose
/// nodes and environment come from its spec): only the `count` others get caisson's own
/// devices and driver files; the environment then lists them all.
pub fn attach_with(
    root: &Path,
    managed: &Inventory,
    count: usize,
    required: &[Gpu],
    spec: &mut TaskSpec,
) -> Result<Vec<Gpu>, GpuError> {
    if spec.wasm.is_some() {
        return Err(GpuError::Wasm);
    }
    if managed.gpus.is_empty() {
        let why = managed.unavailable.clone().unwrap_or_default();
        return Err(GpuError::NoGpus(why));
    }
    let got = Allocator::new(root).allocate_with(&spec.id, count, &managed.gpus, required)?;
    let counted: Vec<Gpu> = got[required.len()..].to_vec();
    if counted.is_empty() {
        return Ok(got);
    }
    let d = task_devices(&counted);
    for n in d.nodes {
        if !spec.devices.nodes.iter().any(|x| x.path == n.path) {
            spec.devices.nodes.push(n);
        }
    }
    for r in d.allow {
        if !spec.devices.allow.contains(&r) {
            spec.devices.allow.push(r);
        }
    }
    for e in task_env(&got) {
        let key = e.split('=').next().unwrap_or_default().to_string();
        spec.process
            .env
            .retain(|x| x.split('=').next() != Some(key.as_str()));
        spec.process.env.push(e);
    }
    for v in driver_volumes(Path::new("/")) {
        if !spec.volumes.iter().any(|x| x.target == v.target) {
            spec.volumes.push(v);
        }
    }
    Ok(got)
}

/// Which GPUs caisson manages (`--gpus all|none|0,2|GPU-uuid,...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Selection {
    #[default]
    All,
    None,
    /// Indexes and/or UUIDs.
    List(Vec<String>),
}

impl std::str::FromStr for Selection {
    type Err = GpuError;
    fn from_str(s: &str) -> Result<Self, GpuError> {
        match s.trim() {
            "all" | "" => Ok(Selection::All),
            "none" => Ok(Selection::None),
            list => {
                let items: Vec<String> = list.split(',').map(|i| i.trim().to_string()).collect();
                if items.iter().any(|i| {
                    i.is_empty()
                        || !(i.parse::<u32>().is_ok()
                            || i.starts_with("GPU-")
                            || i.starts_with("MIG-"))
                }) {
                    return Err(GpuError::BadSelection(s.into()));
                }
                Ok(Selection::List(items))
            }
        }
    }
}

impl Selection {
    /// The selected GPUs of `all`, in index order; a GPU named but absent is an error.
    pub fn apply(&self, all: &[Gpu]) -> Result<Vec<Gpu>, GpuError> {
        match self {
            Selection::All => Ok(all.to_vec()),
            Selection::None => Ok(vec![]),
            Selection::List(items) => {
                let mut out: Vec<Gpu> = vec![];
                for item in items {
                    let found = all
                        .iter()
                        .find(|g| g.uuid == *item || item.parse() == Ok(g.index))
                        .ok_or_else(|| {
                            GpuError::NotPresent(item.clone(), format!("{} GPUs found", all.len()))
                        })?;
                    if !out.iter().any(|g| g.uuid == found.uuid) {
                        out.push(found.clone());
                    }
                }
                out.sort_by_key(|g| g.index);
                Ok(out)
            }
        }
    }
}

/// Device nodes of the driver besides the GPUs.
const CONTROL_NODES: &[&str] = &[
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// The devices a task holding `gpus` gets: `/dev/nvidiaN` of each (major 195, NVML's minor),
/// `/dev/nvidiactl` (always: its numbers are fixed), the other control nodes present on the
/// host (`nvidia-uvm` has a dynamic major), and an allow rule for each.
pub fn task_devices(gpus: &[Gpu]) -> Devices {
    let mut d = Devices::default();
    let mut add = |path: String, major: u32, minor: u32| {
        d.allow.push(DeviceRule::char_rwm(major, minor));
        d.nodes.push(DeviceNode {
            path,
            kind: DeviceType::Char,
            major,
            minor,
            mode: 0o666,
            uid: None,
            gid: None,
        });
    };
    for g in gpus {
        add(format!("/dev/nvidia{}", g.minor), NVIDIA_MAJOR, g.minor);
    }
    for path in CONTROL_NODES {
        match host_char_device(Path::new(path)) {
            Some((major, minor)) => add(path.to_string(), major, minor),
            None if *path == "/dev/nvidiactl" => {
                add(path.to_string(), NVIDIA_MAJOR, NVIDIACTL_MINOR)
            }
            None => {}
        }
    }
    d
}

fn host_char_device(p: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(p).ok()?;
    if !m.file_type().is_char_device() {
        return None;
    }
    let rdev = m.rdev();
    Some((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// The environment of a task holding `gpus`: `NVIDIA_VISIBLE_DEVICES` and
/// `CUDA_VISIBLE_DEVICES`, by UUID (stable, whatever order the task's NVML enumerates in).
pub fn task_env(gpus: &[Gpu]) -> Vec<String> {
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    let list = if uuids.is_empty() {
        "void".to_string()
    } else {
        uuids.join(",")
    };
    vec![
        format!("NVIDIA_VISIBLE_DEVICES={list}"),
        format!("CUDA_VISIBLE_DEVICES={}", uuids.join(",")),
    ]
}

/// User-space files of the driver (Mesos's "nvidia volume"): the tools and the libraries a CUDA
/// program or `nvidia-smi` needs, found under `host_root` (`/` in production), as read-only
/// bind mounts at the same paths. Best effort: what is absent is skipped.
pub fn driver_volumes(host_root: &Path) -> Vec<Volume> {
    const BINARIES: &[&str] = &[
        "nvidia-smi",
        "nvidia-debugdump",
        "nvidia-persistenced",
        "nvidia-cuda-mps-control",
        "nvidia-cuda-mps-server",
    ];
    const BIN_DIRS: &[&str] = &["usr/bin", "usr/local/nvidia/bin"];
    const LIB_PREFIXES: &[&str] = &[
        "libnvidia-ml.so",
        "libcuda.so",
        "libnvidia-ptxjitcompiler.so",
        "libnvidia-nvvm.so",
        "libnvidia-opencl.so",
        "libnvidia-cfg.so",
        "libnvidia-gpucomp.so",
        "libnvidia-allocator.so",
    ];
    const LIB_DIRS: &[&str] = &[
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/aarch64-linux-gnu",
        "usr/lib64",
        "usr/lib",
        "usr/local/nvidia/lib64",
    ];
    let mut out: Vec<Volume> = vec![];
    let mut push = |p: PathBuf, target: String| {
        if p.is_file() && !out.iter().any(|v| v.target == target) {
            out.push(Volume {
                source: p,
                target,
                readonly: true,
            });
        }
    };
    for dir in BIN_DIRS {
        for b in BINARIES {
            push(host_root.join(dir).join(b), format!("/{dir}/{b}"));
        }
    }
    for dir in LIB_DIRS {
        let Ok(rd) = std::fs::read_dir(host_root.join(dir)) else {
            continue;
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| LIB_PREFIXES.iter().any(|p| n.starts_with(p)))
            .collect();
        names.sort();
        for n in names {
            // Symlinks (libcuda.so.1 -> libcuda.so.550.54) are mounted as the file they name.
            let p = host_root.join(dir).join(&n);
            if let Ok(real) = std::fs::canonicalize(&p) {
                push(real, format!("/{dir}/{n}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> Gpu {
        Gpu {
            index,
            uuid: format!("GPU-{index}"),
            name: "g".into(),
            memory_bytes: 1,
            pci_bus_id: String::new(),
            minor: index + 4,
            mig_mode: false,
            mig_devices: vec![],
        }
    }

    #[test]
    fn selection() {
        let all: Vec<Gpu> = (0..3).map(gpu).collect();
        assert_eq!(
            "all"
                .parse::<Selection>()
                .unwrap()
                .apply(&all)
                .unwrap()
                .len(),
            3
        );
        assert!("none"
            .parse::<Selection>()
            .unwrap()
            .apply(&all)
            .unwrap()
            .is_empty());
        let s: Selection = "2,GPU-0".parse().unwrap();
        let picked: Vec<u32> = s.apply(&all).unwrap().iter().map(|g| g.index).collect();
        assert_eq!(picked, [0, 2]);
        assert!(matches!(
            "5".parse::<Selection>().unwrap().apply(&all),
            Err(GpuError::NotPresent(..))
        ));
        assert!("0,,1".parse::<Selection>().is_err());
        assert!("some".parse::<Selection>().is_err());
    }

    #[test]
    fn mig_profiles() {
        assert_eq!(
            MigDevice::profile_of("NVIDIA A100-SXM4-40GB MIG 1g.5gb"),
            "1g.5gb"
        );
        assert_eq!(MigDevice::profile_of("Tesla T4"), "");
    }

    #[test]
    fn devices_and_env() {
        let d = task_devices(&[gpu(1)]);
        assert_eq!(d.nodes[0].path, "/dev/nvidia5");
        assert_eq!((d.nodes[0].major, d.nodes[0].minor), (195, 5));
        assert!(d.nodes.iter().any(|n| n.path == "/dev/nvidiactl"));
        assert!(d.allow.contains(&DeviceRule::char_rwm(195, 5)));
        assert!(!d.allow.contains(&DeviceRule::char_rwm(195, 4)));
        assert_eq!(
            task_env(&[gpu(0), gpu(2)]),
            [
                "NVIDIA_VISIBLE_DEVICES=GPU-0,GPU-2",
                "CUDA_VISIBLE_DEVICES=GPU-0,GPU-2"
            ]
        );
    }

    #[test]
    fn driver_files_found_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("usr/lib/x86_64-linux-gnu");
        let bin = dir.path().join("usr/bin");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(lib.join("libcuda.so.550.1"), "x").unwrap();
        std::os::unix::fs::symlink("libcuda.so.550.1", lib.join("libcuda.so.1")).unwrap();
        std::fs::write(lib.join("libc.so.6"), "x").unwrap();
        std::fs::write(bin.join("nvidia-smi"), "x").unwrap();
        let v = driver_volumes(dir.path());
        let targets: Vec<&str> = v.iter().map(|v| v.target.as_str()).collect();
        assert_eq!(
            targets,
            [
                "/usr/bin/nvidia-smi",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.1"
            ]
        );
        assert!(v.iter().all(|v| v.readonly));
        assert_eq!(
            v[1].source,
            lib.join("libcuda.so.550.1").canonicalize().unwrap()
        );
    }
}
