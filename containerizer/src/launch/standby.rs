//! Warm supervisors: `caisson-shim --standby`, started ahead of the task it will supervise.
//!
//! A fresh supervisor costs a launch its exec, dynamic loading and runtime start-up (about
//! 1-1.5 ms here), and a task with its own network namespace the namespace's creation (the
//! kernel runs every per-namespace init: ~0.5 ms). A long-running launcher (the agent, the
//! benchmarks: [`super::Runtime::with_warm_supervisor`]) keeps one supervisor waiting, which
//! has done all that already: it waits for one line on stdin, `TASK_DIR<TAB>SPAWNED_NS`, then
//! runs exactly like a fresh `caisson-shim TASK_DIR SPAWNED_NS` (same stdin/stdout protocol),
//! with its stderr moved into the task's `shim.log`. EOF instead of a line: it exits, so a
//! launcher that dies or is dropped leaves no supervisor behind.
//!
//! Each task still gets a network namespace of its own, made for it alone; it is only made
//! before the launch instead of during it. The CLI, one launch per process, does not use this.
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sched::CloneFlags;

use super::state::TaskDir;
use crate::sys::launch as sys;

/// The argument that starts a supervisor in standby.
pub const STANDBY_ARG: &str = "--standby";

/// After [`STANDBY_ARG`]: make no network namespace ahead (the task joins one made for it,
/// e.g. for CNI; a namespace made and thrown away costs its creation and the kernel's
/// teardown work).
pub const NO_NETNS_ARG: &str = "--no-netns";

/// Starts a standby supervisor (`shim --standby`), stdin and stdout piped as for a fresh one.
pub(super) fn spawn(shim: &Path, netns_ahead: bool) -> std::io::Result<Child> {
    let mut cmd = Command::new(shim);
    cmd.arg(STANDBY_ARG);
    if !netns_ahead {
        cmd.arg(NO_NETNS_ARG);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
}

/// The line that hands task directory `dir` to a standby supervisor (None: the path cannot be
/// sent on one line).
pub(super) fn handover_line(dir: &Path, spawned_ns: u64) -> Option<Vec<u8>> {
    let d = dir.as_os_str().as_bytes();
    if d.is_empty() || d.iter().any(|b| *b == b'\n' || *b == b'\t') {
        return None;
    }
    let mut line = d.to_vec();
    line.extend_from_slice(format!("\t{spawned_ns}\n").as_bytes());
    Some(line)
}

/// Replaces the time in a message that starts with a [`handover_line`] made with time 0.
pub(super) fn set_handover_time(msg: &mut Vec<u8>, spawned_ns: u64) {
    let Some(nl) = msg.iter().position(|b| *b == b'\n') else {
        return;
    };
    if nl >= 2 && msg[nl - 2] == b'\t' && msg[nl - 1] == b'0' {
        msg.splice(nl - 1..nl, spawned_ns.to_string().into_bytes());
    }
}

pub(super) fn parse_handover(line: &[u8]) -> Option<(PathBuf, u64)> {
    let line = line.strip_suffix(b"\n")?;
    let tab = line.iter().rposition(|b| *b == b'\t')?;
    let ns = std::str::from_utf8(&line[tab + 1..]).ok()?.parse().ok()?;
    Some((PathBuf::from(OsStr::from_bytes(&line[..tab])), ns))
}

/// A new network namespace, returned as a descriptor while the caller stays in its own.
fn fresh_netns() -> std::io::Result<OwnedFd> {
    let own = File::open("/proc/thread-self/ns/net")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
    let fresh = File::open("/proc/thread-self/ns/net");
    // Back to the launcher's namespace whatever happened: the supervisor itself (and the exit
    // command it runs) belongs there.
    nix::sched::setns(&own, CloneFlags::CLONE_NEWNET)?;
    Ok(OwnedFd::from(fresh?))
}

/// `caisson-shim --standby`: prepares, waits for a task, then supervises it; returns the exit
/// code. Call it first thing (it closes every inherited descriptor above stderr).
pub fn main() -> i32 {
    sys::close_from(3);
    // Started under SCHED_IDLE (a refilling launcher's standby): the namespace's creation takes
    // kernel locks (rtnl) that a starved idle task must never hold, so it runs under the normal
    // policy; only the exec and start-up before it ran on idle CPU time.
    let _ = sys::set_idle_scheduling(0, false);
    let ahead = std::env::args_os().nth(2).is_none_or(|a| a != NO_NETNS_ARG);
    let netns = match ahead.then(fresh_netns).transpose() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::debug!("standby: no network namespace made ahead: {e}");
            None
        }
    };
    let mut line = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    let stdin = std::io::stdin();
    while !line.contains(&b'\n') {
        match nix::unistd::read(&stdin, &mut buf) {
            Ok(0) => return 0,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return 0,
        }
    }
    let Some((dir, spawned_ns)) = parse_handover(&line) else {
        eprintln!("caisson-shim --standby: bad handover line");
        return 2;
    };
    // Where a fresh supervisor's stderr goes (the launcher made the file).
    if let Ok(log) = OpenOptions::new()
        .create(true)
        .append(true)
        .open(TaskDir::new(dir.clone()).shim_log())
    {
        let _ = sys::dup2(log.as_raw_fd(), 2);
    }
    super::shim::main_with(&dir, Some(spawned_ns), netns, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_round_trip() {
        let line = handover_line(Path::new("/var/lib/caisson/containers/ab c"), 42).unwrap();
        assert_eq!(
            parse_handover(&line),
            Some((PathBuf::from("/var/lib/caisson/containers/ab c"), 42))
        );
        assert!(handover_line(Path::new("/a\nb"), 1).is_none());
        assert!(parse_handover(b"/no/newline\t1").is_none());
        let mut msg = handover_line(Path::new("/d"), 0).unwrap();
        msg.extend_from_slice(b"{}\n");
        set_handover_time(&mut msg, 1234);
        assert_eq!(msg, b"/d\t1234\n{}\n");
        assert_eq!(
            parse_handover(&msg[..msg.len() - 3]),
            Some((PathBuf::from("/d"), 1234))
        );
    }
}
