//! The agent daemon: registers with the master over one bidirectional stream, heartbeats,
//! launches tasks through the containerizer, and reports every transition through an on-disk
//! outbox (appended and fsynced before it is sent, resent until acked, in order), so a task's
//! fate survives agent crashes, master restarts and lost connections.
//!
//! Recovery after a restart (even `kill -9`): the outbox is replayed (unacked updates are
//! resent), live tasks are re-adopted (their supervisors kept running), tasks that ended while
//! the agent was away are reported from their records, and the agent reregisters with the full
//! list. A new boot id means the old tasks died with the machine: LOST.
//!
//! Wasm command tasks run in the agent's shared Wasm host (`wasmhost`; one long-lived
//! `caisson-wasm host` process in its own session) rather than under a supervisor each: the
//! agent sends the task over a unix socket and hears back RUNNING and the end; no process,
//! thread or fsync of their own per task. After a restart the agent reconnects to the host and
//! re-adopts the tasks it still runs; a host that dies takes its running tasks to LOST.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use caisson_proto::agent_message::Msg as Up;
use caisson_proto::agent_service_client::AgentServiceClient;
use caisson_proto::master_message::Msg as Down;
use caisson_proto::outbox_record::Rec;
use caisson_proto::*;
use containerizer::launch::{self, Runtime, Status as CStatus};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::launcher::{self as tl, Launcher};
use super::wal::{self, Wal};
use super::wasmhost::{HostEvent, SharedHost};
use super::{is_task_id, now_ms, token_interceptor};

#[derive(Clone)]
pub struct AgentConfig {
    /// `http://host:port` or `https://host:port`.
    pub master: String,
    pub root: PathBuf,
    pub token: String,
    pub resources: Resources,
    pub attributes: HashMap<String, String>,
    /// Launches in flight at once.
    pub parallelism: usize,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Keep ended tasks' containers and logs (the demo shows them, then removes them).
    pub keep_finished: bool,
    /// Where CNI network configurations and plugins are (the global `--cni-*` flags).
    pub cni: crate::network::CniArgs,
    /// Run Wasm command tasks in the agent's shared Wasm host (see `wasmhost`), not under a
    /// supervisor and a host process each.
    pub shared_wasm: bool,
    /// Warm sandboxes of one image (`--warm-sandboxes`), resolved in the store.
    pub warm_sandboxes: Option<super::launcher::WarmImage>,
}

struct Pending {
    status: TaskStatus,
}

/// A launch waiting for one of the agent's launch threads: the task, its spec, when its
/// LaunchTask arrived.
type Job = (String, Option<TaskSpec>, Instant);

struct Outbox {
    wal: Wal,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    by_uuid: HashMap<String, u64>,
    /// Acks of a batch of master messages, recorded together at its end.
    acks: Vec<OutboxRecord>,
}

#[derive(Clone)]
struct Known {
    spec: Option<TaskSpec>,
    state: TaskState,
    killing: bool,
}

pub struct Agent {
    cfg: AgentConfig,
    rt: Runtime,
    launcher: Launcher,
    dir: PathBuf,
    boot_id: String,
    agent_id: Mutex<String>,
    outbox: Mutex<Outbox>,
    durable_tx: mpsc::UnboundedSender<u64>,
    tasks: Mutex<HashMap<String, Known>>,
    /// Native and service launches, for the `parallelism` launch threads (FIFO).
    launches: Mutex<std::sync::mpsc::Sender<Job>>,
    wasm_host: SharedHost,
    /// When each shared-host task's LaunchTask arrived (for its `agent_us`).
    received: Mutex<HashMap<String, Instant>>,
    /// Directories of ended shared-host tasks, for the thread that deletes them.
    shared_rm: Arc<Mutex<std::sync::mpsc::Sender<PathBuf>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_atomic(path: &Path, data: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Removes an ended shared-host task's directory: the files the host writes by name, then the
/// (usually empty) sandbox and the directory; anything else there (a guest's files) by a walk.
/// Fewer system calls than a walk of every directory. Gone already is fine.
fn remove_shared_task_dir(dir: &Path) -> std::io::Result<()> {
    use std::io::ErrorKind::NotFound;
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == NotFound => Ok(()),
        r => r,
    };
    for f in ["config.json", "state.json", "stdout.log", "stderr.log"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let direct = gone(std::fs::remove_dir(dir.join("sandbox")))
        .and_then(|()| gone(std::fs::remove_dir(dir)));
    match direct {
        Ok(()) => Ok(()),
        Err(_) => gone(std::fs::remove_dir_all(dir)),
    }
}

pub fn boot_id() -> String {
    std::env::var("CAISSON_BOOT_ID").unwrap_or_else(|_| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// This host's cpus and memory.
pub fn host_resources() -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    Resources {
        cpus,
        memory_bytes: mem,
        ..Default::default()
    }
}

/// The master's view of how a container ended.
fn terminal_of(st: &launch::TaskState, killing: bool) -> (TaskState, Reason, String) {
    match st.status {
        CStatus::Exited if st.oom_killed => (
            TaskState::Failed,
            Reason::MemoryLimit,
            "killed at its memory limit".into(),
        ),
        CStatus::Exited if killing => (TaskState::Killed, Reason::KilledByUser, "killed".into()),
        CStatus::Exited if st.exit_code == Some(0) => {
            (TaskState::Finished, Reason::Exited, "exited 0".into())
        }
        CStatus::Exited => (
            TaskState::Failed,
            Reason::Exited,
            format!("exited with code {}", st.exit_code.unwrap_or(-1)),
        ),
        CStatus::Failed => (
            TaskState::Failed,
            Reason::LaunchFailed,
            st.error.clone().unwrap_or_else(|| "launch failed".into()),
        ),
        CStatus::Lost | CStatus::Created | CStatus::Running => (
            TaskState::Lost,
            Reason::SupervisorGone,
            "the task's supervisor is gone".into(),
        ),
    }
}

fn timings_of(t: &launch::Timings, agent_us: u64) -> LaunchTimings {
    LaunchTimings {
        rootfs_us: t.rootfs_us.unwrap_or(0),
        spawn_us: t.spawn_us,
        cgroup_us: t.cgroup_us,
        namespaces_us: t.namespaces_us,
        mounts_us: t.mounts_us,
        exec_us: t.exec_us,
        total_us: t.total_us,
        agent_us,
        warm_sandbox: t.warm_sandbox,
    }
}

fn status(id: &str, state: TaskState, reason: Reason, message: impl Into<String>) -> TaskStatus {
    TaskStatus {
        task_id: id.to_string(),
        state: state as i32,
        reason: reason as i32,
        message: message.into(),
        ..Default::default()
    }
}

impl Agent {
    /// Opens the agent's state under `<root>/agent` and recovers (see the module docs).
    pub fn open(cfg: AgentConfig) -> anyhow::Result<(Arc<Agent>, mpsc::UnboundedReceiver<u64>)> {
        let dir = cfg.root.join("agent");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let agent_id = std::fs::read_to_string(dir.join("agent_id"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let boot = boot_id();
        let old_boot = std::fs::read_to_string(dir.join("boot_id"))
            .map(|s| s.trim().to_string())
            .ok();
        let rebooted = old_boot.as_deref().is_some_and(|b| b != boot);
        if old_boot.as_deref() != Some(boot.as_str()) {
            write_atomic(&dir.join("boot_id"), &boot)?;
        }

        // Replay the outbox: what is unacked is resent; what ended is remembered.
        let log = dir.join("outbox.log");
        let records: Vec<OutboxRecord> = wal::read_all(&log)?;
        let mut updates: Vec<TaskStatus> = vec![];
        let mut acked: HashSet<String> = HashSet::new();
        for r in records {
            match r.rec {
                Some(Rec::Update(u)) => updates.push(u),
                Some(Rec::Acked(a)) => {
                    acked.insert(a);
                }
                None => {}
            }
        }
        let mut latest: HashMap<String, TaskState> = HashMap::new();
        let mut ended: HashSet<String> = HashSet::new();
        for u in &updates {
            latest.insert(u.task_id.clone(), u.state());
            if u.state().is_terminal() {
                ended.insert(u.task_id.clone());
            }
        }
        let unacked: Vec<TaskStatus> = updates
            .into_iter()
            .filter(|u| !acked.contains(&u.uuid))
            .collect();
        let compact: Vec<OutboxRecord> = unacked
            .iter()
            .map(|u| OutboxRecord {
                rec: Some(Rec::Update(u.clone())),
            })
            .collect();
        let wal = Wal::open(&log, &compact)?;
        let mut outbox = Outbox {
            wal,
            next_seq: 1,
            pending: BTreeMap::new(),
            by_uuid: HashMap::new(),
            acks: vec![],
        };
        let mut known: HashMap<String, Known> = HashMap::new();
        for u in unacked {
            let seq = outbox.next_seq;
            outbox.next_seq += 1;
            outbox.by_uuid.insert(u.uuid.clone(), seq);
            known.insert(
                u.task_id.clone(),
                Known {
                    spec: None,
                    state: u.state(),
                    killing: false,
                },
            );
            outbox.pending.insert(seq, Pending { status: u });
        }
        let (durable_tx, durable_rx) = mpsc::unbounded_channel();
        // Everything replayed is already on disk.
        let _ = durable_tx.send(outbox.next_seq - 1);
        let parallelism = cfg.parallelism.max(1);
        // Host events are handled on the connection's reader thread (no hop through another
        // thread per event); the agent exists before any connection is made.
        let me_slot: Arc<std::sync::OnceLock<std::sync::Weak<Agent>>> = Arc::default();
        let slot = me_slot.clone();
        let on_event: super::wasmhost::OnEvent = Arc::new(move |ev| {
            if let Some(me) = slot.get().and_then(std::sync::Weak::upgrade) {
                me.on_host_event(ev);
            }
        });
        let (rm_tx, rm_rx) = std::sync::mpsc::channel::<PathBuf>();
        let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("wasm-rm".into())
            .spawn(move || {
                // Deleting ended tasks' records is not on any task's path: on CPU time that
                // launches do not want (a burst's deletions follow it instead of slowing it).
                let _ = containerizer::sys::launch::set_idle_scheduling(0, true);
                for dir in rm_rx {
                    if let Err(e) = remove_shared_task_dir(&dir) {
                        tracing::warn!(dir = %dir.display(), "removing: {e}");
                    }
                }
            })?;
        let agent = Arc::new(Agent {
            shared_rm: Arc::new(Mutex::new(rm_tx)),
            wasm_host: SharedHost::new(&cfg.root, on_event),
            received: Mutex::new(HashMap::new()),
            rt: Runtime::new(&cfg.root),
            launcher: Launcher::new(&cfg.root, cfg.cni.clone(), cfg.warm_sandboxes.clone()),
            cfg,
            dir,
            boot_id: boot,
            agent_id: Mutex::new(agent_id),
            outbox: Mutex::new(outbox),
            durable_tx,
            tasks: Mutex::new(known),
            launches: Mutex::new(job_tx),
        });
        let _ = me_slot.set(Arc::downgrade(&agent));
        // `parallelism` long-lived launch threads rather than a thread per launch (a spawn, a
        // stack mapped and unmapped, per task). Plain threads, not the blocking pool: image
        // pulls start their own runtime.
        let jobs = Arc::new(Mutex::new(job_rx));
        for _ in 0..parallelism {
            let (me, jobs) = (agent.clone(), jobs.clone());
            std::thread::Builder::new()
                .name("task-launch".into())
                .spawn(move || loop {
                    let job = lock(&jobs).recv();
                    match job {
                        Ok((id, spec, received)) => me.clone().launch_blocking(id, spec, received),
                        Err(_) => return,
                    }
                })?;
        }
        agent.recover(rebooted, &latest, &ended)?;
        if agent.cfg.shared_wasm {
            // Start the shared Wasm host now rather than on the first Wasm task, which would
            // otherwise wait for it (a process start and an engine).
            let me = agent.clone();
            std::thread::Builder::new()
                .name("wasm-host-start".into())
                .spawn(move || {
                    if let Err(e) = me.wasm_host.start() {
                        tracing::warn!("starting the shared wasm host: {e}");
                    }
                })?;
        }
        Ok((agent, durable_rx))
    }

    fn recover(
        self: &Arc<Self>,
        rebooted: bool,
        latest: &HashMap<String, TaskState>,
        ended: &HashSet<String>,
    ) -> anyhow::Result<()> {
        let mut seen = HashSet::new();
        let mut shared = vec![];
        for info in self.rt.list()?.into_iter().filter(|t| is_task_id(&t.id)) {
            let id = info.id.clone();
            seen.insert(id.clone());
            if rebooted {
                if !ended.contains(&id) {
                    self.report(
                        status(
                            &id,
                            TaskState::Lost,
                            Reason::AgentRebooted,
                            "the host rebooted",
                        ),
                        None,
                    );
                }
                self.launcher.release(&id);
                let _ = self.rt.remove(&id, true);
                continue;
            }
            if info.state.status.is_terminal() {
                self.launcher.release(&id);
                if ended.contains(&id) {
                    let _ = self.rt.remove(&id, true);
                } else {
                    // It ended while we were away: its record tells how.
                    let st = self.terminal_status(&id, &info.state, false);
                    self.report_then_remove(st);
                }
                continue;
            }
            tracing::info!(task = %id, "re-adopting a live task");
            lock(&self.tasks).insert(
                id.clone(),
                Known {
                    spec: None,
                    state: TaskState::Running,
                    killing: false,
                },
            );
            if latest.get(&id) != Some(&TaskState::Running) {
                let mut st = status(&id, TaskState::Running, Reason::Unspecified, "re-adopted");
                st.timings = Some(timings_of(&info.state.timings, 0));
                self.report(st, None);
            }
            let in_shared_host = self
                .rt
                .dir(&id)
                .read_config()
                .is_ok_and(|c| c.wasm_host_pid.is_some());
            if in_shared_host {
                // Its end comes from the shared host, once we are connected again.
                shared.push(id);
                continue;
            }
            let me = self.clone();
            std::thread::Builder::new()
                .name("task-wait".into())
                .stack_size(256 * 1024)
                .spawn(move || me.watch_adopted(id))?;
        }
        if !shared.is_empty() {
            let ended = self.wasm_host.reattach(&shared).unwrap_or_else(|e| {
                tracing::warn!("reconnecting to the shared wasm host: {e}");
                shared.clone()
            });
            for id in ended {
                self.shared_gone(&id, "the shared Wasm host is gone".into());
            }
        }
        // Launches interrupted before their container existed.
        for (id, state) in latest {
            if !state.is_terminal() && !seen.contains(id) && !ended.contains(id) {
                self.report(
                    status(
                        id,
                        TaskState::Lost,
                        Reason::LaunchFailed,
                        "the agent restarted during the launch",
                    ),
                    None,
                );
            }
        }
        Ok(())
    }

    /// Appends an update to the outbox; it is sent once durable (and again after reconnects
    /// until acked). `on_durable` runs after it is on disk.
    fn report(&self, mut st: TaskStatus, on_durable: Option<Box<dyn FnOnce() + Send>>) {
        st.uuid = hex::encode(rand::random::<[u8; 16]>());
        st.timestamp_ms = now_ms();
        st.agent_id = lock(&self.agent_id).clone();
        {
            let mut tasks = lock(&self.tasks);
            let k = tasks.entry(st.task_id.clone()).or_insert(Known {
                spec: None,
                state: st.state(),
                killing: false,
            });
            k.state = st.state();
        }
        let mut ob = lock(&self.outbox);
        let seq = ob.next_seq;
        ob.next_seq += 1;
        ob.by_uuid.insert(st.uuid.clone(), seq);
        let rec = OutboxRecord {
            rec: Some(Rec::Update(st.clone())),
        };
        ob.pending.insert(seq, Pending { status: st });
        let tx = self.durable_tx.clone();
        ob.wal.append(
            &rec,
            Some(Box::new(move |r| {
                if r.is_ok() {
                    let _ = tx.send(seq);
                    if let Some(f) = on_durable {
                        f();
                    }
                }
            })),
        );
    }

    /// Reports the end of a shared-host task, then deletes its directory once the update is on
    /// disk (no supervisor, cgroup or mount to wait for: one thread does them all).
    fn report_then_remove_shared(self: &Arc<Self>, st: TaskStatus) {
        if self.cfg.keep_finished {
            self.report(st, None);
            return;
        }
        let dir = self.rt.dir(&st.task_id).dir;
        let rm = self.shared_rm.clone();
        self.report(
            st,
            Some(Box::new(move || {
                let _ = lock(&rm).send(dir);
            })),
        );
    }

    /// Reports a terminal update, then removes the container once the update is on disk.
    fn report_then_remove(self: &Arc<Self>, st: TaskStatus) {
        if self.cfg.keep_finished {
            self.report(st, None);
            return;
        }
        let me = self.clone();
        let id = st.task_id.clone();
        self.report(
            st,
            Some(Box::new(move || {
                // Off the log's writer thread: removal unmounts and deletes.
                let _ = std::thread::Builder::new()
                    .name("task-rm".into())
                    .spawn(move || me.remove_task(&id));
            })),
        );
    }

    /// [`Agent::report_then_remove`] on the calling thread (a task's own waiting thread, which
    /// has nothing else to do): no thread of its own per removal. Waits for the update to be
    /// durable; a log that failed to write it leaves the task for the restart to report.
    fn report_then_remove_here(&self, st: TaskStatus) {
        if self.cfg.keep_finished {
            self.report(st, None);
            return;
        }
        let id = st.task_id.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        self.report(
            st,
            Some(Box::new(move || {
                let _ = tx.send(());
            })),
        );
        if rx.recv().is_ok() {
            self.remove_task(&id);
        }
    }

    fn remove_task(&self, id: &str) {
        if let Err(e) = self.rt.remove(id, true) {
            tracing::warn!(task = %id, "removing: {e}");
        }
    }

    fn acked(&self, uuid: &str) {
        let mut ob = lock(&self.outbox);
        let Some(seq) = ob.by_uuid.remove(uuid) else {
            return;
        };
        let Some(p) = ob.pending.remove(&seq) else {
            return;
        };
        // Recorded at the batch's end, with no fsync of its own: lost in a crash, the update is
        // resent and the master ignores it.
        ob.acks.push(OutboxRecord {
            rec: Some(Rec::Acked(uuid.to_string())),
        });
        drop(ob);
        if p.status.state().is_terminal() {
            let mut tasks = lock(&self.tasks);
            if tasks
                .get(&p.status.task_id)
                .is_some_and(|k| k.state.is_terminal())
            {
                tasks.remove(&p.status.task_id);
            }
        }
    }

    /// The end of a batch of master messages (those that arrived together): the shared host
    /// gets its launches and kills in one write, the outbox the acks in one record batch.
    fn end_batch(&self) {
        self.wasm_host.flush();
        let mut ob = lock(&self.outbox);
        if !ob.acks.is_empty() {
            let acks = std::mem::take(&mut ob.acks);
            ob.wal.append_lazy_all(&acks);
        }
    }

    fn killing(&self, id: &str) -> bool {
        lock(&self.tasks).get(id).is_some_and(|k| k.killing)
    }

    fn watch_adopted(self: Arc<Self>, id: String) {
        match self.rt.wait_terminal(&id, Duration::MAX) {
            Ok(Some(st)) => {
                self.launcher.release(&id);
                let u = self.terminal_status(&id, &st, self.killing(&id));
                self.report_then_remove_here(u);
            }
            Ok(None) => {}
            Err(e) => {
                self.report(
                    status(&id, TaskState::Lost, Reason::SupervisorGone, e.to_string()),
                    None,
                );
            }
        }
    }

    fn launch(self: &Arc<Self>, lt: LaunchTask) {
        if self.cfg.shared_wasm
            && lt
                .spec
                .as_ref()
                .is_some_and(|s| TaskKind::try_from(s.kind) == Ok(TaskKind::Wasm))
        {
            return self.launch_shared(lt);
        }
        let id = lt.task_id.clone();
        if !self.claim(&lt) {
            return; // launches are idempotent by task id
        }
        let received = Instant::now();
        self.report(
            status(&id, TaskState::Starting, Reason::Unspecified, ""),
            None,
        );
        let _ = lock(&self.launches).send((id, lt.spec, received));
    }

    fn launch_blocking(self: Arc<Self>, id: String, spec: Option<TaskSpec>, received: Instant) {
        if self.killing(&id) {
            self.report(
                status(
                    &id,
                    TaskState::Killed,
                    Reason::KilledByUser,
                    "killed before it started",
                ),
                None,
            );
            return;
        }
        let spec = spec.unwrap_or_default();
        let mut launched = match self.launcher.start(&id, &spec) {
            Ok(l) => l,
            Err((reason, msg)) => {
                tracing::warn!(task = %id, "launch failed: {msg}");
                self.report(status(&id, TaskState::Failed, reason, msg), None);
                return;
            }
        };
        let timings = self.launcher.running_timings(&launched);
        let mut message = String::new();
        if TaskKind::try_from(spec.kind) == Ok(TaskKind::WasmHttp) {
            // RUNNING means serving: the port accepts connections.
            if let Some(port) = tl::http_port(&spec) {
                if !self
                    .launcher
                    .wait_serving(&id, port, Duration::from_secs(10))
                {
                    message = format!("not accepting connections on port {port} yet");
                }
            }
        }
        let mut running = status(&id, TaskState::Running, Reason::Unspecified, message);
        running.timings = Some(timings_of(&timings, received.elapsed().as_micros() as u64));
        self.report(running, None);
        if self.killing(&id) {
            let _ = self.rt.stop(&id, Duration::ZERO);
        }
        let me = self.clone();
        let holds = tl::holds_outside(&spec);
        let _ = std::thread::Builder::new()
            .name("task-wait".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let st = launched.wait();
                launched.finish();
                if holds {
                    me.launcher.release(&id);
                }
                match st {
                    Ok(st) => {
                        let u = me.terminal_status(&id, &st, me.killing(&id));
                        me.report_then_remove_here(u);
                    }
                    Err(e) => me.report(
                        status(&id, TaskState::Lost, Reason::SupervisorGone, e.to_string()),
                        None,
                    ),
                }
            });
    }

    /// The terminal update of a task from its record, with why it failed when it did.
    fn terminal_status(&self, id: &str, st: &launch::TaskState, killing: bool) -> TaskStatus {
        let (s, r, mut m) = terminal_of(st, killing);
        if s == TaskState::Failed {
            if let Some(why) = st.reason.as_deref().filter(|w| !m.contains(*w)) {
                m = format!("{m}: {why}");
            }
            let tail = self.launcher.stderr_tail(id);
            if !tail.is_empty() && r != Reason::MemoryLimit {
                m = format!("{m} (stderr: {tail})");
            }
        }
        let mut u = status(id, s, r, m);
        u.exit_code = st.exit_code;
        u
    }

    fn kill(self: &Arc<Self>, k: KillTask) {
        {
            let mut tasks = lock(&self.tasks);
            match tasks.get_mut(&k.task_id) {
                Some(t) if !t.state.is_terminal() => t.killing = true,
                _ => return,
            }
        }
        if self.wasm_host.has(&k.task_id) {
            let grace = Duration::from_millis(k.grace_period_ms as u64);
            self.wasm_host.kill(&k.task_id, grace);
            return;
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let grace = Duration::from_millis(k.grace_period_ms as u64);
            // Not started yet: the launch sees `killing` and stops.
            if me.rt.info(&k.task_id).is_ok() {
                if let Err(e) = me.rt.stop(&k.task_id, grace) {
                    tracing::warn!(task = %k.task_id, "kill: {e}");
                }
            }
        });
    }

    /// Records a task as STARTING unless it is known already (or its id is not valid).
    fn claim(&self, lt: &LaunchTask) -> bool {
        let mut tasks = lock(&self.tasks);
        if tasks.contains_key(&lt.task_id) || !is_task_id(&lt.task_id) {
            return false;
        }
        tasks.insert(
            lt.task_id.clone(),
            Known {
                spec: lt.spec.clone(),
                state: TaskState::Starting,
                killing: false,
            },
        );
        true
    }

    /// A Wasm command through the shared host: no supervisor, no process, no thread of ours.
    /// RUNNING and the end come back as host events ([`Agent::on_host_event`]).
    fn launch_shared(self: &Arc<Self>, lt: LaunchTask) {
        let id = lt.task_id.clone();
        if !self.claim(&lt) {
            return; // launches are idempotent by task id
        }
        lock(&self.received).insert(id.clone(), Instant::now());
        // No STARTING update (Mesos's is optional too): RUNNING follows within microseconds,
        // and one update fewer per task is one outbox record, message, store write and ack
        // fewer at both ends. A restart in between still ends well: the task's directory
        // re-adopts it, or the agent no longer knows it and the master's reconciliation makes
        // it LOST.
        let spec = lt.spec.unwrap_or_default();
        let image = spec.image.clone();
        // A module file is resolved here, on the session's thread, and its launch goes out
        // with the others of its batch (`Agent::end_batch`); an image may have to be pulled,
        // on a thread of its own that sends its launch itself.
        let batched = tl::is_module_path(&image);
        let me = self.clone();
        let go = move || {
            let res = me.launcher.wasm_run_spec(&spec).and_then(|run| {
                if me.killing(&id) {
                    return Err((Reason::KilledByUser, "killed before it started".into()));
                }
                me.wasm_host
                    .queue_run(&id, &me.rt.dir(&id).dir, &spec.image, run)
                    .map_err(|e| (Reason::LaunchFailed, format!("shared Wasm host: {e}")))
            });
            if !batched {
                me.wasm_host.flush();
            }
            match res {
                // A kill that came meanwhile: it goes to the host after the launch.
                Ok(()) if me.killing(&id) => me.wasm_host.kill(&id, Duration::ZERO),
                Ok(()) => {}
                Err((reason, msg)) => {
                    lock(&me.received).remove(&id);
                    let state = if reason == Reason::KilledByUser {
                        TaskState::Killed
                    } else {
                        TaskState::Failed
                    };
                    me.report(status(&id, state, reason, msg), None);
                }
            }
        };
        if batched {
            go();
        } else {
            let _ = std::thread::Builder::new()
                .name("task-launch".into())
                .spawn(go);
        }
    }

    fn on_host_event(self: &Arc<Self>, ev: HostEvent) {
        match ev {
            HostEvent::Started { id, timings } => {
                let agent_us = lock(&self.received)
                    .remove(&id)
                    .map_or(0, |t| t.elapsed().as_micros() as u64);
                let mut running = status(&id, TaskState::Running, Reason::Unspecified, "");
                running.timings = Some(timings_of(&timings, agent_us));
                self.report(running, None);
            }
            HostEvent::Exited { id, state } => {
                lock(&self.received).remove(&id);
                let u = self.terminal_status(&id, &state, self.killing(&id));
                self.report_then_remove_shared(u);
            }
            HostEvent::Failed { id, message } => {
                lock(&self.received).remove(&id);
                let mut u = status(&id, TaskState::Failed, Reason::LaunchFailed, message);
                u.exit_code = self.rt.info(&id).ok().and_then(|i| i.state.exit_code);
                self.report_then_remove_shared(u);
            }
            HostEvent::Gone { id, message } => {
                lock(&self.received).remove(&id);
                self.shared_gone(&id, message);
            }
        }
    }

    /// A shared-host task the host can no longer tell us about: its record says how it ended,
    /// or it is lost with the host.
    fn shared_gone(self: &Arc<Self>, id: &str, message: String) {
        match self.rt.dir(id).read_state() {
            Ok(st) if st.status.is_terminal() && st.status != CStatus::Lost => {
                let u = self.terminal_status(id, &st, self.killing(id));
                self.report_then_remove_shared(u);
            }
            _ => {
                let u = status(id, TaskState::Lost, Reason::SupervisorGone, message);
                self.report_then_remove_shared(u);
            }
        }
    }

    /// Handles one message of the master's stream: false once it asks us to shut down.
    fn on_message(
        self: &Arc<Self>,
        m: Result<Option<MasterMessage>, tonic::Status>,
    ) -> anyhow::Result<bool> {
        match m.map_err(anyhow::Error::new)? {
            None => anyhow::bail!("the master closed the stream"),
            Some(MasterMessage { msg: Some(m) }) => match m {
                Down::Launch(lt) => self.launch(lt),
                Down::Kill(k) => self.kill(k),
                Down::Ack(a) => self.acked(&a.uuid),
                Down::Reconcile(_) | Down::Registered(_) => {}
                Down::Shutdown(s) => {
                    tracing::info!("the master asked us to shut down: {}", s.reason);
                    return Ok(false);
                }
            },
            Some(_) => {}
        }
        Ok(true)
    }

    fn register_msg(&self) -> AgentMessage {
        let tasks = lock(&self.tasks)
            .iter()
            .map(|(id, k)| KnownTask {
                task_id: id.clone(),
                state: k.state as i32,
                spec: k.spec.clone(),
            })
            .collect();
        AgentMessage {
            msg: Some(Up::Register(Register {
                agent_id: lock(&self.agent_id).clone(),
                hostname: nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                resources: Some(self.cfg.resources.clone()),
                attributes: self.cfg.attributes.clone(),
                tasks,
                boot_id: self.boot_id.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
            })),
        }
    }

    /// Connects, reconnecting with jittered exponential backoff, until the master says
    /// Shutdown or refuses our token.
    pub async fn run(
        self: Arc<Self>,
        mut durable_rx: mpsc::UnboundedReceiver<u64>,
    ) -> anyhow::Result<()> {
        let mut durable_upto = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match self.session(&mut durable_rx, &mut durable_upto).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    if let Some(s) = e.downcast_ref::<tonic::Status>() {
                        if s.code() == tonic::Code::Unauthenticated {
                            anyhow::bail!("the master refused us: {}", s.message());
                        }
                    }
                    tracing::warn!("master session: {e:#}");
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(
        self: &Arc<Self>,
        durable_rx: &mut mpsc::UnboundedReceiver<u64>,
        durable_upto: &mut u64,
    ) -> anyhow::Result<()> {
        let mut ep = tonic::transport::Endpoint::from_shared(self.cfg.master.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20));
        if let Some(tls) = &self.cfg.tls {
            ep = ep.tls_config(tls.clone())?;
        }
        let channel = ep.connect().await?;
        let mut client =
            AgentServiceClient::with_interceptor(channel, token_interceptor(&self.cfg.token)?);
        let (tx, rx) = mpsc::unbounded_channel::<AgentMessage>();
        tx.send(self.register_msg())?;
        let mut inbound = client
            .session(UnboundedReceiverStream::new(rx))
            .await
            .map_err(anyhow::Error::new)?
            .into_inner();
        let registered = match inbound.message().await.map_err(anyhow::Error::new)? {
            Some(MasterMessage {
                msg: Some(Down::Registered(r)),
            }) => r,
            _ => anyhow::bail!("the master did not answer Registered first"),
        };
        {
            let mut id = lock(&self.agent_id);
            if *id != registered.agent_id {
                write_atomic(&self.dir.join("agent_id"), &registered.agent_id)?;
                *id = registered.agent_id.clone();
            }
        }
        tracing::info!(agent = %registered.agent_id, master = %self.cfg.master, "registered");
        // Resend what is durable and unacked, in order.
        while let Ok(seq) = durable_rx.try_recv() {
            *durable_upto = seq;
        }
        let resent_upto = *durable_upto;
        {
            let ob = lock(&self.outbox);
            for p in ob.pending.range(..=resent_upto).map(|(_, p)| p) {
                tx.send(AgentMessage {
                    msg: Some(Up::Status(p.status.clone())),
                })?;
            }
        }
        let hb_every = Duration::from_millis(registered.heartbeat_interval_ms.max(100) as u64);
        let mut hb = tokio::time::interval(hb_every);
        let mut seq_no = 0u64;
        loop {
            tokio::select! {
                m = inbound.message() => {
                    // Then every message already received, up to a bound (heartbeats and
                    // updates wait meanwhile), as one batch.
                    let mut m = m;
                    let mut handled = 0;
                    let end = loop {
                        match self.on_message(m) {
                            Ok(true) => {}
                            done => break done,
                        }
                        handled += 1;
                        if handled == 1024 {
                            break Ok(true);
                        }
                        match inbound.message().now_or_never() {
                            Some(next) => m = next,
                            None => break Ok(true),
                        }
                    };
                    self.end_batch();
                    if !end? {
                        return Ok(());
                    }
                }
                Some(seq) = durable_rx.recv() => {
                    // Everything durable by now goes out together (one lock, and the
                    // connection writes them in one go rather than waking once per update).
                    let mut upto = seq;
                    while let Ok(more) = durable_rx.try_recv() {
                        upto = upto.max(more);
                    }
                    let from = (*durable_upto).max(resent_upto) + 1;
                    *durable_upto = upto;
                    if upto >= from {
                        let ready: Vec<TaskStatus> = lock(&self.outbox)
                            .pending
                            .range(from..=upto)
                            .map(|(_, p)| p.status.clone())
                            .collect();
                        for st in ready {
                            tx.send(AgentMessage { msg: Some(Up::Status(st)) })?;
                        }
                    }
                }
                _ = hb.tick() => {
                    seq_no += 1;
                    tx.send(AgentMessage { msg: Some(Up::Heartbeat(Heartbeat { sequence: seq_no })) })?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_task_dirs_are_removed_with_whatever_guests_left() {
        let root = tempfile::tempdir().unwrap();
        // What the host writes, with a log never written to.
        let plain = root.path().join("t1");
        std::fs::create_dir_all(plain.join("sandbox")).unwrap();
        for f in ["config.json", "state.json", "stdout.log"] {
            std::fs::write(plain.join(f), "x").unwrap();
        }
        // A guest's files in its sandbox, and a stray file: removed by the walk.
        let busy = root.path().join("t2");
        std::fs::create_dir_all(busy.join("sandbox/sub")).unwrap();
        std::fs::write(busy.join("sandbox/sub/out.txt"), "x").unwrap();
        std::fs::write(busy.join(".state.json.1.tmp"), "x").unwrap();
        for d in [&plain, &busy] {
            remove_shared_task_dir(d).unwrap();
            assert!(!d.exists(), "{}", d.display());
        }
        // Gone already.
        remove_shared_task_dir(&plain).unwrap();
    }
}
