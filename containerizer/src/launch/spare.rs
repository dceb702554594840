//! Spare task directories: made by a supervisor once its task is done, claimed by a later
//! launch with one rename.
//!
//! A task's directories (`containers/<id>`, `rootfs/<id>`) spread over the file system's block
//! groups ([`super::state::prepare_state_dirs`]). On ext4 that makes the launch's first
//! `mkdir` pick a group by scanning the group descriptors and, often, load that group's inode
//! and block bitmaps from disk: 0.2-1 ms of the launch's own path on this VM's root, where
//! the same `mkdir` on tmpfs takes 15 µs. So the directories are made ahead, off every
//! launch's path: a supervisor whose task has ended (and been reported) makes up to
//! [`SLOTS`] of each kind it used in `<root>/spare/` (itself a top directory, so they spread
//! the same way), complete and then renamed into a slot, and a launch renames one into place
//! (~15 µs; the directory keeps its group, where the task's files then go). With none ready
//! a launch makes its own, as before. A removed task's own directories become spares too
//! ([`recycle`]: emptied, the parts the task could reach made anew), so that in the steady state
//! no task directory is made or deleted at all: on ext4 each one deleted is a block freed (a
//! synchronous discard where the file system is mounted `discard`: 12 per task here before, 5
//! after). `CAISSON_SPARE_DIRS=0` in the launcher's (and so the supervisors') environment
//! turns all this off.
use std::fs;
use std::path::{Path, PathBuf};

/// Spares made per kind.
pub const SLOTS: usize = 2;

/// Spares kept per kind at most: an ended task's own directories ([`recycle`]) may fill up to
/// this many, so that a supervisor that made new ones a moment before never takes the slot an
/// ended task's would have gone to.
pub const MAX_SLOTS: usize = 2 * SLOTS;

/// The directory under the state root.
pub const DIR: &str = "spare";

/// Prefix of a spare being made (complete ones are renamed into a slot);
/// [`super::Runtime::sweep_trash`] removes old ones a killed supervisor left.
pub const TMP_PREFIX: &str = ".tmp-";

/// What a spare is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `containers/<id>` of a native task: `etc/` and `sandbox/`.
    Task,
    /// `containers/<id>` of a Wasm task: `sandbox/` only (a Wasm task has no /etc).
    Wasm,
    /// `rootfs/<id>` of an overlay root: `upper/`, `work/`, `merged/`.
    Rootfs,
}

impl Kind {
    /// The kind of `spec`'s task directory.
    pub fn of_task(spec: &super::spec::TaskSpec) -> Kind {
        match spec.wasm {
            Some(_) => Kind::Wasm,
            None => Kind::Task,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Task => "task",
            Kind::Wasm => "wasm",
            Kind::Rootfs => "rootfs",
        }
    }

    /// The subdirectories and their modes, as the launch paths make them.
    fn children(self) -> &'static [(&'static str, u32)] {
        match self {
            Kind::Task => &[("etc", 0o777), ("sandbox", 0o777)],
            Kind::Wasm => &[("sandbox", 0o777)],
            Kind::Rootfs => &crate::image::rootfs::OVERLAY_DIRS,
        }
    }
}

fn enabled() -> bool {
    std::env::var_os("CAISSON_SPARE_DIRS").is_none_or(|v| v != "0")
}

fn slot(root: &Path, kind: Kind, k: usize) -> PathBuf {
    root.join(DIR).join(format!("{}.{k}", kind.name()))
}

/// Renames a spare of `kind` to `dest` (which must not exist). False when none is ready (or
/// spares are off): the caller makes `dest` itself.
pub fn claim(root: &Path, kind: Kind, dest: &Path) -> bool {
    if !enabled() {
        return false;
    }
    // rename(2) would replace an empty directory at `dest`: one that exists is left to the
    // caller's own mkdir, which reports it. (Task ids are fresh and random: no other process
    // makes `dest` meanwhile.)
    if fs::symlink_metadata(dest).is_ok() {
        return false;
    }
    // A slot another launch took first is simply gone (ENOENT): the next one, then none.
    (0..MAX_SLOTS).any(|k| fs::rename(slot(root, kind, k), dest).is_ok())
}

/// Makes spares of each of `kinds` until there are [`SLOTS`] of it (best effort: a failure is
/// only logged). For supervisors, after their task's end has been reported.
pub fn refill(root: &Path, kinds: &[Kind]) {
    if !enabled() || kinds.is_empty() {
        return;
    }
    let dir = match spare_dir(root) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!("making {}: {e}", root.join(DIR).display());
            return;
        }
    };
    for &kind in kinds {
        let free: Vec<PathBuf> = (0..MAX_SLOTS)
            .map(|k| slot(root, kind, k))
            .filter(|p| fs::symlink_metadata(p).is_err())
            .collect();
        let missing = SLOTS.saturating_sub(MAX_SLOTS - free.len());
        for to in free.into_iter().take(missing) {
            if let Err(e) = make_into(&dir, kind, &to) {
                tracing::debug!("making a spare {} directory: {e}", kind.name());
                break;
            }
        }
    }
}

/// `<root>/spare`, made if missing.
fn spare_dir(root: &Path) -> std::io::Result<PathBuf> {
    let dir = root.join(DIR);
    if !dir.is_dir() {
        fs::create_dir_all(&dir)?;
        // Only a placement hint (see the module's note).
        let _ = crate::sys::fsflags::mark_top_dir(&dir);
    }
    Ok(dir)
}

/// Makes one spare of `kind` in `dir` and renames it to `to`; a spare another supervisor put
/// there meanwhile wins (a non-empty directory is never replaced) and ours goes.
fn make_into(dir: &Path, kind: Kind, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        kind.name(),
        std::process::id()
    ));
    // One of ours from an earlier life of this pid, killed half-way.
    if fs::symlink_metadata(&tmp).is_ok() {
        fs::remove_dir_all(&tmp)?;
    }
    let made = fs::DirBuilder::new()
        .mode(0o777)
        .create(&tmp)
        .and_then(|()| {
            kind.children().iter().try_for_each(|(name, mode)| {
                fs::DirBuilder::new().mode(*mode).create(tmp.join(name))
            })
        });
    let placed = made.and_then(|()| fs::rename(&tmp, to));
    if placed.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    match placed {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => Ok(()),
        r => r,
    }
}

/// Makes an ended task's directory of `kind` (renamed out of the way already, e.g. into
/// `trash/`) a spare when a slot is free, instead of deleting it: on ext4 every directory
/// deleted is a block freed (a synchronous discard on a file system mounted `discard`) and
/// every one made an inode and a block allocated, a dozen per task, on the same two CPUs as
/// the next launch. Its files go; the directories the task could reach (an overlay root's
/// `upper/`, the `sandbox/`) are always made anew, so that nothing a task wrote, nor a copy
/// of its mounts left in another mount namespace, can reach a later task; `work/` is emptied
/// (overlay refuses a `volatile` work dir used before). False when spares are off, the slots
/// ([`MAX_SLOTS`]) are full, or `dir` is not what a task of `kind` leaves (the caller deletes
/// it as before). Not for a task with a user namespace (its directories belong to its ids).
pub fn recycle(root: &Path, kind: Kind, dir: &Path) -> bool {
    if !enabled() {
        return false;
    }
    let Some(to) = (0..MAX_SLOTS)
        .map(|k| slot(root, kind, k))
        .find(|s| fs::symlink_metadata(s).is_err())
    else {
        return false;
    };
    if let Err(e) = spare_dir(root) {
        tracing::debug!("making {}: {e}", root.join(DIR).display());
        return false;
    }
    match scrub(kind, dir) {
        // A slot another supervisor filled meanwhile is never replaced.
        Ok(()) => crate::sys::rename2(dir, &to, crate::sys::Rename::NoReplace).is_ok(),
        Err(e) => {
            tracing::debug!("not reusing {}: {e}", dir.display());
            false
        }
    }
}

/// [`recycle`] for each path with a kind (under `root`); returns those that did not become
/// spares, to delete.
pub fn recycle_all(root: Option<&Path>, paths: Vec<(PathBuf, Option<Kind>)>) -> Vec<PathBuf> {
    paths
        .into_iter()
        .filter(|(p, kind)| !matches!((root, kind), (Some(r), Some(k)) if recycle(r, *k, p)))
        .map(|(p, _)| p)
        .collect()
}

/// Makes `dir` what [`make_into`] makes for `kind` (see [`recycle`]).
fn scrub(kind: Kind, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unexpected = |what: String| std::io::Error::other(what);
    let top = fs::symlink_metadata(dir)?;
    if !top.is_dir() {
        return Err(unexpected("not a directory".into()));
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = fs::symlink_metadata(entry.path())?;
        let known = kind.children().iter().any(|(n, _)| entry.file_name() == *n);
        match (known, meta.is_dir()) {
            (true, true) => {
                // Something still mounted there (an overlay's merged/) is never taken along.
                if meta.dev() != top.dev() {
                    return Err(unexpected(format!("{:?} is a mount", entry.file_name())));
                }
            }
            (false, false) => fs::remove_file(entry.path())?,
            _ => return Err(unexpected(format!("unexpected {:?}", entry.file_name()))),
        }
    }
    for &(name, mode) in kind.children() {
        let child = dir.join(name);
        let fresh = matches!(name, "sandbox" | crate::image::rootfs::UPPER);
        if fresh && child.exists() {
            fs::remove_dir_all(&child)?;
        }
        if !child.exists() {
            fs::DirBuilder::new().mode(mode).create(&child)?;
            continue;
        }
        for entry in fs::read_dir(&child)? {
            let p = entry?.path();
            match fs::symlink_metadata(&p)?.is_dir() {
                true => fs::remove_dir_all(&p)?,
                false => fs::remove_file(&p)?,
            }
        }
    }
    Ok(())
}

/// The kinds a supervised task used: its task directory's, and an overlay root's when one of
/// the paths it owns is `<root>/rootfs/<id>`.
pub fn kinds_of(root: &Path, spec: &super::spec::TaskSpec) -> Vec<Kind> {
    let mut kinds = vec![Kind::of_task(spec)];
    if spec
        .cleanup
        .iter()
        .any(|p| kind_of_owned(root, p).is_some())
    {
        kinds.push(Kind::Rootfs);
    }
    kinds
}

/// The kind of spare a path a task owns (`TaskSpec::cleanup`) is: an overlay root for
/// `<root>/rootfs/<id>`, none for anything else.
pub fn kind_of_owned(root: &Path, path: &Path) -> Option<Kind> {
    (path.parent() == Some(&root.join("rootfs"))).then_some(Kind::Rootfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_made_then_claimed_then_made_again() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // None yet: the launch makes its own.
        assert!(!claim(r, Kind::Task, &r.join("a")));
        assert!(!r.join("a").exists());
        refill(r, &[Kind::Task, Kind::Rootfs]);
        let mut names: Vec<String> = fs::read_dir(r.join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["rootfs.0", "rootfs.1", "task.0", "task.1"]);
        // Claimed whole, each once.
        for id in ["a", "b"] {
            assert!(claim(r, Kind::Task, &r.join(id)));
            assert!(r.join(id).join("etc").is_dir() && r.join(id).join("sandbox").is_dir());
        }
        assert!(!claim(r, Kind::Task, &r.join("c")));
        assert!(claim(r, Kind::Rootfs, &r.join("root")));
        let work = fs::metadata(r.join("root/work")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&work.permissions()) & 0o777,
            0o700
        );
        // An existing destination is never replaced, even an empty one.
        fs::create_dir(r.join("taken")).unwrap();
        assert!(!claim(r, Kind::Rootfs, &r.join("taken")));
        assert_eq!(fs::read_dir(r.join("taken")).unwrap().count(), 0);
        // Refilled up to the slots, no further; nothing half-made left.
        refill(r, &[Kind::Task, Kind::Rootfs]);
        refill(r, &[Kind::Task]);
        let left: Vec<String> = fs::read_dir(r.join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2 * SLOTS, "{left:?}");
        assert!(left.iter().all(|n| !n.starts_with(TMP_PREFIX)));
        // One a killed supervisor left half-made goes with the trash; the spares stay.
        let half = r.join(DIR).join(format!("{TMP_PREFIX}task-4242"));
        fs::create_dir_all(half.join("etc")).unwrap();
        assert_eq!(
            super::super::Runtime::new(r).sweep_trash(Default::default()),
            1
        );
        assert!(!half.exists());
        assert_eq!(fs::read_dir(r.join(DIR)).unwrap().count(), 2 * SLOTS);
    }

    #[test]
    fn an_ended_tasks_directories_become_spares() {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let ino = |p: &Path| fs::symlink_metadata(p).unwrap().ino();
        // What a native task and its overlay root leave behind.
        let task = r.join("trash/t");
        fs::create_dir_all(task.join("etc")).unwrap();
        fs::create_dir_all(task.join("sandbox/sub")).unwrap();
        for f in [
            "state.json",
            "config.json",
            "stdout.log",
            "etc/hosts",
            "sandbox/sub/f",
        ] {
            fs::write(task.join(f), "x").unwrap();
        }
        let rootfs = r.join("trash/t.0");
        for d in ["upper/tmp", "work/work/incompat/volatile", "merged"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::write(rootfs.join("image-id"), "sha256:x").unwrap();
        // A task may change its root's and its sandbox's modes: those come back new.
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        for d in [task.join("sandbox"), rootfs.join("upper")] {
            fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o701)).unwrap();
        }
        let (old_task, old_etc) = (ino(&task), ino(&task.join("etc")));

        assert!(recycle(r, Kind::Task, &task));
        assert!(recycle(r, Kind::Rootfs, &rootfs));
        assert!(!task.exists() && !rootfs.exists());
        // The same directories, emptied; the sandbox and the upper dir made anew.
        let (spare, root_spare) = (r.join(DIR).join("task.0"), r.join(DIR).join("rootfs.0"));
        assert_eq!((ino(&spare), ino(&spare.join("etc"))), (old_task, old_etc));
        assert_ne!(mode(&spare.join("sandbox")), 0o701);
        assert_ne!(mode(&root_spare.join("upper")), 0o701);
        for (d, n) in [
            (spare.clone(), 2),
            (spare.join("etc"), 0),
            (spare.join("sandbox"), 0),
            (root_spare.clone(), 3),
            (root_spare.join("upper"), 0),
            (root_spare.join("work"), 0),
        ] {
            assert_eq!(fs::read_dir(&d).unwrap().count(), n, "{}", d.display());
        }
        // Claimed like any spare.
        assert!(claim(r, Kind::Rootfs, &r.join("next")));

        // Not what a task leaves: deleted by the caller instead.
        let odd = r.join("trash/odd");
        fs::create_dir_all(odd.join("bundle")).unwrap();
        assert!(!recycle(r, Kind::Task, &odd));
        assert!(odd.join("bundle").is_dir());
        // Up to MAX_SLOTS, then nothing touched; refilling makes none while SLOTS are there.
        refill(r, &[Kind::Wasm]);
        let count = |kind: &str| {
            let names = fs::read_dir(r.join(DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name());
            names
                .filter(|n| n.to_string_lossy().starts_with(kind))
                .count()
        };
        assert_eq!(count("wasm."), SLOTS);
        for k in SLOTS..=MAX_SLOTS {
            let more = r.join(format!("trash/more{k}"));
            fs::create_dir_all(more.join("sandbox")).unwrap();
            fs::write(more.join("state.json"), "x").unwrap();
            assert_eq!(recycle(r, Kind::Wasm, &more), k < MAX_SLOTS);
            assert_eq!(more.join("state.json").exists(), k == MAX_SLOTS);
        }
        assert_eq!(count("wasm."), MAX_SLOTS);
        for k in 0..MAX_SLOTS - 1 {
            assert!(claim(r, Kind::Wasm, &r.join(format!("w{k}"))));
        }
        refill(r, &[Kind::Wasm]);
        assert_eq!(count("wasm."), SLOTS);
    }

    #[test]
    fn kinds_follow_the_task() {
        let root = Path::new("/r");
        let mut spec = super::super::spec::TaskSpec::default();
        assert_eq!(kinds_of(root, &spec), [Kind::Task]);
        spec.cleanup = vec![PathBuf::from("/r/rootfs/x")];
        assert_eq!(kinds_of(root, &spec), [Kind::Task, Kind::Rootfs]);
        spec.cleanup = vec![PathBuf::from("/elsewhere/x")];
        assert_eq!(kinds_of(root, &spec), [Kind::Task]);
    }
}
