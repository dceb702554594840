//! Raw process syscalls for the native launch path: clone3 (with `CLONE_INTO_CGROUP`),
//! capabilities, `no_new_privs`, signal dispositions, the loopback interface and the clock.
//!
//! Everything here is used by the single-threaded supervisor (`caisson-shim`) and by the task's
//! init between clone and exec.
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `CLONE_INTO_CGROUP` (Linux 5.7), not exported by every libc version.
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` as of Linux 5.7 (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Which side of a fork-like clone we are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneResult {
    /// In the parent: the child's pid.
    Parent(i32),
    /// In the child.
    Child,
}

/// Fork-like clone (no new stack: the child continues on a copy of the parent's stack) into the
/// namespaces given by `flags` (`CLONE_NEW*` bits). With `cgroup_fd`, the child is born inside
/// that cgroup v2 directory (`CLONE_INTO_CGROUP`); otherwise it inherits the caller's cgroups.
///
/// Falls back to clone(2) when clone3 is unavailable (only when no cgroup fd is asked for; the
/// caller retries without it).
///
/// The caller must be single-threaded: the child is a copy of the calling thread only.
pub fn clone_fork(flags: u64, cgroup_fd: Option<RawFd>) -> io::Result<CloneResult> {
    let mut args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(fd) = cgroup_fd {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: clone3 with stack == 0 behaves like fork(2): the child gets a copy-on-write copy of
    // the address space and continues here with the same stack. The args struct is valid for the
    // duration of the call and its size is passed. The caller is single-threaded (documented
    // contract), so no lock can be held by another thread in the child.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret >= 0 {
        return Ok(if ret == 0 {
            CloneResult::Child
        } else {
            CloneResult::Parent(ret as i32)
        });
    }
    let err = io::Error::last_os_error();
    if cgroup_fd.is_some() || err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    // SAFETY: legacy clone(2) with a NULL stack is fork-like, as above; flags only contain
    // namespace bits and the exit signal; parent/child tid and tls pointers are NULL.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags as libc::c_ulong) | libc::SIGCHLD as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(CloneResult::Child),
        pid => Ok(CloneResult::Parent(pid as i32)),
    }
}

/// A user namespace with the given `uid_map` and `gid_map` (the text of
/// `/proc/PID/{uid,gid}_map`), as a descriptor (for idmapped mounts: see
/// [`crate::sys::mount::idmapped_dir`]). A child made into a new user namespace waits
/// (`pause`) while we write its maps and open its namespace, then is killed and reaped.
///
/// Safe to call from a multithreaded process: the child runs no Rust code, only `pause(2)`
/// in a loop (async-signal-safe), until the SIGKILL.
pub fn user_namespace(uid_map: &str, gid_map: &str) -> io::Result<OwnedFd> {
    // SAFETY: fork-like clone(2) (NULL stack) into a new user namespace. The child touches no
    // lock, allocator or Rust state: it only loops on pause(2) until the parent kills it, so
    // the copy of one thread of a multithreaded parent is never observed in an inconsistent
    // state. The parent continues with a normal return value.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if ret == 0 {
        loop {
            // SAFETY: pause(2) takes no arguments and is async-signal-safe.
            unsafe { libc::pause() };
        }
    }
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = ret as i32;
    let res = (|| {
        std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
        std::fs::File::open(format!("/proc/{pid}/ns/user")).map(OwnedFd::from)
    })();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    res
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// Highest capability number known to the running kernel (read once per process; a fork
/// server reads it before it forks, so its supervisors and inits do not).
pub fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

/// Drops every capability not in `keep` (a bit mask) from the bounding set.
pub fn drop_bounding_set(keep: u64) -> io::Result<()> {
    for cap in 0..=last_cap() {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: plain prctl with integer arguments.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            // EINVAL: the kernel does not know this capability.
            if err.raw_os_error() != Some(libc::EINVAL) {
                return Err(err);
            }
        }
    }
    Ok(())
}

/// Clears the ambient capability set.
pub fn clear_ambient() -> io::Result<()> {
    // SAFETY: plain prctl with integer arguments.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    check(ret)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective, permitted and inheritable sets of the calling thread to `caps`.
pub fn set_capabilities(caps: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = caps as u32;
    let hi = (caps >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: header and a two-element data array (version 3 layout) are valid for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(ret as libc::c_int)
}

/// Resets the disposition of every catchable signal to the default and unblocks all signals, so
/// that the exec'd task does not inherit, for example, Rust's ignored SIGPIPE.
pub fn reset_signals() -> io::Result<()> {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL is always sound; invalid numbers only yield EINVAL.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an empty, initialised set is passed to sigprocmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &set,
            std::ptr::null_mut(),
        ))
    }
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; zeroed is a valid value. The name fits in IFNAMSIZ.
    let ret = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut ret = libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req);
        if ret == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ret = libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &mut req);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if ret < 0 {
            Err(err)
        } else {
            Ok(())
        }
    };
    ret
}

/// Puts thread or process `pid` (0: the calling thread) under `SCHED_IDLE` (`idle`: it runs
/// only when a CPU has nothing else to run; inherited by processes it starts) or back under
/// the normal policy, `SCHED_OTHER` (from `SCHED_IDLE` that needs CAP_SYS_NICE).
pub fn set_idle_scheduling(pid: i32, idle: bool) -> io::Result<()> {
    // The kernel's sched_param is one int (libc's may be larger); the raw call because musl's
    // wrapper does not reach the kernel (it answers ENOSYS).
    let param: libc::c_int = 0;
    let policy = if idle {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    // SAFETY: `param` is a valid (one-int) sched_param that outlives the call; no other
    // pointer is passed.
    let ret = unsafe { libc::syscall(libc::SYS_sched_setscheduler, pid, policy, &param) };
    check(ret as libc::c_int)
}

/// How many threads this process has (`Threads:` of /proc/self/status).
pub fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes on the same boot.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Resource usage of the waited-for children of the calling process (`getrusage(RUSAGE_CHILDREN)`):
/// (user + system cpu time in µs, max rss in bytes).
pub fn children_usage() -> (u64, u64) {
    // SAFETY: rusage is plain old data and a valid out pointer.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let us = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000 + tv.tv_usec as u64;
    (
        us(ru.ru_utime) + us(ru.ru_stime),
        ru.ru_maxrss as u64 * 1024,
    )
}

/// `dup2(old, new)` onto a raw target descriptor (0, 1, 2 of the task's init).
pub fn dup2(old: RawFd, new: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table; `new` is deliberately replaced.
    check(unsafe { libc::dup2(old, new) })
}

/// Marks every descriptor from `first` up close-on-exec, so that nothing the launcher or the
/// supervisor inherited leaks into the task (`close_range(CLOSE_RANGE_CLOEXEC)`, Linux 5.11,
/// with a /proc/self/fd fallback).
pub fn cloexec_from(first: RawFd) -> io::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags; no memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if ret == 0 {
        return Ok(());
    }
    for fd in open_fds_from(first)? {
        // SAFETY: fcntl on a descriptor number; an fd closed meanwhile only yields EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// This process's open descriptors from `first` up (from `/proc/self/fd`; the listing's own
/// descriptor is closed again when this returns).
fn open_fds_from(first: RawFd) -> io::Result<Vec<RawFd>> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect())
}

/// Closes every descriptor from `first` up that is not close-on-exec: what a forked process
/// inherited from its launcher's parent, while what the launcher opened itself (all
/// close-on-exec, e.g. files a Wasm engine keeps mapped) stays. One `F_GETFD` per descriptor.
pub fn close_inheritable_from(first: RawFd) {
    let Ok(fds) = open_fds_from(first) else {
        return;
    };
    for fd in fds {
        // SAFETY: called by a freshly forked single-threaded process before it hands any
        // inherited descriptor to Rust code that owns it; closing one that is not
        // close-on-exec invalidates no owner in this process (the directory listing's own
        // descriptor, in the list, is closed by now and yields EBADF, as any fd closed
        // meanwhile).
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::close(fd);
            }
        }
    }
}

/// Closes every descriptor from `first` up (`close_range`, Linux 5.9; best effort).
pub fn close_from(first: RawFd) {
    close_from_keeping(first, None)
}

/// As [`close_from`], except `keep` (a descriptor handed to us on purpose).
pub fn close_from_keeping(first: RawFd, keep: Option<RawFd>) {
    close_from_keeping_all(first, keep.as_slice())
}

/// As [`close_from`], except the descriptors in `keep`.
pub fn close_from_keeping_all(first: RawFd, keep: &[RawFd]) {
    let close_range = |lo: RawFd, hi: libc::c_uint| {
        // SAFETY: called at process start, before any descriptor >= first is owned by Rust
        // code (those in `keep` are left alone for their owners).
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                lo as libc::c_uint,
                hi,
                0 as libc::c_uint,
            )
        }
    };
    let mut kept: Vec<RawFd> = keep.iter().copied().filter(|k| *k >= first).collect();
    kept.sort_unstable();
    let mut ret = 0;
    let mut lo = first;
    for k in kept {
        if k > lo {
            ret |= close_range(lo, (k - 1) as libc::c_uint);
        }
        lo = lo.max(k + 1);
    }
    ret |= close_range(lo, libc::c_uint::MAX);
    if ret != 0 {
        let _ = cloexec_from(first);
    }
}

/// `_exit(code)`: leaves without running destructors or atexit handlers (in a forked child).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Lets the thread of `handle` run only on the CPUs of `set` (`pthread_setaffinity_np`).
pub fn set_thread_affinity<T>(
    handle: &std::thread::JoinHandle<T>,
    set: &nix::sched::CpuSet,
) -> io::Result<()> {
    use std::os::unix::thread::JoinHandleExt;
    // std's raw handle is an integer; musl's pthread_t a pointer (glibc's the same integer).
    #[allow(clippy::unnecessary_cast)]
    let thread = handle.as_pthread_t() as libc::pthread_t;
    // SAFETY: `thread` is a live thread (its JoinHandle is borrowed, so it is not joined or
    // detached yet); nix's CpuSet is a `repr(transparent)` cpu_set_t, of the size passed.
    let ret = unsafe {
        libc::pthread_setaffinity_np(
            thread,
            std::mem::size_of::<libc::cpu_set_t>(),
            (set as *const nix::sched::CpuSet).cast::<libc::cpu_set_t>(),
        )
    };
    match ret {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Flushes Rust's stdout and stderr (as `std::process::exit` does), then [`exit_now`]: no
/// atexit handlers. A short-lived process ends without its allocator's exit work (mimalloc
/// returns its memory to the kernel then: a dozen `madvise` calls, for memory that goes
/// with the process anyway).
pub fn exit_flushed(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    exit_now(code)
}

/// Children of the caller are reaped by the kernel as they exit (`SIGCHLD` ignored, `on`), or
/// must be waited for again (default disposition). A fork server's children are not its
/// business once forked; the supervisors it forks wait for their own children.
pub fn auto_reap_children(on: bool) -> io::Result<()> {
    let action = if on { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: SIG_IGN and SIG_DFL install no handler code.
    let prev = unsafe { libc::signal(libc::SIGCHLD, action) };
    if prev == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message on the `SOCK_SEQPACKET` socket `sock` into `buf`, with up to two
/// descriptors passed along it (`SCM_RIGHTS`), which the caller then owns. `Ok((0, _))` is
/// the peer's end.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: a descriptor received through SCM_RIGHTS is new in this process and
                // referenced nowhere else: we are its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_count_sees_a_new_thread() {
        // (Other tests' threads come and go meanwhile: at least this one and ours.)
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert!(thread_count().unwrap() >= 2);
        tx.send(()).unwrap();
        t.join().unwrap().unwrap();
    }

    fn cgroup2_mount() -> Option<std::path::PathBuf> {
        let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        mi.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next() == Some("cgroup2"))
                .then(|| pre.split_whitespace().nth(4).map(Into::into))?
        })
    }

    /// clone3 with `CLONE_INTO_CGROUP` (the cgroup v2 path of the launch), on whatever cgroup2
    /// mount the host has (the whole tree on v2, `/sys/fs/cgroup/unified` on hybrid hosts).
    #[test]
    fn root_clone3_into_cgroup() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "needs root under CI");
            eprintln!("skipping root_clone3_into_cgroup: needs root");
            return;
        }
        let Some(mnt) = cgroup2_mount() else {
            eprintln!("skipping: no cgroup2 mount");
            return;
        };
        let name = format!("caisson-clone3-test-{}", std::process::id());
        let dir = mnt.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let fd = std::fs::File::open(&dir).unwrap();
        use std::os::fd::AsRawFd;
        match clone_fork(0, Some(fd.as_raw_fd())).unwrap() {
            CloneResult::Child => loop {
                // SAFETY: pause is async-signal-safe; the child only waits to be killed.
                unsafe { libc::pause() };
            },
            CloneResult::Parent(pid) => {
                let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                let _ = std::fs::remove_dir(&dir);
                assert!(
                    cg.lines()
                        .any(|l| l.starts_with("0::") && l.ends_with(&name)),
                    "{cg}"
                );
            }
        }
    }
}
