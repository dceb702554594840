//! Launch-to-exit of `/bin/true` inside a long-running process, the agent's path:
//! `Runtime::launch` (supervisor spawn, cgroups, namespaces, mounts, exec) then `wait()` until
//! the exit is recorded. Issue target: median at most 2 ms on our 2-core machines.
//!
//! Needs root. Run: `cargo bench -p caisson-benches --bench launch [-- RUNS]`; the supervisor is
//! `$CAISSON_SHIM` or `target/release/caisson-shim` (build it first:
//! `cargo build --release -p caisson --bins`). The root filesystem is a directory holding a
//! static busybox (`/bin/busybox` from busybox-static), as `caisson run --rootfs` would use.
//! Prints the median and quartiles of launch-to-exit and of launch-to-exec, and the median
//! per-phase timings the supervisor recorded.
use std::path::PathBuf;
use std::time::Instant;

use containerizer::launch::{Process, Runtime, TaskSpec};

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    if !nix_is_root() {
        eprintln!("launch bench: needs root, skipping");
        return Ok(());
    }
    let shim = std::env::var_os("CAISSON_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/caisson-shim")
        });
    anyhow::ensure!(shim.exists(), "{} missing: build it first", shim.display());
    let tmp = tempfile::tempdir()?;
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true"))?;
    for d in ["proc", "dev", "sys", "etc", "mnt/sandbox", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    for f in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        std::fs::write(rootfs.join(f), "")?;
    }
    // The agent's path: a supervisor started ahead of each launch.
    let rt = Runtime::new(tmp.path().join("state"))
        .with_shim(shim)
        .with_warm_supervisor();
    let spec = TaskSpec {
        image: "bench".into(),
        rootfs: rootfs.clone(),
        process: Process {
            args: vec!["/bin/true".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        },
        auto_remove: true,
        ..Default::default()
    };
    let (mut exit, mut exec) = (vec![], vec![]);
    let mut phases: Vec<containerizer::launch::Timings> = vec![];
    for i in 0..runs + 5 {
        let t0 = Instant::now();
        let mut task = rt.launch(spec.clone())?;
        let t_exec = t0.elapsed();
        let st = task.wait()?;
        let t_exit = t0.elapsed();
        anyhow::ensure!(st.exit_code == Some(0), "exit {:?}", st.exit_code);
        task.finish();
        if i >= 5 {
            exec.push(t_exec.as_secs_f64() * 1e3);
            exit.push(t_exit.as_secs_f64() * 1e3);
            phases.push(st.timings);
        }
    }
    let q = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        format!(
            "median {:.2} ms (p25 {:.2}, p75 {:.2}, min {:.2})",
            at(0.5),
            at(0.25),
            at(0.75),
            v[0]
        )
    };
    println!("launch-to-exit over {runs} runs: {}", q(&mut exit));
    println!("launch-to-exec over {runs} runs: {}", q(&mut exec));
    let med = |f: &dyn Fn(&containerizer::launch::Timings) -> u64| {
        let mut v: Vec<u64> = phases.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!(
        "median phases (µs): prepare {} spawn {} cgroup {} namespaces {} cgroup_join {} mounts {} exec {} total {}",
        med(&|t| t.prepare_us),
        med(&|t| t.spawn_us),
        med(&|t| t.cgroup_us),
        med(&|t| t.namespaces_us),
        med(&|t| t.cgroup_join_us),
        med(&|t| t.mounts_us),
        med(&|t| t.exec_us),
        med(&|t| t.total_us),
    );
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
