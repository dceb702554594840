//! Wasm command tasks through the agent's shared Wasm host (`caisson-wasm host`, one process
//! per agent running many tasks): exit codes, logs and records; a kill; surviving `kill -9` of
//! the agent; the host's own death reported as LOST. A real master and agent on loopback.
use caisson_tests::cluster::*;
use caisson_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn guest(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("guests")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A WASI command that writes `out` to stdout, `err` to stderr, then exits with `code`.
fn exit_wat(out: &str, err: &str, code: u32) -> String {
    let esc = |s: &str| s.replace('\n', "\\0a");
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "{out}")
  (data (i32.const 512) "{err}")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const {outlen}))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 16) (i32.const 512))
    (i32.store (i32.const 20) (i32.const {errlen}))
    (drop (call $w (i32.const 2) (i32.const 16) (i32.const 1) (i32.const 24)))
    (call $exit (i32.const {code}))))
"#,
        outlen = out.len(),
        errlen = err.len(),
        out = esc(out),
        err = esc(err),
    )
}

fn state(t: &serde_json::Value) -> &str {
    t["state"].as_str().unwrap_or("")
}

fn task_dir(c: &Cluster, agent: &str, id: &str) -> PathBuf {
    c.agent_root(agent).join("containers").join(id)
}

/// The shared host that ran task `id`, if one did (its config's `wasm_host_pid`).
fn wasm_host_pid(c: &Cluster, agent: &str, id: &str) -> Option<i32> {
    let config = task_dir(c, agent, id).join("config.json");
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display())),
    )
    .unwrap();
    v["wasm_host_pid"].as_i64().map(|p| p as i32)
}

fn host_pid(c: &Cluster, agent: &str, id: &str) -> i32 {
    wasm_host_pid(c, agent, id).unwrap_or_else(|| panic!("{id} did not run in a shared host"))
}

fn alive(pid: i32) -> bool {
    containerizer::launch::state::process_alive(pid, None)
}

fn write(c: &Cluster, name: &str, text: &str) -> String {
    let p = c.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// A master and one agent, `a1`, registered with it (the processes live as long as the two
/// handles).
fn one_agent() -> (Cluster, Proc, Proc) {
    let c = Cluster::new(&["--heartbeat-ms", "200"]);
    let m = c.master();
    let a1 = c.agent("a1", JOIN);
    c.wait_agents(1);
    (c, m, a1)
}

fn wait_state(c: &Cluster, id: &str, want: &str) -> serde_json::Value {
    let t = c.wait_task(id, want, Duration::from_secs(30), |t| {
        state(t) == want || terminal(t)
    });
    assert_eq!(state(&t), want, "{t}");
    t
}

#[test]
fn root_shared_host_runs_commands_with_exit_codes_logs_and_records() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200"]);
    let _m = c.master();
    let mut a1 = c.agent_with("a1", JOIN, &[], &["--keep-finished"], &[]);
    c.wait_agents(1);
    let exit3 = write(&c, "exit3.wat", &exit_wat("to stdout\n", "to stderr\n", 3));

    let hello = c.submit(&[&guest("hello.wat")]);
    let failing = c.submit(&[&exit3]);
    let trap = c.submit(&[&guest("trap.wat")]);
    let grow = c.submit(&["--memory", "2m", &guest("grow.wat")]);
    let many: Vec<String> = (0..20).map(|_| c.submit(&[&guest("hello.wat")])).collect();
    c.wait_tasks("all ended", Duration::from_secs(60), terminal);

    let t = c.task(&hello);
    assert_eq!(
        (state(&t), t["exit_code"].as_i64()),
        ("FINISHED", Some(0)),
        "{t}"
    );
    let dir = task_dir(&c, "a1", &hello);
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "hello, world\n"
    );
    // Its record: exited 0, with the CPU time of its thread and no supervisor left to wait for.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(rec["status"], "exited", "{rec}");
    assert_eq!(rec["exit_code"], 0, "{rec}");
    assert!(rec["usage"]["cpu_ns"].as_u64().unwrap() > 0, "{rec}");
    assert!(rec["shim_pid"].is_null(), "{rec}");

    let t = c.task(&failing);
    assert_eq!(
        (state(&t), t["exit_code"].as_i64()),
        ("FAILED", Some(3)),
        "{t}"
    );
    let dir = task_dir(&c, "a1", &failing);
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "to stdout\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("stderr.log")).unwrap(),
        "to stderr\n"
    );

    let t = c.task(&trap);
    assert_eq!(
        (state(&t), t["exit_code"].as_i64()),
        ("FAILED", Some(134)),
        "{t}"
    );
    assert!(
        t["message"].as_str().unwrap().contains("unreachable"),
        "{t}"
    );

    let t = c.task(&grow);
    assert_eq!(state(&t), "FAILED", "{t}");
    assert_eq!(t["reason"], "memory_limit", "{t}");

    // One host ran them all, and it is still there for the next task.
    let pid = host_pid(&c, "a1", &hello);
    for id in many.iter().chain([&failing, &trap]) {
        assert_eq!(
            state(&c.task(id)),
            if id == &failing || id == &trap {
                "FAILED"
            } else {
                "FINISHED"
            }
        );
        assert_eq!(host_pid(&c, "a1", id), pid, "{id}");
    }
    assert!(alive(pid));
    // The agent stops: the idle host goes with it (no agent, no task).
    a1.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = a1.0.wait();
    eventually("the idle host exits", || !alive(pid));
}

#[test]
fn root_shared_host_kills_tasks_and_reports_its_own_death() {
    if !require_root() {
        return;
    }
    let (c, _m, _a1) = one_agent();
    let sleeper = write(&c, "sleep60.wat", &sleeper_wat(60, 0));

    // A guest spinning in Wasm code stops at its next epoch check.
    let spin = c.submit(&[&guest("loop.wat")]);
    wait_state(&c, &spin, "RUNNING");
    let pid = host_pid(&c, "a1", &spin);
    let (code, _, err) = c.cli(&["cancel", &spin]);
    assert_eq!(code, 0, "{err}");
    let t = c.wait_task(&spin, "killed", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "KILLED", "{t}");
    // A guest inside a host call (a 60 s sleep) is recorded killed without waiting for it.
    let sleeping = c.submit(&[&sleeper]);
    wait_state(&c, &sleeping, "RUNNING");
    let (code, _, err) = c.cli(&["cancel", &sleeping]);
    assert_eq!(code, 0, "{err}");
    let t = c.wait_task(&sleeping, "killed", Duration::from_secs(10), terminal);
    assert_eq!(state(&t), "KILLED", "{t}");
    assert!(alive(pid), "killing tasks does not kill their host");
    // Timeouts, in Wasm code (the epoch deadline) and in a host call.
    for m in [guest("loop.wat"), sleeper.clone()] {
        let id = c.submit(&["--timeout", "0.5", &m]);
        let t = c.wait_task(&id, "timed out", Duration::from_secs(10), terminal);
        assert_eq!(
            (state(&t), t["exit_code"].as_i64()),
            ("FAILED", Some(124)),
            "{t}"
        );
    }

    // The host dies under a running task: LOST, saying why, never stuck in RUNNING.
    let victim = c.submit(&[&guest("loop.wat")]);
    wait_state(&c, &victim, "RUNNING");
    assert_eq!(host_pid(&c, "a1", &victim), pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = c.wait_task(&victim, "lost", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "LOST", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("shared Wasm host"),
        "{t}"
    );
    // The next task gets a new host.
    let after = c.submit(&[&guest("hello.wat")]);
    let t = c.wait_task(&after, "ended", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FINISHED", "{t}");
    c.assert_no_containers("a1");
}

#[test]
fn root_shared_host_task_survives_agent_kill9() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200", "--lost-ms", "60000"]);
    let _m = c.master();
    let (_w, seen) = c.watch();
    let mut a1 = c.agent("a1", JOIN);
    c.wait_agents(1);
    let short = write(&c, "sleep2.wat", &sleeper_wat(2, 7));
    let long = write(&c, "sleep60.wat", &sleeper_wat(60, 0));

    let ends_away = c.submit(&[&short]);
    let outlives = c.submit(&[&long]);
    let spin = c.submit(&[&guest("loop.wat")]);
    for id in [&ends_away, &outlives, &spin] {
        wait_state(&c, id, "RUNNING");
    }
    let pid = host_pid(&c, "a1", &spin);
    a1.kill9();
    assert!(alive(pid), "the host outlives its agent");
    // A running shared-host task has no state.json (written once, at its end): its config
    // stands for the running record, with the host as its supervisor, for every reader.
    assert!(!task_dir(&c, "a1", &spin).join("state.json").exists());
    let out = run(std::process::Command::new(caisson_bin())
        .arg("--root")
        .arg(c.agent_root("a1"))
        .args(["inspect", &spin]))
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["state"]["status"], "running", "{v}");
    assert_eq!(v[0]["state"]["shim_pid"], pid, "{v}");
    // `ends_away` ends while the agent is away; its record keeps how.
    std::thread::sleep(Duration::from_millis(2500));
    let _a1 = c.agent("a1", JOIN);
    let t = c.wait_task(&ends_away, "ended", Duration::from_secs(30), terminal);
    assert_eq!(
        (state(&t), t["exit_code"].as_i64()),
        ("FAILED", Some(7)),
        "{t}"
    );
    // The others were re-adopted from the same host; a kill still reaches them.
    assert_eq!(state(&c.task(&outlives)), "RUNNING");
    assert_eq!(state(&c.task(&spin)), "RUNNING");
    assert_eq!(host_pid(&c, "a1", &spin), pid);
    for id in [&outlives, &spin] {
        let (code, _, err) = c.cli(&["cancel", id]);
        assert_eq!(code, 0, "{err}");
        let t = c.wait_task(id, "killed", Duration::from_secs(30), terminal);
        assert_eq!(state(&t), "KILLED", "{t}");
    }
    c.assert_no_containers("a1");
    std::thread::sleep(Duration::from_millis(300));
    let events = terminal_events(&seen.lock().unwrap());
    for id in [&ends_away, &outlives, &spin] {
        assert_eq!(events.get(id).map(Vec::len), Some(1), "{id}: {events:?}");
    }
}

#[test]
fn root_per_task_wasm_host_is_still_available() {
    if !require_root() {
        return;
    }
    let c = Cluster::new(&["--heartbeat-ms", "200"]);
    let _m = c.master();
    let _a1 = c.agent_with(
        "a1",
        JOIN,
        &[],
        &["--keep-finished", "--wasm-host", "per-task"],
        &[],
    );
    c.wait_agents(1);
    let id = c.submit(&[&guest("hello.wat")]);
    let t = c.wait_task(&id, "ended", Duration::from_secs(30), terminal);
    assert_eq!(
        (state(&t), t["exit_code"].as_i64()),
        ("FINISHED", Some(0)),
        "{t}"
    );
    // Its own supervisor and host process: the supervisor's records, no shared host's pid.
    let dir = task_dir(&c, "a1", &id);
    assert_eq!(
        std::fs::read_to_string(dir.join("stdout.log")).unwrap(),
        "hello, world\n"
    );
    assert!(dir.join("wasm-status.json").exists());
    assert_eq!(wasm_host_pid(&c, "a1", &id), None);
}

#[test]
fn root_shared_host_blocked_tasks_do_not_hold_up_others() {
    if !require_root() {
        return;
    }
    let (c, _m, _a1) = one_agent();
    let sleeper = write(&c, "sleep60.wat", &sleeper_wat(60, 0));
    // More guests blocked in a host call than the host starts threads for at once (two per
    // CPU): its pool grows for what waits behind them.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let sleepers: Vec<String> = (0..cpus * 2 + 4).map(|_| c.submit(&[&sleeper])).collect();
    for id in &sleepers {
        wait_state(&c, id, "RUNNING");
    }
    let pid = host_pid(&c, "a1", &sleepers[0]);
    let t0 = std::time::Instant::now();
    let hello = c.submit(&[&guest("hello.wat")]);
    let t = c.wait_task(&hello, "ended", Duration::from_secs(30), terminal);
    assert_eq!(state(&t), "FINISHED", "{t}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "a task behind {} blocked ones took {:?}",
        sleepers.len(),
        t0.elapsed()
    );
    for id in &sleepers {
        assert_eq!(state(&c.task(id)), "RUNNING", "{id}");
        assert_eq!(host_pid(&c, "a1", id), pid);
    }
    for id in &sleepers {
        let (code, _, err) = c.cli(&["cancel", id]);
        assert_eq!(code, 0, "{err}");
    }
    for id in &sleepers {
        let t = c.wait_task(id, "killed", Duration::from_secs(30), terminal);
        assert_eq!(state(&t), "KILLED", "{t}");
    }
    c.assert_no_containers("a1");
}
