//! Whole-GPU, exclusive allocation to tasks, recorded in `<root>/gpus/allocations.json` under
//! an flock on `<root>/gpus/lock`, so that launches from separate processes (the CLI is
//! daemonless) never share a GPU and a restart sees exactly what is held.
//!
//! An allocation is released explicitly (the task is removed, or a foreground run ended) or
//! reclaimed as stale by the next reader: when its task's recorded state is terminal (exited,
//! failed, lost), or when its task has no record and the process that made the allocation
//! (recorded by pid and start time) is gone.
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Gpu, GpuError};
use crate::launch::state::{
    now_ms, process_alive, process_start_ticks, write_json_atomic, written_before_boot,
};
use crate::launch::Runtime;

/// GPUs held by one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub task: String,
    /// UUIDs of the GPUs.
    pub gpus: Vec<String>,
    /// The process that made the allocation (it keeps it alive until the task is recorded).
    pub owner_pid: i32,
    pub owner_start_ticks: Option<u64>,
    pub since_ms: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    allocations: Vec<Allocation>,
}

/// The allocator over a state root.
#[derive(Debug, Clone)]
pub struct Allocator {
    root: PathBuf,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GpuError {
    let context = context.into();
    move |source| GpuError::Io { context, source }
}

impl Allocator {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Allocator { root: root.into() }
    }

    fn dir(&self) -> PathBuf {
        self.root.join("gpus")
    }

    fn file(&self) -> PathBuf {
        self.dir().join("allocations.json")
    }

    /// Takes the allocator's lock (blocking) for a read-modify-write of the record.
    fn lock(&self) -> Result<Flock<File>, GpuError> {
        fs::create_dir_all(self.dir()).map_err(io(format!("creating {}", self.dir().display())))?;
        let path = self.dir().join("lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(format!("opening {}", path.display())))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| io(format!("locking {}", path.display()))(e.into()))
    }

    /// The record. One that does not parse but was last written before this boot (a host
    /// crash cut it short: it is not fsynced) held only tasks that died with that boot: it
    /// counts as empty. Damaged during this boot, it is an error (a live task may hold GPUs).
    fn load(&self) -> Result<Record, GpuError> {
        match fs::read(self.file()) {
            Ok(data) => serde_json::from_slice(&data).or_else(|e| {
                if written_before_boot(&self.file()) {
                    tracing::warn!(
                        "{} does not parse ({e}) and predates this boot: starting empty",
                        self.file().display()
                    );
                    return Ok(Record::default());
                }
                Err(GpuError::Io {
                    context: format!("reading {}", self.file().display()),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
            Err(e) => Err(io(format!("reading {}", self.file().display()))(e)),
        }
    }

    fn save(&self, rec: &Record) -> Result<(), GpuError> {
        write_json_atomic(&self.file(), rec)
            .map_err(io(format!("writing {}", self.file().display())))
    }

    /// Whether the task of `a` still holds its GPUs.
    fn live(&self, a: &Allocation) -> bool {
        match Runtime::new(&self.root).info(&a.task) {
            Ok(info) => !info.state.status.is_terminal(),
            Err(_) => process_alive(a.owner_pid, a.owner_start_ticks),
        }
    }

    /// Drops stale allocations; true if any was dropped.
    fn reclaim(&self, rec: &mut Record) -> bool {
        let before = rec.allocations.len();
        rec.allocations.retain(|a| {
            let live = self.live(a);
            if !live {
                tracing::info!(task = %a.task, gpus = ?a.gpus, "reclaiming the GPUs of an ended task");
            }
            live
        });
        rec.allocations.len() != before
    }

    /// Allocates `count` free GPUs among `managed` (lowest index first) to `task`, or refuses
    /// with [`GpuError::Exhausted`].
    pub fn allocate(
        &self,
        task: &str,
        count: usize,
        managed: &[Gpu],
    ) -> Result<Vec<Gpu>, GpuError> {
        self.allocate_with(task, count, managed, &[])
    }

    /// Allocates `required` (e.g. GPUs named by CDI devices), which must be free, and `count`
    /// more free GPUs among `managed`, to `task` in one allocation; returns `required` first.
    pub fn allocate_with(
        &self,
        task: &str,
        count: usize,
        managed: &[Gpu],
        required: &[Gpu],
    ) -> Result<Vec<Gpu>, GpuError> {
        let _lock = self.lock()?;
        let mut rec = self.load()?;
        self.reclaim(&mut rec);
        if rec.allocations.iter().any(|a| a.task == task) {
            return Err(GpuError::AlreadyHolds(task.to_string()));
        }
        let holder = |uuid: &str| {
            rec.allocations
                .iter()
                .find(|a| a.gpus.iter().any(|g| g == uuid))
                .map(|a| a.task.clone())
        };
        for g in required {
            if let Some(t) = holder(&g.uuid) {
                return Err(GpuError::Held {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    task: t.chars().take(12).collect(),
                });
            }
        }
        let free: Vec<&Gpu> = managed
            .iter()
            .filter(|g| holder(&g.uuid).is_none() && !required.iter().any(|r| r.uuid == g.uuid))
            .collect();
        if count > free.len() || count == 0 && managed.is_empty() {
            let held: Vec<String> = managed
                .iter()
                .filter_map(|g| {
                    holder(&g.uuid)
                        .map(|t| format!("GPU {} held by {}", g.index, &t[..t.len().min(12)]))
                })
                .collect();
            return Err(GpuError::Exhausted {
                requested: count,
                free: free.len(),
                total: managed.len(),
                held: if held.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", held.join(", "))
                },
            });
        }
        let picked: Vec<Gpu> = required
            .iter()
            .cloned()
            .chain(free.into_iter().take(count).cloned())
            .collect();
        let me = std::process::id() as i32;
        rec.allocations.push(Allocation {
            task: task.to_string(),
            gpus: picked.iter().map(|g| g.uuid.clone()).collect(),
            owner_pid: me,
            owner_start_ticks: process_start_ticks(me),
            since_ms: now_ms(),
        });
        self.save(&rec)?;
        Ok(picked)
    }

    /// Releases what `task` holds; returns the UUIDs released.
    pub fn release(&self, task: &str) -> Result<Vec<String>, GpuError> {
        if !self.file().exists() {
            return Ok(vec![]);
        }
        let _lock = self.lock()?;
        let mut rec = self.load()?;
        let mut released = vec![];
        rec.allocations.retain(|a| {
            if a.task == task {
                released.extend(a.gpus.iter().cloned());
                false
            } else {
                true
            }
        });
        let reclaimed = self.reclaim(&mut rec);
        if !released.is_empty() || reclaimed {
            self.save(&rec)?;
        }
        Ok(released)
    }

    /// The live allocations (stale ones are reclaimed on the way).
    pub fn allocations(&self) -> Result<Vec<Allocation>, GpuError> {
        if !self.file().exists() {
            return Ok(vec![]);
        }
        let _lock = self.lock()?;
        let mut rec = self.load()?;
        if self.reclaim(&mut rec) {
            self.save(&rec)?;
        }
        Ok(rec.allocations)
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpus(n: u32) -> Vec<Gpu> {
        (0..n)
            .map(|index| Gpu {
                index,
                uuid: format!("GPU-{index}"),
                name: "fake".into(),
                memory_bytes: 0,
                pci_bus_id: String::new(),
                minor: index,
                mig_mode: false,
                mig_devices: vec![],
            })
            .collect()
    }

    #[test]
    fn a_damaged_record_counts_as_empty_only_when_it_predates_this_boot() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path());
        let all = gpus(2);
        a.allocate("t1", 1, &all).unwrap();
        // Cut short during this boot: an error naming the file, nothing allocated.
        fs::write(a.file(), b"{\"allocations\": [").unwrap();
        let err = a.allocate("t2", 1, &all).unwrap_err().to_string();
        assert!(err.contains("allocations.json"), "{err}");
        // The same, last written before this boot (a crash): empty, and written anew.
        let f = File::options().write(true).open(a.file()).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        drop(f);
        assert_eq!(a.allocate("t2", 2, &all).unwrap().len(), 2);
        assert_eq!(Allocator::new(dir.path()).allocations().unwrap().len(), 1);
    }

    #[test]
    fn allocate_release_exhaust() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path());
        let all = gpus(3);
        // Tasks without records, owned by this (live) process: held.
        let t1 = a.allocate("t1", 2, &all).unwrap();
        assert_eq!(t1.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
        let err = a.allocate("t2", 2, &all).unwrap_err();
        assert!(
            err.to_string().contains(
                "cannot allocate 2 GPU(s): 1 of 3 free (GPU 0 held by t1, GPU 1 held by t1)"
            ),
            "{err}"
        );
        assert_eq!(a.allocate("t2", 1, &all).unwrap()[0].index, 2);
        // A new allocator (another process, a restart) sees the same.
        assert_eq!(Allocator::new(dir.path()).allocations().unwrap().len(), 2);
        assert_eq!(a.release("t1").unwrap(), ["GPU-0", "GPU-1"]);
        assert_eq!(a.allocate("t3", 2, &all).unwrap()[1].index, 1);
        assert!(
            a.allocate("t3", 0, &all).is_err(),
            "one allocation per task"
        );
        // Named GPUs (CDI) first, then counted ones; a held one is refused by name.
        let e = a.allocate_with("t4", 0, &all, &all[2..]).unwrap_err();
        assert!(
            e.to_string().contains("GPU 2 (GPU-2) is held by task t2"),
            "{e}"
        );
        a.release("t3").unwrap();
        let got = a.allocate_with("t4", 1, &all, &all[1..2]).unwrap();
        assert_eq!(got.iter().map(|g| g.index).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn stale_owner_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::new(dir.path());
        a.allocate("t1", 1, &gpus(1)).unwrap();
        // Pretend the allocating process is gone (no task record either).
        let mut rec = a.load().unwrap();
        rec.allocations[0].owner_start_ticks = Some(1);
        a.save(&rec).unwrap();
        assert!(a.allocations().unwrap().is_empty());
        assert_eq!(a.allocate("t2", 1, &gpus(1)).unwrap()[0].index, 0);
    }
}
