//! Container verbs of the CLI (podman's flags): run, ps, logs, kill, stop, rm, inspect.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use containerizer::launch::{
    self, process_from_image, LaunchError, Limits, NetworkMode, ProcessOverrides, Runtime, Status,
    TaskInfo, TaskSpec, Volume,
};
use nix::sys::signal::{SigSet, Signal};
use std::process::ExitCode;

use crate::network::CniArgs;
use crate::tasknet;

#[path = "wasm_run.rs"]
pub mod wasm_run;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container id.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Keep the task's stdin open and pass ours to it.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the task a terminal (with -i in the foreground: ours, in raw mode).
    #[arg(short = 't', long)]
    tty: bool,
    /// Name of the container.
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from the host).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE per line).
    #[arg(long = "env-file")]
    env_file: Vec<PathBuf>,
    /// Bind mount a volume: HOST:CTR[:ro].
    #[arg(short = 'v', long = "volume")]
    volume: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// User (name|uid[:group|gid]).
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Override the image's entrypoint.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Container hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// Number of CPUs (CFS quota).
    #[arg(long)]
    cpus: Option<f64>,
    /// CPU shares (relative weight).
    #[arg(long = "cpu-shares", short = 'c')]
    cpu_shares: Option<u64>,
    /// Memory limit (e.g. 64m, 1g). Wasm tasks: per linear memory (a service: per request).
    #[arg(long, short = 'm')]
    memory: Option<String>,
    /// Maximum number of processes (-1 or 0: unlimited).
    #[arg(long = "pids-limit", allow_negative_numbers = true)]
    pids_limit: Option<i64>,
    /// Network: none (loopback only, the default), host, or CNI network names (repeatable or
    /// comma-separated; `bridge` is the default network `caisson`).
    #[arg(long = "network", alias = "net")]
    network: Vec<String>,
    /// Publish a port: [HOSTIP:]HOSTPORT:CTRPORT[/tcp|udp] (on the default network unless
    /// --network names one).
    #[arg(short = 'p', long = "publish")]
    publish: Vec<String>,
    /// Add a line to /etc/hosts: NAME:IP (IPv6 as NAME:[ADDR] or NAME:ADDR).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    add_host: Vec<String>,
    /// Nameserver for /etc/resolv.conf (repeatable; replaces the network's or host's).
    #[arg(long = "dns", value_name = "IP")]
    dns: Vec<std::net::IpAddr>,
    /// Search domain for /etc/resolv.conf (repeatable; replaces the network's or host's).
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    dns_search: Vec<String>,
    /// Resolver option for /etc/resolv.conf, e.g. ndots:2 (repeatable).
    #[arg(long = "dns-option", value_name = "OPT")]
    dns_option: Vec<String>,
    /// Mount the root filesystem read-only.
    #[arg(long = "read-only")]
    read_only: bool,
    /// User namespace: host (the default), or auto[:size=N] for a free range of host ids (the
    /// task's root is then an unprivileged host id; /etc/subuid's `containers` entry, if any).
    #[arg(long, value_name = "host|auto[:size=N]")]
    userns: Option<String>,
    /// Map container uids to host uids in a user namespace (repeatable).
    #[arg(long = "uidmap", value_name = "CTR:HOST:SIZE")]
    uidmap: Vec<String>,
    /// Map container gids to host gids (repeatable; default: as --uidmap).
    #[arg(long = "gidmap", value_name = "CTR:HOST:SIZE")]
    gidmap: Vec<String>,
    /// Security options: `seccomp=unconfined` disables the default seccomp filter.
    #[arg(long = "security-opt")]
    security_opt: Vec<String>,
    /// Give the task this many whole GPUs (or all), exclusively, with their devices.
    #[arg(long = "gpus", value_name = "N|all")]
    gpus: Option<String>,
    /// Give the task a device: a CDI device (vendor.com/class=name, or =all) from the CDI
    /// spec directories, or a host device node HOST[:CONTAINER][:PERMISSIONS]. Repeatable.
    #[arg(long = "device", value_name = "NAME|HOST[:CTR][:PERMS]")]
    device: Vec<String>,
    /// Write the container id to this file.
    #[arg(long)]
    cidfile: Option<PathBuf>,
    /// The first argument is a prepared root filesystem directory, not an image.
    #[arg(long)]
    rootfs: bool,
    /// IMAGE (or with --rootfs the root filesystem directory), then the command and its
    /// arguments. Everything after IMAGE belongs to the command, as with podman, so one
    /// trailing list holds both: a separate CMD list would let clap read the command's own
    /// options (`sh -c ...`) as ours.
    #[arg(
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "IMAGE [CMD]..."
    )]
    image_and_cmd: Vec<String>,
    #[command(flatten)]
    wasm: wasm_run::WasmFlags,
    #[arg(skip)]
    image: String,
    #[arg(skip)]
    cmd: Vec<String>,
}

impl RunArgs {
    /// Splits `image_and_cmd` into `image` and `cmd`.
    fn split(mut self) -> RunArgs {
        let mut it = std::mem::take(&mut self.image_and_cmd).into_iter();
        self.image = it.next().unwrap_or_default();
        self.cmd = it.collect();
        self
    }
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Show all containers (default: running only).
    #[arg(short = 'a', long)]
    all: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
    /// Only print ids.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// Print full ids.
    #[arg(long = "no-trunc")]
    no_trunc: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Follow the output until the container exits.
    #[arg(short = 'f', long)]
    follow: bool,
    container: String,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal to send (name or number).
    #[arg(short = 's', long, default_value = "KILL")]
    signal: String,
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// Seconds to wait after SIGTERM before SIGKILL.
    #[arg(short = 't', long = "time", default_value_t = 10)]
    time: u64,
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// Kill a running container first.
    #[arg(short = 'f', long)]
    force: bool,
    /// Remove all containers.
    #[arg(short = 'a', long)]
    all: bool,
    #[arg(required_unless_present = "all")]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct WaitArgs {
    #[arg(required = true)]
    containers: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and pass ours to the process (else it reads /dev/null).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the process a terminal (with -i in the foreground: ours, in raw mode).
    #[arg(short = 't', long)]
    tty: bool,
    /// Start the process in the background and return at once (its output is discarded).
    #[arg(short = 'd', long)]
    detach: bool,
    /// Set an environment variable (KEY=VALUE, or KEY to take it from the host).
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE per line).
    #[arg(long = "env-file")]
    env_file: Vec<PathBuf>,
    /// User (name|uid[:group|gid]); default the task's.
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Working directory; default the task's.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<String>,
    /// The container (id, unique id prefix or name), then the command and its arguments.
    #[arg(
        required = true,
        num_args = 2..,
        trailing_var_arg = true,
        value_names = ["CONTAINER", "CMD"]
    )]
    container_and_cmd: Vec<String>,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[arg(required = true)]
    containers: Vec<String>,
}

/// Runs a handler, printing its error podman-style; returns the process exit code.
fn report(res: anyhow::Result<i32>) -> i32 {
    match res {
        Ok(code) => code,
        Err(e) => {
            let code = e
                .downcast_ref::<LaunchError>()
                .map_or(125, |l| l.exit_code());
            eprintln!("Error: {e:#}");
            code
        }
    }
}

pub fn run(root: &Path, cni: &CniArgs, a: RunArgs) -> i32 {
    report(run_inner(root, cni, a.split()))
}

/// Parses a size such as `512`, `64k`, `64m`, `1g` (podman's units, binary multiples); the
/// same parser serves Wasm tasks' `--memory`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(containerizer::wasm::parse_memory(s)?)
}

/// `--env-file` files' entries, then `-e`'s (KEY alone: the host's value, if any).
fn env_list(files: &[PathBuf], flags: &[String]) -> Result<Vec<String>, LaunchError> {
    let mut env = vec![];
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| LaunchError::Invalid(format!("env file {}: {e}", f.display())))?;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            env.extend(env_entry(line));
        }
    }
    env.extend(flags.iter().filter_map(|e| env_entry(e)));
    Ok(env)
}

fn env_entry(e: &str) -> Option<String> {
    if e.contains('=') {
        Some(e.to_string())
    } else {
        std::env::var(e).ok().map(|v| format!("{e}={v}"))
    }
}

/// The root filesystem of a task: a directory given with `--rootfs`, or an overlay of an image.
pub(crate) struct PreparedRoot {
    pub(crate) rootfs: PathBuf,
    pub(crate) config: Option<oci_spec::image::Config>,
    /// The overlay dir caisson made (removed with the task, or here if the launch fails).
    pub(crate) owned: Option<PathBuf>,
    pub(crate) prepare_us: Option<u64>,
}

/// Resolves IMAGE in the store (pulling it if missing, as podman does) and mounts an overlay
/// root for task `id` under `<root>/rootfs/<id>`.
pub(crate) fn prepare_image_root(
    root: &Path,
    image: &str,
    id: &str,
    userns: Option<&launch::UserNamespace>,
) -> anyhow::Result<PreparedRoot> {
    use containerizer::image::{rootfs, Store};
    let t0 = std::time::Instant::now();
    let store = Store::open(root)?;
    let record = match store.resolve(image) {
        Ok(r) => r,
        Err(containerizer::image::Error::ImageNotKnown(_)) => {
            crate::images::pull_for_run(&store, image)?
        }
        Err(e) => return Err(e.into()),
    };
    let config = store.config(&record)?.config().clone();
    let dir = root.join("rootfs").join(id);
    let backend = rootfs::Backend::preferred();
    // A spare (upper/, work/, merged/) made by an ended task's supervisor, else made here.
    let claimed = backend == rootfs::Backend::Overlay
        && launch::spare::claim(root, launch::spare::Kind::Rootfs, &dir);
    if !claimed {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut opts = rootfs::CreateOptions::task_root();
    if let Some(u) = userns {
        let ns = containerizer::sys::launch::user_namespace(&u.uid_map_text(), &u.gid_map_text())
            .context("making a user namespace for the idmapped layers");
        opts.idmap = match ns {
            Ok(fd) => Some(rootfs::IdMap {
                userns: std::sync::Arc::new(fd),
                root: u.host_root(),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
    }
    let made = match store.create_rootfs(&record, &dir, backend, &opts) {
        Ok(r) => r,
        Err(e) => {
            let _ = rootfs::remove(&dir);
            return Err(e.into());
        }
    };
    Ok(PreparedRoot {
        rootfs: made.path,
        config,
        owned: Some(dir),
        prepare_us: Some(t0.elapsed().as_micros() as u64),
    })
}

fn build_spec(
    root: &Path,
    a: &RunArgs,
    mode: NetworkMode,
    id: String,
) -> anyhow::Result<(TaskSpec, Option<PathBuf>)> {
    let env = env_list(&a.env_file, &a.env)?;
    if let Some(spec) = wasm_run::task_spec(root, a, &env, &id)? {
        return Ok((spec, None));
    }
    let userns = user_namespace(root, a, &id)?;
    let prepared = if a.rootfs {
        if userns.is_some() {
            return Err(LaunchError::Invalid(
                "--userns and --uidmap need an image (its layers are mapped), not --rootfs".into(),
            )
            .into());
        }
        let rootfs = std::fs::canonicalize(&a.image)
            .map_err(|e| LaunchError::Invalid(format!("rootfs {}: {e}", a.image)))?;
        PreparedRoot {
            rootfs,
            config: None,
            owned: None,
            prepare_us: None,
        }
    } else {
        prepare_image_root(root, &a.image, &id, userns.as_ref())?
    };
    let owned = prepared.owned.clone();
    let spec = build_spec_on(a, env, id, prepared, mode).map(|mut s| {
        s.userns = userns;
        s
    });
    if spec.is_err() {
        if let Some(dir) = &owned {
            let _ = containerizer::image::rootfs::remove(dir);
        }
    }
    Ok((spec?, owned))
}

/// The user namespace `--userns`, `--uidmap` and `--gidmap` ask for (an auto one is claimed
/// here for task `id`; [`launch::userns::release`] gives it back if the launch fails).
fn user_namespace(
    root: &Path,
    a: &RunArgs,
    id: &str,
) -> anyhow::Result<Option<launch::UserNamespace>> {
    let invalid = |m: String| anyhow::Error::from(LaunchError::Invalid(m));
    let mode: launch::UsernsMode = a
        .userns
        .as_deref()
        .unwrap_or("host")
        .parse()
        .map_err(invalid)?;
    let maps = |v: &[String]| {
        v.iter()
            .map(|m| m.parse::<launch::IdMapping>())
            .collect::<Result<Vec<_>, _>>()
    };
    let uid_map = maps(&a.uidmap).map_err(invalid)?;
    let gid_map = maps(&a.gidmap).map_err(invalid)?;
    match mode {
        launch::UsernsMode::Auto { .. } if !uid_map.is_empty() || !gid_map.is_empty() => Err(
            invalid("--userns=auto picks its own maps: drop --uidmap/--gidmap".into()),
        ),
        launch::UsernsMode::Auto { size } => Ok(Some(launch::userns::allocate(root, id, size)?)),
        launch::UsernsMode::Host
            if a.userns.is_some() && !(uid_map.is_empty() && gid_map.is_empty()) =>
        {
            Err(invalid(
                "--userns=host and --uidmap/--gidmap contradict each other".into(),
            ))
        }
        launch::UsernsMode::Host if uid_map.is_empty() && !gid_map.is_empty() => {
            Err(invalid("--gidmap needs --uidmap".into()))
        }
        launch::UsernsMode::Host if uid_map.is_empty() => Ok(None),
        launch::UsernsMode::Host => {
            let gid_map = if gid_map.is_empty() {
                uid_map.clone()
            } else {
                gid_map
            };
            let ns = launch::UserNamespace { uid_map, gid_map };
            ns.validate()
                .map_err(|e| invalid(format!("user namespace: {e}")))?;
            Ok(Some(ns))
        }
    }
}

fn build_spec_on(
    a: &RunArgs,
    env: Vec<String>,
    id: String,
    prepared: PreparedRoot,
    network: NetworkMode,
) -> anyhow::Result<TaskSpec> {
    let process = process_from_image(
        prepared.config.as_ref(),
        &ProcessOverrides {
            entrypoint: a.entrypoint.clone(),
            cmd: a.cmd.clone(),
            env,
            workdir: a.workdir.clone(),
            user: a.user.clone(),
        },
    )?;
    let volumes = a
        .volume
        .iter()
        .map(|v| v.parse::<Volume>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut seccomp_unconfined = false;
    for o in &a.security_opt {
        match o.as_str() {
            "seccomp=unconfined" | "seccomp:unconfined" => seccomp_unconfined = true,
            "no-new-privileges" | "no-new-privileges=true" => {}
            other => {
                return Err(
                    LaunchError::Invalid(format!("unsupported --security-opt {other:?}")).into(),
                )
            }
        }
    }
    let memory = match &a.memory {
        Some(m) => Some(parse_size(m).map_err(|e| LaunchError::Invalid(e.to_string()))?),
        None => None,
    };
    Ok(TaskSpec {
        id,
        name: a.name.clone().unwrap_or_default(),
        image: a.image.clone(),
        rootfs: prepared.rootfs,
        cleanup: prepared.owned.into_iter().collect(),
        rootfs_prepare_us: prepared.prepare_us,
        readonly_rootfs: a.read_only,
        process,
        hostname: a.hostname.clone().unwrap_or_default(),
        volumes,
        network,
        limits: Limits {
            cpus: a.cpus,
            cpu_shares: a.cpu_shares,
            memory,
            pids: a.pids_limit,
        },
        auto_remove: a.rm,
        seccomp_unconfined,
        interactive: a.interactive,
        tty: a.tty,
        tty_size: crate::console::tty_size(a.tty),
        ..Default::default()
    })
}

/// What the launch needs for a network still being attached ([`tasknet::Gated`]): the
/// namespace and the gate to wait at. (/etc/hosts and resolv.conf come through the gate.)
pub(crate) fn gate_networks(
    cni: &containerizer::net::Cni,
    g: &tasknet::Gated,
    spec: &mut TaskSpec,
) {
    join_netns(cni, &g.netns, spec);
    spec.network_gate = Some(g.gate.clone());
}

/// The task joins `netns` and its supervisor releases its networks when it exits.
fn join_netns(cni: &containerizer::net::Cni, netns: &Path, spec: &mut TaskSpec) {
    if spec.hostname.is_empty() {
        spec.hostname = spec.id[..12].to_string();
    }
    spec.network_release = Some(containerizer::net::Release::new(
        cni,
        &spec.id,
        netns.to_path_buf(),
    ));
    spec.netns = Some(netns.to_path_buf());
}

/// `--add-host NAME:IP` as an /etc/hosts line.
fn host_line(v: &str) -> Result<String, LaunchError> {
    let bad = || LaunchError::Invalid(format!("invalid --add-host {v:?}: expected NAME:IP"));
    let (name, ip) = v.split_once(':').ok_or_else(bad)?;
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '#') {
        return Err(bad());
    }
    Ok(format!("{ip}\t{name}"))
}

/// The /etc/hosts and resolv.conf flags, checked before anything is made.
#[derive(Clone)]
struct NameFlags {
    hosts: Vec<String>,
    dns: Vec<String>,
    search: Vec<String>,
    options: Vec<String>,
}

impl NameFlags {
    fn parse(a: &RunArgs) -> Result<NameFlags, LaunchError> {
        let word = |flag: &str, v: &String| {
            if v.is_empty() || v.chars().any(char::is_whitespace) {
                Err(LaunchError::Invalid(format!("invalid {flag} {v:?}")))
            } else {
                Ok(v.clone())
            }
        };
        Ok(NameFlags {
            hosts: a
                .add_host
                .iter()
                .map(|h| host_line(h))
                .collect::<Result<_, _>>()?,
            dns: a.dns.iter().map(|ip| ip.to_string()).collect(),
            search: a
                .dns_search
                .iter()
                .map(|d| word("--dns-search", d))
                .collect::<Result<_, _>>()?,
            options: a
                .dns_option
                .iter()
                .map(|o| word("--dns-option", o))
                .collect::<Result<_, _>>()?,
        })
    }

    fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.dns.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }

    /// /etc/hosts and resolv.conf with these flags applied.
    fn extend(&self, hosts: String, resolv: &str) -> (String, String) {
        let extra: String = self.hosts.iter().map(|l| format!("{l}\n")).collect();
        (
            hosts + &extra,
            containerizer::net::files::override_resolv_conf(
                resolv,
                &self.dns,
                &self.search,
                &self.options,
            ),
        )
    }

    /// The task's /etc/hosts and resolv.conf once its networks are attached (for the network
    /// gate: computed on the network thread, written by the supervisor).
    fn network_files(&self, hostname: String) -> tasknet::NetworkFiles {
        let plain = tasknet::network_files(hostname);
        if self.is_empty() {
            return plain;
        }
        let names = self.clone();
        Box::new(move |atts| {
            let (hosts, resolv) = plain(atts);
            names.extend(hosts, &resolv)
        })
    }

    /// Rewrites the task's /etc/hosts and resolv.conf (the network's, or the defaults the
    /// launcher would write).
    fn apply(&self, spec: &mut TaskSpec) {
        if self.is_empty() {
            return;
        }
        if spec.hostname.is_empty() {
            spec.hostname = spec.id[..12].to_string();
        }
        let hosts = spec.hosts_file.take().unwrap_or_else(|| {
            format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                spec.hostname
            )
        });
        let resolv = spec
            .resolv_conf
            .take()
            .unwrap_or_else(|| std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
        let (hosts, resolv) = self.extend(hosts, &resolv);
        spec.hosts_file = Some(hosts);
        spec.resolv_conf = Some(resolv);
    }
}

/// Copies what the task appended to its stdout and stderr logs since `offsets` to ours;
/// returns the bytes copied.
fn copy_logs(out: &Path, err: &Path, offsets: &mut (u64, u64)) -> u64 {
    launch::copy_new(out, &mut offsets.0, &mut std::io::stdout()).unwrap_or(0)
        + launch::copy_new(err, &mut offsets.1, &mut std::io::stderr()).unwrap_or(0)
}

/// How long a foreground `run` waits for its task before it starts its log and signal threads.
const QUICK_WAIT: Duration = Duration::from_millis(10);

fn run_inner(root: &Path, cni_args: &CniArgs, a: RunArgs) -> anyhow::Result<i32> {
    let plan = tasknet::plan(&a.network, &a.publish)?;
    let names = NameFlags::parse(&a)?;
    let wants_userns = a.userns.as_deref().is_some_and(|m| m != "host")
        || !a.uidmap.is_empty()
        || !a.gidmap.is_empty();
    // The task's supervisor (and its network namespace) start now, while the root filesystem
    // and the records are prepared; not for an attached -i/-t task, whose supervisor is
    // spawned with the console.
    // Nor for a Wasm file: its supervisor would make a network namespace it never uses.
    let rt = if (!a.detach && (a.interactive || a.tty))
        || (!a.rootfs && wasm_run::file_arg(&a.image).is_some())
    {
        Runtime::new(root)
    } else {
        // A task on CNI networks joins the namespace made for it: none made ahead.
        // Nor for a task with a user namespace: its own is made at the clone, owned by it.
        let cni_netns = matches!(plan, tasknet::Plan::Cni(_));
        Runtime::new(root).with_supervisor_started_early(!cni_netns && !wants_userns)
    };
    let mode = match plan {
        tasknet::Plan::Host => NetworkMode::Host,
        _ => NetworkMode::None,
    };
    // Made only for a task on CNI networks (its state directory's name is a hash of the root:
    // SHA-256's CPU-feature probes trap on a VM).
    let cni_cell = std::cell::OnceCell::new();
    let cni = || cni_cell.get_or_init(|| cni_args.cni(root));
    let id = launch::new_id();
    // With CNI networks the namespace is made and the ADD started on a thread of their own
    // while the root filesystem is prepared, and the ADD goes on while the task's supervisor
    // sets it up: only the task's exec waits for the network (the gate). (Only -p means the
    // default network, unless the image is Wasm: that one starts once the spec is known.)
    let hostname = match a.hostname.as_deref() {
        Some(h) if !h.is_empty() => h.to_string(),
        _ => id[..12].to_string(),
    };
    let start_network = |reqs: &[containerizer::net::NetworkRequest]| {
        tasknet::start_gated(
            cni(),
            root,
            &id,
            reqs,
            names.network_files(hostname.clone()),
        )
    };
    let early = match &plan {
        tasknet::Plan::Cni(reqs) if !a.network.is_empty() => Some(start_network(reqs)),
        _ => None,
    };
    let built = build_spec(root, &a, mode, id.clone());
    let (mut gated, early_err) = match early.map(tasknet::Starting::ready) {
        Some(Ok(g)) => (Some(g), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    // Releases what the network thread made, on the way out of a failed run.
    let undo_network = |g: Option<tasknet::Gated>| {
        if let Some(g) = g {
            g.abandon(cni(), root, &id);
        }
    };
    let (mut spec, owned_root) = match built {
        Ok(b) => b,
        Err(e) => {
            undo_network(gated.take());
            launch::userns::release(root, &id);
            return Err(e);
        }
    };
    // A Wasm task runs in the host's network namespace; its `-p` is where it serves HTTP.
    // (`wasm_run::task_spec` refused the flags that do not apply to Wasm tasks.)
    let plan = if spec.wasm.is_some() {
        undo_network(gated.take());
        tasknet::Plan::None
    } else {
        plan
    };
    let remove_root = || {
        if let Some(dir) = &owned_root {
            let _ = containerizer::image::rootfs::remove(dir);
        }
        launch::userns::release(root, &id);
    };
    if let Some(e) = early_err {
        remove_root();
        return Err(e);
    }
    if let (None, tasknet::Plan::Cni(reqs)) = (&gated, &plan) {
        match start_network(reqs).ready() {
            Ok(g) => gated = Some(g),
            Err(e) => {
                remove_root();
                return Err(e);
            }
        }
    }
    // Devices and GPUs: allocated before the launch, released if it fails or when the task
    // is done (by the supervisor's exit command as soon as it exits).
    let gpus = match crate::cdi::attach(root, a.gpus.as_deref(), &a.device, &mut spec) {
        Ok(g) => g,
        Err(e) => {
            undo_network(gated.take());
            remove_root();
            return Err(e);
        }
    };
    if gpus {
        match cleanup_command(root, cni_args, &spec.id) {
            Ok(c) => spec.exit_command = c,
            Err(e) => {
                crate::gpus::release(root, &spec.id);
                undo_network(gated.take());
                remove_root();
                return Err(e);
            }
        }
    }
    if let Some(g) = &gated {
        gate_networks(cni(), g, &mut spec);
    }
    names.apply(&mut spec);
    let id = spec.id.clone();
    let attach = !a.detach && (a.interactive || a.tty);
    let launch = if attach {
        rt.launch_attached(spec)
    } else {
        wasm_run::launch(&rt, spec)
    };
    // The ADD's outcome: the launch has returned, so the supervisor has read the gate (or
    // failed before); the gate goes now.
    let networked = gated.is_some();
    let attached = gated.map(tasknet::Gated::finish);
    let mut launched = match (launch, attached) {
        (Ok(l), None | Some(Ok(_))) => l,
        (Ok(l), Some(Err(e))) => {
            // Not expected: the supervisor lets the task exec only on the network's go.
            tracing::warn!("the task started though its network reported: {e:#}");
            l
        }
        (Err(e), att) => {
            if gpus {
                crate::gpus::release(root, &id);
            }
            remove_root();
            if networked {
                if let Err(de) = tasknet::detach(cni(), root, &id) {
                    tracing::warn!("releasing the network after a failed launch: {de:#}");
                }
            }
            // The network's own error names the network and plugin; the supervisor's report
            // of it only repeats it.
            return Err(match att {
                Some(Err(ne)) => ne,
                _ => e.into(),
            });
        }
    };
    if let Some(f) = &a.cidfile {
        std::fs::write(f, &launched.id).with_context(|| format!("writing {}", f.display()))?;
    }
    if a.detach {
        // As podman: the id comes once the task is recorded running (pid and all).
        if rt
            .wait_recorded(&launched.id, Duration::from_secs(10))
            .is_none()
        {
            tracing::warn!("{} is not recorded as started yet", launched.id);
        }
        println!("{}", launched.id);
        launched.leave();
        return Ok(0);
    }
    // Forward the usual termination signals to the task (podman's --sig-proxy).
    let mut proxied = SigSet::empty();
    for sig in launch::exec::RELAYED_SIGNALS {
        proxied.add(sig);
    }
    // With -i/-t the task's streams are ours (the terminal's output comes from there, not
    // from the logs).
    let attached = match launched.take_console() {
        Some(c) => Some(crate::console::Attached::start(c, a.tty, a.interactive)?),
        None => None,
    };
    let resize = attached.as_ref().filter(|_| a.tty).map(|at| at.resizer());
    if resize.is_some() {
        proxied.add(Signal::SIGWINCH);
    }
    proxied.thread_block()?;
    let dir = rt.dir(&launched.id);
    let (out_path, err_path) = (dir.stdout_log(), dir.stderr_log());
    let tail_logs = !a.tty;
    // A task that ends within QUICK_WAIT is waited for before any thread of ours starts: after
    // the launch's forks, a second thread makes each copy-on-write fault of this process an
    // inter-processor TLB flush. Its output is copied at its end; a signal that came meanwhile
    // (blocked) is relayed once the relay thread starts, or dies with us if the task ended.
    let quick = match attached {
        None => launched.wait_timeout(QUICK_WAIT),
        Some(_) => None,
    };
    let st = match quick {
        Some(st) => {
            if tail_logs {
                copy_logs(&out_path, &err_path, &mut (0, 0));
            }
            st
        }
        None => {
            {
                let rt = rt.clone();
                let id = launched.id.clone();
                std::thread::spawn(move || {
                    while let Ok(sig) = proxied.wait() {
                        match (&resize, sig) {
                            (Some(r), Signal::SIGWINCH) => r(),
                            _ => {
                                let _ = rt.kill(&id, sig);
                            }
                        }
                    }
                });
            }
            // Stream the logs while the task runs.
            let done = Arc::new(AtomicBool::new(false));
            let tail = {
                let done = done.clone();
                std::thread::spawn(move || {
                    if !tail_logs {
                        return;
                    }
                    let mut offsets = (0, 0);
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        let n = copy_logs(&out_path, &err_path, &mut offsets);
                        if finished {
                            break;
                        }
                        if n == 0 {
                            std::thread::park_timeout(Duration::from_millis(10));
                        }
                    }
                })
            };
            let st = launched.wait();
            done.store(true, Ordering::Release);
            tail.thread().unpark();
            let _ = tail.join();
            st
        }
    };
    if let Some(at) = attached {
        at.finish();
    }
    launched.finish_before_exit();
    if gpus {
        crate::gpus::release(root, &id);
    }
    let st = st?;
    match st.status {
        Status::Exited => Ok(st.exit_code.unwrap_or(125)),
        _ => {
            eprintln!(
                "Error: container {} ended as {:?}: {}",
                &a.name.unwrap_or_default(),
                st.status,
                st.reason.unwrap_or_default()
            );
            Ok(125)
        }
    }
}

/// `caisson cleanup ID`, run by the task's supervisor when it exits (podman's
/// `container cleanup` as conmon's exit command), with the CLI's store and CNI settings.
pub(crate) fn cleanup_command(root: &Path, cni: &CniArgs, id: &str) -> anyhow::Result<Vec<String>> {
    let exe = std::env::current_exe().context("locating the caisson executable")?;
    let mut v = vec![
        exe.to_string_lossy().into_owned(),
        "--root".into(),
        root.to_string_lossy().into_owned(),
    ];
    v.extend(cni.argv());
    v.extend(["cleanup".into(), id.to_string()]);
    Ok(v)
}

/// Releases what a task holds outside its own directory (its networks, its GPUs). Idempotent.
pub fn cleanup(root: &Path, cni: &CniArgs, id: &str) -> anyhow::Result<ExitCode> {
    crate::gpus::release(root, id);
    tasknet::detach(&cni.cni(root), root, id)?;
    Ok(ExitCode::SUCCESS)
}

fn ago(ms: u64) -> String {
    let secs = launch::state::now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

fn status_text(t: &TaskInfo) -> String {
    let s = &t.state;
    match s.status {
        Status::Created => "Created".into(),
        Status::Running => format!(
            "Up {}",
            ago(s.started_ms.unwrap_or(s.created_ms)).replace(" ago", "")
        ),
        Status::Exited => format!(
            "Exited ({}){} {}",
            s.exit_code.unwrap_or(-1),
            if s.oom_killed { " OOMKilled" } else { "" },
            ago(s.finished_ms.unwrap_or(s.created_ms))
        ),
        Status::Failed => format!("Failed ({})", s.exit_code.unwrap_or(125)),
        Status::Lost => format!(
            "Lost ({})",
            s.reason.as_deref().unwrap_or("supervisor gone")
        ),
    }
}

pub fn ps(root: &Path, a: PsArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        let list: Vec<TaskInfo> = rt
            .list()?
            .into_iter()
            .filter(|t| a.all || t.state.status == Status::Running)
            .collect();
        let mut out = std::io::stdout().lock();
        if a.json {
            serde_json::to_writer_pretty(&mut out, &list)?;
            writeln!(out)?;
            return Ok(0);
        }
        let id = |t: &TaskInfo| {
            if a.no_trunc {
                t.id.clone()
            } else {
                t.id[..12].to_string()
            }
        };
        if a.quiet {
            for t in &list {
                writeln!(out, "{}", id(t))?;
            }
            return Ok(0);
        }
        writeln!(
            out,
            "{:<12}  {:<24}  {:<20}  {:<16}  {:<28}  NAMES",
            "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
        )?;
        for t in &list {
            let mut cmd = t.spec.process.args.join(" ");
            if cmd.len() > 20 {
                cmd.truncate(17);
                cmd.push_str("...");
            }
            writeln!(
                out,
                "{:<12}  {:<24}  {:<20}  {:<16}  {:<28}  {}",
                id(t),
                t.spec.image,
                cmd,
                ago(t.state.created_ms),
                status_text(t),
                t.name
            )?;
        }
        Ok(0)
    })())
}

pub fn logs(root: &Path, a: LogsArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        let id = rt.resolve(&a.container)?;
        let dir = rt.dir(&id);
        let (mut o, mut e) = (0u64, 0u64);
        let mut stdout = std::io::stdout();
        let mut stderr = std::io::stderr();
        loop {
            let terminal = !a.follow || rt.info(&id)?.state.status.is_terminal();
            let n = launch::copy_new(&dir.stdout_log(), &mut o, &mut stdout)?
                + launch::copy_new(&dir.stderr_log(), &mut e, &mut stderr)?;
            if terminal {
                return Ok(0);
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })())
}

/// Parses `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(s: &str) -> anyhow::Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| anyhow!("invalid signal {s:?}"));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>()
        .map_err(|_| anyhow!("invalid signal {s:?}"))
}

pub fn kill(root: &Path, a: KillArgs) -> i32 {
    report((|| {
        let sig = parse_signal(&a.signal)?;
        let rt = Runtime::new(root);
        for c in &a.containers {
            let id = rt.resolve(c)?;
            rt.kill(&id, sig)?;
            println!("{id}");
        }
        Ok(0)
    })())
}

pub fn stop(root: &Path, a: StopArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        for c in &a.containers {
            let id = rt.resolve(c)?;
            rt.stop(&id, Duration::from_secs(a.time))?;
            println!("{c}");
        }
        Ok(0)
    })())
}

pub fn rm(root: &Path, cni: &CniArgs, a: RmArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        let mut targets = a.containers.clone();
        if a.all {
            targets.extend(rt.list()?.into_iter().map(|t| t.id));
        }
        for c in &targets {
            let id = rt.resolve(c)?;
            rt.remove(&id, a.force)
                .with_context(|| format!("removing {c}"))?;
            crate::gpus::release(root, &id);
            // Normally done by the supervisor's exit command already; this covers a
            // supervisor that died first.
            if let Err(e) = tasknet::detach(&cni.cni(root), root, &id) {
                eprintln!("Warning: {e:#}");
            }
            println!("{id}");
        }
        // Leftovers of launches and removals that were killed half-way.
        rt.sweep_trash(Duration::from_secs(60));
        for id in tasknet::sweep_orphans(&cni.cni(root), root) {
            tracing::info!("released the network of an unfinished launch {id}");
        }
        for id in sweep_orphan_roots(root) {
            tracing::info!("removed the root filesystem of an unfinished launch {id}");
        }
        Ok(0)
    })())
}

/// Root filesystems with no task record, older than the orphan grace period: what a launcher
/// killed between preparing the root and starting the supervisor left (overlay still mounted).
fn sweep_orphan_roots(root: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(root.join("rootfs")) else {
        return vec![];
    };
    let grace = containerizer::launch::state::orphan_grace();
    let now = std::time::SystemTime::now();
    let mut done = vec![];
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        if root.join("containers").join(&id).exists() {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age >= grace);
        // Re-checked: the launch may have created its record meanwhile.
        if !old || root.join("containers").join(&id).exists() {
            continue;
        }
        launch::state::unmount_under(&e.path());
        launch::state::cleanup_owned(&[e.path()]);
        done.push(id);
    }
    done
}

/// Blocks until each container has ended and prints its exit code (podman wait).
/// `caisson exec`: checks the task, then becomes `caisson-shim --exec` (see
/// `containerizer::launch::exec`), which runs the command in it and exits with its code.
pub fn exec(root: &Path, a: ExecArgs) -> i32 {
    report((|| {
        use std::os::unix::process::CommandExt;
        let rt = Runtime::new(root);
        let (container, cmd) = a
            .container_and_cmd
            .split_first()
            .expect("clap requires both");
        // Whether it runs is the helper's to check (it reads the records anyway).
        let dir = rt.dir(&rt.resolve(container)?).dir;
        let env = env_list(&a.env_file, &a.env)?;
        let spec = launch::exec::ExecSpec {
            args: cmd.to_vec(),
            env,
            user: a.user.clone(),
            cwd: a.workdir.clone(),
            tty: a.tty,
            tty_size: crate::console::tty_size(a.tty),
        };
        if a.detach && (a.tty || a.interactive) {
            return Err(LaunchError::Invalid("exec -d takes neither -i nor -t".into()).into());
        }
        if a.tty {
            return exec_with_terminal(&rt, &dir, &spec, a.interactive);
        }
        let mut shim = launch::guard::shim_command(rt.shim());
        shim.arg(launch::exec::EXEC_ARG)
            .arg(&dir)
            .arg(serde_json::to_string(&spec)?);
        if a.detach {
            // The helper on its own (a process group of its own: our terminal's signals are
            // not its), left to run when we exit; it still refuses a task that is not running.
            use std::process::Stdio;
            shim.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", rt.shim().display()))?;
            return Ok(0);
        }
        if !a.interactive {
            shim.stdin(std::process::Stdio::null());
        }
        let err = shim.exec();
        Err(anyhow!("running {}: {err}", rt.shim().display()))
    })())
}

/// `exec -t`: the helper is our child, its terminal relayed through its console socket (our
/// terminal raw with -i, window size changes passed on), the termination signals passed to it.
fn exec_with_terminal(
    rt: &Runtime,
    dir: &Path,
    spec: &launch::exec::ExecSpec,
    interactive: bool,
) -> anyhow::Result<i32> {
    use std::os::unix::process::ExitStatusExt;
    let code =
        |s: std::process::ExitStatus| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0));
    let (mut child, master) = launch::exec::spawn_with_terminal(rt.shim(), dir, spec)
        .with_context(|| format!("starting {}", rt.shim().display()))?;
    let Ok(master) = master else {
        // The helper said why (on our stderr).
        return Ok(code(child.wait()?));
    };
    let at = crate::console::PtyAttached::start(master, interactive)?;
    let resize = at.resizer();
    let mut proxied = SigSet::empty();
    for sig in launch::exec::RELAYED_SIGNALS
        .into_iter()
        .chain([Signal::SIGWINCH])
    {
        proxied.add(sig);
    }
    proxied.thread_block()?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        while let Ok(sig) = proxied.wait() {
            match sig {
                Signal::SIGWINCH => resize(),
                _ => {
                    let _ = nix::sys::signal::kill(pid, sig);
                }
            }
        }
    });
    let status = child.wait()?;
    at.finish();
    Ok(code(status))
}

pub fn wait(root: &Path, a: WaitArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        for c in &a.containers {
            let id = rt.resolve(c)?;
            let st = rt
                .wait_terminal(&id, Duration::MAX)?
                .ok_or_else(|| anyhow!("{c} did not end"))?;
            println!("{}", st.exit_code.unwrap_or(-1));
        }
        Ok(0)
    })())
}

/// What `inspect` shows of each attachment: interfaces, addresses, gateways.
fn network_summary(atts: &[containerizer::net::Attachment]) -> Vec<serde_json::Value> {
    atts.iter()
        .map(|a| {
            let r = a.result.clone().unwrap_or_default();
            let ips: Vec<_> = r
                .task_ips(&a.ifname)
                .iter()
                .map(
                    |i| serde_json::json!({"address": i.address.to_string(), "gateway": i.gateway}),
                )
                .collect();
            serde_json::json!({
                "network": a.network,
                "interface": a.ifname,
                "netns": a.netns,
                "ips": ips,
                "interfaces": r.interfaces,
                "routes": r.routes,
                "dns": r.dns,
            })
        })
        .collect()
}

pub fn inspect(root: &Path, cni: &CniArgs, a: InspectArgs) -> i32 {
    report((|| {
        let rt = Runtime::new(root);
        let cni = cni.cni(root);
        let mut infos = vec![];
        for c in &a.containers {
            let info = rt.info(&rt.resolve(c)?)?;
            let mut v = serde_json::to_value(&info)?;
            let atts = cni.attachments(&info.id).unwrap_or_default();
            v["networks"] = serde_json::to_value(network_summary(&atts))?;
            infos.push(v);
        }
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &infos)?;
        writeln!(out)?;
        Ok(0)
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("10kb").unwrap(), 10 << 10);
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGUSR1").unwrap(), Signal::SIGUSR1);
        assert!(parse_signal("nope").is_err());
    }
}
