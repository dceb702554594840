//! CNI results (spec 0.4.0 and 1.0.0; both shapes parse into one type) and plugin errors.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A plugin's success result, as far as caisson reads it. The raw document is kept too: it is
/// what goes back to plugins as `prevResult`, untouched.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// The netns path for interfaces inside the task; empty for host-side ones.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpConfig {
    /// `"4"`/`"6"` in 0.4.0 results; gone in 1.0.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// CIDR form, e.g. `10.231.0.2/24`.
    pub address: ipnet::IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Route {
    pub dst: ipnet::IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// The addresses assigned to the interface called `ifname` inside the task (or, when the
    /// plugin did not say which interface an address is on, all of them).
    pub fn task_ips(&self, ifname: &str) -> Vec<&IpConfig> {
        self.ips
            .iter()
            .filter(
                |ip| match ip.interface.and_then(|i| self.interfaces.get(i)) {
                    Some(intf) => intf.name == ifname && !intf.sandbox.is_empty(),
                    None => true,
                },
            )
            .collect()
    }
}

/// The error document a plugin prints on failure (`code`, `msg`, `details`), plus what the
/// process itself told us.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PluginError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
    /// Exit status text when the process failed without a parseable error document.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The tail of the plugin's stderr, for errors that come with no JSON.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stderr: String,
}

impl PluginError {
    /// Builds the error from a failed plugin's stdout (the spec's error JSON), falling back to
    /// its stderr and exit status when stdout holds no error document.
    pub fn from_output(stdout: &[u8], stderr: &[u8], status: &str) -> Self {
        let stderr = tail(stderr);
        if let Ok(v) = serde_json::from_slice::<Value>(stdout) {
            if let Some(msg) = v.get("msg").and_then(Value::as_str) {
                return Self {
                    code: v.get("code").and_then(Value::as_u64).unwrap_or(0) as u32,
                    msg: msg.to_owned(),
                    details: v
                        .get("details")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    status: String::new(),
                    stderr,
                };
            }
        }
        let out = tail(stdout);
        Self {
            code: 0,
            msg: if out.is_empty() {
                "plugin failed without an error document".into()
            } else {
                out
            },
            details: String::new(),
            status: status.to_owned(),
            stderr,
        }
    }
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(2000);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_owned()
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.code != 0 {
            write!(f, "[code {}] ", self.code)?;
        }
        f.write_str(&self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        if !self.status.is_empty() {
            write!(f, " ({})", self.status)?;
        }
        // stderr matters when there was no proper error document; with one it is noise.
        if !self.stderr.is_empty() && (self.code == 0 || !self.status.is_empty()) {
            write!(f, "; stderr: {}", self.stderr)?;
        }
        Ok(())
    }
}

/// A `VERSION` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionInfo {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions", default)]
    pub supported_versions: Vec<String>,
}

/// Parses `x.y.z` (missing parts are 0) for ordering spec versions.
pub fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// Whether `v` is at least `min` (both `x.y.z`).
pub fn version_at_least(v: &str, min: &str) -> bool {
    parse_version(v) >= parse_version(min)
}
