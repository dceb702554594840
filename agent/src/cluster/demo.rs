//! `caisson demo`: a whole cluster in one command. It starts a master and an agent in this
//! process (temp state, loopback, random tokens), builds a busybox image locally (no
//! registry), submits a native container task, a Wasm command and a Wasm HTTP microservice
//! (a wasi:http component, `demo_http.wat`) side by side, shows them running with their
//! output, calls the microservice over HTTP, kills it, prints each task's launch latency per
//! phase and its final state, and removes everything it made.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caisson_proto::*;
use clap::Args;
use sha2::{Digest, Sha256};

use super::agent::{Agent, AgentConfig};
use super::cli::{state_name, ClientArgs};
use super::master::{Master, MasterConfig};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the temp directory (state, logs) for a look afterwards.
    #[arg(long)]
    keep: bool,
    /// The busybox-static binary to build the demo image from.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
}

const IMAGE: &str = "localhost/caisson-demo:latest";

/// A WASI command module: prints, sleeps 2 s (poll_oneoff on the monotonic clock), prints.
const WASM_TASK: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a Wasm task (WASI), sleeping 2 s\n")
  (data (i32.const 128) "wasm task done\n")
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func (export "_start")
    (call $print (i32.const 16) (i32.const 44))
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const 2000000000))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
    (call $print (i32.const 128) (i32.const 15))))
"#;

/// The microservice: a wasi:http/proxy component in the component text format (no toolchain
/// needed to build it; the engine compiles the text).
const HTTP_SERVICE: &str = include_str!("demo_http.wat");

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes an OCI image layout with one layer: busybox and its applet links.
fn build_image(busybox: &Path, dir: &Path) -> Result<PathBuf> {
    let bb = std::fs::read(busybox).with_context(|| {
        format!(
            "reading {} (the demo builds its image from busybox-static: apt-get install busybox-static)",
            busybox.display()
        )
    })?;
    let layout = dir.join("caisson-demo");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let mut tar = tar::Builder::new(Vec::new());
    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    };
    let dir_hdr = |name: &str, tar: &mut tar::Builder<Vec<u8>>| -> Result<()> {
        let mut h = header(tar::EntryType::Directory, 0o755, 0);
        tar.append_data(&mut h, name, std::io::empty())?;
        Ok(())
    };
    for d in ["bin/", "etc/", "tmp/"] {
        dir_hdr(d, &mut tar)?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, bb.len() as u64);
    tar.append_data(&mut h, "bin/busybox", &bb[..])?;
    for applet in [
        "sh", "echo", "cat", "sleep", "true", "false", "ls", "hostname", "id", "date",
    ] {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        tar.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    let layer = tar.into_inner()?;
    let layer_digest = sha(&layer);
    std::fs::write(blobs.join(&layer_digest), &layer)?;
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    }))?;
    let config_digest = sha(&config);
    std::fs::write(blobs.join(&config_digest), &config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{config_digest}"), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": format!("sha256:{layer_digest}"), "size": layer.len() }],
    }))?;
    let manifest_digest = sha(&manifest);
    std::fs::write(blobs.join(&manifest_digest), &manifest)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{ "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                            "annotations": { "org.opencontainers.image.ref.name": "latest" } }],
        }))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(layout)
}

/// A master and an agent in this process, on loopback, with random tokens.
pub struct LocalCluster {
    pub url: String,
    pub client: super::cli::Client,
    pub agent_info: caisson_proto::Agent,
    agent_task: tokio::task::JoinHandle<Result<()>>,
    server: tokio::task::JoinHandle<Result<()>>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
}

impl LocalCluster {
    pub async fn start(
        agent_root: &Path,
        master_dir: &Path,
        parallelism: usize,
        keep_finished: bool,
        cni: &crate::network::CniArgs,
    ) -> Result<LocalCluster> {
        let join_token = hex::encode(rand::random::<[u8; 16]>());
        let api_token = hex::encode(rand::random::<[u8; 16]>());
        let master = Master::open(
            master_dir,
            MasterConfig {
                join_token: join_token.clone(),
                api_token: api_token.clone(),
                heartbeat_interval: Duration::from_millis(500),
                ..Default::default()
            },
        )?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(master.serve(listener, None, async {
            let _ = stop_rx.await;
        }));
        let url = format!("http://{addr}");
        let (agent, durable) = Agent::open(AgentConfig {
            master: url.clone(),
            root: agent_root.to_path_buf(),
            token: join_token,
            resources: super::cli::default_offer(),
            attributes: [("demo".to_string(), "yes".to_string())].into(),
            parallelism,
            tls: None,
            keep_finished,
            shared_wasm: true,
            cni: cni.clone(),
            warm_sandboxes: None,
        })?;
        let agent_task = tokio::spawn(agent.run(durable));
        let mut client = super::cli::connect(&ClientArgs {
            master: url.clone(),
            token: Some(api_token),
            tls: Default::default(),
        })
        .await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let agent_info = loop {
            let agents = client
                .list_agents(ListAgentsRequest {})
                .await?
                .into_inner()
                .agents;
            if let Some(ag) = agents
                .into_iter()
                .find(|x| x.state == AgentState::Active as i32)
            {
                break ag;
            }
            if Instant::now() > deadline {
                bail!("the agent did not register");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(LocalCluster {
            url,
            client,
            agent_info,
            agent_task,
            server,
            stop_tx,
        })
    }

    pub async fn stop(self) {
        self.agent_task.abort();
        let _ = self.stop_tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

/// Builds the demo image into the store at `root`.
pub async fn demo_image(busybox: &Path, work: &Path, root: &Path) -> Result<()> {
    let layout = build_image(busybox, work)?;
    let store = containerizer::image::Store::open(root)?;
    containerizer::image::archive::load(
        &store,
        &layout.to_string_lossy(),
        &Default::default(),
        Arc::new(containerizer::image::NoProgress),
    )
    .await?;
    Ok(())
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub fn demo(_root: &Path, cni: &crate::network::CniArgs, a: DemoArgs) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("caisson demo runs containers: run it as root");
    }
    let tmp = tempfile::Builder::new().prefix("caisson-demo").tempdir()?;
    let work = tmp.path().to_path_buf();
    let rt = super::cli::runtime()?;
    let res = rt.block_on(run(&work, &a, cni));
    if a.keep {
        let kept = tmp.keep();
        println!("kept {}", kept.display());
    } else {
        // Containers are removed by then; what is left is plain files.
        drop(tmp);
    }
    res?;
    Ok(ExitCode::SUCCESS)
}

/// One HTTP/1.0 GET on loopback: (status line, body, latency).
fn http_get(port: u16, path: &str) -> Result<(String, String, Duration)> {
    use std::io::Read;
    let t0 = Instant::now();
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = vec![];
    conn.read_to_end(&mut raw)?;
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").to_string();
    Ok((status, body.trim_end().to_string(), took))
}

/// A port on loopback nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn run(work: &Path, a: &DemoArgs, cni: &crate::network::CniArgs) -> Result<()> {
    let agent_root = work.join("agent");
    let say = |s: &str| {
        println!("{s}");
        let _ = std::io::stdout().flush();
    };

    // 1. The image, built here and loaded into the agent's store.
    let t0 = Instant::now();
    demo_image(&a.busybox, work, &agent_root).await?;
    say(&format!(
        "==> built {IMAGE} from {} ({} ms)",
        a.busybox.display(),
        t0.elapsed().as_millis()
    ));
    let wat = work.join("hello.wat");
    std::fs::write(&wat, WASM_TASK)?;
    let service = work.join("hello-http.wat");
    std::fs::write(&service, HTTP_SERVICE)?;
    let port = free_port()?;

    // 2. A master and an agent on loopback.
    let local = LocalCluster::start(&agent_root, &work.join("master"), 4, true, cni).await?;
    say(&format!("==> master listening on {}", local.url));
    let mut client = local.client.clone();
    let ag = local.agent_info.clone();
    let t = ag.total.clone().unwrap_or_default();
    say(&format!(
        "==> agent {} joined: {} cpus, {} MiB",
        ag.id,
        t.cpus,
        t.memory_bytes >> 20
    ));

    // 3. Three tasks side by side.
    let native = TaskSpec {
        name: "native-hello".into(),
        kind: TaskKind::NativeImage as i32,
        image: IMAGE.into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo \"hello from a native container: $(hostname), pid $$\"; sleep 2; echo native task done".into(),
        ],
        resources: Some(Resources {
            cpus: 0.5,
            memory_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let wasm = TaskSpec {
        name: "wasm-hello".into(),
        kind: TaskKind::Wasm as i32,
        image: wat.to_string_lossy().into_owned(),
        resources: Some(Resources {
            cpus: 0.1,
            memory_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let http = TaskSpec {
        name: "wasm-http".into(),
        kind: TaskKind::WasmHttp as i32,
        image: service.to_string_lossy().into_owned(),
        ports: vec![PortMapping {
            host_port: port as u32,
            container_port: 80,
            protocol: String::new(),
        }],
        resources: Some(Resources {
            cpus: 0.1,
            memory_bytes: 16 << 20,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut ids = vec![];
    for spec in [native, wasm, http] {
        let name = spec.name.clone();
        let id = client
            .submit_task(SubmitTaskRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .task_id;
        say(&format!("==> submitted {name}: {id}"));
        ids.push(id);
    }

    // 4. Watch them: states as they change, and their output; call the service once it
    // runs, then kill it.
    let logs: Vec<PathBuf> = ids
        .iter()
        .map(|id| agent_root.join("containers").join(id).join("stdout.log"))
        .collect();
    let names = ["native-hello", "wasm-hello", "wasm-http"];
    let mut offsets = [0u64; 3];
    let mut last = [0i32; 3];
    let mut shown_running = false;
    let mut called = false;
    let mut kill_sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    let finals = loop {
        let mut tasks = vec![];
        for id in &ids {
            tasks.push(
                client
                    .get_task(GetTaskRequest {
                        task_id: id.clone(),
                    })
                    .await?
                    .into_inner(),
            );
        }
        for (i, t) in tasks.iter().enumerate() {
            // Output first: a task that just ended has written all of it.
            let mut buf = vec![];
            let _ = containerizer::launch::copy_new(&logs[i], &mut offsets[i], &mut buf);
            for line in String::from_utf8_lossy(&buf).lines() {
                say(&format!("    {:<13} | {line}", names[i]));
            }
            if t.state != last[i] {
                last[i] = t.state;
                let why = if t.state().is_terminal() || t.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", t.message)
                };
                say(&format!(
                    "    {:<13} {}{why}",
                    names[i],
                    state_name(t.state)
                ));
            }
        }
        if !shown_running && tasks.iter().all(|t| t.state == TaskState::Running as i32) {
            shown_running = true;
            say("==> all three tasks are running side by side:");
            let list = client
                .list_tasks(ListTasksRequest {
                    include_terminal: false,
                })
                .await?
                .into_inner()
                .tasks;
            for t in &list {
                let s = t.spec.clone().unwrap_or_default();
                say(&format!(
                    "    {}  {:<13} {:<8} on {}",
                    t.id,
                    s.name,
                    state_name(t.state),
                    t.agent_id
                ));
            }
        }
        if !called && tasks[2].state == TaskState::Running as i32 {
            called = true;
            say(&format!(
                "==> calling the microservice: GET http://127.0.0.1:{port}/hello"
            ));
            let (status, body, first) =
                tokio::task::spawn_blocking(move || http_get(port, "/hello")).await??;
            say(&format!("    {status}"));
            for line in body.lines() {
                say(&format!("    | {line}"));
            }
            // Warm: every request gets a fresh instance of the compiled component.
            let lat = tokio::task::spawn_blocking(move || -> Result<Vec<Duration>> {
                let mut v = (0..20)
                    .map(|_| http_get(port, "/hello").map(|r| r.2))
                    .collect::<Result<Vec<_>>>()?;
                v.sort();
                Ok(v)
            })
            .await??;
            say(&format!(
                "    latency: first request {:.2} ms, then median {:.2} ms over {} requests (a fresh instance each)",
                first.as_secs_f64() * 1000.0,
                lat[lat.len() / 2].as_secs_f64() * 1000.0,
                lat.len()
            ));
        }
        // The service runs until it is killed: once the others are done.
        if called
            && !kill_sent
            && tasks[2].state == TaskState::Running as i32
            && tasks[..2].iter().all(|t| t.state().is_terminal())
        {
            // Once: the loop polls every 50 ms while the service drains.
            kill_sent = true;
            say("==> killing the microservice");
            client
                .kill_task(KillTaskRequest {
                    task_id: ids[2].clone(),
                    grace_period_ms: 2000,
                })
                .await?;
        }
        if tasks.iter().all(|t| t.state().is_terminal()) {
            break tasks;
        }
        if Instant::now() > deadline {
            bail!("the demo tasks did not finish in 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // 5. Latency per phase and the final states.
    say("==> launch latency (submit -> RUNNING as the master saw it; for the service, until it accepts connections; phases from the agent)");
    for (i, t) in finals.iter().enumerate() {
        let tm = t.timings.unwrap_or_default();
        // Only the phases the task went through (a Wasm command in the shared host has no
        // supervisor, cgroup or namespaces of its own).
        let phases: Vec<String> = [
            ("rootfs", tm.rootfs_us),
            ("spawn", tm.spawn_us),
            ("cgroup", tm.cgroup_us),
            ("namespaces", tm.namespaces_us),
            ("mounts", tm.mounts_us),
            ("exec", tm.exec_us),
            ("launch total", tm.total_us),
        ]
        .iter()
        .filter(|(_, us)| *us > 0)
        .map(|(name, us)| format!("{name} {}", ms(*us)))
        .collect();
        say(&format!(
            "    {:<13} submit->running {}; agent {}; {}",
            names[i],
            ms(t.submit_to_running_us),
            ms(tm.agent_us),
            phases.join(", "),
        ));
    }
    say("==> final states");
    let mut ok = called;
    for (i, t) in finals.iter().enumerate() {
        let want = if i == 2 {
            TaskState::Killed
        } else {
            TaskState::Finished
        };
        ok &= t.state == want as i32;
        say(&format!(
            "    {:<13} {} ({}), exit code {}",
            names[i],
            state_name(t.state),
            t.message,
            t.exit_code.map_or("-".into(), |c| c.to_string())
        ));
    }

    // 6. Clean up: the container (its overlay and cgroups), the agent, the master.
    let rt = containerizer::launch::Runtime::new(&agent_root);
    let _ = tokio::task::spawn_blocking(move || {
        for id in &ids {
            let _ = rt.remove(id, true);
        }
    })
    .await;
    local.stop().await;
    say("==> cleaned up");
    if !ok {
        bail!("a demo task did not end as expected (native and Wasm FINISHED, the service KILLED)");
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Native `/bin/true` tasks to run through the master.
    #[arg(long, default_value_t = 1000)]
    tasks: usize,
    /// Submissions in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Launches in flight at once on the agent.
    #[arg(long, default_value_t = 8)]
    parallelism: usize,
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `caisson bench-cluster`: N native `true` tasks through an in-process master and agent
/// (real gRPC over loopback, real containers); prints throughput and submit-to-RUNNING
/// latency (median, p99).
pub fn bench(cni: &crate::network::CniArgs, a: BenchArgs) -> Result<ExitCode> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the cluster benchmark runs containers: run it as root");
    }
    let tmp = tempfile::Builder::new().prefix("caisson-bench").tempdir()?;
    let work = tmp.path().to_path_buf();
    super::cli::runtime()?.block_on(async {
        let root = work.join("agent");
        demo_image(&a.busybox, &work, &root).await?;
        let local =
            LocalCluster::start(&root, &work.join("master"), a.parallelism, false, cni).await?;
        let mut watch = local
            .client
            .clone()
            .watch_tasks(WatchTasksRequest {})
            .await?
            .into_inner();
        let spec = TaskSpec {
            kind: TaskKind::NativeImage as i32,
            image: IMAGE.into(),
            command: vec!["/bin/true".into()],
            ..Default::default()
        };
        let t0 = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
        let mut submits = vec![];
        for _ in 0..a.tasks {
            let permit = sem.clone().acquire_owned().await?;
            let mut c = local.client.clone();
            let spec = spec.clone();
            submits.push(tokio::spawn(async move {
                let r = c.submit_task(SubmitTaskRequest { spec: Some(spec) }).await;
                drop(permit);
                r
            }));
        }
        for s in submits {
            s.await??;
        }
        let submitted = t0.elapsed();
        let mut done: std::collections::HashMap<String, Task> = Default::default();
        while done.len() < a.tasks {
            let Some(t) = watch.message().await? else {
                bail!("the watch ended");
            };
            if t.state().is_terminal() {
                done.insert(t.id.clone(), t);
            }
        }
        let all = t0.elapsed();
        let mut lat: Vec<u64> = done.values().map(|t| t.submit_to_running_us).collect();
        lat.sort_unstable();
        let finished = done
            .values()
            .filter(|t| t.state == TaskState::Finished as i32)
            .count();
        println!(
            "{} native tasks through the master: all submitted in {:.2} s, all ended in {:.2} s ({:.0} tasks/s); {} FINISHED",
            a.tasks,
            submitted.as_secs_f64(),
            all.as_secs_f64(),
            a.tasks as f64 / all.as_secs_f64(),
            finished
        );
        println!(
            "submit -> RUNNING: median {}, p99 {}, max {}",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(lat.last().copied().unwrap_or(0))
        );
        local.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}
