//! On-disk records of a task: `<root>/containers/<id>/{config.json,state.json,stdout.log,
//! stderr.log,shim.log,etc/,sandbox/}`. Every JSON file is written atomically (tmp + rename).
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::spec::TaskSpec;
use crate::cgroups::Usage;

/// Life cycle of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Recorded, supervisor starting.
    Created,
    /// The task's init has exec'd.
    Running,
    /// The task ran and exited (or was killed).
    Exited,
    /// The launch failed before exec.
    Failed,
    /// The supervisor vanished without recording the task's fate.
    Lost,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Exited | Status::Failed | Status::Lost)
    }
}

/// Per-phase launch timings in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Root filesystem preparation by the caller, if any.
    pub rootfs_us: Option<u64>,
    /// Network namespace and CNI attachments by the caller, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_us: Option<u64>,
    /// With the network gate: how long the supervisor waited for the CNI ADD after the init's
    /// cgroup move (the part of `network_us` not overlapped with the setup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_wait_us: Option<u64>,
    /// The launcher's bookkeeping: validation, task directory, records, generated /etc files.
    #[serde(default)]
    pub prepare_us: u64,
    /// Spawning the supervisor (fork + exec) until its `main`.
    pub spawn_us: u64,
    /// Cgroup creation and limits.
    pub cgroup_us: u64,
    /// clone3 with the new namespaces until the task's init runs.
    pub namespaces_us: u64,
    /// Moving the init into its cgroups (v1: one `cgroup.procs` write per hierarchy; the first
    /// migration waits for an RCU grace period). Done by the supervisor while the init does its
    /// mounts (overlapped with `mounts_us`). Zero with `CLONE_INTO_CGROUP`.
    #[serde(default)]
    pub cgroup_join_us: u64,
    /// Mounts, pivot_root, /proc, /dev, /sys, volumes, masked paths, hostname, user, caps,
    /// seccomp (and waiting for the cgroup move, if it takes longer).
    pub mounts_us: u64,
    /// Final exec until the supervisor sees it succeed.
    pub exec_us: u64,
    /// Launcher start to the task running.
    pub total_us: u64,
    /// The init was born in its cgroup (clone3 `CLONE_INTO_CGROUP`, cgroup v2) rather than
    /// joining it before its setup (v1).
    #[serde(default)]
    pub clone_into_cgroup: bool,
    /// The task took a warm sandbox ([`super::sandbox`]): its root, namespaces and mounts were
    /// made before the launch, which then only handed the task over.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_sandbox: bool,
}

/// The mutable state of a task, written by the supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub status: Status,
    /// The task's init pid on the host.
    pub pid: Option<i32>,
    /// The supervisor's pid and its start time (clock ticks since boot, from /proc), so that a
    /// reused pid is not mistaken for it.
    pub shim_pid: Option<i32>,
    pub shim_start_ticks: Option<u64>,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Exit code as a shell reports it (128+signal when killed by a signal).
    pub exit_code: Option<i32>,
    /// The signal that killed the task.
    pub signal: Option<i32>,
    /// The task was OOM killed.
    pub oom_killed: bool,
    /// Why the task ended, when it is not a plain exit: "memory limit", "launch failed", ...
    pub reason: Option<String>,
    /// The launch error, when status is failed.
    pub error: Option<String>,
    pub usage: Option<Usage>,
    pub timings: Timings,
    /// The task's cgroup directories.
    pub cgroup_paths: Vec<PathBuf>,
}

impl TaskState {
    pub fn created(now_ms: u64) -> Self {
        TaskState {
            status: Status::Created,
            pid: None,
            shim_pid: None,
            shim_start_ticks: None,
            created_ms: now_ms,
            started_ms: None,
            finished_ms: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            reason: None,
            error: None,
            usage: None,
            timings: Timings::default(),
            cgroup_paths: vec![],
        }
    }
}

/// The immutable record of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub spec: TaskSpec,
    /// `CLOCK_MONOTONIC` at the launcher's start, in ns (for the timings).
    pub launch_started_ns: u64,
    /// The pid of the agent's shared Wasm host (`crate::wasm::host`) when it runs the task
    /// (instead of a supervisor of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_host_pid: Option<i32>,
    /// With `wasm_host_pid`: the host's start (clock ticks after boot; a reused pid is not
    /// taken for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_host_start_ticks: Option<u64>,
    /// With `wasm_host_pid`: when the host took the task (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_host_since_ms: Option<u64>,
}

/// Paths of one task's directory.
#[derive(Debug, Clone)]
pub struct TaskDir {
    pub dir: PathBuf,
}

impl TaskDir {
    pub fn new(dir: PathBuf) -> Self {
        TaskDir { dir }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn stdout_log(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }
    pub fn stderr_log(&self) -> PathBuf {
        self.dir.join("stderr.log")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    pub fn sandbox(&self) -> PathBuf {
        self.dir.join("sandbox")
    }

    /// The state root this task's directory is in (`<root>/containers/<id>`).
    pub fn state_root(&self) -> Option<&Path> {
        self.dir.parent().and_then(Path::parent)
    }

    /// `<root>/names/<name>`: the name index entry (holds the id) that makes names unique.
    pub fn name_file(&self, name: &str) -> PathBuf {
        let root = self.state_root().unwrap_or(Path::new("/"));
        root.join("names").join(name)
    }

    /// Removes the name index entry of this task, if it still points to `id`.
    pub fn release_name(&self, name: &str, id: &str) {
        let f = self.name_file(name);
        if fs::read_to_string(&f).is_ok_and(|s| s == id) {
            let _ = fs::remove_file(f);
        }
    }

    pub fn read_config(&self) -> std::io::Result<TaskConfig> {
        read_json(&self.config())
    }
    pub fn write_config(&self, c: &TaskConfig) -> std::io::Result<()> {
        write_json_atomic(&self.config(), c)
    }
    /// The task's state. A task of the shared Wasm host has no `state.json` until it ends
    /// (one file written per task instead of two, on that host's hot path): until then its
    /// config stands for "running in the host", as a supervised task's running record does.
    pub fn read_state(&self) -> std::io::Result<TaskState> {
        match read_json(&self.state()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.running_in_shared_host().ok_or(e)
            }
            r => r,
        }
    }

    fn running_in_shared_host(&self) -> Option<TaskState> {
        let c = self.read_config().ok()?;
        let since = c.wasm_host_since_ms?;
        let mut st = TaskState::created(since);
        st.status = Status::Running;
        st.shim_pid = Some(c.wasm_host_pid?);
        st.shim_start_ticks = c.wasm_host_start_ticks;
        st.started_ms = Some(since);
        Some(st)
    }
    pub fn write_state(&self, s: &TaskState) -> std::io::Result<()> {
        write_json_atomic(&self.state(), s)
    }

    /// Creates the temporary file this process's next [`TaskDir::write_state`] will use, so
    /// that the write itself allocates no inode (on ext4 without a journal a new inode means a
    /// scan for recently deleted ones: milliseconds on a busy disk). Call it off the critical
    /// path, e.g. while the task runs, before the write of its exit.
    pub fn prepare_state_write(&self) {
        let _ = fs::File::create(tmp_path(&self.state()));
    }

    /// Rewrites the config and state of a directory nobody else reads yet (a warm sandbox's,
    /// before it is renamed into `containers/`) in place: no new inode, no rename.
    pub(super) fn write_records_in_place(
        &self,
        c: &TaskConfig,
        s: &TaskState,
    ) -> std::io::Result<()> {
        write_in_place(&self.config(), &pretty(c)?)?;
        write_in_place(&self.state(), &pretty(s)?)
    }
}

/// The reason of a task whose records are there but do not parse ([`crate::launch::Runtime::info`]).
pub const RECORD_UNREADABLE: &str = "record unreadable";

/// The state of a task whose records do not parse: lost, created when its directory last
/// changed, `why` as its error.
pub(crate) fn unreadable_record(td: &TaskDir, why: String) -> TaskState {
    let created_ms = fs::metadata(&td.dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    TaskState {
        status: Status::Lost,
        reason: Some(RECORD_UNREADABLE.into()),
        error: Some(why),
        ..TaskState::created(created_ms)
    }
}

/// Removes every name index entry that holds `id` (for a task whose config, and so its name,
/// cannot be read).
pub(crate) fn release_names_of(root: &Path, id: &str) {
    remove_claims(&root.join("names"), |held| held == id);
}

/// Removes the files of `dir` (claims: name entries, user-namespace slots) whose text `holds`
/// says belong to whom is being released.
pub(crate) fn remove_claims(dir: &Path, holds: impl Fn(&str) -> bool) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if fs::read_to_string(e.path()).is_ok_and(|text| holds(&text)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// How old something a launch makes before its task exists (a name entry, a namespace, a
/// network attachment) must be, with no task, before it counts as left by a launch that died
/// half-way: longer than a launch (CNI ADD included) can take. `CAISSON_ORPHAN_GRACE_SECS`
/// overrides (default 120).
pub fn orphan_grace() -> std::time::Duration {
    let secs = std::env::var("CAISSON_ORPHAN_GRACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    std::time::Duration::from_secs(secs)
}

/// Whether `path` was last modified before the host booted (`btime` in /proc/stat): what it
/// says of processes and tasks died with that boot.
pub(crate) fn written_before_boot(path: &Path) -> bool {
    let boot = fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|t| t.trim().parse::<u64>().ok())
    });
    let modified = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    matches!((boot, modified), (Some(b), Some(m)) if m.as_secs() < b)
}

/// Whether the name index entry `entry` of `root` holds its name for nobody: no task
/// directory of the id it holds (or it holds none: emptied by a host crash, as entries are not
/// fsynced), and it was written before this boot or longer ago than [`orphan_grace`] (a
/// launch claims the name just before it makes the task's directory, so a young one may be a
/// launch in progress).
fn stale_name(root: &Path, entry: &Path) -> bool {
    let held = fs::read_to_string(entry).unwrap_or_default();
    let valid_id = !held.is_empty() && held.bytes().all(|b| b.is_ascii_alphanumeric());
    if valid_id && root.join("containers").join(&held).exists() {
        return false;
    }
    let old = fs::metadata(entry)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age >= orphan_grace());
    old || written_before_boot(entry)
}

/// Removes the name index entry `entry` if it is stale ([`stale_name`]), judged again under a
/// lock (`<root>/locks/names.lock`): two launchers taking over the same entry at once must not
/// remove each other's new one. True if it was removed.
pub(crate) fn take_over_stale_name(root: &Path, entry: &Path) -> bool {
    let locks = root.join("locks");
    let lock = fs::create_dir_all(&locks).and_then(|()| {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(locks.join("names.lock"))
    });
    let Ok(lock) = lock else { return false };
    let Ok(_held) = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive) else {
        return false;
    };
    stale_name(root, entry) && fs::remove_file(entry).is_ok()
}

fn pretty<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    serde_json::to_vec_pretty(value)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let data = fs::read(path)?;
    serde_json::from_slice(&data)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Creates `<root>/containers` and `<root>/rootfs` (once per process and root) and marks them
/// so that the task directories made in them spread over the file system's block groups
/// ([`crate::sys::fsflags`]: on an ext4 without a journal, thousands of tasks made and removed
/// in one group made every new file slower).
pub fn prepare_state_dirs(root: &Path) -> std::io::Result<()> {
    static PREPARED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut prepared = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
    if prepared.iter().any(|p| p == root) {
        return Ok(());
    }
    for d in ["containers", "rootfs"] {
        let dir = root.join(d);
        fs::create_dir_all(&dir)?;
        // Only a placement hint: a file system without it (tmpfs, xfs) is as good.
        if let Err(e) = crate::sys::fsflags::mark_top_dir(&dir) {
            tracing::debug!("marking {} as a top directory: {e}", dir.display());
        }
    }
    prepared.push(root.to_path_buf());
    Ok(())
}

/// Writes `value` as JSON to `path` atomically: a temporary file in the same directory, then
/// put in the target's place ([`replace_with`]).
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let data = pretty(value)?;
    let tmp = tmp_path(path);
    write_in_place(&tmp, &data)?;
    replace_with(&tmp, path)
}

/// Writes `data` to `path` (created if missing) without truncating it first, then cuts it to
/// length. On ext4 a file truncated to zero is flushed to disk when closed (`auto_da_alloc`):
/// its blocks are allocated at once, and on a file system mounted `discard` freeing them
/// later is a synchronous discard. A record written and deleted within seconds then never
/// touches the disk at all.
pub(crate) fn write_in_place(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all(data)?;
    f.set_len(data.len() as u64)
}

/// Puts `tmp` in `path`'s place atomically. An existing one is exchanged, then unlinked, rather
/// than renamed over: ext4 flushes a file renamed over another to disk at once
/// (`auto_da_alloc`, as [`write_in_place`] says). A plain rename on a file system without
/// these `renameat2` flags.
pub(crate) fn replace_with(tmp: &Path, path: &Path) -> std::io::Result<()> {
    use crate::sys::{rename2, Rename};
    // The first record of a task (a launch's, the shared Wasm host's) is the common case on
    // the hot paths: one call then.
    match rename2(tmp, path, Rename::NoReplace) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(_) => return fs::rename(tmp, path),
    }
    match rename2(tmp, path, Rename::Exchange) {
        Ok(()) => {
            // A reader holding the old one open keeps it until it closes it.
            let _ = fs::remove_file(tmp);
            Ok(())
        }
        Err(_) => fs::rename(tmp, path),
    }
}

/// Unmounts (lazily) and deletes the host paths a task owns; errors are logged, not returned,
/// so that one stuck path does not keep the rest alive.
pub fn cleanup_owned(paths: &[PathBuf]) {
    for p in paths {
        // rootfs::remove unmounts everything mounted at or below the path (an overlay root is
        // mounted at `<dir>/merged`), deepest first, then deletes without following symlinks.
        let res = match fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => crate::image::rootfs::remove(p).map_err(|e| e.to_string()),
            Ok(_) => fs::remove_file(p).map_err(|e| e.to_string()),
            Err(_) => Ok(()),
        };
        if let Err(e) = res {
            tracing::warn!("removing {}: {e}", p.display());
        }
    }
}

/// Unmounts everything mounted at or below `dir` (deepest first, lazily if busy), from the
/// mount table of this process. Best effort.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        if crate::sys::mount::unmount(&p, false).is_err() {
            let _ = crate::sys::mount::unmount(&p, true);
        }
    }
}

/// Mount points in mountinfo escape space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if the process `pid` exists, is not a zombie, and started at `ticks` (when known).
pub fn process_alive(pid: i32, ticks: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let rest = &stat[close + 2..];
    if rest.starts_with('Z') || rest.starts_with('X') {
        return false;
    }
    match ticks {
        Some(t) => rest.split_whitespace().nth(19).and_then(|s| s.parse().ok()) == Some(t),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_whole_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        write_json_atomic(&path, &vec!["a long first record"; 8]).unwrap();
        // A reader of the old record keeps reading it whole.
        let held = fs::File::open(&path).unwrap();
        write_json_atomic(&path, &vec!["b"]).unwrap();
        assert_eq!(read_json::<Vec<String>>(&path).unwrap(), ["b"]);
        let old: Vec<String> = serde_json::from_reader(held).unwrap();
        assert_eq!(old.len(), 8);
        // A leftover temporary file (a prepared one, or a killed writer's) is overwritten,
        // not appended to.
        fs::write(tmp_path(&path), "x".repeat(4096)).unwrap();
        write_json_atomic(&path, &vec!["c"]).unwrap();
        assert_eq!(read_json::<Vec<String>>(&path).unwrap(), ["c"]);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["r.json"]);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape_mountinfo("/tab\\011x\\134"), "/tab\tx\\");
        assert_eq!(unescape_mountinfo("/plain\\"), "/plain\\");
    }

    #[test]
    fn atomic_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let td = TaskDir::new(dir.path().to_path_buf());
        let mut s = TaskState::created(5);
        s.status = Status::Exited;
        s.exit_code = Some(3);
        td.write_state(&s).unwrap();
        assert_eq!(td.read_state().unwrap(), s);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn state_dirs_spread_over_block_groups_on_ext4() {
        // /var/tmp: on disk (ext4 on our machines), where /tmp may be a tmpfs elsewhere.
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        prepare_state_dirs(dir.path()).unwrap();
        let fs_type = nix::sys::statfs::statfs(dir.path())
            .unwrap()
            .filesystem_type();
        let ext4 = fs_type == nix::sys::statfs::EXT4_SUPER_MAGIC;
        for d in ["containers", "rootfs"] {
            let p = dir.path().join(d);
            assert!(p.is_dir(), "{d} not made");
            let top = crate::sys::fsflags::is_top_dir(&p).unwrap();
            assert!(top || !ext4, "{d} on ext4 without FS_TOPDIR_FL");
        }
        if !ext4 {
            // Our CI machines keep /var/tmp on ext4: there the check must happen, not pass.
            assert!(
                std::env::var_os("CI").is_none(),
                "CI=true: /var/tmp is not ext4 ({fs_type:?}), FS_TOPDIR_FL cannot be checked"
            );
            eprintln!("/var/tmp is not ext4 ({fs_type:?}): the flag is not checked");
        }
        // Once per process and root: a second call neither fails nor redoes the work.
        prepare_state_dirs(dir.path()).unwrap();
    }

    #[test]
    fn own_process_is_alive() {
        let me = std::process::id() as i32;
        let t = process_start_ticks(me);
        assert!(t.is_some());
        assert!(process_alive(me, t));
        assert!(!process_alive(me, t.map(|t| t + 1)));
    }
}
