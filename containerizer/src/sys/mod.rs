//! Raw syscalls: the only module where `unsafe` is allowed. Each block carries a `// SAFETY:` note.
pub mod bpf;
pub mod fsflags;
pub mod launch;
pub mod mount;
pub mod netns;
pub mod seccomp;
pub mod term;
pub mod wasm;

/// Restores the default SIGPIPE action, so a CLI whose output goes to a closed pipe (`| head`)
/// exits quietly like any Unix tool instead of failing on a write.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; called at start-up before threads exist.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
}

/// Makes the child `cmd` spawns get SIGKILL when the thread that spawned it ends (the
/// process killed included): a CNI plugin must not outlive a launcher killed in the middle of
/// its ADD, or it could finish the ADD after `rm` has run the DEL.
pub fn kill_child_with_parent(cmd: &mut tokio::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe calls (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // The parent may have died before the prctl: then no signal would ever come.
            if nix::unistd::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// How [`rename2`] renames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rename {
    /// Swap the two paths (both must exist): `RENAME_EXCHANGE`.
    Exchange,
    /// Fail with `EEXIST` rather than replace the target: `RENAME_NOREPLACE`.
    NoReplace,
}

/// `renameat2(2)` on two paths (nix offers it only with glibc; the static build uses musl).
/// `EINVAL` where the file system lacks the flag.
pub fn rename2(from: &std::path::Path, to: &std::path::Path, how: Rename) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (from, to) = (c(from)?, c(to)?);
    // <linux/fs.h>; libc does not define them for every target.
    let flags: libc::c_uint = match how {
        Rename::NoReplace => 1,
        Rename::Exchange => 2,
    };
    // SAFETY: both paths are NUL-terminated C strings that live across the call; the kernel
    // only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pages of `file` held in the page cache and not yet on disk (dirty or under writeback), by
/// `cachestat(2)` (Linux 6.5): how the tests see that what a pull wrote has reached the disk.
pub fn unwritten_pages(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        // 0: to the end of the file.
        len: u64,
    }
    // The kernel's layout; two of its fields are read.
    #[allow(dead_code)]
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    // Not in the libc crate for x86-64 yet; the same number on every architecture.
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: 0, len: 0 };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes one `struct cachestat` into `stat`, both valid
    // for the call and laid out as the kernel's (five and two u64 fields); the fd is open.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.nr_dirty + stat.nr_writeback)
}
