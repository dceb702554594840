//! The configuration and result documents (spec 0.3.x, 0.4.0, 1.0.0).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The part of the network configuration every plugin reads.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Map<String, Value>,
    #[serde(default)]
    pub ipam: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// A success result in the current (1.0.0) shape; [`CniResult::to_json`] writes it in the
/// version the caller asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Value,
}

impl CniResult {
    /// Reads a result of any supported version (0.4.0's `version` on IPs is ignored).
    pub fn from_value(v: &Value) -> Result<Self, serde_json::Error> {
        let mut r: CniResult = serde_json::from_value(v.clone())?;
        if r.dns.is_null() {
            r.dns = json!({});
        }
        Ok(r)
    }

    /// The document for `cni_version`: 0.3.x/0.4.0 carry `"version": "4"|"6"` on each IP.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = serde_json::to_value(self).expect("result serializes");
        let obj = v.as_object_mut().expect("object");
        if self.interfaces.is_empty() {
            obj.remove("interfaces");
        }
        if self.routes.is_empty() {
            obj.remove("routes");
        }
        if self.dns.is_null() {
            obj.insert("dns".into(), json!({}));
        }
        if cni_version.starts_with("0.") {
            if let Some(ips) = obj.get_mut("ips").and_then(Value::as_array_mut) {
                for ip in ips {
                    let four = ip["address"].as_str().is_some_and(|a| !a.contains(':'));
                    ip["version"] = json!(if four { "4" } else { "6" });
                }
            }
        }
        obj.insert("cniVersion".into(), json!(cni_version));
        v
    }
}
