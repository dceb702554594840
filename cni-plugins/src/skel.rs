//! The plugin skeleton: environment and stdin in, result or error document out.

use std::io::{Read, Write};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::types::NetConf;

/// Versions our plugins speak.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A CNI error document (spec "Error" section); codes 1-99 are the spec's, 100+ ours.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}{}", if .details.is_empty() { String::new() } else { format!(": {}", .details) })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Spec error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    /// Plugin-specific: an address range has no free address.
    pub const NO_ADDRESSES: u32 = 100;
    /// Plugin-specific: a netlink operation failed.
    pub const NETLINK: u32 = 101;
    /// Plugin-specific: a host port is already forwarded elsewhere.
    pub const PORT_CONFLICT: u32 = 102;
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, d: impl std::fmt::Display) -> Self {
        self.details = d.to_string();
        self
    }

    pub fn io(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        Self::new(code::IO, what).with_details(e)
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Check,
    Del,
    /// Spec 1.1: ready for ADDs?
    Status,
    /// Spec 1.1: release what does not belong to `cni.dev/valid-attachments`.
    Gc,
}

/// One invocation's parameters.
#[derive(Debug, Clone)]
pub struct Args {
    pub command: Command,
    pub container_id: String,
    /// Empty on DEL when the runtime no longer has a netns.
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as pairs.
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
    /// The raw stdin (handed on to delegated plugins unchanged).
    pub stdin: Vec<u8>,
    pub conf: NetConf,
}

impl Args {
    /// The `cni.dev/valid-attachments` of a GC request, as (container id, ifname).
    pub fn valid_attachments(&self) -> Vec<(String, String)> {
        serde_json::from_slice::<Value>(&self.stdin)
            .ok()
            .and_then(|v| {
                v.get("cni.dev/valid-attachments")
                    .and_then(Value::as_array)
                    .cloned()
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|a| {
                Some((
                    a.get("containerID")?.as_str()?.to_owned(),
                    a.get("ifname")?.as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    /// A `CNI_ARGS` value by key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The plugin's handlers; ADD returns the result document, CHECK and DEL nothing.
pub trait Plugin {
    fn add(&self, args: &Args) -> Result<Value, CniError>;
    fn check(&self, args: &Args) -> Result<(), CniError>;
    fn del(&self, args: &Args) -> Result<(), CniError>;
    /// Spec 1.1 STATUS; our plugins need nothing beyond the kernel, so: ready.
    fn status(&self, _args: &Args) -> Result<(), CniError> {
        Ok(())
    }
    /// Spec 1.1 GC; nothing to collect unless the plugin keeps state.
    fn gc(&self, _args: &Args) -> Result<(), CniError> {
        Ok(())
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

fn version_ok(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// Runs the plugin for this process and exits with 0 (success) or 1 (error document printed).
pub fn run(plugin: &dyn Plugin) -> ! {
    let mut version = "1.0.0".to_owned();
    let res = dispatch(plugin, &mut version);
    let mut out = std::io::stdout().lock();
    match res {
        Ok(Some(v)) => {
            let _ = serde_json::to_writer(&mut out, &v);
            let _ = out.flush();
            std::process::exit(0)
        }
        Ok(None) => std::process::exit(0),
        Err(e) => {
            let mut doc = json!({ "cniVersion": version, "code": e.code, "msg": e.msg });
            if !e.details.is_empty() {
                doc["details"] = json!(e.details);
            }
            let _ = serde_json::to_writer(&mut out, &doc);
            let _ = out.flush();
            std::process::exit(1)
        }
    }
}

fn dispatch(plugin: &dyn Plugin, version: &mut String) -> Result<Option<Value>, CniError> {
    let command = env("CNI_COMMAND").ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "required env variable CNI_COMMAND missing",
        )
    })?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(|e| CniError::io("reading stdin", e))?;
    if command == "VERSION" {
        // The request may name a version; we answer with it when we speak it.
        let asked = serde_json::from_slice::<Value>(&stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .filter(|v| version_ok(v))
            .unwrap_or_else(|| "1.0.0".into());
        return Ok(Some(
            json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS }),
        ));
    }
    let command = match command.as_str() {
        "ADD" => Command::Add,
        "CHECK" => Command::Check,
        "DEL" => Command::Del,
        "STATUS" => Command::Status,
        "GC" => Command::Gc,
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
            ))
        }
    };
    let conf: NetConf = serde_json::from_slice(&stdin).map_err(|e| {
        CniError::new(code::DECODE, "decoding network configuration").with_details(e)
    })?;
    if !conf.cni_version.is_empty() {
        *version = conf.cni_version.clone();
    }
    if !version_ok(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "incompatible CNI versions: config is {:?}, plugin supports {SUPPORTED_VERSIONS:?}",
                conf.cni_version
            ),
        ));
    }
    if matches!(command, Command::Status | Command::Gc) && conf.cni_version != "1.1.0" {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "STATUS and GC need cniVersion 1.1.0, config has {}",
                conf.cni_version
            ),
        ));
    }
    if command == Command::Check && conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CHECK is not supported for cniVersion {}", conf.cni_version),
        ));
    }
    let mut missing = Vec::new();
    let mut need = |name: &'static str, required: bool| -> String {
        let v = env(name);
        if v.is_none() && required {
            missing.push(name);
        }
        v.unwrap_or_default()
    };
    let per_attachment = matches!(command, Command::Add | Command::Check | Command::Del);
    let container_id = need(
        "CNI_CONTAINERID",
        matches!(command, Command::Add | Command::Check),
    );
    let netns = need(
        "CNI_NETNS",
        matches!(command, Command::Add | Command::Check),
    );
    let ifname = need("CNI_IFNAME", per_attachment);
    let path = need("CNI_PATH", true);
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables {missing:?} missing"),
        ));
    }
    let args = env("CNI_ARGS")
        .unwrap_or_default()
        .split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => Err(CniError::new(
                code::INVALID_ENV,
                format!("invalid CNI_ARGS pair {kv:?}"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let args = Args {
        command,
        container_id,
        netns,
        ifname,
        args,
        path: std::env::split_paths(&path).collect(),
        stdin,
        conf,
    };
    match command {
        Command::Add => plugin.add(&args).map(Some),
        Command::Check => plugin.check(&args).map(|_| None),
        Command::Del => plugin.del(&args).map(|_| None),
        Command::Status => plugin.status(&args).map(|_| None),
        Command::Gc => plugin.gc(&args).map(|_| None),
    }
}
