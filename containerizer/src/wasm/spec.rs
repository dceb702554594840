//! A Wasm task described as JSON: what the `caisson-wasm` host process is given, and what a
//! supervisor can persist next to the task's state.
use super::task::{Limits, Preopen, Stdio, TaskSpec};
use super::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// A serializable [`TaskSpec`] plus the module path. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// The `.wasm` or `.wat` file.
    pub module: PathBuf,
    /// The full argv; empty means `[<module file name>]`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries, as in an OCI runtime spec.
    pub env: Vec<String>,
    pub preopens: Vec<Preopen>,
    /// Files for the standard streams; absent means closed stdin / discarded output.
    pub stdin: Option<PathBuf>,
    pub stdout: Option<PathBuf>,
    pub stderr: Option<PathBuf>,
    pub limits: Limits,
    pub timeout_ms: Option<u64>,
    /// Serve a `wasi:http/proxy` component on this address (`IP:PORT`) instead of running a
    /// command: a fresh instance per request, until the host process is stopped.
    pub http: Option<String>,
}

impl RunSpec {
    /// The argv the guest sees.
    pub fn argv(&self) -> Vec<String> {
        if self.argv.is_empty() {
            let name = self
                .module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.module.display().to_string());
            vec![name]
        } else {
            self.argv.clone()
        }
    }

    /// The task to run (stdio opened by the engine when the task starts).
    pub fn to_task(&self) -> Result<TaskSpec> {
        let env = self
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| Error::Spec(format!("env entry {kv:?} is not KEY=VALUE")))
            })
            .collect::<Result<Vec<_>>>()?;
        let stdio = |p: &Option<PathBuf>| p.clone().map_or(Stdio::Null, Stdio::Path);
        Ok(TaskSpec {
            argv: self.argv(),
            env,
            preopens: self.preopens.clone(),
            stdin: stdio(&self.stdin),
            stdout: stdio(&self.stdout),
            stderr: stdio(&self.stderr),
            limits: self.limits,
            timeout: self.timeout_ms.map(Duration::from_millis),
            kill: None,
        })
    }
}

/// Parses a memory size as podman does: bytes, or a number with a `b`, `k`, `m` or `g` suffix
/// (powers of 1024, case-insensitive).
pub fn parse_memory(s: &str) -> Result<u64> {
    const UNITS: &[(&str, u64)] = &[
        ("kb", 1 << 10),
        ("k", 1 << 10),
        ("mb", 1 << 20),
        ("m", 1 << 20),
        ("gb", 1 << 30),
        ("g", 1 << 30),
        ("b", 1),
    ];
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = UNITS
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n, *m)))
        .unwrap_or((&t, 1));
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::Spec(format!("invalid memory size {s:?} (e.g. 64m, 1g, 65536)")))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(Error::Spec(format!("invalid memory size {s:?}")));
    }
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("65536").unwrap(), 65536);
        assert_eq!(parse_memory("64k").unwrap(), 64 << 10);
        assert_eq!(parse_memory("64KB").unwrap(), 64 << 10);
        assert_eq!(parse_memory("2m").unwrap(), 2 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5m").unwrap(), 3 << 19);
        assert_eq!(parse_memory("100b").unwrap(), 100);
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("-1m").is_err());
    }

    #[test]
    fn spec_json() {
        let s: RunSpec = serde_json::from_str(
            r#"{"module":"/m/hello.wasm","env":["A=1"],"preopens":[{"host":"/tmp","guest":"/t","read_only":true}],
                "limits":{"memory_bytes":1048576,"table_elements":null},"timeout_ms":500}"#,
        )
        .unwrap();
        assert_eq!(s.argv(), vec!["hello.wasm"]);
        let t = s.to_task().unwrap();
        assert_eq!(t.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(t.timeout, Some(Duration::from_millis(500)));
        assert!(serde_json::from_str::<RunSpec>(r#"{"modul":"x"}"#).is_err());
        let bad = RunSpec {
            env: vec!["NOEQUALS".into()],
            ..RunSpec::default()
        };
        assert!(bad.to_task().is_err());
    }
}
