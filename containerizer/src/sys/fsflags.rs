//! Inode flags (`FS_IOC_GETFLAGS`/`FS_IOC_SETFLAGS`, `chattr`'s ioctls).
//!
//! Only `FS_TOPDIR_FL` is used: on ext2/3/4 it makes the subdirectories of a directory spread
//! over the block groups (the Orlov allocator, as for top-level directories) instead of
//! packing them into their parent's group. Task directories come and go by the thousand; in one
//! group, an ext4 without a journal skips every inode freed in the last 5-300 s when it
//! allocates one (`recently_deleted`), so each new file scanned all the recent tasks' freed
//! inodes: 1,000 tasks took 3.1-6.4 s instead of 2.7 s on this VM's root file system.
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `FS_TOPDIR_FL` from `<linux/fs.h>` (stable ABI; libc does not export it).
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// The inode flags of `f`. `ENOTTY`/`EOPNOTSUPP`: the file system has none (tmpfs, overlay).
fn get(f: &File) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int (the kernel's size, whatever the ioctl number's
    // `long` says) into `flags`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Whether `dir` has `FS_TOPDIR_FL` (false where the file system has no inode flags).
pub fn is_top_dir(dir: &Path) -> io::Result<bool> {
    match get(&File::open(dir)?) {
        Ok(flags) => Ok(flags & FS_TOPDIR_FL != 0),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EOPNOTSUPP)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets `FS_TOPDIR_FL` on `dir` (see the module's note). Returns whether the file system took
/// it: `Ok(false)` where it has no inode flags or ignores this one.
pub fn mark_top_dir(dir: &Path) -> io::Result<bool> {
    let f = File::open(dir)?;
    let flags = match get(&f) {
        Ok(flags) => flags,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EOPNOTSUPP)) => {
            return Ok(false)
        }
        Err(e) => return Err(e),
    };
    if flags & FS_TOPDIR_FL != 0 {
        return Ok(true);
    }
    let new = flags | FS_TOPDIR_FL;
    // SAFETY: FS_IOC_SETFLAGS reads one int from `new`, which lives across the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTTY | libc::EOPNOTSUPP | libc::EINVAL) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(get(&f).is_ok_and(|f| f & FS_TOPDIR_FL != 0))
}
