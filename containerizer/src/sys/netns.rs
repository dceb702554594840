//! Network namespaces pinned by a bind mount at a path (what `ip netns add` does, at any path).
//!
//! A network namespace belongs to a thread, not a process. `unshare`/`setns` therefore always run
//! on a fresh, dedicated OS thread that exits afterwards, never on a tokio worker (which would
//! carry the namespace into unrelated tasks).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

fn nix_io(e: nix::errno::Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Creates a new network namespace and bind-mounts it at `path` (an empty file is created first;
/// the parent must exist). Fails with `AlreadyExists` when `path` exists.
pub fn create_netns_at(path: &Path) -> io::Result<()> {
    OpenOptions::new().write(true).create_new(true).open(path)?;
    let target = path.to_path_buf();
    let res = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> io::Result<()> {
            // This thread alone switches namespace, and it exits right after the bind mount.
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(nix_io)?;
            let own = "/proc/thread-self/ns/net";
            nix::mount::mount(
                Some(own),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(nix_io)
        })?
        .join()
        .map_err(|_| io::Error::other("netns creation thread panicked"))?;
    if res.is_err() {
        let _ = fs::remove_file(path);
    }
    res
}

/// Unmounts and removes a namespace created by [`create_netns_at`]. Idempotent: a missing path
/// or a path that is no longer a mount point is not an error.
pub fn delete_netns_at(path: &Path) -> io::Result<()> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(nix_io(e)),
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `path` is a network namespace (a bind-mounted nsfs file).
pub fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Runs `f` on a dedicated thread that has joined the network namespace at `path`, and returns
/// its result. Sockets created inside `f` stay in that namespace after the thread exits.
pub fn run_in_netns<F, R>(path: &Path, f: F) -> io::Result<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let ns = File::open(path)?;
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("netns-run".into())
        .spawn(move || -> io::Result<R> {
            nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("setns {}: {e}", path.display()),
                )
            })?;
            Ok(f())
        })?
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// A descriptor of the calling thread's network namespace, found through a socket
/// (`SIOCGSKNS`, Linux 4.9) rather than `/proc/thread-self/ns/net`: a short-lived process
/// that looks itself up in /proc leaves dentries that a later lookup of its pid must walk
/// and invalidate.
pub fn current_netns() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(nix_io)?;
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor (or -1) that nothing
    // else owns.
    let fd = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS as _) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
