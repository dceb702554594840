//! The task's init between clone and exec: it runs in the new namespaces, as a fork of the
//! single-threaded supervisor, and never returns. It reports progress and errors to the
//! supervisor over a close-on-exec pipe, as lines: `S <ns>` (started in the namespaces),
//! `M <ns>` (setup done, about to exec), `E <code> <message>` (failed; exit code to report).
//! EOF without `E` means exec succeeded.
use std::collections::VecDeque;
use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, umask, Mode, SFlag};
use nix::unistd::{self, Gid, Uid};

use super::spec::{NetworkMode, TaskSpec, SANDBOX_TARGET};
use super::state::TaskDir;
use crate::sys::launch as sys;

/// Docker's default capability set.
pub const DEFAULT_CAPS: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];
pub(super) const CAP_MKNOD: u32 = 27;

/// Paths masked like docker does (files get /dev/null, directories an empty read-only tmpfs),
/// each with whether it is a directory on the kernels that have it (a fresh /proc or /sys is
/// the kernel's, not the image's), so that masking is one mount, not a stat first; a path the
/// kernel does not have fails that mount with ENOENT and is skipped.
pub const MASKED_PATHS: &[(&str, bool)] = &[
    ("/proc/acpi", true),
    ("/proc/asound", true),
    ("/proc/kcore", false),
    ("/proc/keys", false),
    ("/proc/latency_stats", false),
    ("/proc/timer_list", false),
    ("/proc/timer_stats", false),
    ("/proc/sched_debug", false),
    ("/proc/scsi", true),
    ("/sys/firmware", true),
    ("/sys/devices/virtual/powercap", true),
];

/// Paths made read-only like docker does.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Error of the setup, with the exit code to report (podman's convention: 125 runtime error,
/// 126 cannot invoke, 127 not found).
#[derive(Debug)]
pub struct ChildError {
    pub code: i32,
    pub message: String,
}

fn fail(code: i32, message: impl Into<String>) -> ChildError {
    ChildError {
        code,
        message: message.into(),
    }
}

trait Ctx<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ChildError>;
}
impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, ChildError> {
        self.map_err(|e| fail(125, format!("{}: {e}", what())))
    }
}

/// What the init needs besides the spec.
pub struct ChildArgs<'a> {
    pub spec: &'a TaskSpec,
    pub dir: &'a TaskDir,
    /// Unless born in its cgroup (v2): the supervisor writes one byte here once it has moved
    /// the init into its cgroups; the init waits for it before exec (EOF: failed).
    pub wait_for_cgroup: Option<OwnedFd>,
    /// Wait for the supervisor's byte before the createContainer hooks (after the mounts)
    /// rather than before exec: it runs the createRuntime hooks first.
    pub wait_early: bool,
    /// The init has its own cgroup namespace (v2): mount its cgroup read-only at /sys/fs/cgroup.
    pub cgroup_ns: bool,
    /// Whether the device cgroup restricts devices (else CAP_MKNOD is dropped).
    pub device_cgroup: bool,
    /// A new network namespace made for the task ahead of the launch, to join.
    pub netns: Option<&'a OwnedFd>,
    /// A detached sysfs mount of the task's network namespace, made by the supervisor: a
    /// task with a user namespace on a prepared (CNI) namespace may not mount one itself.
    pub sysfs: Option<OwnedFd>,
    /// The task has a user namespace (cloned into it): wait for this byte, which says its
    /// maps are written, before anything else.
    pub userns_ready: Option<OwnedFd>,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    /// /dev/null, or the console's pipe or terminal (`-i`, `-t`).
    pub stdin: &'a OwnedFd,
    /// `-t`: make a terminal after pivot_root and send its master here (see `console`).
    pub terminal: Option<&'a OwnedFd>,
    pub status: OwnedFd,
    /// A warm sandbox's init ([`super::sandbox`]): after its setup it writes `W <ns>` to the
    /// status pipe, then reads its task from here (a copy of the supervisor's stdin: the
    /// launcher's handover line, then the task spec as one line of JSON), says `C ...` and
    /// applies only what is task-specific (hostname, user, environment, cwd, capabilities,
    /// seccomp, exec).
    pub claim: Option<OwnedFd>,
}

/// Runs the setup and execs the task; only returns by exiting the process.
pub fn run(args: ChildArgs<'_>) -> ! {
    // A panic must never unwind out of here: the caller's frames belong to the supervisor.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut status = match args.status.try_clone() {
            Ok(fd) => fs::File::from(fd),
            Err(_) => return 125,
        };
        match setup_and_exec(&args, &mut status) {
            Ok(never) => match never {},
            Err(e) => {
                let _ = writeln!(status, "E {} {}", e.code, e.message.replace('\n', " "));
                e.code
            }
        }
    }));
    sys::exit_now(res.unwrap_or(125))
}

pub(super) enum Never {}

fn setup_and_exec(a: &ChildArgs<'_>, status: &mut fs::File) -> Result<Never, ChildError> {
    status_line(status, &format!("S {}", sys::monotonic_ns()));
    let spec = a.spec;
    // stdio: stdin from /dev/null, stdout/stderr into the log files (or the console's).
    sys::dup2(a.stdin.as_raw_fd(), 0).ctx(|| "dup2 stdin".into())?;
    sys::dup2(a.stdout.as_raw_fd(), 1).ctx(|| "dup2 stdout".into())?;
    sys::dup2(a.stderr.as_raw_fd(), 2).ctx(|| "dup2 stderr".into())?;
    unistd::setsid().ok();
    umask(Mode::empty());
    if let Some(fd) = &a.userns_ready {
        let mut b = [0u8; 1];
        let mut f = fs::File::from(fd.try_clone().ctx(|| "dup".into())?);
        if !matches!(std::io::Read::read(&mut f, &mut b), Ok(1)) {
            return Err(fail(125, "the supervisor could not map the user namespace"));
        }
    }
    let in_userns = spec.userns.is_some();
    if let Some(fd) = a.netns {
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
            .ctx(|| "joining the task's network namespace".into())?;
    }
    // (With a user namespace the supervisor made us in it already: we could not join it.)
    if let Some(ns) = spec.netns.as_ref().filter(|_| !in_userns) {
        // Before the mounts: the new /sys must show this namespace's devices. We are the
        // single thread of a fresh process, so the switch affects only the task.
        let f = fs::File::open(ns).ctx(|| format!("opening netns {}", ns.display()))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .ctx(|| format!("joining netns {}", ns.display()))?;
    }

    let abs_root = spec.rootfs.as_path();
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .ctx(|| "making / private".into())?;
    // pivot_root needs the root to be a mount: an image's overlay is one already; a directory
    // root is bound onto itself. So is any root in a user namespace: the mounts we got from
    // the host's namespace are locked together there, and pivot_root refuses a locked one.
    if in_userns || crate::sys::mount::is_mount_root(abs_root).ok().flatten() != Some(true) {
        mount(
            Some(abs_root),
            abs_root,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        )
        .ctx(|| format!("bind mounting the root filesystem {}", abs_root.display()))?;
    }
    // From here on paths in the root are walked from inside it (one component instead of the
    // store's whole path each time); nothing below changes the working directory before
    // pivot_root.
    unistd::chdir(abs_root).ctx(|| "chdir to the root filesystem".into())?;
    let root = Path::new(".");
    // In a user namespace: what the host's root may reach is opened now, then the init
    // becomes the namespace's root, so that what it makes (/dev, mount points) is the task
    // root's.
    let sources = match in_userns {
        true => Sources::open(a.dir, spec)?,
        false => Sources::default(),
    };
    if in_userns {
        unistd::setgroups(&[]).ctx(|| "setgroups in the user namespace".into())?;
        unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .ctx(|| "becoming gid 0 of the user namespace".into())?;
        unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .ctx(|| "becoming uid 0 of the user namespace".into())?;
    }
    // Device nodes an image carries stay inert: a task reaches devices only through its own
    // /dev (a task without devices has no device cgroup and no CAP_MKNOD). Overlay roots are
    // mounted so; another root (a directory, the copy backend) is made so here.
    let flags = nix::sys::statvfs::statvfs(root)
        .ctx(|| format!("statvfs {}", abs_root.display()))?
        .flags();
    if !flags.contains(nix::sys::statvfs::FsFlags::ST_NODEV) {
        let keep = [
            (nix::sys::statvfs::FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (nix::sys::statvfs::FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (nix::sys::statvfs::FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        ]
        .into_iter()
        .filter(|(f, _)| flags.contains(*f))
        .fold(MsFlags::empty(), |m, (_, ms)| m | ms);
        mount(
            none,
            root,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NODEV | keep,
            none,
        )
        .ctx(|| {
            format!(
                "remounting the root filesystem {} nodev",
                abs_root.display()
            )
        })?;
    }

    mount_proc_dev_sys(root, in_userns, a.sysfs.as_ref())?;
    make_device_nodes(root, &spec.devices.nodes, in_userns)?;
    if a.cgroup_ns {
        let cg = root.join("sys/fs/cgroup");
        if cg.is_dir() {
            mount(
                Some("cgroup2"),
                &cg,
                Some("cgroup2"),
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV | MsFlags::MS_RDONLY,
                none,
            )
            .ctx(|| "mounting /sys/fs/cgroup".into())?;
        }
    }
    mount_etc_files(root, a.dir, spec.readonly_rootfs, &sources)?;
    let sandbox = resolve_in_root(root, SANDBOX_TARGET);
    fs::create_dir_all(&sandbox).ctx(|| format!("creating {SANDBOX_TARGET}"))?;
    bind(&sources.get(&a.dir.sandbox()), &sandbox, false)?;
    for v in &spec.volumes {
        let target = resolve_in_root(root, &v.target);
        let source = sources.get(&v.source);
        let meta = fs::metadata(&source).ctx(|| format!("volume source {}", v.source.display()))?;
        if meta.is_dir() {
            fs::create_dir_all(&target).ctx(|| format!("creating volume target {}", v.target))?;
        } else if !target.exists() {
            if let Some(p) = target.parent() {
                fs::create_dir_all(p).ctx(|| format!("creating volume target {}", v.target))?;
            }
            fs::File::create(&target).ctx(|| format!("creating volume target {}", v.target))?;
        }
        bind(&source, &target, v.readonly)?;
    }
    for m in &spec.mounts {
        mount_one(root, m, &sources)?;
    }
    // The host pid of the task (what hooks' state says): /proc is still the host's here.
    let host_pid: Option<i32> = fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok());
    let bundle = super::hooks::bundle_dir(a.dir);
    if let Some(fd) = a.wait_for_cgroup.as_ref().filter(|_| a.wait_early) {
        wait_for_go(fd)?;
    }
    if !spec.hooks.create_container.is_empty() {
        let state = super::hooks::state_json(&spec.id, "created", host_pid, &bundle);
        super::hooks::run_all(
            "createContainer",
            &spec.hooks.create_container,
            &state,
            Some(abs_root),
        )
        .map_err(|e| fail(125, e))?;
    }
    let cwd_host = resolve_in_root(root, &spec.process.cwd);
    if !cwd_host.exists() {
        let _ = fs::create_dir_all(&cwd_host);
    }

    unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detaching the old root".into())?;
    unistd::chdir("/").ctx(|| "chdir /".into())?;
    if let Some(sock) = a.terminal {
        let size = spec
            .tty_size
            .map(|(rows, cols)| crate::sys::term::WinSize { rows, cols });
        super::console::make_task_terminal(sock, size)
            .ctx(|| "making the task's terminal".into())?;
    }

    for (p, is_dir) in MASKED_PATHS {
        mask(p, *is_dir)?;
    }
    for p in READONLY_PATHS {
        // No stat first: a path this kernel lacks fails the bind with ENOENT.
        match try_bind(Path::new(p), Path::new(p), true) {
            Err(nix::errno::Errno::ENOENT) => continue,
            r => r.ctx(|| format!("making {p} read-only"))?,
        }
    }
    if spec.readonly_rootfs {
        remount_readonly(Path::new("/"), MsFlags::empty())
            .ctx(|| "remounting / read-only".into())?;
    }
    unistd::sethostname(&spec.hostname).ctx(|| "sethostname".into())?;
    // In a joined (CNI) namespace too: not every network's chain has the loopback plugin.
    // (A prepared one with a user namespace: the supervisor did, we may not.)
    if spec.network == NetworkMode::None && !(in_userns && spec.netns.is_some()) {
        sys::loopback_up().ctx(|| "bringing up lo".into())?;
    }

    // The default capability set (what the bounding set keeps).
    let mut caps: u64 = DEFAULT_CAPS.iter().fold(0, |m, c| m | (1u64 << c));
    if !a.device_cgroup {
        caps &= !(1u64 << CAP_MKNOD);
    }
    let claimed;
    // A warm sandbox builds its seccomp program before it waits (the task may not need it),
    // and does ahead what no task changes: the bounding set (the init keeps its effective
    // capabilities for what follows), the ambient set, `no_new_privs` and the signal
    // dispositions (about a hundred syscalls).
    let mut seccomp_prog = None;
    let ahead = a.claim.is_some();
    let spec = match &a.claim {
        None => spec,
        Some(fd) => {
            seccomp_prog = Some(crate::sys::seccomp::cached_default_filter());
            task_independent_credentials(caps)?;
            claimed = wait_for_claim(fd, status)?;
            // The sandbox's hostname is its id's, also the task's when it takes that id.
            if claimed.hostname != spec.hostname {
                unistd::sethostname(&claimed.hostname).ctx(|| "sethostname".into())?;
            }
            // Made in the host's view by a cold launch; here inside the task's root.
            if !Path::new(&claimed.process.cwd).exists() {
                let _ = fs::create_dir_all(&claimed.process.cwd);
            }
            &claimed
        }
    };
    if !spec.hooks.start_container.is_empty() {
        let state = super::hooks::state_json(&spec.id, "created", host_pid, &bundle);
        super::hooks::run_all(
            "startContainer",
            &spec.hooks.start_container,
            &state,
            Some(Path::new("/")),
        )
        .map_err(|e| fail(125, e))?;
    }

    let x = prepare_exec(&spec.process, &spec.hostname, &spec.additional_gids)?;
    let seccomp = (!spec.seccomp_unconfined)
        .then(|| seccomp_prog.unwrap_or_else(crate::sys::seccomp::cached_default_filter));
    become_and_exec(x, &spec.process, caps, !ahead, seccomp, || {
        if let Some(fd) = a.wait_for_cgroup.as_ref().filter(|_| !a.wait_early) {
            wait_for_go(fd)?;
        }
        status_line(status, &format!("M {}", sys::monotonic_ns()));
        Ok(())
    })
}

/// Who a task's process runs as, its environment and its executable.
pub(super) struct Prepared {
    ids: Ids,
    env: Vec<String>,
    exe: PathBuf,
}

/// Identity, environment and executable of `process`, resolved inside the task's root (the
/// current root): its user and groups plus `additional_gids`, HOSTNAME and HOME unless set.
pub(super) fn prepare_exec(
    process: &super::spec::Process,
    hostname: &str,
    additional_gids: &[u32],
) -> Result<Prepared, ChildError> {
    let mut ids = resolve_user(&process.user)?;
    for g in additional_gids.iter().filter(|g| **g != 0) {
        if !ids.groups.contains(g) {
            ids.groups.push(*g);
        }
    }
    let mut env = process.env.clone();
    let has = |env: &[String], k: &str| env.iter().any(|e| e.split('=').next() == Some(k));
    if !has(&env, "HOSTNAME") {
        env.push(format!("HOSTNAME={hostname}"));
    }
    if !has(&env, "HOME") {
        env.push(format!("HOME={}", ids.home));
    }
    let path_var = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(super::spec::DEFAULT_PATH)
        .to_string();
    let exe = find_executable(&process.args[0], &path_var)?;
    Ok(Prepared { ids, env, exe })
}

/// Becomes the task's process and execs it: the bounding set down to `caps` and the rest of
/// [`task_independent_credentials`] (when `independent`: else done ahead), the user, the
/// capabilities, the `seccomp` program, the working directory, umask 022, every descriptor
/// above stdio close-on-exec, then `before_exec` and the exec. Returns only on failure.
pub(super) fn become_and_exec(
    x: Prepared,
    process: &super::spec::Process,
    caps: u64,
    independent: bool,
    seccomp: Option<&[libc::sock_filter]>,
    before_exec: impl FnOnce() -> Result<(), ChildError>,
) -> Result<Never, ChildError> {
    let Prepared { ids, env, exe } = x;
    if independent {
        task_independent_credentials(caps)?;
    }
    let groups: Vec<Gid> = ids.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    unistd::setgroups(&groups).ctx(|| "setgroups".into())?;
    let gid = Gid::from_raw(ids.gid);
    unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {}", ids.gid))?;
    if ids.uid == 0 {
        sys::set_capabilities(caps).ctx(|| "capset".into())?;
    } else {
        let uid = Uid::from_raw(ids.uid);
        unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {}", ids.uid))?;
    }
    if let Some(prog) = seccomp {
        crate::sys::seccomp::install_filter(prog).ctx(|| "installing the seccomp filter".into())?;
    }
    unistd::chdir(process.cwd.as_str())
        .map_err(|e| fail(126, format!("chdir to cwd {:?}: {e}", process.cwd)))?;
    umask(Mode::from_bits_truncate(0o022));
    sys::cloexec_from(3).ctx(|| "marking descriptors close-on-exec".into())?;

    let cargs: Vec<CString> = process
        .args
        .iter()
        .map(|s| CString::new(s.as_str()))
        .collect::<Result<_, _>>()
        .ctx(|| "argument with a NUL byte".into())?;
    let cenv: Vec<CString> = env
        .iter()
        .map(|s| CString::new(s.as_str()))
        .collect::<Result<_, _>>()
        .ctx(|| "environment with a NUL byte".into())?;
    let cexe = CString::new(exe.as_os_str().as_encoded_bytes()).ctx(|| "path".into())?;
    before_exec()?;
    let err = unistd::execve(&cexe, &cargs, &cenv).unwrap_err();
    Err(exec_error(&process.args[0], err))
}

/// Host paths a task in a user namespace binds from, opened (`O_PATH`) while the init still
/// has the host root's view: its root may not be allowed to walk to them. [`Sources::get`]
/// gives a path through the descriptor; without a user namespace, the path itself.
#[derive(Default)]
struct Sources(Vec<(PathBuf, OwnedFd)>);

impl Sources {
    fn open(dir: &TaskDir, spec: &TaskSpec) -> Result<Sources, ChildError> {
        let mut paths: Vec<PathBuf> = ["hostname", "hosts", "resolv.conf"]
            .iter()
            .map(|f| dir.etc().join(f))
            .collect();
        paths.push(dir.sandbox());
        paths.extend(spec.volumes.iter().map(|v| v.source.clone()));
        paths.extend(
            spec.mounts
                .iter()
                .filter(|m| m.flags().is_ok_and(|f| f.bind))
                .map(|m| m.source.clone()),
        );
        let mut out = Vec::with_capacity(paths.len());
        for p in paths {
            let fd = nix::fcntl::open(
                &p,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .ctx(|| format!("opening {}", p.display()))?;
            out.push((p, fd));
        }
        Ok(Sources(out))
    }

    fn get<'a>(&self, p: &'a Path) -> std::borrow::Cow<'a, Path> {
        match self.0.iter().find(|(q, _)| q == p) {
            // The host's /proc until pivot_root; the task's is mounted inside the root.
            Some((_, fd)) => PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())).into(),
            None => p.into(),
        }
    }
}

/// One status line in one write (`writeln!` on a file makes a write per piece).
fn status_line(status: &mut fs::File, line: &str) {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    let _ = status.write_all(&buf);
}

/// A warm sandbox's init's error when its launcher went without handing it a task.
pub(super) const UNUSED: &str = "the sandbox was not used";

/// What does not depend on the task: the bounding set down to `caps`, no ambient
/// capabilities, `no_new_privs`, default signal dispositions and no blocked signal.
pub(super) fn task_independent_credentials(caps: u64) -> Result<(), ChildError> {
    sys::drop_bounding_set(caps).ctx(|| "dropping capabilities".into())?;
    sys::clear_ambient().ok();
    sys::set_no_new_privs().ctx(|| "no_new_privs".into())?;
    sys::reset_signals().ctx(|| "resetting signals".into())
}

/// A warm sandbox's init, set up: says so (`W`), then waits for its task from the launcher
/// (see [`claim_message`]) and tells the supervisor which (`C <ns> <spawned ns> <task dir>`),
/// before parsing the spec, so that the supervisor's bookkeeping overlaps what the init still
/// does. EOF without a task: the sandbox is torn down unused.
fn wait_for_claim(fd: &OwnedFd, status: &mut fs::File) -> Result<TaskSpec, ChildError> {
    status_line(status, &format!("W {}", sys::monotonic_ns()));
    let mut f = fs::File::from(fd.try_clone().ctx(|| "dup".into())?);
    let mut data = Vec::with_capacity(4096);
    let mut buf = [0u8; 4096];
    // Exactly two lines come, then nothing until EOF: reading in blocks takes nothing of what
    // the supervisor reads from the same pipe later (only the EOF).
    while data.iter().filter(|b| **b == b'\n').count() < 2 {
        match std::io::Read::read(&mut f, &mut buf) {
            Ok(0) if data.is_empty() => return Err(fail(125, UNUSED)),
            Ok(0) => return Err(fail(125, "the task's handover was cut short")),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(125, format!("reading the task: {e}"))),
        }
    }
    let at = data.iter().position(|b| *b == b'\n').unwrap_or(0) + 1;
    let (handover, spec) = data.split_at(at);
    let (dir, spawned_ns) =
        super::standby::parse_handover(handover).ok_or_else(|| fail(125, "bad handover line"))?;
    status_line(
        status,
        &format!("C {} {spawned_ns} {}", sys::monotonic_ns(), dir.display()),
    );
    serde_json::from_slice(spec.trim_ascii_end()).ctx(|| "parsing the task spec".into())
}

/// What a launcher writes to a sandbox supervisor's stdin to hand it a task: the handover
/// line (`TASK_DIR<TAB>SPAWNED_NS`), then the spec as one line of JSON. The waiting init
/// reads it (see [`wait_for_claim`]).
pub(super) fn claim_message(handover_line: &[u8], spec: &TaskSpec) -> serde_json::Result<Vec<u8>> {
    let mut msg = handover_line.to_vec();
    serde_json::to_writer(&mut msg, spec)?;
    msg.push(b'\n');
    Ok(msg)
}

/// Waits for the supervisor's go (one byte; EOF means it gave up on the launch).
fn wait_for_go(fd: &OwnedFd) -> Result<(), ChildError> {
    let mut b = [0u8; 1];
    let mut f = fs::File::from(fd.try_clone().ctx(|| "dup".into())?);
    if !matches!(std::io::Read::read(&mut f, &mut b), Ok(1)) {
        return Err(fail(
            125,
            "the supervisor stopped the launch (cgroup or createRuntime hook)",
        ));
    }
    Ok(())
}

fn exec_error(arg0: &str, err: nix::errno::Errno) -> ChildError {
    use nix::errno::Errno;
    match err {
        Errno::ENOENT => fail(127, format!("{arg0}: no such file or directory")),
        Errno::EACCES | Errno::ENOEXEC | Errno::EISDIR | Errno::EPERM => {
            fail(126, format!("{arg0}: permission denied ({err})"))
        }
        e => fail(126, format!("exec {arg0}: {e}")),
    }
}

fn find_executable(arg0: &str, path_var: &str) -> Result<PathBuf, ChildError> {
    if arg0.contains('/') {
        let p = PathBuf::from(arg0);
        return match fs::metadata(&p) {
            Err(_) => Err(fail(127, format!("{arg0}: no such file or directory"))),
            Ok(m) if m.is_dir() || m.permissions().mode() & 0o111 == 0 => {
                Err(fail(126, format!("{arg0}: permission denied")))
            }
            Ok(_) => Ok(p),
        };
    }
    let mut not_exec = None;
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(arg0);
        if let Ok(m) = fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
            not_exec.get_or_insert(p);
        }
    }
    match not_exec {
        Some(p) => Err(fail(126, format!("{}: permission denied", p.display()))),
        None => Err(fail(
            127,
            format!("{arg0}: executable file not found in $PATH"),
        )),
    }
}

fn bind(src: &Path, dst: &Path, readonly: bool) -> Result<(), ChildError> {
    try_bind(src, dst, readonly).ctx(|| {
        let ro = if readonly { " read-only" } else { "" };
        format!("bind mounting {} on {}{ro}", src.display(), dst.display())
    })
}

/// A bind mount (recursive), remounted read-only if asked; the bare error, for callers that
/// tell a missing path apart.
fn try_bind(src: &Path, dst: &Path, readonly: bool) -> nix::Result<()> {
    let none: Option<&str> = None;
    mount(
        Some(src),
        dst,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )?;
    if readonly {
        remount_readonly(dst, MsFlags::MS_NOSUID)?;
    }
    Ok(())
}

/// statvfs's `ST_RELATIME` (Linux's value; musl's headers lack it).
const ST_RELATIME: libc::c_ulong = 4096;

/// Remounts the bind mount at `path` read-only with `flags`. In a user namespace a mount that
/// came from the host's namespace (or a bind of one) has its nodev, nosuid, noexec and atime
/// flags locked, and a remount that would drop one fails with EPERM: then again with the
/// mount's own flags kept.
fn remount_readonly(path: &Path, flags: MsFlags) -> nix::Result<()> {
    use nix::sys::statvfs::FsFlags;
    let none: Option<&str> = None;
    let base = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    match mount(none, path, none, base | flags, none) {
        Err(nix::errno::Errno::EPERM) => {
            let have = nix::sys::statvfs::statvfs(path)?.flags();
            let kept = [
                (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
                (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
                (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
                (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
                (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
                (FsFlags::from_bits_retain(ST_RELATIME), MsFlags::MS_RELATIME),
            ]
            .into_iter()
            .filter(|(f, _)| have.contains(*f))
            .fold(flags, |m, (_, ms)| m | ms);
            mount(none, path, none, base | kept, none)
        }
        r => r,
    }
}

/// Masks `p`, expected to be a directory if `is_dir`: one mount; none if the kernel does not
/// have the path; a stat and the other kind of mount if it has it as the other kind.
fn mask(p: &str, is_dir: bool) -> Result<(), ChildError> {
    let path = Path::new(p);
    let try_mount = |dir: bool| {
        if dir {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0"),
            )
        } else {
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        }
    };
    match try_mount(is_dir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::ENOTDIR | nix::errno::Errno::EISDIR) => {
            let meta = fs::symlink_metadata(path).ctx(|| format!("masking {p}"))?;
            try_mount(meta.is_dir()).ctx(|| format!("masking {p}"))
        }
        Err(e) => Err(e).ctx(|| format!("masking {p}")),
    }
}

fn mount_proc_dev_sys(
    root: &Path,
    in_userns: bool,
    sysfs: Option<&OwnedFd>,
) -> Result<(), ChildError> {
    let none: Option<&str> = None;
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let proc_ = root.join("proc");
    fs::create_dir_all(&proc_).ctx(|| "creating /proc".into())?;
    mount(
        Some("proc"),
        &proc_,
        Some("proc"),
        nosuid_noexec_nodev,
        none,
    )
    .ctx(|| "mounting /proc".into())?;

    let dev = root.join("dev");
    fs::create_dir_all(&dev).ctx(|| "creating /dev".into())?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .ctx(|| "mounting /dev".into())?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        if in_userns {
            // No mknod in a user namespace: the host's node, bound onto an empty file.
            fs::File::create(&p).ctx(|| format!("creating /dev/{name}"))?;
            bind(&Path::new("/dev").join(name), &p, false)?;
            continue;
        }
        mknod(
            &p,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .ctx(|| format!("mknod /dev/{name}"))?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("core", "/proc/kcore"),
        ("ptmx", "pts/ptmx"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link)).ctx(|| format!("/dev/{link}"))?;
    }
    let pts = dev.join("pts");
    fs::create_dir(&pts).ctx(|| "creating /dev/pts".into())?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .ctx(|| "mounting /dev/pts".into())?;
    let shm = dev.join("shm");
    fs::create_dir(&shm).ctx(|| "creating /dev/shm".into())?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        nosuid_noexec_nodev,
        Some("mode=1777,size=65536k"),
    )
    .ctx(|| "mounting /dev/shm".into())?;
    let mq = dev.join("mqueue");
    fs::create_dir(&mq).ctx(|| "creating /dev/mqueue".into())?;
    mount(
        Some("mqueue"),
        &mq,
        Some("mqueue"),
        nosuid_noexec_nodev,
        none,
    )
    .ctx(|| "mounting /dev/mqueue".into())?;

    let sys_ = root.join("sys");
    fs::create_dir_all(&sys_).ctx(|| "creating /sys".into())?;
    if let Some(fd) = sysfs {
        return crate::sys::mount::move_mount_to(fd, &sys_).ctx(|| "mounting /sys".into());
    }
    let sysfs = mount(
        Some("sysfs"),
        &sys_,
        Some("sysfs"),
        nosuid_noexec_nodev | MsFlags::MS_RDONLY,
        none,
    );
    if sysfs.is_err() {
        // Without a network namespace of our own, sysfs may refuse a new mount: bind the host's.
        bind(Path::new("/sys"), &sys_, true)?;
    }
    Ok(())
}

/// Creates the task's extra device nodes (e.g. allocated GPUs) in its fresh /dev tmpfs; the
/// device cgroup decides whether they can be opened.
fn make_device_nodes(
    root: &Path,
    nodes: &[super::spec::DeviceNode],
    in_userns: bool,
) -> Result<(), ChildError> {
    use super::spec::DeviceType;
    for n in nodes {
        let rel = n
            .path
            .strip_prefix("/dev/")
            .filter(|r| !r.split('/').any(|c| c.is_empty() || c == "." || c == ".."))
            .ok_or_else(|| fail(125, format!("device node {:?} is not under /dev", n.path)))?;
        let p = root.join("dev").join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| format!("creating the parent of {}", n.path))?;
        }
        if in_userns {
            // No mknod in a user namespace: the host's node of that path, bound.
            fs::File::create(&p).ctx(|| format!("creating {}", n.path))?;
            bind(Path::new(&n.path), &p, false)?;
            continue;
        }
        let kind = match n.kind {
            DeviceType::Block => SFlag::S_IFBLK,
            _ => SFlag::S_IFCHR,
        };
        mknod(
            &p,
            kind,
            Mode::from_bits_truncate(n.mode),
            makedev(n.major as u64, n.minor as u64),
        )
        .ctx(|| format!("mknod {}", n.path))?;
        if n.uid.is_some() || n.gid.is_some() {
            unistd::chown(&p, n.uid.map(Uid::from_raw), n.gid.map(Gid::from_raw))
                .ctx(|| format!("chown {}", n.path))?;
        }
    }
    Ok(())
}

/// One [`super::spec::Mount`]: a bind mount (then a remount for its flags) or a new mount of
/// its type; the target is created like a volume's.
fn mount_one(root: &Path, m: &super::spec::Mount, sources: &Sources) -> Result<(), ChildError> {
    let f = m
        .flags()
        .map_err(|e| fail(125, format!("mount on {}: {e}", m.target)))?;
    let target = resolve_in_root(root, &m.target);
    let source = match f.bind {
        true => sources.get(&m.source),
        false => m.source.as_path().into(),
    };
    let src_is_dir = !f.bind || fs::metadata(&source).map(|m| m.is_dir()).unwrap_or(true);
    if src_is_dir {
        fs::create_dir_all(&target).ctx(|| format!("creating mount target {}", m.target))?;
    } else if !target.exists() {
        if let Some(p) = target.parent() {
            fs::create_dir_all(p).ctx(|| format!("creating mount target {}", m.target))?;
        }
        fs::File::create(&target).ctx(|| format!("creating mount target {}", m.target))?;
    }
    let none: Option<&str> = None;
    let flags = MsFlags::from_bits_truncate(f.flags);
    if f.bind {
        let rec = if f.recursive {
            MsFlags::MS_REC
        } else {
            MsFlags::empty()
        };
        mount(
            Some(source.as_ref()),
            &target,
            none,
            MsFlags::MS_BIND | rec,
            none,
        )
        .ctx(|| format!("bind mounting {} on {}", m.source.display(), m.target))?;
        if !flags.is_empty() {
            mount(
                none,
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                none,
            )
            .ctx(|| format!("remounting {} ({})", m.target, m.options.join(",")))?;
        }
    } else {
        let data = (!f.data.is_empty()).then_some(f.data.as_str());
        mount(
            Some(&m.source),
            &target,
            Some(m.fstype.as_str()),
            flags,
            data,
        )
        .ctx(|| {
            format!(
                "mounting {} ({}) on {}",
                m.source.display(),
                m.fstype,
                m.target
            )
        })?;
    }
    if f.propagation != 0 {
        mount(
            none,
            &target,
            none,
            MsFlags::from_bits_truncate(f.propagation),
            none,
        )
        .ctx(|| format!("setting the propagation of {}", m.target))?;
    }
    Ok(())
}

fn mount_etc_files(
    root: &Path,
    dir: &TaskDir,
    readonly: bool,
    sources: &Sources,
) -> Result<(), ChildError> {
    let etc = resolve_in_root(root, "/etc");
    if !etc.exists() && !readonly {
        let _ = fs::create_dir_all(&etc);
    }
    // `/etc` resolved once; each file then costs one readlink (a plain file: EINVAL, no stat
    // needed) unless it is a symlink, which is resolved in the root as a whole path is.
    let etc_in_root = etc.strip_prefix(root).unwrap_or(Path::new("etc"));
    for f in ["hostname", "hosts", "resolv.conf"] {
        let direct = etc.join(f);
        let target = match fs::read_link(&direct) {
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => direct,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if readonly || fs::File::create(&direct).is_err() {
                    continue;
                }
                direct
            }
            _ => {
                let target = resolve_in_root(root, &format!("/{}/{f}", etc_in_root.display()));
                if fs::symlink_metadata(&target).is_err()
                    && (readonly || fs::File::create(&target).is_err())
                {
                    continue;
                }
                target
            }
        };
        bind(&sources.get(&dir.etc().join(f)), &target, false)?;
    }
    Ok(())
}

/// Resolves `path` (absolute, as seen inside the task) to a host path under `root`, following
/// symlinks as the task would see them, so that no symlink in the image can point a mount
/// outside the root.
pub fn resolve_in_root(root: &Path, path: &str) -> PathBuf {
    let mut todo: VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let host = root.join(&cur).join(&c);
        match fs::read_link(&host) {
            Ok(target) if hops < 40 => {
                hops += 1;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    cur = PathBuf::new();
                }
                for (i, part) in t.split('/').filter(|p| !p.is_empty()).enumerate() {
                    todo.insert(i, part.to_string());
                }
            }
            _ => cur.push(c),
        }
    }
    root.join(cur)
}

/// A resolved identity.
#[derive(Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// Resolves `user[:group]` against `/etc/passwd` and `/etc/group` of the current root.
pub fn resolve_user(spec: &str) -> Result<Ids, ChildError> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    resolve_user_in(spec, &passwd, &group)
}

fn resolve_user_in(spec: &str, passwd: &str, group: &str) -> Result<Ids, ChildError> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        let uid: u32 = f[2].parse().ok()?;
        (f[0] == user || user.parse() == Ok(uid)).then(|| {
            (
                f[0].to_string(),
                uid,
                f[3].parse().unwrap_or(0),
                f[5].to_string(),
            )
        })
    });
    let (name, uid, mut gid, home) = match (entry, user.parse::<u32>()) {
        (Some(e), _) => e,
        (None, Ok(uid)) => (String::new(), uid, 0, "/".to_string()),
        (None, Err(_)) => {
            return Err(fail(
                126,
                format!("unable to find user {user}: no matching entries in passwd file"),
            ))
        }
    };
    let groups_file: Vec<(String, u32, Vec<String>)> = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then(|| {
                Some((
                    f[0].to_string(),
                    f[2].parse().ok()?,
                    f[3].split(',')
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            })?
        })
        .collect();
    let mut groups = vec![];
    if let Some(g) = grp.filter(|g| !g.is_empty()) {
        gid = match groups_file.iter().find(|(n, _, _)| n == g) {
            Some((_, id, _)) => *id,
            None => g.parse().map_err(|_| {
                fail(
                    126,
                    format!("unable to find group {g}: no matching entries in group file"),
                )
            })?,
        };
    } else if !name.is_empty() {
        groups = groups_file
            .iter()
            .filter(|(_, _, members)| members.contains(&name))
            .map(|(_, id, _)| *id)
            .collect();
    }
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Ids {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nwheel:x:10:app,other\n";

    #[test]
    fn users() {
        let r = resolve_user_in("", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.home.as_str()), (0, 0, "/root"));
        let a = resolve_user_in("app", PASSWD, GROUP).unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(a.groups, [1000, 10]);
        let n = resolve_user_in("4242:77", PASSWD, GROUP).unwrap();
        assert_eq!((n.uid, n.gid, n.groups.as_slice()), (4242, 77, &[77][..]));
        let g = resolve_user_in("app:wheel", PASSWD, GROUP).unwrap();
        assert_eq!(g.gid, 10);
        assert_eq!(
            resolve_user_in("nosuch", PASSWD, GROUP).unwrap_err().code,
            126
        );
        assert!(resolve_user_in("app:nosuch", PASSWD, GROUP).is_err());
    }

    #[test]
    fn resolve_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", root.join("up")).unwrap();
        assert_eq!(resolve_in_root(root, "/abs/x"), root.join("real/x"));
        assert_eq!(resolve_in_root(root, "/up/passwd"), root.join("etc/passwd"));
        assert_eq!(resolve_in_root(root, "/a/../b"), root.join("b"));
    }
}
