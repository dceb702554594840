//! Criterion micro-benchmarks of the native launch path's parts, one group each: overlay root
//! mount and removal, cgroup create + destroy, namespaces + exec to exit (the supervisor's whole
//! job), and CNI ADD/DEL with our bridge + host-local plugins. (Layer unpack is in `unpack`,
//! Wasm instantiate from the template and the disk cache in `wasm`.)
//!
//! Needs root (skips otherwise). Run: `cargo build --release -p caisson --bins -p
//! caisson-cni-plugins && cargo bench -p caisson-benches --bench parts`. The supervisor and the
//! plugins are taken from the target dir of this bench's profile (`$CAISSON_SHIM`,
//! `$CAISSON_CNI_PLUGINS` override); a group whose binary is missing is skipped with a note.
//! Private names: cgroups `caisson-bench-<pid>-N`, bridge `cstbench2`, 10.232.202.0/24.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerizer::cgroups::{Limits, TaskCgroup};
use containerizer::image::rootfs::{self, Backend, CreateOptions};
use containerizer::launch::{Process, Runtime, TaskSpec};
use containerizer::net::{Cni, CniOptions, Netns, NetworkRequest};
use criterion::{criterion_group, Criterion};

/// `target/<profile>`: benches run from `target/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .into()
}

/// A root filesystem directory holding a static busybox, as `caisson run --rootfs` would use.
fn busybox_root(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/true")).unwrap();
    for d in ["proc", "dev", "sys", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for f in ["etc/hostname", "etc/hosts", "etc/resolv.conf"] {
        std::fs::write(root.join(f), "").unwrap();
    }
    root
}

fn rootfs_group(c: &mut Criterion, dir: &Path) {
    // Two lower layers, as a small image would have.
    let lower1 = busybox_root(&dir.join("l1"));
    let lower2 = dir.join("l2");
    std::fs::create_dir_all(lower2.join("etc")).unwrap();
    std::fs::write(lower2.join("etc/motd"), "hi\n").unwrap();
    let lowers = [lower1, lower2];
    let opts = CreateOptions {
        volatile: true,
        ..CreateOptions::from_env()
    };
    let base = dir.join("roots");
    let mut n = 0u64;
    let mut g = c.benchmark_group("rootfs");
    // Each half is timed alone: the other half is the setup or cleanup of its iteration.
    g.bench_function("overlay_mount", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let d = base.join(n.to_string());
                std::fs::create_dir_all(&d).unwrap();
                let t = Instant::now();
                rootfs::create_with(&lowers, &d, Backend::Overlay, &opts).unwrap();
                total += t.elapsed();
                rootfs::remove(&d).unwrap();
            }
            total
        })
    });
    g.bench_function("overlay_remove", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let d = base.join(n.to_string());
                std::fs::create_dir_all(&d).unwrap();
                rootfs::create_with(&lowers, &d, Backend::Overlay, &opts).unwrap();
                let t = Instant::now();
                rootfs::remove(&d).unwrap();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn cgroup_group(c: &mut Criterion) {
    let limits = Limits {
        memory: Some(64 << 20),
        pids: Some(100),
        ..Limits::default()
    };
    let mut n = 0u64;
    let mut g = c.benchmark_group("cgroup");
    g.bench_function("create_and_destroy_memory_pids", |b| {
        b.iter(|| {
            n += 1;
            let id = format!("caisson-bench-{}-{n}", std::process::id());
            let cg = TaskCgroup::create(&id, &limits).unwrap();
            cg.destroy(Duration::from_secs(5)).unwrap();
        })
    });
    g.finish();
}

fn launch_group(c: &mut Criterion, dir: &Path) {
    let shim = std::env::var_os("CAISSON_SHIM")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("caisson-shim"));
    if !shim.exists() {
        eprintln!(
            "parts bench: {} missing (cargo build -p caisson --bins); launch group skipped",
            shim.display()
        );
        return;
    }
    let root = busybox_root(&dir.join("launch"));
    let rt = Runtime::new(dir.join("state")).with_shim(shim);
    let spec = TaskSpec {
        image: "bench".into(),
        rootfs: root,
        process: Process {
            args: vec!["/bin/true".into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
        },
        auto_remove: true,
        ..Default::default()
    };
    let mut g = c.benchmark_group("launch");
    g.sample_size(30);
    g.bench_function("namespaces_exec_to_exit", |b| {
        b.iter(|| {
            let mut task = rt.launch(spec.clone()).unwrap();
            let st = task.wait().unwrap();
            assert_eq!(st.exit_code, Some(0));
            task.finish();
        })
    });
    g.finish();
}

fn cni_group(c: &mut Criterion, dir: &Path) {
    let plugins = std::env::var_os("CAISSON_CNI_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(profile_dir);
    if !plugins.join("bridge").exists() || !plugins.join("host-local").exists() {
        eprintln!(
            "parts bench: no CNI plugins in {} (cargo build -p caisson-cni-plugins); cni group skipped",
            plugins.display()
        );
        return;
    }
    let nd = dir.join("net.d");
    std::fs::create_dir_all(&nd).unwrap();
    let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "bench", "plugins": [{
        "type": "bridge", "bridge": "cstbench2", "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": dir.join("ipam"),
                 "ranges": [[{"subnet": "10.232.202.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]});
    std::fs::write(nd.join("bench.conflist"), conf.to_string()).unwrap();
    let cni = Cni::new(CniOptions {
        config_dir: nd,
        plugin_dirs: vec![plugins],
        state_dir: dir.join("cni-state"),
        timeout: Duration::from_secs(20),
    });
    let ns = Netns::create(dir.join("caisson-test-bench-parts")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("cni");
    g.sample_size(20);
    let (mut add, mut del) = (Duration::ZERO, Duration::ZERO);
    g.bench_function("bridge_host_local_add_del", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            rt.block_on(async {
                for _ in 0..iters {
                    let t = Instant::now();
                    cni.setup("bench", ns.path(), &[NetworkRequest::new("bench")])
                        .await
                        .unwrap();
                    add += t.elapsed();
                    let t = Instant::now();
                    cni.teardown("bench").await.unwrap();
                    del += t.elapsed();
                }
            });
            t0.elapsed()
        })
    });
    g.finish();
    println!(
        "cni: ADD is {:.0}% of ADD+DEL over all iterations",
        100.0 * add.as_secs_f64() / (add + del).as_secs_f64().max(1e-9)
    );
    let _ = ns.delete();
    let _ = std::process::Command::new("ip")
        .args(["link", "del", "cstbench2"])
        .output();
}

fn bench(c: &mut Criterion) {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("parts bench: needs root, skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    rootfs_group(c, dir.path());
    cgroup_group(c);
    launch_group(c, dir.path());
    cni_group(c, dir.path());
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
