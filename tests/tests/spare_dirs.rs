//! Spare task directories (`containerizer::launch::spare`): an ended task's supervisor makes
//! the directories of later launches in `<root>/spare/`, and a launch renames one into place
//! (the same inode) instead of making its own. Real containers and Wasm tasks, as root.
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caisson_tests::*;

const IMAGE: &str = "localhost/oci:latest";

/// The inodes of the spares of `kind` in `root`, once there are at least `SLOTS` (the
/// supervisor makes them after it has reported the task's end; an ended task's own may make
/// up to `MAX_SLOTS`).
fn full_slots(root: &Path, kind: &str) -> HashSet<u64> {
    let spares = || -> Vec<PathBuf> {
        (0..containerizer::launch::spare::MAX_SLOTS)
            .map(|k| root.join("spare").join(format!("{kind}.{k}")))
            .filter(|p| p.is_dir())
            .collect()
    };
    let t = Instant::now();
    while spares().len() < containerizer::launch::spare::SLOTS {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "spare {kind} directories never made: {:?}",
            dir_entries(&root.join("spare"))
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    spares()
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().ino())
        .collect()
}

/// Asserts that the directories with these inodes (a task's, then its root's) are spares.
fn assert_spares(root: &Path, task: u64, rootfs: u64, what: &str) {
    assert!(
        full_slots(root, "task").contains(&task),
        "{what}: task dir not reused"
    );
    assert!(
        full_slots(root, "rootfs").contains(&rootfs),
        "{what}: root not reused"
    );
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

#[test]
fn root_launches_claim_the_spare_directories_ended_tasks_made() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    // The first launch of a root finds none; its supervisor makes them once the task is over.
    assert_eq!(c.ok(&["run", "--rm", IMAGE, "echo", "first"]), "first\n");
    let tasks = full_slots(root, "task");
    let roots = full_slots(root, "rootfs");
    let spares: HashSet<String> = dir_entries(&root.join("spare")).into_iter().collect();
    assert_eq!(
        spares,
        ["task.0", "task.1", "rootfs.0", "rootfs.1"]
            .map(String::from)
            .into()
    );

    // The next task's directories are two of them, and it runs as ever in them: a writable
    // root, its sandbox and generated /etc.
    let id = c
        .ok(&["run", "-d", IMAGE, "sh", "-c", "echo made > /x; sleep 30"])
        .trim()
        .to_string();
    let dir = root.join("containers").join(&id);
    assert!(tasks.contains(&ino(&dir)), "task dir not a spare");
    assert!(
        roots.contains(&ino(&root.join("rootfs").join(&id))),
        "root not a spare"
    );
    let (code, out, err) = c.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "cat /x /etc/hostname; ls -d /mnt/sandbox",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("made\n{}\n/mnt/sandbox\n", &id[..12]));
    let (task_ino, root_ino) = (ino(&dir), ino(&root.join("rootfs").join(&id)));
    c.ok(&["rm", "-f", &id]);
    // Its supervisor made one of each again, and `rm` kept its directories as spares too.
    assert_spares(root, task_ino, root_ino, "rm");

    // Many launches later: never more than MAX_SLOTS, nothing half-made, nothing else left.
    for _ in 0..5 {
        c.ok(&["run", "--rm", IMAGE, "true"]);
    }
    full_slots(root, "task");
    let t = Instant::now();
    let spare = containerizer::launch::spare::SLOTS..=containerizer::launch::spare::MAX_SLOTS;
    loop {
        let left = dir_entries(&root.join("spare"));
        let of = |kind: &str| left.iter().filter(|n| n.starts_with(kind)).count();
        // (An empty trash: every supervisor is done with its task's directories.)
        if dir_entries(&root.join("trash")).is_empty()
            && spare.contains(&of("task."))
            && spare.contains(&of("rootfs."))
            && left.len() == of("task.") + of("rootfs.")
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(dir_entries(&root.join("rootfs")).is_empty());
    assert!(dir_entries(&root.join("containers")).is_empty());

    // Turned off: a launch makes its own.
    let tasks = full_slots(root, "task");
    let id = c
        .cmd()
        .env("CAISSON_SPARE_DIRS", "0")
        .args(["run", "-d", IMAGE, "sleep", "30"])
        .output()
        .unwrap();
    let id = String::from_utf8_lossy(&id.stdout).trim().to_string();
    assert!(!tasks.contains(&ino(&root.join("containers").join(&id))));
    assert_eq!(full_slots(root, "task"), tasks, "spares left alone");
    c.ok(&["rm", "-f", &id]);
}

#[test]
fn root_a_removed_tasks_directories_become_spares_with_nothing_of_it_left() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    c.ok(&["run", "--rm", IMAGE, "true"]);
    full_slots(root, "task");
    full_slots(root, "rootfs");
    // A task that writes into its root and sandbox and changes their modes.
    let script = "echo secret > /x; echo s > /mnt/sandbox/y; busybox chmod 701 / /mnt/sandbox; \
                  sleep 1";
    let id = c.ok(&["run", "-d", "--rm", IMAGE, "sh", "-c", script]);
    let id = id.trim();
    let dir = ino(&root.join("containers").join(id));
    let rootfs = ino(&root.join("rootfs").join(id));
    let t = Instant::now();
    while root.join("containers").join(id).exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "task never removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its directories (not new ones) are the spares now...
    assert_spares(root, dir, rootfs, "--rm");
    // ... and the tasks launched in them find nothing of it: no file, fresh modes.
    let look = "ls -A /mnt/sandbox; cat /x 2>/dev/null; busybox stat -c %a / /mnt/sandbox";
    for _ in 0..containerizer::launch::spare::SLOTS {
        let out = c.ok(&["run", "--rm", IMAGE, "sh", "-c", look]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines.iter().all(|m| *m != "701"), "{out}");
    }
    assert!(
        dir_entries(&root.join("trash")).is_empty() || {
            std::thread::sleep(Duration::from_millis(500));
            dir_entries(&root.join("trash")).is_empty()
        }
    );
}

#[test]
fn root_wasm_launches_claim_spares_without_etc() {
    if !require_root() {
        return;
    }
    let c = Caisson::new();
    let root = c.root.path();
    let hello = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/hello.wat");
    let hello = hello.to_str().unwrap();
    assert_eq!(c.ok(&["run", "--rm", hello]), "hello, world\n");
    let spares = full_slots(root, "wasm");
    let out = c.ok(&["run", "--name", "w", hello]);
    assert_eq!(out, "hello, world\n");
    let id = c.ok(&["ps", "-aq", "--no-trunc"]).trim().to_string();
    let dir = root.join("containers").join(&id);
    assert!(spares.contains(&ino(&dir)), "Wasm task dir not a spare");
    assert!(dir.join("sandbox").is_dir());
    assert!(!dir.join("etc").exists(), "a Wasm task has no etc/");
    c.ok(&["rm", "w"]);
}
