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
//! Each task still gets a network namespace of its own; it is only made before the launch
//! instead of during it. The CLI, one launch per process, does not use this.
//!
//! Namespaces are recycled between tasks of a fork server's launcher: making one costs ~0.6 ms
//! of kernel work (and its teardown more, on a kernel worker), a tenth of a `/bin/true` task's
//! CPU. A supervisor whose task had a loopback-only namespace of its own gives it back to the
//! fork server once the task's last process is gone and no socket is left in it (TCP, UDP,
//! raw, v4 and v6, TIME_WAIT included: `/proc/net/sockstat*` read inside it), and the server
//! hands it to a later standby instead of making one. Tasks hold none of the capabilities that
//! change a namespace (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`) and see /proc/sys read-only, so what
//! the next one finds is what a new namespace has: loopback up, nothing else; only loopback's
//! packet counters go on counting. Tasks with hooks (which run with all privileges) never give
//! theirs back. `CAISSON_NETNS_RECYCLE=0` in the launcher's environment turns this off.
//!
//! A long-running launcher gets its standbys from a fork server ([`fork_server_main`],
//! `caisson-shim --fork-server`) rather than by exec: a fork of a process that has already
//! started, found the cgroup hierarchy and built the seccomp program. A launch with no standby
//! ready gets one forked on the spot. `CAISSON_FORK_SERVER=0` execs every standby instead.
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use nix::sched::CloneFlags;
use std::sync::atomic::{AtomicI32, Ordering};

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
    let mut cmd = super::guard::shim_command(shim);
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

/// Where a supervisor forked by a fork server gives its task's network namespace back (the
/// server's recycling socket; -1: nowhere).
static RECYCLE_TO: AtomicI32 = AtomicI32::new(-1);

/// Namespaces a fork server keeps for later standbys; more are let go.
const RECYCLE_POOL: usize = 16;

/// Gives the task's network namespace `ns` back to the fork server, if this supervisor came
/// from one and nothing is left in it (see the module's notes). Call once the task's init has
/// been reaped (its namespace's last process is gone then).
pub(super) fn give_back_netns(ns: OwnedFd) {
    let to = RECYCLE_TO.load(Ordering::Acquire);
    if to < 0 || !netns_is_empty(&ns) {
        return;
    }
    let _ = nix::sys::socket::sendmsg::<()>(
        to,
        &[std::io::IoSlice::new(b"N")],
        &[nix::sys::socket::ControlMessage::ScmRights(&[
            ns.as_raw_fd()
        ])],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        None,
    );
}

/// True if no TCP (TIME_WAIT included), UDP or raw socket is left in `ns`, from its
/// `/proc/net/sockstat` and `sockstat6`, read from inside it (the calling thread joins it for
/// the read and comes back: it must be the main thread, whose namespace `/proc/self/net`
/// shows; other threads are not affected).
fn netns_is_empty(ns: &OwnedFd) -> bool {
    let Ok(own) = crate::sys::netns::current_netns() else {
        return false;
    };
    if nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).is_err() {
        return false;
    }
    let stats =
        ["/proc/self/net/sockstat", "/proc/self/net/sockstat6"].map(std::fs::read_to_string);
    if nix::sched::setns(&own, CloneFlags::CLONE_NEWNET).is_err() {
        // Not back in our own namespace: nothing more is done here that needs it, but the
        // namespace is not given away either.
        return false;
    }
    let [v4, v6] = stats;
    // No sockstat6: a kernel without IPv6, so no IPv6 socket either.
    let v6_empty = match v6 {
        Ok(text) => sockstat_is_empty(&text),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    v4.is_ok_and(|text| sockstat_is_empty(&text)) && v6_empty
}

/// True if a `/proc/net/sockstat(6)` text counts no socket in use (nor in TIME_WAIT).
fn sockstat_is_empty(text: &str) -> bool {
    let mut seen = false;
    for line in text.lines() {
        let Some((proto, fields)) = line.split_once(':') else {
            continue;
        };
        if !matches!(
            proto,
            "TCP" | "UDP" | "UDPLITE" | "RAW" | "TCP6" | "UDP6" | "UDPLITE6" | "RAW6"
        ) {
            continue;
        }
        seen = true;
        let words: Vec<&str> = fields.split_whitespace().collect();
        for pair in words.chunks(2) {
            if let [key, value] = pair {
                if !matches!(*key, "inuse" | "tw") {
                    continue;
                }
                if *value != "0" {
                    return false;
                }
            }
        }
    }
    seen
}

/// A new network namespace, returned as a descriptor while the caller stays in its own.
fn fresh_netns() -> std::io::Result<OwnedFd> {
    let own = crate::sys::netns::current_netns()?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
    let fresh = crate::sys::netns::current_netns();
    // Back to the launcher's namespace whatever happened: the supervisor itself (and the exit
    // command it runs) belongs there.
    nix::sched::setns(&own, CloneFlags::CLONE_NEWNET)?;
    fresh
}

/// `caisson-shim --standby [--no-netns]`: prepares, waits for a task, then supervises it;
/// returns the exit code. Call it first thing (it closes every inherited descriptor above
/// stderr).
pub fn main() -> i32 {
    sys::close_from(3);
    let ahead = std::env::args_os().nth(2).is_none_or(|a| a != NO_NETNS_ARG);
    run(ahead, None)
}

/// A standby's life from its start: descriptors above stderr are closed already (but for a
/// recycled namespace, `recycled`, and the fork server's recycling socket).
fn run(netns_ahead: bool, recycled: Option<OwnedFd>) -> i32 {
    // Started under SCHED_IDLE (a refilling launcher's standby): the namespace's creation takes
    // kernel locks (rtnl) that a starved idle task must never hold, so it runs under the normal
    // policy; only the exec and start-up before it ran on idle CPU time.
    let _ = sys::set_idle_scheduling(0, false);
    let netns = match recycled {
        Some(ns) => Some(ns),
        None => match netns_ahead.then(fresh_netns).transpose() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!("standby: no network namespace made ahead: {e}");
                None
            }
        },
    };
    // What the supervisor would otherwise work out after the handover, done while the launcher
    // still prepares the task (a fork server's standbys inherit it): the cgroup hierarchy (a
    // parse of the mount table), the seccomp program, the kernel's last capability.
    crate::cgroups::find_hierarchy();
    let _ = crate::sys::seccomp::cached_default_filter();
    let _ = sys::last_cap();
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

/// The argument that starts a fork server ([`fork_server_main`]).
pub const FORK_SERVER_ARG: &str = "--fork-server";

/// A request's flag: the standby makes a network namespace ahead.
const NETNS_AHEAD: u8 = 1;

/// `CAISSON_NETNS_RECYCLE=0` (in the launcher's environment, which the fork server inherits):
/// every task's namespace is made for it and destroyed after it.
pub const RECYCLE_ENV: &str = "CAISSON_NETNS_RECYCLE";

/// `caisson-shim --fork-server`: forks standby supervisors for a long-running launcher, which
/// saves each one the exec, the dynamic loading and the runtime's start-up (~0.5-1 ms of CPU
/// per task here). Descriptor 0 is the launcher's end of a `SOCK_SEQPACKET` pair; a request is
/// one flag byte ([`NETNS_AHEAD`]) with the standby's stdin and stdout passed along
/// (`SCM_RIGHTS`); the reply is the forked pid (i32, native order; <= 0: -errno). The children
/// are reaped by the kernel; once forked, a standby lives exactly like a spawned one (it ends
/// at EOF on its stdin), and the server ends at EOF on its socket. Single-threaded: it forks.
pub fn fork_server_main() -> i32 {
    sys::close_from(3);
    // Started from a refilling launcher's idle thread: a launch that needs a supervisor now
    // must not wait for idle CPU time (the fork is all the server does).
    let _ = sys::set_idle_scheduling(0, false);
    if sys::auto_reap_children(true).is_err() {
        return 1;
    }
    // What every supervisor would otherwise work out again: the cgroup hierarchy (a parse of
    // the mount table), the seccomp program, the kernel's last capability.
    crate::cgroups::find_hierarchy();
    let _ = crate::sys::seccomp::cached_default_filter();
    let _ = sys::last_cap();
    let sock = std::io::stdin().as_raw_fd();
    // Namespaces the supervisors give back (see the module's notes): a datagram socket whose
    // sending end every standby keeps.
    let recycle = (std::env::var_os(RECYCLE_ENV).is_none_or(|v| v != "0"))
        .then(|| {
            use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
            socketpair(
                AddressFamily::Unix,
                SockType::Datagram,
                None,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )
            .ok()
        })
        .flatten();
    let mut pool: Vec<OwnedFd> = Vec::new();
    loop {
        if let Some((rx, _)) = &recycle {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            let stdin = std::io::stdin();
            let (ready_req, ready_back) = {
                let mut fds = [
                    PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
                    PollFd::new(rx.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => (
                        fds[0].any().unwrap_or(true),
                        fds[1]
                            .revents()
                            .is_some_and(|r| r.contains(PollFlags::POLLIN)),
                    ),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return 0,
                }
            };
            if ready_back {
                let mut b = [0u8; 1];
                while let Ok((n, fds)) = sys::recv_with_fds(rx.as_raw_fd(), &mut b) {
                    if n == 0 && fds.is_empty() {
                        break;
                    }
                    for fd in fds {
                        if pool.len() < RECYCLE_POOL {
                            pool.push(fd);
                        }
                    }
                }
            }
            if !ready_req {
                continue;
            }
        }
        let mut flags = [0u8; 1];
        let fds = match sys::recv_with_fds(sock, &mut flags) {
            Ok((0, _)) => return 0,
            Ok((_, fds)) => fds,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return 0,
        };
        let [stdin, stdout] = match <[OwnedFd; 2]>::try_from(fds) {
            Ok(pair) => pair,
            Err(_) => {
                let _ = reply(sock, -libc::EINVAL);
                continue;
            }
        };
        let ahead = flags[0] & NETNS_AHEAD != 0;
        let recycled = if ahead { pool.pop() } else { None };
        match sys::clone_fork(0, None) {
            Ok(sys::CloneResult::Child) => {
                // Its own children are its to wait for.
                let _ = sys::auto_reap_children(false);
                let ok = sys::dup2(stdin.as_raw_fd(), 0).is_ok()
                    && sys::dup2(stdout.as_raw_fd(), 1).is_ok();
                // The server's sockets (a copy was on 0), the passed descriptors and the other
                // namespaces of the pool; not the recycling socket's sending end nor the
                // namespace this standby takes.
                let tx = recycle.as_ref().map(|(_, tx)| tx.as_raw_fd());
                let keep: Vec<RawFd> = tx
                    .into_iter()
                    .chain(recycled.as_ref().map(|ns| ns.as_raw_fd()))
                    .collect();
                sys::close_from_keeping_all(3, &keep);
                std::mem::forget((stdin, stdout, pool, recycle));
                if !ok {
                    sys::exit_now(1);
                }
                if let Some(tx) = tx {
                    RECYCLE_TO.store(tx, Ordering::Release);
                }
                std::process::exit(run(ahead, recycled));
            }
            Ok(sys::CloneResult::Parent(pid)) => {
                // The child has the namespace now (a failed fork drops it below).
                drop((stdin, stdout, recycled));
                if reply(sock, pid).is_err() {
                    return 0;
                }
            }
            Err(e) => {
                drop((stdin, stdout));
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if reply(sock, -errno).is_err() {
                    return 0;
                }
            }
        }
    }
}

fn reply(sock: RawFd, value: i32) -> nix::Result<usize> {
    nix::sys::socket::send(
        sock,
        &value.to_ne_bytes(),
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
}

/// A long-running launcher's connection to its fork server.
#[derive(Debug)]
pub(super) struct ForkServer {
    sock: OwnedFd,
    server: Child,
}

impl ForkServer {
    /// Starts `shim --fork-server`.
    pub(super) fn start(shim: &Path) -> std::io::Result<ForkServer> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        // A server that does not answer (stopped, say) fails the request rather than the
        // launch: the launcher then execs a standby and starts a new server next time.
        nix::sys::socket::setsockopt(
            &ours,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(2, 0),
        )?;
        let server = super::guard::shim_command(shim)
            .arg(FORK_SERVER_ARG)
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(ForkServer { sock: ours, server })
    }

    /// A new standby supervisor, forked by the server.
    pub(super) fn standby(&self, netns_ahead: bool) -> std::io::Result<Standby> {
        use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
        let (in_r, in_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let flags = [if netns_ahead { NETNS_AHEAD } else { 0 }];
        let fds = [in_r.as_raw_fd(), out_w.as_raw_fd()];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[std::io::IoSlice::new(&flags)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        drop((in_r, out_w));
        let mut pid = [0u8; 4];
        let n = recv(self.sock.as_raw_fd(), &mut pid, MsgFlags::empty())?;
        let pid = i32::from_ne_bytes(pid);
        if n != 4 {
            return Err(std::io::Error::other("the fork server ended"));
        }
        if pid <= 0 {
            return Err(std::io::Error::from_raw_os_error(-pid));
        }
        Ok(Standby {
            pid: pid as u32,
            stdin: Some(ChildStdin::from(in_w)),
            stdout: Some(ChildStdout::from(out_r)),
            child: None,
        })
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // Nothing of it is needed any more (the standbys it forked end at EOF on their own
        // stdin, the supervisors are on their own): killed rather than asked, so that a server
        // that does not answer cannot hold the launcher up.
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A supervisor in standby: spawned (our child), or forked by a [`ForkServer`] (its child,
/// reaped by the kernel).
#[derive(Debug)]
pub(super) struct Standby {
    pub(super) pid: u32,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) stdout: Option<ChildStdout>,
    pub(super) child: Option<Child>,
}

impl Standby {
    pub(super) fn spawned(mut c: Child) -> Standby {
        Standby {
            pid: c.id(),
            stdin: c.stdin.take(),
            stdout: c.stdout.take(),
            child: Some(c),
        }
    }

    /// Whether it is still waiting (not killed meanwhile): a standby writes nothing before
    /// its handover, so a readable or hung-up stdout means it is gone.
    pub(super) fn alive(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            return matches!(c.try_wait(), Ok(None));
        }
        let Some(out) = &self.stdout else {
            return false;
        };
        let mut fds = [nix::poll::PollFd::new(
            out.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO),
            Ok(0)
        )
    }

    /// Makes it end now (a spawned one is killed; a forked one ends at EOF when dropped).
    pub(super) fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
        }
    }
}

impl Drop for Standby {
    /// Unused (or its parts taken): EOF on its stdin makes it exit having touched nothing; a
    /// spawned one is then reaped.
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_counts_sockets_and_time_wait() {
        let idle = "sockets: used 3\nTCP: inuse 0 orphan 0 tw 0 alloc 0 mem 0\n\
                    UDP: inuse 0 mem 0\nUDPLITE: inuse 0\nRAW: inuse 0\nFRAG: inuse 0 memory 0\n";
        assert!(sockstat_is_empty(idle));
        assert!(!sockstat_is_empty(&idle.replace("tw 0", "tw 1")));
        assert!(!sockstat_is_empty(
            &idle.replace("UDP: inuse 0", "UDP: inuse 2")
        ));
        // FRAG is not a socket; "orphan" and "alloc" are host-wide counters.
        assert!(sockstat_is_empty(&idle.replace("memory 0", "memory 9")));
        assert!(sockstat_is_empty(&idle.replace("alloc 0", "alloc 7")));
        let v6 = "TCP6: inuse 0\nUDP6: inuse 0\nUDPLITE6: inuse 0\nRAW6: inuse 1\nFRAG6: inuse 0 memory 0\n";
        assert!(!sockstat_is_empty(v6));
        assert!(sockstat_is_empty(
            &v6.replace("RAW6: inuse 1", "RAW6: inuse 0")
        ));
        // Nothing recognizable: not known to be empty.
        assert!(!sockstat_is_empty(""));
    }

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
