//! Wasm tasks under the same supervisor, records and verbs as native ones.
//!
//! A Wasm task is a [`TaskSpec`] whose `wasm` field holds a [`RunSpec`] (build it with
//! [`wasm_task`]). [`super::Runtime::launch`] records it under `<root>/containers/<id>/` like any
//! task and starts `caisson-shim`, which sees the `wasm` field and, instead of building
//! namespaces and a root filesystem, forks a child born in (v2) or moved into (v1) the task's
//! cgroup that execs the `caisson-wasm` host process on the task's spec. The host process
//! writes the guest's stdout/stderr into the task's log files and its [`ExitStatus`] into
//! `wasm-status.json`; the shim reaps it and records exit code and reason in `state.json`
//! (a trap's message, "memory limit", "timeout"). So `ps`, `logs`, `kill`, `stop`, `rm`,
//! `inspect` and `wait` work unchanged, CPU time is the cgroup's, and the task survives the
//! launcher's death exactly as a native one does.
//!
//! ```no_run
//! use containerizer::launch::{wasm::wasm_task, Runtime};
//! use containerizer::wasm::RunSpec;
//! # fn f() -> Result<(), containerizer::launch::LaunchError> {
//! let rt = Runtime::new("/var/lib/caisson");
//! let mut task = rt.launch(wasm_task(RunSpec {
//!     module: "/srv/hello.wasm".into(),
//!     argv: vec!["hello.wasm".into(), "world".into()],
//!     ..Default::default()
//! }))?;
//! let state = task.wait()?; // exit code, reason (trap message, memory limit, timeout)
//! task.finish();
//! # let _ = state; Ok(()) }
//! ```
//!
//! By default the guest sees the task's sandbox directory as `/` (as a native task sees its
//! root filesystem); further preopens come from [`RunSpec::preopens`]. The compile cache is
//! `<root>/cache/wasm`, shared by every task of the root, so a module is compiled once.
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::spec::{Process, TaskSpec};
use super::state::{now_ms, Status, TaskConfig, TaskDir, TaskState, Timings};
use crate::cgroups::TaskCgroup;
use crate::sys::launch::{self as sys, CloneResult};
use crate::wasm::{Engine, ExitStatus, Preopen, Program, RunSpec};

/// Name of the Wasm host process binary, looked up next to the supervisor (or `$CAISSON_WASM`).
pub const RUNNER_NAME: &str = "caisson-wasm";
/// Where the host process writes the task's [`ExitStatus`] (JSON), in the task directory.
pub const STATUS_FILE: &str = "wasm-status.json";
/// The host process's spec (a [`RunSpec`] with the sandbox preopen added), in the task directory.
pub const SPEC_FILE: &str = "wasm.json";

/// A task spec for the Wasm program `run`: `process.args` mirrors the guest's argv (what `ps`
/// shows) and `image` names the module unless the caller sets it (e.g. to an image reference).
/// Set `id`, `name`, `limits` (CPU, and `memory` for the cgroup), `auto_remove` as for a native
/// task; Wasm memory limits go in `run.limits`.
pub fn wasm_task(run: RunSpec) -> TaskSpec {
    TaskSpec {
        image: run.module.display().to_string(),
        process: Process {
            args: run.argv(),
            env: run.env.clone(),
            cwd: "/".into(),
            user: String::new(),
        },
        wasm: Some(run),
        ..Default::default()
    }
}

/// The compile cache of the tasks of the state root `root`.
pub fn cache_dir(root: &Path) -> PathBuf {
    root.join("cache").join("wasm")
}

/// Checks what the launcher can check of a Wasm spec before anything is recorded.
pub(super) fn validate(run: &RunSpec) -> Result<(), super::LaunchError> {
    use super::LaunchError;
    if run.module.as_os_str().is_empty() {
        return Err(LaunchError::Invalid("no Wasm module given".into()));
    }
    fs::metadata(&run.module).map_err(|e| LaunchError::Start {
        code: if e.kind() == std::io::ErrorKind::NotFound {
            crate::wasm::EXIT_NOT_FOUND
        } else {
            crate::wasm::EXIT_CANNOT_RUN
        },
        message: format!("{}: {e}", run.module.display()),
    })?;
    for p in &run.preopens {
        let m = fs::metadata(&p.host).map_err(|e| {
            LaunchError::Invalid(format!("invalid volume source {}: {e}", p.host.display()))
        })?;
        if !m.is_dir() {
            return Err(LaunchError::Invalid(format!(
                "volume source {} of a Wasm task must be a directory",
                p.host.display()
            )));
        }
        if !p.guest.starts_with('/') {
            return Err(LaunchError::Invalid(format!(
                "guest path {:?} must be absolute",
                p.guest
            )));
        }
    }
    if let Some(env) = run.env.iter().find(|e| !e.contains('=')) {
        return Err(LaunchError::Invalid(format!(
            "env entry {env:?} is not KEY=VALUE"
        )));
    }
    Ok(())
}

/// Where the Wasm runner binary is, if not next to this executable.
pub const RUNNER_ENV: &str = "CAISSON_WASM";

/// The host process binary: `$CAISSON_WASM`, else next to this executable.
pub fn runner() -> PathBuf {
    super::companion_program(Some(RUNNER_ENV), RUNNER_NAME)
}

/// How the supervisor starts the task's process.
#[derive(Clone, Copy)]
pub(super) enum Start<'a> {
    /// Exec `caisson-wasm run` on the task's spec (the supervisor is `caisson-shim`).
    Exec,
    /// Run `program`, already loaded by the launcher, in the forked task process (the
    /// supervisor and the task are forks of the launcher: [`launch_in_process`]).
    InProcess {
        engine: &'a Engine,
        program: &'a Program,
    },
}

/// The supervisor of a Wasm task (called by [`super::shim::main`] when the spec has `wasm`, or
/// in the supervisor [`launch_in_process`] forks): same protocol on stdout (`started`,
/// `failed`, `exited`), same records.
pub(super) fn supervise(
    td: &TaskDir,
    cfg: &TaskConfig,
    run: &RunSpec,
    mut state: TaskState,
    mut timings: Timings,
    start: Start<'_>,
    premade: Option<TaskCgroup>,
) -> i32 {
    let spec = &cfg.spec;
    let mut out = std::io::stdout();
    let fail = |state: &mut TaskState, out: &mut std::io::Stdout, code: i32, msg: String| {
        super::shim::launch_failed(td, &spec.id, state, out, code, msg)
    };

    // The host process's spec: the sandbox is the guest's `/` unless the user mapped `/`.
    let mut host_spec = run.clone();
    if !host_spec.preopens.iter().any(|p| p.guest == "/") {
        host_spec.preopens.insert(
            0,
            Preopen {
                host: td.sandbox(),
                guest: "/".into(),
                read_only: false,
            },
        );
    }
    host_spec.stdin = None;
    host_spec.stdout = None;
    host_spec.stderr = None;
    let spec_path = td.dir.join(SPEC_FILE);
    let status_path = td.dir.join(STATUS_FILE);
    let root = td.state_root().map(Path::to_path_buf);
    let cache = root.as_deref().map(cache_dir);
    // The in-process task needs no spec file: it has the spec in memory.
    let wrote = match start {
        Start::Exec => serde_json::to_vec_pretty(&host_spec)
            .map_err(std::io::Error::other)
            .and_then(|j| fs::write(&spec_path, j)),
        Start::InProcess { .. } => Ok(()),
    };
    if let Err(e) = wrote {
        fail(
            &mut state,
            &mut out,
            125,
            format!("writing {SPEC_FILE}: {e}"),
        );
        return 1;
    }
    let runner = runner();
    let mut argv: Vec<std::ffi::CString> = vec![];
    let cstr = |s: &std::ffi::OsStr| {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::CString::new(s.as_bytes()).unwrap_or_default()
    };
    argv.push(cstr(runner.as_os_str()));
    for a in ["run", "--spec"] {
        argv.push(cstr(a.as_ref()));
    }
    argv.push(cstr(spec_path.as_os_str()));
    argv.push(cstr("--status-file".as_ref()));
    argv.push(cstr(status_path.as_os_str()));
    match &cache {
        Some(c) => {
            argv.push(cstr("--cache".as_ref()));
            argv.push(cstr(c.as_os_str()));
        }
        None => argv.push(cstr("--no-cache".as_ref())),
    }

    // Cgroup: created by the launcher on v1 (then we move the child in before it execs), here
    // on v2 (the child is born in it).
    let v2 = crate::cgroups::is_v2();
    let t0 = sys::monotonic_ns();
    let made = match premade {
        // Made by the launcher while it loaded the module ([`prepare_cgroup`]).
        Some(cg) => Ok(cg),
        None => match (
            v2,
            TaskCgroup::open(&spec.id, &spec.limits, !spec.devices.allow.is_empty()),
        ) {
            (false, Some(cg)) => Ok(cg),
            _ => TaskCgroup::create(&spec.id, &spec.limits),
        },
    };
    let cg = match made {
        Ok(cg) => cg,
        Err(e) => {
            fail(
                &mut state,
                &mut out,
                125,
                format!("creating the cgroup: {e}"),
            );
            return 1;
        }
    };
    state.cgroup_paths = cg.dirs();
    timings.cgroup_us = (sys::monotonic_ns() - t0) / 1000;
    let open_log = super::shim::open_log;
    let fds = (|| -> std::io::Result<_> {
        Ok((
            open_log(&td.stdout_log())?,
            open_log(&td.stderr_log())?,
            OwnedFd::from(File::open("/dev/null")?),
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
        ))
    })();
    let (stdout_fd, stderr_fd, devnull, (status_r, status_w), (go_r, go_w)) = match fds {
        Ok(f) => f,
        Err(e) => {
            let _ = cg.destroy(Duration::from_secs(1));
            fail(&mut state, &mut out, 125, format!("opening log files: {e}"));
            return 1;
        }
    };
    let v2fd = if v2 { cg.open_v2_dir() } else { None };
    let t_clone = sys::monotonic_ns();
    let mut born_in_cgroup = v2fd.is_some();
    let mut res = sys::clone_fork(0, v2fd.as_ref().map(|f| f.as_raw_fd()));
    if res.is_err() && v2fd.is_some() {
        born_in_cgroup = false;
        res = sys::clone_fork(0, None);
    }
    drop(v2fd);
    let pid = match res {
        Ok(CloneResult::Child) => {
            // Single-threaded supervisor, forked child: only descriptor work and exec here.
            drop(status_r);
            drop(go_w);
            if !born_in_cgroup {
                let mut b = [0u8; 1];
                let _ = nix::unistd::read(&go_r, &mut b);
            }
            // SIGTERM/SIGINT stay blocked across the exec until the host has its handling in
            // place: a `stop` right after the start must not kill it mid-setup.
            // The in-process task keeps the handlers it inherited: they are the engine's trap
            // handlers (a guest's `unreachable` is a SIGILL the engine turns into a trap).
            let reset = match start {
                Start::Exec => sys::reset_signals(),
                Start::InProcess { .. } => nix::sys::signal::SigSet::empty()
                    .thread_set_mask()
                    .map_err(std::io::Error::from),
            };
            let ok = reset
                .and_then(|()| {
                    let mut stop = nix::sys::signal::SigSet::empty();
                    stop.add(nix::sys::signal::Signal::SIGTERM);
                    stop.add(nix::sys::signal::Signal::SIGINT);
                    stop.thread_block().map_err(std::io::Error::from)
                })
                .and_then(|()| sys::dup2(devnull.as_raw_fd(), 0))
                .and_then(|()| sys::dup2(stdout_fd.as_raw_fd(), 1))
                .and_then(|()| sys::dup2(stderr_fd.as_raw_fd(), 2));
            let err = match (ok, start) {
                (Ok(()), Start::Exec) => match nix::unistd::execv(&argv[0], &argv) {
                    Ok(never) => match never {},
                    Err(e) => (
                        127,
                        format!("starting the Wasm host {}: {e}", runner.display()),
                    ),
                },
                (Ok(()), Start::InProcess { engine, program }) => {
                    run_here(engine, program, &host_spec, &status_w)
                }
                (Err(e), _) => (125, format!("setting up the Wasm host's stdio: {e}")),
            };
            let _ = File::from(status_w).write_all(format!("E {} {}\n", err.0, err.1).as_bytes());
            sys::exit_now(err.0);
        }
        Ok(CloneResult::Parent(pid)) => pid,
        Err(e) => {
            let _ = cg.destroy(Duration::from_secs(1));
            fail(&mut state, &mut out, 125, format!("fork: {e}"));
            return 1;
        }
    };
    drop((status_w, go_r, stdout_fd, stderr_fd, devnull));
    if !born_in_cgroup {
        let t_join = sys::monotonic_ns();
        let joined = cg
            .procs_files()
            .iter()
            .try_for_each(|f| fs::write(f, pid.to_string()).map_err(|e| (f.clone(), e)));
        timings.cgroup_join_us = (sys::monotonic_ns() - t_join) / 1000;
        if let Err((f, e)) = joined {
            drop(go_w);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            let _ = cg.destroy(Duration::from_secs(5));
            fail(
                &mut state,
                &mut out,
                125,
                format!("moving the task into {}: {e}", f.display()),
            );
            return 1;
        }
        let _ = File::from(go_w).write_all(b"1");
    } else {
        drop(go_w);
    }
    // EOF on the status pipe: the host process exec'd; `R`: the in-process task runs (it
    // keeps the pipe for its report).
    let mut error: Option<(i32, String)> = None;
    let mut status_lines = BufReader::new(File::from(status_r)).lines();
    for line in status_lines.by_ref() {
        let Ok(line) = line else { break };
        if line == "R" {
            break;
        }
        if let Some(rest) = line.strip_prefix("E ") {
            let (code, msg) = rest.split_once(' ').unwrap_or((rest, ""));
            error = Some((code.parse().unwrap_or(125), msg.to_string()));
        }
    }
    let t_exec = sys::monotonic_ns();
    if let Some((code, msg)) = error {
        let _ = waitpid(Pid::from_raw(pid), None);
        let _ = cg.destroy(Duration::from_secs(5));
        state.pid = Some(pid);
        fail(&mut state, &mut out, code, msg);
        return 0;
    }
    timings.namespaces_us = 0;
    timings.exec_us = t_exec.saturating_sub(t_clone) / 1000;
    timings.total_us = t_exec.saturating_sub(cfg.launch_started_ns) / 1000;
    timings.clone_into_cgroup = born_in_cgroup;
    let mut replaced =
        super::shim::report_started(td, &spec.id, &mut state, timings, pid, &mut out);

    let status = super::shim::reap(pid, &spec.id);
    let usage = super::shim::usage_at_exit(&cg);
    state.status = Status::Exited;
    state.exit_code = Some(status.0);
    state.signal = status.1;
    // The host process's own account of how the guest ended, when it lived to write it.
    let wasm_status: Option<ExitStatus> = match start {
        Start::Exec => fs::read(&status_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        Start::InProcess { .. } => status_lines
            .map_while(Result::ok)
            .find_map(|l| serde_json::from_str(l.strip_prefix("S ")?).ok()),
    };
    // Stopped by a signal it handled: recorded as the signal, like a native task's.
    if let Some(ExitStatus::Terminated { signal }) = wasm_status {
        state.signal = state.signal.or(Some(signal));
    }
    let (reason, error) = outcome(status.0, status.1, wasm_status.as_ref());
    state.reason = reason;
    state.error = error;
    state.oom_killed =
        usage.oom_kills > 0 || matches!(wasm_status, Some(ExitStatus::MemoryLimit { .. }));
    if usage.oom_kills > 0 {
        state.reason = Some("memory limit".into());
    }
    state.usage = Some(usage);
    state.finished_ms = Some(now_ms());
    replaced.extend(File::open(td.state()).ok());
    if let Err(e) = td.write_state(&state) {
        tracing::error!(id = %spec.id, "writing state: {e}");
    }
    let _ = writeln!(out, "exited {}", status.0);
    let _ = out.flush();
    // The task is over (reaped, usage read): its empty cgroup goes while the launcher reads
    // the end of the logs and (with --rm) the task is removed, not before the launcher hears
    // of the exit (an rmdir per v1 hierarchy, ~0.5 ms in all). Nothing forks any more here, so
    // a thread is safe.
    let cg = std::sync::Arc::new(cg);
    let destroying = {
        let (cg, id) = (cg.clone(), spec.id.clone());
        std::thread::Builder::new()
            .name("cgroup-rm".into())
            .stack_size(64 << 10)
            .spawn(move || destroy_cgroup(&cg, &id))
    };
    if spec.auto_remove {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(std::io::Read::read(&mut stdin, &mut buf), Ok(n) if n > 0) {}
        if spec.cleanup.is_empty() {
            remove_wasm_task(td, spec);
        } else {
            super::shim::remove_task(td, spec, None, || {});
        }
    } else {
        super::shim::refill_spares(td, spec);
    }
    match destroying {
        Ok(t) => {
            let _ = t.join();
        }
        Err(_) => destroy_cgroup(&cg, &spec.id),
    }
    drop(replaced);
    0
}

/// `--rm` of a Wasm task, as [`super::shim::remove_task`] does it (renamed into the root's
/// trash and the name released, `removed` told and the launcher's pipe closed, then deleted)
/// without looking for mounts under it: a Wasm task has none, and reading the mount table
/// twice was a tenth of a Wasm `run --rm`'s CPU time on a host with many mounts.
fn remove_wasm_task(td: &TaskDir, spec: &TaskSpec) {
    let trash = td
        .state_root()
        .map(|root| root.join("trash"))
        .filter(|t| fs::create_dir_all(t).is_ok());
    let moved = trash.and_then(|t| {
        let to = t.join(&spec.id);
        fs::rename(&td.dir, &to).ok().map(|()| to)
    });
    td.release_name(&spec.name, &spec.id);
    if moved.is_none() {
        if let Err(e) = fs::remove_dir_all(&td.dir) {
            tracing::error!(id = %spec.id, "removing {}: {e}", td.dir.display());
        }
    }
    super::shim::report_removed();
    let kind = super::spare::Kind::of_task(spec);
    let doomed = moved.map(|p| (p, Some(kind))).into_iter().collect();
    for p in super::shim::recycle_then_refill(td, spec, doomed) {
        let _ = fs::remove_dir_all(p);
    }
}

fn destroy_cgroup(cg: &TaskCgroup, id: &str) {
    if let Err(e) = cg.destroy(Duration::from_secs(10)) {
        tracing::error!(id, "removing the cgroup: {e}");
    }
}

/// The cgroup of the Wasm task `id` with `limits` (and cgroup v1's faster migrations turned
/// on, once per process), made ahead by a launcher that has other work to overlap it with:
/// reading the mount table alone takes ~0.5 ms on a busy host. Pass it to
/// [`launch_in_process`]; destroy it if the launch does not happen.
pub fn prepare_cgroup(id: &str, limits: &super::Limits) -> Result<TaskCgroup, super::LaunchError> {
    crate::cgroups::favor_dynamic_modifications();
    Ok(TaskCgroup::create_for_wasm(id, limits)?)
}

/// The task process of [`Start::InProcess`], after its stdio (0: /dev/null, 1 and 2: the task's
/// logs) and signal mask are set: tells the supervisor it runs (`R` on the status pipe), runs
/// the guest and exits with its code, its [`ExitStatus`] on the pipe. Returns only on a setup
/// failure (exit code, message).
fn run_here(engine: &Engine, program: &Program, spec: &RunSpec, status: &OwnedFd) -> (i32, String) {
    use crate::wasm::{oneshot, Stdio};
    let mut task = match spec.to_task() {
        Ok(t) => t,
        Err(e) => return (e.exit_code(), e.to_string()),
    };
    task.stdin = Stdio::Inherit;
    task.stdout = Stdio::Inherit;
    task.stderr = Stdio::Inherit;
    let mut stop = nix::sys::signal::SigSet::empty();
    stop.add(nix::sys::signal::Signal::SIGTERM);
    stop.add(nix::sys::signal::Signal::SIGINT);
    let (tell, pipe) = match (status.try_clone(), status.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return (125, format!("status pipe: {e}")),
    };
    if let Err(e) = File::from(tell).write_all(b"R\n") {
        return (125, format!("status pipe: {e}"));
    }
    oneshot::run_and_exit(
        engine,
        program,
        task,
        &spec.module,
        stop,
        oneshot::Report::Pipe(pipe),
    )
}

/// Launches the Wasm command task `spec` (a [`wasm_task`] spec without `http`) whose module the
/// caller has loaded as `program` through `engine`, without starting any program: the launcher
/// forks the task's supervisor (in a session of its own, as `caisson-shim` is), which forks the
/// task process; that one runs `program` from the launcher's memory (the compiled code is
/// already mapped, the engine already built). Records, protocol, cgroup, logs, stop signals,
/// timeout and exit reports are those of [`super::Runtime::launch`] with `caisson-shim` and
/// `caisson-wasm`, so every verb works the same, and both processes outlive the launcher.
///
/// Forks: call it while no other thread of the process may hold a lock (the CLI calls it
/// before starting any thread).
pub fn launch_in_process(
    rt: &super::Runtime,
    spec: TaskSpec,
    engine: &Engine,
    program: &Program,
    cgroup: Option<TaskCgroup>,
) -> Result<super::Launched, super::LaunchError> {
    let mut cgroup = cgroup;
    let res = claim_and_fork(rt, spec, engine, program, &mut cgroup);
    // Refused before the fork: the cgroup made ahead goes too.
    if let (Err(_), Some(cg)) = (&res, cgroup) {
        let _ = cg.destroy(Duration::from_secs(5));
    }
    res
}

fn claim_and_fork(
    rt: &super::Runtime,
    mut spec: TaskSpec,
    engine: &Engine,
    program: &Program,
    cgroup: &mut Option<TaskCgroup>,
) -> Result<super::Launched, super::LaunchError> {
    use super::LaunchError;
    let started_ns = sys::monotonic_ns();
    let Some(run) = spec.wasm.clone().filter(|r| r.http.is_none()) else {
        return Err(LaunchError::Invalid(
            "launch_in_process runs Wasm commands only".into(),
        ));
    };
    // Once per process: without it every v1 cgroup migration waits for an RCU grace period.
    crate::cgroups::favor_dynamic_modifications();
    // Validation, id, name and hostname defaults, the name claimed: as every launch.
    let td = rt.admit(&mut spec)?;
    let (id, name) = (spec.id.clone(), spec.name.clone());
    let res = fork_supervisor(&td, spec, &run, started_ns, engine, program, cgroup.take());
    if res.is_err() {
        let _ = fs::remove_dir_all(&td.dir);
        let _ = TaskCgroup::load(&id).destroy(Duration::from_secs(5));
        td.release_name(&name, &id);
    }
    res
}

fn fork_supervisor(
    td: &TaskDir,
    spec: TaskSpec,
    run: &RunSpec,
    started_ns: u64,
    engine: &Engine,
    program: &Program,
    cgroup: Option<TaskCgroup>,
) -> Result<super::Launched, super::LaunchError> {
    use super::{io_err, LaunchError};
    // A spare made by an ended task's supervisor, else made here. The sandbox is the guest's
    // `/` (no etc/: a Wasm task has no /etc).
    let root = td.state_root();
    if !root.is_some_and(|r| super::spare::claim(r, super::spare::Kind::Wasm, &td.dir)) {
        fs::create_dir(&td.dir).map_err(io_err(format!("creating {}", td.dir.display())))?;
        fs::create_dir(td.sandbox()).map_err(io_err("creating the sandbox"))?;
    }
    // Plain writes into the new directory (nothing reads a task before its state.json exists);
    // state.json is replaced atomically from then on.
    let created = TaskState::created(now_ms());
    let (id, name) = (spec.id.clone(), spec.name.clone());
    let cfg = TaskConfig {
        spec,
        launch_started_ns: started_ns,
        wasm_host_pid: None,
        wasm_host_start_ticks: None,
        wasm_host_since_ms: None,
    };
    fs::write(td.config(), to_json(&cfg)?).map_err(io_err("writing the config"))?;
    fs::write(td.state(), to_json(&created)?).map_err(io_err("writing the state"))?;
    let shim_log = fs::File::create(td.shim_log()).map_err(io_err("creating shim.log"))?;
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_err("creating the supervisor's pipes")(e.into()))
    };
    let (events_r, events_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    let t_fork = sys::monotonic_ns();
    match sys::clone_fork(0, None).map_err(io_err("forking the supervisor"))? {
        CloneResult::Child => {
            // The supervisor: a session of its own (a signal to the launcher's process group
            // must not reach it), stdin/stdout its pipes to the launcher as caisson-shim's.
            drop((events_r, done_w));
            let _ = nix::unistd::setsid();
            let fds = sys::dup2(done_r.as_raw_fd(), 0)
                .and_then(|()| sys::dup2(events_w.as_raw_fd(), 1))
                .and_then(|()| sys::dup2(shim_log.as_raw_fd(), 2));
            drop((done_r, events_w, shim_log));
            if fds.is_err() {
                sys::exit_now(125);
            }
            close_inherited();
            let me = std::process::id() as i32;
            let mut state = created;
            state.shim_pid = Some(me);
            state.shim_start_ticks = super::state::process_start_ticks(me);
            let now = sys::monotonic_ns();
            let timings = Timings {
                prepare_us: t_fork.saturating_sub(started_ns) / 1000,
                spawn_us: now.saturating_sub(t_fork) / 1000,
                ..Default::default()
            };
            let code = supervise(
                td,
                &cfg,
                run,
                state,
                timings,
                Start::InProcess { engine, program },
                cgroup,
            );
            let _ = std::io::stdout().flush();
            sys::exit_now(code)
        }
        CloneResult::Parent(pid) => {
            drop((events_w, done_r, shim_log));
            let mut events = BufReader::new(std::process::ChildStdout::from(events_r));
            let mut line = String::new();
            let _ = events.read_line(&mut line);
            let line = line.trim_end();
            if line.starts_with("started ") {
                let (task_pid, timings) = super::parse_started(line)
                    .ok_or_else(|| LaunchError::Shim(format!("bad reply {line:?}")))?;
                return Ok(super::Launched {
                    id,
                    name,
                    pid: task_pid,
                    timings: timings.map(Box::new),
                    dir: td.dir.clone(),
                    shim: None,
                    stdin: Some(std::process::ChildStdin::from(done_w)),
                    events,
                    console: None,
                });
            }
            drop(done_w);
            let _ = waitpid(Pid::from_raw(pid), None);
            Err(super::start_failure(line, td))
        }
    }
}

/// Closes what the launcher inherited from its own parent (descriptors above stderr without
/// close-on-exec), as `caisson-shim` does at its start: a caller waiting for EOF on a pipe it
/// gave the launcher must not wait for the task. Everything this process opened itself is
/// close-on-exec and stays (the engine maps compiled code from files it keeps open).
fn close_inherited() {
    sys::close_inheritable_from(3);
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, super::LaunchError> {
    serde_json::to_vec(v)
        .map_err(|e| super::io_err("serializing the records")(std::io::Error::other(e)))
}

/// `state.json`'s reason and error for a Wasm task that ended with `code` (or `signal`), given
/// the host process's report.
pub(crate) fn outcome(
    code: i32,
    signal: Option<i32>,
    reported: Option<&ExitStatus>,
) -> (Option<String>, Option<String>) {
    if let Some(sig) = signal {
        return (Some(format!("killed by signal {sig}")), None);
    }
    match reported {
        Some(ExitStatus::Trap { message, .. }) => (Some(format!("trap: {message}")), None),
        Some(ExitStatus::MemoryLimit { detail }) => {
            (Some("memory limit".into()), Some(detail.clone()))
        }
        Some(ExitStatus::Timeout { after_ms }) => {
            (Some(format!("timeout after {after_ms} ms")), None)
        }
        Some(ExitStatus::Killed) => (Some("killed".into()), None),
        Some(s @ ExitStatus::Terminated { .. }) => (Some(s.to_string()), None),
        Some(ExitStatus::Exited { .. }) => (None, None),
        // No report: the module could not be loaded (the reason is in stderr.log) or the host
        // process died.
        None if code == 0 => (None, None),
        None => (
            Some("wasm host failed".into()),
            Some(format!(
                "caisson-wasm exited with {code}; see the task's stderr"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        let trap = ExitStatus::Trap {
            message: "wasm trap: unreachable".into(),
            backtrace: String::new(),
        };
        assert_eq!(
            outcome(134, None, Some(&trap)).0.as_deref(),
            Some("trap: wasm trap: unreachable")
        );
        let mem = ExitStatus::MemoryLimit { detail: "x".into() };
        assert_eq!(
            outcome(137, None, Some(&mem)),
            (Some("memory limit".into()), Some("x".into()))
        );
        assert_eq!(
            outcome(137, Some(9), Some(&trap)).0.as_deref(),
            Some("killed by signal 9")
        );
        assert_eq!(
            outcome(3, None, Some(&ExitStatus::Exited { code: 3 })),
            (None, None)
        );
        assert!(outcome(126, None, None).0.is_some());
        assert_eq!(
            outcome(143, None, Some(&ExitStatus::Terminated { signal: 15 })).0,
            Some("terminated by SIGTERM".into())
        );
    }

    #[test]
    fn task_spec_shape() {
        let t = wasm_task(RunSpec {
            module: "/m/hello.wasm".into(),
            ..Default::default()
        });
        assert_eq!(t.process.args, ["hello.wasm"]);
        assert_eq!(t.image, "/m/hello.wasm");
        let json = serde_json::to_string(&t).unwrap();
        let back: TaskSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
        // Native specs written before the field existed still load.
        let native = serde_json::to_value(TaskSpec::default()).unwrap();
        assert!(native.get("wasm").is_none());
    }
}
