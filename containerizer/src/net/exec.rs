//! Running one plugin binary the way the CNI spec says: parameters in the environment, the
//! network configuration on stdin, a result or an error document on stdout, bounded in time.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::result::PluginError;

/// The CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Check,
    Del,
    Version,
    /// Spec 1.1: is the plugin ready for ADDs?
    Status,
    /// Spec 1.1: release whatever is not a valid attachment.
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Check => "CHECK",
            Command::Del => "DEL",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// Why a plugin run failed (the caller adds which network it was for).
#[derive(Debug)]
pub(crate) enum ExecFailure {
    NotFound,
    Spawn(std::io::Error),
    Timeout,
    Failed(PluginError),
}

/// Finds an executable called `plugin` in the search path.
pub fn find_plugin(plugin: &str, search: &[PathBuf]) -> Option<PathBuf> {
    search.iter().map(|d| d.join(plugin)).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// The environment a plugin gets (besides `PATH`).
pub(crate) struct Invocation<'a> {
    pub command: Command,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub args: &'a [(String, String)],
    pub search: &'a [PathBuf],
    pub timeout: Duration,
    /// DEL only: the caller deletes the netns right after (a hint for our plugins run
    /// in-process; never passed to a binary).
    pub netns_doomed: bool,
}

/// Set (to anything) to exec our own plugin binaries like any other instead of running their
/// code in-process.
pub const FORCE_EXEC_ENV: &str = "CAISSON_CNI_EXEC";

/// Our plugin behind `binary`, if it is one built from the same sources as the code linked
/// here and in-process runs are allowed (see [`caisson_cni_plugins::identity`]).
pub(crate) fn in_process_plugin(
    plugin: &str,
    binary: &Path,
) -> Option<&'static (dyn caisson_cni_plugins::skel::Plugin + Sync)> {
    if std::env::var_os(FORCE_EXEC_ENV).is_some() {
        return None;
    }
    caisson_cni_plugins::plugins::by_type(plugin)
        .filter(|_| caisson_cni_plugins::identity::is_ours(binary))
}

/// Runs our plugin's code for `binary` in this process: the same parameters, stdin, result
/// and error document as exec'ing it, minus the process. Spec-wise this is the binary's own
/// behaviour: it is the code the binary holds (same sources, checked by its identity note),
/// acting on the same state files under the same locks.
///
/// It runs on a thread of its own, started for it: the plugin `setns`es its thread for a
/// moment to open netlink sockets in the task's namespace, which must never happen on a thread
/// that a runtime pools. On timeout we stop waiting, but a thread cannot be killed: it finishes
/// (or stays blocked) on its own.
pub(crate) async fn run_in_process(
    plugin: &'static (dyn caisson_cni_plugins::skel::Plugin + Sync),
    binary: &Path,
    inv: &Invocation<'_>,
    stdin: &[u8],
) -> Result<Vec<u8>, ExecFailure> {
    use caisson_cni_plugins::skel;
    let attachment = matches!(inv.command, Command::Add | Command::Check | Command::Del);
    let some = |s: String| Some(s).filter(|_| attachment);
    let env = skel::Env {
        command: Some(inv.command.as_str().to_owned()),
        container_id: some(inv.container_id.to_owned()),
        netns: some(inv.netns.to_string_lossy().into_owned()),
        ifname: some(inv.ifname.to_owned()),
        args: some(
            inv.args
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(";"),
        ),
        path: std::env::join_paths(inv.search)
            .ok()
            .map(|p| p.to_string_lossy().into_owned()),
        exe: binary.to_path_buf(),
        netns_doomed: inv.netns_doomed && inv.command == Command::Del,
    };
    let stdin = stdin.to_vec();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cni-plugin".into())
        .spawn(move || {
            let _ = tx.send(skel::invoke(plugin, &env, stdin));
        })
        .map_err(ExecFailure::Spawn)?;
    let out = match tokio::time::timeout(inv.timeout, rx).await {
        Ok(Ok(out)) => out,
        // The thread died without an answer: the plugin panicked.
        Ok(Err(_)) => {
            return Err(ExecFailure::Failed(PluginError::from_output(
                b"",
                b"the plugin panicked (run in-process)",
                "panicked",
            )))
        }
        Err(_) => return Err(ExecFailure::Timeout),
    };
    if out.success {
        Ok(out.stdout)
    } else {
        Err(ExecFailure::Failed(PluginError::from_output(
            &out.stdout,
            b"",
            "exit status: 1",
        )))
    }
}

/// The configuration as a plugin's stdin: an in-memory file rather than a pipe, so that a
/// plugin that exits without reading it cannot raise SIGPIPE in us (the CLI keeps SIGPIPE's
/// default action, which would kill it), and no write has to be driven concurrently.
fn config_file(config: &[u8]) -> std::io::Result<Stdio> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::io::{Seek, Write};
    let fd = memfd_create("cni-config", MFdFlags::MFD_CLOEXEC).map_err(std::io::Error::from)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(config)?;
    f.rewind()?;
    Ok(Stdio::from(f))
}

/// Runs `binary` with `stdin` as its configuration and returns its stdout on success.
pub(crate) async fn run_plugin(
    binary: &Path,
    inv: &Invocation<'_>,
    stdin: &[u8],
) -> Result<Vec<u8>, ExecFailure> {
    let cni_path = std::env::join_paths(inv.search)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let args = inv
        .args
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";");
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", inv.command.as_str())
        .env("CNI_PATH", cni_path)
        .stdin(config_file(stdin).map_err(ExecFailure::Spawn)?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: on timeout the whole group (the plugin and whatever it started,
        // e.g. a delegated IPAM plugin) is killed, not just the direct child.
        .process_group(0)
        .kill_on_drop(true);
    crate::sys::kill_child_with_parent(&mut cmd);
    // VERSION, STATUS and GC concern the plugin or the network, not one attachment.
    if matches!(inv.command, Command::Add | Command::Check | Command::Del) {
        cmd.env("CNI_CONTAINERID", inv.container_id)
            .env("CNI_NETNS", inv.netns)
            .env("CNI_IFNAME", inv.ifname)
            .env("CNI_ARGS", args);
    }
    let child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ExecFailure::NotFound,
        _ => ExecFailure::Spawn(e),
    })?;
    let pid = child.id();
    let out = match tokio::time::timeout(inv.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(ExecFailure::Spawn(e)),
        Err(_) => {
            if let Some(pid) = pid {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(ExecFailure::Timeout);
        }
    };
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(ExecFailure::Failed(PluginError::from_output(
            &out.stdout,
            &out.stderr,
            &out.status.to_string(),
        )))
    }
}
