//! User namespaces for native tasks (podman's `--userns=auto`, `--uidmap`, `--gidmap`): the
//! task's root is an unprivileged host id, root only inside.
//!
//! How a task gets one:
//! - Its image's layers are mounted idmapped under the overlay (`rootfs::CreateOptions::idmap`):
//!   files owned by N in a layer show as owned by the host id that N maps to, so the store stays
//!   unshifted and is shared with every other task and mapping. The upper dir (the task's own
//!   writes) is owned by the host id of the task's root, and writes land there shifted.
//! - The supervisor clones the init into a new user namespace together with the others (pid,
//!   mount, uts, ipc, net, which it then owns), writes its maps, and only then lets it go on.
//!   The init does what needs the host's view (the root's bind, opening the sources of its
//!   bind mounts) first, then becomes the namespace's root and mounts the rest: /dev's nodes
//!   are bind mounts of the host's (no mknod in a user namespace).
//!
//! `--userns=auto` takes a free slot of [`AUTO_SLOT`] ids from the host range podman uses (the
//! `containers` entries of /etc/subuid and /etc/subgid) or, without one, from
//! [`DEFAULT_RANGE`]. A slot is claimed by a file `<root>/userns/<slot>` made exclusively, which
//! names the task and the launcher's pid; it is free again once that task is removed and that
//! launcher is gone (nothing to release, so a crash leaks nothing).
use std::fs;
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::LaunchError;

/// Ids per `--userns=auto` slot (a task maps at most this many).
pub const AUTO_SLOT: u32 = 65536;

/// Host ids for `--userns=auto` when /etc/subuid has no `containers` entry: 4,095 slots
/// starting at 0x70000000 (above systemd's range for nspawn containers, below 2^31).
pub const DEFAULT_RANGE: IdRange = IdRange {
    start: 0x7000_0000,
    count: 0x0FFF_0000,
};

/// Where the claims of `--userns=auto` slots are, under the state root.
pub const CLAIMS_DIR: &str = "userns";

/// Most lines a kernel id map takes (Linux 4.15).
const MAX_MAP_LINES: usize = 340;

/// One line of a uid or gid map: `size` ids from `container` inside map to `host` outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMapping {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

impl FromStr for IdMapping {
    type Err = String;

    /// `CONTAINER:HOST:SIZE`, as podman's `--uidmap`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid id mapping {s:?}: expected CONTAINER:HOST:SIZE (numbers)");
        let mut it = s.split(':').map(|p| p.trim().parse::<u32>());
        match (it.next(), it.next(), it.next(), it.next()) {
            (Some(Ok(container)), Some(Ok(host)), Some(Ok(size)), None) => Ok(IdMapping {
                container,
                host,
                size,
            }),
            _ => Err(bad()),
        }
    }
}

/// A task's user namespace: its uid and gid maps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNamespace {
    pub uid_map: Vec<IdMapping>,
    pub gid_map: Vec<IdMapping>,
}

impl UserNamespace {
    /// Both maps must be non-empty, free of overlaps (inside and outside), within 32 bits, and
    /// map the namespace's root (the init becomes it to set the task up).
    pub fn validate(&self) -> Result<(), String> {
        for (what, map) in [("uid", &self.uid_map), ("gid", &self.gid_map)] {
            if map.is_empty() {
                return Err(format!("the {what} map is empty"));
            }
            if map.len() > MAX_MAP_LINES {
                return Err(format!(
                    "the {what} map has {} ranges; the kernel takes at most {MAX_MAP_LINES}",
                    map.len()
                ));
            }
            for m in map.iter() {
                if m.size == 0 {
                    return Err(format!(
                        "{what} mapping {}:{}:0 maps nothing",
                        m.container, m.host
                    ));
                }
                let end = |start: u32| start as u64 + m.size as u64;
                if end(m.container) > u32::MAX as u64 || end(m.host) > u32::MAX as u64 {
                    return Err(format!(
                        "{what} mapping {}:{}:{} goes past the largest id",
                        m.container, m.host, m.size
                    ));
                }
            }
            let overlap = |key: fn(&IdMapping) -> u32| {
                let mut r: Vec<(u64, u64)> = map
                    .iter()
                    .map(|m| (key(m) as u64, key(m) as u64 + m.size as u64))
                    .collect();
                r.sort();
                r.windows(2).any(|w| w[1].0 < w[0].1)
            };
            if overlap(|m| m.container) || overlap(|m| m.host) {
                return Err(format!("the {what} map has overlapping ranges"));
            }
            if lookup(map, 0).is_none() {
                return Err(format!(
                    "the {what} map must map the container's {what} 0 (its root)"
                ));
            }
        }
        Ok(())
    }

    /// The host uid of uid `id` inside.
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        lookup(&self.uid_map, id)
    }

    /// The host gid of gid `id` inside.
    pub fn host_gid(&self, id: u32) -> Option<u32> {
        lookup(&self.gid_map, id)
    }

    /// The host uid and gid of the namespace's root.
    pub fn host_root(&self) -> (u32, u32) {
        (self.host_uid(0).unwrap_or(0), self.host_gid(0).unwrap_or(0))
    }

    /// `/proc/PID/uid_map`'s text.
    pub fn uid_map_text(&self) -> String {
        map_text(&self.uid_map)
    }

    /// `/proc/PID/gid_map`'s text.
    pub fn gid_map_text(&self) -> String {
        map_text(&self.gid_map)
    }
}

fn lookup(map: &[IdMapping], id: u32) -> Option<u32> {
    map.iter()
        .find(|m| id >= m.container && ((id - m.container) as u64) < m.size as u64)
        .map(|m| m.host + (id - m.container))
}

fn map_text(map: &[IdMapping]) -> String {
    map.iter()
        .map(|m| format!("{} {} {}\n", m.container, m.host, m.size))
        .collect()
}

/// What `--userns` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsernsMode {
    /// The host's user namespace (the default).
    Host,
    /// A free slot of host ids; `size` ids mapped from 0 inside.
    Auto { size: u32 },
}

impl FromStr for UsernsMode {
    type Err = String;

    /// `host` (or empty), `auto`, `auto:size=N` (1..=65536).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("invalid --userns {s:?}: {why}");
        match s {
            "" | "host" => return Ok(UsernsMode::Host),
            "auto" => return Ok(UsernsMode::Auto { size: AUTO_SLOT }),
            _ => {}
        }
        let Some(opts) = s.strip_prefix("auto:") else {
            return Err(bad("expected host, auto or auto:size=N"));
        };
        let mut size = AUTO_SLOT;
        for o in opts.split(',') {
            match o.split_once('=') {
                Some(("size", n)) => {
                    size = n
                        .parse()
                        .ok()
                        .filter(|n| (1..=AUTO_SLOT).contains(n))
                        .ok_or_else(|| bad(&format!("size must be 1 to {AUTO_SLOT}")))?;
                }
                _ => return Err(bad(&format!("unknown option {o:?} (only size=N)"))),
            }
        }
        Ok(UsernsMode::Auto { size })
    }
}

/// A range of host ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

/// The `containers` entry of a subordinate id file's text (`NAME:START:COUNT` lines).
pub fn containers_range(text: &str) -> Option<IdRange> {
    text.lines().find_map(|l| {
        let mut it = l.trim().split(':');
        if it.next()? != "containers" {
            return None;
        }
        let start: u32 = it.next()?.parse().ok()?;
        let count: u32 = it.next()?.parse().ok()?;
        (start as u64 + count as u64 <= u32::MAX as u64 && count >= 1)
            .then_some(IdRange { start, count })
    })
}

/// The host uid and gid ranges `--userns=auto` takes slots from.
pub fn auto_ranges() -> (IdRange, IdRange) {
    let read = |p: &str| {
        fs::read_to_string(p)
            .ok()
            .and_then(|t| containers_range(&t))
            .unwrap_or(DEFAULT_RANGE)
    };
    (read("/etc/subuid"), read("/etc/subgid"))
}

/// Claims the lowest free `--userns=auto` slot under `root` for task `task_id` and returns
/// its namespace: `size` ids from 0 inside, uids and gids from the same slot of their ranges.
pub fn allocate(root: &Path, task_id: &str, size: u32) -> Result<UserNamespace, LaunchError> {
    allocate_in(root, task_id, size, auto_ranges())
}

/// [`allocate`] from the given uid and gid ranges.
pub fn allocate_in(
    root: &Path,
    task_id: &str,
    size: u32,
    (uids, gids): (IdRange, IdRange),
) -> Result<UserNamespace, LaunchError> {
    let io = |what: &'static str| {
        move |e: std::io::Error| LaunchError::Io {
            context: what.to_string(),
            source: e,
        }
    };
    let dir = root.join(CLAIMS_DIR);
    fs::create_dir_all(&dir).map_err(io("creating the user namespace claims"))?;
    let slots = (uids.count / AUTO_SLOT).min(gids.count / AUTO_SLOT);
    if slots == 0 || size > AUTO_SLOT {
        return Err(LaunchError::Invalid(format!(
            "no --userns=auto slot of {AUTO_SLOT} ids fits the host ranges (uids {}+{}, gids {}+{})",
            uids.start, uids.count, gids.start, gids.count
        )));
    }
    let mut taken = vec![false; slots as usize];
    for e in fs::read_dir(&dir)
        .map_err(io("reading the user namespace claims"))?
        .flatten()
    {
        let Some(slot) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if slot >= slots {
            continue;
        }
        if claim_is_live(root, &e.path()) {
            taken[slot as usize] = true;
        } else {
            let _ = fs::remove_file(e.path());
        }
    }
    let me = std::process::id();
    for slot in (0..slots).filter(|s| !taken[*s as usize]) {
        let path = dir.join(slot.to_string());
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(format!("{task_id} {me}\n").as_bytes())
                    .map_err(io("writing a user namespace claim"))?;
                let one = |r: IdRange| IdMapping {
                    container: 0,
                    host: r.start + slot * AUTO_SLOT,
                    size,
                };
                return Ok(UserNamespace {
                    uid_map: vec![one(uids)],
                    gid_map: vec![one(gids)],
                });
            }
            // Claimed meanwhile by another launch: the next one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io("claiming a user namespace slot")(e)),
        }
    }
    Err(LaunchError::Invalid(format!(
        "all {slots} --userns=auto slots are in use"
    )))
}

/// Gives back the `--userns=auto` slot claimed for task `id` (a launch that failed); a
/// removed task's slot needs nothing (see [`claim_is_live`]).
pub fn release(root: &Path, id: &str) {
    super::state::remove_claims(&root.join(CLAIMS_DIR), |t| {
        t.split_whitespace().next() == Some(id)
    });
}

/// A claim holds while its task exists or the launcher that made it still runs (between the
/// claim and the task's record).
fn claim_is_live(root: &Path, claim: &Path) -> bool {
    let Ok(text) = fs::read_to_string(claim) else {
        // Being written (or unreadable): leave it.
        return true;
    };
    let mut it = text.split_whitespace();
    let (Some(task), pid) = (it.next(), it.next().and_then(|p| p.parse::<i32>().ok())) else {
        return false;
    };
    if super::valid_name(task) && root.join("containers").join(task).exists() {
        return true;
    }
    pid.is_some_and(|p| {
        p > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(u: &[(u32, u32, u32)], g: &[(u32, u32, u32)]) -> UserNamespace {
        let m = |v: &[(u32, u32, u32)]| {
            v.iter()
                .map(|&(container, host, size)| IdMapping {
                    container,
                    host,
                    size,
                })
                .collect()
        };
        UserNamespace {
            uid_map: m(u),
            gid_map: m(g),
        }
    }

    #[test]
    fn mappings_and_modes_parse_as_podman_writes_them() {
        assert_eq!(
            "0:100000:65536".parse::<IdMapping>().unwrap(),
            IdMapping {
                container: 0,
                host: 100000,
                size: 65536
            }
        );
        for bad in ["0:1", "0:1:2:3", "a:1:2", "-1:0:1", ""] {
            let e = bad.parse::<IdMapping>().unwrap_err();
            assert!(e.contains("CONTAINER:HOST:SIZE"), "{bad}: {e}");
        }
        assert_eq!("host".parse::<UsernsMode>().unwrap(), UsernsMode::Host);
        assert_eq!(
            "auto".parse::<UsernsMode>().unwrap(),
            UsernsMode::Auto { size: AUTO_SLOT }
        );
        assert_eq!(
            "auto:size=1024".parse::<UsernsMode>().unwrap(),
            UsernsMode::Auto { size: 1024 }
        );
        for bad in [
            "keep-id",
            "auto:size=0",
            "auto:size=70000",
            "auto:uidmapping=0:1:1",
        ] {
            assert!(bad.parse::<UsernsMode>().is_err(), "{bad}");
        }
    }

    #[test]
    fn maps_must_be_disjoint_and_map_root() {
        let ok = ns(
            &[(0, 100000, 1000), (1000, 300000, 10)],
            &[(0, 100000, 65536)],
        );
        ok.validate().unwrap();
        assert_eq!(ok.host_uid(0), Some(100000));
        assert_eq!(ok.host_uid(999), Some(100999));
        assert_eq!(ok.host_uid(1005), Some(300005));
        assert_eq!(ok.host_uid(1010), None);
        assert_eq!(ok.uid_map_text(), "0 100000 1000\n1000 300000 10\n");
        let e = |n: UserNamespace| n.validate().unwrap_err();
        assert!(e(ns(&[(1, 100000, 10)], &[(0, 1, 1)])).contains("uid 0"));
        assert!(e(ns(&[(0, 100000, 10)], &[])).contains("gid map is empty"));
        assert!(e(ns(&[(0, 100000, 10), (5, 200000, 10)], &[(0, 1, 1)])).contains("overlapping"));
        assert!(e(ns(&[(0, 100000, 10), (10, 100005, 10)], &[(0, 1, 1)])).contains("overlapping"));
        assert!(e(ns(&[(0, 100000, 0)], &[(0, 1, 1)])).contains("maps nothing"));
        assert!(e(ns(&[(0, u32::MAX - 5, 10)], &[(0, 1, 1)])).contains("largest id"));
    }

    #[test]
    fn subordinate_files_give_the_containers_range() {
        let text = "alice:100000:65536\ncontainers:2147483647:2147483647\n";
        assert_eq!(
            containers_range(text),
            Some(IdRange {
                start: 2147483647,
                count: 2147483647
            })
        );
        assert_eq!(containers_range("alice:100000:65536\n"), None);
        assert_eq!(containers_range("containers:4294967295:2\n"), None);
    }

    #[test]
    fn auto_slots_are_exclusive_and_free_again_once_their_task_and_launcher_are_gone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let r = IdRange {
            start: 1_000_000,
            count: 3 * AUTO_SLOT,
        };
        let g = IdRange {
            start: 5_000_000,
            count: 2 * AUTO_SLOT + 5,
        };
        let a = allocate_in(root, "aaa", AUTO_SLOT, (r, g)).unwrap();
        assert_eq!(
            a.uid_map[0],
            IdMapping {
                container: 0,
                host: 1_000_000,
                size: AUTO_SLOT
            }
        );
        assert_eq!(a.gid_map[0].host, 5_000_000);
        // This process (the launcher) is alive: the claim holds without a task record.
        let b = allocate_in(root, "bbb", 10, (r, g)).unwrap();
        assert_eq!(
            b.uid_map[0],
            IdMapping {
                container: 0,
                host: 1_000_000 + AUTO_SLOT,
                size: 10
            }
        );
        assert_eq!(b.gid_map[0].host, 5_000_000 + AUTO_SLOT);
        // Two gid slots only: the range that is shorter decides.
        let e = allocate_in(root, "ccc", 10, (r, g))
            .unwrap_err()
            .to_string();
        assert!(e.contains("all 2"), "{e}");
        // A claim whose task is gone and whose launcher is dead is free again; one whose task
        // exists is not.
        fs::write(root.join(CLAIMS_DIR).join("0"), "aaa 999999999\n").unwrap();
        fs::write(root.join(CLAIMS_DIR).join("1"), "bbb 999999999\n").unwrap();
        fs::create_dir_all(root.join("containers/bbb")).unwrap();
        let c = allocate_in(root, "ccc", 10, (r, g)).unwrap();
        assert_eq!(c.uid_map[0].host, 1_000_000);
        assert_eq!(
            fs::read_to_string(root.join(CLAIMS_DIR).join("0")).unwrap(),
            format!("ccc {}\n", std::process::id())
        );
        let e = allocate_in(root, "ddd", 10, (r, g))
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use"), "{e}");
    }
}
