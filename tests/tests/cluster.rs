//! Cluster mode end to end: a real master and real agents (`caisson master`, `caisson agent`)
//! on loopback, driven by the users' CLI. Agents are killed with SIGKILL and restarted, the
//! master too; every task must still end exactly once in the master's view.
use caisson_tests::cluster::*;
use caisson_tests::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn tokens_and_specs_are_checked_before_anything_happens() {
    let c = Cluster::new(&[]);
    let _m = c.master();

    // An agent with a wrong join token is refused and gives up with a clear error.
    let mut bad = c.agent("intruder", "wrong-token");
    let status = bad.0.wait().unwrap();
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(bad.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("refused"), "{err}");
    assert!(c.agents().is_empty(), "{:?}", c.agents());

    // A user with a wrong token gets nothing.
    let out = Command::new(caisson_bin())
        .args(["tasks", "--master", &c.url(), "--token", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));

    // Bad specs: InvalidArgument, and no task recorded.
    for args in [
        vec!["submit", "--name", "bad name!", "img"],
        vec!["submit", "--cpus=-1", "img"],
        vec!["submit", "-e", "=x", "img"],
        vec!["submit", "--network", "none", "-p", "8080:80", "img"],
        vec!["submit", "--network", "host,net1", "img"],
        vec!["submit", "-p", "99999:80", "img"],
        vec!["submit", "-p", "8080:80", "-p", "8080:81", "img"],
        vec!["submit", "--http", "svc.wasm"],
        vec!["submit", "-p", "8080:80", "cmd.wasm"],
        vec!["submit", "--gpus", "1", "cmd.wasm"],
        vec!["submit", "--network", "net1", "cmd.wasm"],
        vec!["submit", "--timeout", "1", "img"],
    ] {
        let (code, _, err) = c.cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains("InvalidArgument"), "{args:?}: {err}");
    }
    assert!(c.tasks().is_empty());
}

#[test]
fn root_two_agents_survive_agent_kill9_and_master_restart() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200", "--lost-ms", "60000"]);
    let img_dir = tempfile::tempdir().unwrap();
    let layout = busybox_layout(img_dir.path(), "latest").unwrap();
    for a in ["a1", "a2"] {
        c.load_image(a, &layout);
    }
    let image = "localhost/oci:latest";
    let mut master = c.master();
    let (_w, seen) = c.watch();
    let mut a1 = c.agent("a1", JOIN);
    let _a2 = c.agent("a2", JOIN);
    c.wait_agents(2);

    // Short tasks and tasks that outlive the agent's crash, native and Wasm (each Wasm task
    // has its own supervisor too).
    let guests = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guests");
    let (hello, sleep2) = (guests.join("hello.wat"), guests.join("sleep2.wat"));
    let mut ids = vec![];
    for i in 0..30 {
        ids.push(c.submit(&["--cpus", "0.1", image, "true"]));
        if i % 3 == 0 {
            ids.push(c.submit(&["--name", &format!("sleeper{i}"), image, "sleep", "2"]));
            ids.push(c.submit(&["--name", &format!("wasm{i}"), hello.to_str().unwrap()]));
            ids.push(c.submit(&[
                "--name",
                &format!("wasmsleeper{i}"),
                sleep2.to_str().unwrap(),
            ]));
        }
    }
    // Every task is placed and launched (no launch in flight), then a1 dies hard.
    c.wait_tasks("launched", Duration::from_secs(60), |t| {
        matches!(t["state"].as_str(), Some("RUNNING" | "FINISHED"))
    });
    let running: Vec<String> = c
        .tasks()
        .iter()
        .filter(|t| t["state"] == "RUNNING")
        .map(|t| t["agent_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!running.is_empty(), "some sleepers run when the agent dies");
    a1.kill9();
    // Its sleepers end while it is away; it learns that on restart.
    std::thread::sleep(Duration::from_millis(2500));
    let _a1 = c.agent("a1", JOIN);
    c.wait_tasks("all finished", Duration::from_secs(60), |t| {
        t["state"] == "FINISHED"
    });
    assert_eq!(c.tasks().len(), ids.len());

    // Master restart (kill -9): nothing is lost, agents come back, new work runs.
    master.kill9();
    let _master = c.master();
    assert_eq!(c.tasks().len(), ids.len(), "tasks survive a master restart");
    // The master shows an update before its log has it (the ack waits for the log): one that
    // was killed in between comes back from the agent, which resends every unacked update.
    c.wait_tasks(
        "all finished after the restart",
        Duration::from_secs(30),
        |t| t["state"] == "FINISHED",
    );
    c.wait_agents(2);
    let after = c.submit(&[image, "sh", "-c", "exit 3"]);
    c.wait_tasks("after restart", Duration::from_secs(30), terminal);
    let t: serde_json::Value =
        serde_json::from_str(&c.cli(&["task", &after]).1).expect("task json");
    assert_eq!(t["state"], "FAILED");
    assert_eq!(t["exit_code"], 3);

    // Exactly one terminal state per task reached the (first) master's watchers.
    let events = terminal_events(&seen.lock().unwrap());
    for id in &ids {
        assert_eq!(
            events.get(id).map(Vec::len),
            Some(1),
            "{id}: {:?}",
            events.get(id)
        );
    }
    for a in ["a1", "a2"] {
        c.assert_no_containers(a);
    }
}

/// A host that rebooted (simulated: a new boot id, the tasks' processes gone, one task's
/// record cut short as a crash leaves it): the restarted agent reports every old task LOST
/// (agent_rebooted) and removes what they held, the damaged one included.
#[test]
fn root_after_a_reboot_the_agent_reports_its_tasks_lost_and_removes_them() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&[]);
    let image = c.load_busybox("a1");
    let _m = c.master();
    let mut a1 = c.agent_with("a1", JOIN, &[], &[], &[("CAISSON_BOOT_ID", "boot-1")]);
    c.wait_agents(1);
    let ids = [
        c.submit(&[image, "sleep", "60"]),
        c.submit(&[image, "sleep", "60"]),
    ];
    c.wait_tasks("running", Duration::from_secs(30), |t| {
        t["state"] == "RUNNING"
    });
    a1.kill9();
    let root = c.agent_root("a1");
    let containers = dir_entries(&root.join("containers"));
    assert_eq!(containers.len(), 2, "{containers:?}");
    // What the reboot ended: supervisors and tasks.
    for id in &containers {
        let out = run(Command::new(caisson_bin())
            .arg("--root")
            .arg(&root)
            .args(["inspect", id]))
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for pid in ["shim_pid", "pid"] {
            let pid = v[0]["state"][pid].as_i64().unwrap() as i32;
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    std::fs::write(
        root.join("containers")
            .join(&containers[0])
            .join("state.json"),
        b"",
    )
    .unwrap();
    let _a1 = c.agent_with("a1", JOIN, &[], &[], &[("CAISSON_BOOT_ID", "boot-2")]);
    c.wait_tasks("lost", Duration::from_secs(30), terminal);
    for id in &ids {
        let t = c.task(id);
        assert_eq!(t["state"], "LOST", "{t}");
        assert_eq!(t["reason"], "agent_rebooted", "{t}");
    }
    eventually("the old tasks' directories removed", || {
        dir_entries(&root.join("containers")).is_empty()
            && dir_entries(&root.join("rootfs")).is_empty()
    });
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "mounts left under {}",
        root.display()
    );
}

#[test]
fn root_silent_agent_loses_its_tasks_after_the_timeout() {
    if !require_root() || !require_tool("umoci") {
        return;
    }
    let c = Cluster::new(&[
        "--heartbeat-ms",
        "100",
        "--unreachable-ms",
        "600",
        "--lost-ms",
        "600",
    ]);
    let img_dir = tempfile::tempdir().unwrap();
    let layout = busybox_layout(img_dir.path(), "latest").unwrap();
    c.load_image("a1", &layout);
    let _m = c.master();
    let a1 = c.agent("a1", JOIN);
    c.wait_agents(1);
    let id = c.submit(&["localhost/oci:latest", "sleep", "60"]);
    c.wait_tasks("running", Duration::from_secs(30), |t| {
        t["state"] == "RUNNING"
    });

    // A hung agent (stopped): unreachable, then its task is LOST.
    a1.signal(nix::sys::signal::Signal::SIGSTOP);
    c.wait_tasks("lost", Duration::from_secs(20), |t| t["state"] == "LOST");
    let t: serde_json::Value = serde_json::from_str(&c.cli(&["task", &id]).1).unwrap();
    assert_eq!(t["reason"], "agent_lost");
    assert!(c.agents().iter().all(|a| a["state"] == "UNREACHABLE"));

    // When it wakes up it reregisters; the master's verdict stands and the task is killed.
    a1.signal(nix::sys::signal::Signal::SIGCONT);
    c.wait_agents(1);
    c.assert_no_containers("a1");
    let t: serde_json::Value = serde_json::from_str(&c.cli(&["task", &id]).1).unwrap();
    assert_eq!(t["state"], "LOST", "exactly one terminal state");
}
