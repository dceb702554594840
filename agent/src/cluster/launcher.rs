//! How the agent turns a master's [`TaskSpec`] into a supervised launch, the same way the
//! local CLI does (`caisson run`): native tasks on an overlay of their image, with CNI
//! networks and port mappings (tasknet: namespace + ADD before the launch, the supervisor's
//! exit command releases them) and GPUs (the `run --gpus` allocator); Wasm commands and
//! wasi:http services through `launch::wasm::wasm_task` under their own supervisor, so every
//! kind of task survives an agent restart and is re-adopted from its record. (By default the
//! agent runs Wasm commands in its shared Wasm host instead: `wasmhost`, [`Launcher::wasm_run_spec`].)
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caisson_proto::{PortMapping, Reason, TaskKind, TaskSpec};
use containerizer::launch::{self, Launched, Runtime};
use containerizer::wasm;

use crate::network::CniArgs;
use crate::tasknet;

/// What a launch failed on: the reason the master gets, and the message.
pub type Failure = (Reason, String);

fn failed(e: impl std::fmt::Display) -> Failure {
    (Reason::LaunchFailed, e.to_string())
}

/// A native task's process: the image's config with the task's command, env and workdir.
fn task_process(
    config: Option<&oci_spec::image::Config>,
    spec: &TaskSpec,
) -> Result<launch::Process, Failure> {
    launch::process_from_image(
        config,
        &launch::ProcessOverrides {
            cmd: spec.command.clone(),
            env: spec.env.clone(),
            workdir: (!spec.workdir.is_empty()).then(|| spec.workdir.clone()),
            ..Default::default()
        },
    )
    .map_err(failed)
}

/// `HOST:CONTAINER[/PROTO]`, the form tasknet (and `run -p`) parses.
pub fn port_arg(p: &PortMapping) -> String {
    if p.protocol.is_empty() {
        format!("{}:{}", p.host_port, p.container_port)
    } else {
        format!("{}:{}/{}", p.host_port, p.container_port, p.protocol)
    }
}

/// The port a wasi:http service listens on (its only mapping's host port).
pub fn http_port(spec: &TaskSpec) -> Option<u16> {
    match spec.ports.as_slice() {
        [one] => u16::try_from(one.host_port).ok(),
        _ => None,
    }
}

/// Whether a task holds anything outside its directory that [`Launcher::release`] frees
/// (networks, ports, GPUs); most tasks hold nothing, and then their end costs no look.
pub fn holds_outside(spec: &TaskSpec) -> bool {
    !spec.networks.is_empty()
        || !spec.ports.is_empty()
        || spec.resources.as_ref().is_some_and(|r| r.gpu_count > 0)
}

/// Whether a Wasm task's `image` names a module file on the agent's host (rather than an image).
pub fn is_module_path(image: &str) -> bool {
    Path::new(image).is_absolute() || image.ends_with(".wasm") || image.ends_with(".wat")
}

/// The agent's side of a launch: where state lives, how to reach CNI, the shared compile
/// engine (cache under `<root>/cache/wasm`, the one the Wasm host process maps).
pub struct Launcher {
    pub root: PathBuf,
    pub cni: CniArgs,
    pub rt: Runtime,
    engine: std::sync::OnceLock<Result<wasm::Engine, String>>,
    warm: Option<WarmImage>,
}

/// The image whose warm sandboxes the agent keeps (`caisson agent --warm-sandboxes`).
#[derive(Debug, Clone)]
pub struct WarmImage {
    /// The reference as tasks name it (matched as written).
    pub image: String,
    /// The image it named at the agent's start (`sha256:...`): the sandboxes are made of it,
    /// whatever the reference names later (a re-pull takes effect at the agent's restart).
    pub id: String,
    /// How many sandboxes to keep ready.
    pub count: usize,
    /// The image's config, resolved once: a warm launch reads nothing from the store.
    pub config: Option<oci_spec::image::Config>,
}

impl WarmImage {
    /// Parses `IMAGE[=N]` (N: 1-64, default 2) and resolves IMAGE in the store under `root`,
    /// pulling it if missing (as a launch would).
    pub fn resolve(root: &Path, arg: &str) -> anyhow::Result<WarmImage> {
        use anyhow::Context;
        let (image, count) = match arg.rsplit_once('=') {
            Some((i, n)) => {
                let n: usize = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .with_context(|| {
                        format!("--warm-sandboxes {arg:?}: the count must be 1 to 64")
                    })?;
                (i, n)
            }
            None => (arg, 2),
        };
        anyhow::ensure!(
            !image.is_empty(),
            "--warm-sandboxes {arg:?}: expected IMAGE[=N]"
        );
        let store = containerizer::image::Store::open(root)?;
        let record = match store.resolve(image) {
            Ok(r) => r,
            Err(containerizer::image::Error::ImageNotKnown(_)) => {
                crate::images::pull_for_run(&store, image)
                    .with_context(|| format!("--warm-sandboxes: pulling {image}"))?
            }
            Err(e) => return Err(e).with_context(|| format!("--warm-sandboxes: {image}")),
        };
        // Its tasks are Wasm tasks, which never take a native sandbox.
        let wasm = containerizer::image::wasm::artifact_module(&store, &record)?.is_some()
            || wasm::is_wasm_platform(&record.platform.os, &record.platform.architecture);
        anyhow::ensure!(
            !wasm,
            "--warm-sandboxes {image}: a Wasm image; warm sandboxes are for native images (Wasm \
             tasks start in microseconds without one)"
        );
        let config = store.config(&record)?.config().clone();
        Ok(WarmImage {
            image: image.to_string(),
            id: record.id.clone(),
            count,
            config,
        })
    }
}

impl Launcher {
    pub fn new(root: &Path, cni: CniArgs, warm: Option<WarmImage>) -> Launcher {
        // A supervisor waits ahead of each launch (with the task's loopback-only netns made),
        // and supervisors are forked by one server rather than each exec'd.
        let mut rt = Runtime::new(root).with_warm_supervisor();
        if let Some(w) = &warm {
            rt = rt.with_warm_sandboxes(w.id.clone(), w.count);
        }
        Launcher {
            root: root.to_path_buf(),
            cni,
            rt,
            engine: std::sync::OnceLock::new(),
            warm,
        }
    }

    fn engine(&self) -> Result<&wasm::Engine, Failure> {
        self.engine
            .get_or_init(|| {
                wasm::Engine::new(wasm::EngineConfig {
                    cache_dir: Some(launch::wasm::cache_dir(&self.root)),
                    max_instances: 1,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(failed)
    }

    /// Prepares and launches task `id`; on failure nothing is left behind (overlay, netns,
    /// CNI attachments, GPU allocation, records).
    pub fn start(&self, id: &str, spec: &TaskSpec) -> Result<Launched, Failure> {
        match TaskKind::try_from(spec.kind).unwrap_or_default() {
            TaskKind::NativeImage => self.start_native(id, spec),
            TaskKind::Wasm | TaskKind::WasmHttp => {
                let ts = self.wasm_spec(id, spec)?;
                self.rt.launch(ts).map_err(failed)
            }
            TaskKind::Unspecified => Err(failed("task kind is missing")),
        }
    }

    /// The module of a Wasm task: a file on the agent's host, or a Wasm image in its store.
    fn wasm_module(&self, spec: &TaskSpec) -> Result<(PathBuf, Vec<String>, Vec<String>), Failure> {
        let p = Path::new(&spec.image);
        if is_module_path(&spec.image) {
            // An absolute path is used as given: one stat says it is there (a launch that
            // cannot start leaves nothing behind), where resolving it costs a look per component.
            let module = if p.is_absolute() {
                std::fs::metadata(p).map(|_| p.to_path_buf())
            } else {
                std::fs::canonicalize(p)
            }
            .map_err(|e| failed(format!("Wasm module {}: {e}", spec.image)))?;
            let mut argv = vec![module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()];
            argv.extend(spec.command.iter().cloned());
            return Ok((module, argv, spec.env.clone()));
        }
        let store = containerizer::image::Store::open(&self.root).map_err(failed)?;
        let record = match store.resolve(&spec.image) {
            Ok(r) => r,
            Err(containerizer::image::Error::ImageNotKnown(_)) => {
                crate::images::pull_for_run(&store, &spec.image)
                    .map_err(|e| (Reason::ImagePullFailed, format!("{e:#}")))?
            }
            Err(e) => return Err((Reason::ImagePullFailed, e.to_string())),
        };
        let overrides = launch::ProcessOverrides {
            cmd: spec.command.clone(),
            env: spec.env.clone(),
            ..Default::default()
        };
        match crate::containers::wasm_run::module_of_image(&store, &record, &overrides) {
            Ok(Some(crate::containers::wasm_run::WasmSource::Image { module, argv, env })) => {
                Ok((module, argv, env))
            }
            Ok(_) => Err(failed(format!("{} is not a Wasm image", spec.image))),
            Err(e) => Err(failed(format!("{e:#}"))),
        }
    }

    /// What the shared Wasm host runs for a Wasm command task.
    pub fn wasm_run_spec(&self, spec: &TaskSpec) -> Result<wasm::RunSpec, Failure> {
        let (module, argv, env) = self.wasm_module(spec)?;
        let res = spec.resources.clone().unwrap_or_default();
        Ok(wasm::RunSpec {
            module,
            argv,
            env,
            preopens: spec
                .volumes
                .iter()
                .map(|v| wasm::Preopen {
                    host: v.host_path.clone().into(),
                    guest: v.container_path.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            limits: wasm::Limits {
                memory_bytes: (res.memory_bytes > 0).then_some(res.memory_bytes),
                table_elements: None,
            },
            timeout_ms: (spec.timeout_ms > 0).then_some(spec.timeout_ms),
            ..Default::default()
        })
    }

    fn wasm_spec(&self, id: &str, spec: &TaskSpec) -> Result<launch::TaskSpec, Failure> {
        let http = TaskKind::try_from(spec.kind) == Ok(TaskKind::WasmHttp);
        let res = spec.resources.clone().unwrap_or_default();
        let listen = if http {
            let port = http_port(spec)
                .ok_or_else(|| failed("a wasi:http service needs exactly one port"))?;
            Some(format!("0.0.0.0:{port}"))
        } else {
            None
        };
        let run = wasm::RunSpec {
            http: listen,
            ..self.wasm_run_spec(spec)?
        };
        // Commands are compiled here (a bad module fails the launch with the engine's
        // message, and the artifact lands in the cache the host process maps); services are
        // checked by the host process, which has the HTTP linker.
        if !http {
            self.engine()?
                .load(&wasm::Source::Path(run.module.clone()))
                .map_err(failed)?;
        }
        let mut ts = launch::wasm::wasm_task(run);
        ts.id = id.to_string();
        ts.image = spec.image.clone();
        // The guest's memory is bounded in the engine; the cgroup gets CPU only.
        ts.limits = launch::Limits {
            cpus: (res.cpus > 0.0).then_some(res.cpus),
            ..Default::default()
        };
        Ok(ts)
    }

    fn start_native(&self, id: &str, spec: &TaskSpec) -> Result<Launched, Failure> {
        let ports: Vec<String> = spec.ports.iter().map(port_arg).collect();
        let plan = tasknet::plan(&spec.networks, &ports).map_err(|e| failed(format!("{e:#}")))?;
        if matches!(plan, tasknet::Plan::None) {
            if let Some(res) = self.start_warm(id, spec) {
                return res;
            }
        }
        // An auto user namespace is claimed for the task here, before anything else is made
        // (a claim made by this long-lived process holds until released: `undo` on failure,
        // the task's removal otherwise).
        let userns = match spec.userns.parse::<launch::UsernsMode>().map_err(failed)? {
            launch::UsernsMode::Host => None,
            launch::UsernsMode::Auto { size } => {
                Some(launch::userns::allocate(&self.root, id, size).map_err(failed)?)
            }
        };
        let cni = self.cni.cni(&self.root);
        // As `caisson run --network`: the namespace is made and the ADD started on a thread
        // of their own while the root is prepared and the task set up; only the task's exec
        // waits for the network (the gate).
        let starting = match &plan {
            tasknet::Plan::Cni(reqs) => {
                let hostname = id.chars().take(12).collect();
                let files = tasknet::network_files(hostname);
                Some(tasknet::start_gated(&cni, &self.root, id, reqs, files))
            }
            _ => None,
        };
        let release_userns = || {
            if userns.is_some() {
                launch::userns::release(&self.root, id);
            }
        };
        // (The store's directories and `tmp/` sweep are done once per process: `Store::open`.)
        let prepared =
            crate::containers::prepare_image_root(&self.root, &spec.image, id, userns.as_ref())
                .map_err(|e| (Reason::ImagePullFailed, format!("{e:#}")));
        let gated = starting.map(tasknet::Starting::ready).transpose();
        let release_network = || {
            if let Err(e) = tasknet::detach(&cni, &self.root, id) {
                tracing::warn!(task = %id, "releasing the network after a failed launch: {e:#}");
            }
        };
        let (prepared, gated) = match (prepared, gated) {
            (Ok(p), Ok(g)) => (p, g),
            (p, g) => {
                let network_err = match g {
                    Ok(Some(g)) => {
                        g.abandon(&cni, &self.root, id);
                        None
                    }
                    Ok(None) => None,
                    Err(e) => Some(failed(format!("{e:#}"))),
                };
                release_userns();
                return Err(match p {
                    Ok(p) => {
                        if let Some(dir) = &p.owned {
                            let _ = containerizer::image::rootfs::remove(dir);
                        }
                        network_err.unwrap_or_else(|| failed("the network was not made"))
                    }
                    Err(e) => e,
                });
            }
        };
        let owned = prepared.owned.clone();
        let mut gpus = false;
        let networked = gated.is_some();
        let undo = |gpus: bool| {
            if gpus {
                crate::gpus::release(&self.root, id);
            }
            if networked {
                release_network();
            }
            if let Some(dir) = &owned {
                let _ = containerizer::image::rootfs::remove(dir);
            }
            release_userns();
        };
        let res = (|| -> Result<launch::TaskSpec, Failure> {
            let process = task_process(prepared.config.as_ref(), spec)?;
            let r = spec.resources.clone().unwrap_or_default();
            let mut ts = launch::TaskSpec {
                id: id.to_string(),
                image: spec.image.clone(),
                rootfs: prepared.rootfs.clone(),
                cleanup: prepared.owned.iter().cloned().collect(),
                rootfs_prepare_us: prepared.prepare_us,
                process,
                network: match plan {
                    tasknet::Plan::Host => launch::NetworkMode::Host,
                    _ => launch::NetworkMode::None,
                },
                volumes: spec
                    .volumes
                    .iter()
                    .map(|v| launch::Volume {
                        source: v.host_path.clone().into(),
                        target: v.container_path.clone(),
                        readonly: v.read_only,
                    })
                    .collect(),
                limits: launch::Limits {
                    cpus: (r.cpus > 0.0).then_some(r.cpus),
                    memory: (r.memory_bytes > 0).then_some(r.memory_bytes),
                    ..Default::default()
                },
                userns: userns.clone(),
                ..Default::default()
            };
            if r.gpu_count > 0 {
                let n = r.gpu_count.to_string();
                gpus = crate::gpus::attach(&self.root, Some(&n), &[], &mut ts)
                    .map_err(|e| failed(format!("{e:#}")))?;
            }
            if let Some(g) = &gated {
                crate::containers::gate_networks(&cni, g, &mut ts);
                // The supervisor releases the networks itself; GPUs at exit still need
                // `caisson cleanup` (as before, when that released the networks too).
                if gpus {
                    ts.exit_command =
                        crate::containers::cleanup_command(&self.root, &self.cni, &ts.id)
                            .map_err(|e| failed(format!("{e:#}")))?;
                }
            }
            Ok(ts)
        })();
        let res = res.and_then(|ts| self.rt.launch(ts).map_err(failed));
        // The launch has returned: the supervisor has read the gate (or failed before it).
        // The network's own error names the network and plugin: it is the one to report.
        let res = match (res, gated.map(tasknet::Gated::finish)) {
            (Err(_), Some(Err(ne))) => Err(failed(format!("{ne:#}"))),
            (res, _) => res,
        };
        if res.is_err() {
            undo(gpus);
        }
        res
    }

    /// Launches a task of the warm image in a ready sandbox; `None` when the task does not
    /// fit one (another image, volumes, GPUs, a CPU limit, ...: see `sandbox::fits`) or none
    /// is ready: the cold path then launches it.
    fn start_warm(&self, id: &str, spec: &TaskSpec) -> Option<Result<Launched, Failure>> {
        let warm = self.warm.as_ref().filter(|w| w.image == spec.image)?;
        let r = spec.resources.clone().unwrap_or_default();
        let userns = !matches!(spec.userns.as_str(), "" | "host");
        if r.gpu_count > 0 || r.cpus > 0.0 || !spec.volumes.is_empty() || userns {
            return None;
        }
        let process = match task_process(warm.config.as_ref(), spec) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let ts = launch::TaskSpec {
            id: id.to_string(),
            // The sandboxes' image: the one whose config made `process`.
            image: warm.id.clone(),
            process,
            limits: launch::Limits {
                memory: (r.memory_bytes > 0).then_some(r.memory_bytes),
                ..Default::default()
            },
            ..Default::default()
        };
        match self.rt.launch_in_sandbox(ts) {
            launch::WarmLaunch::Cold(_) => None,
            launch::WarmLaunch::Launched(res) => Some(res.map_err(failed)),
        }
    }

    /// Releases what an ended task holds outside its directory: its GPUs and its networks
    /// (normally already released by the supervisor's exit command). Idempotent.
    pub fn release(&self, id: &str) {
        crate::gpus::release(&self.root, id);
        if let Err(e) = tasknet::detach(&self.cni.cni(&self.root), &self.root, id) {
            tracing::warn!(task = %id, "releasing the network: {e:#}");
        }
    }

    /// The task's launch timings: those its supervisor sent with `started`, else (a supervisor
    /// that sent none) those it records in `state.json` just after (reading it at once
    /// sometimes found no timings yet).
    pub fn running_timings(&self, launched: &Launched) -> launch::Timings {
        if let Some(t) = &launched.timings {
            return (**t).clone();
        }
        // Milliseconds normally; seconds only on a host under heavy load.
        self.rt
            .wait_recorded(&launched.id, Duration::from_secs(10))
            .map(|st| st.timings)
            .unwrap_or_default()
    }

    /// For a wasi:http service: waits until its port accepts connections (RUNNING then means
    /// serving), while the task is alive, for at most `timeout`. False if it never did.
    pub fn wait_serving(&self, id: &str, port: u16, timeout: Duration) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            let ended = self
                .rt
                .info(id)
                .map(|i| i.state.status.is_terminal())
                .unwrap_or(true);
            if ended || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// The last lines of a task's stderr (why a Wasm host or a command failed).
    pub fn stderr_tail(&self, id: &str) -> String {
        let text = std::fs::read_to_string(self.rt.dir(id).stderr_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }
}
