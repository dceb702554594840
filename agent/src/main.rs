//! `caisson`: the CLI.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod containers;

#[derive(Parser)]
#[command(name = "caisson", version, about = "A daemonless container agent")]
struct Cli {
    /// Where containers, images and state live.
    #[arg(
        long,
        global = true,
        env = "CAISSON_ROOT",
        default_value = "/var/lib/caisson"
    )]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command in a new container.
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
    /// Wait for containers to end and print their exit codes.
    Wait(containers::WaitArgs),
    /// Show a container's record as JSON.
    Inspect(containers::InspectArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(a) => containers::run(&cli.root, *a),
        Cmd::Ps(a) => containers::ps(&cli.root, a),
        Cmd::Logs(a) => containers::logs(&cli.root, a),
        Cmd::Kill(a) => containers::kill(&cli.root, a),
        Cmd::Stop(a) => containers::stop(&cli.root, a),
        Cmd::Rm(a) => containers::rm(&cli.root, a),
        Cmd::Wait(a) => containers::wait(&cli.root, a),
        Cmd::Inspect(a) => containers::inspect(&cli.root, a),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
