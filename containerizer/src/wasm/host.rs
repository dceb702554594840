//! The shared Wasm host: one long-lived process per agent that runs many Wasm command tasks
//! in-process, each on a thread of its own, instantiated from the engine's template cache
//! (microseconds) instead of a supervisor and a host process per task (milliseconds).
//!
//! The agent talks to it over a unix stream socket in its state directory, one JSON object per
//! line ([`Request`] down, [`Event`] up). The host runs in its own session, so it outlives a
//! `kill -9` of the agent; the restarted agent connects again, learns from [`Event::Hello`]
//! which tasks still run, and finds the fate of the others in their records.
//!
//! Each task keeps the records of a supervised task, under `<root>/containers/<id>/`:
//! `config.json` (a [`crate::launch::wasm::wasm_task`] spec, with the host's pid as
//! `wasm_host_pid`: how the agent tells which tasks live in the shared host; with the host's
//! start time, it also stands for the running record, with the host as the task's
//! "supervisor", so a dead host shows the task lost), `state.json` (written once, at the end:
//! exit code, reason and CPU time), `stdout.log` and `stderr.log` (each created at the
//! guest's first write to it) and the `sandbox/` the guest sees as `/`.
//!
//! What differs from a supervised task: the tasks share the host's cgroup, so a task's CPU time
//! is its thread's CPU clock (`usage.cpu_ns`, instantiation included) and there is no per-task
//! CPU limit; `--memory` and the timeout are enforced by the engine (limiter, epoch), and a kill
//! stops the guest at its next epoch check. A guest blocked in a host call (a sleep, a read)
//! stops when that call returns: the host cannot end one thread the way the per-task host
//! ends its whole process.
//!
//! The host exits once it has no agent connected and no task running (never before its first
//! connection, unless none comes within [`HostConfig::first_connection`]). SIGTERM/SIGINT stop
//! every task (as terminated by the signal), record them, and exit.
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Engine, EngineConfig, ExitStatus, KillSwitch, Preopen, RunSpec, Source, Stdio};
use crate::cgroups::Usage;
use crate::launch::state::Timings;
use crate::launch::state::{now_ms, process_start_ticks, Status, TaskConfig, TaskDir, TaskState};

/// The socket's file name in the agent's state directory.
pub const SOCKET: &str = "wasm-host.sock";

/// From the agent to the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Record task `id` in `dir` (created by the host) and run it. Idempotent by id.
    Run {
        id: String,
        dir: PathBuf,
        /// What the task was asked to run (an image reference or the module), for display.
        image: String,
        spec: Box<RunSpec>,
    },
    /// Stop task `id`: as SIGTERM at once, as a kill after `grace_ms` (at once when 0).
    Kill { id: String, grace_ms: u64 },
}

/// From the host to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// First on every connection: the host's pid and the tasks it is running now. A task sent
    /// earlier and not listed has ended: its `state.json` says how.
    Hello { pid: i32, running: Vec<String> },
    /// The task is recorded as running and its guest is being instantiated.
    Started { id: String, timings: Timings },
    /// The task could not start (the module does not load, a preopen is missing...): recorded
    /// as failed.
    Failed {
        id: String,
        code: i32,
        message: String,
    },
    /// The task ended; `state` is its terminal record, as written to `state.json`.
    Exited { id: String, state: Box<TaskState> },
}

#[derive(Debug, Clone)]
pub struct HostConfig {
    pub socket: PathBuf,
    pub cache_dir: Option<PathBuf>,
    /// Tasks that can run at once (the engine's instance pool).
    pub max_instances: u32,
    /// Exit if no agent has connected by then.
    pub first_connection: Duration,
}

impl HostConfig {
    pub fn new(socket: PathBuf) -> Self {
        HostConfig {
            socket,
            cache_dir: None,
            max_instances: 1000,
            first_connection: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("wasm host socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Engine(#[from] super::Error),
}

struct Conn {
    generation: u64,
    stream: UnixStream,
}

#[derive(Default)]
struct State {
    conn: Option<Conn>,
    generation: u64,
    ever_connected: bool,
    running: HashMap<String, Arc<TaskCtl>>,
}

/// A running task, as the host's other threads see it.
struct TaskCtl {
    kill: KillSwitch,
    dir: PathBuf,
    /// Its directory exists (before that, a missing directory means "not yet", not "removed").
    recorded: std::sync::atomic::AtomicBool,
    /// Set by whoever records the task's end first: its thread, or a kill that gave up waiting
    /// for a guest stuck in a host call.
    settled: std::sync::atomic::AtomicBool,
}

impl TaskCtl {
    fn settle(&self) -> bool {
        !self.settled.swap(true, std::sync::atomic::Ordering::SeqCst)
    }
}

/// How long a killed guest may stay in a host call before its end is recorded anyway.
const KILL_GRACE: Duration = Duration::from_millis(500);

/// The stack of the threads that may record a task's end (`give_up`): reading and writing its
/// records takes more than the 64 KiB the other helper threads have (a debug build overflowed
/// it reading the config).
const GIVE_UP_STACK: usize = 512 << 10;

struct Host {
    engine: Engine,
    pool: Pool,
    pid: i32,
    ticks: Option<u64>,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An event as sent: serialized before the state lock is taken (the task threads contend
/// for it; `send` only writes under it).
fn line(ev: &Event) -> Vec<u8> {
    let mut line = serde_json::to_vec(ev).expect("events serialize");
    line.push(b'\n');
    line
}

fn send(st: &mut State, line: &[u8]) {
    if let Some(c) = &mut st.conn {
        if c.stream.write_all(line).is_err() {
            // The agent is gone; its reader sees the end and clears the connection.
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Runs the host until it has no agent and no task (see the module docs). The caller has
/// blocked `stop_signals` in every thread; they are waited for on a thread of our own.
pub fn serve(cfg: HostConfig, stop_signals: nix::sys::signal::SigSet) -> Result<(), HostError> {
    let engine = Engine::new(EngineConfig {
        cache_dir: cfg.cache_dir.clone(),
        max_instances: cfg.max_instances,
        ..EngineConfig::default()
    })?;
    let sock_err = |source| HostError::Socket {
        path: cfg.socket.clone(),
        source,
    };
    // A stale socket of a dead host: the agent only starts us when connecting failed.
    let _ = fs::remove_file(&cfg.socket);
    let listener = UnixListener::bind(&cfg.socket).map_err(sock_err)?;
    let pid = std::process::id() as i32;
    let host = Arc::new(Host {
        engine,
        pool: Pool::default(),
        pid,
        ticks: process_start_ticks(pid),
        state: Mutex::new(State::default()),
    });
    {
        let h = host.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .stack_size(64 << 10)
            .spawn(move || {
                if let Ok(sig) = stop_signals.wait() {
                    h.stop_all(sig as i32);
                }
            });
        let h = host.clone();
        let _ = std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 << 10)
            .spawn(move || h.watch_records());
        let h = host.clone();
        let wait = cfg.first_connection;
        let _ = std::thread::Builder::new()
            .name("first-conn".into())
            .stack_size(64 << 10)
            .spawn(move || {
                std::thread::sleep(wait);
                let st = lock(&h.state);
                if !st.ever_connected && st.running.is_empty() {
                    tracing::warn!("no agent connected: exiting");
                    std::process::exit(0);
                }
            });
    }
    tracing::info!(socket = %cfg.socket.display(), pid, "shared wasm host ready");
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accept: {e}");
                continue;
            }
        };
        let reader = stream.try_clone().map_err(sock_err)?;
        let generation = {
            let mut st = lock(&host.state);
            st.generation += 1;
            let generation = st.generation;
            if let Some(old) = st.conn.take() {
                let _ = old.stream.shutdown(std::net::Shutdown::Both);
            }
            st.conn = Some(Conn { generation, stream });
            st.ever_connected = true;
            let running = st.running.keys().cloned().collect();
            send(&mut st, &line(&Event::Hello { pid, running }));
            generation
        };
        let h = host.clone();
        let _ = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || h.read_requests(reader, generation));
    }
    Ok(())
}

impl Host {
    fn read_requests(self: Arc<Self>, stream: UnixStream, generation: u64) {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Request>(&line) {
                Ok(Request::Run {
                    id,
                    dir,
                    image,
                    spec,
                }) => self.start(id, dir, image, *spec),
                Ok(Request::Kill { id, grace_ms }) => self.kill(&id, grace_ms),
                Err(e) => tracing::warn!("bad request {line:?}: {e}"),
            }
        }
        let mut st = lock(&self.state);
        if st.conn.as_ref().is_some_and(|c| c.generation == generation) {
            st.conn = None;
        }
        self.exit_if_idle(&st);
    }

    /// No agent and no task: nothing left to do (a restarted agent starts a new host).
    fn exit_if_idle(&self, st: &State) {
        if st.conn.is_none() && st.running.is_empty() && st.ever_connected {
            tracing::info!("no agent and no task left: exiting");
            std::process::exit(0);
        }
    }

    /// A task whose records were removed (`rm -f`, or the agent's whole state directory) is
    /// killed: nothing could report it any more.
    fn watch_records(self: Arc<Self>) {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let orphans: Vec<String> = lock(&self.state)
                .running
                .iter()
                .filter(|(_, c)| {
                    c.recorded.load(std::sync::atomic::Ordering::SeqCst) && !c.dir.exists()
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in orphans {
                tracing::warn!(task = %id, "its records are gone: killing it");
                self.kill(&id, 0);
            }
        }
    }

    fn start(self: &Arc<Self>, id: String, dir: PathBuf, image: String, spec: RunSpec) {
        let received = Instant::now();
        let ctl = Arc::new(TaskCtl {
            kill: KillSwitch::new(),
            dir: dir.clone(),
            recorded: Default::default(),
            settled: Default::default(),
        });
        {
            let mut st = lock(&self.state);
            if st.running.contains_key(&id) {
                return;
            }
            st.running.insert(id.clone(), ctl.clone());
        }
        let me = self.clone();
        self.pool.run(Box::new(move || {
            me.run_task(id, dir, image, spec, ctl, received)
        }));
    }

    /// Stops the guest at its next epoch check: as terminated by SIGTERM when `grace_ms` > 0
    /// (a kill after the grace), as killed otherwise. A guest still inside a host call (a
    /// sleep) `KILL_GRACE` later is recorded so without waiting for it, as the per-task host
    /// does: its thread finishes the call, stops at its next epoch check, and is ignored.
    fn kill(self: &Arc<Self>, id: &str, grace_ms: u64) {
        let Some(ctl) = lock(&self.state).running.get(id).cloned() else {
            tracing::debug!(task = %id, "kill: not running");
            return;
        };
        tracing::debug!(task = %id, grace_ms, "kill");
        if grace_ms == 0 {
            ctl.kill.kill();
        } else {
            ctl.kill.terminate(nix::sys::signal::Signal::SIGTERM as i32);
        }
        let me = self.clone();
        let id = id.to_string();
        let _ = std::thread::Builder::new()
            .name("kill-grace".into())
            .stack_size(GIVE_UP_STACK)
            .spawn(move || {
                // A guest in Wasm code cannot ignore either stop: no later SIGKILL is needed.
                std::thread::sleep(KILL_GRACE);
                let status = if grace_ms > 0 {
                    ExitStatus::Terminated {
                        signal: nix::sys::signal::Signal::SIGTERM as i32,
                    }
                } else {
                    ExitStatus::Killed
                };
                me.give_up(&id, &ctl, status);
            });
    }

    /// Records the end of a task whose guest is still inside a host call past a kill or its
    /// timeout (its thread is left to finish the call and is then ignored), unless it ended
    /// meanwhile.
    fn give_up(&self, id: &str, ctl: &TaskCtl, status: ExitStatus) {
        if !ctl.settle() {
            return;
        }
        let td = TaskDir::new(ctl.dir.clone());
        let mut state = td
            .read_state()
            .unwrap_or_else(|_| TaskState::created(now_ms()));
        state.status = Status::Exited;
        state.exit_code = Some(status.exit_code());
        if let ExitStatus::Terminated { signal } = status {
            state.signal = Some(signal);
        }
        state.reason = Some(format!("{status} (in a host call)"));
        state.finished_ms = Some(now_ms());
        // Ended as far as anyone is concerned (as `finish` records it).
        state.shim_pid = None;
        state.shim_start_ticks = None;
        let _ = append(
            &td.stderr_log(),
            &format!("caisson-wasm: {status} (in a host call)\n"),
        );
        let ev = Event::Exited {
            id: id.to_string(),
            state: Box::new(state.clone()),
        };
        self.finish(id, &td, state, ev);
    }

    fn stop_all(&self, signal: i32) {
        tracing::info!(signal, "stopping every task");
        for k in lock(&self.state).running.values() {
            k.kill.terminate(signal);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && !lock(&self.state).running.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::process::exit(0);
    }

    fn run_task(
        self: Arc<Self>,
        id: String,
        dir: PathBuf,
        image: String,
        spec: RunSpec,
        ctl: Arc<TaskCtl>,
        received: Instant,
    ) {
        let td = TaskDir::new(dir);
        let created = now_ms();
        let mut state = TaskState::created(created);
        let mut timings = Timings::default();
        let prepared = self.prepare(&td, &id, &image, &spec, &mut state);
        ctl.recorded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let (task, program) = match prepared {
            Ok(p) => p,
            Err((code, message)) => {
                ctl.settle();
                self.fail_launch(&id, &td, state, code, message);
                return;
            }
        };
        timings.prepare_us = received.elapsed().as_micros() as u64;
        timings.total_us = timings.prepare_us;
        state.status = Status::Running;
        state.shim_pid = Some(self.pid);
        state.shim_start_ticks = self.ticks;
        state.started_ms = Some(now_ms());
        state.timings = timings.clone();
        // No running record: the config written by `prepare` stands for it (see
        // `TaskDir::read_state`); `state.json` is written once, at the end.
        let started = line(&Event::Started {
            id: id.clone(),
            timings,
        });
        send(&mut lock(&self.state), &started);

        if let Some(ms) = spec.timeout_ms {
            // The epoch deadline stops a guest in Wasm code; this one, a guest in a host call.
            let (me, ctl, id) = (self.clone(), ctl.clone(), id.clone());
            let _ = std::thread::Builder::new()
                .name("timeout".into())
                .stack_size(GIVE_UP_STACK)
                .spawn(move || {
                    std::thread::sleep(Duration::from_millis(ms) + KILL_GRACE);
                    me.give_up(&id, &ctl, ExitStatus::Timeout { after_ms: ms });
                });
        }
        let mut task = task;
        task.kill = Some(ctl.kill.clone());
        let cpu0 = crate::sys::wasm::thread_cpu_ns();
        let status = self.engine.run(&program, task);
        let cpu_ns = crate::sys::wasm::thread_cpu_ns().saturating_sub(cpu0);
        if !ctl.settle() {
            return; // a kill already recorded it
        }
        let status = match status {
            Ok(s) => s,
            // Stdio or preopen setup: the guest never ran.
            Err(e) => {
                let code = e.exit_code();
                let message = e.to_string();
                self.fail_launch(&id, &td, state, code, message);
                return;
            }
        };
        match &status {
            ExitStatus::Exited { .. } => {}
            ExitStatus::Trap { message, backtrace } => {
                let mut m = format!("caisson-wasm: {}: {message}\n", spec.module.display());
                if !backtrace.is_empty() {
                    m.push_str(backtrace);
                    m.push('\n');
                }
                let _ = append(&td.stderr_log(), &m);
            }
            other => {
                let _ = append(
                    &td.stderr_log(),
                    &format!("caisson-wasm: {}: {other}\n", spec.module.display()),
                );
            }
        }
        let code = status.exit_code();
        state.status = Status::Exited;
        state.exit_code = Some(code);
        if let ExitStatus::Terminated { signal } = status {
            state.signal = Some(signal);
        }
        let (reason, error) = crate::launch::wasm::outcome(code, None, Some(&status));
        state.reason = reason;
        state.error = error;
        state.oom_killed = matches!(status, ExitStatus::MemoryLimit { .. });
        state.usage = Some(Usage {
            cpu_ns,
            ..Usage::default()
        });
        // Ended: nothing to supervise any more (and `rm` must not wait for the host).
        state.shim_pid = None;
        state.shim_start_ticks = None;
        state.finished_ms = Some(now_ms());
        let ev = Event::Exited {
            id: id.clone(),
            state: Box::new(state.clone()),
        };
        self.finish(&id, &td, state, ev);
    }

    /// Records the task and loads its program. On failure: (exit code, message).
    fn prepare(
        &self,
        td: &TaskDir,
        id: &str,
        image: &str,
        spec: &RunSpec,
        state: &mut TaskState,
    ) -> Result<(super::TaskSpec, super::Program), (i32, String)> {
        let io = |what: &str, e: io::Error| (super::EXIT_HOST_ERROR, format!("{what}: {e}"));
        // The containers directory exists after the first task: two mkdirs, not create_dir_all's
        // failed one first.
        let mkdir = |d: &Path| match fs::create_dir(d) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(d),
            r => r,
        };
        mkdir(&td.dir)
            .and_then(|()| mkdir(&td.sandbox()))
            .map_err(|e| io("creating the task directory", e))?;
        let mut ts = crate::launch::wasm::wasm_task(spec.clone());
        ts.id = id.to_string();
        ts.name = id.to_string();
        ts.image = image.to_string();
        // Plain writes into the new directory: nothing reads the task before its state.json
        // exists, and that is written (atomically) after these.
        let config = serde_json::to_vec(&TaskConfig {
            spec: ts,
            launch_started_ns: crate::sys::launch::monotonic_ns(),
            wasm_host_pid: Some(self.pid),
            wasm_host_start_ticks: self.ticks,
            wasm_host_since_ms: Some(state.created_ms),
        })
        .map_err(|e| io("writing the config", io::Error::other(e)))?;
        fs::write(td.config(), config).map_err(|e| io("writing the config", e))?;
        // Until the guest runs, a crash of the host leaves a record that says so.
        state.shim_pid = Some(self.pid);
        state.shim_start_ticks = self.ticks;
        let mut run = spec.clone();
        if !run.preopens.iter().any(|p| p.guest == "/") {
            run.preopens.insert(
                0,
                Preopen {
                    host: td.sandbox(),
                    guest: "/".into(),
                    read_only: false,
                },
            );
        }
        let mut task = run
            .to_task()
            .map_err(|e| (super::EXIT_HOST_ERROR, e.to_string()))?;
        task.stdin = Stdio::Null;
        // Created at the guest's first write: most tasks write one stream or none.
        task.stdout = Stdio::PathOnWrite(td.stdout_log());
        task.stderr = Stdio::PathOnWrite(td.stderr_log());
        let program = self
            .engine
            .load(&Source::Path(spec.module.clone()))
            .map_err(|e| (e.exit_code(), e.to_string()))?;
        Ok((task, program))
    }

    /// Writes the terminal record, then tells the agent (if one is connected), in this order:
    /// a task missing from a later Hello has its fate on disk.
    /// Records a task whose guest never ran (bad module, stdio, preopens) and reports it.
    fn fail_launch(
        &self,
        id: &str,
        td: &TaskDir,
        mut state: TaskState,
        code: i32,
        message: String,
    ) {
        let _ = append(&td.stderr_log(), &format!("caisson-wasm: {message}\n"));
        state.status = Status::Failed;
        state.exit_code = Some(code);
        state.error = Some(message.clone());
        state.reason = Some("launch failed".into());
        state.finished_ms = Some(now_ms());
        let ev = Event::Failed {
            id: id.to_string(),
            code,
            message,
        };
        self.finish(id, td, state, ev);
    }

    fn finish(&self, id: &str, td: &TaskDir, mut state: TaskState, ev: Event) {
        state.shim_pid = None;
        state.shim_start_ticks = None;
        if let Err(e) = td.write_state(&state) {
            tracing::error!(task = %id, "writing state: {e}");
        }
        let ev = line(&ev);
        let mut st = lock(&self.state);
        st.running.remove(id);
        send(&mut st, &ev);
        self.exit_if_idle(&st);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Task threads, kept for reuse: a burst of short tasks runs on a few threads (about two per
/// CPU, started at once) instead of a thread each (a burst of 256 used to start over a hundred
/// on two CPUs, which then mostly woke each other). A task that blocks (a sleep) holds its
/// thread: when jobs wait and none has started for `GROW_AFTER`, a monitor adds threads
/// (doubling), so blocked tasks never hold up the others for long. Idle threads beyond
/// `KEEP_IDLE` end after `IDLE_EXIT`.
#[derive(Default)]
struct Pool {
    inner: Arc<(Mutex<PoolState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct PoolState {
    jobs: std::collections::VecDeque<Job>,
    /// Threads blocked waiting for a job.
    waiting: usize,
    threads: usize,
    /// Jobs taken by a thread so far (the monitor's measure of progress).
    started: u64,
    /// A monitor thread is watching the queue.
    monitor: bool,
}

const KEEP_IDLE: usize = 4;
const IDLE_EXIT: Duration = Duration::from_secs(10);
const GROW_AFTER: Duration = Duration::from_millis(1);

fn pool_lock(m: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Threads started as soon as jobs wait (more only through the monitor). Worked out once:
/// `available_parallelism` reads the cgroup's CPU quota files, not for every task.
fn eager_threads() -> usize {
    static EAGER: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *EAGER.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
}

impl Pool {
    fn run(&self, job: Job) {
        let (m, cv) = &*self.inner;
        let mut st = pool_lock(m);
        st.jobs.push_back(job);
        if st.waiting > 0 {
            cv.notify_one();
            return;
        }
        if st.threads < eager_threads() {
            drop(st);
            spawn_workers(&self.inner, 1);
            return;
        }
        if !st.monitor {
            st.monitor = true;
            drop(st);
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("wasm-pool".into())
                .stack_size(64 << 10)
                .spawn(move || monitor(inner));
            if spawned.is_err() {
                pool_lock(m).monitor = false;
                spawn_workers(&self.inner, 1);
            }
        }
    }
}

fn spawn_workers(inner: &Arc<(Mutex<PoolState>, std::sync::Condvar)>, n: usize) {
    for _ in 0..n {
        pool_lock(&inner.0).threads += 1;
        let inner2 = inner.clone();
        let spawned = std::thread::Builder::new()
            .name("wasm-task".into())
            .spawn(move || worker(inner2));
        if let Err(e) = spawned {
            tracing::error!("task thread: {e}");
            pool_lock(&inner.0).threads -= 1;
            return;
        }
    }
}

/// Runs while jobs wait: if none started during a `GROW_AFTER`, every thread is held (blocked
/// guests, or long ones): as many more threads as there are (at most one per waiting job).
fn monitor(inner: Arc<(Mutex<PoolState>, std::sync::Condvar)>) {
    let mut seen = pool_lock(&inner.0).started;
    loop {
        std::thread::sleep(GROW_AFTER);
        let mut st = pool_lock(&inner.0);
        if st.jobs.is_empty() {
            st.monitor = false;
            return;
        }
        let grow = if st.started == seen && st.waiting == 0 {
            st.jobs.len().min(st.threads.max(1))
        } else {
            0
        };
        seen = st.started;
        drop(st);
        if grow > 0 {
            tracing::debug!(grow, "every task thread is held: more threads");
            spawn_workers(&inner, grow);
        }
    }
}

fn worker(inner: Arc<(Mutex<PoolState>, std::sync::Condvar)>) {
    let (m, cv) = &*inner;
    let mut st = pool_lock(m);
    loop {
        if let Some(job) = st.jobs.pop_front() {
            st.started += 1;
            drop(st);
            job();
            st = pool_lock(m);
            continue;
        }
        st.waiting += 1;
        let (next, timeout) = cv
            .wait_timeout_while(st, IDLE_EXIT, |s| s.jobs.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        st = next;
        st.waiting -= 1;
        if timeout.timed_out() && st.jobs.is_empty() && st.threads > KEEP_IDLE {
            st.threads -= 1;
            return;
        }
    }
}

fn append(path: &Path, text: &str) -> io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// The agent's end of the socket: connects and reads the [`Event::Hello`].
pub fn connect(socket: &Path) -> io::Result<(UnixStream, BufReader<UnixStream>, i32, Vec<String>)> {
    let stream = UnixStream::connect(socket)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    match parse_event(&line) {
        Some(Event::Hello { pid, running }) => Ok((stream, reader, pid, running)),
        _ => Err(io::Error::other(format!(
            "the wasm host did not say hello (got {:?})",
            line.trim()
        ))),
    }
}

/// One request as a line.
pub fn encode(req: &Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(req).expect("requests serialize");
    line.push(b'\n');
    line
}

/// Reads events until the host closes the connection.
pub fn events(reader: BufReader<UnixStream>) -> impl Iterator<Item = Event> {
    reader
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| parse_event(&l))
}

/// An [`Event`] line read as one flat struct: the same wire format, without serde's buffering
/// of an internally tagged enum (every field parsed twice), on the agent's path for every
/// task.
#[derive(Deserialize)]
struct WireEvent {
    ev: String,
    id: Option<String>,
    timings: Option<Timings>,
    state: Option<Box<TaskState>>,
    pid: Option<i32>,
    running: Option<Vec<String>>,
    code: Option<i32>,
    message: Option<String>,
}

fn parse_event(line: &str) -> Option<Event> {
    let w: WireEvent = serde_json::from_str(line).ok()?;
    Some(match w.ev.as_str() {
        "hello" => Event::Hello {
            pid: w.pid?,
            running: w.running?,
        },
        "started" => Event::Started {
            id: w.id?,
            timings: w.timings?,
        },
        "failed" => Event::Failed {
            id: w.id?,
            code: w.code?,
            message: w.message?,
        },
        "exited" => Event::Exited {
            id: w.id?,
            state: w.state?,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        let mut state = TaskState::created(1);
        state.status = Status::Exited;
        state.exit_code = Some(3);
        state.reason = Some("exited".into());
        let events = [
            Event::Hello {
                pid: 7,
                running: vec!["a".into(), "b".into()],
            },
            Event::Started {
                id: "a".into(),
                timings: Timings {
                    prepare_us: 5,
                    total_us: 6,
                    ..Timings::default()
                },
            },
            Event::Failed {
                id: "b".into(),
                code: 2,
                message: "no module".into(),
            },
            Event::Exited {
                id: "a".into(),
                state: Box::new(state),
            },
        ];
        for ev in events {
            let line = serde_json::to_string(&ev).unwrap();
            let back = parse_event(&line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&ev).unwrap()
            );
        }
        assert!(parse_event(r#"{"ev":"later","id":"a"}"#).is_none());
        assert!(parse_event(r#"{"ev":"started"}"#).is_none());
    }
}
