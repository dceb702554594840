//! `caisson-wasm`: runs one Wasm task in this process and exits with its exit code. It is what
//! `caisson run x.wasm` becomes, and the supervised host process of a Wasm task.
//!
//! Exit codes: the guest's own code when it exits; 134 when it traps (128+SIGABRT, as `wasmtime
//! run`); 137 when it hits its memory limit or is killed (as an OOM-killed container); 124 on
//! timeout (coreutils `timeout`); 125 for a host failure, 126 for a module that cannot run (not
//! Wasm, not a command, missing imports), 127 for a missing module file (podman's codes).
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use containerizer::wasm::{
    self, Engine, EngineConfig, Preopen, RunSpec, Source, Stdio, EXIT_HOST_ERROR,
};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "caisson-wasm",
    version,
    about = "Run a WebAssembly (WASI) task"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a WASI command module or component: `caisson-wasm run [OPTIONS] FILE [ARGS]...`
    Run(Box<RunArgs>),
    /// The shared host of an agent: run many Wasm command tasks in this process, as the agent
    /// asks over a unix socket (containerizer::wasm::host). Started by the agent.
    Host {
        /// The socket to listen on (replaced if it exists).
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
        /// Tasks that can run at once.
        #[arg(long, default_value_t = 1000)]
        max_tasks: u32,
    },
    /// Compile modules into the cache without running them.
    Compile {
        #[command(flatten)]
        cache: CacheArgs,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args)]
struct CacheArgs {
    /// Compile cache directory [default: $CAISSON_WASM_CACHE, else $XDG_CACHE_HOME/caisson/wasm,
    /// else ~/.cache/caisson/wasm]
    #[arg(long, value_name = "DIR")]
    cache: Option<PathBuf>,
    /// Do not read or write the compile cache.
    #[arg(long, conflicts_with = "cache")]
    no_cache: bool,
}

#[derive(clap::Args)]
#[command(trailing_var_arg = true)]
struct RunArgs {
    /// Preopen a host directory: HOST::GUEST (wasmtime syntax) or HOST (same path in the guest).
    #[arg(long = "dir", value_name = "HOST::GUEST")]
    dirs: Vec<String>,
    /// Bind a host directory, podman-style: HOST:GUEST[:ro].
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    volumes: Vec<String>,
    /// Environment variable KEY=VALUE (KEY alone copies it from this process).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Memory limit per linear memory: bytes, or with a k/m/g suffix. For a wasi:http service,
    /// per request instance.
    #[arg(short = 'm', long, value_name = "BYTES")]
    memory: Option<String>,
    /// Limit on table elements.
    #[arg(long, value_name = "N")]
    table_elements: Option<u64>,
    /// Wall-clock timeout in seconds (fractions allowed). For a wasi:http service, the limit of
    /// each request's instance (default 30): past it the request is answered 504 and the
    /// service goes on.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Redirect the guest's stdin from a file.
    #[arg(long, value_name = "PATH")]
    stdin: Option<PathBuf>,
    /// Append the guest's stdout to a file (created if missing).
    #[arg(long, value_name = "PATH")]
    stdout: Option<PathBuf>,
    /// Append the guest's stderr to a file (created if missing).
    #[arg(long, value_name = "PATH")]
    stderr: Option<PathBuf>,
    /// Read the whole task from a JSON spec (containerizer::wasm::RunSpec) instead of flags.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["file", "dirs", "volumes", "env", "memory", "timeout"])]
    spec: Option<PathBuf>,
    /// Write the task's exit status as JSON to this file when it ends.
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    /// The .wasm or .wat file.
    #[arg(required_unless_present = "spec")]
    file: Option<PathBuf>,
    /// Arguments for the guest (argv[1..]).
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
}

fn main() {
    containerizer::sys::default_sigpipe();
    // First of all, before any thread exists (every thread inherits the mask): from here on a
    // SIGTERM waits for the handling `run` sets up instead of killing the process mid-write.
    // The supervisor already execs us with them blocked; this covers a direct start.
    let stop_signals = match block_stop_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caisson-wasm: blocking signals: {e}");
            std::process::exit(EXIT_HOST_ERROR);
        }
    };
    // Logging only when asked: a one-shot host process should not pay for it by default.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(args) => run(*args, stop_signals),
        Cmd::Host {
            socket,
            cache,
            max_tasks,
        } => host(socket, &cache, max_tasks, stop_signals),
        Cmd::Compile { cache, files } => {
            // Nothing to stop gracefully: the signals' default action is right.
            let _ = stop_signals.thread_unblock();
            compile(cache, files)
        }
    };
    std::process::exit(code);
}

fn cache_dir(c: &CacheArgs) -> Option<PathBuf> {
    if c.no_cache {
        return None;
    }
    if let Some(d) = &c.cache {
        return Some(d.clone());
    }
    if let Some(d) = std::env::var_os("CAISSON_WASM_CACHE") {
        return Some(d.into());
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("caisson/wasm"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/caisson/wasm"))
}

fn engine(c: &CacheArgs) -> Result<Engine, wasm::Error> {
    Engine::new(EngineConfig {
        cache_dir: cache_dir(c),
        // One task per process: a small pool is enough and cheaper to set up.
        max_instances: 4,
        // The task process advances the epoch itself when it has a kill or a timeout
        // (`wasm::oneshot`): no ticker thread for a guest that ends in microseconds.
        epoch_ticker: false,
        ..EngineConfig::default()
    })
}

fn compile(cache: CacheArgs, files: Vec<PathBuf>) -> i32 {
    let engine = match engine(&cache) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    for f in files {
        match engine.load_with_origin(&Source::Path(f.clone())) {
            Ok((p, origin)) => println!("{} {} {:?}", p.digest(), f.display(), origin),
            Err(e) => return fail(&e),
        }
    }
    0
}

fn host(socket: PathBuf, cache: &CacheArgs, max_tasks: u32, stop_signals: SigSet) -> i32 {
    // A session of its own: the agent's death, or a signal to the agent's process group, must
    // not take the tasks with it.
    let _ = nix::unistd::setsid();
    let mut cfg = wasm::host::HostConfig::new(socket);
    cfg.cache_dir = cache_dir(cache);
    cfg.max_instances = max_tasks.max(1);
    match wasm::host::serve(cfg, stop_signals) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("caisson-wasm: {e}");
            EXIT_HOST_ERROR
        }
    }
}

fn fail(e: &wasm::Error) -> i32 {
    eprintln!("caisson-wasm: {e}");
    e.exit_code()
}

fn run(args: RunArgs, stop_signals: SigSet) -> i32 {
    let spec = match to_spec(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caisson-wasm: {e:#}");
            return EXIT_HOST_ERROR;
        }
    };
    if let Some(addr) = &spec.http {
        return serve(&spec, addr, &args.cache, stop_signals);
    }
    let engine = match engine(&args.cache) {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    let program = match engine.load(&Source::Path(spec.module.clone())) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let mut task = match spec.to_task() {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    // A CLI's guest talks to the terminal unless told otherwise.
    for (s, p) in [
        (&mut task.stdin, &spec.stdin),
        (&mut task.stdout, &spec.stdout),
        (&mut task.stderr, &spec.stderr),
    ] {
        if p.is_none() {
            *s = Stdio::Inherit;
        }
    }
    let report = match args.status_file {
        Some(p) => wasm::oneshot::Report::File(p),
        None => wasm::oneshot::Report::None,
    };
    wasm::oneshot::run_and_exit(&engine, &program, task, &spec.module, stop_signals, report)
}

/// SIGTERM and SIGINT, blocked in this thread (and so in every thread it starts).
fn block_stop_signals() -> nix::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()?;
    Ok(set)
}

/// Serves a `wasi:http/proxy` component on `addr` until this process is stopped (SIGTERM or
/// SIGINT: a graceful stop, exit 0).
fn serve(spec: &RunSpec, addr: &str, cache: &CacheArgs, stop_signals: SigSet) -> i32 {
    let env = spec
        .env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // As many threads as CPUs at most, but the extra ones start only when connections overlap:
    // an idle service, or one with a client at a time, keeps one thread.
    // CAISSON_WASM_HTTP_THREADS=N sets the most.
    let threads = std::env::var("CAISSON_WASM_HTTP_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let service = match wasm::Service::load(
        &spec.module,
        wasm::ServiceConfig {
            cache_dir: cache_dir(cache),
            limits: spec.limits,
            env,
            request_timeout: spec
                .timeout_ms
                .map_or(wasm::DEFAULT_REQUEST_TIMEOUT, Duration::from_millis),
            threads,
            ..Default::default()
        },
    ) {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    // Loading (reading, hashing, maybe compiling the component) left garbage on the heap; an
    // idle service should not keep it resident.
    containerizer::sys::wasm::release_free_heap();
    let built = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let rt = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caisson-wasm: tokio runtime: {e}");
            return EXIT_HOST_ERROR;
        }
    };
    let res = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!(
            "caisson-wasm: serving {} on http://{}",
            service.name(),
            listener.local_addr()?
        );
        // SIGTERM (`caisson stop`) or SIGINT: stop accepting, answer the requests in
        // flight, exit 0.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        // The handlers are in place: let the signals (and any already pending) through.
        stop_signals
            .thread_unblock()
            .map_err(std::io::Error::from)?;
        let stop = async move {
            let sig = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            eprintln!("caisson-wasm: {sig}: finishing the requests in flight");
        };
        service.serve_until(listener, stop).await
    });
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("caisson-wasm: serving on {addr}: {e}");
            EXIT_HOST_ERROR
        }
    }
}

fn to_spec(args: &RunArgs) -> Result<RunSpec> {
    if let Some(path) = &args.spec {
        let text =
            std::fs::read(path).with_context(|| format!("reading spec {}", path.display()))?;
        let mut spec: RunSpec = serde_json::from_slice(&text)
            .with_context(|| format!("parsing spec {}", path.display()))?;
        for (slot, flag) in [
            (&mut spec.stdin, &args.stdin),
            (&mut spec.stdout, &args.stdout),
            (&mut spec.stderr, &args.stderr),
        ] {
            if flag.is_some() {
                slot.clone_from(flag);
            }
        }
        return Ok(spec);
    }
    let file = args
        .file
        .clone()
        .expect("clap requires FILE without --spec");
    let mut argv = vec![file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.display().to_string())];
    argv.extend(args.args.iter().cloned());
    let mut preopens = Vec::new();
    for d in &args.dirs {
        let (host, guest) = d.split_once("::").unwrap_or((d, d));
        preopens.push(Preopen {
            host: host.into(),
            guest: guest.into(),
            read_only: false,
        });
    }
    for v in &args.volumes {
        let parts: Vec<&str> = v.split(':').collect();
        let (host, guest, ro) = match parts.as_slice() {
            [h, g] => (*h, *g, false),
            [h, g, "ro"] => (*h, *g, true),
            [h, g, "rw"] => (*h, *g, false),
            _ => bail!("invalid volume {v:?}: expected HOST:GUEST[:ro]"),
        };
        preopens.push(Preopen {
            host: host.into(),
            guest: guest.into(),
            read_only: ro,
        });
    }
    let env = args
        .env
        .iter()
        .filter_map(|e| match e.split_once('=') {
            Some(_) => Some(e.clone()),
            None => std::env::var(e).ok().map(|v| format!("{e}={v}")),
        })
        .collect();
    let memory = args.memory.as_deref().map(wasm::parse_memory).transpose()?;
    let timeout_ms = match args.timeout {
        Some(t) if !(t.is_finite() && t > 0.0) => bail!("invalid timeout {t}: seconds > 0"),
        Some(t) => Some(Duration::from_secs_f64(t).as_millis().max(1) as u64),
        None => None,
    };
    Ok(RunSpec {
        module: file,
        argv,
        env,
        preopens,
        stdin: args.stdin.clone(),
        stdout: args.stdout.clone(),
        stderr: args.stderr.clone(),
        limits: wasm::Limits {
            memory_bytes: memory,
            table_elements: args.table_elements,
        },
        timeout_ms,
        http: None,
    })
}
