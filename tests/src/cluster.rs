//! A real cluster for end-to-end tests: `caisson master` and `caisson agent` processes on
//! loopback, driven by the users' CLI (tests/tests/cluster*.rs).
use crate::{caisson_bin, free_port, run};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const JOIN: &str = "join-secret-test";
pub const API: &str = "api-secret-test";

pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
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

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub master_args: Vec<String>,
    /// With `caisson certs` output here: https, and users present it (`--tls-dir`).
    pub tls_dir: Option<PathBuf>,
    /// Global flags for the final `rm -f --all` of each agent's root (e.g. the CNI dirs).
    pub cleanup_args: Vec<String>,
}

impl Drop for Cluster {
    /// A failed test must not leave tasks running: every agent root's containers are removed
    /// (the test's master and agents, declared after the cluster, are gone by then).
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for e in rd.flatten() {
            if e.path().join("containers").is_dir() {
                let _ = Command::new(caisson_bin())
                    .arg("--root")
                    .arg(e.path())
                    .args(&self.cleanup_args)
                    .args(["rm", "-f", "--all"])
                    .output();
            }
        }
    }
}

impl Cluster {
    pub fn new(master_args: &[&str]) -> Cluster {
        Cluster {
            dir: tempfile::Builder::new()
                .prefix("caisson-cluster")
                .tempdir()
                .unwrap(),
            port: free_port(),
            master_args: master_args.iter().map(|s| s.to_string()).collect(),
            tls_dir: None,
            cleanup_args: vec![],
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_dir.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn master(&self) -> Proc {
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

    pub fn agent_root(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn agent(&self, name: &str, token: &str) -> Proc {
        self.agent_with(name, token, &[], &[], &[])
    }

    /// An agent with extra global flags (before `agent`), agent flags and environment.
    pub fn agent_with(
        &self,
        name: &str,
        token: &str,
        global: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Proc(
            Command::new(caisson_bin())
                .arg("--root")
                .arg(self.agent_root(name))
                .args(global)
                .args(["agent", "--master", &self.url(), "--token", token])
                .args(["--resources", "cpus=64,mem=64g"])
                .args(["--attributes", &format!("name={name}")])
                .args(extra)
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// Runs a users' command; returns (code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        // The flags go right after the subcommand: after `submit IMAGE`, everything belongs
        // to the task's command.
        let mut cmd = Command::new(caisson_bin());
        cmd.args(&args[..1])
            .args(["--master", &self.url(), "--token", API]);
        if let Some(d) = &self.tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        let out = cmd.args(&args[1..]).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// One task's JSON (`caisson task ID`).
    pub fn task(&self, id: &str) -> serde_json::Value {
        let (code, out, err) = self.cli(&["task", id]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    /// Waits until `pred` holds for task `id`; returns its JSON then.
    pub fn wait_task(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.task(id);
            if pred(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "{what}: still {t}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn tasks(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["tasks", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    pub fn agents(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["agents", "--json"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    }

    pub fn wait_agents(&self, n: usize) {
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

    pub fn submit(&self, args: &[&str]) -> String {
        let mut all = vec!["submit"];
        all.extend_from_slice(args);
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "submit {args:?}: {err}");
        out.trim().to_string()
    }

    /// Waits until `pred` holds for every task.
    pub fn wait_tasks(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) {
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
    pub fn watch(&self) -> (Proc, Arc<Mutex<Vec<serde_json::Value>>>) {
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

    /// Loads the tests' busybox image into `agent`'s store; returns its name.
    pub fn load_busybox(&self, agent: &str) -> &'static str {
        let dir = self.dir.path().join("busybox-image");
        std::fs::create_dir_all(&dir).unwrap();
        let layout = crate::busybox_layout(&dir, "latest").expect("building the busybox layout");
        self.load_image(agent, &layout);
        "localhost/oci:latest"
    }

    pub fn load_image(&self, agent: &str, layout: &Path) {
        run(Command::new(caisson_bin())
            .arg("--root")
            .arg(self.agent_root(agent))
            .args(["load", "-q", "-i", &format!("{}:latest", layout.display())]))
        .unwrap();
    }

    /// No container left on `agent` (each is removed once its end is reported).
    pub fn assert_no_containers(&self, agent: &str) {
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

pub fn terminal(t: &serde_json::Value) -> bool {
    matches!(
        t["state"].as_str(),
        Some("FINISHED" | "FAILED" | "KILLED" | "LOST")
    )
}

/// Terminal events per task id in a watch log.
pub fn terminal_events(seen: &[serde_json::Value]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for t in seen.iter().filter(|t| terminal(t)) {
        m.entry(t["id"].as_str().unwrap().to_string())
            .or_default()
            .push(t["state"].as_str().unwrap().to_string());
    }
    m
}

/// A WASI command: says hello, sleeps `secs` s (poll_oneoff on the monotonic clock), then
/// exits with `code`.
pub fn sleeper_wat(secs: u64, code: u32) -> String {
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "sleeper up\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 11))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i64.store (i32.const 256) (i64.const 0))
    (i32.store8 (i32.const 264) (i32.const 0))
    (i32.store (i32.const 272) (i32.const 1))
    (i64.store (i32.const 280) (i64.const {ns}))
    (i64.store (i32.const 288) (i64.const 0))
    (i32.store16 (i32.const 296) (i32.const 0))
    (drop (call $poll (i32.const 256) (i32.const 512) (i32.const 1) (i32.const 600)))
    (call $exit (i32.const {code}))))
"#,
        ns = secs * 1_000_000_000
    )
}
