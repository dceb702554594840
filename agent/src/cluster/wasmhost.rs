//! The agent's side of the shared Wasm host (`containerizer::wasm::host`): starts it when none
//! answers on `<root>/agent/wasm-host.sock`, sends it Wasm command tasks and kills, and turns
//! what it reports into [`HostEvent`]s for the agent. When the connection ends (the host died
//! or was killed), every task sent to it and not reported ended becomes [`HostEvent::Gone`]:
//! the agent then reads the task's record, and reports it lost if the record does not say how
//! it ended.
use std::collections::HashSet;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use containerizer::launch::state::{TaskState, Timings};
use containerizer::wasm::host::{self, Event, Request};
use containerizer::wasm::RunSpec;

/// What the agent hears about its shared-host tasks.
#[derive(Debug)]
pub enum HostEvent {
    Started {
        id: String,
        timings: Timings,
    },
    Failed {
        id: String,
        message: String,
    },
    Exited {
        id: String,
        state: Box<TaskState>,
    },
    /// The host went away before reporting the task's end.
    Gone {
        id: String,
        message: String,
    },
}

/// What the agent does with each event, called on the connection's reader thread.
pub type OnEvent = Arc<dyn Fn(HostEvent) + Send + Sync>;

struct Conn {
    writer: Mutex<Outgoing>,
    pid: i32,
    /// Sent (or queued) and not yet reported ended.
    tasks: Mutex<HashSet<String>>,
}

/// The requests queued on a connection and not written yet, in order: a burst of launches
/// goes out in one write (one wake-up of the host's reader), not one each.
struct Outgoing {
    stream: UnixStream,
    /// Each request, with the task id of a `Run` (sent again on a new host if this one died).
    queued: Vec<(Option<String>, Vec<u8>)>,
}

pub struct SharedHost {
    /// `<root>/agent/wasm-host.sock`.
    socket: PathBuf,
    /// The compile cache the host maps (the one of the root's tasks).
    cache: PathBuf,
    log: PathBuf,
    conn: Arc<Mutex<Option<Arc<Conn>>>>,
    events: OnEvent,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedHost {
    pub fn new(root: &Path, events: OnEvent) -> SharedHost {
        let dir = root.join("agent");
        SharedHost {
            socket: dir.join(host::SOCKET),
            cache: containerizer::launch::wasm::cache_dir(root),
            log: dir.join("wasm-host.log"),
            conn: Arc::new(Mutex::new(None)),
            events,
        }
    }

    /// Connects to a running host only (after a restart); `adopt` are the tasks the records
    /// show running in it. Returns those that are no longer running there.
    pub fn reattach(&self, adopt: &[String]) -> io::Result<Vec<String>> {
        let mut cur = lock(&self.conn);
        let (conn, running) = self.open(false, adopt)?;
        *cur = Some(conn);
        Ok(adopt
            .iter()
            .filter(|id| !running.contains(*id))
            .cloned()
            .collect())
    }

    /// Connects to the host, starting one if none answers.
    pub fn start(&self) -> io::Result<()> {
        self.conn().map(|_| ())
    }

    /// The current connection, or a new one to a host started now.
    fn conn(&self) -> io::Result<Arc<Conn>> {
        let mut cur = lock(&self.conn);
        if let Some(c) = cur.as_ref() {
            return Ok(c.clone());
        }
        let (conn, _) = self.open(true, &[])?;
        *cur = Some(conn.clone());
        Ok(conn)
    }

    fn open(&self, spawn: bool, adopt: &[String]) -> io::Result<(Arc<Conn>, HashSet<String>)> {
        let (stream, reader, pid, running) = match host::connect(&self.socket) {
            Ok(c) => c,
            Err(e) if !spawn => return Err(e),
            Err(_) => self.spawn()?,
        };
        let running: HashSet<String> = running.into_iter().collect();
        let conn = Arc::new(Conn {
            writer: Mutex::new(Outgoing {
                stream,
                queued: vec![],
            }),
            pid,
            tasks: Mutex::new(
                adopt
                    .iter()
                    .filter(|id| running.contains(*id))
                    .cloned()
                    .collect(),
            ),
        });
        tracing::info!(pid, "connected to the shared wasm host");
        let events = self.events.clone();
        let c = conn.clone();
        let slot = self.conn.clone();
        std::thread::Builder::new()
            .name("wasm-host-events".into())
            .spawn(move || {
                for ev in host::events(reader) {
                    let out = match ev {
                        Event::Started { id, timings } => HostEvent::Started { id, timings },
                        Event::Failed { id, message, .. } => {
                            lock(&c.tasks).remove(&id);
                            HostEvent::Failed { id, message }
                        }
                        Event::Exited { id, state } => {
                            lock(&c.tasks).remove(&id);
                            HostEvent::Exited { id, state }
                        }
                        Event::Hello { .. } => continue,
                    };
                    events(out);
                }
                // The host is gone (or broke the protocol: then make sure it is gone).
                if containerizer::launch::state::process_alive(c.pid, None) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(c.pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                {
                    let mut cur = lock(&slot);
                    if cur.as_ref().is_some_and(|x| Arc::ptr_eq(x, &c)) {
                        *cur = None;
                    }
                }
                let left: Vec<String> = lock(&c.tasks).drain().collect();
                tracing::warn!(
                    pid = c.pid,
                    tasks = left.len(),
                    "the shared wasm host is gone"
                );
                for id in left {
                    let message = format!("the shared Wasm host (pid {}) died", c.pid);
                    events(HostEvent::Gone { id, message });
                }
            })?;
        Ok((conn, running))
    }

    /// Starts `caisson-wasm host` in a session of its own and connects to it.
    fn spawn(&self) -> io::Result<(UnixStream, io::BufReader<UnixStream>, i32, Vec<String>)> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(containerizer::launch::wasm::runner());
        cmd.arg("host")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--cache")
            .arg(&self.cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "starting {}: {e}",
                    containerizer::launch::wasm::runner().display()
                ),
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // The first connection is the one we keep: a host whose only agent leaves exits.
        let conn = loop {
            if let Ok(c) = host::connect(&self.socket) {
                break c;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(io::Error::other(format!(
                    "the shared wasm host exited at its start ({st}); see {}",
                    self.log.display()
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(io::Error::other("the shared wasm host did not start"));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // Our child while we live: reap it when it ends.
        std::thread::Builder::new()
            .name("wasm-host-reaper".into())
            .stack_size(64 << 10)
            .spawn(move || child.wait())?;
        Ok(conn)
    }

    fn forget(&self, conn: &Arc<Conn>) {
        let mut cur = lock(&self.conn);
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *cur = None;
        }
    }

    /// Queues task `id` for the host (starting one if needed); [`SharedHost::flush`] sends it.
    /// If it cannot be sent, its end comes as [`HostEvent::Failed`].
    pub fn queue_run(&self, id: &str, dir: &Path, image: &str, spec: RunSpec) -> io::Result<()> {
        let req = host::encode(&Request::Run {
            id: id.to_string(),
            dir: dir.to_path_buf(),
            image: image.to_string(),
            spec: Box::new(spec),
        });
        let conn = self.conn()?;
        lock(&conn.tasks).insert(id.to_string());
        lock(&conn.writer).queued.push((Some(id.to_string()), req));
        Ok(())
    }

    /// Writes what is queued, in one go. A host that died since our last use: its queued
    /// launches go once to a fresh one, and those that cannot be sent are reported failed.
    pub fn flush(&self) {
        let Some(conn) = lock(&self.conn).clone() else {
            return;
        };
        let (queued, sent) = {
            let mut w = lock(&conn.writer);
            if w.queued.is_empty() {
                return;
            }
            let queued = std::mem::take(&mut w.queued);
            let bytes: Vec<u8> = queued.iter().flat_map(|(_, b)| b.iter().copied()).collect();
            let sent = w.stream.write_all(&bytes);
            (queued, sent)
        };
        let Err(e) = sent else { return };
        // Kills die with the host (and its tasks); launches get one retry.
        let runs: Vec<(String, Vec<u8>)> = queued
            .into_iter()
            .filter_map(|(id, b)| Some((id?, b)))
            .collect();
        {
            let mut tasks = lock(&conn.tasks);
            for (id, _) in &runs {
                tasks.remove(id);
            }
        }
        self.forget(&conn);
        let retried = self.conn().and_then(|c| {
            {
                let mut tasks = lock(&c.tasks);
                tasks.extend(runs.iter().map(|(id, _)| id.clone()));
            }
            let bytes: Vec<u8> = runs.iter().flat_map(|(_, b)| b.iter().copied()).collect();
            let sent = lock(&c.writer).stream.write_all(&bytes);
            if sent.is_err() {
                let mut tasks = lock(&c.tasks);
                for (id, _) in &runs {
                    tasks.remove(id);
                }
                drop(tasks);
                self.forget(&c);
            }
            sent
        });
        if let Err(e2) = retried {
            tracing::warn!("sending tasks to the shared wasm host: {e}; then {e2}");
            for (id, _) in runs {
                (self.events)(HostEvent::Failed {
                    id,
                    message: format!("shared Wasm host: {e2}"),
                });
            }
        }
    }

    /// Whether task `id` is running in the shared host.
    pub fn has(&self, id: &str) -> bool {
        lock(&self.conn)
            .as_ref()
            .is_some_and(|c| lock(&c.tasks).contains(id))
    }

    /// Asks the host to stop task `id` (see `Request::Kill`), after what is queued.
    pub fn kill(&self, id: &str, grace: Duration) {
        let conn = lock(&self.conn).clone();
        if let Some(c) = conn {
            let req = host::encode(&Request::Kill {
                id: id.to_string(),
                grace_ms: grace.as_millis() as u64,
            });
            lock(&c.writer).queued.push((None, req));
            self.flush();
        }
    }
}
