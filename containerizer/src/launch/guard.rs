//! The supervisor binary on a read-only mount, so that no task can overwrite it (the class of
//! runc's CVE-2019-5736).
//!
//! A task's init is a fork of `caisson-shim`, and so is an exec'd process until its exec: until
//! then `/proc/PID/exe` is the host's binary. A task whose program is a script starting
//! `#!/proc/self/exe` makes its init run that binary inside the task; another of its
//! processes may then open it through `/proc/PID/exe` and, once it is no longer running, write
//! it (the task's root has CAP_DAC_OVERRIDE): the next supervisor would run its code as the
//! host's root. Launchers exec the supervisor through a read-only bind mount of it in
//! [`GUARD_DIR`] (`<dev>-<ino>/caisson-shim`) instead, so every such open for writing fails
//! with EROFS. One mount per
//! distinct binary (device and inode), made by the first launch after a boot or an install,
//! reused by all later ones; a binary's mount goes when the binary has been deleted (a new
//! build or install replaced it) and the next new one is made, or with the boot.
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

/// Where the read-only mounts of supervisor binaries are.
pub const GUARD_DIR: &str = "/run/caisson/bin";

/// `bin` as a launcher should exec it: its read-only bind mount in [`GUARD_DIR`] (made if
/// missing), or `bin` itself if that cannot be made (with a warning). Looked up at each spawn
/// (three `stat`s): a new install of `bin` gets its own mount, and a swept one is not used.
pub fn read_only(bin: &Path) -> PathBuf {
    match guard(bin, Path::new(GUARD_DIR)) {
        Ok(g) => g,
        Err(e) => {
            // Once per process: an agent would say it at every launch.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "no read-only mount of {} in {GUARD_DIR} ({e}): running it from where it is",
                    bin.display()
                );
            }
            bin.to_path_buf()
        }
    }
}

/// A command that runs the supervisor `shim` through [`read_only`]. What the supervisor finds
/// next to itself (the Wasm runner, `caisson-wasm`) is still looked up next to `shim`.
pub fn shim_command(shim: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(read_only(shim));
    if std::env::var_os(super::wasm::RUNNER_ENV).is_none() {
        if let Some(dir) = shim.parent().filter(|d| !d.as_os_str().is_empty()) {
            cmd.env(super::wasm::RUNNER_ENV, dir.join(super::wasm::RUNNER_NAME));
        }
    }
    cmd
}

/// The read-only bind mount of `bin` in `dir`, made if missing.
pub fn guard(bin: &Path, dir: &Path) -> io::Result<PathBuf> {
    let meta = fs::metadata(bin)?;
    let name = bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bin".into());
    // Under its own name (what `ps` shows), in a directory per binary.
    let target = dir
        .join(format!("{:x}-{:x}", meta.dev(), meta.ino()))
        .join(name);
    if is_guard(&target, &meta) {
        return Ok(target);
    }
    fs::create_dir_all(target.parent().unwrap_or(dir))?;
    // One maker at a time: two would stack two mounts.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(".lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))?;
    if is_guard(&target, &meta) {
        return Ok(target);
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o500)
        .open(&target)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let none: Option<&str> = None;
    nix::mount::mount(Some(bin), &target, none, MsFlags::MS_BIND, none)?;
    let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    if let Err(e) = nix::mount::mount(none, &target, none, ro, none) {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
        return Err(e.into());
    }
    if !is_guard(&target, &meta) {
        return Err(io::Error::other(format!(
            "{} is not a read-only mount of it after mounting",
            target.display()
        )));
    }
    sweep_deleted(dir);
    Ok(target)
}

/// Detaches the mounts in `dir` whose binary has been deleted (replaced by a new build or
/// install): no launch can ask for them again. Supervisors still running from one keep it.
fn sweep_deleted(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        let mut f = line.split(' ').skip(3);
        let (Some(root), Some(point)) = (f.next(), f.next()) else {
            continue;
        };
        let point = Path::new(point);
        if !root.ends_with("//deleted") || point.parent().and_then(Path::parent) != Some(dir) {
            continue;
        }
        if nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH).is_ok() {
            let _ = fs::remove_file(point);
            if let Some(d) = point.parent() {
                let _ = fs::remove_dir(d);
            }
        }
    }
}

/// `target` is `bin`'s file (same device and inode) on a read-only mount.
fn is_guard(target: &Path, bin: &fs::Metadata) -> bool {
    let same = fs::metadata(target).is_ok_and(|m| m.dev() == bin.dev() && m.ino() == bin.ino());
    same && nix::sys::statvfs::statvfs(target)
        .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounted(p: &Path) -> usize {
        let p = p.to_str().unwrap();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(4) == Some(p))
            .count()
    }

    #[test]
    fn root_guard_is_a_read_only_mount_of_the_binary_made_once() {
        if !nix::unistd::Uid::effective().is_root() {
            assert!(std::env::var("CI").is_err(), "needs root under CI");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("tool");
        fs::write(&bin, b"#!/bin/sh\necho hi\n").unwrap();
        let dir = tmp.path().join("guard");
        let g = guard(&bin, &dir).unwrap();
        assert_eq!(mounted(&g), 1);
        assert_eq!(fs::read(&g).unwrap(), fs::read(&bin).unwrap());
        let err = OpenOptions::new().write(true).open(&g).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        // Again: the same mount, not a second one.
        assert_eq!(guard(&bin, &dir).unwrap(), g);
        assert_eq!(mounted(&g), 1);
        // Another file (a new install): a mount of its own.
        let bin2 = tmp.path().join("tool2");
        fs::write(&bin2, b"x").unwrap();
        let g2 = guard(&bin2, &dir).unwrap();
        assert_ne!(g2, g);
        assert_eq!(g2.file_name(), bin2.file_name(), "named as the binary");
        // A binary replaced by a new build: the next new mount detaches the deleted one's.
        fs::remove_file(&bin).unwrap();
        let bin3 = tmp.path().join("tool3");
        fs::write(&bin3, b"y").unwrap();
        let g3 = guard(&bin3, &dir).unwrap();
        assert_eq!(mounted(&g), 0, "the deleted binary's mount is gone");
        assert!(!g.exists() && !g.parent().unwrap().exists());
        assert_eq!((mounted(&g2), mounted(&g3)), (1, 1));
        for p in [&g2, &g3] {
            nix::mount::umount2(p.as_path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        }
    }
}
