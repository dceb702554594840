//! Delegating to an IPAM plugin (the `ipam.type` binary in `CNI_PATH`), as the reference
//! plugins do: same environment, same stdin.

use std::io::Write;
use std::process::{Command as Proc, Stdio};

use serde_json::Value;

use crate::skel::{code, Args, CniError, Command};
use crate::types::CniResult;

fn ipam_type(args: &Args) -> Result<String, CniError> {
    args.conf
        .ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && !t.contains('/'))
        .map(str::to_owned)
        .ok_or_else(|| CniError::config("IPAM config missing 'ipam.type'"))
}

/// Set to run `host-local` as a separate binary even though it is built in.
pub const FORCE_EXEC_ENV: &str = "CAISSON_CNI_IPAM_EXEC";

fn exec(args: &Args, command: &str) -> Result<Vec<u8>, CniError> {
    let ty = ipam_type(args)?;
    let bin = args
        .path
        .iter()
        .map(|d| d.join(&ty))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {ty:?} not found in CNI_PATH"),
            )
        })?;
    // The spec has us exec the IPAM plugin found in CNI_PATH. When that binary is our own
    // host-local built from the same sources (its identity note), it would run the code
    // linked here, on the same store (the reference plugin's layout) under the same lock:
    // running it in-process is the same thing without a fork+exec on every ADD and DEL. Any
    // other binary, including another build of ours, is exec'd.
    if ty == "host-local"
        && std::env::var_os(FORCE_EXEC_ENV).is_none()
        && crate::identity::is_ours(&bin)
    {
        return match command {
            "ADD" => crate::hostlocal::add(args).map(|v| serde_json::to_vec(&v).expect("JSON")),
            "DEL" => crate::hostlocal::del(args).map(|_| Vec::new()),
            "GC" => crate::hostlocal::gc(args).map(|_| Vec::new()),
            _ => crate::hostlocal::check(args).map(|_| Vec::new()),
        }
        .map_err(|e| CniError {
            msg: format!("IPAM host-local: {}", e.msg),
            ..e
        });
    }
    let cni_args = args
        .args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";");
    // Our parameters, spelled out: run in-process by a runtime, we have no CNI_* environment
    // to hand down.
    let mut child = Proc::new(&bin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &args.container_id)
        .env("CNI_NETNS", &args.netns)
        .env("CNI_IFNAME", &args.ifname)
        .env("CNI_ARGS", cni_args)
        .env(
            "CNI_PATH",
            std::env::join_paths(&args.path).unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::io(format!("starting IPAM plugin {ty}"), e))?;
    // Our stdin is small (a network config), far below a pipe's buffer: no deadlock.
    let _ = child.stdin.take().expect("piped").write_all(&args.stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::io(format!("running IPAM plugin {ty}"), e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    // Pass the IPAM plugin's own error on, saying where it came from.
    match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) if v.get("msg").is_some() => Err(CniError {
            code: v.get("code").and_then(Value::as_u64).unwrap_or(0) as u32,
            msg: format!("IPAM {ty}: {}", v["msg"].as_str().unwrap_or("")),
            details: v
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        }),
        _ => Err(CniError::io(
            format!("IPAM plugin {ty} failed ({})", out.status),
            String::from_utf8_lossy(&out.stdout),
        )),
    }
}

/// IPAM ADD: the addresses, routes and DNS for the interface.
pub fn add(args: &Args) -> Result<CniResult, CniError> {
    let out = exec(args, "ADD")?;
    let v: Value = serde_json::from_slice(&out)
        .map_err(|e| CniError::new(code::DECODE, "decoding the IPAM result").with_details(e))?;
    let r = CniResult::from_value(&v)
        .map_err(|e| CniError::new(code::DECODE, "decoding the IPAM result").with_details(e))?;
    if r.ips.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "IPAM plugin returned no IP configuration",
        ));
    }
    Ok(r)
}

/// IPAM DEL (idempotent on the IPAM side).
pub fn del(args: &Args) -> Result<(), CniError> {
    exec(args, "DEL").map(|_| ())
}

/// IPAM GC (spec 1.1).
pub fn gc(args: &Args) -> Result<(), CniError> {
    exec(args, "GC").map(|_| ())
}

/// IPAM CHECK.
pub fn check(args: &Args) -> Result<(), CniError> {
    debug_assert_eq!(args.command, Command::Check);
    exec(args, "CHECK").map(|_| ())
}
