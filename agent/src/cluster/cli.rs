//! The cluster's CLI verbs: `master`, `agent`, and the users' `submit`, `tasks`, `task`,
//! `agents`, `cancel`.
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use caisson_proto::cluster_service_client::ClusterServiceClient;
use caisson_proto::*;
use clap::Args;
use serde_json::json;

use super::agent::{Agent, AgentConfig};
use super::master::{Master, MasterConfig};
use super::token_interceptor;

pub const DEFAULT_MASTER: &str = "http://127.0.0.1:7070";

#[derive(Args, Debug)]
pub struct MasterArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Directory of the master's state (its task and agent log).
    #[arg(long, default_value = "/var/lib/caisson/master")]
    state: PathBuf,
    /// Token agents must present (default: generated into <state>/join-token).
    #[arg(long, env = "CAISSON_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Token users must present (default: generated into <state>/api-token).
    #[arg(long, env = "CAISSON_API_TOKEN")]
    api_token: Option<String>,
    /// Heartbeat interval agents are told to use (ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// An agent silent for this long is unreachable (ms).
    #[arg(long, default_value_t = 5000)]
    unreachable_ms: u64,
    /// An unreachable agent's tasks are LOST after this long (ms).
    #[arg(long, default_value_t = 30000)]
    lost_ms: u64,
    #[command(flatten)]
    tls: super::tls::ServerTlsArgs,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The master's URL.
    #[arg(long, env = "CAISSON_MASTER", default_value = DEFAULT_MASTER)]
    master: String,
    /// The join token.
    #[arg(long, env = "CAISSON_JOIN_TOKEN")]
    token: Option<String>,
    /// Resources to offer, e.g. `cpus=4,mem=8g,ports=31000-32000` (default: the host's cpus and
    /// memory, every host port; GPUs are the ones caisson manages, see the global `--gpus`).
    #[arg(long)]
    resources: Option<String>,
    /// Attributes for placement constraints, `k=v` (repeatable).
    #[arg(long = "attributes", alias = "attribute")]
    attributes: Vec<String>,
    /// Launches in flight at once.
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    /// How Wasm command tasks run: `shared` in one long-lived host process of this agent
    /// (`caisson-wasm host`, microseconds per task), or `per-task` under a supervisor and a
    /// host process each (their own cgroup, as `caisson run` does). wasi:http services always
    /// run per task.
    #[arg(long, value_enum, default_value = "shared")]
    wasm_host: WasmHostMode,
    /// Keep ended tasks' records and logs under the root (`caisson logs`, `inspect`) instead of
    /// removing them once the master has their end.
    #[arg(long)]
    keep_finished: bool,
    /// Keep N warm sandboxes of IMAGE ready (default 2): the image's overlay root, cgroup,
    /// namespaces and mounts made ahead, so that a task of IMAGE only has to be handed over
    /// (launch-to-exit ~1 ms instead of ~3). Tasks of IMAGE (the reference as written) with
    /// the default network and no volumes, GPUs or CPU limit take one; others, or any when
    /// none is ready, launch cold. Each sandbox serves one task; they are refilled in the
    /// background. IMAGE is resolved (pulled if missing) at the agent's start: the sandboxes are
    /// made of that image until the agent restarts.
    #[arg(long, value_name = "IMAGE[=N]")]
    warm_sandboxes: Option<String>,
    #[command(flatten)]
    tls: super::tls::ClientTlsArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The master's URL.
    #[arg(long, env = "CAISSON_MASTER", default_value = DEFAULT_MASTER)]
    pub master: String,
    /// The API token.
    #[arg(long, env = "CAISSON_API_TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub tls: super::tls::ClientTlsArgs,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Task name.
    #[arg(long)]
    name: Option<String>,
    /// CPUs to reserve (and limit to).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to reserve and limit to (e.g. 64m).
    #[arg(long, short = 'm')]
    memory: Option<String>,
    /// Network: none (default), host, or CNI network names (repeatable or comma-separated).
    #[arg(long = "network", alias = "net")]
    network: Vec<String>,
    /// Whole GPUs to give the task (exclusively).
    #[arg(long)]
    gpus: Option<u32>,
    /// Port mapping HOST:CONTAINER[/tcp|udp] (native: on its CNI network, the default network
    /// `caisson` unless --network names one; a wasi:http service (--http) listens on HOST).
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// Environment KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Placement constraint on agent attributes, k=v.
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// Serve the Wasm component as a wasi:http/proxy service on the host port of its one
    /// port mapping (`-p 8080:80`); it runs until cancelled.
    #[arg(long)]
    http: bool,
    /// Wasm commands: stop the task past this many seconds (fractions allowed; exit 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Native tasks: `auto[:size=N]` runs the task's root as an unprivileged host id range
    /// the agent picks (as `caisson run --userns`); `host` (default): no user namespace.
    #[arg(long, value_name = "MODE")]
    userns: Option<String>,
    /// IMAGE (or WASM module path), then the command.
    #[arg(required = true, num_args = 1.., trailing_var_arg = true, allow_hyphen_values = true,
          value_name = "IMAGE|WASM [CMD]...")]
    image_and_cmd: Vec<String>,
}

#[derive(Args, Debug)]
pub struct TasksArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Keep printing changes.
    #[arg(long)]
    watch: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct TaskArgs {
    #[command(flatten)]
    client: ClientArgs,
    id: String,
}

#[derive(Args, Debug)]
pub struct AgentsArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Seconds between SIGTERM and SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u32,
    #[arg(required = true)]
    ids: Vec<String>,
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn token_from(dir: &Path, name: &str, given: Option<String>) -> Result<String> {
    if let Some(t) = given {
        return Ok(t);
    }
    let path = dir.join(name);
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    let t = hex::encode(rand::random::<[u8; 16]>());
    std::fs::write(&path, &t).with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

pub fn master(a: MasterArgs) -> Result<ExitCode> {
    std::fs::create_dir_all(&a.state).with_context(|| format!("creating {}", a.state.display()))?;
    let tls = a.tls.server_config()?;
    if tls.is_none() && !super::master::plaintext_ok(&a.listen, a.tls.insecure) {
        bail!(
            "refusing plaintext on {} (not loopback): give --tls-dir or --insecure",
            a.listen
        );
    }
    let cfg = MasterConfig {
        join_token: token_from(&a.state, "join-token", a.join_token)?,
        api_token: token_from(&a.state, "api-token", a.api_token)?,
        heartbeat_interval: Duration::from_millis(a.heartbeat_ms),
        unreachable_after: Duration::from_millis(a.unreachable_ms),
        lost_after: Duration::from_millis(a.lost_ms),
        require_agent_cert: tls.is_some(),
    };
    let rt = runtime()?;
    rt.block_on(async {
        let m = Master::open(&a.state, cfg)?;
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listening on {}", a.listen))?;
        println!("caisson master listening on {}", listener.local_addr()?);
        let _ = std::io::stdout().flush();
        m.serve(listener, tls, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn parse_resources(s: &str) -> Result<Resources> {
    let mut r = default_offer();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("invalid resource {part:?}: expected k=v"))?;
        match k {
            "cpus" => r.cpus = v.parse().with_context(|| format!("invalid cpus {v:?}"))?,
            "mem" | "memory" => r.memory_bytes = crate::containers::parse_size(v)?,
            "disk" => r.disk_bytes = crate::containers::parse_size(v)?,
            "ports" => r.ports = parse_port_ranges(v)?,
            other => bail!("unknown resource {other:?} (cpus, mem, disk, ports)"),
        }
    }
    Ok(r)
}

/// `A-B` ranges of host ports, joined with `+` (`31000-32000+8080-8080`); `none` offers none.
pub fn parse_port_ranges(v: &str) -> Result<Vec<PortRange>> {
    if v == "none" {
        return Ok(vec![]);
    }
    v.split('+')
        .map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let p = |x: &str| -> Result<u32> {
                let n: u32 = x
                    .trim()
                    .parse()
                    .with_context(|| format!("invalid port range {r:?}"))?;
                if !(1..=65535).contains(&n) {
                    bail!("invalid port {n} in {r:?}: 1-65535");
                }
                Ok(n)
            };
            let (begin, end) = (p(a)?, p(b)?);
            if begin > end {
                bail!("invalid port range {r:?}: begin > end");
            }
            Ok(PortRange { begin, end })
        })
        .collect()
}

/// What an agent offers by default: the host's cpus and memory, every host port, and the
/// GPUs caisson manages (`--gpus`, `--nvml-lib`).
pub fn default_offer() -> Resources {
    let mut r = super::agent::host_resources();
    r.ports = vec![PortRange {
        begin: 1,
        end: 65535,
    }];
    r
}

fn parse_kv(list: &[String], what: &str) -> Result<HashMap<String, String>> {
    list.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("invalid {what} {kv:?}: expected k=v"))
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WasmHostMode {
    Shared,
    PerTask,
}

pub fn agent(root: &Path, cni: &crate::network::CniArgs, a: AgentArgs) -> Result<ExitCode> {
    // Writing to a shared Wasm host that just died must be an error (EPIPE), not our death.
    // Threads started from here on inherit the mask; processes we spawn start with an empty one.
    nix::sys::signal::SigSet::from(nix::sys::signal::Signal::SIGPIPE)
        .thread_block()
        .context("blocking SIGPIPE")?;
    let Some(token) = a.token else {
        bail!("an agent needs the master's join token (--token or CAISSON_JOIN_TOKEN)");
    };
    let tls = a.tls.client_config(&a.master, true)?;
    let cfg = AgentConfig {
        master: a.master,
        root: root.to_path_buf(),
        token,
        resources: {
            let mut r = match &a.resources {
                Some(s) => parse_resources(s)?,
                None => default_offer(),
            };
            r.gpus = crate::gpus::managed()?
                .gpus
                .into_iter()
                .map(|g| g.uuid)
                .collect();
            r
        },
        attributes: parse_kv(&a.attributes, "attribute")?,
        parallelism: a.parallelism,
        tls,
        keep_finished: a.keep_finished,
        cni: cni.clone(),
        shared_wasm: a.wasm_host == WasmHostMode::Shared,
        warm_sandboxes: a
            .warm_sandboxes
            .as_deref()
            .map(|w| super::launcher::WarmImage::resolve(root, w))
            .transpose()?,
    };
    let rt = runtime()?;
    rt.block_on(async {
        let (agent, durable) = Agent::open(cfg)?;
        tokio::select! {
            r = agent.run(durable) => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

pub type Client = ClusterServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, super::Token>,
>;

pub async fn connect(c: &ClientArgs) -> Result<Client> {
    let Some(token) = &c.token else {
        bail!("the cluster API needs a token (--token or CAISSON_API_TOKEN)");
    };
    let mut ep = tonic::transport::Endpoint::from_shared(c.master.clone())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    if let Some(tls) = c.tls.client_config(&c.master, false)? {
        ep = ep.tls_config(tls)?;
    }
    let channel = ep
        .connect()
        .await
        .with_context(|| format!("connecting to {}", c.master))?;
    Ok(ClusterServiceClient::with_interceptor(
        channel,
        token_interceptor(token)?,
    ))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

pub fn spec_from(a: &SubmitArgs) -> Result<TaskSpec> {
    let mut it = a.image_and_cmd.iter();
    let image = it.next().cloned().unwrap_or_default();
    let command: Vec<String> = it.cloned().collect();
    let kind = if a.http {
        TaskKind::WasmHttp
    } else if image.ends_with(".wasm") || image.ends_with(".wat") {
        TaskKind::Wasm
    } else {
        TaskKind::NativeImage
    };
    let memory = match &a.memory {
        Some(m) => crate::containers::parse_size(m)?,
        None => 0,
    };
    let mut ports = vec![];
    for p in &a.publish {
        let (h, c) = p
            .split_once(':')
            .with_context(|| format!("invalid port mapping {p:?}: expected HOST:CONTAINER"))?;
        let (c, proto) = c.split_once('/').unwrap_or((c, ""));
        ports.push(PortMapping {
            host_port: h.parse().with_context(|| format!("invalid port {h:?}"))?,
            container_port: c.parse().with_context(|| format!("invalid port {c:?}"))?,
            protocol: proto.to_string(),
        });
    }
    Ok(TaskSpec {
        name: a.name.clone().unwrap_or_default(),
        kind: kind as i32,
        image,
        command,
        env: a.env.clone(),
        resources: Some(Resources {
            cpus: a.cpus.unwrap_or(0.0),
            memory_bytes: memory,
            gpu_count: a.gpus.unwrap_or(0),
            ..Default::default()
        }),
        networks: a
            .network
            .iter()
            .flat_map(|n| n.split(','))
            .map(|n| n.trim().to_string())
            .collect(),
        ports,
        constraints: parse_kv(&a.constraints, "constraint")?,
        timeout_ms: match a.timeout {
            Some(t) if !(t.is_finite() && t > 0.0) => bail!("invalid timeout {t}: seconds > 0"),
            Some(t) => std::time::Duration::from_secs_f64(t).as_millis().max(1) as u64,
            None => 0,
        },
        userns: a.userns.clone().unwrap_or_default(),
        ..Default::default()
    })
}

pub fn submit(a: SubmitArgs) -> Result<ExitCode> {
    let spec = spec_from(&a)?;
    runtime()?.block_on(async {
        let mut c = connect(&a.client).await?;
        let r = c
            .submit_task(SubmitTaskRequest { spec: Some(spec) })
            .await
            .map_err(status_err)?;
        println!("{}", r.into_inner().task_id);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn state_name(s: i32) -> &'static str {
    match TaskState::try_from(s).unwrap_or_default() {
        TaskState::Unspecified => "UNKNOWN",
        TaskState::Staging => "STAGING",
        TaskState::Starting => "STARTING",
        TaskState::Running => "RUNNING",
        TaskState::Finished => "FINISHED",
        TaskState::Failed => "FAILED",
        TaskState::Killed => "KILLED",
        TaskState::Lost => "LOST",
    }
}

pub fn reason_name(r: i32) -> String {
    let s = Reason::try_from(r).unwrap_or_default().as_str_name();
    s.trim_start_matches("REASON_").to_ascii_lowercase()
}

pub fn task_json(t: &Task) -> serde_json::Value {
    let spec = t.spec.clone().unwrap_or_default();
    let res = spec.resources.clone().unwrap_or_default();
    let tm = t.timings.unwrap_or_default();
    json!({
        "id": t.id,
        "name": spec.name,
        "kind": TaskKind::try_from(spec.kind).unwrap_or_default().as_str_name(),
        "image": spec.image,
        "command": spec.command,
        "cpus": res.cpus,
        "memory": res.memory_bytes,
        "gpus": res.gpu_count,
        "networks": spec.networks,
        "ports": spec.ports.iter().map(super::launcher::port_arg).collect::<Vec<_>>(),
        "userns": if spec.userns.is_empty() { "host" } else { spec.userns.as_str() },
        "state": state_name(t.state),
        "reason": reason_name(t.reason),
        "message": t.message,
        "exit_code": t.exit_code,
        "agent_id": t.agent_id,
        "submitted_ms": t.submitted_ms,
        "started_ms": t.started_ms,
        "finished_ms": t.finished_ms,
        "submit_to_running_us": t.submit_to_running_us,
        "timings_us": {
            "rootfs": tm.rootfs_us, "spawn": tm.spawn_us, "cgroup": tm.cgroup_us,
            "namespaces": tm.namespaces_us, "mounts": tm.mounts_us, "exec": tm.exec_us,
            "launch_total": tm.total_us, "agent": tm.agent_us,
        },
        "warm_sandbox": tm.warm_sandbox,
    })
}

fn task_line(t: &Task) -> String {
    let spec = t.spec.clone().unwrap_or_default();
    let detail = match (t.exit_code, t.message.is_empty()) {
        (Some(c), _) => format!("exit {c}"),
        (None, false) => t.message.clone(),
        _ => String::new(),
    };
    format!(
        "{:<24}  {:<16}  {:<9}  {:<24}  {:<24}  {}",
        t.id,
        spec.name,
        state_name(t.state),
        t.agent_id,
        spec.image,
        detail
    )
}

pub fn tasks(a: TasksArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let mut c = connect(&a.client).await?;
        let mut out = std::io::stdout();
        if a.watch {
            let mut s = c
                .watch_tasks(WatchTasksRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(t) = s.message().await.map_err(status_err)? {
                if a.json {
                    writeln!(out, "{}", task_json(&t))?;
                } else {
                    writeln!(out, "{}", task_line(&t))?;
                }
                out.flush()?;
            }
            return Ok(ExitCode::SUCCESS);
        }
        let list = c
            .list_tasks(ListTasksRequest {
                include_terminal: true,
            })
            .await
            .map_err(status_err)?
            .into_inner()
            .tasks;
        if a.json {
            let v: Vec<_> = list.iter().map(task_json).collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        } else {
            writeln!(
                out,
                "{:<24}  {:<16}  {:<9}  {:<24}  {:<24}  DETAIL",
                "TASK ID", "NAME", "STATE", "AGENT", "IMAGE"
            )?;
            for t in &list {
                writeln!(out, "{}", task_line(t))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn task(a: TaskArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let mut c = connect(&a.client).await?;
        let t = c
            .get_task(GetTaskRequest { task_id: a.id })
            .await
            .map_err(status_err)?
            .into_inner();
        println!("{}", serde_json::to_string_pretty(&task_json(&t))?);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn agent_json(a: &caisson_proto::Agent) -> serde_json::Value {
    let total = a.total.clone().unwrap_or_default();
    let used = a.used.clone().unwrap_or_default();
    json!({
        "id": a.id,
        "hostname": a.hostname,
        "state": AgentState::try_from(a.state).unwrap_or_default().as_str_name().trim_start_matches("AGENT_STATE_"),
        "cpus": total.cpus,
        "memory": total.memory_bytes,
        "used_cpus": used.cpus,
        "used_memory": used.memory_bytes,
        "gpus": total.gpus,
        "used_gpus": used.gpu_count,
        "used_ports": used.ports.iter().map(|r| r.begin).collect::<Vec<_>>(),
        "attributes": a.attributes,
        "tasks": a.tasks,
        "last_heartbeat_ms": a.last_heartbeat_ms,
    })
}

pub fn agents(a: AgentsArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let mut c = connect(&a.client).await?;
        let list = c
            .list_agents(ListAgentsRequest {})
            .await
            .map_err(status_err)?
            .into_inner()
            .agents;
        if a.json {
            let v: Vec<_> = list.iter().map(agent_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{:<24}  {:<20}  {:<11}  {:>11}  {:>15}  {:>5}  TASKS",
                "AGENT ID", "HOSTNAME", "STATE", "CPUS", "MEMORY (MiB)", "GPUS"
            );
            for ag in &list {
                let j = agent_json(ag);
                let total = ag.total.clone().unwrap_or_default();
                let used = ag.used.clone().unwrap_or_default();
                println!(
                    "{:<24}  {:<20}  {:<11}  {:>11}  {:>15}  {:>5}  {}",
                    ag.id,
                    ag.hostname,
                    j["state"].as_str().unwrap_or(""),
                    format!("{:.1}/{:.1}", used.cpus, total.cpus),
                    format!("{}/{}", used.memory_bytes >> 20, total.memory_bytes >> 20),
                    format!("{}/{}", used.gpu_count, total.gpus.len()),
                    ag.tasks
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn cancel(a: CancelArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let mut c = connect(&a.client).await?;
        for id in &a.ids {
            c.kill_task(KillTaskRequest {
                task_id: id.clone(),
                grace_period_ms: a.time.saturating_mul(1000),
            })
            .await
            .map_err(status_err)?;
            println!("{id}");
        }
        Ok(ExitCode::SUCCESS)
    })
}
