//! The per-task supervisor (`caisson-shim DIR`): a small single-threaded process, detached from
//! the launcher (own session), that creates the cgroup, clones the task's init into new
//! namespaces, stays its parent, reaps it and records its fate in the task's state directory.
//!
//! Protocol with the launcher: the launcher spawns the shim with stdin and stdout as pipes.
//! The shim writes `started <pid>` or `failed <code> <message>` as its first line on stdout,
//! then `exited <code> <state JSON>` when the task has ended (and, without `auto_remove`,
//! its state is recorded; with it the record is written right after). With `auto_remove`
//! the shim then waits for EOF on stdin (the launcher has drained the logs, or is gone) and
//! removes the task's directory.
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::child::{self, ChildArgs};
use super::spec::NetworkMode;
use super::state::{now_ms, process_start_ticks, Status, TaskDir, TaskState, Timings};
use crate::cgroups::TaskCgroup;
use crate::sys::launch::{self as sys, CloneResult};

/// Runs the supervisor for the task directory `dir`; returns the shim's exit code.
///
/// Closes every inherited descriptor above stderr first: call it before opening any.
///
/// `spawned_ns` is the launcher's `CLOCK_MONOTONIC` just before it spawned us (for the timings).
pub fn main(dir: &Path, spawned_ns: Option<u64>) -> i32 {
    // An attached launcher's console socket (`run -i`/`-t` in the foreground) is the one
    // inherited descriptor we keep.
    let console_fd = std::env::var(super::console::FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    sys::close_from_keeping(3, console_fd);
    let console = console_fd.and_then(|fd| match crate::sys::term::take_inherited_fd(fd) {
        Ok(fd) => Some(std::os::unix::net::UnixStream::from(fd)),
        Err(e) => {
            tracing::warn!("the console descriptor {fd}: {e}");
            None
        }
    });
    main_with(dir, spawned_ns, None, console)
}

/// [`main`] for a standby supervisor ([`super::standby`]), which has closed what it inherited
/// already and may hold a network namespace made ahead for the task (`netns`); `console` is
/// an attached launcher's socket (never with a standby).
pub(super) fn main_with(
    dir: &Path,
    spawned_ns: Option<u64>,
    netns: Option<OwnedFd>,
    console: Option<std::os::unix::net::UnixStream>,
) -> i32 {
    let t_start = sys::monotonic_ns();
    let _ = nix::unistd::setsid();
    let td = TaskDir::new(dir.to_path_buf());
    let mut out = std::io::stdout();
    let cfg = match td.read_config() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "failed 125 reading {}: {e}", td.config().display());
            return 1;
        }
    };
    let spec = &cfg.spec;
    let mut state = td
        .read_state()
        .unwrap_or_else(|_| TaskState::created(now_ms()));
    let me = std::process::id() as i32;
    state.shim_pid = Some(me);
    state.shim_start_ticks = process_start_ticks(me);
    let mut timings = Timings {
        rootfs_us: spec.rootfs_prepare_us,
        network_us: spec.network_us,
        prepare_us: spawned_ns
            .unwrap_or(cfg.launch_started_ns)
            .saturating_sub(cfg.launch_started_ns)
            / 1000,
        spawn_us: t_start.saturating_sub(spawned_ns.unwrap_or(cfg.launch_started_ns)) / 1000,
        ..Default::default()
    };
    if let Some(run) = &spec.wasm {
        return super::wasm::supervise(
            &td,
            &cfg,
            run,
            state,
            timings,
            super::wasm::Start::Exec,
            None,
        );
    }

    let report_failure =
        |state: &mut TaskState, out: &mut std::io::Stdout, code: i32, msg: String| {
            launch_failed(&td, &spec.id, state, out, code, msg)
        };

    // Cgroup. On v2 it must exist before the clone (CLONE_INTO_CGROUP); on v1 and hybrid hosts
    // we create and join it after the clone, while the init sets up its mounts.
    let v2 = crate::cgroups::is_v2();
    let create_cgroup = |state: &mut TaskState,
                         out: &mut std::io::Stdout,
                         timings: &mut Timings|
     -> Option<TaskCgroup> {
        let t0 = sys::monotonic_ns();
        // On v1 the launcher has created it already (an older launcher may not have).
        let made = match (
            v2,
            TaskCgroup::open(&spec.id, &spec.limits, !spec.devices.allow.is_empty()),
        ) {
            (false, Some(cg)) => Ok(cg),
            _ => TaskCgroup::create_with_devices(&spec.id, &spec.limits, &spec.devices.allow),
        };
        match made {
            Ok(cg) => {
                state.cgroup_paths = cg.dirs();
                timings.cgroup_us = (sys::monotonic_ns() - t0) / 1000;
                Some(cg)
            }
            Err(e) => {
                report_failure(state, out, 125, format!("creating the cgroup: {e}"));
                None
            }
        }
    };
    let early_cg = if v2 {
        match create_cgroup(&mut state, &mut out, &mut timings) {
            Some(cg) => Some(cg),
            None => return 1,
        }
    } else {
        None
    };
    // A failure before the init runs: its early cgroup goes, the launch is reported failed.
    let fail_early = |state: &mut TaskState, out: &mut std::io::Stdout, msg: String| {
        if let Some(cg) = &early_cg {
            let _ = cg.destroy(Duration::from_secs(1));
        }
        report_failure(state, out, 125, msg);
        1
    };

    let fds = (|| -> std::io::Result<_> {
        Ok((
            open_log(&td.stdout_log())?,
            open_log(&td.stderr_log())?,
            OwnedFd::from(File::open("/dev/null")?),
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?,
        ))
    })();
    let (stdout_fd, stderr_fd, devnull, (status_r, status_w)) = match fds {
        Ok(f) => f,
        Err(e) => {
            return fail_early(&mut state, &mut out, format!("opening log files: {e}"));
        }
    };
    // `-i`: a pipe as stdin; `-t`: a terminal for all three streams (see `console`).
    let console_side = match (spec.interactive || spec.tty)
        .then(|| super::console::TaskSide::new(spec.tty))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => {
            return fail_early(&mut state, &mut out, format!("the task's console: {e}"));
        }
    };
    let task_stdin = console_side
        .as_ref()
        .and_then(|c| c.stdin_pipe())
        .unwrap_or(&devnull);
    let terminal = console_side.as_ref().and_then(|c| c.terminal_socket());

    let mut flags =
        (libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC) as u64;
    // A task joining a prepared namespace (CNI) setns's into it in the init instead, and so
    // does one whose own namespace a standby supervisor made ahead.
    // A task with a user namespace gets a network namespace that it owns, made at the clone:
    // one made ahead belongs to the host's user namespace (its root could not bind a low port,
    // mount sysfs or bring up lo there).
    let premade_netns = netns.filter(|_| {
        spec.network == NetworkMode::None && spec.netns.is_none() && spec.userns.is_none()
    });
    if spec.network == NetworkMode::None && spec.netns.is_none() && premade_netns.is_none() {
        flags |= libc::CLONE_NEWNET as u64;
    }
    // The init waits for its maps (written below) on this pipe.
    let userns_pipe = match spec
        .userns
        .as_ref()
        .map(|_| nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))
        .transpose()
    {
        Ok(p) => p,
        Err(e) => {
            return fail_early(&mut state, &mut out, format!("pipe: {e}"));
        }
    };
    if spec.userns.is_some() {
        flags |= libc::CLONE_NEWUSER as u64;
    }
    let (userns_r, userns_w) = match userns_pipe {
        Some((r, w)) => (Some(r), Some(w)),
        None => (None, None),
    };
    let v2fd = early_cg.as_ref().and_then(|cg| cg.open_v2_dir());
    // Without CLONE_INTO_CGROUP (v1, hybrid), we create the cgroups and move the init into them
    // while it does its mounts, and it waits for our go before exec: the cgroup migration (an
    // RCU grace period on v1, milliseconds under load, which the launcher has already started:
    // `cgroups::prime_migration`) overlaps the setup instead of adding to it.
    let go = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            return fail_early(&mut state, &mut out, format!("pipe: {e}"));
        }
    };
    // createRuntime hooks run (here) between the clone and the init's createContainer hooks:
    // the init then waits for our go after its mounts, whatever the cgroup layout.
    let early_go = !spec.hooks.create_runtime.is_empty();
    // A CNI ADD still in flight (the network gate): the init sets up meanwhile and waits for
    // our go before exec.
    let gated = spec.network_gate.is_some();
    // A task with a user namespace on CNI networks: its init cannot join the prepared
    // namespace itself once in its user namespace (that needs privilege over the namespace's
    // owner, the host's), so it is born in it: we enter it for the clone and come back.
    let (host_netns, sysfs) = match (&spec.userns, &spec.netns) {
        (Some(_), Some(ns)) => match enter_netns_for_userns_task(ns) {
            Ok((host, sysfs)) => (Some(host), Some(sysfs)),
            Err(e) => {
                return fail_early(
                    &mut state,
                    &mut out,
                    format!(
                        "entering the task's network namespace {}: {e}",
                        ns.display()
                    ),
                );
            }
        },
        _ => (None, None),
    };
    let t_clone = sys::monotonic_ns();
    let mut joined_at_birth = v2fd.is_some();
    // Born in its v2 cgroup, the init also gets a cgroup namespace rooted there, so that it can
    // see its own cgroup (and only that) at /sys/fs/cgroup.
    let mut res = match &v2fd {
        Some(fd) => sys::clone_fork(flags | libc::CLONE_NEWCGROUP as u64, Some(fd.as_raw_fd())),
        None => sys::clone_fork(flags, None),
    };
    if res.is_err() && v2fd.is_some() {
        joined_at_birth = false;
        res = sys::clone_fork(flags, None);
    }
    drop(v2fd);
    // Back in our own namespace (the child, if any, stays in the task's).
    if let Some(host) = host_netns {
        if let Err(e) = nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET) {
            tracing::error!("returning to the host's network namespace: {e}");
        }
    }
    let (go_r, go_w_fd) = go;
    let pid = match res {
        Ok(CloneResult::Child) => {
            drop(status_r);
            drop(go_w_fd);
            drop(userns_w);
            child::run(ChildArgs {
                userns_ready: userns_r,
                spec,
                dir: &td,
                wait_for_cgroup: (!joined_at_birth || early_go || gated).then_some(go_r),
                wait_early: early_go,
                cgroup_ns: joined_at_birth,
                netns: premade_netns.as_ref(),
                sysfs,
                // On v2 a device program is attached only for tasks with device rules.
                device_cgroup: !spec.devices.allow.is_empty(),
                stdout: &stdout_fd,
                stderr: &stderr_fd,
                stdin: task_stdin,
                terminal,
                status: status_w,
                claim: None,
            })
        }
        Ok(CloneResult::Parent(pid)) => pid,
        Err(e) => {
            return fail_early(&mut state, &mut out, format!("clone: {e}"));
        }
    };
    drop(status_w);
    drop(go_r);
    drop(userns_r);
    if let (Some(u), Some(w)) = (&spec.userns, userns_w) {
        let mapped = fs::write(format!("/proc/{pid}/uid_map"), u.uid_map_text())
            .and_then(|()| fs::write(format!("/proc/{pid}/gid_map"), u.gid_map_text()))
            .and_then(|()| File::from(w).write_all(b"1"));
        if let Err(e) = mapped {
            // Without its byte the init gives up; make sure it is gone before cleaning up.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            return fail_early(
                &mut state,
                &mut out,
                format!("writing the user namespace's maps: {e}"),
            );
        }
    }
    // The console's log descriptor; the pumps start once the init has exec'd (with `-t`, its
    // terminal's master arrives just before).
    let console_log = console_side
        .as_ref()
        .and_then(|_| stdout_fd.try_clone().ok());
    drop((stdout_fd, stderr_fd, devnull));
    // Hold the task's mount namespace: when the init exits, the kernel then does not tear its
    // mounts down (an RCU grace period) before we learn of the exit; we drop it after reporting.
    let mount_ns = File::open(format!("/proc/{pid}/ns/mnt")).ok();
    let cg = match early_cg {
        Some(cg) => cg,
        None => match create_cgroup(&mut state, &mut out, &mut timings) {
            Some(cg) => cg,
            None => {
                drop(go_w_fd);
                let _ = waitpid(Pid::from_raw(pid), None);
                return 1;
            }
        },
    };
    if !joined_at_birth {
        let t_join = sys::monotonic_ns();
        let joined = cg
            .procs_files()
            .iter()
            .try_for_each(|f| fs::write(f, pid.to_string()).map_err(|e| (f.clone(), e)));
        timings.cgroup_join_us = (sys::monotonic_ns() - t_join) / 1000;
        if let Err((f, e)) = joined {
            drop(go_w_fd);
            let _ = waitpid(Pid::from_raw(pid), None);
            let _ = cg.destroy(Duration::from_secs(5));
            report_failure(
                &mut state,
                &mut out,
                125,
                format!("moving the task into {}: {e}", f.display()),
            );
            return 1;
        }
    }
    // The network (gate), then the createRuntime hooks: either failing stops the launch.
    let mut ready: Result<(), String> = Ok(());
    if let Some(gate) = &spec.network_gate {
        let t_gate = sys::monotonic_ns();
        ready = match crate::net::gate::wait(gate) {
            Ok(crate::net::gate::GateMessage::Ready {
                hosts,
                resolv_conf,
                network_us,
            }) => {
                timings.network_us = Some(network_us);
                // In place: the task's /etc files are bind mounts of these already.
                fs::write(td.etc().join("hosts"), hosts)
                    .and_then(|_| fs::write(td.etc().join("resolv.conf"), resolv_conf))
                    .map_err(|e| format!("writing the task's network files: {e}"))
            }
            Ok(crate::net::gate::GateMessage::Failed { message }) => Err(message),
            Err(e) => Err(e),
        };
        timings.network_wait_us = Some((sys::monotonic_ns() - t_gate) / 1000);
    }
    if early_go && ready.is_ok() {
        let hook_state = super::hooks::state_json(
            &spec.id,
            "creating",
            Some(pid),
            &super::hooks::bundle_dir(&td),
        );
        ready = super::hooks::run_all(
            "createRuntime",
            &spec.hooks.create_runtime,
            &hook_state,
            None,
        );
    }
    if let Err(e) = ready {
        // Without its go the init gives up; make sure it is gone before cleaning up.
        drop(go_w_fd);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(pid), None);
        let _ = cg.destroy(Duration::from_secs(5));
        report_failure(&mut state, &mut out, 125, e);
        return 1;
    }
    // The init waits for this byte unless it was born in its cgroup (and has no createRuntime
    // hooks or network to wait for).
    if early_go || !joined_at_birth || gated {
        let _ = File::from(go_w_fd).write_all(b"1");
    } else {
        drop(go_w_fd);
    }

    // Wait for exec (EOF) or an error report.
    let mut t_started = t_clone;
    let mut t_mounts = t_clone;
    let mut error: Option<(i32, String)> = None;
    for line in BufReader::new(File::from(status_r)).lines() {
        let Ok(line) = line else { break };
        let mut it = line.splitn(3, ' ');
        match (it.next(), it.next(), it.next()) {
            (Some("S"), Some(t), _) => t_started = t.parse().unwrap_or(t_started),
            (Some("M"), Some(t), _) => t_mounts = t.parse().unwrap_or(t_mounts),
            (Some("E"), Some(code), msg) => {
                error = Some((code.parse().unwrap_or(125), msg.unwrap_or("").to_string()))
            }
            _ => {}
        }
    }
    let t_exec = sys::monotonic_ns();
    timings.namespaces_us = t_started.saturating_sub(t_clone) / 1000;
    timings.mounts_us = t_mounts.saturating_sub(t_started) / 1000;
    timings.exec_us = t_exec.saturating_sub(t_mounts) / 1000;
    timings.total_us = t_exec.saturating_sub(cfg.launch_started_ns) / 1000;
    timings.clone_into_cgroup = joined_at_birth;
    supervise(Supervised {
        td: &td,
        cfg: &cfg,
        state,
        timings,
        pid,
        cg,
        held_ns: mount_ns.into_iter().collect(),
        // Given back for a later task when it ends, unless a hook (with every privilege) may
        // have changed it.
        netns: premade_netns.filter(|_| spec.hooks.is_empty()),
        error,
        console: console_side.zip(console_log).map(|(s, l)| (s, l, console)),
    })
}

/// A task whose init has exec'd (or reported an error): what [`supervise`] needs.
pub(super) struct Supervised<'a> {
    pub td: &'a TaskDir,
    pub cfg: &'a super::state::TaskConfig,
    pub state: TaskState,
    pub timings: Timings,
    pub pid: i32,
    pub cg: TaskCgroup,
    /// The task's own network namespace, made ahead by a standby: offered back to the fork
    /// server for a later task once this one has ended ([`super::standby::give_back_netns`]).
    pub netns: Option<OwnedFd>,
    /// The task's namespaces (at least its mount namespace), held until the exit is reported:
    /// when the init exits the kernel then does not tear them down (RCU grace periods, the
    /// mounts) before we learn of the exit.
    pub held_ns: Vec<File>,
    /// The init's launch error, if any.
    pub error: Option<(i32, String)>,
    /// `-i`/`-t`: the console's task side, its log and the launcher's socket.
    pub console: Option<(
        super::console::TaskSide,
        OwnedFd,
        Option<std::os::unix::net::UnixStream>,
    )>,
}

/// Reports the launch, supervises the task to its end, records and reports its fate, then
/// (with `auto_remove`) removes it. Shared by fresh, standby and sandbox supervisors.
pub(super) fn supervise(s: Supervised<'_>) -> i32 {
    let Supervised {
        td,
        cfg,
        mut state,
        timings,
        pid,
        cg,
        held_ns,
        netns,
        error,
        console,
    } = s;
    let td = td.clone();
    let spec = &cfg.spec;
    let mut out = std::io::stdout();
    if let Some((code, msg)) = error {
        let _ = waitpid(Pid::from_raw(pid), None);
        let _ = cg.destroy(Duration::from_secs(5));
        state.pid = Some(pid);
        launch_failed(&td, &spec.id, &mut state, &mut out, code, msg);
        return 0;
    }
    let pumps = match console {
        Some((side, log, sock)) => match side.start(log, sock) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(id = %spec.id, "starting the console pumps: {e}");
                None
            }
        },
        _ => None,
    };
    let mut replaced = report_started(&td, &spec.id, &mut state, timings, pid, &mut out);
    run_logged_hooks(
        &td,
        spec,
        "poststart",
        &spec.hooks.poststart,
        "running",
        Some(pid),
    );

    // The exit's state write then allocates no inode.
    td.prepare_state_write();
    // Supervise.
    let status = reap(pid, &spec.id);
    // The init has been reaped: its namespace's last process is gone.
    if let Some(ns) = netns {
        super::standby::give_back_netns(ns);
    }
    // The task's networks (CNI DEL, then the netns) are released by this process rather than
    // a second program, on a thread of their own so that this overlaps the accounting and
    // cleanup below and the launcher's draining of the logs. Threads are fine from here on:
    // the init has been cloned and reaped, nothing is forked any more except by
    // std::process::Command.
    let net_release = spec.network_release.clone().map(|r| {
        std::thread::Builder::new()
            .name("net-release".into())
            .spawn(move || r.run())
    });
    if let Some(p) = pumps {
        p.finish();
    }
    // Started at once, it runs while we account and clean up.
    let mut exit_command = spawn_exit_command(spec);
    let usage = usage_at_exit(&cg);
    state.status = Status::Exited;
    state.exit_code = Some(status.0);
    state.signal = status.1;
    state.oom_killed = usage.oom_kills > 0;
    if state.oom_killed {
        state.reason = Some("memory limit".into());
    } else if let Some(sig) = status.1 {
        state.reason = Some(format!("killed by signal {sig}"));
    }
    state.usage = Some(usage);
    state.finished_ms = Some(now_ms());
    // poststop hooks run after the cgroup is gone and before the exit is recorded; without
    // them the cgroup's removal (an rmdir per hierarchy) follows the report: the usage has
    // been read, and `rm` waits for this process to end before it cleans up.
    let destroy = |cg: &TaskCgroup| {
        if let Err(e) = cg.destroy(Duration::from_secs(10)) {
            tracing::error!(id = %spec.id, "removing the cgroup: {e}");
        }
    };
    let hooks_first = !spec.hooks.poststop.is_empty();
    if hooks_first {
        destroy(&cg);
        run_logged_hooks(&td, spec, "poststop", &spec.hooks.poststop, "stopped", None);
    }
    replaced.extend(File::open(td.state()).ok());
    let record = |state: &TaskState| {
        if let Err(e) = td.write_state(state) {
            tracing::error!(id = %spec.id, "writing state: {e}");
        }
    };
    // The final state comes with the report, so that the launcher need not read it back.
    // A task removed with its exit (--rm) is reported first: its record goes anyway, and
    // nobody else waits for it; any other is recorded first, for whoever looks next.
    if spec.auto_remove {
        report_exited(&mut out, &state);
        record(&state);
    } else {
        record(&state);
        report_exited(&mut out, &state);
    }
    if !hooks_first {
        destroy(&cg);
    }
    drop(held_ns);
    // Released before `removed` (and before we exit): the address and ports are free then.
    let join_release = || {
        let released = match net_release {
            None => Ok(()),
            Some(Ok(t)) => t.join().unwrap_or_else(|_| {
                Err(crate::net::NetError::io(
                    "releasing the networks",
                    std::io::Error::other("the thread panicked"),
                ))
            }),
            // No thread: here, then.
            Some(Err(_)) => spec.network_release.as_ref().map_or(Ok(()), |r| r.run()),
        };
        if let Err(e) = released {
            // `rm` (or an agent) retries from the attachment cache.
            tracing::error!(id = %spec.id, "releasing the networks: {e}");
        }
    };

    if spec.auto_remove {
        // Wait until the launcher is done with the logs (or gone), then remove everything;
        // the networks' release goes on meanwhile and is waited for before `removed`.
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        remove_task(&td, spec, exit_command.take(), join_release);
    } else {
        join_release();
        refill_spares(&td, spec);
    }
    wait_exit_command(spec, exit_command);
    // Only now, with nobody waiting on us: freeing the old state files' blocks can be slow.
    drop(replaced);
    0
}

/// Tells the launcher that the task has ended: `exited CODE STATE` (the final state as one
/// line of JSON; see [`super::Launched::wait`]).
fn report_exited(out: &mut std::io::Stdout, state: &TaskState) {
    let _ = out.write_all(&exited_line(state));
    let _ = out.flush();
}

fn exited_line(state: &TaskState) -> Vec<u8> {
    let mut line = format!("exited {} ", state.exit_code.unwrap_or(255)).into_bytes();
    let _ = serde_json::to_writer(&mut line, state);
    line.push(b'\n');
    line
}

/// The final state on an `exited CODE STATE` line (None for a bare `exited CODE`).
pub(super) fn parse_exited(line: &str) -> Option<TaskState> {
    line.strip_prefix("exited ")
        .and_then(|rest| rest.split_once(' '))
        .and_then(|(_, json)| serde_json::from_str::<TaskState>(json.trim_end()).ok())
        .filter(|st| st.status.is_terminal())
}

/// Records the task as running (pid, start time, launch timings) and tells the launcher.
/// Returns the replaced state file, still open: each state write renames a new file over the
/// old one, and freeing the old file's blocks can cost a synchronous discard (ext4 mounted
/// `discard`; tens of ms under I/O load), so the caller keeps such files open until the
/// launcher has heard everything (exit, and with --rm the removal). Shared by the native and
/// the Wasm supervisor.
pub(super) fn report_started(
    td: &TaskDir,
    id: &str,
    state: &mut TaskState,
    timings: super::state::Timings,
    pid: i32,
    out: &mut std::io::Stdout,
) -> Vec<File> {
    state.status = Status::Running;
    state.pid = Some(pid);
    state.started_ms = Some(now_ms());
    let _ = out.write_all(started_line(pid, &timings).as_bytes());
    state.timings = timings;
    let _ = out.flush();
    let replaced: Vec<File> = File::open(td.state()).ok().into_iter().collect();
    if let Err(e) = td.write_state(state) {
        tracing::error!(id, "writing state: {e}");
    }
    replaced
}

/// `started PID TIMINGS-JSON\n` ([`super::parse_started`]): the timings come with the line,
/// so that a launcher reporting them (the agent's RUNNING) need not wait for `state.json`,
/// written right after.
pub(super) fn started_line(pid: i32, timings: &super::state::Timings) -> String {
    format!(
        "started {pid} {}\n",
        serde_json::to_string(timings).unwrap_or_default()
    )
}

/// Waits for the task's init to end: its exit code (128 + signal when killed) and the signal.
/// Shared by the native and the Wasm supervisor.
pub(super) fn reap(pid: i32, id: &str) -> (i32, Option<i32>) {
    loop {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return (code, None),
            Ok(WaitStatus::Signaled(_, sig, _)) => return (128 + sig as i32, Some(sig as i32)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!(id, "waitpid: {e}");
                return (255, None);
            }
        }
    }
}

/// The ended task's usage from its cgroup. Without cpuacct/memory accounting (e.g. a v2 tree
/// without those controllers), falls back to the rusage of the reaped task (its largest
/// process, not the cgroup total).
pub(super) fn usage_at_exit(cg: &crate::cgroups::TaskCgroup) -> crate::cgroups::Usage {
    let mut usage = cg.usage();
    let (cpu_us, maxrss) = sys::children_usage();
    if usage.cpu_ns == 0 {
        usage.cpu_ns = cpu_us * 1000;
    }
    if usage.memory_peak_bytes == 0 {
        usage.memory_peak_bytes = maxrss;
    }
    usage
}

/// Records a launch failure (state `Failed`, reason "launch failed") and tells the launcher.
/// Shared by the native and the Wasm supervisor.
pub(super) fn launch_failed(
    td: &TaskDir,
    id: &str,
    state: &mut TaskState,
    out: &mut std::io::Stdout,
    code: i32,
    msg: String,
) {
    tracing::error!(id, code, "launch failed: {msg}");
    state.status = Status::Failed;
    state.exit_code = Some(code);
    state.reason = Some("launch failed".into());
    state.error = Some(msg.clone());
    state.finished_ms = Some(now_ms());
    let _ = td.write_state(state);
    let _ = writeln!(out, "failed {code} {msg}");
    let _ = out.flush();
}

/// Opens a task log for appending (the task's stdout/stderr go straight into it).
pub(super) fn open_log(p: &Path) -> std::io::Result<OwnedFd> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map(OwnedFd::from)
}

/// Runs poststart/poststop hooks: the OCI runtime spec has their failures logged, not fatal.
fn run_logged_hooks(
    td: &TaskDir,
    spec: &super::spec::TaskSpec,
    point: &str,
    hooks: &[super::spec::Hook],
    status: &str,
    pid: Option<i32>,
) {
    if hooks.is_empty() {
        return;
    }
    let state = super::hooks::state_json(&spec.id, status, pid, &super::hooks::bundle_dir(td));
    for h in hooks {
        if let Err(e) = super::hooks::run(point, h, &state, None) {
            tracing::warn!(id = %spec.id, "{e}");
        }
    }
}

/// Starts the spec's exit command, its output into our log (our stdout is the launcher's pipe).
fn spawn_exit_command(spec: &super::spec::TaskSpec) -> Option<std::process::Child> {
    let (prog, args) = spec.exit_command.split_first()?;
    let log = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    match std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .spawn()
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(id = %spec.id, "exit command {prog}: {e}");
            None
        }
    }
}

fn wait_exit_command(spec: &super::spec::TaskSpec, child: Option<std::process::Child>) {
    if let Some(mut c) = child {
        match c.wait() {
            Ok(st) if !st.success() => tracing::error!(id = %spec.id, "exit command: {st}"),
            Err(e) => tracing::error!(id = %spec.id, "exit command: {e}"),
            Ok(_) => {}
        }
    }
}

/// Tells the launcher `removed`, then closes our end of its pipe (fd 1 becomes /dev/null):
/// the launcher is done with us.
pub(super) fn report_removed() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "removed");
    let _ = out.flush();
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = sys::dup2(null.as_raw_fd(), 1);
    }
}

/// `--rm`: makes the task disappear at once, tells the launcher, then deletes its files.
///
/// What a user can observe goes first: the overlay is unmounted, the owned paths and the task
/// directory are renamed into `<root>/trash/` (one rename each) and the name is released; then
/// `removed` on stdout and stdout closed, which is what the launcher waits for. The deletion of
/// the files follows without anyone waiting: on ext4 without a journal and with `discard`,
/// every freed block is a synchronous discard (milliseconds each under I/O load), and a task
/// frees a few dozen. A path that cannot be renamed (another filesystem) is deleted in place
/// before the report, as before.
pub(super) fn remove_task(
    td: &TaskDir,
    spec: &super::spec::TaskSpec,
    exit_command: Option<std::process::Child>,
    before_report: impl FnOnce(),
) {
    let (doomed, dir_left) = move_to_trash(td, spec);
    td.release_name(&spec.name, &spec.id);
    if spec.userns.is_some() {
        if let Some(root) = td.state_root() {
            super::userns::release(root, &spec.id);
        }
    }
    // What they release (addresses, ports) must be free once the launcher hears "removed".
    before_report();
    wait_exit_command(spec, exit_command);
    if dir_left {
        if let Err(e) = crate::image::rootfs::remove_ended_dir(&td.dir) {
            tracing::error!(id = %spec.id, "removing {}: {e}", td.dir.display());
        }
    }
    report_removed();
    let doomed = recycle_then_refill(td, spec, doomed);
    super::state::cleanup_owned(&doomed);
}

/// Unmounts the paths an ended task owns and renames them and its directory into
/// `<root>/trash/` (one rename each; a path that cannot be renamed, e.g. on another file system,
/// is deleted in place), each with the kind of spare it can become
/// ([`super::spare::recycle`]; none for a task with a user namespace). Also returns whether
/// the task's directory could not be moved (the caller deletes it then).
pub(super) fn move_to_trash(
    td: &TaskDir,
    spec: &super::spec::TaskSpec,
) -> (Vec<(PathBuf, Option<super::spare::Kind>)>, bool) {
    use super::spare::Kind;
    let root = td.state_root();
    let trash = root.map(|root| root.join("trash"));
    let trash = trash.filter(|t| fs::create_dir_all(t).is_ok());
    // What goes to the trash, and the kind of spare it can become instead.
    let mut doomed: Vec<(PathBuf, Option<Kind>)> = vec![];
    let reusable = spec.userns.is_none();
    for (i, p) in spec.cleanup.iter().enumerate() {
        // An overlay root alone, as nearly always: no mount table to read.
        if !crate::image::rootfs::unmount_root(p) {
            super::state::unmount_under(p);
        }
        let renamed = trash.as_ref().and_then(|t| {
            let to = t.join(format!("{}.{i}", spec.id));
            fs::rename(p, &to).ok().map(|()| to)
        });
        let kind = root
            .filter(|_| reusable)
            .and_then(|r| super::spare::kind_of_owned(r, p));
        match renamed {
            Some(to) => doomed.push((to, kind)),
            None => super::state::cleanup_owned(std::slice::from_ref(p)),
        }
    }
    let renamed = trash.as_ref().and_then(|t| {
        let to = t.join(&spec.id);
        fs::rename(&td.dir, &to).ok().map(|()| to)
    });
    let dir_left = match renamed {
        Some(to) => {
            doomed.push((to, reusable.then(|| Kind::of_task(spec))));
            false
        }
        None => true,
    };
    (doomed, dir_left)
}

/// Of what a removed task left in the trash, makes spares of what it can
/// ([`super::spare::recycle`]), then new ones up to the slots ([`refill_spares`]). Returns the
/// rest, to delete.
pub(super) fn recycle_then_refill(
    td: &TaskDir,
    spec: &super::spec::TaskSpec,
    doomed: Vec<(PathBuf, Option<super::spare::Kind>)>,
) -> Vec<PathBuf> {
    let left = super::spare::recycle_all(td.state_root(), doomed);
    refill_spares(td, spec);
    left
}

/// Makes the spare directories a later launch will claim ([`super::spare`]), with the task
/// over and reported: nobody waits for it.
pub(super) fn refill_spares(td: &TaskDir, spec: &super::spec::TaskSpec) {
    if let Some(root) = td.state_root() {
        super::spare::refill(root, &super::spare::kinds_of(root, spec));
    }
}

/// Enters the prepared network namespace `ns` of a task with a user namespace and does there
/// what its root, unprivileged over this namespace, cannot: brings lo up (not every CNI chain
/// has the loopback plugin) and lets it bind ports below 1024 and ping
/// (`ip_unprivileged_port_start=0` and `ping_group_range` for every group, docker's defaults
/// for a container's own namespace), and makes its /sys (a sysfs mount shows the devices of
/// the mounter's network namespace, and only a process privileged over that namespace's owner
/// may make one). Returns our namespace, to return to after the clone, and the detached
/// sysfs mount for the init to attach.
fn enter_netns_for_userns_task(ns: &Path) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use crate::sys::mount::{
        FsContext, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY,
    };
    let host = crate::sys::netns::current_netns()?;
    let f = File::open(ns)?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let inside = (|| {
        sys::loopback_up()?;
        // /proc/sys/net shows the opener's namespace: this one now.
        fs::write("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0")?;
        fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")?;
        let ctx = FsContext::open("sysfs")?;
        ctx.create()?;
        ctx.mount_with(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC)
    })();
    match inside {
        Ok(sysfs) => Ok((host, sysfs)),
        Err(e) => {
            let _ = nix::sched::setns(&host, nix::sched::CloneFlags::CLONE_NEWNET);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_started_line_carries_the_timings() {
        let t = super::super::state::Timings {
            namespaces_us: 7,
            mounts_us: 9,
            warm_sandbox: true,
            ..Default::default()
        };
        let line = started_line(42, &t);
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        let (pid, got) = super::super::parse_started(line.trim_end()).unwrap();
        assert_eq!((pid, got), (42, Some(t)));
        // A supervisor that sends no timings, and lines that are not `started`.
        assert_eq!(super::super::parse_started("started 7"), Some((7, None)));
        assert_eq!(super::super::parse_started("started x {}"), None);
        assert_eq!(super::super::parse_started("failed 125 no"), None);
    }

    #[test]
    fn the_exited_line_carries_the_final_state() {
        let mut st = TaskState::created(1);
        st.status = Status::Exited;
        st.exit_code = Some(3);
        st.reason = Some("a b\nc".into());
        let line = String::from_utf8(exited_line(&st)).unwrap();
        assert!(line.starts_with("exited 3 ") && line.matches('\n').count() == 1);
        assert_eq!(parse_exited(&line), Some(st));
        // An older supervisor's line: the launcher reads the record instead.
        assert_eq!(parse_exited("exited 3\n"), None);
    }
}
