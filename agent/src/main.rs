//! `caisson`: a daemonless container agent. Thin CLI over the `containerizer` library.
mod bench;
mod cdi;
mod cluster;
mod console;
mod containers;
mod gpus;
mod images;
mod network;
mod tasknet;

// The static musl build (scripts/build-dist.sh) starts ~0.6 ms sooner than a glibc one on VMs,
// where every glibc start spends that long in CPU-feature probes (`cpuid` traps to the
// hypervisor). musl's own allocator is slow under threads (the Wasm one-shot, the agent's
// gRPC): mimalloc there.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "caisson",
    version,
    about = "A daemonless container agent: images, native and Wasm tasks"
)]
struct Cli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: Command,
}

/// The options every command takes.
#[derive(clap::Args)]
struct Globals {
    /// Root of caisson's store and state (images, containers).
    #[arg(long, global = true, env = "CAISSON_ROOT", default_value = containerizer::image::store::DEFAULT_ROOT)]
    root: PathBuf,
    /// Log filter (tracing's env-filter syntax), e.g. `debug` or `containerizer=trace`.
    #[arg(long, global = true, env = "CAISSON_LOG", default_value = "warn")]
    log_level: String,
    #[command(flatten)]
    cni: network::CniArgs,
    #[command(flatten)]
    gpu: gpus::GpuArgs,
    #[command(flatten)]
    cdi: cdi::CdiArgs,
}

/// The command line of `caisson run` or `exec` alone: clap builds every argument of every
/// subcommand before it parses, a third of a millisecond (`exec`: 0.8 ms) of each start for
/// the ~30 it does not need. Tried first when an argument is `run` or `exec`; anything it
/// refuses (another command, `--help`, a usage error) goes to the whole parser, which says it
/// as usual.
#[derive(Parser)]
#[command(name = "caisson")]
struct RunCli {
    #[command(flatten)]
    globals: Globals,
    #[command(subcommand)]
    command: RunOnly,
}

#[derive(Subcommand)]
enum RunOnly {
    Run(Box<containers::RunArgs>),
    Exec(containers::ExecArgs),
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a new container (from an image, or `--rootfs DIR`).
    Run(Box<containers::RunArgs>),
    /// List containers.
    Ps(containers::PsArgs),
    /// Show a container's output.
    Logs(containers::LogsArgs),
    /// Send a signal to a container's init.
    Kill(containers::KillArgs),
    /// Stop containers: SIGTERM, a grace period, then SIGKILL.
    Stop(containers::StopArgs),
    /// Remove containers.
    Rm(containers::RmArgs),
    /// Run a command in a running container.
    Exec(containers::ExecArgs),
    /// Wait for containers to end and print their exit codes.
    Wait(containers::WaitArgs),
    /// Show a container's record as JSON.
    Inspect(containers::InspectArgs),
    /// Pull an image from a registry.
    Pull(images::PullArgs),
    /// Load images from a docker-archive / oci-archive tarball or an OCI layout directory.
    Load(images::LoadArgs),
    /// List images.
    Images(images::ImagesArgs),
    /// Remove images.
    Rmi(images::RmiArgs),
    /// Manage images.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// List the GPUs caisson manages and the task holding each.
    Gpus(gpus::GpusArgs),
    /// List the CDI devices (`vendor.com/class=name`) of the CDI spec directories.
    Devices(cdi::DevicesArgs),
    /// Manage CNI networks.
    #[command(subcommand)]
    Network(network::NetworkCommand),
    /// Release what an ended container holds outside its directory (networks, GPUs); run by
    /// the container's supervisor.
    #[command(hide = true)]
    Cleanup { id: String },
    /// Benchmark task launches (throughput and per-phase latency).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the reference master (cluster mode).
    Master(cluster::cli::MasterArgs),
    /// Run the agent daemon: join a master and run its tasks.
    Agent(cluster::cli::AgentArgs),
    /// Submit a task to the master; prints its id.
    Submit(cluster::cli::SubmitArgs),
    /// List the master's tasks.
    Tasks(cluster::cli::TasksArgs),
    /// Show one task (JSON).
    Task(cluster::cli::TaskArgs),
    /// List the master's agents.
    Agents(cluster::cli::AgentsArgs),
    /// Kill tasks through the master.
    Cancel(cluster::cli::CancelArgs),
    /// Create a local CA and server/agent/user certificates for the cluster's TLS.
    Certs(cluster::tls::CertsArgs),
    /// Start a master and an agent, run a native and a Wasm task side by side, clean up.
    Demo(cluster::demo::DemoArgs),
    /// Benchmark: native tasks through an in-process master and agent.
    #[command(name = "bench-cluster", hide = true)]
    BenchCluster(cluster::demo::BenchArgs),
}

fn main() -> ExitCode {
    containerizer::sys::default_sigpipe();
    let run_only = std::env::args_os()
        .skip(1)
        .any(|a| a == "run" || a == "exec")
        .then(RunCli::try_parse)
        .and_then(Result::ok);
    let (globals, command) = match run_only {
        Some(RunCli {
            globals,
            command: RunOnly::Run(a),
        }) => (globals, Command::Run(a)),
        Some(RunCli {
            globals,
            command: RunOnly::Exec(a),
        }) => (globals, Command::Exec(a)),
        None => match Cli::try_parse() {
            Ok(c) => (c.globals, c.command),
            Err(e) => {
                // podman's convention: a usage error is the tool's own failure, 125 (help and
                // version are not errors).
                let _ = e.print();
                return ExitCode::from(if e.use_stderr() { 125 } else { 0 });
            }
        },
    };
    let cli = Cli { globals, command };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.globals.log_level))
        .with_writer(std::io::stderr)
        .init();
    gpus::configure(&cli.globals.gpu);
    cdi::configure(&cli.globals.cdi);
    let code = |c: i32| ExitCode::from(c.clamp(0, 255) as u8);
    let result = match cli.command {
        Command::Run(a) => {
            let c = containers::run(&cli.globals.root, &cli.globals.cni, *a);
            // The launch path: what the run made is dropped by now; leave without the
            // allocator's exit work.
            containerizer::sys::launch::exit_flushed(c.clamp(0, 255))
        }
        Command::Ps(a) => Ok(code(containers::ps(&cli.globals.root, a))),
        Command::Logs(a) => Ok(code(containers::logs(&cli.globals.root, a))),
        Command::Kill(a) => Ok(code(containers::kill(&cli.globals.root, a))),
        Command::Stop(a) => Ok(code(containers::stop(&cli.globals.root, a))),
        Command::Rm(a) => Ok(code(containers::rm(&cli.globals.root, &cli.globals.cni, a))),
        Command::Exec(a) => Ok(code(containers::exec(&cli.globals.root, a))),
        Command::Wait(a) => Ok(code(containers::wait(&cli.globals.root, a))),
        Command::Inspect(a) => Ok(code(containers::inspect(
            &cli.globals.root,
            &cli.globals.cni,
            a,
        ))),
        Command::Cleanup { id } => containers::cleanup(&cli.globals.root, &cli.globals.cni, &id),
        Command::Pull(a) => images::pull(&cli.globals.root, a),
        Command::Load(a) => images::load(&cli.globals.root, a),
        Command::Images(a) => images::list(&cli.globals.root, a),
        Command::Rmi(a) => images::rmi(&cli.globals.root, a),
        Command::Image(c) => images::image(&cli.globals.root, c),
        Command::Gpus(a) => gpus::list(&cli.globals.root, a),
        Command::Devices(a) => cdi::list(a),
        Command::Network(c) => network::network(&cli.globals.root, &cli.globals.cni, c),
        Command::Bench(c) => bench::bench(&cli.globals.root, &cli.globals.cni, c),
        Command::Master(a) => cluster::cli::master(a),
        Command::Agent(a) => cluster::cli::agent(&cli.globals.root, &cli.globals.cni, a),
        Command::Submit(a) => cluster::cli::submit(a),
        Command::Tasks(a) => cluster::cli::tasks(a),
        Command::Task(a) => cluster::cli::task(a),
        Command::Agents(a) => cluster::cli::agents(a),
        Command::Cancel(a) => cluster::cli::cancel(a),
        Command::Certs(a) => cluster::tls::certs(a),
        Command::Demo(a) => cluster::demo::demo(&cli.globals.root, &cli.globals.cni, a),
        Command::BenchCluster(a) => cluster::demo::bench(&cli.globals.cni, a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            // podman's convention: 125 is an error of the tool itself.
            ExitCode::from(125)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
        super::RunCli::command().debug_assert();
    }
}
