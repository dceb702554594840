//! `caisson`: a daemonless container agent. Thin CLI over the `containerizer` library.
mod images;

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
    /// Root of caisson's store and state.
    #[arg(long, global = true, env = "CAISSON_ROOT", default_value = containerizer::image::store::DEFAULT_ROOT)]
    root: PathBuf,
    /// Log filter (tracing's env-filter syntax), e.g. `debug` or `containerizer=trace`.
    #[arg(long, global = true, env = "CAISSON_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
}

fn main() -> ExitCode {
    containerizer::sys::default_sigpipe();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&cli.log_level))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Pull(a) => images::pull(&cli.root, a),
        Command::Load(a) => images::load(&cli.root, a),
        Command::Images(a) => images::list(&cli.root, a),
        Command::Rmi(a) => images::rmi(&cli.root, a),
        Command::Image(c) => images::image(&cli.root, c),
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
