//! `caisson bench launch --master URL`: the same report, for tasks submitted to a master and
//! run by its agents. Each task is timed from the client's SubmitTask call; RUNNING and the
//! terminal state are seen on one WatchTasks stream (opened before the first submission), and
//! the agent's own phases come with the task. At most `--concurrency` tasks are in flight
//! (submitted and not yet ended), like the local bench's workers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use caisson_proto::{SubmitTaskRequest, Task, TaskKind, TaskSpec, TaskState, WatchTasksRequest};
use tokio::sync::{oneshot, Semaphore};

use super::{build_report, emit, Kind, LaunchArgs, Sample};
use crate::cluster::cli::{connect, ClientArgs};
use crate::cluster::tls::ClientTlsArgs;

pub(super) const MASTER_PHASES: &[(&str, &str)] = &[
    ("submit", "SubmitTask call (validated, placed, persisted)"),
    (
        "agent",
        "agent: LaunchTask received until RUNNING sent (rootfs, network, launch)",
    ),
    (
        "launch",
        "supervisor's launch, start to exec (as `inspect` shows)",
    ),
    (
        "to_running",
        "submit until the master saw RUNNING (master's clock)",
    ),
    (
        "to_terminal",
        "submit until the watcher saw the terminal state",
    ),
    ("total", "submit until the terminal state (= to_terminal)"),
];

/// Tasks' ends as the watcher sees them: handed to the waiting submitter, or kept until it
/// asks (a task may end before its SubmitTask call has returned). One lock for both, so no
/// end falls between them.
#[derive(Default)]
struct Ends {
    waiting: HashMap<String, oneshot::Sender<(Task, Instant)>>,
    early: HashMap<String, (Task, Instant)>,
}

pub(super) fn launch_bench(a: LaunchArgs) -> Result<std::process::ExitCode> {
    let url = a.master.clone().context("--master")?;
    let spec = match a.kind {
        Kind::Native => {
            let image = a
                .image
                .clone()
                .context("--image is required with --kind native")?;
            TaskSpec {
                kind: TaskKind::NativeImage as i32,
                image,
                command: a.cmd.clone(),
                networks: a.network.clone(),
                ..Default::default()
            }
        }
        Kind::Wasm => {
            let module = a
                .module
                .clone()
                .context("--module is required with --kind wasm")?;
            if !a.network.is_empty() {
                bail!("--network is for --kind native");
            }
            // The agents read the module at this path.
            let module = std::fs::canonicalize(&module).unwrap_or(module);
            TaskSpec {
                kind: TaskKind::Wasm as i32,
                image: module.to_string_lossy().into_owned(),
                command: a.cmd.clone(),
                ..Default::default()
            }
        }
    };
    let client = ClientArgs {
        master: url,
        token: a.token.clone(),
        tls: ClientTlsArgs {
            dir: a.tls_dir.clone(),
            insecure: false,
        },
    };
    let started_unix_ms = containerizer::launch::state::now_ms();
    let rt = crate::cluster::cli::runtime()?;
    let pause = Duration::from_millis(a.pause_ms);
    let (samples, wall) = rt.block_on(async {
        let hidden = indicatif::ProgressBar::hidden();
        if a.warmup > 0 {
            run(&client, &spec, a.warmup, a.concurrency, pause, &hidden).await?;
        }
        let progress = indicatif::ProgressBar::new(a.count as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} ended {pos}/{len} [{bar:30}] {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let r = run(&client, &spec, a.count, a.concurrency, pause, &progress).await;
        progress.finish_and_clear();
        r
    })?;
    let report = build_report(&a, MASTER_PHASES.to_vec(), samples, wall, started_unix_ms);
    emit(&a, &report)
}

/// Submits `n` copies of `spec`, at most `c` in flight (each slot free again `pause` after
/// its task's end); one sample per task.
async fn run(
    client: &ClientArgs,
    spec: &TaskSpec,
    n: usize,
    c: usize,
    pause: Duration,
    progress: &indicatif::ProgressBar,
) -> Result<(Vec<Sample>, Duration)> {
    let conn = connect(client).await?;
    let ends: Arc<Mutex<Ends>> = Arc::default();
    let mut watch = conn
        .clone()
        .watch_tasks(WatchTasksRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("watching the tasks: {}", s.message()))?
        .into_inner();
    let watcher = {
        let ends = ends.clone();
        tokio::spawn(async move {
            while let Ok(Some(t)) = watch.message().await {
                if !t.state().is_terminal() {
                    continue;
                }
                let at = Instant::now();
                let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
                match e.waiting.remove(&t.id) {
                    Some(tx) => {
                        let _ = tx.send((t, at));
                    }
                    None => {
                        e.early.insert(t.id.clone(), (t, at));
                    }
                }
            }
        })
    };
    let sem = Arc::new(Semaphore::new(c.max(1)));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let mut conn = conn.clone();
        let spec = spec.clone();
        let ends = ends.clone();
        let progress = progress.clone();
        handles.push(tokio::spawn(async move {
            let start = Instant::now();
            let r = conn
                .submit_task(SubmitTaskRequest { spec: Some(spec) })
                .await;
            let submit_ns = start.elapsed().as_nanos() as u64;
            let id = match r {
                Ok(r) => r.into_inner().task_id,
                Err(s) => {
                    drop(permit);
                    progress.inc(1);
                    return Sample::failed(format!("submit: {}", s.message()));
                }
            };
            let (tx, rx) = oneshot::channel();
            let seen = {
                let mut e = ends.lock().unwrap_or_else(|e| e.into_inner());
                let seen = e.early.remove(&id);
                if seen.is_none() {
                    e.waiting.insert(id.clone(), tx);
                }
                seen
            };
            let end = match seen {
                Some(e) => Ok(e),
                None => rx.await,
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            drop(permit);
            progress.inc(1);
            let Ok((t, at)) = end else {
                return Sample::failed("the watch ended before the task did");
            };
            sample(&t, submit_ns, at.duration_since(start).as_nanos() as u64)
        }));
    }
    let mut samples = Vec::with_capacity(n);
    for h in handles {
        samples.push(h.await?);
    }
    let wall = t0.elapsed();
    watcher.abort();
    Ok((samples, wall))
}

/// One task's phases (ns, in [`MASTER_PHASES`] order), or why it did not finish.
fn sample(t: &Task, submit_ns: u64, to_terminal_ns: u64) -> Sample {
    let tm = t.timings.unwrap_or_default();
    let finished = t.state() == TaskState::Finished;
    Sample {
        phases: vec![
            submit_ns,
            tm.agent_us * 1000,
            tm.total_us * 1000,
            t.submit_to_running_us * 1000,
            to_terminal_ns,
            to_terminal_ns,
        ],
        first_output: None,
        warm: false,
        exit_code: t.exit_code,
        error: (!finished).then(|| {
            format!(
                "{}: {}",
                crate::cluster::cli::state_name(t.state),
                t.message
            )
        }),
    }
}
