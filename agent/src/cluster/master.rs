//! The reference master: admits agents (join token) and users (API token), places tasks on
//! the least-loaded agent that fits, tracks resources and task states, acks status updates
//! once they are durable, and keeps exactly one terminal state per task.
//!
//! Placement policy: among active, non-draining, connected agents whose attributes match the
//! task's constraints and whose free resources fit the task (cpus, memory, GPUs by count, and
//! each requested host port offered and not taken on that agent), the one with the most free
//! cpus (then the most free memory). Tasks that fit nowhere wait in STAGING, in order, with
//! reason NO_RESOURCES and a message saying what is missing (as a Nomad job waits on blocked
//! placement, a Mesos framework on offers), and are placed when resources free up or an agent
//! (re)registers: first fit in submission order, so a waiting task does not hold up later
//! ones that fit.
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use caisson_proto::agent_message::Msg as Up;
use caisson_proto::agent_service_server::{AgentService, AgentServiceServer};
use caisson_proto::cluster_service_server::{ClusterService, ClusterServiceServer};
use caisson_proto::master_message::Msg as Down;
use caisson_proto::*;
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::store::{LogStore, Store};
use super::{auth_interceptor, now_ms, random_id};

#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub join_token: String,
    pub api_token: String,
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long: the agent is unreachable.
    pub unreachable_after: Duration,
    /// Unreachable for this long: its tasks are LOST.
    pub lost_after: Duration,
    /// Agents must present a client certificate (mutual TLS; set when serving TLS).
    pub require_agent_cert: bool,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            join_token: String::new(),
            api_token: String::new(),
            heartbeat_interval: Duration::from_secs(1),
            unreachable_after: Duration::from_secs(5),
            lost_after: Duration::from_secs(30),
            require_agent_cert: false,
        }
    }
}

type Outbound = mpsc::UnboundedSender<Result<MasterMessage, Status>>;

struct AgentEntry {
    rec: AgentRecord,
    state: AgentState,
    used_cpus: f64,
    used_mem: u64,
    used_gpus: u32,
    used_ports: HashSet<u32>,
    tasks: HashSet<String>,
    last_hb: Instant,
    last_hb_ms: u64,
    unreachable_since: Option<Instant>,
    session: u64,
    tx: Option<Outbound>,
}

impl AgentEntry {
    /// Active, connected, and with every attribute the task's constraints ask for.
    fn can_take(&self, constraints: &std::collections::HashMap<String, String>) -> bool {
        self.state == AgentState::Active
            && self.tx.is_some()
            && constraints
                .iter()
                .all(|(k, v)| self.rec.attributes.get(k) == Some(v))
    }

    fn new(rec: AgentRecord, state: AgentState, session: u64, tx: Option<Outbound>) -> Self {
        AgentEntry {
            rec,
            state,
            used_cpus: 0.0,
            used_mem: 0,
            used_gpus: 0,
            used_ports: HashSet::new(),
            tasks: HashSet::new(),
            last_hb: Instant::now(),
            last_hb_ms: 0,
            unreachable_since: None,
            session,
            tx,
        }
    }

    fn total(&self) -> Resources {
        self.rec.total.clone().unwrap_or_default()
    }

    fn free(&self) -> (f64, u64) {
        let t = self.total();
        (
            t.cpus - self.used_cpus,
            t.memory_bytes.saturating_sub(self.used_mem),
        )
    }

    fn offers_port(&self, p: u32) -> bool {
        self.total()
            .ports
            .iter()
            .any(|r| (r.begin..=r.end).contains(&p))
    }

    fn fits(&self, n: &Needs) -> bool {
        let (fc, fm) = self.free();
        let gpus_free = (self.total().gpus.len() as u32).saturating_sub(self.used_gpus);
        fc + 1e-9 >= n.cpus
            && fm >= n.mem
            && gpus_free >= n.gpus
            && n.ports
                .iter()
                .all(|p| self.offers_port(*p) && !self.used_ports.contains(p))
    }

    fn take(&mut self, id: &str, n: &Needs) {
        if self.tasks.insert(id.to_string()) {
            self.used_cpus += n.cpus;
            self.used_mem += n.mem;
            self.used_gpus += n.gpus;
            self.used_ports.extend(n.ports.iter().copied());
        }
    }

    fn give_back(&mut self, id: &str, n: &Needs) {
        if self.tasks.remove(id) {
            self.used_cpus = (self.used_cpus - n.cpus).max(0.0);
            self.used_mem = self.used_mem.saturating_sub(n.mem);
            self.used_gpus = self.used_gpus.saturating_sub(n.gpus);
            for p in &n.ports {
                self.used_ports.remove(p);
            }
        }
    }
}

/// What a task takes from its agent while it is placed. Host ports are one resource whatever
/// the protocol (as Mesos counts them).
#[derive(Debug, Default, Clone)]
struct Needs {
    cpus: f64,
    mem: u64,
    gpus: u32,
    ports: Vec<u32>,
}

#[derive(Default)]
struct State {
    tasks: HashMap<String, Task>,
    order: Vec<String>,
    submitted_at: HashMap<String, Instant>,
    agents: HashMap<String, AgentEntry>,
    /// Update uuids applied, per live task; dropped when the task ends (later duplicates of
    /// an ended task are ignored because it is terminal), so this stays bounded.
    acked: HashMap<String, HashSet<String>>,
    pending: VecDeque<String>,
    /// Kills asked while the task's agent was away: sent when it comes back.
    kills: HashMap<String, u32>,
    next_session: u64,
}

pub struct Master {
    state: Mutex<State>,
    store: Box<dyn Store>,
    cfg: MasterConfig,
    events: broadcast::Sender<Task>,
}

fn rank(s: TaskState) -> u8 {
    match s {
        TaskState::Unspecified => 0,
        TaskState::Staging => 1,
        TaskState::Starting => 2,
        TaskState::Running => 3,
        _ => 4,
    }
}

fn needs(spec: &Option<TaskSpec>) -> Needs {
    let Some(spec) = spec else {
        return Needs::default();
    };
    let r = spec.resources.clone().unwrap_or_default();
    let mut ports: Vec<u32> = spec.ports.iter().map(|p| p.host_port).collect();
    ports.sort_unstable();
    ports.dedup();
    Needs {
        cpus: r.cpus,
        mem: r.memory_bytes,
        gpus: r.gpu_count,
        ports,
    }
}

/// Checks a spec before anything happens; the error is the InvalidArgument message.
pub fn validate_spec(spec: &TaskSpec) -> Result<(), String> {
    let kind = TaskKind::try_from(spec.kind).map_err(|_| format!("unknown kind {}", spec.kind))?;
    if kind == TaskKind::Unspecified {
        return Err("task kind is missing".into());
    }
    if spec.image.is_empty()
        || spec
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("invalid image {:?}", spec.image));
    }
    if !spec.name.is_empty()
        && (spec.name.len() > 128 || !containerizer::launch::valid_name(&spec.name))
    {
        return Err(format!(
            "invalid task name {:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]*",
            spec.name
        ));
    }
    let r = spec.resources.clone().unwrap_or_default();
    if !r.cpus.is_finite() || r.cpus < 0.0 || r.cpus > 4096.0 {
        return Err(format!("invalid cpus {}", r.cpus));
    }
    if !r.gpus.is_empty() {
        return Err("ask for GPUs by count (gpu_count), not by UUID".into());
    }
    if r.gpu_count > 1024 {
        return Err(format!("invalid GPU count {}", r.gpu_count));
    }
    for e in &spec.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(format!(
                "invalid environment entry {e:?}: expected KEY=VALUE"
            ));
        }
    }
    let mut seen = HashSet::new();
    for p in &spec.ports {
        if !(1..=65535).contains(&p.host_port) || !(1..=65535).contains(&p.container_port) {
            return Err(format!(
                "invalid port mapping {}:{}",
                p.host_port, p.container_port
            ));
        }
        if !matches!(p.protocol.as_str(), "" | "tcp" | "udp") {
            return Err(format!("invalid protocol {:?}", p.protocol));
        }
        if !seen.insert(p.host_port) {
            return Err(format!("host port {} mapped twice", p.host_port));
        }
    }
    let userns: containerizer::launch::UsernsMode = spec.userns.parse()?;
    if kind == TaskKind::NativeImage {
        // The same rules as `caisson run --network/-p` (names are checked by the agent,
        // which has the CNI configurations).
        let ports: Vec<String> = spec.ports.iter().map(super::launcher::port_arg).collect();
        crate::tasknet::plan(&spec.networks, &ports).map_err(|e| format!("{e:#}"))?;
    } else {
        if userns != containerizer::launch::UsernsMode::Host {
            return Err("user namespaces are for native tasks; a Wasm task has none".into());
        }
        if r.gpu_count > 0 {
            return Err("GPUs are for native tasks; a Wasm task cannot use them".into());
        }
        if spec.networks.iter().any(|n| n != "none" && n != "host") {
            return Err(
                "a Wasm task runs in the host's network; a wasi:http service listens on its \
                 port mapping's host port"
                    .into(),
            );
        }
        match (kind, spec.ports.len()) {
            (TaskKind::WasmHttp, 1) | (TaskKind::Wasm, 0) => {}
            (TaskKind::WasmHttp, _) => {
                return Err("a wasi:http service needs exactly one port mapping (HOST:80)".into())
            }
            _ => {
                return Err(
                    "port mappings are for native tasks and wasi:http services (--http)".into(),
                )
            }
        }
    }
    for v in &spec.volumes {
        if !v.host_path.starts_with('/') || !v.container_path.starts_with('/') {
            return Err(format!(
                "invalid volume {}:{}: paths must be absolute",
                v.host_path, v.container_path
            ));
        }
    }
    if spec.timeout_ms > 0 && kind != TaskKind::Wasm {
        return Err("a timeout is for Wasm commands".into());
    }
    if !spec.workdir.is_empty() && !spec.workdir.starts_with('/') {
        return Err(format!(
            "invalid workdir {:?}: must be absolute",
            spec.workdir
        ));
    }
    Ok(())
}

impl Master {
    /// Opens the state in `dir` (creating it) and recovers every task and agent: agents start
    /// unreachable and have `lost_after` to reregister before their tasks are LOST.
    pub fn open(dir: &Path, cfg: MasterConfig) -> anyhow::Result<Arc<Master>> {
        let (store, snap) = LogStore::open(dir)?;
        let mut st = State::default();
        let now = Instant::now();
        for rec in snap.agents {
            let state = if rec.draining {
                AgentState::Draining
            } else {
                AgentState::Unreachable
            };
            let mut entry = AgentEntry::new(rec, state, 0, None);
            entry.last_hb = now;
            entry.unreachable_since = Some(now);
            st.agents.insert(entry.rec.id.clone(), entry);
        }
        for t in snap.tasks {
            let state = t.state();
            if !state.is_terminal() {
                if let Some(a) = st.agents.get_mut(&t.agent_id) {
                    a.take(&t.id, &needs(&t.spec));
                } else {
                    st.pending.push_back(t.id.clone());
                }
            }
            st.order.push(t.id.clone());
            st.tasks.insert(t.id.clone(), t);
        }
        let (events, _) = broadcast::channel(1 << 16);
        Ok(Arc::new(Master {
            state: Mutex::new(st),
            store: Box::new(store),
            cfg,
            events,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves both services on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        tls: Option<tonic::transport::ServerTlsConfig>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> anyhow::Result<()> {
        let monitor = {
            let m = self.clone();
            tokio::spawn(async move { m.monitor().await })
        };
        let agents = AgentServiceServer::with_interceptor(
            AgentSvc(self.clone()),
            auth_interceptor(self.cfg.join_token.clone()),
        );
        let users = ClusterServiceServer::with_interceptor(
            UserSvc(self.clone()),
            auth_interceptor(self.cfg.api_token.clone()),
        );
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let incoming = nodelay_incoming(listener);
        let res = builder
            .add_service(agents)
            .add_service(users)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        monitor.abort();
        res?;
        Ok(())
    }

    fn emit(&self, t: &Task) {
        let _ = self.events.send(t.clone());
    }

    /// Frees a task's resources on its agent.
    fn release(st: &mut State, id: &str) {
        let Some(t) = st.tasks.get(id) else { return };
        let n = needs(&t.spec);
        if let Some(a) = st.agents.get_mut(&t.agent_id) {
            a.give_back(id, &n);
        }
    }

    /// Ends a task on the master's own authority (LOST, or KILLED before it was placed).
    fn end_task(&self, st: &mut State, id: &str, state: TaskState, reason: Reason, msg: &str) {
        Self::release(st, id);
        st.pending.retain(|p| p != id);
        st.acked.remove(id);
        let Some(t) = st.tasks.get_mut(id) else {
            return;
        };
        if t.state().is_terminal() {
            return;
        }
        t.set_state(state);
        t.set_reason(reason);
        t.message = msg.to_string();
        t.finished_ms = now_ms();
        let t = t.clone();
        self.store.put_task(&t, None);
        self.emit(&t);
    }

    /// Picks an agent for task `id`; on success records the assignment and returns the
    /// connection to send the launch on.
    fn place(st: &mut State, id: &str) -> Option<Outbound> {
        let task = st.tasks.get(id)?;
        let n = needs(&task.spec);
        let constraints = task
            .spec
            .as_ref()
            .map(|s| s.constraints.clone())
            .unwrap_or_default();
        let best = st
            .agents
            .values()
            .filter(|a| a.can_take(&constraints))
            .filter(|a| a.fits(&n))
            .max_by(|a, b| {
                let (ac, am) = a.free();
                let (bc, bm) = b.free();
                ac.total_cmp(&bc).then(am.cmp(&bm))
            })?;
        let aid = best.rec.id.clone();
        let a = st.agents.get_mut(&aid)?;
        a.take(id, &n);
        let tx = a.tx.clone();
        let t = st.tasks.get_mut(id)?;
        t.agent_id = aid;
        if t.reason == Reason::NoResources as i32 {
            t.set_reason(Reason::Unspecified);
            t.message.clear();
        }
        tx
    }

    /// Why task `id` fits on no agent now: what a user waiting on STAGING wants to read.
    fn unplaced_reason(st: &State, id: &str) -> String {
        let Some(task) = st.tasks.get(id) else {
            return String::new();
        };
        let n = needs(&task.spec);
        let constraints = task
            .spec
            .as_ref()
            .map(|s| s.constraints.clone())
            .unwrap_or_default();
        let live: Vec<&AgentEntry> = st
            .agents
            .values()
            .filter(|a| a.can_take(&constraints))
            .collect();
        if live.is_empty() {
            return if constraints.is_empty() {
                "waiting for an agent".into()
            } else {
                "waiting for an agent matching the constraints".into()
            };
        }
        let most_gpus = live
            .iter()
            .map(|a| a.total().gpus.len() as u32)
            .max()
            .unwrap_or(0);
        if n.gpus > most_gpus {
            return format!(
                "no agent has {} GPUs (the most any agent offers: {most_gpus})",
                n.gpus
            );
        }
        for p in &n.ports {
            let offering: Vec<&&AgentEntry> = live.iter().filter(|a| a.offers_port(*p)).collect();
            if offering.is_empty() {
                return format!("no agent offers host port {p}");
            }
            if offering.iter().all(|a| a.used_ports.contains(p)) {
                return format!("host port {p} is in use on every agent that offers it");
            }
        }
        format!(
            "waiting for free resources (cpus {}, memory {} MiB, GPUs {})",
            n.cpus,
            n.mem >> 20,
            n.gpus
        )
    }

    /// Marks task `id` (left in STAGING) with why it waits, when that changed.
    fn mark_waiting(&self, st: &mut State, id: &str) {
        let why = Self::unplaced_reason(st, id);
        let Some(t) = st.tasks.get_mut(id) else {
            return;
        };
        if t.message != why || t.reason != Reason::NoResources as i32 {
            t.set_reason(Reason::NoResources);
            t.message = why;
            let t = t.clone();
            self.store.put_task(&t, None);
            self.emit(&t);
        }
    }

    /// Persists task `id` (just placed on `tx`'s agent) and sends its launch once durable.
    fn persist_and_launch(
        &self,
        st: &State,
        id: &str,
        tx: Outbound,
        done: Option<oneshot::Sender<()>>,
    ) {
        let t = st.tasks[id].clone();
        let launch = MasterMessage {
            msg: Some(Down::Launch(LaunchTask {
                task_id: t.id.clone(),
                spec: t.spec.clone(),
            })),
        };
        self.store.put_task(
            &t,
            Some(Box::new(move |r| {
                if r.is_ok() {
                    let _ = tx.send(Ok(launch));
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            })),
        );
        self.emit(&t);
    }

    /// Places waiting tasks, in order, while they fit.
    fn place_pending(&self, st: &mut State) {
        let waiting: Vec<String> = st.pending.drain(..).collect();
        for id in waiting {
            match Self::place(st, &id) {
                Some(tx) => self.persist_and_launch(st, &id, tx, None),
                None => {
                    self.mark_waiting(st, &id);
                    st.pending.push_back(id);
                }
            }
        }
    }

    pub async fn submit(&self, spec: TaskSpec) -> Result<String, Status> {
        validate_spec(&spec).map_err(Status::invalid_argument)?;
        let id = random_id('t');
        let (done_tx, done_rx) = oneshot::channel();
        {
            let mut st = self.lock();
            let task = Task {
                id: id.clone(),
                spec: Some(spec),
                state: TaskState::Staging as i32,
                submitted_ms: now_ms(),
                ..Default::default()
            };
            st.tasks.insert(id.clone(), task);
            st.order.push(id.clone());
            st.submitted_at.insert(id.clone(), Instant::now());
            // Waiting tasks were tried whenever resources freed up, so none of them fits now:
            // trying this one is first fit in submission order, and a task that cannot be
            // placed (a taken port, too many GPUs) does not hold up the ones behind it.
            let tx = Self::place(&mut st, &id);
            match tx {
                Some(tx) => self.persist_and_launch(&st, &id, tx, Some(done_tx)),
                None => {
                    st.pending.push_back(id.clone());
                    let why = Self::unplaced_reason(&st, &id);
                    let t = st.tasks.get_mut(&id).expect("just inserted");
                    t.set_reason(Reason::NoResources);
                    t.message = why;
                    let t = t.clone();
                    self.store.put_task(
                        &t,
                        Some(Box::new(move |_| {
                            let _ = done_tx.send(());
                        })),
                    );
                    self.emit(&t);
                }
            }
        }
        done_rx
            .await
            .map_err(|_| Status::unavailable("the master's store is closed"))?;
        Ok(id)
    }

    fn resolve(st: &State, id: &str) -> Result<String, Status> {
        if st.tasks.contains_key(id) {
            return Ok(id.to_string());
        }
        let m: Vec<&String> = if id.is_empty() {
            vec![]
        } else {
            st.order.iter().filter(|t| t.starts_with(id)).collect()
        };
        match m.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Status::not_found(format!("no task {id:?}"))),
            _ => Err(Status::invalid_argument(format!(
                "{id:?} matches more than one task"
            ))),
        }
    }

    pub fn kill(&self, id: &str, grace_ms: u32) -> Result<(), Status> {
        let mut st = self.lock();
        let id = Self::resolve(&st, id)?;
        let t = &st.tasks[&id];
        if t.state().is_terminal() {
            return Ok(());
        }
        if t.agent_id.is_empty() {
            self.end_task(
                &mut st,
                &id,
                TaskState::Killed,
                Reason::KilledByUser,
                "killed before it was placed",
            );
            return Ok(());
        }
        let aid = t.agent_id.clone();
        st.kills.insert(id.clone(), grace_ms);
        if let Some(tx) = st.agents.get(&aid).and_then(|a| a.tx.clone()) {
            let _ = tx.send(Ok(kill_msg(&id, grace_ms)));
        }
        Ok(())
    }

    /// Registration (first message of an agent's stream): assigns or confirms the agent id,
    /// reconciles its task list with ours, and queues `Registered` first on `tx`.
    fn register(&self, reg: Register, tx: Outbound) -> (String, u64) {
        let mut st = self.lock();
        st.next_session += 1;
        let session = st.next_session;
        let id = if reg.agent_id.is_empty() {
            random_id('a')
        } else {
            reg.agent_id.clone()
        };
        let rec = AgentRecord {
            id: id.clone(),
            hostname: reg.hostname.clone(),
            total: reg.resources.clone(),
            attributes: reg.attributes.clone(),
            boot_id: reg.boot_id.clone(),
            draining: st.agents.get(&id).is_some_and(|a| a.rec.draining),
        };
        self.store.put_agent(&rec, None);
        let _ = tx.send(Ok(MasterMessage {
            msg: Some(Down::Registered(Registered {
                agent_id: id.clone(),
                heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u32,
            })),
        }));
        let reported: HashMap<String, TaskState> = reg
            .tasks
            .iter()
            .map(|k| (k.task_id.clone(), k.state()))
            .collect();
        // Ours on this agent that it does not know: LOST.
        let ours: Vec<String> = st
            .tasks
            .values()
            .filter(|t| t.agent_id == id && !t.state().is_terminal())
            .map(|t| t.id.clone())
            .collect();
        for tid in &ours {
            if !reported.contains_key(tid) {
                self.end_task(
                    &mut st,
                    tid,
                    TaskState::Lost,
                    Reason::TaskUnknown,
                    "the agent does not know this task",
                );
            }
        }
        // Its tasks that we consider ended (or never heard of): kill them.
        for (tid, state) in &reported {
            let ours = st.tasks.get(tid);
            let stale = ours.is_none_or(|t| t.state().is_terminal() || t.agent_id != id);
            if stale && !state.is_terminal() {
                let _ = tx.send(Ok(kill_msg(tid, 0)));
            }
        }
        for (tid, grace) in st.kills.clone() {
            if st
                .tasks
                .get(&tid)
                .is_some_and(|t| t.agent_id == id && !t.state().is_terminal())
            {
                let _ = tx.send(Ok(kill_msg(&tid, grace)));
            }
        }
        let draining = rec.draining;
        let state = if draining {
            AgentState::Draining
        } else {
            AgentState::Active
        };
        let mut entry = AgentEntry::new(rec, state, session, Some(tx));
        entry.last_hb_ms = now_ms();
        for t in st.tasks.values() {
            if t.agent_id == id && !t.state().is_terminal() {
                entry.take(&t.id, &needs(&t.spec));
            }
        }
        tracing::info!(agent = %id, host = %entry.rec.hostname, tasks = reported.len(), "agent registered");
        st.agents.insert(id.clone(), entry);
        self.place_pending(&mut st);
        (id, session)
    }

    /// Records a heartbeat; false when the session is no longer the agent's live one (the
    /// master gave up on it as unreachable, or a newer session replaced it): the agent must
    /// then reconnect and reregister.
    fn heartbeat(&self, agent: &str, session: u64) -> bool {
        let mut st = self.lock();
        match st.agents.get_mut(agent) {
            Some(a) if a.session == session && a.tx.is_some() => {
                a.last_hb = Instant::now();
                a.last_hb_ms = now_ms();
                true
            }
            _ => false,
        }
    }

    /// A status update from `agent`: applied at most once, acked once durable.
    fn status(&self, agent: &str, s: TaskStatus, tx: &Outbound) {
        let ack = MasterMessage {
            msg: Some(Down::Ack(Ack {
                uuid: s.uuid.clone(),
                task_id: s.task_id.clone(),
            })),
        };
        let mut st = self.lock();
        let seen = st
            .acked
            .get(&s.task_id)
            .is_some_and(|u| u.contains(&s.uuid));
        if s.uuid.is_empty() || seen {
            let _ = tx.send(Ok(ack));
            return;
        }
        let Some(t) = st.tasks.get(&s.task_id) else {
            let _ = tx.send(Ok(ack));
            return;
        };
        let new = s.state();
        if t.agent_id != agent || t.state().is_terminal() || rank(new) <= rank(t.state()) {
            // A duplicate, stale, or about a task we already ended: the first terminal
            // state stands; a task we ended that still runs is killed.
            if t.state().is_terminal() && !new.is_terminal() && t.agent_id == agent {
                let _ = tx.send(Ok(kill_msg(&s.task_id, 0)));
            }
            if !t.state().is_terminal() {
                st.acked
                    .entry(s.task_id.clone())
                    .or_default()
                    .insert(s.uuid.clone());
            }
            let _ = tx.send(Ok(ack));
            return;
        }
        let submitted = st.submitted_at.get(&s.task_id).copied();
        let t = st.tasks.get_mut(&s.task_id).expect("checked");
        t.set_state(new);
        t.reason = s.reason;
        t.message = s.message.clone();
        if s.exit_code.is_some() {
            t.exit_code = s.exit_code;
        }
        if new == TaskState::Running {
            t.started_ms = s.timestamp_ms;
            t.timings = s.timings;
            if let Some(at) = submitted {
                t.submit_to_running_us = at.elapsed().as_micros() as u64;
            }
        }
        if new.is_terminal() {
            t.finished_ms = s.timestamp_ms;
        }
        let t = t.clone();
        if !new.is_terminal() {
            st.acked
                .entry(s.task_id.clone())
                .or_default()
                .insert(s.uuid.clone());
        } else {
            st.acked.remove(&s.task_id);
            Self::release(&mut st, &s.task_id);
            st.submitted_at.remove(&s.task_id);
            st.kills.remove(&s.task_id);
        }
        let tx = tx.clone();
        self.store.put_task(
            &t,
            Some(Box::new(move |r| {
                if r.is_ok() {
                    let _ = tx.send(Ok(ack));
                }
            })),
        );
        self.emit(&t);
        if new.is_terminal() && !st.pending.is_empty() {
            self.place_pending(&mut st);
        }
    }

    fn disconnected(&self, agent: &str, session: u64) {
        let mut st = self.lock();
        if let Some(a) = st.agents.get_mut(agent) {
            if a.session == session {
                a.tx = None;
                if a.state == AgentState::Active {
                    a.state = AgentState::Unreachable;
                }
                a.unreachable_since.get_or_insert_with(Instant::now);
                tracing::info!(agent, "agent disconnected");
            }
        }
    }

    /// Marks silent agents unreachable, and their tasks LOST after `lost_after`.
    async fn monitor(self: Arc<Self>) {
        let tick = (self.cfg.heartbeat_interval / 2).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(tick).await;
            let mut st = self.lock();
            let now = Instant::now();
            let mut lost = vec![];
            for a in st.agents.values_mut() {
                if a.tx.is_some() && now.duration_since(a.last_hb) > self.cfg.unreachable_after {
                    tracing::warn!(agent = %a.rec.id, "missed heartbeats: unreachable");
                    // Dropping our end closes its stream; it will reconnect if it can.
                    a.tx = None;
                    if a.state == AgentState::Active {
                        a.state = AgentState::Unreachable;
                    }
                    a.unreachable_since = Some(now);
                }
                if a.tx.is_none()
                    && a.unreachable_since
                        .is_some_and(|s| now.duration_since(s) > self.cfg.lost_after)
                    && !a.tasks.is_empty()
                {
                    lost.extend(a.tasks.iter().cloned());
                }
            }
            for id in lost {
                self.end_task(
                    &mut st,
                    &id,
                    TaskState::Lost,
                    Reason::AgentLost,
                    "the agent is unreachable",
                );
            }
        }
    }

    fn agents(&self) -> Vec<Agent> {
        let st = self.lock();
        let mut v: Vec<Agent> = st
            .agents
            .values()
            .map(|a| Agent {
                id: a.rec.id.clone(),
                hostname: a.rec.hostname.clone(),
                state: a.state as i32,
                total: a.rec.total.clone(),
                used: Some(Resources {
                    cpus: a.used_cpus,
                    memory_bytes: a.used_mem,
                    gpu_count: a.used_gpus,
                    ports: {
                        let mut p: Vec<u32> = a.used_ports.iter().copied().collect();
                        p.sort_unstable();
                        p.into_iter()
                            .map(|p| PortRange { begin: p, end: p })
                            .collect()
                    },
                    ..Default::default()
                }),
                attributes: a.rec.attributes.clone(),
                last_heartbeat_ms: a.last_hb_ms,
                tasks: a.tasks.len() as u32,
            })
            .collect();
        v.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
        v
    }
}

fn kill_msg(id: &str, grace_ms: u32) -> MasterMessage {
    MasterMessage {
        msg: Some(Down::Kill(KillTask {
            task_id: id.to_string(),
            grace_period_ms: grace_ms,
        })),
    }
}

struct AgentSvc(Arc<Master>);

#[tonic::async_trait]
impl AgentService for AgentSvc {
    type SessionStream = UnboundedReceiverStream<Result<MasterMessage, Status>>;

    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if self.0.cfg.require_agent_cert && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(Status::unauthenticated(
                "agents must present a client certificate",
            ));
        }
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register"))??;
        let Some(AgentMessage {
            msg: Some(Up::Register(reg)),
        }) = first
        else {
            return Err(Status::failed_precondition(
                "the first message must be Register",
            ));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (agent, session) = self.0.register(reg, tx.clone());
        let master = self.0.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(AgentMessage { msg: Some(m) })) => match m {
                        Up::Heartbeat(_) => {
                            if !master.heartbeat(&agent, session) {
                                // Ending the stream (this task holds the last sender) makes
                                // the agent reconnect and reregister.
                                let _ = tx.send(Err(Status::unavailable(
                                    "session expired (missed heartbeats): reregister",
                                )));
                                break;
                            }
                        }
                        Up::Status(s) => master.status(&agent, s, &tx),
                        Up::Register(_) => {
                            let _ = tx.send(Err(Status::failed_precondition("already registered")));
                            break;
                        }
                    },
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            master.disconnected(&agent, session);
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct UserSvc(Arc<Master>);

type TaskStream = Pin<Box<dyn Stream<Item = Result<Task, Status>> + Send>>;

#[tonic::async_trait]
impl ClusterService for UserSvc {
    async fn submit_task(
        &self,
        req: Request<SubmitTaskRequest>,
    ) -> Result<Response<SubmitTaskResponse>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("no task spec"))?;
        let task_id = self.0.submit(spec).await?;
        Ok(Response::new(SubmitTaskResponse { task_id }))
    }

    async fn kill_task(
        &self,
        req: Request<KillTaskRequest>,
    ) -> Result<Response<KillTaskResponse>, Status> {
        let r = req.into_inner();
        self.0.kill(&r.task_id, r.grace_period_ms)?;
        Ok(Response::new(KillTaskResponse {}))
    }

    async fn get_task(&self, req: Request<GetTaskRequest>) -> Result<Response<Task>, Status> {
        let st = self.0.lock();
        let id = Master::resolve(&st, &req.into_inner().task_id)?;
        Ok(Response::new(st.tasks[&id].clone()))
    }

    async fn list_tasks(
        &self,
        req: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        let all = req.into_inner().include_terminal;
        let st = self.0.lock();
        let tasks = st
            .order
            .iter()
            .map(|id| &st.tasks[id])
            .filter(|t| all || !t.state().is_terminal())
            .cloned()
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    type WatchTasksStream = TaskStream;

    async fn watch_tasks(
        &self,
        _req: Request<WatchTasksRequest>,
    ) -> Result<Response<TaskStream>, Status> {
        // Subscribe before the snapshot so no change falls between them.
        let mut events = self.0.events.subscribe();
        let snapshot: Vec<Task> = {
            let st = self.0.lock();
            st.order.iter().map(|id| st.tasks[id].clone()).collect()
        };
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            for t in snapshot {
                if tx.send(Ok(t)).await.is_err() {
                    return;
                }
            }
            loop {
                match events.recv().await {
                    Ok(t) => {
                        if tx.send(Ok(t)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} changes behind"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_agents(
        &self,
        _req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(ListAgentsResponse {
            agents: self.0.agents(),
        }))
    }

    async fn drain_agent(
        &self,
        req: Request<DrainAgentRequest>,
    ) -> Result<Response<DrainAgentResponse>, Status> {
        let id = req.into_inner().agent_id;
        let mut st = self.0.lock();
        let a = st
            .agents
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("no agent {id:?}")))?;
        a.rec.draining = true;
        a.state = AgentState::Draining;
        self.0.store.put_agent(&a.rec, None);
        Ok(Response::new(DrainAgentResponse {}))
    }
}

/// Whether plaintext is acceptable on `addr` (loopback only, unless the user insists).
pub fn plaintext_ok(addr: &SocketAddr, insecure: bool) -> bool {
    insecure || addr.ip().is_loopback()
}

/// The connections `listener` accepts, with TCP_NODELAY set. Without it a reply's later frames
/// (gRPC writes headers, data and trailers apart) wait for the client's delayed ACK: ~40 ms per
/// unary call, and per message on a quiet agent stream. tonic sets it only on connections it
/// accepts itself.
fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            if let Ok(c) = &conn {
                if let Err(e) = c.set_nodelay(true) {
                    tracing::warn!("TCP_NODELAY on a cluster connection: {e}");
                }
            }
            conn
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cluster_connections_are_accepted_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(nodelay_incoming(listener));
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = tokio_stream::StreamExt::next(&mut incoming)
            .await
            .unwrap()
            .unwrap();
        assert!(conn.nodelay().unwrap());
        drop(client);
    }

    #[tokio::test]
    async fn acked_uuids_are_kept_per_task_until_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let m = Master::open(dir.path(), MasterConfig::default()).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (agent, _) = m.register(
            Register {
                resources: Some(Resources {
                    cpus: 4.0,
                    memory_bytes: 1 << 30,
                    ..Default::default()
                }),
                ..Default::default()
            },
            tx.clone(),
        );
        let spec = TaskSpec {
            kind: TaskKind::NativeImage as i32,
            image: "img".into(),
            ..Default::default()
        };
        let id = m.submit(spec).await.unwrap();
        let upd = |state: TaskState, uuid: &str| TaskStatus {
            task_id: id.clone(),
            state: state as i32,
            uuid: uuid.into(),
            ..Default::default()
        };
        m.status(&agent, upd(TaskState::Starting, "u1"), &tx);
        m.status(&agent, upd(TaskState::Running, "u2"), &tx);
        assert_eq!(m.lock().acked.get(&id).map(HashSet::len), Some(2));
        m.status(&agent, upd(TaskState::Running, "u2"), &tx);
        m.status(&agent, upd(TaskState::Finished, "u3"), &tx);
        assert!(m.lock().acked.is_empty(), "dropped at the terminal update");
        // Resent after the end (an agent that missed the ack): acked, ignored, no growth.
        m.status(&agent, upd(TaskState::Finished, "u3"), &tx);
        m.status(&agent, upd(TaskState::Failed, "u4"), &tx);
        assert_eq!(m.lock().tasks[&id].state(), TaskState::Finished);
        assert!(m.lock().acked.is_empty());
        // Every update was acked (the applied ones once durable).
        let mut acks = vec![];
        while acks.len() < 6 {
            let msg = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("acks")
                .expect("open")
                .expect("no error");
            if let Some(Down::Ack(a)) = msg.msg {
                acks.push(a.uuid);
            }
        }
        acks.sort();
        assert_eq!(acks, ["u1", "u2", "u2", "u3", "u3", "u4"]);
    }
}
