//! Root filesystems: an overlay of the read-only unpacked layers with a per-container writable
//! upper dir, or (where overlayfs is unavailable) a plain copy of the layers.
//!
//! Layer dirs are expected in the form [`super::unpack::unpack_layer`] produces: whiteouts as
//! char devices 0:0 and opaque dirs marked with `trusted.overlay.opaque=y`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use filetime::FileTime;
use nix::sys::stat::{Mode, SFlag};

use super::unpack::OVERLAY_OPAQUE_XATTR;
use crate::sys::mount::{self as sysmount, FsContext};

/// Environment variable that forces the classic `mount(2)` path for overlay (testing, or kernels
/// whose new mount API misbehaves). Any non-empty value other than "0" enables it.
pub const FORCE_LEGACY_MOUNT_ENV: &str = "CAISSON_OVERLAY_LEGACY_MOUNT";

/// `mount(2)` copies at most one page of option data, including the trailing NUL.
const MOUNT_DATA_MAX: usize = 4095;

pub(crate) const UPPER: &str = "upper";
const WORK: &str = "work";
const MERGED: &str = "merged";
/// An overlay root's directories and their modes, in the order they are made (also what a
/// spare root holds: `launch::spare`).
pub(crate) const OVERLAY_DIRS: [(&str, u32); 3] = [(UPPER, 0o755), (WORK, 0o700), (MERGED, 0o755)];
const COPY_ROOT: &str = "rootfs";
/// Short symlinks to the lowers, for the `mount(2)` fallback.
const LINKS: &str = "l";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Overlay,
    Copy,
}

impl Backend {
    /// Overlay where the kernel has it, else a copy.
    pub fn preferred() -> Self {
        if overlay_supported() {
            Backend::Overlay
        } else {
            Backend::Copy
        }
    }
}

/// How an overlay was mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountApi {
    /// `fsopen`/`fsconfig("lowerdir+")`/`fsmount`/`move_mount` (kernel >= 6.8): any layer count.
    NewApi,
    /// Classic `mount(2)` with the option string limited to one page.
    Legacy,
}

/// Knobs for [`create_with`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Skip the new mount API and use `mount(2)` directly.
    pub force_legacy_mount: bool,
    /// Mount overlay with `volatile` (kernel >= 5.10): the upper dir is never synced. Right for
    /// container roots, which do not outlive a host crash anyway; without it, unmounting an
    /// overlay syncs the whole upper filesystem, tens of milliseconds on a busy host.
    pub volatile: bool,
    /// Put the image's init layer on top ([`super::store::Store::create_rootfs`], overlay
    /// only): the mount points every task root needs exist already.
    pub init_layer: bool,
    /// Mount the layers idmapped (a task with a user namespace; overlay with the new mount API
    /// only).
    pub idmap: Option<IdMap>,
}

/// Layers seen through a user namespace's maps ([`crate::launch::userns`]): a layer file owned
/// by N shows as owned by the host id N maps to; the store itself is never changed.
#[derive(Debug, Clone)]
pub struct IdMap {
    /// The user namespace ([`crate::sys::launch::user_namespace`]).
    pub userns: Arc<OwnedFd>,
    /// The host uid and gid of the namespace's root: owner of the upper dir, the task's root
    /// directory and what it writes.
    pub root: (u32, u32),
}

impl PartialEq for IdMap {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.userns, &other.userns) && self.root == other.root
    }
}

impl Eq for IdMap {}

impl CreateOptions {
    /// Defaults, with [`FORCE_LEGACY_MOUNT_ENV`] applied.
    pub fn from_env() -> Self {
        let force = std::env::var_os(FORCE_LEGACY_MOUNT_ENV)
            .is_some_and(|v| !v.is_empty() && v.as_bytes() != b"0");
        Self {
            force_legacy_mount: force,
            ..Self::default()
        }
    }

    /// A task's root: [`CreateOptions::from_env`], mounted `volatile`, with the init layer.
    pub fn task_root() -> Self {
        Self {
            volatile: true,
            init_layer: true,
            ..Self::from_env()
        }
    }
}

/// A container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// The merged root (overlay `merged/` or copy `rootfs/`).
    pub path: PathBuf,
    pub backend: Backend,
    /// The container dir holding everything; pass it to [`remove`].
    pub container_dir: PathBuf,
    /// Where container writes land (overlay only).
    pub upper: Option<PathBuf>,
    /// Which API mounted the overlay (overlay only).
    pub mount_api: Option<MountApi>,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("overlay needs at least one layer")]
    NoLayers,
    #[error("layer dir {path}: {source}")]
    Layer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting overlay at {target} over {layers} layers ({api:?}): {source}{}", kernel_detail(.detail))]
    Mount {
        target: PathBuf,
        layers: usize,
        api: MountApi,
        detail: String,
        #[source]
        source: io::Error,
    },
    #[error("overlay options for {layers} layers need {len} bytes, more than mount(2) accepts ({max}); the new mount API (kernel >= 6.8) has no such limit")]
    OptionsTooLong {
        layers: usize,
        len: usize,
        max: usize,
    },
    #[error("copying {path} from layer {layer}: {source}")]
    Copy {
        layer: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {path}: {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is still mounted after unmounting; refusing to delete through a mount")]
    StillMounted { path: PathBuf },
    #[error("idmapped layers (a user namespace) {0}")]
    Idmap(String),
}

fn kernel_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {detail})")
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io {
        action,
        path,
        source,
    }
}

/// Build a root filesystem from `lowers` (unpacked layer dirs, BOTTOM layer first, i.e. manifest
/// order) inside the existing empty `container_dir`. Honors [`FORCE_LEGACY_MOUNT_ENV`].
pub fn create(
    lowers: &[PathBuf],
    container_dir: &Path,
    backend: Backend,
) -> Result<Rootfs, RootfsError> {
    create_with(lowers, container_dir, backend, &CreateOptions::from_env())
}

/// [`create`] with explicit options.
pub fn create_with(
    lowers: &[PathBuf],
    container_dir: &Path,
    backend: Backend,
    opts: &CreateOptions,
) -> Result<Rootfs, RootfsError> {
    let container_dir = fs::canonicalize(container_dir)
        .map_err(io_err("resolving container dir", container_dir))?;
    let mut layers = Vec::with_capacity(lowers.len());
    for lower in lowers {
        let layer_err = |source| RootfsError::Layer {
            path: lower.clone(),
            source,
        };
        // An absolute path is used as it is (the kernel resolves it at the mount; the store's
        // layers are absolute): no walk of every component for nothing at each launch.
        let resolved = match lower.is_absolute() {
            true => lower.clone(),
            false => fs::canonicalize(lower).map_err(layer_err)?,
        };
        if !fs::metadata(&resolved).map_err(layer_err)?.is_dir() {
            return Err(layer_err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        layers.push(resolved);
    }
    match backend {
        Backend::Overlay => create_overlay(&layers, &container_dir, opts),
        Backend::Copy if opts.idmap.is_some() => Err(RootfsError::Idmap(
            "need overlayfs, which is not available here".into(),
        )),
        Backend::Copy => create_copy(&layers, &container_dir),
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_err("creating", path))
}

fn create_overlay(
    layers: &[PathBuf],
    container_dir: &Path,
    opts: &CreateOptions,
) -> Result<Rootfs, RootfsError> {
    if layers.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    let upper = container_dir.join(UPPER);
    let work = container_dir.join(WORK);
    let merged = container_dir.join(MERGED);
    // Made here, or already by a spare's maker (`launch::spare`): `container_dir` is this
    // launch's own either way.
    for (dir, (_, mode)) in [&upper, &work, &merged].into_iter().zip(OVERLAY_DIRS) {
        match mkdir(dir, mode) {
            Err(RootfsError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists => {}
            r => r?,
        }
    }
    if let Some(m) = &opts.idmap {
        std::os::unix::fs::chown(&upper, Some(m.root.0), Some(m.root.1))
            .map_err(io_err("chown", &upper))?;
    }

    let mut api = MountApi::Legacy;
    if !opts.force_legacy_mount || opts.idmap.is_some() {
        if mount_new_api(layers, &upper, &work, &merged, opts)? {
            api = MountApi::NewApi;
        } else if opts.idmap.is_some() {
            return Err(RootfsError::Idmap(
                "need overlay layers given as descriptors (`lowerdir+`, Linux >= 6.8)".into(),
            ));
        } else {
            tracing::debug!("new mount API lacks lowerdir+; falling back to mount(2)");
        }
    }
    if api == MountApi::Legacy {
        mount_legacy(layers, container_dir, &merged, opts.volatile)?;
    }
    tracing::debug!(
        merged = %merged.display(),
        layers = layers.len(),
        ?api,
        "mounted overlay rootfs"
    );
    Ok(Rootfs {
        path: merged,
        backend: Backend::Overlay,
        container_dir: container_dir.to_path_buf(),
        upper: Some(upper),
        mount_api: Some(api),
    })
}

/// Mount with the new API, one `lowerdir+` per layer. `Ok(false)` when the kernel does not offer
/// it (no fsopen, or no `lowerdir+` before 6.8) so the caller can fall back.
fn mount_new_api(
    layers: &[PathBuf],
    upper: &Path,
    work: &Path,
    merged: &Path,
    opts: &CreateOptions,
) -> Result<bool, RootfsError> {
    let volatile = opts.volatile;
    let fail = |ctx: Option<&FsContext>, source: io::Error| RootfsError::Mount {
        target: merged.to_path_buf(),
        layers: layers.len(),
        api: MountApi::NewApi,
        detail: ctx.map(FsContext::messages).unwrap_or_default(),
        source,
    };
    let ctx = match FsContext::open("overlay") {
        Ok(ctx) => ctx,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(false),
        Err(e) => return Err(fail(None, e)),
    };
    // Idmapped layers stay open until the overlay is made (it keeps its own references).
    let mut idmapped = Vec::new();
    // overlay's lower order is TOP first; ours is bottom first.
    for (i, layer) in layers.iter().rev().enumerate() {
        let set = match &opts.idmap {
            None => ctx.set_string("lowerdir+", layer.as_os_str()),
            Some(m) => match sysmount::idmapped_dir(layer, m.userns.as_fd()) {
                Ok((tree, dir)) => {
                    let r = ctx.set_fd("lowerdir+", dir.as_fd());
                    idmapped.push((tree, dir));
                    r
                }
                Err(e) => {
                    return Err(RootfsError::Idmap(format!(
                        "of layer {}: {e} (idmapped mounts need Linux >= 5.12, on tmpfs >= 6.3)",
                        layer.display()
                    )))
                }
            },
        };
        if let Err(e) = set {
            // Before 6.8 the key is unknown ("Unknown parameter 'lowerdir+'"). Any EINVAL on
            // the first layer falls back; mount(2) then reports a real problem on its own.
            if i == 0 && e.raw_os_error() == Some(libc::EINVAL) {
                tracing::debug!(kernel = %ctx.messages(), "overlay lowerdir+ refused");
                return Ok(false);
            }
            let detail = format!("{} (layer {})", ctx.messages(), layer.display());
            return Err(RootfsError::Mount {
                target: merged.to_path_buf(),
                layers: layers.len(),
                api: MountApi::NewApi,
                detail,
                source: e,
            });
        }
    }
    ctx.set_string("upperdir", upper.as_os_str())
        .map_err(|e| fail(Some(&ctx), e))?;
    ctx.set_string("workdir", work.as_os_str())
        .map_err(|e| fail(Some(&ctx), e))?;
    if volatile {
        // Before 5.10 overlay has no `volatile`: go on without it.
        if let Err(e) = ctx.set_flag("volatile") {
            tracing::debug!(error = %e, "overlay volatile refused");
        }
    }
    ctx.create().map_err(|e| fail(Some(&ctx), e))?;
    drop(idmapped);
    let mnt = ctx.mount().map_err(|e| fail(Some(&ctx), e))?;
    sysmount::move_mount_to(&mnt, merged).map_err(|e| fail(Some(&ctx), e))?;
    Ok(true)
}

/// `mount(2)` fallback. To fit as many layers as possible in one page, every path in the option
/// string goes through `/proc/self/fd/<fd of container_dir>/...` (we must not chdir in a
/// multithreaded process), and the lowers through short symlinks `l/<hex index>`.
fn mount_legacy(
    layers: &[PathBuf],
    container_dir: &Path,
    merged: &Path,
    volatile: bool,
) -> Result<(), RootfsError> {
    let links = container_dir.join(LINKS);
    mkdir(&links, 0o700)?;
    for (i, layer) in layers.iter().enumerate() {
        let link = links.join(format!("{i:x}"));
        std::os::unix::fs::symlink(layer, &link).map_err(io_err("creating symlink", &link))?;
    }
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(container_dir)
        .map_err(io_err("opening", container_dir))?;
    let base = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut data = String::from("lowerdir=");
    for i in (0..layers.len()).rev() {
        if i + 1 != layers.len() {
            data.push(':');
        }
        data.push_str(&format!("{base}/{LINKS}/{i:x}"));
    }
    data.push_str(&format!(",upperdir={base}/{UPPER},workdir={base}/{WORK}"));
    if data.len() > MOUNT_DATA_MAX {
        return Err(RootfsError::OptionsTooLong {
            layers: layers.len(),
            len: data.len(),
            max: MOUNT_DATA_MAX,
        });
    }
    let mut result = Err(io::Error::from_raw_os_error(libc::EINVAL));
    if volatile && data.len() + ",volatile".len() <= MOUNT_DATA_MAX {
        result = sysmount::mount_nodev("overlay", merged, &format!("{data},volatile"));
    }
    if result.is_err() {
        // Without volatile: older kernels refuse the option.
        result = sysmount::mount_nodev("overlay", merged, &data);
    }
    drop(dir);
    result.map_err(|source| RootfsError::Mount {
        target: merged.to_path_buf(),
        layers: layers.len(),
        api: MountApi::Legacy,
        detail: String::new(),
        source,
    })
}

/// Is overlayfs usable here (kernel support and the privilege to mount it)?
pub fn overlay_supported() -> bool {
    // Asked at every launch; the answer does not change while we run.
    static KNOWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWN.get_or_init(probe_overlay)
}

fn probe_overlay() -> bool {
    let fs_known = || {
        fs::read_to_string("/proc/filesystems")
            .map(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().last() == Some("overlay"))
            })
            .unwrap_or(false)
    };
    // Registered (built in or loaded) and CAP_SYS_ADMIN: usable, without opening a context.
    // An overlay context opened and closed unused costs an expedited RCU grace period
    // (`ovl_free_fs`): ~0.1 ms and an interrupt on every CPU, at every `caisson run`.
    if fs_known() && cap_sys_admin() {
        return true;
    }
    // fsopen loads the module on demand and checks CAP_SYS_ADMIN, like a real mount would.
    match FsContext::open("overlay") {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            fs_known() && nix::unistd::geteuid().is_root()
        }
        Err(_) => false,
    }
}

/// Whether this process has CAP_SYS_ADMIN in its effective set (`CapEff` in
/// /proc/self/status).
fn cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << CAP_SYS_ADMIN) != 0)
}

/// Unmount everything mounted inside `container_dir` and delete it. Idempotent: a missing dir is
/// success. Never follows symlinks out of the dir while deleting.
pub fn remove(container_dir: &Path) -> Result<(), RootfsError> {
    // Resolve the parent only: if container_dir itself were a symlink, we remove the link, not
    // what it points to.
    let resolved = match (container_dir.parent(), container_dir.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => {
            fs::canonicalize(parent).map(|p| p.join(name))
        }
        _ => fs::canonicalize(container_dir),
    };
    let dir = match resolved {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("resolving", container_dir)(e)),
    };
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return fs::remove_file(&dir).map_err(io_err("deleting", &dir));
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspecting", &dir)(e)),
    }
    unmount_root(&dir);
    // Nearly always nothing else is mounted there: deleted without reading the mount table.
    match remove_ended_dir(&dir) {
        Ok(()) => return Ok(()),
        // A mount below (or a kernel without openat2, < 5.6: then the mount table decides).
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV | libc::EBUSY | libc::ENOSYS)
            ) => {}
        Err(e) => return Err(io_err("deleting", &dir)(e)),
    }
    // Several rounds: mounts can be stacked on the same mount point. The round that finds
    // nothing is the check that nothing is left.
    let mut clear = false;
    for _ in 0..16 {
        let mut mounts = mounts_under(&dir).map_err(io_err("reading", Path::new(MOUNTINFO)))?;
        if mounts.is_empty() {
            clear = true;
            break;
        }
        // Deepest first, so a parent mount is not busy because of a child.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            match sysmount::unmount(&m, false) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(path = %m.display(), "mount busy; detaching lazily");
                    sysmount::unmount(&m, true).map_err(|source| RootfsError::Unmount {
                        path: m.clone(),
                        source,
                    })?;
                }
                // Already gone (a parent's detach took it, or a race with another remover).
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(RootfsError::Unmount { path: m, source }),
            }
        }
    }
    if !clear {
        if let Some(m) = mounts_under(&dir)
            .map_err(io_err("reading", Path::new(MOUNTINFO)))?
            .into_iter()
            .next()
        {
            return Err(RootfsError::StillMounted { path: m });
        }
    }
    match remove_ended_dir(&dir) {
        // Nothing is mounted below (the mount table says so): the general way.
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => fs::remove_dir_all(&dir),
        r => r,
    }
    .map_err(io_err("deleting", &dir))
}

/// What an ended task's directories hold, deepest first: an overlay root's (`rootfs/<id>`,
/// with what overlay makes in its work dir: `work/work`, and with `volatile`
/// `work/work/incompat/volatile/dirty`; its first file names the kind) and a task record's
/// (`containers/<id>`), as (files, directories).
const ENDED_ROOT: (&[&str], &[&str]) = (
    &["image-id", "work/work/incompat/volatile/dirty"],
    &[
        "merged",
        "upper",
        "work/work/incompat/volatile",
        "work/work/incompat",
        "work/work",
        "work",
    ],
);
const ENDED_RECORD: (&[&str], &[&str]) = (
    &[
        "config.json",
        "state.json",
        "stdout.log",
        "stderr.log",
        "shim.log",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
    ],
    &["etc", "sandbox"],
);

/// Deletes `dir`, a task's root (its overlay unmounted) or record directory, without ever
/// deleting through a mount: the entries such a directory usually holds go by name, one
/// `unlinkat` each from the directory's descriptor (no listing: ~10 system calls for a task
/// that wrote nothing); anything else (a task's writes in `upper/` or `sandbox/`) is then
/// walked, each subdirectory opened with `RESOLVE_NO_XDEV`. Symlinks are never followed.
/// A missing `dir` is not an error; a mount at or below it is `EXDEV` (or `EBUSY`), with
/// nothing below that mount touched: [`remove`] then unmounts and tries again.
pub fn remove_ended_dir(dir: &Path) -> io::Result<()> {
    match remove_by_name(dir)? {
        Removal::Gone => Ok(()),
        Removal::Left(fd) => {
            remove_contents(&fd)?;
            match fs::remove_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
    }
}

enum Removal {
    Gone,
    /// Entries are left in the directory (open here).
    Left(std::os::fd::OwnedFd),
}

/// Opens `path` below `dir` as a directory, refusing to cross a mount or follow a symlink
/// (`EXDEV`, `ELOOP`).
fn open_beneath<P: ?Sized + nix::NixPath>(
    dir: &impl std::os::fd::AsFd,
    path: &P,
) -> nix::Result<std::os::fd::OwnedFd> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    openat2(
        dir,
        path,
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_XDEV
                    | ResolveFlag::RESOLVE_NO_SYMLINKS,
            ),
    )
}

/// The by-name part of [`remove_ended_dir`].
fn remove_by_name(dir: &Path) -> io::Result<Removal> {
    use nix::fcntl::{open, OFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match open(dir, flags, nix::sys::stat::Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(Removal::Gone),
        // A symlink: only the link goes.
        Err(nix::errno::Errno::ELOOP) | Err(nix::errno::Errno::ENOTDIR) => {
            return match fs::remove_file(dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(Removal::Gone),
            }
        }
        Err(e) => return Err(e.into()),
    };
    // Something mounted on the directory itself: what it shows is not ours to delete.
    if sysmount::is_mount_root(dir).ok().flatten() == Some(true) {
        return Err(io::Error::from_raw_os_error(libc::EBUSY));
    }
    // The first file of a kind tells which kind this is (a directory of neither kind gets
    // both lists), so that the other kind's entries cost no failed lookups.
    let mut kinds = [ENDED_ROOT, ENDED_RECORD]
        .into_iter()
        .filter(|(files, _)| unlinkat(&fd, files[0], UnlinkatFlags::NoRemoveDir).is_ok());
    let lists: Vec<_> = match kinds.next() {
        Some(kind) => vec![kind],
        None => vec![ENDED_ROOT, ENDED_RECORD],
    };
    // A nested entry is removed only once its parent was reached without crossing a mount
    // (one `openat2` for the deepest parent vouches for the ones above it).
    let mut checked: Vec<&str> = vec![];
    let mut reachable = |path: &'static str| -> bool {
        let Some((parent, _)) = path.rsplit_once('/') else {
            return true;
        };
        let covered = |c: &&str| {
            c.strip_prefix(parent)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if checked.iter().any(covered) {
            return true;
        }
        let ok = open_beneath(&fd, parent).is_ok();
        if ok {
            checked.push(parent);
        }
        ok
    };
    for (files, dirs) in lists {
        for f in &files[1..] {
            if reachable(f) {
                let _ = unlinkat(&fd, *f, UnlinkatFlags::NoRemoveDir);
            }
        }
        for d in dirs {
            if reachable(d) {
                let _ = unlinkat(&fd, *d, UnlinkatFlags::RemoveDir);
            }
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(Removal::Gone),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removal::Gone),
        Err(_) => Ok(Removal::Left(fd)),
    }
}

/// Deletes everything in the directory `fd`, depth first, never through a mount: a
/// subdirectory that is a mount is `EXDEV`, a file that is one `EBUSY`.
fn remove_contents(fd: &std::os::fd::OwnedFd) -> io::Result<()> {
    use nix::dir::{Dir, Type};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::os::fd::AsFd;
    let dup = fd.as_fd().try_clone_to_owned()?;
    let mut d = Dir::from_fd(dup)?;
    let mut entries = vec![];
    for e in d.iter() {
        let e = e?;
        let name = e.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        entries.push((name.to_owned(), e.file_type()));
    }
    drop(d);
    for (name, ty) in entries {
        let is_dir = match ty {
            Some(t) => t == Type::Directory,
            None => nix::sys::stat::fstatat(
                fd,
                name.as_c_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)?,
        };
        if is_dir {
            let sub = open_beneath(fd, name.as_c_str())?;
            remove_contents(&sub)?;
            unlinkat(fd, name.as_c_str(), UnlinkatFlags::RemoveDir)?;
        } else {
            unlinkat(fd, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
        }
    }
    Ok(())
}

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Unmounts the overlay root of `container_dir` (its `merged/`, if mounted) without a look at
/// the mount table (reading it costs more the more tasks are running: a mounted `merged/` is
/// on another device). False if that failed. Other mounts below `container_dir` (rare) are
/// found by [`remove_ended_dir`], which does not delete through them.
pub fn unmount_root(container_dir: &Path) -> bool {
    let merged = container_dir.join(MERGED);
    if let (Ok(d), Ok(m)) = (
        fs::symlink_metadata(container_dir),
        fs::symlink_metadata(&merged),
    ) {
        if m.is_dir() && m.dev() != d.dev() && sysmount::unmount(&merged, false).is_err() {
            return sysmount::unmount(&merged, true).is_ok();
        }
    }
    true
}

/// Mount points at or below `dir`, from `/proc/self/mountinfo`.
fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = fs::read(MOUNTINFO)?;
    Ok(parse_mountinfo_points(&info)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// Field 5 of each mountinfo line, with the kernel's octal escapes (`\040` etc.) decoded.
fn parse_mountinfo_points(info: &[u8]) -> Vec<PathBuf> {
    info.split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| {
            let mut out = Vec::with_capacity(field.len());
            let mut i = 0;
            while i < field.len() {
                if field[i] == b'\\' && i + 3 < field.len() {
                    let oct = &field[i + 1..i + 4];
                    if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                        out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                        i += 4;
                        continue;
                    }
                }
                out.push(field[i]);
                i += 1;
            }
            PathBuf::from(OsString::from(std::ffi::OsStr::from_bytes(&out)))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Copy backend

fn create_copy(layers: &[PathBuf], container_dir: &Path) -> Result<Rootfs, RootfsError> {
    let root = container_dir.join(COPY_ROOT);
    mkdir(&root, 0o755)?;
    let mut copier = Copier {
        dir_times: HashMap::new(),
    };
    for layer in layers {
        let mut links = HashMap::new();
        copier.copy_dir(layer, layer, &root, &mut links)?;
    }
    // Directory times last: copying into a dir bumps its mtime.
    for (path, mtime) in copier.dir_times.drain() {
        filetime::set_symlink_file_times(&path, mtime, mtime)
            .map_err(io_err("setting times on", &path))?;
    }
    tracing::debug!(root = %root.display(), layers = layers.len(), "copied rootfs");
    Ok(Rootfs {
        path: root,
        backend: Backend::Copy,
        container_dir: container_dir.to_path_buf(),
        upper: None,
        mount_api: None,
    })
}

struct Copier {
    /// Final mtimes of directories in the rootfs (later layers override earlier ones).
    dir_times: HashMap<PathBuf, FileTime>,
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

impl Copier {
    fn remove_path(&mut self, path: &Path) -> io::Result<()> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(path)?;
                self.dir_times.retain(|p, _| !p.starts_with(path));
                Ok(())
            }
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copy the contents of `src` (a dir inside `layer`) into `dst`, an existing real directory.
    /// `links` maps (dev, ino) of multiply-linked files in this layer to their copy.
    fn copy_dir(
        &mut self,
        layer: &Path,
        src: &Path,
        dst: &Path,
        links: &mut HashMap<(u64, u64), PathBuf>,
    ) -> Result<(), RootfsError> {
        let err = |path: &Path| {
            let rel = path.strip_prefix(layer).unwrap_or(path).to_path_buf();
            move |source| RootfsError::Copy {
                layer: layer.to_path_buf(),
                path: rel,
                source,
            }
        };
        let rd = fs::read_dir(src).map_err(err(src))?;
        for ent in rd {
            let ent = ent.map_err(err(src))?;
            let s = ent.path();
            let d = dst.join(ent.file_name());
            let meta = fs::symlink_metadata(&s).map_err(err(&s))?;
            let ft = meta.file_type();
            if is_whiteout(&meta) {
                self.remove_path(&d).map_err(err(&s))?;
                continue;
            }
            if ft.is_dir() {
                let existing = fs::symlink_metadata(&d).ok();
                match existing {
                    Some(m) if m.is_dir() => {
                        if is_opaque(&s).map_err(err(&s))? {
                            // An opaque dir hides everything lower layers had in it.
                            self.clear_dir(&d).map_err(err(&s))?;
                        }
                    }
                    Some(_) => {
                        self.remove_path(&d).map_err(err(&s))?;
                        fs::DirBuilder::new()
                            .mode(0o700)
                            .create(&d)
                            .map_err(err(&s))?;
                    }
                    None => fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&d)
                        .map_err(err(&s))?,
                }
                copy_meta(&s, &d, &meta).map_err(err(&s))?;
                self.dir_times
                    .insert(d.clone(), FileTime::from_last_modification_time(&meta));
                self.copy_dir(layer, &s, &d, links)?;
                continue;
            }
            self.remove_path(&d).map_err(err(&s))?;
            if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&key) {
                        if fs::hard_link(first, &d).is_ok() {
                            continue;
                        }
                    }
                }
                self.copy_file(&s, &d).map_err(err(&s))?;
                if meta.nlink() > 1 {
                    links.insert(key, d.clone());
                }
            } else if ft.is_symlink() {
                let target = fs::read_link(&s).map_err(err(&s))?;
                std::os::unix::fs::symlink(&target, &d).map_err(err(&s))?;
            } else {
                let kind = if ft.is_char_device() {
                    SFlag::S_IFCHR
                } else if ft.is_block_device() {
                    SFlag::S_IFBLK
                } else if ft.is_fifo() {
                    SFlag::S_IFIFO
                } else {
                    // Sockets cannot be copied meaningfully; a layer should not contain them.
                    tracing::warn!(path = %s.display(), "skipping socket in layer");
                    continue;
                };
                nix::sys::stat::mknod(&d, kind, Mode::empty(), meta.rdev())
                    .map_err(|e| err(&s)(e.into()))?;
            }
            copy_meta(&s, &d, &meta).map_err(err(&s))?;
        }
        Ok(())
    }

    fn clear_dir(&mut self, dir: &Path) -> io::Result<()> {
        for ent in fs::read_dir(dir)? {
            self.remove_path(&ent?.path())?;
        }
        Ok(())
    }

    fn copy_file(&self, src: &Path, dst: &Path) -> io::Result<()> {
        let mut from = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(src)?;
        let mut to = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dst)?;
        // io::copy between files uses copy_file_range (reflinks/in-kernel copy) where it can.
        io::copy(&mut from, &mut to)?;
        to.flush()
    }
}

fn is_opaque(dir: &Path) -> io::Result<bool> {
    match xattr::get(dir, OVERLAY_OPAQUE_XATTR) {
        Ok(v) => Ok(v.as_deref() == Some(b"y")),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Ownership, mode, xattrs (minus overlay's own) and times from `src` onto `dst`, never
/// following symlinks. Directory times are set again at the end by the caller.
fn copy_meta(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let is_link = meta.file_type().is_symlink();
    match std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid())) {
        Ok(()) => {}
        // Unprivileged copies (where overlay is often unavailable) keep the caller's ownership.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            tracing::debug!(path = %dst.display(), "cannot chown; keeping current owner");
        }
        Err(e) => return Err(e),
    }
    if !is_link {
        // dst was just created by us and is not a symlink, so following is harmless.
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    match xattr::list(src) {
        Ok(names) => {
            for name in names {
                if name.as_bytes().starts_with(b"trusted.overlay.") {
                    continue;
                }
                if let Some(value) = xattr::get(src, &name)? {
                    if let Err(e) = xattr::set(dst, &name, &value) {
                        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                            return Err(e);
                        }
                    }
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
        Err(e) => return Err(e),
    }
    let mtime = FileTime::from_last_modification_time(meta);
    let atime = FileTime::from_last_access_time(meta);
    filetime::set_symlink_file_times(dst, atime, mtime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::unpack::tests::{require_root, snapshot, TarW};
    use crate::image::unpack::{unpack_layer, UnpackOptions};
    use std::os::unix::fs::FileTypeExt;
    use tar::EntryType;

    #[test]
    fn mountinfo_unescapes_mount_points() {
        let info = b"36 35 98:0 /mnt1 /mnt/with\\040space rw - ext3 /dev/root rw\n\
                     37 35 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(
            parse_mountinfo_points(info),
            vec![PathBuf::from("/mnt/with space"), PathBuf::from("/proc")]
        );
    }

    fn unpack_into(base: &Path, name: &str, tar: Vec<u8>) -> PathBuf {
        let dir = base.join(name);
        fs::create_dir(&dir).unwrap();
        unpack_layer(&tar[..], &dir, &UnpackOptions::default()).unwrap();
        dir
    }

    /// Three layers: L1 a base tree; L2 deletes a/gone (whiteout), makes b opaque and adds b/new,
    /// adds hard links; L3 overwrites c.txt and deletes the whole dir d.
    fn three_layers(base: &Path) -> Vec<PathBuf> {
        let l1 = {
            let mut t = TarW::new();
            t.dir("a/")
                .file("a/keep", b"keep")
                .file("a/gone", b"gone")
                .dir("b/")
                .file("b/old", b"old")
                .dir("b/olddir/")
                .file("c.txt", b"c1")
                .dir("d/")
                .file("d/x", b"x")
                .link(EntryType::Symlink, "lnk", "a/keep")
                .node(EntryType::Char, "null", 1, 3)
                .add(b"a/xattr", EntryType::Regular, b"", |h| h.set_mode(0o640));
            unpack_into(base, "l1", t.finish())
        };
        let l2 = {
            let mut t = TarW::new();
            t.file("a/.wh.gone", b"")
                .dir("b/")
                .file("b/.wh..wh..opq", b"")
                .file("b/new", b"new")
                .file("h1", b"hard")
                .link(EntryType::Link, "h2", "h1");
            unpack_into(base, "l2", t.finish())
        };
        let l3 = {
            let mut t = TarW::new();
            t.add(b"c.txt", EntryType::Regular, b"c3", |h| {
                h.set_mode(0o4711);
                h.set_uid(42);
            })
            .file(".wh.d", b"");
            unpack_into(base, "l3", t.finish())
        };
        vec![l1, l2, l3]
    }

    fn assert_merged_view(root: &Path) {
        assert_eq!(fs::read(root.join("a/keep")).unwrap(), b"keep");
        assert!(
            fs::symlink_metadata(root.join("a/gone")).is_err(),
            "whiteout"
        );
        assert!(fs::symlink_metadata(root.join("b/old")).is_err(), "opaque");
        assert!(
            fs::symlink_metadata(root.join("b/olddir")).is_err(),
            "opaque"
        );
        assert_eq!(fs::read(root.join("b/new")).unwrap(), b"new");
        assert_eq!(fs::read(root.join("c.txt")).unwrap(), b"c3");
        let c = fs::metadata(root.join("c.txt")).unwrap();
        assert_eq!((c.mode() & 0o7777, c.uid()), (0o4711, 42));
        assert!(
            fs::symlink_metadata(root.join("d")).is_err(),
            "whiteout of a dir"
        );
        assert_eq!(
            fs::read_link(root.join("lnk")).unwrap(),
            Path::new("a/keep")
        );
        assert!(fs::symlink_metadata(root.join("null"))
            .unwrap()
            .file_type()
            .is_char_device());
        let (h1, h2) = (
            fs::metadata(root.join("h1")).unwrap(),
            fs::metadata(root.join("h2")).unwrap(),
        );
        assert_eq!(h1.ino(), h2.ino(), "hard links stay linked");
    }

    fn is_mounted_under(dir: &Path) -> bool {
        let info = fs::read("/proc/self/mountinfo").unwrap();
        parse_mountinfo_points(&info)
            .iter()
            .any(|p| p.starts_with(dir))
    }

    #[test]
    fn root_overlay_three_layers_merged_view_and_upper_writes() {
        if !require_root("root_overlay_three_layers_merged_view_and_upper_writes") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = three_layers(tmp.path());
        for force_legacy_mount in [false, true] {
            let cdir = tmp.path().join(format!("c-{force_legacy_mount}"));
            fs::create_dir(&cdir).unwrap();
            let opts = CreateOptions {
                force_legacy_mount,
                volatile: !force_legacy_mount,
                ..Default::default()
            };
            let rootfs = create_with(&lowers, &cdir, Backend::Overlay, &opts).unwrap();
            let want = if force_legacy_mount {
                MountApi::Legacy
            } else {
                MountApi::NewApi
            };
            assert_eq!(rootfs.mount_api, Some(want));
            assert_eq!(rootfs.path, fs::canonicalize(&cdir).unwrap().join("merged"));
            assert!(is_mounted_under(&rootfs.path));
            assert_merged_view(&rootfs.path);

            fs::write(rootfs.path.join("written"), b"w").unwrap();
            fs::write(rootfs.path.join("a/keep"), b"changed").unwrap();
            fs::remove_file(rootfs.path.join("b/new")).unwrap();
            let upper = rootfs.upper.clone().unwrap();
            assert_eq!(fs::read(upper.join("written")).unwrap(), b"w");
            assert_eq!(fs::read(upper.join("a/keep")).unwrap(), b"changed");
            assert_eq!(
                fs::read(lowers[0].join("a/keep")).unwrap(),
                b"keep",
                "lower untouched"
            );
            assert_eq!(
                fs::read(lowers[1].join("b/new")).unwrap(),
                b"new",
                "lower untouched"
            );

            remove(&cdir).unwrap();
            assert!(!is_mounted_under(&rootfs.path));
            assert!(!cdir.exists());
            remove(&cdir).unwrap();
        }
    }

    /// 120 layers, each adding f<i> and overwriting "common".
    fn many_layers(base: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let mut t = TarW::new();
                t.file(&format!("f{i}"), b"")
                    .file("common", i.to_string().as_bytes());
                unpack_into(
                    base,
                    &format!("layer-with-a-longish-name-{i:04}"),
                    t.finish(),
                )
            })
            .collect()
    }

    #[test]
    fn root_overlay_120_layers_new_api_and_fallback() {
        if !require_root("root_overlay_120_layers_new_api_and_fallback") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = many_layers(tmp.path(), 120);
        let total: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
        assert!(
            total > 4096,
            "the plain lowerdir string would not fit in a page"
        );
        for force_legacy_mount in [false, true] {
            let cdir = tmp.path().join(format!("c-{force_legacy_mount}"));
            fs::create_dir(&cdir).unwrap();
            let opts = CreateOptions {
                force_legacy_mount,
                volatile: !force_legacy_mount,
                ..Default::default()
            };
            let rootfs = create_with(&lowers, &cdir, Backend::Overlay, &opts).unwrap();
            for i in 0..120 {
                assert!(rootfs.path.join(format!("f{i}")).exists(), "f{i}");
            }
            assert_eq!(
                fs::read(rootfs.path.join("common")).unwrap(),
                b"119",
                "top wins"
            );
            remove(&cdir).unwrap();
            assert!(!is_mounted_under(&cdir) && !cdir.exists());
        }
    }

    #[test]
    fn root_overlay_fallback_refuses_too_many_layers_clearly() {
        if !require_root("root_overlay_fallback_refuses_too_many_layers_clearly") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = many_layers(tmp.path(), 300);
        let cdir = tmp.path().join("c");
        fs::create_dir(&cdir).unwrap();
        let opts = CreateOptions {
            force_legacy_mount: true,
            volatile: true,
            ..Default::default()
        };
        let err = create_with(&lowers, &cdir, Backend::Overlay, &opts).unwrap_err();
        assert!(
            matches!(err, RootfsError::OptionsTooLong { layers: 300, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("6.8"), "{err}");
        remove(&cdir).unwrap();
        // The new API takes them all.
        fs::create_dir(&cdir).unwrap();
        let rootfs =
            create_with(&lowers, &cdir, Backend::Overlay, &CreateOptions::default()).unwrap();
        assert_eq!(fs::read(rootfs.path.join("common")).unwrap(), b"299");
        remove(&cdir).unwrap();
        assert!(!is_mounted_under(&cdir) && !cdir.exists());
    }

    #[test]
    fn root_overlay_paths_with_separators_work() {
        if !require_root("root_overlay_paths_with_separators_work") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let mut t = TarW::new();
        t.file("hello", b"hi");
        let lower = unpack_into(tmp.path(), "we:ird,na=me\\x", t.finish());
        for force_legacy_mount in [false, true] {
            let cdir = tmp.path().join(format!("c:{force_legacy_mount},x"));
            fs::create_dir(&cdir).unwrap();
            let opts = CreateOptions {
                force_legacy_mount,
                volatile: !force_legacy_mount,
                ..Default::default()
            };
            let rootfs =
                create_with(std::slice::from_ref(&lower), &cdir, Backend::Overlay, &opts).unwrap();
            assert_eq!(fs::read(rootfs.path.join("hello")).unwrap(), b"hi");
            remove(&cdir).unwrap();
            assert!(!is_mounted_under(&cdir) && !cdir.exists());
        }
    }

    #[test]
    fn root_copy_backend_matches_overlay() {
        if !require_root("root_copy_backend_matches_overlay") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = three_layers(tmp.path());
        let (co, cc) = (tmp.path().join("co"), tmp.path().join("cc"));
        fs::create_dir(&co).unwrap();
        fs::create_dir(&cc).unwrap();
        let ov = create(&lowers, &co, Backend::Overlay).unwrap();
        let cp = create(&lowers, &cc, Backend::Copy).unwrap();
        assert_eq!(cp.backend, Backend::Copy);
        assert_eq!(cp.path, fs::canonicalize(&cc).unwrap().join("rootfs"));
        assert_merged_view(&cp.path);
        assert_eq!(snapshot(&ov.path), snapshot(&cp.path));
        assert!(xattr::get(cp.path.join("b"), OVERLAY_OPAQUE_XATTR)
            .unwrap()
            .is_none());
        remove(&co).unwrap();
        remove(&cc).unwrap();
        assert!(!co.exists() && !cc.exists());
    }

    #[test]
    fn root_remove_detaches_busy_mount_and_never_follows_symlinks() {
        if !require_root("root_remove_detaches_busy_mount_and_never_follows_symlinks") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = three_layers(tmp.path());
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"p").unwrap();
        let cdir = tmp.path().join("c");
        fs::create_dir(&cdir).unwrap();
        let rootfs = create(&lowers, &cdir, Backend::Overlay).unwrap();
        std::os::unix::fs::symlink(&outside, rootfs.path.join("escape")).unwrap();
        std::os::unix::fs::symlink(&outside, cdir.join("escape2")).unwrap();
        // An open file keeps the mount busy: plain umount fails with EBUSY.
        let busy = fs::File::open(rootfs.path.join("a/keep")).unwrap();
        remove(&cdir).unwrap();
        drop(busy);
        assert!(!is_mounted_under(&cdir));
        assert!(!cdir.exists());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p");
        assert_eq!(fs::read(lowers[0].join("a/keep")).unwrap(), b"keep");
    }

    /// The fast path (no mount table read) must see a mount anywhere below, not only at
    /// `merged`: a bind mount deeper down stops the deletion there (EXDEV, what it shows
    /// untouched); `remove` then unmounts it and deletes the rest.
    #[test]
    fn root_remove_sees_mounts_below_without_the_mount_table() {
        if !require_root("root_remove_sees_mounts_below_without_the_mount_table") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("precious"), b"p").unwrap();
        let cdir = tmp.path().join("c");
        let deep = cdir.join("upper/a/deep");
        fs::create_dir_all(&deep).unwrap();
        fs::write(cdir.join("upper/a/file"), b"f").unwrap();
        let bind = |src: &Path, dst: &Path| {
            nix::mount::mount(
                Some(src),
                dst,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap()
        };
        // A bind mount of the same filesystem (same st_dev) on a directory, and one on a file.
        bind(&outside, &deep);
        let err = remove_ended_dir(&cdir).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p");
        assert!(is_mounted_under(&cdir));
        remove(&cdir).unwrap();
        assert!(!is_mounted_under(&cdir));
        assert!(!cdir.exists());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p");

        fs::create_dir_all(cdir.join("upper")).unwrap();
        fs::write(cdir.join("upper/f"), b"").unwrap();
        bind(&outside.join("precious"), &cdir.join("upper/f"));
        let err = remove_ended_dir(&cdir).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY), "{err}");
        remove(&cdir).unwrap();
        assert!(!cdir.exists());
        assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p");
    }

    /// A task root as overlay leaves it (volatile, unmounted, nothing written) goes by name
    /// alone: no directory is listed.
    #[test]
    fn root_an_unused_overlay_root_goes_by_name() {
        if !require_root("root_an_unused_overlay_root_goes_by_name") {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let lowers = three_layers(tmp.path());
        let cdir = tmp.path().join("c");
        fs::create_dir(&cdir).unwrap();
        let opts = CreateOptions {
            volatile: true,
            ..Default::default()
        };
        let rootfs = create_with(&lowers, &cdir, Backend::Overlay, &opts).unwrap();
        fs::write(cdir.join("image-id"), "sha256:x").unwrap();
        // What overlay made in its work dir (volatile: work/work/incompat/volatile/dirty).
        assert!(cdir.join("work/work").is_dir());
        assert!(unmount_root(&cdir));
        assert!(!rootfs.path.join("a").exists(), "unmounted");
        assert!(matches!(remove_by_name(&cdir).unwrap(), Removal::Gone));
        assert!(!cdir.exists());
    }

    #[test]
    fn ended_dirs_go_by_name_and_what_else_is_there_the_general_way() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "k").unwrap();
        // A root as an overlay leaves it, and a record directory; the second with a task's
        // writes in its sandbox, a symlink among them.
        let root = tmp.path().join("root");
        for d in ["merged", "upper/written", "work/work/incompat/volatile"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("image-id"), "sha256:x").unwrap();
        fs::write(root.join("work/work/incompat/volatile/dirty"), "").unwrap();
        fs::write(root.join("upper/written/f"), "").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("upper/written/link")).unwrap();
        let rec = tmp.path().join("rec");
        fs::create_dir_all(rec.join("etc")).unwrap();
        fs::create_dir_all(rec.join("sandbox/deep")).unwrap();
        for f in ["config.json", "state.json", "stdout.log", "etc/hosts"] {
            fs::write(rec.join(f), "x").unwrap();
        }
        std::os::unix::fs::symlink(&outside, rec.join("sandbox/deep/link")).unwrap();
        fs::write(rec.join("unexpected"), "u").unwrap();
        // Neither kind's first file (a launch that failed early): both lists, then the rest.
        let odd = tmp.path().join("odd");
        fs::create_dir_all(odd.join("etc")).unwrap();
        fs::create_dir_all(odd.join("upper/x")).unwrap();
        fs::write(odd.join("etc/hosts"), "x").unwrap();
        for d in [&root, &rec, &odd] {
            remove_ended_dir(d).unwrap();
            assert!(!d.exists(), "{}", d.display());
        }
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "k");
        // Gone already: fine. A symlink in its place: only the link goes.
        remove_ended_dir(&root).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        remove_ended_dir(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(outside.join("keep").exists());
    }

    #[test]
    fn remove_of_a_symlinked_container_dir_removes_only_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("target");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("keep"), b"k").unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        remove(&link).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert_eq!(fs::read(target.join("keep")).unwrap(), b"k");
        remove(&tmp.path().join("never-existed")).unwrap();
    }

    #[test]
    fn root_overlay_supported_here() {
        if !require_root("root_overlay_supported_here") {
            return;
        }
        assert!(overlay_supported());
    }

    #[test]
    fn missing_layer_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = create(&[tmp.path().join("nope")], tmp.path(), Backend::Copy).unwrap_err();
        assert!(matches!(err, RootfsError::Layer { .. }), "{err:?}");
        assert!(err.to_string().contains("nope"));
        let err = create(&[], tmp.path(), Backend::Overlay).unwrap_err();
        assert!(matches!(err, RootfsError::NoLayers));
    }
}
