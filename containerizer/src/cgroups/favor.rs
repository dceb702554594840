//! cgroup `favordynmods`: cheap task migrations, once per process, for every launcher.
//!
//! Every cgroup migration (a write to `cgroup.procs`, what a v1 or hybrid launch does for each
//! hierarchy it joins) takes the kernel's global `cgroup_threadgroup_rwsem` for writing. Unless
//! some hierarchy has the `favordynmods` flag, that writer first waits for an RCU grace period:
//! about 12 ms per launch on our 2-core VMs (0.4 ms with the flag). The kernel documents the
//! trade (Documentation/admin-guide/cgroup-v2.rst): "Reduce the latencies of dynamic cgroup
//! modifications such as task migrations and controller on/offs at the cost of making hot path
//! operations such as forks and exits more expensive". The flag is global in effect: one
//! hierarchy having it is enough.
//!
//! [`favor_dynamic_modifications`] turns it on if no mounted hierarchy has it: cgroup2 (pure v2
//! or the hybrid layout's `unified` mount) is reconfigured with its current options plus
//! `favordynmods` (a reconfiguration replaces the root's flags, so the others are passed again;
//! the mount's own flags are untouched, `fspick`); v1 hierarchies refuse flag changes, so on a
//! pure v1 host a small named hierarchy without controllers is mounted with the flag at
//! [`V1_MOUNT`] and left mounted (on kernels before 6.18 the flag lapses when its hierarchy
//! goes). The kernel command line `cgroup_favordynmods=true` does the same at boot. Opt out with
//! `CAISSON_CGROUP_FAVORDYNMODS=0`. Never fatal: a launch works without it, only slower.
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::sys::mount::FsContext;

/// The opt-out: `0`, `false`, `no` or `off` leave the host's cgroup flags alone.
pub const ENV: &str = "CAISSON_CGROUP_FAVORDYNMODS";

/// Where a pure v1 host gets its named hierarchy with the flag.
pub const V1_MOUNT: &str = "/run/caisson/cgroup-favordynmods";

/// The name of that hierarchy (`name=` of a v1 mount without controllers).
pub const V1_NAME: &str = "caisson-favordynmods";

const FLAG: &str = "favordynmods";

/// What [`favor_dynamic_modifications`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Favor {
    /// A hierarchy mounted here already has the flag (set by us, another tool or the boot).
    AlreadyOn(PathBuf),
    /// Opted out through [`ENV`].
    Disabled,
    /// No cgroup hierarchy is mounted.
    NoCgroups,
    /// The cgroup2 mount here was reconfigured with the flag.
    Remounted(PathBuf),
    /// A named v1 hierarchy with the flag was mounted here.
    MountedV1(PathBuf),
    /// The kernel does not know the flag (before Linux 6.0).
    Unsupported,
    /// It could not be set (e.g. no privilege over the host's cgroups).
    Failed(String),
}

impl Favor {
    /// True if some hierarchy has the flag (migrations are cheap).
    pub fn is_on(&self) -> bool {
        matches!(
            self,
            Favor::AlreadyOn(_) | Favor::Remounted(_) | Favor::MountedV1(_)
        )
    }
}

/// A cgroup mount from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    point: PathBuf,
    v2: bool,
    /// Superblock options, without `rw`/`ro` (the mount's flags are not the root's).
    options: Vec<String>,
}

/// The cgroup and cgroup2 mounts of a mountinfo table.
fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let v2 = match post.next()? {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            let options = post
                .nth(1)
                .unwrap_or("")
                .split(',')
                .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
                .map(String::from)
                .collect();
            Some(CgroupMount {
                point: PathBuf::from(crate::launch::state::unescape_mountinfo(point)),
                v2,
                options,
            })
        })
        .collect()
}

/// What to do, from the mount table and the opt-out variable.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Done(Favor),
    /// Reconfigure the cgroup2 root at `point` with these options (its own plus the flag).
    Reconfigure {
        point: PathBuf,
        options: Vec<String>,
    },
    /// Mount the named v1 hierarchy.
    MountV1,
}

fn plan(mountinfo: &str, env: Option<&str>) -> Plan {
    if env.is_some_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        )
    }) {
        return Plan::Done(Favor::Disabled);
    }
    let mounts = cgroup_mounts(mountinfo);
    if let Some(m) = mounts.iter().find(|m| m.options.iter().any(|o| o == FLAG)) {
        return Plan::Done(Favor::AlreadyOn(m.point.clone()));
    }
    if let Some(m) = mounts.iter().find(|m| m.v2) {
        let mut options = m.options.clone();
        options.push(FLAG.into());
        return Plan::Reconfigure {
            point: m.point.clone(),
            options,
        };
    }
    if mounts.is_empty() {
        return Plan::Done(Favor::NoCgroups);
    }
    Plan::MountV1
}

fn reconfigure(point: &Path, options: &[String]) -> Favor {
    let res = (|| -> std::io::Result<Result<(), String>> {
        let ctx = FsContext::pick(point)?;
        for o in options {
            let set = match o.split_once('=') {
                Some((k, v)) => ctx.set_string(k, v.as_ref()),
                None => ctx.set_flag(o),
            };
            if let Err(e) = set {
                if o == FLAG && e.raw_os_error() == Some(libc::EINVAL) {
                    return Ok(Err(ctx.messages()));
                }
                return Err(e);
            }
        }
        ctx.reconfigure()?;
        Ok(Ok(()))
    })();
    match res {
        Ok(Ok(())) => Favor::Remounted(point.to_path_buf()),
        Ok(Err(_)) => Favor::Unsupported,
        Err(e) => Favor::Failed(format!(
            "reconfiguring {} with {}: {e}",
            point.display(),
            options.join(",")
        )),
    }
}

fn mount_v1() -> Favor {
    let point = Path::new(V1_MOUNT);
    if let Err(e) = fs::create_dir_all(point) {
        return Favor::Failed(format!("creating {V1_MOUNT}: {e}"));
    }
    let data = format!("none,name={V1_NAME},{FLAG}");
    let flags = nix::mount::MsFlags::MS_NOSUID
        | nix::mount::MsFlags::MS_NODEV
        | nix::mount::MsFlags::MS_NOEXEC;
    match nix::mount::mount(
        Some("cgroup"),
        point,
        Some("cgroup"),
        flags,
        Some(data.as_str()),
    ) {
        Ok(()) => Favor::MountedV1(point.to_path_buf()),
        Err(e) => {
            let _ = fs::remove_dir(point);
            if e == nix::errno::Errno::EINVAL {
                Favor::Unsupported
            } else {
                Favor::Failed(format!("mounting cgroup -o {data} on {V1_MOUNT}: {e}"))
            }
        }
    }
}

/// Makes cgroup migrations cheap (see the module docs), at most once per process; later calls
/// return the first outcome. Logs what it changed once (info), a failure as a warning.
pub fn favor_dynamic_modifications() -> &'static Favor {
    static DONE: OnceLock<Favor> = OnceLock::new();
    DONE.get_or_init(|| {
        let env = std::env::var(ENV).ok();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let out = match plan(&info, env.as_deref()) {
            Plan::Done(f) => f,
            Plan::Reconfigure { point, options } => reconfigure(&point, &options),
            Plan::MountV1 => mount_v1(),
        };
        match &out {
            Favor::Remounted(p) | Favor::MountedV1(p) => tracing::info!(
                "cgroup favordynmods set on {} (cheap task migrations; opt out: {ENV}=0)",
                p.display()
            ),
            Favor::Failed(e) => tracing::warn!("cgroup favordynmods not set: {e}"),
            Favor::Unsupported => {
                tracing::info!("cgroup favordynmods: not supported by this kernel")
            }
            _ => tracing::debug!("cgroup favordynmods: {out:?}"),
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,nosuid,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
";
    const PURE_V2: &str = "\
30 23 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const PURE_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn hybrid_reconfigures_cgroup2_keeping_its_options() {
        assert_eq!(
            plan(HYBRID, None),
            Plan::Reconfigure {
                point: "/sys/fs/cgroup/unified".into(),
                options: vec!["nsdelegate".into(), FLAG.into()],
            }
        );
    }

    #[test]
    fn pure_v2_reconfigures_the_root() {
        assert_eq!(
            plan(PURE_V2, Some("1")),
            Plan::Reconfigure {
                point: "/sys/fs/cgroup".into(),
                options: vec![
                    "nsdelegate".into(),
                    "memory_recursiveprot".into(),
                    FLAG.into()
                ],
            }
        );
    }

    #[test]
    fn pure_v1_mounts_a_named_hierarchy() {
        assert_eq!(plan(PURE_V1, None), Plan::MountV1);
        assert_eq!(plan("", None), Plan::Done(Favor::NoCgroups));
    }

    #[test]
    fn any_hierarchy_with_the_flag_is_enough() {
        let v1 = format!(
            "{PURE_V1}50 31 0:40 / /run/caisson/cgroup-favordynmods rw - cgroup cgroup rw,name={V1_NAME},favordynmods\n"
        );
        assert_eq!(
            plan(&v1, None),
            Plan::Done(Favor::AlreadyOn(V1_MOUNT.into()))
        );
        let v2 = PURE_V2.replace("memory_recursiveprot", "favordynmods,memory_recursiveprot");
        assert_eq!(
            plan(&v2, None),
            Plan::Done(Favor::AlreadyOn("/sys/fs/cgroup".into()))
        );
    }

    #[test]
    fn opt_out() {
        for v in ["0", "false", "OFF", "no"] {
            assert_eq!(plan(HYBRID, Some(v)), Plan::Done(Favor::Disabled));
        }
    }
}
