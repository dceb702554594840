//! `caisson-nvml [LIB]`: prints the NVML inventory (`containerizer::gpu::discover`, loading
//! `LIB` or `libnvidia-ml.so.1`) as JSON on stdout, warnings on stderr. The static (musl)
//! `caisson` of `scripts/build-dist.sh` runs it for its GPU inventory: NVML is a glibc library
//! loaded at run time, which a static musl program cannot load; this one is a glibc build.
fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAISSON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let lib = std::env::args_os().nth(1).map(std::path::PathBuf::from);
    let inventory = containerizer::gpu::discover(lib.as_deref());
    match serde_json::to_writer(std::io::stdout().lock(), &inventory) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caisson-nvml: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
