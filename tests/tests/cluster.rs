//! Cluster mode end to end: a real master and real agents (`caisson master`, `caisson agent`)
//! on loopback, driven by the users' CLI. Agents are killed with SIGKILL and restarted, the
//! master too; every task must still end exactly once in the master's view.
use caisson_tests::*;
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JOIN: &str = "join-secret-test";
const API: &str = "api-secret-test";

struct Proc(Child);

impl Proc {
    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    port: u16,
    master_args: Vec<String>,
}

impl Cluster {
    fn new(master_args: &[&str]) -> Cluster {
        Cluster {
            dir: tempfile::Builder::new()
                .prefix("caisson-cluster")
                .tempdir()
                .unwrap(),
            port: free_port(),
            master_args: master_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn master(&self) -> Proc {
        let child = Command::new(caisson_bin())
            .args(["master", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--state")
            .arg(self.dir.path().join("master"))
            .args(["--join-token", JOIN, "--api-token", API])
            .args(&self.master_args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let p = Proc(child);
        // Ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["agents", "--json"]).0 == 0 {
                return p;
            }
            assert!(Instant::now() < deadline, "master did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agent_root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn agent(&self, name: &str, token: &str) -> Proc {
        Proc(
            Command::new(caisson_bin())
                .arg("--root")
                .arg(self.agent_root(name))
                .args(["agent", "--master", &self.url(), "--token", token])
                .args(["--resources", "cpus=64,mem=64g"])
                .args(["--attributes", &format!("name={name}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Runs a users' command; returns (code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        // The flags go right after the subcommand: after `submit IMAGE`, everything belongs
        // to the task's command.
        let out = Command::new(caisson_bin())
            .args(&args[..1])
            .args(["--master", &self.url(), "--token", API])
            .args(&args[1..])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn tasks(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["tasks", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    fn agents(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["agents", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    fn wait_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self
            .agents()
            .iter()
            .filter(|a| a["state"] == "ACTIVE")
            .count()
            < n
        {
            assert!(Instant::now() < deadline, "agents: {:?}", self.agents());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn submit(&self, args: &[&str]) -> String {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "submit {args:?}: {err}");
        out.trim().to_string()
    }

    /// Waits until `pred` holds for every task.
    fn wait_tasks(&self, what: &str, timeout: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let tasks = self.tasks();
            if tasks.iter().all(&pred) {
                return;
            }
            if Instant::now() > deadline {
                let bad: Vec<_> = tasks.iter().filter(|t| !pred(t)).take(5).collect();
                panic!("{what}: still {bad:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `caisson tasks --watch --json` in the background: every change the master publishes.
    fn watch(&self) -> (Proc, Arc<Mutex<Vec<serde_json::Value>>>) {
        let mut child = Command::new(caisson_bin())
            .args([
                "tasks",
                "--watch",
                "--json",
                "--master",
                &self.url(),
                "--token",
                API,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(vec![]));
        let s = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    s.lock().unwrap().push(v);
                }
            }
        });
        (Proc(child), seen)
    }

    fn load_image(&self, agent: &str, layout: &Path) {
        run(Command::new(caisson_bin())
            .arg("--root")
            .arg(self.agent_root(agent))
            .args(["load", "-q", "-i", &format!("{}:latest", layout.display())]))
        .unwrap();
    }

    /// No container left on `agent` (each is removed once its end is reported).
    fn assert_no_containers(&self, agent: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = run(Command::new(caisson_bin())
                .arg("--root")
                .arg(self.agent_root(agent))
                .args(["ps", "-aq"]))
            .unwrap();
            if out.stdout.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containers left on {agent}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn terminal(t: &serde_json::Value) -> bool {
    matches!(
        t["state"].as_str(),
        Some("FINISHED" | "FAILED" | "KILLED" | "LOST")
    )
}

/// Terminal events per task id in a watch log.
fn terminal_events(seen: &[serde_json::Value]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for t in seen.iter().filter(|t| terminal(t)) {
        m.entry(t["id"].as_str().unwrap().to_string())
            .or_default()
            .push(t["state"].as_str().unwrap().to_string());
    }
    m
}

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

    // Short tasks and tasks that outlive the agent's crash.
    let mut ids = vec![];
    for i in 0..30 {
        ids.push(c.submit(&["--cpus", "0.1", image, "true"]));
        if i % 3 == 0 {
            ids.push(c.submit(&["--name", &format!("sleeper{i}"), image, "sleep", "2"]));
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
    assert!(c.tasks().iter().all(|t| t["state"] == "FINISHED"));
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
