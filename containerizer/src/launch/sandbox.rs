//! Warm sandboxes: everything of a native launch that does not depend on the task, done ahead.
//!
//! A long-running launcher (the agent, `caisson bench launch --warm-sandboxes`) asks for
//! sandboxes of one image: [`super::Runtime::with_warm_sandboxes`]. For each, the launcher
//! mounts the image's overlay root under `<root>/rootfs/<sid>`, writes a provisional task
//! directory `<root>/sandboxes/<sid>` and (v1) creates the cgroup, then starts
//! `caisson-shim --sandbox DIR`. That supervisor clones the init into new pid, mount, uts, ipc
//! and net namespaces and moves it into the cgroup; the init does every mount, pivot_root and
//! the old root's detach, masks /proc and /sys and brings up loopback, then waits (`W` on the
//! status pipe). The supervisor says `ready` and waits for one line on stdin.
//!
//! A launch whose spec fits ([`fits`]: the same image, no volumes, mounts, devices, hooks,
//! console, CNI network, read-only root, cpu or pids limits) takes a ready sandbox: the
//! launcher renames the sandbox directory to `containers/<id>` and each v1 cgroup directory to
//! the task's id (one rename each), writes the task's /etc files in place (they are bind
//! mounted already), its memory limit and its records, and hands the directory over
//! (`TASK_DIR<TAB>SPAWNED_NS`, as to a standby supervisor). The supervisor sends the final spec
//! to the init, which sets the hostname, resolves the user, drops capabilities, sets
//! `no_new_privs` and seccomp and execs; from there it is an ordinary task (same records,
//! protocol, `ps`/`inspect`/`rm`, exit status in `state.json` after a launcher's `kill -9`).
//!
//! Each sandbox serves one task. EOF on the supervisor's stdin before a handover (the `Runtime`
//! dropped, its owner gone, `kill -9` included) makes it kill its init and remove the cgroup,
//! the overlay and the directory.
//!
//! A task without an id of its own takes the sandbox's (its cgroup, hostname, /etc files and
//! name index entry are then ready as they are). One with its own id gets the sandbox's
//! cgroup renamed on v1 and hybrid hosts; on pure v2, where a cgroup cannot be renamed, its
//! cgroup is created and the waiting init moved into it ([`cgroup_handover`]). On v2 a
//! sandbox's task has no cgroup namespace of its own (a cold one has).
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::waitpid;
use nix::unistd::Pid;

use super::child::{self, ChildArgs};
use super::shim::{open_log, supervise, Supervised};
use super::spec::{NetworkMode, Process, TaskSpec};
use super::state::{self, now_ms, process_start_ticks, TaskConfig, TaskDir, TaskState, Timings};
use super::{io_err, LaunchError};
use crate::cgroups::{Limits, TaskCgroup};
use crate::sys::launch::{self as sys, CloneResult};

/// The argument that starts a sandbox supervisor: `caisson-shim --sandbox DIR`.
pub const SANDBOX_ARG: &str = "--sandbox";

/// True if `spec` can run in a warm sandbox of `image`: what differs from the sandbox's
/// defaults would need setup that is done already (mounts, namespaces, cgroup hierarchies).
pub fn fits(spec: &TaskSpec, image: &str) -> bool {
    let l = &spec.limits;
    spec.image == image
        && spec.rootfs.as_os_str().is_empty()
        && spec.cleanup.is_empty()
        && spec.wasm.is_none()
        && !spec.readonly_rootfs
        && spec.volumes.is_empty()
        && spec.mounts.is_empty()
        && spec.devices.is_empty()
        && spec.hooks.is_empty()
        && spec.network == NetworkMode::None
        && spec.netns.is_none()
        && spec.network_release.is_none()
        && !spec.interactive
        && !spec.tty
        // Memory is in the hierarchies every task joins; cpu and pids are not.
        && l.cpus.is_none()
        && l.cpu_shares.is_none()
        && l.pids.is_none()
}

/// A sandbox ready for a task: its supervisor waits for the handover.
#[derive(Debug)]
pub(super) struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    /// `<root>/rootfs/<sid>`: the overlay's directory, the task's to clean up.
    pub owned: PathBuf,
    pub child: Child,
    pub stdin: ChildStdin,
    pub events: BufReader<ChildStdout>,
    /// What the sandbox's task files say.
    pub made: MadeFiles,
}

/// The generated files a sandbox was made with (`etc/hostname`, `etc/hosts`,
/// `etc/resolv.conf`, see [`super::write_task_files`]).
#[derive(Debug)]
pub(super) struct MadeFiles {
    hostname: String,
    resolv_conf: String,
}

impl MadeFiles {
    /// True if `spec`'s generated files are the ones made (its hostname, default hosts, the
    /// host's resolv.conf as it is now, no hooks' bundle): nothing to rewrite at its launch.
    pub fn files_fit(&self, spec: &TaskSpec) -> bool {
        spec.hostname == self.hostname
            && spec.hosts_file.is_none()
            && spec.hooks.is_empty()
            && spec.resolv_conf.as_ref().unwrap_or(&host_resolv_conf()) == &self.resolv_conf
    }
}

/// The host's resolv.conf, as a task without networks gets it.
fn host_resolv_conf() -> String {
    fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
}

/// `<sandbox dir>/name`: the name index entry made ahead (it holds the sandbox's id; linked
/// into the index when a task takes the id, see `Runtime::admit_with`).
pub(super) fn name_file(dir: &Path) -> PathBuf {
    dir.join("name")
}

impl Sandbox {
    /// Tears an unused sandbox down: EOF makes its supervisor remove everything; waits for it.
    fn discard(self) {
        let Sandbox {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let _ = child.wait();
    }
}

/// The ready sandboxes of one image, shared by a runtime's clones.
#[derive(Debug)]
pub(super) struct Pool {
    pub image: String,
    pub want: usize,
    ready: Mutex<VecDeque<Sandbox>>,
    /// Held while making sandboxes, so that concurrent fills do not overshoot `want`.
    making: Mutex<()>,
    /// A background refill is running.
    filling: AtomicBool,
    /// Refill in the background after each launch (else [`super::Runtime::fill_sandboxes`]).
    pub refill: AtomicBool,
}

impl Pool {
    pub fn new(image: String, want: usize) -> Self {
        Pool {
            image,
            want,
            ready: Mutex::new(VecDeque::new()),
            making: Mutex::new(()),
            filling: AtomicBool::new(false),
            refill: AtomicBool::new(true),
        }
    }

    pub fn ready(&self) -> usize {
        self.ready.lock().map_or(0, |r| r.len())
    }

    /// A ready sandbox whose supervisor is still there.
    pub fn take(&self) -> Option<Sandbox> {
        loop {
            let mut sb = self.ready.lock().ok()?.pop_front()?;
            match sb.child.try_wait() {
                Ok(None) => return Some(sb),
                _ => {
                    let _ = sb.child.wait();
                    state::cleanup_owned(&[sb.owned.clone(), sb.dir.clone()]);
                }
            }
        }
    }

    /// Makes sandboxes until `want` are ready (or one fails: returns its error).
    pub fn fill(&self, root: &Path, shim: &Path) -> Result<(), LaunchError> {
        let _making = self.making.lock().unwrap_or_else(|e| e.into_inner());
        while self.ready() < self.want {
            let sb = make(root, shim, &self.image)?;
            match self.ready.lock() {
                Ok(mut r) => r.push_back(sb),
                Err(_) => sb.discard(),
            }
        }
        Ok(())
    }

    /// [`Pool::fill`] on a background thread (one at a time). The thread holds the pool only
    /// while it makes a sandbox, so that dropping the runtime tears the pool down at once.
    pub fn fill_in_background(self: &Arc<Self>, root: &Path, shim: &Path) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (weak, root, shim) = (Arc::downgrade(self), root.to_path_buf(), shim.to_path_buf());
        let spawned = std::thread::Builder::new()
            .name("sandbox-fill".into())
            .spawn(move || {
                sweep_stale(&root, Duration::from_secs(60));
                while let Some(pool) = weak.upgrade() {
                    // Held until the sandbox is in the pool, so that a concurrent fill counts it.
                    let _making = pool.making.lock().unwrap_or_else(|e| e.into_inner());
                    // Refills turned off (the caller fills): stop here too.
                    if pool.ready() >= pool.want || !pool.refill.load(Ordering::Acquire) {
                        pool.filling.store(false, Ordering::Release);
                        return;
                    }
                    match make(&root, &shim, &pool.image) {
                        Ok(sb) => match pool.ready.lock() {
                            Ok(mut r) => r.push_back(sb),
                            Err(_) => sb.discard(),
                        },
                        Err(e) => {
                            tracing::warn!("making a warm sandbox of {}: {e}", pool.image);
                            pool.filling.store(false, Ordering::Release);
                            return;
                        }
                    }
                }
            });
        if spawned.is_err() {
            self.filling.store(false, Ordering::Release);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(r) = self.ready.get_mut() {
            for sb in r.drain(..) {
                sb.discard();
            }
        }
    }
}

/// Removes sandboxes a launcher left while making them (killed between the cgroup and the
/// supervisor's start): directories under `<root>/sandboxes` older than `min_age` whose cgroup
/// holds no process (a waiting sandbox's holds its init). Returns how many went.
pub(super) fn sweep_stale(root: &Path, min_age: Duration) -> usize {
    let Ok(rd) = fs::read_dir(root.join("sandboxes")) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    let mut swept = 0;
    for e in rd.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|a| a >= min_age);
        let td = TaskDir::new(e.path());
        let Ok(cfg) = td.read_config() else { continue };
        let cg = TaskCgroup::load(&cfg.spec.id);
        if !old || !cg.pids().is_empty() {
            continue;
        }
        let _ = cg.destroy(Duration::from_secs(1));
        state::cleanup_owned(&cfg.spec.cleanup);
        let _ = fs::remove_dir_all(e.path());
        swept += 1;
    }
    swept
}

/// Makes one sandbox of `image` (in the store under `root`): overlay, provisional task
/// directory, cgroup, supervisor; returns once its init waits for a task.
pub(super) fn make(root: &Path, shim: &Path, image: &str) -> Result<Sandbox, LaunchError> {
    let _ = crate::cgroups::favor_dynamic_modifications();
    let sid = super::new_id();
    let owned = root.join("rootfs").join(&sid);
    let dir = root.join("sandboxes").join(&sid);
    let made = (|| {
        let rootfs = make_rootfs(root, image, &owned)?;
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let td = TaskDir::new(dir.clone());
        let short: String = sid.chars().take(12).collect();
        // What a launch needs of the state root, made ahead (see `Runtime::admit_with`).
        for d in [root.join("containers"), root.join("names")] {
            fs::create_dir_all(&d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        fs::write(name_file(&dir), &sid).map_err(io_err("writing the name index entry"))?;
        let made_files = MadeFiles {
            hostname: short.clone(),
            resolv_conf: host_resolv_conf(),
        };
        let spec = TaskSpec {
            id: sid.clone(),
            name: short.clone(),
            image: image.to_string(),
            rootfs: rootfs.clone(),
            cleanup: vec![owned.clone()],
            process: Process {
                args: vec!["/bin/true".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
            },
            hostname: short,
            resolv_conf: Some(made_files.resolv_conf.clone()),
            ..Default::default()
        };
        super::write_task_files(&td, &spec)?;
        td.write_state(&TaskState::created(now_ms()))
            .map_err(io_err("writing the state"))?;
        td.write_config(&TaskConfig {
            spec,
            launch_started_ns: sys::monotonic_ns(),
            wasm_host_pid: None,
            wasm_host_start_ticks: None,
            wasm_host_since_ms: None,
        })
        .map_err(io_err("writing the config"))?;
        TaskCgroup::create(&sid, &Limits::default())?;
        let log = File::create(td.shim_log()).map_err(io_err("creating shim.log"))?;
        let mut child = super::guard::shim_command(shim)
            .arg(SANDBOX_ARG)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(io_err(format!("starting {}", shim.display())))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let mut events = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let _ = events.read_line(&mut line);
        if line.trim_end() == "ready" {
            return Ok(Sandbox {
                id: sid.clone(),
                dir: dir.clone(),
                rootfs,
                owned: owned.clone(),
                child,
                stdin,
                events,
                made: made_files,
            });
        }
        drop(stdin);
        let _ = child.wait();
        let log = fs::read_to_string(td.shim_log()).unwrap_or_default();
        Err(LaunchError::Shim(format!(
            "sandbox supervisor: {} {}",
            line.trim(),
            log.trim()
        )))
    })();
    if made.is_err() {
        let _ = TaskCgroup::load(&sid).destroy(Duration::from_secs(5));
        state::cleanup_owned(&[owned, dir]);
    }
    made
}

fn make_rootfs(root: &Path, image: &str, owned: &Path) -> Result<PathBuf, LaunchError> {
    use crate::image::{rootfs, Store};
    let bad = |e: crate::image::Error| LaunchError::Invalid(format!("image {image}: {e}"));
    let store = Store::open(root).map_err(bad)?;
    let record = store.resolve(image).map_err(bad)?;
    fs::create_dir_all(owned).map_err(io_err(format!("creating {}", owned.display())))?;
    let backend = rootfs::Backend::preferred();
    let opts = rootfs::CreateOptions::task_root();
    Ok(store
        .create_rootfs(&record, owned, backend, &opts)
        .map_err(bad)?
        .path)
}

/// How a sandbox's cgroup becomes its task's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CgroupHandover {
    /// The task took the sandbox's id: its cgroup already is the task's.
    Keep,
    /// v1 and hybrid: one rename per hierarchy ([`rename_cgroup`]).
    Rename,
    /// Pure v2, where a cgroup cannot be renamed: the task's is created and the waiting init
    /// moved into it ([`move_cgroup`]).
    Move,
}

/// The way for a task of id `id` in the sandbox `sid` on this cgroup layout.
pub(super) fn cgroup_handover(v2: bool, sid: &str, id: &str) -> CgroupHandover {
    match (sid == id, v2) {
        (true, _) => CgroupHandover::Keep,
        (false, false) => CgroupHandover::Rename,
        (false, true) => CgroupHandover::Move,
    }
}

/// Makes the cgroup of sandbox `sid` task `id`'s, the way [`cgroup_handover`] says.
pub(super) fn hand_over_cgroup(sid: &str, id: &str) -> Result<(), LaunchError> {
    match cgroup_handover(crate::cgroups::is_v2(), sid, id) {
        CgroupHandover::Keep => Ok(()),
        CgroupHandover::Rename => rename_cgroup(sid, id),
        CgroupHandover::Move => move_cgroup(sid, id),
    }
}

/// v2: creates task `id`'s cgroup, moves what the sandbox's holds (its waiting init) into it
/// and removes the sandbox's.
fn move_cgroup(sid: &str, id: &str) -> Result<(), LaunchError> {
    let from = TaskCgroup::open(sid, &Limits::default(), false)
        .ok_or_else(|| LaunchError::Shim(format!("the cgroup of sandbox {sid} is gone")))?;
    let to = TaskCgroup::create(id, &Limits::default())?;
    let moved = from.pids().into_iter().try_for_each(|pid| {
        to.procs_files()
            .iter()
            .try_for_each(|f| fs::write(f, pid.to_string()))
    });
    if let Err(e) = moved {
        for pid in to.pids() {
            for f in from.procs_files() {
                let _ = fs::write(f, pid.to_string());
            }
        }
        let _ = to.destroy(Duration::from_secs(1));
        return Err(io_err(format!(
            "moving sandbox {sid} into its task's cgroup"
        ))(e));
    }
    let _ = from.destroy(Duration::from_secs(1));
    Ok(())
}

/// Renames a sandbox's v1 cgroup directories from `sid` to `id` (same parent, one rename per
/// hierarchy); on failure renames back what was renamed.
fn rename_cgroup(sid: &str, id: &str) -> Result<(), LaunchError> {
    let dirs = TaskCgroup::open(sid, &Limits::default(), false)
        .map(|cg| cg.dirs())
        .ok_or_else(|| LaunchError::Shim(format!("the cgroup of sandbox {sid} is gone")))?;
    let mut done: Vec<(PathBuf, PathBuf)> = vec![];
    for d in dirs {
        let to = d.with_file_name(id);
        if let Err(e) = fs::rename(&d, &to) {
            for (from, to) in done.iter().rev() {
                let _ = fs::rename(to, from);
            }
            return Err(io_err(format!("renaming {}", d.display()))(e));
        }
        done.push((d, to));
    }
    Ok(())
}

/// `caisson-shim --sandbox DIR`: prepares the sandbox in DIR, waits for its task, supervises
/// it; returns the exit code. Call it first thing (it closes every inherited descriptor above
/// stderr).
pub fn main(dir: &Path) -> i32 {
    sys::close_from(3);
    let _ = nix::unistd::setsid();
    let mut out = std::io::stdout();
    let td = TaskDir::new(dir.to_path_buf());
    let cfg = match td.read_config() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(out, "failed 125 reading {}: {e}", td.config().display());
            return 1;
        }
    };
    let spec = &cfg.spec;
    // Unused (or failed before the handover): everything goes.
    let teardown = |pid: Option<i32>| {
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
        let _ = TaskCgroup::load(&spec.id).destroy(Duration::from_secs(5));
        state::cleanup_owned(&spec.cleanup);
        let _ = fs::remove_dir_all(dir);
    };
    let failed = |out: &mut std::io::Stdout, pid: Option<i32>, code: i32, msg: String| {
        let _ = writeln!(out, "failed {code} {}", msg.replace('\n', " "));
        let _ = out.flush();
        teardown(pid);
        1
    };
    let Some(cg) = TaskCgroup::open(&spec.id, &spec.limits, false) else {
        return failed(
            &mut out,
            None,
            125,
            "the sandbox's cgroup is missing".into(),
        );
    };
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
    let fds = (|| -> std::io::Result<_> {
        Ok((
            open_log(&td.stdout_log())?,
            open_log(&td.stderr_log())?,
            OwnedFd::from(File::open("/dev/null")?),
            pipe()?,
            pipe()?,
            // The init reads its task from our stdin (the launcher writes it there): one hop
            // less than through us, and our bookkeeping overlaps the init's.
            std::io::stdin().as_fd().try_clone_to_owned()?,
        ))
    })();
    let (stdout_fd, stderr_fd, devnull, (status_r, status_w), (go_r, go_w), claim_r) = match fds {
        Ok(f) => f,
        Err(e) => return failed(&mut out, None, 125, format!("opening files: {e}")),
    };
    let flags = (libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWNET) as u64;
    let pid = match sys::clone_fork(flags, None) {
        Ok(CloneResult::Child) => {
            drop((status_r, go_w));
            child::run(ChildArgs {
                userns_ready: None,
                spec,
                dir: &td,
                // The go comes right after the clone; waiting for it before the (absent)
                // createContainer hooks makes the init join its cgroup before its task.
                wait_for_cgroup: Some(go_r),
                wait_early: true,
                cgroup_ns: false,
                netns: None,
                sysfs: None,
                // No device cgroup for a sandbox's task (no devices beyond the minimal /dev):
                // CAP_MKNOD goes instead.
                device_cgroup: false,
                stdout: &stdout_fd,
                stderr: &stderr_fd,
                stdin: &devnull,
                terminal: None,
                status: status_w,
                claim: Some(claim_r),
            })
        }
        Ok(CloneResult::Parent(pid)) => pid,
        Err(e) => return failed(&mut out, None, 125, format!("clone: {e}")),
    };
    drop((status_w, go_r, claim_r, stdout_fd, stderr_fd, devnull));
    // Opened ahead, so free for the task: its namespaces outlive its init until the exit is
    // reported (see `Supervised::held_ns`).
    let held_ns: Vec<File> = ["mnt", "net", "ipc", "uts", "pid"]
        .iter()
        .filter_map(|n| File::open(format!("/proc/{pid}/ns/{n}")).ok())
        .collect();
    let joined = cg
        .procs_files()
        .iter()
        .try_for_each(|f| fs::write(f, pid.to_string()).map_err(|e| (f.clone(), e)));
    if let Err((f, e)) = joined {
        return failed(
            &mut out,
            Some(pid),
            125,
            format!("moving the init into {}: {e}", f.display()),
        );
    }
    let _ = File::from(go_w).write_all(b"1");
    let mut status = BufReader::new(File::from(status_r));
    let mut lines = StatusLines::default();
    lines.read_until(&mut status, 'W');
    if let Some((code, msg)) = lines.error.take() {
        return failed(&mut out, Some(pid), code, msg);
    }
    if lines.waiting.is_none() {
        return failed(&mut out, Some(pid), 125, "the init ended early".into());
    }
    // The task's first state write (moved along with the directory) allocates no inode.
    td.prepare_state_write();
    let me = std::process::id() as i32;
    let my_start_ticks = process_start_ticks(me);
    let _ = writeln!(out, "ready");
    let _ = out.flush();

    // The init's claim of a task (the launcher's handover), or its end: EOF on our stdin (the
    // sandbox unused) or a failure before it had a task.
    lines.read_until(&mut status, 'C');
    let Some(claim) = lines.claim.take() else {
        return match lines.error.take() {
            Some((_, msg)) if msg == child::UNUSED => {
                teardown(Some(pid));
                0
            }
            Some((code, msg)) => failed(&mut out, Some(pid), code, msg),
            None => failed(&mut out, Some(pid), 125, "the init ended early".into()),
        };
    };
    let td = TaskDir::new(claim.dir);
    // From here on the task's records say what happened; the launcher cleans up on failure.
    let kill_init = || {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        let _ = waitpid(Pid::from_raw(pid), None);
    };
    let task_cfg = match td.read_config() {
        Ok(c) => c,
        Err(e) => {
            kill_init();
            let _ = writeln!(out, "failed 125 reading {}: {e}", td.config().display());
            return 1;
        }
    };
    let tspec = &task_cfg.spec;
    let mut state = td
        .read_state()
        .unwrap_or_else(|_| TaskState::created(now_ms()));
    state.shim_pid = Some(me);
    state.shim_start_ticks = my_start_ticks;
    // The task took the sandbox's id (and so its cgroup), or the launcher renamed the cgroup.
    let cg = match tspec.id == spec.id {
        true => Some(cg),
        false => cg.renamed(&tspec.id),
    };
    let Some(cg) = cg else {
        kill_init();
        super::shim::launch_failed(
            &td,
            &tspec.id,
            &mut state,
            &mut out,
            125,
            "the task's cgroup is missing".into(),
        );
        return 1;
    };
    state.cgroup_paths = cg.dirs();
    lines.read_until(&mut status, '\0');
    let t_exec = sys::monotonic_ns();
    let t_mounts = lines.mounts.unwrap_or(t_exec);
    let timings = Timings {
        rootfs_us: tspec.rootfs_prepare_us,
        network_us: tspec.network_us,
        network_wait_us: None,
        prepare_us: claim.spawned_ns.saturating_sub(task_cfg.launch_started_ns) / 1000,
        // The handover to the waiting init.
        spawn_us: claim.at_ns.saturating_sub(claim.spawned_ns) / 1000,
        cgroup_us: 0,
        // Done ahead, in the sandbox.
        namespaces_us: 0,
        cgroup_join_us: 0,
        // What is left for the init: hostname, user, capabilities, seccomp.
        mounts_us: t_mounts.saturating_sub(claim.at_ns) / 1000,
        exec_us: t_exec.saturating_sub(t_mounts) / 1000,
        total_us: t_exec.saturating_sub(task_cfg.launch_started_ns) / 1000,
        clone_into_cgroup: false,
        warm_sandbox: true,
    };
    supervise(Supervised {
        td: &td,
        cfg: &task_cfg,
        state,
        timings,
        pid,
        cg,
        held_ns,
        netns: None,
        error: lines.error,
        console: None,
    })
}

/// The init's status lines (see [`child`]): `S`, `W`, `M` times, the `C` claim and an `E`
/// error.
#[derive(Default)]
struct StatusLines {
    waiting: Option<u64>,
    mounts: Option<u64>,
    claim: Option<Claim>,
    error: Option<(i32, String)>,
}

/// `C <ns> <spawned ns> <task dir>`: the init has its task (when, the launcher's time of the
/// handover, the task's directory).
struct Claim {
    at_ns: u64,
    spawned_ns: u64,
    dir: PathBuf,
}

impl Claim {
    fn parse(rest: &str) -> Option<Claim> {
        let mut it = rest.splitn(3, ' ');
        Some(Claim {
            at_ns: it.next()?.parse().ok()?,
            spawned_ns: it.next()?.parse().ok()?,
            dir: PathBuf::from(it.next().filter(|d| !d.is_empty())?),
        })
    }
}

impl StatusLines {
    /// Reads lines until one of kind `stop` (or EOF, or an error).
    fn read_until(&mut self, r: &mut impl BufRead, stop: char) {
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.strip_suffix('\n').unwrap_or(&line);
            if let Some(rest) = line.strip_prefix("C ") {
                self.claim = Claim::parse(rest);
                if self.claim.is_none() {
                    self.error = Some((125, format!("bad claim line {line:?}")));
                }
                if stop == 'C' {
                    return;
                }
                continue;
            }
            let mut it = line.splitn(3, ' ');
            let (kind, a, b) = (it.next(), it.next(), it.next());
            let t = a.and_then(|t| t.parse().ok());
            match kind {
                Some("W") => self.waiting = t,
                Some("M") => self.mounts = t,
                Some("E") => {
                    let code = a.and_then(|c| c.parse().ok()).unwrap_or(125);
                    self.error = Some((code, b.unwrap_or("").to_string()));
                    return;
                }
                _ => {}
            }
            if kind.and_then(|k| k.chars().next()) == Some(stop) {
                return;
            }
        }
    }
}

/// Reads the supervisor's first reply after a handover (`started PID` or `failed ...`).
pub(super) fn first_reply(events: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    let _ = events.read_line(&mut line);
    line.trim_end().to_string()
}

/// Reads whatever is left (used when a handover failed).
pub(super) fn drain(events: &mut BufReader<ChildStdout>) {
    let mut sink = Vec::new();
    let _ = events.read_to_end(&mut sink);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_default_options_fit() {
        let base = TaskSpec {
            image: "img".into(),
            limits: Limits {
                memory: Some(64 << 20),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(fits(&base, "img"));
        assert!(!fits(&base, "other"));
        let no = |f: &dyn Fn(&mut TaskSpec)| {
            let mut s = base.clone();
            f(&mut s);
            !fits(&s, "img")
        };
        assert!(no(&|s| s.rootfs = "/r".into()));
        assert!(no(&|s| s.readonly_rootfs = true));
        assert!(no(&|s| s.limits.cpus = Some(1.0)));
        assert!(no(&|s| s.limits.pids = Some(5)));
        assert!(no(&|s| s.network = NetworkMode::Host));
        assert!(no(&|s| s.netns = Some("/run/netns/x".into())));
        assert!(no(&|s| s.interactive = true));
        assert!(no(&|s| s.mounts.push(Default::default())));
    }

    #[test]
    fn claim_lines_parse() {
        let c = Claim::parse("12 7 /var/lib/caisson/containers/a b").unwrap();
        assert_eq!((c.at_ns, c.spawned_ns), (12, 7));
        assert_eq!(c.dir, Path::new("/var/lib/caisson/containers/a b"));
        assert!(Claim::parse("12 7 ").is_none());
        assert!(Claim::parse("x 7 /d").is_none());
    }

    #[test]
    fn a_sandbox_cgroup_is_kept_renamed_or_moved() {
        use CgroupHandover::*;
        // The sandbox's own id: nothing to do, on any layout.
        assert_eq!(cgroup_handover(false, "s1", "s1"), Keep);
        assert_eq!(cgroup_handover(true, "s1", "s1"), Keep);
        // Another id: a rename on v1/hybrid, a new cgroup and a move on pure v2.
        assert_eq!(cgroup_handover(false, "s1", "t1"), Rename);
        assert_eq!(cgroup_handover(true, "s1", "t1"), Move);
    }
}
