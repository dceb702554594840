//! Warm sandboxes (`containerizer::launch::sandbox`): a task launched in one is like a cold
//! one, options that do not fit take the cold path, and unused sandboxes leave nothing behind
//! (runtime dropped, or its process killed with SIGKILL). Real containers, as root.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use caisson_tests::*;
use containerizer::launch::{
    process_from_image, ProcessOverrides, Runtime, Status, TaskSpec, Volume, WarmLaunch,
};

const IMAGE: &str = "localhost/oci:latest";

fn runtime(root: &Path, n: usize) -> Runtime {
    let shim = caisson_bin().with_file_name("caisson-shim");
    let rt = Runtime::new(root)
        .with_shim(shim)
        .with_warm_sandboxes(IMAGE, n)
        .sandbox_refill(false);
    assert_eq!(rt.fill_sandboxes().unwrap(), n);
    rt
}

fn spec(root: &Path, overrides: ProcessOverrides) -> TaskSpec {
    let store = containerizer::image::Store::open(root).unwrap();
    let cfg = store.config(&store.resolve(IMAGE).unwrap()).unwrap();
    TaskSpec {
        image: IMAGE.into(),
        process: process_from_image(cfg.config().as_ref(), &overrides).unwrap(),
        ..Default::default()
    }
}

fn sh(script: &str) -> ProcessOverrides {
    ProcessOverrides {
        entrypoint: Some("/bin/sh".into()),
        cmd: vec!["-c".into(), script.into()],
        ..Default::default()
    }
}

fn entries(dir: PathBuf) -> Vec<String> {
    dir_entries(&dir)
}

/// Every trace of sandbox `sid` (or task): cgroup directories, mounts, directories, processes.
fn traces(root: &Path, ids: &[String]) -> Vec<String> {
    let mut left = vec![];
    for id in ids {
        for ctrl in ["cpu", "cpuacct", "memory", "pids", "freezer", "devices", ""] {
            let p = Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join("caisson")
                .join(id);
            if p.exists() {
                left.push(p.display().to_string());
            }
        }
    }
    let root_s = root.to_str().unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    left.extend(
        mounts
            .lines()
            .filter(|l| l.contains(root_s))
            .map(String::from),
    );
    for sub in ["sandboxes", "rootfs"] {
        left.extend(
            entries(root.join(sub))
                .into_iter()
                .map(|e| format!("{sub}/{e}")),
        );
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let c = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if c.contains(root_s) && c.contains("caisson-shim") {
                left.push(format!(
                    "process {}: {c}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    left
}

fn eventually_clean(root: &Path, ids: &[String]) {
    // Generous: the teardown is quick, but this machine is shared and often loaded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = traces(root, ids);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn root_warm_sandbox_task_is_like_a_cold_one() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    let rt = runtime(root, 1);
    let sid = entries(root.join("sandboxes")).pop().expect("a sandbox");
    let id = format!("warmtest{}", std::process::id());
    let mut s = spec(
        root,
        ProcessOverrides {
            env: vec!["FOO=bar".into()],
            workdir: Some("/work/dir".into()),
            user: Some("1000:1001".into()),
            ..sh("echo pid=$$; hostname; echo foo=$FOO; pwd; id -u; id -g; \
                  for n in pid mnt uts ipc net; do busybox readlink /proc/self/ns/$n; done; \
                  cat /etc/hostname; exit 3")
        },
    );
    s.id = id.clone();
    s.hostname = "warmhost".into();
    let mut task = match rt.launch_in_sandbox(s) {
        WarmLaunch::Launched(r) => r.unwrap(),
        WarmLaunch::Cold(_) => panic!("a ready sandbox was not used"),
    };
    assert_eq!(task.id, id);
    let st = task.wait().unwrap();
    task.finish();
    assert_eq!(st.status, Status::Exited, "{st:?}");
    assert_eq!(st.exit_code, Some(3), "{st:?}");
    // The task's records live under its own id; the cgroup was renamed to it.
    assert!(st.cgroup_paths.iter().all(|p| p.ends_with(&id)), "{st:?}");
    assert!(st.usage.is_some());
    let info = rt.info(&id).unwrap();
    assert_eq!(info.state.exit_code, Some(3));
    let out = std::fs::read_to_string(rt.dir(&id).stdout_log()).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[..6],
        ["pid=1", "warmhost", "foo=bar", "/work/dir", "1000", "1001"],
        "{out}"
    );
    for (i, n) in ["pid", "mnt", "uts", "ipc", "net"].iter().enumerate() {
        let host = std::fs::read_link(format!("/proc/self/ns/{n}")).unwrap();
        assert_ne!(Path::new(lines[6 + i]), host, "{n}: {out}");
    }
    assert_eq!(lines[11], "warmhost", "{out}");
    rt.remove(&id, false).unwrap();
    // The sandbox was used once: its name is gone, nothing of it or the task is left.
    assert_eq!(rt.ready_sandboxes(), 0);
    drop(rt);
    eventually_clean(root, &[sid, id]);

    // A memory limit is written to the (renamed) cgroup before the task runs.
    let rt = runtime(root, 1);
    let mut s = spec(root, sh("sleep 30"));
    s.limits.memory = Some(64 << 20);
    let task = match rt.launch_in_sandbox(s) {
        WarmLaunch::Launched(r) => r.unwrap(),
        WarmLaunch::Cold(_) => panic!("a memory limit fits a sandbox"),
    };
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/caisson/{}/memory.limit_in_bytes",
        task.id
    ))
    .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let tid = task.id.clone();
    drop(task);
    rt.stop(&tid, Duration::ZERO).unwrap();
    rt.remove(&tid, false)
        .unwrap_or_else(|e| panic!("rm {tid}: {e:?}"));
    drop(rt);
    eventually_clean(root, &[tid]);
}

#[test]
fn root_options_that_do_not_fit_take_the_cold_path() {
    let Some((c, work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    let rt = runtime(root, 1);
    type Change<'a> = Box<dyn Fn(&mut TaskSpec) + 'a>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "volume",
            Box::new(|s: &mut TaskSpec| {
                s.volumes.push(Volume {
                    source: work.path().to_path_buf(),
                    target: "/v".into(),
                    readonly: true,
                })
            }),
        ),
        (
            "cpus",
            Box::new(|s: &mut TaskSpec| s.limits.cpus = Some(0.5)),
        ),
        (
            "pids",
            Box::new(|s: &mut TaskSpec| s.limits.pids = Some(10)),
        ),
        (
            "read-only",
            Box::new(|s: &mut TaskSpec| s.readonly_rootfs = true),
        ),
        ("tty", Box::new(|s: &mut TaskSpec| s.tty = true)),
        (
            "host network",
            Box::new(|s: &mut TaskSpec| s.network = containerizer::launch::NetworkMode::Host),
        ),
        (
            "other image",
            Box::new(|s: &mut TaskSpec| s.image = "localhost/other:latest".into()),
        ),
        (
            "own root",
            Box::new(|s: &mut TaskSpec| s.rootfs = work.path().to_path_buf()),
        ),
    ];
    for (what, change) in cases {
        let mut s = spec(root, sh("true"));
        change(&mut s);
        let want = s.clone();
        match rt.launch_in_sandbox(s) {
            WarmLaunch::Cold(back) => assert_eq!(*back, want, "{what}: the spec comes back"),
            WarmLaunch::Launched(_) => panic!("{what}: must not take a sandbox"),
        }
        assert_eq!(rt.ready_sandboxes(), 1, "{what}: the sandbox stays ready");
    }
    assert!(entries(root.join("containers")).is_empty());
    // A fitting one then takes it.
    match rt.launch_in_sandbox(spec(root, sh("true"))) {
        WarmLaunch::Launched(r) => {
            let mut t = r.unwrap();
            assert_eq!(t.wait().unwrap().exit_code, Some(0));
            let id = t.id.clone();
            t.finish();
            rt.remove(&id, false).unwrap();
        }
        WarmLaunch::Cold(_) => panic!("a fitting task must take the sandbox"),
    }
    // A task whose command is missing fails in the sandbox like a cold launch (127) and
    // leaves nothing behind.
    rt.fill_sandboxes().unwrap();
    let mut s = spec(root, ProcessOverrides::default());
    s.process.args = vec!["/nosuch".into()];
    match rt.launch_in_sandbox(s) {
        WarmLaunch::Launched(Err(e)) => assert_eq!(e.exit_code(), 127, "{e}"),
        other => panic!("expected a launch error: {other:?}"),
    }
    assert!(entries(root.join("containers")).is_empty());
    assert!(entries(root.join("names")).is_empty());
    drop(rt);
    eventually_clean(root, &[]);
}

#[test]
fn root_unused_sandboxes_leave_nothing_behind() {
    let Some((c, _work)) = busybox_store() else {
        return;
    };
    let root = c.root.path();
    // Dropped runtime.
    let rt = runtime(root, 2);
    let sids = entries(root.join("sandboxes"));
    assert_eq!(sids.len(), 2);
    assert_eq!(entries(root.join("rootfs")).len(), 2);
    for sid in &sids {
        assert!(Path::new("/sys/fs/cgroup/memory/caisson")
            .join(sid)
            .is_dir());
    }
    drop(rt);
    // A background fill that was making a sandbox at the drop finishes it, then tears it down.
    eventually_clean(root, &sids);

    // The owner killed with SIGKILL: the supervisors see EOF and tear their sandboxes down,
    // while the task it launched keeps running (daemonless).
    let mut bench = c
        .cmd()
        .args([
            "bench",
            "launch",
            "--kind",
            "native",
            "--image",
            IMAGE,
            "-n",
            "1",
            "--warmup",
            "0",
            "--warm-sandboxes",
            "2",
            "--",
            "sleep",
            "30",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    // The task runs in one sandbox, the other waits (refills come after a task's end).
    while entries(root.join("containers")).is_empty() || entries(root.join("sandboxes")).is_empty()
    {
        assert!(Instant::now() < deadline, "the bench never launched");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sids = entries(root.join("sandboxes"));
    let task = entries(root.join("containers")).pop().unwrap();
    // Its directory is renamed into `containers/` just before the handover: the kill comes
    // once the task runs (a launcher killed in between leaves a task that never starts).
    while !c.run(&["inspect", &task]).1.contains("\"running\"") {
        assert!(Instant::now() < deadline, "the task never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    bench.kill().unwrap();
    bench.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !entries(root.join("sandboxes")).is_empty() {
        assert!(Instant::now() < deadline, "sandboxes left after kill -9");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = c.run(&["inspect", &task]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"running\""), "the task keeps running: {out}");
    // Killed; its supervisor (auto-remove, its launcher gone) then removes it itself, so
    // `rm` may find it gone already.
    let _ = c.run(&["rm", "-f", &task]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !entries(root.join("containers")).is_empty() {
        assert!(Instant::now() < deadline, "the task was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ids = sids;
    ids.push(task);
    eventually_clean(root, &ids);
}
