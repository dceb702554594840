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
    /// The plugin's own binary, for detached helpers (`/proc/self/exe` when run as a binary).
    pub exe: PathBuf,
    /// Set only by a runtime calling in-process ([`invoke`]) when it deletes the netns right
    /// after this DEL: interfaces inside it then go with it (see the bridge's DEL).
    pub netns_doomed: bool,
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

/// An invocation's parameters: the `CNI_*` variables of a plugin process, or what a runtime
/// calling in-process passes (the same values it would put in the environment).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: Option<String>,
    /// `CNI_PATH`.
    pub path: Option<String>,
    /// See [`Args::exe`].
    pub exe: PathBuf,
    /// See [`Args::netns_doomed`].
    pub netns_doomed: bool,
}

impl Env {
    /// This process's environment (a plugin binary). Empty values count as unset.
    pub fn from_process() -> Self {
        let env = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
        Self {
            command: env("CNI_COMMAND"),
            container_id: env("CNI_CONTAINERID"),
            netns: env("CNI_NETNS"),
            ifname: env("CNI_IFNAME"),
            args: env("CNI_ARGS"),
            path: env("CNI_PATH"),
            exe: "/proc/self/exe".into(),
            netns_doomed: false,
        }
    }
}

fn version_ok(v: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&v)
}

/// What a plugin binary would have done: its exit status (true: 0) and its stdout.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub success: bool,
    pub stdout: Vec<u8>,
}

/// Runs the plugin for this process and exits with 0 (success) or 1 (error document printed).
pub fn run(plugin: &dyn Plugin) -> ! {
    let env = Env::from_process();
    let mut stdin = Vec::new();
    // Without a command there is nothing to read the configuration for.
    let read = match env.command {
        Some(_) => std::io::stdin().read_to_end(&mut stdin).map(|_| ()),
        None => Ok(()),
    };
    let out = match read {
        Ok(()) => invoke(plugin, &env, stdin),
        Err(e) => error_outcome("1.0.0", CniError::io("reading stdin", e)),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out.stdout);
    let _ = stdout.flush();
    std::process::exit(if out.success { 0 } else { 1 })
}

/// Runs one invocation in this process, with exactly the checks, result and error document of
/// the binary ([`run`] is this over the process's environment). The caller must not be on a
/// thread that others share: the netlink helpers `setns` the calling thread for a moment.
pub fn invoke(plugin: &dyn Plugin, env: &Env, stdin: Vec<u8>) -> Outcome {
    let mut version = "1.0.0".to_owned();
    match dispatch(plugin, env, stdin, &mut version) {
        Ok(v) => Outcome {
            success: true,
            stdout: v
                .map(|v| serde_json::to_vec(&v).expect("JSON value serializes"))
                .unwrap_or_default(),
        },
        Err(e) => error_outcome(&version, e),
    }
}

fn error_outcome(version: &str, e: CniError) -> Outcome {
    let mut doc = json!({ "cniVersion": version, "code": e.code, "msg": e.msg });
    if !e.details.is_empty() {
        doc["details"] = json!(e.details);
    }
    Outcome {
        success: false,
        stdout: serde_json::to_vec(&doc).expect("JSON value serializes"),
    }
}

fn dispatch(
    plugin: &dyn Plugin,
    env: &Env,
    stdin: Vec<u8>,
    version: &mut String,
) -> Result<Option<Value>, CniError> {
    let command = env.command.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_ENV,
            "required env variable CNI_COMMAND missing",
        )
    })?;
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
    let mut need = |name: &'static str, v: &Option<String>, required: bool| -> String {
        let v = v.clone().filter(|s| !s.is_empty());
        if v.is_none() && required {
            missing.push(name);
        }
        v.unwrap_or_default()
    };
    let per_attachment = matches!(command, Command::Add | Command::Check | Command::Del);
    let container_id = need(
        "CNI_CONTAINERID",
        &env.container_id,
        matches!(command, Command::Add | Command::Check),
    );
    let netns = need(
        "CNI_NETNS",
        &env.netns,
        matches!(command, Command::Add | Command::Check),
    );
    let ifname = need("CNI_IFNAME", &env.ifname, per_attachment);
    let path = need("CNI_PATH", &env.path, true);
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables {missing:?} missing"),
        ));
    }
    let args = env
        .args
        .clone()
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
        exe: env.exe.clone(),
        netns_doomed: env.netns_doomed,
    };
    match command {
        Command::Add => plugin.add(&args).map(Some),
        Command::Check => plugin.check(&args).map(|_| None),
        Command::Del => plugin.del(&args).map(|_| None),
        Command::Status => plugin.status(&args).map(|_| None),
        Command::Gc => plugin.gc(&args).map(|_| None),
    }
}
