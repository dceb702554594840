//! Wasm tasks: WASI preview 1 command modules and WASI 0.2 command components, run by wasmtime.
//!
//! The shape, fastest path first:
//! - [`Engine`] owns one wasmtime engine (Cranelift, pooling allocator, copy-on-write memory
//!   images, epoch interruption driven by a background ticker thread) and two caches: compiled
//!   artifacts on disk (keyed by the module digest and the engine's compatibility hash, loaded
//!   back by mmap) and pre-linked templates in memory ([`Program`]), so a repeated launch is only
//!   "build a WASI context, instantiate from the template, call the entry point".
//! - [`Engine::load`] turns a [`Source`] (a `.wasm`/`.wat` path or bytes, e.g. from an OCI image:
//!   see [`module_from_rootfs`] and [`module_from_layer`]) into a [`Program`], with clear errors
//!   for input that is not a WASI command.
//! - [`Engine::run`] runs one [`TaskSpec`] (argv, env, preopens, stdio files, limits, timeout,
//!   kill switch) to an [`ExitStatus`]: a guest's exit code, a trap with its message, the memory
//!   limit, the timeout or a kill. Only setup problems (a log file that cannot be opened, a
//!   missing preopen) are `Err`.
//!
//! `run` blocks the calling thread while the guest runs: from async code call it on a blocking
//! thread (`tokio::task::spawn_blocking`), never directly inside a task.
mod engine;
pub mod host;
mod http;
pub mod oneshot;
mod source;
mod spec;
mod task;

pub use engine::{CacheOrigin, Engine, EngineConfig, Program, ProgramKind, RunTimings};
pub use http::{Service, ServiceConfig, DEFAULT_REQUEST_TIMEOUT};
pub use source::{
    is_wasm_layer_media_type, is_wasm_platform, module_from_layer, module_from_rootfs, sniff,
    Source, WasmKind, WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPES,
};
pub use spec::{parse_memory, RunSpec};
pub use task::{signal_name, ExitStatus, KillSwitch, Limits, Preopen, Stdio, TaskSpec};

use std::path::PathBuf;

/// Exit code when the guest trapped (128 + SIGABRT, as `wasmtime run` does).
pub const EXIT_TRAP: i32 = 134;
/// Exit code when the task was killed, or stopped at its memory limit (128 + SIGKILL, as an
/// OOM-killed container reports).
pub const EXIT_KILLED: i32 = 137;
/// Exit code when the task ran past its timeout (the coreutils `timeout` convention).
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code for a failure of the host itself (podman's 125).
pub const EXIT_HOST_ERROR: i32 = 125;
/// Exit code for a module that cannot be run: not Wasm, not a command, missing imports (podman's
/// 126, "cannot invoke").
pub const EXIT_CANNOT_RUN: i32 = 126;
/// Exit code for a module file that does not exist (podman's 127).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Everything that can go wrong before a Wasm task starts running. Once it runs, the outcome is
/// an [`ExitStatus`], never an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: not a WebAssembly module or component: {reason}")]
    NotWasm { name: String, reason: String },
    #[error("{name}: invalid WebAssembly: {message}")]
    Invalid { name: String, message: String },
    #[error("{name}: not a WASI command: {reason}")]
    NotCommand { name: String, reason: String },
    #[error("{name}: imports `{import}`, which caisson does not provide{hint}")]
    UnknownImport {
        name: String,
        import: String,
        hint: String,
    },
    #[error(
        "{name}: built for {found}; caisson runs WASI preview 1 command modules \
         (wasm32-wasip1) and WASI 0.2 command components (wasm32-wasip2)"
    )]
    WrongWasiVersion { name: String, found: String },
    #[error("{name}: cannot link: {message}")]
    Link { name: String, message: String },
    #[error("wasm engine: {0}")]
    Engine(String),
    #[error("preopen {host} as {guest}: {message}")]
    Preopen {
        host: PathBuf,
        guest: String,
        message: String,
    },
    #[error("{what} {path}: {source}")]
    Stdio {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image: {0}")]
    Image(String),
    #[error("task spec: {0}")]
    Spec(String),
}

impl Error {
    /// The exit code a CLI should use for this error (podman's conventions).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                EXIT_NOT_FOUND
            }
            Error::NotWasm { .. }
            | Error::Invalid { .. }
            | Error::NotCommand { .. }
            | Error::UnknownImport { .. }
            | Error::WrongWasiVersion { .. }
            | Error::Link { .. }
            | Error::Image(_) => EXIT_CANNOT_RUN,
            _ => EXIT_HOST_ERROR,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests;

/// Runs the CPU-feature probes a task's first host calls would make (std's detection, which
/// wasmtime consults, and the random generators' under a WASI context), so that a process
/// forked from this one after it inherits the answers. On a VM every `cpuid` traps to the
/// hypervisor: the launcher calls this on a thread that runs alongside its module load.
pub fn probe_cpu_features() {
    #[cfg(target_arch = "x86_64")]
    {
        let _ = std::arch::is_x86_feature_detected!("avx2");
    }
    let _ = wasmtime_wasi::WasiCtxBuilder::new();
}
