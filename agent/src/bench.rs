//! `caisson bench launch`: launches N tasks through the containerizer (as `caisson run --rm`
//! does, without the CLI process around each) with C concurrent workers, and reports throughput
//! and where the time went, per phase: min, p50, p90, p99, max.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use containerizer::launch::{
    self, process_from_image, NetworkMode, ProcessOverrides, Runtime, Status, TaskSpec,
};
use containerizer::net::{Cni, NetworkRequest};
use containerizer::wasm;
use serde::Serialize;

use crate::network::CniArgs;
use crate::tasknet;

mod first_output;
mod master;
mod plot;
mod via_master;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Launch N tasks (C at a time) and report throughput and per-phase latency percentiles.
    Launch(LaunchArgs),
    /// Load a master with N simulated agents and M task submissions (no containers): master
    /// throughput and submit-to-RUNNING/FINISHED percentiles.
    Master(master::MasterArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Native Linux tasks from an image (overlay root, supervisor, namespaces, cgroups).
    Native,
    /// WASI modules run in this process from the compile cache.
    Wasm,
}

#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// What to launch.
    #[arg(long, value_enum)]
    kind: Kind,
    /// Image of native tasks (pulled first if missing, before timing starts).
    #[arg(long, required_if_eq("kind", "native"), conflicts_with = "module")]
    image: Option<String>,
    /// Module of Wasm tasks (`.wasm` or `.wat`; a WASI p1 module or p2 command component).
    #[arg(long, required_if_eq("kind", "wasm"))]
    module: Option<PathBuf>,
    /// Tasks to time.
    #[arg(long, short = 'n', default_value_t = 100)]
    count: usize,
    /// Tasks launched at once (worker threads).
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Untimed tasks launched first (caches, the v1 cgroup hierarchy, page cache).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Network of native tasks, as `caisson run --network`: none (own netns, loopback only,
    /// the default), host, or CNI network names (comma-separated or repeated).
    #[arg(long)]
    network: Vec<String>,
    /// Compile cache of Wasm modules [default: <root>/wasm-cache].
    #[arg(long)]
    wasm_cache: Option<PathBuf>,
    /// Launch through a master and its agents (`caisson master`/`agent`) instead of the local
    /// containerizer: the image (native) or module path (Wasm) must be on the agents' hosts.
    #[arg(long, value_name = "URL")]
    master: Option<String>,
    /// The master's API token (with --master).
    #[arg(long, env = "CAISSON_API_TOKEN", requires = "master")]
    token: Option<String>,
    /// TLS directory for an https:// master (ca.pem, user.pem), as `caisson submit --tls-dir`.
    #[arg(long = "tls-dir", requires = "master")]
    tls_dir: Option<PathBuf>,
    /// With --master: each of the C submitters waits this long after its task has ended
    /// before it submits the next (an agent that is not saturated, with time between launches
    /// for its background work, e.g. refilling `caisson agent --warm-sandboxes`).
    #[arg(long, value_name = "MS", requires = "master", default_value_t = 0)]
    pub(crate) pause_ms: u64,
    /// Native: keep N warm sandboxes of the image (overlay, cgroup, namespaces, mounts and
    /// pivot_root done ahead; `Runtime::with_warm_sandboxes`) and launch each task in one.
    /// Each worker refills the pool after its task, outside the timed phases.
    #[arg(long, value_name = "N")]
    warm_sandboxes: Option<usize>,
    /// Print the report as JSON (times in microseconds).
    #[arg(long)]
    json: bool,
    /// Also draw a histogram of the tasks' total latency into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// The command (native: replaces the image's CMD, e.g. `-- /bin/true`) or the module's
    /// arguments (Wasm).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    cmd: Vec<String>,
}

pub fn bench(root: &Path, cni: &CniArgs, c: BenchCommand) -> Result<std::process::ExitCode> {
    match c {
        BenchCommand::Launch(a) => launch_bench(root, cni, a),
        BenchCommand::Master(a) => master::bench(a),
    }
}

/// One timed task: its phase durations (ns, in the kind's phase order) or why it failed.
struct Sample {
    phases: Vec<u64>,
    /// From the task's start to its first byte of output (native tasks that wrote, when seen).
    first_output: Option<u64>,
    exit_code: Option<i32>,
    error: Option<String>,
    /// The task ran in a warm sandbox.
    warm: bool,
}

impl Sample {
    fn failed(e: impl std::fmt::Display) -> Sample {
        Sample {
            phases: vec![],
            warm: false,
            first_output: None,
            exit_code: None,
            error: Some(e.to_string()),
        }
    }
}

/// Native phases, in launch order. Those from the supervisor are its own `Timings`
/// (`caisson inspect` shows the same); the rest are wall-clock times taken here.
const NATIVE_PHASES: &[(&str, &str)] = &[
    (
        "rootfs",
        "image lookup and overlay root mount (as `caisson run`)",
    ),
    ("launcher", "task records, state dir, cgroup creation (v1)"),
    ("spawn", "supervisor fork + exec until its main"),
    ("cgroup", "cgroup creation and limits by the supervisor"),
    (
        "namespaces",
        "clone3 into new namespaces (own loopback-only netns, or joins the CNI one)",
    ),
    (
        "cgroup_join",
        "moving the init into its cgroups (overlaps mounts)",
    ),
    ("mounts", "mounts, pivot_root, caps, seccomp"),
    ("exec", "final exec until the supervisor sees it"),
    ("launch_to_exec", "Runtime::launch call until the task runs"),
    ("exit", "task running until its exit is reported"),
    (
        "launch_to_exit",
        "Runtime::launch call until the exit is reported (launch_to_exec + exit)",
    ),
    // Not a step but a time from the start (rootfs) like `total`, and only over the tasks that
    // wrote something: a watch on the logs sees the first byte (+ the watcher's wake-up).
    // Placed here by `build_report` when any task wrote.
    ("teardown", "--rm: unmount, rename away, release the name"),
    ("total", "whole task, rootfs to teardown"),
];

const FIRST_OUTPUT: &str =
    "start (rootfs) until the task's first byte in its logs (tasks that wrote)";

/// Only with CNI networks: between `rootfs` and `launcher`. The ADD runs on a thread of its
/// own while the root and the task's setup go on (the network gate, as `caisson run` does).
const NETWORK_PHASES: [(&str, &str); 2] = [
    (
        "network",
        "netns + CNI ADD, overlapped with the launch (DEL runs in the supervisor's exit command)",
    ),
    (
        "network_wait",
        "the task's exec held at the network gate (the part of `network` not overlapped)",
    ),
];

const WASM_PHASES: &[(&str, &str)] = &[
    (
        "load",
        "program from the template cache (disk cache on first use)",
    ),
    ("setup", "WASI context and store"),
    ("instantiate", "instance from the pre-instantiated template"),
    ("run", "guest entry point to its return or exit"),
    ("teardown", "store dropped, instance back to the pool"),
    ("total", "whole task"),
];

#[derive(Serialize, Debug)]
pub struct PhaseStats {
    pub name: &'static str,
    pub what: &'static str,
    /// Successful tasks measured.
    pub n: usize,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub kind: Kind,
    /// The image (native) or module (Wasm).
    pub target: String,
    /// The master the tasks went through (absent: the local containerizer).
    pub master: Option<String>,
    pub command: Vec<String>,
    pub count: usize,
    pub concurrency: usize,
    pub warmup: usize,
    /// Tasks that ran and exited 0.
    pub ok: usize,
    /// Tasks that failed to launch or exited non-zero.
    pub errors: usize,
    /// Exit codes of the tasks that ran ("none" when the launch failed).
    pub exit_codes: BTreeMap<String, usize>,
    /// The distinct error messages (at most 10).
    pub error_messages: Vec<String>,
    /// From the first launch to the last task's end.
    pub wall_seconds: f64,
    /// Successful tasks per second of wall time.
    pub throughput_per_second: f64,
    /// Per-phase statistics over the successful tasks (absent when none succeeded).
    pub phases: Vec<PhaseStats>,
    /// Native tasks with `--warm-sandboxes`: how many sandboxes were kept, how many tasks took
    /// one, and how the pool was refilled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_sandboxes: Option<WarmReport>,
    pub host: Host,
    pub started_unix_ms: u64,
}

#[derive(Serialize, Debug)]
pub struct WarmReport {
    /// Sandboxes kept ready.
    pub pool: usize,
    /// Timed tasks that ran in a warm sandbox (the others fell back to the cold path).
    pub tasks_in_sandboxes: usize,
    pub refill: &'static str,
}

const REFILL: &str = "synchronously by each worker after its task, between launches, outside \
                      the timed phases (with -c > 1 a refill overlaps other workers' tasks)";

#[derive(Serialize, Debug)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub cgroups: &'static str,
}

fn host() -> Host {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let cgroups = if containerizer::cgroups::is_v2() {
        "v2"
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        "hybrid"
    } else {
        "v1"
    };
    Host {
        kernel,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cgroups,
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p` of all at
/// or below it, so min <= p50 <= p90 <= p99 <= max always holds.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(name: &'static str, what: &'static str, mut v: Vec<u64>) -> PhaseStats {
    v.sort_unstable();
    let us = |ns: u64| ns as f64 / 1e3;
    PhaseStats {
        name,
        what,
        n: v.len(),
        min_us: us(v[0]),
        p50_us: us(percentile(&v, 0.5)),
        p90_us: us(percentile(&v, 0.9)),
        p99_us: us(percentile(&v, 0.99)),
        max_us: us(v[v.len() - 1]),
        mean_us: v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1e3,
    }
}

/// What one task of the chosen kind needs, shared by the workers.
enum Target {
    Native {
        root: PathBuf,
        rt: Runtime,
        image: String,
        cmd: Vec<String>,
        network: NetworkMode,
        /// CNI networks to attach each task to, and how.
        cni: Option<Box<(Cni, Vec<NetworkRequest>)>>,
        /// Launch in warm sandboxes (the runtime keeps them).
        warm: bool,
    },
    Wasm {
        engine: wasm::Engine,
        source: wasm::Source,
        argv: Vec<String>,
        devnull: File,
    },
}

impl Target {
    fn phases(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Target::Native { cni: None, .. } => NATIVE_PHASES.to_vec(),
            Target::Native { cni: Some(_), .. } => {
                let mut v = NATIVE_PHASES.to_vec();
                v.splice(1..1, NETWORK_PHASES);
                v
            }
            Target::Wasm { .. } => WASM_PHASES.to_vec(),
        }
    }

    fn run_one(&self) -> Sample {
        match self {
            Target::Native {
                root,
                rt,
                image,
                cmd,
                network,
                cni,
                warm,
            } => {
                if !*warm {
                    return native_task(root, rt, image, cmd, *network, cni.as_deref());
                }
                let s = warm_task(root, rt, image, cmd, *network)
                    .unwrap_or_else(|| native_task(root, rt, image, cmd, *network, None));
                // The next task's sandbox, made now: after this task, outside its phases.
                if let Err(e) = rt.fill_sandboxes() {
                    tracing::warn!("refilling the warm sandboxes: {e}");
                }
                s
            }
            Target::Wasm {
                engine,
                source,
                argv,
                devnull,
            } => wasm_task(engine, source, argv, devnull),
        }
    }
}

/// One native task, the way `caisson run --rm IMAGE CMD` does it (minus streaming the logs).
fn native_task(
    root: &Path,
    rt: &Runtime,
    image: &str,
    cmd: &[String],
    network: NetworkMode,
    cni: Option<&(Cni, Vec<NetworkRequest>)>,
) -> Sample {
    let id = launch::new_id();
    // Started before the clock: its thread is the benchmark's cost, not the launch's.
    let task_dir = rt.dir(&id).dir;
    let containers = task_dir.parent().unwrap_or(root);
    let watch = match first_output::Watch::start(containers, &id) {
        Ok(w) => w,
        Err(e) => return Sample::failed(format!("{e:#}")),
    };
    let t0 = Instant::now();
    // As `caisson run --network`: the namespace and the ADD start first, on their own thread.
    let starting = cni.map(|(cni, reqs)| {
        let files = tasknet::network_files(id[..12].to_string());
        tasknet::start_gated(cni, root, &id, reqs, files)
    });
    let prepared = crate::containers::prepare_image_root(root, image, &id, None);
    let remove_root = |owned: &Option<PathBuf>| {
        if let Some(dir) = owned {
            let _ = containerizer::image::rootfs::remove(dir);
        }
    };
    let gated = match starting.map(tasknet::Starting::ready).transpose() {
        Ok(g) => g,
        Err(e) => {
            if let Ok(p) = &prepared {
                remove_root(&p.owned);
            }
            return Sample::failed(format!("{e:#}"));
        }
    };
    // Releases what the network thread made, on the way out of a failed task.
    let undo_network = |g: Option<tasknet::Gated>| {
        if let (Some(g), Some((cni, _))) = (g, cni) {
            g.abandon(cni, root, &id);
        }
    };
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            undo_network(gated);
            return Sample::failed(format!("{e:#}"));
        }
    };
    let t1 = Instant::now();
    let process = match process_from_image(
        prepared.config.as_ref(),
        &ProcessOverrides {
            cmd: cmd.to_vec(),
            ..Default::default()
        },
    ) {
        Ok(p) => p,
        Err(e) => {
            remove_root(&prepared.owned);
            undo_network(gated);
            return Sample::failed(e);
        }
    };
    let owned = prepared.owned.clone();
    let mut spec = TaskSpec {
        id: id.clone(),
        image: image.to_string(),
        rootfs: prepared.rootfs,
        cleanup: prepared.owned.into_iter().collect(),
        rootfs_prepare_us: prepared.prepare_us,
        process,
        network,
        auto_remove: true,
        ..Default::default()
    };
    if let (Some(g), Some((cni, _))) = (&gated, cni) {
        crate::containers::gate_networks(cni, g, &mut spec);
    }
    let t2 = Instant::now();
    let launched = rt.launch(spec);
    // The launch has returned: the supervisor has read the gate (or failed before it).
    let attached = gated.map(tasknet::Gated::finish);
    let mut launched = match (launched, attached) {
        (Ok(l), _) => l,
        (Err(e), att) => {
            remove_root(&owned);
            if let Some((cni, ..)) = cni {
                if let Err(de) = tasknet::detach(cni, root, &id) {
                    tracing::warn!("releasing the network after a failed launch: {de:#}");
                }
            }
            return Sample::failed(match att {
                Some(Err(ne)) => format!("{ne:#}"),
                _ => e.to_string(),
            });
        }
    };
    let t3 = Instant::now();
    let ns = |d: Duration| d.as_nanos() as u64;
    let st = launched.wait();
    let t4 = Instant::now();
    launched.finish();
    let t5 = Instant::now();
    let first_output = watch
        .finish()
        .and_then(|t| t.checked_duration_since(t0))
        .map(ns);
    let st = match st {
        Ok(st) => st,
        Err(e) => return Sample::failed(e),
    };
    let (mut phases, exit_code, error) = native_phases(&st, [t0, t1, t2, t3, t4, t5]);
    if cni.is_some() {
        let t = &st.timings;
        let us = |v: Option<u64>| v.unwrap_or(0) * 1000;
        phases.splice(1..1, [us(t.network_us), us(t.network_wait_us)]);
    }
    Sample {
        phases,
        first_output,
        exit_code,
        error,
        warm: false,
    }
}

/// A native task's phases (in [`NATIVE_PHASES`] order, without `network`), exit code and
/// error, from its final state and the launcher's time stamps: start, root ready, launch call,
/// launched, exit reported, torn down.
fn native_phases(
    st: &launch::TaskState,
    at: [Instant; 6],
) -> (Vec<u64>, Option<i32>, Option<String>) {
    let [t0, t1, t2, t3, t4, t5] = at;
    let ns = |d: Duration| d.as_nanos() as u64;
    let t = &st.timings;
    let error = match (st.status, st.exit_code) {
        (Status::Exited, Some(0)) => None,
        (Status::Exited, Some(c)) => Some(format!("exit code {c}")),
        (s, _) => Some(format!(
            "ended as {s:?}: {}",
            st.reason.clone().or(st.error.clone()).unwrap_or_default()
        )),
    };
    let phases = vec![
        ns(t1 - t0),
        t.prepare_us * 1000,
        t.spawn_us * 1000,
        t.cgroup_us * 1000,
        t.namespaces_us * 1000,
        t.cgroup_join_us * 1000,
        t.mounts_us * 1000,
        t.exec_us * 1000,
        ns(t3 - t2),
        ns(t4 - t3),
        ns(t4 - t2),
        ns(t5 - t4),
        ns(t5 - t0),
    ];
    (phases, st.exit_code, error)
}

/// One native task in a warm sandbox (the runtime's pool of `image`), timed with the same
/// phases as [`native_task`]; `rootfs` is then only the image's config lookup. None when no
/// sandbox was ready or fit (the caller launches it cold).
fn warm_task(
    root: &Path,
    rt: &Runtime,
    image: &str,
    cmd: &[String],
    network: NetworkMode,
) -> Option<Sample> {
    let t0 = Instant::now();
    let config = containerizer::image::Store::open(root)
        .and_then(|s| {
            let r = s.resolve(image)?;
            s.config(&r)
        })
        .map(|c| c.config().clone());
    let config = match config {
        Ok(c) => c,
        Err(e) => return Some(Sample::failed(e)),
    };
    let process = match process_from_image(
        config.as_ref(),
        &ProcessOverrides {
            cmd: cmd.to_vec(),
            ..Default::default()
        },
    ) {
        Ok(p) => p,
        Err(e) => return Some(Sample::failed(e)),
    };
    let spec = TaskSpec {
        image: image.to_string(),
        process,
        network,
        auto_remove: true,
        ..Default::default()
    };
    let t1 = Instant::now();
    let t2 = t1;
    let mut launched = match rt.launch_in_sandbox(spec) {
        launch::WarmLaunch::Cold(_) => return None,
        launch::WarmLaunch::Launched(Ok(l)) => l,
        launch::WarmLaunch::Launched(Err(e)) => return Some(Sample::failed(e)),
    };
    let t3 = Instant::now();
    let st = launched.wait();
    let t4 = Instant::now();
    launched.finish();
    let t5 = Instant::now();
    let st = match st {
        Ok(st) => st,
        Err(e) => return Some(Sample::failed(e)),
    };
    let (phases, exit_code, error) = native_phases(&st, [t0, t1, t2, t3, t4, t5]);
    Some(Sample {
        phases,
        first_output: None,
        exit_code,
        error,
        warm: true,
    })
}

/// One Wasm task: the program from the engine's caches, then a fresh instance run to its end,
/// its output to /dev/null.
fn wasm_task(
    engine: &wasm::Engine,
    source: &wasm::Source,
    argv: &[String],
    devnull: &File,
) -> Sample {
    let t0 = Instant::now();
    let program = match engine.load(source) {
        Ok(p) => p,
        Err(e) => return Sample::failed(e),
    };
    let t1 = Instant::now();
    let out = |f: &File| f.try_clone().map(wasm::Stdio::File);
    let (stdout, stderr) = match (out(devnull), out(devnull)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return Sample::failed(e),
    };
    let task = wasm::TaskSpec {
        stdout,
        stderr,
        ..wasm::TaskSpec::new(argv.iter().cloned())
    };
    let (status, rt) = match engine.run_timed(&program, task) {
        Ok(r) => r,
        Err(e) => return Sample::failed(e),
    };
    let t2 = Instant::now();
    let ns = |d: Duration| d.as_nanos() as u64;
    let code = status.exit_code();
    Sample {
        phases: vec![
            ns(t1 - t0),
            ns(rt.setup),
            ns(rt.instantiate),
            ns(rt.run),
            ns(rt.teardown),
            ns(t2 - t0),
        ],
        first_output: None,
        warm: false,
        exit_code: Some(code),
        error: (!status.success()).then(|| status.to_string()),
    }
}

/// Runs `n` tasks on `c` workers; returns the samples and the wall time.
fn run_pool(
    target: &Target,
    n: usize,
    c: usize,
    progress: &indicatif::ProgressBar,
) -> (Vec<Sample>, Duration) {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Vec::with_capacity(n));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..c.min(n) {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    let sample = target.run_one();
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(sample);
                    progress.inc(1);
                }
            });
        }
    });
    let wall = t0.elapsed();
    (
        samples.into_inner().unwrap_or_else(|e| e.into_inner()),
        wall,
    )
}

fn launch_bench(root: &Path, cni_args: &CniArgs, a: LaunchArgs) -> Result<std::process::ExitCode> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.master.is_some() {
        return via_master::launch_bench(a);
    }
    let target = match a.kind {
        Kind::Native => {
            let image = a
                .image
                .clone()
                .context("--image is required with --kind native")?;
            if a.module.is_some() {
                bail!("--module is for --kind wasm");
            }
            // Pull now if missing, so that no task's time includes the pull.
            let store = containerizer::image::Store::open(root)?;
            match store.resolve(&image) {
                Ok(_) => {}
                Err(containerizer::image::Error::ImageNotKnown(_)) => {
                    crate::images::pull_for_run(&store, &image)?;
                }
                Err(e) => return Err(e.into()),
            }
            let plan = tasknet::plan(&a.network, &[])?;
            let network = match plan {
                tasknet::Plan::Host => NetworkMode::Host,
                _ => NetworkMode::None,
            };
            let cni = match plan {
                tasknet::Plan::Cni(reqs) => Some(Box::new((cni_args.cni(root), reqs))),
                _ => None,
            };
            // A long-running launcher, as the agent: supervisors started ahead.
            let mut rt = Runtime::new(root).with_warm_supervisor();
            if cni.is_some() {
                rt = rt.without_netns_ahead();
            }
            let warm = a.warm_sandboxes.filter(|n| *n > 0);
            if let Some(n) = warm {
                if cni.is_some() || network != NetworkMode::None {
                    bail!("--warm-sandboxes needs the default network (none)");
                }
                rt = rt
                    .with_warm_sandboxes(image.clone(), n)
                    .sandbox_refill(false);
                rt.fill_sandboxes().context("making the warm sandboxes")?;
            }
            Target::Native {
                root: root.to_path_buf(),
                rt,
                image,
                cmd: a.cmd.clone(),
                network,
                cni,
                warm: warm.is_some(),
            }
        }
        Kind::Wasm => {
            let module = a
                .module
                .clone()
                .context("--module is required with --kind wasm")?;
            if a.image.is_some() {
                bail!("--image is for --kind native");
            }
            if !a.network.is_empty() {
                bail!("--network is for --kind native");
            }
            let cache = a
                .wasm_cache
                .clone()
                .unwrap_or_else(|| root.join("wasm-cache"));
            std::fs::create_dir_all(&cache)
                .with_context(|| format!("creating {}", cache.display()))?;
            let engine = wasm::Engine::new(wasm::EngineConfig {
                cache_dir: Some(cache),
                max_instances: a.concurrency.clamp(4, 1000) as u32,
                ..wasm::EngineConfig::default()
            })?;
            let source = wasm::Source::path(&module);
            // Compile (or map from the disk cache) before timing, and fail early on a bad module.
            engine
                .load(&source)
                .with_context(|| format!("loading {}", module.display()))?;
            let name = module
                .file_name()
                .map_or_else(|| "module".into(), |n| n.to_string_lossy().into_owned());
            let mut argv = vec![name];
            argv.extend(a.cmd.iter().cloned());
            Target::Wasm {
                engine,
                source,
                argv,
                devnull: File::options()
                    .write(true)
                    .open("/dev/null")
                    .context("opening /dev/null")?,
            }
        }
    };
    let started_unix_ms = launch::state::now_ms();
    let hidden = indicatif::ProgressBar::hidden();
    if a.warmup > 0 {
        run_pool(&target, a.warmup, a.concurrency, &hidden);
    }
    let progress = indicatif::ProgressBar::new(a.count as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} launched {pos}/{len} [{bar:30}] {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let (samples, wall) = run_pool(&target, a.count, a.concurrency, &progress);
    progress.finish_and_clear();

    let report = build_report(&a, target.phases(), samples, wall, started_unix_ms);
    emit(&a, &report)
}

/// Writes the report (table or JSON, and the histogram); exit 1 if any task failed.
fn emit(a: &LaunchArgs, report: &Built) -> Result<std::process::ExitCode> {
    if let Some(path) = &a.plot {
        plot::histogram(path, &report.report, &report.totals_ns)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &report.report)?;
        writeln!(out)?;
    } else {
        print_table(&mut out, &report.report)?;
    }
    Ok(std::process::ExitCode::from(if report.report.errors > 0 {
        1
    } else {
        0
    }))
}

/// The report and the raw totals (for the histogram).
struct Built {
    report: Report,
    totals_ns: Vec<u64>,
}

fn build_report(
    a: &LaunchArgs,
    names: Vec<(&'static str, &'static str)>,
    samples: Vec<Sample>,
    wall: Duration,
    started_unix_ms: u64,
) -> Built {
    let mut exit_codes = BTreeMap::new();
    let mut error_messages: Vec<String> = vec![];
    let mut per_phase: Vec<Vec<u64>> = vec![vec![]; names.len()];
    let mut first_outputs = vec![];
    let (mut ok, mut errors) = (0, 0);
    let in_sandboxes = samples.iter().filter(|s| s.warm).count();
    for s in &samples {
        let code = s
            .exit_code
            .map_or_else(|| "none".to_string(), |c| c.to_string());
        *exit_codes.entry(code).or_insert(0) += 1;
        match &s.error {
            Some(e) => {
                errors += 1;
                if error_messages.len() < 10 && !error_messages.contains(e) {
                    error_messages.push(e.clone());
                }
            }
            None => {
                ok += 1;
                for (i, v) in s.phases.iter().enumerate() {
                    per_phase[i].push(*v);
                }
                first_outputs.extend(s.first_output);
            }
        }
    }
    let totals_ns = per_phase.last().cloned().unwrap_or_default();
    let mut phases: Vec<PhaseStats> = if ok > 0 {
        names
            .iter()
            .zip(per_phase)
            .map(|(&(name, what), v)| stats(name, what, v))
            .collect()
    } else {
        vec![]
    };
    if !first_outputs.is_empty() {
        let at = phases
            .iter()
            .position(|p| p.name == "exit")
            .unwrap_or(phases.len());
        phases.insert(at, stats("first_output", FIRST_OUTPUT, first_outputs));
    }
    let target_name = match (&a.image, &a.module) {
        (Some(i), _) => i.clone(),
        (_, Some(m)) => m.display().to_string(),
        _ => String::new(),
    };
    Built {
        report: Report {
            kind: a.kind,
            target: target_name,
            master: a.master.clone(),
            command: a.cmd.clone(),
            count: a.count,
            concurrency: a.concurrency,
            warmup: a.warmup,
            ok,
            errors,
            exit_codes,
            error_messages,
            wall_seconds: wall.as_secs_f64(),
            throughput_per_second: ok as f64 / wall.as_secs_f64().max(1e-9),
            phases,
            warm_sandboxes: a.warm_sandboxes.filter(|n| *n > 0).map(|pool| WarmReport {
                pool,
                tasks_in_sandboxes: in_sandboxes,
                refill: REFILL,
            }),
            host: host(),
            started_unix_ms,
        },
        totals_ns,
    }
}

/// Formats microseconds with a unit that suits the magnitude.
pub fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.2} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{us:.1} µs")
    }
}

/// The percentile table shared by the bench reports.
fn print_phases(out: &mut impl Write, phases: &[PhaseStats]) -> std::io::Result<()> {
    writeln!(
        out,
        "\n{:<15} {:>10} {:>10} {:>10} {:>10} {:>10}  what",
        "phase", "min", "p50", "p90", "p99", "max"
    )?;
    for p in phases {
        writeln!(
            out,
            "{:<15} {:>10} {:>10} {:>10} {:>10} {:>10}  {}",
            p.name,
            fmt_us(p.min_us),
            fmt_us(p.p50_us),
            fmt_us(p.p90_us),
            fmt_us(p.p99_us),
            fmt_us(p.max_us),
            p.what
        )?;
    }
    Ok(())
}

fn print_table(out: &mut impl Write, r: &Report) -> std::io::Result<()> {
    let cmd = if r.command.is_empty() {
        String::new()
    } else {
        format!(" {}", r.command.join(" "))
    };
    let via = r
        .master
        .as_ref()
        .map_or(String::new(), |m| format!(" through the master at {m}"));
    writeln!(
        out,
        "{:?} launch of {}{cmd}{via}: {} tasks, {} at a time ({} warmup), {} ok, {} errors",
        r.kind, r.target, r.count, r.concurrency, r.warmup, r.ok, r.errors
    )?;
    writeln!(
        out,
        "wall {:.3} s, throughput {:.1} tasks/s; host: kernel {}, {} cpus, cgroups {}",
        r.wall_seconds, r.throughput_per_second, r.host.kernel, r.host.cpus, r.host.cgroups
    )?;
    match &r.warm_sandboxes {
        Some(w) => writeln!(
            out,
            "WARM sandboxes: {} of {} tasks ran in one ({} kept ready; namespaces, mounts, \
             pivot_root and cgroup done ahead; `rootfs` is only the image config lookup); \
             refilled {}",
            w.tasks_in_sandboxes, r.count, w.pool, w.refill
        )?,
        None if r.kind == Kind::Native && r.master.is_none() => {
            writeln!(out, "cold launches (no warm sandboxes)")?
        }
        None => {}
    }
    for m in &r.error_messages {
        writeln!(out, "error: {m}")?;
    }
    if r.phases.is_empty() {
        return Ok(());
    }
    print_phases(out, &r.phases)?;
    if r.kind == Kind::Native && !r.phases.iter().any(|p| p.name == "network") {
        writeln!(
            out,
            "(no CNI network: a loopback-only netns is made in `namespaces`)"
        )?;
    }
    if let Some(p) = r.phases.iter().find(|p| p.name == "first_output") {
        if p.n < r.ok {
            writeln!(
                out,
                "(first_output: over the {} of {} tasks whose first byte was seen)",
                p.n, r.ok
            )?;
        }
    } else if r.kind == Kind::Native && r.master.is_none() {
        writeln!(
            out,
            "(first_output: no task wrote to stdout/stderr, e.g. /bin/true)"
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_and_ordered() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.9), 90);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        let s = stats("x", "", vec![5, 1, 9, 3]);
        assert!(s.min_us <= s.p50_us && s.p50_us <= s.p90_us);
        assert!(s.p90_us <= s.p99_us && s.p99_us <= s.max_us);
        assert_eq!((s.min_us, s.max_us), (0.001, 0.009));
    }

    #[test]
    fn units() {
        assert_eq!(fmt_us(9.44), "9.4 µs");
        assert_eq!(fmt_us(10_120.0), "10.12 ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50 s");
    }
}
