//! Mount syscalls: the new mount API (`fsopen`/`fsconfig`/`fsmount`/`move_mount`, which has no
//! one-page limit on options) plus thin wrappers over `mount(2)` and `umount2(2)`.
//!
//! libc exposes only the syscall numbers of the new API, so the constants below are copied from
//! `<linux/mount.h>` (stable kernel ABI).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_SET_FLAG: libc::c_uint = 0;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_SET_FD: libc::c_uint = 5;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSCONFIG_CMD_RECONFIGURE: libc::c_uint = 7;
const FSPICK_CLOEXEC: libc::c_uint = 0x1;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a mount argument"))
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A filesystem context from `fsopen(2)`: configure it key by key, create the superblock, then
/// turn it into a detached mount with [`FsContext::mount`].
#[derive(Debug)]
pub struct FsContext {
    fd: OwnedFd,
}

impl FsContext {
    /// `fsopen(fstype, FSOPEN_CLOEXEC)`. `ENOSYS` means a kernel older than 5.2.
    pub fn open(fstype: &str) -> io::Result<Self> {
        let name = cstring(fstype.as_bytes())?;
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call; fsopen reads it
        // and takes no other pointer.
        let ret = check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
        // SAFETY: on success fsopen returns a fresh file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) };
        Ok(Self { fd })
    }

    /// `fspick(path, FSPICK_CLOEXEC)`: a context to reconfigure the superblock mounted at `path`
    /// (set its options, then [`FsContext::reconfigure`]); the mount's own flags are untouched.
    pub fn pick(path: &Path) -> io::Result<Self> {
        let path = cstring(path.as_os_str().as_bytes())?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call; fspick reads
        // it and takes no other pointer.
        let ret = check(unsafe {
            libc::syscall(
                libc::SYS_fspick,
                libc::AT_FDCWD,
                path.as_ptr(),
                FSPICK_CLOEXEC,
            )
        })?;
        // SAFETY: on success fspick returns a fresh file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) };
        Ok(Self { fd })
    }

    /// `fsconfig(FSCONFIG_SET_STRING, key, value)`.
    pub fn set_string(&self, key: &str, value: &OsStr) -> io::Result<()> {
        let key = cstring(key.as_bytes())?;
        let value = cstring(value.as_bytes())?;
        // SAFETY: the fd is owned by self and open; `key` and `value` are valid NUL-terminated
        // strings that outlive the call; aux must be 0 for FSCONFIG_SET_STRING.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0 as libc::c_int,
            )
        })?;
        Ok(())
    }

    /// `fsconfig(FSCONFIG_SET_FD, key, fd)`: a layer given as an open directory (overlay's
    /// `lowerdir+` takes one since 6.8 and so can be an idmapped mount).
    pub fn set_fd(&self, key: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        let key = cstring(key.as_bytes())?;
        // SAFETY: the fd is owned by self and open; `key` is a valid NUL-terminated string that
        // outlives the call; value must be NULL and aux the descriptor, borrowed for the call.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_SET_FD,
                key.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                fd.as_raw_fd(),
            )
        })?;
        Ok(())
    }

    /// `fsconfig(FSCONFIG_SET_FLAG, key)`: a value-less option such as overlay's `volatile`.
    pub fn set_flag(&self, key: &str) -> io::Result<()> {
        let key = cstring(key.as_bytes())?;
        // SAFETY: the fd is owned by self and open; `key` is a valid NUL-terminated string that
        // outlives the call; value must be NULL and aux 0 for FSCONFIG_SET_FLAG.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_SET_FLAG,
                key.as_ptr(),
                std::ptr::null::<libc::c_char>(),
                0 as libc::c_int,
            )
        })?;
        Ok(())
    }

    /// `fsconfig(FSCONFIG_CMD_CREATE)`: build the superblock from the configuration.
    pub fn create(&self) -> io::Result<()> {
        // SAFETY: the fd is owned by self and open; CMD_CREATE takes no key, value or aux.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0 as libc::c_int,
            )
        })?;
        Ok(())
    }

    /// `fsconfig(FSCONFIG_CMD_RECONFIGURE)`: apply the options to a picked superblock.
    pub fn reconfigure(&self) -> io::Result<()> {
        // SAFETY: the fd is owned by self and open; CMD_RECONFIGURE takes no key, value or aux.
        check(unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_CMD_RECONFIGURE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0 as libc::c_int,
            )
        })?;
        Ok(())
    }

    /// `fsmount(2)`: a detached mount of the created superblock (freed if the fd is dropped
    /// before it is attached with [`move_mount_to`]), with device nodes inert on it
    /// (`MOUNT_ATTR_NODEV`): every mount made this way is a task's root, whose image may carry
    /// device nodes.
    pub fn mount(&self) -> io::Result<OwnedFd> {
        self.mount_with(MOUNT_ATTR_NODEV)
    }

    /// `fsmount(2)` with the mount attributes `attrs` (`MOUNT_ATTR_*`).
    pub fn mount_with(&self, attrs: libc::c_uint) -> io::Result<OwnedFd> {
        // SAFETY: the fd is owned by self and open; fsmount takes no pointers.
        let ret = check(unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs,
            )
        })?;
        // SAFETY: on success fsmount returns a fresh file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) })
    }

    /// The kernel's messages about this context (why a parameter or the create was refused),
    /// joined with "; ". Empty if there are none.
    pub fn messages(&self) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        // Each read returns one message; the log ends with ENODATA.
        while let Ok(n) = nix::unistd::read(&self.fd, &mut buf) {
            if n == 0 {
                break;
            }
            out.push(String::from_utf8_lossy(&buf[..n]).trim_end().to_string());
        }
        out.join("; ")
    }
}

/// `MOUNT_ATTR_*` of `fsmount(2)` and `mount_setattr(2)`.
pub const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
pub const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
pub const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
pub const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

/// Attach a detached mount (from [`FsContext::mount`]) at `target`.
pub fn move_mount_to(mount: &OwnedFd, target: &Path) -> io::Result<()> {
    let target = cstring(target.as_os_str().as_bytes())?;
    let empty = c"";
    // SAFETY: `mount` is an open fd we borrow for the call; `empty` and `target` are valid
    // NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// An idmapped copy of the directory `dir`: `open_tree(OPEN_TREE_CLONE)` of it, with
/// `mount_setattr(MOUNT_ATTR_IDMAP)` of the user namespace `userns` (Linux 5.12; tmpfs 6.3).
/// Files owned by id N on disk show as owned by the host id that N maps to in `userns`, and
/// writes map back. Returns the detached mount (keep it open while it is in use) and a
/// directory descriptor of its root (what overlay's `lowerdir+` takes).
pub fn idmapped_dir(dir: &Path, userns: BorrowedFd<'_>) -> io::Result<(OwnedFd, OwnedFd)> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
    const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    let path = cstring(dir.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call; open_tree takes
    // no other pointer.
    let ret = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC,
        )
    })?;
    // SAFETY: on success open_tree returns a fresh file descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: `tree` is open; `empty` is a valid NUL-terminated string and `attr` a valid
    // mount_attr, both outliving the call, whose size is passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    let root = nix::fcntl::openat(
        &tree,
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(io::Error::from)?;
    Ok((tree, root))
}

/// Classic `mount(2)` of a filesystem without a source device (overlay, tmpfs, ...), with
/// device nodes inert on it (`MS_NODEV`: a task's root, whose image may carry device nodes).
/// `data` is limited by the kernel to one page.
pub fn mount_nodev(fstype: &str, target: &Path, data: &str) -> io::Result<()> {
    nix::mount::mount(
        Some(fstype),
        target,
        Some(fstype),
        MsFlags::MS_NODEV,
        Some(data),
    )
    .map_err(io::Error::from)
}

/// `umount2(target)`, lazily (`MNT_DETACH`) when `detach` is set. Never follows a symlink at
/// `target`.
pub fn unmount(target: &Path, detach: bool) -> io::Result<()> {
    let mut flags = MntFlags::UMOUNT_NOFOLLOW;
    if detach {
        flags |= MntFlags::MNT_DETACH;
    }
    nix::mount::umount2(target, flags).map_err(io::Error::from)
}

/// Whether `path` (not followed if a symlink) is the root of a mount, from `statx(2)`'s
/// `STATX_ATTR_MOUNT_ROOT` (Linux 5.8): one system call, whatever the size of the mount table.
/// `None` when the kernel does not report the attribute.
pub fn is_mount_root(path: &Path) -> io::Result<Option<bool>> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `stx` is a valid, writable
    // statx the kernel fills.
    let ret = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
            libc::STATX_TYPE,
            &mut stx,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok((stx.stx_attributes_mask & bit != 0).then_some(stx.stx_attributes & bit != 0))
}
