//! Networking state that lives exactly as long as the boot (every netns ends with it): the
//! attachment cache, the pinned namespaces and host-local's allocations for caisson's networks.
//! It is kept on tmpfs, so that a networked launch writes and frees no disk blocks (on a busy
//! disk, or ext4 mounted with `discard`, each freed block cost ms to 100s of ms) and a reboot
//! takes the records with the namespaces they describe. Where `/run` is not a tmpfs (hosts
//! without systemd), caisson mounts one at [`RUN_DIR`] once per boot and keeps it.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{mount, MsFlags};
use nix::sys::statfs::{statfs, TMPFS_MAGIC};

/// caisson's volatile networking state.
pub const RUN_DIR: &str = "/run/caisson/net";

/// host-local's allocations for the networks caisson writes (`network create`, the default
/// network): volatile for the same reason (podman's netavark keeps its IPAM under /run too),
/// so a reboot, which loses the attachment cache, cannot leave addresses held.
pub const IPAM_DATA_DIR: &str = "/run/caisson/net/ipam";

/// The per-store part of [`RUN_DIR`] (attachment cache, pinned netns):
/// `/run/caisson/net/stores/<hash of the store's path>`, so that stores (e.g. tests') never share.
pub fn volatile_dir(root: &Path) -> PathBuf {
    use sha2::{Digest, Sha256};
    let abs = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    let digest = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(RUN_DIR).join("stores").join(hex)
}

/// Makes sure [`RUN_DIR`] is on tmpfs (once per process; later calls return the first
/// outcome). Failure is not fatal for the caller: the state then lives on whatever is there.
pub fn ensure_tmpfs() -> Result<(), String> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let r = mount_once(Path::new(RUN_DIR)).map_err(|e| format!("{RUN_DIR}: {e}"));
        if let Err(e) = &r {
            tracing::warn!("volatile network state stays on disk: {e}");
        }
        r
    })
    .clone()
}

fn is_tmpfs(p: &Path) -> io::Result<bool> {
    Ok(statfs(p).map_err(io::Error::from)?.filesystem_type() == TMPFS_MAGIC)
}

fn mount_once(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if is_tmpfs(dir)? {
        return Ok(());
    }
    // Two processes must not both mount (the second would hide the first's records): the
    // check and the mount happen under a lock file next to the directory.
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.with_extension("lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))?;
    if is_tmpfs(dir)? {
        return Ok(());
    }
    // Anything already under the directory (from before this boot's mount) would be hidden:
    // it describes namespaces of an earlier boot, and the records of a live one cannot exist
    // here yet (this runs before the first ADD of the boot).
    mount(
        Some("caisson-net"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64m"),
    )
    .map_err(io::Error::from)?;
    tracing::info!(
        "mounted a tmpfs at {} for volatile network state",
        dir.display()
    );
    Ok(())
}
