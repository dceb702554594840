//! Container Device Interface: devices described by vendors' spec files (e.g. from
//! `nvidia-ctk cdi generate`) in `/etc/cdi` and `/var/run/cdi`, asked for by fully-qualified
//! name (`nvidia.com/gpu=0`, `vendor.com/class=all`), and applied to a task: environment,
//! device nodes (created in its /dev and allowed in its device cgroup), mounts, OCI hooks and
//! additional groups.
//!
//! Loading ([`Registry::load`]) never fails as a whole: a file that does not parse or validate
//! is recorded with its error (file and field), and makes a request fail when it may concern
//! the device asked for (its kind matches, or its kind cannot be read). A device name defined
//! by two spec files of the same directory is a conflict and cannot be used; a later
//! directory (`/var/run/cdi` after `/etc/cdi`) overrides an earlier one, as in the reference
//! CDI library.
pub mod spec;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use spec::{ContainerEdits, DeviceNodeEdit, Spec};

use crate::cgroups::devices::{DeviceNode, DeviceRule, DeviceType};
use crate::launch::{Hook, Mount, TaskSpec};

/// Where specs are read from by default, lowest priority first.
pub const DEFAULT_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// Major number of NVIDIA's GPU nodes (`/dev/nvidiaN`, minor N < 255).
const NVIDIA_MAJOR: u32 = crate::gpu::NVIDIA_MAJOR;

/// Errors of the CDI layer.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("invalid CDI device name {0:?}: expected vendor.com/class=name ({1})")]
    BadName(String, String),
    #[error("unknown CDI device {name}{hint}")]
    Unknown { name: String, hint: String },
    #[error("CDI device {name} is defined by more than one spec file: {files}")]
    Conflict { name: String, files: String },
    #[error("invalid CDI spec {}: {message}", path.display())]
    BadSpec { path: PathBuf, message: String },
    #[error("CDI device {device} ({}): {message}", path.display())]
    Edit {
        device: String,
        path: PathBuf,
        message: String,
    },
    #[error("invalid --device {0:?}: {1}")]
    HostDevice(String, String),
    #[error("devices are not supported for Wasm tasks")]
    Wasm,
}

/// A spec file that loaded.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub path: PathBuf,
    /// Index of its directory (higher overrides lower).
    pub priority: usize,
    pub spec: Spec,
}

/// A spec file that did not load.
#[derive(Debug, Clone, Serialize)]
pub struct SpecError {
    pub path: PathBuf,
    /// Its `kind`, when that much could be read.
    pub kind: Option<String>,
    pub message: String,
}

/// One device as `caisson devices` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    /// `vendor.com/class=name`.
    pub name: String,
    pub kind: String,
    pub spec: PathBuf,
    pub cdi_version: String,
    /// Other files of the same priority that define it too (then it cannot be used).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<PathBuf>,
}

/// The specs of a set of directories.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    pub dirs: Vec<PathBuf>,
    pub specs: Vec<LoadedSpec>,
    pub errors: Vec<SpecError>,
    /// Qualified name -> (spec, device) candidates of the highest priority seen.
    devices: BTreeMap<String, Vec<(usize, usize)>>,
}

fn is_spec_file(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("json" | "yaml" | "yml")
    )
}

/// The `kind` of a file that failed validation, if it parses at all.
fn loose_kind(path: &Path, data: &[u8]) -> Option<String> {
    let v: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_slice(data).ok()?
    } else {
        serde_yaml_ng::from_slice(data).ok()?
    };
    v.get("kind")?.as_str().map(String::from)
}

impl Registry {
    /// Reads the spec files (`*.json`, `*.yaml`, `*.yml`) of `dirs`, in order of increasing
    /// priority; missing directories are skipped.
    pub fn load<P: AsRef<Path>>(dirs: &[P]) -> Registry {
        let mut r = Registry {
            dirs: dirs.iter().map(|d| d.as_ref().to_path_buf()).collect(),
            ..Default::default()
        };
        for (priority, dir) in dirs.iter().enumerate() {
            let dir = dir.as_ref();
            let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
                Ok(rd) => rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| is_spec_file(p) && p.is_file())
                    .collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    r.errors.push(SpecError {
                        path: dir.to_path_buf(),
                        kind: None,
                        message: format!("cannot read the directory: {e}"),
                    });
                    continue;
                }
            };
            files.sort();
            for path in files {
                let data = match std::fs::read(&path) {
                    Ok(d) => d,
                    Err(e) => {
                        r.errors.push(SpecError {
                            path,
                            kind: None,
                            message: e.to_string(),
                        });
                        continue;
                    }
                };
                match spec::parse(&path, &data) {
                    Ok(spec) => r.add(LoadedSpec {
                        path,
                        priority,
                        spec,
                    }),
                    Err(message) => {
                        // Reported where it matters: a request it may concern, the listing.
                        tracing::debug!("invalid CDI spec {}: {message}", path.display());
                        r.errors.push(SpecError {
                            kind: loose_kind(&path, &data),
                            path,
                            message,
                        });
                    }
                }
            }
        }
        r
    }

    fn add(&mut self, s: LoadedSpec) {
        let idx = self.specs.len();
        for (d, dev) in s.spec.devices.iter().enumerate() {
            let q = format!("{}={}", s.spec.kind, dev.name);
            let cands = self.devices.entry(q).or_default();
            match cands.first().map(|(i, _)| self.specs[*i].priority) {
                Some(p) if p < s.priority => *cands = vec![(idx, d)],
                _ => cands.push((idx, d)),
            }
        }
        self.specs.push(s);
    }

    /// Every known device, by name.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.devices
            .iter()
            .map(|(name, cands)| {
                let s = &self.specs[cands[0].0];
                DeviceInfo {
                    name: name.clone(),
                    kind: s.spec.kind.clone(),
                    spec: s.path.clone(),
                    cdi_version: s.spec.cdi_version.clone(),
                    conflicts: cands[1..]
                        .iter()
                        .map(|(i, _)| self.specs[*i].path.clone())
                        .collect(),
                }
            })
            .collect()
    }

    fn bad_spec_for(&self, kind: &str, found: bool) -> Option<CdiError> {
        self.errors
            .iter()
            .find(|e| match &e.kind {
                Some(k) => k == kind,
                None => !found,
            })
            .map(|e| CdiError::BadSpec {
                path: e.path.clone(),
                message: e.message.clone(),
            })
    }

    fn one(&self, q: &str) -> Result<Option<(usize, usize)>, CdiError> {
        match self.devices.get(q).map(Vec::as_slice) {
            None | Some([]) => Ok(None),
            Some([one]) => Ok(Some(*one)),
            Some(many) => Err(CdiError::Conflict {
                name: q.to_string(),
                files: many
                    .iter()
                    .map(|(i, _)| self.specs[*i].path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Resolves fully-qualified device names (`vendor.com/class=name`; `=all` means the
    /// device named `all` if the spec has one, else every device of the kind) into the edits
    /// to apply: each spec's own edits once, then each device's, in request order.
    pub fn resolve(&self, requests: &[String]) -> Result<Injection, CdiError> {
        let mut picked: Vec<(String, usize, usize)> = vec![];
        for req in requests {
            let (kind, name) = req
                .split_once('=')
                .ok_or_else(|| CdiError::BadName(req.clone(), "no '='".into()))?;
            spec::split_kind(kind).map_err(|e| CdiError::BadName(req.clone(), e))?;
            if !spec::valid_device_name(name) {
                return Err(CdiError::BadName(
                    req.clone(),
                    format!("invalid device name {name:?}"),
                ));
            }
            let mut found: Vec<(String, usize, usize)> = vec![];
            if let Some((s, d)) = self.one(req)? {
                found.push((req.clone(), s, d));
            } else if name == "all" {
                let prefix = format!("{kind}=");
                for q in self.devices.keys().filter(|q| q.starts_with(&prefix)) {
                    if let Some((s, d)) = self.one(q)? {
                        found.push((q.clone(), s, d));
                    }
                }
            }
            if let Some(e) = self.bad_spec_for(kind, !found.is_empty()) {
                return Err(e);
            }
            if found.is_empty() {
                return Err(CdiError::Unknown {
                    name: req.clone(),
                    hint: self.hint(kind),
                });
            }
            for f in found {
                if !picked.iter().any(|p| p.0 == f.0) {
                    picked.push(f);
                }
            }
        }
        let mut inj = Injection::default();
        let mut specs_done: Vec<usize> = vec![];
        for (q, s, d) in picked {
            let ls = &self.specs[s];
            if !specs_done.contains(&s) {
                specs_done.push(s);
                inj.edits.push(EditSet {
                    device: format!("{} (spec edits)", ls.spec.kind),
                    path: ls.path.clone(),
                    edits: ls.spec.container_edits.clone(),
                    device_level: false,
                });
            }
            inj.edits.push(EditSet {
                device: q.clone(),
                path: ls.path.clone(),
                edits: ls.spec.devices[d].container_edits.clone(),
                device_level: true,
            });
            inj.devices.push(q);
        }
        Ok(inj)
    }

    fn hint(&self, kind: &str) -> String {
        let prefix = format!("{kind}=");
        let names: Vec<&str> = self
            .devices
            .keys()
            .filter_map(|q| q.strip_prefix(&prefix))
            .collect();
        if names.is_empty() {
            let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
            return format!(
                " (no CDI spec defines kind {kind}; searched {})",
                dirs.join(", ")
            );
        }
        let mut shown: Vec<&str> = names.iter().take(8).copied().collect();
        if names.len() > shown.len() {
            shown.push("...");
        }
        format!(" (kind {kind} has: {})", shown.join(", "))
    }
}

/// Edits of one spec or device, with where they came from (for errors).
#[derive(Debug, Clone)]
pub struct EditSet {
    pub device: String,
    pub path: PathBuf,
    pub edits: ContainerEdits,
    /// A device's own edits (not the spec-wide ones).
    pub device_level: bool,
}

/// Resolved devices and the edits they bring.
#[derive(Debug, Clone, Default)]
pub struct Injection {
    /// Qualified names of the devices.
    pub devices: Vec<String>,
    pub edits: Vec<EditSet>,
}

/// A device node with its type and numbers known.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    kind: DeviceType,
    major: u32,
    minor: u32,
    mode: u32,
}

/// Fills in a node's type, numbers and mode from its host node where the spec leaves them out.
fn resolve_node(n: &DeviceNodeEdit) -> Result<Node, String> {
    let host = n.host_path.as_deref().unwrap_or(&n.path);
    let kind = match n.kind.as_deref() {
        Some("c" | "u") => Some(DeviceType::Char),
        Some("b") => Some(DeviceType::Block),
        Some("p") => return Err(format!("{}: FIFO device nodes are not supported", n.path)),
        _ => None,
    };
    let need_host = kind.is_none() || n.major.is_none() || n.minor.is_none();
    let meta = if need_host || n.file_mode.is_none() {
        match std::fs::metadata(host) {
            Ok(m) => Some(m),
            Err(e) if need_host => {
                return Err(format!(
                    "device node {}: host device {host}: {e} (and the spec gives no type, major and minor)",
                    n.path
                ))
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let host_kind = meta.as_ref().and_then(|m| {
        let t = m.file_type();
        if t.is_char_device() {
            Some(DeviceType::Char)
        } else if t.is_block_device() {
            Some(DeviceType::Block)
        } else {
            None
        }
    });
    let kind = match (kind, host_kind) {
        (Some(k), Some(h)) if need_host && k != h => {
            return Err(format!(
                "device node {}: type {k:?} does not match the host device {host} ({h:?})",
                n.path
            ))
        }
        (Some(k), _) => k,
        (None, Some(h)) => h,
        (None, None) => {
            return Err(format!(
                "device node {}: host path {host} is not a device",
                n.path
            ))
        }
    };
    let rdev = meta.as_ref().map(|m| m.rdev()).unwrap_or(0);
    let major = n
        .major
        .map_or(nix::sys::stat::major(rdev) as u32, |v| v as u32);
    let minor = n
        .minor
        .map_or(nix::sys::stat::minor(rdev) as u32, |v| v as u32);
    let mode = match (n.file_mode, &meta) {
        (Some(m), _) => m & 0o7777,
        (None, Some(m)) => m.permissions().mode() & 0o777,
        (None, None) => 0o666,
    };
    Ok(Node {
        kind,
        major,
        minor,
        mode,
    })
}

impl Injection {
    /// Minors of the NVIDIA GPUs (char 195:N, N < 255) among the devices' own nodes: what the
    /// GPU allocator must count as taken.
    pub fn nvidia_gpu_minors(&self) -> Vec<u32> {
        let mut out = vec![];
        for e in self.edits.iter().filter(|e| e.device_level) {
            for n in &e.edits.device_nodes {
                if let Ok(node) = resolve_node(n) {
                    if node.kind == DeviceType::Char
                        && node.major == NVIDIA_MAJOR
                        && node.minor < crate::gpu::NVIDIACTL_MINOR
                        && !out.contains(&node.minor)
                    {
                        out.push(node.minor);
                    }
                }
            }
        }
        out
    }

    /// Applies the edits to `task`: environment (replacing by key), device nodes and their
    /// cgroup rules, mounts, hooks, additional groups. Host-side resources (device nodes,
    /// mount sources, hook binaries) must exist now.
    pub fn apply(&self, task: &mut TaskSpec) -> Result<(), CdiError> {
        if task.wasm.is_some() {
            return Err(CdiError::Wasm);
        }
        for set in &self.edits {
            apply_edits(set, task).map_err(|message| CdiError::Edit {
                device: set.device.clone(),
                path: set.path.clone(),
                message,
            })?;
        }
        Ok(())
    }
}

fn add_node(
    task: &mut TaskSpec,
    path: &str,
    node: &Node,
    n: &DeviceNodeEdit,
) -> Result<(), String> {
    if !path.starts_with("/dev/") {
        return Err(format!(
            "device node {path}: only nodes under /dev/ are supported"
        ));
    }
    if let Some(old) = task.devices.nodes.iter().find(|d| d.path == path) {
        if (old.kind, old.major, old.minor) != (node.kind, node.major, node.minor) {
            return Err(format!(
                "device node {path}: conflicts with {}:{} already given to the task",
                old.major, old.minor
            ));
        }
    } else {
        task.devices.nodes.push(DeviceNode {
            path: path.to_string(),
            kind: node.kind,
            major: node.major,
            minor: node.minor,
            mode: node.mode,
            uid: n.uid,
            gid: n.gid,
        });
    }
    let rule = DeviceRule {
        kind: node.kind,
        major: Some(node.major),
        minor: Some(node.minor),
        access: n.permissions.clone().unwrap_or_else(|| "rwm".into()),
    };
    if !task.devices.allow.contains(&rule) {
        task.devices.allow.push(rule);
    }
    Ok(())
}

fn check_executable(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err("not an executable file".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn apply_edits(set: &EditSet, task: &mut TaskSpec) -> Result<(), String> {
    let e = &set.edits;
    if e.intel_rdt.is_some() {
        return Err("intelRdt is not supported by caisson".into());
    }
    if !e.net_devices.is_empty() {
        return Err("netDevices are not supported by caisson".into());
    }
    for kv in &e.env {
        let key = kv.split('=').next().unwrap_or_default();
        task.process
            .env
            .retain(|x| x.split('=').next() != Some(key));
        task.process.env.push(kv.clone());
    }
    for n in &e.device_nodes {
        let node = resolve_node(n)?;
        add_node(task, &n.path, &node, n)?;
    }
    for m in &e.mounts {
        let fstype = match m.kind.as_deref() {
            None | Some("none" | "bind") => String::new(),
            Some(t) => t.to_string(),
        };
        let mount = Mount {
            source: PathBuf::from(&m.host_path),
            target: m.container_path.clone(),
            fstype,
            options: m.options.clone(),
        };
        let flags = mount
            .flags()
            .map_err(|e| format!("mount {}: {e}", m.container_path))?;
        if flags.bind {
            if let Err(err) = std::fs::metadata(&m.host_path) {
                return Err(format!(
                    "mount {}: host path {}: {err}",
                    m.container_path, m.host_path
                ));
            }
        }
        task.mounts.retain(|x| x.target != mount.target);
        task.mounts.push(mount);
    }
    for h in &e.hooks {
        let hook = Hook {
            path: PathBuf::from(&h.path),
            args: h.args.clone(),
            env: h.env.clone(),
            timeout_secs: h.timeout.map(|t| t as u64),
        };
        // startContainer hooks run inside the task: their path is the task's.
        if h.hook_name != "startContainer" {
            check_executable(&hook.path)
                .map_err(|err| format!("{} hook {}: {err}", h.hook_name, h.path))?;
        }
        let list = match h.hook_name.as_str() {
            // OCI's deprecated prestart runs where createRuntime does.
            "prestart" | "createRuntime" => &mut task.hooks.create_runtime,
            "createContainer" => &mut task.hooks.create_container,
            "startContainer" => &mut task.hooks.start_container,
            "poststart" => &mut task.hooks.poststart,
            "poststop" => &mut task.hooks.poststop,
            other => return Err(format!("hook point {other:?} is not supported")),
        };
        if !list.contains(&hook) {
            list.push(hook);
        }
    }
    for g in &e.additional_gids {
        if *g != 0 && !task.additional_gids.contains(g) {
            task.additional_gids.push(*g);
        }
    }
    Ok(())
}

/// `--device HOST[:CONTAINER][:PERMISSIONS]` (podman's syntax): a host device node given to
/// the task as is (or at CONTAINER), allowed with PERMISSIONS (default `rwm`).
pub fn add_host_device(arg: &str, task: &mut TaskSpec) -> Result<(), CdiError> {
    let bad = |m: String| CdiError::HostDevice(arg.to_string(), m);
    let parts: Vec<&str> = arg.split(':').collect();
    let perms = |s: &str| !s.is_empty() && s.chars().all(|c| "rwm".contains(c));
    let (host, ctr, access) = match parts.as_slice() {
        [h] => (*h, *h, None),
        [h, p] if perms(p) => (*h, *h, Some(*p)),
        [h, c] => (*h, *c, None),
        [h, c, p] => (*h, *c, Some(*p)),
        _ => return Err(bad("expected HOST[:CONTAINER][:PERMISSIONS]".into())),
    };
    if let Some(p) = access {
        if !perms(p) {
            return Err(bad(format!("permissions {p:?} are not a subset of rwm")));
        }
    }
    if !host.starts_with('/') || !ctr.starts_with('/') {
        return Err(bad("paths must be absolute".into()));
    }
    if task.wasm.is_some() {
        return Err(CdiError::Wasm);
    }
    let edit = DeviceNodeEdit {
        path: ctr.to_string(),
        host_path: Some(host.to_string()),
        permissions: access.map(String::from),
        ..Default::default()
    };
    let node = resolve_node(&edit).map_err(bad)?;
    add_node(task, ctr, &node, &edit).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        std::fs::write(dir.join(name), body).unwrap();
    }

    fn spec_json(kind: &str, names: &[&str], extra: &str) -> String {
        let devs: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    r#"{{"name":"{n}","containerEdits":{{"env":["DEV_{n}=1"],"deviceNodes":[{{"path":"/dev/null{n}","hostPath":"/dev/null"}}]}}}}"#
                )
            })
            .collect();
        format!(
            r#"{{"cdiVersion":"0.6.0","kind":"{kind}","devices":[{}],"containerEdits":{{"env":["SPEC=1"]{extra}}}}}"#,
            devs.join(",")
        )
    }

    #[test]
    fn resolve_all_conflicts_priority_and_errors() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write(
            a.path(),
            "x.json",
            &spec_json("example.com/x", &["a", "b"], ""),
        );
        write(a.path(), "y.json", &spec_json("example.com/y", &["a"], ""));
        write(a.path(), "y2.json", &spec_json("example.com/y", &["a"], ""));
        write(a.path(), "ignored.txt", "not a spec");
        // A later directory overrides.
        write(
            b.path(),
            "x.yaml",
            "cdiVersion: 0.3.0\nkind: example.com/x\ndevices:\n- name: b\n",
        );
        let r = Registry::load(&[a.path(), b.path(), Path::new("/nonexistent")]);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let names: Vec<String> = r.devices().into_iter().map(|d| d.name).collect();
        assert_eq!(
            names,
            ["example.com/x=a", "example.com/x=b", "example.com/y=a"]
        );

        let inj = r.resolve(&["example.com/x=all".into()]).unwrap();
        assert_eq!(inj.devices, ["example.com/x=a", "example.com/x=b"]);
        let mut task = TaskSpec::default();
        inj.apply(&mut task).unwrap();
        // Spec edits once (the overriding spec of x=b has none), then each device's.
        assert_eq!(task.process.env, ["SPEC=1", "DEV_a=1"]);
        assert_eq!(task.devices.nodes.len(), 1);
        assert_eq!(
            (task.devices.nodes[0].major, task.devices.nodes[0].minor),
            (1, 3)
        );
        assert_eq!(task.devices.allow, [DeviceRule::char_rwm(1, 3)]);

        let e = r
            .resolve(&["example.com/y=a".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("defined by more than one spec file") && e.contains("y2.json"),
            "{e}"
        );
        let e = r
            .resolve(&["example.com/x=c".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "unknown CDI device example.com/x=c (kind example.com/x has: a, b)"
        );
        let e = r
            .resolve(&["example.com/z=c".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CDI spec defines kind example.com/z"), "{e}");
        assert!(r.resolve(&["nokind".into()]).is_err());
        assert!(r.resolve(&["example.com/x=-a".into()]).is_err());

        // A broken file of the same kind is named, with its field.
        write(
            a.path(),
            "z.json",
            r#"{"cdiVersion":"0.6.0","kind":"example.com/x","devices":[{"name":""}]}"#,
        );
        std::fs::remove_file(a.path().join("y2.json")).unwrap();
        let r = Registry::load(&[a.path()]);
        let e = r
            .resolve(&["example.com/x=a".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("z.json") && e.contains("devices[0].name"), "{e}");
        // ... but not when its kind is another one.
        assert!(r.resolve(&["example.com/y=a".into()]).is_ok());
    }

    #[test]
    fn edits_mounts_hooks_gids_and_missing_resources() {
        let d = tempfile::tempdir().unwrap();
        let extra = r#","mounts":[{"hostPath":"/etc","containerPath":"/host-etc","options":["ro","rbind","nosuid"]}],
            "hooks":[{"hookName":"poststop","path":"/bin/true"},{"hookName":"startContainer","path":"/in/task"}],
            "additionalGids":[0,44]"#;
        write(
            d.path(),
            "a.json",
            &spec_json("example.com/a", &["one"], extra).replace("0.6.0", "0.7.0"),
        );
        let r = Registry::load(&[d.path()]);
        let mut task = TaskSpec::default();
        r.resolve(&["example.com/a=one".into()])
            .unwrap()
            .apply(&mut task)
            .unwrap();
        assert_eq!(task.mounts[0].target, "/host-etc");
        let f = task.mounts[0].flags().unwrap();
        assert!(f.bind && f.recursive);
        assert_eq!(task.hooks.poststop[0].path, Path::new("/bin/true"));
        assert_eq!(task.hooks.start_container[0].path, Path::new("/in/task"));
        assert_eq!(task.additional_gids, [44]);

        let missing = extra.replace("\"/bin/true\"", "\"/nonexistent/hook\"");
        write(
            d.path(),
            "a.json",
            &spec_json("example.com/a", &["one"], &missing).replace("0.6.0", "0.7.0"),
        );
        let r = Registry::load(&[d.path()]);
        let e = r
            .resolve(&["example.com/a=one".into()])
            .unwrap()
            .apply(&mut TaskSpec::default());
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("poststop hook /nonexistent/hook") && e.contains("a.json"),
            "{e}"
        );
    }

    #[test]
    fn host_devices() {
        let mut t = TaskSpec::default();
        add_host_device("/dev/null:/dev/xnull:rw", &mut t).unwrap();
        add_host_device("/dev/zero", &mut t).unwrap();
        assert_eq!(t.devices.nodes[0].path, "/dev/xnull");
        assert_eq!(t.devices.allow[0].access, "rw");
        assert_eq!((t.devices.nodes[1].major, t.devices.nodes[1].minor), (1, 5));
        assert!(add_host_device("/dev/nonexistent", &mut t).is_err());
        assert!(add_host_device("/dev/null:/dev/z:rwx", &mut t).is_err());
        assert!(add_host_device("/etc/passwd", &mut t).is_err());
        assert!(add_host_device("/dev/zero:/dev/xnull", &mut t)
            .unwrap_err()
            .to_string()
            .contains("conflicts"));
    }
}
