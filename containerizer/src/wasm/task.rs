//! One Wasm task: what it is given (argv, env, preopens, stdio, limits) and how it ended.
use super::{Error, Result, EXIT_KILLED, EXIT_TIMEOUT, EXIT_TRAP};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime_wasi::cli::{InputFile, IsTerminal, OutputFile, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtxBuilder, WasiCtxView, WasiView};

/// Where a standard stream of the guest goes. The paths are the same log files a native task
/// writes; `File` takes an already-open file (or any fd, through `File::from(OwnedFd)`).
#[derive(Debug, Default)]
pub enum Stdio {
    /// Closed stdin; stdout/stderr discarded.
    #[default]
    Null,
    /// The host process's own stream.
    Inherit,
    /// An open file (read for stdin, written for stdout/stderr).
    File(File),
    /// A path: opened read-only for stdin, created/appended for stdout and stderr.
    Path(PathBuf),
    /// For stdout and stderr: a path created (appended to) at the guest's first write, so a
    /// guest that writes nothing leaves no empty log to create and delete (the shared host's
    /// tasks, thousands a second). Opening errors surface at that write. As `Path` for stdin.
    PathOnWrite(PathBuf),
}

/// A host directory the guest sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preopen {
    pub host: PathBuf,
    pub guest: String,
    #[serde(default)]
    pub read_only: bool,
}

/// Resource limits of one task. Memory is per linear memory (a component may have more than one),
/// tables are counted in elements; growing past either traps and ends the task with
/// [`ExitStatus::MemoryLimit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub table_elements: Option<u64>,
}

/// Stops a running task from another thread: the guest is interrupted at its next epoch check
/// (within one engine tick) and ends with [`ExitStatus::Killed`] ([`KillSwitch::kill`]) or
/// [`ExitStatus::Terminated`] ([`KillSwitch::terminate`], e.g. on SIGTERM).
///
/// A guest blocked inside a host call (reading stdin, sleeping) stops when that call returns;
/// a supervised host process should therefore also be killable as a whole.
#[derive(Debug, Clone, Default)]
pub struct KillSwitch(Arc<AtomicI32>);

/// What [`KillSwitch`] holds for [`KillSwitch::kill`] (0 means "running").
const KILLED: i32 = 9;

impl KillSwitch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn kill(&self) {
        self.0.store(KILLED, Ordering::Relaxed);
    }
    /// Stops the task as terminated by `signal` (its exit code is 128 + `signal`, as a native
    /// process ended by that signal reports). A later [`KillSwitch::kill`] still wins.
    pub fn terminate(&self, signal: i32) {
        let _ = self
            .0
            .compare_exchange(0, signal.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }
    pub fn is_killed(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }
    /// Why the task must stop, if it must.
    pub(crate) fn interruption(&self) -> Option<Interrupted> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            KILLED => Some(Interrupted::Killed),
            sig => Some(Interrupted::Signal(sig)),
        }
    }
}

/// Everything one run needs besides the program.
#[derive(Debug, Default)]
pub struct TaskSpec {
    /// The full argv, `argv[0]` included (conventionally the module's name).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub preopens: Vec<Preopen>,
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    pub limits: Limits,
    /// Wall-clock limit from the start of instantiation; checked every engine tick.
    pub timeout: Option<Duration>,
    pub kill: Option<KillSwitch>,
}

impl TaskSpec {
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ExitStatus {
    /// The guest returned from its entry point (code 0) or called WASI `proc_exit`/`exit`.
    Exited { code: i32 },
    /// The guest trapped (or a host call failed fatally): the trap message and the Wasm backtrace.
    Trap { message: String, backtrace: String },
    /// A linear memory or table tried to grow past the task's limit.
    MemoryLimit { detail: String },
    /// The task ran past its timeout.
    Timeout { after_ms: u64 },
    /// The task was stopped through its [`KillSwitch`].
    Killed,
    /// The task was stopped by a signal to its host process (SIGTERM from `caisson stop`),
    /// between two Wasm instructions rather than in the middle of a host call.
    Terminated { signal: i32 },
}

impl ExitStatus {
    /// The exit code a CLI reports: the guest's own code, or 134 for a trap, 137 for a kill or the
    /// memory limit (like an OOM-killed container), 124 for a timeout.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitStatus::Exited { code } => *code,
            ExitStatus::Trap { .. } => EXIT_TRAP,
            ExitStatus::MemoryLimit { .. } | ExitStatus::Killed => EXIT_KILLED,
            ExitStatus::Timeout { .. } => EXIT_TIMEOUT,
            ExitStatus::Terminated { signal } => 128 + signal,
        }
    }

    pub fn success(&self) -> bool {
        matches!(self, ExitStatus::Exited { code: 0 })
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Exited { code } => write!(f, "exited with code {code}"),
            ExitStatus::Trap { message, .. } => write!(f, "trapped: {message}"),
            ExitStatus::MemoryLimit { detail } => write!(f, "memory limit: {detail}"),
            ExitStatus::Timeout { after_ms } => write!(f, "timed out after {after_ms} ms"),
            ExitStatus::Killed => write!(f, "killed"),
            ExitStatus::Terminated { signal } => {
                write!(f, "terminated by {}", signal_name(*signal))
            }
        }
    }
}

/// `SIGTERM` for 15, `signal 99` for a number that is not a signal.
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// Why the epoch callback stopped the guest. Carried inside the wasmtime error so the outcome can
/// be told apart from a trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupted {
    Timeout,
    Killed,
    Signal(i32),
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interrupted::Timeout => f.write_str("task timed out"),
            Interrupted::Killed => f.write_str("task killed"),
            Interrupted::Signal(s) => write!(f, "task terminated by {}", signal_name(*s)),
        }
    }
}
impl std::error::Error for Interrupted {}

/// The limit marker, so a growth refused by us is not mistaken for an ordinary trap.
#[derive(Debug)]
struct LimitExceeded(String);
impl std::fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for LimitExceeded {}

/// Enforces [`Limits`] and remembers that it did: unlike `StoreLimits`, a refusal is recorded so
/// the outcome is reported as the memory limit rather than a generic trap.
#[derive(Default)]
pub(crate) struct TaskLimiter {
    memory: Option<usize>,
    table_elements: Option<usize>,
    pub(crate) hit: Option<String>,
}

impl TaskLimiter {
    pub(crate) fn new(limits: &Limits) -> Self {
        let clamp = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        Self {
            memory: limits.memory_bytes.map(clamp),
            table_elements: limits.table_elements.map(clamp),
            hit: None,
        }
    }
}

impl wasmtime::ResourceLimiter for TaskLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if let Some(limit) = self.memory {
            if desired > limit {
                let msg = format!(
                    "linear memory growth from {current} to {desired} bytes exceeds the limit of {limit} bytes"
                );
                self.hit = Some(msg.clone());
                return Err(wasmtime::Error::new(LimitExceeded(msg)));
            }
        }
        // Past the module's own declared maximum is ordinary Wasm semantics (grow returns -1).
        Ok(maximum.is_none_or(|m| desired <= m))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if let Some(limit) = self.table_elements {
            if desired > limit {
                let msg = format!(
                    "table growth from {current} to {desired} elements exceeds the limit of {limit} elements"
                );
                self.hit = Some(msg.clone());
                return Err(wasmtime::Error::new(LimitExceeded(msg)));
            }
        }
        Ok(maximum.is_none_or(|m| desired <= m))
    }
}

/// The store data of every task, core module or component alike: the p1 context also carries a
/// full p2 context and resource table, so one type serves both linkers.
pub(crate) struct Host {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: TaskLimiter,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}

impl Host {
    /// A context with nothing in it, for introspecting linkers.
    pub(crate) fn empty() -> Self {
        Self {
            wasi: WasiCtxBuilder::new().build_p1(),
            limiter: TaskLimiter::default(),
        }
    }

    /// Builds the WASI context of `task` (opens stdio files and preopened directories).
    pub(crate) fn for_task(task: &mut TaskSpec) -> Result<Self> {
        let mut b = WasiCtxBuilder::new();
        // Filesystem calls run on the task's own thread: the task already has a thread of its
        // own, and hopping to a blocking pool per call would cost more than the call.
        b.allow_blocking_current_thread(true);
        b.args(&task.argv);
        b.envs(&task.env);
        for p in &task.preopens {
            let perms = if p.read_only {
                FsPerms::ReadOnly
            } else {
                FsPerms::ReadWrite
            };
            b.preopened_dir(&p.host, &p.guest, perms)
                .map_err(|e| Error::Preopen {
                    host: p.host.clone(),
                    guest: p.guest.clone(),
                    message: format!("{e:#}"),
                })?;
        }
        match std::mem::take(&mut task.stdin) {
            Stdio::Null => {}
            Stdio::Inherit => {
                b.inherit_stdin();
            }
            Stdio::File(f) => {
                b.stdin(InputFile::new(f));
            }
            Stdio::Path(p) | Stdio::PathOnWrite(p) => {
                let f = File::open(&p).map_err(|source| Error::Stdio {
                    what: "stdin",
                    path: p.clone(),
                    source,
                })?;
                b.stdin(InputFile::new(f));
            }
        }
        match std::mem::take(&mut task.stdout) {
            Stdio::Inherit => {
                b.inherit_stdout();
            }
            s => {
                if let Some(out) = output(s, "stdout")? {
                    set_output(&mut b, out, false);
                }
            }
        }
        match std::mem::take(&mut task.stderr) {
            Stdio::Inherit => {
                b.inherit_stderr();
            }
            s => {
                if let Some(out) = output(s, "stderr")? {
                    set_output(&mut b, out, true);
                }
            }
        }
        Ok(Self {
            wasi: b.build_p1(),
            limiter: TaskLimiter::new(&task.limits),
        })
    }
}

/// Opens an output stream (`Inherit` is handled by the caller; `Null` keeps the default sink).
fn output(s: Stdio, what: &'static str) -> Result<Option<Output>> {
    Ok(match s {
        Stdio::Null => None,
        Stdio::Inherit => None,
        Stdio::File(f) => Some(Output::File(OutputFile::new(f))),
        Stdio::Path(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|source| Error::Stdio {
                    what,
                    path: p.clone(),
                    source,
                })?;
            Some(Output::File(OutputFile::new(f)))
        }
        Stdio::PathOnWrite(p) => Some(Output::OnWrite(OutputOnWrite {
            path: Arc::new(p),
            file: Arc::default(),
        })),
    })
}

/// What [`output`] opened.
enum Output {
    File(OutputFile),
    OnWrite(OutputOnWrite),
}

fn set_output(b: &mut WasiCtxBuilder, out: Output, stderr: bool) {
    match (out, stderr) {
        (Output::File(f), false) => b.stdout(f),
        (Output::File(f), true) => b.stderr(f),
        (Output::OnWrite(f), false) => b.stdout(f),
        (Output::OnWrite(f), true) => b.stderr(f),
    };
}

/// An output file created at the first write ([`Stdio::PathOnWrite`]); writes are blocking
/// and unbuffered, as with wasmtime's `OutputFile`.
#[derive(Clone)]
struct OutputOnWrite {
    path: Arc<PathBuf>,
    file: Arc<std::sync::OnceLock<std::result::Result<File, String>>>,
}

impl OutputOnWrite {
    fn write_all(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if bytes.is_empty() {
            return Ok(());
        }
        let file = self.file.get_or_init(|| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&*self.path)
                .map_err(|e| format!("{}: {e}", self.path.display()))
        });
        match file {
            Ok(f) => {
                let mut f: &File = f;
                f.write_all(bytes)
            }
            Err(e) => Err(std::io::Error::other(e.clone())),
        }
    }
}

impl IsTerminal for OutputOnWrite {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for OutputOnWrite {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for OutputOnWrite {
    async fn ready(&mut self) {}
}

impl OutputStream for OutputOnWrite {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.write_all(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::format_err!(e)))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for OutputOnWrite {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.write_all(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Turns the error that ended a run into the task's outcome.
pub(crate) fn classify(err: wasmtime::Error, host: &Host, timeout: Option<Duration>) -> ExitStatus {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return ExitStatus::Exited { code: exit.0 };
    }
    match err.downcast_ref::<Interrupted>() {
        Some(Interrupted::Killed) => return ExitStatus::Killed,
        Some(Interrupted::Signal(signal)) => return ExitStatus::Terminated { signal: *signal },
        Some(Interrupted::Timeout) => {
            return ExitStatus::Timeout {
                after_ms: timeout.map_or(0, |t| t.as_millis() as u64),
            }
        }
        None => {}
    }
    if let Some(detail) = &host.limiter.hit {
        return ExitStatus::MemoryLimit {
            detail: detail.clone(),
        };
    }
    let message = match err.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        // The backtrace is a context layer on top: the message is what went wrong underneath.
        None => err.root_cause().to_string(),
    };
    let backtrace = err
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|b| b.to_string())
        .unwrap_or_default();
    ExitStatus::Trap { message, backtrace }
}
