//! `caisson bench master`: a master loaded by simulated agents. The report's structure and
//! sanity (every agent registered, every task ended exactly once, counts and ordered
//! percentiles), against the embedded master and against a real `caisson master` process.
//! Never timings.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caisson_tests::*;
use serde_json::Value;

fn check(r: &Value, agents: u64, tasks: u64) {
    assert_eq!(r["agents"], agents, "{r}");
    assert_eq!(r["agents_registered"], agents, "{r}");
    assert_eq!(r["tasks"], tasks, "{r}");
    assert_eq!(r["terminal"], tasks, "{r}");
    assert_eq!(r["finished"], tasks, "{r}");
    assert_eq!(r["other_terminal"], 0, "{r}");
    assert_eq!(r["duplicate_terminal"], 0, "{r}");
    assert_eq!(r["launches"], tasks, "each task launched once: {r}");
    assert!(r["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["tasks_per_second"].as_f64().unwrap() > 0.0);
    let phases = r["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["register", "submit_rpc", "to_running", "to_terminal"],
        "{r}"
    );
    for p in phases {
        let n = if p["name"] == "register" {
            agents
        } else {
            tasks
        };
        assert_eq!(p["n"], n, "{p}");
        let v: Vec<f64> = ["min_us", "p50_us", "p90_us", "p99_us", "max_us"]
            .iter()
            .map(|k| p[k].as_f64().unwrap())
            .collect();
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{p}");
    }
    // A task is RUNNING before it is FINISHED.
    let p50 = |name: &str| {
        phases.iter().find(|p| p["name"] == name).unwrap()["p50_us"]
            .as_f64()
            .unwrap()
    };
    assert!(p50("to_running") <= p50("to_terminal"), "{r}");
}

#[test]
fn embedded_master_under_simulated_agents() {
    let c = Caisson::new();
    let (code, out, err) = c.run(&[
        "bench", "master", "--agents", "40", "--tasks", "400", "-c", "32", "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    check(&r, 40, 400);
    assert_eq!(r["master"], "embedded");
}

struct MasterProc(Child);

impl Drop for MasterProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn remote_master_under_simulated_agents_and_a_wrong_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _m = MasterProc(
        Command::new(caisson_bin())
            .args(["master", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state")
            .arg(dir.path())
            .args(["--join-token", "jt-bench", "--api-token", "at-bench"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "master did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = Caisson::new();
    let (code, out, err) = c.run(&[
        "bench",
        "master",
        "--master",
        &url,
        "--join-token",
        "jt-bench",
        "--token",
        "at-bench",
        "--agents",
        "10",
        "--tasks",
        "100",
        "--json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let r: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    check(&r, 10, 100);
    assert_eq!(r["master"], url.as_str());

    // The wrong join token: refused, said so, non-zero exit.
    let (code, out, err) = c.run(&[
        "bench",
        "master",
        "--master",
        &url,
        "--join-token",
        "wrong",
        "--token",
        "at-bench",
        "--agents",
        "2",
        "--tasks",
        "2",
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.to_lowercase().contains("unauthenticated") || err.contains("token"),
        "{err}"
    );
}
