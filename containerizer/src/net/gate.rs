//! The network gate: lets a task's setup (clone, namespaces, mounts, cgroup) run while its CNI
//! ADD is still in flight, and holds only its exec until the network is ready.
//!
//! The launcher makes the netns, creates the gate (a FIFO it keeps open read-write, so that its
//! message survives until the supervisor reads it and a write never blocks on a missing
//! reader), and launches with [`TaskSpec::network_gate`](crate::launch::TaskSpec) set. The
//! supervisor, after moving the init into its cgroups, reads one line: the task's `/etc/hosts`
//! and `resolv.conf` built from the ADD results (it writes them in place: they are bind mounts
//! in the task already) and the network phase's time, or why the network could not be made.
//! Only then does it let the init exec. EOF (the launcher died before it wrote) is a failure.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the launcher tells the waiting supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMessage {
    /// The network is up: the task's files and the network phase's time.
    Ready {
        hosts: String,
        resolv_conf: String,
        network_us: u64,
    },
    /// The network could not be made (the message names the network and plugin).
    Failed { message: String },
}

/// The launcher's end of a gate: the FIFO held open read-write; dropping it closes and removes
/// the FIFO (keep it until the launch has returned).
#[derive(Debug)]
pub struct Gate {
    path: PathBuf,
    file: File,
}

impl Gate {
    /// Creates the FIFO at `path` (its parent is created if missing; an existing file there,
    /// left by a launcher that died, is replaced).
    pub fn create(path: &Path) -> io::Result<Gate> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(io::Error::from)?;
        // Read-write: opening never blocks, and the pipe (with what we write) lives as long as
        // we hold it, whenever the supervisor opens it. Non-blocking: a message larger than
        // the pipe is an error here, never a launcher stuck on a dead supervisor.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        Ok(Gate {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends the message (once; the supervisor reads one line).
    pub fn send(&self, msg: &GateMessage) -> io::Result<()> {
        let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
        line.push(b'\n');
        let n = (&self.file).write(&line)?;
        if n != line.len() {
            return Err(io::Error::other("the network gate's message is too large"));
        }
        Ok(())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The supervisor's side: waits for the launcher's message and removes the FIFO. An error
/// says why the task must not start.
pub fn wait(path: &Path) -> Result<GateMessage, String> {
    // O_NONBLOCK only for the open (a FIFO whose launcher is gone would block it forever);
    // the read then blocks until the message or EOF.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("opening the network gate {}: {e}", path.display()))?;
    let _ = std::fs::remove_file(path);
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| format!("the network gate: {e}"))?;
    let mut line = String::new();
    BufReader::new(file)
        .read_line(&mut line)
        .map_err(|e| format!("reading the network gate: {e}"))?;
    if line.is_empty() {
        return Err("the launcher went away before the task's network was ready".into());
    }
    serde_json::from_str(&line).map_err(|e| format!("a bad network gate message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_sent_before_the_reader_opens_arrives_and_eof_is_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gates/t1");
        let g = Gate::create(&p).unwrap();
        let msg = GateMessage::Ready {
            hosts: "10.0.0.2\tt1\n".into(),
            resolv_conf: "nameserver 10.0.0.1\n".into(),
            network_us: 1234,
        };
        g.send(&msg).unwrap();
        assert_eq!(wait(&p).unwrap(), msg);
        assert!(!p.exists(), "the reader removes the FIFO");
        drop(g);

        // A launcher that died before writing (no writer left): EOF, a clear failure.
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = wait(&p).unwrap_err();
        assert!(err.contains("went away"), "{err}");

        // No FIFO at all.
        assert!(wait(&dir.path().join("missing")).is_err());

        // A failure message reaches the reader as such.
        let g = Gate::create(&p).unwrap();
        g.send(&GateMessage::Failed {
            message: "network \"n\": plugin \"bridge\" ADD failed".into(),
        })
        .unwrap();
        assert!(matches!(wait(&p).unwrap(), GateMessage::Failed { .. }));
        drop(g);
        assert!(!p.exists(), "dropping the gate removes the FIFO");
    }
}
