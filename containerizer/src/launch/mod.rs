//! Native launch of tasks on a prepared root filesystem: namespaces, cgroups, pivot_root and
//! exec, done by a small single-threaded supervisor (`caisson-shim`) per task, so that the
//! launcher (CLI or agent) may die at any time without the task noticing.
//!
//! The launcher side is [`Runtime`]: [`Runtime::launch`] records the task under
//! `<root>/containers/<id>/`, spawns the supervisor (which detaches into its own session) and
//! returns once the task's init has exec'd (or the launch failed). [`Runtime::info`],
//! [`Runtime::list`], [`Runtime::kill`], [`Runtime::stop`] and [`Runtime::remove`] work on the
//! recorded state, from any process, at any later time.
//!
//! Launching an image task (the caller prepares the root filesystem, e.g. an overlay mount,
//! and hands over the paths to clean up when the task is removed):
//!
//! ```no_run
//! use containerizer::launch::{process_from_image, ProcessOverrides, Runtime, TaskSpec};
//! # fn f(image_config: &oci_spec::image::Config, merged: std::path::PathBuf,
//! #      upper: std::path::PathBuf) -> Result<(), containerizer::launch::LaunchError> {
//! let process = process_from_image(
//!     Some(image_config),
//!     &ProcessOverrides { cmd: vec!["/bin/true".into()], ..Default::default() },
//! )?;
//! let rt = Runtime::new("/var/lib/caisson");
//! let mut task = rt.launch(TaskSpec {
//!     image: "docker.io/library/busybox:latest".into(),
//!     rootfs: merged.clone(),
//!     cleanup: vec![merged, upper],
//!     process,
//!     ..Default::default()
//! })?;
//! let state = task.wait()?; // exit code, signal, OOM flag, usage, per-phase timings
//! task.finish();
//! # let _ = state; Ok(()) }
//! ```
//!
//! Process model: the launcher spawns `caisson-shim <task dir>` (found next to the current
//! executable, or `$CAISSON_SHIM`), or hands the task to a supervisor it started ahead
//! ([`standby`]: the CLI starts it before preparing the root filesystem, long-running launchers
//! keep one ready). The shim calls setsid (so it survives the launcher's death,
//! `kill -9` included) and clone3s the task's init into new pid, mount, uts, ipc (and net)
//! namespaces. On v2 the shim creates the cgroup first and the init is born in it
//! (`CLONE_INTO_CGROUP`). On v1 and hybrid hosts the launcher creates the cgroup (only the
//! hierarchies the task needs) and starts the RCU grace period a migration costs on a spare
//! thread ([`crate::cgroups::prime_migration`]); the shim moves the init into its cgroups
//! while the init does its mounts, and the init waits for that before exec. With
//! `auto_remove`, the shim makes the task vanish (unmount, rename into `<root>/trash`, release
//! the name), reports, and deletes the files after the launcher has gone on. The init ([`child`]) mounts, pivot_roots, drops capabilities, sets
//! `no_new_privs` and the seccomp filter, and execs, writing its stdout/stderr straight into
//! the log files. The shim reaps it and writes `state.json` (exit code, signal, OOM, usage).
pub mod child;
pub mod console;
pub mod exec;
pub mod guard;
pub mod hooks;
pub mod sandbox;
pub mod shim;
pub mod spare;
pub mod spec;
pub mod standby;
pub mod state;
pub mod userns;
pub mod wasm;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::Serialize;

pub use spec::{
    process_from_image, Hook, Hooks, Limits, Mount, NetworkMode, Process, ProcessOverrides,
    TaskSpec, Volume,
};
pub use state::{Status, TaskConfig, TaskDir, TaskState, Timings};
pub use userns::{IdMapping, UserNamespace, UsernsMode};

use crate::cgroups::{CgroupError, TaskCgroup};

/// Name of the supervisor binary, looked up next to the current executable.
pub const SHIM_NAME: &str = "caisson-shim";

/// Errors of the launch layer.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Invalid(String),
    #[error("no container with name or ID {0:?} found")]
    NotFound(String),
    #[error("{0:?} matches more than one container")]
    Ambiguous(String),
    #[error("a task with id {0} already exists")]
    Exists(String),
    #[error("the container name {0:?} is already in use")]
    NameInUse(String),
    #[error("container {0} is running: stop it first or use --force")]
    Running(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("{message}")]
    Start { code: i32, message: String },
    #[error("supervisor: {0}")]
    Shim(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LaunchError {
    /// podman's exit code convention: 125 for errors of the runtime itself, 126 when the
    /// command cannot be invoked, 127 when it cannot be found.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::Start { code, .. } => *code,
            _ => 125,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LaunchError {
    let context = context.into();
    move |source| LaunchError::Io { context, source }
}

/// Everything known about one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskInfo {
    pub id: String,
    pub name: String,
    pub dir: PathBuf,
    pub spec: TaskSpec,
    pub state: TaskState,
}

/// A task whose init has exec'd. Dropping it detaches from the supervisor.
#[derive(Debug)]
pub struct Launched {
    pub id: String,
    pub name: String,
    /// The task's init pid on the host.
    pub pid: i32,
    /// The launch's phases, as the supervisor reported them with `started` (also in
    /// `state.json`, written just after).
    pub timings: Option<Box<Timings>>,
    pub dir: PathBuf,
    shim: Option<Child>,
    stdin: Option<ChildStdin>,
    events: BufReader<ChildStdout>,
    console: Option<console::Console>,
}

/// A supervisor's `started PID [TIMINGS-JSON]` line: the pid and the timings, if any.
pub(crate) fn parse_started(line: &str) -> Option<(i32, Option<Timings>)> {
    let rest = line.strip_prefix("started ")?;
    let (pid, timings) = match rest.split_once(' ') {
        Some((pid, json)) => (pid, serde_json::from_str(json).ok()),
        None => (rest, None),
    };
    Some((pid.parse().ok()?, timings))
}

impl Launched {
    /// The task's streams, when launched with [`Runtime::launch_attached`].
    pub fn take_console(&mut self) -> Option<console::Console> {
        self.console.take()
    }

    /// Blocks until the task exits; returns its exit code (128+signal when killed). Survives
    /// the supervisor dying (then the recorded state decides).
    pub fn wait(&mut self) -> Result<TaskState, LaunchError> {
        self.wait_until(None)
            .expect("a wait without a deadline ends with the task")
    }

    /// [`Launched::wait`], giving up after `timeout` (None: the task still runs).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<Result<TaskState, LaunchError>> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    fn wait_until(&mut self, deadline: Option<Instant>) -> Option<Result<TaskState, LaunchError>> {
        use std::os::fd::AsFd;
        let mut line = String::new();
        loop {
            // Lines come whole (one write each): once the pipe is readable, a line or EOF is.
            if let (Some(d), true) = (deadline, self.events.buffer().is_empty()) {
                let left = d.saturating_duration_since(Instant::now()).as_millis();
                let ms = nix::poll::PollTimeout::try_from(left.min(i32::MAX as u128) as i32)
                    .unwrap_or(nix::poll::PollTimeout::MAX);
                let mut fds = [nix::poll::PollFd::new(
                    self.events.get_ref().as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, ms) {
                    Ok(0) => return None,
                    Err(nix::errno::Errno::EINTR) => continue,
                    _ => {}
                }
            }
            line.clear();
            match self.events.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.starts_with("exited ") => break,
                Ok(_) => continue,
            }
        }
        Some(self.ended(&line))
    }

    /// The task's final state from its `exited` line, or from its record.
    fn ended(&self, line: &str) -> Result<TaskState, LaunchError> {
        // `exited CODE STATE`: the final state is on the line (older supervisors: only the
        // code; the state is then read back from the record).
        if let Some(st) = shim::parse_exited(line) {
            return Ok(st);
        }
        let td = TaskDir::new(self.dir.clone());
        let st = td.read_state().map_err(io_err("reading the task state"))?;
        Ok(refresh(st, &td))
    }

    /// [`Launched::finish`] for a launcher that exits right after (the CLI): its supervisor is
    /// left to be reparented, not reaped by a thread started for it (~0.1 ms at the end of
    /// every foreground `run`).
    pub fn finish_before_exit(mut self) {
        drop(self.shim.take());
        self.finish();
    }

    /// Detaches from a task that goes on, for a launcher that exits right after (`run -d`):
    /// as dropping it, without a thread to reap the supervisor.
    pub fn leave(mut self) {
        drop(self.shim.take());
    }

    /// Lets the supervisor finish: with `auto_remove` it removes the task now, and this returns
    /// once the task is gone from view (unmounted, renamed away, name released: the supervisor
    /// closes its stdout), while the supervisor deletes the files on its own. The supervisor
    /// is reaped when it ends (see `Drop`).
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let mut line = String::new();
        loop {
            line.clear();
            match self.events.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.shim.take() {
            // The supervisor is our child: reap it when it ends so that a long-running launcher
            // (the agent) does not collect zombies. A short-lived one (the CLI) simply exits and
            // the supervisor is reparented.
            if !matches!(c.try_wait(), Ok(Some(_))) {
                let _ = std::thread::Builder::new()
                    .name("shim-reaper".into())
                    .stack_size(64 * 1024)
                    .spawn(move || c.wait());
            }
        }
    }
}

/// The launcher side: task records under `<root>/containers`.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    shim: PathBuf,
    warm: Option<Arc<WarmPool>>,
    sandboxes: Option<Arc<sandbox::Pool>>,
}

/// What [`Runtime::launch_in_sandbox`] did.
#[derive(Debug)]
pub enum WarmLaunch {
    /// The task took a warm sandbox (or failed in it; the sandbox is gone either way).
    Launched(Result<Launched, LaunchError>),
    /// No sandbox fits or is ready: the spec back, to launch on the cold path.
    Cold(Box<TaskSpec>),
}

/// One standby supervisor kept ready ([`standby`]), shared by a runtime's clones.
#[derive(Debug, Default)]
struct WarmPool {
    spare: Mutex<Option<standby::Standby>>,
    /// A standby is being started (on a background thread).
    filling: AtomicBool,
    /// Signalled when a start ends (with or without a standby).
    filled: Condvar,
    /// Start the next standby after each launch (long-running launchers).
    refill: bool,
    /// Standbys make no network namespace ahead (their task joins one made for it).
    no_netns: bool,
    /// Long-running launchers: standbys are forked by one server instead of each exec'd
    /// (started at the first need; None again after it failed, to be restarted).
    server: Mutex<Option<standby::ForkServer>>,
}

impl WarmPool {
    fn take(&self) -> Option<standby::Standby> {
        // One being started now is nearer than a fresh exec; with a fork server, a fork now is
        // as near (and a refill on idle CPU time can wait long on a busy machine). The server's
        // lock held means a fork in progress (by a refill): the launch does not wait for it.
        let forks = match self.server.try_lock() {
            Ok(s) => s.is_some(),
            Err(std::sync::TryLockError::WouldBlock) => true,
            Err(std::sync::TryLockError::Poisoned(_)) => false,
        };
        let mut spare = self.spare.lock().ok()?;
        let wait = if forks { 0 } else { 100 };
        let deadline = Instant::now() + Duration::from_millis(wait);
        while spare.is_none() && self.filling.load(Ordering::Acquire) {
            let left = deadline.checked_duration_since(Instant::now())?;
            spare = self.filled.wait_timeout(spare, left).ok()?.0;
        }
        let mut c = spare.take()?;
        drop(spare);
        // One that died meanwhile (killed, or its launcher's pipe broke) is no use.
        c.alive().then_some(c)
    }

    /// A standby forked now by the fork server (started at the first call), for long-running
    /// launchers only; None when that fails (the server is restarted at the next call).
    fn forked(&self, shim: &Path) -> Option<standby::Standby> {
        // `CAISSON_FORK_SERVER=0`: every standby exec'd (as before the fork server).
        if !self.refill || std::env::var_os("CAISSON_FORK_SERVER").is_some_and(|v| v == "0") {
            return None;
        }
        let mut server = self.server.lock().ok()?;
        if server.is_none() {
            match standby::ForkServer::start(shim) {
                Ok(s) => *server = Some(s),
                Err(e) => {
                    tracing::warn!("starting a fork server {}: {e}", shim.display());
                    return None;
                }
            }
        }
        match server.as_ref()?.standby(!self.no_netns) {
            Ok(st) => Some(st),
            Err(e) => {
                tracing::warn!("the supervisors' fork server failed: {e}");
                *server = None;
                None
            }
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        // A spare standby ends at EOF on its stdin (dropped); the fork server is killed.
        drop(self.spare.get_mut().ok().and_then(Option::take));
    }
}

impl Runtime {
    /// A runtime keeping its records under `root`, with the supervisor binary from
    /// `$CAISSON_SHIM` or next to the current executable.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let shim = companion_program(Some("CAISSON_SHIM"), SHIM_NAME);
        Runtime {
            root: root.into(),
            shim,
            warm: None,
            sandboxes: None,
        }
    }

    /// Keeps one supervisor started ahead of its task ([`standby`]): a launch then skips the
    /// supervisor's exec and start-up and, for a task with a network namespace of its own,
    /// that namespace's creation. For long-running launchers (agent, benchmarks); the first
    /// launch starts the first standby, or call [`Runtime::prewarm`].
    pub fn with_warm_supervisor(mut self) -> Self {
        let mut pool = WarmPool::default();
        pool.refill = true;
        self.warm = Some(Arc::new(pool));
        self
    }

    /// Standbys make no network namespace ahead: for a launcher whose tasks join namespaces
    /// made for them (CNI). Call right after [`Runtime::with_warm_supervisor`].
    pub fn without_netns_ahead(mut self) -> Self {
        if let Some(p) = self.warm.as_mut().and_then(Arc::get_mut) {
            p.no_netns = true;
        }
        self
    }

    /// For a process that launches one task (the CLI): starts that task's supervisor now, in
    /// standby ([`standby`]), so that its start-up (and, with `netns_ahead`, the task's network
    /// namespace) is done while the caller prepares the launch (root filesystem, records)
    /// instead of after. `netns_ahead == false` for a task that joins a namespace made for it
    /// (CNI). No other standby follows; an unused one exits when the runtime is dropped.
    pub fn with_supervisor_started_early(mut self, netns_ahead: bool) -> Self {
        let mut pool = WarmPool::default();
        pool.no_netns = !netns_ahead;
        self.warm = Some(Arc::new(pool));
        self.start_standby(true);
        self
    }

    /// The pid of the standby supervisor ready for the next launch, if any.
    pub fn standby_pid(&self) -> Option<u32> {
        let pool = self.warm.as_ref()?;
        let spare = pool.spare.lock().ok()?;
        spare.as_ref().map(|s| s.pid)
    }

    /// Starts a standby supervisor now if warm supervisors are on and none is ready (in the
    /// background: returns at once).
    pub fn prewarm(&self) {
        if self.warm.as_ref().is_some_and(|p| p.refill) {
            self.start_standby(false);
        }
    }

    /// Starts a standby on a thread of its own. `elsewhere` (a process that launches one task
    /// now): the thread is moved to another CPU at once. Left to the scheduler it starts on
    /// this thread's CPU and waits there until this one sleeps (0.3-0.7 ms of a `caisson
    /// run`, measured), while the other CPU idles.
    fn start_standby(&self, elsewhere: bool) {
        let Some(pool) = &self.warm else { return };
        if pool.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, shim) = (pool.clone(), self.shim.clone());
        let me = nix::unistd::Pid::from_raw(0);
        let moves = elsewhere
            .then(|| {
                let all = nix::sched::sched_getaffinity(me).ok()?;
                let here = nix::sched::sched_getcpu().ok()?;
                let mut others = all;
                others.unset(here).ok()?;
                (others != nix::sched::CpuSet::new()).then_some((all, others))
            })
            .flatten();
        // The thread gives itself all CPUs back (its standby inherits its mask) once moved.
        let (moved, on_the_move) = std::sync::mpsc::sync_channel::<()>(1);
        let all = moves.as_ref().map(|(all, _)| *all);
        let spawned = std::thread::Builder::new()
            .name("shim-standby".into())
            .stack_size(64 * 1024)
            .spawn({
                let pool = pool.clone();
                move || {
                    if let Some(all) = all {
                        let _ = on_the_move.recv();
                        let _ = nix::sched::sched_setaffinity(me, &all);
                    }
                    let empty = pool.spare.lock().map(|s| s.is_none()).unwrap_or(false);
                    if empty {
                        // A fork by the server first, under the normal policy (this thread
                        // holds the server's lock meanwhile, which a launch may wait for).
                        // Else an exec'd standby, started only on CPU time nothing else wants,
                        // so that it does not slow a running task or launch (it leaves
                        // SCHED_IDLE itself before making the network namespace; the launch
                        // that takes it makes sure): this thread, and so the process it
                        // starts, inherit SCHED_IDLE.
                        let st = pool.forked(&shim).map(Ok).unwrap_or_else(|| {
                            if pool.refill {
                                let _ = crate::sys::launch::set_idle_scheduling(0, true);
                            }
                            standby::spawn(&shim, !pool.no_netns).map(standby::Standby::spawned)
                        });
                        match st {
                            Ok(c) => {
                                if let Ok(mut s) = pool.spare.lock() {
                                    *s = Some(c);
                                }
                            }
                            Err(e) => tracing::warn!(
                                "starting a standby supervisor {}: {e}",
                                shim.display()
                            ),
                        }
                    }
                    let _guard = pool.spare.lock();
                    pool.filling.store(false, Ordering::Release);
                    pool.filled.notify_all();
                }
            });
        match (&spawned, &moves) {
            (Ok(thread), Some((_, others))) => {
                let _ = crate::sys::launch::set_thread_affinity(thread, others);
                let _ = moved.send(());
            }
            (Ok(_), None) => {}
            (Err(_), _) => pool.filling.store(false, Ordering::Release),
        }
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The supervisor binary (`caisson-shim`) this runtime starts.
    pub fn shim(&self) -> &Path {
        &self.shim
    }

    /// Uses `shim` as the supervisor binary.
    pub fn with_shim(mut self, shim: impl Into<PathBuf>) -> Self {
        self.shim = shim.into();
        self
    }

    fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }

    fn task_dir(&self, id: &str) -> TaskDir {
        TaskDir::new(self.containers().join(id))
    }

    /// Launches `spec` and returns once its init has exec'd. On failure nothing is left behind.
    pub fn launch(&self, spec: TaskSpec) -> Result<Launched, LaunchError> {
        self.launch_with(spec, false)
    }

    /// As [`Runtime::launch`], with the task's stdin (`interactive`) and terminal (`tty`)
    /// attached to the returned task's [`Launched::take_console`] from its first byte.
    pub fn launch_attached(&self, spec: TaskSpec) -> Result<Launched, LaunchError> {
        self.launch_with(spec, true)
    }

    /// Warm sandboxes ([`sandbox`]): keeps `n` sandboxes of `image` (a reference in the image
    /// store under the state root) ready, refilled in the background after each launch that
    /// takes one. Launch through [`Runtime::launch_in_sandbox`]. Unused sandboxes are torn
    /// down when the last clone of this runtime is dropped (or its process dies).
    pub fn with_warm_sandboxes(mut self, image: impl Into<String>, n: usize) -> Self {
        let pool = Arc::new(sandbox::Pool::new(image.into(), n));
        pool.fill_in_background(&self.root, &self.shim);
        self.sandboxes = Some(pool);
        self
    }

    /// Whether a launch that takes a sandbox starts making the next one in the background
    /// (the default); without, call [`Runtime::fill_sandboxes`] (e.g. between timed launches).
    pub fn sandbox_refill(self, on: bool) -> Self {
        if let Some(p) = &self.sandboxes {
            p.refill.store(on, Ordering::Release);
        }
        self
    }

    /// Makes sandboxes until the wanted number is ready; returns how many are.
    pub fn fill_sandboxes(&self) -> Result<usize, LaunchError> {
        let Some(pool) = &self.sandboxes else {
            return Ok(0);
        };
        pool.fill(&self.root, &self.shim)?;
        Ok(pool.ready())
    }

    /// Sandboxes ready now.
    pub fn ready_sandboxes(&self) -> usize {
        self.sandboxes.as_ref().map_or(0, |p| p.ready())
    }

    /// Launches `spec` in a warm sandbox if it fits ([`sandbox::fits`]: among others
    /// `spec.image` is the sandboxes' image and `spec.rootfs` is empty, the sandbox brings its
    /// root) and one is ready; returns once the task runs, as [`Runtime::launch`]. Otherwise
    /// gives the spec back for the cold path (prepare its root, then [`Runtime::launch`]).
    pub fn launch_in_sandbox(&self, spec: TaskSpec) -> WarmLaunch {
        let Some(pool) = self
            .sandboxes
            .as_ref()
            .filter(|p| sandbox::fits(&spec, &p.image))
        else {
            return WarmLaunch::Cold(Box::new(spec));
        };
        let Some(sb) = pool.take() else {
            if pool.refill.load(Ordering::Acquire) {
                pool.fill_in_background(&self.root, &self.shim);
            }
            return WarmLaunch::Cold(Box::new(spec));
        };
        let res = self.launch_sandboxed(spec, sb);
        if pool.refill.load(Ordering::Acquire) {
            pool.fill_in_background(&self.root, &self.shim);
        }
        WarmLaunch::Launched(res)
    }

    fn launch_sandboxed(
        &self,
        mut spec: TaskSpec,
        sb: sandbox::Sandbox,
    ) -> Result<Launched, LaunchError> {
        let started_ns = crate::sys::launch::monotonic_ns();
        spec.rootfs = sb.rootfs.clone();
        spec.cleanup = vec![sb.owned.clone()];
        spec.rootfs_prepare_us = None;
        // A task without an id of its own takes the sandbox's: its cgroup, hostname, /etc
        // files and name index entry are then made already (nothing to rename or rewrite).
        if spec.id.is_empty() {
            spec.id = sb.id.clone();
        }
        let sandbox::Sandbox {
            id: sid,
            dir: sdir,
            owned,
            mut child,
            stdin,
            mut events,
            made,
            ..
        } = sb;
        let give_up = |mut stdin: Option<ChildStdin>, child: &mut Child| {
            // EOF: an unclaimed supervisor removes the sandbox; a claimed one has reported.
            drop(stdin.take());
            let _ = child.wait();
            let _ = TaskCgroup::load(&sid).destroy(Duration::from_secs(5));
            state::cleanup_owned(&[owned.clone(), sdir.clone()]);
        };
        let same_id = spec.id == sid;
        let name_ahead = same_id.then(|| sandbox::name_file(&sdir));
        let td = match self.admit_with(&mut spec, name_ahead.as_deref()) {
            Ok(td) => td,
            Err(e) => {
                give_up(Some(stdin), &mut child);
                return Err(e);
            }
        };
        let (id, name) = (spec.id.clone(), spec.name.clone());
        let mut stdin = Some(stdin);
        let res = (|| {
            // The records first, in place (no new inodes), while the directory is still the
            // sandbox's and no one else reads it; then the renames make it the task's.
            let sandbox_td = TaskDir::new(sdir.clone());
            if !made.files_fit(&spec) {
                write_task_files(&sandbox_td, &spec)?;
            }
            sandbox_td
                .write_records_in_place(
                    &TaskConfig {
                        spec: spec.clone(),
                        launch_started_ns: started_ns,
                        wasm_host_pid: None,
                        wasm_host_start_ticks: None,
                        wasm_host_since_ms: None,
                    },
                    &TaskState::created(state::now_ms()),
                )
                .map_err(io_err("writing the records"))?;
            sandbox::hand_over_cgroup(&sid, &id)?;
            if spec.limits.memory.is_some() {
                let cg = TaskCgroup::open(&id, &spec.limits, false)
                    .ok_or_else(|| LaunchError::Shim("the sandbox's cgroup is gone".into()))?;
                cg.apply_limits(&spec.limits)?;
            }
            // Made before the directory is the task's: a launcher that dies between the rename
            // and the handover leaves a task that never starts.
            let mut msg = standby::handover_line(&td.dir, 0)
                .ok_or_else(|| LaunchError::Invalid("task directory path".into()))
                .and_then(|line| {
                    child::claim_message(&line, &spec)
                        .map_err(|e| LaunchError::Invalid(format!("the task spec: {e}")))
                })?;
            fs::rename(&sdir, &td.dir).map_err(io_err(format!("taking {}", sdir.display())))?;
            standby::set_handover_time(&mut msg, crate::sys::launch::monotonic_ns());
            // Straight to the waiting init (it reads the supervisor's stdin).
            stdin
                .as_mut()
                .expect("stdin")
                .write_all(&msg)
                .map_err(io_err("handing the task to its sandbox"))?;
            let reply = sandbox::first_reply(&mut events);
            if reply.starts_with("started ") {
                return parse_started(&reply)
                    .ok_or_else(|| LaunchError::Shim(format!("bad reply {reply:?}")));
            }
            Err(start_failure(&reply, &td))
        })();
        match res {
            Ok((pid, timings)) => Ok(Launched {
                id,
                name,
                pid,
                timings: timings.map(Box::new),
                dir: td.dir.clone(),
                shim: Some(child),
                stdin,
                events,
                console: None,
            }),
            Err(e) => {
                sandbox::drain(&mut events);
                give_up(stdin, &mut child);
                let _ = fs::remove_dir_all(&td.dir);
                let _ = TaskCgroup::load(&id).destroy(Duration::from_secs(5));
                td.release_name(&name, &id);
                Err(e)
            }
        }
    }

    /// Validates `spec`, completes its id, name and hostname, and reserves its name; returns
    /// its (not yet created) directory.
    fn admit(&self, spec: &mut TaskSpec) -> Result<TaskDir, LaunchError> {
        self.admit_with(spec, None)
    }

    /// [`Runtime::admit`]; with `name_ahead`, a name index entry made ahead for this task's id
    /// (a warm sandbox's, with the state root's directories): linked into the index when the
    /// task keeps its default name.
    fn admit_with(
        &self,
        spec: &mut TaskSpec,
        name_ahead: Option<&Path>,
    ) -> Result<TaskDir, LaunchError> {
        validate(spec)?;
        if spec.id.is_empty() {
            spec.id = new_id();
        } else if !valid_name(&spec.id) || spec.id.len() > 128 {
            return Err(LaunchError::Invalid(format!(
                "invalid task id {:?}",
                spec.id
            )));
        }
        let short: String = spec.id.chars().take(12).collect();
        if spec.name.is_empty() {
            spec.name = short.clone();
        }
        if spec.hostname.is_empty() {
            spec.hostname = short;
        }
        if name_ahead.is_none() {
            state::prepare_state_dirs(&self.root).map_err(io_err("creating the state root"))?;
            // (Again each time, cheaply: one made once may have been removed since.)
            fs::create_dir_all(self.containers()).map_err(io_err("creating the state root"))?;
        }
        let td = self.task_dir(&spec.id);
        if td.dir.exists() {
            return Err(LaunchError::Exists(spec.id.clone()));
        }
        // Names are unique through an index of files created (or linked) exclusively.
        let entry = td.name_file(&spec.name);
        let claim = || self.claim_name(&entry, &spec.id, name_ahead);
        let in_use = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AlreadyExists;
        match claim() {
            // An entry that holds the name for nobody (its launch died half-way, or a host
            // crash emptied it) gives way, once.
            Err(e) if in_use(&e) && state::take_over_stale_name(&self.root, &entry) => {
                tracing::info!("took over the stale name entry {}", entry.display());
                claim()
            }
            r => r,
        }
        .map_err(|e| match in_use(&e) {
            true => LaunchError::NameInUse(spec.name.clone()),
            false => io_err("creating the name index entry")(e),
        })?;
        Ok(td)
    }

    /// Creates the name index entry `entry` holding `id` exclusively, or links the one a warm
    /// sandbox made `ahead`. `AlreadyExists` when the name is taken.
    fn claim_name(&self, entry: &Path, id: &str, ahead: Option<&Path>) -> std::io::Result<()> {
        if let Some(ahead) = ahead {
            match fs::hard_link(ahead, entry) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(e),
                // (The index's directory gone, say: as without.)
                Err(_) => {
                    state::prepare_state_dirs(&self.root)?;
                    fs::create_dir_all(self.containers())?;
                }
            }
        }
        fs::create_dir_all(entry.parent().expect("names dir"))?;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(entry)?;
        f.write_all(id.as_bytes())
    }

    fn launch_with(&self, mut spec: TaskSpec, attach: bool) -> Result<Launched, LaunchError> {
        let started_ns = crate::sys::launch::monotonic_ns();
        // Once per process: without it every v1 cgroup migration waits for an RCU grace period.
        let favoring = crate::cgroups::favor_dynamic_modifications().is_on();
        let td = self.admit(&mut spec)?;
        let (id, name) = (spec.id.clone(), spec.name.clone());
        // A spare made by an ended task's supervisor, else made here.
        let made = match spare::claim(&self.root, spare::Kind::of_task(&spec), &td.dir) {
            true => Ok(()),
            false => fs::create_dir(&td.dir),
        };
        let res = made
            .map_err(io_err(format!("creating {}", td.dir.display())))
            .and_then(|()| {
                // On cgroup v1 the first cgroup.procs write of the launch waits for an RCU grace
                // period (milliseconds under load) while holding the cgroup mutex. Create the
                // cgroup now, then start that grace period on a spare thread
                // (`cgroups::prime_migration`): it runs while we spawn the supervisor and the
                // init sets up its mounts, and the supervisor only has to move the init in.
                // (On v2 the supervisor creates it and clones into it.)
                if !crate::cgroups::is_v2() {
                    TaskCgroup::create_with_devices(&spec.id, &spec.limits, &spec.devices.allow)?;
                    // With favordynmods a migration has no grace period to wait for.
                    if !favoring {
                        let _ = std::thread::Builder::new()
                            .name("cgroup-prime".into())
                            .stack_size(64 * 1024)
                            .spawn(crate::cgroups::prime_migration);
                    }
                }
                self.prepare_and_spawn(&td, spec, started_ns, attach)
            });
        if res.is_err() {
            let _ = fs::remove_dir_all(&td.dir);
            let _ = TaskCgroup::load(&id).destroy(Duration::from_secs(5));
            td.release_name(&name, &id);
        }
        res
    }

    fn prepare_and_spawn(
        &self,
        td: &TaskDir,
        spec: TaskSpec,
        started_ns: u64,
        attach: bool,
    ) -> Result<Launched, LaunchError> {
        write_task_files(td, &spec)?;
        let id = spec.id.clone();
        let name = spec.name.clone();
        let (interactive, tty) = (spec.interactive, spec.tty);
        td.write_state(&TaskState::created(state::now_ms()))
            .map_err(io_err("writing the state"))?;
        td.write_config(&TaskConfig {
            spec,
            launch_started_ns: started_ns,
            wasm_host_pid: None,
            wasm_host_start_ticks: None,
            wasm_host_since_ms: None,
        })
        .map_err(io_err("writing the config"))?;
        let shim_log = fs::File::create(td.shim_log()).map_err(io_err("creating shim.log"))?;
        // An attached console needs a supervisor spawned with it: no standby then.
        let wants_console = attach && (interactive || tty);
        let pool = self.warm.as_ref().filter(|_| !wants_console);
        let hand_over = |mut c: standby::Standby| {
            let line = standby::handover_line(&td.dir, crate::sys::launch::monotonic_ns())?;
            // Never let a task inherit SCHED_IDLE: a standby that cannot leave it is not used.
            let normal = crate::sys::launch::set_idle_scheduling(c.pid as i32, false).is_ok();
            match c
                .stdin
                .as_mut()
                .filter(|_| normal)
                .map(|s| s.write_all(&line))
            {
                Some(Ok(())) => Some(c),
                _ => {
                    c.kill();
                    None
                }
            }
        };
        let mut warm = pool.and_then(|p| p.take()).and_then(hand_over);
        if warm.is_none() {
            // None ready: a long-running launcher's fork server makes one now (no exec).
            warm = pool.and_then(|p| p.forked(&self.shim)).and_then(hand_over);
        }
        let mut console = None;
        let (shim, stdin, stdout) = match warm {
            Some(mut c) => (c.child.take(), c.stdin.take(), c.stdout.take()),
            None => {
                let mut cmd = guard::shim_command(&self.shim);
                cmd.arg(&td.dir)
                    .arg(crate::sys::launch::monotonic_ns().to_string())
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(shim_log);
                // The supervisor's end of the console is inherited (not close-on-exec) for
                // the one spawn; a foreground `run`, the only caller, spawns nothing else
                // meanwhile.
                let pair = match wants_console {
                    true => {
                        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                            .map_err(io_err("creating the console socket"))?;
                        nix::fcntl::fcntl(
                            &theirs,
                            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                        )
                        .map_err(|e| io_err("creating the console socket")(e.into()))?;
                        cmd.env(console::FD_ENV, theirs.as_raw_fd().to_string());
                        Some((ours, theirs))
                    }
                    false => None,
                };
                let spawned = cmd.spawn();
                console = pair.map(|(ours, theirs)| {
                    drop(theirs);
                    console::Console::new(ours)
                });
                let mut c = spawned.map_err(io_err(format!("starting {}", self.shim.display())))?;
                let (stdin, stdout) = (c.stdin.take(), c.stdout.take());
                (Some(c), stdin, stdout)
            }
        };
        let mut events = BufReader::new(stdout.expect("piped stdout"));
        let mut line = String::new();
        let _ = events.read_line(&mut line);
        let line = line.trim_end();
        // The next launch's supervisor starts while this task runs (or fails).
        self.prewarm();
        if line.starts_with("started ") {
            let (pid, timings) = parse_started(line)
                .ok_or_else(|| LaunchError::Shim(format!("bad reply {line:?}")))?;
            return Ok(Launched {
                id,
                name,
                pid,
                timings: timings.map(Box::new),
                dir: td.dir.clone(),
                shim,
                stdin,
                events,
                console,
            });
        }
        drop(stdin);
        if let Some(mut c) = shim {
            let _ = c.wait();
        }
        Err(start_failure(line, td))
    }

    /// All tasks, oldest first.
    pub fn list(&self) -> Result<Vec<TaskInfo>, LaunchError> {
        let mut out = vec![];
        let rd = match fs::read_dir(self.containers()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("listing containers")(e)),
        };
        for entry in rd.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            if let Ok(info) = self.info(&id) {
                out.push(info);
            }
        }
        out.sort_by_key(|t| t.state.created_ms);
        Ok(out)
    }

    /// Resolves a full id, a unique id prefix or a name to an id.
    pub fn resolve(&self, id_or_name: &str) -> Result<String, LaunchError> {
        if id_or_name.is_empty() {
            return Err(LaunchError::NotFound(id_or_name.into()));
        }
        let all = self.list()?;
        if let Some(t) = all
            .iter()
            .find(|t| t.id == id_or_name || t.name == id_or_name)
        {
            return Ok(t.id.clone());
        }
        let matches: Vec<&TaskInfo> = all
            .iter()
            .filter(|t| t.id.starts_with(id_or_name))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.id.clone()),
            [] => Err(LaunchError::NotFound(id_or_name.into())),
            _ => Err(LaunchError::Ambiguous(id_or_name.into())),
        }
    }

    /// The record of task `id` (a full id), with its liveness checked.
    ///
    /// A record that is there but does not parse (empty or cut short after a host crash: records
    /// are not fsynced) still makes a task: lost, with [`state::RECORD_UNREADABLE`] as its
    /// reason and what was wrong as its error, so that `ps -a` shows it and `rm` (or an
    /// agent's recovery) removes what it holds. Without a readable config only its id and the
    /// conventional `<root>/rootfs/<id>` are known. A missing record is no task yet (a launch
    /// writes its directory's records after making it).
    pub fn info(&self, id: &str) -> Result<TaskInfo, LaunchError> {
        let td = self.task_dir(id);
        let not_found = |_| LaunchError::NotFound(id.into());
        let (spec, config_err) = match td.read_config() {
            Ok(cfg) => (cfg.spec, None),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let rootfs = self.root.join("rootfs").join(id);
                let spec = TaskSpec {
                    id: id.to_string(),
                    cleanup: rootfs.exists().then_some(rootfs).into_iter().collect(),
                    ..Default::default()
                };
                (spec, Some(format!("config.json: {e}")))
            }
            Err(e) => return Err(not_found(e)),
        };
        let state = match (td.read_state(), config_err) {
            (Ok(st), None) => refresh(st, &td),
            (Ok(_), Some(why)) => state::unreadable_record(&td, why),
            (Err(e), why) if e.kind() == std::io::ErrorKind::InvalidData => {
                let why = why.map_or(String::new(), |w| format!("{w}; "));
                state::unreadable_record(&td, format!("{why}state.json: {e}"))
            }
            (Err(_), Some(why)) => state::unreadable_record(&td, why),
            (Err(e), None) => return Err(not_found(e)),
        };
        Ok(TaskInfo {
            id: id.to_string(),
            name: spec.name.clone(),
            dir: td.dir.clone(),
            state,
            spec,
        })
    }

    /// Sends `signal` to the task's init.
    pub fn kill(&self, id: &str, signal: Signal) -> Result<(), LaunchError> {
        let info = self.info(id)?;
        match (info.state.status, info.state.pid) {
            (Status::Running, Some(pid)) => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|e| {
                    LaunchError::Io {
                        context: format!("sending {signal} to {pid}"),
                        source: e.into(),
                    }
                })
            }
            _ => Err(LaunchError::NotRunning(id.into())),
        }
    }

    /// SIGTERM, then after `grace` SIGKILL of every process in the task's cgroup; returns the
    /// final state.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<TaskState, LaunchError> {
        let info = self.info(id)?;
        if info.state.status == Status::Lost {
            // No supervisor: nothing will record an exit, just make sure nothing runs.
            TaskCgroup::load(id).signal_all(Signal::SIGKILL)?;
            return Ok(info.state);
        }
        // Created: the supervisor reports `started` to the launcher before it records it, so
        // a stop right after a launch may see Created; the task is there all the same.
        if !matches!(info.state.status, Status::Running | Status::Created) {
            return Ok(info.state);
        }
        if !grace.is_zero() {
            let _ = self.kill(id, Signal::SIGTERM);
            if let Some(st) = self.wait_terminal(id, grace)? {
                return Ok(st);
            }
        }
        TaskCgroup::load(id).signal_all(Signal::SIGKILL)?;
        match self.wait_terminal(id, Duration::from_secs(10))? {
            Some(st) => Ok(st),
            None => Err(LaunchError::Shim(format!(
                "{id} did not stop after SIGKILL"
            ))),
        }
    }

    /// Waits, for at most `timeout`, until the supervisor has recorded the task as started
    /// (it reports `started` to the launcher first and writes `state.json` right after, so
    /// that launches return sooner); `None` if it has not. A detached `run` waits for it, so
    /// that `ps`/`inspect` right after show the task running with its pid.
    pub fn wait_recorded(&self, id: &str, timeout: Duration) -> Option<TaskState> {
        let td = self.dir(id);
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            match td.read_state() {
                Ok(st) if st.status != Status::Created => return Some(st),
                _ if Instant::now() >= deadline => return None,
                _ => std::thread::sleep(pause),
            }
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// Polls the state until it is terminal, for at most `timeout`.
    pub fn wait_terminal(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<TaskState>, LaunchError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut pause = Duration::from_millis(2);
        loop {
            let st = self.info(id)?.state;
            if st.status.is_terminal() {
                return Ok(Some(st));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Removes a task: its cgroups, its directory (logs, sandbox, records). A running task is
    /// killed first with `force`, refused without.
    pub fn remove(&self, id: &str, force: bool) -> Result<(), LaunchError> {
        let info = self.info(id)?;
        if !info.state.status.is_terminal() {
            if !force {
                return Err(LaunchError::Running(id.into()));
            }
            self.stop(id, Duration::ZERO)?;
        }
        // Let the supervisor finish its bookkeeping before its directory goes away.
        if let (Some(pid), ticks) = (info.state.shim_pid, info.state.shim_start_ticks) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while state::process_alive(pid, ticks) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        TaskCgroup::load(id).destroy(Duration::from_secs(10))?;
        let td = self.task_dir(id);
        let (doomed, dir_left) = shim::move_to_trash(&td, &info.spec);
        td.release_name(&info.name, id);
        let unreadable = info.state.reason.as_deref() == Some(state::RECORD_UNREADABLE);
        if unreadable {
            // Its name and user-namespace slot, if it had them, are known only by their claims.
            state::release_names_of(&self.root, id);
        }
        if info.spec.userns.is_some() || unreadable {
            userns::release(&self.root, id);
        }
        // Its supervisor made the spares it could at the task's end: these are taken only
        // where there is room.
        state::cleanup_owned(&spare::recycle_all(Some(&self.root), doomed));
        if dir_left {
            crate::image::rootfs::remove_ended_dir(&td.dir)
                .map_err(io_err(format!("removing {}", td.dir.display())))?;
        }
        Ok(())
    }

    /// Deletes what supervisors left in `<root>/trash` (a `--rm` task's files are renamed there,
    /// then deleted after the launcher has gone on; a supervisor killed meanwhile leaves them).
    /// Only entries older than `min_age`, so that deletions in progress are left alone.
    /// Spares a supervisor killed while making them left (`spare/.tmp-*`) go too.
    pub fn sweep_trash(&self, min_age: Duration) -> usize {
        let trash = self.root.join("trash");
        let spares = self.root.join(spare::DIR);
        let half_made = fs::read_dir(&spares)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .as_encoded_bytes()
                    .starts_with(spare::TMP_PREFIX.as_bytes())
            });
        let entries = fs::read_dir(&trash).into_iter().flatten().flatten();
        let now = std::time::SystemTime::now();
        let mut old = vec![];
        for e in entries.chain(half_made) {
            let age = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if age.is_some_and(|a| a >= min_age) {
                old.push(e.path());
            }
        }
        for p in &old {
            state::unmount_under(p);
        }
        state::cleanup_owned(&old);
        old.len()
    }

    /// The task's directory (logs are `stdout.log` and `stderr.log` in it).
    pub fn dir(&self, id: &str) -> TaskDir {
        self.task_dir(id)
    }
}

/// The task's generated files: `etc/{hostname,hosts,resolv.conf}` (written in place: in a warm
/// sandbox they are bind mounted already), the sandbox directory, the hooks' bundle.
pub(crate) fn write_task_files(td: &TaskDir, spec: &TaskSpec) -> Result<(), LaunchError> {
    fs::create_dir_all(td.etc()).map_err(io_err("creating etc"))?;
    fs::create_dir_all(td.sandbox()).map_err(io_err("creating the sandbox"))?;
    let w = |name: &str, data: &[u8]| {
        state::write_in_place(&td.etc().join(name), data)
            .map_err(io_err(format!("writing etc/{name}")))
    };
    w("hostname", format!("{}\n", spec.hostname).as_bytes())?;
    match &spec.hosts_file {
        Some(h) => w("hosts", h.as_bytes())?,
        None => w(
            "hosts",
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                spec.hostname
            )
            .as_bytes(),
        )?,
    }
    match &spec.resolv_conf {
        Some(r) => w("resolv.conf", r.as_bytes())?,
        None => w(
            "resolv.conf",
            &fs::read("/etc/resolv.conf").unwrap_or_default(),
        )?,
    }
    if !spec.hooks.is_empty() {
        hooks::write_bundle(td, spec).map_err(io_err("writing the hooks' bundle"))?;
    }
    if let Some(u) = &spec.userns {
        // The task's root owns its sandbox and /etc files, as root does without a namespace.
        let (uid, gid) = u.host_root();
        let own = |p: PathBuf| {
            std::os::unix::fs::chown(&p, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", p.display())))
        };
        own(td.sandbox())?;
        for f in ["hostname", "hosts", "resolv.conf"] {
            own(td.etc().join(f))?;
        }
    }
    Ok(())
}

/// Marks a task whose supervisor is gone without a terminal record as lost.
fn refresh(mut st: TaskState, td: &TaskDir) -> TaskState {
    if st.status.is_terminal() {
        return st;
    }
    let alive = match st.shim_pid {
        Some(pid) => state::process_alive(pid, st.shim_start_ticks),
        // Supervisor not started yet: give the launcher time.
        None => state::now_ms().saturating_sub(st.created_ms) < 30_000,
    };
    if alive {
        return st;
    }
    // It may have written its final record just now.
    if let Ok(again) = td.read_state() {
        if again.status.is_terminal() {
            return again;
        }
    }
    st.status = Status::Lost;
    st.reason = Some("supervisor gone".into());
    st
}

/// podman's rule for names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The error for a supervisor that did not report `started`: its `failed CODE MESSAGE` line,
/// or else what it logged before it went.
fn start_failure(reply: &str, td: &TaskDir) -> LaunchError {
    if let Some(rest) = reply.strip_prefix("failed ") {
        let (code, msg) = rest.split_once(' ').unwrap_or((rest, ""));
        return LaunchError::Start {
            code: code.parse().unwrap_or(125),
            message: msg.to_string(),
        };
    }
    let log = fs::read_to_string(td.shim_log()).unwrap_or_default();
    LaunchError::Shim(format!("exited without reporting: {}", log.trim()))
}

fn validate(spec: &TaskSpec) -> Result<(), LaunchError> {
    if !spec.name.is_empty() && !valid_name(&spec.name) {
        return Err(LaunchError::Invalid(format!(
            "invalid container name {:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
            spec.name
        )));
    }
    if let Some(run) = &spec.wasm {
        wasm::validate(run)?;
        return spec.limits.validate().map_err(Into::into);
    }
    if spec.process.args.is_empty() {
        return Err(LaunchError::Invalid("no command specified".into()));
    }
    let meta = fs::metadata(&spec.rootfs)
        .map_err(|e| LaunchError::Invalid(format!("rootfs {}: {e}", spec.rootfs.display())))?;
    if !meta.is_dir() || !spec.rootfs.is_absolute() {
        return Err(LaunchError::Invalid(format!(
            "rootfs {} must be an absolute path to a directory",
            spec.rootfs.display()
        )));
    }
    if let Some(u) = &spec.userns {
        u.validate()
            .map_err(|e| LaunchError::Invalid(format!("user namespace: {e}")))?;
        if !spec.hooks.is_empty() {
            return Err(LaunchError::Invalid(
                "a user namespace with OCI hooks is not supported".into(),
            ));
        }
    }
    if let Some(ns) = &spec.netns {
        if spec.network != NetworkMode::None {
            return Err(LaunchError::Invalid(
                "a network namespace to join needs network mode none".into(),
            ));
        }
        if !crate::sys::netns::is_netns(ns) {
            return Err(LaunchError::Invalid(format!(
                "{} is not a network namespace",
                ns.display()
            )));
        }
    }
    for v in &spec.volumes {
        fs::metadata(&v.source).map_err(|e| {
            LaunchError::Invalid(format!("invalid volume source {}: {e}", v.source.display()))
        })?;
    }
    for m in &spec.mounts {
        if !m.target.starts_with('/') {
            return Err(LaunchError::Invalid(format!(
                "mount target {:?} is not an absolute path",
                m.target
            )));
        }
        let f = m
            .flags()
            .map_err(|e| LaunchError::Invalid(format!("mount on {}: {e}", m.target)))?;
        if f.bind {
            fs::metadata(&m.source).map_err(|e| {
                LaunchError::Invalid(format!("mount source {}: {e}", m.source.display()))
            })?;
        }
    }
    // Hooks run in the host's view must exist now (startContainer's resolve in the task).
    let h = &spec.hooks;
    for (point, list) in [
        ("createRuntime", &h.create_runtime),
        ("createContainer", &h.create_container),
        ("poststart", &h.poststart),
        ("poststop", &h.poststop),
    ] {
        for hook in list.iter() {
            use std::os::unix::fs::PermissionsExt;
            match fs::metadata(&hook.path) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => {
                    return Err(LaunchError::Invalid(format!(
                        "{point} hook {}: not an executable file",
                        hook.path.display()
                    )))
                }
                Err(e) => {
                    return Err(LaunchError::Invalid(format!(
                        "{point} hook {}: {e}",
                        hook.path.display()
                    )))
                }
            }
        }
    }
    if !spec.process.cwd.starts_with('/') {
        return Err(LaunchError::Invalid(format!(
            "the working directory {:?} is invalid, it needs to be an absolute path",
            spec.process.cwd
        )));
    }
    if spec.hostname.len() > 64 {
        return Err(LaunchError::Invalid("hostname longer than 64 bytes".into()));
    }
    spec.limits.validate()?;
    Ok(())
}

/// One of caisson's programs: the path in `$ENV` (when `env` names one and it is set), else
/// `name` next to the running executable, else `name` (looked up on PATH).
pub fn companion_program(env: Option<&str>, name: &str) -> PathBuf {
    env.and_then(std::env::var_os)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(|d| d.join(name)))
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

/// A new random 64-hex-digit task id.
pub fn new_id() -> String {
    // Straight from the kernel (one getrandom): a thread-local generator's first use costs a
    // CLI its seeding and its CPU probes.
    use rand::TryRngCore;
    let mut bytes = [0u8; 32];
    if rand::rngs::OsRng.try_fill_bytes(&mut bytes).is_err() {
        bytes = rand::random();
    }
    hex::encode(bytes)
}

/// Copies what was appended to `path` since `*offset` into `out`; returns the bytes copied.
pub fn copy_new(path: &Path, offset: &mut u64, out: &mut dyn Write) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(*offset))?;
    let mut buf = Vec::new();
    let n = f.read_to_end(&mut buf)? as u64;
    if n > 0 {
        out.write_all(&buf)?;
        out.flush()?;
        *offset += n;
    }
    Ok(n)
}
