//! `caisson exec`: a process started in a running task, as podman's exec: in the task's
//! namespaces (user, mount, pid, uts, ipc, net, cgroup) and cgroups, with its security context
//! (docker's capabilities, `no_new_privs`, the seccomp filter), its environment and user unless
//! overridden.
//!
//! The CLI execs `caisson-shim --exec TASK_DIR SPEC` in its own place (stdio and signals then
//! need no relay): a single-threaded process, which joining a mount or user namespace requires.
//! It joins the task's cgroups and namespaces and forks the process (a pid namespace applies to
//! children), forwards the usual termination signals to it and exits with its status (128 +
//! signal when killed; 125/126/127 for a failure of its own, command not executable, not found).
use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::child::{self, ChildError};
use super::spec::{Process, TaskSpec};
use super::state::{Status, TaskDir, TaskState};
use crate::sys::launch::{self as sys, CloneResult};

/// The termination signals a foreground `run` or `exec` passes on to its task or process
/// (podman's --sig-proxy).
pub const RELAYED_SIGNALS: [Signal; 6] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// The argument that makes `caisson-shim` run an exec: `--exec TASK_DIR SPEC_JSON`.
pub const EXEC_ARG: &str = "--exec";

/// What to run in the task; unset fields are the task's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    pub args: Vec<String>,
    /// `KEY=VALUE`, replacing the task's value of KEY.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A terminal for the process (`-t`), made in the task's devpts with this initial size; its
    /// master goes to the launcher over the socket of [`spawn_with_terminal`].
    #[serde(default)]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty_size: Option<(u16, u16)>,
}

/// Starts `shim --exec DIR SPEC` for an `-t` exec: returns it and the master of the process's
/// terminal, to relay (the helper cannot: having joined the task's pid namespace, it may start
/// no thread). No master: the helper failed before the terminal (it said why on stderr).
#[allow(clippy::type_complexity)]
pub fn spawn_with_terminal(
    shim: &Path,
    dir: &Path,
    spec: &ExecSpec,
) -> std::io::Result<(std::process::Child, std::io::Result<OwnedFd>)> {
    use std::os::fd::AsRawFd;
    let json = serde_json::to_string(spec)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    // Inherited (not close-on-exec) by this one spawn.
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    let child = super::guard::shim_command(shim)
        .arg(EXEC_ARG)
        .arg(dir)
        .arg(json)
        .env(super::console::FD_ENV, theirs.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .spawn()?;
    drop(theirs);
    let master = crate::sys::term::recv_fd(ours.as_fd());
    Ok((child, master))
}

/// Runs `spec` in the task whose records are in `dir`; returns the exit code.
pub fn main(dir: &Path, spec: &str) -> i32 {
    match run(dir, spec) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "Error: {}", e.message);
            e.code
        }
    }
}

fn fail(code: i32, message: impl Into<String>) -> ChildError {
    ChildError {
        code,
        message: message.into(),
    }
}

/// The task's process with `x` applied.
fn process_for(task: &TaskSpec, x: &ExecSpec) -> Process {
    let mut p = task.process.clone();
    p.args = x.args.clone();
    for e in &x.env {
        let key = e.split('=').next().unwrap_or_default();
        p.env.retain(|old| old.split('=').next() != Some(key));
        p.env.push(e.clone());
    }
    if let Some(u) = &x.user {
        p.user = u.clone();
    }
    if let Some(c) = &x.cwd {
        p.cwd = c.clone();
    }
    p
}

fn run(dir: &Path, spec: &str) -> Result<i32, ChildError> {
    let x: ExecSpec =
        serde_json::from_str(spec).map_err(|e| fail(125, format!("the exec spec: {e}")))?;
    // `-t`: where the child that makes the terminal sends its master.
    let launcher = match std::env::var(super::console::FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(fd) if x.tty => Some(std::os::unix::net::UnixStream::from(
            crate::sys::term::take_inherited_fd(fd)
                .map_err(|e| fail(125, format!("the console descriptor {fd}: {e}")))?,
        )),
        _ if x.tty => return Err(fail(125, "-t without a console")),
        _ => None,
    };
    if x.args.is_empty() {
        return Err(fail(125, "no command given"));
    }
    let td = TaskDir::new(dir.to_path_buf());
    let cfg = td
        .read_config()
        .map_err(|e| fail(125, format!("reading {}: {e}", td.config().display())))?;
    let task = &cfg.spec;
    if task.wasm.is_some() {
        return Err(fail(125, "exec into a Wasm task is not supported"));
    }
    let state = td
        .read_state()
        .map_err(|e| fail(125, format!("reading the task's state: {e}")))?;
    let pid = running_init(&state).ok_or_else(|| {
        fail(
            125,
            format!(
                "container {} is not running",
                task.id.get(..12).unwrap_or(&task.id)
            ),
        )
    })?;
    let process = process_for(task, &x);
    if !process.cwd.starts_with('/') {
        return Err(fail(
            125,
            format!("the working directory {:?} is not absolute", process.cwd),
        ));
    }

    // Everything of the task's is opened before the first setns: /proc is ours until then.
    let mut kinds = vec![
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    // Last: with the host's root we may join the others; inside it, its root may.
    if task.userns.is_some() {
        kinds.push(("user", CloneFlags::CLONE_NEWUSER));
    }
    let mut namespaces: Vec<(OwnedFd, CloneFlags, &str)> = vec![];
    for (name, flag) in kinds {
        let theirs = format!("/proc/{pid}/ns/{name}");
        // One we share (e.g. `--network host`) is left as it is.
        if fs::read_link(&theirs).ok() == fs::read_link(format!("/proc/self/ns/{name}")).ok() {
            continue;
        }
        let f = File::open(&theirs).map_err(|e| fail(125, format!("opening {theirs}: {e}")))?;
        namespaces.push((OwnedFd::from(f), flag, name));
    }
    // The task's cgroups: its limits and accounting cover what runs here too.
    for cg in &state.cgroup_paths {
        fs::write(cg.join("cgroup.procs"), "0")
            .map_err(|e| fail(125, format!("joining cgroup {}: {e}", cg.display())))?;
    }
    for (fd, flag, name) in &namespaces {
        nix::sched::setns(fd.as_fd(), *flag)
            .map_err(|e| fail(125, format!("joining the task's {name} namespace: {e}")))?;
    }
    drop(namespaces);

    // The signals we pass on, and the child's end, arrive here one at a time.
    let mut relayed = SigSet::empty();
    for s in RELAYED_SIGNALS.into_iter().chain([Signal::SIGCHLD]) {
        relayed.add(s);
    }
    relayed
        .thread_block()
        .map_err(|e| fail(125, format!("blocking signals: {e}")))?;
    let child = match sys::clone_fork(0, None) {
        Ok(CloneResult::Child) => {
            let terminal = launcher.map(OwnedFd::from);
            let code = match become_process(task, &process, terminal.as_ref(), x.tty_size) {
                Ok(never) => match never {},
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "Error: {}", e.message);
                    e.code
                }
            };
            sys::exit_now(code)
        }
        Ok(CloneResult::Parent(pid)) => Pid::from_raw(pid),
        Err(e) => return Err(fail(125, format!("fork: {e}"))),
    };
    drop(launcher);
    loop {
        match relayed.wait() {
            Ok(Signal::SIGCHLD) => match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                Ok(_) => {}
                Err(e) => return Err(fail(125, format!("waiting for the process: {e}"))),
            },
            Ok(sig) => {
                let _ = nix::sys::signal::kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

/// The task's init pid if the task runs and the pid is still its supervisor's child (not a
/// reused pid).
fn running_init(state: &TaskState) -> Option<i32> {
    if state.status != Status::Running {
        return None;
    }
    let (pid, shim) = (state.pid?, state.shim_pid?);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command (which may hold spaces and parentheses): state, then ppid.
    let ppid: i32 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    (ppid == shim && super::state::process_alive(shim, state.shim_start_ticks)).then_some(pid)
}

/// In the fork, inside the task's namespaces: becomes the task's process as its init did
/// (capabilities, `no_new_privs`, seccomp, user) and execs `process`.
fn become_process(
    task: &TaskSpec,
    process: &Process,
    terminal: Option<&OwnedFd>,
    size: Option<(u16, u16)>,
) -> Result<child::Never, ChildError> {
    nix::unistd::chdir("/").map_err(|e| fail(125, format!("chdir /: {e}")))?;
    if let Some(sock) = terminal {
        // A session of its own, whose controlling terminal is made in the task's devpts.
        nix::unistd::setsid().map_err(|e| fail(125, format!("setsid: {e}")))?;
        let size = size.map(|(rows, cols)| crate::sys::term::WinSize { rows, cols });
        super::console::make_task_terminal(sock, size)
            .map_err(|e| fail(125, format!("making the terminal: {e}")))?;
    }
    let mut caps: u64 = child::DEFAULT_CAPS.iter().fold(0, |m, c| m | (1u64 << c));
    if task.devices.allow.is_empty() {
        caps &= !(1u64 << child::CAP_MKNOD);
    }
    if task.userns.is_some() {
        // Joined as the host's root, unmapped there: become the namespace's root (keeping the
        // capabilities), as the task's init did.
        let root = nix::unistd::Uid::from_raw(0);
        nix::unistd::setresuid(root, root, root)
            .map_err(|e| fail(125, format!("becoming uid 0 of the user namespace: {e}")))?;
    }
    let x = child::prepare_exec(process, &task.hostname, &task.additional_gids)?;
    let seccomp = (!task.seccomp_unconfined).then(crate::sys::seccomp::cached_default_filter);
    child::become_and_exec(x, process, caps, true, seccomp, || Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_overrides_replace_the_tasks_values() {
        let task = TaskSpec {
            process: Process {
                args: vec!["sleep".into(), "9".into()],
                env: vec!["PATH=/bin".into(), "A=1".into(), "B=2".into()],
                cwd: "/srv".into(),
                user: "app".into(),
            },
            ..Default::default()
        };
        let same = process_for(
            &task,
            &ExecSpec {
                args: vec!["id".into()],
                ..Default::default()
            },
        );
        assert_eq!(same.args, vec!["id"]);
        assert_eq!((same.cwd.as_str(), same.user.as_str()), ("/srv", "app"));
        assert_eq!(same.env, task.process.env);
        let p = process_for(
            &task,
            &ExecSpec {
                args: vec!["env".into()],
                env: vec!["A=3".into(), "C=4".into()],
                user: Some("0".into()),
                cwd: Some("/".into()),
                ..Default::default()
            },
        );
        assert_eq!(p.env, vec!["PATH=/bin", "B=2", "A=3", "C=4"]);
        assert_eq!((p.cwd.as_str(), p.user.as_str()), ("/", "0"));
    }
}
