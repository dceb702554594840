//! The CDI spec file format (cdiVersion 0.3.0 to 1.0.0, as `nvidia-ctk cdi generate` and other
//! vendors write it), its parsing from JSON or YAML, and its validation. Every error names the
//! field (`devices[1].containerEdits.deviceNodes[0].path`); the caller adds the file.
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One spec file: a kind (`vendor.com/class`), its devices, and edits common to all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    pub cdi_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Applied once when any device of this spec is requested.
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

/// A device a user can ask for as `kind=name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Device {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub container_edits: ContainerEdits,
}

/// Changes to the container a device (or a spec) asks for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNodeEdit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookEdit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountEdit>,
    /// Parsed so that specs using it load; refused when applied (no resctrl support).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intel_rdt: Option<serde_json::Value>,
    #[serde(
        default,
        rename = "additionalGids",
        alias = "additionalGIDs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub additional_gids: Vec<u32>,
    /// cdiVersion 1.0.0; refused when applied (no network device moves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_devices: Vec<serde_json::Value>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self == &ContainerEdits::default()
    }
}

/// A device node to create in the container (and allow in its device cgroup).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceNodeEdit {
    /// Path in the container.
    pub path: String,
    /// Path on the host the type and numbers are read from when not given (default: `path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `c` (or `u`), `b`, `p`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    /// An integer; in YAML also `0640` (octal, as YAML 1.1 tools such as the reference
    /// library read it).
    #[serde(
        default,
        deserialize_with = "octal_mode",
        skip_serializing_if = "Option::is_none"
    )]
    pub file_mode: Option<u32>,
    /// Device cgroup access, a subset of `rwm` (default `rwm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// A mount (a bind mount unless `type` says otherwise).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MountEdit {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// An OCI hook to run at `hookName`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HookEdit {
    pub hook_name: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

fn octal_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mode {
        Int(u32),
        Text(String),
    }
    match Option::<Mode>::deserialize(d)? {
        None => Ok(None),
        Some(Mode::Int(m)) => Ok(Some(m)),
        Some(Mode::Text(t)) => {
            let digits = t.strip_prefix("0o").or_else(|| t.strip_prefix('0'));
            digits
                .and_then(|o| u32::from_str_radix(o, 8).ok())
                .map(Some)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("{t:?} is not a file mode (e.g. 0640)"))
                })
        }
    }
}

/// The OCI hook points a CDI hook may name.
pub const HOOK_NAMES: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// The spec versions caisson reads (older ones had another format).
pub const VERSIONS: &[(u32, u32)] = &[(0, 3), (0, 4), (0, 5), (0, 6), (0, 7), (0, 8), (1, 0)];

/// Parses a spec file's bytes: JSON for `.json`, YAML otherwise (YAML is a superset of JSON).
pub fn parse(path: &Path, data: &[u8]) -> Result<Spec, String> {
    let spec: Spec = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_slice(data).map_err(|e| e.to_string())?
    } else {
        serde_yaml_ng::from_slice(data).map_err(|e| e.to_string())?
    };
    spec.validate()?;
    Ok(spec)
}

fn version(s: &str) -> Option<(u32, u32, u32)> {
    let s = s.strip_prefix('v').unwrap_or(s);
    let mut it = s.split('.');
    let v = (
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    );
    it.next().is_none().then_some(v)
}

fn alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// A vendor (`nvidia.com`): letters, digits, `-`, `_`, `.`; starts with a letter, ends with a
/// letter or digit.
pub fn valid_vendor(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || "-_.".contains(c))
}

/// A class (`gpu`): as a vendor, dots allowed since 0.6.0 (checked by the caller).
pub fn valid_class(s: &str) -> bool {
    valid_vendor(s)
}

/// A device name (`0`, `GPU-…`, `0:1`): letters, digits, `-`, `_`, `.`, `:`, starting and
/// ending with a letter or digit.
pub fn valid_device_name(s: &str) -> bool {
    s.starts_with(alnum) && s.ends_with(alnum) && s.chars().all(|c| alnum(c) || "-_.:".contains(c))
}

/// Splits a kind into vendor and class, checking both.
pub fn split_kind(kind: &str) -> Result<(&str, &str), String> {
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| format!("{kind:?} is not of the form vendor.com/class"))?;
    if !valid_vendor(vendor) {
        return Err(format!(
            "invalid vendor {vendor:?} in {kind:?} (letters, digits, '-', '_', '.'; starting with a letter)"
        ));
    }
    if !valid_class(class) {
        return Err(format!(
            "invalid class {class:?} in {kind:?} (letters, digits, '-', '_', '.'; starting with a letter)"
        ));
    }
    Ok((vendor, class))
}

impl Spec {
    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        let v = version(&self.cdi_version).ok_or_else(|| {
            format!(
                "cdiVersion: {:?} is not a version (major.minor.patch)",
                self.cdi_version
            )
        })?;
        if !VERSIONS.contains(&(v.0, v.1)) {
            return Err(format!(
                "cdiVersion: unsupported version {:?} (caisson reads 0.3.0 to 1.0.0)",
                self.cdi_version
            ));
        }
        let (_, class) = split_kind(&self.kind).map_err(|e| format!("kind: {e}"))?;
        // Each later feature needs the version that introduced it (as the CDI library checks).
        let mut needs: Vec<((u32, u32), String)> = vec![];
        if class.contains('.') {
            needs.push(((0, 6), "kind (a dot in the class)".into()));
        }
        if !self.annotations.is_empty() {
            needs.push(((0, 6), "annotations".into()));
        }
        if self.devices.is_empty() {
            return Err("devices: a spec must define at least one device".into());
        }
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, d) in self.devices.iter().enumerate() {
            let at = format!("devices[{i}]");
            if !valid_device_name(&d.name) {
                return Err(format!(
                    "{at}.name: invalid device name {:?} (letters, digits, '-', '_', '.', ':'; starting and ending with a letter or digit)",
                    d.name
                ));
            }
            if let Some(j) = seen.insert(&d.name, i) {
                return Err(format!(
                    "{at}.name: device {:?} is defined twice (also devices[{j}])",
                    d.name
                ));
            }
            if !d.annotations.is_empty() {
                needs.push(((0, 6), format!("{at}.annotations")));
            }
            d.container_edits
                .validate(&format!("{at}.containerEdits"), &mut needs)?;
        }
        self.container_edits
            .validate("containerEdits", &mut needs)?;
        if let Some((need, what)) = needs.into_iter().find(|(need, _)| *need > (v.0, v.1)) {
            return Err(format!(
                "{what}: needs cdiVersion {}.{}.0 or later (the spec says {})",
                need.0, need.1, self.cdi_version
            ));
        }
        Ok(())
    }
}

impl ContainerEdits {
    fn validate(&self, at: &str, needs: &mut Vec<((u32, u32), String)>) -> Result<(), String> {
        for (i, e) in self.env.iter().enumerate() {
            if e.split_once('=').is_none_or(|(k, _)| k.is_empty()) {
                return Err(format!("{at}.env[{i}]: {e:?} is not KEY=VALUE"));
            }
        }
        for (i, n) in self.device_nodes.iter().enumerate() {
            let at = format!("{at}.deviceNodes[{i}]");
            if !n.path.starts_with('/') {
                return Err(format!("{at}.path: {:?} is not an absolute path", n.path));
            }
            if let Some(h) = &n.host_path {
                needs.push(((0, 5), format!("{at}.hostPath")));
                if !h.starts_with('/') {
                    return Err(format!("{at}.hostPath: {h:?} is not an absolute path"));
                }
            }
            if let Some(t) = &n.kind {
                if !["c", "u", "b", "p"].contains(&t.as_str()) {
                    return Err(format!("{at}.type: {t:?} is not one of c, u, b, p"));
                }
            }
            for (f, v) in [("major", n.major), ("minor", n.minor)] {
                if v.is_some_and(|v| !(0..=u32::MAX as i64).contains(&v)) {
                    return Err(format!("{at}.{f}: {} is out of range", v.unwrap_or(0)));
                }
            }
            if let Some(p) = &n.permissions {
                if p.is_empty() || !p.chars().all(|c| "rwm".contains(c)) {
                    return Err(format!("{at}.permissions: {p:?} is not a subset of rwm"));
                }
            }
        }
        for (i, m) in self.mounts.iter().enumerate() {
            let at = format!("{at}.mounts[{i}]");
            if m.host_path.is_empty() {
                return Err(format!("{at}.hostPath: empty"));
            }
            if !m.container_path.starts_with('/') {
                return Err(format!(
                    "{at}.containerPath: {:?} is not an absolute path",
                    m.container_path
                ));
            }
            if m.kind.is_some() {
                needs.push(((0, 4), format!("{at}.type")));
            }
        }
        for (i, h) in self.hooks.iter().enumerate() {
            let at = format!("{at}.hooks[{i}]");
            if !HOOK_NAMES.contains(&h.hook_name.as_str()) {
                return Err(format!(
                    "{at}.hookName: {:?} is not an OCI hook ({})",
                    h.hook_name,
                    HOOK_NAMES.join(", ")
                ));
            }
            if !h.path.starts_with('/') {
                return Err(format!("{at}.path: {:?} is not an absolute path", h.path));
            }
            if h.timeout.is_some_and(|t| t <= 0) {
                return Err(format!("{at}.timeout: must be greater than zero"));
            }
            for (j, e) in h.env.iter().enumerate() {
                if !e.contains('=') {
                    return Err(format!("{at}.env[{j}]: {e:?} is not KEY=VALUE"));
                }
            }
        }
        if !self.additional_gids.is_empty() {
            needs.push(((0, 7), format!("{at}.additionalGids")));
        }
        if self.intel_rdt.is_some() {
            needs.push(((0, 7), format!("{at}.intelRdt")));
        }
        if !self.net_devices.is_empty() {
            needs.push(((1, 0), format!("{at}.netDevices")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped as `nvidia-ctk cdi generate` writes it (document marker included).
    const NVIDIA_YAML: &str = r#"---
cdiVersion: 0.5.0
kind: nvidia.com/gpu
devices:
- name: "0"
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: GPU-fa4e0000-0000-0000-0000-000000000000
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
- name: all
  containerEdits:
    deviceNodes:
    - path: /dev/nvidia0
containerEdits:
  env:
  - NVIDIA_VISIBLE_DEVICES=void
  deviceNodes:
  - path: /dev/nvidiactl
  hooks:
  - hookName: createContainer
    path: /usr/bin/nvidia-ctk
    args: [nvidia-ctk, hook, update-ldcache, --folder, /usr/lib/x86_64-linux-gnu]
  mounts:
  - hostPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    containerPath: /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15
    options: [ro, nosuid, nodev, bind]
  - hostPath: /usr/lib/wsl/lib
    containerPath: /usr/lib/wsl/lib
    options: [ro, nosuid, nodev, rbind, rprivate]
"#;

    fn yaml(s: &str) -> Result<Spec, String> {
        parse(Path::new("x.yaml"), s.as_bytes())
    }

    #[test]
    fn nvidia_ctk_style_yaml_and_json() {
        let s = yaml(NVIDIA_YAML).unwrap();
        assert_eq!(s.devices.len(), 3);
        assert_eq!(s.container_edits.hooks[0].args[2], "update-ldcache");
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(parse(Path::new("x.json"), &json).unwrap(), s);
    }

    #[test]
    fn octal_file_modes() {
        let s = yaml(&NVIDIA_YAML.replacen(
            "  - path: /dev/nvidiactl",
            "  - path: /dev/nvidiactl\n    fileMode: 0640",
            1,
        ))
        .unwrap();
        assert_eq!(s.container_edits.device_nodes[0].file_mode, Some(0o640));
        let bad = NVIDIA_YAML.replacen(
            "  - path: /dev/nvidiactl",
            "  - path: /dev/nvidiactl\n    fileMode: rw",
            1,
        );
        assert!(yaml(&bad).unwrap_err().contains("not a file mode"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = |from: &str, to: &str| yaml(&NVIDIA_YAML.replacen(from, to, 1)).unwrap_err();
        assert!(e("0.5.0", "0.2.0").starts_with("cdiVersion: unsupported"));
        assert!(e("0.5.0", "five").starts_with("cdiVersion:"));
        assert!(e("nvidia.com/gpu", "nvidia.com").starts_with("kind: "));
        assert!(e("nvidia.com/gpu", "-nv.com/gpu").contains("invalid vendor"));
        assert!(
            e("name: \"0\"", "name: \"-0\"").starts_with("devices[0].name: invalid device name")
        );
        assert!(e("GPU-fa4e0000-0000-0000-0000-000000000000", "0")
            .starts_with("devices[1].name: device \"0\" is defined twice"));
        assert!(e("path: /dev/nvidia0", "path: dev/nvidia0")
            .starts_with("devices[0].containerEdits.deviceNodes[0].path: "));
        assert!(e("hookName: createContainer", "hookName: beforeAll")
            .starts_with("containerEdits.hooks[0].hookName: "));
        assert!(e("NVIDIA_VISIBLE_DEVICES=void", "NOVALUE").starts_with("containerEdits.env[0]"));
        // Unknown fields are typos, not silently ignored; serde names them.
        let u = e("containerPath:", "containerPat:");
        assert!(u.contains("containerPat"), "{u}");
        // A feature newer than the spec's version.
        let old = yaml(&NVIDIA_YAML.replacen("0.5.0", "0.3.0", 1).replacen(
            "  - path: /dev/nvidiactl",
            "  - path: /dev/nvidiactl\n    hostPath: /dev/nvidiactl",
            1,
        ))
        .unwrap_err();
        assert!(
            old.starts_with("containerEdits.deviceNodes[0].hostPath: needs cdiVersion 0.5.0"),
            "{old}"
        );
    }
}
