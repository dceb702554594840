//! Running one Wasm command task as the whole life of this process: the guest's end is the
//! process's end. Shared by `caisson-wasm run` (a host process of its own) and the task process
//! `caisson run` forks for a Wasm file ([`crate::launch::wasm`]), so both stop, time out and
//! report the same way.
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::SigSet;

use super::{Engine, ExitStatus, KillSwitch, Program, TaskSpec};

/// A guest blocked in a host call (sleeping, reading) never reaches an epoch check: this long
/// after a stop signal or its timeout, the process ends itself with the same report.
const GRACE: Duration = Duration::from_millis(500);

/// Where the task's [`ExitStatus`] goes when it ends.
#[derive(Debug)]
pub enum Report {
    /// Nowhere (the exit code says enough).
    None,
    /// A JSON file (`caisson-wasm run --status-file`).
    File(PathBuf),
    /// A line `S <json>` on a pipe to the supervisor.
    Pipe(OwnedFd),
}

impl Report {
    fn send(&self, status: &ExitStatus) {
        let json = serde_json::to_vec(status).expect("status serializes");
        match self {
            Report::None => {}
            Report::File(path) => {
                if let Err(e) = std::fs::write(path, json) {
                    eprintln!("caisson-wasm: status file {}: {e}", path.display());
                }
            }
            Report::Pipe(fd) => {
                let mut line = b"S ".to_vec();
                line.extend_from_slice(&json);
                line.push(b'\n');
                let _ = std::fs::File::from(fd.try_clone().expect("dup")).write_all(&line);
            }
        }
    }
}

/// Advances `engine`'s epoch every tick for `span` (an engine without a ticker of its own,
/// see [`super::EngineConfig::epoch_ticker`]; with one, this only adds checks).
fn tick_for(engine: &Engine, span: Duration) {
    let end = std::time::Instant::now() + span;
    loop {
        engine.increment_epoch();
        let now = std::time::Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep(engine.epoch_tick().min(end - now));
    }
}

/// Runs `task` of `program` on this thread and exits the process with the task's exit code
/// (after writing its report). `stop_signals` (SIGTERM, SIGINT) must be blocked in every
/// thread: a thread waits for them and stops the guest between two Wasm instructions (never in
/// the middle of a host call such as a write). `module` names the guest in messages on stderr.
/// A setup failure (stdio, preopens) exits with its code, no report.
pub fn run_and_exit(
    engine: &Engine,
    program: &Program,
    mut task: TaskSpec,
    module: &Path,
    stop_signals: SigSet,
    report: Report,
) -> ! {
    let report = std::sync::Arc::new(report);
    if let Some(t) = task.timeout {
        watchdog(engine.clone(), t, report.clone());
    }
    let kill = KillSwitch::new();
    task.kill = Some(kill.clone());
    // WASI's host calls run on a Tokio runtime. Without one entered, wasmtime-wasi starts its
    // own with a worker per CPU, and counting the CPUs reads the cgroup's quota and the mount
    // table (a quarter of a `caisson-wasm run hello.wat`, measured); one worker drives timers
    // and I/O for this process's single guest.
    let pinned = pin_to_this_cpu();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    let _entered = rt.as_ref().ok().map(|rt| rt.enter());
    let this_thread = nix::unistd::Pid::from_raw(0);
    match (pinned, rt.as_ref()) {
        (Some(all), Ok(rt)) => {
            let main = nix::unistd::Pid::this();
            rt.spawn(async move {
                tokio::time::sleep(UNPIN_AFTER).await;
                let _ = nix::sched::sched_setaffinity(main, &all);
                let _ = nix::sched::sched_setaffinity(this_thread, &all);
            });
        }
        (Some(all), Err(_)) => {
            let _ = nix::sched::sched_setaffinity(this_thread, &all);
        }
        (None, _) => {}
    }
    let handled = rt
        .as_ref()
        .is_ok_and(|rt| on_stop_signal_in(rt, engine, stop_signals, report.clone(), kill.clone()));
    if !handled {
        on_stop_signal(engine.clone(), stop_signals, report.clone(), kill);
    }
    let status = match engine.run(program, task) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("caisson-wasm: {e}");
            crate::sys::launch::exit_flushed(e.exit_code())
        }
    };
    match &status {
        ExitStatus::Exited { .. } => {}
        ExitStatus::Trap { message, backtrace } => {
            eprintln!("caisson-wasm: {}: {message}", module.display());
            if !backtrace.is_empty() {
                eprintln!("{backtrace}");
            }
        }
        other => eprintln!("caisson-wasm: {}: {other}", module.display()),
    }
    finish(&report, &status)
}

/// How long a one-shot task's threads stay on the CPU it started on ([`pin_to_this_cpu`]).
const UNPIN_AFTER: Duration = Duration::from_millis(20);

/// Keeps this process's threads (this one and those it starts) on the CPU it runs on, and
/// returns the CPUs it was allowed before. A process forked from a large one writes to pages
/// it shares copy-on-write with its parent all through its start; once it has a second thread
/// on another CPU, every such fault flushes that CPU's TLB by an inter-processor interrupt (on
/// a VM, an exit to the hypervisor each). Lifted after [`UNPIN_AFTER`]: a long guest runs where
/// the scheduler likes.
fn pin_to_this_cpu() -> Option<nix::sched::CpuSet> {
    use nix::sched::{sched_getaffinity, sched_getcpu, sched_setaffinity, CpuSet};
    let me = nix::unistd::Pid::from_raw(0);
    let all = sched_getaffinity(me).ok()?;
    let cpu = sched_getcpu().ok()?;
    let mut one = CpuSet::new();
    one.set(cpu).ok()?;
    sched_setaffinity(me, &one).ok()?;
    Some(all)
}

/// Writes the report and exits: once per process, whichever thread (the task's, the watchdog,
/// the one handling a stop signal) gets here first. Any other caller waits for the exit.
fn finish(report: &Report, status: &ExitStatus) -> ! {
    static FINISHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = FINISHING.lock().unwrap_or_else(|e| e.into_inner());
    report.send(status);
    crate::sys::launch::exit_flushed(status.exit_code())
}

/// Stops the guest through `kill` on a signal of `set`, from a task on `rt`'s worker: Tokio's
/// handlers take the signals, so no thread of its own waits for them (every thread more in this
/// short-lived process costs its start and makes each copy-on-write fault after the fork an
/// inter-processor TLB flush). Past [`GRACE`] (a guest in a host call) the process ends itself.
/// The handlers are in place before `set` is unblocked in this thread (the other threads keep
/// it blocked), so no stop signal takes the default action. False if a handler could not be
/// installed: the caller falls back to [`on_stop_signal`], the set still blocked.
fn on_stop_signal_in(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    set: SigSet,
    report: std::sync::Arc<Report>,
    kill: KillSwitch,
) -> bool {
    use std::task::Poll;
    use tokio::signal::unix::{signal, SignalKind};
    let _entered = rt.enter();
    let mut streams = vec![];
    for sig in set.iter() {
        match signal(SignalKind::from_raw(sig as i32)) {
            Ok(stream) => streams.push((sig, stream)),
            Err(_) => return false,
        }
    }
    let engine = engine.clone();
    rt.spawn(async move {
        let sig = std::future::poll_fn(|cx| {
            for (sig, stream) in streams.iter_mut() {
                if stream.poll_recv(cx).is_ready() {
                    return Poll::Ready(*sig);
                }
            }
            Poll::Pending
        })
        .await;
        kill.terminate(sig as i32);
        let end = tokio::time::Instant::now() + GRACE;
        loop {
            engine.increment_epoch();
            let now = tokio::time::Instant::now();
            if now >= end {
                break;
            }
            tokio::time::sleep(engine.epoch_tick().min(end - now)).await;
        }
        let status = ExitStatus::Terminated { signal: sig as i32 };
        eprintln!("caisson-wasm: {status} (in a host call)");
        finish(&report, &status);
    });
    set.thread_unblock().is_ok()
}

/// Waits for a signal of `set` on a thread of its own and stops the guest through `kill` at its
/// next epoch check; past [`GRACE`] (a guest in a host call) the process ends itself.
fn on_stop_signal(engine: Engine, set: SigSet, report: std::sync::Arc<Report>, kill: KillSwitch) {
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let Ok(sig) = set.wait() else { return };
            kill.terminate(sig as i32);
            tick_for(&engine, GRACE);
            let status = ExitStatus::Terminated { signal: sig as i32 };
            eprintln!("caisson-wasm: {status} (in a host call)");
            finish(&report, &status);
        });
    if let Err(e) = spawned {
        // Without it the default action (the process ends by the signal) still applies.
        eprintln!("caisson-wasm: signal thread: {e}");
        let _ = set.thread_unblock();
    }
}

/// The epoch deadline stops a guest only while it runs Wasm code; one blocked in a host call
/// would outlive its timeout. This process hosts a single task, so past the timeout and
/// [`GRACE`] it simply ends itself.
fn watchdog(engine: Engine, timeout: Duration, report: std::sync::Arc<Report>) {
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .stack_size(64 << 10)
        .spawn(move || {
            tick_for(&engine, timeout + GRACE);
            let status = ExitStatus::Timeout {
                after_ms: timeout.as_millis() as u64,
            };
            eprintln!("caisson-wasm: {status} (stuck in a host call)");
            finish(&report, &status);
        });
}
