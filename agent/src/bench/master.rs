//! `caisson bench master`: the master under a simulated fleet. N lightweight agents (one gRPC
//! session stream each, multiplexed over a few HTTP/2 connections, in this process) register,
//! heartbeat, and answer every LaunchTask with RUNNING and then FINISHED at once (no containers),
//! while M tasks are submitted through the cluster API. Reports registration, submission and
//! end-to-end latency percentiles and throughput: the master's own cost, without launch time.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caisson_proto::agent_message::Msg as Up;
use caisson_proto::agent_service_client::AgentServiceClient;
use caisson_proto::cluster_service_client::ClusterServiceClient;
use caisson_proto::master_message::Msg as Down;
use caisson_proto::*;
use clap::Args;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;

use super::{host, stats, Host, PhaseStats};
use crate::cluster::master::{Master, MasterConfig};
use crate::cluster::{now_ms, random_id, token_interceptor};

#[derive(Args, Debug)]
pub struct MasterArgs {
    /// Master to load (e.g. http://10.0.0.1:5050); default: a master started in this process
    /// on loopback with temporary state (its WAL is fsynced as usual).
    #[arg(long)]
    master: Option<String>,
    /// Join token for the simulated agents (with --master).
    #[arg(long, env = "CAISSON_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// API token for the submissions (with --master).
    #[arg(long, env = "CAISSON_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Tasks to submit.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    tasks: usize,
    /// Submissions in flight at once.
    #[arg(long, short = 'c', default_value_t = 256)]
    concurrency: usize,
    /// HTTP/2 connections the simulated agents share (at least one per 100 agents).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Heartbeat interval of the embedded master, ms (a remote master tells its own).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Give up waiting for the tasks' end after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print the report as JSON (times in microseconds).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
pub struct MasterReport {
    pub master: String,
    pub agents: usize,
    pub agents_registered: usize,
    pub connections: usize,
    pub tasks: usize,
    pub concurrency: usize,
    /// Tasks whose terminal state was seen (the watch stream).
    pub terminal: usize,
    pub finished: usize,
    /// Terminal states other than FINISHED (should be 0 here).
    pub other_terminal: usize,
    /// Tasks seen reaching a terminal state more than once (must be 0).
    pub duplicate_terminal: usize,
    /// LaunchTask messages the simulated agents received.
    pub launches: u64,
    /// Heartbeats the simulated agents sent while the benchmark ran.
    pub heartbeats: u64,
    pub register_seconds: f64,
    pub submit_seconds: f64,
    /// First submission to the last terminal state.
    pub wall_seconds: f64,
    pub submissions_per_second: f64,
    pub tasks_per_second: f64,
    /// CPU time of this process (master, if embedded, and the simulated fleet), seconds.
    pub cpu_seconds: f64,
    pub phases: Vec<PhaseStats>,
    pub host: Host,
    pub started_unix_ms: u64,
}

const PHASES: &[(&str, &str)] = &[
    ("register", "agent session opened until Registered"),
    ("submit_rpc", "SubmitTask call until its answer"),
    (
        "to_running",
        "SubmitTask sent until the watch shows RUNNING",
    ),
    (
        "to_terminal",
        "SubmitTask sent until the watch shows FINISHED",
    ),
];

#[derive(Default)]
struct Fleet {
    register_ns: Mutex<Vec<u64>>,
    launches: AtomicU64,
    heartbeats: AtomicU64,
}

fn update(agent: &str, task: &str, state: TaskState, exit: Option<i32>) -> AgentMessage {
    AgentMessage {
        msg: Some(Up::Status(TaskStatus {
            task_id: task.to_string(),
            state: state as i32,
            reason: if exit.is_some() {
                Reason::Exited as i32
            } else {
                Reason::Unspecified as i32
            },
            message: String::new(),
            exit_code: exit,
            timestamp_ms: now_ms(),
            uuid: random_id('u'),
            agent_id: agent.to_string(),
            timings: Some(LaunchTimings::default()),
        })),
    }
}

/// One simulated agent: registers, heartbeats at the master's interval, and runs every task
/// it is given in no time. Ends when `stop` flips or the master ends the session.
async fn sim_agent(
    i: usize,
    channel: Channel,
    token: String,
    fleet: Arc<Fleet>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    let mut client = AgentServiceClient::with_interceptor(channel, token_interceptor(&token)?);
    let (tx, rx) = mpsc::unbounded_channel::<AgentMessage>();
    tx.send(AgentMessage {
        msg: Some(Up::Register(Register {
            agent_id: String::new(),
            hostname: format!("sim-{i:05}"),
            resources: Some(Resources {
                cpus: 1024.0,
                memory_bytes: 1 << 40,
                ..Default::default()
            }),
            attributes: [("simulated".to_string(), "yes".to_string())].into(),
            tasks: vec![],
            boot_id: format!("simulated-{i}"),
            version: env!("CARGO_PKG_VERSION").into(),
        })),
    })?;
    let t0 = Instant::now();
    let mut inbound = client
        .session(UnboundedReceiverStream::new(rx))
        .await
        .context("opening the session")?
        .into_inner();
    let reg = match inbound.message().await? {
        Some(MasterMessage {
            msg: Some(Down::Registered(r)),
        }) => r,
        other => bail!("expected Registered first, got {other:?}"),
    };
    fleet
        .register_ns
        .lock()
        .unwrap()
        .push(t0.elapsed().as_nanos() as u64);
    let period = Duration::from_millis(u64::from(reg.heartbeat_interval_ms.max(10)));
    // Spread the fleet's heartbeats over the period, as real agents' start times would.
    let offset = period.mul_f64(rand::random::<f64>());
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            _ = hb.tick() => {
                seq += 1;
                tx.send(AgentMessage { msg: Some(Up::Heartbeat(Heartbeat { sequence: seq })) })?;
                fleet.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = inbound.message() => match m? {
                None => bail!("the master ended the session"),
                Some(MasterMessage { msg: Some(Down::Launch(l)) }) => {
                    fleet.launches.fetch_add(1, Ordering::Relaxed);
                    tx.send(update(&reg.agent_id, &l.task_id, TaskState::Running, None))?;
                    tx.send(update(&reg.agent_id, &l.task_id, TaskState::Finished, Some(0)))?;
                }
                Some(MasterMessage { msg: Some(Down::Kill(k)) }) => {
                    tx.send(update(&reg.agent_id, &k.task_id, TaskState::Killed, Some(137)))?;
                }
                Some(MasterMessage { msg: Some(Down::Shutdown(s)) }) => {
                    bail!("the master shut the agent down: {}", s.reason)
                }
                Some(_) => {}
            }
        }
    }
}

async fn channel(url: &str) -> Result<Channel> {
    tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

pub fn bench(a: MasterArgs) -> Result<std::process::ExitCode> {
    if a.agents == 0 || a.tasks == 0 {
        bail!("--agents and --tasks must be at least 1");
    }
    let rt = crate::cluster::cli::runtime()?;
    let report = rt.block_on(run(&a))?;
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        use std::io::Write;
        writeln!(out)?;
    } else {
        print_report(&mut out, &report)?;
    }
    let ok = report.terminal == report.tasks
        && report.duplicate_terminal == 0
        && report.agents_registered == report.agents;
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

async fn run(a: &MasterArgs) -> Result<MasterReport> {
    let started_unix_ms = now_ms();
    let cpu0 = cpu_seconds();
    // The master: given, or embedded with temporary state.
    let tmp = tempfile::Builder::new()
        .prefix("caisson-bench-master")
        .tempdir()?;
    let (url, join, api, server) = match &a.master {
        Some(url) => (
            url.clone(),
            a.join_token
                .clone()
                .context("--join-token (or CAISSON_JOIN_TOKEN) is needed with --master")?,
            a.token
                .clone()
                .context("--token (or CAISSON_API_TOKEN) is needed with --master")?,
            None,
        ),
        None => {
            let join = hex::encode(rand::random::<[u8; 16]>());
            let api = hex::encode(rand::random::<[u8; 16]>());
            let master = Master::open(
                tmp.path(),
                MasterConfig {
                    join_token: join.clone(),
                    api_token: api.clone(),
                    heartbeat_interval: Duration::from_millis(a.heartbeat_ms.max(10)),
                    unreachable_after: Duration::from_millis(a.heartbeat_ms.max(10) * 10),
                    ..Default::default()
                },
            )?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let h = tokio::spawn(master.serve(listener, None, async {
                let _ = stop_rx.await;
            }));
            (url, join, api, Some((stop_tx, h)))
        }
    };

    // The fleet.
    let connections = a.connections.max(a.agents.div_ceil(100)).max(1);
    let mut channels = vec![];
    for _ in 0..connections {
        channels.push(channel(&url).await?);
    }
    let fleet = Arc::new(Fleet::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let t_reg = Instant::now();
    let mut agents = vec![];
    for i in 0..a.agents {
        agents.push(tokio::spawn(sim_agent(
            i,
            channels[i % connections].clone(),
            join.clone(),
            fleet.clone(),
            stop_rx.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    while fleet.register_ns.lock().unwrap().len() < a.agents {
        if let Some(done) = agents.iter().position(|h| h.is_finished()) {
            let h = agents.swap_remove(done);
            match h.await? {
                Err(e) => return Err(e.context("a simulated agent failed to register")),
                Ok(()) => bail!("a simulated agent stopped before registering"),
            }
        }
        if Instant::now() > deadline {
            bail!("agents did not register within {} s", a.timeout);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let register_seconds = t_reg.elapsed().as_secs_f64();

    // The submissions, watched from before the first one.
    let user =
        ClusterServiceClient::with_interceptor(channel(&url).await?, token_interceptor(&api)?);
    let mut watch = user
        .clone()
        .watch_tasks(WatchTasksRequest {})
        .await?
        .into_inner();
    type Seen = HashMap<String, (Option<Instant>, Vec<(Instant, i32)>)>;
    let seen: Arc<Mutex<Seen>> = Default::default();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(t) = watch.message().await? {
                let now = Instant::now();
                let mut s = seen.lock().unwrap();
                s.entry(t.id.clone()).or_default().1.push((now, t.state));
            }
            Ok::<(), anyhow::Error>(())
        })
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let spec = TaskSpec {
        kind: TaskKind::NativeImage as i32,
        image: "localhost/simulated:latest".into(),
        command: vec!["/bin/true".into()],
        resources: Some(Resources {
            cpus: 0.01,
            memory_bytes: 1 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let t_sub = Instant::now();
    let mut submits = vec![];
    for _ in 0..a.tasks {
        let permit = sem.clone().acquire_owned().await?;
        let mut c = user.clone();
        let spec = spec.clone();
        let seen = seen.clone();
        submits.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = c.submit_task(SubmitTaskRequest { spec: Some(spec) }).await;
            let rpc = t.elapsed();
            drop(permit);
            let id = r?.into_inner().task_id;
            seen.lock().unwrap().entry(id).or_default().0 = Some(t);
            Ok::<u64, tonic::Status>(rpc.as_nanos() as u64)
        }));
    }
    let mut rpc_ns = vec![];
    for s in submits {
        rpc_ns.push(s.await?.context("SubmitTask")?);
    }
    let submit_seconds = t_sub.elapsed().as_secs_f64();
    // Done when every submitted task has been seen ending (other users' tasks don't count).
    let all_ended = || {
        let s = seen.lock().unwrap();
        s.values()
            .filter(|(sent, ev)| {
                sent.is_some()
                    && ev
                        .iter()
                        .any(|(_, st)| TaskState::try_from(*st).is_ok_and(|st| st.is_terminal()))
            })
            .count()
            >= a.tasks
    };
    while !all_ended() && Instant::now() < deadline && !watcher.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall_seconds = t_sub.elapsed().as_secs_f64();
    if !all_ended() {
        tracing::warn!("not every task was seen ending within {} s", a.timeout);
    }
    watcher.abort();
    let _ = stop_tx.send(true);
    for h in agents {
        let _ = h.await;
    }
    if let Some((stop, h)) = server {
        let _ = stop.send(());
        let _ = h.await;
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let (mut to_running, mut to_terminal) = (vec![], vec![]);
    let (mut terminal, mut finished, mut other, mut dup) = (0, 0, 0, 0);
    for (sent, events) in seen.values() {
        let Some(sent) = sent else { continue };
        let terminals: Vec<_> = events
            .iter()
            .filter(|(_, s)| TaskState::try_from(*s).is_ok_and(|s| s.is_terminal()))
            .collect();
        if let Some((at, _)) = events.iter().find(|(_, s)| *s == TaskState::Running as i32) {
            to_running.push(at.saturating_duration_since(*sent).as_nanos() as u64);
        }
        if let Some((at, s)) = terminals.first() {
            terminal += 1;
            if *s == TaskState::Finished as i32 {
                finished += 1;
                to_terminal.push(at.saturating_duration_since(*sent).as_nanos() as u64);
            } else {
                other += 1;
            }
        }
        if terminals.len() > 1 {
            dup += 1;
        }
    }
    let register_ns = std::mem::take(&mut *fleet.register_ns.lock().unwrap());
    let mut phases = vec![];
    for ((name, what), v) in
        PHASES
            .iter()
            .zip([register_ns.clone(), rpc_ns, to_running, to_terminal])
    {
        if !v.is_empty() {
            phases.push(stats(name, what, v));
        }
    }
    Ok(MasterReport {
        master: a.master.clone().unwrap_or_else(|| "embedded".into()),
        agents: a.agents,
        agents_registered: register_ns.len(),
        connections,
        tasks: a.tasks,
        concurrency: a.concurrency,
        terminal,
        finished,
        other_terminal: other,
        duplicate_terminal: dup,
        launches: fleet.launches.load(Ordering::Relaxed),
        heartbeats: fleet.heartbeats.load(Ordering::Relaxed),
        register_seconds,
        submit_seconds,
        wall_seconds,
        submissions_per_second: a.tasks as f64 / submit_seconds,
        tasks_per_second: terminal as f64 / wall_seconds,
        cpu_seconds: cpu_seconds() - cpu0,
        phases,
        host: host(),
        started_unix_ms,
    })
}

fn cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

fn print_report(out: &mut impl std::io::Write, r: &MasterReport) -> std::io::Result<()> {
    writeln!(
        out,
        "Master ({}) under {} simulated agents on {} connections: {} tasks, {} submissions in flight",
        r.master, r.agents, r.connections, r.tasks, r.concurrency
    )?;
    writeln!(
        out,
        "registered {} agents in {:.2} s; submitted in {:.2} s ({:.0}/s); {} terminal in {:.2} s ({:.0} tasks/s): {} FINISHED, {} other, {} duplicate",
        r.agents_registered,
        r.register_seconds,
        r.submit_seconds,
        r.submissions_per_second,
        r.terminal,
        r.wall_seconds,
        r.tasks_per_second,
        r.finished,
        r.other_terminal,
        r.duplicate_terminal
    )?;
    writeln!(
        out,
        "{} launches, {} heartbeats; CPU {:.2} s (this process); host: kernel {}, {} cpus",
        r.launches, r.heartbeats, r.cpu_seconds, r.host.kernel, r.host.cpus
    )?;
    super::print_phases(out, &r.phases)
}
