//! Running OCI hooks ([`super::spec::Hooks`]): each gets the OCI state JSON on stdin, exactly
//! its own environment, its output in the log of whoever runs it (the task's log for the
//! init's hooks, the supervisor's for the others), and is killed after its timeout.
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::spec::{Hook, TaskSpec};
use super::state::TaskDir;

/// The task's OCI bundle directory (holds `config.json`, for hooks that read it).
pub fn bundle_dir(td: &TaskDir) -> PathBuf {
    td.dir.join("bundle")
}

/// Writes `<task dir>/bundle/config.json`: the part of an OCI runtime config hooks read
/// (the root filesystem, the process, the hostname).
pub fn write_bundle(td: &TaskDir, spec: &TaskSpec) -> std::io::Result<()> {
    let dir = bundle_dir(td);
    std::fs::create_dir_all(&dir)?;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": spec.rootfs, "readonly": spec.readonly_rootfs },
        "process": {
            "args": spec.process.args,
            "env": spec.process.env,
            "cwd": spec.process.cwd,
        },
        "hostname": spec.hostname,
        "annotations": {},
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)
}

/// The OCI state of the task as hooks see it.
pub fn state_json(id: &str, status: &str, pid: Option<i32>, bundle: &Path) -> Vec<u8> {
    let mut v = serde_json::json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": status,
        "bundle": bundle,
        "annotations": {},
    });
    if let Some(pid) = pid {
        v["pid"] = pid.into();
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Runs the hooks of `point` in order; the first failure stops and is returned.
pub fn run_all(
    point: &str,
    hooks: &[Hook],
    state: &[u8],
    cwd: Option<&Path>,
) -> Result<(), String> {
    hooks.iter().try_for_each(|h| run(point, h, state, cwd))
}

/// Runs one hook and waits for it (at most its timeout).
pub fn run(point: &str, h: &Hook, state: &[u8], cwd: Option<&Path>) -> Result<(), String> {
    let what = format!("{point} hook {}", h.path.display());
    let mut cmd = Command::new(&h.path);
    if let Some((arg0, rest)) = h.args.split_first() {
        cmd.arg0(arg0).args(rest);
    }
    cmd.env_clear();
    for e in &h.env {
        if let Some((k, v)) = e.split_once('=') {
            cmd.env(k, v);
        }
    }
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    // Its stdout joins our stderr: a supervisor's stdout is the launcher's event pipe.
    let out = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .map_err(|e| format!("{what}: cannot run it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its state closes the pipe: not an error.
        let _ = stdin.write_all(state);
    }
    let status = match h.timeout_secs {
        None => child.wait().map_err(|e| format!("{what}: {e}"))?,
        Some(secs) => {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut nap = Duration::from_millis(1);
            loop {
                match child.try_wait().map_err(|e| format!("{what}: {e}"))? {
                    Some(st) => break st,
                    None if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("{what}: timed out after {secs} s"));
                    }
                    None => {
                        std::thread::sleep(nap);
                        nap = (nap * 2).min(Duration::from_millis(20));
                    }
                }
            }
        }
    };
    if !status.success() {
        return Err(format!("{what} failed: {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_env_args_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = Hook {
            path: "/bin/sh".into(),
            args: vec![
                "sh".into(),
                "-c".into(),
                format!("cat > {0}; echo \" $0 $X $HOME\" >> {0}", out.display()),
            ],
            env: vec!["X=1".into()],
            timeout_secs: None,
        };
        let state = state_json("t1", "creating", Some(7), Path::new("/b"));
        run("createContainer", &h, &state, None).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        let (json, rest) = got.split_once(" ").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!((v["id"].as_str(), v["pid"].as_i64()), (Some("t1"), Some(7)));
        assert_eq!(rest.trim_end(), "sh 1", "only the hook's own env");

        let fail = Hook {
            args: vec!["sh".into(), "-c".into(), "exit 3".into()],
            ..h.clone()
        };
        let e = run("poststop", &fail, b"{}", None).unwrap_err();
        assert!(
            e.contains("poststop hook /bin/sh failed") && e.contains('3'),
            "{e}"
        );
        let slow = Hook {
            args: vec!["sh".into(), "-c".into(), "sleep 5".into()],
            timeout_secs: Some(1),
            ..h.clone()
        };
        assert!(run("x", &slow, b"", None)
            .unwrap_err()
            .contains("timed out after 1 s"));
        let missing = Hook {
            path: "/nonexistent/hook".into(),
            ..h
        };
        let e = run("createRuntime", &missing, b"", None).unwrap_err();
        assert!(e.contains("/nonexistent/hook: cannot run it"), "{e}");
    }
}
