//! The "first output" phase of a native task: when its first byte reaches its stdout or stderr
//! log. The task writes straight into the log files (no pipe through the supervisor, which
//! keeps launches cheap), so nobody sees the write happen; an inotify watch does, here in the
//! benchmark only, at no cost to ordinary launches.
//!
//! The task directory does not exist before the launch, so the watch starts on the directory
//! of all task directories (before the launch: no race) and moves to the task's own directory
//! when it appears (made, or a spare renamed into place), long before the supervisor has even
//! opened the logs. Should the logs already hold output by then, the sample is dropped rather
//! than guessed.
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use anyhow::{Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const LOGS: [&str; 2] = ["stdout.log", "stderr.log"];

/// A running watch for one task; `finish` after the task has ended.
pub struct Watch {
    /// The watcher's answer, sent before it closes its inotify instance: that close waits for
    /// an SRCU grace period (10-20 ms here), which must not be counted against the launches.
    result: Receiver<Option<Instant>>,
    /// Dropping the write end wakes the watcher up when the task wrote nothing.
    stop: OwnedFd,
}

impl Watch {
    /// Starts watching for the task `id`, whose directory will be created in `containers`.
    pub fn start(containers: &Path, id: &str) -> Result<Watch> {
        std::fs::create_dir_all(containers)
            .with_context(|| format!("creating {}", containers.display()))?;
        let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .context("inotify_init")?;
        ino.add_watch(
            containers,
            // Made there, or a spare renamed there (`launch::spare`).
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
        )
        .with_context(|| format!("watching {}", containers.display()))?;
        let (stop_r, stop) = nix::unistd::pipe().context("pipe")?;
        let dir = containers.join(id);
        let id = id.to_string();
        let (tx, result) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("first-output".into())
            .spawn(move || {
                let _ = tx.send(watch(&ino, stop_r, &dir, &id));
                drop(ino);
            })
            .context("starting the first-output watcher")?;
        Ok(Watch { result, stop })
    }

    /// The instant of the task's first output, if it wrote any (and it was seen).
    pub fn finish(self) -> Option<Instant> {
        drop(self.stop);
        self.result.recv().ok().flatten()
    }
}

fn watch(ino: &Inotify, stop: OwnedFd, dir: &PathBuf, id: &str) -> Option<Instant> {
    let mut in_task_dir = false;
    loop {
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        }
        // Events first: a task that wrote and exited at once has both ready.
        let events = match ino.read_events() {
            Ok(ev) => ev,
            Err(nix::errno::Errno::EAGAIN) => vec![],
            Err(_) => return None,
        };
        for ev in events {
            let name = ev.name.as_deref().and_then(|n| n.to_str()).unwrap_or("");
            let appeared = ev
                .mask
                .intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO);
            if !in_task_dir && appeared && name == id {
                ino.add_watch(dir, AddWatchFlags::IN_MODIFY).ok()?;
                in_task_dir = true;
                // Output written before the watch would go unseen: no sample then.
                let written = LOGS
                    .iter()
                    .any(|l| std::fs::metadata(dir.join(l)).is_ok_and(|m| m.len() > 0));
                if written {
                    return None;
                }
            } else if in_task_dir
                && ev.mask.contains(AddWatchFlags::IN_MODIFY)
                && LOGS.contains(&name)
            {
                return Some(Instant::now());
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return None;
        }
    }
}
