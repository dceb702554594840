//! `caisson run` of Wasm tasks: a `.wasm`/`.wat` file, a `wasi/wasm` image or an OCI Wasm
//! artifact becomes a Wasm [`TaskSpec`], which then goes through the same launch, logs and exit
//! code handling as a native task (`containers::run_inner`). A child module of `containers` so
//! that it reads `RunArgs` as it is, with no accessors.
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use containerizer::image::{ImageRecord, Store};
use containerizer::launch::{self, LaunchError, Limits, TaskSpec, Volume};
use containerizer::wasm::{self, Engine, EngineConfig, Preopen, Program, RunSpec, Source};

use super::{parse_size, RunArgs};

/// `caisson run` flags that only Wasm tasks take.
#[derive(Args, Debug, Default)]
pub struct WasmFlags {
    /// Wall-clock limit in seconds (fractions allowed): the task is stopped (exit 124), even in
    /// an infinite loop. For a wasi:http service (-p/--port): the limit of each request
    /// (default 30), answered 504 past it while the service goes on. Wasm tasks only.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Serve a wasi:http/proxy component on this host port (same as `-p PORT:80`).
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
}

impl WasmFlags {
    fn used(&self) -> bool {
        self.timeout.is_some() || self.port.is_some()
    }

    /// The address to serve HTTP on, if asked.
    /// `-p [IP:]HOSTPORT:PORT` (shared with native tasks, where it maps a port on a CNI
    /// network; for a component the container port is informational, it has none).
    fn listen(&self, publish: &[String]) -> anyhow::Result<Option<String>> {
        let mut addrs = vec![];
        for p in publish {
            let parts: Vec<&str> = p.split(':').collect();
            let (ip, port) = match parts.as_slice() {
                [host, _ctr] => ("0.0.0.0", *host),
                [ip, host, _ctr] => (*ip, *host),
                [host] => ("0.0.0.0", *host),
                _ => return Err(LaunchError::Invalid(format!("invalid -p {p:?}")).into()),
            };
            let port: u16 = port
                .parse()
                .map_err(|_| LaunchError::Invalid(format!("invalid host port in -p {p:?}")))?;
            addrs.push(format!("{ip}:{port}"));
        }
        if let Some(port) = self.port {
            addrs.push(format!("0.0.0.0:{port}"));
        }
        match addrs.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.clone())),
            _ => Err(LaunchError::Invalid("a Wasm service listens on one port".into()).into()),
        }
    }
}

/// What `caisson run IMAGE` names, when it is Wasm.
pub enum WasmSource {
    /// A module file on the host; argv[0] is its file name.
    File(PathBuf),
    /// A module in the store: the file, and the argv/env the image gives.
    Image {
        module: PathBuf,
        argv: Vec<String>,
        env: Vec<String>,
    },
}

/// Whether `arg` is meant as a file: it exists as a regular file, or it ends in `.wasm`/`.wat`
/// and cannot be an image reference with a tag or digest.
pub(crate) fn file_arg(arg: &str) -> Option<PathBuf> {
    let p = Path::new(arg);
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let wasm_name = arg.ends_with(".wasm") || arg.ends_with(".wat");
    (wasm_name && (arg.starts_with('/') || arg.starts_with('.') || !arg.contains([':', '@'])))
        .then(|| p.to_path_buf())
}

/// The Wasm module of an image in the store, if it is a Wasm image: an artifact whose layer is
/// the module, or a `wasi/wasm` image whose entrypoint names the module in its layers.
pub fn module_of_image(
    store: &Store,
    record: &ImageRecord,
    overrides: &launch::ProcessOverrides,
) -> anyhow::Result<Option<WasmSource>> {
    if let Some(module) = containerizer::image::wasm::artifact_module(store, record)? {
        let mut argv = vec![module
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()];
        argv.extend(overrides.cmd.iter().cloned());
        return Ok(Some(WasmSource::Image {
            module,
            argv,
            env: overrides.env.clone(),
        }));
    }
    if !wasm::is_wasm_platform(&record.platform.os, &record.platform.architecture) {
        return Ok(None);
    }
    let config = store.config(record)?;
    let process = launch::process_from_image(config.config().as_ref(), overrides)?;
    // The layers, top first: the first one holding the entrypoint's path has the module.
    let mut last_err = None;
    for dir in store.layer_dirs(record)?.iter().rev() {
        match wasm::module_from_rootfs(dir, &process.args) {
            Ok((Source::Path(p), argv)) => {
                let env = process
                    .env
                    .into_iter()
                    .filter(|e| !e.starts_with("PATH="))
                    .collect();
                return Ok(Some(WasmSource::Image {
                    module: p,
                    argv,
                    env,
                }));
            }
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(match last_err {
        Some(e) => e.into(),
        None => anyhow::anyhow!("{}: the image has no layers", record.id),
    })
}

fn classify(root: &Path, a: &RunArgs, env: &[String]) -> anyhow::Result<Option<WasmSource>> {
    if let Some(path) = file_arg(&a.image) {
        // Only Wasm files: anything else (or a missing file) is an error from the engine,
        // which names what is wrong.
        let is_wasm = std::fs::File::open(&path)
            .ok()
            .and_then(|mut f| {
                let mut head = [0u8; 4096];
                let n = std::io::Read::read(&mut f, &mut head).ok()?;
                wasm::sniff(&head[..n])
            })
            .is_some();
        if is_wasm || a.image.ends_with(".wasm") || a.image.ends_with(".wat") {
            return Ok(Some(WasmSource::File(path)));
        }
        return Ok(None);
    }
    let store = Store::open(root)?;
    let record = match store.resolve(&a.image) {
        Ok(r) => r,
        Err(containerizer::image::Error::ImageNotKnown(_)) => {
            crate::images::pull_for_run(&store, &a.image)?
        }
        Err(e) => return Err(e.into()),
    };
    let overrides = launch::ProcessOverrides {
        entrypoint: a.entrypoint.clone(),
        cmd: a.cmd.clone(),
        env: env.to_vec(),
        workdir: None,
        user: None,
    };
    module_of_image(&store, &record, &overrides)
}

/// The Wasm task `a` describes, or `None` for a native task.
pub fn task_spec(
    root: &Path,
    a: &RunArgs,
    env: &[String],
    id: &str,
) -> anyhow::Result<Option<TaskSpec>> {
    let source = if a.rootfs {
        None
    } else {
        classify(root, a, env)?
    };
    let Some(source) = source else {
        if a.wasm.used() {
            return Err(LaunchError::Invalid(
                "--timeout and --port are for Wasm tasks only".into(),
            )
            .into());
        }
        return Ok(None);
    };
    let (module, argv, env) = match source {
        WasmSource::File(p) => {
            let module = std::fs::canonicalize(&p).map_err(|e| LaunchError::Start {
                code: if e.kind() == std::io::ErrorKind::NotFound {
                    wasm::EXIT_NOT_FOUND
                } else {
                    wasm::EXIT_CANNOT_RUN
                },
                message: format!("{}: {e}", p.display()),
            })?;
            let mut argv = vec![module
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()];
            argv.extend(a.cmd.iter().cloned());
            (module, argv, env.to_vec())
        }
        WasmSource::Image { module, argv, env } => (module, argv, env),
    };
    // Refused before anything is made (the cgroup below).
    if !a.network.is_empty() {
        return Err(LaunchError::Invalid(
            "--network applies to native tasks; a Wasm service listens on the host with -p".into(),
        )
        .into());
    }
    if !super::NameFlags::parse(a)?.is_empty() {
        return Err(LaunchError::Invalid(
            "--add-host and --dns* apply to native tasks (a Wasm task has no /etc)".into(),
        )
        .into());
    }
    if a.interactive || a.tty {
        return Err(LaunchError::Invalid("-i and -t apply to native tasks".into()).into());
    }
    for (flag, set) in [
        ("--user", a.user.is_some()),
        ("--workdir", a.workdir.is_some()),
        ("--read-only", a.read_only),
        ("--hostname", a.hostname.is_some()),
        ("--gpus", a.gpus.is_some()),
        ("--device", !a.device.is_empty()),
        (
            "--userns/--uidmap/--gidmap",
            a.userns.as_deref().is_some_and(|m| m != "host")
                || !a.uidmap.is_empty()
                || !a.gidmap.is_empty(),
        ),
    ] {
        if set {
            return Err(
                LaunchError::Invalid(format!("{flag} does not apply to Wasm tasks")).into(),
            );
        }
    }
    let preopens = a
        .volume
        .iter()
        .map(|v| {
            let v: Volume = v.parse()?;
            Ok(Preopen {
                host: v.source,
                guest: v.target,
                read_only: v.readonly,
            })
        })
        .collect::<Result<Vec<_>, LaunchError>>()?;
    let memory = match &a.memory {
        Some(m) => Some(parse_size(m).map_err(|e| LaunchError::Invalid(e.to_string()))?),
        None => None,
    };
    let timeout_ms = match a.wasm.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => {
            return Err(LaunchError::Invalid(format!("invalid --timeout {t}: seconds > 0")).into())
        }
        Some(t) => Some(std::time::Duration::from_secs_f64(t).as_millis().max(1) as u64),
        None => None,
    };
    let run = RunSpec {
        module,
        argv,
        env,
        preopens,
        limits: wasm::Limits {
            memory_bytes: memory,
            table_elements: None,
        },
        timeout_ms,
        http: a.wasm.listen(&a.publish)?,
        ..Default::default()
    };
    // `--memory` bounds the guest's linear memory; the host process's own memory is not the
    // guest's, so the cgroup gets CPU and pids limits only.
    let limits = Limits {
        cpus: a.cpus,
        cpu_shares: a.cpu_shares,
        memory: None,
        pids: a.pids_limit,
    };
    let loaded = precompile(root, &run);
    // A command runs in forks of this process: its cgroup is made here, and the CPU features
    // its WASI context probes are found once for both forks. On this thread: made on a second
    // one meanwhile, the whole run took 0.3 ms longer (a thread's start and end, and every
    // page fault and mapping change of a two-threaded process on two CPUs is a TLB flush by
    // interrupt on the other; `benches/ab.py 400`, 2.82 vs 2.55 ms).
    let cgroup = (run.http.is_none() && forked()).then(|| {
        wasm::probe_cpu_features();
        launch::wasm::prepare_cgroup(id, &limits)
    });
    let release = |cg: Option<Result<containerizer::cgroups::TaskCgroup, LaunchError>>| {
        if let Some(Ok(cg)) = cg {
            let _ = cg.destroy(std::time::Duration::from_secs(5));
        }
    };
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            release(cgroup);
            return Err(e);
        }
    };
    let cgroup = cgroup.transpose()?;
    *LOADED.lock().unwrap_or_else(|p| p.into_inner()) =
        loaded.map(|(engine, program)| (engine, program, cgroup));
    let mut spec = launch::wasm::wasm_task(run);
    spec.id = id.to_string();
    spec.name = a.name.clone().unwrap_or_default();
    spec.image = a.image.clone();
    spec.auto_remove = a.rm;
    spec.limits = limits;
    Ok(Some(spec))
}

/// The engine and program [`precompile`] loaded for the task being launched: a Wasm command
/// runs from them in the launcher's forks ([`launch`]).
/// The cgroup, when it was made ahead.
#[allow(clippy::type_complexity)]
static LOADED: std::sync::Mutex<
    Option<(Engine, Program, Option<containerizer::cgroups::TaskCgroup>)>,
> = std::sync::Mutex::new(None);

/// Wasm commands run in forks of the launcher (unless `CAISSON_WASM_SUPERVISOR=shim`).
fn forked() -> bool {
    std::env::var_os("CAISSON_WASM_SUPERVISOR").is_none_or(|v| v != "shim")
}

/// Launches `spec`: a Wasm command whose module this process loaded runs in forks of this
/// process ([`launch::wasm::launch_in_process`]: no supervisor or host program to start, the
/// compiled module already mapped); anything else (native tasks, wasi:http services, which
/// run in a lean `caisson-wasm` process of their own) through `caisson-shim`.
/// `CAISSON_WASM_SUPERVISOR=shim` sends Wasm commands that way too.
pub fn launch(rt: &launch::Runtime, spec: TaskSpec) -> Result<launch::Launched, LaunchError> {
    let command = spec.wasm.as_ref().is_some_and(|r| r.http.is_none());
    if command && forked() {
        let loaded = LOADED.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((engine, program, cgroup)) = loaded {
            // A fork copies no thread but every lock, held ones too (the allocator's: mimalloc
            // in the static build has no fork handlers). The first run of a module compiles it
            // on a pool of threads that stay: that run goes through the supervisor program,
            // which maps what the compile cached; the next ones fork.
            if containerizer::sys::launch::thread_count().ok() == Some(1) {
                return launch::wasm::launch_in_process(rt, spec, &engine, &program, cgroup);
            }
            if let Some(cg) = cgroup {
                let _ = cg.destroy(std::time::Duration::from_secs(5));
            }
        }
    }
    rt.launch(spec)
}

/// Loads the module once in the launcher: bad input fails here with the engine's message
/// (nothing recorded, nothing left behind), and the compiled artifact lands in the cache the
/// host process maps.
fn precompile(root: &Path, run: &RunSpec) -> anyhow::Result<Option<(Engine, Program)>> {
    let engine = Engine::new(EngineConfig {
        cache_dir: Some(launch::wasm::cache_dir(root)),
        max_instances: 1,
        // The task process advances the epoch itself when it has a kill or a timeout
        // (`wasm::oneshot`): no ticker thread for a guest that ends in microseconds.
        epoch_ticker: false,
        ..EngineConfig::default()
    })?;
    if run.http.is_some() {
        // Services are checked by the host process, which has the HTTP linker.
        return Ok(None);
    }
    match engine.load(&Source::Path(run.module.clone())) {
        Ok(program) => Ok(Some((engine, program))),
        Err(e) => Err(LaunchError::Start {
            code: e.exit_code(),
            message: e.to_string(),
        })
        .context("cannot run the Wasm task"),
    }
}
