//! Task cgroups on cgroup v1, v2 and the hybrid layout (v1 controllers plus a cgroup2 mount
//! that owns no controller we use), through `cgroups-rs`, behind one small interface.
//!
//! A task's cgroup is `caisson/<id>` in every hierarchy we use. On v2 the directory can be
//! opened and passed to `clone3(CLONE_INTO_CGROUP)`; on v1 the supervisor writes the init's pid
//! into the `cgroup.procs` of each hierarchy the task needs ([`v1_controllers_for`]).
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller, MaxValue};
use serde::{Deserialize, Serialize};

pub mod devices;
pub mod favor;
use devices::DeviceRule;
pub use favor::favor_dynamic_modifications;

/// The parent of every task cgroup, in every hierarchy.
pub const PARENT: &str = "caisson";

/// CFS period used for `--cpus`.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Errors of the cgroup layer.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {op}: {source}")]
    Cgroups {
        path: String,
        op: &'static str,
        #[source]
        source: cgroups_rs::fs::error::Error,
    },
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("cgroup {path} still has processes after {secs}s")]
    Busy { path: String, secs: u64 },
}

type Result<T> = std::result::Result<T, CgroupError>;

/// Resource limits of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU quota in CPUs (`--cpus 1.5` = 150 ms per 100 ms period).
    pub cpus: Option<f64>,
    /// Relative CPU weight in cgroup v1 shares (2..=262144; converted to `cpu.weight` on v2).
    pub cpu_shares: Option<u64>,
    /// Memory limit in bytes.
    pub memory: Option<u64>,
    /// Maximum number of processes (`None` or a value <= 0: unlimited).
    pub pids: Option<i64>,
}

impl Limits {
    /// Checks ranges the way podman does (before anything is created).
    pub fn validate(&self) -> Result<()> {
        if let Some(c) = self.cpus {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            if !(c.is_finite() && c >= 0.01 && c <= n) {
                return Err(CgroupError::InvalidLimit(format!(
                    "range of CPUs is from 0.01 to {n:.2}, got {c}"
                )));
            }
        }
        if let Some(s) = self.cpu_shares {
            if !(2..=cgroups_rs::CPU_SHARES_V1_MAX).contains(&s) {
                return Err(CgroupError::InvalidLimit(format!(
                    "cpu shares must be in 2..=262144, got {s}"
                )));
            }
        }
        if let Some(m) = self.memory {
            if m < 6 * 1024 * 1024 {
                return Err(CgroupError::InvalidLimit(format!(
                    "minimum memory limit allowed is 6MB, got {m} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// Resource usage of a task, read from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU time (user + system) in nanoseconds.
    pub cpu_ns: u64,
    /// Peak memory usage in bytes.
    pub memory_peak_bytes: u64,
    /// Number of OOM kills inside the cgroup.
    pub oom_kills: u64,
    /// Number of times the pids limit refused a fork.
    pub pids_limit_hits: u64,
}

/// Cgroup v1 shares (2..=262144) to v2 weight (1..=10000), the formula runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + ((shares.saturating_sub(2)) * 9999) / 262142
}

/// True on a pure cgroup v2 host (found once per process: the layout does not change while
/// caisson runs, and a launch asks many times).
pub fn is_v2() -> bool {
    static V2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V2.get_or_init(cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode)
}

/// The host's cgroup hierarchy, found once per process: `hierarchies::auto()` parses the whole
/// of `/proc/self/mountinfo` on v1, whose size grows with every task's overlay root, and every
/// cgroup load or creation asked for it (the agent's launches and removals did, twice a task).
/// Its controllers' mount points are kept too: every load used to clone the parsed mount table
/// and scan it once per controller. Controllers are not remounted elsewhere while caisson runs.
fn hierarchy() -> Box<dyn cgroups_rs::fs::Hierarchy> {
    use cgroups_rs::fs::hierarchies::{V1, V2};
    static FOUND: std::sync::OnceLock<Known> = std::sync::OnceLock::new();
    Box::new(
        FOUND
            .get_or_init(|| {
                let inner: Box<dyn cgroups_rs::fs::Hierarchy> = match is_v2() {
                    true => Box::new(V2::new()),
                    false => Box::new(V1::new()),
                };
                let subsystems = inner.subsystems();
                Known(std::sync::Arc::new((inner, subsystems)))
            })
            .clone(),
    )
}

/// Finds the host's hierarchy now ([`hierarchy`]): a fork server does, so that the
/// supervisors it forks do not each parse the mount table again.
pub fn find_hierarchy() {
    drop(hierarchy());
}

/// A hierarchy with its controllers found once ([`hierarchy`]); the rest is the inner one's.
#[derive(Debug, Clone)]
struct Known(
    std::sync::Arc<(
        Box<dyn cgroups_rs::fs::Hierarchy>,
        Vec<cgroups_rs::fs::Subsystem>,
    )>,
);

impl cgroups_rs::fs::Hierarchy for Known {
    fn subsystems(&self) -> Vec<cgroups_rs::fs::Subsystem> {
        self.0 .1.clone()
    }
    fn root(&self) -> PathBuf {
        self.0 .0.root()
    }
    fn root_control_group(&self) -> Cgroup {
        self.0 .0.root_control_group()
    }
    fn parent_control_group(&self, path: &str) -> Cgroup {
        self.0 .0.parent_control_group(path)
    }
    fn v2(&self) -> bool {
        self.0 .0.v2()
    }
}

/// Every v1 controller a task cgroup may use (what cleanup looks at).
const V1_ALL: &[&str] = &["cpu", "cpuacct", "memory", "pids", "freezer", "devices"];

/// Controllers a task cgroup uses, present on this host: with `limits`, only those a task
/// with these limits needs (see [`v1_controllers_for`]); without, every one it may use.
fn wanted_controllers(v2: bool, limits: Option<(&Limits, bool)>) -> Vec<String> {
    if v2 {
        let avail = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        ["cpu", "memory", "pids"]
            .iter()
            .filter(|c| avail.split_whitespace().any(|a| a == **c))
            .map(|c| c.to_string())
            .collect()
    } else {
        match limits {
            Some((l, devices)) => v1_controllers_for(l, devices),
            None => V1_ALL.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// The v1 hierarchies a task joins. Each hierarchy costs a directory, a `cgroup.procs` write
/// and an rmdir per launch, so a task joins only what it needs: `cpuacct` and `memory` for the
/// usage recorded at exit (and the OOM report); no `freezer`: every task has a pid namespace of
/// its own, so a SIGKILL of its init makes the kernel kill every process in it, and a namespace
/// whose init is dying forks no more (no process escapes a kill by forking); `devices` only for
/// a task given devices beyond the minimal /dev (GPUs, CDI, `--device`), `cpu` only with
/// `--cpus`/`--cpu-shares` and `pids` only with `--pids-limit` (they hold limits and nothing
/// else we read). A task without a device cgroup gets no CAP_MKNOD (the init drops it), as on
/// v2: it can neither make a device node nor find one beyond its own /dev, so the allow-list
/// (a deny and eleven allow writes per launch) would add nothing.
pub fn v1_controllers_for(limits: &Limits, devices: bool) -> Vec<String> {
    let mut out = vec!["cpuacct", "memory"];
    if devices {
        out.push("devices");
    }
    if limits.cpus.is_some() || limits.cpu_shares.is_some() {
        out.push("cpu");
    }
    if limits.pids.is_some_and(|p| p > 0) {
        out.push("pids");
    }
    out.into_iter().map(String::from).collect()
}

/// Starts the RCU grace period that the first `cgroup.procs` write of a launch has to wait for
/// on cgroup v1, so that it overlaps the rest of the launch instead of adding to it.
///
/// Every migration takes the kernel's global `cgroup_threadgroup_rwsem` for writing; the first
/// writer after an idle period waits one RCU grace period (milliseconds under load), writers
/// within a grace period after that pay nothing. Moving the calling thread into the cgroup it
/// is already in (its own `tasks` file in one v1 hierarchy) changes nothing but takes that
/// lock. Call it on a spare thread at the start of a launch: it blocks for the grace period.
/// Best effort, a no-op on cgroup v2 (where clone3 joins the cgroup at birth).
pub fn prime_migration() {
    if is_v2() {
        return;
    }
    let Ok(own) = fs::read_to_string("/proc/thread-self/cgroup") else {
        return;
    };
    // A v1 line: `ID:controllers:/path`; use the memory hierarchy (one every task joins).
    let Some(path) = own.lines().find_map(|line| {
        let mut it = line.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        ctrls.split(',').any(|c| c == "memory").then_some(path)
    }) else {
        return;
    };
    let tasks = Path::new("/sys/fs/cgroup/memory")
        .join(path.trim_start_matches('/'))
        .join("tasks");
    let _ = fs::write(tasks, nix::unistd::gettid().as_raw().to_string());
}

/// The cgroup of one task.
pub struct TaskCgroup {
    cg: Cgroup,
    rel: String,
    v2: bool,
}

impl std::fmt::Debug for TaskCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskCgroup")
            .field("rel", &self.rel)
            .field("v2", &self.v2)
            .finish()
    }
}

impl TaskCgroup {
    /// Relative path of a task's cgroup.
    pub fn rel_path(id: &str) -> String {
        format!("{PARENT}/{id}")
    }

    /// A handle on the (possibly absent) cgroup of task `id`, in every hierarchy a task may
    /// use (for signalling and cleanup).
    pub fn load(id: &str) -> Self {
        Self::load_with(id, None)
    }

    /// With `limits` and whether the task has a device cgroup: the hierarchies such a task
    /// uses; without: all of them.
    fn load_with(id: &str, limits: Option<(&Limits, bool)>) -> Self {
        let v2 = is_v2();
        let rel = Self::rel_path(id);
        let cg = Cgroup::load_with_specified_controllers(
            hierarchy(),
            &rel,
            wanted_controllers(v2, limits),
        );
        TaskCgroup { cg, rel, v2 }
    }

    /// Creates the cgroup of task `id` (in the hierarchies a task with `limits` needs) and
    /// applies `limits`.
    pub fn create(id: &str, limits: &Limits) -> Result<Self> {
        Self::create_with_devices(id, limits, &[])
    }

    /// Like [`TaskCgroup::create`], also allowing the devices of `extra` (beyond the default
    /// minimal /dev): on v1 as `devices.allow` lines, on v2 (only when `extra` is not empty)
    /// through a device BPF program attached to the cgroup.
    pub fn create_with_devices(id: &str, limits: &Limits, extra: &[DeviceRule]) -> Result<Self> {
        limits.validate()?;
        let me = Self::load_with(id, Some((limits, !extra.is_empty())));
        me.cg.create().map_err(|source| CgroupError::Cgroups {
            path: me.rel.clone(),
            op: "create",
            source,
        })?;
        if let Err(e) = me.apply(limits).and_then(|()| me.apply_devices(extra)) {
            let _ = me.cg.delete();
            return Err(e);
        }
        Ok(me)
    }

    /// The cgroup of a Wasm task `id`: on v1 only the hierarchies it uses, `cpuacct` (its CPU
    /// time) and, with those limits, `cpu` and `pids`. A Wasm guest reaches no device and
    /// forks nothing, and its memory limit is the engine's: `devices`, `freezer` and `memory`
    /// would each cost a directory, a migration and an rmdir per launch for nothing (the
    /// memory peak then comes from the host process's rusage). On v2 the same as
    /// [`TaskCgroup::create`].
    pub fn create_for_wasm(id: &str, limits: &Limits) -> Result<Self> {
        limits.validate()?;
        let v2 = is_v2();
        let controllers = if v2 {
            wanted_controllers(true, Some((limits, false)))
        } else {
            v1_controllers_for(limits, false)
                .into_iter()
                .filter(|c| !matches!(c.as_str(), "freezer" | "memory"))
                .collect()
        };
        let rel = Self::rel_path(id);
        let cg = Cgroup::load_with_specified_controllers(hierarchy(), &rel, controllers);
        let me = TaskCgroup { cg, rel, v2 };
        me.cg.create().map_err(|source| CgroupError::Cgroups {
            path: me.rel.clone(),
            op: "create",
            source,
        })?;
        if let Err(e) = me.apply(limits) {
            let _ = me.cg.delete();
            return Err(e);
        }
        Ok(me)
    }

    /// The cgroup of task `id` as [`TaskCgroup::create`] made it for `limits`, if every one of
    /// its directories exists (the launcher creates it on v1, the supervisor uses it).
    pub fn open(id: &str, limits: &Limits, devices: bool) -> Option<Self> {
        let me = Self::load_with(id, Some((limits, devices)));
        me.dirs().iter().all(|d| d.is_dir()).then_some(me)
    }

    fn err(
        &self,
        op: &'static str,
    ) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError + '_ {
        move |source| CgroupError::Cgroups {
            path: self.rel.clone(),
            op,
            source,
        }
    }

    /// The same cgroup (same hierarchies) under task id `id`, if every one of its directories
    /// exists (a warm sandbox's, renamed to its task's id by the launcher).
    pub fn renamed(&self, id: &str) -> Option<Self> {
        let rel = Self::rel_path(id);
        let controllers = self
            .cg
            .subsystems()
            .iter()
            .map(|s| s.controller_name())
            .collect();
        let cg = Cgroup::load_with_specified_controllers(hierarchy(), &rel, controllers);
        let me = TaskCgroup {
            cg,
            rel,
            v2: self.v2,
        };
        me.dirs().iter().all(|d| d.is_dir()).then_some(me)
    }

    /// Writes `limits` into the existing cgroup (a warm sandbox's, at its task's launch).
    pub fn apply_limits(&self, limits: &Limits) -> Result<()> {
        limits.validate()?;
        self.apply(limits)
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        if let Some(mem) = limits.memory {
            let c: &MemController = self.controller("memory")?;
            c.set_limit(mem as i64).map_err(self.err("memory limit"))?;
            if self.v2 {
                // No swap beyond the limit, so that the limit means an OOM kill.
                let _ = fs::write(c.path().join("memory.swap.max"), "0");
            } else {
                let _ = c.set_memswap_limit(mem as i64);
            }
        }
        if limits.cpus.is_some() || limits.cpu_shares.is_some() {
            let c: &CpuController = self.controller("cpu")?;
            if let Some(shares) = limits.cpu_shares {
                let v = if self.v2 {
                    shares_to_weight(shares)
                } else {
                    shares
                };
                c.set_shares(v).map_err(self.err("cpu shares"))?;
            }
            if let Some(cpus) = limits.cpus {
                let quota = (cpus * CPU_PERIOD_US as f64).round() as i64;
                c.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                    .map_err(self.err("cpu quota"))?;
            }
        }
        if let Some(p) = limits.pids.filter(|p| *p > 0) {
            let c: &PidController = self.controller("pids")?;
            c.set_pid_max(MaxValue::Value(p))
                .map_err(self.err("pids limit"))?;
        }
        Ok(())
    }

    /// Deny all devices but the default minimal /dev and `extra`.
    fn apply_devices(&self, extra: &[DeviceRule]) -> Result<()> {
        let rules = devices::default_allow()
            .into_iter()
            .chain(extra.iter().cloned());
        if extra.is_empty() {
            // No device cgroup by default (v1 or v2): the init drops CAP_MKNOD instead.
            return Ok(());
        }
        if self.v2 {
            let dir = self.dirs().remove(0);
            let rules: Vec<DeviceRule> = rules.collect();
            return devices::attach_v2(&dir, &rules).map_err(|source| CgroupError::Io {
                path: dir.display().to_string(),
                op: "attaching the device program",
                source,
            });
        }
        let Some(dir) = self.controller_dir("devices") else {
            return Ok(());
        };
        let io = |source| CgroupError::Io {
            path: dir.display().to_string(),
            op: "device rules",
            source,
        };
        let open = |file: &str| fs::OpenOptions::new().write(true).open(dir.join(file));
        open("devices.deny")
            .and_then(|mut f| f.write_all(b"a"))
            .map_err(io)?;
        // One rule per write, all through one open file (a path lookup each cost more).
        let mut allow = open("devices.allow").map_err(io)?;
        for rule in rules {
            allow.write_all(rule.to_v1().as_bytes()).map_err(io)?;
        }
        Ok(())
    }

    fn controller<'a, T>(&'a self, name: &str) -> Result<&'a T>
    where
        &'a T: From<&'a cgroups_rs::fs::Subsystem>,
        T: Controller + cgroups_rs::fs::ControllIdentifier,
    {
        self.cg.controller_of::<T>().ok_or_else(|| {
            CgroupError::InvalidLimit(format!(
                "the {name} controller is not available on this host"
            ))
        })
    }

    fn controller_dir(&self, name: &str) -> Option<PathBuf> {
        self.cg
            .subsystems()
            .iter()
            .find(|s| s.controller_name() == name)
            .map(|s| s.to_controller().path().to_path_buf())
    }

    /// True on cgroup v2.
    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The cgroup directories (one per hierarchy on v1, one on v2).
    pub fn dirs(&self) -> Vec<PathBuf> {
        if self.v2 {
            // Whatever controllers are enabled, the task's cgroup is this one directory.
            return vec![Path::new(cgroups_rs::fs::hierarchies::UNIFIED_MOUNTPOINT).join(&self.rel)];
        }
        let mut dirs: Vec<PathBuf> = self
            .cg
            .subsystems()
            .iter()
            .map(|s| s.to_controller().path().to_path_buf())
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// The `cgroup.procs` files a process writes `0` into to join this cgroup (v1).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Opens the v2 directory for `clone3(CLONE_INTO_CGROUP)`.
    pub fn open_v2_dir(&self) -> Option<OwnedFd> {
        if !self.v2 {
            return None;
        }
        let dir = self.dirs().into_iter().next()?;
        fs::File::open(dir).ok().map(OwnedFd::from)
    }

    /// True if any of the cgroup directories exists.
    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.exists())
    }

    /// Pids of the processes in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .procs_files()
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok())
            .flat_map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Usage counters (cpu time, memory peak, OOM kills).
    pub fn usage(&self) -> Usage {
        if !self.v2 {
            return self.usage_v1();
        }
        let mut u = Usage::default();
        if let Some(c) = self.cg.controller_of::<MemController>() {
            let m = c.memory_stat();
            u.memory_peak_bytes = m.max_usage_in_bytes;
            u.oom_kills = if self.v2 {
                read_key(&c.path().join("memory.events"), "oom_kill")
            } else {
                m.oom_control.oom_kill
            };
        }
        if self.v2 {
            if let Some(dir) = self.dirs().first() {
                u.cpu_ns = read_key(&dir.join("cpu.stat"), "usage_usec") * 1000;
            }
        } else if let Some(c) = self.cg.controller_of::<CpuAcctController>() {
            u.cpu_ns = c.cpuacct().usage;
        }
        if let Some(c) = self.cg.controller_of::<PidController>() {
            u.pids_limit_hits = c.get_pid_events().unwrap_or(0);
        }
        u
    }

    /// v1 usage from the four files that hold it (cgroups-rs's `memory_stat` reads some twenty).
    fn usage_v1(&self) -> Usage {
        let num = |p: PathBuf| -> u64 {
            fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut u = Usage::default();
        if let Some(dir) = self.controller_dir("memory") {
            u.memory_peak_bytes = num(dir.join("memory.max_usage_in_bytes"));
            u.oom_kills = read_key(&dir.join("memory.oom_control"), "oom_kill");
        }
        if let Some(dir) = self.controller_dir("cpuacct") {
            u.cpu_ns = num(dir.join("cpuacct.usage"));
        }
        if let Some(dir) = self.controller_dir("pids") {
            u.pids_limit_hits = read_key(&dir.join("pids.events"), "max");
        }
        u
    }

    /// Sends `signal` to every process of the cgroup; for SIGKILL uses `cgroup.kill` (v2), or
    /// freezes it first where it has a v1 freezer (cgroups made by earlier versions). A native
    /// task's processes share its pid namespace, whose init's death kills the rest: no process
    /// escapes a SIGKILL by forking either way.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        if signal == Signal::SIGKILL && self.v2 && self.cg.kill().is_ok() {
            return Ok(());
        }
        let freezer = if signal == Signal::SIGKILL {
            self.cg.controller_of::<FreezerController>()
        } else {
            None
        };
        if let Some(f) = freezer {
            let _ = f.freeze();
        }
        for pid in self.pids() {
            let _ = kill(Pid::from_raw(pid), signal);
        }
        if let Some(f) = freezer {
            let _ = f.thaw();
        }
        Ok(())
    }

    /// Removes the cgroup, killing what is left in it and waiting up to `timeout` for it to
    /// empty.
    pub fn destroy(&self, timeout: Duration) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        // An empty cgroup (the usual case: its task has been reaped) goes with one rmdir per
        // hierarchy; processes are looked for (and killed) only when that fails.
        let mut first = true;
        loop {
            if !first && !self.pids().is_empty() {
                self.signal_all(nix::sys::signal::Signal::SIGKILL)?;
            }
            let mut ok = true;
            for dir in self.dirs() {
                match fs::remove_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(_) => ok = false,
                }
            }
            if ok {
                return Ok(());
            }
            if std::mem::take(&mut first) {
                continue;
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy {
                    path: self.rel.clone(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn read_key(path: &Path, key: &str) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
            })
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_conversion() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262144), 10000);
        assert_eq!(shares_to_weight(1024), 39);
    }

    #[test]
    fn limits_validation() {
        assert!(Limits {
            memory: Some(1024),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Limits {
            cpus: Some(0.0),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Limits {
            cpu_shares: Some(1),
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(Limits {
            cpus: Some(0.5),
            memory: Some(64 << 20),
            ..Default::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn read_key_parses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(read_key(&p, "oom_kill"), 2);
        assert_eq!(read_key(&p, "nope"), 0);
    }
}
