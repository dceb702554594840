//! ADD+DEL of a bridge + host-local network, our plugins vs the reference plugins
//! (/usr/lib/cni), in one run, interleaved so that machine noise hits both alike. Driven through
//! caisson's own runtime (`containerizer::net`), so each number is what a task launch pays.
//!
//! Run as root (benches/cni-compare.sh builds our plugins in release first):
//!   cargo build --release -p caisson-cni-plugins && cargo bench -p caisson-benches --bench cni [-- RUNS]
//! Safety: its own netns file, bridge `cstbench0`, 10.232.200.0/24; all removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerizer::net::{Cni, CniOptions, Netns, NetworkRequest};
use serde_json::json;

struct Guard {
    ns: Option<Netns>,
    bridge: &'static str,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(ns) = self.ns.take() {
            let _ = ns.delete();
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", self.bridge])
            .output();
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn cni(dir: &Path, name: &str, plugins: PathBuf) -> Cni {
    let nd = dir.join(name).join("net.d");
    std::fs::create_dir_all(&nd).unwrap();
    let conf = json!({"cniVersion": "1.0.0", "name": "bench", "plugins": [{
        "type": "bridge", "bridge": "cstbench0", "isGateway": true,
        "ipam": {"type": "host-local", "dataDir": dir.join(name).join("ipam"),
                 "ranges": [[{"subnet": "10.232.200.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}}]});
    std::fs::write(nd.join("bench.conflist"), conf.to_string()).unwrap();
    Cni::new(CniOptions {
        config_dir: nd,
        plugin_dirs: vec![plugins],
        state_dir: dir.join(name).join("state"),
        timeout: Duration::from_secs(20),
    })
}

fn main() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("cni bench: needs root, skipped");
        return;
    }
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let exe = std::env::current_exe().unwrap();
    // Our plugins next to this binary, or where CAISSON_CNI_PLUGINS says (e.g. a release
    // build driven by a debug runner: the runtime is the same for both sets).
    let ours = std::env::var_os("CAISSON_CNI_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe.parent().and_then(Path::parent).unwrap().to_path_buf());
    assert!(
        ours.join("bridge").exists(),
        "build our plugins first: cargo build --release -p caisson-cni-plugins"
    );
    // Cache, IPAM and netns where caisson keeps them (tmpfs), for both sets of plugins.
    let _ = containerizer::net::volatile::ensure_tmpfs();
    let dir = tempfile::tempdir_in(containerizer::net::RUN_DIR).unwrap();
    let mut guard = Guard {
        ns: None,
        bridge: "cstbench0",
    };
    let ns = Netns::create(dir.path().join("caisson-test-bench")).unwrap();
    let nspath = ns.path().to_path_buf();
    guard.ns = Some(ns);
    let mut sets = vec![
        (
            "reference".to_string(),
            cni(dir.path(), "ref", "/usr/lib/cni".into()),
        ),
        ("caisson".to_string(), cni(dir.path(), "ours", ours)),
    ];
    // CAISSON_CNI_EXTRA=NAME=DIR adds another plugin set to the same interleaved run (e.g. the
    // plugins of an older build, for an A/B).
    if let Some((name, d)) = std::env::var("CAISSON_CNI_EXTRA").ok().and_then(|v| {
        v.split_once('=')
            .map(|(a, b)| (a.to_string(), b.to_string()))
    }) {
        sets.push((name, cni(dir.path(), "extra", d.into())));
    }
    let n = sets.len();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut add = vec![Vec::new(); n];
    let mut del = vec![Vec::new(); n];
    let mut both = vec![Vec::new(); n];
    rt.block_on(async {
        for i in 0..runs + 5 {
            for (k, (_, cni)) in sets.iter().enumerate() {
                let t0 = Instant::now();
                cni.setup("bench", &nspath, &[NetworkRequest::new("bench")])
                    .await
                    .unwrap();
                let t1 = Instant::now();
                cni.teardown("bench").await.unwrap();
                let t2 = Instant::now();
                if i >= 5 {
                    add[k].push(t1 - t0);
                    del[k].push(t2 - t1);
                    both[k].push(t2 - t0);
                }
            }
        }
    });
    println!("CNI bridge + host-local, {runs} runs each, interleaved, medians:");
    println!(
        "{:<10} {:>10} {:>10} {:>10}",
        "plugins", "ADD", "DEL", "ADD+DEL"
    );
    for (k, (name, _)) in sets.iter().enumerate() {
        println!(
            "{:<10} {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            name,
            median(&mut add[k]).as_secs_f64() * 1e3,
            median(&mut del[k]).as_secs_f64() * 1e3,
            median(&mut both[k]).as_secs_f64() * 1e3,
        );
    }
}
