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
//! a launch makes its own, as before. `CAISSON_SPARE_DIRS=0` in the launcher's (and so the
//! supervisors') environment turns this off.
use std::fs;
use std::path::{Path, PathBuf};

/// Spares kept per kind.
pub const SLOTS: usize = 2;

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
    (0..SLOTS).any(|k| fs::rename(slot(root, kind, k), dest).is_ok())
}

/// Makes spares of each of `kinds` until its slots are full (best effort: a failure is only
/// logged). For supervisors, after their task's end has been reported.
pub fn refill(root: &Path, kinds: &[Kind]) {
    if !enabled() || kinds.is_empty() {
        return;
    }
    let dir = root.join(DIR);
    if let Err(e) = fs::create_dir_all(&dir) {
        tracing::debug!("making {}: {e}", dir.display());
        return;
    }
    // Only a placement hint (see the module's note).
    let _ = crate::sys::fsflags::mark_top_dir(&dir);
    for &kind in kinds {
        for k in 0..SLOTS {
            let to = slot(root, kind, k);
            if fs::symlink_metadata(&to).is_ok() {
                continue;
            }
            if let Err(e) = make_into(&dir, kind, &to) {
                tracing::debug!("making a spare {} directory: {e}", kind.name());
                break;
            }
        }
    }
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

/// The kinds a supervised task used: its task directory's, and an overlay root's when one of
/// the paths it owns is `<root>/rootfs/<id>`.
pub fn kinds_of(root: &Path, spec: &super::spec::TaskSpec) -> Vec<Kind> {
    let mut kinds = vec![Kind::of_task(spec)];
    let rootfs = root.join("rootfs");
    if spec.cleanup.iter().any(|p| p.parent() == Some(&rootfs)) {
        kinds.push(Kind::Rootfs);
    }
    kinds
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
